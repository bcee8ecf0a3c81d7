//! Sessions over TCP (and mixed with WebSocket): login, group and private delivery,
//! online list, duplicate login, logout, and bad frames.

mod common;

use std::time::Duration;

use cim_proto::codec::encode_delimited;
use cim_proto::{Body, ErrorCode, Frame, MessageKind};
use common::{Host, RawClient, expect_error};

#[tokio::test]
async fn group_reaches_everyone_else_and_private_only_its_receiver() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    let mut carol = RawClient::login_ws(&host, 3, "carol").await;

    // Group: the two others get it, with the same server-assigned id; the sender gets an ack.
    let ack = alice.request(10, Body::group("hello all".into())).await;
    let Body::Ack { message_id, .. } = ack else { panic!("expected ack, got {ack:?}") };
    for c in [&mut bob, &mut carol] {
        let d = c.delivery().await;
        assert_eq!((d.message_id, d.kind, d.text.as_str()), (message_id, MessageKind::Group, "hello all"));
        assert_eq!((d.sender.id, d.sender.name.as_str()), (1, "alice"));
    }

    // Private: only the receiver.
    let ack = bob.request(11, Body::private(3, "psst carol".into())).await;
    assert!(matches!(ack, Body::Ack { .. }), "{ack:?}");
    let d = carol.delivery().await;
    assert_eq!((d.kind, d.sender.id, d.text.as_str()), (MessageKind::Private, 2, "psst carol"));
    alice.assert_quiet(Duration::from_millis(200)).await;

    // Online list over the protocol and over HTTP.
    let Body::OnlineResponse { users } = alice.request(12, Body::OnlineRequest).await else {
        panic!("expected online response")
    };
    let ids: Vec<u64> = users.iter().map(|u| u.id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(host.online_ids().await, vec![1, 2, 3]);
}

#[tokio::test]
async fn private_to_offline_user_is_stored_or_with_refuse_a_clear_error() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let answer = alice.request(5, Body::private(99, "anyone?".into())).await;
    assert!(matches!(answer, Body::Ack { stored: true, .. }), "{answer:?}");
    expect_error(alice.request(6, Body::private(0, "nobody".into())).await, ErrorCode::Invalid);

    let host = Host::start(&["--offline-messages", "refuse"]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let msg =
        expect_error(alice.request(5, Body::private(99, "anyone?".into())).await, ErrorCode::UserOffline);
    assert!(msg.contains("99"), "{msg}");
}

#[tokio::test]
async fn duplicate_login_is_refused_and_the_first_session_survives() {
    let host = Host::start(&[]).await.unwrap();
    let mut first = RawClient::login_tcp(&host, 7, "dora").await;

    let (status, body) = host.http("POST", "/login", Some(r#"{"user_id":7,"user_name":"dora"}"#)).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("duplicate_login")), "{body}");

    let mut second = RawClient::tcp(&host).await;
    second.send(Frame::new(1, Body::login(7, "dora".into(), String::new()))).await;
    let frames = second.closed().await;
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::DuplicateLogin, .. }, .. }]),
        "{frames:?}"
    );
    assert!(matches!(first.request(2, Body::Ping).await, Body::Pong));
}

#[tokio::test]
async fn closing_the_connection_takes_the_user_offline() {
    let host = Host::start(&[]).await.unwrap();
    let alice = RawClient::login_tcp(&host, 1, "alice").await;
    let _bob = RawClient::login_tcp(&host, 2, "bob").await;
    host.wait_online(&[1, 2]).await;
    drop(alice);
    host.wait_online(&[2]).await;
    // And the user can log in again.
    let _alice = RawClient::login_tcp(&host, 1, "alice").await;
    host.wait_online(&[1, 2]).await;
}

#[tokio::test]
async fn first_frame_must_be_login() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::tcp(&host).await;
    c.send(Frame::new(3, Body::group("hi".into()))).await;
    let frames = c.closed().await;
    assert!(
        matches!(
            &frames[..],
            [Frame { request_id: 3, body: Body::Error { code: ErrorCode::NotLoggedIn, .. } }]
        ),
        "{frames:?}"
    );
}

#[tokio::test]
async fn invalid_login_and_text_are_refused_with_reasons() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::tcp(&host).await;
    c.send(Frame::new(1, Body::login(0, "zero".into(), String::new()))).await;
    let frames = c.closed().await;
    assert!(matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::Invalid, .. }, .. }]));

    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let msg = expect_error(alice.request(2, Body::group(String::new())).await, ErrorCode::Invalid);
    assert!(msg.contains("empty"), "{msg}");
    let msg = expect_error(alice.request(3, Body::group("x".repeat(20_000))).await, ErrorCode::Invalid);
    assert!(msg.contains("limit"), "{msg}");
}

#[tokio::test]
async fn malformed_frame_gets_an_error_and_the_connection_goes_on() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;

    // A well-delimited frame whose body is not an envelope.
    alice.send_raw(&[4, 0xff, 0xff, 0xff, 0xff]).await;
    let f = alice.frame().await;
    let msg = expect_error(f.body, ErrorCode::BadFrame);
    assert!(msg.contains("not a valid cim envelope"), "{msg}");

    // Server-only kinds from a client.
    expect_error(
        alice.request(4, Body::Kick { code: ErrorCode::Unexpected, reason: "x".into() }).await,
        ErrorCode::Unexpected,
    );

    // Still logged in, still delivering.
    assert!(matches!(alice.request(5, Body::group("still here".into())).await, Body::Ack { .. }));
    assert_eq!(bob.delivery().await.text, "still here");
}

#[tokio::test]
async fn oversized_frame_closes_only_that_connection() {
    let host = Host::start(&["--max-frame", "1024"]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;

    // Announce a 1 MiB frame: refused before the host buffers it.
    let mut bytes = Vec::new();
    prost_varint(1 << 20, &mut bytes);
    alice.send_raw(&bytes).await;
    let frames = alice.closed().await;
    let [Frame { body: Body::Error { code: ErrorCode::FrameTooLarge, message, .. }, .. }] = &frames[..]
    else {
        panic!("expected frame_too_large, got {frames:?}")
    };
    assert!(message.contains("1024"), "{message}");
    host.wait_online(&[2]).await;

    // Others keep chatting.
    let mut carol = RawClient::login_tcp(&host, 3, "carol").await;
    assert!(matches!(bob.request(9, Body::private(3, "ok?".into())).await, Body::Ack { .. }));
    assert_eq!(carol.delivery().await.text, "ok?");
}

#[tokio::test]
async fn garbage_before_login_is_refused() {
    let host = Host::start(&[]).await.unwrap();
    let mut c = RawClient::tcp(&host).await;
    let mut bytes = encode_delimited(Frame::new(1, Body::Ping));
    bytes[1] ^= 0xff;
    c.send_raw(&[2, 0xff, 0xff]).await;
    let frames = c.closed().await;
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::BadFrame, .. }, .. }]),
        "{frames:?}"
    );
}

fn prost_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[tokio::test]
async fn sigterm_tells_clients_and_exits_zero() {
    let mut host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let pid = host.child.id().unwrap().to_string();
    let status = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let frames = alice.closed().await;
    assert!(
        frames
            .iter()
            .any(|f| matches!(&f.body, Body::Kick { reason, .. } if reason.contains("shutting down"))),
        "{frames:?}"
    );
    let exit = tokio::time::timeout(common::DEADLINE, host.child.wait()).await.unwrap().unwrap();
    assert_eq!(exit.code(), Some(0));
}
