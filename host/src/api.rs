//! The HTTP port: the route API (JSON), `GET /ws`, health and metrics. See `docs/API.md`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use cim_proto::{ErrorCode, User};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::handlers::builtin::{GROUP_HISTORY_KEY, HISTORY_LEN, HISTORY_STORE, history_key};
use crate::router::RouteError;
use crate::store::MAX_PAGE;
use crate::transport::Sessions;
use crate::transport::ws::{self, UpgradeError};

type Body = Full<Bytes>;

/// The browser chat page: WebSocket at `/ws`, route login at `/login`.
const CHAT_PAGE: &str = include_str!("../web/index.html");

/// An API error: a status, a stable code and a human message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    fn into_response(self) -> Response<Body> {
        json_response(self.status, &json!({ "error": self.code, "message": self.message }))
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
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.code().as_str(), e.to_string())
    }
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn ok(value: serde_json::Value) -> Result<Response<Body>, ApiError> {
    Ok(json_response(StatusCode::OK, &value))
}

/// Serves HTTP until shutdown; open connections are closed gracefully.
pub async fn serve(listener: TcpListener, sessions: Sessions) {
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sessions.shutdown.cancelled() => break,
        };
        let s = sessions.clone();
        let shutdown = sessions.shutdown.clone();
        sessions.tracker.spawn(async move {
            let service = service_fn(move |req| {
                let s = s.clone();
                async move { Ok::<_, Infallible>(handle(req, peer, &s).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(socket), service)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, "http connection ended") },
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
                }
            }
        });
    }
    info!("http listener stopped");
}

async fn handle(req: Request<Incoming>, peer: SocketAddr, s: &Sessions) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let result = route(req, peer, s).await;
    let resp = result.unwrap_or_else(ApiError::into_response);
    debug!(%method, %path, status = resp.status().as_u16(), "http request");
    resp
}

async fn route(req: Request<Incoming>, peer: SocketAddr, s: &Sessions) -> Result<Response<Body>, ApiError> {
    let router = &s.router;
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => {
            let mut resp = Response::new(Full::new(Bytes::from_static(CHAT_PAGE.as_bytes())));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
            Ok(resp)
        }
        (&Method::GET, "/healthz") => ok(json!({
            "status": "ok",
            "node_id": router.config().node_id,
            "connections": router.local_connections(),
        })),
        (&Method::GET, "/metrics") => {
            let mut resp =
                Response::new(Full::new(Bytes::from(router.metrics.render(&router.config().node_id))));
            resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            Ok(resp)
        }
        (&Method::GET, "/online") => {
            let users: Vec<_> = router
                .store()
                .online()
                .await
                .map_err(RouteError::from)?
                .into_iter()
                .map(|e| json!({ "id": e.user.id, "name": e.user.name, "node_id": e.node_id }))
                .collect();
            ok(json!({ "users": users }))
        }
        (&Method::GET, path) if path.starts_with("/history/") => {
            let id: u64 = path["/history/".len()..].parse().map_err(|_| {
                ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "expected /history/<user id>")
            })?;
            let store = router.store();
            let mine = store
                .kv_range(HISTORY_STORE, &history_key(id), 0, -1, MAX_PAGE)
                .await
                .map_err(RouteError::from)?;
            let group = store
                .kv_range(HISTORY_STORE, GROUP_HISTORY_KEY, 0, -1, MAX_PAGE)
                .await
                .map_err(RouteError::from)?;
            // Entries are JSON written by the message callback; anything else is shown as text.
            let mut messages: Vec<serde_json::Value> = mine
                .iter()
                .chain(&group)
                .map(|e| {
                    serde_json::from_slice(e).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(e).into_owned())
                    })
                })
                .collect();
            // Newest first across both lists (message ids increase with time).
            messages.sort_by_key(|m| std::cmp::Reverse(m["id"].as_u64().unwrap_or(0)));
            messages.truncate(HISTORY_LEN);
            ok(json!({ "user_id": id, "messages": messages }))
        }
        (&Method::POST, "/login") => {
            let body: LoginBody = read_json(req, s).await?;
            let answer = router.route_login(&User { id: body.user_id, name: body.user_name }).await?;
            ok(serde_json::to_value(answer).unwrap_or_default())
        }
        (&Method::POST, "/send/private") => {
            let body: PrivateBody = read_json(req, s).await?;
            let sender = sender(s, body.from).await?;
            let message_id = router.send_private(&sender, body.to, body.text).await?;
            ok(json!({ "message_id": message_id }))
        }
        (&Method::POST, "/send/group") => {
            let body: GroupBody = read_json(req, s).await?;
            let sender = sender(s, body.from).await?;
            let (message_id, recipients) = router.send_group(&sender, body.text).await?;
            ok(json!({ "message_id": message_id, "recipients": recipients }))
        }
        (&Method::POST, "/offline") => {
            let body: OfflineBody = read_json(req, s).await?;
            let removed = router.offline(body.user_id).await?;
            ok(json!({ "removed": removed }))
        }
        (&Method::GET, "/ws") => ws::upgrade(req, peer, s).map_err(|e| match e {
            UpgradeError::NotWebSocket => ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "GET /ws expects a WebSocket upgrade request",
            ),
            UpgradeError::Full => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the server is at its connection limit",
            ),
        }),
        (
            _,
            "/healthz" | "/metrics" | "/online" | "/login" | "/send/private" | "/send/group" | "/offline"
            | "/ws",
        ) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed on {}", req.method(), req.uri().path()),
        )),
        (_, path) if path.starts_with("/admin/") => crate::admin::route(req, s.admin.as_deref()).await,
        (_, path) => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {path}"))),
    }
}

/// The sender of an HTTP send: named as online if they are, else by their id.
async fn sender(s: &Sessions, id: u64) -> Result<User, ApiError> {
    if id == 0 {
        return Err(RouteError::Invalid("`from` must be a positive user id".into()).into());
    }
    let entry = s.router.store().lookup(id).await.map_err(RouteError::from)?;
    Ok(entry.map(|e| e.user).unwrap_or_else(|| User { id, name: id.to_string() }))
}

/// Reads a whole request body of at most `limit` bytes (`what` names it in the error).
pub async fn read_body(req: Request<Incoming>, limit: usize, what: &str) -> Result<Bytes, ApiError> {
    let collected = Limited::new(req.into_body(), limit).collect().await.map_err(|e| {
        if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", format!("{what} exceeds {limit} bytes"))
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("could not read {what}: {e}"))
        }
    })?;
    Ok(collected.to_bytes())
}

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>, s: &Sessions) -> Result<T, ApiError> {
    let bytes = read_body(req, s.router.config().max_http_body, "body").await?;
    // serde_path_to_error names the offending field for type errors too ("user_id: invalid
    // type: string"), which serde_json alone only does for missing/unknown fields.
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if path == "." {
            format!("invalid JSON body: {inner}")
        } else {
            format!("invalid JSON body: field `{path}`: {inner}")
        };
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    user_id: u64,
    user_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivateBody {
    from: u64,
    to: u64,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    from: u64,
    text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineBody {
    user_id: u64,
}
