//! [`Client`]: the public handle — log in, send, list online users, close.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cim_proto::{Body, Frame, User, encode_message};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::ClientConfig;
use crate::connection::Command;
use crate::delivery::Deliveries;
use crate::error::ClientError;
use crate::handler::MessageHandler;
use crate::history::{self, History, HistoryStream};
use crate::pending::RequestIds;
use crate::supervisor;

/// Requests queued for the connection task before callers have to wait.
const COMMAND_QUEUE: usize = 256;

/// A logged-in user. Cheap to share behind an `Arc`: every method takes `&self`.
///
/// A connection task owns the socket; it answers heartbeats and reconnects on its own after
/// an unrequested disconnect (see [`ClientConfig::reconnect`]). Dropping the client stops it,
/// like [`Client::close`] without waiting.
#[derive(Debug)]
pub struct Client {
    inner: Arc<Inner>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

/// What the client handle and its connection task share.
#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) config: ClientConfig,
    pub(crate) handler: Arc<dyn MessageHandler>,
    pub(crate) ids: RequestIds,
    /// Positions, resume token and recent message ids, across connections.
    pub(crate) deliveries: Deliveries,
    msg_ids: ClientMsgIds,
    link: Mutex<Link>,
    /// Bumped whenever `link` changes (up, down, ended), for sends waiting to be resent.
    changes: watch::Sender<()>,
}

/// The current connection, as requests see it.
#[derive(Debug)]
struct Link {
    /// The queue of the connection task; `None` while disconnected.
    commands: Option<mpsc::Sender<Command>>,
    /// The node of the current (or last) connection.
    node_id: String,
    /// Who we are, as the server last told us (the token's user when a token decides).
    user: User,
    /// Counts the connections attached so far.
    generation: u64,
    /// The connection task ended for good: no connection will come.
    ended: bool,
}

/// What a send came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The server-assigned message id (for a resend the server had already accepted: the id
    /// it gave the first time).
    pub message_id: u64,
    /// The receiver of a private message was offline: the message is kept and delivered at
    /// their next login, not delivered yet.
    pub stored: bool,
    /// The id this send carried (see [`Client::send_private_with_id`]).
    pub client_msg_id: String,
}

/// Why one attempt at a request failed.
enum Attempt {
    /// The connection ended after the request was queued: it may or may not have reached
    /// the server. `generation` is the connection it was queued on.
    Lost {
        generation: u64,
    },
    Failed(ClientError),
}

/// How many connection losses one send rides out (resending with its id) before it gives up.
const MAX_RESENDS: u32 = 3;

impl Inner {
    /// Makes the connection to `node_id` the one requests go to; returns its queue's receiver.
    pub(crate) fn attach(&self, node_id: &str) -> mpsc::Receiver<Command> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let mut link = self.link();
        link.commands = Some(tx);
        link.generation += 1;
        node_id.clone_into(&mut link.node_id);
        drop(link);
        self.changes.send_replace(());
        rx
    }

    /// Records who the server logged us in as.
    pub(crate) fn set_user(&self, user: User) {
        self.link().user = user;
    }

    pub(crate) fn user(&self) -> User {
        self.link().user.clone()
    }

    /// Queues `body` for the connection task and waits for its answer, all within the
    /// request timeout.
    pub(crate) async fn request(&self, body: Body) -> Result<Body, ClientError> {
        self.attempt(body).await.map_err(|e| match e {
            Attempt::Lost { .. } => ClientError::Closed,
            Attempt::Failed(e) => e,
        })
    }

    /// One try at `body` on the current connection, within the request timeout.
    async fn attempt(&self, body: Body) -> Result<Body, Attempt> {
        let after = self.config.request_timeout;
        let what = body.kind_name();
        let timed_out = |_| Attempt::Failed(ClientError::Timeout { what, after });
        let deadline = Instant::now() + after;
        let (commands, generation) = {
            let link = self.link();
            (link.commands.clone().ok_or(Attempt::Failed(ClientError::Closed))?, link.generation)
        };
        let (reply, answer) = oneshot::channel();
        timeout_at(deadline, commands.send(Command { body, reply }))
            .await
            .map_err(timed_out)?
            .map_err(|_| Attempt::Lost { generation })?;
        timeout_at(deadline, answer).await.map_err(timed_out)?.map_err(|_| Attempt::Lost { generation })
    }

    /// Sends `body` (a send carrying its client_msg_id); when the connection drops before the
    /// answer, sends it again, with the same id, once the client is logged in again (the
    /// server answers a resend it had already accepted with the first message id).
    async fn send(&self, body: Body, client_msg_id: String) -> Result<Sent, ClientError> {
        let mut losses = 0;
        loop {
            let generation = match self.attempt(body.clone()).await {
                Ok(answer) => {
                    let (message_id, stored) = expect_sent(answer)?;
                    return Ok(Sent { message_id, stored, client_msg_id });
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Lost { generation }) => generation,
            };
            losses += 1;
            let unconfirmed =
                |reason: String| ClientError::Unconfirmed { client_msg_id: client_msg_id.clone(), reason };
            if losses > MAX_RESENDS {
                return Err(unconfirmed(format!("the connection was lost {losses} times")));
            }
            tracing::debug!(
                client_msg_id,
                "connection lost before the answer; resending after the reconnect"
            );
            self.reconnected_after(generation).await.map_err(unconfirmed)?;
        }
    }

    /// Waits (at most the request timeout) for a connection newer than `generation`.
    async fn reconnected_after(&self, generation: u64) -> Result<(), String> {
        let after = self.config.request_timeout;
        let mut changes = self.changes.subscribe();
        let wait = async {
            loop {
                {
                    let link = self.link();
                    if link.ended {
                        return Err("the client stopped".to_owned());
                    }
                    if link.commands.is_some() && link.generation > generation {
                        return Ok(());
                    }
                }
                if changes.changed().await.is_err() {
                    return Err("the client stopped".to_owned());
                }
            }
        };
        tokio::time::timeout(after, wait)
            .await
            .map_err(|_| format!("the connection was lost and not back within {after:?}"))?
    }

    /// From now on requests fail at once with [`ClientError::Closed`].
    pub(crate) fn detach(&self) {
        self.link().commands = None;
        self.changes.send_replace(());
    }

    /// The connection task ended: no connection will come back.
    fn end(&self) {
        let mut link = self.link();
        link.commands = None;
        link.ended = true;
        drop(link);
        self.changes.send_replace(());
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        // The guarded data stays consistent even if a holder panicked.
        self.link.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Client {
    /// Logs in: asks the route API (`POST /login`) for a node, connects to it over the
    /// configured transport and sends LOGIN. Every delivered message then goes to `handler`.
    /// With a [token provider](ClientConfig::token), its token goes with both, and the
    /// client refreshes it before it expires.
    ///
    /// Fails with [`ClientError::DuplicateLogin`] if the user is already online, and with
    /// [`ClientError::Unauthenticated`] if the token is refused.
    pub async fn login(
        config: ClientConfig,
        handler: Arc<dyn MessageHandler>,
    ) -> Result<Client, ClientError> {
        config.validate().map_err(ClientError::Config)?;
        let user = User { id: config.user_id, name: config.user_name.clone() };
        let link =
            Mutex::new(Link { commands: None, node_id: String::new(), user, generation: 0, ended: false });
        let inner = Arc::new(Inner {
            config,
            handler,
            ids: RequestIds::new(),
            deliveries: Deliveries::default(),
            msg_ids: ClientMsgIds::new(),
            link,
            changes: watch::Sender::new(()),
        });
        let established = supervisor::establish(&inner).await?;
        let commands = inner.attach(&established.node_id);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn({
            let inner = inner.clone();
            let shutdown = shutdown.clone();
            async move {
                supervisor::supervise(inner.clone(), established, commands, shutdown).await;
                inner.end();
            }
        });
        Ok(Client { inner, shutdown, task: Some(task) })
    }

    /// Sends `text` to user `to`; returns the server-assigned message id, and whether `to`
    /// was offline (the message is then stored and delivered at their next login).
    ///
    /// The send carries a new client_msg_id; if the connection drops before the answer, the
    /// client resends it with that id once it is logged in again, so the message is stored
    /// once. If that does not work out in time, the error is [`ClientError::Unconfirmed`]
    /// with the id: retry with [`Client::send_private_with_id`].
    pub async fn send_private(&self, to: u64, text: impl Into<String>) -> Result<Sent, ClientError> {
        self.send_private_with_id(to, text, self.new_client_msg_id()).await
    }

    /// [`Client::send_private`] with a client_msg_id of the caller's (at most 64 bytes): a
    /// send with the id of one the server already accepted (within its de-dup window) is
    /// answered with the first message id, and nothing is stored again.
    pub async fn send_private_with_id(
        &self,
        to: u64,
        text: impl Into<String>,
        client_msg_id: impl Into<String>,
    ) -> Result<Sent, ClientError> {
        let client_msg_id = client_msg_id.into();
        let body = Body::PrivateSend { to, text: text.into(), client_msg_id: client_msg_id.clone() };
        self.check_size(&body)?;
        self.inner.send(body, client_msg_id).await
    }

    /// Sends `text` to the group (by default every other online user); returns the
    /// server-assigned message id. Resent like [`Client::send_private`].
    pub async fn send_group(&self, text: impl Into<String>) -> Result<Sent, ClientError> {
        self.send_group_with_id(text, self.new_client_msg_id()).await
    }

    /// [`Client::send_group`] with a client_msg_id of the caller's.
    pub async fn send_group_with_id(
        &self,
        text: impl Into<String>,
        client_msg_id: impl Into<String>,
    ) -> Result<Sent, ClientError> {
        let client_msg_id = client_msg_id.into();
        let body = Body::GroupSend { text: text.into(), client_msg_id: client_msg_id.clone() };
        self.check_size(&body)?;
        self.inner.send(body, client_msg_id).await
    }

    /// A client_msg_id no other send of this process carries (a random prefix and a counter).
    pub fn new_client_msg_id(&self) -> String {
        self.inner.msg_ids.next()
    }

    /// Deliveries dropped because their message had been delivered before (typically
    /// replayed after a reconnect, before the last ack reached the server).
    pub fn duplicates_dropped(&self) -> u64 {
        self.inner.deliveries.duplicates_dropped()
    }

    /// The newest `limit` messages of our history in `stream`, from the route API
    /// (`GET /history/<id>`), with our token when we have one.
    pub async fn history(&self, stream: HistoryStream, limit: usize) -> Result<History, ClientError> {
        let token = supervisor::fresh_token(&self.inner).await?;
        let route = self.inner.config.route.split(',').map(str::trim).find(|u| !u.is_empty());
        let route = route.ok_or_else(|| ClientError::Config("no route URL given".into()))?;
        let within = self.inner.config.request_timeout;
        let fetch = history::fetch(route, self.user_id(), stream, limit, token.as_deref());
        tokio::time::timeout(within, fetch)
            .await
            .map_err(|_| ClientError::Timeout { what: "history", after: within })?
    }

    /// The users online now, as the server's online-list handler reports them.
    pub async fn online_users(&self) -> Result<Vec<User>, ClientError> {
        match self.request(Body::OnlineRequest).await? {
            Body::OnlineResponse { users } => Ok(users),
            Body::Error { code, message, retry_after_ms } => {
                Err(ClientError::from_error(code, message, retry_after_ms))
            }
            other => Err(unexpected("online_response", &other)),
        }
    }

    /// Logs out: stops the connection task and closes the socket (the server then takes the
    /// user offline). Requests still in flight fail with [`ClientError::Closed`].
    pub async fn close(mut self) {
        self.shutdown.cancel();
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "the connection task failed");
        }
    }

    /// The node of the current connection (after a reconnect, possibly another one).
    pub fn node_id(&self) -> String {
        self.inner.link().node_id.clone()
    }

    /// Our user id, as the server logged us in (with a token, its `sub`).
    pub fn user_id(&self) -> u64 {
        self.inner.link().user.id
    }

    /// Our user id and display name, as the server logged us in.
    pub fn user(&self) -> User {
        self.inner.user()
    }

    /// Whether a connection is up right now (false while reconnecting and after the end).
    pub fn is_connected(&self) -> bool {
        self.inner.link().commands.is_some()
    }

    /// Checks the size, then sends `body` and waits for its answer.
    async fn request(&self, body: Body) -> Result<Body, ClientError> {
        self.check_size(&body)?;
        self.inner.request(body).await
    }

    /// Refuses a message that would not fit in one frame, instead of letting the codec fail
    /// (which would cost the connection).
    fn check_size(&self, body: &Body) -> Result<(), ClientError> {
        let max = self.inner.config.max_frame;
        let text = match body {
            Body::PrivateSend { text, .. } | Body::GroupSend { text, .. } => text,
            _ => return Ok(()),
        };
        // The envelope adds a few dozen bytes at most; encode only when it could matter.
        if text.len().saturating_add(ENVELOPE_SLACK) <= max {
            return Ok(());
        }
        let len = encode_message(Frame::new(u64::MAX, body.clone())).len();
        if len > max { Err(ClientError::TooLarge { len, max }) } else { Ok(()) }
    }
}

/// More than the envelope fields around a message text ever take.
const ENVELOPE_SLACK: usize = 64;

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The message id of an ACK; an ERROR (a refusal, a rate limit...) as its typed error.
pub(crate) fn expect_ack(answer: Body) -> Result<u64, ClientError> {
    expect_sent(answer).map(|(message_id, _)| message_id)
}

/// The message id and `stored` of an ACK; an ERROR as its typed error.
fn expect_sent(answer: Body) -> Result<(u64, bool), ClientError> {
    match answer {
        Body::Ack { message_id, stored, .. } => Ok((message_id, stored)),
        Body::Error { code, message, retry_after_ms } => {
            Err(ClientError::from_error(code, message, retry_after_ms))
        }
        other => Err(unexpected("ack", &other)),
    }
}

/// Hands out client_msg_ids: a random 64-bit prefix per process, then a counter (hex).
#[derive(Debug)]
struct ClientMsgIds {
    prefix: u64,
    next: AtomicU64,
}

impl ClientMsgIds {
    fn new() -> Self {
        // No `rand` needed: time, process id and an address, mixed.
        let mut seed = crate::backoff::Backoff::seed_for(u64::from(std::process::id()));
        let here = &seed as *const u64 as u64;
        seed ^= here.rotate_left(17);
        ClientMsgIds { prefix: crate::backoff::splitmix64(&mut seed), next: AtomicU64::new(1) }
    }

    fn next(&self) -> String {
        format!("{:016x}-{:x}", self.prefix, self.next.fetch_add(1, Ordering::Relaxed))
    }
}

fn unexpected(expected: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected {expected}, got {}", got.kind_name()))
}

#[cfg(test)]
mod tests;
