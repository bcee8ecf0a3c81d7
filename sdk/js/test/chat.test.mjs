// The SDK against a real cim-host (development mode): login, private and group sends with
// acks, the online list and presence, history, de-duplication, request errors.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { WebSocket } from "ws";
import { fromBinary } from "@bufbuild/protobuf";
import { Client, CimError } from "../dist/index.js";
import { EnvelopeSchema } from "../dist/gen/cim_pb.js";
import { startHost, cleanup, waitFor, inbox, received, userId } from "./host.mjs";

let host;
const clients = [];

before(async () => {
  host = await startHost();
});

after(async () => {
  await Promise.all(clients.map((c) => c.close()));
  await host.stop();
  cleanup(host.dataDir);
});

function client(id, name, opts = {}) {
  const c = new Client({ url: host.url, userId: id, userName: name, WebSocket, ...opts });
  clients.push(c);
  return c;
}

test("login binds the user and reports the connection state", async () => {
  const id = userId();
  const c = client(id, "ann");
  const states = [];
  c.on("state", (s) => states.push(s.state));
  const info = await c.connect();
  assert.deepEqual(info.user, { id: String(id), name: "ann" });
  assert.ok(info.nodeId);
  assert.ok(info.heartbeatSecs > 0);
  assert.equal(info.tokenExpiresAtMs, 0);
  assert.deepEqual(states, ["connecting", "connected"]);
  assert.equal(c.state, "connected");
  await c.close();
  assert.equal(c.state, "disconnected");
});

test("a private message is acknowledged and received once, with its sender", async () => {
  const [a, b] = [userId(), userId()];
  const alice = client(a, "alice");
  const bob = client(b, "bob");
  await alice.connect();
  await bob.connect();
  const got = inbox(bob);
  const sent = await alice.sendPrivate(b, "hi bob");
  assert.match(sent.messageId, /^\d+$/);
  assert.equal(sent.stored, false);
  const m = await received(got, "hi bob");
  assert.equal(m.id, sent.messageId);
  assert.equal(m.kind, "private");
  assert.deepEqual(m.from, { id: String(a), name: "alice" });
  assert.equal(m.replayed, false);
  assert.ok(Math.abs(m.timestampMs - Date.now()) < 60_000);
  // The ack reaches the server: a later client of bob's does not get it again.
  await bob.close();
  await waitFor("bob offline", async () => !(await alice.online()).some((u) => u.id === String(b)));
  const bob2 = client(b, "bob");
  const again = inbox(bob2);
  await bob2.connect();
  await alice.sendPrivate(b, "second");
  await received(again, "second");
  assert.equal(again.filter((x) => x.text === "hi bob").length, 0, "an acknowledged message came back");
});

test("a private message to someone away is stored and arrives at their login, replayed", async () => {
  const [a, b] = [userId(), userId()];
  const alice = client(a, "alice");
  await alice.connect();
  const sent = await alice.sendPrivate(b, "while you were out");
  assert.equal(sent.stored, true);
  const bob = client(b, "bob");
  const got = inbox(bob);
  await bob.connect();
  const m = await received(got, "while you were out");
  assert.equal(m.replayed, true);
});

test("a group message reaches everyone else online", async () => {
  const [a, b, c] = [userId(), userId(), userId()];
  const alice = client(a, "alice");
  const bob = client(b, "bob");
  const carol = client(c, "carol");
  await Promise.all([alice.connect(), bob.connect(), carol.connect()]);
  const [toBob, toCarol, toAlice] = [inbox(bob), inbox(carol), inbox(alice)];
  const sent = await alice.sendGroup("hello all");
  for (const got of [toBob, toCarol]) {
    const m = await received(got, "hello all");
    assert.equal(m.kind, "group");
    assert.equal(m.id, sent.messageId);
    assert.equal(m.from.name, "alice");
  }
  // A user's own messages are not delivered back to them.
  await bob.sendGroup("from bob");
  await received(toAlice, "from bob");
  assert.equal(toAlice.filter((m) => m.text === "hello all").length, 0);
});

test("the online list, and presence events when it changes (polled)", async () => {
  const [a, b] = [userId(), userId()];
  const alice = client(a, "alice", { presenceIntervalMs: 200 });
  const lists = [];
  alice.on("presence", (users) => lists.push(users.map((u) => u.id)));
  await alice.connect();
  const users = await alice.online();
  assert.ok(users.some((u) => u.id === String(a) && u.name === "alice"));
  const bob = client(b, "bob");
  await bob.connect();
  await waitFor("bob in a presence event", () => lists.some((l) => l.includes(String(b))));
  await bob.close();
  await waitFor("bob gone in a later presence event", () => {
    const last = lists[lists.length - 1];
    return last && !last.includes(String(b));
  });
});

test("presence pushed by the server keeps the online list live without polling", async () => {
  const [a, b, c] = [userId(), userId(), userId()];
  const alice = client(a, "alice", { presence: true });
  const lists = [];
  alice.on("presence", (users) => lists.push(users.map((u) => u.id)));
  const online = [];
  // Count ONLINE requests: one at login, none after (the changes are pushed).
  const sent = [];
  await alice.connect();
  const ws = alice["ws"];
  const send = ws.send.bind(ws);
  ws.send = (data) => {
    sent.push(fromBinary(EnvelopeSchema, data).payload.case);
    send(data);
  };
  await waitFor("alice's own list", () => lists.some((l) => l.includes(String(a))));
  const bob = client(b, "bob");
  const carol = client(c, "carol");
  await bob.connect();
  await carol.connect();
  await waitFor("bob and carol pushed", () => {
    const last = lists[lists.length - 1];
    return last && last.includes(String(b)) && last.includes(String(c));
  });
  await bob.close();
  await waitFor("bob's logout pushed", () => {
    const last = lists[lists.length - 1];
    return last && !last.includes(String(b)) && last.includes(String(c));
  });
  online.push(...lists[lists.length - 1]);
  assert.ok(online.includes(String(a)), "alice is in her own list");
  assert.equal(sent.filter((k) => k === "onlineRequest").length, 0, "no polling after login");
});

test("history: the inbox has both directions, the group stream the group's messages", async () => {
  const [a, b] = [userId(), userId()];
  const alice = client(a, "alice");
  const bob = client(b, "bob");
  await alice.connect();
  await bob.connect();
  const got = inbox(bob);
  await alice.sendPrivate(b, "h1");
  await bob.sendPrivate(a, "h2");
  await alice.sendGroup("h3");
  await received(got, "h3");
  const page = await alice.history({ limit: 10 });
  assert.equal(page.stream, "inbox");
  const texts = page.messages.map((m) => m.text);
  assert.deepEqual(texts.slice(0, 2), ["h2", "h1"], "newest first");
  assert.equal(page.messages[1].to, String(b));
  assert.deepEqual(page.messages[0].from, { id: String(b), name: "bob" });
  const group = await bob.history({ stream: "group", limit: 5 });
  assert.ok(group.messages.some((m) => m.text === "h3" && m.to === null && m.kind === "group"));
});

test("a delivery that arrives twice is reported once", async () => {
  const [a, b] = [userId(), userId()];
  const alice = client(a, "alice");
  await alice.connect();
  // Bob never acknowledges (the interval is longer than the test), so after a network loss
  // the server replays from what it kept: what bob already had comes again.
  const sockets = [];
  const frames = [];
  class Recording extends WebSocket {
    constructor(url) {
      super(url);
      sockets.push(this);
      this.on("message", (data) => {
        const env = fromBinary(EnvelopeSchema, new Uint8Array(data));
        if (env.payload.case === "delivery") frames.push(env.payload.value.messageId.toString());
      });
    }
  }
  const bob = client(b, "bob", { WebSocket: Recording, ackIntervalMs: 600_000, reconnect: { initialDelayMs: 50 } });
  const got = inbox(bob);
  await bob.connect();
  const sent = await alice.sendPrivate(b, "only once");
  await received(got, "only once");
  let logins = 0;
  bob.on("login", () => logins++);
  sockets[0].terminate(); // a network loss: no close frame
  await waitFor("bob back", () => logins === 1 && bob.state === "connected");
  await waitFor("the replayed copy", () => frames.filter((id) => id === sent.messageId).length >= 2);
  await alice.sendPrivate(b, "after");
  await received(got, "after");
  assert.equal(got.filter((m) => m.id === sent.messageId).length, 1);
});

test("refused requests reject with the server's error code; the connection stays", async () => {
  const a = userId();
  const alice = client(a, "alice");
  await alice.connect();
  await assert.rejects(alice.sendPrivate(0, "to nobody"), (e) => e instanceof CimError && e.code === "INVALID");
  await assert.rejects(alice.sendGroup(""), (e) => e instanceof CimError && e.code === "INVALID");
  assert.equal(alice.state, "connected");
  // A resend with the same client id is answered with the first message id.
  const first = await alice.sendGroup("once", { clientMsgId: "same-1" });
  const second = await alice.sendGroup("once", { clientMsgId: "same-1" });
  assert.equal(second.messageId, first.messageId);
});

test("a duplicate login is refused with DUPLICATE_LOGIN and not retried", async () => {
  const a = userId();
  await client(a, "alice").connect();
  const twin = client(a, "alice");
  await assert.rejects(twin.connect(), (e) => e instanceof CimError && e.code === "DUPLICATE_LOGIN" && !e.transient);
  assert.equal(twin.state, "disconnected");
});

test("an operator's offline KICK stops the client without reconnecting", async () => {
  const a = userId();
  const alice = client(a, "alice");
  await alice.connect();
  const kicks = [];
  alice.on("kicked", (k) => kicks.push(k));
  const resp = await fetch(`${host.url}/offline`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ user_id: a }) });
  assert.equal(resp.status, 200);
  await waitFor("disconnected", () => alice.state === "disconnected");
  assert.deepEqual(kicks.map((k) => k.code), ["TAKEN_OFFLINE"]);
});

test("a newer login with the resume token takes over: the old client is REPLACED and stops", async () => {
  const a = userId();
  const first = client(a, "alice");
  await first.connect();
  const kicks = [];
  first.on("kicked", (k) => kicks.push(k.code));
  const second = client(a, "alice", { resume: { resumeToken: first.resumeState.resumeToken } });
  await second.connect();
  await waitFor("the first client stopped", () => first.state === "disconnected");
  assert.deepEqual(kicks, ["REPLACED"]);
  assert.equal(second.state, "connected");
  // The new session works.
  await second.online();
});
