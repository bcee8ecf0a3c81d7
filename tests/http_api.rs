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
        // A decimal string: ids are above 2^53, which JavaScript numbers would round.
        (body["message_id"].as_str().unwrap().parse::<u64>().unwrap(), MessageKind::Private, "alice")
    );

    let (status, body) =
        host.http("POST", "/send/group", Some(r#"{"from": 99, "text": "announcement"}"#)).await;
    assert_eq!((status, body["recipients"].as_u64()), (200, Some(2)), "{body}");
    for c in [&mut alice, &mut bob] {
        let d = c.delivery().await;
        assert_eq!((d.sender.id, d.text.as_str()), (99, "announcement"));
    }

    // An offline receiver: stored, delivered at their next login.
    let (status, body) =
        host.http("POST", "/send/private", Some(r#"{"from": 1, "to": 3, "text": "x"}"#)).await;
    assert_eq!((status, body["stored"].as_bool()), (200, Some(true)), "{body}");
    let (status, body) =
        host.http("POST", "/send/private", Some(r#"{"from": 1, "to": 0, "text": "x"}"#)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid")), "{body}");
}

#[tokio::test]
async fn offline_messages_can_be_refused() {
    let host = Host::start(&["--offline-messages", "refuse"]).await.unwrap();
    let (status, body) =
        host.http("POST", "/send/private", Some(r#"{"from": 1, "to": 3, "text": "x"}"#)).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("user_offline")), "{body}");
}

#[tokio::test]
async fn a_resend_with_the_same_client_id_stores_nothing_new() {
    let host = Host::start(&[]).await.unwrap();
    let send = r#"{"from": 1, "to": 2, "text": "once", "client_msg_id": "c-1"}"#;
    let (status, first) = host.http("POST", "/send/private", Some(send)).await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = host.http("POST", "/send/private", Some(send)).await;
    assert_eq!((status, &again["message_id"]), (200, &first["message_id"]), "{again}");
    let (_, history) = host.http("GET", "/history/2", None).await;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "{history}");
    let long = format!(r#"{{"from": 1, "to": 2, "text": "x", "client_msg_id": "{}"}}"#, "c".repeat(65));
    let (status, body) = host.http("POST", "/send/private", Some(&long)).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid")), "{body}");
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
async fn history_pages_through_the_log() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    for i in 0..3 {
        alice.request(2 + i, Body::private(2, format!("p{i}"))).await;
        bob.delivery().await;
    }
    alice.request(9, Body::group("to all".into())).await;
    bob.delivery().await;

    // Bob's inbox, newest first; the log writes before the sender's ack, so no waiting.
    let (status, body) = host.http("GET", "/history/2", None).await;
    assert_eq!((status, body["stream"].as_str()), (200, Some("inbox")), "{body}");
    let msgs = body["messages"].as_array().unwrap();
    let texts: Vec<&str> = msgs.iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["p2", "p1", "p0"]);
    assert_eq!((msgs[0]["from"]["name"].as_str(), msgs[0]["to"].as_u64()), (Some("alice"), Some(2)));
    let id: u64 = msgs[0]["id"].as_str().expect("ids are strings").parse().unwrap();
    assert!(id > 1 << 53, "{id}");
    // Alice's inbox holds what she sent.
    let (_, sent) = host.http("GET", "/history/1?limit=1", None).await;
    assert_eq!(sent["messages"][0]["text"], "p2", "{sent}");
    // Paging by position, both ways.
    let newest = msgs[0]["position"].as_str().expect("positions are strings");
    let (_, older) = host.http("GET", &format!("/history/2?before={newest}&limit=1"), None).await;
    assert_eq!(older["messages"][0]["text"], "p1", "{older}");
    let oldest = msgs[2]["position"].as_str().unwrap();
    let (_, newer) = host.http("GET", &format!("/history/2?after={oldest}"), None).await;
    let texts: Vec<&str> =
        newer["messages"].as_array().unwrap().iter().map(|m| m["text"].as_str().unwrap()).collect();
    assert_eq!(texts, ["p1", "p2"], "oldest first after a position");
    // The group, as bob sees it.
    let (_, group) = host.http("GET", "/history/2?stream=group", None).await;
    assert_eq!(
        (group["messages"][0]["text"].as_str(), group["messages"][0]["kind"].as_str()),
        (Some("to all"), Some("group"))
    );

    for bad in [
        "/history/abc",
        "/history/2?stream=other",
        "/history/2?limit=0",
        "/history/2?before=1&after=1",
        "/history/2?limit=x",
    ] {
        let (status, body) = host.http("GET", bad, None).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
}

#[tokio::test]
async fn the_chat_page_is_served_at_the_root() {
    let host = Host::start(&[]).await.unwrap();
    let (status, body) = host.http("GET", "/", None).await;
    let html = body.as_str().unwrap();
    assert_eq!(status, 200);
    assert!(
        html.starts_with("<!doctype html>") && html.contains(r#"<script src="/chat.js">"#),
        "{html:.200}"
    );
    // The page's script: the bundled JavaScript SDK (sdk/js) and the page.
    let (status, body) = host.http("GET", "/chat.js", None).await;
    let script = body.as_str().unwrap();
    assert_eq!(status, 200);
    assert!(script.contains("Generated from sdk/js/web/chat.ts"), "{script:.200}");
}

/// Every `up` flag can come from the environment (`CIM_<FLAG>`); the command line wins.
#[tokio::test]
async fn flags_can_come_from_the_environment() {
    let dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let env = [("CIM_NODE_ID", "from-env"), ("CIM_STORE", "memory"), ("CIM_HEARTBEAT", "7")];
    let host = Host::start_with_env(dir.clone(), &[], &env).await.unwrap();
    assert_eq!(host.node_id, "from-env");
    let mut c = RawClient::tcp(&host).await;
    c.send(cim_proto::Frame::new(1, cim_proto::Body::login(1, "a".into(), String::new()))).await;
    let cim_proto::Body::LoginAck(ack) = c.frame().await.body else { panic!("expected a login ack") };
    assert_eq!(ack.heartbeat_secs, 7);
    drop(host);
    let host = Host::start_with_env(dir, &["--node-id", "from-flag"], &env).await.unwrap();
    assert_eq!(host.node_id, "from-flag");
}

/// After a little traffic, `/metrics` has the histograms, with counts that moved and buckets
/// that make sense (cumulative, the +Inf bucket equal to the count, a plausible sum).
#[tokio::test]
async fn metrics_histograms_move_under_load() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    for i in 0..20u64 {
        assert!(matches!(alice.request(10 + i, Body::private(2, format!("m{i}"))).await, Body::Ack { .. }));
        assert_eq!(bob.delivery().await.text, format!("m{i}"));
    }
    for i in 0..5u64 {
        assert!(matches!(alice.request(40 + i, Body::group(format!("g{i}"))).await, Body::Ack { .. }));
    }
    let (status, body) = host.http("GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    // name{labels} value, for series whose labels contain every one of `with`.
    let series = |name: &str, with: &[&str]| -> Vec<(String, f64)> {
        text.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")) && with.iter().all(|w| l.contains(w)))
            .map(|l| {
                let (labels, value) = l.rsplit_once(' ').unwrap();
                (labels.to_owned(), value.parse().unwrap())
            })
            .collect()
    };
    let check = |name: &str, with: &[&str], at_least: f64| {
        let count = series(&format!("{name}_count"), with);
        assert_eq!(count.len(), 1, "one {name} series with {with:?}:\n{text}");
        let count = count[0].1;
        assert!(count >= at_least, "{name} {with:?}: count {count} < {at_least}");
        let buckets: Vec<f64> = series(&format!("{name}_bucket"), with).into_iter().map(|(_, v)| v).collect();
        assert!(buckets.len() > 5 && buckets.windows(2).all(|w| w[0] <= w[1]), "{name}: {buckets:?}");
        assert_eq!(*buckets.last().unwrap(), count, "{name}: the +Inf bucket is the count");
        assert!(buckets[0] < count, "{name}: not everything in the first bucket: {buckets:?}");
        let sum = series(&format!("{name}_sum"), with)[0].1;
        assert!(sum > 0.0 && sum / count < 1.0, "{name}: mean {} s is not plausible", sum / count);
    };
    check("cim_handler_seconds", &["event=\"private\"", "component=\"private-send\""], 20.0);
    check("cim_handler_seconds", &["event=\"group\"", "component=\"group-send\""], 1.0);
    check("cim_send_seconds", &[], 25.0);
    check("cim_log_append_seconds", &[], 25.0);
    // Bob's 20 private deliveries were written before he read them.
    check("cim_delivery_seconds", &[], 20.0);
    let queue = series("cim_outbound_queue_frames_count", &[]);
    assert!(queue[0].1 >= 25.0, "every answer and delivery woke a writer: {queue:?}");
    let calls = series("cim_handler_calls_total", &["event=\"private\"", "outcome=\"ok\""]);
    assert!(calls.iter().map(|(_, v)| v).sum::<f64>() >= 1.0, "{text}");
}
