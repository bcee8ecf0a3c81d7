//! {{name}}: a cim private-send handler (world `private-send`, event `private`). The host calls
//! `handle` with the private messages queued at that moment and carries out one decision per
//! message. As written it delivers every message unchanged.

wit_bindgen::generate!({ path: "wit", world: "private-send" });

use cim::im::types::{PrivateRequest, SendDecision};
use exports::cim::im::private_handler::Guest;

struct Handler;

impl Guest for Handler {
    /// One decision per message, in the same order.
    fn handle(batch: Vec<PrivateRequest>) -> Vec<SendDecision> {
        // Work shared by the whole batch (reading a variable, parsing a list) goes here.
        batch.iter().map(decide).collect()
    }
}

/// `Deliver`, `Rewrite(text)` (delivered with this text instead) or `Reject(reason)` (not
/// delivered; the reason goes back to the sender). The host has already checked that the
/// receiver `request.to` exists.
fn decide(request: &PrivateRequest) -> SendDecision {
    // Your logic here, e.g.:
    // if request.message.text.contains("spam") {
    //     return SendDecision::Reject("no spam, please".into());
    // }
    let _ = request;
    SendDecision::Deliver
}

export!(Handler);
