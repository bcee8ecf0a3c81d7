//! Who may do what: user tokens ([`token`]) verified before any handler runs, the service
//! API key for backend endpoints, and [`Secret`]s that never print.
//!
//! With nothing configured the host runs in development mode: any LOGIN is taken at its
//! word. `cim-host up` allows that only when every listener is on loopback.

pub mod secret;
pub mod token;

use std::sync::Arc;

pub use secret::{Secret, SecretError};
pub use token::{TokenError, Verified, Verifier};

/// The node's authentication settings; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    /// Verifies user tokens; `None`: development mode, tokens are not required.
    pub users: Option<Arc<Verifier>>,
    /// The key backend services present (`Authorization: Bearer`) to the service endpoints;
    /// `None`: those endpoints are open (development mode) or closed (user tokens
    /// configured, no key: nobody may call them).
    pub api_key: Option<Arc<Secret>>,
}

impl Auth {
    /// Whether user tokens are verified.
    pub fn required(&self) -> bool {
        self.users.is_some()
    }

    /// Verifies a LOGIN's token for `asked` (0: whoever the token names). `Ok(None)` in
    /// development mode, where tokens are not checked.
    pub fn login(&self, token: &str, asked: u64) -> Result<Option<Verified>, TokenError> {
        let Some(users) = &self.users else { return Ok(None) };
        let verified = users.verify(token)?;
        verified.check_user(asked)?;
        Ok(Some(verified))
    }
}
