//! The route API (JSON): route login, online list, sends, offline, history, health, metrics,
//! and the chat page. Who may call what is in `docs/API.md`.

use axum::Router;
use std::net::SocketAddr;

use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cim_proto::User;
use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiError, ApiJson, Caller, json_response};
use crate::limits::Action;
use crate::router::{MAX_HISTORY_PAGE, Page, RouteError};
use crate::transport::Sessions;

/// The browser chat page: WebSocket at `/ws`, route login at `/login`.
const CHAT_PAGE: &str = include_str!("../../web/index.html");
/// The page's script: the JavaScript SDK and the page, bundled from `sdk/js` (committed, so
/// the host builds without npm; CI checks it matches a fresh bundle).
const CHAT_SCRIPT: &str = include_str!("../../web/chat.js");

type ApiResult = Result<Response, ApiError>;

fn ok(value: Value) -> ApiResult {
    Ok(json_response(StatusCode::OK, &value))
}

/// A message id as JSON: a decimal string, since ids are above 2^53 and a JavaScript number
/// would round them.
fn message_id(id: u64) -> Value {
    Value::String(id.to_string())
}

pub fn router() -> Router<Sessions> {
    Router::new()
        .route("/", get(page))
        .route("/chat.js", get(script))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/online", get(online))
        .route("/history/{id}", get(history))
        .route("/login", post(login))
        .route("/send/private", post(send_private))
        .route("/send/group", post(send_group))
        .route("/offline", post(offline))
}

async fn page() -> Html<&'static str> {
    Html(CHAT_PAGE)
}

async fn script() -> impl IntoResponse {
    ([(CONTENT_TYPE, HeaderValue::from_static("text/javascript; charset=utf-8"))], CHAT_SCRIPT)
}

async fn healthz(State(s): State<Sessions>) -> ApiResult {
    let config = s.router.config();
    ok(json!({
        "status": "ok",
        "node_id": config.node_id,
        "connections": s.router.local_connections(),
        // Tells the chat page whether to ask for a token.
        "auth": if config.auth.required() { "token" } else { "none" },
    }))
}

async fn metrics(State(s): State<Sessions>, caller: Caller) -> ApiResult {
    let config = s.router.config();
    if config.http.metrics_require_key {
        caller.service(&config.auth)?;
    }
    let mut resp = s.router.metrics.render(&config.node_id).into_response();
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(crate::metrics::CONTENT_TYPE));
    Ok(resp)
}

async fn online(State(s): State<Sessions>, caller: Caller) -> ApiResult {
    caller.service(&s.router.config().auth)?;
    let users: Vec<_> = s
        .router
        .store()
        .online()
        .await
        .map_err(RouteError::from)?
        .into_iter()
        .map(|e| json!({ "id": e.user.id, "name": e.user.name, "node_id": e.node_id }))
        .collect();
    ok(json!({ "users": users }))
}

/// `GET /history/{id}?stream=inbox|group&before=P|after=P&limit=N`: one page of a user's
/// inbox (private messages, both directions) or of the group as they see it, from the log.
/// The service reads anyone's, a user only their own.
async fn history(
    State(s): State<Sessions>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult {
    let Query(q) = query.map_err(|e| ApiError::bad_request(format!("bad query: {}", e.body_text())))?;
    let id: u64 = id.parse().map_err(|_| ApiError::bad_request("expected /history/<user id>"))?;
    match &caller {
        Caller::User(v) if v.user_id == id => {}
        Caller::User(v) => {
            return Err(ApiError::forbidden(format!(
                "user {} may read only their own history, not {id}'s",
                v.user_id
            )));
        }
        _ => caller.service(&s.router.config().auth)?,
    }
    let group = match q.stream.as_deref() {
        None | Some("inbox") => false,
        Some("group") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!("`stream` must be `inbox` or `group`, got {other:?}")));
        }
    };
    let page = match (q.before, q.after) {
        (Some(_), Some(_)) => return Err(ApiError::bad_request("give `before` or `after`, not both")),
        (Some(p), None) => Page::Before(p),
        (None, Some(p)) => Page::After(p),
        (None, None) => Page::Before(0),
    };
    let limit = q.limit.unwrap_or(DEFAULT_HISTORY_PAGE);
    if !(1..=MAX_HISTORY_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(format!("`limit` must be 1 to {MAX_HISTORY_PAGE}, got {limit}")));
    }
    let found = s.router.history(id, group, page, limit).await?;
    let messages: Vec<Value> = found
        .entries
        .iter()
        .map(|e| {
            let m = &e.message;
            json!({
                "position": e.position.to_string(),
                "id": message_id(m.id),
                "kind": m.kind().as_str(),
                "from": { "id": m.sender_id, "name": m.sender_name },
                "to": (!m.group).then_some(m.to),
                "text": m.text,
                "timestamp_ms": m.timestamp_ms,
            })
        })
        .collect();
    ok(json!({
        "user_id": id,
        "stream": if group { "group" } else { "inbox" },
        "messages": messages,
        "trimmed_through": found.trimmed_through.to_string(),
        "last": found.last.to_string(),
    }))
}

/// Entries in a history page unless `limit` says otherwise.
const DEFAULT_HISTORY_PAGE: usize = 50;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    stream: Option<String>,
    before: Option<u64>,
    after: Option<u64>,
    limit: Option<usize>,
}

/// `POST /login`. With user tokens on, the caller is the token's `sub`: a `user_id` in the
/// body must match it (never silently corrected) and the name comes from the `name` claim.
async fn login(
    State(s): State<Sessions>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    caller: Caller,
    ApiJson(body): ApiJson<LoginBody>,
) -> ApiResult {
    let config = s.router.config();
    let user = if config.auth.required() {
        let verified = match caller {
            Caller::User(v) => v,
            Caller::Refused(e) => return Err(e.into()),
            _ => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    cim_proto::ErrorCode::Unauthenticated.as_str(),
                    "this server requires a user token: send `Authorization: Bearer <your token>`",
                ));
            }
        };
        if let Some(asked) = body.user_id {
            verified.check_user(asked)?;
        }
        let name = verified.name.clone().or(body.user_name).unwrap_or_else(|| verified.user_id.to_string());
        User { id: verified.user_id, name }
    } else {
        let Some(id) = body.user_id else {
            return Err(ApiError::bad_request("invalid JSON body: missing field `user_id`"));
        };
        let Some(name) = body.user_name else {
            return Err(ApiError::bad_request("invalid JSON body: missing field `user_name`"));
        };
        User { id, name }
    };
    if let Err(limited) = config.rate_limits.check(Action::Login, Some(user.id), Some(peer.ip())) {
        crate::metrics::Metrics::inc(&s.router.metrics.rate_limited_total);
        return Err(limited.into());
    }
    let verified = config.auth.required();
    let answer = s.router.route_login(&user, body.resume_token.as_deref().unwrap_or(""), verified).await?;
    let mut value = serde_json::to_value(answer).unwrap_or_else(|_| json!({}));
    value["user_id"] = json!(user.id);
    value["user_name"] = json!(user.name);
    ok(value)
}

async fn send_private(
    State(s): State<Sessions>,
    caller: Caller,
    ApiJson(body): ApiJson<PrivateBody>,
) -> ApiResult {
    caller.service(&s.router.config().auth)?;
    let sender = sender(&s, body.from).await?;
    let sent = s.router.send_private(&sender, body.to, body.text, body.client_msg_id).await?;
    ok(json!({ "message_id": message_id(sent.message_id), "stored": sent.stored }))
}

async fn send_group(
    State(s): State<Sessions>,
    caller: Caller,
    ApiJson(body): ApiJson<GroupBody>,
) -> ApiResult {
    caller.service(&s.router.config().auth)?;
    let sender = sender(&s, body.from).await?;
    let (sent, recipients) = s.router.send_group(&sender, body.text, body.client_msg_id).await?;
    ok(json!({ "message_id": message_id(sent.message_id), "recipients": recipients }))
}

async fn offline(
    State(s): State<Sessions>,
    caller: Caller,
    ApiJson(body): ApiJson<OfflineBody>,
) -> ApiResult {
    caller.service(&s.router.config().auth)?;
    let removed = s.router.offline(body.user_id).await?;
    ok(json!({ "removed": removed }))
}

/// The sender of an HTTP send: named as online if they are, else by their id.
async fn sender(s: &Sessions, id: u64) -> Result<User, ApiError> {
    if id == 0 {
        return Err(RouteError::Invalid("`from` must be a positive user id".into()).into());
    }
    let entry = s.router.store().lookup(id).await.map_err(RouteError::from)?;
    Ok(entry.map(|e| e.user).unwrap_or_else(|| User { id, name: id.to_string() }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginBody {
    /// With user tokens on: optional, and must be the token's `sub` when given.
    #[serde(default)]
    user_id: Option<u64>,
    /// With user tokens on: used only when the token has no `name` claim.
    #[serde(default)]
    user_name: Option<String>,
    /// The resume token of the user's last session: a user still shown online (their node
    /// died, or the old connection is half-open) is routed instead of refused.
    #[serde(default)]
    resume_token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PrivateBody {
    from: u64,
    to: u64,
    text: String,
    /// Optional: a resend with the same id within the de-dup window stores nothing new.
    #[serde(default)]
    client_msg_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupBody {
    from: u64,
    text: String,
    #[serde(default)]
    client_msg_id: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OfflineBody {
    user_id: u64,
}
