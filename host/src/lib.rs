//! # cim-host
//!
//! A cim node: it owns client connections and carries out what the handlers decide.
//!
//! # Layout
//! - [`config`]: node identity and every limit (frame size, connections, queues, timeouts).
//! - [`auth`]: user tokens (JWT) verified at LOGIN, the service API key, secrets;
//!   [`limits`]: rate limits per user and per address.
//! - [`transport`]: the TCP listener ([`transport::tcp`]) and the connection slots it
//!   shares with the WebSocket endpoint ([`http::ws`]); both start a [`session`].
//! - [`session`]: one connection — login handshake, reader loop with heartbeat/idle
//!   timeout, writer task draining a bounded queue.
//! - [`router`]: binds users to connections, keeps routes and presence in the [`store`],
//!   delivers messages; every business decision is asked of [`handlers`].
//! - [`handlers`]: the seam to business logic (login, private, group, online, callback).
//! - [`store`]: presence and key-value data ([`store::memory`] on one node,
//!   [`store::redis`] shared by a cluster).
//! - [`cluster`]: scale-out over Redis: the node registry and the cross-node message bus.
//! - [`http`]: the HTTP listener on axum: the route API ([`http::routes`]), `/ws`
//!   ([`http::ws`]), the admin API ([`http::admin`]), auth and JSON extractors.
//! - [`message_id`], [`metrics`]: server-assigned ids and counters.
//! - [`runtime`]: the wasmtime component runtime behind the handlers (per-request sandboxed
//!   instances, deadlines, memory caps, hot swap); [`manifest`]: spin.toml.
//! - [`deploy`]: pushed component versions, persisted in the data directory;
//!   [`http::admin`]: the admin HTTP API over it; [`push`]: its command-line client.
//! - [`build`]: `cim-host build`, running the manifest's component build commands;
//!   [`check`]: `cim-host check`, a push's verdict offline; [`wit`]: the WIT contract
//!   bundled into the binary (`cim-host wit`); [`scaffold`]: `cim-host new`, a handler
//!   project in Rust, Python or JavaScript from the templates in `host/templates/`.
//! - [`node`]: wiring: bind, run, drain on shutdown.

pub mod auth;
pub mod build;
pub mod check;
pub mod cluster;
pub mod config;
pub mod deploy;
pub mod handlers;
pub mod http;
pub mod limits;
pub mod manifest;
pub mod message_id;
pub mod metrics;
pub mod node;
pub mod push;
pub mod router;
pub mod runtime;
pub mod scaffold;
pub mod session;
pub mod store;
pub mod transport;
pub mod wit;

pub use config::Config;
pub use node::Node;
