//! Example login handler: authorizes by the verified token's `role` claim. Only users whose
//! token says `"role": "<one of allowed_roles>"` (component variable, comma-separated,
//! `allowed_roles = "admin, member"`) may log in. The host has already checked the token's
//! signature, expiry and subject; this decides *who among the authenticated* may chat — a
//! ban list, a tenant or a plan would work the same way. Fails closed: without claims (a host
//! that verifies no tokens) or without the variable, nobody may log in.

wit_bindgen::generate!({ path: "../../wit", world: "login" });

use cim::im::log::{Level, log};
use cim::im::types::{LoginDecision, LoginRequest, TokenClaims};
use cim::im::variables;
use exports::cim::im::login_handler::Guest;

/// The component variable that lists the allowed roles.
const ALLOWED_ROLES: &str = "allowed_roles";
/// The claim that carries a user's role.
const ROLE_CLAIM: &str = "role";

struct LoginRoles;

impl Guest for LoginRoles {
    fn login(req: LoginRequest) -> LoginDecision {
        let Some(claims) = req.claims else {
            return LoginDecision::Reject("this server requires a user token with a role".into());
        };
        let allowed = match variables::get(ALLOWED_ROLES) {
            Ok(list) => list,
            Err(e) => {
                log(Level::Error, &format!("login-roles refuses every login: {e}"));
                return LoginDecision::Reject("the allowed roles are not configured".into());
            }
        };
        decide(&claims, &allowed)
    }
}

export!(LoginRoles);

fn decide(claims: &TokenClaims, allowed: &str) -> LoginDecision {
    let role = serde_json::from_str::<serde_json::Value>(&claims.json)
        .ok()
        .and_then(|c| c.get(ROLE_CLAIM).and_then(|r| r.as_str()).map(str::to_owned));
    match role {
        Some(role) if allowed.split(',').map(str::trim).any(|a| !a.is_empty() && a == role) => {
            LoginDecision::Accept
        }
        Some(role) => LoginDecision::Reject(format!("role {role:?} may not log in here")),
        None => LoginDecision::Reject(format!("the token has no `{ROLE_CLAIM}` claim")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(json: &str) -> TokenClaims {
        TokenClaims { subject: "1".into(), expires_at_ms: 0, issuer: None, json: json.into() }
    }

    #[test]
    fn accepts_allowed_roles_only() {
        assert!(matches!(decide(&claims(r#"{"role":"admin"}"#), "admin, member"), LoginDecision::Accept));
        assert!(matches!(decide(&claims(r#"{"role":"member"}"#), "admin, member"), LoginDecision::Accept));
        match decide(&claims(r#"{"role":"guest"}"#), "admin, member") {
            LoginDecision::Reject(r) => assert_eq!(r, "role \"guest\" may not log in here"),
            LoginDecision::Accept => panic!("guest accepted"),
        }
        assert!(matches!(decide(&claims(r#"{"sub":"1"}"#), "admin"), LoginDecision::Reject(_)));
        assert!(matches!(decide(&claims(r#"{"role":""}"#), ","), LoginDecision::Reject(_)));
    }
}
