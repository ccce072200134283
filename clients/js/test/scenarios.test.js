// The shared client scenarios (tests/clients/scenarios.json) run by the JS client against the
// real chat app, on uvicorn and on the websockets server. tests/clients/test_scenarios.py runs
// the same file with wsbroadcast.client. Needs a global WebSocket: Node >= 22, or Node 20 with
// --experimental-websocket.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import path from "node:path";
import { describe, test } from "node:test";

import { WsBroadcastClient } from "../src/wsbroadcast-client.js";
import { ChatApp, ROOMS_PROTOCOL, ROOT, RedisServer } from "../testing/chat-app.js";

const { scenarios } = JSON.parse(
  readFileSync(path.join(ROOT, "tests", "clients", "scenarios.json"), "utf8"),
);
const SERVER_KINDS = ["uvicorn", "websockets"];
const SCENARIO_TIMEOUT_MS = 60000; // a hang guard, not a timing assertion

/** A client and everything it received, which steps wait on. */
class Tracked {
  constructor(client) {
    this.client = client;
    this.messages = new Map();
    this.directs = [];
    this.events = new Map();
    this.ids = new Map();
    this._waiters = [];
    client.on("envelope", ({ room, envelope }) => {
      const key = `${room} ${envelope.id}`;
      this.ids.set(key, (this.ids.get(key) ?? 0) + 1);
      if (envelope.type === "message") {
        if (!this.messages.has(room)) this.messages.set(room, []);
        this.messages.get(room).push(envelope.data.message);
      } else if (envelope.type === "direct") {
        this.directs.push(envelope.data.data.message);
      }
      this._changed();
    });
    for (const event of ["history_lost", "subscribed", "connected"]) {
      client.on(event, (ctx) => {
        const key = `${event} ${ctx.room ?? ""}`;
        this.events.set(key, (this.events.get(key) ?? 0) + 1);
        this._changed();
      });
    }
  }

  _changed() {
    const waiters = this._waiters;
    this._waiters = [];
    for (const resolve of waiters) resolve();
  }

  /** Wait until `predicate()` holds, re-checked after every envelope or event. */
  async until(predicate) {
    while (!predicate()) await new Promise((resolve) => this._waiters.push(resolve));
  }

  count(event, room) {
    return this.events.get(`${event} ${room ?? ""}`) ?? 0;
  }

  duplicates() {
    return [...this.ids].filter(([, count]) => count > 1).map(([key]) => key);
  }
}

async function step(action, servers, clients) {
  const tracked = clients.get(action.client);
  switch (action.do) {
    case "connect": {
      const url = `${servers[action.server].wsUrl}/ws/${encodeURIComponent(action.id)}`;
      const client = new WsBroadcastClient(url, { minReconnectDelay: 50, maxReconnectDelay: 500 });
      const fresh = new Tracked(client);
      clients.set(action.client, fresh);
      for (const room of action.rooms) client.subscribe(room);
      client.connect();
      break;
    }
    case "subscribe":
      tracked.client.subscribe(action.room);
      break;
    case "wait_subscribed":
      await tracked.until(() => {
        const position = tracked.client.position(action.room);
        return tracked.count("subscribed", action.room) > 0 && position?.seq != null;
      });
      break;
    case "publish":
      for (const text of action.texts) assert.ok(tracked.client.publish(action.room, text));
      break;
    case "direct":
      for (const text of action.texts) assert.ok(tracked.client.sendDirect(action.to, text));
      break;
    case "expect_messages": {
      const got = () => tracked.messages.get(action.room) ?? [];
      await tracked.until(() => got().length >= action.texts.length);
      assert.deepEqual(got(), action.texts);
      break;
    }
    case "expect_directs":
      await tracked.until(() => tracked.directs.length >= action.texts.length);
      assert.deepEqual(tracked.directs, action.texts);
      break;
    case "expect_event":
      await tracked.until(() => tracked.count(action.event, action.room) >= (action.count ?? 1));
      break;
    case "kill":
      await servers[action.server].kill();
      break;
    case "stop":
      await servers[action.server].stop();
      break;
    case "restart":
      await servers[action.server].start();
      break;
    case "disconnect":
      tracked.client.disconnect();
      break;
    default:
      throw new Error(`unknown step ${action.do}`);
  }
}

async function run(scenario, kind) {
  assert.equal(
    typeof globalThis.WebSocket,
    "function",
    "no global WebSocket: run node with --experimental-websocket (Node 20) or Node >= 22",
  );
  const cleanups = [];
  const clients = new Map();
  try {
    const args = [...(scenario.server_args ?? [])];
    if (scenario.backend === "redis") {
      const redis = await RedisServer.start();
      cleanups.push(() => redis.kill());
      args.push("--backend", redis.url);
    }
    const servers = [];
    for (let i = 0; i < (scenario.servers ?? 1); i += 1) {
      const server = await ChatApp.create(kind, args);
      cleanups.push(() => server.kill());
      servers.push(server);
      await server.start();
    }
    for (const action of scenario.steps) await step(action, servers, clients);
    for (const [name, tracked] of clients) {
      assert.deepEqual(tracked.duplicates(), [], `${name} received an envelope twice`);
    }
  } finally {
    for (const tracked of clients.values()) tracked.client.disconnect();
    for (const cleanup of cleanups.reverse()) await cleanup();
  }
}

for (const kind of SERVER_KINDS) {
  describe(`scenarios on --server ${kind}`, () => {
    for (const scenario of scenarios) {
      const skip =
        scenario.requires === "rooms" && !ROOMS_PROTOCOL
          ? "this chat app has no rooms/DM protocol yet"
          : false;
      test(scenario.name, { timeout: SCENARIO_TIMEOUT_MS, skip }, () => run(scenario, kind));
    }
  });
}
