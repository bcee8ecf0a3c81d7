//! One connection: the LOGIN handshake, then a writer (requests and heartbeat PINGs) and a
//! reader (answers to the pending map, deliveries to the handler) until the connection ends.

use std::time::Duration;

use cim_proto::{Body, Delivery, ErrorCode, Frame, MessageKind, User};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::delivery::{ACK_INTERVAL, Deliveries};
use crate::error::ClientError;
use crate::handler::MessageHandler;
use crate::pending::{Pending, Reply, RequestIds};
use crate::transport::{FrameSink, FrameStream};

/// A connection is considered dead after this many heartbeat intervals without a frame.
pub(crate) const DEAD_AFTER_HEARTBEATS: u32 = 3;

/// How long closing the socket (flush, WebSocket Close, TCP FIN) may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// A request for the connection task: the body to send, and where its answer goes.
#[derive(Debug)]
pub(crate) struct Command {
    pub(crate) body: Body,
    pub(crate) reply: Reply,
}

/// What the server said when it accepted the LOGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LoginAccepted {
    pub(crate) node_id: String,
    /// The interval at which the server wants a PING when we are idle; 0 if it did not say.
    pub(crate) heartbeat_secs: u32,
    /// The user as the server bound us (id 0 from a server that does not say).
    pub(crate) user: User,
    /// When the server ends the connection unless a REFRESH comes first; 0: never.
    pub(crate) token_expires_at_ms: u64,
}

/// Who we are on the LOGIN frame.
#[derive(Clone, Copy)]
pub(crate) struct Identity<'a> {
    /// 0: the token decides.
    pub(crate) user_id: u64,
    pub(crate) user_name: &'a str,
    /// Empty without one.
    pub(crate) token: &'a str,
}

impl std::fmt::Debug for Identity<'_> {
    /// Leaves the token out: it is a credential.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("user_id", &self.user_id)
            .field("user_name", &self.user_name)
            .field("token", &if self.token.is_empty() { "" } else { ".." })
            .finish()
    }
}

/// Hands `delivery` to the handler unless its message was delivered before.
fn deliver(deliveries: &Deliveries, handler: &dyn MessageHandler, delivery: &Delivery) {
    if deliveries.accept(delivery) {
        handler.on_delivery(delivery);
    }
}

/// Sends LOGIN (resuming from the positions acknowledged so far, with the last resume token)
/// and waits (at most `deadline`) for its answer. Tells the handler about messages the
/// server no longer kept.
pub(crate) async fn handshake(
    sink: &mut FrameSink,
    stream: &mut FrameStream,
    request_id: u64,
    who: Identity<'_>,
    deadline: Duration,
    deliveries: &Deliveries,
    handler: &dyn MessageHandler,
) -> Result<LoginAccepted, ClientError> {
    let exchange = async {
        let (resume_from, resume_token) = deliveries.resume();
        let login = Body::Login(cim_proto::Login {
            user_id: who.user_id,
            user_name: who.user_name.to_owned(),
            token: who.token.to_owned(),
            resume_from,
            resume_token,
            presence: false,
        });
        sink.send(Frame::new(request_id, login)).await?;
        loop {
            let frame = match stream.next().await {
                None => {
                    return Err(ClientError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the server closed the connection before answering LOGIN",
                    )));
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(Err(e))) => {
                    tracing::warn!(error = %e, "skipping an undecodable frame during login");
                    continue;
                }
                Some(Ok(Ok(frame))) => frame,
            };
            let ours = frame.request_id == request_id;
            match frame.body {
                Body::LoginAck(cim_proto::LoginAck {
                    node_id,
                    heartbeat_secs,
                    user,
                    token_expires_at_ms,
                    resume_from,
                    missed_inbox,
                    missed_group,
                    resume_token,
                }) if ours => {
                    deliveries.logged_in(resume_from, &resume_token);
                    for (missed, kind) in
                        [(missed_inbox, MessageKind::Private), (missed_group, MessageKind::Group)]
                    {
                        if missed {
                            handler.on_missed(kind);
                        }
                    }
                    return Ok(LoginAccepted { node_id, heartbeat_secs, user, token_expires_at_ms });
                }
                Body::Error { code, message, retry_after_ms } if ours || frame.request_id == 0 => {
                    return Err(ClientError::from_error(code, message, retry_after_ms));
                }
                Body::Kick { code, reason } => return Err(ClientError::from_server(code, reason)),
                // A message is never dropped, even if it arrives earlier than expected.
                Body::Delivery(delivery) => deliver(deliveries, handler, &delivery),
                other => {
                    return Err(ClientError::Protocol(format!(
                        "expected login_ack for request {request_id}, got {} for request {}",
                        other.kind_name(),
                        frame.request_id
                    )));
                }
            }
        }
    };
    timeout(deadline, exchange).await.map_err(|_| ClientError::Timeout { what: "login", after: deadline })?
}

/// Why [`run`] returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// We were asked to stop (`close`, or the client was dropped).
    Shutdown,
    /// The server sent a KICK: do not reconnect.
    Kicked { code: ErrorCode, reason: String },
    /// The connection broke or went silent; reconnecting may help.
    Lost(String),
}

/// The logged-in connection: the state the writer and the reader share.
#[derive(Debug)]
pub(crate) struct Connection<'a> {
    pub(crate) ids: &'a RequestIds,
    pub(crate) handler: &'a dyn MessageHandler,
    pub(crate) deliveries: &'a Deliveries,
    /// PING when nothing was sent for this long; dead when nothing was received for
    /// [`DEAD_AFTER_HEARTBEATS`] times this long.
    pub(crate) heartbeat: Duration,
}

impl Connection<'_> {
    /// Serves the connection until it ends; then closes the socket (after acknowledging
    /// everything received, on a requested close). Requests still waiting for an answer, and
    /// those still queued in `commands`, fail as closed.
    pub(crate) async fn run(
        &self,
        mut sink: FrameSink,
        mut stream: FrameStream,
        commands: mpsc::Receiver<Command>,
        shutdown: &CancellationToken,
    ) -> End {
        let pending = Pending::default();
        let end = tokio::select! {
            biased;
            _ = shutdown.cancelled() => End::Shutdown,
            end = self.read(&mut stream, &pending) => end,
            end = self.write(&mut sink, commands, &pending) => end,
        };
        if end == End::Shutdown
            && let Some(received) = self.deliveries.flush()
            && timeout(CLOSE_GRACE, sink.send(ack(received))).await.is_err()
        {
            tracing::debug!("acknowledging at close timed out");
        }
        if timeout(CLOSE_GRACE, sink.close()).await.is_err() {
            tracing::debug!("closing the connection timed out");
        }
        end
    }

    async fn write(
        &self,
        sink: &mut FrameSink,
        mut commands: mpsc::Receiver<Command>,
        pending: &Pending,
    ) -> End {
        // PING when nothing was sent until then.
        let mut idle_at = Instant::now() + self.heartbeat;
        let mut acks = tokio::time::interval_at(Instant::now() + ACK_INTERVAL, ACK_INTERVAL);
        acks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let frame = tokio::select! {
                command = commands.recv() => match command {
                    Some(Command { body, reply }) => {
                        if reply.is_closed() {
                            continue; // the caller gave up while the request was queued
                        }
                        let request_id = self.ids.next();
                        pending.insert(request_id, reply);
                        Frame::new(request_id, body)
                    }
                    None => return End::Shutdown,
                },
                _ = acks.tick() => match self.deliveries.tick() {
                    Some(received) => ack(received),
                    None => continue,
                },
                () = sleep_until(idle_at) => {
                    pending.prune();
                    Frame::new(self.ids.next(), Body::Ping)
                }
            };
            let kind = frame.body.kind_name();
            if let Err(e) = sink.send(frame).await {
                return End::Lost(format!("sending {kind} failed: {e}"));
            }
            idle_at = Instant::now() + self.heartbeat;
        }
    }

    async fn read(&self, stream: &mut FrameStream, pending: &Pending) -> End {
        let silence = self.heartbeat.saturating_mul(DEAD_AFTER_HEARTBEATS);
        loop {
            let frame = match timeout(silence, stream.next()).await {
                Err(_) => return End::Lost(format!("nothing received for {silence:?}")),
                Ok(None) => return End::Lost("the server closed the connection".into()),
                Ok(Some(Err(e))) => return End::Lost(format!("reading failed: {e}")),
                Ok(Some(Ok(Err(e)))) => {
                    tracing::warn!(error = %e, "skipping an undecodable frame");
                    continue;
                }
                Ok(Some(Ok(Ok(frame)))) => frame,
            };
            match frame.body {
                Body::Delivery(delivery) => deliver(self.deliveries, self.handler, &delivery),
                Body::Kick { code, reason } => return End::Kicked { code, reason },
                body if frame.request_id != 0 => {
                    let kind = body.kind_name();
                    if !pending.complete(frame.request_id, body) {
                        // A PONG, or an answer whose caller already gave up.
                        tracing::trace!(request_id = frame.request_id, kind, "unclaimed answer");
                    }
                }
                Body::Error { code, message, .. } => {
                    tracing::warn!(%code, %message, "error from the server");
                }
                other => tracing::debug!(kind = other.kind_name(), "ignoring an unexpected push"),
            }
        }
    }
}

/// The ACK that tells the server what was received (a push: it is not answered).
fn ack(received: cim_proto::Positions) -> Frame {
    Frame::push(Body::Ack { message_id: 0, stored: false, received: Some(received) })
}

#[cfg(test)]
mod tests;
