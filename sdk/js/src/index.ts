// @cim/sdk: the cim client for browsers and Node.js. See README.md.
export { Client, ErrorCode } from "./client.js";
export type {
  ClientEvents,
  ClientOptions,
  ConnectionState,
  HistoryEntry,
  HistoryPage,
  HistoryQuery,
  Kicked,
  LoginInfo,
  Message,
  ReconnectOptions,
  ResumeState,
  SendOptions,
  SendResult,
  StateChange,
  TokenProvider,
  User,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { CimError } from "./errors.js";
