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
            let (push_tx, pushes) = mpsc::unbounded_channel();
            let client = Endpoint::cluster_client(seeds, Some(push_tx)).map_err(failed)?;
            let mut conn = client.get_async_connection().await.map_err(failed)?;
            conn.ssubscribe(&channels[0]).await.map_err(failed)?;
            conn.subscribe(&channels[1]).await.map_err(failed)?;
            let pump = ClusterPump {
                conn,
                inbox: channels[0].clone(),
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
/// noticed and replaced.
struct ClusterPump {
    conn: redis::cluster_async::ClusterConnection,
    inbox: String,
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
        let mut keepalive =
            tokio::time::interval_at(tokio::time::Instant::now() + self.keepalive, self.keepalive);
        keepalive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                        PushKind::SSubscribe if push_channel(&push).as_deref() == Some(self.inbox.as_str()) => {
                            inbox_confirmations += 1;
                            if inbox_confirmations > 1 {
                                self.resubscriptions.fetch_add(1, Ordering::Relaxed);
                                info!(channel = %self.inbox, "cluster bus resubscribed");
                                if self.tx.send(Inbound::Resubscribed).await.is_err() {
                                    return;
                                }
                            }
                        }
                        PushKind::Disconnection => {
                            self.losses.fetch_add(1, Ordering::Relaxed);
                            warn!(channel = %self.inbox, "cluster bus: a pub/sub connection was lost; the cluster client resubscribes");
                            if self.tx.send(Inbound::Lost).await.is_err() {
                                return;
                            }
                        }
                        _ => {}
                    }
                }
                _ = keepalive.tick() => {
                    match tokio::time::timeout(PING_TIMEOUT, redis::cmd("PING").query_async::<redis::Value>(&mut self.conn)).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => warn!(channel = %self.inbox, error = %e, "cluster bus: keepalive PING failed"),
                        Err(_) => warn!(channel = %self.inbox, "cluster bus: keepalive PING got no answer in {PING_TIMEOUT:?}"),
                    }
                }
                () = self.tx.closed() => return,
            }
        }
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
