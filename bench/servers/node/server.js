// Node's `ws` (npm, version 8) as a chat server under test of `python -m bench`.
//
// The chat protocol of the other servers: a client connects at /ws/{client_id}?room=NAME,
// sends {"message": "..."}, and every member of the room (the sender too) gets one JSON
// envelope per message with the room's own seq. The envelope is encoded once per message
// and the same Buffer is sent to every open member, as ws's README broadcasts.
//
// Run: node bench/servers/node/server.js --host 127.0.0.1 --port 8000
"use strict";
const { WebSocketServer, WebSocket } = require("ws");

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const index = args.indexOf(name);
  return index >= 0 ? args[index + 1] : fallback;
};
const rooms = new Map(); // room name -> { members: Set<WebSocket>, seq: number }
const wss = new WebSocketServer({
  host: option("--host", "127.0.0.1"),
  port: Number(option("--port", "8000")),
  perMessageDeflate: false,
  maxPayload: 65536,
});

wss.on("connection", (socket, request) => {
  const url = new URL(request.url, "http://localhost");
  const clientId = decodeURIComponent(url.pathname.split("/").pop());
  const name = url.searchParams.get("room") || "lobby";
  if (!rooms.has(name)) rooms.set(name, { members: new Set(), seq: 0 });
  const room = rooms.get(name);
  room.members.add(socket);
  socket.on("message", (data) => {
    let message;
    try {
      message = JSON.parse(data.toString()).message;
    } catch {
      return; // not JSON: ignored, as the other servers' clients never send it
    }
    room.seq += 1;
    const envelope = Buffer.from(JSON.stringify({
      type: "message", room: name, client_id: clientId, seq: room.seq,
      timestamp: new Date().toISOString(), data: { message },
    }));
    for (const member of room.members) {
      if (member.readyState === WebSocket.OPEN) member.send(envelope, { binary: false });
    }
  });
  socket.on("close", () => {
    room.members.delete(socket);
    if (room.members.size === 0 && rooms.get(name) === room) rooms.delete(name);
  });
});

// ws 8's close() waits for open connections: a signal ends the process at once instead.
for (const signal of ["SIGTERM", "SIGINT"]) process.on(signal, () => process.exit(0));
