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
        assert_eq!(login.body, Body::login(1, "alice".into(), String::new()));
        let ack = Body::LoginAck(cim_proto::LoginAck {
            node_id: "node-1".into(),
            heartbeat_secs: 30,
            user: cim_proto::User { id: 1, name: "alice".into() },
            ..Default::default()
        });
        server_sink.send(Frame::new(login.request_id, ack)).await.unwrap();
    });
    let recorder = Recorder::default();
    let accepted = handshake(
        &mut sink,
        &mut stream,
        7,
        ALICE,
        Duration::from_secs(5),
        &Deliveries::default(),
        &recorder,
    )
    .await;
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
    match handshake(
        &mut sink,
        &mut stream,
        7,
        ALICE,
        Duration::from_secs(5),
        &Deliveries::default(),
        &recorder,
    )
    .await
    {
        Err(ClientError::DuplicateLogin(m)) => assert_eq!(m, "already online"),
        other => panic!("expected DuplicateLogin, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_server_times_the_login_out() {
    let ((mut sink, mut stream), server) = pipe();
    let recorder = Recorder::default();
    let result = handshake(
        &mut sink,
        &mut stream,
        7,
        ALICE,
        Duration::from_secs(5),
        &Deliveries::default(),
        &recorder,
    )
    .await;
    assert!(matches!(result, Err(ClientError::Timeout { what: "login", .. })), "{result:?}");
    drop(server);
}

#[tokio::test]
async fn a_server_that_hangs_up_fails_the_login() {
    let ((mut sink, mut stream), server) = pipe();
    drop(server);
    let recorder = Recorder::default();
    let result = handshake(
        &mut sink,
        &mut stream,
        7,
        ALICE,
        Duration::from_secs(5),
        &Deliveries::default(),
        &recorder,
    )
    .await;
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
            let deliveries = Deliveries::default();
            let connection =
                Connection { ids: &ids, handler: &*recorder, deliveries: &deliveries, heartbeat };
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

    let first = request(&tx, Body::private(2, "hi".into())).await;
    let second = request(&tx, Body::OnlineRequest).await;
    let send = next_frame(&mut server_stream).await;
    assert_eq!(send.body, Body::private(2, "hi".into()));
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
    server_sink.send(Frame::new(send.request_id, Body::ack(99))).await.unwrap();

    assert_eq!(second.await.unwrap(), Body::OnlineResponse { users });
    assert_eq!(first.await.unwrap(), Body::ack(99));
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
    let _answer = request(&tx, Body::group("hello".into())).await;
    assert_eq!(next_frame(&mut server_stream).await.body, Body::group("hello".into()));
    assert_eq!(next_frame(&mut server_stream).await.body, Body::Ping);
    assert_eq!(started.elapsed(), Duration::from_secs(100));
}

fn at(message_id: u64, kind: MessageKind, position: u64) -> Delivery {
    Delivery { message_id, kind, position, ..delivery(2, "x") }
}

fn acked(inbox: u64, group: u64) -> Body {
    Body::Ack { message_id: 0, stored: false, received: Some(cim_proto::Positions { inbox, group }) }
}

/// Positions are acknowledged about once a second, batched, one tick late; a close
/// acknowledges everything received.
#[tokio::test(start_paused = true)]
async fn received_positions_are_acked_batched_and_a_tick_late() {
    let (client, (mut server_sink, mut server_stream)) = pipe();
    let (_tx, shutdown, recorder, task) = start(client, Duration::from_secs(60));
    let started = Instant::now();
    for d in [at(1, MessageKind::Private, 5), at(2, MessageKind::Group, 3), at(3, MessageKind::Private, 6)] {
        server_sink.send(Frame::push(Body::Delivery(d))).await.unwrap();
    }
    // Three deliveries, one ACK: the tick at 1 s saw them, the one at 2 s acknowledges them.
    let ack = next_frame(&mut server_stream).await;
    assert_eq!((ack.request_id, ack.body), (0, acked(6, 3)));
    assert_eq!(started.elapsed(), Duration::from_secs(2));

    // A late lower position from another sender, then a higher one: one ACK, past both.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server_sink.send(Frame::push(Body::Delivery(at(5, MessageKind::Private, 8)))).await.unwrap();
    server_sink.send(Frame::push(Body::Delivery(at(4, MessageKind::Private, 7)))).await.unwrap();
    assert_eq!(next_frame(&mut server_stream).await.body, acked(8, 3));
    assert_eq!(started.elapsed(), Duration::from_secs(4));

    // Nothing new: no ACK, only the heartbeat PING a minute after the last frame.
    assert_eq!(next_frame(&mut server_stream).await.body, Body::Ping);
    assert_eq!(started.elapsed(), Duration::from_secs(64));

    // Received just before a close: acknowledged at the close.
    server_sink.send(Frame::push(Body::Delivery(at(6, MessageKind::Group, 9)))).await.unwrap();
    while recorder.deliveries().len() < 6 {
        tokio::task::yield_now().await;
    }
    shutdown.cancel();
    assert_eq!(task.await.unwrap(), End::Shutdown);
    assert_eq!(next_frame(&mut server_stream).await.body, acked(8, 9));
    assert!(server_stream.next().await.is_none());
}

#[tokio::test]
async fn a_login_presents_the_positions_and_token_and_reports_missed_streams() {
    let ((mut sink, mut stream), (mut server_sink, mut server_stream)) = pipe();
    let deliveries = Deliveries::default();
    deliveries.logged_in(cim_proto::Positions { inbox: 4, group: 2 }, "resume-me");
    let server = tokio::spawn(async move {
        let login = next_frame(&mut server_stream).await;
        let Body::Login(l) = &login.body else { panic!("{login:?}") };
        assert_eq!(
            (l.resume_from, l.resume_token.as_str()),
            (cim_proto::Positions { inbox: 4, group: 2 }, "resume-me")
        );
        let ack = Body::LoginAck(cim_proto::LoginAck {
            node_id: "node-1".into(),
            resume_from: cim_proto::Positions { inbox: 4, group: 7 },
            missed_group: true,
            resume_token: "next".into(),
            ..Default::default()
        });
        server_sink.send(Frame::new(login.request_id, ack)).await.unwrap();
    });
    let recorder = MissedRecorder::default();
    handshake(&mut sink, &mut stream, 7, ALICE, Duration::from_secs(5), &deliveries, &recorder)
        .await
        .unwrap();
    server.await.unwrap();
    assert_eq!(*recorder.0.lock().unwrap(), vec![MessageKind::Group]);
    assert_eq!(deliveries.resume(), (cim_proto::Positions { inbox: 4, group: 7 }, "next".to_owned()));
}

#[derive(Default)]
struct MissedRecorder(std::sync::Mutex<Vec<MessageKind>>);

impl MessageHandler for MissedRecorder {
    fn on_delivery(&self, _: &Delivery) {}
    fn on_missed(&self, kind: MessageKind) {
        self.0.lock().unwrap().push(kind);
    }
}

#[tokio::test]
async fn a_kick_ends_the_connection_and_fails_waiting_requests() {
    let (client, (mut server_sink, mut server_stream)) = pipe();
    let (tx, _shutdown, _recorder, task) = start(client, Duration::from_secs(60));
    let answer = request(&tx, Body::group("x".into())).await;
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
