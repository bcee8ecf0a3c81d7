//! The wire protocol as docs/API.md and proto/cim.proto state it, one test per rule, over
//! TCP and WebSocket where the transport matters. (Limits have their own file, limits.rs;
//! acks and resume are in resume.rs and delivery.rs.)

mod common;

use cim_proto::{Body, ErrorCode, Frame, pb};
use common::{Host, RawClient, expect_error};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

/// An envelope whose kind says LOGIN but whose payload is a PING.
fn mismatched(request_id: u64) -> Vec<u8> {
    pb::Envelope {
        request_id,
        kind: pb::Kind::Login as i32,
        payload: Some(pb::envelope::Payload::Ping(pb::Ping {})),
    }
    .encode_to_vec()
}

/// An envelope with request id `request_id` whose payload is broken (a LOGIN whose name is
/// not UTF-8): the envelope cannot be decoded, its request id can.
fn broken_payload(request_id: u64) -> Vec<u8> {
    let mut login = Vec::new();
    prost::encoding::uint64::encode(1, &5, &mut login);
    prost::encoding::bytes::encode(2, &vec![0xff, 0xfe], &mut login);
    let mut env = Vec::new();
    prost::encoding::uint64::encode(1, &request_id, &mut env);
    prost::encoding::int32::encode(2, &(pb::Kind::Login as i32), &mut env);
    prost::encoding::bytes::encode(4, &login, &mut env);
    env
}

fn delimited(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(bytes.len() as u64, &mut out);
    out.extend_from_slice(bytes);
    out
}

/// "An error carries the request id whenever it was decoded; BAD_FRAME leaves the
/// connection open."
#[tokio::test]
async fn bad_frames_are_answered_with_their_request_id_and_the_connection_stays() {
    let host = Host::start(&[]).await.unwrap();
    for ws in [false, true] {
        let mut c = if ws {
            RawClient::login_ws(&host, 1, "a").await
        } else {
            RawClient::login_tcp(&host, 1, "a").await
        };
        let send = |bytes: Vec<u8>| if ws { bytes } else { delimited(&bytes) };
        c.send_raw(&send(mismatched(41))).await;
        let f = c.frame().await;
        assert_eq!(f.request_id, 41, "kind/payload mismatch names its request ({ws})");
        expect_error(f.body, ErrorCode::BadFrame);
        c.send_raw(&send(broken_payload(42))).await;
        let f = c.frame().await;
        assert_eq!(f.request_id, 42, "a broken payload names its request ({ws})");
        expect_error(f.body, ErrorCode::BadFrame);
        // Undecodable through and through: request id 0.
        c.send_raw(&send(vec![0xff, 0xff, 0xff, 0xff])).await;
        let f = c.frame().await;
        assert_eq!(f.request_id, 0);
        expect_error(f.body, ErrorCode::BadFrame);
        assert_eq!(c.request(43, Body::Ping).await, Body::Pong, "still open ({ws})");
        drop(c);
        host.wait_online(&[]).await;
    }
}

/// "Before LOGIN, a bad first frame is answered BAD_FRAME (with its request id) and the
/// connection is closed."
#[tokio::test]
async fn a_bad_first_frame_is_answered_with_its_request_id_then_closed() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::tcp(&host).await;
    c.send_raw(&delimited(&mismatched(7))).await;
    let frames = c.closed().await;
    assert!(
        matches!(&frames[..], [Frame { request_id: 7, body: Body::Error { code: ErrorCode::BadFrame, .. } }]),
        "{frames:?}"
    );
}

/// "Server-only kinds (LOGIN_ACK, PONG, ONLINE_RESPONSE, DELIVERY, ERROR, KICK, PRESENCE)
/// from a client are answered UNEXPECTED; a second LOGIN too."
#[tokio::test]
async fn server_only_kinds_and_a_second_login_are_unexpected() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::login_tcp(&host, 1, "a").await;
    let server_only = [
        Body::Pong,
        Body::OnlineResponse { users: vec![] },
        Body::Error { code: ErrorCode::Invalid, message: "x".into(), retry_after_ms: 0 },
        Body::Kick { code: ErrorCode::Replaced, reason: "x".into() },
        Body::Presence { online: vec![], offline: vec![], resync: false },
        Body::LoginAck(Default::default()),
        Body::login(1, "a".into(), String::new()),
    ];
    for (i, body) in server_only.into_iter().enumerate() {
        let id = 10 + i as u64;
        let name = body.kind_name();
        let answer = c.request(id, body).await;
        let msg = expect_error(answer, ErrorCode::Unexpected);
        assert!(!msg.is_empty(), "{name}");
    }
    assert_eq!(c.request(20, Body::Ping).await, Body::Pong);
}

/// "Request id 0 marks server pushes: a request with it is refused INVALID (the connection
/// stays); ACK, which is never answered, may carry it; LOGIN with it is refused and closed."
#[tokio::test]
async fn request_id_zero_is_refused_for_requests() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::login_tcp(&host, 1, "a").await;
    for body in [Body::Ping, Body::OnlineRequest, Body::group("x".into()), Body::private(2, "x".into())] {
        c.send(Frame::new(0, body)).await;
        let f = c.frame().await;
        assert_eq!(f.request_id, 0);
        let msg = expect_error(f.body, ErrorCode::Invalid);
        assert!(msg.contains("request id 0"), "{msg}");
    }
    c.send(Frame::push(Body::Ack { message_id: 0, stored: false, received: Some(Default::default()) })).await;
    assert_eq!(c.request(5, Body::Ping).await, Body::Pong, "the ACK was not answered, the connection stays");

    let mut fresh = RawClient::tcp(&host).await;
    fresh.send(Frame::new(0, Body::login(2, "b".into(), String::new()))).await;
    let frames = fresh.closed().await;
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::Invalid, .. }, .. }]),
        "{frames:?}"
    );
}

/// "A private send to user 0 is INVALID" (and `400 invalid` over HTTP).
#[tokio::test]
async fn a_private_send_to_user_zero_is_invalid() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::login_tcp(&host, 1, "a").await;
    expect_error(c.request(2, Body::private(0, "x".into())).await, ErrorCode::Invalid);
    let (status, body) = host.http("POST", "/send/private", Some(r#"{"from":1,"to":0,"text":"x"}"#)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid")), "{body}");
}

/// "KICK codes say why: TAKEN_OFFLINE for POST /offline, IDLE_TIMEOUT for missed heartbeats,
/// SHUTTING_DOWN when the server stops" (REPLACED: resume.rs; TOKEN_EXPIRED: auth_session.rs).
#[tokio::test]
async fn kicks_carry_distinct_codes() {
    let host = Host::start(&["--heartbeat", "1"]).await.unwrap();
    let mut offline = RawClient::login_tcp(&host, 1, "a").await;
    let (status, body) = host.http("POST", "/offline", Some(r#"{"user_id":1}"#)).await;
    assert_eq!(status, 200, "{body}");
    let frames = offline.closed().await;
    assert!(
        matches!(frames.last(), Some(Frame { body: Body::Kick { code: ErrorCode::TakenOffline, .. }, .. })),
        "{frames:?}"
    );

    // Idle: the login's heartbeat is 1 s, so no frame for 3 s closes the connection.
    let mut idle = RawClient::login_tcp(&host, 2, "b").await;
    let frames = idle.closed().await;
    assert!(
        matches!(frames.last(), Some(Frame { body: Body::Kick { code: ErrorCode::IdleTimeout, .. }, .. })),
        "{frames:?}"
    );

    let mut staying = RawClient::login_tcp(&host, 3, "c").await;
    host.terminate();
    let frames = staying.closed().await;
    assert!(
        matches!(frames.last(), Some(Frame { body: Body::Kick { code: ErrorCode::ShuttingDown, .. }, .. })),
        "{frames:?}"
    );
}

/// "A WebSocket the server closes carries a status: 4000 + the KICK or ERROR code (its name
/// as the reason), 1001 when shutting down, 1009 for a message over --max-frame."
#[tokio::test]
async fn websocket_closes_carry_a_status_code_and_reason() {
    let host = Host::start(&[]).await.unwrap();
    let close_of = |url: String, first: Option<Vec<u8>>, offline: bool| {
        let host = &host;
        async move {
            let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
            let login = cim_proto::encode_message(Frame::new(1, Body::login(9, "w".into(), String::new())));
            ws.send(Message::Binary(first.unwrap_or(login).into())).await.unwrap();
            if offline {
                // The LOGIN_ACK, then the operator takes the user offline.
                assert!(matches!(ws.next().await, Some(Ok(Message::Binary(_)))));
                let (status, _) = host.http("POST", "/offline", Some(r#"{"user_id":9}"#)).await;
                assert_eq!(status, 200);
            }
            loop {
                match tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
                    .await
                    .expect("close in time")
                {
                    Some(Ok(Message::Close(Some(frame)))) => {
                        return (u16::from(frame.code), frame.reason.to_string());
                    }
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close frame, got {other:?}"),
                }
            }
        }
    };
    assert_eq!(close_of(host.ws_url(), None, true).await, (4017, "taken_offline".to_owned()));
    let login0 = cim_proto::encode_message(Frame::new(0, Body::login(9, "w".into(), String::new())));
    assert_eq!(close_of(host.ws_url(), Some(login0), false).await, (4007, "invalid".to_owned()));
    let ping_first = cim_proto::encode_message(Frame::new(1, Body::Ping));
    assert_eq!(close_of(host.ws_url(), Some(ping_first), false).await, (4003, "not_logged_in".to_owned()));
}

/// "/metrics counts frames in (LOGIN included) and frames out."
#[tokio::test]
async fn metrics_count_frames_in_and_out() {
    let host = Host::start(&[]).await.unwrap();
    let metric = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(&format!("cim_{name}{{")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let mut c = RawClient::login_tcp(&host, 1, "a").await;
    assert_eq!(c.request(2, Body::Ping).await, Body::Pong);
    let (_, text) = host.http("GET", "/metrics", None).await;
    let text = text.as_str().unwrap();
    assert_eq!(metric(text, "frames_in_total"), 2, "LOGIN and PING");
    assert_eq!(metric(text, "frames_out_total"), 2, "LOGIN_ACK and PONG");
}

/// "PRESENCE: pushed only to sessions that logged in with Login.presence; who came online
/// and who went offline since the last one, gathered for about a second."
#[tokio::test]
async fn presence_is_pushed_to_sessions_that_ask_for_it() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_watching_presence(&host, 1, "alice").await;
    // Her own login is a change too.
    assert_eq!(alice.presence().await, (vec![1], vec![]));
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    let carol = RawClient::login_tcp(&host, 3, "carol").await;
    let (mut online, offline) = alice.presence().await;
    assert!(offline.is_empty());
    if online.len() < 2 {
        // The two logins fell into two rounds.
        online.extend(alice.presence().await.0);
    }
    assert_eq!(online, [2, 3]);
    drop(carol);
    assert_eq!(alice.presence().await, (vec![], vec![3]));
    let late = RawClient::login_tcp(&host, 4, "dave").await;
    assert_eq!(alice.presence().await, (vec![4], vec![]));
    // Bob did not ask: the rounds that reached alice sent his session nothing.
    bob.assert_quiet(std::time::Duration::from_millis(300)).await;
    drop(late);
}
