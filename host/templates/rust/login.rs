//! {{name}}: a cim login handler (world `login`, event `login`). The host calls `login` once per
//! login, after it has refused invalid ids and duplicate logins itself. As written it accepts
//! everyone.

wit_bindgen::generate!({ path: "wit", world: "login" });

use cim::im::types::{LoginDecision, LoginRequest};
use exports::cim::im::login_handler::Guest;

struct Handler;

impl Guest for Handler {
    /// `Accept`, or `Reject(reason)`: the client gets the reason and is disconnected.
    fn login(req: LoginRequest) -> LoginDecision {
        // Your logic here. `req.user` is the id and name, `req.claims` the verified token's
        // claims (`None` when the host verifies no tokens: refuse then if you authorize on
        // them), e.g.:
        // if req.user.id > 1000 {
        //     return LoginDecision::Reject(format!("user {} may not log in here", req.user.id));
        // }
        let _ = req;
        LoginDecision::Accept
    }
}

export!(Handler);
