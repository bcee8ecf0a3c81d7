//! Limits on every input: login timeout, connection limit, slow consumers (by frames and by
//! bytes), a write timeout for clients that stop reading, rate limits.

mod common;

use std::time::{Duration, Instant};

use cim_proto::{Body, ErrorCode, Frame};
use common::{Host, RawClient};
use futures_util::{SinkExt, StreamExt};

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

#[tokio::test]
async fn sends_over_the_rate_limit_are_refused_and_the_connection_recovers() {
    let host = Host::start(&["--rate-limit", "send.user=2:2"]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    for i in 0..2 {
        assert!(matches!(alice.request(10 + i, Body::group("hi".into())).await, Body::Ack { .. }));
    }
    let answer = alice.request(20, Body::group("one too many".into())).await;
    let Body::Error { code: ErrorCode::RateLimited, message, retry_after_ms } = answer else {
        panic!("expected rate_limited, got {answer:?}")
    };
    assert!(message.contains("too many sends"), "{message}");
    assert!((1..=1000).contains(&retry_after_ms), "{retry_after_ms}");
    // The connection stays up; after the advertised wait, sends go through again.
    assert_eq!(alice.request(21, Body::Ping).await, Body::Pong);
    tokio::time::sleep(Duration::from_millis(retry_after_ms)).await;
    assert!(matches!(alice.request(22, Body::group("again".into())).await, Body::Ack { .. }));
    // Other users have their own bucket.
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    assert!(matches!(bob.request(1, Body::private(1, "yo".into())).await, Body::Ack { .. }));
}

/// Connects with a tiny receive buffer and never reads, so the server's writes stall.
async fn non_reader(host: &Host, id: u64) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(host.tcp).await.unwrap();
    let mut framed = tokio_util::codec::Framed::new(stream, cim_proto::FrameCodec::default());
    framed.send(Frame::new(1, Body::login(id, "deaf".into(), String::new()))).await.unwrap();
    assert!(matches!(framed.next().await, Some(Ok(Ok(Frame { body: Body::LoginAck(_), .. })))));
    framed.into_inner()
}

/// Sends 16 KiB private messages to `to` until the host takes `to` offline.
async fn flood_until_offline(host: &Host, to: u64) -> Duration {
    let mut sender = RawClient::login_tcp(host, 99, "flood").await;
    let started = std::time::Instant::now();
    let text = "x".repeat(16 * 1024);
    for i in 0.. {
        match sender.request(1000 + i, Body::private(to, text.clone())).await {
            // Stored for the next login: the receiver is no longer connected.
            Body::Ack { stored: true, .. } => return started.elapsed(),
            Body::Ack { .. } => {}
            other => panic!("unexpected answer {other:?}"),
        }
        assert!(started.elapsed() < common::DEADLINE, "the non-reading client was never closed");
    }
    unreachable!()
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_within_the_write_timeout() {
    // Queues large enough that only the write timeout can close the client.
    let host = Host::start(&[
        "--write-timeout",
        "1",
        "--outbound-queue",
        "1000000",
        "--outbound-queue-bytes",
        "1073741824",
        "--no-rate-limits",
    ])
    .await
    .unwrap();
    let _deaf = non_reader(&host, 1).await;
    let took = flood_until_offline(&host, 1).await;
    assert!(took < Duration::from_secs(8), "closed after {took:?}");
    assert_eq!(metric(&host, "cim_write_timeouts_total").await, 1);
    assert_eq!(metric(&host, "cim_slow_consumers_total").await, 0);
}

async fn metric(host: &Host, name: &str) -> u64 {
    let (status, metrics) = host.http("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let text = metrics.as_str().unwrap();
    let line =
        text.lines().find(|l| l.starts_with(&format!("{name}{{"))).unwrap_or_else(|| panic!("no {name}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test]
async fn an_outbound_queue_over_its_byte_limit_is_a_slow_consumer() {
    let host = Host::start(&["--outbound-queue-bytes", "65536", "--no-rate-limits"]).await.unwrap();
    let _deaf = non_reader(&host, 1).await;
    flood_until_offline(&host, 1).await;
    assert_eq!(metric(&host, "cim_slow_consumers_total").await, 1);
}
