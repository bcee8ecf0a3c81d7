//! {{name}}: a cim message callback (world `message-callback`, event `callback`). The host calls
//! `on_delivered` after messages were delivered, off the sender's path: a failure here never
//! affects delivery. As written it does nothing.

wit_bindgen::generate!({ path: "wit", world: "message-callback" });

use cim::im::types::Delivered;
use exports::cim::im::callback_handler::Guest;

struct Handler;

impl Guest for Handler {
    /// Each item is a delivered message and the ids it went to. Side effects go through the
    /// key-value store (`cim::im::key_value`, a store granted in spin.toml).
    fn on_delivered(batch: Vec<Delivered>) {
        // Your logic here, e.g. count messages per sender with key_value::get/set, or keep
        // history with one key_value::append_many per batch.
        let _ = batch;
    }
}

export!(Handler);
