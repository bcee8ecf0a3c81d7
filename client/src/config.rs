//! Client settings: where the route API is, who we are, which transport, and the limits.

use std::time::Duration;

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

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            max_attempts: Some(20),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
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
    /// Our user id; must not be 0.
    pub user_id: u64,
    pub user_name: String,
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
            transport: Transport::Tcp,
            heartbeat: DEFAULT_HEARTBEAT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_frame: cim_proto::DEFAULT_MAX_FRAME,
            reconnect: ReconnectPolicy::default(),
        }
    }

    /// Refuses values the client cannot work with; the message names the field.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.user_id == 0 {
            return Err("user_id must not be 0".into());
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
        assert_eq!(config.transport, Transport::Tcp);
        assert_eq!(config.validate(), Ok(()));
    }

    #[test]
    fn invalid_values_are_named() {
        let mut config = ClientConfig::new("http://127.0.0.1:8080", 0, "alice");
        assert!(config.validate().unwrap_err().contains("user_id"));
        config.user_id = 1;
        config.heartbeat = Duration::ZERO;
        assert!(config.validate().unwrap_err().contains("heartbeat"));
    }
}
