//! Sending: a message's id and checks, carrying out the handlers' decisions (append to the
//! durable log, then local delivery or the recipient's node through the cluster bus, in the
//! sender's turn), and handing what was accepted to the message callback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use cim_proto::{Body, Delivery, Encoded, Frame, MessageKind, User};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::conn::{Offered, Outgoing};
use super::{LocalConn, RouteError, Router, Turn};
use crate::cluster::{BusDelivery, ClusterMessage};
use crate::config::Config;
use crate::handlers::{
    Delivered, Event, GroupDecision, HandlerError, Handlers, Message, PrivateRequest, Recipients,
    SendDecision,
};
use crate::message_id::now_us;
use crate::metrics::Metrics;
use crate::store::log::MAX_CLIENT_MSG_ID;
use crate::store::{Append, Appended, LogStream, LoggedMessage, Placed, StoreError};

/// What became of an accepted send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub message_id: u64,
    /// A private message whose receiver was not connected: it is in the log and reaches
    /// them at their next login.
    pub stored: bool,
}

/// Checks a client message id: at most [`MAX_CLIENT_MSG_ID`] bytes, printable.
pub fn validate_client_msg_id(id: &str) -> Result<(), RouteError> {
    if id.len() > MAX_CLIENT_MSG_ID {
        return Err(RouteError::Invalid(format!(
            "client_msg_id is {} bytes; the limit is {MAX_CLIENT_MSG_ID}",
            id.len()
        )));
    }
    if id.chars().any(char::is_control) {
        return Err(RouteError::Invalid("client_msg_id must not contain control characters".into()));
    }
    Ok(())
}

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
    fn new_message(&self, sender: &User, kind: MessageKind, text: String) -> Result<Message, RouteError> {
        let id = self.ids.next().ok_or_else(|| {
            StoreError::Unavailable(
                "no message id can be issued: this node's id reservation ran out (its node-number lease in redis could not be renewed)".into(),
            )
        })?;
        Metrics::inc(&self.metrics.messages_total);
        let accepted_us = now_us();
        Ok(Message { id, sender: sender.clone(), kind, text, timestamp_ms: accepted_us / 1000, accepted_us })
    }

    fn delivery(message: &Message, position: u64) -> Delivery {
        Delivery {
            message_id: message.id,
            sender: message.sender.clone(),
            kind: message.kind,
            text: message.text.clone(),
            timestamp_ms: message.timestamp_ms,
            position,
            replayed: false,
        }
    }

    /// Writes `message` to `streams` of the log (once, whatever the number of streams);
    /// `Err(Sent)` when `client_msg_id` was already used: the first send's answer. When the
    /// first send with that id may not have been written (its node died mid-way), the log
    /// writes this one under the first send's id, which `message` then takes.
    async fn append(
        &self,
        turn: &mut Turn,
        message: &mut Message,
        to: u64,
        recipients: Option<Vec<u64>>,
        streams: Vec<LogStream>,
        client_msg_id: String,
    ) -> Result<Result<Vec<Placed>, Sent>, RouteError> {
        let logged = LoggedMessage {
            id: message.id,
            sender_id: message.sender.id,
            sender_name: message.sender.name.clone(),
            group: message.kind == MessageKind::Group,
            text: message.text.clone(),
            timestamp_ms: message.timestamp_ms,
            to,
            recipients,
        };
        let append = Append { message: logged, streams, client_msg_id };
        let started = std::time::Instant::now();
        let appended = turn.append(self.store().log(), append).await;
        self.metrics.log_append_seconds.observe(started.elapsed().as_secs_f64());
        match appended? {
            Appended::Stored(placed) => Ok(Ok(placed)),
            Appended::Rewritten { message_id, placed } => {
                Metrics::inc(&self.metrics.duplicate_sends_total);
                message.id = message_id;
                Ok(Ok(placed))
            }
            Appended::Duplicate { message_id } => {
                Metrics::inc(&self.metrics.duplicate_sends_total);
                Ok(Err(Sent { message_id, stored: false }))
            }
        }
    }

    /// A live delivery of a message accepted at `accepted_us`, encoded once for every
    /// recipient's queue.
    fn encode_delivery(delivery: Delivery, accepted_us: u64) -> Outgoing {
        Outgoing::delivery(Encoded::from(Frame::push(Body::Delivery(delivery))), accepted_us)
    }

    /// Sends `text` from `sender` to user `to`.
    pub async fn send_private(
        &self,
        sender: &User,
        to: u64,
        text: String,
        client_msg_id: String,
    ) -> Result<Sent, RouteError> {
        validate_client_msg_id(&client_msg_id)?;
        let message = self.prepare(sender, MessageKind::Private, text)?;
        let decision = self.handlers.private(PrivateRequest { message: message.clone(), to }).await;
        self.finish_private(message, to, client_msg_id, decision, Turn::any()).await
    }

    /// Checks a message and gives it its id: the first step of a send. The handler's
    /// decision comes next (`Handlers::submit_*`), then `finish_*` carries it out.
    pub fn prepare(&self, sender: &User, kind: MessageKind, text: String) -> Result<Message, RouteError> {
        validate_text(&self.config, &text)?;
        self.new_message(sender, kind, text)
    }

    /// Carries out the private-send handler's decision on `message`: writes it to the
    /// receiver's inbox and the sender's, then hands the delivery on (queued locally, or
    /// queued for the receiver's node) in `turn`. A session finishes several sends at once,
    /// overlapping their store round trips, and turns keep its deliveries in the order it
    /// sent them. A receiver who is not connected gets it at their next login (`stored`).
    pub async fn finish_private(
        &self,
        mut message: Message,
        to: u64,
        client_msg_id: String,
        decision: Result<SendDecision, HandlerError>,
        mut turn: Turn,
    ) -> Result<Sent, RouteError> {
        if to == 0 {
            return Err(RouteError::Invalid("the receiver's user id must be a positive integer".into()));
        }
        match decision? {
            SendDecision::Deliver => {}
            SendDecision::Rewrite(text) => message.text = self.checked_rewrite(Event::Private, text)?,
            SendDecision::Reject(reason) => return Err(RouteError::Rejected(reason)),
        }
        // Where the receiver is, before the append: an offline one may be refused.
        let conn = self.local().get(&to).cloned();
        let remote = match (&conn, self.cluster.get()) {
            (None, Some(_)) => self.store().lookup(to).await?.filter(|e| e.node_id != self.config.node_id),
            _ => None,
        };
        if conn.is_none() && remote.is_none() && !self.config.offline_messages {
            return Err(RouteError::UserOffline(to));
        }
        let sender = message.sender.id;
        let streams = if to == sender {
            vec![LogStream::Inbox(to)]
        } else {
            vec![LogStream::Inbox(to), LogStream::Inbox(sender)]
        };
        let placed = match self.append(&mut turn, &mut message, to, None, streams, client_msg_id).await? {
            Ok(placed) => placed,
            Err(first) => return Ok(first),
        };
        let at = placed[0];
        let delivery = Self::delivery(&message, at.position);
        // The sender's copy moves their session's inbox past it (it is not sent to them).
        let own = |router: &Router| {
            if let (Some(own), Some(conn)) = (placed.get(1), router.local().get(&sender).cloned()) {
                router.offer(&conn, MessageKind::Private, *own, None);
            }
        };
        let delivered = match (conn, remote, self.cluster.get()) {
            (Some(conn), _, _) => {
                turn.wait().await;
                let queued = self.offer(
                    &conn,
                    MessageKind::Private,
                    at,
                    Some(Self::encode_delivery(delivery, message.accepted_us)),
                );
                own(self);
                turn.pass();
                queued
            }
            (None, Some(e), Some(cluster)) => {
                let msg = ClusterMessage::Deliver {
                    recipients: vec![to],
                    delivery: BusDelivery::new(&delivery, at.prev, message.accepted_us),
                };
                turn.wait().await;
                let published = cluster.bus.enqueue(&e.node_id, msg);
                own(self);
                turn.pass();
                match published.await {
                    Ok(n) => n > 0,
                    Err(err) => {
                        // It is in the log: the receiver gets it when they next log in.
                        warn!(node = %e.node_id, error = %err, "could not publish a private message; it stays stored");
                        false
                    }
                }
            }
            _ => {
                turn.wait().await;
                own(self);
                turn.pass();
                false
            }
        };
        if delivered {
            Metrics::inc(&self.metrics.deliveries_total);
        } else {
            Metrics::inc(&self.metrics.stored_offline_total);
        }
        let id = message.id;
        self.after_delivery(Delivered { message, recipients: vec![to] }).await;
        Ok(Sent { message_id: id, stored: !delivered })
    }

    /// Sends `text` from `sender` to the group; returns the message id and how many
    /// recipients it was queued to live (the others get it at their next login).
    pub async fn send_group(
        &self,
        sender: &User,
        text: String,
        client_msg_id: String,
    ) -> Result<(Sent, usize), RouteError> {
        validate_client_msg_id(&client_msg_id)?;
        let message = self.prepare(sender, MessageKind::Group, text)?;
        let decision = self.handlers.group(message.clone()).await;
        self.finish_group(message, client_msg_id, decision, Turn::any()).await
    }

    /// Carries out the group-send handler's decision on `message`; hands the deliveries on
    /// in `turn` (see [`Router::finish_private`]).
    pub async fn finish_group(
        &self,
        mut message: Message,
        client_msg_id: String,
        decision: Result<GroupDecision, HandlerError>,
        mut turn: Turn,
    ) -> Result<(Sent, usize), RouteError> {
        let decision = decision?;
        let sender = message.sender.clone();
        match decision.decision {
            SendDecision::Deliver => {}
            SendDecision::Rewrite(text) => message.text = self.checked_rewrite(Event::Group, text)?,
            SendDecision::Reject(reason) => return Err(RouteError::Rejected(reason)),
        }
        // Remote recipients first: if the store cannot be read, nothing is written at all.
        let remote = self.remote_recipients(sender.id, &decision.recipients).await?;
        // Once in the group stream, with the recipients the handler chose, so that a replay
        // gives each member what they were meant to get.
        let chosen = match &decision.recipients {
            Recipients::AllOnlineExceptSender => None,
            Recipients::Only(ids) => {
                Some(ids.iter().copied().collect::<BTreeSet<u64>>().into_iter().collect())
            }
        };
        let at = match self
            .append(&mut turn, &mut message, 0, chosen, vec![LogStream::Group], client_msg_id)
            .await?
        {
            Ok(placed) => placed[0],
            Err(first) => return Ok((first, 0)),
        };
        let delivery = Self::delivery(&message, at.position);
        let frame = Self::encode_delivery(delivery.clone(), message.accepted_us);
        turn.wait().await;
        let (targets, own): (Vec<LocalConn>, Option<LocalConn>) = {
            let local = self.local();
            let targets = match &decision.recipients {
                Recipients::AllOnlineExceptSender => {
                    local.values().filter(|c| c.user.id != sender.id).cloned().collect()
                }
                Recipients::Only(ids) => ids.iter().filter_map(|id| local.get(id).cloned()).collect(),
            };
            (targets, local.get(&sender.id).cloned())
        };
        let mut recipients = Vec::with_capacity(targets.len());
        for conn in targets {
            if self.offer(&conn, MessageKind::Group, at, Some(frame.clone())) {
                recipients.push(conn.user.id);
            }
        }
        // The sender's own line moves their session's group stream past it, unless the
        // handler's member list sent it to them too.
        if let Some(own) = own.filter(|o| !recipients.contains(&o.user.id)) {
            self.offer(&own, MessageKind::Group, at, None);
        }
        // Those here the member list left out: their group stream moves past it too.
        if let Recipients::Only(ids) = &decision.recipients {
            self.pass_over(ids, sender.id, at);
        }
        self.metrics.deliveries_total.inc_by(recipients.len() as u64);
        if let Some(cluster) = self.cluster.get() {
            let delivery = BusDelivery::new(&delivery, at.prev, message.accepted_us);
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
        Ok((Sent { message_id: id, stored: false }, count))
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
    pub fn deliver_local(&self, recipients: &[u64], delivery: BusDelivery) {
        // `prev`: the position written before it in its stream (see [`Placed`]).
        let (kind, at) = (delivery.kind, Placed { position: delivery.position, prev: delivery.prev });
        let accepted_us = delivery.accepted_us;
        let frame = Self::encode_delivery(delivery.into(), accepted_us);
        let conns: Vec<LocalConn> = {
            let local = self.local();
            recipients.iter().filter_map(|id| local.get(id).cloned()).collect()
        };
        for conn in conns {
            if self.offer(&conn, kind, at, Some(frame.clone())) {
                Metrics::inc(&self.metrics.deliveries_total);
            }
        }
    }

    /// Moves the group stream of every session here that a member-list handler left out
    /// of a group line (neither in `recipients` nor `sender`) past its entry `at`, so that
    /// their next group delivery needs no log read. (Another node's sessions left out read
    /// the log once for it.)
    fn pass_over(&self, recipients: &[u64], sender: u64, at: Placed) {
        let recipients: std::collections::HashSet<u64> = recipients.iter().copied().collect();
        let local = self.local();
        for conn in local.values().filter(|c| c.user.id != sender && !recipients.contains(&c.user.id)) {
            self.offer(conn, MessageKind::Group, at, None);
        }
    }

    /// Offers a delivery (or, with no frame, a note of the user's own entry) to `conn` in
    /// log order (see [`Seam`](super::Seam)), starting a fill from the log when it follows a
    /// gap. Whether it is (or will be) on its way to the client.
    pub(crate) fn offer(
        &self,
        conn: &LocalConn,
        kind: MessageKind,
        at: Placed,
        frame: Option<Outgoing>,
    ) -> bool {
        let offered = conn.offer_delivery(kind, at, frame, &self.metrics);
        if offered == Offered::Gap
            && let Some(router) = self.me.upgrade()
        {
            let conn = conn.clone();
            tokio::spawn(async move { router.fill(&conn).await });
        }
        offered.reached()
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

/// How long after one callback call the next one waits to gather what arrives meanwhile.
/// A message after a quiet spell is handed over at once; messages that follow it closely
/// (a conversation, a steady trickle) share the next call's instance instead of paying one
/// each. The callback trails delivery, so nobody waits on this.
pub(super) const CALLBACK_LINGER: Duration = Duration::from_millis(5);

/// The callback queue, and when the last call was handed its batch.
pub(super) struct CallbackQueue {
    rx: mpsc::Receiver<Delivered>,
    last_call: Option<Instant>,
}

impl CallbackQueue {
    pub(super) fn new(rx: mpsc::Receiver<Delivered>) -> Self {
        CallbackQueue { rx, last_call: None }
    }

    /// The next batch; empty once every sender is gone. Within [`CALLBACK_LINGER`] of the
    /// last call it sleeps until the linger ends (senders do not wake it meanwhile), then
    /// takes what has queued up. A full batch means a backlog: the next call does not linger.
    async fn next_batch(&mut self, batch: &mut Vec<Delivered>) {
        if self.rx.recv_many(batch, CALLBACK_BATCH).await == 0 {
            return;
        }
        if let Some(until) = self.last_call.map(|t| t + CALLBACK_LINGER)
            && batch.len() < CALLBACK_BATCH
            && until > Instant::now()
        {
            tokio::time::sleep_until(until).await;
            while batch.len() < CALLBACK_BATCH
                && let Ok(d) = self.rx.try_recv()
            {
                batch.push(d);
            }
        }
        self.last_call = (batch.len() < CALLBACK_BATCH).then(Instant::now);
    }
}

/// Runs the message callback over whatever has queued up since the last call: an idle
/// node calls it per message, a busy one amortises each call over a batch.
pub(super) async fn callback_worker(
    handlers: Arc<Handlers>,
    queue: Arc<tokio::sync::Mutex<CallbackQueue>>,
    metrics: Arc<Metrics>,
) {
    let mut batch = Vec::new();
    loop {
        queue.lock().await.next_batch(&mut batch).await;
        if batch.is_empty() {
            return;
        }
        if let Err(e) = handlers.callback(std::mem::take(&mut batch)).await {
            Metrics::inc(&metrics.handler_failures_total);
            warn!(error = %e, "message callback failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handlers::Message;

    fn delivered(id: u64) -> Delivered {
        let message = Message {
            id,
            sender: User { id: 1, name: "a".into() },
            kind: MessageKind::Private,
            text: "hi".into(),
            timestamp_ms: 0,
            accepted_us: 0,
        };
        Delivered { message, recipients: vec![2] }
    }

    async fn next(queue: &mut CallbackQueue) -> (Vec<u64>, Duration) {
        let started = Instant::now();
        let mut batch = Vec::new();
        queue.next_batch(&mut batch).await;
        (batch.iter().map(|d| d.message.id).collect(), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn the_callback_lingers_only_right_after_a_call() {
        let (tx, rx) = mpsc::channel(CALLBACK_QUEUE);
        let mut queue = CallbackQueue::new(rx);
        // A lone message goes at once.
        tx.send(delivered(1)).await.unwrap();
        assert_eq!(next(&mut queue).await, (vec![1], Duration::ZERO));
        // Messages close behind it share the next call, handed over when the linger ends.
        let sender = tx.clone();
        tokio::spawn(async move {
            for id in 2..=4 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                sender.send(delivered(id)).await.unwrap();
            }
        });
        let (ids, waited) = next(&mut queue).await;
        assert_eq!(ids, [2, 3, 4]);
        assert!(waited <= CALLBACK_LINGER, "{waited:?}");
        // After a quiet spell, at once again.
        tokio::time::sleep(CALLBACK_LINGER * 2).await;
        tx.send(delivered(5)).await.unwrap();
        assert_eq!(next(&mut queue).await, (vec![5], Duration::ZERO));
        // A backlog fills batches; after a full one the next does not linger.
        for id in 0..CALLBACK_BATCH as u64 + 1 {
            tx.send(delivered(100 + id)).await.unwrap();
        }
        assert_eq!(next(&mut queue).await.0.len(), CALLBACK_BATCH);
        assert_eq!(next(&mut queue).await, (vec![100 + CALLBACK_BATCH as u64], Duration::ZERO));
        // Every sender gone: an empty batch.
        drop(tx);
        assert_eq!(next(&mut queue).await.0, Vec::<u64>::new());
    }
}
