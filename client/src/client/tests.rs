use super::*;
use crate::config::{ReconnectPolicy, Transport};
use crate::handler::ClientEvent;
use crate::test_support::{FakeNode, FakeRoute, Recorder, delivery, next_frame};
use cim_proto::ErrorCode;
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;

/// A send without its client_msg_id, and that id.
fn split_id(body: Body) -> (Body, String) {
    match body {
        Body::PrivateSend { to, text, client_msg_id } => (Body::private(to, text), client_msg_id),
        Body::GroupSend { text, client_msg_id } => (Body::group(text), client_msg_id),
        other => panic!("expected a send, got {other:?}"),
    }
}

/// The next frame that is not a position ACK.
async fn next_request(stream: &mut crate::transport::FrameStream) -> Frame {
    loop {
        let frame = next_frame(stream).await;
        if !matches!(frame.body, Body::Ack { received: Some(_), .. }) {
            return frame;
        }
    }
}

fn at(message_id: u64, kind: cim_proto::MessageKind, position: u64) -> cim_proto::Delivery {
    cim_proto::Delivery { message_id, kind, position, ..delivery(2, &format!("m{message_id}")) }
}

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
    assert_eq!(login.body, Body::login(1, "alice".into(), String::new()));
    assert_eq!((client.node_id(), client.user_id()), ("node-1".to_owned(), 1));
    assert!(client.is_connected());

    // A private send is acknowledged with its message id; each send has its own client id.
    let (sent, id) = tokio::join!(client.send_private(2, "hi bob"), async {
        let frame = next_frame(&mut stream).await;
        assert_ne!(frame.request_id, login.request_id);
        let (body, id) = split_id(frame.body);
        assert_eq!(body, Body::private(2, "hi bob".into()));
        sink.send(Frame::new(frame.request_id, Body::ack(77))).await.unwrap();
        id
    });
    assert_eq!(sent.unwrap(), Sent { message_id: 77, stored: false, client_msg_id: id.clone() });
    assert!(!id.is_empty() && id.len() <= 64, "{id}");

    // To an offline user: stored.
    let (sent, other_id) = tokio::join!(client.send_private(3, "later"), async {
        let frame = next_frame(&mut stream).await;
        let stored = Body::Ack { message_id: 79, stored: true, received: None };
        sink.send(Frame::new(frame.request_id, stored)).await.unwrap();
        split_id(frame.body).1
    });
    let sent = sent.unwrap();
    assert_eq!((sent.message_id, sent.stored), (79, true));
    assert_ne!(other_id, id);

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
        assert_eq!(split_id(frame.body).0, Body::group("hi all".into()));
        sink.send(Frame::new(frame.request_id, Body::ack(78))).await.unwrap();
    });
    assert_eq!(sent.unwrap().message_id, 78);

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
        sink.send(Frame::new(frame.request_id, Body::ack(5))).await.unwrap();
    });
    assert_eq!(sent.unwrap().message_id, 5);
    client.close().await;
}

/// After a lost connection: LOGIN resumes from the acknowledged positions, a replayed
/// message already shown is dropped, and the send that was waiting for its answer goes
/// again with the same client_msg_id.
#[tokio::test]
async fn a_reconnect_resumes_drops_duplicates_and_resends() {
    use cim_proto::{MessageKind, Positions};
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let recorder = Arc::new(Recorder::default());
    let (client, (mut sink, mut stream, _)) = tokio::join!(
        Client::login(config(&route, Transport::Tcp), recorder.clone()),
        node.accept_login("node-1"),
    );
    let client = Arc::new(client.unwrap());
    route.answer(vec![node.route_answer("node-2")]);

    for d in [at(500, MessageKind::Private, 3), at(501, MessageKind::Group, 8)] {
        sink.send(Frame::push(Body::Delivery(d))).await.unwrap();
    }
    // Acknowledged a tick after the tick that saw them: once, with both positions.
    let ack = next_frame(&mut stream).await;
    assert_eq!(
        ack.body,
        Body::Ack { message_id: 0, stored: false, received: Some(Positions { inbox: 3, group: 8 }) }
    );
    assert_eq!(ack.request_id, 0);

    // A send that the server takes but does not answer before the connection drops.
    let send = tokio::spawn({
        let client = client.clone();
        async move { client.send_private(2, "are you there").await }
    });
    let first = next_request(&mut stream).await;
    let (body, id) = split_id(first.body);
    assert_eq!(body, Body::private(2, "are you there".into()));
    drop((sink, stream));

    let (mut sink, mut stream, login) = node.accept_login("node-2").await;
    let Body::Login(login) = login.body else { unreachable!() };
    assert_eq!(login.resume_from, Positions { inbox: 3, group: 8 });
    // Replay: one message seen before, one new.
    for d in [at(500, MessageKind::Private, 3), at(502, MessageKind::Private, 4)] {
        sink.send(Frame::push(Body::Delivery(cim_proto::Delivery { replayed: true, ..d }))).await.unwrap();
    }
    let again = next_request(&mut stream).await;
    assert_eq!(split_id(again.body), (Body::private(2, "are you there".into()), id.clone()));
    let stored = Body::Ack { message_id: 90, stored: true, received: None };
    sink.send(Frame::new(again.request_id, stored)).await.unwrap();
    let sent = send.await.unwrap().unwrap();
    assert_eq!(sent, Sent { message_id: 90, stored: true, client_msg_id: id });

    recorder.wait_for_deliveries(3).await;
    let ids: Vec<u64> = recorder.deliveries().iter().map(|d| d.message_id).collect();
    assert_eq!(ids, [500, 501, 502]);
    assert_eq!(client.duplicates_dropped(), 1);
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
        vec![ClientEvent::Kicked { code: ErrorCode::DuplicateLogin, reason: "logged in elsewhere".into() }]
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
