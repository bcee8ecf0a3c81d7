//! The receiving side of the SDK: [`MessageHandler`] (CIM's message callback) and [`ClientEvent`].

use cim_proto::{Delivery, ErrorCode, MessageKind};

/// What happened to the connection, reported through [`MessageHandler::on_event`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// The connection was lost; the client waits, then tries to log in again.
    /// `attempt` counts from 1 for each disconnect.
    Reconnecting { attempt: u32, reason: String },
    /// The client is logged in again, possibly on another node.
    Reconnected { node_id: String },
    /// The server closed the connection with a KICK; the client does not reconnect.
    /// (A KICK with code `ShuttingDown`, `IdleTimeout` or `TokenExpired` is not final: the
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
    /// A message, once: a delivery whose message was delivered before (replayed after a
    /// reconnect) is dropped by the client. `delivery.replayed` marks messages sent while
    /// this user was away.
    fn on_delivery(&self, delivery: &Delivery);

    /// Messages of `kind`'s stream fell out of the server's retention while this user was
    /// away: they will not be replayed (their history shows what is left).
    fn on_missed(&self, kind: MessageKind) {
        let _ = kind;
    }

    fn on_event(&self, event: &ClientEvent) {
        let _ = event;
    }
}

impl std::fmt::Debug for dyn MessageHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("dyn MessageHandler")
    }
}
