//! Runtime tests against the real components in `components/` (built on demand).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cim_proto::{MessageKind, User};

use super::*;
use crate::handlers::{Recipients, SendDecision};
use crate::store::{MAX_PAGE, OnlineEntry, Quota, Store};

mod limits;

fn components_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../components")
}

/// The bytes of `components/target/wasm32-wasip2/release/<name>.wasm`, building the
/// components once if any is missing.
pub(crate) fn wasm(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = components_dir().join("target/wasm32-wasip2/release").join(format!("{name}.wasm"));
    if !path.exists() {
        BUILT.get_or_init(|| {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--target", "wasm32-wasip2", "--release"])
                .current_dir(components_dir())
                .env_remove("CARGO_TARGET_DIR")
                .env_remove("RUSTFLAGS")
                .env_remove("CARGO_ENCODED_RUSTFLAGS")
                .status()
                .expect("run cargo to build the components");
            assert!(status.success(), "building the components failed: {status}");
        });
    }
    std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn config() -> RuntimeConfig {
    // Small pools: many tests run at once, each with its own engine.
    RuntimeConfig { max_instances: 16, ..RuntimeConfig::default() }
}

fn runtime() -> Runtime {
    Runtime::new(config()).expect("runtime")
}

fn caps(stores: &[&str], vars: &[(&str, &str)]) -> Capabilities {
    Capabilities {
        key_value_stores: stores.iter().map(|s| (*s).to_owned()).collect(),
        variables: vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        ..Capabilities::default()
    }
}

async fn install(rt: &Runtime, event: Event, file: &str, caps: Capabilities) -> Arc<Loaded> {
    let loaded = rt.load(event, &file.replace('_', "-"), wasm(file), caps, file).await.expect("load");
    rt.install(loaded.clone());
    loaded
}

fn user(id: u64) -> User {
    User { id, name: format!("user{id}") }
}

async fn context_with_online(ids: &[u64]) -> Context {
    let store = Store::memory();
    for &id in ids {
        store
            .claim(OnlineEntry { user: user(id), node_id: "n1".into(), conn_id: id, resume: String::new() })
            .await
            .expect("claim");
    }
    Context::new(store)
}

fn message(id: u64, sender: u64, kind: MessageKind, text: &str) -> Message {
    Message {
        id,
        sender: user(sender),
        kind,
        text: text.into(),
        timestamp_ms: 1_767_225_600_000,
        accepted_us: 1_767_225_600_000_000,
    }
}

/// Waits until a request holds `loaded` (besides the test and the slot).
async fn wait_until_in_flight(loaded: &Arc<Loaded>) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Arc::strong_count(loaded) < 3 {
        assert!(Instant::now() < deadline, "the request never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test]
async fn default_group_delivers_to_all_online_except_sender() {
    let rt = runtime();
    install(&rt, Event::Group, "group_send", Capabilities::default()).await;
    let ctx = context_with_online(&[1, 2, 3]).await;
    let batch = vec![message(1, 1, MessageKind::Group, "hi"), message(2, 2, MessageKind::Group, "yo")];
    let decisions = rt.group(&ctx, batch).await.expect("group");
    assert_eq!(decisions.len(), 2);
    for d in decisions {
        assert_eq!(d.decision, SendDecision::Deliver);
        assert_eq!(d.recipients, Recipients::AllOnlineExceptSender);
    }
    assert!(rt.group(&ctx, Vec::new()).await.expect("empty batch").is_empty());
}

#[tokio::test]
async fn default_private_login_and_online_pass_through() {
    let rt = runtime();
    install(&rt, Event::Private, "private_send", Capabilities::default()).await;
    install(&rt, Event::Login, "login", Capabilities::default()).await;
    install(&rt, Event::Online, "online_list", Capabilities::default()).await;
    let ctx = context_with_online(&[1, 2]).await;

    let batch = vec![
        PrivateRequest { message: message(1, 1, MessageKind::Private, "a"), to: 2 },
        PrivateRequest { message: message(2, 2, MessageKind::Private, "b"), to: 1 },
    ];
    assert_eq!(
        rt.private(&ctx, batch).await.expect("private"),
        [SendDecision::Deliver, SendDecision::Deliver]
    );

    let req = LoginRequest { user: user(9), node_id: "n1".into(), claims: None };
    assert_eq!(rt.login(&ctx, req).await.expect("login"), LoginDecision::Accept);

    let online = vec![user(1), user(2)];
    assert_eq!(rt.online(&ctx, user(1), online.clone()).await.expect("online"), online);
}

#[tokio::test]
async fn word_filter_masks_the_words_of_its_variable() {
    let rt = runtime();
    install(&rt, Event::Group, "word_filter", caps(&[], &[("blocked_words", "darn, heck")])).await;
    let ctx = context_with_online(&[1, 2]).await;
    let batch =
        vec![message(1, 1, MessageKind::Group, "Darn it, heck!"), message(2, 1, MessageKind::Group, "clean")];
    let decisions = rt.group(&ctx, batch).await.expect("group");
    assert_eq!(decisions[0].decision, SendDecision::Rewrite("**** it, ****!".into()));
    assert_eq!(decisions[1].decision, SendDecision::Deliver);
}

#[tokio::test]
async fn login_allowlist_accepts_listed_and_rejects_others() {
    let rt = runtime();
    install(&rt, Event::Login, "login_allowlist", caps(&[], &[("allowed_ids", "1,2")])).await;
    let ctx = context_with_online(&[]).await;
    let ok = rt
        .login(&ctx, LoginRequest { user: user(2), node_id: "n1".into(), claims: None })
        .await
        .expect("login");
    assert_eq!(ok, LoginDecision::Accept);
    let no = rt
        .login(&ctx, LoginRequest { user: user(3), node_id: "n1".into(), claims: None })
        .await
        .expect("login");
    assert_eq!(no, LoginDecision::Reject("user 3 is not on the allow list".into()));

    // Without its variable it fails closed: the variable import says which one is missing.
    install(&rt, Event::Login, "login_allowlist", Capabilities::default()).await;
    let no = rt
        .login(&ctx, LoginRequest { user: user(1), node_id: "n1".into(), claims: None })
        .await
        .expect("login");
    assert!(matches!(no, LoginDecision::Reject(_)));
}

#[tokio::test]
async fn an_endless_loop_times_out_at_the_deadline() {
    let rt = runtime();
    install(&rt, Event::Group, "loop_forever", Capabilities::default()).await;
    let ctx = context_with_online(&[1]).await;
    let started = Instant::now();
    let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("must time out");
    let elapsed = started.elapsed();
    assert!(err.reason.contains("timed out after 100 ms"), "{err}");
    assert_eq!(err.component, "loop-forever");
    assert_eq!(err.event, Event::Group);
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    assert!(elapsed >= Duration::from_millis(100), "took {elapsed:?}");
}

#[tokio::test]
async fn an_allocation_bomb_hits_the_memory_cap() {
    let rt = runtime();
    install(&rt, Event::Group, "alloc_bomb", Capabilities::default()).await;
    let ctx = context_with_online(&[1]).await;
    let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("must fail");
    assert!(err.reason.contains("exceeded the memory limit of 16 MiB"), "{err}");
}

#[tokio::test]
async fn a_panic_is_a_trap_with_its_message() {
    let rt = runtime();
    install(&rt, Event::Group, "panic", Capabilities::default()).await;
    let ctx = context_with_online(&[1]).await;
    let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("must trap");
    assert!(err.reason.starts_with("trapped: "), "{err}");
    assert!(err.reason.contains("panic fixture: refusing a batch of 1 message(s)"), "{err}");
}

#[tokio::test]
async fn traps_do_not_leak_pool_slots() {
    let rt = runtime();
    install(&rt, Event::Group, "panic", Capabilities::default()).await;
    let ctx = context_with_online(&[1]).await;
    // Twice the pool size: a leaked instance slot would make the later calls fail to instantiate.
    for _ in 0..2 * config().max_instances {
        let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("trap");
        assert!(err.reason.starts_with("trapped: "), "{err}");
    }
    install(&rt, Event::Group, "group_send", Capabilities::default()).await;
    rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect("still serving");
}

#[tokio::test]
async fn bad_uploads_are_refused_with_the_reason() {
    let rt = runtime();
    let none = Capabilities::default;

    let err = rt.load(Event::Group, "junk", b"definitely not wasm".to_vec(), none(), "upload").await;
    assert!(matches!(&err, Err(LoadError::NotAComponent(_))), "{err:?}");

    let err = rt.load(Event::Group, "core", b"\0asm\x01\0\0\0".to_vec(), none(), "upload").await;
    let err = err.expect_err("core module");
    assert!(matches!(&err, LoadError::NotAComponent(m) if m.contains("core WebAssembly module")), "{err}");

    let mut truncated = wasm("group_send");
    truncated.truncate(truncated.len() / 2);
    let err = rt.load(Event::Group, "half", truncated, none(), "upload").await.expect_err("truncated");
    assert!(matches!(&err, LoadError::Compile(_)), "{err}");

    let err = rt.load(Event::Group, "login", wasm("login"), none(), "upload").await.expect_err("wrong world");
    let text = err.to_string();
    assert!(
        matches!(&err, LoadError::WrongWorld { expected, .. } if expected == "cim:im/group-send@0.2.0"),
        "{text}"
    );
    assert!(
        text.contains("cim:im/login-handler@0.2.0") && text.contains("cim:im/group-handler@0.2.0"),
        "{text}"
    );

    // Nothing was installed by the failures.
    assert!(rt.current(Event::Group).is_none());
    let ctx = context_with_online(&[1]).await;
    let err = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect_err("no component");
    assert!(err.reason.contains("no component is installed"), "{err}");
}

#[tokio::test]
async fn the_callback_appends_history_to_the_store() {
    let rt = runtime();
    install(&rt, Event::Callback, "message_callback", caps(&["default"], &[])).await;
    let ctx = context_with_online(&[1, 2]).await;
    let batch = vec![
        Delivered { message: message(7, 1, MessageKind::Private, "hi"), recipients: vec![2] },
        Delivered { message: message(8, 2, MessageKind::Group, "all"), recipients: vec![1] },
    ];
    rt.callback(&ctx, batch).await.expect("callback");
    let read = |key: &'static str| {
        let ctx = ctx.clone();
        async move {
            let list = ctx.store().kv_range("default", key, 0, -1, MAX_PAGE).await.expect("range");
            list.into_iter().map(|e| String::from_utf8(e).expect("utf-8")).collect::<Vec<String>>()
        }
    };
    // Private: the sender's and the receiver's history; group: once, the group's history.
    let private = r#"{"id":7,"timestamp_ms":1767225600000,"kind":"private","sender":{"id":1,"name":"user1"},"to":[2],"text":"hi"}"#;
    assert_eq!(read("history:1").await, [private]);
    assert_eq!(read("history:2").await, [private]);
    assert_eq!(
        read("history:group").await,
        [
            r#"{"id":8,"timestamp_ms":1767225600000,"kind":"group","sender":{"id":2,"name":"user2"},"text":"all"}"#
        ]
    );
}

#[tokio::test]
async fn a_store_not_granted_is_access_denied() {
    let rt = runtime();
    // Granted another store only: the component's appends to `default` are refused, which it
    // logs and survives.
    install(&rt, Event::Callback, "message_callback", caps(&["other"], &[])).await;
    let ctx = context_with_online(&[1, 2]).await;
    let batch = vec![Delivered { message: message(7, 1, MessageKind::Private, "hi"), recipients: vec![2] }];
    rt.callback(&ctx, batch).await.expect("callback survives");
    assert!(ctx.store().kv_range("default", "history:1", 0, -1, MAX_PAGE).await.expect("range").is_empty());
}

/// What the kv-probe fixture says to `command` (it rejects the message with its answer).
async fn probe(rt: &Runtime, ctx: &Context, command: &str) -> String {
    let decisions = rt.group(ctx, vec![message(1, 1, MessageKind::Group, command)]).await.expect("kv-probe");
    match &decisions[0].decision {
        SendDecision::Reject(answer) => answer.clone(),
        other => panic!("kv-probe answered {other:?}"),
    }
}

/// A guest calling `range` on a list of 20,000 entries gets 1,000, and walking `list-keys`
/// gets every key in pages of at most its limit (and never more than 1,000).
async fn a_guest_gets_bounded_pages(store: Store) {
    // The listing on a shared Redis may take many round trips: no tight deadline here.
    let rt = Runtime::new(RuntimeConfig { deadline: Duration::from_secs(20), ..config() }).expect("runtime");
    install(&rt, Event::Group, "kv_probe", caps(&["default"], &[])).await;
    let ctx = Context::new(store.clone());
    // Longer than a guest could make it (appends are capped at MAX_LIST_LEN).
    let entries = (0..20_000u32).map(|i| ("huge".to_owned(), i.to_be_bytes().to_vec())).collect();
    store.kv_append_many("default", entries, 100_000, Quota::NONE).await.expect("fill the list");
    assert_eq!(probe(&rt, &ctx, "range huge 0 -1").await, "entries=1000");
    assert_eq!(probe(&rt, &ctx, "range huge 0 9223372036854775807").await, "entries=1000");
    assert_eq!(probe(&rt, &ctx, "range huge -1500 -1").await, "entries=1000");
    assert_eq!(probe(&rt, &ctx, "range huge 19500 -1").await, "entries=500");
    assert_eq!(probe(&rt, &ctx, "range huge 5 4").await, "entries=0");

    let keys: Vec<String> = (0..2500).map(|i| format!("k:{i}")).collect();
    for chunk in keys.chunks(250) {
        let sets = chunk.iter().map(|k| ctx.store().kv_set("default", k, Vec::new(), Quota::NONE));
        futures_util::future::try_join_all(sets).await.expect("set keys");
    }
    for (limit, most) in [(1000, 1000), (5000, 1000), (300, 300)] {
        let answer = probe(&rt, &ctx, &format!("list k: {limit}")).await;
        let field = |name: &str| -> usize {
            let value = answer.split(' ').find_map(|f| f.strip_prefix(name)).expect("a field");
            value.parse().expect("a number")
        };
        assert_eq!(field("keys="), 2500, "limit {limit}: {answer}");
        assert!(field("largest=") <= most, "limit {limit}: {answer}");
    }
}

#[tokio::test]
async fn a_guest_gets_bounded_pages_from_the_memory_store() {
    a_guest_gets_bounded_pages(Store::memory()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_gets_bounded_pages_from_redis() {
    let redis = crate::store::redis::test_support::TestRedis::new();
    a_guest_gets_bounded_pages(Store::from_redis(Arc::new(redis.store().await), Default::default())).await;
    redis.cleanup().await;
}

#[tokio::test]
async fn a_reserved_store_is_denied_even_if_granted() {
    let rt = runtime();
    // A manifest cannot grant it (refused at load); capabilities built by hand still do not.
    install(&rt, Event::Group, "kv_probe", caps(&["default", "cim-components"], &[])).await;
    let ctx = Context::new(Store::memory());
    ctx.store().kv_set("cim-components", "k", vec![1], Quota::NONE).await.expect("the host's own write");
    for command in ["@cim-components range k 0 -1", "@cim-components set k 1", "@cim-x list k 10"] {
        let answer = probe(&rt, &ctx, command).await;
        assert!(answer.starts_with("error: access-denied: key-value store `cim-"), "{command}: {answer}");
        assert!(answer.contains("is reserved for the host"), "{answer}");
    }
    assert_eq!(probe(&rt, &ctx, "@default set k 1").await, "ok");
    assert_eq!(ctx.store().kv_get("cim-components", "k").await.expect("get"), Some(vec![1]), "unchanged");
}

#[tokio::test]
async fn a_guest_logging_in_a_loop_is_rate_limited() {
    let rt = Runtime::new(RuntimeConfig { log_rate: crate::limits::Rate::new(10, 10), ..config() })
        .expect("runtime");
    let loaded = install(&rt, Event::Group, "kv_probe", Capabilities::default()).await;
    let ctx = Context::new(Store::memory());
    assert_eq!(probe(&rt, &ctx, "log 1000").await, "ok");
    // 10 lines written (the burst), the rest counted: the next line let through says so.
    let deadline = Instant::now() + Duration::from_secs(5);
    let dropped = loop {
        match rt.engine.log_limiter.admit(&loaded.name) {
            log_limit::Admit::Write { dropped } => break dropped,
            log_limit::Admit::Drop => assert!(Instant::now() < deadline, "the bucket never refilled"),
        }
    };
    assert!(dropped >= 900, "{dropped} dropped");
}

#[tokio::test]
async fn a_guest_past_the_store_quota_gets_too_large() {
    let quota = Quota { max_keys: 2, max_bytes: 1000 };
    let rt = Runtime::new(RuntimeConfig { kv_quota: quota, ..config() }).expect("runtime");
    install(&rt, Event::Group, "kv_probe", caps(&["default"], &[])).await;
    let ctx = Context::new(Store::memory());
    assert_eq!(probe(&rt, &ctx, "set a 10").await, "ok");
    assert_eq!(probe(&rt, &ctx, "set b 10").await, "ok");
    assert_eq!(
        probe(&rt, &ctx, "set c 10").await,
        "error: too-large: key-value store `default` would go over its quota of 2 keys"
    );
    assert_eq!(
        probe(&rt, &ctx, "set b 990").await,
        "error: too-large: key-value store `default` would go over its quota of 1000 bytes"
    );
    assert_eq!(probe(&rt, &ctx, "set b 900").await, "ok");
    assert_eq!(ctx.store().kv_usage("default").await.expect("usage"), (2, 912));
}

#[tokio::test]
async fn a_swap_lets_in_flight_requests_finish_on_their_version() {
    let rt = runtime();
    let slow = install(&rt, Event::Group, "loop_forever", Capabilities::default()).await;
    let v2 =
        rt.load(Event::Group, "group-send-v2", wasm("group_send_v2"), Capabilities::default(), "v2").await;
    let v2 = v2.expect("load v2");
    assert!(v2.version > slow.version);
    let ctx = context_with_online(&[1, 2]).await;

    let in_flight = {
        let rt = Arc::new(rt);
        let (task_rt, task_ctx) = (rt.clone(), ctx.clone());
        let task = tokio::spawn(async move {
            task_rt.group(&task_ctx, vec![message(1, 1, MessageKind::Group, "old")]).await
        });
        // Swap once the slow request is running on the old version.
        wait_until_in_flight(&slow).await;
        let old = rt.install(v2.clone()).expect("replaced");
        assert_eq!(old.version, slow.version);
        let new = rt.group(&ctx, vec![message(2, 1, MessageKind::Group, "new")]).await.expect("v2 serves");
        assert_eq!(new[0].decision, SendDecision::Rewrite("[v2] new".into()));
        task.await.expect("join")
    };
    let err = in_flight.expect_err("the old version loops until its deadline");
    assert_eq!(err.component, "loop-forever");
    assert!(err.reason.contains("timed out"), "{err}");
}

#[tokio::test]
async fn a_busy_guest_does_not_hold_up_others() {
    let rt = Arc::new(runtime());
    let slow = install(&rt, Event::Group, "loop_forever", Capabilities::default()).await;
    install(&rt, Event::Private, "private_send", Capabilities::default()).await;
    let ctx = context_with_online(&[1, 2]).await;
    let looping = {
        let (rt, ctx) = (rt.clone(), ctx.clone());
        tokio::spawn(async move { rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await })
    };
    wait_until_in_flight(&slow).await;
    let started = Instant::now();
    let batch = vec![PrivateRequest { message: message(2, 1, MessageKind::Private, "p"), to: 2 }];
    rt.private(&ctx, batch).await.expect("private");
    let elapsed = started.elapsed();
    assert!(!looping.is_finished(), "the looping guest should still be running");
    assert!(elapsed < Duration::from_millis(80), "a private call waited {elapsed:?} behind a looping guest");
    assert!(looping.await.expect("join").is_err());
}

#[tokio::test]
async fn rollback_reinstates_the_previous_version() {
    let rt = runtime();
    let v1 = install(&rt, Event::Group, "group_send", Capabilities::default()).await;
    let v2 = install(&rt, Event::Group, "group_send_v2", Capabilities::default()).await;
    let infos = rt.list();
    assert_eq!(infos.len(), 2);
    assert!(infos.iter().any(|i| i.active && i.version == v2.version && i.name == "group-send-v2"));
    assert!(infos.iter().any(|i| !i.active && i.version == v1.version && i.sha256 == v1.sha256));
    let json = serde_json::to_value(&infos[0]).expect("json");
    assert_eq!(json["event"], "group");

    let restored = rt.rollback(Event::Group).expect("has history");
    assert_eq!(restored.version, v1.version);
    let ctx = context_with_online(&[1, 2]).await;
    let d = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect("group");
    assert_eq!(d[0].decision, SendDecision::Deliver);
    assert!(rt.rollback(Event::Group).is_none(), "nothing older than v1");
    assert!(rt.rollback(Event::Login).is_none());
}

#[tokio::test]
async fn compiled_components_are_cached_on_disk() {
    let dir = std::env::temp_dir().join(format!("cim-runtime-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let rt = Runtime::new(RuntimeConfig { cache_dir: Some(dir.clone()), ..config() }).expect("runtime");
    let bytes = wasm("group_send");
    let first = rt.load(Event::Group, "g", bytes.clone(), Capabilities::default(), "a").await.expect("load");
    assert_eq!(first.compiled_from, CompiledFrom::Compiler);
    let second = rt.load(Event::Group, "g", bytes.clone(), Capabilities::default(), "b").await.expect("load");
    assert_eq!(second.compiled_from, CompiledFrom::Cache);
    assert_eq!(first.sha256, second.sha256);
    assert_eq!(first.sha256.len(), 64);

    // A damaged entry is ignored and replaced.
    for entry in std::fs::read_dir(&dir).expect("cache dir") {
        std::fs::write(entry.expect("entry").path(), b"garbage").expect("damage");
    }
    let third = rt.load(Event::Group, "g", bytes, Capabilities::default(), "c").await.expect("load");
    assert_eq!(third.compiled_from, CompiledFrom::Compiler);
    rt.install(third);
    let ctx = context_with_online(&[1]).await;
    rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "x")]).await.expect("group");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_manifest_installs_every_event() {
    let release = components_dir().join("target/wasm32-wasip2/release");
    // Make sure the files exist (builds them if needed).
    for name in ["login_allowlist", "private_send", "word_filter", "online_list", "message_callback"] {
        wasm(name);
    }
    let text = r#"
spin_manifest_version = 2
[application]
name = "test"
[variables]
blocked_words = { default = "heck" }
[[trigger.cim]]
event = "login"
component = "login-allowlist"
[[trigger.cim]]
event = "private"
component = "private-send"
[[trigger.cim]]
event = "group"
component = "word-filter"
[[trigger.cim]]
event = "online"
component = "online-list"
[[trigger.cim]]
event = "callback"
component = "message-callback"
[component.login-allowlist]
source = "login_allowlist.wasm"
[component.login-allowlist.variables]
allowed_ids = "5"
[component.private-send]
source = "private_send.wasm"
[component.word-filter]
source = "word_filter.wasm"
[component.word-filter.variables]
blocked_words = "{{ blocked_words }}"
[component.online-list]
source = "online_list.wasm"
[component.message-callback]
source = "message_callback.wasm"
key_value_stores = ["default"]
"#;
    let manifest = Manifest::parse(text, &release.join("spin.toml"), &release, |_| None).expect("manifest");
    let rt = runtime();
    let loaded = rt.install_manifest(&manifest).await.expect("install");
    assert_eq!(loaded.len(), 5);
    assert_eq!(rt.list().len(), 5);
    let ctx = context_with_online(&[1, 2]).await;
    let d = rt.group(&ctx, vec![message(1, 1, MessageKind::Group, "oh heck")]).await.expect("group");
    assert_eq!(d[0].decision, SendDecision::Rewrite("oh ****".into()));
    let login = rt
        .login(&ctx, LoginRequest { user: user(5), node_id: "n".into(), claims: None })
        .await
        .expect("login");
    assert_eq!(login, LoginDecision::Accept);

    // A manifest whose component is of the wrong world installs nothing.
    let bad = text.replace("source = \"word_filter.wasm\"", "source = \"online_list.wasm\"");
    let manifest = Manifest::parse(&bad, &release.join("spin.toml"), &release, |_| None).expect("manifest");
    let err = runtime().install_manifest(&manifest).await.expect_err("wrong world");
    assert!(
        matches!(&err, InstallError::Load { component, event: Event::Group, .. } if component == "word-filter"),
        "{err}"
    );
}
