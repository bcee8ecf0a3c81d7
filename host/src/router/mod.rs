//! The router: carries out what the handlers decide. It binds users to local connections,
//! keeps routes and the online set in the store, and delivers messages to recipients.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use cim_proto::{ErrorCode, User};
use tokio::sync::mpsc;
use tracing::warn;

use crate::cluster::{Cluster, ClusterMessage};
use crate::config::Config;
use crate::deploy::Deployments;
use crate::handlers::{Backend, Context, Delivered, HandlerError, Handlers, LoginDecision, LoginRequest};
use crate::message_id::MessageIds;
use crate::metrics::Metrics;
use crate::store::{Claim, OnlineEntry, Store, StoreError};

mod conn;
mod history;
mod messages;
mod presence;
mod replay;
mod turn;

use messages::{CALLBACK_QUEUE, CallbackQueue, callback_worker};

pub use conn::{Closer, Closing, LocalConn, Offered, Outbox, OutboxRx, Outgoing, Refused, Seam};
pub use history::{HistoryPage, MAX_HISTORY_PAGE, Page};
pub use messages::{Sent, validate_client_msg_id};
pub use replay::Resumed;
pub use turn::{Turn, Turns};

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

#[derive(Debug)]
pub struct Router {
    /// Itself, for the tasks it starts (a fill from the log, see [`Router::fill`]).
    me: Weak<Router>,
    config: Arc<Config>,
    ctx: Context,
    handlers: Arc<Handlers>,
    callbacks: mpsc::Sender<Delivered>,
    local: Mutex<HashMap<u64, LocalConn>>,
    /// `(user, conn)` of sessions that closed while the store could not be reached: their
    /// online entries are still to be released (retried by the cluster's housekeeping).
    unreleased: Mutex<Vec<(u64, u64)>>,
    ids: MessageIds,
    next_conn: AtomicU64,
    advertised: OnceLock<Advertised>,
    /// Set when the node runs in a cluster (Redis store).
    cluster: OnceLock<Cluster>,
    /// Set when components are pushed cluster-wide (to follow other nodes' pushes).
    deployments: OnceLock<Arc<Deployments>>,
    /// Presence changes for sessions that asked for them (see [`presence`]).
    presence: Arc<presence::Changes>,
    pub metrics: Arc<Metrics>,
}

impl Router {
    /// Creates the router and its callback worker (must be called inside a tokio runtime).
    pub fn new(config: Arc<Config>, store: Store, backend: Backend) -> Arc<Self> {
        let ctx = Context::new(store);
        let handlers = Arc::new(Handlers::new(backend, ctx.clone()));
        let handler_metrics = handlers.runtime().map(|rt| rt.handler_metrics().clone()).unwrap_or_default();
        let metrics = Arc::new(Metrics::new(handler_metrics));
        let (callbacks, rx) = mpsc::channel(CALLBACK_QUEUE);
        // One worker per guest thread: history is read back sorted by message id, so
        // batches finishing out of order do not matter.
        let workers = handlers.runtime().map_or(1, |rt| rt.config().worker_threads.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(CallbackQueue::new(rx)));
        for _ in 0..workers {
            tokio::spawn(callback_worker(handlers.clone(), rx.clone(), metrics.clone()));
        }
        let changes = Arc::new(presence::Changes::default());
        Arc::new_cyclic(|me| {
            tokio::spawn(presence::run(changes.clone(), me.clone()));
            Router {
                me: me.clone(),
                ids: MessageIds::new(&config.node_id),
                config,
                ctx,
                handlers,
                callbacks,
                local: Mutex::new(HashMap::new()),
                unreleased: Mutex::new(Vec::new()),
                next_conn: AtomicU64::new(1),
                advertised: OnceLock::new(),
                cluster: OnceLock::new(),
                deployments: OnceLock::new(),
                presence: changes,
                metrics,
            }
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

    /// The message ids this node issues (their reservation is made by the node's wiring).
    pub fn ids(&self) -> &MessageIds {
        &self.ids
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

    /// Route login: says where to connect. A user who is online is refused unless the
    /// LOGIN that follows may take their session over (see [`Router::may_take_over`]).
    pub async fn route_login(
        &self,
        user: &User,
        resume_token: &str,
        verified: bool,
    ) -> Result<RouteAnswer, RouteError> {
        validate_user(&self.config, user.id, &user.name)?;
        if let Some(existing) = self.store().lookup(user.id).await?
            && !self.may_take_over(&existing, resume_token, verified).await?
        {
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
    /// in the online set and registers the connection. A user who is already online is
    /// refused, unless this login may take their session over (its resume token, a dead
    /// node, or `--duplicate-login replace` with a verified token): then the old session is
    /// kicked with `REPLACED`, wherever it is. `claims` is the verified token (`None` in
    /// development mode).
    pub async fn login(
        &self,
        conn: LocalConn,
        claims: Option<crate::auth::Verified>,
        resume_token: &str,
    ) -> Result<(), RouteError> {
        let user = conn.user.clone();
        validate_user(&self.config, user.id, &user.name)?;
        let verified = claims.is_some();
        let req = LoginRequest { user: user.clone(), node_id: self.config.node_id.clone(), claims };
        if let LoginDecision::Reject(reason) = self.handlers.login(req).await? {
            return Err(RouteError::Rejected(reason));
        }
        let entry = OnlineEntry {
            user: user.clone(),
            node_id: self.config.node_id.clone(),
            conn_id: conn.conn_id,
            resume: conn.resume.clone(),
        };
        // A claim or replace whose reply was lost (the store went away mid-call) may still
        // have been written: queue its release so no entry outlives a login that failed.
        let unknown_outcome = |e: StoreError| {
            self.retry_release(vec![(user.id, conn.conn_id)]);
            RouteError::from(e)
        };
        match self.store().claim(entry.clone()).await.map_err(unknown_outcome)? {
            Claim::Claimed => {}
            Claim::AlreadyOnline(existing) => {
                if !self.may_take_over(&existing, resume_token, verified).await?
                    || !self.store().replace(&existing, entry).await.map_err(unknown_outcome)?
                {
                    return Err(RouteError::DuplicateLogin(user.id));
                }
                self.kick_replaced(&existing).await;
            }
        }
        self.local().insert(user.id, conn);
        self.presence.note(&user);
        Metrics::inc(&self.metrics.logins_total);
        Ok(())
    }

    /// Whether a login may take over `existing`: it presents that session's resume token,
    /// or the session's node is gone (killed, its presence not yet expired), or the server
    /// replaces sessions on a verified token.
    async fn may_take_over(
        &self,
        existing: &OnlineEntry,
        resume_token: &str,
        verified: bool,
    ) -> Result<bool, RouteError> {
        use subtle::ConstantTimeEq;
        if !resume_token.is_empty()
            && !existing.resume.is_empty()
            && bool::from(resume_token.as_bytes().ct_eq(existing.resume.as_bytes()))
        {
            return Ok(true);
        }
        if verified && self.config.duplicate_login == crate::config::DuplicateLogin::Replace {
            return Ok(true);
        }
        if existing.node_id == self.config.node_id {
            // Ours, but no session here holds it: left by a session that is gone.
            return Ok(!self.holds(existing.user.id, existing.conn_id));
        }
        match self.cluster.get() {
            Some(cluster) => Ok(!cluster.registry.nodes().await?.iter().any(|n| n.id == existing.node_id)),
            None => Ok(false),
        }
    }

    /// Closes the session a login took over, on this node or the one holding it.
    async fn kick_replaced(&self, old: &OnlineEntry) {
        const REASON: &str = "this session was taken over by a new login of the same user";
        if old.node_id == self.config.node_id {
            self.kick_conn(old.user.id, old.conn_id, ErrorCode::Replaced, REASON);
        } else if let Some(cluster) = self.cluster.get() {
            let kick = ClusterMessage::Kick {
                user_id: old.user.id,
                reason: REASON.into(),
                conn_id: Some(old.conn_id),
                replaced: true,
            };
            // A node that is gone has nothing to kick.
            if let Err(e) = cluster.bus.publish(&old.node_id, &kick).await {
                warn!(node = %old.node_id, error = %e, "could not tell a node its session was taken over");
            }
        }
        Metrics::inc(&self.metrics.takeovers_total);
    }

    /// Forgets a closed connection: local binding, route and online entry.
    pub async fn logout(&self, user_id: u64, conn_id: u64) {
        let removed = {
            let mut local = self.local();
            if local.get(&user_id).is_some_and(|c| c.conn_id == conn_id) {
                local.remove(&user_id)
            } else {
                None
            }
        };
        match self.store().release(user_id, &self.config.node_id, conn_id).await {
            Ok(_) => {
                if let Some(conn) = removed {
                    self.presence.note(&conn.user);
                }
            }
            Err(e) => {
                warn!(user = user_id, error = %e, "could not remove the online entry; will retry");
                self.unreleased.lock().unwrap_or_else(|e| e.into_inner()).push((user_id, conn_id));
            }
        }
    }

    /// Online entries were removed without a list of whose (a dead node reaped, entries of
    /// sessions closed during a store outage released): sessions that asked for presence
    /// are told to ask for the whole list again.
    pub fn presence_unlisted(&self) {
        self.presence.note_unlisted();
    }

    /// Another node's presence changes (see [`presence`]).
    pub fn presence_remote(&self, users: Vec<(u64, String)>, resync: bool) {
        self.presence.note_remote(users, resync);
    }

    /// Takes the `(user, conn)` pairs whose release failed (see [`Router::logout`]); the
    /// caller releases them or gives them back with [`Router::retry_release`].
    pub fn take_unreleased(&self) -> Vec<(u64, u64)> {
        std::mem::take(&mut *self.unreleased.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Queues `(user, conn)` pairs whose online entries are still to be released.
    pub fn retry_release(&self, pairs: Vec<(u64, u64)>) {
        self.unreleased.lock().unwrap_or_else(|e| e.into_inner()).extend(pairs);
    }

    /// Takes a user offline on request (`POST /offline`): kicks a local connection, or
    /// removes a stale entry that names this node.
    pub async fn offline(&self, user_id: u64) -> Result<bool, RouteError> {
        let conn = self.local().get(&user_id).cloned();
        if let Some(conn) = conn {
            conn.kick(ErrorCode::TakenOffline, "taken offline by the server");
            self.logout(user_id, conn.conn_id).await;
            return Ok(true);
        }
        match self.store().lookup(user_id).await? {
            Some(e) if e.node_id == self.config.node_id => {
                let released = self.store().release(user_id, &e.node_id, e.conn_id).await?;
                self.presence.note(&e.user);
                Ok(released)
            }
            Some(e) => match self.cluster.get() {
                Some(cluster) => {
                    let kick = ClusterMessage::Kick {
                        user_id,
                        reason: "taken offline by the server".into(),
                        conn_id: None,
                        replaced: false,
                    };
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
            conn.kick(ErrorCode::ShuttingDown, reason);
        }
    }

    /// Kicks a local user on another node's request (`POST /offline` there).
    pub fn kick_local(&self, user_id: u64, reason: &str) {
        if let Some(conn) = self.local().get(&user_id).cloned() {
            conn.kick(ErrorCode::TakenOffline, reason);
        }
    }

    /// The online entries of every local session, as this node would claim them.
    pub fn local_entries(&self) -> Vec<OnlineEntry> {
        self.local()
            .values()
            .map(|c| OnlineEntry {
                user: c.user.clone(),
                node_id: self.config.node_id.clone(),
                conn_id: c.conn_id,
                resume: c.resume.clone(),
            })
            .collect()
    }

    /// Whether `user_id` is bound here to connection `conn_id`.
    pub fn holds(&self, user_id: u64, conn_id: u64) -> bool {
        self.local().get(&user_id).is_some_and(|c| c.conn_id == conn_id)
    }

    /// Kicks `user_id` if it is still bound here to connection `conn_id`.
    pub fn kick_conn(&self, user_id: u64, conn_id: u64, code: ErrorCode, reason: &str) {
        let conn = self.local().get(&user_id).filter(|c| c.conn_id == conn_id).cloned();
        if let Some(conn) = conn {
            conn.kick(code, reason);
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
}
