// Errors the SDK reports: the server's ErrorCode names, and a few of the SDK's own.
import { ErrorCode } from "./gen/cim_pb.js";

/**
 * Why something failed. Server errors carry the `ErrorCode` name from proto/cim.proto without
 * its `ERROR_CODE_` prefix (`"UNAUTHENTICATED"`, `"RATE_LIMITED"`, `"DUPLICATE_LOGIN"`, ...);
 * the route API's JSON codes are mapped to the same names (`duplicate_login` →
 * `"DUPLICATE_LOGIN"`). The SDK adds its own:
 * - `"NETWORK"`: the server could not be reached (HTTP or WebSocket).
 * - `"DISCONNECTED"`: the connection closed before the answer came (or is not open now).
 * - `"TIMEOUT"`: no answer within `requestTimeoutMs`.
 * - `"CLOSED"`: the client was closed with `close()`.
 * - `"TOKEN_PROVIDER"`: the token provider failed or gave an empty token.
 * - `"HTTP"`: the route API answered with something unexpected.
 */
export class CimError extends Error {
  readonly code: string;
  /** For `RATE_LIMITED`: how long to wait before trying again, in milliseconds. */
  readonly retryAfterMs: number;
  /** The HTTP status, when the error came from the route API. */
  readonly status: number;

  constructor(code: string, message: string, opts: { retryAfterMs?: number; status?: number; cause?: unknown } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = "CimError";
    this.code = code;
    this.retryAfterMs = opts.retryAfterMs ?? 0;
    this.status = opts.status ?? 0;
  }

  /** Worth retrying as is (or with a fresh token): not a refusal that will repeat. */
  get transient(): boolean {
    return TRANSIENT.has(this.code);
  }
}

const TRANSIENT = new Set([
  "NETWORK",
  "DISCONNECTED",
  "TIMEOUT",
  "TOKEN_PROVIDER",
  "TOKEN_EXPIRED",
  "RATE_LIMITED",
  "UNAVAILABLE",
  "SHUTTING_DOWN",
  "IDLE_TIMEOUT",
  "SLOW_CONSUMER",
  "HANDLER_FAILED",
  "HTTP",
]);

/** `ErrorCode.UNAUTHENTICATED` → `"UNAUTHENTICATED"`. */
export function codeName(code: ErrorCode): string {
  return ErrorCode[code] ?? `UNKNOWN_${code}`;
}

/** The ErrorCode a WebSocket close status stands for (4000 + the code; 1001 is SHUTTING_DOWN). */
export function closeCodeName(status: number): string | undefined {
  if (status === 1001) return "SHUTTING_DOWN";
  if (status === 1009) return "FRAME_TOO_LARGE";
  if (status > 4000 && status < 4100) return ErrorCode[status - 4000];
  return undefined;
}
