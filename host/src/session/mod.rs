//! One client connection, whatever the transport: the login handshake (token check, rate
//! limit, login handler), then a reader loop ([`requests`]: requests, heartbeats, idle and
//! token expiry) and a writer task ([`writer`]) draining a bounded queue.

mod requests;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_proto::{Body, CodecError, Encoded, ErrorCode, Frame, FrameError, User};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::Verified;
use crate::limits::{Action, Limited};
use crate::metrics::Metrics;
use crate::router::{Closer, LocalConn, Outbox, Router};
use requests::{Expiry, Session};
use writer::write_loop;

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
    let (user, verified) = match admit(&router, peer, request_id, user_id, user_name, &token) {
        Ok(admitted) => admitted,
        Err(refusal) => return refuse_frame(&mut sink, refusal).await,
    };
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

/// Checks a LOGIN before any handler runs: the per-address and per-user rate limits, and the
/// token, whose `sub` is the user and whose `name`, when present, the display name. `Err` is
/// the frame that refuses it.
fn admit(
    router: &Router,
    peer: SocketAddr,
    request_id: u64,
    user_id: u64,
    user_name: String,
    token: &str,
) -> Result<(User, Option<Verified>), Frame> {
    let config = router.config();
    let limited = |l: Limited| {
        Metrics::inc(&router.metrics.rate_limited_total);
        Frame::rate_limited(request_id, l.retry_after_ms(), l.to_string())
    };
    // Per address first: it is checked before anything costly (token, handler) runs.
    config.rate_limits.check(Action::Login, None, Some(peer.ip())).map_err(limited)?;
    let verified = config.auth.login(token, user_id).map_err(|e| {
        Metrics::inc(&router.metrics.login_failures_total);
        info!(user = user_id, error = %e, "login refused: bad token");
        Frame::error(request_id, e.code(), e.to_string())
    })?;
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
    config.rate_limits.check(Action::Login, Some(user.id), None).map_err(limited)?;
    Ok((user, verified))
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
