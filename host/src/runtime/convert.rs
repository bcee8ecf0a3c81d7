//! Conversions between the host's handler types ([`crate::handlers`]) and the generated WIT
//! types (`cim:im/types`), which mirror each other field for field.

use cim_proto::{MessageKind, User};

use super::bindings::host_api::cim::im::types as wit;
use crate::handlers::{
    Delivered, GroupDecision, LoginDecision, LoginRequest, Message, PrivateRequest, Recipients, SendDecision,
};

pub(crate) fn user(u: User) -> wit::User {
    wit::User { id: u.id, name: u.name }
}

pub(crate) fn message(m: Message) -> wit::Message {
    wit::Message {
        id: m.id,
        sender: user(m.sender),
        kind: match m.kind {
            MessageKind::Private => wit::MessageKind::Private,
            MessageKind::Group => wit::MessageKind::Group,
        },
        text: m.text,
        timestamp_ms: m.timestamp_ms,
    }
}

pub(crate) fn login_request(r: LoginRequest) -> wit::LoginRequest {
    wit::LoginRequest {
        user: user(r.user),
        node_id: r.node_id,
        claims: r.claims.map(|c| wit::TokenClaims {
            subject: c.user_id.to_string(),
            expires_at_ms: c.expires_at_ms,
            issuer: c.issuer,
            json: c.claims_json,
        }),
    }
}

pub(crate) fn private_request(r: PrivateRequest) -> wit::PrivateRequest {
    wit::PrivateRequest { message: message(r.message), to: r.to }
}

pub(crate) fn delivered(d: Delivered) -> wit::Delivered {
    wit::Delivered { message: message(d.message), recipients: d.recipients }
}

pub(crate) fn login_decision(d: wit::LoginDecision) -> LoginDecision {
    match d {
        wit::LoginDecision::Accept => LoginDecision::Accept,
        wit::LoginDecision::Reject(reason) => LoginDecision::Reject(reason),
    }
}

pub(crate) fn send_decision(d: wit::SendDecision) -> SendDecision {
    match d {
        wit::SendDecision::Deliver => SendDecision::Deliver,
        wit::SendDecision::Rewrite(text) => SendDecision::Rewrite(text),
        wit::SendDecision::Reject(reason) => SendDecision::Reject(reason),
    }
}

pub(crate) fn group_decision(d: wit::GroupDecision) -> GroupDecision {
    GroupDecision {
        decision: send_decision(d.decision),
        recipients: match d.recipients {
            wit::Recipients::AllOnlineExceptSender => Recipients::AllOnlineExceptSender,
            wit::Recipients::Only(ids) => Recipients::Only(ids),
        },
    }
}
