//! User tokens: [`TokenProvider`] (where the client gets a fresh token), reading the claims
//! of a JWT without verifying it (the server verifies), and when to refresh.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// What a provider may fail with; the client reports it as [`ClientError::Token`].
///
/// [`ClientError::Token`]: crate::ClientError::Token
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The future a [`TokenProvider`] returns.
pub type TokenFuture<'a> = Pin<Box<dyn Future<Output = Result<String, BoxError>> + Send + 'a>>;

/// Where the client gets a token: asked before every login (first login and each reconnect)
/// and before every refresh, so it should return a token that is valid now.
///
/// A fixed token is [`StaticToken`]; a closure returning a future is [`token_fn`].
pub trait TokenProvider: Send + Sync + 'static {
    fn token(&self) -> TokenFuture<'_>;
}

impl fmt::Debug for dyn TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn TokenProvider")
    }
}

/// The same token every time (it cannot be refreshed: once it expires, the server ends
/// the connection and reconnecting fails).
#[derive(Clone)]
pub struct StaticToken(pub String);

impl fmt::Debug for StaticToken {
    /// Never prints the token itself.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StaticToken(..)")
    }
}

impl TokenProvider for StaticToken {
    fn token(&self) -> TokenFuture<'_> {
        let token = self.0.clone();
        Box::pin(async move { Ok(token) })
    }
}

/// A provider that calls `f` for each token.
///
/// ```
/// # use cim_client::token::{token_fn, BoxError};
/// let provider = token_fn(|| async { Ok::<_, BoxError>(std::env::var("CIM_TOKEN")?) });
/// ```
pub fn token_fn<F, Fut>(f: F) -> FnToken<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
{
    FnToken(f)
}

/// See [`token_fn`].
pub struct FnToken<F>(F);

impl<F> fmt::Debug for FnToken<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FnToken(..)")
    }
}

impl<F, Fut> TokenProvider for FnToken<F>
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
{
    fn token(&self) -> TokenFuture<'_> {
        Box::pin((self.0)())
    }
}

/// The claims the client reads from a token, unverified: only hints (who to ask the route
/// API for, when to refresh). The server decides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Claims {
    /// `sub` when it is a user id.
    pub(crate) user_id: Option<u64>,
    pub(crate) name: Option<String>,
    /// `exp`, in milliseconds since the Unix epoch.
    pub(crate) expires_at_ms: Option<u64>,
}

impl Claims {
    /// Reads the payload of a JWT (`header.payload.signature`); anything else (an opaque
    /// token) gives no claims.
    pub(crate) fn peek(token: &str) -> Claims {
        let mut parts = token.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Claims::default();
        };
        let Ok(json) = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')) else {
            return Claims::default();
        };
        let Ok(serde_json::Value::Object(claims)) = serde_json::from_slice(&json) else {
            return Claims::default();
        };
        let user_id = match claims.get("sub") {
            Some(serde_json::Value::String(s)) => s.parse().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        };
        let name = claims.get("name").and_then(|n| n.as_str()).map(str::to_owned);
        // NumericDate may carry a fraction; seconds are plenty here.
        let expires_at_ms = claims
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .filter(|s| *s > 0.0)
            .map(|s| (s * 1000.0) as u64);
        Claims { user_id: user_id.filter(|id| *id != 0), name, expires_at_ms }
    }
}

/// Refresh at this fraction of the remaining lifetime...
const REFRESH_AT_PERCENT: u32 = 80;
/// ...but at least this long before the token expires.
pub(crate) const REFRESH_MARGIN: Duration = Duration::from_secs(5);

/// How long to wait before refreshing a token that expires at `expires_at_ms`.
pub(crate) fn refresh_delay(expires_at_ms: u64, now: SystemTime) -> Duration {
    let now_ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
    let remaining = Duration::from_millis(
        u64::try_from(u128::from(expires_at_ms).saturating_sub(now_ms)).unwrap_or(u64::MAX),
    );
    (remaining * REFRESH_AT_PERCENT / 100).min(remaining.saturating_sub(REFRESH_MARGIN))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unsigned JWT with `claims` as its payload (the client never checks signatures).
    pub(crate) fn jwt(claims: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.c2lnbmF0dXJl")
    }

    /// A token for `user_id` that expires `ttl` after the wall-clock now.
    pub(crate) fn jwt_for(user_id: u64, name: &str, ttl: Duration) -> String {
        let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + ttl;
        jwt(serde_json::json!({"sub": user_id.to_string(), "name": name, "exp": exp.as_secs()}))
    }

    #[test]
    fn claims_are_read_from_the_payload() {
        let claims =
            Claims::peek(&jwt(serde_json::json!({"sub": "42", "name": "alice", "exp": 1_700_000_000})));
        assert_eq!(
            claims,
            Claims { user_id: Some(42), name: Some("alice".into()), expires_at_ms: Some(1_700_000_000_000) }
        );
        let claims = Claims::peek(&jwt(serde_json::json!({"sub": "alice@example.com", "exp": 1.5})));
        assert_eq!(claims, Claims { user_id: None, name: None, expires_at_ms: Some(1500) });
    }

    #[test]
    fn opaque_tokens_have_no_claims() {
        for token in
            ["", "opaque", "a.b", "a.!!!.c", "a.b.c.d", &format!("x.{}.y", URL_SAFE_NO_PAD.encode("[1]"))]
        {
            assert_eq!(Claims::peek(token), Claims::default(), "{token}");
        }
    }

    #[test]
    fn refresh_comes_at_80_percent_and_at_least_5_s_before_expiry() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let at = |secs: u64| 1_000_000 + secs * 1000;
        assert_eq!(refresh_delay(at(3600), now), Duration::from_secs(2880));
        assert_eq!(refresh_delay(at(20), now), Duration::from_secs(15));
        assert_eq!(refresh_delay(at(3), now), Duration::ZERO);
        assert_eq!(refresh_delay(500_000, now), Duration::ZERO, "already expired");
    }

    #[tokio::test]
    async fn providers_give_their_token() {
        assert_eq!(StaticToken("t".into()).token().await.unwrap(), "t");
        let provider: Box<dyn TokenProvider> = Box::new(token_fn(|| async { Ok("fresh".to_owned()) }));
        assert_eq!(provider.token().await.unwrap(), "fresh");
        assert_eq!(format!("{:?}", StaticToken("secret".into())), "StaticToken(..)");
    }
}
