//! Default online-list handler: every caller sees the whole online list.

wit_bindgen::generate!({ path: "../../wit", world: "online-list" });

use cim::im::types::User;
use exports::cim::im::online_handler::Guest;

struct OnlineList;

impl Guest for OnlineList {
    fn visible(_caller: User, online: Vec<User>) -> Vec<User> {
        online
    }
}

export!(OnlineList);
