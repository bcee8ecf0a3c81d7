//! Limits on every input: login timeout, connection limit, slow consumers.

mod common;

use std::time::{Duration, Instant};

use cim_proto::{Body, ErrorCode, Frame};
use common::{Host, RawClient};

#[tokio::test]
async fn connection_without_login_is_closed_after_the_login_timeout() {
    let host = Host::start(&["--login-timeout", "1"]).await.unwrap();
    let started = Instant::now();
    let mut idle = RawClient::tcp(&host).await;
    let frames = idle.closed().await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::NotLoggedIn, .. }, .. }]),
        "{frames:?}"
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_with_a_reason() {
    let host = Host::start(&["--max-connections", "2"]).await.unwrap();
    let _a = RawClient::login_tcp(&host, 1, "a").await;
    let _b = RawClient::login_ws(&host, 2, "b").await;
    let mut c = RawClient::tcp(&host).await;
    let frames = c.closed().await;
    assert!(
        matches!(&frames[..], [Frame { body: Body::Error { code: ErrorCode::Unavailable, message, .. }, .. }] if message.contains("limit")),
        "{frames:?}"
    );
    let (status, _) = host.http("GET", "/healthz", None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_without_blocking_others() {
    let host = Host::start(&["--outbound-queue", "8"]).await.unwrap();
    // Logs in, then never reads again.
    let mut stuck = RawClient::login_tcp(&host, 1, "stuck").await;
    let mut reader = RawClient::login_tcp(&host, 2, "reader").await;
    let text = "x".repeat(16 * 1024);
    let body = format!(r#"{{"from": 3, "text": "{text}"}}"#);
    // Enough to fill the socket buffers and then the 8-frame queue.
    let mut kicked = false;
    for i in 0..2000 {
        let (status, resp) = host.http("POST", "/send/group", Some(&body)).await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(reader.delivery().await.text.len(), text.len(), "message {i}");
        if !host.online_ids().await.contains(&1) {
            kicked = true;
            break;
        }
    }
    assert!(kicked, "the stuck client was never disconnected");
    // When it finally reads, the last frame explains why.
    let frames = stuck.closed().await;
    assert!(
        frames.iter().any(|f| matches!(&f.body, Body::Kick { code: ErrorCode::SlowConsumer, .. })),
        "last frames: {:?}",
        frames.iter().rev().take(2).map(|f| f.body.kind_name()).collect::<Vec<_>>()
    );
    let (_, metrics) = host.http("GET", "/metrics", None).await;
    assert!(metrics.as_str().unwrap().contains("cim_slow_consumers_total{node="));
}
