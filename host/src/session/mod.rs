//! One client connection, whatever the transport: the login handshake (token check, rate
//! limit, login handler), then a reader loop ([`requests`]: requests, heartbeats, idle and
//! token expiry) and a writer task ([`writer`]) draining a bounded queue.

mod requests;
mod writer;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use cim_proto::{Body, CodecError, Encoded, ErrorCode, Frame, FrameError, LoginAck, User};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::auth::Verified;
use crate::limits::{Action, Limited};
use crate::metrics::Metrics;
use crate::router::{Closer, LocalConn, Outbox, Resumed, Router, Seam};
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
    if let Ok(Some(Ok(_))) = &first {
        Metrics::inc(&router.metrics.frames_in_total);
    }
    let (request_id, login) = match first {
        Ok(Some(Ok(Ok(Frame { request_id: 0, body: Body::Login(_) })))) => {
            let msg = "request id 0 is reserved for server pushes: give LOGIN a non-zero request id";
            return refuse(&mut sink, 0, ErrorCode::Invalid, msg.into()).await;
        }
        Ok(Some(Ok(Ok(Frame { request_id, body: Body::Login(login) })))) => (request_id, login),
        Ok(Some(Ok(Ok(frame)))) => {
            let msg = format!("the first frame must be login, got {}", frame.body.kind_name());
            return refuse(&mut sink, frame.request_id, ErrorCode::NotLoggedIn, msg).await;
        }
        Ok(Some(Ok(Err(e)))) => {
            Metrics::inc(&router.metrics.bad_frames_total);
            return refuse(&mut sink, e.request_id(), ErrorCode::BadFrame, e.to_string()).await;
        }
        Ok(Some(Err(e))) => return refuse_fatal(&mut sink, &router, e).await,
        Ok(None) => return,
        Err(_) => {
            let msg = format!("no login within {} s", config.login_timeout.as_secs_f32());
            return refuse(&mut sink, 0, ErrorCode::NotLoggedIn, msg).await;
        }
    };
    let (user, verified) =
        match admit(&router, peer, request_id, login.user_id, login.user_name, &login.token) {
            Ok(admitted) => admitted,
            Err(refusal) => return refuse_frame(&mut sink, refusal).await,
        };
    let expiry = verified.as_ref().map(|v| Expiry::new(v.expires_at_ms, &config));
    tracing::Span::current().record("user", user.id);

    let (tx, rx) = Outbox::new(config.outbound_queue, config.outbound_queue_bytes);
    let closer = Closer::child_of(&shutdown);
    // Live deliveries are held at the seam until the log has been replayed.
    let resume = resume_token();
    let conn = LocalConn {
        conn_id,
        user: user.clone(),
        tx: tx.clone(),
        closer: closer.clone(),
        seam: Seam::replaying(),
        resume: resume.clone(),
        presence: login.presence,
    };
    // Boxed, like the other rare or deep awaits below: their state would otherwise be part of
    // every idle connection's task.
    if let Err(e) = Box::pin(router.login(conn.clone(), verified, &login.resume_token)).await {
        Metrics::inc(&router.metrics.login_failures_total);
        info!(error = %e, "login refused");
        return refuse(&mut sink, request_id, e.code(), e.to_string()).await;
    }
    let writer = tokio::spawn(
        write_loop(sink, rx, closer.clone(), config.write_timeout, router.clone()).in_current_span(),
    );
    // The login ack first, then what the user missed, then live traffic.
    let ack = |resumed: &Resumed| {
        Encoded::from(Frame::new(
            request_id,
            Body::LoginAck(LoginAck {
                node_id: config.node_id.clone(),
                heartbeat_secs: config.heartbeat.as_secs().try_into().unwrap_or(u32::MAX),
                user: user.clone(),
                token_expires_at_ms: expiry.map_or(0, |e| e.at_ms),
                resume_from: resumed.from,
                missed_inbox: resumed.missed_inbox,
                missed_group: resumed.missed_group,
                resume_token: resume.clone(),
            }),
        ))
    };
    let resumed = Box::pin(async {
        let from = router.resume_point(user.id, login.resume_from).await?;
        router.replay(&conn, from, ack).await
    })
    .await;
    match resumed {
        Ok(r) => info!(name = %user.name, inbox = r.from.inbox, group = r.from.group, "logged in"),
        Err(e) => {
            warn!(error = %e, "could not replay the log; closing the new session");
            let _ = tx.try_send(Encoded::from(Frame::error(request_id, e.code(), e.to_string())));
            router.logout(user.id, conn_id).await;
            closer.cancel();
            let _ = tokio::time::timeout(CLOSE_FLUSH, writer).await;
            return;
        }
    }
    drop(conn);
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

/// A fresh session resume token: 128 random bits, hex.
fn resume_token() -> String {
    let mut bytes = [0u8; 16];
    // The OS random source does not fail on the platforms we run on; if it ever did, the
    // session simply cannot be resumed by token (an empty token never matches).
    if getrandom::fill(&mut bytes).is_err() {
        return String::new();
    }
    hex::encode(bytes)
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
