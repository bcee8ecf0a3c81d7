//! The seam between the host and business logic. Every decision — may this user log in,
//! what happens to a private or group message, who sees whom online, what to do after a
//! delivery — is asked of [`Handlers`], which the router then carries out. The types here
//! mirror the WIT contract in `wit/` so that a handler can be a sandboxed component.

pub mod batch;
pub mod builtin;

use std::fmt;
use std::sync::Arc;

use cim_proto::{MessageKind, User};

use self::batch::{Batcher, Pending};
use crate::runtime::Runtime;
use crate::store::Store;

/// The handler kinds, named as in spin.toml's `[[trigger.cim]] event = …`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    Login,
    Private,
    Group,
    Online,
    Callback,
}

impl Event {
    pub const ALL: [Event; 5] = [Event::Login, Event::Private, Event::Group, Event::Online, Event::Callback];

    pub fn as_str(self) -> &'static str {
        match self {
            Event::Login => "login",
            Event::Private => "private",
            Event::Group => "group",
            Event::Online => "online",
            Event::Callback => "callback",
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message as handlers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: u64,
    pub sender: User,
    pub kind: MessageKind,
    pub text: String,
    pub timestamp_ms: u64,
    /// When this node accepted it, in Unix microseconds (`timestamp_ms` is the same instant in
    /// milliseconds); the start of the delivery latency. Not shown to handlers.
    pub accepted_us: u64,
}

#[derive(Debug, Clone)]
pub struct LoginRequest {
    pub user: User,
    pub node_id: String,
    /// The verified token; `None` in development mode.
    pub claims: Option<crate::auth::Verified>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginDecision {
    Accept,
    Reject(String),
}

#[derive(Debug, Clone)]
pub struct PrivateRequest {
    pub message: Message,
    pub to: u64,
}

/// What to do with one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendDecision {
    Deliver,
    /// Deliver with this text instead.
    Rewrite(String),
    Reject(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recipients {
    /// Every user online when the message is routed, except its sender.
    AllOnlineExceptSender,
    Only(Vec<u64>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDecision {
    pub decision: SendDecision,
    pub recipients: Recipients,
}

/// A message after delivery, for the message callback.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub message: Message,
    pub recipients: Vec<u64>,
}

/// A handler failed to decide (trap, timeout, memory cap, wrong answer). The caller gets
/// an error naming the component; nobody else is affected.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{event} handler `{component}` failed: {reason}")]
pub struct HandlerError {
    pub event: Event,
    pub component: String,
    pub reason: String,
}

/// What a handler may read while deciding. Read-only by construction: it only exposes
/// queries.
#[derive(Debug, Clone)]
pub struct Context {
    store: Store,
}

impl Context {
    pub fn new(store: Store) -> Self {
        Context { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Where decisions come from.
#[derive(Debug, Clone)]
pub enum Backend {
    /// Native code with the default behaviour (no WASM): for comparison and for tests of
    /// the host alone.
    Builtin,
    /// The components installed in this runtime (the normal case).
    Components(Arc<Runtime>),
}

/// Most messages handed to one private/group handler call.
const MAX_BATCH: usize = 64;
/// Requests waiting for a handler before senders wait too.
const QUEUE: usize = 4096;

/// The handlers in force on this node. Private and group sends are batched naturally
/// (see [`batch`]); login and online are rare and called directly.
#[derive(Debug)]
pub struct Handlers {
    backend: Backend,
    ctx: Context,
    private: Batcher<PrivateRequest, SendDecision>,
    group: Batcher<Message, GroupDecision>,
}

impl Handlers {
    /// Starts the batch workers (must be called inside a tokio runtime).
    pub fn new(backend: Backend, ctx: Context) -> Self {
        let workers = match &backend {
            Backend::Builtin => 1,
            Backend::Components(rt) => rt.config().worker_threads.max(1),
        };
        let (b, c) = (backend.clone(), ctx.clone());
        let private = Batcher::spawn(Event::Private, workers, MAX_BATCH, QUEUE, move |batch| {
            let (b, c) = (b.clone(), c.clone());
            async move {
                match &b {
                    Backend::Builtin => Ok(batch.iter().map(builtin::private).collect()),
                    Backend::Components(rt) => rt.private(&c, batch).await,
                }
            }
        });
        let (b, c) = (backend.clone(), ctx.clone());
        let group = Batcher::spawn(Event::Group, workers, MAX_BATCH, QUEUE, move |batch| {
            let (b, c) = (b.clone(), c.clone());
            async move {
                match &b {
                    Backend::Builtin => Ok(batch.iter().map(builtin::group).collect()),
                    Backend::Components(rt) => rt.group(&c, batch).await,
                }
            }
        });
        Handlers { backend, ctx, private, group }
    }

    /// The component runtime, unless the built-in handlers are in use.
    pub fn runtime(&self) -> Option<&Arc<Runtime>> {
        match &self.backend {
            Backend::Builtin => None,
            Backend::Components(rt) => Some(rt),
        }
    }

    pub fn context(&self) -> &Context {
        &self.ctx
    }

    pub async fn login(&self, req: LoginRequest) -> Result<LoginDecision, HandlerError> {
        match &self.backend {
            Backend::Builtin => Ok(builtin::login(&req)),
            Backend::Components(rt) => rt.login(&self.ctx, req).await,
        }
    }

    pub async fn private(&self, req: PrivateRequest) -> Result<SendDecision, HandlerError> {
        self.private.decide(req).await
    }

    /// Queues a private message for a decision without waiting for it (for pipelining).
    pub async fn submit_private(&self, req: PrivateRequest) -> Result<Pending<SendDecision>, HandlerError> {
        self.private.submit(req).await
    }

    pub async fn group(&self, message: Message) -> Result<GroupDecision, HandlerError> {
        self.group.decide(message).await
    }

    /// Queues a group message for a decision without waiting for it (for pipelining).
    pub async fn submit_group(&self, message: Message) -> Result<Pending<GroupDecision>, HandlerError> {
        self.group.submit(message).await
    }

    /// The part of `online` that `caller` may see.
    pub async fn online(&self, caller: User, online: Vec<User>) -> Result<Vec<User>, HandlerError> {
        match &self.backend {
            Backend::Builtin => Ok(builtin::online(&caller, online)),
            Backend::Components(rt) => rt.online(&self.ctx, caller, online).await,
        }
    }

    /// Runs after delivery, off the sender's path (the router batches these itself).
    pub async fn callback(&self, batch: Vec<Delivered>) -> Result<(), HandlerError> {
        match &self.backend {
            Backend::Builtin => builtin::callback(&self.ctx, &batch).await.map_err(|e| HandlerError {
                event: Event::Callback,
                component: "builtin".into(),
                reason: e.to_string(),
            }),
            Backend::Components(rt) => rt.callback(&self.ctx, batch).await,
        }
    }
}
