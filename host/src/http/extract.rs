//! What handlers take from a request: who is calling ([`Caller`], from `Authorization`),
//! a JSON body ([`ApiJson`], content type, size and time checked), and the one error shape
//! every answer uses ([`ApiError`]).

use std::time::Duration;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cim_proto::ErrorCode;
use http_body_util::{BodyExt, Limited};
use hyper::StatusCode;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::auth::{Auth, TokenError, Verified};
use crate::limits::Limited as RateLimited;
use crate::router::RouteError;
use crate::transport::Sessions;

/// An API error: a status, a stable code and a human message; shown as
/// `{"error": code, "message": message}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// Set on 429: sent as `Retry-After` (seconds) and `retry_after_ms`.
    retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), retry_after_ms: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 for a missing or wrong service credential.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({ "error": self.code, "message": self.message });
        if let Some(ms) = self.retry_after_ms {
            body["retry_after_ms"] = json!(ms);
        }
        let mut resp = json_response(self.status, &body);
        if let Some(ms) = self.retry_after_ms {
            resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(ms.div_ceil(1000).max(1)));
        }
        resp
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let status = match e.code() {
            ErrorCode::Invalid => StatusCode::BAD_REQUEST,
            ErrorCode::DuplicateLogin => StatusCode::CONFLICT,
            ErrorCode::Rejected => StatusCode::FORBIDDEN,
            ErrorCode::UserOffline => StatusCode::NOT_FOUND,
            ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unauthenticated | ErrorCode::TokenExpired => StatusCode::UNAUTHORIZED,
            ErrorCode::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code().as_str(), e.to_string())
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, e.code().as_str(), format!("token refused: {e}"))
    }
}

impl From<RateLimited> for ApiError {
    fn from(e: RateLimited) -> Self {
        ApiError {
            retry_after_ms: Some(e.retry_after_ms()),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited.as_str(), e.to_string())
        }
    }
}

/// A JSON answer with our content type.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response {
    let mut resp = (status, value.to_string()).into_response();
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Who sent a request, from `Authorization: Bearer <credential>`. The API key is tried
/// first (constant-time compare), then the credential is verified as a user token.
#[derive(Debug)]
pub enum Caller {
    /// No authentication is configured at all: everything is open (development mode).
    Dev,
    /// The service API key.
    Service,
    /// A verified user token.
    User(Verified),
    /// No credential.
    Nobody,
    /// A credential that is neither the API key nor a valid user token.
    Refused(TokenError),
}

impl Caller {
    pub fn from_header(auth: &Auth, header: Option<&HeaderValue>) -> Caller {
        if auth.users.is_none() && auth.api_key.is_none() {
            return Caller::Dev;
        }
        let Some(given) = header.and_then(|v| v.to_str().ok()).and_then(bearer) else {
            return Caller::Nobody;
        };
        if auth.api_key.as_ref().is_some_and(|key| key.matches(given.as_bytes())) {
            return Caller::Service;
        }
        match &auth.users {
            Some(users) => match users.verify(given) {
                Ok(v) => Caller::User(v),
                Err(e) => Caller::Refused(e),
            },
            // An API key is configured, user tokens are not: a wrong key is just wrong.
            None => Caller::Refused(TokenError::Malformed("not the API key".into())),
        }
    }

    /// Admits only the service (or anyone in development mode) to a service endpoint.
    pub fn service(&self, auth: &Auth) -> Result<(), ApiError> {
        match self {
            Caller::Dev | Caller::Service => Ok(()),
            _ if auth.api_key.is_none() => Err(ApiError::unauthorized(
                "this endpoint needs the service API key, and none is configured: start cim-host with \
                 --api-key-file FILE",
            )),
            Caller::Nobody => {
                Err(ApiError::unauthorized("missing credentials: send `Authorization: Bearer <API key>`"))
            }
            Caller::User(_) => Err(ApiError::unauthorized(
                "a user token is not enough: this endpoint needs the service API key",
            )),
            Caller::Refused(e) if auth.users.is_some() => Err(ApiError::unauthorized(format!(
                "wrong credentials: neither the service API key nor a valid user token ({e})"
            ))),
            Caller::Refused(_) => Err(ApiError::unauthorized("wrong credentials: not the service API key")),
        }
    }
}

/// The credential of `Bearer <credential>` (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim()).filter(|c| !c.is_empty())
}

impl FromRequestParts<Sessions> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, s: &Sessions) -> Result<Self, Self::Rejection> {
        Ok(Caller::from_header(&s.router.config().auth, parts.headers.get(AUTHORIZATION)))
    }
}

/// A JSON request body: `Content-Type: application/json` (415 otherwise), at most
/// `max_http_body` bytes (413), read completely within the body timeout (408), and
/// parsed with the offending field named (400).
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned + Send> FromRequest<Sessions> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, s: &Sessions) -> Result<Self, ApiError> {
        if !is_json(req.headers().get(CONTENT_TYPE)) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ));
        }
        let config = s.router.config();
        let bytes = read_body(req, config.max_http_body, config.http.body_timeout, "body").await?;
        // serde_path_to_error names the offending field for type errors too ("user_id: invalid
        // type: string"), which serde_json alone only does for missing/unknown fields.
        let de = &mut serde_json::Deserializer::from_slice(&bytes);
        serde_path_to_error::deserialize(de).map(ApiJson).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let message = if path == "." {
                format!("invalid JSON body: {inner}")
            } else {
                format!("invalid JSON body: field `{path}`: {inner}")
            };
            ApiError::bad_request(message)
        })
    }
}

fn is_json(value: Option<&HeaderValue>) -> bool {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else { return false };
    let essence = v.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Reads a whole request body of at most `limit` bytes within `timeout` (`what` names it
/// in the error). The deadline covers the whole body, so a trickle cannot hold it open.
pub async fn read_body(req: Request, limit: usize, timeout: Duration, what: &str) -> Result<Bytes, ApiError> {
    let collect = Limited::new(req.into_body(), limit).collect();
    let collected = match tokio::time::timeout(timeout, collect).await {
        Ok(r) => r,
        Err(_) => return Err(body_timeout(what, timeout)),
    };
    let collected = collected.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("{what} exceeds {limit} bytes"))
        } else if is_timeout(e.as_ref()) {
            body_timeout(what, timeout)
        } else {
            ApiError::bad_request(format!("could not read {what}: {e}"))
        }
    })?;
    Ok(collected.to_bytes())
}

fn body_timeout(what: &str, timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "timeout",
        format!("the request {what} was not received within {timeout:?}"),
    )
}

/// Whether a body error is tower-http's body timeout (possibly wrapped by axum).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<tower_http::timeout::TimeoutError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::auth::token::{self, Expectations, MintRequest};
    use crate::auth::{Secret, Verifier};

    fn auth(users: bool, key: bool) -> (Auth, Secret) {
        let secret = Secret::new("0123456789abcdef0123456789abcdef", "test").unwrap();
        let users = users.then(|| Arc::new(Verifier::hmac(&secret, Expectations::default()).unwrap()));
        let api_key = key.then(|| Arc::new(Secret::new("the-key", "test").unwrap()));
        (Auth { users, api_key }, secret)
    }

    fn header(v: &str) -> HeaderValue {
        HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn the_api_key_is_tried_first_then_a_user_token() {
        let (auth, secret) = auth(true, true);
        let req = MintRequest { user_id: 7, ttl: Duration::from_secs(60), ..MintRequest::default() };
        let jwt = token::mint(&secret, &req).unwrap();
        assert!(matches!(Caller::from_header(&auth, Some(&header("Bearer the-key"))), Caller::Service));
        assert!(matches!(Caller::from_header(&auth, Some(&header("bearer the-key"))), Caller::Service));
        let user = Caller::from_header(&auth, Some(&header(&format!("Bearer {jwt}"))));
        assert!(matches!(&user, Caller::User(v) if v.user_id == 7), "{user:?}");
        assert!(user.service(&auth).is_err());
        assert!(matches!(Caller::from_header(&auth, Some(&header("Bearer nope"))), Caller::Refused(_)));
        assert!(matches!(Caller::from_header(&auth, Some(&header("Basic the-key"))), Caller::Nobody));
        assert!(matches!(Caller::from_header(&auth, None), Caller::Nobody));
    }

    #[test]
    fn service_endpoints_by_configuration() {
        let (dev, _) = auth(false, false);
        assert!(Caller::from_header(&dev, None).service(&dev).is_ok());
        let (no_key, _) = auth(true, false);
        let err = Caller::from_header(&no_key, Some(&header("Bearer the-key"))).service(&no_key).unwrap_err();
        assert!(err.message.contains("--api-key-file"), "{err:?}");
        let (key_only, _) = auth(false, true);
        assert!(Caller::from_header(&key_only, None).service(&key_only).is_err());
        assert!(Caller::from_header(&key_only, Some(&header("Bearer the-key"))).service(&key_only).is_ok());
        assert!(Caller::from_header(&key_only, Some(&header("Bearer wrong"))).service(&key_only).is_err());
    }

    #[test]
    fn json_content_types() {
        assert!(is_json(Some(&header("application/json"))));
        assert!(is_json(Some(&header("Application/JSON; charset=utf-8"))));
        assert!(!is_json(Some(&header("text/plain"))));
        assert!(!is_json(Some(&header("application/jsonp"))));
        assert!(!is_json(None));
    }

    #[test]
    fn rate_limited_answers_carry_retry_after() {
        let resp = ApiError {
            retry_after_ms: Some(1500),
            ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "slow down")
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[RETRY_AFTER], "2");
    }
}
