//! One connection: the LOGIN handshake, then a writer (requests and heartbeat PINGs) and a
//! reader (answers to the pending map, deliveries to the handler) until the connection ends.

use std::time::Duration;

use cim_proto::{Body, ErrorCode, Frame, User};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

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

/// Sends LOGIN and waits (at most `deadline`) for its answer.
pub(crate) async fn handshake(
    sink: &mut FrameSink,
    stream: &mut FrameStream,
    request_id: u64,
    who: Identity<'_>,
    deadline: Duration,
    handler: &dyn MessageHandler,
) -> Result<LoginAccepted, ClientError> {
    let exchange = async {
        let login = Body::Login {
            user_id: who.user_id,
            user_name: who.user_name.to_owned(),
            token: who.token.to_owned(),
        };
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
                Body::LoginAck { node_id, heartbeat_secs, user, token_expires_at_ms } if ours => {
                    return Ok(LoginAccepted { node_id, heartbeat_secs, user, token_expires_at_ms });
                }
                Body::Error { code, message, retry_after_ms } if ours || frame.request_id == 0 => {
                    return Err(ClientError::from_error(code, message, retry_after_ms));
                }
                Body::Kick { code, reason } => return Err(ClientError::from_server(code, reason)),
                // A message is never dropped, even if it arrives earlier than expected.
                Body::Delivery(delivery) => handler.on_delivery(&delivery),
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
    /// PING when nothing was sent for this long; dead when nothing was received for
    /// [`DEAD_AFTER_HEARTBEATS`] times this long.
    pub(crate) heartbeat: Duration,
}

impl Connection<'_> {
    /// Serves the connection until it ends; then closes the socket. Requests still waiting
    /// for an answer, and those still queued in `commands`, fail as closed.
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
        loop {
            let frame = match timeout(self.heartbeat, commands.recv()).await {
                Ok(Some(Command { body, reply })) => {
                    if reply.is_closed() {
                        continue; // the caller gave up while the request was queued
                    }
                    let request_id = self.ids.next();
                    pending.insert(request_id, reply);
                    Frame::new(request_id, body)
                }
                Ok(None) => return End::Shutdown,
                Err(_) => {
                    pending.prune();
                    Frame::new(self.ids.next(), Body::Ping)
                }
            };
            let kind = frame.body.kind_name();
            if let Err(e) = sink.send(frame).await {
                return End::Lost(format!("sending {kind} failed: {e}"));
            }
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
                Body::Delivery(delivery) => self.handler.on_delivery(&delivery),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{Recorder, delivery, next_frame};
    use crate::transport::framed;
    use std::sync::Arc;
    use tokio::sync::oneshot;
    use tokio::time::Instant;

    const MAX: usize = cim_proto::DEFAULT_MAX_FRAME;
    const ALICE: Identity<'static> = Identity { user_id: 1, user_name: "alice", token: "" };

    /// A client end and a fake server end of an in-memory connection.
    fn pipe() -> ((FrameSink, FrameStream), (FrameSink, FrameStream)) {
        let (client, server) = tokio::io::duplex(64 * 1024);
        (framed(client, MAX), framed(server, MAX))
    }

    #[tokio::test]
    async fn login_ack_completes_the_handshake() {
        let ((mut sink, mut stream), (mut server_sink, mut server_stream)) = pipe();
        let server = tokio::spawn(async move {
            let login = next_frame(&mut server_stream).await;
            assert_eq!(
                login.body,
                Body::Login { user_id: 1, user_name: "alice".into(), token: String::new() }
            );
            let ack = Body::LoginAck {
                node_id: "node-1".into(),
                heartbeat_secs: 30,
                user: cim_proto::User { id: 1, name: "alice".into() },
                token_expires_at_ms: 0,
            };
            server_sink.send(Frame::new(login.request_id, ack)).await.unwrap();
        });
        let recorder = Recorder::default();
        let accepted = handshake(&mut sink, &mut stream, 7, ALICE, Duration::from_secs(5), &recorder).await;
        let accepted = accepted.unwrap();
        assert_eq!((accepted.node_id.as_str(), accepted.heartbeat_secs), ("node-1", 30));
        assert_eq!(accepted.user, cim_proto::User { id: 1, name: "alice".into() });
        server.await.unwrap();
    }

    #[tokio::test]
    async fn duplicate_login_is_reported_as_such() {
        let ((mut sink, mut stream), (mut server_sink, mut server_stream)) = pipe();
        tokio::spawn(async move {
            let login = next_frame(&mut server_stream).await;
            let error = Frame::error(login.request_id, ErrorCode::DuplicateLogin, "already online");
            server_sink.send(error).await.unwrap();
        });
        let recorder = Recorder::default();
        match handshake(&mut sink, &mut stream, 7, ALICE, Duration::from_secs(5), &recorder).await {
            Err(ClientError::DuplicateLogin(m)) => assert_eq!(m, "already online"),
            other => panic!("expected DuplicateLogin, got {other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_the_login_out() {
        let ((mut sink, mut stream), server) = pipe();
        let recorder = Recorder::default();
        let result = handshake(&mut sink, &mut stream, 7, ALICE, Duration::from_secs(5), &recorder).await;
        assert!(matches!(result, Err(ClientError::Timeout { what: "login", .. })), "{result:?}");
        drop(server);
    }

    #[tokio::test]
    async fn a_server_that_hangs_up_fails_the_login() {
        let ((mut sink, mut stream), server) = pipe();
        drop(server);
        let recorder = Recorder::default();
        let result = handshake(&mut sink, &mut stream, 7, ALICE, Duration::from_secs(5), &recorder).await;
        assert!(matches!(result, Err(ClientError::Io(_))), "{result:?}");
    }

    /// Starts [`Connection::run`] on the client end; returns the command queue, the
    /// shutdown token, the recorder and the task.
    fn start(
        client: (FrameSink, FrameStream),
        heartbeat: Duration,
    ) -> (mpsc::Sender<Command>, CancellationToken, Arc<Recorder>, tokio::task::JoinHandle<End>) {
        let (tx, rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let recorder = Arc::new(Recorder::default());
        let task = tokio::spawn({
            let shutdown = shutdown.clone();
            let recorder = recorder.clone();
            async move {
                let ids = RequestIds::new();
                let connection = Connection { ids: &ids, handler: &*recorder, heartbeat };
                connection.run(client.0, client.1, rx, &shutdown).await
            }
        });
        (tx, shutdown, recorder, task)
    }

    async fn request(tx: &mpsc::Sender<Command>, body: Body) -> oneshot::Receiver<Body> {
        let (reply, answer) = oneshot::channel();
        tx.send(Command { body, reply }).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn answers_reach_their_requests_and_deliveries_the_handler() {
        let (client, (mut server_sink, mut server_stream)) = pipe();
        let (tx, shutdown, recorder, task) = start(client, Duration::from_secs(60));

        let first = request(&tx, Body::PrivateSend { to: 2, text: "hi".into() }).await;
        let second = request(&tx, Body::OnlineRequest).await;
        let send = next_frame(&mut server_stream).await;
        assert_eq!(send.body, Body::PrivateSend { to: 2, text: "hi".into() });
        let online = next_frame(&mut server_stream).await;
        assert_eq!(online.body, Body::OnlineRequest);
        assert_ne!(send.request_id, online.request_id);

        // Answers out of order, with a push in between.
        let users = vec![cim_proto::User { id: 1, name: "alice".into() }];
        server_sink
            .send(Frame::new(online.request_id, Body::OnlineResponse { users: users.clone() }))
            .await
            .unwrap();
        server_sink.send(Frame::push(Body::Delivery(delivery(2, "yo")))).await.unwrap();
        server_sink.send(Frame::new(send.request_id, Body::Ack { message_id: 99 })).await.unwrap();

        assert_eq!(second.await.unwrap(), Body::OnlineResponse { users });
        assert_eq!(first.await.unwrap(), Body::Ack { message_id: 99 });
        assert_eq!(recorder.deliveries(), vec![delivery(2, "yo")]);

        shutdown.cancel();
        assert_eq!(task.await.unwrap(), End::Shutdown);
        assert!(server_stream.next().await.is_none(), "the socket is closed");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_ping_and_silent_ones_are_dead() {
        let (client, (mut server_sink, mut server_stream)) = pipe();
        let (_tx, _shutdown, _recorder, task) = start(client, Duration::from_secs(60));
        let started = Instant::now();

        let ping = next_frame(&mut server_stream).await;
        assert_eq!(ping.body, Body::Ping);
        assert_ne!(ping.request_id, 0);
        assert_eq!(started.elapsed(), Duration::from_secs(60));
        server_sink.send(Frame::new(ping.request_id, Body::Pong)).await.unwrap();

        // From now on the server says nothing: dead 180 s after the PONG.
        let end = task.await.unwrap();
        assert!(matches!(&end, End::Lost(reason) if reason.contains("180s")), "{end:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(240));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_postpone_the_ping() {
        let (client, (_server_sink, mut server_stream)) = pipe();
        let (tx, _shutdown, _recorder, _task) = start(client, Duration::from_secs(60));
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(40)).await;
        let _answer = request(&tx, Body::GroupSend { text: "hello".into() }).await;
        assert_eq!(next_frame(&mut server_stream).await.body, Body::GroupSend { text: "hello".into() });
        assert_eq!(next_frame(&mut server_stream).await.body, Body::Ping);
        assert_eq!(started.elapsed(), Duration::from_secs(100));
    }

    #[tokio::test]
    async fn a_kick_ends_the_connection_and_fails_waiting_requests() {
        let (client, (mut server_sink, mut server_stream)) = pipe();
        let (tx, _shutdown, _recorder, task) = start(client, Duration::from_secs(60));
        let answer = request(&tx, Body::GroupSend { text: "x".into() }).await;
        next_frame(&mut server_stream).await;
        let kick = Body::Kick { code: ErrorCode::DuplicateLogin, reason: "logged in elsewhere".into() };
        server_sink.send(Frame::push(kick)).await.unwrap();
        assert_eq!(
            task.await.unwrap(),
            End::Kicked { code: ErrorCode::DuplicateLogin, reason: "logged in elsewhere".into() }
        );
        assert!(answer.await.is_err(), "the request fails as closed");
    }

    #[tokio::test]
    async fn a_hang_up_is_a_lost_connection() {
        let (client, (server_sink, mut server_stream)) = pipe();
        let (tx, _shutdown, _recorder, task) = start(client, Duration::from_secs(60));
        let answer = request(&tx, Body::OnlineRequest).await;
        next_frame(&mut server_stream).await;
        drop((server_sink, server_stream));
        let end = task.await.unwrap();
        assert!(matches!(end, End::Lost(_)), "{end:?}");
        assert!(answer.await.is_err());
    }

    #[tokio::test]
    async fn undecodable_frames_and_stray_answers_are_skipped() {
        use cim_proto::codec::encode_delimited;
        use tokio::io::AsyncWriteExt;

        let (client, mut server) = tokio::io::duplex(4096);
        let (tx, shutdown, recorder, task) = start(framed(client, MAX), Duration::from_secs(60));
        let mut bytes = vec![3u8, 0xff, 0xff, 0xff]; // a well-delimited frame of garbage
        bytes.extend(encode_delimited(Frame::new(12345, Body::Pong)));
        let error = Body::Error { code: ErrorCode::BadFrame, message: "?".into(), retry_after_ms: 0 };
        bytes.extend(encode_delimited(Frame::push(error)));
        bytes.extend(encode_delimited(Frame::push(Body::Delivery(delivery(3, "after")))));
        server.write_all(&bytes).await.unwrap();
        while recorder.deliveries().is_empty() {
            tokio::task::yield_now().await;
        }
        assert_eq!(recorder.deliveries(), vec![delivery(3, "after")]);
        assert!(!task.is_finished());
        drop(tx);
        shutdown.cancel();
        assert_eq!(task.await.unwrap(), End::Shutdown);
    }
}
