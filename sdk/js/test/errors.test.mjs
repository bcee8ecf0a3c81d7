// What the SDK reports when there is no server, and how it is configured.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { WebSocket } from "ws";
import { Client, CimError } from "../dist/index.js";

/** A port nothing listens on (bound, then closed). */
async function deadPort() {
  const server = createServer();
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const port = server.address().port;
  await new Promise((r) => server.close(r));
  return port;
}

test("connecting while the server is down fails at once with NETWORK", async () => {
  const c = new Client({ url: `http://127.0.0.1:${await deadPort()}`, userId: 1, userName: "a", WebSocket });
  await assert.rejects(c.connect(), (e) => e instanceof CimError && e.code === "NETWORK" && /cannot reach/.test(e.message));
  assert.equal(c.state, "disconnected");
});

test("a token provider that fails is reported as TOKEN_PROVIDER", async () => {
  const c = new Client({ url: "http://127.0.0.1:1", token: async () => { throw new Error("login service down"); }, WebSocket });
  await assert.rejects(c.connect(), (e) => e.code === "TOKEN_PROVIDER" && /login service down/.test(e.message));
});

test("without a WebSocket class (Node 20) the constructor says what to pass", () => {
  if (globalThis.WebSocket) return; // Node 22+ has one
  assert.throws(() => new Client({ url: "http://x" }), /WebSocket/);
});

test("sending before connecting fails with DISCONNECTED", async () => {
  const c = new Client({ url: "http://127.0.0.1:1", userId: 1, WebSocket });
  await assert.rejects(c.sendGroup("x"), (e) => e.code === "DISCONNECTED");
});
