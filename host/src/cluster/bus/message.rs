//! What crosses the bus: [`ClusterMessage`]s as JSON, deliveries as [`BusDelivery`].

use cim_proto::{Delivery, MessageKind, User};
use serde::{Deserialize, Serialize};

/// What one node asks of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClusterMessage {
    /// Deliver `delivery` to `recipients`, who are connected to the receiving node.
    Deliver { recipients: Vec<u64>, delivery: BusDelivery },
    /// Close the user's connection on the receiving node: connection `conn_id` only when
    /// given (a take-over kicks the session it replaced, never the new one).
    Kick {
        user_id: u64,
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn_id: Option<u64>,
        /// `true`: the session was taken over (KICK code REPLACED).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        replaced: bool,
    },
    /// The component `name` now has the code with this hash; reload it.
    ComponentChanged { name: String, sha256: String },
    /// Users whose presence changed on the sending node (bound or released there), by id
    /// and name; `resync`: entries were removed there without a list (subscribers must ask
    /// for the whole list again).
    Presence {
        users: Vec<(u64, String)>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resync: bool,
    },
    /// Several messages for one node in one publish (sent under load); a [`Subscription`]
    /// hands them out one by one, in order.
    Batch { messages: Vec<ClusterMessage> },
}

/// A [`Delivery`] as it crosses the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusDelivery {
    pub message_id: u64,
    pub sender_id: u64,
    pub sender_name: String,
    #[serde(with = "kind_name")]
    pub kind: MessageKind,
    pub text: String,
    pub timestamp_ms: u64,
    /// Its position in the recipient's inbox (private) or the group stream.
    #[serde(default)]
    pub position: u64,
    /// The position written before it in that stream (0: none, or sent by a node that
    /// predates it): a receiving node that has not sent its sessions that one yet reads it
    /// from the log first.
    #[serde(default)]
    pub prev: u64,
    /// When the sending node accepted the message, in Unix microseconds (0: sent by a node
    /// that predates it); where the delivery latency starts.
    #[serde(default)]
    pub accepted_us: u64,
}

impl BusDelivery {
    /// `d`, whose entry follows `prev` in its stream, of a message accepted at `accepted_us`.
    pub fn new(d: &Delivery, prev: u64, accepted_us: u64) -> Self {
        BusDelivery {
            message_id: d.message_id,
            sender_id: d.sender.id,
            sender_name: d.sender.name.clone(),
            kind: d.kind,
            text: d.text.clone(),
            timestamp_ms: d.timestamp_ms,
            position: d.position,
            prev,
            accepted_us,
        }
    }
}

impl From<BusDelivery> for Delivery {
    fn from(d: BusDelivery) -> Self {
        Delivery {
            message_id: d.message_id,
            sender: User { id: d.sender_id, name: d.sender_name },
            kind: d.kind,
            text: d.text,
            timestamp_ms: d.timestamp_ms,
            position: d.position,
            replayed: false,
        }
    }
}

/// [`MessageKind`] as `"private"` / `"group"`.
mod kind_name {
    use cim_proto::MessageKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &MessageKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MessageKind, D::Error> {
        match String::deserialize(d)?.as_str() {
            "private" => Ok(MessageKind::Private),
            "group" => Ok(MessageKind::Group),
            other => Err(serde::de::Error::unknown_variant(other, &["private", "group"])),
        }
    }
}

/// A received message with its batches opened, in order.
pub(super) fn unbatch(msg: ClusterMessage, out: &mut Vec<ClusterMessage>) {
    match msg {
        ClusterMessage::Batch { messages } => messages.into_iter().for_each(|m| unbatch(m, out)),
        other => out.push(other),
    }
}
