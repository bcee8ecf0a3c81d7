//! Heartbeats: PING is answered, a silent connection is closed after three intervals and
//! its user goes offline.

mod common;

use std::time::{Duration, Instant};

use cim_proto::{Body, Frame};
use common::{Host, RawClient};

#[tokio::test]
async fn silent_connection_is_closed_after_three_intervals() {
    let host = Host::start(&["--heartbeat", "1"]).await.unwrap();
    let started = Instant::now();
    let mut quiet = RawClient::login_tcp(&host, 1, "quiet").await;
    let frames = quiet.closed().await;
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(2900), "closed too early: {elapsed:?}");
    assert!(
        frames.iter().any(|f| matches!(&f.body, Body::Kick { reason, .. } if reason.contains("heartbeat"))),
        "{frames:?}"
    );
    host.wait_online(&[]).await;
}

#[tokio::test]
async fn pinging_connection_stays_open() {
    let host = Host::start(&["--heartbeat", "1"]).await.unwrap();
    let mut alive = RawClient::login_ws(&host, 1, "alive").await;
    let _ = host.online_ids().await;
    // Ping every half interval for more than three intervals.
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    for i in 0..8 {
        tick.tick().await;
        assert!(matches!(alive.request(100 + i, Body::Ping).await, Body::Pong), "ping {i}");
    }
    assert_eq!(host.online_ids().await, vec![1]);
    // The login ack tells the client the interval.
    let mut c = RawClient::tcp(&host).await;
    c.send(Frame::new(1, Body::login(2, "b".into(), String::new()))).await;
    assert!(matches!(c.frame().await.body, Body::LoginAck(cim_proto::LoginAck { heartbeat_secs: 1, .. })));
}
