// Reconnects: the server is restarted (same port, same data directory) and the clients come
// back by themselves; what was sent while one of them was away arrives after its reconnect.
import { test } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import { Client } from "../dist/index.js";
import { startHost, cleanup, waitFor, inbox, received } from "./host.mjs";

test("after a server restart both clients reconnect and missed messages arrive", async () => {
  let host = await startHost();
  const dataDir = host.dataDir;
  const url = host.url;
  // Bob's network is down until the test says so (his route logins fail), so alice sends
  // while he is away for certain.
  let bobOnline = true;
  const bobFetch = (...args) => (bobOnline ? fetch(...args) : Promise.reject(new TypeError("network down (test)")));
  const fast = { initialDelayMs: 50, maxDelayMs: 400 };
  const alice = new Client({ url, userId: 1, userName: "alice", WebSocket, reconnect: fast });
  const bob = new Client({ url, userId: 2, userName: "bob", WebSocket, reconnect: fast, fetch: bobFetch });
  try {
    await alice.connect();
    await bob.connect();
    const got = inbox(bob);
    const kicks = [];
    const bobStates = [];
    alice.on("kicked", (k) => kicks.push(k.code));
    bob.on("state", (s) => bobStates.push(s.state));
    await alice.sendGroup("before");
    await received(got, "before");

    bobOnline = false;
    await host.stop("SIGTERM");
    await waitFor("the SHUTTING_DOWN kick", () => kicks.length === 1);
    assert.deepEqual(kicks, ["SHUTTING_DOWN"]);
    await waitFor("both reconnecting", () => alice.state === "reconnecting" && bob.state === "reconnecting");
    host = await startHost({ dataDir, port: host.port });

    await waitFor("alice back", () => alice.state === "connected");
    assert.equal(bob.state, "reconnecting");
    const p = await alice.sendPrivate(2, "sent while you were away");
    await alice.sendGroup("group while you were away");
    assert.equal(p.stored, true);
    bobOnline = true;
    await waitFor("bob back", () => bob.state === "connected");
    const pm = await received(got, "sent while you were away");
    const gm = await received(got, "group while you were away");
    assert.equal(pm.replayed, true);
    assert.equal(gm.replayed, true);
    assert.equal(got.filter((m) => m.text === "before").length, 1, "no duplicate after the resume");
    assert.ok(bobStates.includes("reconnecting"));

    // And live traffic flows again both ways.
    const toAlice = inbox(alice);
    await bob.sendPrivate(1, "back");
    await received(toAlice, "back");
  } finally {
    await alice.close();
    await bob.close();
    await host.stop();
    cleanup(dataDir);
  }
});

test("a server killed outright (no KICK): the client reconnects after the network loss", async () => {
  let host = await startHost();
  const dataDir = host.dataDir;
  const fast = { initialDelayMs: 50, maxDelayMs: 400 };
  const alice = new Client({ url: host.url, userId: 1, userName: "alice", WebSocket, reconnect: fast });
  const bob = new Client({ url: host.url, userId: 2, userName: "bob", WebSocket, reconnect: fast });
  try {
    await alice.connect();
    await bob.connect();
    const got = inbox(bob);
    await host.stop("SIGKILL");
    await waitFor("reconnecting", () => alice.state === "reconnecting" && bob.state === "reconnecting");
    host = await startHost({ dataDir, port: host.port });
    // The resume token takes over sessions the killed node still shows online.
    await waitFor("both back", () => alice.state === "connected" && bob.state === "connected");
    await alice.sendPrivate(2, "after the crash");
    await received(got, "after the crash");
  } finally {
    await alice.close();
    await bob.close();
    await host.stop();
    cleanup(dataDir);
  }
});
