//! [`Client`]: the public handle — log in, send, list online users, close.

use std::sync::{Arc, Mutex, MutexGuard};

use cim_proto::{Body, Frame, User, encode_message};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::config::ClientConfig;
use crate::connection::Command;
use crate::error::ClientError;
use crate::handler::MessageHandler;
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
    link: Mutex<Link>,
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
}

impl Inner {
    /// Makes the connection to `node_id` the one requests go to; returns its queue's receiver.
    pub(crate) fn attach(&self, node_id: &str) -> mpsc::Receiver<Command> {
        let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
        let mut link = self.link();
        link.commands = Some(tx);
        node_id.clone_into(&mut link.node_id);
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
        let after = self.config.request_timeout;
        let what = body.kind_name();
        let timed_out = |_| ClientError::Timeout { what, after };
        let deadline = Instant::now() + after;
        let commands = self.link().commands.clone().ok_or(ClientError::Closed)?;
        let (reply, answer) = oneshot::channel();
        timeout_at(deadline, commands.send(Command { body, reply }))
            .await
            .map_err(timed_out)?
            .map_err(|_| ClientError::Closed)?;
        timeout_at(deadline, answer).await.map_err(timed_out)?.map_err(|_| ClientError::Closed)
    }

    /// From now on requests fail at once with [`ClientError::Closed`].
    pub(crate) fn detach(&self) {
        self.link().commands = None;
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
        let link = Mutex::new(Link { commands: None, node_id: String::new(), user });
        let inner = Arc::new(Inner { config, handler, ids: RequestIds::new(), link });
        let established = supervisor::establish(&inner).await?;
        let commands = inner.attach(&established.node_id);
        let shutdown = CancellationToken::new();
        let task =
            tokio::spawn(supervisor::supervise(inner.clone(), established, commands, shutdown.clone()));
        Ok(Client { inner, shutdown, task: Some(task) })
    }

    /// Sends `text` to user `to`; returns the server-assigned message id.
    pub async fn send_private(&self, to: u64, text: impl Into<String>) -> Result<u64, ClientError> {
        let answer = self.request(Body::PrivateSend { to, text: text.into() }).await?;
        expect_ack(answer)
    }

    /// Sends `text` to the group (by default every other online user); returns the
    /// server-assigned message id.
    pub async fn send_group(&self, text: impl Into<String>) -> Result<u64, ClientError> {
        let answer = self.request(Body::GroupSend { text: text.into() }).await?;
        expect_ack(answer)
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
            Body::PrivateSend { text, .. } | Body::GroupSend { text } => text,
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
    match answer {
        Body::Ack { message_id } => Ok(message_id),
        Body::Error { code, message, retry_after_ms } => {
            Err(ClientError::from_error(code, message, retry_after_ms))
        }
        other => Err(unexpected("ack", &other)),
    }
}

fn unexpected(expected: &str, got: &Body) -> ClientError {
    ClientError::Protocol(format!("expected {expected}, got {}", got.kind_name()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ReconnectPolicy, Transport};
    use crate::handler::ClientEvent;
    use crate::test_support::{FakeNode, FakeRoute, Recorder, delivery, next_frame};
    use cim_proto::ErrorCode;
    use futures_util::{SinkExt, StreamExt};
    use std::time::Duration;

    fn config(route: &FakeRoute, transport: Transport) -> ClientConfig {
        let mut config = ClientConfig::new(route.url.clone(), 1, "alice");
        config.transport = transport;
        config.request_timeout = Duration::from_secs(5);
        config.reconnect = ReconnectPolicy {
            max_attempts: Some(5),
            initial_delay: Duration::from_millis(20),
            max_delay: Duration::from_millis(100),
        };
        config
    }

    async fn login_and_chat(transport: Transport) {
        let mut node = FakeNode::start(transport == Transport::WebSocket).await;
        let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
        let recorder = Arc::new(Recorder::default());
        let (client, (mut sink, mut stream, login)) = tokio::join!(
            Client::login(config(&route, transport), recorder.clone()),
            node.accept_login("node-1"),
        );
        let client = client.unwrap();
        assert_eq!(login.body, Body::Login { user_id: 1, user_name: "alice".into(), token: String::new() });
        assert_eq!((client.node_id(), client.user_id()), ("node-1".to_owned(), 1));
        assert!(client.is_connected());

        // A private send is acknowledged with its message id.
        let (sent, ()) = tokio::join!(client.send_private(2, "hi bob"), async {
            let frame = next_frame(&mut stream).await;
            assert_eq!(frame.body, Body::PrivateSend { to: 2, text: "hi bob".into() });
            assert_ne!(frame.request_id, login.request_id);
            sink.send(Frame::new(frame.request_id, Body::Ack { message_id: 77 })).await.unwrap();
        });
        assert_eq!(sent.unwrap(), 77);

        // An ERROR answer becomes a typed error.
        let (sent, ()) = tokio::join!(client.send_private(9, "anyone?"), async {
            let frame = next_frame(&mut stream).await;
            let error = Frame::error(frame.request_id, ErrorCode::UserOffline, "user 9 is not online");
            sink.send(error).await.unwrap();
        });
        match sent {
            Err(ClientError::Server { code: ErrorCode::UserOffline, message }) => {
                assert_eq!(message, "user 9 is not online");
            }
            other => panic!("expected UserOffline, got {other:?}"),
        }

        let users = vec![User { id: 1, name: "alice".into() }, User { id: 2, name: "bob".into() }];
        let (online, ()) = tokio::join!(client.online_users(), async {
            let frame = next_frame(&mut stream).await;
            assert_eq!(frame.body, Body::OnlineRequest);
            let answer = Body::OnlineResponse { users: users.clone() };
            sink.send(Frame::new(frame.request_id, answer)).await.unwrap();
        });
        assert_eq!(online.unwrap(), users);

        let (sent, ()) = tokio::join!(client.send_group("hi all"), async {
            let frame = next_frame(&mut stream).await;
            assert_eq!(frame.body, Body::GroupSend { text: "hi all".into() });
            sink.send(Frame::new(frame.request_id, Body::Ack { message_id: 78 })).await.unwrap();
        });
        assert_eq!(sent.unwrap(), 78);

        sink.send(Frame::push(Body::Delivery(delivery(2, "hello alice")))).await.unwrap();
        recorder.wait_for_deliveries(1).await;
        assert_eq!(recorder.deliveries(), vec![delivery(2, "hello alice")]);

        client.close().await;
        assert!(stream.next().await.is_none(), "close ends the connection");
        assert!(recorder.events().is_empty(), "a requested close is no event");
        let request = route.requests().remove(0);
        assert!(request.contains(r#""user_id":1"#), "{request}");
    }

    #[tokio::test]
    async fn login_send_receive_and_close_over_tcp() {
        login_and_chat(Transport::Tcp).await;
    }

    #[tokio::test]
    async fn login_send_receive_and_close_over_websocket() {
        login_and_chat(Transport::WebSocket).await;
    }

    #[tokio::test]
    async fn duplicate_login_from_the_route_or_the_node_is_an_error() {
        let route = FakeRoute::start(vec![(
            409,
            r#"{"error":"duplicate_login","message":"user 1 is already online"}"#.into(),
        )])
        .await;
        let result = Client::login(config(&route, Transport::Tcp), Arc::new(Recorder::default()));
        assert!(matches!(result.await, Err(ClientError::DuplicateLogin(_))));

        let mut node = FakeNode::start(false).await;
        route.answer(vec![node.route_answer("node-1")]);
        let login = Client::login(config(&route, Transport::Tcp), Arc::new(Recorder::default()));
        let (result, ()) = tokio::join!(login, async {
            let (mut sink, mut stream) = node.accept().await;
            let frame = next_frame(&mut stream).await;
            let error = Frame::error(frame.request_id, ErrorCode::DuplicateLogin, "online");
            sink.send(error).await.unwrap();
        });
        assert!(matches!(result, Err(ClientError::DuplicateLogin(m)) if m == "online"));
    }

    #[tokio::test]
    async fn a_lost_connection_is_re_established_even_through_a_duplicate_login() {
        let mut node = FakeNode::start(false).await;
        let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
        let recorder = Arc::new(Recorder::default());
        let (client, (sink, stream, _)) = tokio::join!(
            Client::login(config(&route, Transport::Tcp), recorder.clone()),
            node.accept_login("node-1"),
        );
        let client = client.unwrap();

        // The server still lists the user for a moment after the drop.
        route.answer(vec![
            (409, r#"{"error":"duplicate_login","message":"still online"}"#.into()),
            node.route_answer("node-2"),
        ]);
        drop((sink, stream));
        recorder.wait_for_events(|e| !e.is_empty()).await;
        assert!(matches!(client.send_group("lost?").await, Err(ClientError::Closed)));

        let (mut sink, mut stream, _) = node.accept_login("node-2").await;
        recorder.wait_for_events(|e| e.iter().any(|e| matches!(e, ClientEvent::Reconnected { .. }))).await;
        let events = recorder.events();
        assert!(matches!(&events[0], ClientEvent::Reconnecting { attempt: 1, .. }), "{events:?}");
        assert!(
            matches!(&events[1], ClientEvent::Reconnecting { attempt: 2, reason } if reason.contains("still online")),
            "{events:?}"
        );
        assert_eq!(events[2], ClientEvent::Reconnected { node_id: "node-2".into() });
        assert_eq!(client.node_id(), "node-2");
        assert_eq!(route.requests().len(), 3);

        let (sent, ()) = tokio::join!(client.send_group("back"), async {
            let frame = next_frame(&mut stream).await;
            sink.send(Frame::new(frame.request_id, Body::Ack { message_id: 5 })).await.unwrap();
        });
        assert_eq!(sent.unwrap(), 5);
        client.close().await;
    }

    #[tokio::test]
    async fn a_kick_is_final() {
        let mut node = FakeNode::start(false).await;
        let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
        let recorder = Arc::new(Recorder::default());
        let (client, (mut sink, _stream, _)) = tokio::join!(
            Client::login(config(&route, Transport::Tcp), recorder.clone()),
            node.accept_login("node-1"),
        );
        let client = client.unwrap();
        let kick = Body::Kick { code: ErrorCode::DuplicateLogin, reason: "logged in elsewhere".into() };
        sink.send(Frame::push(kick)).await.unwrap();
        recorder.wait_for_events(|e| !e.is_empty()).await;
        assert_eq!(
            recorder.events(),
            vec![ClientEvent::Kicked {
                code: ErrorCode::DuplicateLogin,
                reason: "logged in elsewhere".into()
            }]
        );
        assert!(!client.is_connected());
        assert!(matches!(client.send_group("x").await, Err(ClientError::Closed)));
        assert_eq!(route.requests().len(), 1, "no reconnect after a kick");
    }

    #[tokio::test]
    async fn a_node_shutting_down_is_not_final() {
        let mut node = FakeNode::start(false).await;
        let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
        let recorder = Arc::new(Recorder::default());
        let (client, (mut sink, _stream, _)) = tokio::join!(
            Client::login(config(&route, Transport::Tcp), recorder.clone()),
            node.accept_login("node-1"),
        );
        let client = client.unwrap();
        let kick = Body::Kick { code: ErrorCode::Unavailable, reason: "shutting down".into() };
        sink.send(Frame::push(kick)).await.unwrap();
        let _connection = node.accept_login("node-1").await;
        recorder.wait_for_events(|e| e.iter().any(|e| matches!(e, ClientEvent::Reconnected { .. }))).await;
        let events = recorder.events();
        assert!(
            matches!(&events[0], ClientEvent::Reconnecting { attempt: 1, reason } if reason.contains("shutting down")),
            "{events:?}"
        );
        assert!(client.is_connected());
        client.close().await;
    }

    #[tokio::test]
    async fn reconnecting_gives_up_after_the_configured_attempts() {
        let mut node = FakeNode::start(false).await;
        let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
        let recorder = Arc::new(Recorder::default());
        let mut config = config(&route, Transport::Tcp);
        config.reconnect.max_attempts = Some(2);
        let (client, connection) =
            tokio::join!(Client::login(config, recorder.clone()), node.accept_login("node-1"));
        let _client = client.unwrap();
        route.answer(vec![(503, r#"{"error":"unavailable","message":"store down"}"#.into())]);
        drop(connection);
        recorder.wait_for_events(|e| e.iter().any(|e| matches!(e, ClientEvent::Disconnected { .. }))).await;
        let events = recorder.events();
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(
            matches!(&events[2], ClientEvent::Disconnected { reason }
                if reason.contains("gave up after 2") && reason.contains("store down")),
            "{events:?}"
        );
    }

    #[tokio::test]
    async fn oversized_messages_are_refused_before_sending() {
        let mut node = FakeNode::start(false).await;
        let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
        let mut config = config(&route, Transport::Tcp);
        config.max_frame = 100;
        let (client, _connection) =
            tokio::join!(Client::login(config, Arc::new(Recorder::default())), node.accept_login("node-1"),);
        let client = client.unwrap();
        let result = client.send_group("x".repeat(100)).await;
        assert!(matches!(result, Err(ClientError::TooLarge { max: 100, .. })), "{result:?}");
        assert!(client.is_connected());
    }

    #[test]
    fn the_client_can_be_shared_between_tasks() {
        fn shared<T: Send + Sync + 'static>() {}
        shared::<Client>();
    }

    #[tokio::test]
    async fn bad_configuration_is_refused() {
        let route = FakeRoute::start(vec![]).await;
        let mut config = config(&route, Transport::Tcp);
        config.user_id = 0;
        let result = Client::login(config, Arc::new(Recorder::default())).await;
        assert!(matches!(result, Err(ClientError::Config(m)) if m.contains("user_id")));
        assert!(route.requests().is_empty());
    }
}
