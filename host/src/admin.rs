//! The admin HTTP API (`/admin/...`): list, upload and roll back components. Enabled only
//! when the node has an admin token; every request must carry it as a bearer token.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::api::{ApiError, json_response, read_body};
use crate::deploy::{DeployError, Deployments};
use crate::runtime::{ComponentInfo, Loaded};

/// Largest `.wasm` accepted by `PUT /admin/components/NAME`.
pub const MAX_UPLOAD: usize = 32 * 1024 * 1024;

#[derive(Debug)]
pub struct Admin {
    token: String,
    pub deployments: Arc<Deployments>,
}

impl Admin {
    pub fn new(token: String, deployments: Arc<Deployments>) -> Arc<Self> {
        Arc::new(Admin { token, deployments })
    }

    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let Some(given) = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        // Constant-time comparison: the token's length is not secret, its bytes are.
        given.len() == self.token.len()
            && given.bytes().zip(self.token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
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

/// Serves `/admin/...`; `admin` is `None` when no token is configured.
pub async fn route(req: Request<Incoming>, admin: Option<&Admin>) -> Result<Response<Full<Bytes>>, ApiError> {
    let Some(admin) = admin else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "the admin API is disabled: start cim-host with --admin-token (or CIM_ADMIN_TOKEN)",
        ));
    };
    if !admin.authorized(&req) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token (send `Authorization: Bearer <token>`)",
        ));
    }
    let path = req.uri().path().to_owned();
    let parts: Vec<&str> = path.trim_start_matches("/admin/").split('/').collect();
    match (req.method().clone(), parts.as_slice()) {
        (Method::GET, ["components"]) => {
            let components: Vec<ComponentInfo> = admin.deployments.runtime().list();
            Ok(json_response(StatusCode::OK, &json!({ "components": components })))
        }
        (Method::PUT, ["components", name]) => {
            let name = (*name).to_owned();
            let wasm = read_body(req, MAX_UPLOAD, "component").await?;
            if wasm.is_empty() {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the body must be the component's .wasm bytes",
                ));
            }
            let loaded = admin.deployments.push(&name, wasm.to_vec()).await?;
            Ok(json_response(StatusCode::OK, &info_json(&loaded)))
        }
        (Method::POST, ["components", name, "rollback"]) => {
            let loaded = admin.deployments.rollback(name).await?;
            Ok(json_response(StatusCode::OK, &info_json(&loaded)))
        }
        (_, ["components"] | ["components", _] | ["components", _, "rollback"]) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{} is not allowed on {path}", req.method()),
        )),
        _ => Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {path}"))),
    }
}
