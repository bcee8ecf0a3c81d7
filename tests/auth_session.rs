//! User tokens on the wire: LOGIN is refused unless its token is good and for that user, a
//! connection is kicked when its token expires, and a REFRESH keeps it alive.

mod common;

use std::time::{Duration, Instant};

use cim_proto::{Body, ErrorCode, User};
use common::auth::{ISSUER, now, sign, sign_with, token, token_for};
use common::{Host, RawClient, expect_error};
use jsonwebtoken::Algorithm;
use serde_json::json;

/// Sends LOGIN with `token` on a new TCP connection and returns the answer.
async fn login(host: &Host, user_id: u64, token: &str) -> (RawClient, Body) {
    let mut c = RawClient::tcp(host).await;
    let login = Body::login(user_id, "given".into(), token.into());
    let answer = c.request(1, login).await;
    (c, answer)
}

async fn refused(host: &Host, user_id: u64, token: &str, code: ErrorCode) -> String {
    let (mut c, answer) = login(host, user_id, token).await;
    let message = expect_error(answer, code);
    assert!(c.closed().await.is_empty(), "the connection is closed after a refused login");
    message
}

#[tokio::test]
async fn a_good_token_logs_in_as_its_subject_with_its_name() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    // The id may be omitted (0): the token's `sub` decides; the `name` claim wins over the frame's.
    let (mut c, answer) = login(&host, 0, &token_for(7, "alice")).await;
    match answer {
        Body::LoginAck(cim_proto::LoginAck { user, token_expires_at_ms, .. }) => {
            assert_eq!(user, User { id: 7, name: "alice".into() });
            assert!(token_expires_at_ms > now() * 1000 + 3_000_000, "{token_expires_at_ms}");
        }
        other => panic!("expected login ack, got {other:?}"),
    }
    let (_bob, answer) = login(&host, 8, &token_for(8, "bob")).await;
    assert!(matches!(answer, Body::LoginAck(_)), "{answer:?}");
    // No `name` claim and no name in the frame: the id is the name.
    let mut c9 = RawClient::tcp(&host).await;
    let nameless = sign(&json!({"sub": "9", "iss": ISSUER, "exp": now() + 60}));
    let answer = c9.request(1, Body::login(0, String::new(), nameless)).await;
    let Body::LoginAck(cim_proto::LoginAck { user, .. }) = answer else { panic!("{answer:?}") };
    assert_eq!(user, User { id: 9, name: "9".into() });
    drop(c9);
    let Body::OnlineResponse { users } = c.request(2, Body::OnlineRequest).await else { panic!("online") };
    assert!(users.iter().any(|u| u.id == 7) && users.iter().any(|u| u.id == 8), "{users:?}");
    assert!(matches!(c.request(3, Body::private(8, "hi".into())).await, Body::Ack { .. }));
}

#[tokio::test]
async fn bad_tokens_are_refused_with_clear_errors() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let t = now();
    let good = |extra: serde_json::Value| {
        let mut claims = json!({"sub": "1", "iss": ISSUER, "iat": t, "exp": t + 600});
        claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        claims
    };
    let msg = refused(&host, 2, &token_for(1, "a"), ErrorCode::Unauthenticated).await;
    assert!(msg.contains("for user 1, not user 2"), "{msg}");
    let msg = refused(&host, 1, "", ErrorCode::Unauthenticated).await;
    assert!(msg.contains("token is required"), "{msg}");
    let msg = refused(&host, 1, &sign(&good(json!({"exp": t - 5}))), ErrorCode::TokenExpired).await;
    assert!(msg.contains("expired"), "{msg}");
    let msg = refused(&host, 1, &sign(&good(json!({"nbf": t + 300}))), ErrorCode::Unauthenticated).await;
    assert!(msg.contains("not valid yet"), "{msg}");
    let forged = sign_with(&good(json!({})), Algorithm::HS256, b"not the server's secret");
    let msg = refused(&host, 1, &forged, ErrorCode::Unauthenticated).await;
    assert!(msg.contains("signature"), "{msg}");
    let msg =
        refused(&host, 1, &sign(&good(json!({"iss": "https://evil.test"}))), ErrorCode::Unauthenticated)
            .await;
    assert!(msg.contains("issuer"), "{msg}");
    let msg = refused(&host, 1, "definitely-not-a-jwt", ErrorCode::Unauthenticated).await;
    assert!(msg.contains("not a valid JWT"), "{msg}");
    // alg none: an unsigned token claiming to be user 1.
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(good(json!({})).to_string())
    );
    let msg = refused(&host, 1, &none, ErrorCode::Unauthenticated).await;
    assert!(msg.contains("algorithm") || msg.contains("not a valid JWT"), "{msg}");
    // Nobody got in.
    let (mut c, answer) = login(&host, 1, &token_for(1, "a")).await;
    assert!(matches!(answer, Body::LoginAck(_)), "{answer:?}");
    let Body::OnlineResponse { users } = c.request(2, Body::OnlineRequest).await else { panic!("online") };
    assert_eq!(users.len(), 1);
}

#[tokio::test]
async fn a_connection_lives_no_longer_than_its_token_unless_refreshed() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let ttl = Duration::from_secs(2);
    let started = Instant::now();
    let (mut expiring, answer) = login(&host, 1, &token(1, "short", ttl)).await;
    let Body::LoginAck(cim_proto::LoginAck { token_expires_at_ms: exp_ms, .. }) = answer else {
        panic!("{answer:?}")
    };
    let (mut refreshing, answer) = login(&host, 2, &token(2, "long", ttl)).await;
    assert!(matches!(answer, Body::LoginAck(_)), "{answer:?}");

    // A refresh for another user, or with a bad token, is refused and changes nothing.
    let wrong = refreshing.request(2, Body::Refresh { token: token_for(3, "c") }).await;
    assert!(expect_error(wrong, ErrorCode::Unauthenticated).contains("for user 3, not user 2"));
    let answer =
        refreshing.request(3, Body::Refresh { token: token(2, "long", Duration::from_secs(60)) }).await;
    assert_eq!(answer, Body::ack(0));

    let frames = expiring.closed().await;
    let now_ms =
        || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    // `exp` has whole seconds, so the token lived between one and two seconds.
    assert!(now_ms() >= exp_ms, "kicked {} ms before the token expired", exp_ms - now_ms());
    assert!(started.elapsed() < Duration::from_secs(5), "kicked late: {:?}", started.elapsed());
    assert!(
        frames.iter().any(|f| matches!(&f.body, Body::Kick { code: ErrorCode::TokenExpired, .. })),
        "{frames:?}"
    );
    // The refreshed connection outlives the first token's expiry (same `exp` as the other one).
    for i in 0..3 {
        assert_eq!(refreshing.request(10 + i, Body::Ping).await, Body::Pong);
    }
    // The expired user is offline again and may log in with a new token.
    let (_again, answer) = login(&host, 1, &token_for(1, "short")).await;
    assert!(matches!(answer, Body::LoginAck(_)), "{answer:?}");
}

#[tokio::test]
async fn a_login_component_authorizes_on_the_verified_claims() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let wasm = common::component("login_roles");
    let status = tokio::process::Command::new(common::binary("cim-host"))
        .args(["push", "login"])
        .arg(&wasm)
        .args(["--to", &host.route(), "--token", common::ADMIN_TOKEN])
        .stdout(std::process::Stdio::null())
        .status()
        .await
        .unwrap();
    assert!(status.success(), "cim-host push login_roles.wasm");
    let with_role = |id: u64, role: &str| {
        let t = now();
        sign(&json!({"sub": id.to_string(), "iss": ISSUER, "exp": t + 600, "role": role}))
    };
    // spin.toml allows the roles admin and member.
    let (_admin, answer) = login(&host, 1, &with_role(1, "admin")).await;
    assert!(matches!(answer, Body::LoginAck(_)), "{answer:?}");
    let msg = refused(&host, 2, &with_role(2, "guest"), ErrorCode::Rejected).await;
    assert!(msg.contains("\"guest\" may not log in"), "{msg}");
    let msg = refused(&host, 3, &token_for(3, "no role"), ErrorCode::Rejected).await;
    assert!(msg.contains("no `role` claim"), "{msg}");
}

/// Runs `cim-host` with `args` to completion (it must exit by itself) and returns its exit
/// status, stdout and stderr.
async fn run_host(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    common::components();
    let out = tokio::time::timeout(
        common::DEADLINE,
        tokio::process::Command::new(common::binary("cim-host")).args(args).kill_on_drop(true).output(),
    )
    .await
    .expect("cim-host did not exit")
    .unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn without_auth_a_non_loopback_bind_refuses_to_start_and_names_the_flags() {
    let manifest = common::root().join("spin.toml");
    let data = tempfile::tempdir().unwrap();
    let (status, stdout, stderr) = run_host(&[
        "up",
        "--tcp",
        "0.0.0.0:0",
        "--http",
        "127.0.0.1:0",
        "--manifest",
        manifest.to_str().unwrap(),
        "--data-dir",
        data.path().to_str().unwrap(),
    ])
    .await;
    assert!(!status.success());
    assert!(stdout.is_empty(), "{stdout}");
    for flag in
        ["--auth-hmac-secret-file", "--auth-public-key", "--api-key-file", "--insecure-no-auth", "0.0.0.0"]
    {
        assert!(stderr.contains(flag), "{flag} not named in: {stderr}");
    }
}

#[tokio::test]
async fn cim_host_token_prints_only_a_token_the_host_accepts() {
    let host = Host::start_with_auth(&[]).await.unwrap();
    let secret = host.data_dir.path().join("auth-secret");
    let (status, stdout, stderr) = run_host(&[
        "token",
        "--user-id",
        "5",
        "--name",
        "eve",
        "--ttl",
        "10m",
        "--issuer",
        ISSUER,
        "--secret-file",
        secret.to_str().unwrap(),
    ])
    .await;
    assert!(status.success(), "{stderr}");
    let token = stdout.strip_suffix('\n').expect("one line");
    assert_eq!(token.split('.').count(), 3, "{stdout:?}");
    let (_c, answer) = login(&host, 5, token).await;
    let Body::LoginAck(cim_proto::LoginAck { user, token_expires_at_ms, .. }) = answer else {
        panic!("{answer:?}")
    };
    assert_eq!(user, User { id: 5, name: "eve".into() });
    let left = token_expires_at_ms / 1000 - now();
    assert!((590..=600).contains(&left), "{left}");
}
