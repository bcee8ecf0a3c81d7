//! Default message callback: keeps message history in key-value store `default`, newest first,
//! capped at [`HISTORY_LEN`] entries per list. A private message goes to the history of its
//! sender and of its receiver (`history:<user-id>`); a group message goes once to the group's
//! history (`history:group`) — written once whatever the size of the group, so a message to
//! 10,000 users costs one append, not 10,000. A user's history is their list merged with the
//! group's (`GET /history/<user-id>` does that).
//!
//! Each entry is one UTF-8 JSON object (the format is part of the contract, documented in
//! `wit/callback-handler.wit`):
//! `{"id":7,"timestamp_ms":1767225600000,"kind":"private","sender":{"id":1,"name":"alice"},"to":[2],"text":"hi"}`
//! where `to` is present for private messages only.

wit_bindgen::generate!({ path: "../../wit", world: "message-callback" });

use std::fmt::Write as _;

use cim::im::key_value::{self, Error};
use cim::im::log::{Level, log};
use cim::im::types::{Delivered, Message, MessageKind};
use exports::cim::im::callback_handler::Guest;

/// The store the histories live in; the component must be granted it in spin.toml.
const STORE: &str = "default";
/// How many entries each user's history keeps.
const HISTORY_LEN: u32 = 100;

struct MessageCallback;

impl Guest for MessageCallback {
    fn on_delivered(batch: Vec<Delivered>) {
        // The whole batch in one store call: one round trip instead of one per entry.
        let mut entries = Vec::new();
        for delivered in &batch {
            let entry = history_entry(&delivered.message, &delivered.recipients).into_bytes();
            entries.extend(history_keys(delivered).into_iter().map(|key| (key, entry.clone())));
        }
        match key_value::append_many(STORE, &entries, HISTORY_LEN) {
            Ok(()) => {}
            // Some message is too large to keep (nothing was written): keep the others.
            Err(Error::TooLarge(_)) => append_one_by_one(&batch),
            Err(Error::AccessDenied(e) | Error::StoreFailure(e)) => {
                log(Level::Error, &format!("history not written for {} message(s): {e}", batch.len()));
            }
        }
    }
}

/// The slow path, for a batch with a message too large to keep: each entry on its own, so
/// that only that message is left out of history.
fn append_one_by_one(batch: &[Delivered]) {
    for delivered in batch {
        let entry = history_entry(&delivered.message, &delivered.recipients);
        for key in history_keys(delivered) {
            match key_value::append(STORE, &key, entry.as_bytes(), HISTORY_LEN) {
                Ok(()) => {}
                // Same value for every owner: skip this message, keep the rest of the batch.
                Err(Error::TooLarge(e)) => {
                    log(Level::Warn, &format!("message {} not kept in history: {e}", delivered.message.id));
                    break;
                }
                // Every other call would fail the same way: give up on the batch.
                Err(Error::AccessDenied(e) | Error::StoreFailure(e)) => {
                    log(Level::Error, &format!("history not written for {} message(s): {e}", batch.len()));
                    return;
                }
            }
        }
    }
}

export!(MessageCallback);

/// The history lists that get this message: `history:group` for a group message; for a
/// private one, the sender's and each receiver's, once each.
fn history_keys(delivered: &Delivered) -> Vec<String> {
    if delivered.message.kind == MessageKind::Group {
        return vec!["history:group".to_owned()];
    }
    let mut owners = vec![delivered.message.sender.id];
    for &user in &delivered.recipients {
        if !owners.contains(&user) {
            owners.push(user);
        }
    }
    owners.into_iter().map(|u| format!("history:{u}")).collect()
}

/// The JSON history entry for a message (see the module docs).
fn history_entry(message: &Message, recipients: &[u64]) -> String {
    let kind = match message.kind {
        MessageKind::Private => "private",
        MessageKind::Group => "group",
    };
    let mut json = format!(
        r#"{{"id":{},"timestamp_ms":{},"kind":"{kind}","sender":{{"id":{},"name":"#,
        message.id, message.timestamp_ms, message.sender.id
    );
    push_json_string(&mut json, &message.sender.name);
    json.push('}');
    if matches!(message.kind, MessageKind::Private) {
        json.push_str(r#","to":["#);
        for (i, user) in recipients.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            let _ = write!(json, "{user}");
        }
        json.push(']');
    }
    json.push_str(r#","text":"#);
    push_json_string(&mut json, &message.text);
    json.push('}');
    json
}

/// Appends `s` as a JSON string literal (RFC 8259 escaping; non-ASCII stays UTF-8).
fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim::im::types::User;

    fn message(kind: MessageKind, text: &str) -> Message {
        Message {
            id: 7,
            sender: User { id: 1, name: "al\"ice".into() },
            kind,
            text: text.into(),
            timestamp_ms: 1_767_225_600_000,
        }
    }

    #[test]
    fn private_entry_names_the_receiver() {
        assert_eq!(
            history_entry(&message(MessageKind::Private, "hi"), &[2]),
            r#"{"id":7,"timestamp_ms":1767225600000,"kind":"private","sender":{"id":1,"name":"al\"ice"},"to":[2],"text":"hi"}"#
        );
    }

    #[test]
    fn group_entry_has_no_recipients() {
        assert_eq!(
            history_entry(&message(MessageKind::Group, "a\\b\n\u{1}é"), &[2, 3]),
            r#"{"id":7,"timestamp_ms":1767225600000,"kind":"group","sender":{"id":1,"name":"al\"ice"},"text":"a\\b\n\u0001é"}"#
        );
    }

    #[test]
    fn private_goes_to_sender_and_receivers_once_group_to_the_group() {
        let private = Delivered { message: message(MessageKind::Private, "x"), recipients: vec![3, 1, 3] };
        assert_eq!(history_keys(&private), ["history:1", "history:3"]);
        let group = Delivered { message: message(MessageKind::Group, "x"), recipients: vec![3, 1, 2] };
        assert_eq!(history_keys(&group), ["history:group"]);
    }
}
