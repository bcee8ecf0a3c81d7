//! The route API (JSON): route login, online list, sends, offline, history, health, metrics,
//! and the chat page. Who may call what is in `docs/API.md`.

use axum::Router;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use cim_proto::User;
use hyper::StatusCode;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use serde::Deserialize;
use serde_json::{Value, json};

use super::extract::{ApiError, ApiJson, Caller, json_response};
use crate::handlers::builtin::{GROUP_HISTORY_KEY, HISTORY_LEN, HISTORY_STORE, history_key};
use crate::limits::Action;
use crate::router::RouteError;
use crate::store::MAX_PAGE;
use crate::transport::Sessions;

/// The browser chat page: WebSocket at `/ws`, route login at `/login`.
const CHAT_PAGE: &str = include_str!("../../web/index.html");

type ApiResult = Result<Response, ApiError>;

fn ok(value: Value) -> ApiResult {
    Ok(json_response(StatusCode::OK, &value))
}

pub fn router() -> Router<Sessions> {
    Router::new()
        .route("/", get(page))
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
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
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

/// `GET /history/{id}`: the service reads anyone's, a user only their own.
async fn history(State(s): State<Sessions>, caller: Caller, Path(id): Path<String>) -> ApiResult {
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
    let store = s.router.store();
    let mine =
        store.kv_range(HISTORY_STORE, &history_key(id), 0, -1, MAX_PAGE).await.map_err(RouteError::from)?;
    let group =
        store.kv_range(HISTORY_STORE, GROUP_HISTORY_KEY, 0, -1, MAX_PAGE).await.map_err(RouteError::from)?;
    // Entries are JSON written by the message callback; anything else is shown as text.
    let mut messages: Vec<Value> = mine
        .iter()
        .chain(&group)
        .map(|e| {
            serde_json::from_slice(e)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(e).into_owned()))
        })
        .collect();
    // Newest first across both lists (message ids increase with time).
    messages.sort_by_key(|m| std::cmp::Reverse(m["id"].as_u64().unwrap_or(0)));
    messages.truncate(HISTORY_LEN);
    ok(json!({ "user_id": id, "messages": messages }))
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
    let answer = s.router.route_login(&user).await?;
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
    let message_id = s.router.send_private(&sender, body.to, body.text).await?;
    ok(json!({ "message_id": message_id }))
}

async fn send_group(
    State(s): State<Sessions>,
    caller: Caller,
    ApiJson(body): ApiJson<GroupBody>,
) -> ApiResult {
    caller.service(&s.router.config().auth)?;
    let sender = sender(&s, body.from).await?;
    let (message_id, recipients) = s.router.send_group(&sender, body.text).await?;
    ok(json!({ "message_id": message_id, "recipients": recipients }))
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
