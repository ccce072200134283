// A scripted stand-in for the browser's WebSocket, injected into the client in unit tests:
// the test plays the server (open, frames, close) and reads what the client sent.

/** Resolve with the next `event` the client emits (bounded by the test's own timeout). */
export function nextEvent(client, event, predicate = () => true) {
  return new Promise((resolve) => {
    const off = client.on(event, (ctx) => {
      if (!predicate(ctx)) return;
      off();
      resolve(ctx);
    });
  });
}

export class FakeWebSocket {
  static CONNECTING = 0;
  static OPEN = 1;
  static CLOSING = 2;
  static CLOSED = 3;

  /** Every socket made, oldest first. */
  static sockets = [];
  static _waiters = [];

  /** Forget every socket (call at the start of each test). */
  static reset() {
    FakeWebSocket.sockets = [];
    FakeWebSocket._waiters = [];
  }

  /** Resolve with the `index`-th socket the client made (0-based), as soon as it exists. */
  static nth(index) {
    if (FakeWebSocket.sockets.length > index) return Promise.resolve(FakeWebSocket.sockets[index]);
    return new Promise((resolve) => FakeWebSocket._waiters.push({ index, resolve }));
  }

  constructor(url) {
    this.url = url;
    this.readyState = FakeWebSocket.CONNECTING;
    this.sent = [];
    this.closedWith = null;
    this._listeners = new Map();
    FakeWebSocket.sockets.push(this);
    const index = FakeWebSocket.sockets.length - 1;
    FakeWebSocket._waiters = FakeWebSocket._waiters.filter((waiter) => {
      if (waiter.index !== index) return true;
      queueMicrotask(() => waiter.resolve(this));
      return false;
    });
  }

  /** The URL's query parameters. */
  get params() {
    return Object.fromEntries(new URL(this.url).searchParams);
  }

  /** What the client sent, parsed. */
  get frames() {
    return this.sent.map((text) => JSON.parse(text));
  }

  addEventListener(type, listener) {
    const list = this._listeners.get(type) ?? [];
    list.push(listener);
    this._listeners.set(type, list);
  }

  _dispatch(type, event) {
    for (const listener of this._listeners.get(type) ?? []) listener(event);
  }

  send(text) {
    if (this.readyState !== FakeWebSocket.OPEN) throw new Error("not open");
    this.sent.push(text);
  }

  close(code = 1000, reason = "") {
    this.closedWith = { code, reason };
    this.readyState = FakeWebSocket.CLOSED;
  }

  // The test's side: what a server does.

  serverOpen() {
    this.readyState = FakeWebSocket.OPEN;
    this._dispatch("open", {});
  }

  /** Send one frame (an object, encoded as JSON, or a string as is). */
  serverSend(frame) {
    const data = typeof frame === "string" ? frame : JSON.stringify(frame);
    this._dispatch("message", { data });
  }

  /** A failure to connect as Node 20's WebSocket reports it: an error, and no close. */
  serverError() {
    this._dispatch("error", {});
  }

  serverClose(code, reason = "") {
    this.readyState = FakeWebSocket.CLOSED;
    this._dispatch("close", { code, reason, wasClean: code !== 1006 });
  }
}

let counter = 0;

/** An envelope as the server sends it. */
export function envelope(room, seq, epoch, data = { message: `m${seq}` }, type = "message") {
  counter += 1;
  return {
    type,
    room,
    seq,
    epoch,
    id: counter.toString(16).padStart(32, "0"),
    client_id: "bob",
    timestamp: "2026-01-01T00:00:00+00:00",
    data,
  };
}
