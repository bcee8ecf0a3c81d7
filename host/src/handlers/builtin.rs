//! The built-in decisions: CIM's default behaviour, identical to the default components.

use cim_proto::User;

use super::{
    Context, Delivered, GroupDecision, LoginDecision, LoginRequest, Message, PrivateRequest, Recipients,
    SendDecision,
};
use crate::store::Quota;
use crate::store::StoreError;

/// Key-value store the history lives in, and how many entries each user keeps.
pub const HISTORY_STORE: &str = "default";
pub const HISTORY_LEN: usize = 100;

/// The history key of one user (their private messages).
pub fn history_key(user_id: u64) -> String {
    format!("history:{user_id}")
}

/// The history key of the group: each group message is written once, here.
pub const GROUP_HISTORY_KEY: &str = "history:group";

pub fn login(_req: &LoginRequest) -> LoginDecision {
    LoginDecision::Accept
}

pub fn private(_req: &PrivateRequest) -> SendDecision {
    SendDecision::Deliver
}

pub fn group(_msg: &Message) -> GroupDecision {
    GroupDecision { decision: SendDecision::Deliver, recipients: Recipients::AllOnlineExceptSender }
}

pub fn online(_caller: &User, online: Vec<User>) -> Vec<User> {
    online
}

/// One history entry as stored, the same JSON the default message-callback component
/// writes; lists are newest first. `to` is only set for private messages.
pub fn history_entry(msg: &Message, recipients: &[u64]) -> Vec<u8> {
    let mut entry = serde_json::json!({
        "id": msg.id,
        "timestamp_ms": msg.timestamp_ms,
        "kind": msg.kind.as_str(),
        "sender": { "id": msg.sender.id, "name": msg.sender.name },
        "text": msg.text,
    });
    if msg.kind == cim_proto::MessageKind::Private {
        entry["to"] = serde_json::json!(recipients);
    }
    entry.to_string().into_bytes()
}

/// Keeps history as the default message-callback component does: a private message in the
/// history of its sender and of each receiver, a group message once in the group's history;
/// the whole batch in one store call.
pub async fn callback(ctx: &Context, batch: &[Delivered]) -> Result<(), StoreError> {
    let mut entries = Vec::new();
    for d in batch {
        let entry = history_entry(&d.message, &d.recipients);
        if d.message.kind == cim_proto::MessageKind::Group {
            entries.push((GROUP_HISTORY_KEY.to_owned(), entry));
            continue;
        }
        let mut owners = vec![d.message.sender.id];
        for &user in &d.recipients {
            if !owners.contains(&user) {
                owners.push(user);
            }
        }
        entries.extend(owners.into_iter().map(|user| (history_key(user), entry.clone())));
    }
    ctx.store().kv_append_many(HISTORY_STORE, entries, HISTORY_LEN, Quota::NONE).await
}
