//! This node as a member of a cluster, as four tasks that never wait for each other:
//! - the **heartbeat** refreshes the registry entry and the message-id number lease every
//!   `ttl / 3` (every 250 ms while Redis does not answer) and nothing else, so a slow rebuild
//!   or compile never lets them expire;
//! - the **inbox** hands what other nodes publish to local sessions at once;
//! - **housekeeping** puts this node's users back when Redis lost them (the heartbeat found
//!   the node's own entry gone, or a presence check every `ttl / 2` found some of its
//!   entries gone while that entry survived), releases entries left by sessions that closed while Redis was
//!   away, and reaps nodes that died;
//! - **components** follows pushes made on other nodes (a compile may take a while).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::lb::{Balancer, Strategy};
use super::node_number::NodeNumber;
use super::reconcile::{missing_entries, reconcile, release_leftovers};
use super::{Bus, ClusterMessage, Inbound, NodeInfo, Registry, Subscription};
use cim_proto::{ErrorCode, Positions};

use crate::router::Router;
use crate::store::{RedisStore, StoreError};

/// How soon a failed registry refresh or rebuild is tried again (at most `ttl / 3`).
const RETRY: Duration = Duration::from_millis(250);

/// What a node needs to take part in a cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub store: Arc<RedisStore>,
    pub registry: Registry,
    pub bus: Bus,
    pub balancer: Arc<Balancer>,
    /// Registry entries live this long unless refreshed (every third of it).
    pub ttl: Duration,
    /// Rebuilds of this node's presence so far (see [`super::reconcile`]).
    pub rebuilds: Arc<AtomicU64>,
}

impl Cluster {
    pub fn new(store: Arc<RedisStore>, strategy: Strategy, ttl: Duration) -> Self {
        Cluster {
            registry: Registry::new(&store),
            bus: Bus::new(&store),
            store,
            balancer: Arc::new(Balancer::new(strategy)),
            ttl,
            rebuilds: Arc::default(),
        }
    }

    /// Subscribes to this node's inbox and registers it: call before serving clients.
    /// Online entries that a previous run under the same node id left behind are removed
    /// first: this node has no session yet, so they are all stale.
    pub async fn join(&self, me: &NodeInfo) -> Result<Subscription, StoreError> {
        let sub = self.bus.subscribe(&me.id).await?;
        let stale = self.registry.forget_users(&me.id).await?;
        if stale > 0 {
            info!(users = stale, "removed online entries a previous run of this node left behind");
        }
        self.registry.register(me, self.ttl).await?;
        Ok(sub)
    }
}

/// Set by the heartbeat when this node's entries may be gone from Redis; taken by
/// housekeeping, which rebuilds them.
#[derive(Debug, Default)]
struct Lost {
    pending: AtomicBool,
    wake: Notify,
}

impl Lost {
    fn raise(&self) {
        self.pending.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    fn take(&self) -> bool {
        self.pending.swap(false, Ordering::SeqCst)
    }
}

/// Runs until shutdown (or until the inbox subscription ends): the heartbeat, the inbox,
/// housekeeping and component sync, each its own task. Removes this node from the registry
/// and gives its node number up on the way out.
pub async fn run(
    cluster: Cluster,
    router: Arc<Router>,
    me: NodeInfo,
    number: NodeNumber,
    inbox: Subscription,
    shutdown: CancellationToken,
) {
    let stop = shutdown.child_token();
    let lost = Arc::new(Lost::default());
    let (changes, changed) = mpsc::unbounded_channel();
    let node_id = me.id.clone();
    let tasks = [
        tokio::spawn(heartbeat(cluster.clone(), router.clone(), me, number, lost.clone(), stop.clone())),
        tokio::spawn(deliver(router.clone(), inbox, changes, stop.clone())),
        tokio::spawn(housekeeping(cluster.clone(), router.clone(), node_id.clone(), lost, stop.clone())),
        tokio::spawn(follow_components(router, changed, cluster.ttl / 3, stop.clone())),
    ];
    for task in tasks {
        if let Err(e) = task.await {
            warn!(error = %e, "a cluster member task failed");
            stop.cancel();
        }
    }
    if let Err(e) = cluster.registry.remove(&node_id).await {
        warn!(error = %e, "could not remove this node from the registry");
    }
}

/// Refreshes the registry entry every `ttl / 3`, and raises `lost` when the refresh finds the
/// entry gone: Redis restarted empty, or this node stalled past its TTL and may have been
/// reaped. Renews the node-number lease right after (which raises the message-id ceiling).
/// Never waits for anything but the refresh itself.
async fn heartbeat(
    cluster: Cluster,
    router: Arc<Router>,
    mut me: NodeInfo,
    mut number: NodeNumber,
    lost: Arc<Lost>,
    stop: CancellationToken,
) {
    let period = cluster.ttl / 3;
    let mut healthy = true;
    let mut wait = period;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
        me.connections = router.local_connections() as u64;
        wait = match cluster.registry.register(&me, cluster.ttl).await {
            Ok(was_there) => {
                if !healthy {
                    info!("redis reachable again");
                    healthy = true;
                }
                if !was_there {
                    warn!(
                        "this node's registry entry was gone (redis lost it, or the node stalled past its ttl): registered again; putting its users back"
                    );
                    lost.raise();
                }
                match number.renew(router.ids()).await {
                    Ok(None) => period,
                    Ok(Some(wait)) => wait.clamp(RETRY, period),
                    Err(e) => {
                        warn!(error = %e, "could not renew this node's message-id number lease; will retry");
                        RETRY.min(period)
                    }
                }
            }
            Err(e) => {
                if healthy {
                    warn!(error = %e, "redis unreachable: cannot refresh this node's registry entry; will retry");
                    healthy = false;
                }
                RETRY.min(period)
            }
        };
    }
    if let Err(e) = number.release(router.ids()).await {
        warn!(error = %e, "could not give this node's message-id number up");
    }
}

/// How often the inbox task notes where every session is, for a catch-up after a loss.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(500);

/// Hands inbox messages to local sessions as they come; component changes go to
/// [`follow_components`] so that a compile never holds up a delivery.
///
/// Deliveries published while the inbox subscription was lost never arrive; the log has
/// them. When the subscription reports the loss, every live session here is held (its seam
/// closes: later deliveries wait); when it reports the resubscription, a catch-up sends each
/// session what the log holds past where it was, then lets the held ones through, so that
/// each conversation stays in order. The catch-up starts from where each session was one
/// snapshot before the loss was seen: deliveries from users on this node may have moved a
/// session's position past ones lost on the bus in the meantime.
async fn deliver(
    router: Arc<Router>,
    mut inbox: Subscription,
    changes: mpsc::UnboundedSender<(String, String)>,
    stop: CancellationToken,
) {
    // A closed inbox ends the member: this node can no longer hear other nodes.
    let _end_all = stop.clone().drop_guard();
    let mut snapshot = router.queued_positions();
    let mut catch_up_from: Option<HashMap<u64, Positions>> = None;
    let mut held = Vec::new();
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                if catch_up_from.is_none() {
                    snapshot = router.queued_positions();
                }
                continue;
            }
            event = inbox.next_event() => event,
        };
        let msg = match event {
            Some(Inbound::Message(msg)) => msg,
            Some(Inbound::Lost) => {
                catch_up_from.get_or_insert_with(|| std::mem::take(&mut snapshot));
                held.extend(router.hold_live());
                continue;
            }
            Some(Inbound::Resubscribed) => {
                // (A cluster client may resubscribe without a reported loss.)
                let from = catch_up_from.take().unwrap_or_else(|| std::mem::take(&mut snapshot));
                held.extend(router.hold_live());
                tokio::spawn(catch_up(router.clone(), std::mem::take(&mut held), from));
                continue;
            }
            None => {
                // No resubscription will come: let held sessions go; one whose held
                // deliveries follow a gap is closed, to resume from the log at its next login.
                for conn in held.drain(..) {
                    go_live_or_resume(&router, &conn);
                }
                break;
            }
        };
        match msg {
            ClusterMessage::Deliver { recipients, delivery } => {
                // The sending node's `send` span carries the same message id.
                let _span = tracing::debug_span!("delivery", message_id = delivery.message_id).entered();
                router.deliver_local(&recipients, delivery);
            }
            ClusterMessage::Kick { user_id, reason, conn_id: None, .. } => {
                router.kick_local(user_id, &reason)
            }
            ClusterMessage::Kick { user_id, reason, conn_id: Some(conn), replaced } => {
                let code = if replaced { ErrorCode::Replaced } else { ErrorCode::Unexpected };
                router.kick_conn(user_id, conn, code, &reason);
            }
            ClusterMessage::Presence { users, resync } => router.presence_remote(users, resync),
            ClusterMessage::ComponentChanged { name, sha256 } => {
                // Only fails once the components task has stopped, i.e. at shutdown.
                let _ = changes.send((name, sha256));
            }
            // A subscription opens batches; nodes never nest them.
            ClusterMessage::Batch { messages } => {
                warn!(messages = messages.len(), "ignoring a nested cluster message batch")
            }
        }
    }
}

/// Housekeeping rounds between two presence checks ([`missing_entries`]): every `ttl / 2`.
const CHECK_EVERY: u32 = 3;

/// Catches `held` sessions up from the log after the inbox was resubscribed, trying again
/// while the store does not answer (a Redis Cluster still forming says CLUSTERDOWN for a
/// while); sessions stay held meanwhile. After [`CATCH_UP_FOR`] the rest go live without it
/// (what they missed then comes at their next login).
async fn catch_up(
    router: Arc<Router>,
    mut held: Vec<crate::router::LocalConn>,
    from: HashMap<u64, Positions>,
) {
    let started = Instant::now();
    let mut wait = RETRY;
    loop {
        match router.catch_up(held.clone(), &from).await {
            Ok(n) => {
                info!(deliveries = n, "caught local sessions up after the cluster inbox was resubscribed");
                return;
            }
            Err(e) if started.elapsed() < CATCH_UP_FOR => {
                warn!(error = %e, retry_in = ?wait, "could not catch local sessions up from the log yet");
            }
            Err(e) => {
                warn!(error = %e, "could not catch local sessions up from the log: they get it at their next login");
                for conn in &held {
                    go_live_or_resume(&router, conn);
                }
                return;
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
        // Those already caught up went live.
        held.retain(|c| !c.seam.is_live());
    }
}

/// Lets a held session go live without a catch-up; one whose held deliveries follow a gap
/// is closed with `UNAVAILABLE` instead, so that it resumes from its acknowledged position
/// at its next login (letting it acknowledge past the gap would lose those messages).
fn go_live_or_resume(router: &Router, conn: &crate::router::LocalConn) {
    if !conn.go_live(conn.seam.queued(), &router.metrics) {
        conn.close_to_resume();
    }
}

/// How long a catch-up keeps trying while the store does not answer.
const CATCH_UP_FOR: Duration = Duration::from_secs(30);

/// Rebuilds this node's entries when `lost` is raised or a presence check finds some gone,
/// releases what closed sessions left, and reaps dead nodes. Runs every `ttl / 6` and
/// whenever `lost` is raised.
///
/// A node found without a registry entry is reaped only once it has stayed so for `ttl / 2`:
/// after Redis restarts empty, every live node's entry is missing until its next refresh
/// (within `ttl / 3`), and reaping it then would drop users it had just put back.
async fn housekeeping(
    cluster: Cluster,
    router: Arc<Router>,
    me: String,
    lost: Arc<Lost>,
    stop: CancellationToken,
) {
    let period = cluster.ttl / 6;
    let grace = cluster.ttl / 2;
    let mut suspects: HashMap<String, Instant> = HashMap::new();
    let mut wait = period;
    let mut round = 0u32;
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = lost.wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        wait = period;
        round = round.wrapping_add(1);
        if round.is_multiple_of(CHECK_EVERY) && !lost.pending.load(Ordering::SeqCst) {
            match missing_entries(&cluster.store, &router).await {
                Ok(0) => {}
                Ok(missing) => {
                    warn!(
                        missing,
                        "some of this node's online entries are gone from redis while its registry entry is there: putting them back"
                    );
                    lost.pending.store(true, Ordering::SeqCst);
                }
                Err(e) => warn!(error = %e, "could not check this node's online entries"),
            }
        }
        if lost.take() {
            cluster.rebuilds.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            match reconcile(&cluster.store, &router).await {
                Ok(r) => info!(
                    restored = r.restored,
                    already_there = r.held,
                    closed_as_duplicates = r.kicked,
                    released = r.released,
                    took_ms = started.elapsed().as_millis() as u64,
                    "put this node's users back into redis"
                ),
                Err(e) => {
                    warn!(error = %e, "could not put this node's users back into redis; will retry");
                    lost.pending.store(true, Ordering::SeqCst);
                    wait = RETRY.min(period);
                    continue;
                }
            }
        }
        release_leftovers(&cluster.store, &router).await;
        if reap_dead(&cluster.registry, &me, &mut suspects, grace).await > 0 {
            router.presence_unlisted();
        }
    }
}

/// Reaps the nodes (never `me`) whose registry entry has been gone for at least `grace`,
/// as far as this node has seen; `suspects` remembers when each was first seen gone.
/// Returns how many online entries it removed.
async fn reap_dead(
    registry: &Registry,
    me: &str,
    suspects: &mut HashMap<String, Instant>,
    grace: Duration,
) -> usize {
    let mut removed = 0;
    let dead = match registry.dead_nodes(me).await {
        Ok(dead) => dead,
        Err(e) => {
            warn!(error = %e, "could not list dead nodes");
            return 0;
        }
    };
    suspects.retain(|id, _| dead.contains(id));
    let now = Instant::now();
    for id in dead {
        let since = *suspects.entry(id.clone()).or_insert(now);
        if now.duration_since(since) < grace {
            continue;
        }
        match registry.reap(&id).await {
            Ok(Some(n)) => {
                info!(node = %id, users = n, "reaped a dead node");
                suspects.remove(&id);
                removed += n;
            }
            // It registered again meanwhile.
            Ok(None) => {
                suspects.remove(&id);
            }
            Err(e) => {
                warn!(error = %e, node = %id, "could not reap a dead node");
                return removed;
            }
        }
    }
    removed
}

/// Follows component pushes announced on the bus, one at a time and in order, and every
/// `period` checks every component against the cluster's versions (announcements are
/// fire-and-forget pub/sub: this catches up on any this node missed).
async fn follow_components(
    router: Arc<Router>,
    mut changed: mpsc::UnboundedReceiver<(String, String)>,
    period: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            change = changed.recv() => match change {
                Some((name, sha256)) => router.component_changed(&name, &sha256).await,
                None => break,
            },
            _ = tick.tick() => router.sync_components().await,
        }
    }
}
