//! Sending: a message's id and checks, carrying out the handlers' decisions (local
//! delivery, or the recipient's node through the cluster bus, in the sender's turn), and
//! handing what was delivered to the message callback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use cim_proto::{Body, Delivery, Encoded, Frame, MessageKind, User};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{LocalConn, RouteError, Router, Turn};
use crate::cluster::{BusDelivery, ClusterMessage};
use crate::config::Config;
use crate::handlers::{
    Delivered, Event, GroupDecision, HandlerError, Handlers, Message, PrivateRequest, Recipients,
    SendDecision,
};
use crate::message_id::now_ms;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Most messages handed to one callback call.
pub(super) const CALLBACK_BATCH: usize = 512;
/// Delivered messages waiting for the callback before senders wait for room.
pub(super) const CALLBACK_QUEUE: usize = 65_536;

/// Checks a message text: not empty, within `max_text` bytes.
pub(super) fn validate_text(config: &Config, text: &str) -> Result<(), RouteError> {
    if text.is_empty() {
        return Err(RouteError::Invalid("message text must not be empty".into()));
    }
    if text.len() > config.max_text {
        return Err(RouteError::Invalid(format!(
            "message text is {} bytes; the limit is {}",
            text.len(),
            config.max_text
        )));
    }
    Ok(())
}

impl Router {
    fn new_message(&self, sender: &User, kind: MessageKind, text: String) -> Message {
        Metrics::inc(&self.metrics.messages_total);
        Message { id: self.ids.next(), sender: sender.clone(), kind, text, timestamp_ms: now_ms() }
    }

    fn delivery(message: &Message) -> Delivery {
        Delivery {
            message_id: message.id,
            sender: message.sender.clone(),
            kind: message.kind,
            text: message.text.clone(),
            timestamp_ms: message.timestamp_ms,
        }
    }

    /// A delivery encoded once, for every recipient's queue.
    fn encode_delivery(delivery: Delivery) -> Encoded {
        Encoded::from(Frame::push(Body::Delivery(delivery)))
    }

    /// Sends `text` from `sender` to user `to`; returns the message id.
    pub async fn send_private(&self, sender: &User, to: u64, text: String) -> Result<u64, RouteError> {
        let message = self.prepare(sender, MessageKind::Private, text)?;
        let decision = self.handlers.private(PrivateRequest { message: message.clone(), to }).await;
        self.finish_private(message, to, decision, Turn::any()).await
    }

    /// Checks a message and gives it its id: the first step of a send. The handler's
    /// decision comes next (`Handlers::submit_*`), then `finish_*` carries it out.
    pub fn prepare(&self, sender: &User, kind: MessageKind, text: String) -> Result<Message, RouteError> {
        validate_text(&self.config, &text)?;
        Ok(self.new_message(sender, kind, text))
    }

    /// Carries out the private-send handler's decision on `message`. The delivery is handed
    /// on (queued locally, or queued for the receiver's node) in `turn`: a session finishes
    /// several sends at once, overlapping their store round trips, and turns keep its
    /// deliveries in the order it sent them.
    pub async fn finish_private(
        &self,
        mut message: Message,
        to: u64,
        decision: Result<SendDecision, HandlerError>,
        mut turn: Turn,
    ) -> Result<u64, RouteError> {
        match decision? {
            SendDecision::Deliver => {}
            SendDecision::Rewrite(text) => message.text = self.checked_rewrite(Event::Private, text)?,
            SendDecision::Reject(reason) => return Err(RouteError::Rejected(reason)),
        }
        let delivery = Self::delivery(&message);
        let conn = self.local().get(&to).cloned();
        match (conn, self.cluster.get()) {
            (Some(conn), _) => {
                turn.wait().await;
                if !conn.offer(Self::encode_delivery(delivery), &self.metrics) {
                    return Err(RouteError::UserOffline(to));
                }
                turn.pass();
            }
            (None, Some(cluster)) => match self.store().lookup(to).await? {
                Some(e) if e.node_id != self.config.node_id => {
                    let msg = ClusterMessage::Deliver {
                        recipients: vec![to],
                        delivery: BusDelivery::from(&delivery),
                    };
                    turn.wait().await;
                    let published = cluster.bus.enqueue(&e.node_id, msg);
                    turn.pass();
                    if published.await? == 0 {
                        return Err(RouteError::Store(StoreError::Unavailable(format!(
                            "user {to} is on node {} which does not answer",
                            e.node_id
                        ))));
                    }
                }
                _ => return Err(RouteError::UserOffline(to)),
            },
            (None, None) => return Err(RouteError::UserOffline(to)),
        }
        Metrics::inc(&self.metrics.deliveries_total);
        let id = message.id;
        self.after_delivery(Delivered { message, recipients: vec![to] }).await;
        Ok(id)
    }

    /// Sends `text` from `sender` to the group; returns the message id and how many
    /// recipients it was queued to.
    pub async fn send_group(&self, sender: &User, text: String) -> Result<(u64, usize), RouteError> {
        let message = self.prepare(sender, MessageKind::Group, text)?;
        let decision = self.handlers.group(message.clone()).await;
        self.finish_group(message, decision, Turn::any()).await
    }

    /// Carries out the group-send handler's decision on `message`; hands the deliveries on
    /// in `turn` (see [`Router::finish_private`]).
    pub async fn finish_group(
        &self,
        mut message: Message,
        decision: Result<GroupDecision, HandlerError>,
        mut turn: Turn,
    ) -> Result<(u64, usize), RouteError> {
        let decision = decision?;
        let sender = message.sender.clone();
        match decision.decision {
            SendDecision::Deliver => {}
            SendDecision::Rewrite(text) => message.text = self.checked_rewrite(Event::Group, text)?,
            SendDecision::Reject(reason) => return Err(RouteError::Rejected(reason)),
        }
        let delivery = Self::delivery(&message);
        let frame = Self::encode_delivery(delivery.clone());
        // Remote recipients first: if the store cannot be read, nothing is delivered at all.
        let remote = self.remote_recipients(sender.id, &decision.recipients).await?;
        turn.wait().await;
        let targets: Vec<LocalConn> = {
            let local = self.local();
            match &decision.recipients {
                Recipients::AllOnlineExceptSender => {
                    local.values().filter(|c| c.user.id != sender.id).cloned().collect()
                }
                Recipients::Only(ids) => ids.iter().filter_map(|id| local.get(id).cloned()).collect(),
            }
        };
        let mut recipients = Vec::with_capacity(targets.len());
        for conn in targets {
            if conn.offer(frame.clone(), &self.metrics) {
                recipients.push(conn.user.id);
            }
        }
        self.metrics.deliveries_total.fetch_add(recipients.len() as u64, Ordering::Relaxed);
        if let Some(cluster) = self.cluster.get() {
            let delivery = BusDelivery::from(&delivery);
            // One message per node that holds recipients, not one per user.
            let published: Vec<_> = remote
                .into_iter()
                .map(|(node, ids)| {
                    let msg = ClusterMessage::Deliver { recipients: ids.clone(), delivery: delivery.clone() };
                    let published = cluster.bus.enqueue(&node, msg);
                    (node, ids, published)
                })
                .collect();
            turn.pass();
            for (node, ids, published) in published {
                match published.await {
                    Ok(0) => {
                        warn!(node = %node, users = ids.len(), "node does not answer; group message not delivered there")
                    }
                    Ok(_) => recipients.extend(ids),
                    Err(e) => warn!(node = %node, error = %e, "could not publish a group message"),
                }
            }
        }
        turn.pass();
        let id = message.id;
        let count = recipients.len();
        debug!(message = id, recipients = count, "group message delivered");
        self.after_delivery(Delivered { message, recipients }).await;
        Ok((id, count))
    }

    /// Recipients of a group message on other nodes, by node.
    async fn remote_recipients(
        &self,
        sender: u64,
        recipients: &Recipients,
    ) -> Result<BTreeMap<String, Vec<u64>>, RouteError> {
        let mut by_node: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        if self.cluster.get().is_none() {
            return Ok(by_node);
        }
        // A member list costs its own size; "everyone" costs the whole online set.
        let candidates = match recipients {
            Recipients::AllOnlineExceptSender => self.store().online().await?,
            Recipients::Only(ids) => {
                let unique: Vec<u64> = ids.iter().copied().collect::<BTreeSet<u64>>().into_iter().collect();
                self.store().lookup_many(&unique).await?
            }
        };
        for e in candidates {
            let wanted = matches!(recipients, Recipients::Only(_)) || e.user.id != sender;
            if wanted && e.node_id != self.config.node_id {
                by_node.entry(e.node_id).or_default().push(e.user.id);
            }
        }
        Ok(by_node)
    }

    /// Delivers a message another node routed here to its local recipients.
    pub fn deliver_local(&self, recipients: &[u64], delivery: Delivery) {
        let frame = Self::encode_delivery(delivery);
        let conns: Vec<LocalConn> = {
            let local = self.local();
            recipients.iter().filter_map(|id| local.get(id).cloned()).collect()
        };
        for conn in conns {
            if conn.offer(frame.clone(), &self.metrics) {
                Metrics::inc(&self.metrics.deliveries_total);
            }
        }
    }

    /// A handler's rewritten text obeys the same limits as a client's.
    fn checked_rewrite(&self, event: Event, text: String) -> Result<String, RouteError> {
        validate_text(&self.config, &text).map_err(|e| {
            RouteError::Handler(HandlerError {
                event,
                component: self.component_name(event),
                reason: format!("rewrote the message to an invalid text: {e}"),
            })
        })?;
        Ok(text)
    }

    fn component_name(&self, event: Event) -> String {
        self.handlers
            .runtime()
            .and_then(|rt| rt.current(event))
            .map_or_else(|| "builtin".to_owned(), |l| l.name.to_string())
    }

    /// Hands a delivered message to the callback worker, off the sender's path. When the
    /// callback cannot keep up and its queue is full, senders wait for room rather than the
    /// callback (the history) silently missing messages.
    async fn after_delivery(&self, delivered: Delivered) {
        let delivered = match self.callbacks.try_send(delivered) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Full(d)) => d,
            Err(mpsc::error::TrySendError::Closed(d)) => {
                warn!(message = d.message.id, "the message callback worker is gone; callback skipped");
                Metrics::inc(&self.metrics.callbacks_dropped_total);
                return;
            }
        };
        Metrics::inc(&self.metrics.callback_backpressure_total);
        if self.callbacks.send(delivered).await.is_err() {
            Metrics::inc(&self.metrics.callbacks_dropped_total);
        }
    }
}

/// Runs the message callback over whatever has queued up since the last call: an idle
/// node calls it per message, a busy one amortises each call over a batch.
pub(super) async fn callback_worker(
    handlers: Arc<Handlers>,
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Delivered>>>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::new();
    while rx.lock().await.recv_many(&mut batch, CALLBACK_BATCH).await > 0 {
        if let Err(e) = handlers.callback(std::mem::take(&mut batch)).await {
            Metrics::inc(&metrics.handler_failures_total);
            warn!(error = %e, "message callback failed");
        }
    }
}
