//! Default group-send handler: delivers every message unchanged to every online user but the
//! sender.

wit_bindgen::generate!({ path: "../../wit", world: "group-send" });

use cim::im::types::{GroupDecision, Message, Recipients, SendDecision};
use exports::cim::im::group_handler::Guest;

struct GroupSend;

impl Guest for GroupSend {
    fn handle(batch: Vec<Message>) -> Vec<GroupDecision> {
        batch
            .iter()
            .map(|_| GroupDecision {
                decision: SendDecision::Deliver,
                recipients: Recipients::AllOnlineExceptSender,
            })
            .collect()
    }
}

export!(GroupSend);
