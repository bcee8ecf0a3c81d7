//! The cross-node message bus over Redis pub/sub: each node listens on its own inbox
//! channel (`<prefix>node:<id>:inbox`) and on the cluster-wide channel (`<prefix>cluster`).
//! Messages are JSON [`ClusterMessage`]s.
//!
//! On a Redis Cluster the inboxes are sharded channels (`SPUBLISH`/`SSUBSCRIBE`): a message
//! for one node travels only to the shard that owns its inbox's slot, instead of to every
//! server of the cluster as classic pub/sub does. The cluster channel stays classic, since
//! every node needs it anyway.
//!
//! Pub/sub is at-most-once: a message published while the receiving node is not subscribed
//! (down, or between a dropped connection and its resubscription) is lost, and
//! [`Bus::publish`] says so by returning 0 receivers.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use cim_proto::{Delivery, MessageKind, User};
use futures_util::{Stream, StreamExt};
use redis::aio::PubSub;
use redis::{PushInfo, PushKind};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::store::StoreError;
use crate::store::redis::{Endpoint, RedisConn, RedisKeys, RedisStore};

/// Messages buffered between the pub/sub connection and the consumer. When full, reading
/// from Redis pauses and Redis buffers (up to its pub/sub output limit).
pub const SUBSCRIPTION_QUEUE: usize = 1024;
/// How often an idle pub/sub connection is checked with a PING, so that a half-open
/// connection is noticed and replaced.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);
/// How long that PING may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Most messages for one node gathered into one publish.
const MAX_PUBLISH_BATCH: usize = 256;
/// An outbox with nothing to send for this long stops (the next message starts another).
const OUTBOX_IDLE: Duration = Duration::from_secs(60);
/// First and longest wait between resubscription attempts.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// A connection that lived this long was healthy: the next retry starts from [`RETRY_MIN`].
const STABLE: Duration = Duration::from_secs(10);

/// What one node asks of another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClusterMessage {
    /// Deliver `delivery` to `recipients`, who are connected to the receiving node.
    Deliver { recipients: Vec<u64>, delivery: BusDelivery },
    /// Close the user's connection on the receiving node.
    Kick { user_id: u64, reason: String },
    /// The component `name` now has the code with this hash; reload it.
    ComponentChanged { name: String, sha256: String },
    /// Several messages for one node in one publish (sent under load); a [`Subscription`]
    /// hands them out one by one, in order.
    Batch { messages: Vec<ClusterMessage> },
}

/// A [`Delivery`] as it crosses the bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusDelivery {
    pub message_id: u64,
    pub sender_id: u64,
    pub sender_name: String,
    #[serde(with = "kind_name")]
    pub kind: MessageKind,
    pub text: String,
    pub timestamp_ms: u64,
}

impl From<&Delivery> for BusDelivery {
    fn from(d: &Delivery) -> Self {
        BusDelivery {
            message_id: d.message_id,
            sender_id: d.sender.id,
            sender_name: d.sender.name.clone(),
            kind: d.kind,
            text: d.text.clone(),
            timestamp_ms: d.timestamp_ms,
        }
    }
}

impl From<BusDelivery> for Delivery {
    fn from(d: BusDelivery) -> Self {
        Delivery {
            message_id: d.message_id,
            sender: User { id: d.sender_id, name: d.sender_name },
            kind: d.kind,
            text: d.text,
            timestamp_ms: d.timestamp_ms,
        }
    }
}

/// [`MessageKind`] as `"private"` / `"group"`.
mod kind_name {
    use cim_proto::MessageKind;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(kind: &MessageKind, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(kind.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MessageKind, D::Error> {
        match String::deserialize(d)?.as_str() {
            "private" => Ok(MessageKind::Private),
            "group" => Ok(MessageKind::Group),
            other => Err(serde::de::Error::unknown_variant(other, &["private", "group"])),
        }
    }
}

/// Publishes to and subscribes to the bus. Cheap to clone: publishing shares the store's
/// connection; each [`Subscription`] opens its own pub/sub connection.
#[derive(Debug, Clone)]
pub struct Bus {
    endpoint: Endpoint,
    conn: RedisConn,
    keys: RedisKeys,
    keepalive: Duration,
    /// One ordered publisher per destination node, made on first use.
    outboxes: Arc<Mutex<HashMap<String, Outbox>>>,
}

/// What a node's outbox answers: how many subscribers heard the publish.
type Published = Result<usize, String>;
/// Unbounded: what waits in an outbox is bounded by its senders, each session having at most
/// 64 sends in flight.
type Outbox = mpsc::UnboundedSender<(ClusterMessage, oneshot::Sender<Published>)>;

impl Bus {
    pub fn new(store: &RedisStore) -> Self {
        Bus {
            endpoint: store.endpoint().clone(),
            conn: store.connection(),
            keys: store.keys().clone(),
            keepalive: DEFAULT_KEEPALIVE,
            outboxes: Arc::default(),
        }
    }

    /// Sets how often subscriptions PING an idle connection (default [`DEFAULT_KEEPALIVE`]).
    pub fn with_keepalive(mut self, every: Duration) -> Self {
        self.keepalive = every;
        self
    }

    /// Sends `msg` to the inbox of `node_id`. Returns how many subscribers received it:
    /// 0 means the node is not listening and the message is lost.
    pub async fn publish(&self, node_id: &str, msg: &ClusterMessage) -> Result<usize, StoreError> {
        self.enqueue(node_id, msg.clone()).await
    }

    /// Queues `msg` for the inbox of `node_id` at once and returns the publish's outcome to
    /// wait for. Messages for one node go out in the order they were queued; those queued
    /// while an earlier publish to that node is on the wire go out together as one
    /// [`ClusterMessage::Batch`], so a node busy with cross-node traffic costs one Redis
    /// publish per round trip, not one per message. Needs a tokio runtime the first time a
    /// node is named (its outbox task is spawned there).
    pub fn enqueue(
        &self,
        node_id: &str,
        msg: ClusterMessage,
    ) -> impl Future<Output = Result<usize, StoreError>> + Send + use<> {
        let (reply, answer) = oneshot::channel();
        let mut outboxes = self.outboxes.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = match outboxes.get(node_id) {
            Some(outbox) => outbox.send((msg, reply)).map_err(|mpsc::error::SendError(m)| m),
            None => Err((msg, reply)),
        };
        if let Err(queued) = sent {
            // No outbox yet, or it closed (idle, or its runtime shut down): start one, and
            // forget the other closed ones (nodes that went away).
            outboxes.retain(|_, outbox| !outbox.is_closed());
            let fresh = self.spawn_outbox(node_id);
            let _ = fresh.send(queued);
            outboxes.insert(node_id.to_owned(), fresh);
        }
        drop(outboxes);
        async move {
            answer
                .await
                .map_err(|_| StoreError::Unavailable("cluster bus: the publisher stopped".into()))?
                .map_err(StoreError::Unavailable)
        }
    }

    fn spawn_outbox(&self, node_id: &str) -> Outbox {
        let (tx, mut rx) = mpsc::unbounded_channel::<(ClusterMessage, oneshot::Sender<Published>)>();
        let command = if self.conn.is_cluster() { "SPUBLISH" } else { "PUBLISH" };
        let (conn, channel) = (self.conn.clone(), self.keys.inbox(node_id));
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(MAX_PUBLISH_BATCH);
            loop {
                match tokio::time::timeout(OUTBOX_IDLE, rx.recv_many(&mut batch, MAX_PUBLISH_BATCH)).await {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(_) => {
                        // Idle: close, then send what raced in before the close.
                        rx.close();
                        if rx.recv_many(&mut batch, MAX_PUBLISH_BATCH).await == 0 {
                            return;
                        }
                    }
                }
                let (mut messages, replies): (Vec<ClusterMessage>, Vec<_>) = batch.drain(..).unzip();
                let msg = match messages.len() {
                    1 => messages.remove(0),
                    _ => ClusterMessage::Batch { messages },
                };
                let heard = send(conn.clone(), command, &channel, &msg).await;
                for reply in replies {
                    let _ = reply.send(heard.clone());
                }
            }
        });
        tx
    }

    /// Sends `msg` to every node (including this one). Returns how many subscribers received
    /// it (on a Redis Cluster: only those connected to the server that took the message).
    pub async fn broadcast(&self, msg: &ClusterMessage) -> Result<usize, StoreError> {
        self.send("PUBLISH", self.keys.cluster_channel(), msg).await
    }

    async fn send(&self, command: &str, channel: String, msg: &ClusterMessage) -> Result<usize, StoreError> {
        send(self.conn.clone(), command, &channel, msg).await.map_err(StoreError::Unavailable)
    }

    /// Listens on the inbox of `node_id` and on the cluster channel. The first subscription
    /// is made before this returns (so a bad URL or a down Redis fails here); after that a
    /// dropped connection is logged and resubscribed with backoff, for as long as the
    /// [`Subscription`] lives.
    pub async fn subscribe(&self, node_id: &str) -> Result<Subscription, StoreError> {
        let channels = vec![self.keys.inbox(node_id), self.keys.cluster_channel()];
        let failed =
            |e: redis::RedisError| StoreError::Unavailable(format!("subscribing to {channels:?}: {e}"));
        let (tx, rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let resubscriptions = Arc::new(AtomicU64::new(0));
        let task = match &self.endpoint {
            Endpoint::Single(client) => {
                let first = connect(client, &channels).await.map_err(failed)?;
                let pump = Pump {
                    client: client.clone(),
                    channels,
                    tx,
                    keepalive: self.keepalive,
                    resubscriptions: resubscriptions.clone(),
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
                    keepalive: self.keepalive,
                    resubscriptions: resubscriptions.clone(),
                };
                tokio::spawn(pump.run())
            }
        };
        Ok(Subscription { rx, task, resubscriptions })
    }
}

/// `msg` as JSON on `channel` with `command` (`PUBLISH` or `SPUBLISH`); how many heard it.
async fn send(mut conn: RedisConn, command: &str, channel: &str, msg: &ClusterMessage) -> Published {
    let json = serde_json::to_vec(msg).map_err(|e| format!("encoding a cluster message: {e}"))?;
    redis::cmd(command)
        .arg(channel)
        .arg(json)
        .query_async(&mut conn)
        .await
        .map_err(|e| format!("redis {command} {channel}: {e}"))
}

/// A received message with its batches opened, in order.
fn unbatch(msg: ClusterMessage, out: &mut Vec<ClusterMessage>) {
    match msg {
        ClusterMessage::Batch { messages } => messages.into_iter().for_each(|m| unbatch(m, out)),
        other => out.push(other),
    }
}

async fn connect(client: &redis::Client, channels: &[String]) -> redis::RedisResult<PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channels).await?;
    Ok(pubsub)
}

/// Messages arriving for one node. Also a [`Stream`]. Dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: mpsc::Receiver<ClusterMessage>,
    task: JoinHandle<()>,
    resubscriptions: Arc<AtomicU64>,
}

impl Subscription {
    /// The next message; `None` only once the subscription has been shut down.
    pub async fn recv(&mut self) -> Option<ClusterMessage> {
        self.rx.recv().await
    }

    /// How many times the connection was lost and subscribed again (messages published in
    /// between were lost).
    pub fn resubscriptions(&self) -> u64 {
        self.resubscriptions.load(Ordering::Relaxed)
    }
}

impl Stream for Subscription {
    type Item = ClusterMessage;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ClusterMessage>> {
        self.rx.poll_recv(cx)
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
    tx: mpsc::Sender<ClusterMessage>,
    keepalive: Duration,
    resubscriptions: Arc<AtomicU64>,
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
                                if self.tx.send(m).await.is_err() {
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
    tx: mpsc::Sender<ClusterMessage>,
    keepalive: Duration,
    resubscriptions: Arc<AtomicU64>,
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
                                if self.tx.send(m).await.is_err() {
                                    return;
                                }
                            }
                        }
                        PushKind::SSubscribe if push_channel(&push).as_deref() == Some(self.inbox.as_str()) => {
                            inbox_confirmations += 1;
                            if inbox_confirmations > 1 {
                                self.resubscriptions.fetch_add(1, Ordering::Relaxed);
                                info!(channel = %self.inbox, "cluster bus resubscribed");
                            }
                        }
                        PushKind::Disconnection => {
                            warn!(channel = %self.inbox, "cluster bus: a pub/sub connection was lost; the cluster client resubscribes");
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use redis::AsyncCommands;

    use super::*;
    use crate::store::redis::test_support::TestRedis;

    /// Bus tests find their own pub/sub connection by listing the server's; one at a time.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn deliver() -> ClusterMessage {
        ClusterMessage::Deliver {
            recipients: vec![2, 3],
            delivery: BusDelivery {
                message_id: 99,
                sender_id: 1,
                sender_name: "ann".into(),
                kind: MessageKind::Group,
                text: "hi \u{1f44b}".into(),
                timestamp_ms: 1_700_000_000_000,
            },
        }
    }

    /// Publishes `msg` until a subscriber hears it, then returns what `sub` received.
    async fn round_trip(
        bus: &Bus,
        node: &str,
        sub: &mut Subscription,
        msg: &ClusterMessage,
    ) -> ClusterMessage {
        let deadline = Instant::now() + Duration::from_secs(10);
        while bus.publish(node, msg).await.unwrap() == 0 {
            assert!(Instant::now() < deadline, "nobody subscribed to the inbox of {node} within 10 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.expect("message within 5 s").unwrap()
    }

    /// Subscribes `node` and finds the server-side id of the new pub/sub connection: the one
    /// that appeared meanwhile. Retries if another client connected at the same moment.
    async fn subscribe_identified(bus: &Bus, node: &str) -> (Subscription, u64) {
        for _ in 0..5 {
            let before = pubsub_client_ids(bus).await;
            let sub = bus.subscribe(node).await.unwrap();
            let new: Vec<u64> = pubsub_client_ids(bus).await.difference(&before).copied().collect();
            if let [ours] = new[..] {
                return (sub, ours);
            }
        }
        panic!("could not single out our pub/sub connection: other clients keep subscribing");
    }

    async fn pubsub_client_ids(bus: &Bus) -> BTreeSet<u64> {
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut bus.conn.clone())
            .await
            .unwrap();
        list.lines()
            .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).and_then(|id| id.parse().ok()))
            .collect()
    }

    #[test]
    fn wire_format() {
        let json = serde_json::to_value(deliver()).unwrap();
        assert_eq!(json["type"], "deliver");
        assert_eq!(json["delivery"]["kind"], "group");
        let kick: ClusterMessage =
            serde_json::from_str(r#"{"type":"kick","user_id":5,"reason":"duplicate login"}"#).unwrap();
        assert_eq!(kick, ClusterMessage::Kick { user_id: 5, reason: "duplicate login".into() });
        let d = Delivery {
            message_id: 1,
            sender: User { id: 2, name: "b".into() },
            kind: MessageKind::Private,
            text: "t".into(),
            timestamp_ms: 3,
        };
        assert_eq!(Delivery::from(BusDelivery::from(&d)), d);
        let batch: ClusterMessage = serde_json::from_str(
            r#"{"type":"batch","messages":[{"type":"kick","user_id":1,"reason":"a"},{"type":"batch","messages":[{"type":"kick","user_id":2,"reason":"b"}]}]}"#,
        )
        .unwrap();
        let mut flat = Vec::new();
        unbatch(batch, &mut flat);
        let ids: Vec<u64> = flat
            .iter()
            .map(|m| match m {
                ClusterMessage::Kick { user_id, .. } => *user_id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, [1, 2]);
    }

    #[tokio::test]
    async fn publish_reaches_the_node_inbox_and_broadcast_reaches_everyone() {
        let _serial = SERIAL.lock().await;
        let t = TestRedis::new();
        let bus = Bus::new(&t.store().await);
        let mut a = bus.subscribe("a").await.unwrap();
        let mut b = bus.subscribe("b").await.unwrap();
        assert_eq!(round_trip(&bus, "a", &mut a, &deliver()).await, deliver());

        let changed = ClusterMessage::ComponentChanged { name: "group".into(), sha256: "ab".repeat(32) };
        assert_eq!(bus.broadcast(&changed).await.unwrap(), 2);
        for sub in [&mut a, &mut b] {
            let got = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap();
            assert_eq!(got, Some(changed.clone()));
        }
        assert_eq!(bus.publish("nobody", &deliver()).await.unwrap(), 0);

        // Garbage on the channel is skipped, not fatal.
        let _: usize = bus.conn.clone().publish(bus.keys.inbox("b"), "not json").await.unwrap();
        let kick = ClusterMessage::Kick { user_id: 7, reason: "x".into() };
        assert_eq!(round_trip(&bus, "b", &mut b, &kick).await, kick);
        assert_eq!(a.resubscriptions() + b.resubscriptions(), 0);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn messages_queued_for_a_node_arrive_in_order_batched_under_load() {
        let _serial = SERIAL.lock().await;
        let t = TestRedis::new();
        let bus = Bus::new(&t.store().await);
        let mut sub = bus.subscribe("n").await.unwrap();
        let first = ClusterMessage::Kick { user_id: 0, reason: "first".into() };
        assert_eq!(round_trip(&bus, "n", &mut sub, &first).await, first);
        let answers: Vec<_> = (1..=500u64)
            .map(|i| bus.enqueue("n", ClusterMessage::Kick { user_id: i, reason: String::new() }))
            .collect();
        for answer in answers {
            assert_eq!(answer.await.unwrap(), 1);
        }
        for i in 1..=500u64 {
            match tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap() {
                Some(ClusterMessage::Kick { user_id, .. }) => assert_eq!(user_id, i, "out of order"),
                other => panic!("unexpected {other:?}"),
            }
        }
        t.cleanup().await;
    }

    #[tokio::test]
    async fn keepalive_pings_keep_the_subscription() {
        let _serial = SERIAL.lock().await;
        let t = TestRedis::new();
        let bus = Bus::new(&t.store().await).with_keepalive(Duration::from_millis(50));
        let (mut sub, ours) = subscribe_identified(&bus, "n").await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let list: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("ID")
                .arg(ours)
                .query_async(&mut bus.conn.clone())
                .await
                .unwrap();
            if list.contains("cmd=ping") {
                break;
            }
            assert!(Instant::now() < deadline, "no keepalive PING within 5 s: {list}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(round_trip(&bus, "n", &mut sub, &deliver()).await, deliver());
        assert_eq!(sub.resubscriptions(), 0);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn a_killed_pubsub_connection_is_resubscribed() {
        let _serial = SERIAL.lock().await;
        let t = TestRedis::new();
        let bus = Bus::new(&t.store().await);
        let (mut sub, ours) = subscribe_identified(&bus, "n").await;
        assert_eq!(round_trip(&bus, "n", &mut sub, &deliver()).await, deliver());

        let killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(ours)
            .query_async(&mut bus.conn.clone())
            .await
            .unwrap();
        assert_eq!(killed, 1);
        let kick = ClusterMessage::Kick { user_id: 1, reason: "after reconnect".into() };
        assert_eq!(round_trip(&bus, "n", &mut sub, &kick).await, kick);
        assert_eq!(sub.resubscriptions(), 1);
        assert!(!pubsub_client_ids(&bus).await.contains(&ours));
        t.cleanup().await;
    }

    #[tokio::test]
    async fn dropping_the_subscription_unsubscribes() {
        let _serial = SERIAL.lock().await;
        let t = TestRedis::new();
        let bus = Bus::new(&t.store().await);
        let mut sub = bus.subscribe("n").await.unwrap();
        assert_eq!(round_trip(&bus, "n", &mut sub, &deliver()).await, deliver());
        drop(sub);
        let deadline = Instant::now() + Duration::from_secs(5);
        while bus.publish("n", &deliver()).await.unwrap() != 0 {
            assert!(Instant::now() < deadline, "still subscribed 5 s after the drop");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        t.cleanup().await;
    }
}
