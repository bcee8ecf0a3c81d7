//! The receiving side of the SDK: [`MessageHandler`] (CIM's message callback) and [`ClientEvent`].

use cim_proto::{Delivery, ErrorCode};

/// What happened to the connection, reported through [`MessageHandler::on_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The connection was lost; the client waits, then tries to log in again.
    /// `attempt` counts from 1 for each disconnect.
    Reconnecting { attempt: u32, reason: String },
    /// The client is logged in again, possibly on another node.
    Reconnected { node_id: String },
    /// The server closed the connection with a KICK; the client does not reconnect.
    /// (A KICK with code `Unavailable`, sent by a node that shuts down, is not final: the
    /// client reconnects and reports [`ClientEvent::Reconnecting`] instead.)
    Kicked { code: ErrorCode, reason: String },
    /// The connection is gone for good (reconnecting failed or was not allowed).
    Disconnected { reason: String },
}

/// Receives every message delivered to this user, and the connection events.
///
/// Called from the connection task: keep the methods quick (hand heavy work to a channel),
/// since no further frame is read until they return.
pub trait MessageHandler: Send + Sync + 'static {
    fn on_delivery(&self, delivery: &Delivery);

    fn on_event(&self, event: &ClientEvent) {
        let _ = event;
    }
}

impl std::fmt::Debug for dyn MessageHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn MessageHandler")
    }
}
