// Hand-written type declarations of wsbroadcast-client (src/wsbroadcast-client.js).

/** The client's states: `disconnected` (also while a retry is scheduled), `connecting`, `connected`. */
export declare const State: Readonly<{
  Disconnected: "disconnected";
  Connecting: "connecting";
  Connected: "connected";
}>;
export type State = (typeof State)[keyof typeof State];

/** The states of one room's subscription. */
export declare const SubscriptionState: Readonly<{
  Subscribing: "subscribing";
  Subscribed: "subscribed";
  Unsubscribing: "unsubscribing";
}>;
export type SubscriptionState = (typeof SubscriptionState)[keyof typeof SubscriptionState];

/** Close codes after which the client does not reconnect: 1000, 1002, 1003, 1007, 1008, 1009, 1010. */
export declare const NO_RETRY_CODES: readonly number[];

/** The code the client closes with to resume after a seq gap (4000, reason "gap"). */
export declare const GAP_CLOSE_CODE: 4000;

/** Full-jitter backoff: uniform in [0, min(maxDelay, minDelay * 2 ** attempt)) ms. */
export declare function backoffDelay(
  attempt: number,
  minDelay: number,
  maxDelay: number,
  random?: () => number,
): number;

/** One sequenced message of a room, as the server sends it (docs/protocol.md). */
export interface Envelope<Data = unknown> {
  type: string;
  room: string;
  seq: number;
  epoch: string;
  id: string;
  /** Who published it; null when the server itself did. */
  client_id: string | null;
  timestamp: string;
  data: Data;
}

/** Where the client is in a stream: what a resume sends. */
export interface Position {
  seq: number | null;
  epoch: string | null;
}

export interface SubscriptionInfo extends Position {
  room: string;
  state: SubscriptionState;
  /** True for the client's personal stream (`@<client id>`), joined by the server. */
  personal: boolean;
}

export interface ClientOptions {
  /** Sent as `token=` on the URL (the chat app's `--jwt-secret`). */
  token?: string;
  /** A WebSocket constructor; default: the global one (Node 20: `--experimental-websocket`). */
  WebSocket?: unknown;
  /** Backoff floor in ms (default 500). */
  minReconnectDelay?: number;
  /** Backoff cap in ms (default 20000). */
  maxReconnectDelay?: number;
  /** Ms to wait for the handshake before giving up on an attempt (default 10000). */
  openTimeout?: number;
  /** Close codes not to retry on (default NO_RETRY_CODES). */
  noRetryCodes?: Iterable<number>;
  /** The jitter's source, a number in [0, 1) (default Math.random). */
  random?: () => number;
}

export interface StateContext {
  newState: State;
  oldState: State;
}
export interface ConnectingContext {
  /** Failed attempts since a connection last delivered a frame. */
  attempt: number;
  url: string;
}
export interface ConnectedContext {
  url: string;
}
export interface DisconnectedContext {
  /** The close code (1006 when the connection failed without one, or the open timed out). */
  code: number;
  reason: string;
  /** Whether the client reconnects by itself. */
  willRetry: boolean;
  /** Ms until the next attempt, or null when it will not retry. */
  delay: number | null;
}
export interface EnvelopeContext {
  room: string;
  envelope: Envelope;
}
export interface SubscribedContext extends Position {
  room: string;
  /** The join asked to resume from a position. */
  resumed: boolean;
  /** Resumed and got everything missed (no history_lost); set when the server confirmed a join. */
  recovered?: boolean;
}
export interface UnsubscribedContext {
  room: string;
  /** The server's error code when a join was refused, else null. */
  code: string | null;
  reason: string;
}
export interface HistoryLostContext {
  room: string;
  since: number | null;
  /** The stream's epoch from now on (null: the room has no stream yet). */
  epoch: string | null;
  firstSeq: number | null;
  lastSeq: number | null;
}
export interface GapContext {
  room: string;
  expected: number;
  received: number;
}
export interface ErrorContext {
  /** `server` (an error frame), `protocol`, `transport` or `listener`. */
  type: "server" | "protocol" | "transport" | "listener";
  room?: string | null;
  /** The server's code (`not_joined`, `rate_limited`, `forbidden_room`, ...) or the client's. */
  code: string;
  detail: string;
  error?: unknown;
}

export interface ClientEvents {
  state: (ctx: StateContext) => void;
  connecting: (ctx: ConnectingContext) => void;
  connected: (ctx: ConnectedContext) => void;
  disconnected: (ctx: DisconnectedContext) => void;
  /** Every accepted envelope of every room (personal stream included), in order, once. */
  envelope: (ctx: EnvelopeContext) => void;
  join: (ctx: EnvelopeContext) => void;
  leave: (ctx: EnvelopeContext) => void;
  direct: (ctx: EnvelopeContext) => void;
  subscribed: (ctx: SubscribedContext) => void;
  unsubscribed: (ctx: UnsubscribedContext) => void;
  history_lost: (ctx: HistoryLostContext) => void;
  gap: (ctx: GapContext) => void;
  error: (ctx: ErrorContext) => void;
}

export declare class WsBroadcastClient {
  constructor(url: string, options?: ClientOptions);
  readonly state: State;
  /** The personal stream's room (`@<client id>`) once the server named it, else null. */
  readonly personalStream: string | null;
  on<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  once<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): () => void;
  off<E extends keyof ClientEvents>(event: E, listener: ClientEvents[E]): void;
  /** Subscribe (or, for `@<id>`, set where the personal stream resumes from). */
  subscribe(room: string, position?: { since?: number; epoch?: string }): void;
  unsubscribe(room: string): void;
  subscriptions(): SubscriptionInfo[];
  position(room: string): Position | null;
  /** Publish `{room, message}`; false when not connected (nothing is queued). */
  publish(room: string, message: string): boolean;
  /** Send `{to, message}`; false when not connected. */
  sendDirect(clientId: string, message: string): boolean;
  /** Send one JSON frame as is; false when not connected. */
  send(frame: object): boolean;
  connect(): void;
  disconnect(): void;
}

export default WsBroadcastClient;
