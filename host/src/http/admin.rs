//! The admin HTTP API (`/admin/...`): list, upload and roll back components. Enabled only
//! when the node has an admin token; every request must carry it as a bearer token. Served
//! on the main port, or only on its own listener with `--admin-http`.

use std::sync::Arc;

use axum::Router;
use axum::extract::{FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::response::Response;
use axum::routing::{get, post, put};
use hyper::StatusCode;
use hyper::header::AUTHORIZATION;
use serde_json::json;

use super::extract::{ApiError, json_response, read_body};
use crate::auth::Secret;
use crate::deploy::{DeployError, Deployments};
use crate::runtime::{ComponentInfo, Loaded};
use crate::transport::Sessions;

/// Largest `.wasm` accepted by `PUT /admin/components/NAME`.
pub const MAX_UPLOAD: usize = 32 * 1024 * 1024;

/// How long an upload of [`MAX_UPLOAD`] bytes may take, at most.
const UPLOAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

#[derive(Debug)]
pub struct Admin {
    token: Secret,
    pub deployments: Arc<Deployments>,
}

impl Admin {
    pub fn new(token: Secret, deployments: Arc<Deployments>) -> Arc<Self> {
        Arc::new(Admin { token, deployments })
    }
}

pub fn router() -> Router<Sessions> {
    Router::new()
        .route("/admin/components", get(list))
        .route("/admin/components/{name}", put(upload))
        .route("/admin/components/{name}/rollback", post(rollback))
}

/// A request that carried the admin token. Taken first by every admin handler, so nothing
/// (the body included) is looked at before the token is checked.
struct Authorized(Arc<Admin>);

impl FromRequestParts<Sessions> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, s: &Sessions) -> Result<Self, ApiError> {
        let Some(admin) = s.admin.clone() else {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "the admin API is disabled: start cim-host with --admin-token-file (or CIM_ADMIN_TOKEN)",
            ));
        };
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|t| admin.token.matches(t.as_bytes())) {
            return Err(ApiError::unauthorized(
                "missing or wrong admin token (send `Authorization: Bearer <token>`)",
            ));
        }
        Ok(Authorized(admin))
    }
}

fn info_json(loaded: &Loaded) -> serde_json::Value {
    json!({
        "name": loaded.name.as_ref(),
        "event": loaded.event.as_str(),
        "version": loaded.version,
        "sha256": loaded.sha256,
        "size": loaded.size,
        "source": loaded.source,
        "limits": crate::runtime::LimitsJson::from(loaded.limits),
        "starting_memory": loaded.headroom().map(|h| h.starting),
        "headroom": loaded.headroom().map(|h| h.to_string()),
    })
}

impl From<DeployError> for ApiError {
    fn from(e: DeployError) -> Self {
        let (status, code) = match &e {
            DeployError::UnknownComponent(_) => (StatusCode::NOT_FOUND, "not_found"),
            DeployError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_component"),
            DeployError::NothingToRollBack(_) => (StatusCode::CONFLICT, "nothing_to_roll_back"),
            DeployError::Persist { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "persist_failed"),
        };
        ApiError::new(status, code, format!("{e:#}"))
    }
}

async fn list(Authorized(admin): Authorized) -> Result<Response, ApiError> {
    let components: Vec<ComponentInfo> = admin.deployments.runtime().list();
    Ok(json_response(StatusCode::OK, &json!({ "components": components })))
}

async fn upload(
    Authorized(admin): Authorized,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let wasm = read_body(req, MAX_UPLOAD, UPLOAD_TIMEOUT, "component").await?;
    if wasm.is_empty() {
        return Err(ApiError::bad_request("the body must be the component's .wasm bytes"));
    }
    let loaded = admin.deployments.push(&name, wasm.to_vec()).await?;
    Ok(json_response(StatusCode::OK, &info_json(&loaded)))
}

async fn rollback(Authorized(admin): Authorized, Path(name): Path<String>) -> Result<Response, ApiError> {
    let loaded = admin.deployments.rollback(&name).await?;
    Ok(json_response(StatusCode::OK, &info_json(&loaded)))
}
