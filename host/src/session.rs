//! One client connection, whatever the transport: the login handshake, then a reader loop
//! (requests, heartbeats, idle timeout) and a writer task draining a bounded queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_proto::{Body, CodecError, Encoded, ErrorCode, Frame, FrameError, MessageKind, User};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::handlers::{GroupDecision, HandlerError, Message, PrivateRequest, SendDecision};
use crate::limits::Action;
use crate::metrics::Metrics;
use crate::router::{Closer, LocalConn, Outbox, OutboxRx, RouteError, Router, Turn};

/// What a transport yields: a frame, a frame that could not be decoded (the connection can
/// go on), or a fatal stream error.
pub type Inbound = Result<Result<Frame, FrameError>, CodecError>;

/// How long a closing connection may take to flush its last frames.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);

/// Why a session ended, for the log.
#[derive(Debug)]
enum End {
    ClientClosed,
    IdleTimeout,
    TokenExpired,
    Closed,
    Fatal(String),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            End::ClientClosed => f.write_str("client closed the connection"),
            End::IdleTimeout => f.write_str("heartbeat missed"),
            End::TokenExpired => f.write_str("token expired without a refresh"),
            End::Closed => f.write_str("closed by the server"),
            End::Fatal(e) => write!(f, "connection error: {e}"),
        }
    }
}

/// Runs one connection to completion. Never panics on client input; every way out
/// removes the user's route and online state.
pub async fn run<St, Si>(
    router: Arc<Router>,
    stream: St,
    sink: Si,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    St: Stream<Item = Inbound> + Unpin + Send,
    Si: Sink<Encoded, Error = CodecError> + Unpin + Send + 'static,
{
    let conn_id = router.next_conn_id();
    let span = info_span!("session", conn = conn_id, %peer, user = tracing::field::Empty);
    run_inner(router, stream, sink, conn_id, peer, shutdown).instrument(span).await;
}

async fn run_inner<St, Si>(
    router: Arc<Router>,
    mut stream: St,
    mut sink: Si,
    conn_id: u64,
    peer: SocketAddr,
    shutdown: CancellationToken,
) where
    St: Stream<Item = Inbound> + Unpin + Send,
    Si: Sink<Encoded, Error = CodecError> + Unpin + Send + 'static,
{
    let config = router.config().clone();
    // --- Login handshake: the first frame must be LOGIN.
    let first = tokio::select! {
        first = tokio::time::timeout(config.login_timeout, stream.next()) => first,
        _ = shutdown.cancelled() => return,
    };
    let (request_id, user_id, user_name, token) = match first {
        Ok(Some(Ok(Ok(Frame { request_id, body: Body::Login { user_id, user_name, token } })))) => {
            (request_id, user_id, user_name, token)
        }
        Ok(Some(Ok(Ok(frame)))) => {
            let msg = format!("the first frame must be login, got {}", frame.body.kind_name());
            return refuse(&mut sink, frame.request_id, ErrorCode::NotLoggedIn, msg).await;
        }
        Ok(Some(Ok(Err(e)))) => {
            Metrics::inc(&router.metrics.bad_frames_total);
            return refuse(&mut sink, 0, ErrorCode::BadFrame, e.to_string()).await;
        }
        Ok(Some(Err(e))) => return refuse_fatal(&mut sink, &router, e).await,
        Ok(None) => return,
        Err(_) => {
            let msg = format!("no login within {} s", config.login_timeout.as_secs_f32());
            return refuse(&mut sink, 0, ErrorCode::NotLoggedIn, msg).await;
        }
    };
    // Logins are limited per address before anything costly (token check, handler) runs.
    if let Err(limited) = config.rate_limits.check(Action::Login, None, Some(peer.ip())) {
        Metrics::inc(&router.metrics.rate_limited_total);
        let frame = Frame::rate_limited(request_id, limited.retry_after_ms(), limited.to_string());
        return refuse_frame(&mut sink, frame).await;
    }
    // The token is checked before any handler runs; its `sub` is the user and its `name`,
    // when present, the display name.
    let verified = match config.auth.login(&token, user_id) {
        Ok(v) => v,
        Err(e) => {
            Metrics::inc(&router.metrics.login_failures_total);
            info!(user = user_id, error = %e, "login refused: bad token");
            return refuse(&mut sink, request_id, e.code(), e.to_string()).await;
        }
    };
    let user = match &verified {
        // Neither a `name` claim nor a name in the frame: the id is the name.
        Some(v) => {
            let name = v.name.clone().filter(|n| !n.is_empty());
            let name = name
                .or((!user_name.is_empty()).then_some(user_name))
                .unwrap_or_else(|| v.user_id.to_string());
            User { id: v.user_id, name }
        }
        None => User { id: user_id, name: user_name },
    };
    if let Err(limited) = config.rate_limits.check(Action::Login, Some(user.id), None) {
        Metrics::inc(&router.metrics.rate_limited_total);
        let frame = Frame::rate_limited(request_id, limited.retry_after_ms(), limited.to_string());
        return refuse_frame(&mut sink, frame).await;
    }
    let expiry = verified.as_ref().map(|v| Expiry::new(v.expires_at_ms, &config));
    tracing::Span::current().record("user", user.id);

    let (tx, rx) = Outbox::new(config.outbound_queue, config.outbound_queue_bytes);
    let closer = Closer::child_of(&shutdown);
    let conn = LocalConn { conn_id, user: user.clone(), tx: tx.clone(), closer: closer.clone() };
    // The ack goes into the queue before the user is reachable, so it is the first frame the
    // client gets even if a message for them arrives at once. (If the login is refused, the
    // queue is dropped unsent.)
    let ack = Body::LoginAck {
        node_id: config.node_id.clone(),
        heartbeat_secs: config.heartbeat.as_secs().try_into().unwrap_or(u32::MAX),
        user: user.clone(),
        token_expires_at_ms: expiry.map_or(0, |e| e.at_ms),
    };
    let _ = tx.try_send(Encoded::from(Frame::new(request_id, ack)));
    // Boxed, like the other rare or deep awaits below: their state would otherwise be part of
    // every idle connection's task.
    if let Err(e) = Box::pin(router.login(conn, verified)).await {
        Metrics::inc(&router.metrics.login_failures_total);
        info!(error = %e, "login refused");
        return refuse(&mut sink, request_id, e.code(), e.to_string()).await;
    }
    info!(name = %user.name, "logged in");

    let writer = tokio::spawn(
        write_loop(sink, rx, closer.clone(), config.write_timeout, router.clone()).in_current_span(),
    );
    let mut session =
        Session { router: router.clone(), user, tx, closer: closer.clone(), expiry, ip: peer.ip() };
    let end = session.read_loop(&mut stream, config.idle_timeout()).await;
    router.logout(session.user.id, conn_id).await;
    info!(reason = %end, "logged out");

    // Let the writer flush what is queued (an error, a kick), then stop it.
    drop(session);
    closer.cancel();
    let mut writer = writer;
    if tokio::time::timeout(CLOSE_FLUSH, &mut writer).await.is_err() {
        writer.abort();
    }
}

/// Answers a connection that failed before login, then closes it.
async fn refuse<Si>(sink: &mut Si, request_id: u64, code: ErrorCode, message: String)
where
    Si: Sink<Encoded, Error = CodecError> + Unpin,
{
    debug!(%code, %message, "refusing connection");
    refuse_frame(sink, Frame::error(request_id, code, message)).await;
}

/// Sends a last frame before login, then closes the connection.
async fn refuse_frame<Si>(sink: &mut Si, frame: Frame)
where
    Si: Sink<Encoded, Error = CodecError> + Unpin,
{
    let _ = tokio::time::timeout(CLOSE_FLUSH, async {
        sink.send(Encoded::from(frame)).await?;
        sink.close().await
    })
    .await;
}

async fn refuse_fatal<Si>(sink: &mut Si, router: &Router, e: CodecError)
where
    Si: Sink<Encoded, Error = CodecError> + Unpin,
{
    match e {
        CodecError::Io(e) => debug!(error = %e, "connection failed"),
        e => {
            Metrics::inc(&router.metrics.bad_frames_total);
            let code = fatal_code(&e);
            warn!(error = %e, "closing connection");
            refuse(sink, 0, code, e.to_string()).await;
        }
    }
}

fn fatal_code(e: &CodecError) -> ErrorCode {
    match e {
        CodecError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::BadFrame,
    }
}

/// Sends queued frames until the queue closes or the connection is closed; on close,
/// flushes what is already queued (a last error or kick) first. A write that makes no
/// progress for `write_timeout` (the client stopped reading) closes the connection.
async fn write_loop<Si>(
    mut sink: Si,
    mut rx: OutboxRx,
    closer: Closer,
    write_timeout: Duration,
    router: Arc<Router>,
) where
    Si: Sink<Encoded, Error = CodecError> + Unpin,
{
    let metrics = &router.metrics;
    let result: Result<(), CodecError> = async {
        loop {
            tokio::select! {
                // Closing wins over queued frames: a slow consumer's queue is not drained.
                biased;
                _ = closer.cancelled() => {
                    let reason = closer.reason();
                    let last = async {
                        if reason.is_none_or(|r| r.drain) {
                            while let Some(frame) = rx.try_recv() {
                                sink.feed(frame).await?;
                            }
                        }
                        if let Some(r) = reason {
                            sink.feed(r.frame.clone()).await?;
                        }
                        Ok::<_, CodecError>(())
                    };
                    if tokio::time::timeout(write_timeout.min(CLOSE_FLUSH), last).await.is_err() {
                        return Ok(());
                    }
                    break;
                }
                frame = rx.recv() => {
                    let Some(frame) = frame else { break };
                    let batch = async {
                        sink.feed(frame).await?;
                        // Batch whatever else is ready into one flush.
                        while !closer.is_cancelled() {
                            let Some(frame) = rx.try_recv() else { break };
                            sink.feed(frame).await?;
                        }
                        sink.flush().await
                    };
                    match tokio::time::timeout(write_timeout, batch).await {
                        Ok(r) => r?,
                        Err(_) => {
                            warn!(timeout = ?write_timeout, "write timed out: the client is not reading; closing");
                            Metrics::inc(&metrics.write_timeouts_total);
                            return Ok(());
                        }
                    }
                }
            }
        }
        sink.close().await
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "writer stopped");
    }
    // A writer that stops on its own (peer gone) closes the whole connection.
    closer.cancel();
}

/// A logged-in connection's request handling.
struct Session {
    router: Arc<Router>,
    user: User,
    tx: Outbox,
    closer: Closer,
    /// When the connection's token runs out; `None` in development mode (no tokens).
    expiry: Option<Expiry>,
    /// The client's address, for per-address rate limits.
    ip: std::net::IpAddr,
}

/// When a connection's token expires.
#[derive(Debug, Clone, Copy)]
struct Expiry {
    /// The token's `exp`, in Unix milliseconds, as told to the client.
    at_ms: u64,
    /// When the connection is closed: `exp` plus the clock leeway.
    deadline: Instant,
}

impl Expiry {
    fn new(exp_ms: u64, config: &crate::Config) -> Self {
        let leeway = config.auth.users.as_ref().map(|u| u.leeway()).unwrap_or_default();
        let left = Duration::from_millis(exp_ms.saturating_sub(crate::message_id::now_ms()));
        Expiry { at_ms: exp_ms, deadline: Instant::now() + left + leeway }
    }
}

impl Session {
    /// Queues an answer to this client's own request. Waits for room (the client is
    /// reading its answers slower than it sends requests: backpressure on its own reader)
    /// unless the connection closes meanwhile.
    async fn reply(&self, frame: Frame) -> bool {
        tokio::select! {
            r = self.tx.send(Encoded::from(frame)) => r.is_ok(),
            _ = self.closer.cancelled() => false,
        }
    }

    async fn read_loop<St>(&mut self, stream: &mut St, idle: Duration) -> End
    where
        St: Stream<Item = Inbound> + Unpin + Send,
    {
        // Sends waiting for their handler decision, in arrival order. Reading goes on
        // meanwhile, so one client's messages share handler calls (batches) instead of
        // waiting for each other.
        let mut in_flight: FuturesOrdered<BoxFuture<'static, Decided>> = FuturesOrdered::new();
        // Decided sends being carried out, several at once so that their store round trips
        // overlap; turns keep their deliveries in arrival order, and they are answered in it.
        let mut finishing: FuturesOrdered<BoxFuture<'static, Frame>> = FuturesOrdered::new();
        let mut last_turn = None;
        let mut last_inbound = Instant::now();
        let end = loop {
            tokio::select! {
                biased;
                _ = self.closer.cancelled() => break End::Closed,
                Some(answer) = finishing.next(), if !finishing.is_empty() => {
                    if !self.reply(answer).await {
                        break End::Closed;
                    }
                }
                Some(decided) = in_flight.next(), if !in_flight.is_empty() => {
                    let turn = Turn::next(&mut last_turn);
                    finishing.push_back(Box::pin(finish(self.router.clone(), decided, turn)));
                }
                _ = sleep_until_some(self.expiry.map(|e| e.deadline)) => {
                    Metrics::inc(&self.router.metrics.token_expiries_total);
                    let reason = "the token expired; send REFRESH with a new token before it expires";
                    info!("{reason}");
                    self.closer.close(ErrorCode::TokenExpired, reason, true);
                    break End::TokenExpired;
                }
                _ = tokio::time::sleep_until(last_inbound + idle) => {
                    Metrics::inc(&self.router.metrics.idle_timeouts_total);
                    let reason = format!("no frame for {} s (heartbeat missed)", idle.as_secs_f32());
                    info!("{reason}");
                    self.closer.close(ErrorCode::Unexpected, reason, true);
                    break End::IdleTimeout;
                }
                next = stream.next(), if in_flight.len() + finishing.len() < MAX_IN_FLIGHT => {
                    last_inbound = Instant::now();
                    let frame = match next {
                        None => {
                            // The client is gone; what it sent still gets delivered.
                            while let Some(decided) = in_flight.next().await {
                                let turn = Turn::next(&mut last_turn);
                                finishing.push_back(Box::pin(finish(self.router.clone(), decided, turn)));
                            }
                            while finishing.next().await.is_some() {}
                            break End::ClientClosed;
                        }
                        Some(Err(CodecError::Io(e))) => break End::Fatal(e.to_string()),
                        Some(Err(e)) => {
                            Metrics::inc(&self.router.metrics.bad_frames_total);
                            warn!(error = %e, "closing connection");
                            let _ = self.tx.try_send(Encoded::from(Frame::error(0, fatal_code(&e), e.to_string())));
                            break End::Fatal(e.to_string());
                        }
                        Some(Ok(Err(e))) => {
                            Metrics::inc(&self.router.metrics.bad_frames_total);
                            debug!(error = %e, "bad frame");
                            if !self.reply(Frame::error(0, ErrorCode::BadFrame, e.to_string())).await {
                                break End::Closed;
                            }
                            continue;
                        }
                        Some(Ok(Ok(frame))) => frame,
                    };
                    Metrics::inc(&self.router.metrics.frames_in_total);
                    let Some(answer) = Box::pin(self.start(frame, &mut in_flight)).await else { continue };
                    if !self.reply(answer).await {
                        break End::Closed;
                    }
                }
            }
        };
        // Sends already being carried out finish (their deliveries may be on their way, and
        // the history must hear of them) even though nobody reads the answers any more.
        let _ = tokio::time::timeout(CLOSE_FLUSH, async { while finishing.next().await.is_some() {} }).await;
        end
    }

    /// Handles one request: answers it now, or queues a send for its handler decision.
    async fn start(
        &mut self,
        frame: Frame,
        in_flight: &mut FuturesOrdered<BoxFuture<'static, Decided>>,
    ) -> Option<Frame> {
        let id = frame.request_id;
        let action = match &frame.body {
            Body::PrivateSend { .. } | Body::GroupSend { .. } => Some(Action::Send),
            Body::OnlineRequest => Some(Action::Online),
            _ => None,
        };
        if let Some(action) = action {
            let limits = &self.router.config().rate_limits;
            if let Err(limited) = limits.check(action, Some(self.user.id), Some(self.ip)) {
                Metrics::inc(&self.router.metrics.rate_limited_total);
                debug!(error = %limited, "rate limited");
                return Some(Frame::rate_limited(id, limited.retry_after_ms(), limited.to_string()));
            }
        }
        let result: Result<Body, RouteError> = match frame.body {
            Body::Ping => Ok(Body::Pong),
            Body::Refresh { token } => return Some(self.refresh(id, &token)),
            Body::PrivateSend { to, text } => {
                let submitted = async {
                    let message = self.router.prepare(&self.user, MessageKind::Private, text)?;
                    let req = PrivateRequest { message: message.clone(), to };
                    let pending = self.router.handlers().submit_private(req).await?;
                    Ok::<_, RouteError>((message, pending))
                };
                match submitted.await {
                    Ok((message, pending)) => {
                        in_flight.push_back(Box::pin(async move {
                            Decided::Private { id, message, to, decision: pending.await }
                        }));
                        return None;
                    }
                    Err(e) => Err(e),
                }
            }
            Body::GroupSend { text } => {
                let submitted = async {
                    let message = self.router.prepare(&self.user, MessageKind::Group, text)?;
                    let pending = self.router.handlers().submit_group(message.clone()).await?;
                    Ok::<_, RouteError>((message, pending))
                };
                match submitted.await {
                    Ok((message, pending)) => {
                        in_flight.push_back(Box::pin(async move {
                            Decided::Group { id, message, decision: pending.await }
                        }));
                        return None;
                    }
                    Err(e) => Err(e),
                }
            }
            Body::OnlineRequest => {
                self.router.online_for(&self.user).await.map(|users| Body::OnlineResponse { users })
            }
            // A client acknowledging a delivery: nothing to answer.
            Body::Ack { .. } | Body::Pong => return None,
            Body::Login { .. } => {
                return Some(Frame::error(id, ErrorCode::Unexpected, "already logged in on this connection"));
            }
            other => {
                let msg = format!("{} frames are sent by the server, not by clients", other.kind_name());
                return Some(Frame::error(id, ErrorCode::Unexpected, msg));
            }
        };
        Some(self.answer(id, result))
    }

    fn answer(&self, id: u64, result: Result<Body, RouteError>) -> Frame {
        answer(&self.router, id, result)
    }

    /// A new token for this connection: same user, a later expiry. A refused one leaves the
    /// current expiry in place.
    fn refresh(&mut self, id: u64, token: &str) -> Frame {
        match self.router.config().auth.login(token, self.user.id) {
            Ok(Some(v)) => {
                self.expiry = Some(Expiry::new(v.expires_at_ms, self.router.config()));
                debug!(expires_at_ms = v.expires_at_ms, "token refreshed");
                Frame::new(id, Body::Ack { message_id: 0 })
            }
            // Development mode: tokens are not checked and connections do not expire.
            Ok(None) => Frame::new(id, Body::Ack { message_id: 0 }),
            Err(e) => {
                info!(error = %e, "token refresh refused");
                Frame::error(id, e.code(), e.to_string())
            }
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Carries out a handler decision in `turn` and builds the sender's answer.
async fn finish(router: Arc<Router>, decided: Decided, turn: Turn) -> Frame {
    match decided {
        Decided::Private { id, message, to, decision } => {
            let r = router.finish_private(message, to, decision, turn).await;
            answer(&router, id, r.map(|message_id| Body::Ack { message_id }))
        }
        Decided::Group { id, message, decision } => {
            let r = router.finish_group(message, decision, turn).await;
            answer(&router, id, r.map(|(message_id, _)| Body::Ack { message_id }))
        }
    }
}

fn answer(router: &Router, id: u64, result: Result<Body, RouteError>) -> Frame {
    match result {
        Ok(body) => Frame::new(id, body),
        Err(e) => {
            if let RouteError::Handler(h) = &e {
                Metrics::inc(&router.metrics.handler_failures_total);
                warn!(error = %h, "handler failed");
            }
            Frame::error(id, e.code(), e.to_string())
        }
    }
}

/// Most sends of one connection waiting for handler decisions; past it, reading pauses.
const MAX_IN_FLIGHT: usize = 64;

/// A send with its handler decision, ready to be carried out.
enum Decided {
    Private { id: u64, message: Message, to: u64, decision: Result<SendDecision, HandlerError> },
    Group { id: u64, message: Message, decision: Result<GroupDecision, HandlerError> },
}
