// Unit tests of the client's state machine against a scripted fake WebSocket.
import assert from "node:assert/strict";
import { beforeEach, describe, test } from "node:test";

import {
  GAP_CLOSE_CODE,
  NO_RETRY_CODES,
  State,
  WsBroadcastClient,
  backoffDelay,
} from "../src/wsbroadcast-client.js";
import { FakeWebSocket, envelope, nextEvent } from "../testing/fake-websocket.js";

const URL_BASE = "ws://127.0.0.1:1/ws/alice";

function makeClient(options = {}) {
  return new WsBroadcastClient(URL_BASE, {
    WebSocket: FakeWebSocket,
    random: () => 0, // no jitter: every retry at once
    ...options,
  });
}

function record(client, event) {
  const seen = [];
  client.on(event, (ctx) => seen.push(ctx));
  return seen;
}

const texts = (contexts) => contexts.map((ctx) => ctx.envelope.data.message);

beforeEach(() => FakeWebSocket.reset());

describe("backoffDelay", () => {
  test("full jitter under a capped exponential ceiling", () => {
    assert.equal(backoffDelay(0, 500, 20000, () => 0.999), 499);
    assert.equal(backoffDelay(3, 500, 20000, () => 0.5), 2000);
    assert.equal(backoffDelay(40, 500, 20000, () => 0.5), 10000);
    assert.equal(backoffDelay(5, 500, 20000, () => 0), 0);
  });
});

describe("connecting", () => {
  test("URL carries the first room, its position, the personal stream's and the token", async () => {
    const client = makeClient({ token: "tok.en" });
    client.subscribe("chat:lobby", { since: 4, epoch: "e1" });
    client.subscribe("@alice", { since: 9, epoch: "d1" });
    client.subscribe("other");
    const states = record(client, "state");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    assert.deepEqual(ws.params, {
      room: "chat:lobby",
      since: "4",
      epoch: "e1",
      dm_since: "9",
      dm_epoch: "d1",
      token: "tok.en",
    });
    assert.ok(ws.url.includes("room=chat%3Alobby"));
    ws.serverOpen();
    assert.equal(client.state, State.Connected);
    assert.deepEqual(ws.frames, [{ join: "other" }]);
    assert.deepEqual(
      states.map((s) => s.newState),
      ["connecting", "connected"],
    );
    client.disconnect();
  });

  test("no WebSocket implementation is a clear error", () => {
    const global = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
    delete globalThis.WebSocket; // as on Node 20 without --experimental-websocket
    try {
      assert.throws(() => new WsBroadcastClient(URL_BASE), /no WebSocket implementation/);
    } finally {
      if (global) Object.defineProperty(globalThis, "WebSocket", global);
    }
  });
});

describe("envelopes", () => {
  test("in order, duplicates dropped, join/leave/direct events", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    const envelopes = record(client, "envelope");
    const joins = record(client, "join");
    const directs = record(client, "direct");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    ws.serverSend(envelope("lobby", 1, "e", null, "join"));
    ws.serverSend(envelope("lobby", 2, "e"));
    ws.serverSend(envelope("lobby", 2, "e"));
    ws.serverSend(envelope("lobby", 1, "e"));
    ws.serverSend(envelope("lobby", 3, "e"));
    ws.serverSend({ type: "joined", room: "@alice", data: { seq: 0, epoch: "" } });
    ws.serverSend(envelope("@alice", 1, "d", { to: "alice", data: { message: "hi" } }, "direct"));
    ws.serverSend(envelope("elsewhere", 1, "x")); // not subscribed: ignored
    assert.deepEqual(
      envelopes.map((c) => [c.room, c.envelope.seq]),
      [
        ["lobby", 1],
        ["lobby", 2],
        ["lobby", 3],
        ["@alice", 1],
      ],
    );
    assert.equal(joins.length, 1);
    assert.equal(directs.length, 1);
    assert.equal(client.personalStream, "@alice");
    assert.deepEqual(client.position("lobby"), { seq: 3, epoch: "e" });
    assert.deepEqual(client.position("@alice"), { seq: 1, epoch: "d" });
    client.disconnect();
  });

  test("publish and sendDirect send the protocol's frames; nothing is sent offline", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    assert.equal(client.publish("lobby", "early"), false);
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    assert.equal(client.publish("lobby", "hi"), true);
    assert.equal(client.sendDirect("bob", "psst"), true);
    assert.deepEqual(ws.frames, [
      { room: "lobby", message: "hi" },
      { to: "bob", message: "psst" },
    ]);
    client.disconnect();
  });
});

describe("reconnect and resume", () => {
  test("every room resumes from its last seq and epoch; no loss, no duplicate", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    client.subscribe("second");
    const envelopes = record(client, "envelope");
    const disconnected = record(client, "disconnected");
    client.connect();
    const first = await FakeWebSocket.nth(0);
    first.serverOpen();
    first.serverSend({ type: "joined", room: "@alice", data: { seq: 2, epoch: "d" } });
    first.serverSend(envelope("lobby", 7, "e"));
    first.serverSend({ type: "joined", room: "second", data: { seq: 3, epoch: "s" } });
    first.serverSend(envelope("second", 4, "s"));
    first.serverClose(1012, "service restart");
    assert.equal(client.state, State.Disconnected);
    assert.deepEqual(disconnected[0], {
      code: 1012,
      reason: "service restart",
      willRetry: true,
      delay: 0,
    });
    const second = await FakeWebSocket.nth(1);
    assert.deepEqual(second.params, {
      room: "lobby",
      since: "7",
      epoch: "e",
      dm_since: "2",
      dm_epoch: "d",
    });
    second.serverOpen();
    assert.deepEqual(second.frames, [{ join: "second", since: 4, epoch: "s" }]);
    second.serverSend(envelope("lobby", 7, "e")); // a replayed duplicate
    second.serverSend(envelope("lobby", 8, "e"));
    second.serverSend(envelope("second", 5, "s"));
    const subscribed = nextEvent(client, "subscribed", (c) => c.room === "second");
    second.serverSend({ type: "joined", room: "second", data: { seq: 5, epoch: "s" } });
    assert.deepEqual(await subscribed, {
      room: "second",
      seq: 5,
      epoch: "s",
      resumed: true,
      recovered: true,
    });
    assert.deepEqual(
      envelopes.map((c) => `${c.room}:${c.envelope.seq}`),
      ["lobby:7", "second:4", "lobby:8", "second:5"],
    );
    client.disconnect();
  });

  for (const code of NO_RETRY_CODES) {
    test(`close ${code} is final: no retry`, async () => {
      const client = makeClient();
      client.subscribe("lobby");
      client.connect();
      const ws = await FakeWebSocket.nth(0);
      ws.serverOpen();
      const disconnected = nextEvent(client, "disconnected");
      ws.serverClose(code, "bye");
      assert.deepEqual(await disconnected, { code, reason: "bye", willRetry: false, delay: null });
      assert.equal(client.state, State.Disconnected);
      assert.equal(FakeWebSocket.sockets.length, 1);
    });
  }

  for (const code of [1001, 1006, 1011, 1012, 1013, 4008]) {
    test(`close ${code} retries with backoff`, async () => {
      const client = makeClient();
      client.subscribe("lobby");
      client.connect();
      const ws = await FakeWebSocket.nth(0);
      ws.serverOpen();
      const disconnected = nextEvent(client, "disconnected");
      ws.serverClose(code);
      assert.equal((await disconnected).willRetry, true);
      await FakeWebSocket.nth(1);
      client.disconnect();
    });
  }

  test("the backoff grows while connections fail, and restarts once a frame arrives", async () => {
    const client = makeClient({ minReconnectDelay: 1, maxReconnectDelay: 8 });
    const attempts = [];
    client.on("connecting", (ctx) => attempts.push(ctx.attempt));
    client.subscribe("lobby");
    client.connect();
    for (let i = 0; i < 3; i += 1) (await FakeWebSocket.nth(i)).serverClose(1006);
    const ws = await FakeWebSocket.nth(3);
    ws.serverOpen();
    ws.serverSend(envelope("lobby", 1, "e"));
    ws.serverClose(1006);
    await FakeWebSocket.nth(4);
    assert.deepEqual(attempts, [0, 1, 2, 3, 1]); // not 4: the frame restarted the count
    client.disconnect();
  });

  test("an error without a close (Node 20, connection refused) is a 1006 and retried", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    client.connect();
    const first = await FakeWebSocket.nth(0);
    const disconnected = nextEvent(client, "disconnected");
    first.serverError();
    assert.deepEqual(await disconnected, {
      code: 1006,
      reason: "connection error",
      willRetry: true,
      delay: 0,
    });
    first.serverClose(1006); // a browser's close after the error: ignored
    const second = await FakeWebSocket.nth(1);
    second.serverOpen();
    assert.equal(client.state, State.Connected);
    assert.equal(FakeWebSocket.sockets.length, 2);
    client.disconnect();
  });

  test("disconnect() closes with 1000 and stops retrying", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    const disconnected = nextEvent(client, "disconnected");
    client.disconnect();
    assert.deepEqual(ws.closedWith, { code: 1000, reason: "client disconnect" });
    assert.equal((await disconnected).willRetry, false);
    ws.serverClose(1000); // late: ignored
    assert.equal(FakeWebSocket.sockets.length, 1);
  });
});

describe("gaps and lost history", () => {
  test("a live seq gap drops the connection and resumes from the last seq", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    const envelopes = record(client, "envelope");
    const gaps = record(client, "gap");
    client.connect();
    const first = await FakeWebSocket.nth(0);
    first.serverOpen();
    first.serverSend(envelope("lobby", 1, "e"));
    first.serverSend(envelope("lobby", 2, "e"));
    first.serverSend(envelope("lobby", 5, "e")); // 3 and 4 were dropped (drop_oldest)
    first.serverSend(envelope("lobby", 6, "e")); // after the gap: ignored
    assert.deepEqual(first.closedWith, { code: GAP_CLOSE_CODE, reason: "gap" });
    assert.deepEqual(gaps, [{ room: "lobby", expected: 3, received: 5 }]);
    const second = await FakeWebSocket.nth(1);
    assert.deepEqual(second.params, { room: "lobby", since: "2", epoch: "e" });
    second.serverOpen();
    for (const seq of [3, 4, 5, 6]) second.serverSend(envelope("lobby", seq, "e"));
    assert.deepEqual(
      envelopes.map((c) => c.envelope.seq),
      [1, 2, 3, 4, 5, 6],
    );
    client.disconnect();
  });

  test("a joined frame ahead of the replay is a gap too", async () => {
    const client = makeClient();
    client.subscribe("a");
    client.subscribe("b", { since: 1, epoch: "x" });
    client.connect();
    const first = await FakeWebSocket.nth(0);
    first.serverOpen();
    first.serverSend(envelope("b", 2, "x"));
    first.serverSend({ type: "joined", room: "b", data: { seq: 4, epoch: "x" } });
    const second = await FakeWebSocket.nth(1);
    second.serverOpen();
    assert.deepEqual(second.frames, [{ join: "b", since: 2, epoch: "x" }]);
    client.disconnect();
  });

  test("history_lost is surfaced, the new epoch adopted, the next envelope taken", async () => {
    const client = makeClient();
    client.subscribe("lobby", { since: 7, epoch: "old" });
    const lost = record(client, "history_lost");
    const envelopes = record(client, "envelope");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    ws.serverSend({
      type: "history_lost",
      room: "lobby",
      data: { since: 7, epoch: "new", first_seq: 1, last_seq: 3 },
    });
    ws.serverSend(envelope("lobby", 4, "new", null, "join"));
    ws.serverSend(envelope("lobby", 5, "new"));
    assert.deepEqual(lost, [{ room: "lobby", since: 7, epoch: "new", firstSeq: 1, lastSeq: 3 }]);
    assert.deepEqual(
      envelopes.map((c) => c.envelope.seq),
      [4, 5],
    );
    assert.equal(FakeWebSocket.sockets.length, 1, "history_lost is no reason to reconnect");
    client.disconnect();
  });

  test("an epoch change without history_lost is reported as lost history", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    const lost = record(client, "history_lost");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    ws.serverSend(envelope("lobby", 9, "one"));
    ws.serverSend(envelope("lobby", 1, "two"));
    assert.equal(lost.length, 1);
    assert.equal(lost[0].epoch, "two");
    assert.deepEqual(client.position("lobby"), { seq: 1, epoch: "two" });
    client.disconnect();
  });
});

describe("rooms", () => {
  test("subscribe while connected joins; unsubscribe leaves and drops the room's frames", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    const envelopes = record(client, "envelope");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    client.subscribe("news");
    ws.serverSend({ type: "joined", room: "news", data: { seq: 10, epoch: "n" } });
    ws.serverSend(envelope("news", 11, "n"));
    const unsubscribed = nextEvent(client, "unsubscribed");
    client.unsubscribe("news");
    ws.serverSend(envelope("news", 12, "n")); // still queued before the leave: dropped
    ws.serverSend({ type: "left", room: "news", data: null });
    assert.deepEqual(await unsubscribed, { room: "news", code: null, reason: "unsubscribed" });
    assert.deepEqual(ws.frames, [{ join: "news" }, { leave: "news" }]);
    assert.deepEqual(
      envelopes.map((c) => c.envelope.seq),
      [11],
    );
    client.disconnect();
  });

  test("a refused join is an error and ends the subscription; already_joined subscribes", async () => {
    const client = makeClient();
    client.subscribe("lobby");
    const errors = record(client, "error");
    client.connect();
    const ws = await FakeWebSocket.nth(0);
    ws.serverOpen();
    client.subscribe("staff");
    client.subscribe("lobby2");
    const unsubscribed = nextEvent(client, "unsubscribed");
    ws.serverSend({
      type: "error",
      room: "staff",
      data: { code: "forbidden_room", detail: "no" },
    });
    assert.deepEqual(await unsubscribed, { room: "staff", code: "forbidden_room", reason: "no" });
    const subscribed = nextEvent(client, "subscribed");
    ws.serverSend({
      type: "error",
      room: "lobby2",
      data: { code: "already_joined", detail: "in it" },
    });
    assert.equal((await subscribed).room, "lobby2");
    assert.deepEqual(
      errors.map((e) => [e.type, e.room, e.code]),
      [
        ["server", "staff", "forbidden_room"],
        ["server", "lobby2", "already_joined"],
      ],
    );
    assert.deepEqual(
      client.subscriptions().map((s) => s.room),
      ["lobby", "lobby2"],
    );
    client.disconnect();
  });
});
