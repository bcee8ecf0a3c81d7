//! Route login: `POST /login` on the route API, with a minimal HTTP/1 client (plain `http://`).

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode, Uri};
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
}

#[derive(Serialize)]
struct LoginRequest<'a> {
    user_id: u64,
    user_name: &'a str,
}

/// The route API's error body: `{"error": "<code>", "message": "<text>"}`.
#[derive(Deserialize)]
struct ApiError {
    error: String,
    #[serde(default)]
    message: String,
}

/// Asks the route API at `route` (`http://host:port`) which node `user_id` should connect to.
pub async fn login(route: &str, user_id: u64, user_name: &str) -> Result<RouteInfo, ClientError> {
    let url = format!("{}/login", route.trim_end_matches('/'));
    let body = serde_json::to_vec(&LoginRequest { user_id, user_name })
        .map_err(|e| ClientError::Route(format!("cannot encode the login request: {e}")))?;
    let (status, answer) = post_json(&url, body).await?;
    if status == StatusCode::OK {
        return serde_json::from_slice(&answer).map_err(|e| {
            ClientError::Route(format!("POST {url}: unexpected answer ({e}): {}", snippet(&answer)))
        });
    }
    Err(match serde_json::from_slice::<ApiError>(&answer) {
        Ok(err) if status == StatusCode::CONFLICT || err.error == "duplicate_login" => {
            ClientError::DuplicateLogin(or_code(err.message, &err.error))
        }
        Ok(err) if status == StatusCode::FORBIDDEN || err.error == "rejected" => {
            ClientError::Rejected(or_code(err.message, &err.error))
        }
        Ok(err) => ClientError::Route(format!("POST {url}: {status}: {}: {}", err.error, err.message)),
        Err(_) => ClientError::Route(format!("POST {url}: {status}: {}", snippet(&answer))),
    })
}

fn or_code(message: String, code: &str) -> String {
    if message.is_empty() { code.to_owned() } else { message }
}

/// At most 200 characters of a body, for error messages.
fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(body).chars().take(200).collect()
}

/// One `POST` with a JSON body on a fresh connection; returns the status and the body.
async fn post_json(url: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes), ClientError> {
    let route_err = |what: String| ClientError::Route(format!("POST {url}: {what}"));
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
    let request = Request::post(path)
        .header(HOST, authority.as_str())
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| route_err(e.to_string()))?;
    let response = sender.send_request(request).await.map_err(|e| route_err(e.to_string()))?;
    let status = response.status();
    let answer = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(|e| route_err(format!("reading the answer: {e}")))?
        .to_bytes();
    Ok((status, answer))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::FakeRoute;

    #[tokio::test]
    async fn login_posts_json_and_parses_the_node() {
        let route = FakeRoute::start(vec![(
            200,
            r#"{"node_id":"node-1","tcp_addr":"127.0.0.1:9000","ws_url":"ws://127.0.0.1:8080/ws"}"#.into(),
        )])
        .await;
        let info = login(&format!("{}/", route.url), 7, "alice").await.unwrap();
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
        match login(&route.url, 7, "alice").await {
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
        let err = login(&route.url, 7, "alice").await.unwrap_err().to_string();
        assert!(err.contains("503") && err.contains("store down"), "{err}");
        let err = login(&route.url, 7, "alice").await.unwrap_err().to_string();
        assert!(err.contains("not json"), "{err}");
    }

    #[tokio::test]
    async fn bad_urls_are_refused() {
        for url in ["https://example.invalid", "not a url", "http://"] {
            assert!(matches!(login(url, 1, "a").await, Err(ClientError::Route(_))), "{url}");
        }
    }
}
