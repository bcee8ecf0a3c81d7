//! A logged-in connection's requests: the reader loop with heartbeat, idle and token-expiry
//! deadlines, per-request rate limits, token refresh, and sends carried out in order.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_proto::{Body, CodecError, Encoded, ErrorCode, Frame, MessageKind, Positions, User};
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesOrdered;
use futures_util::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, warn};

use super::{CLOSE_FLUSH, End, Inbound, fatal_code};
use crate::handlers::{GroupDecision, HandlerError, Message, PrivateRequest, SendDecision};
use crate::limits::Action;
use crate::metrics::Metrics;
use crate::router::{Closer, Outbox, RouteError, Router, Sent, Turn, Turns, validate_client_msg_id};

/// A logged-in connection's request handling.
pub(super) struct Session {
    pub(super) router: Arc<Router>,
    pub(super) user: User,
    pub(super) tx: Outbox,
    pub(super) closer: Closer,
    /// When the connection's token runs out; `None` in development mode (no tokens).
    pub(super) expiry: Option<Expiry>,
    /// The client's address, for per-address rate limits.
    pub(super) ip: IpAddr,
}

/// When a connection's token expires.
#[derive(Debug, Clone, Copy)]
pub(super) struct Expiry {
    /// The token's `exp`, in Unix milliseconds, as told to the client.
    pub(super) at_ms: u64,
    /// When the connection is closed: `exp` plus the clock leeway.
    deadline: Instant,
}

impl Expiry {
    pub(super) fn new(exp_ms: u64, config: &crate::Config) -> Self {
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

    pub(super) async fn read_loop<St>(&mut self, stream: &mut St, idle: Duration) -> End
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
        let mut turns = Turns::default();
        // Both timers live across iterations: a frame only moves `last_inbound`, and the idle
        // timer, when it fires early, is pushed to the real deadline (no timer work per frame).
        let mut last_inbound = Instant::now();
        let idle_timer = tokio::time::sleep(idle);
        let expiry_timer = tokio::time::sleep_until(self.expiry_deadline());
        tokio::pin!(idle_timer, expiry_timer);
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
                    let turn = turns.next_turn();
                    finishing.push_back(Box::pin(finish(self.router.clone(), decided, turn)));
                }
                _ = &mut expiry_timer, if self.expiry.is_some() => {
                    Metrics::inc(&self.router.metrics.token_expiries_total);
                    let reason = "the token expired; send REFRESH with a new token before it expires";
                    info!("{reason}");
                    self.closer.close(ErrorCode::TokenExpired, reason, true);
                    break End::TokenExpired;
                }
                _ = &mut idle_timer => {
                    if last_inbound + idle > Instant::now() {
                        idle_timer.as_mut().reset(last_inbound + idle);
                        continue;
                    }
                    Metrics::inc(&self.router.metrics.idle_timeouts_total);
                    let reason = format!("no frame for {} s (heartbeat missed)", idle.as_secs_f32());
                    info!("{reason}");
                    self.closer.close(ErrorCode::IdleTimeout, reason, true);
                    break End::IdleTimeout;
                }
                next = stream.next(), if in_flight.len() + finishing.len() < MAX_IN_FLIGHT => {
                    last_inbound = Instant::now();
                    let frame = match next {
                        None => {
                            // The client is gone; what it sent still gets delivered.
                            while let Some(decided) = in_flight.next().await {
                                let turn = turns.next_turn();
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
                            if !self.reply(Frame::error(e.request_id(), ErrorCode::BadFrame, e.to_string())).await {
                                break End::Closed;
                            }
                            continue;
                        }
                        Some(Ok(Ok(frame))) => frame,
                    };
                    Metrics::inc(&self.router.metrics.frames_in_total);
                    let Some(answer) = Box::pin(self.start(frame, &mut in_flight)).await else { continue };
                    // A REFRESH moved the token's expiry.
                    if let Some(e) = self.expiry.filter(|e| e.deadline != expiry_timer.deadline()) {
                        expiry_timer.as_mut().reset(e.deadline);
                    }
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
        let started = Instant::now();
        // ACK is a notification (never answered): any id. Every request needs its own.
        if id == 0 && !matches!(frame.body, Body::Ack { .. }) {
            let msg = format!(
                "request id 0 is reserved for server pushes: give each {} request a non-zero id",
                frame.body.kind_name()
            );
            return Some(Frame::error(0, ErrorCode::Invalid, msg));
        }
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
            Body::PrivateSend { to, text, client_msg_id } => {
                let submitted = async {
                    validate_client_msg_id(&client_msg_id)?;
                    let message = self.router.prepare(&self.user, MessageKind::Private, text)?;
                    let req = PrivateRequest { message: message.clone(), to };
                    let pending = self.router.handlers().submit_private(req).await?;
                    Ok::<_, RouteError>((message, pending))
                };
                match submitted.await {
                    Ok((message, pending)) => {
                        in_flight.push_back(Box::pin(async move {
                            let decision = pending.await;
                            Decided::Private { id, message, to, client_msg_id, decision, started }
                        }));
                        return None;
                    }
                    Err(e) => Err(e),
                }
            }
            Body::GroupSend { text, client_msg_id } => {
                let submitted = async {
                    validate_client_msg_id(&client_msg_id)?;
                    let message = self.router.prepare(&self.user, MessageKind::Group, text)?;
                    let pending = self.router.handlers().submit_group(message.clone()).await?;
                    Ok::<_, RouteError>((message, pending))
                };
                match submitted.await {
                    Ok((message, pending)) => {
                        in_flight.push_back(Box::pin(async move {
                            Decided::Group { id, message, client_msg_id, decision: pending.await, started }
                        }));
                        return None;
                    }
                    Err(e) => Err(e),
                }
            }
            Body::OnlineRequest => {
                self.router.online_for(&self.user).await.map(|users| Body::OnlineResponse { users })
            }
            // A client saying how far it got: kept for its next login, not answered.
            Body::Ack { received, .. } => {
                if let Some(positions) = received {
                    self.acknowledge(positions);
                }
                return None;
            }
            Body::Login(_) => {
                return Some(Frame::error(id, ErrorCode::Unexpected, "already logged in on this connection"));
            }
            other => {
                let msg = format!("{} frames are sent by the server, not by clients", other.kind_name());
                return Some(Frame::error(id, ErrorCode::Unexpected, msg));
            }
        };
        Some(self.answer(id, result))
    }

    /// Keeps how far the client got, off the reading path (acks only move forward in the
    /// store, so two in flight at once cannot undo each other).
    fn acknowledge(&self, positions: Positions) {
        Metrics::inc(&self.router.metrics.acks_total);
        let (router, user) = (self.router.clone(), self.user.id);
        tokio::spawn(async move {
            if let Err(e) = router.store().log().ack(user, positions).await {
                // The next ack carries these positions too (they are cumulative).
                debug!(error = %e, "could not keep an ack");
            }
        });
    }

    fn answer(&self, id: u64, result: Result<Body, RouteError>) -> Frame {
        answer(&self.router, id, result)
    }

    /// When the token runs out; far in the future without one (the timer is then disabled).
    fn expiry_deadline(&self) -> Instant {
        self.expiry.map_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365), |e| e.deadline)
    }

    /// A new token for this connection: same user, a later expiry. A refused one leaves the
    /// current expiry in place.
    fn refresh(&mut self, id: u64, token: &str) -> Frame {
        match self.router.config().auth.login(token, self.user.id) {
            Ok(Some(v)) => {
                self.expiry = Some(Expiry::new(v.expires_at_ms, self.router.config()));
                debug!(expires_at_ms = v.expires_at_ms, "token refreshed");
                Frame::new(id, Body::ack(0))
            }
            // Development mode: tokens are not checked and connections do not expire.
            Ok(None) => Frame::new(id, Body::ack(0)),
            Err(e) => {
                info!(error = %e, "token refresh refused");
                Frame::error(id, e.code(), e.to_string())
            }
        }
    }
}

/// Carries out a handler decision in `turn` and builds the sender's answer.
async fn finish(router: Arc<Router>, decided: Decided, turn: Turn) -> Frame {
    let (frame, started) = match decided {
        Decided::Private { id, message, to, client_msg_id, decision, started } => {
            // The message id in every log line of the send (the receiving node's delivery
            // span carries it too).
            let span = tracing::debug_span!("send", message_id = message.id, to);
            let r = router.finish_private(message, to, client_msg_id, decision, turn).instrument(span).await;
            (answer(&router, id, r.map(sent_ack)), started)
        }
        Decided::Group { id, message, client_msg_id, decision, started } => {
            let span = tracing::debug_span!("send", message_id = message.id, group = true);
            let r = router.finish_group(message, client_msg_id, decision, turn).instrument(span).await;
            (answer(&router, id, r.map(|(sent, _)| sent_ack(sent))), started)
        }
    };
    router.metrics.send_seconds.observe(started.elapsed().as_secs_f64());
    frame
}

/// A send's acceptance: its message id, and whether it was stored for an offline receiver.
fn sent_ack(sent: Sent) -> Body {
    Body::Ack { message_id: sent.message_id, stored: sent.stored, received: None }
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
    Private {
        id: u64,
        message: Message,
        to: u64,
        client_msg_id: String,
        decision: Result<SendDecision, HandlerError>,
        /// When the request was read.
        started: Instant,
    },
    Group {
        id: u64,
        message: Message,
        client_msg_id: String,
        decision: Result<GroupDecision, HandlerError>,
        started: Instant,
    },
}
