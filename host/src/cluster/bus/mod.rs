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

mod message;
mod subscription;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

pub use self::message::{BusDelivery, ClusterMessage};
pub use self::subscription::{Inbound, SUBSCRIPTION_QUEUE, Subscription};
use crate::store::StoreError;
use crate::store::redis::{Endpoint, RedisConn, RedisKeys, RedisStore};

/// How often an idle pub/sub connection is checked with a PING, so that a half-open
/// connection is noticed and replaced.
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(30);
/// Most messages for one node gathered into one publish.
const MAX_PUBLISH_BATCH: usize = 256;
/// An outbox with nothing to send for this long stops (the next message starts another).
const OUTBOX_IDLE: Duration = Duration::from_secs(60);

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
        subscription::open(&self.endpoint, channels, self.keepalive).await
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
