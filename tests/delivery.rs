//! Delivery guarantees as a raw client sees them: offline messages, replay after the
//! acknowledged position, the seam between replay and live traffic, retention gaps said
//! out loud, and take-over by resume token.

mod common;

use cim_proto::{Body, ErrorCode, Frame, Login, LoginAck, MessageKind, Positions};
use common::{Host, RawClient, expect_error};

/// Logs in with `resume_from` and `resume_token`; returns the client and its login ack.
async fn login(host: &Host, id: u64, resume_from: Positions, resume_token: &str) -> (RawClient, LoginAck) {
    let mut c = RawClient::tcp(host).await;
    let login = Login {
        user_id: id,
        user_name: format!("u{id}"),
        resume_from,
        resume_token: resume_token.into(),
        ..Login::default()
    };
    match c.request(1, Body::Login(login)).await {
        Body::LoginAck(ack) => (c, ack),
        other => panic!("expected a login ack, got {other:?}"),
    }
}

/// The next `n` deliveries' (text, replayed, position).
async fn texts(c: &mut RawClient, n: usize) -> Vec<(String, bool, u64)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = c.delivery().await;
        out.push((d.text, d.replayed, d.position));
    }
    out
}

/// Waits until the host has seen `id`'s connection end. A client that drops its connection
/// and logs straight in again races the server reading the EOF: a login that wins is refused
/// as a duplicate (no resume token), as it would be for any second session.
async fn wait_offline(host: &Host, id: u64) {
    common::wait_for("the dropped session to end", || async {
        (!host.online_ids().await.contains(&id)).then_some(())
    })
    .await;
}

async fn send_private(c: &mut RawClient, req: u64, to: u64, text: &str) -> Body {
    c.request(req, Body::private(to, text.into())).await
}

#[tokio::test]
async fn offline_messages_wait_for_the_next_login_and_unacked_ones_come_again() {
    let host = Host::start(&["--store", "memory"]).await.unwrap();
    let (mut alice, _) = login(&host, 1, Positions::default(), "").await;
    // Bob was never here: his messages wait in his inbox; the ack says so.
    for i in 0..3 {
        let ack = send_private(&mut alice, 10 + i, 2, &format!("m{i}")).await;
        assert!(matches!(ack, Body::Ack { stored: true, .. }), "{ack:?}");
    }
    let (mut bob, ack) = login(&host, 2, Positions::default(), "").await;
    assert!(!ack.missed_inbox && !ack.missed_group, "{ack:?}");
    let got = texts(&mut bob, 3).await;
    assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), ["m0", "m1", "m2"]);
    assert!(got.iter().all(|g| g.1), "replayed: {got:?}");
    assert!(got[0].2 < got[1].2 && got[1].2 < got[2].2, "positions grow: {got:?}");

    // Live now: not stored, not replayed.
    let ack = send_private(&mut alice, 20, 2, "live").await;
    assert!(matches!(ack, Body::Ack { stored: false, .. }), "{ack:?}");
    let live = texts(&mut bob, 1).await;
    assert_eq!((live[0].0.as_str(), live[0].1), ("live", false));

    // Bob leaves without acking: everything comes again.
    drop(bob);
    wait_offline(&host, 2).await;
    let (mut bob, _) = login(&host, 2, Positions::default(), "").await;
    assert_eq!(texts(&mut bob, 4).await.len(), 4);
    // He acks up to the third; the next login replays only the fourth.
    let third = got[2].2;
    bob.send(Frame::new(
        0,
        Body::Ack { message_id: 0, stored: false, received: Some(Positions { inbox: third, group: 0 }) },
    ))
    .await;
    // Acks are not answered: a ping behind it shows it was read.
    assert_eq!(bob.request(5, Body::Ping).await, Body::Pong);
    drop(bob);
    wait_offline(&host, 2).await;
    let (mut bob, ack) = common::wait_for("bob's ack to be kept", || async {
        let (mut bob, ack) = login(&host, 2, Positions::default(), "").await;
        if ack.resume_from.inbox == third {
            return Some((bob, ack));
        }
        drop(bob.recv().await);
        drop(bob);
        wait_offline(&host, 2).await;
        None
    })
    .await;
    assert_eq!(ack.resume_from.inbox, third);
    let again = texts(&mut bob, 1).await;
    assert_eq!(again[0].0, "live");
    bob.assert_quiet(std::time::Duration::from_millis(200)).await;
}

#[tokio::test]
async fn replay_and_live_traffic_join_without_a_gap_or_a_duplicate() {
    let host = Host::start(&["--store", "memory", "--no-rate-limits"]).await.unwrap();
    let (mut alice, _) = login(&host, 1, Positions::default(), "").await;
    for i in 0..300 {
        alice.send(Frame::new(100 + i, Body::private(2, format!("{i}")))).await;
    }
    // Alice keeps sending while bob logs in and his backlog is replayed.
    let sender = tokio::spawn(async move {
        for i in 300..600 {
            alice.send(Frame::new(100 + i, Body::private(2, format!("{i}")))).await;
            if i % 50 == 0 {
                tokio::task::yield_now().await;
            }
        }
        alice
    });
    let (mut bob, _) = login(&host, 2, Positions::default(), "").await;
    let got = texts(&mut bob, 600).await;
    let numbers: Vec<u32> = got.iter().map(|g| g.0.parse().unwrap()).collect();
    assert_eq!(numbers, (0..600).collect::<Vec<_>>(), "each once, in the order sent");
    assert!(got.windows(2).all(|w| w[0].2 < w[1].2), "positions grow");
    let _alice = sender.await.unwrap();
    bob.assert_quiet(std::time::Duration::from_millis(200)).await;
}

#[tokio::test]
async fn a_resume_past_retention_is_told_it_missed_messages() {
    let host = Host::start(&["--store", "memory", "--log-max-entries", "3"]).await.unwrap();
    let (mut alice, _) = login(&host, 1, Positions::default(), "").await;
    for i in 0..5 {
        send_private(&mut alice, 10 + i, 2, &format!("m{i}")).await;
    }
    let (mut bob, ack) = login(&host, 2, Positions::default(), "").await;
    assert!(ack.missed_inbox && !ack.missed_group, "{ack:?}");
    let got = texts(&mut bob, 3).await;
    assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), ["m2", "m3", "m4"]);
}

#[tokio::test]
async fn group_lines_are_replayed_to_members_who_were_away() {
    let host = Host::start(&["--store", "memory"]).await.unwrap();
    // Bob has been here before: the group resumes from where he left.
    let (bob, _) = login(&host, 2, Positions::default(), "").await;
    drop(bob);
    let (mut alice, _) = login(&host, 1, Positions::default(), "").await;
    common::wait_for("bob offline", || async { (host.online_ids().await == [1]).then_some(()) }).await;
    for (i, text) in ["g1", "g2"].into_iter().enumerate() {
        let ack = alice.request(10 + i as u64, Body::group(text.into())).await;
        assert!(matches!(ack, Body::Ack { .. }), "{ack:?}");
    }
    // A newcomer starts the group from now; bob gets both lines, alice none of her own.
    let (mut carol, _) = login(&host, 3, Positions::default(), "").await;
    let (mut bob, _) = login(&host, 2, Positions::default(), "").await;
    let got = texts(&mut bob, 2).await;
    assert_eq!(got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(), ["g1", "g2"]);
    carol.assert_quiet(std::time::Duration::from_millis(200)).await;
    alice.assert_quiet(std::time::Duration::from_millis(50)).await;
    let d = {
        alice.request(20, Body::group("g3".into())).await;
        bob.delivery().await
    };
    assert_eq!((d.kind, d.replayed), (MessageKind::Group, false));
}

#[tokio::test]
async fn a_resume_token_takes_the_session_over_and_the_old_one_is_told() {
    let host = Host::start(&["--store", "memory"]).await.unwrap();
    let (mut old, ack) = login(&host, 1, Positions::default(), "").await;
    assert_eq!(ack.resume_token.len(), 32, "{ack:?}");
    // Without the token: refused, the first session keeps the user.
    let mut c = RawClient::tcp(&host).await;
    expect_error(
        c.request(1, Body::login(1, "again".into(), String::new())).await,
        ErrorCode::DuplicateLogin,
    );
    let mut c = RawClient::tcp(&host).await;
    let wrong = Login { user_id: 1, user_name: "x".into(), resume_token: "0".repeat(32), ..Login::default() };
    expect_error(c.request(1, Body::Login(wrong)).await, ErrorCode::DuplicateLogin);
    // The route API routes a user with the token instead of refusing them.
    let body = format!(r#"{{"user_id": 1, "user_name": "a", "resume_token": "{}"}}"#, ack.resume_token);
    let (status, answer) = host.http("POST", "/login", Some(&body)).await;
    assert_eq!(status, 200, "{answer}");
    // With it: the new session is in, the old one is kicked with REPLACED.
    let (mut new, new_ack) = login(&host, 1, Positions::default(), &ack.resume_token).await;
    assert_ne!(new_ack.resume_token, ack.resume_token);
    let frames = old.closed().await;
    assert!(
        matches!(frames.last(), Some(Frame { body: Body::Kick { code: ErrorCode::Replaced, .. }, .. })),
        "{frames:?}"
    );
    assert_eq!(new.request(2, Body::Ping).await, Body::Pong);
    assert_eq!(host.online_ids().await, [1]);
    // The old session's end did not take the new one offline.
    let (mut bob, _) = login(&host, 2, Positions::default(), "").await;
    let ack = send_private(&mut bob, 3, 1, "still there?").await;
    assert!(matches!(ack, Body::Ack { stored: false, .. }), "{ack:?}");
    assert_eq!(new.delivery().await.text, "still there?");
}
