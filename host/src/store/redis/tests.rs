//! Tests of the Redis store against a real Redis (unique key prefix per test).

use super::test_support::TestRedis;
use super::*;

fn entry(id: u64, node: &str, conn: u64) -> OnlineEntry {
    OnlineEntry { user: User { id, name: format!("u{id}") }, node_id: node.into(), conn_id: conn }
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

#[tokio::test]
async fn claim_is_exclusive_across_instances_and_release_checks_the_owner() {
    let t = TestRedis::new();
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

#[tokio::test]
async fn concurrent_claims_have_one_winner() {
    let t = TestRedis::new();
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

#[tokio::test]
async fn online_is_sorted_by_id() {
    let t = TestRedis::new();
    let s = t.store().await;
    for id in [30, 4, 1000, 7] {
        s.claim(entry(id, "n", id)).await.unwrap();
    }
    let ids: Vec<u64> = s.online().await.unwrap().iter().map(|e| e.user.id).collect();
    assert_eq!(ids, vec![4, 7, 30, 1000]);
    t.cleanup().await;
}

#[tokio::test]
async fn kv_values_lists_and_wrong_types() {
    let t = TestRedis::new();
    let s = t.store().await;
    assert_eq!(s.kv_get("default", "k").await.unwrap(), None);
    s.kv_set("default", "k", b"v\0\xff".to_vec()).await.unwrap();
    assert_eq!(s.kv_get("default", "k").await.unwrap(), Some(b"v\0\xff".to_vec()));
    assert_eq!(s.kv_get("other", "k").await.unwrap(), None, "stores are separate");
    s.kv_delete("default", "k").await.unwrap();
    assert_eq!(s.kv_get("default", "k").await.unwrap(), None);

    for i in 0..5u8 {
        s.kv_append("default", "h", vec![i], 3).await.unwrap();
    }
    assert_eq!(s.kv_range("default", "h", 0, -1).await.unwrap(), vec![vec![4], vec![3], vec![2]]);
    assert_eq!(s.kv_range("default", "h", 1, 1).await.unwrap(), vec![vec![3]]);
    assert_eq!(s.kv_range("default", "h", 5, 9).await.unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(s.kv_range("default", "missing", 0, -1).await.unwrap(), Vec::<Vec<u8>>::new());
    s.kv_append("default", "one", vec![1], 0).await.unwrap();
    s.kv_append("default", "one", vec![2], 0).await.unwrap();
    assert_eq!(s.kv_range("default", "one", 0, -1).await.unwrap(), vec![vec![2]], "max_len 0 keeps one");

    assert!(matches!(s.kv_get("default", "h").await, Err(StoreError::WrongType { key }) if key == "h"));
    s.kv_set("default", "plain", b"x".to_vec()).await.unwrap();
    assert!(matches!(
        s.kv_append("default", "plain", vec![1], 3).await,
        Err(StoreError::WrongType { key }) if key == "plain"
    ));
    assert!(matches!(s.kv_range("default", "plain", 0, -1).await, Err(StoreError::WrongType { .. })));
    assert_eq!(
        s.kv_get("default", "plain").await.unwrap(),
        Some(b"x".to_vec()),
        "failed append changed nothing"
    );
    t.cleanup().await;
}

#[tokio::test]
async fn list_keys_by_prefix_is_isolated_between_prefixes_and_stores() {
    let (t1, t2) = (TestRedis::new(), TestRedis::new());
    let (s1, s2) = (t1.store().await, t2.store().await);
    s1.kv_set("a", "history:1", vec![]).await.unwrap();
    s1.kv_set("a", "history:2", vec![]).await.unwrap();
    s1.kv_append("a", "history:0", vec![1], 5).await.unwrap();
    s1.kv_set("a", "other", vec![]).await.unwrap();
    s1.kv_set("b", "history:3", vec![]).await.unwrap();
    s1.kv_set("a:x", "y", vec![]).await.unwrap();
    s1.kv_set("a", "glob*[?]", vec![]).await.unwrap();
    s2.kv_set("a", "history:9", vec![]).await.unwrap();
    assert_eq!(s1.kv_list_keys("a", "history:").await.unwrap(), vec!["history:0", "history:1", "history:2"]);
    assert_eq!(s2.kv_list_keys("a", "history:").await.unwrap(), vec!["history:9"]);
    assert_eq!(s1.kv_list_keys("a", "glob*").await.unwrap(), vec!["glob*[?]"], "glob chars are literal");
    assert_eq!(
        s1.kv_list_keys("a", "").await.unwrap(),
        vec!["glob*[?]", "history:0", "history:1", "history:2", "other"]
    );
    assert_eq!(s1.kv_list_keys("a:x", "").await.unwrap(), vec!["y"]);
    t1.cleanup().await;
    t2.cleanup().await;
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    // Port 1 on localhost: nothing listens there.
    let err = RedisStore::connect("redis://127.0.0.1:1/", "cim:").await.unwrap_err();
    assert!(matches!(&err, StoreError::Unavailable(m) if m.contains("127.0.0.1:1")), "{err}");
    let err = RedisStore::connect("not a url", "cim:").await.unwrap_err();
    assert!(err.to_string().contains("invalid redis url"), "{err}");
}
