//! The token flows against a fake route API and node: LOGIN carries the token, REFRESH comes
//! before expiry, an expiry KICK leads to a new token and a new login, a refused token is final.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cim_proto::{Body, ErrorCode, Frame, User};
use futures_util::SinkExt;
use tokio::time::Instant;

use crate::config::{ClientConfig, ReconnectPolicy};
use crate::handler::ClientEvent;
use crate::test_support::{FakeNode, FakeRoute, Recorder, next_frame};
use crate::token::tests::{jwt, jwt_for};
use crate::token::{BoxError, token_fn};
use crate::{Client, ClientError};

/// A client that lets its token decide who it is.
fn config(route: &FakeRoute) -> ClientConfig {
    let mut config = ClientConfig::new(route.url.clone(), 0, "");
    config.request_timeout = Duration::from_secs(5);
    config.reconnect = ReconnectPolicy {
        max_attempts: Some(3),
        initial_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(100),
    };
    config
}

fn bob() -> User {
    User { id: 42, name: "bob".into() }
}

fn expires_in(ttl: Duration) -> u64 {
    (SystemTime::now().duration_since(UNIX_EPOCH).unwrap() + ttl).as_millis() as u64
}

/// The next frame that is not a heartbeat PING.
async fn next_request(stream: &mut crate::transport::FrameStream) -> Frame {
    loop {
        let frame = next_frame(stream).await;
        if frame.body != Body::Ping {
            return frame;
        }
    }
}

fn token_of(frame: &Frame) -> String {
    match &frame.body {
        Body::Login(cim_proto::Login { token, .. }) | Body::Refresh { token } => token.clone(),
        other => panic!("expected login or refresh, got {other:?}"),
    }
}

#[tokio::test]
async fn login_carries_the_token_and_the_server_names_the_user() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let token = jwt_for(42, "bob", Duration::from_secs(3600));
    let config = config(&route).with_token(token.clone());
    let (client, (_sink, _stream, login)) = tokio::join!(
        Client::login(config, Arc::new(Recorder::default())),
        node.accept_login_as("node-1", bob(), 0)
    );
    let client = client.unwrap();
    assert_eq!(login.body, Body::login(42, "bob".into(), token.clone()));
    assert_eq!(client.user(), bob());
    let request = route.requests().remove(0);
    assert!(request.contains(&format!("authorization: Bearer {token}\r\n")), "{request}");
    assert!(request.ends_with(r#"{"user_id":42,"user_name":"bob"}"#), "{request}");
    client.close().await;
}

#[tokio::test]
async fn refresh_is_sent_before_the_token_expires() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    // The nth token expires 100 + n s after the start: each one later than the last, as from a
    // login service (the wall clock hardly moves while tokio's is paused).
    let start = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let nth = move |n: u32| jwt(serde_json::json!({"sub": "42", "exp": start + 100 + u64::from(n)}));
    let calls = Arc::new(AtomicU32::new(0));
    let provider = token_fn({
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(nth(n)) }
        }
    });
    let mut config = config(&route).with_token_provider(Arc::new(provider));
    // Nothing but the refresh may be due while the clock is paused.
    config.request_timeout = Duration::from_secs(1000);
    config.heartbeat = Duration::from_secs(1000);
    let (client, (mut sink, mut stream, login)) = tokio::join!(
        Client::login(config, Arc::new(Recorder::default())),
        node.accept_login_as("node-1", bob(), (start + 100) * 1000),
    );
    let client = client.unwrap();
    assert_eq!(token_of(&login), nth(0));

    tokio::time::pause();
    let started = Instant::now();
    let refresh = next_request(&mut stream).await;
    let waited = started.elapsed();
    // 80 % of the (just under) 100 s left.
    assert!(waited > Duration::from_secs(75) && waited < Duration::from_secs(81), "{waited:?}");
    assert_eq!(token_of(&refresh), nth(1));
    sink.send(Frame::new(refresh.request_id, Body::ack(0))).await.unwrap();

    // The next one is scheduled from the new token's `exp`.
    let started = Instant::now();
    let refresh = next_request(&mut stream).await;
    let waited = started.elapsed();
    assert!(waited > Duration::from_secs(75) && waited < Duration::from_secs(81), "{waited:?}");
    assert_eq!(token_of(&refresh), nth(2));

    // A refused refresh is tried again a little later, on the same connection.
    let error = Frame::error(refresh.request_id, ErrorCode::Unauthenticated, "bad signature");
    sink.send(error).await.unwrap();
    let started = Instant::now();
    let again = next_request(&mut stream).await;
    assert!(matches!(again.body, Body::Refresh { .. }), "{again:?}");
    assert!(started.elapsed() >= super::REFRESH_RETRY, "{:?}", started.elapsed());
    assert!(client.is_connected());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn a_fixed_token_is_not_sent_again() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let ttl = Duration::from_secs(100);
    let mut config = config(&route).with_token(jwt_for(42, "bob", ttl));
    config.request_timeout = Duration::from_secs(1000);
    config.heartbeat = Duration::from_secs(1000);
    let (client, (_sink, mut stream, _)) = tokio::join!(
        Client::login(config, Arc::new(Recorder::default())),
        node.accept_login_as("node-1", bob(), expires_in(ttl)),
    );
    let client = client.unwrap();
    tokio::time::pause();
    // Until the server would end the connection, no REFRESH (and no busy loop) comes.
    let quiet = tokio::time::timeout(ttl, next_request(&mut stream)).await;
    assert!(quiet.is_err(), "{quiet:?}");
    assert!(client.is_connected());
}

#[tokio::test]
async fn an_expiry_kick_gets_a_new_token_and_logs_in_again() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let calls = Arc::new(AtomicU32::new(0));
    let provider = token_fn({
        let calls = calls.clone();
        move || {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, BoxError>(jwt(serde_json::json!({"sub": "42", "jti": n}))) }
        }
    });
    let recorder = Arc::new(Recorder::default());
    let config = config(&route).with_token_provider(Arc::new(provider));
    let (client, (mut sink, _stream, first)) =
        tokio::join!(Client::login(config, recorder.clone()), node.accept_login_as("node-1", bob(), 0));
    let client = client.unwrap();

    let kick = Body::Kick { code: ErrorCode::TokenExpired, reason: "the token expired".into() };
    sink.send(Frame::push(kick)).await.unwrap();
    let (_sink, _stream, second) = node.accept_login_as("node-1", bob(), 0).await;
    recorder.wait_for_events(|e| e.iter().any(|e| matches!(e, ClientEvent::Reconnected { .. }))).await;
    assert_ne!(token_of(&first), token_of(&second), "a new token for the new login");
    assert_eq!(token_of(&second), jwt(serde_json::json!({"sub": "42", "jti": 1})));
    let events = recorder.events();
    assert!(
        matches!(&events[0], ClientEvent::Reconnecting { attempt: 1, reason } if reason.contains("token_expired")),
        "{events:?}"
    );
    assert!(client.is_connected());
    client.close().await;
}

#[tokio::test]
async fn an_expired_fixed_token_gives_up_after_one_more_try() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let recorder = Arc::new(Recorder::default());
    let config = config(&route).with_token(jwt_for(42, "bob", Duration::from_secs(60)));
    let (client, (mut sink, _stream, _)) =
        tokio::join!(Client::login(config, recorder.clone()), node.accept_login_as("node-1", bob(), 0));
    let client = client.unwrap();
    let kick = Body::Kick { code: ErrorCode::TokenExpired, reason: "the token expired".into() };
    sink.send(Frame::push(kick)).await.unwrap();
    for _ in 0..2 {
        let (mut sink, mut stream) = node.accept().await;
        let login = next_frame(&mut stream).await;
        sink.send(Frame::error(login.request_id, ErrorCode::TokenExpired, "expired 1 s ago")).await.unwrap();
    }
    recorder.wait_for_events(|e| e.iter().any(|e| matches!(e, ClientEvent::Disconnected { .. }))).await;
    let events = recorder.events();
    assert_eq!(events.len(), 3, "two attempts, then the end: {events:?}");
    assert!(
        matches!(&events[2], ClientEvent::Disconnected { reason } if reason.contains("the token expired: expired 1 s ago")),
        "{events:?}"
    );
    assert!(!client.is_connected());
}

#[tokio::test]
async fn a_refused_token_is_a_final_login_error() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let config = config(&route).with_token(jwt_for(42, "bob", Duration::from_secs(60)));
    let refuse = async {
        let (mut sink, mut stream) = node.accept().await;
        let login = next_frame(&mut stream).await;
        let error =
            Frame::error(login.request_id, ErrorCode::Unauthenticated, "the token's signature is invalid");
        sink.send(error).await.unwrap();
    };
    let (result, ()) = tokio::join!(Client::login(config, Arc::new(Recorder::default())), refuse);
    match result {
        Err(e @ ClientError::Unauthenticated(_)) => {
            assert_eq!(e.to_string(), "the token was refused: the token's signature is invalid");
            assert!(!e.is_transient());
        }
        other => panic!("expected Unauthenticated, got {other:?}"),
    }
    assert_eq!(route.requests().len(), 1, "no second attempt");
}

#[tokio::test]
async fn a_failing_provider_fails_the_login_with_its_reason() {
    let route = FakeRoute::start(vec![]).await;
    let provider =
        token_fn(|| async { Err::<String, BoxError>("token command exited with status 1".into()) });
    let result =
        Client::login(config(&route).with_token_provider(Arc::new(provider)), Arc::new(Recorder::default()));
    let err = result.await.unwrap_err();
    assert!(matches!(err, ClientError::Token(_)), "{err:?}");
    assert_eq!(err.to_string(), "getting a token failed: token command exited with status 1");
    assert!(route.requests().is_empty());
}

#[tokio::test]
async fn rate_limited_sends_say_when_to_retry() {
    let mut node = FakeNode::start(false).await;
    let route = FakeRoute::start(vec![node.route_answer("node-1")]).await;
    let config = config(&route).with_token(jwt_for(42, "bob", Duration::from_secs(3600)));
    let (client, (mut sink, mut stream, _)) = tokio::join!(
        Client::login(config, Arc::new(Recorder::default())),
        node.accept_login_as("node-1", bob(), 0)
    );
    let client = client.unwrap();
    let (sent, ()) = tokio::join!(client.send_group("spam"), async {
        let frame = next_frame(&mut stream).await;
        sink.send(Frame::rate_limited(frame.request_id, 1500, "too many messages")).await.unwrap();
    });
    match sent {
        Err(ClientError::RateLimited { retry_after, message }) => {
            assert_eq!(retry_after, Duration::from_millis(1500));
            assert_eq!(message, "too many messages");
        }
        other => panic!("expected RateLimited, got {other:?}"),
    }
    assert!(client.is_connected(), "a rate limit does not cost the connection");
    client.close().await;
}
