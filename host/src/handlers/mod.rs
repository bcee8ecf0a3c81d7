//! The seam between the host and business logic. Every decision — may this user log in,
//! what happens to a private or group message, who sees whom online, what to do after a
//! delivery — is asked of [`Handlers`], which the router then carries out. The types here
//! mirror the WIT contract in `wit/` so that a handler can be a sandboxed component.

pub mod batch;
pub mod builtin;

use std::fmt;

use cim_proto::{MessageKind, User};

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
}

#[derive(Debug, Clone)]
pub struct LoginRequest {
    pub user: User,
    pub node_id: String,
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

/// The handlers in force on this node.
#[derive(Debug, Default)]
pub struct Handlers {
    _private: (),
}

impl Handlers {
    /// The built-in behaviour: the same decisions the default components make.
    pub fn builtin() -> Self {
        Handlers { _private: () }
    }

    pub async fn login(&self, _ctx: &Context, req: LoginRequest) -> Result<LoginDecision, HandlerError> {
        Ok(builtin::login(&req))
    }

    /// One decision per request, in order.
    pub async fn private(
        &self,
        _ctx: &Context,
        batch: Vec<PrivateRequest>,
    ) -> Result<Vec<SendDecision>, HandlerError> {
        Ok(batch.iter().map(builtin::private).collect())
    }

    /// One decision per message, in order.
    pub async fn group(
        &self,
        _ctx: &Context,
        batch: Vec<Message>,
    ) -> Result<Vec<GroupDecision>, HandlerError> {
        Ok(batch.iter().map(builtin::group).collect())
    }

    /// The part of `online` that `caller` may see.
    pub async fn online(
        &self,
        _ctx: &Context,
        caller: User,
        online: Vec<User>,
    ) -> Result<Vec<User>, HandlerError> {
        Ok(builtin::online(&caller, online))
    }

    /// Runs after delivery, off the sender's path.
    pub async fn callback(&self, ctx: &Context, batch: Vec<Delivered>) -> Result<(), HandlerError> {
        builtin::callback(ctx, &batch).await.map_err(|e| HandlerError {
            event: Event::Callback,
            component: "builtin".into(),
            reason: e.to_string(),
        })
    }
}
