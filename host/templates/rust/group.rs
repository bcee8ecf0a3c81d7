//! {{name}}: a cim group-send handler (world `group-send`, event `group`). The host calls
//! `handle` with the group messages queued at that moment and carries out one decision per
//! message. As written it delivers every message unchanged to everyone online but its sender.

wit_bindgen::generate!({ path: "wit", world: "group-send" });

use cim::im::types::{GroupDecision, Message, Recipients, SendDecision};
use exports::cim::im::group_handler::Guest;

struct Handler;

impl Guest for Handler {
    /// One decision per message, in the same order.
    fn handle(batch: Vec<Message>) -> Vec<GroupDecision> {
        // Work shared by the whole batch (reading a variable, parsing a list) goes here.
        batch.iter().map(decide).collect()
    }
}

/// What to do with the message (`Deliver`, `Rewrite(text)`, `Reject(reason)`: the reason goes
/// back to the sender) and who gets it (`AllOnlineExceptSender`, or `Only(ids)`).
fn decide(message: &Message) -> GroupDecision {
    // Your logic here, e.g. shout:
    // return GroupDecision {
    //     decision: SendDecision::Rewrite(message.text.to_uppercase()),
    //     recipients: Recipients::AllOnlineExceptSender,
    // };
    let _ = message;
    GroupDecision { decision: SendDecision::Deliver, recipients: Recipients::AllOnlineExceptSender }
}

export!(Handler);
