// Reading a JWT's expiry, without verifying it (the server verifies): to schedule a refresh.

/** The token's `exp` in Unix milliseconds, or 0 when it has none or is not a JWT. */
export function tokenExpiryMs(token: string): number {
  const payload = token.split(".")[1];
  if (!payload) return 0;
  try {
    const b64 = payload.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(payload.length / 4) * 4, "=");
    const claims = JSON.parse(atob(b64)) as { exp?: unknown };
    return typeof claims.exp === "number" ? claims.exp * 1000 : 0;
  } catch {
    return 0;
  }
}
