//! Wiring of one node: bound listeners in, a running node out; shutdown drains sessions
//! within a deadline.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::cluster::node_number::NodeNumber;
use crate::cluster::{Cluster, NodeInfo};
use crate::config::Config;
use crate::deploy::Deployments;
use crate::handlers::Backend;
use crate::http::Areas;
use crate::http::admin::Admin;
use crate::router::{Advertised, Router};
use crate::store::Store;
use crate::transport::{self, Sessions};

/// What a node is made of besides its listeners.
#[derive(Debug)]
pub struct Services {
    pub store: Store,
    pub backend: Backend,
    /// The admin API, when an admin token is configured.
    pub admin: Option<Arc<Admin>>,
    /// Pushed component versions (absent with the built-in handlers).
    pub deployments: Option<Arc<Deployments>>,
    /// Set when the store is Redis: this node joins the cluster.
    pub cluster: Option<Cluster>,
    /// Where a node outside a cluster reserves its message ids (`message-ids` in the data
    /// directory), so that a restart never repeats one. `None`: only in memory, unique while
    /// the process runs (see `message_id`).
    pub ids_dir: Option<PathBuf>,
}

impl Services {
    /// A single node on the in-memory store with the built-in handlers.
    pub fn builtin() -> Self {
        Services {
            store: Store::memory(),
            backend: Backend::Builtin,
            admin: None,
            deployments: None,
            cluster: None,
            ids_dir: None,
        }
    }
}

/// The address handed out for a listener bound to `bound`: `advertise` if given. Without
/// it, a wildcard bind (0.0.0.0, ::) names no reachable host: refused in a cluster (other
/// nodes' clients would be sent to 0.0.0.0), a warning on a single node.
fn advertised_addr(
    listener: &str,
    bound: SocketAddr,
    advertise: Option<&str>,
    in_cluster: bool,
) -> anyhow::Result<String> {
    if let Some(addr) = advertise {
        return Ok(addr.to_owned());
    }
    if bound.ip().is_unspecified() {
        let why = format!(
            "the {listener} listener is bound to {bound}, which is no address a client can connect to; \
             pass --advertise-{listener} HOST:PORT to say where clients reach it"
        );
        anyhow::ensure!(!in_cluster, "{why}");
        warn!("{why}");
    }
    Ok(bound.to_string())
}

/// Now and then forgets the rate-limit buckets of users and addresses that went quiet, so
/// the limiters hold only recent clients.
async fn forget_idle_rate_limits(limits: Arc<crate::limits::RateLimits>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => limits.forget_idle(),
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Every few seconds renews the data-directory reservation of message ids, so that `next`
/// seldom has to write the file itself.
async fn refill_ids(router: Arc<Router>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let r = router.clone();
        match tokio::task::spawn_blocking(move || r.ids().refill()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!(error = %e, "could not reserve more message ids in the data directory"),
            Err(e) => warn!(error = %e, "the message-id reservation task failed"),
        }
    }
}

/// A running node.
#[derive(Debug)]
pub struct Node {
    pub tcp_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// The admin API's own listener, when it has one.
    pub admin_addr: Option<SocketAddr>,
    pub router: Arc<Router>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Node {
    /// Binds the listeners and starts serving. With `admin`, the admin API has a listener
    /// of its own there and is not served on the main HTTP port.
    pub async fn bind(
        config: Config,
        tcp: SocketAddr,
        http: SocketAddr,
        admin: Option<SocketAddr>,
        services: Services,
    ) -> anyhow::Result<Node> {
        let tcp =
            TcpListener::bind(tcp).await.with_context(|| format!("binding the TCP listener to {tcp}"))?;
        let http =
            TcpListener::bind(http).await.with_context(|| format!("binding the HTTP listener to {http}"))?;
        let admin = match admin {
            Some(a) => Some(
                TcpListener::bind(a).await.with_context(|| format!("binding the admin listener to {a}"))?,
            ),
            None => None,
        };
        Node::start(config, tcp, http, admin, services).await
    }

    /// Starts serving on already-bound listeners. In a cluster, the node registers itself
    /// and subscribes to its inbox before it accepts anyone.
    pub async fn start(
        config: Config,
        tcp: TcpListener,
        http: TcpListener,
        admin: Option<TcpListener>,
        services: Services,
    ) -> anyhow::Result<Node> {
        let tcp_addr = tcp.local_addr()?;
        let http_addr = http.local_addr()?;
        let admin_addr = admin.as_ref().map(TcpListener::local_addr).transpose()?;
        let node_id = config.node_id.clone();
        let in_cluster = services.cluster.is_some();
        let tcp_public = advertised_addr("tcp", tcp_addr, config.advertise_tcp.as_deref(), in_cluster)?;
        let http_public = advertised_addr("http", http_addr, config.advertise_http.as_deref(), in_cluster)?;
        let router = Router::new(Arc::new(config), services.store, services.backend);
        let advertised = Advertised { tcp_addr: tcp_public, ws_url: format!("ws://{http_public}/ws") };
        router.set_advertised(advertised.clone());
        if let Some(d) = &services.deployments {
            router.set_deployments(d.clone());
        }
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        if let Some(cluster) = services.cluster {
            let me = NodeInfo {
                id: node_id,
                tcp_addr: advertised.tcp_addr,
                ws_url: advertised.ws_url,
                http_addr: http_public,
                connections: 0,
            };
            // The number first: its wait (a fresh cluster's quarantine) may be longer than
            // the registry TTL, and the registry entry is refreshed only once the member
            // tasks run, so registering before it would let the entry expire (and peers
            // reap this node's users) before the first heartbeat.
            let mut number = NodeNumber::new(&cluster.store, &me.id, cluster.ttl);
            number.acquire(router.ids()).await.context("leasing a node number for message ids")?;
            info!(number = ?number.number(), "leased this node's number in message ids");
            let inbox = cluster.join(&me).await.context("joining the cluster")?;
            router.set_cluster(cluster.clone());
            tracker.spawn(crate::cluster::member::run(
                cluster,
                router.clone(),
                me,
                number,
                inbox,
                shutdown.clone(),
            ));
        } else if let Some(dir) = &services.ids_dir {
            router.ids().persist_in(dir).with_context(|| {
                format!("reserving message ids in {}", dir.join(crate::message_id::FILE_NAME).display())
            })?;
            tracker.spawn(refill_ids(router.clone(), shutdown.clone()));
        }
        tracker.spawn(forget_idle_rate_limits(router.config().rate_limits.clone(), shutdown.clone()));
        let sessions = Sessions::new(router.clone(), services.admin, shutdown.clone(), tracker.clone());
        tracker.spawn(transport::tcp::serve(tcp, sessions.clone()));
        match admin {
            Some(admin) => {
                let admin_app = crate::http::app(sessions.clone(), Areas::Admin);
                tracker.spawn(crate::http::serve(admin, admin_app, sessions.clone()));
                let app = crate::http::app(sessions.clone(), Areas::Public);
                tracker.spawn(crate::http::serve(http, app, sessions));
            }
            None => {
                let app = crate::http::app(sessions.clone(), Areas::Everything);
                tracker.spawn(crate::http::serve(http, app, sessions));
            }
        }
        Ok(Node { tcp_addr, http_addr, admin_addr, router, shutdown, tracker })
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
        // The other nodes' subscribers learn that this node's users left.
        self.router.flush_presence().await;
    }
}
