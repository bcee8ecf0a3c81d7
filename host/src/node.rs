//! Wiring of one node: bound listeners in, a running node out; shutdown drains sessions
//! within a deadline.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::admin::Admin;
use crate::config::Config;
use crate::handlers::Backend;
use crate::router::{Advertised, Router};
use crate::store::Store;
use crate::transport::{self, Sessions};

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub tcp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    pub router: Arc<Router>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Node {
    /// Binds both listeners and starts serving.
    pub async fn bind(
        config: Config,
        tcp: SocketAddr,
        http: SocketAddr,
        store: Store,
        backend: Backend,
        admin: Option<Arc<Admin>>,
    ) -> anyhow::Result<Node> {
        let tcp =
            TcpListener::bind(tcp).await.with_context(|| format!("binding the TCP listener to {tcp}"))?;
        let http =
            TcpListener::bind(http).await.with_context(|| format!("binding the HTTP listener to {http}"))?;
        Node::start(config, tcp, http, store, backend, admin)
    }

    /// Starts serving on already-bound listeners.
    pub fn start(
        config: Config,
        tcp: TcpListener,
        http: TcpListener,
        store: Store,
        backend: Backend,
        admin: Option<Arc<Admin>>,
    ) -> anyhow::Result<Node> {
        let tcp_addr = tcp.local_addr()?;
        let http_addr = http.local_addr()?;
        let router = Router::new(Arc::new(config), store, backend);
        router.set_advertised(Advertised {
            tcp_addr: tcp_addr.to_string(),
            ws_url: format!("ws://{http_addr}/ws"),
        });
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let sessions = Sessions::new(router.clone(), admin, shutdown.clone(), tracker.clone());
        tracker.spawn(transport::tcp::serve(tcp, sessions.clone()));
        tracker.spawn(crate::api::serve(http, sessions));
        Ok(Node { tcp_addr, http_addr, router, shutdown, tracker })
    }

    /// Stops accepting, tells every client, and waits (up to the drain timeout) for
    /// sessions to close.
    pub async fn shutdown(self) {
        info!("shutting down");
        self.router.kick_all("the server is shutting down");
        self.shutdown.cancel();
        self.tracker.close();
        let deadline = self.router.config().drain_timeout;
        if tokio::time::timeout(deadline, self.tracker.wait()).await.is_err() {
            warn!("some connections did not close within {deadline:?}");
        }
    }
}
