//! Example login handler: only the user ids listed in the component variable `allowed_ids`
//! (comma-separated, `allowed_ids = "1, 2, 42"`) may log in. Fails closed: if the variable is
//! missing, nobody may log in.

wit_bindgen::generate!({ path: "../../wit", world: "login" });

use std::collections::BTreeSet;

use cim::im::log::{Level, log};
use cim::im::types::{LoginDecision, LoginRequest};
use cim::im::variables;
use exports::cim::im::login_handler::Guest;

/// The component variable that lists the allowed user ids.
const ALLOWED_IDS: &str = "allowed_ids";

struct LoginAllowlist;

impl Guest for LoginAllowlist {
    fn login(req: LoginRequest) -> LoginDecision {
        let list = match variables::get(ALLOWED_IDS) {
            Ok(list) => list,
            Err(e) => {
                log(Level::Error, &format!("login-allowlist refuses every login: {e}"));
                return LoginDecision::Reject("the login allow list is not configured".into());
            }
        };
        let (allowed, invalid) = parse_ids(&list);
        if !invalid.is_empty() {
            log(Level::Warn, &format!("{ALLOWED_IDS}: ignoring entries that are not user ids: {invalid:?}"));
        }
        decide(req.user.id, &allowed)
    }
}

export!(LoginAllowlist);

/// The ids of a comma-separated list, and the non-empty entries that are not valid ids.
fn parse_ids(list: &str) -> (BTreeSet<u64>, Vec<&str>) {
    let mut ids = BTreeSet::new();
    let mut invalid = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match entry.parse::<u64>() {
            Ok(id) if id != 0 => {
                ids.insert(id);
            }
            _ => invalid.push(entry),
        }
    }
    (ids, invalid)
}

fn decide(user: u64, allowed: &BTreeSet<u64>) -> LoginDecision {
    if allowed.contains(&user) {
        LoginDecision::Accept
    } else {
        LoginDecision::Reject(format!("user {user} is not on the allow list"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_and_reports_junk() {
        let (ids, invalid) = parse_ids(" 1,2 ,, 42, x, 0, -3 ");
        assert_eq!(ids.into_iter().collect::<Vec<_>>(), [1, 2, 42]);
        assert_eq!(invalid, ["x", "0", "-3"]);
    }

    #[test]
    fn accepts_listed_and_rejects_others() {
        let (ids, _) = parse_ids("1,2");
        assert!(matches!(decide(2, &ids), LoginDecision::Accept));
        match decide(3, &ids) {
            LoginDecision::Reject(reason) => assert_eq!(reason, "user 3 is not on the allow list"),
            LoginDecision::Accept => panic!("user 3 was accepted"),
        }
        let (empty, _) = parse_ids("");
        assert!(matches!(decide(1, &empty), LoginDecision::Reject(_)));
    }
}
