//! # cim-client
//!
//! The client SDK of cim and the `cim` terminal client (`src/bin/cim.rs`).
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use cim_client::{Client, ClientConfig, Delivery, MessageHandler};
//! struct Print;
//! impl MessageHandler for Print {
//!     fn on_delivery(&self, d: &Delivery) {
//!         println!("{}({}): {}", d.sender.name, d.sender.id, d.text);
//!     }
//! }
//! # async fn demo() -> Result<(), cim_client::ClientError> {
//! let config = ClientConfig::new("http://127.0.0.1:8080", 1, "alice");
//! // On a server that verifies user tokens, the token says who we are:
//! // ClientConfig::new(route, 0, "").with_token_provider(Arc::new(token_fn(|| async { .. })))
//! let client = Client::login(config, Arc::new(Print)).await?;
//! client.send_private(2, "hi bob").await?;
//! client.send_group("hi all").await?;
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`client`]: [`Client`], the public handle (login, send with a client_msg_id and resend
//!   after a reconnect, online list, history, close).
//! - `supervisor`: the connection task — establish (route login, connect, LOGIN), serve,
//!   reconnect with backoff after an unrequested disconnect.
//! - `connection`: one connection — the LOGIN handshake, then the writer (requests from a
//!   bounded queue, heartbeat PINGs) and the reader (answers, deliveries, KICK).
//! - `delivery`: what the client keeps across connections — positions received and
//!   acknowledged (batched ACKs, a one-tick lag; LOGIN resumes from them), the resume token,
//!   and recent message ids (each message reaches the handler once).
//! - [`history`]: `GET /history/<id>` on the route API, and merging the two streams.
//! - `pending`: request ids and the map of requests waiting for their answer.
//! - `transport`: TCP (length-delimited frames) or WebSocket (one envelope per binary
//!   message), both seen as a sink and a stream of frames.
//! - [`route`]: `POST /login` on the route API with a minimal HTTP/1 client.
//! - `backoff`: the reconnect schedule (exponential, capped, with jitter).
//! - [`config`], [`error`], [`handler`]: settings, [`ClientError`], [`MessageHandler`]
//!   and [`ClientEvent`].
//! - [`input`]: what a line typed into the terminal client means.
//! - [`token`]: [`TokenProvider`] (a fresh user token for each login and refresh), reading a
//!   token's claims unverified, and when to refresh.

mod backoff;
pub mod client;
pub mod config;
mod connection;
mod delivery;
pub mod error;
pub mod handler;
pub mod history;
pub mod input;
mod pending;
pub mod route;
mod supervisor;
pub mod token;
mod transport;

#[cfg(test)]
mod test_support;

pub use cim_proto::{Delivery, ErrorCode, MessageKind, User};
pub use client::{Client, Sent};
pub use config::{ClientConfig, ReconnectPolicy, Transport};
pub use error::ClientError;
pub use handler::{ClientEvent, MessageHandler};
pub use history::{History, HistoryMessage, HistoryStream};
pub use route::RouteInfo;
pub use token::{StaticToken, TokenProvider, token_fn};
