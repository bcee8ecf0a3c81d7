//! The HTTP port's trust rules, end to end: service endpoints behind the API key, users
//! reading only their own history, route login with a user token, the WebSocket origin
//! allowlist, JSON-only bodies, the body timeout, the HTTP connection cap, and the admin API
//! on its own listener.

mod common;

use std::time::Duration;

use cim_proto::{Body, Frame};
use common::auth::{API_KEY, token_for};
use common::{ADMIN_TOKEN, DEADLINE, Host, RawClient, http_with, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn bearer(credential: &str) -> String {
    format!("Bearer {credential}")
}

/// Logs `id` in over TCP with a token for them.
async fn login_with_token(host: &Host, id: u64, name: &str) -> RawClient {
    let mut c = RawClient::tcp(host).await;
    c.send(Frame::new(1, Body::login(id, name.into(), token_for(id, name)))).await;
    match c.frame().await.body {
        Body::LoginAck(_) => c,
        other => panic!("expected a login ack, got {other:?}"),
    }
}

#[tokio::test]
async fn service_endpoints_need_the_api_key() {
    let host = Host::start_with_auth(&["--metrics-require-key"]).await.unwrap();
    let _bob = login_with_token(&host, 2, "bob").await;
    let key = bearer(API_KEY);
    let user = bearer(&token_for(1, "alice"));
    let wrong = bearer("not-the-key");
    let json = ("content-type", "application/json");
    let cases: &[(&str, &str, Option<&str>)] = &[
        ("GET", "/online", None),
        ("GET", "/history/2", None),
        ("GET", "/metrics", None),
        ("POST", "/send/private", Some(r#"{"from": 1, "to": 2, "text": "hi"}"#)),
        ("POST", "/send/group", Some(r#"{"from": 1, "text": "all"}"#)),
        ("POST", "/offline", Some(r#"{"user_id": 2}"#)),
    ];
    for &(method, path, body) in cases {
        for headers in [
            vec![json],
            vec![json, ("authorization", wrong.as_str())],
            vec![json, ("authorization", user.as_str())],
        ] {
            let (status, _, resp) = http_with(host.http, method, path, &headers, body).await.unwrap();
            // A user token reads only that user's history: 403 there, 401 elsewhere.
            let is_user = headers.iter().any(|(_, v)| *v == user);
            let expected = if path == "/history/2" && is_user { 403 } else { 401 };
            assert_eq!(status, expected, "{method} {path} with {headers:?}: {resp}");
            if expected == 401 {
                assert_eq!(resp["error"], "unauthorized", "{method} {path}: {resp}");
            }
        }
        let (status, _, resp) =
            http_with(host.http, method, path, &[json, ("authorization", &key)], body).await.unwrap();
        assert_eq!(status, 200, "{method} {path} with the key: {resp}");
    }
    // /offline ran last: bob is gone.
    host.wait_online(&[]).await;
    // Health stays open and says tokens are required.
    let (status, _, resp) = http_with(host.http, "GET", "/healthz", &[], None).await.unwrap();
    assert_eq!((status, resp["auth"].as_str()), (200, Some("token")), "{resp}");
}

#[tokio::test]
async fn without_an_api_key_the_service_endpoints_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, common::auth::SECRET).unwrap();
    let host = Host::start(&[
        "--auth-hmac-secret-file",
        secret.to_str().unwrap(),
        "--auth-issuer",
        common::auth::ISSUER,
    ])
    .await
    .unwrap();
    let (status, _, resp) =
        http_with(host.http, "GET", "/online", &[("authorization", &bearer(API_KEY))], None).await.unwrap();
    assert_eq!(status, 401, "{resp}");
    assert!(resp["message"].as_str().unwrap().contains("--api-key-file"), "{resp}");
}

#[tokio::test]
async fn users_read_their_own_history_only() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let alice = bearer(&token_for(1, "alice"));
    let (status, _, resp) =
        http_with(host.http, "GET", "/history/1", &[("authorization", &alice)], None).await.unwrap();
    assert_eq!((status, resp["user_id"].as_u64()), (200, Some(1)), "{resp}");
    let (status, _, resp) =
        http_with(host.http, "GET", "/history/2", &[("authorization", &alice)], None).await.unwrap();
    assert_eq!((status, resp["error"].as_str()), (403, Some("forbidden")), "{resp}");
}

#[tokio::test]
async fn route_login_takes_the_user_from_the_token() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let gus = bearer(&token_for(7, "gus"));
    let json = ("content-type", "application/json");
    let login = |headers: Vec<(&'static str, String)>, body: &'static str| {
        let addr = host.http;
        async move {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            http_with(addr, "POST", "/login", &headers, Some(body)).await.unwrap()
        }
    };
    let with_token = vec![(json.0, json.1.to_owned()), ("authorization", gus.clone())];
    let (status, _, resp) = login(with_token.clone(), "{}").await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!((resp["user_id"].as_u64(), resp["user_name"].as_str()), (Some(7), Some("gus")), "{resp}");
    assert_eq!(resp["tcp_addr"], host.tcp.to_string());
    let (status, _, resp) = login(with_token.clone(), r#"{"user_id": 7, "user_name": "ignored"}"#).await;
    assert_eq!((status, resp["user_name"].as_str()), (200, Some("gus")), "{resp}");
    // Another user's id is refused, never silently corrected.
    let (status, _, resp) = login(with_token.clone(), r#"{"user_id": 8}"#).await;
    assert_eq!((status, resp["error"].as_str()), (401, Some("unauthenticated")), "{resp}");
    // No token, a forged token, or the API key (not a user): refused.
    let (status, _, resp) = login(vec![(json.0, json.1.to_owned())], r#"{"user_id": 7}"#).await;
    assert_eq!((status, resp["error"].as_str()), (401, Some("unauthenticated")), "{resp}");
    let forged = format!("{}x", token_for(7, "gus"));
    let (status, _, resp) =
        login(vec![(json.0, json.1.to_owned()), ("authorization", bearer(&forged))], "{}").await;
    assert_eq!((status, resp["error"].as_str()), (401, Some("unauthenticated")), "{resp}");
    let (status, _, _) =
        login(vec![(json.0, json.1.to_owned()), ("authorization", bearer(API_KEY))], "{}").await;
    assert_eq!(status, 401);
    // Route logins are rate limited per user: 429 with Retry-After once the burst is spent.
    let (headers, resp) = wait_for("a 429 on /login", || {
        let h = with_token.clone();
        async move {
            let (status, headers, resp) = login(h, "{}").await;
            (status == 429).then_some((headers, resp))
        }
    })
    .await;
    assert_eq!(resp["error"], "rate_limited", "{resp}");
    assert!(resp["retry_after_ms"].as_u64().unwrap() > 0, "{resp}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1, "{retry}");
}

#[tokio::test]
async fn health_says_when_no_token_is_needed() {
    let host = Host::start(&[]).await.unwrap();
    let (status, resp) = host.http("GET", "/healthz", None).await;
    assert_eq!((status, resp["auth"].as_str()), (200, Some("none")), "{resp}");
}

/// Opens `/ws` with `origin` (if any); `Ok(())` when the upgrade succeeds, else the status.
async fn ws_from(host: &Host, origin: Option<&str>) -> Result<(), u16> {
    let mut req = host.ws_url().into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => Ok(()),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("websocket connect failed unexpectedly: {e}"),
    }
}

#[tokio::test]
async fn websocket_origins_are_checked() {
    let host = Host::start(&[]).await.unwrap();
    assert_eq!(ws_from(&host, Some("http://evil.example")).await, Err(403));
    assert_eq!(ws_from(&host, Some(&format!("http://{}", host.http))).await, Ok(()));
    assert_eq!(ws_from(&host, None).await, Ok(()));
    // The SDK-style client (no Origin) chats as before.
    let _web = RawClient::login_ws(&host, 1, "web").await;

    let listed = Host::start(&["--allowed-origin", "https://app.example"]).await.unwrap();
    assert_eq!(ws_from(&listed, Some("https://app.example")).await, Ok(()));
    assert_eq!(ws_from(&listed, Some(&format!("http://{}", listed.http))).await, Err(403));
}

#[tokio::test]
async fn json_endpoints_want_json() {
    let host = Host::start(&[]).await.unwrap();
    let (status, _, resp) = http_with(
        host.http,
        "POST",
        "/send/group",
        &[("content-type", "text/plain")],
        Some(r#"{"from": 1, "text": "x"}"#),
    )
    .await
    .unwrap();
    assert_eq!((status, resp["error"].as_str()), (415, Some("unsupported_media_type")), "{resp}");
    let (status, _, resp) = http_with(host.http, "POST", "/login", &[], Some("{}")).await.unwrap();
    assert_eq!(status, 415, "{resp}");
    // No permissive CORS.
    let (_, headers, _) =
        http_with(host.http, "GET", "/healthz", &[("origin", "http://evil.example")], None).await.unwrap();
    assert!(!headers.contains_key("access-control-allow-origin"), "{headers:?}");
}

#[tokio::test]
async fn a_trickled_body_is_cut_off_at_the_body_timeout() {
    let host = Host::start(&["--http-body-timeout", "1s"]).await.unwrap();
    let mut conn = TcpStream::connect(host.http).await.unwrap();
    conn.write_all(
        b"POST /send/group HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{",
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = conn.into_split();
    // One byte every 200 ms: each arrives well within any per-read timeout.
    let trickle = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if wr.write_all(b" ").await.is_err() {
                break;
            }
        }
    });
    let started = tokio::time::Instant::now();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buf = [0u8; 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    trickle.abort();
    assert!(read.is_ok(), "the connection stayed open past the deadline");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
}

#[tokio::test]
async fn http_connections_beyond_the_cap_are_refused_while_tcp_chat_works() {
    let host = Host::start(&["--http-max-connections", "2"]).await.unwrap();
    // Two kept-alive HTTP connections fill the cap.
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(host.http).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get("/healthz")
            .header("host", "x")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        assert_eq!(sender.send_request(req).await.unwrap().status(), 200);
        held.push(sender);
    }
    // A third is closed at once, without an answer.
    let mut third = TcpStream::connect(host.http).await.unwrap();
    let _ = third.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(DEADLINE, third.read(&mut buf)).await.expect("the third connection hung");
    assert!(matches!(n, Ok(0) | Err(_)), "{:?}", n.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned()));
    // TCP chat is untouched.
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    assert!(matches!(alice.request(2, Body::Ping).await, Body::Pong));
    // Freeing a slot lets HTTP in again, and the refusal was counted.
    held.pop();
    let (_, _, metrics) = wait_for("an HTTP slot", || async {
        http_with(host.http, "GET", "/metrics", &[], None).await.ok().filter(|(s, _, _)| *s == 200)
    })
    .await;
    let metrics = metrics.as_str().unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("cim_http_connections_refused_total{") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_admin_api_can_have_its_own_listener() {
    let host = Host::start(&["--admin-http", "127.0.0.1:0"]).await.unwrap();
    let admin = host.admin.expect("admin= in the ready line");
    let token = bearer(ADMIN_TOKEN);
    let (status, _, resp) =
        http_with(admin, "GET", "/admin/components", &[("authorization", &token)], None).await.unwrap();
    assert_eq!(status, 200, "{resp}");
    assert!(resp["components"].as_array().is_some_and(|c| !c.is_empty()), "{resp}");
    let (status, _, resp) = http_with(admin, "GET", "/admin/components", &[], None).await.unwrap();
    assert_eq!((status, resp["error"].as_str()), (401, Some("unauthorized")), "{resp}");
    let (status, _, resp) =
        http_with(admin, "GET", "/admin/components", &[("authorization", "Bearer nope")], None)
            .await
            .unwrap();
    assert_eq!(status, 401, "{resp}");
    // Not on the main port, and the main port's API is not on the admin listener.
    let (status, _, _) =
        http_with(host.http, "GET", "/admin/components", &[("authorization", &token)], None).await.unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = http_with(admin, "GET", "/healthz", &[], None).await.unwrap();
    assert_eq!(status, 404);
}

/// `cim-host rollback` reads its token from a file and reaches the admin listener; with an
/// `https://` URL it speaks TLS (here to a plain HTTP port, so the handshake fails).
#[tokio::test]
async fn the_admin_cli_reads_a_token_file_and_speaks_https() {
    let host = Host::start(&["--admin-http", "127.0.0.1:0"]).await.unwrap();
    let admin = host.admin.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let cli = |to: String| {
        let token_file = token_file.clone();
        async move {
            tokio::process::Command::new(common::binary("cim-host"))
                .args(["rollback", "group-send", "--to", &to, "--token-file"])
                .arg(&token_file)
                .env_remove("CIM_ADMIN_TOKEN")
                .output()
                .await
                .unwrap()
        }
    };
    // Nothing was pushed: the host's own answer proves the token was accepted.
    let out = cli(format!("http://{admin}")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("409"), "{stderr}");
    let out = cli(format!("https://{admin}")).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !stderr.contains("must be an http"), "{stderr}");
    assert!(!stderr.contains(ADMIN_TOKEN), "{stderr}");
}

/// A connection that sends no request (a slowloris, or an idle keep-alive) gives its slot back
/// at the header timeout.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_timeout() {
    let host = Host::start(&["--http-header-timeout", "1s"]).await.unwrap();
    let mut conn = TcpStream::connect(host.http).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    let n =
        tokio::time::timeout(DEADLINE, conn.read(&mut buf)).await.expect("the silent connection stayed open");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
}
