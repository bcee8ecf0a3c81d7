//! The receiving side of the bus: a [`Subscription`] and the task behind it, which forwards
//! messages and resubscribes after a lost connection (classic pub/sub on one server, sharded
//! inbox plus classic cluster channel on a Redis Cluster).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt};
use redis::aio::PubSub;
use redis::cluster_async::ClusterConnection;
use redis::{PushInfo, PushKind};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::message::{ClusterMessage, unbatch};
use crate::store::StoreError;
use crate::store::redis::Endpoint;

/// Messages buffered between the pub/sub connection and the consumer. When full, reading
/// from Redis pauses and Redis buffers (up to its pub/sub output limit).
pub const SUBSCRIPTION_QUEUE: usize = 1024;
/// How long a keepalive PING may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// First and longest wait between resubscription attempts.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long was healthy: the next retry starts from [`RETRY_MIN`].
const STABLE: Duration = Duration::from_secs(10);
/// How often a cluster client whose connection was lost is PINGed until it answers.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A cluster client whose PINGs have failed this long, or that has not subscribed the inbox
/// again this long after a lost connection, is replaced with a new one from the seeds (at
/// once if it says it has no connection at all).
const REBUILD_AFTER: Duration = Duration::from_secs(5);
/// How long building and subscribing a new cluster client may take.
const REBUILD_TIMEOUT: Duration = Duration::from_secs(10);

/// Subscribes to `channels` (the inbox first, then the cluster channel) and starts the task
/// that forwards their messages and keeps the subscription alive.
pub(super) async fn open(
    endpoint: &Endpoint,
    channels: Vec<String>,
    keepalive: Duration,
) -> Result<Subscription, StoreError> {
    let failed = |e: redis::RedisError| StoreError::Unavailable(format!("subscribing to {channels:?}: {e}"));
    let (tx, rx) = mpsc::channel::<Inbound>(SUBSCRIPTION_QUEUE);
    let resubscriptions = Arc::new(AtomicU64::new(0));
    let losses = Arc::new(AtomicU64::new(0));
    let task = match endpoint {
        Endpoint::Single(client) => {
            let first = connect(client, &channels).await.map_err(failed)?;
            let pump = Pump {
                client: client.clone(),
                channels,
                tx,
                keepalive,
                resubscriptions: resubscriptions.clone(),
                losses: losses.clone(),
            };
            tokio::spawn(pump.run(first))
        }
        Endpoint::Cluster(seeds) => {
            let (conn, pushes) = cluster_subscribe(seeds, &channels).await.map_err(failed)?;
            let pump = ClusterPump {
                seeds: seeds.clone(),
                conn,
                channels,
                pushes,
                tx,
                keepalive,
                resubscriptions: resubscriptions.clone(),
                losses: losses.clone(),
            };
            tokio::spawn(pump.run())
        }
    };
    Ok(Subscription { rx, task, resubscriptions, losses })
}

async fn connect(client: &redis::Client, channels: &[String]) -> redis::RedisResult<PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channels).await?;
    Ok(pubsub)
}

/// A new cluster client subscribed to the inbox (sharded) and the cluster channel, and the
/// pushes it receives.
async fn cluster_subscribe(
    seeds: &[String],
    channels: &[String],
) -> redis::RedisResult<(ClusterConnection, mpsc::UnboundedReceiver<PushInfo>)> {
    let (push_tx, pushes) = mpsc::unbounded_channel();
    let client = Endpoint::cluster_client(seeds, Some(push_tx))?;
    let mut conn = client.get_async_connection().await?;
    conn.ssubscribe(&channels[0]).await?;
    conn.subscribe(&channels[1]).await?;
    Ok((conn, pushes))
}

/// What a subscription hands out, in the order it happened: messages, and the moments the
/// connection was lost and subscribed again (messages published in between never arrive), so
/// that the consumer can hold what comes after a resubscription until it has caught up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Message(ClusterMessage),
    /// The connection was found lost; nothing more arrives until [`Inbound::Resubscribed`].
    Lost,
    /// Subscribed again; what follows was published after this point.
    Resubscribed,
}

/// Messages arriving for one node. Also a [`Stream`] of messages. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<Inbound>,
    task: JoinHandle<()>,
    resubscriptions: Arc<AtomicU64>,
    losses: Arc<AtomicU64>,
}

impl Subscription {
    /// The next message (losses and resubscriptions skipped); `None` only once the
    /// subscription has been shut down.
    pub async fn recv(&mut self) -> Option<ClusterMessage> {
        loop {
            if let Inbound::Message(m) = self.rx.recv().await? {
                return Some(m);
            }
        }
    }

    /// The next message, loss or resubscription; `None` only once the subscription has
    /// been shut down.
    pub async fn next_event(&mut self) -> Option<Inbound> {
        self.rx.recv().await
    }

    /// How many times the connection was lost and subscribed again (messages published in
    /// between were lost).
    pub fn resubscriptions(&self) -> u64 {
        self.resubscriptions.load(Ordering::Relaxed)
    }

    /// How many times the connection was found lost (counted at once, before the
    /// resubscription that [`Subscription::resubscriptions`] counts).
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }
}

impl Stream for Subscription {
    type Item = ClusterMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClusterMessage>> {
        loop {
            match std::task::ready!(self.rx.poll_recv(cx)) {
                Some(Inbound::Message(m)) => return Poll::Ready(Some(m)),
                Some(_) => continue,
                None => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The task behind a [`Subscription`]: forwards messages, and reconnects when the
/// connection drops.
struct Pump {
    client: redis::Client,
    channels: Vec<String>,
    tx: mpsc::Sender<Inbound>,
    keepalive: Duration,
    resubscriptions: Arc<AtomicU64>,
    losses: Arc<AtomicU64>,
}

impl Pump {
    async fn run(self, first: PubSub) {
        let mut pubsub = Some(first);
        let mut backoff = RETRY_MIN;
        loop {
            let ps = match pubsub.take() {
                Some(ps) => ps,
                None => {
                    tokio::time::sleep(backoff).await;
                    match connect(&self.client, &self.channels).await {
                        Ok(ps) => {
                            self.resubscriptions.fetch_add(1, Ordering::Relaxed);
                            info!(channels = ?self.channels, "cluster bus resubscribed");
                            if self.tx.send(Inbound::Resubscribed).await.is_err() {
                                return;
                            }
                            ps
                        }
                        Err(e) => {
                            backoff = (backoff * 2).min(RETRY_MAX);
                            warn!(channels = ?self.channels, error = %e, retry_in = ?backoff, "cluster bus: resubscribing failed");
                            continue;
                        }
                    }
                }
            };
            let since = Instant::now();
            match self.forward(ps).await {
                None => return,
                Some(why) => {
                    self.losses.fetch_add(1, Ordering::Relaxed);
                    if self.tx.send(Inbound::Lost).await.is_err() {
                        return;
                    }
                    backoff =
                        if since.elapsed() >= STABLE { RETRY_MIN } else { (backoff * 2).min(RETRY_MAX) };
                    warn!(channels = ?self.channels, reason = %why, retry_in = ?backoff, "cluster bus: pub/sub connection lost; resubscribing");
                }
            }
        }
    }

    /// Forwards messages until the consumer goes away (`None`) or the connection is lost
    /// (`Some(why)`).
    async fn forward(&self, pubsub: PubSub) -> Option<String> {
        let (mut sink, mut stream) = pubsub.split();
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + self.keepalive, self.keepalive);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { return Some("connection closed".to_owned()) };
                    match serde_json::from_slice::<ClusterMessage>(msg.get_payload_bytes()) {
                        Ok(m) => {
                            let mut messages = Vec::new();
                            unbatch(m, &mut messages);
                            for m in messages {
                                if self.tx.send(Inbound::Message(m)).await.is_err() {
                                    return None;
                                }
                            }
                        }
                        Err(e) => warn!(channel = msg.get_channel_name(), error = %e, "cluster bus: dropping an unreadable message"),
                    }
                }
                _ = keepalive.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Some(format!("keepalive PING failed: {e}")),
                        Err(_) => return Some(format!("keepalive PING got no answer in {PING_TIMEOUT:?}")),
                    }
                }
                () = self.tx.closed() => return None,
            }
        }
    }
}

/// The task behind a [`Subscription`] on a Redis Cluster. The cluster connection follows
/// the inbox's shard and resubscribes after a lost connection or a slot migration on its
/// own; this forwards what it pushes and PINGs it when idle, so that a dead server is
/// noticed and replaced. After a lost connection it PINGs every [`PROBE_EVERY`] until an
/// answer comes, and replaces a client that has stopped finding the cluster (see
/// `store::redis::cluster_conn`) with a new one from the seeds.
struct ClusterPump {
    seeds: Vec<String>,
    conn: ClusterConnection,
    /// The inbox (sharded), then the cluster channel.
    channels: Vec<String>,
    /// Unbounded because the library's push sender must not block; drained at once into
    /// the bounded `tx`, so it grows only while the consumer is behind.
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    tx: mpsc::Sender<Inbound>,
    keepalive: Duration,
    resubscriptions: Arc<AtomicU64>,
    losses: Arc<AtomicU64>,
}

impl ClusterPump {
    async fn run(mut self) {
        let mut next_ping = tokio::time::Instant::now() + self.keepalive;
        // Since when a connection was lost without the inbox being subscribed again, and
        // since when PINGs have failed.
        let mut lost_since: Option<Instant> = None;
        let mut failing_since: Option<Instant> = None;
        let mut inbox_confirmations = 0u64;
        loop {
            tokio::select! {
                push = self.pushes.recv() => {
                    let Some(push) = push else { return };
                    match push.kind {
                        PushKind::Message | PushKind::SMessage => {
                            let Some(msg) = decode_push(&push) else { continue };
                            let mut messages = Vec::new();
                            unbatch(msg, &mut messages);
                            for m in messages {
                                if self.tx.send(Inbound::Message(m)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        PushKind::SSubscribe if push_channel(&push).as_deref() == Some(self.channels[0].as_str()) => {
                            inbox_confirmations += 1;
                            if inbox_confirmations > 1 {
                                lost_since = None;
                                self.resubscriptions.fetch_add(1, Ordering::Relaxed);
                                info!(channel = %self.channels[0], "cluster bus resubscribed");
                                if self.tx.send(Inbound::Resubscribed).await.is_err() {
                                    return;
                                }
                            }
                        }
                        PushKind::Disconnection => {
                            self.losses.fetch_add(1, Ordering::Relaxed);
                            warn!(channel = %self.channels[0], "cluster bus: a pub/sub connection was lost; the cluster client resubscribes");
                            if self.tx.send(Inbound::Lost).await.is_err() {
                                return;
                            }
                            lost_since.get_or_insert_with(Instant::now);
                            next_ping = next_ping.min(tokio::time::Instant::now() + PROBE_EVERY);
                        }
                        _ => {}
                    }
                }
                () = tokio::time::sleep_until(next_ping) => {
                    let ping = tokio::time::timeout(PING_TIMEOUT, redis::cmd("PING").query_async::<redis::Value>(&mut self.conn)).await;
                    let no_connection = match &ping {
                        Ok(Ok(_)) => {
                            failing_since = None;
                            if lost_since.is_none_or(|t| t.elapsed() < REBUILD_AFTER) {
                                let every = if lost_since.is_some() { PROBE_EVERY } else { self.keepalive };
                                next_ping = tokio::time::Instant::now() + every;
                                continue;
                            }
                            // The client answers but has not subscribed the inbox again (it
                            // can lose a subscription whose slot had no node when it tried).
                            warn!(channel = %self.channels[0], "cluster bus: the inbox was not subscribed again within {REBUILD_AFTER:?} of a lost connection");
                            false
                        }
                        Ok(Err(e)) => {
                            warn!(channel = %self.channels[0], error = %e, "cluster bus: keepalive PING failed");
                            e.kind() == redis::ErrorKind::ClusterConnectionNotFound
                        }
                        Err(_) => {
                            warn!(channel = %self.channels[0], "cluster bus: keepalive PING got no answer in {PING_TIMEOUT:?}");
                            false
                        }
                    };
                    let failing = match &ping {
                        Ok(Ok(_)) => Duration::ZERO,
                        _ => failing_since.get_or_insert_with(Instant::now).elapsed(),
                    };
                    let lost = lost_since.map_or(Duration::ZERO, |t| t.elapsed());
                    if no_connection || failing.max(lost) >= REBUILD_AFTER {
                        match self.rebuild().await {
                            Some(true) => {
                                (lost_since, failing_since) = (None, None);
                                inbox_confirmations = 0;
                            }
                            Some(false) => {}
                            None => return,
                        }
                    }
                    next_ping = tokio::time::Instant::now() + PROBE_EVERY;
                }
                () = self.tx.closed() => return,
            }
        }
    }

    /// Replaces the cluster client with a new one from the seeds, subscribed again, and
    /// tells the consumer (a loss, then a resubscription). `Some(false)` if that failed (the
    /// next failed PING tries again), `None` if the consumer is gone.
    async fn rebuild(&mut self) -> Option<bool> {
        warn!(channel = %self.channels[0], "cluster bus: rebuilding the cluster client from the seeds");
        let built =
            tokio::time::timeout(REBUILD_TIMEOUT, cluster_subscribe(&self.seeds, &self.channels)).await;
        let (conn, pushes) = match built {
            Ok(Ok(built)) => built,
            Ok(Err(e)) => {
                warn!(channel = %self.channels[0], error = %e, "cluster bus: rebuilding the cluster client failed");
                return Some(false);
            }
            Err(_) => {
                warn!(channel = %self.channels[0], "cluster bus: rebuilding the cluster client took over {REBUILD_TIMEOUT:?}");
                return Some(false);
            }
        };
        // Whatever the old client still had is dropped with it; the consumer catches up.
        (self.conn, self.pushes) = (conn, pushes);
        self.losses.fetch_add(1, Ordering::Relaxed);
        self.tx.send(Inbound::Lost).await.ok()?;
        self.resubscriptions.fetch_add(1, Ordering::Relaxed);
        info!(channel = %self.channels[0], "cluster bus resubscribed with a new cluster client");
        self.tx.send(Inbound::Resubscribed).await.ok()?;
        Some(true)
    }
}

/// The channel a push names (its first element).
fn push_channel(push: &PushInfo) -> Option<String> {
    push.data.first().and_then(|v| redis::from_redis_value_ref(v).ok())
}

/// The [`ClusterMessage`] a `message`/`smessage` push carries (`[channel, payload]`).
fn decode_push(push: &PushInfo) -> Option<ClusterMessage> {
    let channel = push_channel(push).unwrap_or_default();
    let Some(redis::Value::BulkString(payload)) = push.data.get(1) else {
        warn!(%channel, kind = ?push.kind, "cluster bus: dropping a push without a payload");
        return None;
    };
    serde_json::from_slice(payload)
        .map_err(|e| warn!(%channel, error = %e, "cluster bus: dropping an unreadable message"))
        .ok()
}
