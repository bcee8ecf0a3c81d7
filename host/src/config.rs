//! Node configuration: identity and every limit the host enforces.

use std::sync::Arc;
use std::time::Duration;

use crate::auth::Auth;
use crate::limits::RateLimits;

/// Everything a node needs to know besides its listeners.
#[derive(Debug, Clone)]
pub struct Config {
    /// This node's id in routes and the node registry; unique within a cluster.
    pub node_id: String,
    /// Clients should PING this often when idle; a connection silent for
    /// [`Config::idle_timeout`] (three intervals) is closed.
    pub heartbeat: Duration,
    /// A new connection must send LOGIN within this time.
    pub login_timeout: Duration,
    /// Hard limit on one encoded frame, TCP or WebSocket.
    pub max_frame: usize,
    /// Maximum simultaneous client connections (TCP + WebSocket).
    pub max_connections: usize,
    /// Frames queued for one client before it counts as a slow consumer and is disconnected.
    pub outbound_queue: usize,
    /// Bytes queued for one client before it counts as a slow consumer (a single larger frame
    /// still fits an empty queue).
    pub outbound_queue_bytes: usize,
    /// A write to a client that makes no progress for this long closes the connection (the
    /// client stopped reading).
    pub write_timeout: Duration,
    /// Longest message text accepted, in bytes.
    pub max_text: usize,
    /// Longest user name accepted, in bytes.
    pub max_name: usize,
    /// Largest JSON body the route API reads.
    pub max_http_body: usize,
    /// How long shutdown waits for sessions to close.
    pub drain_timeout: Duration,
    /// `HOST:PORT` clients are told to connect to over TCP; `None`: the bound address.
    pub advertise_tcp: Option<String>,
    /// `HOST:PORT` of the HTTP listener as others reach it; `None`: the bound address.
    pub advertise_http: Option<String>,
    /// User tokens and the service API key; the default is development mode (none).
    pub auth: Auth,
    /// Rate limits on sends, online requests and logins, per user and per address.
    pub rate_limits: Arc<RateLimits>,
    /// Limits and browser rules of the HTTP listener(s).
    pub http: HttpConfig,
    /// A private message to a user who is not connected is stored and delivered at their
    /// next login; `false` refuses it (`USER_OFFLINE`), as CIM does.
    pub offline_messages: bool,
    /// What a LOGIN of a user who is already online does without a resume token.
    pub duplicate_login: DuplicateLogin,
}

/// `--offline-messages`: store a private message for a receiver who is not connected, or
/// refuse it (see [`Config::offline_messages`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OfflineMessages {
    Store,
    Refuse,
}

/// What a second login of an online user does (one with the session's resume token always
/// takes it over).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DuplicateLogin {
    /// Refused with `DUPLICATE_LOGIN`: the first session keeps the user.
    #[default]
    Refuse,
    /// With a verified user token, the new login takes over and the old session is kicked
    /// (`REPLACED`). Without tokens (development mode) it is refused, as anyone could.
    Replace,
}

/// The HTTP listener's limits, timeouts and browser rules.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Most simultaneous HTTP connections (WebSocket sessions included until they upgrade
    /// into a client connection slot); one more is closed at once, TCP chat is unaffected.
    pub max_connections: usize,
    /// A client must finish sending its request headers within this time.
    pub header_timeout: Duration,
    /// A client must finish sending its request body within this time, however it trickles.
    pub body_timeout: Duration,
    /// Origins a browser page may open `/ws` from; empty: only the page's own origin
    /// (`http(s)://<Host header>`). Requests without `Origin` are not browsers and pass.
    pub allowed_origins: Vec<String>,
    /// `GET /metrics` needs the API key too.
    pub metrics_require_key: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            metrics_require_key: false,
        }
    }
}

impl Config {
    pub fn idle_timeout(&self) -> Duration {
        self.heartbeat * 3
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: format!("node-{}", std::process::id()),
            heartbeat: Duration::from_secs(60),
            login_timeout: Duration::from_secs(10),
            max_frame: cim_proto::DEFAULT_MAX_FRAME,
            max_connections: 15_000,
            outbound_queue: 1024,
            outbound_queue_bytes: 1024 * 1024,
            write_timeout: Duration::from_secs(10),
            max_text: 16 * 1024,
            max_name: 64,
            max_http_body: 64 * 1024,
            drain_timeout: Duration::from_secs(5),
            advertise_tcp: None,
            advertise_http: None,
            auth: Auth::default(),
            rate_limits: Arc::new(RateLimits::default()),
            http: HttpConfig::default(),
            offline_messages: true,
            duplicate_login: DuplicateLogin::Refuse,
        }
    }
}
