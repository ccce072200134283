// wsbroadcast JavaScript client: one WebSocket, several rooms, exact resume.
//
// Dependency-free ES module for browsers and Node >= 20 (pass a WebSocket constructor where
// there is no global one). It speaks the protocol of docs/protocol.md ("The chat app's
// WebSocket protocol") and keeps the server's guarantees end to end: it tracks seq and epoch
// per room (its personal stream included), resumes every room from them after a reconnect,
// drops duplicates, treats a seq gap on a live stream as loss and resumes, surfaces
// history_lost, and reconnects with capped exponential backoff and full jitter, except on the
// close codes that mean "do not come back". docs/clients.md describes the state machine.

/** The client's states. */
export const State = Object.freeze({
  Disconnected: "disconnected",
  Connecting: "connecting",
  Connected: "connected",
});

/** The states of one room's subscription. */
export const SubscriptionState = Object.freeze({
  Subscribing: "subscribing",
  Subscribed: "subscribed",
  Unsubscribing: "unsubscribing",
});

/**
 * Close codes after which the client does not reconnect: the server (or the client itself)
 * ended the session on purpose, or reconnecting would only repeat the refusal.
 * 1000 normal closure, 1002 protocol error, 1003 unsupported data, 1007 invalid payload,
 * 1008 policy violation (bad name, forbidden origin, refused token), 1009 message too big,
 * 1010 mandatory extension. Every other code (1001 going away, 1005 no status, 1006 abnormal
 * closure, 1011 backend unavailable, 1012 service restart, 1013 try again later, 1014, 4008
 * slow consumer, any other 4xxx) is retried with backoff, resuming every room.
 * @type {readonly number[]}
 */
export const NO_RETRY_CODES = Object.freeze([1000, 1002, 1003, 1007, 1008, 1009, 1010]);

/** The close code this client uses when it drops a connection to resume after a seq gap. */
export const GAP_CLOSE_CODE = 4000;

/** Server error codes that answer a join and mean the room cannot be joined (no retry). */
const JOIN_REFUSALS = new Set([
  "forbidden_room",
  "too_many_rooms",
  "invalid_room",
  "bad_since",
  "bad_epoch",
]);

const OPEN = 1; // WebSocket.OPEN, the same number for every implementation.

/**
 * Full-jitter exponential backoff (see AWS's "Exponential Backoff And Jitter"): a delay
 * drawn uniformly from [0, min(maxDelay, minDelay * 2 ** attempt)), so that clients cut off
 * together do not come back together.
 * @param {number} attempt 0 for the first retry
 * @param {number} minDelay ms
 * @param {number} maxDelay ms
 * @param {() => number} random a number in [0, 1)
 * @returns {number} ms
 */
export function backoffDelay(attempt, minDelay, maxDelay, random = Math.random) {
  const ceiling = Math.min(maxDelay, minDelay * 2 ** Math.min(attempt, 31));
  return Math.floor(random() * ceiling);
}

/**
 * A client of one wsbroadcast server endpoint (e.g. `ws://host/ws/alice`).
 *
 * Create it, subscribe to rooms, then `connect()`; or connect first and subscribe later.
 * Events (listen with `on`): `state`, `connecting`, `connected`, `disconnected`, `envelope`,
 * `join`, `leave`, `direct`, `subscribed`, `unsubscribed`, `history_lost`, `gap`, `error`.
 */
export class WsBroadcastClient {
  /**
   * @param {string} url the WebSocket endpoint, `ws://` or `wss://`, with the client id in it
   *   as the server wants (the chat app: `/ws/{client_id}`)
   * @param {object} [options]
   * @param {string} [options.token] sent as `token=` (the chat app's `--jwt-secret`)
   * @param {any} [options.WebSocket] a WebSocket constructor (default: the global one)
   * @param {number} [options.minReconnectDelay] ms, default 500
   * @param {number} [options.maxReconnectDelay] ms, default 20000
   * @param {number} [options.openTimeout] ms to wait for the handshake, default 10000
   * @param {Iterable<number>} [options.noRetryCodes] default NO_RETRY_CODES
   * @param {() => number} [options.random] the jitter's source, default Math.random
   */
  constructor(url, options = {}) {
    this._url = String(url);
    this._token = options.token ?? null;
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== "function") {
      throw new TypeError(
        "no WebSocket implementation: pass options.WebSocket (Node 20: --experimental-websocket)",
      );
    }
    this._WebSocket = WS;
    this._minDelay = options.minReconnectDelay ?? 500;
    this._maxDelay = options.maxReconnectDelay ?? 20000;
    this._openTimeout = options.openTimeout ?? 10000;
    this._noRetry = new Set(options.noRetryCodes ?? NO_RETRY_CODES);
    this._random = options.random ?? Math.random;
    /** @type {Map<string, Function[]>} */
    this._listeners = new Map();
    /** @type {Map<string, any>} subscriptions by room, the personal stream included */
    this._subs = new Map();
    this._personal = null; // the personal stream's room (`@id`), learnt from the server
    this._state = State.Disconnected;
    this._ws = null;
    this._urlRoom = null; // the room the current connection was opened with
    this._attempt = 0;
    this._retryTimer = null;
    this._openTimer = null;
    this._wanted = false; // connect() called and no disconnect() since
    this._heard = false; // a frame arrived on the current connection
  }

  /** @returns {string} "disconnected", "connecting" or "connected" */
  get state() {
    return this._state;
  }

  /** The personal stream's room (`@<client id>`) once the server named it, else null. */
  get personalStream() {
    return this._personal;
  }

  /**
   * Listen to an event; returns a function that removes the listener.
   * @param {string} event
   * @param {Function} listener
   * @returns {() => void}
   */
  on(event, listener) {
    const list = this._listeners.get(event) ?? [];
    list.push(listener);
    this._listeners.set(event, list);
    return () => this.off(event, listener);
  }

  /** Listen to the next `event` only. */
  once(event, listener) {
    const off = this.on(event, (ctx) => {
      off();
      listener(ctx);
    });
    return off;
  }

  /** Remove a listener added with `on`. */
  off(event, listener) {
    const list = this._listeners.get(event);
    if (!list) return;
    const index = list.indexOf(listener);
    if (index >= 0) list.splice(index, 1);
  }

  _emit(event, ctx) {
    for (const listener of [...(this._listeners.get(event) ?? [])]) {
      try {
        listener(ctx);
      } catch (error) {
        // A listener's bug must not break the client's bookkeeping.
        if (event === "error") console.error(error);
        else this._emit("error", { type: "listener", code: "listener", detail: String(error), error });
      }
    }
  }

  _setState(state) {
    if (state === this._state) return;
    const oldState = this._state;
    this._state = state;
    this._emit("state", { newState: state, oldState });
  }

  /**
   * Subscribe to `room`. With `since` (and the `epoch` of that envelope) the server first
   * sends what the client missed after it, or `history_lost`. Joined at once if connected,
   * else at the next connection.
   * @param {string} room
   * @param {{since?: number, epoch?: string}} [position]
   */
  subscribe(room, position = {}) {
    if (typeof room !== "string" || room.length === 0) throw new TypeError("room must be a name");
    if (room.startsWith("@")) {
      // The personal stream is joined by the server at connect; this only sets where to
      // resume it from (dm_since, dm_epoch), e.g. a position kept across a page reload.
      if (this._personal !== null && this._personal !== room) {
        throw new TypeError(`the personal stream is ${this._personal}`);
      }
      const sub = this._subFor(room);
      if (sub.seq === null && position.since !== undefined) {
        sub.seq = position.since;
        sub.epoch = position.epoch ?? null;
      }
      return;
    }
    const existing = this._subs.get(room);
    if (existing && existing.state !== SubscriptionState.Unsubscribing) return;
    const sub = {
      room,
      seq: position.since ?? null,
      epoch: position.epoch ?? null,
      acceptAny: false,
      state: SubscriptionState.Subscribing,
      personal: false,
      resuming: false,
      lost: false,
      retryTimer: null,
      rejoin: Boolean(existing), // a leave is still under way: join after `left`
    };
    this._subs.set(room, sub);
    if (this._isOpen() && !sub.rejoin) this._sendJoin(sub);
  }

  /**
   * Stop receiving `room`. Its envelopes still in flight are dropped; `unsubscribed` follows
   * once the server confirmed (`left`), or at once when not connected.
   * @param {string} room
   */
  unsubscribe(room) {
    const sub = this._subs.get(room);
    if (!sub || sub.personal || sub.state === SubscriptionState.Unsubscribing) return;
    clearTimeout(sub.retryTimer);
    if (this._isOpen()) {
      sub.state = SubscriptionState.Unsubscribing;
      sub.rejoin = false;
      this._sendFrame({ leave: room });
    } else {
      this._subs.delete(room);
      this._emit("unsubscribed", { room, code: null, reason: "unsubscribed" });
    }
  }

  /**
   * Where the client is in each room: what a resume would send.
   * @returns {{room: string, seq: number|null, epoch: string|null, state: string, personal: boolean}[]}
   */
  subscriptions() {
    return [...this._subs.values()].map((s) => ({
      room: s.room,
      seq: s.seq,
      epoch: s.epoch,
      state: s.state,
      personal: s.personal,
    }));
  }

  /** The last seq and epoch seen of `room`, or null if not subscribed. */
  position(room) {
    const sub = this._subs.get(room);
    return sub ? { seq: sub.seq, epoch: sub.epoch } : null;
  }

  /** Publish a chat message to `room` (the server's copy, back to us too, is the receipt). */
  publish(room, message) {
    return this._sendFrame({ room, message });
  }

  /** Send a direct message to `clientId` (it arrives in both personal streams). */
  sendDirect(clientId, message) {
    return this._sendFrame({ to: clientId, message });
  }

  /**
   * Send one JSON frame as is; false (nothing sent) when not connected: the client does not
   * queue outgoing frames, since a frame sent twice after a reconnect would be published twice.
   * @param {object} frame
   * @returns {boolean}
   */
  send(frame) {
    return this._sendFrame(frame);
  }

  /** Open the connection (and keep it open: reconnect as needed until `disconnect()`). */
  connect() {
    if (this._wanted) return;
    this._wanted = true;
    this._attempt = 0;
    this._open();
  }

  /** Close the connection for good (code 1000); subscriptions and positions are kept. */
  disconnect() {
    const active = this._ws !== null || this._retryTimer !== null;
    this._wanted = false;
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
    const ws = this._drop();
    if (ws) this._closeSocket(ws, 1000, "client disconnect");
    if (active) this._afterClose(1000, "client disconnect", false, null);
  }

  _isOpen() {
    return this._ws !== null && this._state === State.Connected;
  }

  _sendFrame(frame) {
    if (!this._isOpen() || this._ws.readyState !== OPEN) return false;
    this._ws.send(JSON.stringify(frame));
    return true;
  }

  _sendJoin(sub) {
    const frame = { join: sub.room };
    if (sub.seq !== null) {
      frame.since = sub.seq;
      if (sub.epoch !== null) frame.epoch = sub.epoch;
    }
    sub.state = SubscriptionState.Subscribing;
    sub.resuming = sub.seq !== null;
    sub.lost = false;
    this._sendFrame(frame);
  }

  _buildUrl() {
    const url = new URL(this._url);
    const first = [...this._subs.values()].find(
      (s) => !s.personal && s.state !== SubscriptionState.Unsubscribing,
    );
    this._urlRoom = first ? first.room : null;
    const put = (key, value) => url.searchParams.set(key, String(value));
    if (first) {
      put("room", first.room);
      if (first.seq !== null) {
        put("since", first.seq);
        if (first.epoch !== null) put("epoch", first.epoch);
      }
    }
    const personal = this._personal && this._subs.get(this._personal);
    if (personal && personal.seq !== null) {
      put("dm_since", personal.seq);
      if (personal.epoch !== null) put("dm_epoch", personal.epoch);
    }
    if (this._token !== null) put("token", this._token);
    return url.toString();
  }

  _open() {
    this._retryTimer = null;
    // Leaves under way ended with the connection; joins all start again.
    for (const sub of [...this._subs.values()]) {
      if (sub.state === SubscriptionState.Unsubscribing && !sub.rejoin) {
        this._subs.delete(sub.room);
        this._emit("unsubscribed", { room: sub.room, code: null, reason: "unsubscribed" });
      } else {
        sub.state = SubscriptionState.Subscribing;
        sub.rejoin = false;
        clearTimeout(sub.retryTimer);
      }
    }
    const url = this._buildUrl();
    this._setState(State.Connecting);
    this._emit("connecting", { attempt: this._attempt, url });
    let ws;
    try {
      ws = new this._WebSocket(url);
    } catch (error) {
      // A malformed URL is final: retrying cannot fix it.
      this._wanted = false;
      this._emit("error", { type: "transport", code: "bad_url", detail: String(error), error });
      this._afterClose(1006, String(error), false, null);
      return;
    }
    this._ws = ws;
    this._heard = false;
    this._openTimer = setTimeout(() => {
      if (this._ws !== ws) return;
      this._drop();
      this._closeSocket(ws, 4000, "open timeout");
      this._onClose(1006, "open timeout");
    }, this._openTimeout);
    ws.addEventListener("open", () => {
      if (this._ws !== ws) return;
      clearTimeout(this._openTimer);
      this._onOpen();
    });
    ws.addEventListener("message", (event) => {
      if (this._ws !== ws) return;
      this._onMessage(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (this._ws !== ws) return;
      this._drop();
      this._onClose(event.code, event.reason);
    });
    ws.addEventListener("error", () => {
      // Browsers follow an error with a close (1006); Node 20's WebSocket does not when the
      // connection cannot be made (readyState stays CONNECTING). Either way the socket is
      // done: end it here, and ignore a close that may follow.
      if (this._ws !== ws) return;
      this._drop();
      this._closeSocket(ws, 1000, "error");
      this._onClose(1006, "connection error");
    });
  }

  _onOpen() {
    this._setState(State.Connected);
    this._emit("connected", { url: this._url });
    for (const sub of this._subs.values()) {
      if (sub.personal) continue;
      if (sub.room === this._urlRoom) {
        // Joined by the URL: no `joined` frame comes for it.
        sub.state = SubscriptionState.Subscribed;
        this._emit("subscribed", {
          room: sub.room,
          seq: sub.seq,
          epoch: sub.epoch,
          resumed: sub.seq !== null,
        });
      } else {
        this._sendJoin(sub);
      }
    }
  }

  /** Forget the current socket (its later events are ignored); returns it. */
  _drop() {
    const ws = this._ws;
    this._ws = null;
    clearTimeout(this._openTimer);
    return ws;
  }

  _closeSocket(ws, code, reason) {
    try {
      ws.close(code, reason);
    } catch {
      // Already closing, or never opened.
    }
  }

  _onClose(code, reason) {
    const willRetry = this._wanted && !this._noRetry.has(code);
    if (!willRetry) this._wanted = false;
    let delay = null;
    if (willRetry) {
      delay =
        code === GAP_CLOSE_CODE && reason === "gap"
          ? 0
          : backoffDelay(this._attempt, this._minDelay, this._maxDelay, this._random);
      this._attempt += 1;
    }
    this._afterClose(code, reason, willRetry, delay);
  }

  _afterClose(code, reason, willRetry, delay) {
    for (const sub of this._subs.values()) {
      clearTimeout(sub.retryTimer);
      if (sub.state === SubscriptionState.Subscribed) sub.state = SubscriptionState.Subscribing;
    }
    this._setState(State.Disconnected);
    this._emit("disconnected", { code, reason: reason ?? "", willRetry, delay });
    if (willRetry) this._retryTimer = setTimeout(() => this._open(), delay);
  }

  /** Drop the connection and reconnect at once, resuming every room (after a seq gap). */
  _resume(room, expected, received) {
    this._emit("gap", { room, expected, received });
    const ws = this._drop();
    if (ws) this._closeSocket(ws, GAP_CLOSE_CODE, "gap");
    this._onClose(GAP_CLOSE_CODE, "gap");
  }

  _onMessage(data) {
    if (typeof data !== "string") return;
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      this._emit("error", { type: "protocol", code: "invalid_json", detail: "a frame is not JSON" });
      return;
    }
    if (frame === null || typeof frame !== "object" || typeof frame.type !== "string") return;
    if (!this._heard) {
      this._heard = true;
      this._attempt = 0; // the server serves us: the next loss starts the backoff again
    }
    if (typeof frame.seq === "number") {
      this._onEnvelope(frame);
      return;
    }
    const data_ = frame.data ?? {};
    switch (frame.type) {
      case "joined":
        this._onJoined(frame.room, data_);
        break;
      case "left":
        this._onLeft(frame.room);
        break;
      case "history_lost":
        this._onHistoryLost(frame.room, data_);
        break;
      case "error":
        this._onError(frame.room ?? null, data_);
        break;
      default:
        break; // an unsequenced frame this client does not know
    }
  }

  /** The subscription of `room`, creating the personal stream's on first sight. */
  _subFor(room) {
    if (typeof room !== "string") return null;
    let sub = this._subs.get(room);
    if (!sub && room.startsWith("@") && (this._personal === null || this._personal === room)) {
      this._personal = room;
      sub = {
        room,
        seq: null,
        epoch: null,
        acceptAny: false,
        state: SubscriptionState.Subscribing,
        personal: true,
        resuming: false,
        lost: false,
        retryTimer: null,
        rejoin: false,
      };
      this._subs.set(room, sub);
    }
    return sub ?? null;
  }

  _onEnvelope(envelope) {
    const sub = this._subFor(envelope.room);
    if (!sub || sub.state === SubscriptionState.Unsubscribing) return;
    const epoch = typeof envelope.epoch === "string" && envelope.epoch ? envelope.epoch : null;
    if (sub.epoch !== null && epoch !== sub.epoch) {
      // Another stream, and the server said nothing: its seqs cannot be compared with ours.
      this._lost(sub, { since: sub.seq, epoch, first_seq: envelope.seq, last_seq: null });
      sub.seq = null;
    }
    if (sub.epoch === null) sub.epoch = epoch;
    const seq = envelope.seq;
    if (sub.seq !== null && seq <= sub.seq) return; // a duplicate: seen already
    if (sub.seq !== null && !sub.acceptAny && seq > sub.seq + 1) {
      this._resume(sub.room, sub.seq + 1, seq);
      return;
    }
    sub.seq = seq;
    sub.acceptAny = false;
    const ctx = { room: sub.room, envelope };
    this._emit("envelope", ctx);
    if (envelope.type === "join" || envelope.type === "leave" || envelope.type === "direct") {
      this._emit(envelope.type, ctx);
    }
  }

  _lost(sub, data) {
    const epoch = typeof data.epoch === "string" && data.epoch ? data.epoch : null;
    sub.epoch = epoch;
    sub.seq = typeof data.last_seq === "number" ? data.last_seq : null;
    sub.acceptAny = true; // "accept the next envelope whatever its seq"
    sub.lost = true;
    this._emit("history_lost", {
      room: sub.room,
      since: typeof data.since === "number" ? data.since : null,
      epoch,
      firstSeq: typeof data.first_seq === "number" ? data.first_seq : null,
      lastSeq: typeof data.last_seq === "number" ? data.last_seq : null,
    });
  }

  _onHistoryLost(room, data) {
    const sub = this._subFor(room);
    if (!sub || sub.state === SubscriptionState.Unsubscribing) return;
    this._lost(sub, data);
  }

  _onJoined(room, data) {
    const sub = this._subFor(room);
    if (!sub || sub.state === SubscriptionState.Unsubscribing) return;
    const epoch = typeof data.epoch === "string" && data.epoch ? data.epoch : null;
    const seq = typeof data.seq === "number" ? data.seq : null;
    const sameStream = epoch !== null && epoch === sub.epoch && sub.seq !== null;
    if (sameStream && seq !== null && !sub.acceptAny && sub.seq < seq) {
      // The server says we are up to date with `seq`, but the replay stopped short.
      this._resume(room, sub.seq + 1, seq);
      return;
    }
    if (seq !== null && !(sameStream && sub.seq > seq)) {
      sub.seq = seq;
      sub.epoch = epoch;
    }
    sub.acceptAny = false;
    sub.state = SubscriptionState.Subscribed;
    this._emit("subscribed", {
      room,
      seq: sub.seq,
      epoch: sub.epoch,
      resumed: sub.resuming,
      recovered: sub.resuming && !sub.lost,
    });
  }

  _onLeft(room) {
    const sub = this._subs.get(room);
    if (!sub || sub.state !== SubscriptionState.Unsubscribing) return;
    if (sub.rejoin) {
      // subscribe() again while the leave was under way: join afresh now.
      sub.rejoin = false;
      this._sendJoin(sub);
      return;
    }
    this._subs.delete(room);
    this._emit("unsubscribed", { room, code: null, reason: "unsubscribed" });
  }

  _onError(room, data) {
    const code = typeof data.code === "string" ? data.code : "unknown";
    const detail = typeof data.detail === "string" ? data.detail : "";
    this._emit("error", { type: "server", room, code, detail });
    const sub = room === null ? null : this._subs.get(room);
    if (!sub || sub.state !== SubscriptionState.Subscribing || sub.personal) return;
    if (code === "already_joined") {
      // In it already (the server's default room): live from here, position from the next envelope.
      sub.state = SubscriptionState.Subscribed;
      this._emit("subscribed", { room, seq: sub.seq, epoch: sub.epoch, resumed: false });
    } else if (JOIN_REFUSALS.has(code)) {
      this._subs.delete(room);
      this._emit("unsubscribed", { room, code, reason: detail });
    } else if (code === "unavailable") {
      // The backend could not serve the join: try again on this connection, with backoff.
      const delay = backoffDelay(1, this._minDelay, this._maxDelay, this._random);
      const ws = this._ws;
      clearTimeout(sub.retryTimer);
      sub.retryTimer = setTimeout(() => {
        if (this._ws === ws && this._subs.get(room) === sub) this._sendJoin(sub);
      }, delay);
    }
  }
}

export default WsBroadcastClient;
