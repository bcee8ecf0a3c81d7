//! The router: carries out what the handlers decide. It binds users to local connections,
//! keeps routes and the online set in the store, and delivers messages to recipients.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cim_proto::{Body, Delivery, Encoded, ErrorCode, Frame, MessageKind, User};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::cluster::{BusDelivery, Cluster, ClusterMessage};
use crate::config::Config;
use crate::deploy::Deployments;
use crate::handlers::{
    Backend, Context, Delivered, Event, GroupDecision, HandlerError, Handlers, LoginDecision, LoginRequest,
    Message, PrivateRequest, Recipients, SendDecision,
};
use crate::message_id::{MessageIds, now_ms};
use crate::metrics::Metrics;
use crate::store::{Claim, OnlineEntry, Store, StoreError};

mod conn;
mod turn;

pub use conn::{Closer, Closing, LocalConn};
pub use turn::Turn;

/// Why a request was refused; each maps to one protocol [`ErrorCode`] and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("{0}")]
    Invalid(String),
    #[error("user {0} is already online")]
    DuplicateLogin(u64),
    #[error("{0}")]
    Rejected(String),
    #[error("user {0} is not online")]
    UserOffline(u64),
    #[error(transparent)]
    Handler(#[from] HandlerError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RouteError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RouteError::Invalid(_) => ErrorCode::Invalid,
            RouteError::DuplicateLogin(_) => ErrorCode::DuplicateLogin,
            RouteError::Rejected(_) => ErrorCode::Rejected,
            RouteError::UserOffline(_) => ErrorCode::UserOffline,
            RouteError::Handler(_) => ErrorCode::HandlerFailed,
            RouteError::Store(_) => ErrorCode::Unavailable,
        }
    }
}

/// The addresses clients are told to connect to.
#[derive(Debug, Clone)]
pub struct Advertised {
    pub tcp_addr: String,
    pub ws_url: String,
}

/// The answer to a route login.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RouteAnswer {
    pub node_id: String,
    pub tcp_addr: String,
    pub ws_url: String,
}

/// Checks a user name: non-empty, bounded, printable.
pub fn validate_user(config: &Config, id: u64, name: &str) -> Result<(), RouteError> {
    if id == 0 {
        return Err(RouteError::Invalid("user id must be a positive integer".into()));
    }
    if name.trim().is_empty() {
        return Err(RouteError::Invalid("user name must not be empty".into()));
    }
    if name.len() > config.max_name {
        return Err(RouteError::Invalid(format!(
            "user name is {} bytes; the limit is {}",
            name.len(),
            config.max_name
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(RouteError::Invalid("user name must not contain control characters".into()));
    }
    Ok(())
}

fn validate_text(config: &Config, text: &str) -> Result<(), RouteError> {
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

#[derive(Debug)]
pub struct Router {
    config: Arc<Config>,
    ctx: Context,
    handlers: Arc<Handlers>,
    callbacks: mpsc::Sender<Delivered>,
    local: Mutex<HashMap<u64, LocalConn>>,
    ids: MessageIds,
    next_conn: AtomicU64,
    advertised: OnceLock<Advertised>,
    /// Set when the node runs in a cluster (Redis store).
    cluster: OnceLock<Cluster>,
    /// Set when components are pushed cluster-wide (to follow other nodes' pushes).
    deployments: OnceLock<Arc<Deployments>>,
    pub metrics: Arc<Metrics>,
}

impl Router {
    /// Creates the router and its callback worker (must be called inside a tokio runtime).
    pub fn new(config: Arc<Config>, store: Store, backend: Backend) -> Arc<Self> {
        let ctx = Context::new(store);
        let handlers = Arc::new(Handlers::new(backend, ctx.clone()));
        let metrics = Arc::new(Metrics::default());
        let (callbacks, rx) = mpsc::channel(CALLBACK_QUEUE);
        // One worker per guest thread: history is read back sorted by message id, so
        // batches finishing out of order do not matter.
        let workers = handlers.runtime().map_or(1, |rt| rt.config().worker_threads.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..workers {
            tokio::spawn(callback_worker(handlers.clone(), rx.clone(), metrics.clone()));
        }
        Arc::new(Router {
            ids: MessageIds::new(&config.node_id),
            config,
            ctx,
            handlers,
            callbacks,
            local: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
            advertised: OnceLock::new(),
            cluster: OnceLock::new(),
            deployments: OnceLock::new(),
            metrics,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn store(&self) -> &Store {
        self.ctx.store()
    }

    /// Set once the listeners are bound.
    pub fn set_advertised(&self, advertised: Advertised) {
        let _ = self.advertised.set(advertised);
    }

    /// Uses a cluster-unique node number in message ids.
    pub fn set_node_number(&self, number: u64) {
        self.ids.set_node_number(number);
    }

    /// Joins a cluster: route logins pick among live nodes, and deliveries cross nodes.
    pub fn set_cluster(&self, cluster: Cluster) {
        let _ = self.cluster.set(cluster);
    }

    /// Lets this node follow component pushes made on other nodes.
    pub fn set_deployments(&self, deployments: Arc<Deployments>) {
        let _ = self.deployments.set(deployments);
    }

    pub fn advertised(&self) -> Option<&Advertised> {
        self.advertised.get()
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    fn local(&self) -> std::sync::MutexGuard<'_, HashMap<u64, LocalConn>> {
        // Updates are single inserts/removes, so a poisoned map is still consistent.
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn local_connections(&self) -> usize {
        self.local().len()
    }

    /// Route login: refuses a user who is online and says where to connect.
    pub async fn route_login(&self, user: &User) -> Result<RouteAnswer, RouteError> {
        validate_user(&self.config, user.id, &user.name)?;
        if self.store().lookup(user.id).await?.is_some() {
            return Err(RouteError::DuplicateLogin(user.id));
        }
        if let Some(cluster) = self.cluster.get() {
            let nodes = cluster.registry.nodes().await?;
            let node = cluster
                .balancer
                .pick(user.id, &nodes)
                .ok_or_else(|| StoreError::Unavailable("no live node in the registry".into()))?;
            return Ok(RouteAnswer {
                node_id: node.id.clone(),
                tcp_addr: node.tcp_addr.clone(),
                ws_url: node.ws_url.clone(),
            });
        }
        let adv = self
            .advertised
            .get()
            .cloned()
            .unwrap_or(Advertised { tcp_addr: String::new(), ws_url: String::new() });
        Ok(RouteAnswer { node_id: self.config.node_id.clone(), tcp_addr: adv.tcp_addr, ws_url: adv.ws_url })
    }

    /// Binds `conn.user` to this connection: asks the login handler, then claims the user
    /// in the online set (refusing duplicates) and registers the connection.
    pub async fn login(&self, conn: LocalConn) -> Result<(), RouteError> {
        let user = conn.user.clone();
        validate_user(&self.config, user.id, &user.name)?;
        let req = LoginRequest { user: user.clone(), node_id: self.config.node_id.clone() };
        if let LoginDecision::Reject(reason) = self.handlers.login(req).await? {
            return Err(RouteError::Rejected(reason));
        }
        let entry =
            OnlineEntry { user: user.clone(), node_id: self.config.node_id.clone(), conn_id: conn.conn_id };
        match self.store().claim(entry).await? {
            Claim::Claimed => {}
            Claim::AlreadyOnline(_) => return Err(RouteError::DuplicateLogin(user.id)),
        }
        self.local().insert(user.id, conn);
        Metrics::inc(&self.metrics.logins_total);
        Ok(())
    }

    /// Forgets a closed connection: local binding, route and online entry.
    pub async fn logout(&self, user_id: u64, conn_id: u64) {
        {
            let mut local = self.local();
            if local.get(&user_id).is_some_and(|c| c.conn_id == conn_id) {
                local.remove(&user_id);
            }
        }
        if let Err(e) = self.store().release(user_id, &self.config.node_id, conn_id).await {
            warn!(user = user_id, error = %e, "could not remove the online entry");
        }
    }

    /// Takes a user offline on request (`POST /offline`): kicks a local connection, or
    /// removes a stale entry that names this node.
    pub async fn offline(&self, user_id: u64) -> Result<bool, RouteError> {
        let conn = self.local().get(&user_id).cloned();
        if let Some(conn) = conn {
            conn.kick(ErrorCode::Unexpected, "taken offline by the server");
            self.logout(user_id, conn.conn_id).await;
            return Ok(true);
        }
        match self.store().lookup(user_id).await? {
            Some(e) if e.node_id == self.config.node_id => {
                Ok(self.store().release(user_id, &e.node_id, e.conn_id).await?)
            }
            Some(e) => match self.cluster.get() {
                Some(cluster) => {
                    let kick = ClusterMessage::Kick { user_id, reason: "taken offline by the server".into() };
                    if cluster.bus.publish(&e.node_id, &kick).await? == 0 {
                        // Its node is gone: the entry is stale.
                        self.store().release(user_id, &e.node_id, e.conn_id).await?;
                    }
                    Ok(true)
                }
                None => Ok(false),
            },
            None => Ok(false),
        }
    }

    /// Kicks every local connection (shutdown).
    pub fn kick_all(&self, reason: &str) {
        for conn in self.local().values() {
            conn.kick(ErrorCode::Unavailable, reason);
        }
    }

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

    /// Kicks a local user on another node's request.
    pub fn kick_local(&self, user_id: u64, reason: &str) {
        if let Some(conn) = self.local().get(&user_id).cloned() {
            conn.kick(ErrorCode::Unexpected, reason);
        }
    }

    /// Puts every local session back into the online set (after Redis lost it). A user
    /// who logged in elsewhere meanwhile keeps that login; the local session is closed.
    pub async fn resync_presence(&self) {
        let conns: Vec<LocalConn> = self.local().values().cloned().collect();
        let mut restored = 0;
        for conn in conns {
            let entry = OnlineEntry {
                user: conn.user.clone(),
                node_id: self.config.node_id.clone(),
                conn_id: conn.conn_id,
            };
            match self.store().claim(entry).await {
                Ok(Claim::Claimed) => restored += 1,
                Ok(Claim::AlreadyOnline(e))
                    if e.node_id == self.config.node_id && e.conn_id == conn.conn_id => {}
                Ok(Claim::AlreadyOnline(e)) => {
                    conn.kick(ErrorCode::DuplicateLogin, &format!("logged in again on node {}", e.node_id));
                }
                Err(e) => {
                    warn!(error = %e, "could not restore presence; will retry");
                    return;
                }
            }
        }
        if restored > 0 {
            info!(users = restored, "restored the online entries of local sessions");
        }
    }

    /// Another node pushed or rolled back a component: follow it.
    pub async fn component_changed(&self, name: &str, sha256: &str) {
        if let Some(d) = self.deployments.get()
            && let Err(e) = d.sync(name).await
        {
            warn!(component = name, sha256, error = %e, "could not follow a cluster component change");
        }
    }

    /// Checks every component against the cluster's versions (periodic, see `cluster::member`).
    pub async fn sync_components(&self) {
        if let Some(d) = self.deployments.get() {
            d.sync_all().await;
        }
    }

    /// The online users `caller` may see.
    pub async fn online_for(&self, caller: &User) -> Result<Vec<User>, RouteError> {
        let online: Vec<User> = self.store().online().await?.into_iter().map(|e| e.user).collect();
        Ok(self.handlers.online(caller.clone(), online).await?)
    }

    /// The handlers in force (for the admin API).
    pub fn handlers(&self) -> &Handlers {
        &self.handlers
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
async fn callback_worker(
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

/// Most messages handed to one callback call.
const CALLBACK_BATCH: usize = 512;
/// Delivered messages waiting for the callback before senders wait for room.
const CALLBACK_QUEUE: usize = 65_536;
