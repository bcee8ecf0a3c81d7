//! The HTTP listener(s): an accept loop with a cap on open connections, hyper underneath,
//! and one axum router per area composed here: [`routes`] (the route API), [`ws`] (`/ws`),
//! [`admin`] (`/admin/...`, on the main port or its own listener). [`extract`] holds the
//! auth and JSON extractors and the one error shape every answer uses.

pub mod admin;
pub mod extract;
pub mod routes;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper::StatusCode;
use hyper::header::CONTENT_TYPE;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt as _;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;
use tracing::{debug, info, warn};

pub use extract::ApiError;

use crate::transport::Sessions;

/// Hard ceiling on any request body (the largest is a component upload); each endpoint
/// reads less ([`crate::config::Config::max_http_body`] for JSON).
const MAX_ANY_BODY: usize = admin::MAX_UPLOAD;

/// How long open HTTP connections get to finish once shutdown starts.
const GRACE: Duration = Duration::from_secs(2);

/// Which areas a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Areas {
    /// The route API, `/ws`, health and metrics, and the admin API too.
    Everything,
    /// The route API, `/ws`, health and metrics; the admin API is on its own listener.
    Public,
    /// Only `/admin/...`.
    Admin,
}

/// The axum app for `areas`, with the layers every request goes through.
pub fn app(sessions: Sessions, areas: Areas) -> axum::Router {
    let http = &sessions.router.config().http;
    let router = match areas {
        Areas::Everything => routes::router().merge(ws::router()).merge(admin::router()),
        Areas::Public => routes::router().merge(ws::router()),
        Areas::Admin => admin::router(),
    };
    router
        .fallback(not_found)
        .layer(middleware::from_fn(json_errors))
        .layer(RequestBodyTimeoutLayer::new(http.body_timeout))
        .layer(RequestBodyLimitLayer::new(MAX_ANY_BODY))
        .layer(TraceLayer::new_for_http())
        .with_state(sessions)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no route {}", req.uri().path()))
}

/// Gives every error answer our JSON shape (`{"error", "message"}`), including those made by
/// axum (405) and tower-http (413 from the body limit), so clients parse one shape.
async fn json_errors(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (code, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            ("method_not_allowed", format!("{method} is not allowed on {path}"))
        }
        StatusCode::PAYLOAD_TOO_LARGE => ("too_large", format!("the body exceeds {MAX_ANY_BODY} bytes")),
        StatusCode::REQUEST_TIMEOUT => ("timeout", "the request body took too long".to_owned()),
        StatusCode::NOT_FOUND => ("not_found", format!("no route {path}")),
        s if s.is_client_error() => ("bad_request", format!("bad request to {path}")),
        _ => ("internal", format!("the server failed on {method} {path}")),
    };
    let mut fresh = ApiError::new(status, code, message).into_response();
    // Keep headers such as `Allow` on a 405.
    for (name, value) in resp.headers() {
        if name != CONTENT_TYPE && name != hyper::header::CONTENT_LENGTH {
            fresh.headers_mut().insert(name.clone(), value.clone());
        }
    }
    fresh
}

/// Serves `app` on `listener` until shutdown. At most `max_connections` HTTP connections
/// are open at once; one more is closed straight away (cheap, and the TCP chat listener
/// has its own limit). Open connections are shut down gracefully.
pub async fn serve(listener: TcpListener, app: axum::Router, sessions: Sessions) {
    let config = sessions.router.config().http.clone();
    let open = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = sessions.shutdown.cancelled() => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            crate::metrics::Metrics::inc(&sessions.router.metrics.http_connections_refused_total);
            debug!(%peer, max = config.max_connections, "http connection refused: at the connection cap");
            drop(socket);
            continue;
        };
        let app = app.clone();
        let shutdown = sessions.shutdown.clone();
        let header_timeout = config.header_timeout;
        sessions.tracker.spawn(async move {
            let _permit = permit;
            serve_connection(socket, peer, app, header_timeout, shutdown).await;
        });
    }
    info!("http listener stopped");
}

async fn serve_connection(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    app: axum::Router,
    header_timeout: Duration,
    shutdown: tokio_util::sync::CancellationToken,
) {
    // WebSocket sessions live on these connections: a delivery must not wait for the ACK of
    // the one before it (Nagle's algorithm), as on the TCP listener.
    let _ = socket.set_nodelay(true);
    let service = app.map_request(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(socket), TowerToHyperService::new(service))
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r { debug!(error = %e, %peer, "http connection ended") },
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(GRACE, conn).await;
        }
    }
}
