//! Default login handler: accepts everyone. The host has already refused invalid ids and
//! duplicate logins, so there is nothing left to check.

wit_bindgen::generate!({ path: "../../wit", world: "login" });

use cim::im::types::{LoginDecision, LoginRequest};
use exports::cim::im::login_handler::Guest;

struct Login;

impl Guest for Login {
    fn login(_req: LoginRequest) -> LoginDecision {
        LoginDecision::Accept
    }
}

export!(Login);
