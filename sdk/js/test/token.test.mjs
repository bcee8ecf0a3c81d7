// Token login when the server verifies tokens: a provider, refresh before expiry, refusals.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import { Client, CimError } from "../dist/index.js";
import { startHost, cleanup, waitFor, inbox, received, secretFile, mintToken, tempDir } from "./host.mjs";

let host;
let secret;
let dir;

before(async () => {
  dir = tempDir();
  secret = secretFile(dir);
  host = await startHost({ args: ["--auth-hmac-secret-file", secret] });
});

after(async () => {
  await host.stop();
  cleanup(host.dataDir);
  cleanup(dir);
});

test("a token logs in as its subject; history needs no API key", async () => {
  const alice = new Client({ url: host.url, token: mintToken(secret, 11, "alice"), WebSocket });
  const bob = new Client({ url: host.url, token: async () => mintToken(secret, 12, "bob"), WebSocket });
  try {
    const info = await alice.connect();
    assert.deepEqual(info.user, { id: "11", name: "alice" });
    assert.ok(info.tokenExpiresAtMs > Date.now());
    await bob.connect();
    const got = inbox(bob);
    await alice.sendPrivate(12, "with tokens");
    await received(got, "with tokens");
    const page = await bob.history();
    assert.ok(page.messages.some((m) => m.text === "with tokens"));
  } finally {
    await alice.close();
    await bob.close();
  }
});

test("the provider is asked again before the token expires, and the connection stays", async () => {
  let calls = 0;
  const errors = [];
  // 7 s tokens: the SDK refreshes at 80% of what is left, at least 5 s before the expiry.
  const carol = new Client({ url: host.url, token: () => (calls++, mintToken(secret, 13, "carol", "7s")), WebSocket });
  carol.on("error", (e) => errors.push(e));
  try {
    await carol.connect();
    await waitFor("a refresh", () => calls >= 2, 10_000);
    // The REFRESH was answered: a request after it still works on the same connection.
    await carol.online();
    assert.deepEqual(errors, []);
    assert.equal(carol.state, "connected");
  } finally {
    await carol.close();
  }
});

test("a bad token is refused with UNAUTHENTICATED, and not retried", async () => {
  const eve = new Client({ url: host.url, token: "not-a-jwt", WebSocket });
  await assert.rejects(eve.connect(), (e) => e instanceof CimError && e.code === "UNAUTHENTICATED" && !e.transient);
  const anon = new Client({ url: host.url, userId: 5, userName: "anon", WebSocket });
  await assert.rejects(anon.connect(), (e) => e.code === "UNAUTHENTICATED");
});
