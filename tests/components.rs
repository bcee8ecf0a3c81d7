//! Handler components on a running host: hot swap by upload (and its CLI), rollback,
//! persistence across restart, refusal of bad uploads, and hostile guests that must not
//! disturb anyone else.

mod common;

use std::time::{Duration, Instant};

use cim_proto::{Body, ErrorCode};
use common::{ADMIN_TOKEN, Host, RawClient, binary, component, expect_error};

/// PUT /admin/components/NAME with raw bytes.
async fn upload(host: &Host, name: &str, wasm: Vec<u8>) -> (u16, serde_json::Value) {
    admin(host, "PUT", &format!("/admin/components/{name}"), wasm, Some(ADMIN_TOKEN)).await
}

async fn admin(
    host: &Host,
    method: &str,
    path: &str,
    body: Vec<u8>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(host.http).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder().method(method).uri(path).header("host", host.http.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender.send_request(req.body(Full::new(bytes::Bytes::from(body))).unwrap()).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

async fn active_group_sha(host: &Host) -> String {
    let (status, body) = admin(host, "GET", "/admin/components", Vec::new(), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    body["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["event"] == "group" && c["active"] == true)
        .map(|c| c["sha256"].as_str().unwrap().to_owned())
        .expect("an active group component")
}

fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(binary("cim-host")).args(args).output().expect("run cim-host")
}

#[tokio::test]
async fn push_word_filter_then_rollback_then_restart_keeps_it() {
    let host = Host::start(&[]).await.unwrap();
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    let mut carol = RawClient::login_ws(&host, 3, "carol").await;

    // Push with the CLI, as an operator would. spin.toml gives blocked_words = "darn,heck".
    let wasm = component("word_filter");
    let out =
        cli(&["push", "group-send", wasm.to_str().unwrap(), "--to", &host.route(), "--token", ADMIN_TOKEN]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "push failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.starts_with("pushed group-send version"), "{stdout}");

    assert!(matches!(alice.request(2, Body::group("darn it, Heck!".into())).await, Body::Ack { .. }));
    assert_eq!(bob.delivery().await.text, "**** it, ****!");
    assert_eq!(carol.delivery().await.text, "**** it, ****!");

    // Rollback: unmasked again; nobody was disconnected.
    let out = cli(&["rollback", "group-send", "--to", &host.route(), "--token", ADMIN_TOKEN]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(matches!(alice.request(3, Body::group("darn".into())).await, Body::Ack { .. }));
    assert_eq!(bob.delivery().await.text, "darn");
    assert_eq!(carol.delivery().await.text, "darn");
    let (status, body) =
        admin(&host, "POST", "/admin/components/group-send/rollback", vec![], Some(ADMIN_TOKEN)).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("nothing_to_roll_back")), "{body}");

    // Push again, restart on the same data directory: still active.
    let (status, body) = upload(&host, "group-send", std::fs::read(&wasm).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let pushed = body["sha256"].as_str().unwrap().to_owned();
    let data = host.data_dir.clone();
    drop((alice, bob, carol, host));
    let host = Host::start_in(data, &[]).await.unwrap();
    assert_eq!(active_group_sha(&host).await, pushed);
    let mut alice = RawClient::login_tcp(&host, 1, "alice").await;
    let mut bob = RawClient::login_tcp(&host, 2, "bob").await;
    alice.request(2, Body::group("heck".into())).await;
    // The log outlived the restart: bob (who never acked) first gets the earlier lines again.
    let live = loop {
        let d = bob.delivery().await;
        if !d.replayed {
            break d;
        }
    };
    assert_eq!(live.text, "****");
}

/// A pushed version whose file no longer matches its sha256 is not compiled at the restart:
/// the version before it (here the manifest's) serves instead.
#[tokio::test]
async fn a_corrupt_pushed_version_is_refused_at_restart() {
    let host = Host::start(&[]).await.unwrap();
    let manifest_sha = active_group_sha(&host).await;
    let (status, body) = upload(&host, "group-send", std::fs::read(component("word_filter")).unwrap()).await;
    assert_eq!(status, 200, "{body}");
    let pushed = body["sha256"].as_str().unwrap().to_owned();
    assert_eq!(active_group_sha(&host).await, pushed);
    let data = host.data_dir.clone();
    drop(host);
    // Another valid component under the pushed version's name: it would compile fine.
    let file = data.path().join("components/group-send").join(format!("{pushed}.wasm"));
    std::fs::write(&file, std::fs::read(component("group_members")).unwrap()).unwrap();
    let host = Host::start_in(data, &[]).await.unwrap();
    assert_eq!(active_group_sha(&host).await, manifest_sha, "the corrupt version must not be active");
}

#[tokio::test]
async fn bad_uploads_are_refused_and_change_nothing() {
    let host = Host::start(&[]).await.unwrap();
    let before = active_group_sha(&host).await;
    let core_module = b"\0asm\x01\0\0\0".to_vec();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", b"this is not wasm at all".to_vec(), "not a WebAssembly"),
        ("core module", core_module, "core WebAssembly module"),
        ("wrong world", std::fs::read(component("login")).unwrap(), "group-handler"),
    ];
    for (what, wasm, needle) in cases {
        let (status, body) = upload(&host, "group-send", wasm).await;
        assert_eq!(status, 422, "{what}: {body}");
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(needle), "{what}: {msg:?} should mention {needle:?}");
    }
    assert_eq!(active_group_sha(&host).await, before);

    let (status, body) = upload(&host, "no-such-component", b"x".to_vec()).await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = admin(&host, "GET", "/admin/components", vec![], None).await;
    assert_eq!(status, 401);
    let (status, _) = admin(&host, "GET", "/admin/components", vec![], Some("wrong")).await;
    assert_eq!(status, 401);

    // Without a token the admin API does not exist.
    let plain = Host::start(&["--admin-token", ""]).await.unwrap();
    let (status, body) = admin(&plain, "GET", "/admin/components", vec![], Some("")).await;
    assert_eq!(status, 404, "{body}");

    // Still chatting.
    let mut a = RawClient::login_tcp(&host, 1, "a").await;
    let mut b = RawClient::login_tcp(&host, 2, "b").await;
    a.request(2, Body::group("fine".into())).await;
    assert_eq!(b.delivery().await.text, "fine");
}

/// Pushes a hostile group handler; group sends fail fast with a clear error naming the
/// component, while private messages keep flowing between other users.
async fn hostile(fixture: &str, needle: &str) {
    let host = Host::start(&[]).await.unwrap();
    let mut mallory = RawClient::login_tcp(&host, 1, "mallory").await;
    let mut alice = RawClient::login_tcp(&host, 2, "alice").await;
    let mut bob = RawClient::login_ws(&host, 3, "bob").await;
    let (status, body) = upload(&host, "group-send", std::fs::read(component(fixture)).unwrap()).await;
    assert_eq!(status, 200, "{body}");

    let sender = tokio::spawn(async move {
        let mut outcomes = Vec::new();
        for i in 0..3 {
            let started = Instant::now();
            let answer = mallory.request(10 + i, Body::group("boom".into())).await;
            outcomes.push((started.elapsed(), answer));
        }
        outcomes
    });
    // Meanwhile, the others chat.
    for i in 0..20u64 {
        let answer = alice.request(100 + i, Body::private(3, format!("hi {i}"))).await;
        assert!(matches!(answer, Body::Ack { .. }), "{answer:?}");
        assert_eq!(bob.delivery().await.text, format!("hi {i}"));
    }
    for (elapsed, answer) in sender.await.unwrap() {
        let msg = expect_error(answer, ErrorCode::HandlerFailed);
        assert!(msg.contains("group-send") && msg.contains(needle), "{msg:?} should mention {needle:?}");
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    }
    // Nobody got the poisoned message, and the host is fine.
    bob.assert_quiet(Duration::from_millis(100)).await;
    assert!(matches!(alice.request(999, Body::Ping).await, Body::Pong));
}

#[tokio::test]
async fn infinite_loop_times_out() {
    hostile("loop_forever", "timed out").await;
}

#[tokio::test]
async fn allocation_bomb_hits_the_memory_cap() {
    hostile("alloc_bomb", "memory").await;
}

#[tokio::test]
async fn panic_traps() {
    hostile("panic", "trapped").await;
}

#[tokio::test]
async fn swapping_twenty_times_under_load_loses_nothing() {
    // The senders send as fast as they can: over the default per-user rate limit.
    let host = Host::start(&["--no-rate-limits"]).await.unwrap();
    let v1 = std::fs::read(component("group_send")).unwrap();
    let v2 = std::fs::read(component("group_send_v2")).unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // One listener records every delivery it gets.
    let mut listener = RawClient::login_tcp(&host, 100, "listener").await;
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let d = listener.delivery().await;
            if seen_tx.send(d.text).is_err() {
                break;
            }
        }
    });
    // Senders send continuously until the swapping is over (answers interleave with the
    // other senders' deliveries, which `request` consumes).
    let mut senders = Vec::new();
    for s in 1..=3u64 {
        let mut c = RawClient::login_tcp(&host, s, &format!("sender{s}")).await;
        let stop = stop_rx.clone();
        senders.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while !*stop.borrow() || sent < 10 {
                match c.request(sent + 1, Body::group(format!("{s}:{sent}"))).await {
                    Body::Ack { .. } => sent += 1,
                    other => panic!("send {s}:{sent} failed: {other:?}"),
                }
            }
            sent
        }));
    }
    for i in 0..20 {
        let wasm = if i % 2 == 0 { v2.clone() } else { v1.clone() };
        let (status, body) = upload(&host, "group-send", wasm).await;
        assert_eq!(status, 200, "swap {i}: {body}");
    }
    stop_tx.send(true).unwrap();
    let mut total = 0;
    for t in senders {
        total += t.await.unwrap();
    }

    // The listener got every acknowledged message exactly once, each handled wholly by one
    // version (no half-prefixed texts, no message seen twice).
    let mut texts = std::collections::HashSet::new();
    let mut v2_count = 0;
    for _ in 0..total {
        let text = tokio::time::timeout(common::DEADLINE, seen_rx.recv()).await.unwrap().unwrap();
        let plain = match text.strip_prefix("[v2] ") {
            Some(rest) => {
                v2_count += 1;
                rest.to_owned()
            }
            None => text.clone(),
        };
        assert!(!plain.contains("[v2]"), "{text}");
        assert!(texts.insert(plain), "duplicate {text}");
    }
    assert!(v2_count > 0 && v2_count < total, "both versions should have served: {v2_count} of {total}");
    eprintln!("{total} messages across 20 swaps, {v2_count} by v2");
}

/// Limits from `[component.NAME.limits]` are listed with the memory headroom, reported by
/// `cim-host push`, and a component that starts above its cap is refused, naming the key to
/// raise, while the running one keeps serving.
#[tokio::test]
async fn component_limits_and_memory_headroom() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = common::manifest_with(dir.path(), "");
    let text = std::fs::read_to_string(&manifest).unwrap().replace(
        "[component.group-send]\n",
        "[component.group-send]\nlimits = { memory_mib = 2, deadline_ms = 250, max_instances = 50 }\n",
    );
    std::fs::write(&manifest, text).unwrap();
    let host = Host::start_with_manifest(&manifest, &[]).await.unwrap();

    let (status, body) = admin(&host, "GET", "/admin/components", Vec::new(), Some(ADMIN_TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let components = body["components"].as_array().unwrap();
    let group = components.iter().find(|c| c["event"] == "group").expect("group");
    assert_eq!(
        group["limits"],
        serde_json::json!({ "memory_mib": 2, "deadline_ms": 250, "max_instances": 50 })
    );
    let headroom = group["headroom"].as_str().expect("headroom");
    assert!(headroom.starts_with("starting memory ") && headroom.ends_with(" of 2 MiB"), "{headroom}");
    let login = components.iter().find(|c| c["event"] == "login").expect("login");
    assert_eq!(
        login["limits"],
        serde_json::json!({ "memory_mib": 16, "deadline_ms": 100, "max_instances": 1000 })
    );
    let before = active_group_sha(&host).await;

    // The CLI prints the headroom of what it pushed.
    let to = format!("http://{}", host.http);
    let word_filter = component("word_filter");
    let out =
        cli(&["push", "group-send", word_filter.to_str().unwrap(), "--to", &to, "--token", ADMIN_TOKEN]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("starting memory ")
            && stdout.contains(" of 2 MiB; deadline 250 ms, at most 50 instances"),
        "{stdout}"
    );

    // Over 4 MiB at start: refused, with the key to raise; the CLI says so in one paragraph.
    let big = component("big_start");
    let out = cli(&["push", "group-send", big.to_str().unwrap(), "--to", &to, "--token", ADMIN_TOKEN]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("more than its cap of 2 MiB"), "{stderr}");
    assert!(
        stderr.contains("raise `memory_mib` under [component.group-send.limits] in spin.toml to at least 6"),
        "{stderr}"
    );
    assert!(!stderr.contains("Stack backtrace") && !stderr.contains("Caused by"), "{stderr}");
    let (status, body) = upload(&host, "group-send", std::fs::read(&big).unwrap()).await;
    assert_eq!(status, 422, "{body}");
    assert_ne!(active_group_sha(&host).await, before, "word-filter is active");

    // Still serving with the pushed word filter.
    let mut a = RawClient::login_tcp(&host, 1, "a").await;
    let mut b = RawClient::login_tcp(&host, 2, "b").await;
    a.request(2, Body::group("oh heck".into())).await;
    assert_eq!(b.delivery().await.text, "oh ****");
}
