//! Route login: `POST /login` on the route API, with a minimal HTTP/1 client (plain `http://`).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderMap, RETRY_AFTER};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::error::ClientError;

/// Largest route API answer we read; the API's bodies are tiny.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Where the route API told us to connect.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RouteInfo {
    pub node_id: String,
    /// `host:port` of the node's TCP listener.
    pub tcp_addr: String,
    /// `ws://host:port/ws` of the node's WebSocket endpoint.
    pub ws_url: String,
    /// The user the route API logged in (the token's `sub` when a token was sent); 0 when
    /// the API did not say.
    #[serde(default)]
    pub user_id: u64,
    /// Their display name; empty when the API did not say.
    #[serde(default)]
    pub user_name: String,
}

/// Who asks the route API for a node.
#[derive(Debug, Clone, Copy)]
pub struct Credentials<'a> {
    /// 0: not given (the token decides).
    pub user_id: u64,
    pub user_name: &'a str,
    /// Sent as `Authorization: Bearer <token>` when present.
    pub token: Option<&'a str>,
}

#[derive(Serialize)]
struct LoginRequest<'a> {
    #[serde(skip_serializing_if = "is_zero")]
    user_id: u64,
    /// Left out when empty: with a token, the route API then names the user from it.
    #[serde(skip_serializing_if = "str::is_empty")]
    user_name: &'a str,
}

fn is_zero(id: &u64) -> bool {
    *id == 0
}

/// The route API's error body: `{"error": "<code>", "message": "<text>"}`, with
/// `retry_after_ms` when rate limited.
#[derive(Deserialize)]
struct ApiError {
    error: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    retry_after_ms: Option<u64>,
}

/// Asks the route API at `route` (`http://host:port`) which node `who` should connect to.
pub async fn login(route: &str, who: Credentials<'_>) -> Result<RouteInfo, ClientError> {
    let url = format!("{}/login", route.trim_end_matches('/'));
    let body = serde_json::to_vec(&LoginRequest { user_id: who.user_id, user_name: who.user_name })
        .map_err(|e| ClientError::Route(format!("cannot encode the login request: {e}")))?;
    let (status, headers, answer) = post_json(&url, who.token, body).await?;
    if status == StatusCode::OK {
        return serde_json::from_slice(&answer).map_err(|e| {
            ClientError::Route(format!("POST {url}: unexpected answer ({e}): {}", snippet(&answer)))
        });
    }
    Err(match serde_json::from_slice::<ApiError>(&answer) {
        Ok(err) if status == StatusCode::CONFLICT || err.error == "duplicate_login" => {
            ClientError::DuplicateLogin(or_code(err.message, &err.error))
        }
        Ok(err) if err.error == "token_expired" => {
            ClientError::TokenExpired(or_code(err.message, &err.error))
        }
        Ok(err) if status == StatusCode::UNAUTHORIZED || err.error == "unauthenticated" => {
            ClientError::Unauthenticated(or_code(err.message, &err.error))
        }
        Ok(err) if status == StatusCode::TOO_MANY_REQUESTS || err.error == "rate_limited" => {
            let retry_after =
                err.retry_after_ms.map(Duration::from_millis).unwrap_or_else(|| retry_after(&headers));
            ClientError::RateLimited { retry_after, message: or_code(err.message, &err.error) }
        }
        Ok(err) if status == StatusCode::FORBIDDEN || err.error == "rejected" => {
            ClientError::Rejected(or_code(err.message, &err.error))
        }
        Ok(err) => ClientError::Route(format!("POST {url}: {status}: {}: {}", err.error, err.message)),
        Err(_) if status == StatusCode::UNAUTHORIZED => {
            ClientError::Unauthenticated(format!("POST {url}: {status}: {}", snippet(&answer)))
        }
        Err(_) if status == StatusCode::TOO_MANY_REQUESTS => ClientError::RateLimited {
            retry_after: retry_after(&headers),
            message: format!("POST {url}: {status}"),
        },
        Err(_) => ClientError::Route(format!("POST {url}: {status}: {}", snippet(&answer))),
    })
}

/// The `Retry-After` header in seconds (the HTTP-date form is not used by cim); 1 s without one.
fn retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_secs)
}

fn or_code(message: String, code: &str) -> String {
    if message.is_empty() { code.to_owned() } else { message }
}

/// At most 200 characters of a body, for error messages.
pub(crate) fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

/// One `POST` with a JSON body (and a bearer token, if given) on a fresh connection; returns
/// the status, the headers and the body.
async fn post_json(
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
    call(Method::POST, url, token, Some(body)).await
}

/// One `GET` (with a bearer token, if given) on a fresh connection; returns the status, the
/// headers and the body.
pub(crate) async fn get(
    url: &str,
    token: Option<&str>,
) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
    call(Method::GET, url, token, None).await
}

/// One request on a fresh connection: a JSON body when given, a bearer token when given.
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
    let route_err = |what: String| ClientError::Route(format!("{method} {url}: {what}"));
    let uri: Uri = url.parse().map_err(|e| route_err(format!("not a valid URL: {e}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(route_err("only http:// route URLs are supported".into()));
    }
    let authority = uri.authority().ok_or_else(|| route_err("the URL has no host".into()))?;
    let host = authority.host().trim_start_matches('[').trim_end_matches(']');
    let port = authority.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| route_err(format!("cannot connect to {authority}: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| route_err(e.to_string()))?;
    // Drives the connection; it ends when `sender` is dropped or the server closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "route API connection ended");
        }
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = Request::builder().method(method.clone()).uri(path).header(HOST, authority.as_str());
    if body.is_some() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let body = Full::new(body.map(Bytes::from).unwrap_or_default());
    let request = request.body(body).map_err(|e| route_err(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| route_err(e.to_string()))?;
    let status = response.status();
    let headers = response.headers().clone();
    let answer = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| route_err(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok((status, headers, answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::FakeRoute;

    const ALICE: Credentials<'static> = Credentials { user_id: 7, user_name: "alice", token: None };

    #[tokio::test]
    async fn login_posts_json_and_parses_the_node() {
        let route = FakeRoute::start(vec![(
            200,
            r#"{"node_id":"node-1","tcp_addr":"127.0.0.1:9000","ws_url":"ws://127.0.0.1:8080/ws"}"#.into(),
        )])
        .await;
        let info = login(&format!("{}/", route.url), ALICE).await.unwrap();
        assert_eq!(info.node_id, "node-1");
        assert_eq!(info.tcp_addr, "127.0.0.1:9000");
        assert_eq!(info.ws_url, "ws://127.0.0.1:8080/ws");
        let request = route.requests().remove(0);
        assert!(request.starts_with("POST /login HTTP/1.1\r\n"), "{request}");
        assert!(request.ends_with(r#"{"user_id":7,"user_name":"alice"}"#), "{request}");
    }

    #[tokio::test]
    async fn conflict_is_a_duplicate_login() {
        let route = FakeRoute::start(vec![(
            409,
            r#"{"error":"duplicate_login","message":"user 7 is already online"}"#.into(),
        )])
        .await;
        match login(&route.url, ALICE).await {
            Err(ClientError::DuplicateLogin(m)) => assert_eq!(m, "user 7 is already online"),
            other => panic!("expected DuplicateLogin, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn other_failures_are_route_errors_that_say_what_came_back() {
        let route = FakeRoute::start(vec![
            (503, r#"{"error":"unavailable","message":"store down"}"#.into()),
            (200, "not json".into()),
        ])
        .await;
        let err = login(&route.url, ALICE).await.unwrap_err().to_string();
        assert!(err.contains("503") && err.contains("store down"), "{err}");
        let err = login(&route.url, ALICE).await.unwrap_err().to_string();
        assert!(err.contains("not json"), "{err}");
    }

    #[tokio::test]
    async fn a_token_goes_as_bearer_and_the_answer_names_the_user() {
        let route = FakeRoute::start(vec![(
            200,
            r#"{"node_id":"n","tcp_addr":"127.0.0.1:9000","ws_url":"ws://x/ws","user_id":42,"user_name":"bob"}"#
                .into(),
        )])
        .await;
        let who = Credentials { user_id: 0, user_name: "", token: Some("tok.en.sig") };
        let info = login(&route.url, who).await.unwrap();
        assert_eq!((info.user_id, info.user_name.as_str()), (42, "bob"));
        let request = route.requests().remove(0);
        assert!(request.to_ascii_lowercase().contains("authorization: bearer tok.en.sig\r\n"), "{request}");
        assert!(request.ends_with("{}"), "the token says who: {request}");
    }

    #[tokio::test]
    async fn refused_tokens_and_rate_limits_are_typed() {
        let route = FakeRoute::start(vec![
            (401, r#"{"error":"unauthenticated","message":"bad signature"}"#.into()),
            (401, r#"{"error":"token_expired","message":"expired 3 s ago"}"#.into()),
            (429, r#"{"error":"rate_limited","message":"too many logins","retry_after_ms":2500}"#.into()),
        ])
        .await;
        let err = login(&route.url, ALICE).await.unwrap_err();
        assert!(matches!(&err, ClientError::Unauthenticated(m) if m == "bad signature"), "{err:?}");
        let err = login(&route.url, ALICE).await.unwrap_err();
        assert!(matches!(&err, ClientError::TokenExpired(m) if m == "expired 3 s ago"), "{err:?}");
        let err = login(&route.url, ALICE).await.unwrap_err();
        assert!(
            matches!(&err, ClientError::RateLimited { retry_after, .. } if *retry_after == Duration::from_millis(2500)),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn bad_urls_are_refused() {
        for url in ["https://example.invalid", "not a url", "http://"] {
            assert!(matches!(login(url, ALICE).await, Err(ClientError::Route(_))), "{url}");
        }
    }
}
