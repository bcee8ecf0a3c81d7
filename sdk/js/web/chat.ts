// The browser chat page served at `/` (host/web/index.html), on @cim/sdk. Bundled by
// `npm run bundle` into host/web/chat.js, which the host serves at `/chat.js`.
// User data only ever reaches the page through textContent.
import { Client, CimError, type Message, type StateChange, type User } from "../src/index.js";

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const el = <K extends keyof HTMLElementTagNameMap>(tag: K, cls?: string, text?: string) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

/** One entry on screen: from the history API or a delivery, or sent from this page. */
interface Entry {
  id: string;
  fromId: string;
  fromName: string;
  text: string;
  timestampMs: number;
}

interface Conversation {
  key: string; // "group" or the peer's user id
  entries: Entry[];
  unread: number;
  draft: string;
  /** The client id of the draft's last failed send: a retry is not stored twice. */
  draftClientId?: string;
}

const GROUP = "group";
let client: Client | null = null;
let me: User | null = null;
let authToken = false;
let conversations = new Map<string, Conversation>();
let seen = new Set<string>();
let names = new Map<string, string>();
let online = new Set<string>();
let current = GROUP;
let sending = false;

function conversation(key: string): Conversation {
  let c = conversations.get(key);
  if (!c) conversations.set(key, (c = { key, entries: [], unread: 0, draft: "" }));
  return c;
}

function title(key: string): string {
  if (key === GROUP) return "Everyone";
  return `${names.get(key) ?? "user"} (${key})`;
}

// --- rendering

function renderNav(): void {
  const list = $("conversations");
  list.replaceChildren();
  const keys = [GROUP, ...[...conversations.keys()].filter((k) => k !== GROUP)];
  for (const key of keys) {
    const c = conversation(key);
    const li = el("li", key === current ? "active" : "");
    li.dataset.conv = key;
    if (key !== GROUP) {
      li.append(el("span", "dot"));
      if (online.has(key)) li.classList.add("online");
    }
    li.append(el("span", "label", title(key)));
    if (c.unread) li.append(el("span", "unread", String(c.unread)));
    li.onclick = () => open(key);
    list.append(li);
  }
  const people = $("online");
  people.replaceChildren();
  for (const id of [...online].sort((a, b) => Number(a) - Number(b))) {
    const li = el("li", "online");
    li.dataset.user = id;
    li.append(el("span", "dot"), el("span", "label", id === me?.id ? `${me.name} (you)` : title(id)));
    if (id !== me?.id) li.onclick = () => open(id);
    people.append(li);
  }
}

function renderMessages(): void {
  const c = conversation(current);
  $("title").textContent = current === GROUP ? "Everyone (group)" : `Private with ${title(current)}`;
  const list = $("messages");
  list.replaceChildren();
  if (!c.entries.length) list.append(el("li", "note", "No messages yet."));
  for (const m of c.entries) list.append(messageItem(m));
  list.scrollTop = list.scrollHeight;
}

function messageItem(m: Entry): HTMLLIElement {
  const own = m.fromId === me?.id;
  const li = el("li", own ? "own" : "other");
  li.dataset.id = m.id;
  const meta = el("div", "meta");
  meta.append(el("span", "from", own ? "you" : `${m.fromName} (${m.fromId})`));
  const t = el("time", "", new Date(m.timestampMs).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  t.dateTime = new Date(m.timestampMs).toISOString();
  t.title = new Date(m.timestampMs).toLocaleString();
  meta.append(t);
  li.append(meta, el("div", "text", m.text));
  return li;
}

function open(key: string): void {
  conversation(current).draft = ($("draft") as HTMLTextAreaElement).value;
  current = key;
  const c = conversation(key);
  c.unread = 0;
  ($("draft") as HTMLTextAreaElement).value = c.draft;
  $("send-error").textContent = "";
  renderNav();
  renderMessages();
  $("draft").focus();
}

/** Adds a message to its conversation once (history, replays and live copies meet here). */
function add(key: string, m: Entry, live: boolean): void {
  if (seen.has(m.id)) return;
  seen.add(m.id);
  if (m.fromId !== me?.id) names.set(m.fromId, m.fromName);
  const c = conversation(key);
  // Ids grow with time across the cluster: keep each conversation in id order.
  let i = c.entries.length;
  while (i > 0 && BigInt(c.entries[i - 1].id) > BigInt(m.id)) i--;
  c.entries.splice(i, 0, m);
  if (key === current) {
    const list = $("messages");
    const atEnd = i === c.entries.length - 1;
    if (atEnd) {
      list.querySelector(".note")?.remove();
      list.append(messageItem(m));
      list.scrollTop = list.scrollHeight;
    } else {
      renderMessages();
    }
  } else if (live && m.fromId !== me?.id) {
    c.unread++;
  }
  renderNav();
}

function onMessage(m: Message): void {
  const key = m.kind === "group" ? GROUP : m.from.id;
  add(key, { id: m.id, fromId: m.from.id, fromName: m.from.name, text: m.text, timestampMs: m.timestampMs }, true);
}

async function loadHistory(c: Client): Promise<void> {
  for (const stream of ["inbox", "group"] as const) {
    const page = await c.history({ stream, limit: 200 });
    for (const h of page.messages) {
      const key = h.kind === "group" ? GROUP : h.from.id === me?.id ? (h.to ?? GROUP) : h.from.id;
      add(key, { id: h.id, fromId: h.from.id, fromName: h.from.name, text: h.text, timestampMs: h.timestampMs }, false);
    }
  }
}

// --- connection state

function banner(text: string, down = false): void {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text;
  b.classList.toggle("down", down);
}

function describe(e: CimError | undefined): string {
  if (!e) return "";
  switch (e.code) {
    case "SHUTTING_DOWN":
      return "the server is restarting";
    case "NETWORK":
    case "DISCONNECTED":
      return "the connection was lost";
    case "IDLE_TIMEOUT":
      return "the connection was idle too long";
    case "REPLACED":
      return "you logged in somewhere else";
    case "TAKEN_OFFLINE":
      return "an operator took you offline";
    case "TOKEN_EXPIRED":
      return "your token expired: paste a new one and log in again";
    case "UNAUTHENTICATED":
      return `your token was refused: ${e.message}`;
    case "DUPLICATE_LOGIN":
      return "this user is already logged in elsewhere";
    default:
      return e.message;
  }
}

function onState(s: StateChange): void {
  if (s.state === "connected") {
    banner("");
    // "Not sent … send it again when reconnected": that time has come.
    if ($("send-error").textContent?.includes("when reconnected")) $("send-error").textContent = "";
  } else if (s.state === "reconnecting") {
    const secs = Math.max(1, Math.round((s.delayMs ?? 0) / 1000));
    banner(`Disconnected (${describe(s.error)}). Reconnecting by itself in ${secs} s… your drafts are kept.`);
  } else if (s.state === "disconnected" && s.error && s.error.code !== "CLOSED") {
    showLogin(`Disconnected: ${describe(s.error)}`);
  }
}

// --- logging in and out

function showLogin(error = ""): void {
  client = null;
  $("chat-view").hidden = true;
  $("logout").hidden = true;
  $("me").textContent = "";
  $("login-view").hidden = false;
  $("login-error").textContent = error;
  banner("");
  if (error.includes("token")) needToken();
}

function needToken(): void {
  authToken = true;
  $("token-label").hidden = false;
  ($("token") as HTMLInputElement).required = true;
  ($("uid") as HTMLInputElement).required = false;
  ($("uid") as HTMLInputElement).placeholder = "from the token";
}

/** The subject of a JWT, read without verifying it (the server verifies). */
function tokenSubject(token: string): string {
  try {
    const p = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    return String(JSON.parse(atob(p.padEnd(Math.ceil(p.length / 4) * 4, "="))).sub ?? "");
  } catch {
    return "";
  }
}

async function login(ev: Event): Promise<void> {
  ev.preventDefault();
  const button = $("login") as HTMLButtonElement;
  const uid = ($("uid") as HTMLInputElement).value.trim();
  const name = ($("name") as HTMLInputElement).value.trim();
  const tokenInput = $("token") as HTMLInputElement;
  const who = authToken ? tokenSubject(tokenInput.value.trim()) || uid : uid;
  // The same tab logging in again takes its previous session over instead of being refused.
  const saved = sessionStorage.getItem(`cim.resume.${who}`) ?? "";
  const c = new Client({
    url: location.origin,
    userId: uid || undefined,
    userName: name || undefined,
    // Read at every login and refresh: a newly pasted token is used from then on.
    token: authToken ? () => tokenInput.value.trim() : undefined,
    // Who is online, pushed by the server as it changes.
    presence: true,
    resume: { resumeToken: saved },
  });
  conversations = new Map();
  ($("draft") as HTMLTextAreaElement).value = "";
  seen = new Set();
  names = new Map();
  online = new Set();
  current = GROUP;
  c.on("message", onMessage);
  c.on("state", (s) => client === c && onState(s));
  c.on("login", () => sessionStorage.setItem(`cim.resume.${c.user?.id}`, c.resumeState.resumeToken));
  c.on("presence", (users) => {
    online = new Set(users.map((u) => u.id));
    for (const u of users) if (u.id !== me?.id) names.set(u.id, u.name);
    renderNav();
  });
  button.disabled = true;
  $("login-error").textContent = "";
  try {
    client = c;
    const info = await c.connect();
    me = info.user;
    $("me").textContent = `${me.name} (${me.id})`;
    $("login-view").hidden = true;
    $("chat-view").hidden = false;
    $("logout").hidden = false;
    renderNav();
    renderMessages();
    await loadHistory(c).catch((e) => note(`history could not be loaded: ${(e as Error).message}`));
  } catch (e) {
    const err = e as CimError;
    client = null;
    $("login-error").textContent =
      err.code === "NETWORK" ? `Cannot reach the server (${location.origin}). Is it running? Try again in a moment.` : describe(err);
    if (err.code === "UNAUTHENTICATED" || err.code === "TOKEN_EXPIRED") needToken();
  } finally {
    button.disabled = false;
  }
}

function note(text: string): void {
  $("messages").append(el("li", "note", text));
}

async function logout(): Promise<void> {
  const c = client;
  client = null;
  me = null;
  if (c) await c.close();
  showLogin();
}

// --- sending

async function send(ev: Event): Promise<void> {
  ev.preventDefault();
  const draft = $("draft") as HTMLTextAreaElement;
  const text = draft.value;
  if (!text.trim() || sending || !client || !me) return;
  const key = current;
  const c = conversation(key);
  // One client id per draft: a retry after a lost answer is not stored twice.
  c.draftClientId ??= crypto.randomUUID();
  sending = true;
  $("send-error").textContent = "";
  try {
    const r =
      key === GROUP
        ? await client.sendGroup(text, { clientMsgId: c.draftClientId })
        : await client.sendPrivate(key, text, { clientMsgId: c.draftClientId });
    add(key, { id: r.messageId, fromId: me.id, fromName: me.name, text, timestampMs: Date.now() }, true);
    c.draftClientId = undefined;
    c.draft = "";
    if (current === key && draft.value === text) draft.value = "";
  } catch (e) {
    const err = e as CimError;
    // The draft stays in the box: nothing typed is lost.
    $("send-error").textContent =
      err.transient
        ? `Not sent: ${describe(err)}. Your message is kept; send it again when reconnected.`
        : `Not sent: ${describe(err)}`;
  } finally {
    sending = false;
  }
}

$("login-view").addEventListener("submit", (e) => void login(e));
$("logout").addEventListener("click", () => void logout());
$("composer").addEventListener("submit", (e) => void send(e));
$("draft").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    ($("composer") as HTMLFormElement).requestSubmit();
  }
});
// Servers that verify user tokens say so in /healthz.
fetch("/healthz")
  .then((r) => r.json())
  .then((h: { auth?: string }) => h.auth === "token" && needToken())
  .catch(() => {});
