//! [`ClientError`]: why a login or a request failed.

use std::time::Duration;

use cim_proto::ErrorCode;

/// Why a login or a request failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The user is already online (route API 409, or an ERROR/KICK with `DUPLICATE_LOGIN`).
    #[error("duplicate login: {0}")]
    DuplicateLogin(String),
    /// A handler component refused the request; the message says why.
    #[error("rejected: {0}")]
    Rejected(String),
    /// The token was refused (bad signature, wrong issuer, another user...): a new login
    /// with the same token fails the same way.
    #[error("the token was refused: {0}")]
    Unauthenticated(String),
    /// The token had expired (at login), or the connection outlived it (KICK).
    #[error("the token expired: {0}")]
    TokenExpired(String),
    /// Too many requests (or logins): try again after `retry_after`.
    #[error("{message} (rate limited; retry after {retry_after:?})")]
    RateLimited { retry_after: Duration, message: String },
    /// The [`TokenProvider`](crate::token::TokenProvider) gave no token.
    #[error("getting a token failed: {0}")]
    Token(#[source] crate::token::BoxError),
    /// The server answered with an ERROR frame.
    #[error("{message} ({code})")]
    Server { code: ErrorCode, message: String },
    /// The route API could not be reached or gave an unusable answer.
    #[error("route API: {0}")]
    Route(String),
    /// The server sent something the protocol does not allow at that point.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The message would not fit in one frame; it was not sent.
    #[error("the message encodes to {len} bytes, more than the maximum frame of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The configuration cannot be used; the message names the field.
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A step did not finish within its deadline.
    #[error("{what} timed out after {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The connection is closed (or being re-established): the request was not answered.
    #[error("connection closed")]
    Closed,
    /// A send went out, but the connection dropped before the server answered, and resending
    /// it did not work out in time: it may or may not be stored. Retry with this id
    /// ([`Client::send_private_with_id`](crate::Client::send_private_with_id)): the server
    /// stores it at most once.
    #[error("not confirmed: {reason} (retry with client_msg_id {client_msg_id})")]
    Unconfirmed { client_msg_id: String, reason: String },
}

impl ClientError {
    /// Maps an ERROR frame to the matching variant.
    pub(crate) fn from_server(code: ErrorCode, message: String) -> Self {
        ClientError::from_error(code, message, 0)
    }

    /// Maps an ERROR frame, with its `retry_after_ms`, to the matching variant.
    pub(crate) fn from_error(code: ErrorCode, message: String, retry_after_ms: u64) -> Self {
        match code {
            ErrorCode::Unauthenticated => ClientError::Unauthenticated(message),
            ErrorCode::TokenExpired => ClientError::TokenExpired(message),
            ErrorCode::RateLimited => {
                ClientError::RateLimited { retry_after: Duration::from_millis(retry_after_ms), message }
            }
            ErrorCode::DuplicateLogin => ClientError::DuplicateLogin(message),
            ErrorCode::Rejected => ClientError::Rejected(message),
            code => ClientError::Server { code, message },
        }
    }

    /// Whether trying again later may succeed. A duplicate login counts as transient:
    /// right after a disconnect the server may still list the user as online for a moment;
    /// so does an expired token (the provider may give a fresh one) and a failing provider.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Rejected(_)
            | ClientError::Unauthenticated(_)
            | ClientError::Config(_)
            | ClientError::Protocol(_)
            | ClientError::TooLarge { .. } => false,
            ClientError::Server { code, .. } => {
                matches!(code, ErrorCode::Unavailable | ErrorCode::HandlerFailed)
            }
            ClientError::DuplicateLogin(_)
            | ClientError::TokenExpired(_)
            | ClientError::RateLimited { .. }
            | ClientError::Token(_)
            | ClientError::Route(_)
            | ClientError::Io(_)
            | ClientError::Timeout { .. }
            | ClientError::Unconfirmed { .. }
            | ClientError::Closed => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_map_to_variants() {
        assert!(matches!(
            ClientError::from_server(ErrorCode::DuplicateLogin, "x".into()),
            ClientError::DuplicateLogin(m) if m == "x"
        ));
        assert!(matches!(
            ClientError::from_server(ErrorCode::Rejected, "no".into()),
            ClientError::Rejected(_)
        ));
        let err = ClientError::from_server(ErrorCode::UserOffline, "user 9 is not online".into());
        assert_eq!(err.to_string(), "user 9 is not online (user_offline)");
    }

    #[test]
    fn token_and_rate_limit_codes_map_to_variants() {
        let err = ClientError::from_error(ErrorCode::RateLimited, "slow down".into(), 1500);
        assert!(matches!(&err, ClientError::RateLimited { retry_after, message }
            if *retry_after == Duration::from_millis(1500) && message == "slow down"));
        assert!(err.is_transient());
        let err = ClientError::from_server(ErrorCode::Unauthenticated, "bad signature".into());
        assert_eq!(err.to_string(), "the token was refused: bad signature");
        assert!(!err.is_transient(), "the same token fails the same way");
        assert!(ClientError::from_server(ErrorCode::TokenExpired, String::new()).is_transient());
    }

    #[test]
    fn duplicate_login_is_transient_and_rejection_is_not() {
        assert!(ClientError::DuplicateLogin(String::new()).is_transient());
        assert!(!ClientError::Rejected(String::new()).is_transient());
        assert!(!ClientError::from_server(ErrorCode::Invalid, String::new()).is_transient());
    }
}
