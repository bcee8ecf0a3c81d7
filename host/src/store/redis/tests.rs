//! Tests of the Redis store against a real Redis (unique key prefix per test).

use std::time::{Duration, Instant};

use super::test_cluster::RedisCluster;
use super::test_support::TestRedis;
use super::*;
use crate::cluster::{Bus, ClusterMessage, NodeInfo, Registry};
use crate::store::Quota;

fn entry(id: u64, node: &str, conn: u64) -> OnlineEntry {
    OnlineEntry {
        user: User { id, name: format!("u{id}") },
        node_id: node.into(),
        conn_id: conn,
        resume: String::new(),
    }
}

#[test]
fn key_schema() {
    let k = RedisKeys::new("cim:").unwrap();
    assert_eq!(k.online(), "{cim:presence}:online");
    assert_eq!(k.node_users("n1"), "{cim:presence}:node-users:n1");
    assert_eq!(k.node("n1"), "{cim:presence}:node:n1");
    assert_eq!(k.kv("default", "history:1"), "cim:kv:default:history:1");
    assert_eq!(k.kv("a:b", "c"), "cim:kv:a%3Ab:c");
    assert_eq!(k.inbox("n1"), "cim:node:n1:inbox");
    assert_eq!(k.cluster_channel(), "cim:cluster");
    assert!(RedisKeys::new("cim{x}:").is_err());
    assert_eq!(glob_escape(r"a*b?[c]\"), r"a\*b\?\[c\]\\");
    assert_eq!(redacted("redis://:secret@h:6379/0"), "redis://***@h:6379/0");
    assert_eq!(redacted("redis://h:6379/"), "redis://h:6379/");
}

async fn claim_exclusive(t: &TestRedis) {
    let (a, b) = (t.store().await, t.store().await);
    // A conn id past 2^53 must still compare exactly in the Lua release script.
    let big = (1u64 << 60) + 1;
    assert_eq!(a.claim(entry(1, "node-a", big)).await.unwrap(), Claim::Claimed);
    match b.claim(entry(1, "node-b", 7)).await.unwrap() {
        Claim::AlreadyOnline(e) => assert_eq!(e, entry(1, "node-a", big)),
        other => panic!("second claim must fail, got {other:?}"),
    }
    assert!(!b.release(1, "node-b", 7).await.unwrap(), "another node must not release it");
    assert!(!b.release(1, "node-a", big - 1).await.unwrap(), "another connection must not release it");
    assert_eq!(b.lookup(1).await.unwrap(), Some(entry(1, "node-a", big)));
    assert!(a.release(1, "node-a", big).await.unwrap());
    assert_eq!(b.lookup(1).await.unwrap(), None);
    assert!(!a.release(1, "node-a", big).await.unwrap(), "releasing twice is a no-op");
    assert_eq!(b.claim(entry(1, "node-b", 7)).await.unwrap(), Claim::Claimed);
    t.cleanup().await;
}

async fn concurrent_claims(t: &TestRedis) {
    let (a, b) = (t.store().await, t.store().await);
    let tasks: Vec<_> = (0..20u64)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { s.claim(entry(42, "n", i)).await.unwrap() })
        })
        .collect();
    let mut winners = 0;
    for task in tasks {
        if task.await.unwrap() == Claim::Claimed {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    t.cleanup().await;
}

async fn online_sorted(t: &TestRedis) {
    let s = t.store().await;
    for id in [30, 4, 1000, 7] {
        s.claim(entry(id, "n", id)).await.unwrap();
    }
    let ids: Vec<u64> = s.online().await.unwrap().iter().map(|e| e.user.id).collect();
    assert_eq!(ids, vec![4, 7, 30, 1000]);
    // lookup_many: only the online ones, across HMGET chunks.
    let asked: Vec<u64> = (0..2500).collect();
    let mut found: Vec<u64> = s.lookup_many(&asked).await.unwrap().iter().map(|e| e.user.id).collect();
    found.sort_unstable();
    assert_eq!(found, vec![4, 7, 30, 1000]);
    assert_eq!(s.lookup_many(&[]).await.unwrap(), vec![]);
    assert_eq!(s.lookup_many(&[7]).await.unwrap(), vec![entry(7, "n", 7)]);
    t.cleanup().await;
}

async fn kv_values(t: &TestRedis) {
    let s = t.store().await;
    assert_eq!(s.kv_get("default", "k").await.unwrap(), None);
    s.kv_set("default", "k", b"v\0\xff".to_vec(), Quota::NONE).await.unwrap();
    assert_eq!(s.kv_get("default", "k").await.unwrap(), Some(b"v\0\xff".to_vec()));
    assert_eq!(s.kv_get("other", "k").await.unwrap(), None, "stores are separate");
    s.kv_delete("default", "k").await.unwrap();
    assert_eq!(s.kv_get("default", "k").await.unwrap(), None);

    for i in 0..5u8 {
        s.kv_append("default", "h", vec![i], 3, Quota::NONE).await.unwrap();
    }
    assert_eq!(s.kv_range("default", "h", 0, -1, 1000).await.unwrap(), vec![vec![4], vec![3], vec![2]]);
    assert_eq!(s.kv_range("default", "h", 1, 1, 1000).await.unwrap(), vec![vec![3]]);
    assert_eq!(s.kv_range("default", "h", 5, 9, 1000).await.unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(s.kv_range("default", "missing", 0, -1, 1000).await.unwrap(), Vec::<Vec<u8>>::new());
    s.kv_append("default", "one", vec![1], 0, Quota::NONE).await.unwrap();
    s.kv_append("default", "one", vec![2], 0, Quota::NONE).await.unwrap();
    assert_eq!(
        s.kv_range("default", "one", 0, -1, 1000).await.unwrap(),
        vec![vec![2]],
        "max_len 0 keeps one"
    );

    // append-many: per key in order (the last becomes the head), capped, keys independent.
    let many = |pairs: &[(&str, u8)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), vec![*v])).collect();
    s.kv_append_many(
        "default",
        many(&[("m1", 1), ("m2", 2), ("m1", 3), ("m1", 4), ("m1", 5)]),
        3,
        Quota::NONE,
    )
    .await
    .unwrap();
    assert_eq!(s.kv_range("default", "m1", 0, -1, 1000).await.unwrap(), vec![vec![5], vec![4], vec![3]]);
    assert_eq!(s.kv_range("default", "m2", 0, -1, 1000).await.unwrap(), vec![vec![2]]);
    s.kv_append_many("default", Vec::new(), 3, Quota::NONE).await.unwrap();

    assert!(matches!(s.kv_get("default", "h").await, Err(StoreError::WrongType { key }) if key == "h"));
    s.kv_set("default", "plain", b"x".to_vec(), Quota::NONE).await.unwrap();
    assert!(matches!(
        s.kv_append("default", "plain", vec![1], 3, Quota::NONE).await,
        Err(StoreError::WrongType { key }) if key == "plain"
    ));
    assert!(matches!(s.kv_range("default", "plain", 0, -1, 1000).await, Err(StoreError::WrongType { .. })));
    assert!(matches!(
        s.kv_append_many("default", many(&[("m2", 9), ("plain", 1)]), 3, Quota::NONE).await,
        Err(StoreError::WrongType { key }) if key == "plain"
    ));
    assert_eq!(
        s.kv_get("default", "plain").await.unwrap(),
        Some(b"x".to_vec()),
        "failed append changed nothing"
    );
    t.cleanup().await;
}

/// Every key of `store` under `prefix`, page by page of at most `limit`, sorted and without
/// the repeats `SCAN` may make; checks that no page is over `limit`.
async fn all_keys(s: &RedisStore, store: &str, prefix: &str, limit: usize) -> Vec<String> {
    let (mut keys, mut cursor) = (Vec::new(), None::<String>);
    for _ in 0..100_000 {
        let page = s.kv_list_keys(store, prefix, cursor.as_deref(), limit).await.unwrap();
        assert!(page.keys.len() <= limit, "{} keys on a page of {limit}", page.keys.len());
        keys.extend(page.keys);
        match page.cursor {
            Some(c) => cursor = Some(c),
            None => {
                keys.sort();
                keys.dedup();
                return keys;
            }
        }
    }
    panic!("list-keys never ended");
}

/// Pages of list-keys over 2,500 keys among others, and bounded ranges of a 5,000-entry list.
async fn paging(t: &TestRedis) {
    let s = t.store().await;
    let mut expected: Vec<String> = (0..2500).map(|i| format!("p:{i:04}")).collect();
    // Concurrent sets on the multiplexed connection (a pipeline may not cross cluster slots).
    for chunk in expected.chunks(500) {
        let sets = chunk.iter().flat_map(|k| [k.clone(), format!("q:{k}")]).map(|k| {
            let s = s.clone();
            async move { s.kv_set("paged", &k, vec![1], Quota::NONE).await }
        });
        futures_util::future::try_join_all(sets).await.unwrap();
    }
    // Pages of 1,000, of 7 (SCAN returns more than asked: the rest waits in the cursor) and
    // of 1 (many empty pages when the prefix is sparse).
    for limit in [1000, 7] {
        assert_eq!(all_keys(&s, "paged", "p:", limit).await, expected, "pages of {limit}");
    }
    let page = s.kv_list_keys("paged", "p:", None, 1000).await.unwrap();
    assert!(page.cursor.is_some() && page.keys.len() <= 1000);
    let first: Vec<String> = page.keys.clone();
    // Keys added while listing do not disturb the ones that were there all along.
    s.kv_set("paged", "p:new", vec![1], Quota::NONE).await.unwrap();
    let mut rest = all_keys_from(&s, "paged", "p:", page.cursor, 1000).await;
    rest.extend(first);
    rest.sort();
    rest.retain(|k| k != "p:new");
    rest.dedup();
    assert_eq!(rest, expected);
    expected.push("p:new".into());
    assert!(matches!(
        s.kv_list_keys("paged", "p:", Some("not a cursor"), 10).await,
        Err(StoreError::BadCursor(_))
    ));

    // A 5,000-entry list: every range stops after `max` entries, from the asked start.
    let entries: Vec<(String, Vec<u8>)> =
        (0..5000u32).map(|i| ("big".to_owned(), i.to_be_bytes().to_vec())).collect();
    s.kv_append_many("paged", entries, 10_000, Quota::NONE).await.unwrap();
    let newest = |i: u32| (4999 - i).to_be_bytes().to_vec();
    let page = s.kv_range("paged", "big", 0, -1, 1000).await.unwrap();
    assert_eq!((page.len(), page[0].clone(), page[999].clone()), (1000, newest(0), newest(999)));
    let page = s.kv_range("paged", "big", 0, i64::MAX, 1000).await.unwrap();
    assert_eq!(page.len(), 1000);
    let page = s.kv_range("paged", "big", -1500, -1, 1000).await.unwrap();
    assert_eq!((page.len(), page[0].clone(), page[999].clone()), (1000, newest(3500), newest(4499)));
    let page = s.kv_range("paged", "big", 4500, -1, 1000).await.unwrap();
    assert_eq!((page.len(), page[0].clone()), (500, newest(4500)));
    assert_eq!(s.kv_range("paged", "big", i64::MIN, 0, 1000).await.unwrap(), vec![newest(0)]);
    assert!(s.kv_range("paged", "big", i64::MIN, i64::MIN, 1000).await.unwrap().is_empty());
    assert!(s.kv_range("paged", "big", i64::MAX, -1, 1000).await.unwrap().is_empty());
    assert!(s.kv_range("paged", "big", -1, 0, 1000).await.unwrap().is_empty());
    assert_eq!(s.kv_range("paged", "big", -3, -1, 2).await.unwrap(), vec![newest(4997), newest(4998)]);
    assert!(s.kv_range("paged", "missing", -3, -1, 2).await.unwrap().is_empty());
    s.kv_set("paged", "plain", vec![1], Quota::NONE).await.unwrap();
    assert!(matches!(s.kv_range("paged", "plain", -3, -1, 2).await, Err(StoreError::WrongType { .. })));
    t.cleanup().await;
}

async fn all_keys_from(
    s: &RedisStore,
    store: &str,
    prefix: &str,
    mut cursor: Option<String>,
    limit: usize,
) -> Vec<String> {
    let mut keys = Vec::new();
    while let Some(c) = cursor {
        let page = s.kv_list_keys(store, prefix, Some(&c), limit).await.unwrap();
        keys.extend(page.keys);
        cursor = page.cursor;
    }
    keys
}

/// The counters follow sets, overwrites, appends with trims, deletes; over-quota writes are
/// refused and write nothing.
async fn quotas(t: &TestRedis) {
    let s = t.store().await;
    let quota = Quota { max_keys: 3, max_bytes: 100 };
    s.kv_set("q", "a", vec![0; 9], quota).await.unwrap();
    assert_eq!(s.kv_usage("q").await.unwrap(), (1, 10));
    s.kv_set("q", "a", vec![0; 19], quota).await.unwrap();
    assert_eq!(s.kv_usage("q").await.unwrap(), (1, 20), "an overwrite replaces the old size");
    s.kv_set("q", "b", vec![], quota).await.unwrap();
    s.kv_set("q", "c", vec![], quota).await.unwrap();
    let err = s.kv_set("q", "d", vec![], quota).await.unwrap_err();
    assert_eq!(err.to_string(), "key-value store `q` would go over its quota of 3 keys");
    assert_eq!(s.kv_get("q", "d").await.unwrap(), None);
    s.kv_set("q", "c", vec![0; 10], quota).await.expect("an existing key may still be written");
    let err = s.kv_set("q", "c", vec![0; 80], quota).await.unwrap_err();
    assert!(matches!(&err, StoreError::OverQuota { limit, .. } if limit == "100 bytes"), "{err}");
    s.kv_delete("q", "a").await.unwrap();
    s.kv_delete("q", "missing").await.unwrap();
    assert_eq!(s.kv_usage("q").await.unwrap(), (2, 12));

    for i in 0..50u8 {
        s.kv_append("q", "h", vec![i; 20], 4, quota).await.unwrap();
    }
    assert_eq!(s.kv_usage("q").await.unwrap(), (3, 12 + 1 + 80), "trimmed entries are freed");
    let batch = vec![("h".to_owned(), vec![0; 20]), ("x".to_owned(), vec![])];
    let err = s.kv_append_many("q", batch, 4, quota).await.unwrap_err();
    assert!(matches!(err, StoreError::OverQuota { .. }), "{err}");
    assert_eq!(s.kv_range("q", "h", 0, 0, 1).await.unwrap(), vec![vec![49; 20]], "nothing written");
    let batch = vec![("h".to_owned(), vec![1; 5]), ("h".to_owned(), vec![2; 5])];
    s.kv_append_many("q", batch, 2, quota).await.unwrap();
    assert_eq!(s.kv_usage("q").await.unwrap(), (3, 12 + 1 + 10));
    assert_eq!(s.kv_range("q", "h", 0, -1, 10).await.unwrap(), vec![vec![2; 5], vec![1; 5]]);
    s.kv_set("q", "h", vec![], quota).await.unwrap();
    assert_eq!(s.kv_usage("q").await.unwrap(), (3, 13), "a list replaced by a value");
    assert!(matches!(s.kv_append("q", "h", vec![], 1, quota).await, Err(StoreError::WrongType { .. })));
    assert_eq!(s.kv_usage("other").await.unwrap(), (0, 0));
    t.cleanup().await;
}

async fn list_keys(t1: &TestRedis, t2: &TestRedis) {
    let (s1, s2) = (t1.store().await, t2.store().await);
    s1.kv_set("a", "history:1", vec![], Quota::NONE).await.unwrap();
    s1.kv_set("a", "history:2", vec![], Quota::NONE).await.unwrap();
    s1.kv_append("a", "history:0", vec![1], 5, Quota::NONE).await.unwrap();
    s1.kv_set("a", "other", vec![], Quota::NONE).await.unwrap();
    s1.kv_set("b", "history:3", vec![], Quota::NONE).await.unwrap();
    s1.kv_set("a:x", "y", vec![], Quota::NONE).await.unwrap();
    s1.kv_set("a", "glob*[?]", vec![], Quota::NONE).await.unwrap();
    s2.kv_set("a", "history:9", vec![], Quota::NONE).await.unwrap();
    assert_eq!(all_keys(&s1, "a", "history:", 1000).await, vec!["history:0", "history:1", "history:2"]);
    assert_eq!(all_keys(&s2, "a", "history:", 1000).await, vec!["history:9"]);
    assert_eq!(all_keys(&s1, "a", "glob*", 1000).await, vec!["glob*[?]"], "glob chars are literal");
    assert_eq!(
        all_keys(&s1, "a", "", 1).await,
        vec!["glob*[?]", "history:0", "history:1", "history:2", "other"]
    );
    assert_eq!(all_keys(&s1, "a:x", "", 1000).await, vec!["y"]);
    t1.cleanup().await;
    t2.cleanup().await;
}

#[tokio::test]
async fn claim_is_exclusive_across_instances_and_release_checks_the_owner() {
    claim_exclusive(&TestRedis::new()).await;
}

#[tokio::test]
async fn concurrent_claims_have_one_winner() {
    concurrent_claims(&TestRedis::new()).await;
}

#[tokio::test]
async fn online_is_sorted_by_id() {
    online_sorted(&TestRedis::new()).await;
}

#[tokio::test]
async fn kv_values_lists_and_wrong_types() {
    kv_values(&TestRedis::new()).await;
}

#[tokio::test]
async fn list_keys_by_prefix_is_isolated_between_prefixes_and_stores() {
    list_keys(&TestRedis::new(), &TestRedis::new()).await;
}

#[tokio::test]
async fn quotas_count_keys_and_bytes() {
    quotas(&TestRedis::new()).await;
}

#[tokio::test]
async fn list_keys_pages_and_ranges_are_bounded() {
    paging(&TestRedis::new()).await;
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    // Port 1 on localhost: nothing listens there.
    let err = RedisStore::connect("redis://127.0.0.1:1/", "cim:").await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("127.0.0.1:1")), "{err}");
    let err = RedisStore::connect("not a url", "cim:").await.unwrap_err();
    assert!(err.to_string().contains("invalid redis url"), "{err}");
}

/// The same store operations on a three-primary Redis Cluster of the test's own, given by
/// its seed list and by one node's plain URL (detected as a cluster node); plus the node
/// registry and the bus, whose inboxes are sharded channels there.
#[tokio::test]
async fn a_redis_cluster_serves_every_store_operation() {
    let cluster = RedisCluster::start(3);
    let t = TestRedis::on(cluster.url());
    let via_one_node = TestRedis::on(cluster.node_url(1));
    let store = t.store().await;
    assert!(store.connection().is_cluster());
    assert!(via_one_node.store().await.connection().is_cluster(), "a cluster node is detected");
    let err = RedisStore::connect(&format!("{}/2", cluster.node_url(0)), "cim:").await.unwrap_err();
    assert!(err.to_string().contains("only database 0"), "{err}");

    claim_exclusive(&t).await;
    concurrent_claims(&via_one_node).await;
    online_sorted(&t).await;
    kv_values(&t).await;
    // Keys spread over every primary, and listing them must SCAN each one.
    let s = t.store().await;
    let keys: Vec<String> = (0..60).map(|i| format!("k{i:02}")).collect();
    for k in &keys {
        s.kv_set("spread", k, vec![1], Quota::NONE).await.unwrap();
    }
    for i in 0..3 {
        assert!(cluster.dbsize(i) > 0, "primary {i} holds none of the 60 keys");
    }
    assert_eq!(all_keys(&s, "spread", "k", 1000).await, keys);
    // Pages of 7 cross from one primary to the next inside the cursor.
    assert_eq!(all_keys(&s, "spread", "k", 7).await, keys);
    let forged = r#"{"next":{"node":"10.9.9.9:1","cursor":5}}"#;
    let err = s.kv_list_keys("spread", "k", Some(forged), 7).await.unwrap_err();
    assert!(matches!(&err, StoreError::BadCursor(m) if m.contains("10.9.9.9:1")), "{err}");
    list_keys(&t, &TestRedis::on(cluster.url())).await;
    paging(&TestRedis::on(cluster.url())).await;
    quotas(&TestRedis::on(cluster.url())).await;
    // Node-number leases (a Lua script on the presence slot).
    let ids = crate::message_id::MessageIds::new("node-a");
    let mut lease = crate::cluster::node_number::NodeNumber::new(&s, "node-a", Duration::from_millis(300));
    lease.acquire(&ids).await.unwrap();
    assert!(ids.next().is_some());

    // Registry: register, list, expire, reap (multi-key scripts on the presence slot).
    let reg = Registry::new(&store);
    let node = |id: &str| NodeInfo {
        id: id.into(),
        tcp_addr: format!("{id}:9000"),
        ws_url: format!("ws://{id}:8080/ws"),
        http_addr: format!("{id}:8080"),
        connections: 0,
    };
    reg.register(&node("alive"), Duration::from_secs(60)).await.unwrap();
    reg.register(&node("dying"), Duration::from_millis(300)).await.unwrap();
    store.claim(entry(5, "dying", 5)).await.unwrap();
    store.claim(entry(6, "alive", 6)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while reg.nodes().await.unwrap().len() != 1 {
        assert!(Instant::now() < deadline, "the 300 ms registry entry did not expire");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reg.reap_dead_nodes("alive").await.unwrap(), 1);
    let online: Vec<u64> = store.online().await.unwrap().iter().map(|e| e.user.id).collect();
    assert_eq!(online, vec![6]);

    // Bulk presence (a rebuild): one script per batch on the presence slot.
    let rebuilt = [entry(7, "alive", 7), entry(8, "alive", 8), entry(6, "alive", 99)];
    let found = store.restore_many("alive", &rebuilt).await.unwrap();
    assert_eq!(found[..2], [Restored::Claimed, Restored::Claimed]);
    assert!(matches!(&found[2], Restored::Taken(e) if e.conn_id == 6), "{found:?}");
    assert_eq!(store.restore_many("alive", &rebuilt[..1]).await.unwrap(), vec![Restored::Held]);
    assert_eq!(store.release_many("alive", &[(7, 7), (8, 1)]).await.unwrap(), 1, "8 is on another conn");
    assert_eq!(store.release_many("alive", &[(8, 8)]).await.unwrap(), 1);
    // Presence counts: a script that names each node's set from the shared prefix (all on
    // the presence slot).
    let counts = store.presence_counts("alive").await.unwrap();
    assert_eq!((counts.mine, counts.entries, counts.members), (1, 1, 1));

    // Bus: an inbox message reaches its node only; a broadcast reaches every node.
    let bus = Bus::new(&store);
    let mut a = bus.subscribe("a").await.unwrap();
    let mut b = bus.subscribe("b").await.unwrap();
    let kick = ClusterMessage::Kick { user_id: 1, reason: "test".into(), conn_id: None, replaced: false };
    assert_eq!(bus.publish("a", &kick).await.unwrap(), 1, "one subscriber on the inbox's shard");
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), a.recv()).await.unwrap(), Some(kick));
    assert_eq!(
        bus.publish(
            "nobody",
            &ClusterMessage::Kick { user_id: 2, reason: String::new(), conn_id: None, replaced: false }
        )
        .await
        .unwrap(),
        0
    );
    let changed = ClusterMessage::ComponentChanged { name: "group".into(), sha256: "ab".repeat(32) };
    bus.broadcast(&changed).await.unwrap();
    for sub in [&mut a, &mut b] {
        let got = tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap();
        assert_eq!(got, Some(changed.clone()));
    }
    assert_eq!(a.resubscriptions() + b.resubscriptions(), 0);
    drop(a);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bus.publish("a", &changed).await.unwrap() != 0 {
        assert!(Instant::now() < deadline, "still subscribed 5 s after the drop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.cleanup().await;
}

/// The whole Redis Cluster killed and started again empty: meanwhile store calls fail with
/// a clear error in bounded time; afterwards the same store (not reconnected by hand) works
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_recovers_from_a_redis_cluster_restart() {
    let mut cluster = RedisCluster::start(3);
    let t = TestRedis::on(cluster.url());
    let store = t.store().await;
    assert_eq!(store.claim(entry(1, "n", 1)).await.unwrap(), Claim::Claimed);
    store.kv_set("default", "k", vec![1], Quota::NONE).await.unwrap();
    let bus = Bus::new(&store);
    let mut sub = bus.subscribe("n").await.unwrap();

    cluster.stop();
    let asked = Instant::now();
    let err = store.claim(entry(2, "n", 2)).await.unwrap_err();
    let took = asked.elapsed();
    eprintln!("a claim with the cluster down failed after {took:?}: {err}");
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("redis")), "{err}");
    assert!(took < Duration::from_secs(10), "failing took {took:?}");
    assert!(store.kv_get("default", "k").await.is_err());

    tokio::task::block_in_place(|| cluster.start_again());
    let restarted = Instant::now();
    let deadline = restarted + Duration::from_secs(20);
    loop {
        match store.claim(entry(2, "n", 2)).await {
            Ok(claim) => {
                assert_eq!(claim, Claim::Claimed);
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing 20 s after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("the store works again {:?} after the cluster restarted", restarted.elapsed());
    assert_eq!(store.kv_get("default", "k").await.unwrap(), None, "the cluster came back empty");
    store.kv_set("default", "k", vec![2], Quota::NONE).await.unwrap();
    assert_eq!(store.online().await.unwrap().len(), 1);

    // The subscription comes back by itself: a delivery published once it has reaches it.
    let kick = ClusterMessage::Kick {
        user_id: 2,
        reason: "after the restart".into(),
        conn_id: None,
        replaced: false,
    };
    publish_once_subscribed(&bus, &kick).await;
    eprintln!("the inbox is subscribed again {:?} after the cluster restarted", restarted.elapsed());
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap(), Some(kick));
    assert!(sub.resubscriptions() >= 1);
}

/// Publishes `msg` to node `n`'s inbox until someone is subscribed to hear it (20 s at most).
async fn publish_once_subscribed(bus: &Bus, msg: &ClusterMessage) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while bus.publish("n", msg).await.map_or(true, |n| n == 0) {
        assert!(Instant::now() < deadline, "the inbox was not subscribed again within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The cluster's servers restarted as new nodes, with no slots until they are formed again:
/// the cluster clients read an empty layout and drop their connections. The store's client
/// then answers "No connections found" and is replaced with a new one from the seeds (the
/// state redis-rs's client can stay in for good, seen once in a chaos run, answers the same).
/// The bus's subscription lost its inbox subscription for good in this test (a cluster client
/// that re-subscribes while no node owns the slot drops it) until the pump learnt to check
/// that a lost connection is followed by a new subscription: it is rebuilt and subscribed
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_rebuilds_a_cluster_client_left_without_connections() {
    let mut cluster = RedisCluster::start(3);
    let t = TestRedis::on(cluster.url());
    let store = t.store().await;
    store.kv_set("default", "k", vec![1], Quota::NONE).await.unwrap();
    let bus = Bus::new(&store).with_keepalive(Duration::from_millis(500));
    let mut sub = bus.subscribe("n").await.unwrap();

    cluster.stop();
    tokio::task::block_in_place(|| cluster.start_unformed());
    // Requests now reach nodes that own no slot; the client refreshes its layout and reads
    // an empty one. Give it a second of failing requests to do so.
    let unformed = Instant::now();
    let mut last_error = String::new();
    while unformed.elapsed() < Duration::from_secs(1) {
        if let Err(e) = store.kv_get("default", "k").await {
            last_error = e.to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("with the cluster unformed: {last_error}");
    assert!(!last_error.is_empty(), "requests to a cluster without slots succeeded");

    tokio::task::block_in_place(|| cluster.form_again());
    let formed = Instant::now();
    let deadline = formed + Duration::from_secs(20);
    loop {
        match store.kv_get("default", "k").await {
            Ok(v) => {
                assert_eq!(v, None, "the cluster came back empty");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "still failing 20 s after the cluster formed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rebuilds = store.connection().cluster_rebuilds();
    eprintln!("the store works again {:?} after the cluster formed ({rebuilds} rebuilds)", formed.elapsed());
    assert!(rebuilds >= 1, "the client that reported no connection was not rebuilt");

    // The bus's subscription (a cluster client of its own) comes back too.
    let kick =
        ClusterMessage::Kick { user_id: 2, reason: "after forming".into(), conn_id: None, replaced: false };
    publish_once_subscribed(&bus, &kick).await;
    eprintln!("the inbox is subscribed again {:?} after the cluster formed", formed.elapsed());
    assert_eq!(tokio::time::timeout(Duration::from_secs(5), sub.recv()).await.unwrap(), Some(kick));
}
