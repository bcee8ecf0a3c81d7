//! Client settings: where the route API is, who we are, which transport, and the limits.

use std::sync::Arc;
use std::time::Duration;

use crate::token::{StaticToken, TokenProvider};

/// Which connection the client opens to the node the route API picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Length-delimited protobuf frames on TCP (`tcp_addr` from the route answer).
    #[default]
    Tcp,
    /// One protobuf envelope per binary WebSocket message (`ws_url` from the route answer).
    WebSocket,
}

/// When and how often the client reconnects after an unrequested disconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Give up after this many failed attempts in a row (`Some(0)`: never reconnect);
    /// `None`: keep trying forever.
    pub max_attempts: Option<u32>,
    /// Delay before the first attempt; doubles with each failed attempt.
    pub initial_delay: Duration,
    /// Upper bound of the delay between two attempts.
    pub max_delay: Duration,
}

/// The default reconnect budget has to outlast the server's idle timeout (three heartbeat
/// intervals, 180 s with the default 60 s): a connection that died silently keeps the user
/// "online" on the server until then, and logins are refused as duplicates meanwhile.
impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            max_attempts: Some(DEFAULT_RECONNECT_ATTEMPTS),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

/// Attempts of the default policy: with its delays (100 ms doubling to 10 s, each drawn
/// from the upper half), at least 221 s and at most 443 s of waiting in all.
pub const DEFAULT_RECONNECT_ATTEMPTS: u32 = 50;

impl ReconnectPolicy {
    /// The least total time the delays before all `max_attempts` attempts add up to (the
    /// jitter never goes below half of each delay); `None` when it never gives up.
    pub fn min_budget(&self) -> Option<Duration> {
        let attempts = self.max_attempts?;
        let mut total = Duration::ZERO;
        let mut ceiling = self.initial_delay.min(self.max_delay);
        for _ in 0..attempts {
            total = total.saturating_add(ceiling / 2);
            ceiling = ceiling.saturating_mul(2).min(self.max_delay);
        }
        Some(total)
    }
}

/// Default interval of the client heartbeat (PING when nothing was sent for that long).
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);
/// Default deadline for one request (route login, connect, LOGIN, a send, the online list).
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything [`Client::login`](crate::Client::login) needs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Base URL of the route API, `http://host:port` (only plain `http://` is supported).
    /// Several may be given, comma-separated: (re)connecting tries them in order until one
    /// answers, so clients survive the loss of the node they logged in through.
    pub route: String,
    /// Our user id; 0 lets the token decide (its `sub`), which needs a [`token`](Self::token).
    /// With a token, a non-zero id must be the token's `sub`.
    pub user_id: u64,
    /// Our display name; with a token whose `name` claim is set, the server uses that one.
    pub user_name: String,
    /// Where user tokens come from, when the server verifies them. The client asks it before
    /// each login and each refresh, sends the token as `Authorization: Bearer` to the route
    /// API and in LOGIN, and refreshes on its own before the token expires.
    pub token: Option<Arc<dyn TokenProvider>>,
    pub transport: Transport,
    /// Send a PING when nothing was sent for this long; the connection is considered dead
    /// when nothing was received for three times this long. If the server asks for a
    /// shorter interval in its LOGIN_ACK, the shorter one is used. Must not be zero.
    pub heartbeat: Duration,
    /// Deadline for each request, and for each step of a login (route, connect, LOGIN).
    pub request_timeout: Duration,
    /// Largest frame the client sends or accepts, in bytes.
    pub max_frame: usize,
    pub reconnect: ReconnectPolicy,
}

impl ClientConfig {
    /// A configuration with the defaults: TCP, 60 s heartbeat, 10 s request timeout,
    /// the protocol's default maximum frame size, and the default reconnect policy.
    pub fn new(route: impl Into<String>, user_id: u64, user_name: impl Into<String>) -> Self {
        ClientConfig {
            route: route.into(),
            user_id,
            user_name: user_name.into(),
            token: None,
            transport: Transport::Tcp,
            heartbeat: DEFAULT_HEARTBEAT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_frame: cim_proto::DEFAULT_MAX_FRAME,
            reconnect: ReconnectPolicy::default(),
        }
    }

    /// Logs in with tokens from `provider` (see [`ClientConfig::token`]).
    #[must_use]
    pub fn with_token_provider(mut self, provider: Arc<dyn TokenProvider>) -> Self {
        self.token = Some(provider);
        self
    }

    /// Logs in with this one token (it cannot be refreshed; see [`StaticToken`]).
    #[must_use]
    pub fn with_token(self, token: impl Into<String>) -> Self {
        self.with_token_provider(Arc::new(StaticToken(token.into())))
    }

    /// Refuses values the client cannot work with; the message names the field.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.user_id == 0 && self.token.is_none() {
            return Err("user_id must not be 0 (unless a token says who the user is)".into());
        }
        if self.heartbeat.is_zero() {
            return Err("heartbeat must not be zero".into());
        }
        if self.request_timeout.is_zero() {
            return Err("request_timeout must not be zero".into());
        }
        if self.max_frame == 0 {
            return Err("max_frame must not be zero".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let config = ClientConfig::new("http://127.0.0.1:8080", 1, "alice");
        assert_eq!(config.heartbeat, Duration::from_secs(60));
        // Longer than the server's idle timeout (3 heartbeats), so that a client whose
        // connection died silently is still trying when the server lets its user go.
        let budget = config.reconnect.min_budget().unwrap();
        assert!(budget > 3 * DEFAULT_HEARTBEAT, "{budget:?}");
        assert_eq!(budget.as_secs(), 221);
        assert_eq!(config.transport, Transport::Tcp);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn invalid_values_are_named() {
        let mut config = ClientConfig::new("http://127.0.0.1:8080", 0, "alice");
        assert!(config.validate().unwrap_err().contains("user_id"));
        assert_eq!(config.clone().with_token("t").validate(), Ok(()), "the token decides the user");
        config.user_id = 1;
        config.heartbeat = Duration::ZERO;
        assert!(config.validate().unwrap_err().contains("heartbeat"));
    }
}
