// Test helpers: a real `cim-host up` process (port 0 or a fixed port, embedded store), tokens
// from `cim-host token`, and waiting on conditions with deadlines (never bare sleeps).
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { createInterface } from "node:readline";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
/** The binary under test: `CIM_HOST_BIN`, else the workspace's debug build. */
export const HOST_BIN = process.env.CIM_HOST_BIN ?? join(ROOT, "target/debug/cim-host");
/** How long any one expected event may take. */
export const DEADLINE_MS = 15_000;

export function tempDir(prefix = "cim-sdk-") {
  return mkdtempSync(join(tmpdir(), prefix));
}

/**
 * Starts `cim-host up` and waits for its ready line. `port` 0 picks a free port; pass the
 * previous host's port (and its `dataDir`) to restart the same server.
 */
export async function startHost({ dataDir = tempDir(), port = 0, args = [] } = {}) {
  const child = spawn(
    HOST_BIN,
    ["up", "--tcp", "127.0.0.1:0", "--http", `127.0.0.1:${port}`, "--manifest", join(ROOT, "spin.toml"), "--data-dir", dataDir, ...args],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn" } },
  );
  const lines = createInterface({ input: child.stdout });
  const line = await new Promise((resolvePromise, reject) => {
    const timer = setTimeout(() => reject(new Error("cim-host printed no ready line within 60 s")), 60_000);
    child.once("exit", (code) => reject(new Error(`cim-host exited (${code}) before it was ready`)));
    lines.once("line", (l) => {
      clearTimeout(timer);
      resolvePromise(l);
    });
  });
  // cim-host ready node=<id> tcp=<addr> http=<addr>
  const http = /http=(\S+)/.exec(line)?.[1];
  if (!http) throw new Error(`no http= in the ready line ${JSON.stringify(line)}`);
  const exited = new Promise((r) => child.once("exit", r));
  return {
    child,
    dataDir,
    http,
    port: Number(http.split(":").pop()),
    url: `http://${http}`,
    /** Stops the host (SIGTERM: it KICKs everyone SHUTTING_DOWN) and waits for it to exit. */
    async stop(signal = "SIGTERM") {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      await exited;
    },
  };
}

/** Writes an HS256 secret for `--auth-hmac-secret-file`; returns its path. */
export function secretFile(dir) {
  const path = join(dir, "secret");
  writeFileSync(path, "a test secret that is long enough for HS256\n");
  return path;
}

/** A user token from `cim-host token`. */
export function mintToken(secret, userId, name, ttl = "1h") {
  return execFileSync(HOST_BIN, ["token", "--user-id", String(userId), "--name", name, "--ttl", ttl, "--secret-file", secret], {
    encoding: "utf8",
  }).trim();
}

/** Polls `check` until it returns something truthy, or fails after `ms`. */
export async function waitFor(what, check, ms = DEADLINE_MS) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await check();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Collects a client's `message` events. */
export function inbox(client) {
  const messages = [];
  client.on("message", (m) => messages.push(m));
  return messages;
}

/** Waits until `messages` holds one with this text. */
export function received(messages, text, ms) {
  return waitFor(`the message ${JSON.stringify(text)}`, () => messages.find((m) => m.text === text), ms);
}

export function cleanup(dir) {
  rmSync(dir, { recursive: true, force: true });
}

/** A fresh user id per call, so tests in one host never meet each other's users. */
let nextUser = 100 + (process.pid % 1000) * 10;
export function userId() {
  return nextUser++;
}
