// The real chat app (python -m examples.chat_app) and a redis-server as subprocesses on
// 127.0.0.1, for the JS client's end-to-end tests. Mirrors tests/clients/chat_servers.py.
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { fileURLToPath } from "node:url";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const STARTUP_DEADLINE_MS = 30000;

/** The Python that runs the chat app: $WSBROADCAST_PYTHON, the repo's .venv, or python3. */
export function python() {
  if (process.env.WSBROADCAST_PYTHON) return process.env.WSBROADCAST_PYTHON;
  const venv = path.join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

/** Whether this checkout's chat app speaks several rooms and direct messages. */
export const ROOMS_PROTOCOL = readFileSync(
  path.join(ROOT, "examples", "chat_app", "service.py"),
  "utf8",
).includes("dm_since");

/** A TCP port on 127.0.0.1 that nothing listens on right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

function exited(child) {
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve();
  return new Promise((resolve) => child.once("exit", () => resolve()));
}

/** Poll `probe` until it resolves true (readiness polling, bounded by a deadline). */
async function waitUntil(probe, child, what) {
  const deadline = Date.now() + STARTUP_DEADLINE_MS;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`${what} exited at startup`);
    if (await probe().catch(() => false)) return;
    if (Date.now() > deadline) throw new Error(`${what} did not start`);
    await sleep(50);
  }
}

export class ChatApp {
  constructor(port, kind, args) {
    this.port = port;
    this.kind = kind;
    this.args = args;
    this.child = null;
    this.log = [];
  }

  static async create(kind, args) {
    return new ChatApp(await freePort(), kind, args);
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}`;
  }

  async start() {
    const argv = ["-m", "examples.chat_app", "--host", "127.0.0.1", "--port", String(this.port)];
    const child = spawn(python(), [...argv, "--server", this.kind, ...this.args], {
      cwd: ROOT,
      env: { ...process.env, PYTHONUNBUFFERED: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.child = child;
    child.stdout.on("data", (chunk) => this.log.push(String(chunk)));
    child.stderr.on("data", (chunk) => this.log.push(String(chunk)));
    const healthy = async () => {
      const response = await fetch(`http://127.0.0.1:${this.port}/healthz`);
      return response.ok;
    };
    try {
      await waitUntil(healthy, child, "the chat app");
    } catch (error) {
      throw new Error(`${error.message}:\n${this.log.join("")}`);
    }
  }

  /** SIGKILL: no close frame; clients see their connections cut (1006). */
  async kill() {
    const child = this.child;
    this.child = null;
    if (!child) return;
    child.kill("SIGKILL");
    await exited(child);
  }

  /** SIGTERM (graceful), SIGKILL if it lingers. */
  async stop() {
    const child = this.child;
    this.child = null;
    if (!child) return;
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 15000);
    await exited(child);
    clearTimeout(timer);
  }
}

export class RedisServer {
  constructor(port) {
    this.port = port;
    this.child = null;
  }

  static async start() {
    const redis = new RedisServer(await freePort());
    const args = ["--save", "", "--appendonly", "no", "--port", String(redis.port)];
    redis.child = spawn("redis-server", [...args, "--bind", "127.0.0.1"], { stdio: "ignore" });
    const pong = () =>
      new Promise((resolve) => {
        const socket = net.connect(redis.port, "127.0.0.1", () => socket.write("PING\r\n"));
        socket.once("data", (data) => {
          socket.destroy();
          resolve(String(data).startsWith("+PONG"));
        });
        socket.once("error", () => resolve(false));
      });
    await waitUntil(pong, redis.child, "redis-server");
    return redis;
  }

  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }

  async kill() {
    const child = this.child;
    this.child = null;
    if (!child) return;
    child.kill("SIGKILL");
    await exited(child);
  }
}
