//! The route HTTP API: login routing, online list, sends, offline, health, metrics, and
//! a clear 4xx for every kind of bad request on every endpoint.

mod common;

use cim_proto::{Body, MessageKind};
use common::{Host, RawClient};

#[tokio::test]
async fn route_login_points_at_this_node() {
    let host = Host::start(&["--node-id", "n-test"]).await.unwrap();
    let (status, body) = host.http("POST", "/login", Some(r#"{"user_id": 5, "user_name": "eve"}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["node_id"], "n-test");
    assert_eq!(body["tcp_addr"], host.tcp.to_string());
    assert_eq!(body["ws_url"], host.ws_url());
}

/// Behind NAT or bound to 0.0.0.0, the route API hands out the advertised addresses.
#[tokio::test]
async fn route_login_hands_out_the_advertised_addresses() {
    let host =
        Host::start(&["--advertise-tcp", "chat.example.com:9000", "--advertise-http", "[2001:db8::1]:8443"])
            .await
            .unwrap();
    let (status, body) = host.http("POST", "/login", Some(r#"{"user_id": 5, "user_name": "eve"}"#)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tcp_addr"], "chat.example.com:9000");
    assert_eq!(body["ws_url"], "ws://[2001:db8::1]:8443/ws");
}

#[test]
fn bad_advertised_addresses_are_refused_up_front() {
    for bad in ["chat.example.com", "chat.example.com:0", ":9000", "::1:9000", "h:99999"] {
        let out = std::process::Command::new(common::binary("cim-host"))
            .args(["up", "--advertise-tcp", bad])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains("--advertise-tcp"), "{bad}: {stderr}");
    }
}

#[tokio::test]
async fn sends_over_http_reach_connected_clients() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_ws(&host, 2, "bob").await;

    let (status, body) =
        host.http("POST", "/send/private", Some(r#"{"from": 1, "to": 2, "text": "via http"}"#)).await;
    assert_eq!(status, 200, "{body}");
    let d = bob.delivery().await;
    assert_eq!(
        (d.message_id, d.kind, d.sender.name.as_str()),
        (body["message_id"].as_u64().unwrap(), MessageKind::Private, "alice")
    );

    let (status, body) =
        host.http("POST", "/send/group", Some(r#"{"from": 99, "text": "announcement"}"#)).await;
    assert_eq!((status, body["recipients"].as_u64()), (200, Some(2)), "{body}");
    for c in [&mut alice, &mut bob] {
        let d = c.delivery().await;
        assert_eq!((d.sender.id, d.text.as_str()), (99, "announcement"));
    }

    let (status, body) =
        host.http("POST", "/send/private", Some(r#"{"from": 1, "to": 3, "text": "x"}"#)).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("user_offline")), "{body}");
}

#[tokio::test]
async fn offline_kicks_the_user() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let (status, body) = host.http("POST", "/offline", Some(r#"{"user_id": 1}"#)).await;
    assert_eq!((status, body["removed"].as_bool()), (200, Some(true)), "{body}");
    let frames = alice.closed().await;
    assert!(frames.iter().any(|f| matches!(f.body, Body::Kick { .. })), "{frames:?}");
    assert!(host.online_ids().await.is_empty());
    let (_, body) = host.http("POST", "/offline", Some(r#"{"user_id": 1}"#)).await;
    assert_eq!(body["removed"].as_bool(), Some(false));
}

#[tokio::test]
async fn health_and_metrics() {
    let host = Host::start(&[]).await.unwrap();
    let _alice = RawClient::login_tcp(&host, 1, "alice").await;
    let (status, body) = host.http("GET", "/healthz", None).await;
    assert_eq!((status, body["status"].as_str(), body["connections"].as_u64()), (200, Some("ok"), Some(1)));
    let (status, body) = host.http("GET", "/metrics", None).await;
    let text = body.as_str().unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("cim_logins_total{node=") && text.contains("} 1\n"), "{text}");
}

#[tokio::test]
async fn bad_requests_on_every_endpoint_get_a_clear_400() {
    let host = Host::start(&[]).await.unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("/login", "not json", "invalid JSON"),
        ("/login", r#"{"user_name": "x"}"#, "missing field `user_id`"),
        ("/login", r#"{"user_id": "one", "user_name": "x"}"#, "user_id"),
        ("/login", r#"{"user_id": 0, "user_name": "x"}"#, "user id"),
        ("/login", r#"{"user_id": 1, "user_name": ""}"#, "user name"),
        ("/send/private", "{", "invalid JSON"),
        ("/send/private", r#"{"from": 1, "text": "x"}"#, "missing field `to`"),
        ("/send/private", r#"{"from": 1, "to": 2, "text": ""}"#, "empty"),
        ("/send/group", "[]", "invalid JSON"),
        ("/send/group", r#"{"from": 1}"#, "missing field `text`"),
        ("/send/group", r#"{"from": 0, "text": "x"}"#, "from"),
        ("/offline", "", "invalid JSON"),
        ("/offline", r#"{"user": 1}"#, "unknown field `user`"),
    ];
    for (path, body, needle) in cases {
        let (status, resp) = host.http("POST", path, Some(body)).await;
        assert_eq!(status, 400, "{path} {body}: {resp}");
        let message = resp["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{path} {body}: {message:?} should mention {needle:?}");
        assert!(matches!(resp["error"].as_str(), Some("bad_request" | "invalid")), "{resp}");
    }
    let (status, resp) = host.http("GET", "/send/group", None).await;
    assert_eq!((status, resp["error"].as_str()), (405, Some("method_not_allowed")));
    let (status, _) = host.http("GET", "/nowhere", None).await;
    assert_eq!(status, 404);
    let (status, resp) = host.http("GET", "/ws", None).await;
    assert_eq!(status, 400, "{resp}");
    let big = format!(r#"{{"from": 1, "text": "{}"}}"#, "x".repeat(70_000));
    let (status, resp) = host.http("POST", "/send/group", Some(&big)).await;
    assert_eq!((status, resp["error"].as_str()), (413, Some("too_large")));
    // Still serving.
    let _c = RawClient::login_tcp(&host, 1, "ok").await;
}

#[tokio::test]
async fn history_is_kept_by_the_message_callback() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    alice.request(2, Body::PrivateSend { to: 2, text: "first".into() }).await;
    bob.delivery().await;
    alice.request(3, Body::GroupSend { text: "second".into() }).await;
    bob.delivery().await;
    // The callback runs after delivery: wait until both are recorded.
    let messages = common::wait_for("bob's history", || async {
        let (status, body) = host.http("GET", "/history/2", None).await;
        assert_eq!(status, 200, "{body}");
        let msgs = body["messages"].as_array().cloned().unwrap_or_default();
        (msgs.len() == 2).then_some(msgs)
    })
    .await;
    assert_eq!(messages[0]["text"], "second");
    assert_eq!(messages[0]["kind"], "group");
    assert_eq!(messages[1]["text"], "first");
    assert_eq!(messages[1]["sender"]["name"], "alice");
    let (status, _) = host.http("GET", "/history/abc", None).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn the_chat_page_is_served_at_the_root() {
    let host = Host::start(&[]).await.unwrap();
    let (status, body) = host.http("GET", "/", None).await;
    let html = body.as_str().unwrap();
    assert_eq!(status, 200);
    assert!(
        html.starts_with("<!doctype html>") && html.contains("new WebSocket(route.ws_url)"),
        "{html:.200}"
    );
}
