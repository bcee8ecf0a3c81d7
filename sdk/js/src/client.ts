// The cim client: route login, one WebSocket at a time, requests correlated by request id,
// acks, resume across reconnects, de-duplication, token refresh, reconnects with backoff.
import { create, fromBinary, toBinary } from "@bufbuild/protobuf";
import {
  type Delivery,
  type Envelope,
  EnvelopeSchema,
  ErrorCode,
  Kind,
  MessageKind,
  PositionsSchema,
  type Presence,
} from "./gen/cim_pb.js";
import { CimError, closeCodeName, codeName } from "./errors.js";
import { Emitter } from "./emitter.js";
import { tokenExpiryMs } from "./token.js";

/** A user as the server names them. Ids are decimal strings: they are 64-bit numbers. */
export interface User {
  id: string;
  name: string;
}

/** A message that reached this client (live, or replayed at login). */
export interface Message {
  /** The server's message id, a decimal string (64-bit; larger ids are newer). */
  id: string;
  kind: "private" | "group";
  from: User;
  text: string;
  /** When the server accepted it, Unix milliseconds. */
  timestampMs: number;
  /** Its position in this user's inbox (private) or in the group stream, a decimal string. */
  position: string;
  /** True when replayed at login: it was sent while this client was away. */
  replayed: boolean;
}

/** Where the client is in its two streams, and how to take its session over (see `resume`). */
export interface ResumeState {
  /** Last inbox position received ("0": unknown, the server uses what it kept from acks). */
  inbox: string;
  /** Last group position received. */
  group: string;
  /** The last LOGIN_ACK's resume token: the next login takes that session over. */
  resumeToken: string;
}

export type ConnectionState = "idle" | "connecting" | "connected" | "reconnecting" | "disconnected";

export interface StateChange {
  state: ConnectionState;
  /** For `reconnecting`: which attempt is next (1, 2, ...) and when, in ms. */
  attempt?: number;
  delayMs?: number;
  /** What ended the previous connection, or why the client stopped (`disconnected`). */
  error?: CimError;
}

export interface LoginInfo {
  user: User;
  nodeId: string;
  heartbeatSecs: number;
  /** When the token expires (Unix ms), 0 without tokens. The SDK refreshes it itself. */
  tokenExpiresAtMs: number;
  /** Messages fell out of the server's retention while away (see GET /history). */
  missedInbox: boolean;
  missedGroup: boolean;
}

export interface Kicked {
  /** The ErrorCode name: IDLE_TIMEOUT, TAKEN_OFFLINE, REPLACED, TOKEN_EXPIRED, SHUTTING_DOWN, SLOW_CONSUMER. */
  code: string;
  reason: string;
}

export interface ClientEvents {
  /** Every message once, however often it reached the client. */
  message: Message;
  /** Each LOGIN_ACK: the first login and every reconnect. */
  login: LoginInfo;
  state: StateChange;
  /** The server closed the session and said why (a KICK frame, or the close status). */
  kicked: Kicked;
  /** The online users, sorted by id, whenever the list changed: pushed by the server with `presence`, polled with `presenceIntervalMs`, or asked for with `online()`. */
  presence: User[];
  /** Something failed in the background (a refresh, an ack); the client carries on. */
  error: CimError;
}

/** Anything shaped like the browser's WebSocket (the `ws` package's class in Node 20). */
export interface WebSocketLike {
  binaryType: string;
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: Uint8Array): void;
  close(code?: number, reason?: string): void;
}
export type WebSocketConstructor = new (url: string) => WebSocketLike;

export type TokenProvider = () => string | Promise<string>;

export interface ReconnectOptions {
  /** The first delay, ms (250). Each attempt doubles it up to `maxDelayMs`. */
  initialDelayMs?: number;
  /** The longest delay, ms (10000). */
  maxDelayMs?: number;
}

export interface ClientOptions {
  /** The route API's base URL, e.g. `http://127.0.0.1:8080` (the page's own origin in a browser). */
  url: string;
  /** The user (development mode); with a token it may be left out: the token's `sub` is used. */
  userId?: string | number | bigint;
  userName?: string;
  /** A fixed token, or a provider asked before every login and every refresh. */
  token?: string | TokenProvider;
  /** The WebSocket class; defaults to `globalThis.WebSocket` (Node 20 has none: pass `ws`'s). */
  WebSocket?: WebSocketConstructor;
  /** `fetch`; defaults to `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** How long a request waits for its answer, ms (10000). */
  requestTimeoutMs?: number;
  /** Reconnect with exponential backoff and jitter, or `false` never to reconnect. */
  reconnect?: ReconnectOptions | false;
  /** Where to resume from (e.g. kept from a previous client's `resumeState`). */
  resume?: Partial<ResumeState>;
  /** How often to acknowledge what was received, ms (1000). */
  ackIntervalMs?: number;
  /**
   * Keep the online list live: the server pushes who came online or went offline (PRESENCE
   * frames, gathered for about a second) and the client emits `presence` with the whole list
   * whenever it changed. The list is fetched once at each login.
   */
  presence?: boolean;
  /** Ask for the online list this often and emit `presence` when it changed, ms (0: never). Not needed with `presence`. */
  presenceIntervalMs?: number;
  /** How many message ids to remember for de-duplication (10000). */
  dedupCapacity?: number;
}

export interface SendOptions {
  /** An id for this send (at most 64 bytes): a resend with the same id is not stored twice. Generated when left out. */
  clientMsgId?: string;
}

export interface SendResult {
  messageId: string;
  /** Private sends: the receiver was not connected; they get it at their next login. */
  stored: boolean;
  clientMsgId: string;
}

export interface HistoryQuery {
  /** `inbox` (private messages, both directions; the default) or `group`. */
  stream?: "inbox" | "group";
  before?: string;
  after?: string;
  limit?: number;
}

export interface HistoryEntry {
  position: string;
  id: string;
  kind: "private" | "group";
  from: User;
  /** The receiver of a private message; null for group messages. */
  to: string | null;
  text: string;
  timestampMs: number;
}

export interface HistoryPage {
  stream: "inbox" | "group";
  messages: HistoryEntry[];
  last: string;
  trimmedThrough: string;
}

interface Pending {
  resolve: (env: Envelope) => void;
  reject: (err: CimError) => void;
  timer: ReturnType<typeof setTimeout>;
}

/** Close statuses and KICK codes after which reconnecting would only fight someone. */
const FINAL = new Set(["REPLACED", "TAKEN_OFFLINE", "UNAUTHENTICATED", "DUPLICATE_LOGIN", "INVALID", "REJECTED"]);

const OPEN = 1;

/**
 * A cim client. `connect()` logs in; afterwards the client keeps itself connected until
 * `close()` or a final refusal (see the README: reconnect semantics).
 */
export class Client extends Emitter<ClientEvents> {
  private readonly opts: ClientOptions;
  private readonly WS: WebSocketConstructor;
  private readonly fetchFn: typeof fetch;
  private readonly url: string;
  private ws: WebSocketLike | null = null;
  private nextRequestId = 1n;
  private readonly pending = new Map<bigint, Pending>();
  private _state: ConnectionState = "idle";
  private _user: User | null = null;
  private token = "";
  private expiredInARow = 0;
  // Positions: received now, received a tick ago (acked and resumed from), last acked.
  private received = { inbox: 0n, group: 0n };
  private settled = { inbox: 0n, group: 0n };
  private acked = { inbox: 0n, group: 0n };
  private resumeToken = "";
  private readonly seen = new Map<string, true>();
  private timers: ReturnType<typeof setTimeout>[] = [];
  private heartbeat: ReturnType<typeof setInterval> | null = null;
  private ackTimer: ReturnType<typeof setInterval> | null = null;
  private presenceTimer: ReturnType<typeof setInterval> | null = null;
  private refreshTimer: ReturnType<typeof setTimeout> | null = null;
  private lastPresence = "";
  // The online list as last known, and the PRESENCE frames received while an ONLINE request
  // was outstanding (applied again on top of its answer, which may be older than they are).
  private onlineUsers = new Map<string, User>();
  private onlineRequests = 0;
  private presenceSinceRequest: Presence[] = [];
  private attempt = 0;
  private closed = false;

  constructor(opts: ClientOptions) {
    super();
    this.opts = opts;
    const WS = opts.WebSocket ?? (globalThis as { WebSocket?: WebSocketConstructor }).WebSocket;
    if (!WS) throw new TypeError("no WebSocket: pass the `WebSocket` option (in Node 20: `import { WebSocket } from \"ws\"`)");
    this.WS = WS;
    const f = opts.fetch ?? globalThis.fetch;
    if (!f) throw new TypeError("no fetch: pass the `fetch` option");
    this.fetchFn = f.bind(globalThis);
    this.url = opts.url.replace(/\/+$/, "");
    if (opts.resume) {
      this.received.inbox = this.settled.inbox = BigInt(opts.resume.inbox ?? 0);
      this.received.group = this.settled.group = BigInt(opts.resume.group ?? 0);
      this.resumeToken = opts.resume.resumeToken ?? "";
    }
  }

  get state(): ConnectionState {
    return this._state;
  }

  /** The user as the server bound them (after the first login). */
  get user(): User | null {
    return this._user;
  }

  /** Where to resume from: give it to a later client's `resume` option to pick up here. */
  get resumeState(): ResumeState {
    return { inbox: this.received.inbox.toString(), group: this.received.group.toString(), resumeToken: this.resumeToken };
  }

  /**
   * Logs in. Resolves with the first LOGIN_ACK; rejects with a `CimError` when the server
   * cannot be reached or refuses (no retries here: the caller sees why at once). From then
   * on the client reconnects by itself.
   */
  async connect(): Promise<LoginInfo> {
    if (this._state !== "idle") throw new CimError("INVALID", "connect() was already called");
    this.setState({ state: "connecting" });
    try {
      return await this.login();
    } catch (e) {
      const err = asCimError(e);
      this.stop(err);
      throw err;
    }
  }

  /** Sends a private message to user `to`. */
  async sendPrivate(to: string | number | bigint, text: string, opts: SendOptions = {}): Promise<SendResult> {
    const clientMsgId = opts.clientMsgId ?? newClientMsgId();
    const ack = await this.request(Kind.PRIVATE_SEND, {
      case: "privateSend",
      value: { $typeName: "cim.v1.PrivateSend", toUserId: BigInt(to), text, clientMsgId },
    });
    return sendResult(ack, clientMsgId);
  }

  /** Sends a message to the group (by default everyone online, and those away when they return). */
  async sendGroup(text: string, opts: SendOptions = {}): Promise<SendResult> {
    const clientMsgId = opts.clientMsgId ?? newClientMsgId();
    const ack = await this.request(Kind.GROUP_SEND, {
      case: "groupSend",
      value: { $typeName: "cim.v1.GroupSend", text, clientMsgId },
    });
    return sendResult(ack, clientMsgId);
  }

  /** Who is online, sorted by id. Also emitted as `presence` when it changed. */
  async online(): Promise<User[]> {
    this.onlineRequests += 1;
    let env: Envelope;
    try {
      env = await this.request(Kind.ONLINE_REQUEST, { case: "onlineRequest", value: { $typeName: "cim.v1.OnlineRequest" } });
    } finally {
      this.onlineRequests -= 1;
    }
    if (env.payload.case !== "onlineResponse") throw unexpected(env);
    const users = env.payload.value.users.map((u) => ({ id: u.id.toString(), name: u.name }));
    this.onlineUsers = new Map(users.map((u) => [u.id, u]));
    // Changes pushed while the request was on its way may be newer than its answer.
    for (const p of this.presenceSinceRequest) this.applyPresence(p);
    if (this.onlineRequests === 0) this.presenceSinceRequest = [];
    this.notePresence(this.sortedOnline());
    return users;
  }

  /** One page of this user's history from the route API (`GET /history/{id}`). */
  async history(q: HistoryQuery = {}): Promise<HistoryPage> {
    if (!this._user) throw new CimError("NOT_LOGGED_IN", "history() needs a login first");
    const params = new URLSearchParams();
    if (q.stream) params.set("stream", q.stream);
    if (q.before) params.set("before", q.before);
    if (q.after) params.set("after", q.after);
    if (q.limit) params.set("limit", String(q.limit));
    const headers: Record<string, string> = {};
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    const body = (await this.http("GET", `/history/${this._user.id}?${params}`, headers)) as {
      stream: "inbox" | "group";
      last: string;
      trimmed_through: string;
      messages: { position: string; id: string; kind: string; from: { id: number | string; name: string }; to: number | string | null; text: string; timestamp_ms: number }[];
    };
    return {
      stream: body.stream,
      last: body.last,
      trimmedThrough: body.trimmed_through,
      messages: body.messages.map((m) => ({
        position: m.position,
        id: m.id,
        kind: m.kind === "group" ? "group" : "private",
        from: { id: String(m.from.id), name: m.from.name },
        to: m.to === null ? null : String(m.to),
        text: m.text,
        timestampMs: m.timestamp_ms,
      })),
    };
  }

  /**
   * Logs out: acknowledges what arrived, closes the socket and stops reconnecting. The
   * promise resolves once the socket is closed (or after 2 s).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    const ws = this.ws;
    if (ws && ws.readyState === OPEN) {
      // Everything received has been handed to the app by now: acknowledge all of it.
      this.settled = { ...this.received };
      this.sendAck();
    }
    this.stop(new CimError("CLOSED", "the client was closed"));
    if (ws && ws.readyState <= OPEN) {
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, 2000);
        ws.onclose = () => {
          clearTimeout(timer);
          resolve();
        };
        ws.close(1000, "logout");
      });
    }
  }

  // --- connecting

  private async login(): Promise<LoginInfo> {
    this.token = await this.currentToken();
    const route = await this.routeLogin();
    this.checkNotClosed();
    const ws = await this.open(route.ws_url);
    if (this.closed) {
      ws.onclose = null;
      ws.close(1000);
      this.checkNotClosed();
    }
    const resumeFrom = create(PositionsSchema, { inbox: this.settled.inbox, group: this.settled.group });
    const userId = this.opts.userId !== undefined ? BigInt(this.opts.userId) : BigInt(route.user_id ?? 0);
    let env: Envelope;
    try {
      env = await this.request(
        Kind.LOGIN,
        {
          case: "login",
          value: {
            $typeName: "cim.v1.Login",
            userId,
            userName: this.opts.userName ?? route.user_name ?? "",
            token: this.token,
            resumeFrom,
            resumeToken: this.resumeToken,
            presence: this.opts.presence ?? false,
          },
        },
        ws,
      );
    } catch (e) {
      ws.onclose = null;
      ws.close();
      if (this.ws === ws) this.ws = null;
      throw e;
    }
    if (env.payload.case !== "loginAck") throw unexpected(env);
    const ack = env.payload.value;
    const user = { id: (ack.user?.id ?? userId).toString(), name: ack.user?.name ?? "" };
    this._user = user;
    this.resumeToken = ack.resumeToken;
    this.expiredInARow = 0;
    this.attempt = 0;
    const info: LoginInfo = {
      user,
      nodeId: ack.nodeId,
      heartbeatSecs: ack.heartbeatSecs,
      tokenExpiresAtMs: Number(ack.tokenExpiresAtMs),
      missedInbox: ack.missedInbox,
      missedGroup: ack.missedGroup,
    };
    this.startTimers(info);
    this.setState({ state: "connected" });
    this.emit("login", info);
    if (this.opts.presence || this.opts.presenceIntervalMs) this.online().catch((e) => this.emit("error", asCimError(e)));
    return info;
  }

  /** A reconnect still under way when `close()` was called must not open a session. */
  private checkNotClosed(): void {
    if (this.closed) throw new CimError("CLOSED", "the client was closed");
  }

  private async currentToken(): Promise<string> {
    const t = this.opts.token;
    if (t === undefined) return "";
    if (typeof t === "string") return t;
    let token: string;
    try {
      token = await t();
    } catch (e) {
      throw new CimError("TOKEN_PROVIDER", `the token provider failed: ${(e as Error)?.message ?? e}`, { cause: e });
    }
    if (!token) throw new CimError("TOKEN_PROVIDER", "the token provider returned an empty token");
    return token;
  }

  /** `POST /login`: picks the node and its WebSocket URL. */
  private async routeLogin(): Promise<{ ws_url: string; user_id?: number; user_name?: string }> {
    const body: Record<string, unknown> = {};
    if (this.opts.userId !== undefined) body.user_id = Number(this.opts.userId);
    if (this.opts.userName) body.user_name = this.opts.userName;
    if (this.resumeToken) body.resume_token = this.resumeToken;
    const headers: Record<string, string> = { "content-type": "application/json" };
    if (this.token) headers.authorization = `Bearer ${this.token}`;
    return (await this.http("POST", "/login", headers, JSON.stringify(body))) as { ws_url: string };
  }

  private async http(method: string, path: string, headers: Record<string, string>, body?: string): Promise<unknown> {
    let resp: Response;
    try {
      resp = await this.fetchFn(this.url + path, { method, headers, body });
    } catch (e) {
      throw new CimError("NETWORK", `cannot reach the server at ${this.url}: ${(e as Error)?.message ?? e}`, { cause: e });
    }
    const text = await resp.text().catch(() => "");
    let json: { error?: string; message?: string; retry_after_ms?: number } | undefined;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    if (!resp.ok) {
      const code = json?.error ? json.error.toUpperCase() : resp.status >= 500 ? "UNAVAILABLE" : "HTTP";
      const retry = json?.retry_after_ms ?? Number(resp.headers.get("retry-after") ?? 0) * 1000;
      throw new CimError(code, json?.message ?? `${method} ${path}: HTTP ${resp.status}`, { status: resp.status, retryAfterMs: retry });
    }
    if (json === undefined) throw new CimError("HTTP", `${method} ${path}: the answer is not JSON`, { status: resp.status });
    return json;
  }

  private open(url: string): Promise<WebSocketLike> {
    return new Promise((resolve, reject) => {
      let ws: WebSocketLike;
      try {
        ws = new this.WS(url);
      } catch (e) {
        reject(new CimError("NETWORK", `cannot open ${url}: ${(e as Error)?.message ?? e}`, { cause: e }));
        return;
      }
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onmessage = (ev) => this.onFrame(ws, ev.data);
      ws.onerror = () => {}; // the close event that follows says what happened
      ws.onopen = () => resolve(ws);
      ws.onclose = (ev) => {
        if (this.ws !== ws) return;
        reject(new CimError("NETWORK", `the WebSocket ${url} closed before it opened (${ev.code})`));
        this.onClosed(ws, ev.code, ev.reason);
      };
    });
  }

  /** The socket closed: fail what waits on it, and reconnect unless the close was final. */
  private onClosed(ws: WebSocketLike, status: number, reason: string): void {
    if (this.ws !== ws) return;
    this.ws = null;
    this.stopTimers();
    const name = closeCodeName(status);
    const err = new CimError(name ?? "DISCONNECTED", `the connection closed (${status}${reason ? ` ${reason}` : ""})`);
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new CimError("DISCONNECTED", `the connection closed before the answer (${status}${reason ? ` ${reason}` : ""})`));
      this.pending.delete(id);
    }
    if (this.closed || this._state !== "connected") return; // a failed login: login() reports it
    if (name && status !== 1001 && status !== 1009) this.emit("kicked", { code: name, reason });
    this.afterDrop(err);
  }

  /** Decides between reconnecting and stopping after a connection or a reconnect attempt failed. */
  private afterDrop(err: CimError): void {
    if (this.closed) return;
    if (err.code === "TOKEN_EXPIRED") {
      this.expiredInARow += 1;
      // A fixed token that has expired stays expired.
      if (this.expiredInARow >= 2 || typeof this.opts.token === "string") return this.stop(err);
    }
    if (this.opts.reconnect === false || FINAL.has(err.code) || !err.transient) {
      return this.stop(err);
    }
    const r = this.opts.reconnect || {};
    const initial = r.initialDelayMs ?? 250;
    const max = r.maxDelayMs ?? 10_000;
    this.attempt += 1;
    const base = Math.min(max, initial * 2 ** (this.attempt - 1));
    // Equal jitter: half fixed, half random, so clients kicked together do not return together.
    let delay = Math.round(base / 2 + (Math.random() * base) / 2);
    if (err.retryAfterMs) delay = Math.max(delay, err.retryAfterMs);
    this.setState({ state: "reconnecting", attempt: this.attempt, delayMs: delay, error: err });
    this.later(delay, () => {
      if (this.closed) return;
      this.login().catch((e) => this.afterDrop(asCimError(e)));
    });
  }

  private stop(err: CimError): void {
    if (this.closed) return;
    this.closed = true;
    this.stopTimers();
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(err);
    }
    this.pending.clear();
    const ws = this.ws;
    this.ws = null;
    if (ws && err.code !== "CLOSED") {
      ws.onclose = null;
      ws.close(1000);
    }
    this.setState({ state: "disconnected", error: err });
  }

  private setState(change: StateChange): void {
    this._state = change.state;
    this.emit("state", change);
  }

  private later(ms: number, f: () => void): void {
    const t = setTimeout(() => {
      this.timers = this.timers.filter((x) => x !== t);
      f();
    }, ms);
    this.timers.push(t);
  }

  // --- timers of one connection: heartbeat, acks, presence, token refresh

  private startTimers(info: LoginInfo): void {
    this.stopTimers();
    const beat = Math.max(1, info.heartbeatSecs || 60) * 1000;
    // The server closes a connection idle for 3 heartbeats; a PING each heartbeat is ample.
    this.heartbeat = setInterval(() => {
      this.request(Kind.PING, { case: "ping", value: { $typeName: "cim.v1.Ping" } }).catch(() => {});
    }, beat);
    this.ackTimer = setInterval(() => this.ackTick(), this.opts.ackIntervalMs ?? 1000);
    if (this.opts.presenceIntervalMs) {
      this.presenceTimer = setInterval(() => {
        this.online().catch((e) => this.emit("error", asCimError(e)));
      }, this.opts.presenceIntervalMs);
    }
    if (info.tokenExpiresAtMs && typeof this.opts.token === "function") this.scheduleRefresh(info.tokenExpiresAtMs);
  }

  private stopTimers(): void {
    if (this.heartbeat) clearInterval(this.heartbeat);
    if (this.ackTimer) clearInterval(this.ackTimer);
    if (this.presenceTimer) clearInterval(this.presenceTimer);
    if (this.refreshTimer) clearTimeout(this.refreshTimer);
    this.heartbeat = this.ackTimer = this.presenceTimer = this.refreshTimer = null;
  }

  /** REFRESH at 80% of the remaining lifetime, and at least 5 s before the expiry. */
  private scheduleRefresh(expiresAtMs: number): void {
    const left = expiresAtMs - Date.now();
    const delay = Math.max(0, Math.min(left * 0.8, left - 5000));
    this.refreshTimer = setTimeout(() => this.refresh(), delay);
  }

  private async refresh(): Promise<void> {
    try {
      const token = await this.currentToken();
      await this.request(Kind.REFRESH, { case: "refresh", value: { $typeName: "cim.v1.Refresh", token } });
      const before = tokenExpiryMs(this.token);
      this.token = token;
      const exp = tokenExpiryMs(token);
      // Only a later expiry is worth another refresh; the same token again would loop.
      if (exp > before && this.ws) this.scheduleRefresh(exp);
      else this.emit("error", new CimError("TOKEN_EXPIRED", "the token provider gave no token that lasts longer: the connection ends when this one expires"));
    } catch (e) {
      const err = asCimError(e);
      if (err.code === "DISCONNECTED" || err.code === "CLOSED") return;
      this.emit("error", err);
      if (this.ws) this.refreshTimer = setTimeout(() => this.refresh(), 5000);
    }
  }

  /** Acknowledges what was received a tick ago (a live delivery overtaken by a later one is never skipped). */
  private ackTick(): void {
    this.sendAck();
    this.settled = { ...this.received };
  }

  private sendAck(): void {
    const { inbox, group } = this.settled;
    if (inbox <= this.acked.inbox && group <= this.acked.group) return;
    if (!this.ws || this.ws.readyState !== OPEN) return;
    this.send(this.ws, 0n, Kind.ACK, {
      case: "ack",
      value: {
        $typeName: "cim.v1.Ack",
        messageId: 0n,
        stored: false,
        received: create(PositionsSchema, { inbox, group }),
      },
    });
    this.acked = { inbox, group };
  }

  /** A PRESENCE frame: applied to the list at once, and kept while an ONLINE request is out. */
  private onPresence(p: Presence): void {
    if (p.resync) {
      this.online().catch((e) => this.emit("error", asCimError(e)));
      return;
    }
    if (this.onlineRequests > 0) this.presenceSinceRequest.push(p);
    this.applyPresence(p);
    this.notePresence(this.sortedOnline());
  }

  private applyPresence(p: Presence): void {
    for (const u of p.offline) this.onlineUsers.delete(u.id.toString());
    for (const u of p.online) this.onlineUsers.set(u.id.toString(), { id: u.id.toString(), name: u.name });
  }

  private sortedOnline(): User[] {
    return [...this.onlineUsers.values()].sort((a, b) => {
      const x = BigInt(a.id);
      const y = BigInt(b.id);
      return x < y ? -1 : x > y ? 1 : 0;
    });
  }

  private notePresence(users: User[]): void {
    const key = users.map((u) => `${u.id}:${u.name}`).join(",");
    if (key === this.lastPresence) return;
    this.lastPresence = key;
    this.emit("presence", users);
  }

  // --- frames

  private request(kind: Kind, payload: Envelope["payload"], on?: WebSocketLike): Promise<Envelope> {
    const ws = on ?? (this._state === "connected" ? this.ws : null);
    if (this.closed) return Promise.reject(new CimError("CLOSED", "the client was closed"));
    if (!ws || ws.readyState !== OPEN) {
      return Promise.reject(new CimError("DISCONNECTED", "not connected (the client is reconnecting)"));
    }
    const id = this.nextRequestId++;
    const timeoutMs = this.opts.requestTimeoutMs ?? 10_000;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new CimError("TIMEOUT", `no answer to ${Kind[kind]} (request ${id}) within ${timeoutMs} ms`));
      }, timeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      this.send(ws, id, kind, payload);
    });
  }

  private send(ws: WebSocketLike, requestId: bigint, kind: Kind, payload: Envelope["payload"]): void {
    ws.send(toBinary(EnvelopeSchema, create(EnvelopeSchema, { requestId, kind, payload })));
  }

  private onFrame(ws: WebSocketLike, data: unknown): void {
    if (this.ws !== ws) return;
    let env: Envelope;
    try {
      const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : (data as Uint8Array);
      env = fromBinary(EnvelopeSchema, bytes);
    } catch (e) {
      this.emit("error", new CimError("BAD_FRAME", `a frame from the server did not decode: ${(e as Error)?.message ?? e}`));
      return;
    }
    const p = env.requestId ? this.pending.get(env.requestId) : undefined;
    switch (env.payload.case) {
      case "delivery":
        this.onDelivery(env.payload.value);
        return;
      case "presence":
        this.onPresence(env.payload.value);
        return;
      case "kick": {
        const kick = env.payload.value;
        const code = codeName(kick.code);
        this.emit("kicked", { code, reason: kick.reason });
        // Reported once: the close status that follows says the same.
        ws.onclose = (ev) => this.onClosedAfterKick(ws, code, ev.code, ev.reason || kick.reason);
        return;
      }
      case "error": {
        const e = env.payload.value;
        const err = new CimError(codeName(e.code), e.message || codeName(e.code), { retryAfterMs: Number(e.retryAfterMs) });
        if (p) {
          this.pending.delete(env.requestId);
          clearTimeout(p.timer);
          p.reject(err);
        } else {
          this.emit("error", err);
        }
        return;
      }
      default:
        if (p) {
          this.pending.delete(env.requestId);
          clearTimeout(p.timer);
          p.resolve(env);
        }
    }
  }

  private onClosedAfterKick(ws: WebSocketLike, code: string, status: number, reason: string): void {
    if (this.ws !== ws) return;
    const wasConnected = this._state === "connected";
    this._state = wasConnected ? "reconnecting" : this._state; // keep onClosed from repeating the kick
    this.onClosed(ws, status, reason);
    if (wasConnected) this.afterDrop(new CimError(code, `kicked by the server: ${reason}`));
  }

  private onDelivery(d: Delivery): void {
    const pos = d.position;
    if (d.kind === MessageKind.GROUP) {
      if (pos > this.received.group) this.received.group = pos;
    } else if (pos > this.received.inbox) {
      this.received.inbox = pos;
    }
    const id = d.messageId.toString();
    if (this.seen.has(id)) return;
    this.seen.set(id, true);
    const cap = this.opts.dedupCapacity ?? 10_000;
    if (this.seen.size > cap) this.seen.delete(this.seen.keys().next().value as string);
    this.emit("message", {
      id,
      kind: d.kind === MessageKind.GROUP ? "group" : "private",
      from: { id: (d.sender?.id ?? 0n).toString(), name: d.sender?.name ?? "" },
      text: d.text,
      timestampMs: Number(d.timestampMs),
      position: pos.toString(),
      replayed: d.replayed,
    });
  }
}

function sendResult(env: Envelope, clientMsgId: string): SendResult {
  if (env.payload.case !== "ack") throw unexpected(env);
  return { messageId: env.payload.value.messageId.toString(), stored: env.payload.value.stored, clientMsgId };
}

function unexpected(env: Envelope): CimError {
  return new CimError("UNEXPECTED", `unexpected answer ${Kind[env.kind]} (${env.payload.case})`);
}

function asCimError(e: unknown): CimError {
  if (e instanceof CimError) return e;
  return new CimError("UNEXPECTED", (e as Error)?.message ?? String(e), { cause: e });
}

function newClientMsgId(): string {
  const c = (globalThis as { crypto?: { randomUUID?: () => string } }).crypto;
  if (c?.randomUUID) return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

export { ErrorCode };
