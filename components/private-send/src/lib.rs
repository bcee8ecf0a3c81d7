//! Default private-send handler: delivers every message unchanged. The host has already checked
//! that the receiver is online.

wit_bindgen::generate!({ path: "../../wit", world: "private-send" });

use cim::im::types::{PrivateRequest, SendDecision};
use exports::cim::im::private_handler::Guest;

struct PrivateSend;

impl Guest for PrivateSend {
    fn handle(batch: Vec<PrivateRequest>) -> Vec<SendDecision> {
        batch.iter().map(|_| SendDecision::Deliver).collect()
    }
}

export!(PrivateSend);
