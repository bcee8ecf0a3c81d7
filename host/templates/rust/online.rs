//! {{name}}: a cim online-list handler (world `online-list`, event `online`). The host calls
//! `visible` when a user asks who is online. As written everyone sees everyone.

wit_bindgen::generate!({ path: "wit", world: "online-list" });

use cim::im::types::User;
use exports::cim::im::online_handler::Guest;

struct Handler;

impl Guest for Handler {
    /// The users `caller` may see, out of `online`.
    fn visible(caller: User, online: Vec<User>) -> Vec<User> {
        // Your logic here, e.g. hide the caller from their own list:
        // return online.into_iter().filter(|u| u.id != caller.id).collect();
        let _ = caller;
        online
    }
}

export!(Handler);
