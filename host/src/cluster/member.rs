//! This node as a member of a cluster: it keeps its registry entry fresh, reaps the users of
//! nodes that died, restores its own presence entries when Redis lost them, and delivers what
//! other nodes publish to its inbox.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::lb::{Balancer, Strategy};
use super::{Bus, ClusterMessage, NodeInfo, Registry, Subscription};
use crate::router::Router;
use crate::store::{RedisStore, StoreError};

/// What a node needs to take part in a cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub store: Arc<RedisStore>,
    pub registry: Registry,
    pub bus: Bus,
    pub balancer: Arc<Balancer>,
    /// Registry entries live this long unless refreshed (every third of it).
    pub ttl: Duration,
}

impl Cluster {
    pub fn new(store: Arc<RedisStore>, strategy: Strategy, ttl: Duration) -> Self {
        Cluster {
            registry: Registry::new(&store),
            bus: Bus::new(&store),
            store,
            balancer: Arc::new(Balancer::new(strategy)),
            ttl,
        }
    }

    /// Subscribes to this node's inbox and registers it: call before serving clients.
    pub async fn join(&self, me: &NodeInfo) -> Result<Subscription, StoreError> {
        let sub = self.bus.subscribe(&me.id).await?;
        self.registry.register(me, self.ttl).await?;
        Ok(sub)
    }
}

/// Runs until shutdown: the registry heartbeat and the inbox.
pub async fn run(
    cluster: Cluster,
    router: Arc<Router>,
    mut me: NodeInfo,
    mut inbox: Subscription,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(cluster.ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut healthy = true;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = inbox.recv() => match msg {
                Some(msg) => on_message(&router, msg).await,
                None => break,
            },
            _ = tick.tick() => {
                me.connections = router.local_connections() as u64;
                healthy = heartbeat(&cluster, &router, &me, healthy).await;
            }
        }
    }
    if let Err(e) = cluster.registry.remove(&me.id).await {
        warn!(error = %e, "could not remove this node from the registry");
    }
}

/// One registry refresh. Returns whether Redis answered.
async fn heartbeat(cluster: &Cluster, router: &Router, me: &NodeInfo, was_healthy: bool) -> bool {
    if let Err(e) = cluster.registry.register(me, cluster.ttl).await {
        if was_healthy {
            warn!(error = %e, "redis unreachable: cannot refresh this node's registry entry; will retry");
        }
        return false;
    }
    if !was_healthy {
        info!("redis reachable again");
    }
    // Redis restarted empty, or this node was reaped while it stalled: put our users back.
    let local = router.local_connections();
    match cluster.store.node_user_count(&me.id).await {
        Ok(n) if n != local || !was_healthy => router.resync_presence().await,
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not count this node's users"),
    }
    match cluster.registry.reap_dead_nodes().await {
        Ok(0) => {}
        Ok(n) => info!(users = n, "removed the users of nodes that stopped refreshing their registry entry"),
        Err(e) => warn!(error = %e, "could not reap dead nodes"),
    }
    // Announcements of pushes are fire-and-forget pub/sub: catch up on any this node missed.
    router.sync_components().await;
    true
}

async fn on_message(router: &Router, msg: ClusterMessage) {
    match msg {
        ClusterMessage::Deliver { recipients, delivery } => {
            router.deliver_local(&recipients, delivery.into());
        }
        ClusterMessage::Kick { user_id, reason } => router.kick_local(user_id, &reason),
        ClusterMessage::ComponentChanged { name, sha256 } => router.component_changed(&name, &sha256).await,
        // A subscription opens batches; nodes never nest them.
        ClusterMessage::Batch { messages } => {
            warn!(messages = messages.len(), "ignoring a nested cluster message batch")
        }
    }
}
