//! Node-number leases against a real Redis (a prefix per test): ids are unique over 1,000
//! node starts, some with the clock stepped back, and across a Redis wipe while nodes go
//! on issuing ids.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::*;
use crate::message_id::{Clock, now_ms};
use crate::store::redis::test_support::TestRedis;

fn stepped_clock(back_ms: u64) -> Clock {
    Arc::new(move || now_ms() - back_ms)
}

#[tokio::test]
async fn a_thousand_node_starts_never_repeat_an_id() {
    let t = TestRedis::new();
    let store = t.store().await;
    let ttl = Duration::from_millis(300);
    let mut seen = HashSet::new();
    let mut numbers = HashSet::new();
    for start in 0..1000u64 {
        // Forty node ids, so restarts under the same id and takeovers of expired leases
        // both happen; every fourth start has its clock an hour behind.
        let node_id = format!("node-{}", start % 40);
        let back = if start % 4 == 0 { 3_600_000 } else { 0 };
        let ids = MessageIds::with_clock(&node_id, stepped_clock(back));
        let mut lease = NodeNumber::new(&store, &node_id, ttl);
        lease.acquire(&ids).await.unwrap();
        numbers.insert(lease.number().unwrap());
        // Every 50th node issues a burst that runs its counter ahead of the clock.
        let count = if start % 50 == 0 { 50_000 } else { start % 30 + 1 };
        for _ in 0..count {
            let id =
                ids.next().unwrap_or_else(|| panic!("start {start}: {ids:?} number {:?}", lease.number()));
            assert!(seen.insert(id), "start {start}: id {id} was issued before");
        }
        // A third give their number up; the others stop as if they crashed.
        if start % 3 == 0 {
            lease.release(&ids).await.unwrap();
        }
    }
    assert!(numbers.len() <= 64, "restarts reuse numbers: {} used", numbers.len());
    t.cleanup().await;
}

/// A node as the heartbeat runs it: renews every `ttl / 3`, issues ids until `stop`.
fn live_node(
    store: &RedisStore,
    node_id: &str,
    ttl: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<u64>> {
    let ids = Arc::new(MessageIds::new(node_id));
    let mut lease = NodeNumber::new(store, node_id, ttl);
    tokio::spawn(async move {
        lease.acquire(&ids).await.unwrap();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let issuer = {
            let (ids, issued, stop) = (ids.clone(), issued.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let batch: Vec<u64> = (0..20).filter_map(|_| ids.next()).collect();
                    issued.lock().unwrap().extend(batch);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        };
        while !stop.is_cancelled() {
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = stop.cancelled() => break,
            }
            if let Err(e) = lease.renew(&ids).await {
                panic!("renewing the lease: {e}");
            }
        }
        issuer.await.unwrap();
        Arc::try_unwrap(issued).unwrap().into_inner().unwrap()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_wipe_with_live_nodes_never_repeats_an_id() {
    let t = TestRedis::new();
    let store = t.store().await;
    let ttl = Duration::from_millis(600);
    let stop = CancellationToken::new();
    let before: Vec<_> = ["a", "b", "c"].iter().map(|id| live_node(&store, id, ttl, stop.clone())).collect();
    // Past the first start's quarantine (900 ms: the table is new), and some ids issued.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // The wipe: every key of this test, while a, b and c keep issuing ids.
    t.cleanup().await;
    let wiped_at = now_ms();
    // Newcomers find an empty table: the numbers a, b and c use look free.
    let after: Vec<_> = ["d", "e", "f"].iter().map(|id| live_node(&store, id, ttl, stop.clone())).collect();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    stop.cancel();
    let mut seen = HashSet::new();
    for (name, task) in ["a", "b", "c", "d", "e", "f"].iter().zip(before.into_iter().chain(after)) {
        let issued = task.await.unwrap();
        let late = issued.iter().filter(|&&id| id >> 20 > wiped_at).count();
        assert!(late > 100, "node {name} issued {late} ids after the wipe");
        for id in issued {
            assert!(seen.insert(id), "node {name}: id {id} (number {}) was issued twice", id & 1023);
        }
    }
    t.cleanup().await;
}

#[tokio::test]
async fn a_node_that_lost_its_number_starts_above_the_next_holders_mark() {
    let t = TestRedis::new();
    let store = t.store().await;
    let ttl = Duration::from_millis(300);
    let a = MessageIds::new("a");
    let mut lease_a = NodeNumber::new(&store, "a", ttl);
    lease_a.acquire(&a).await.unwrap();
    let n = lease_a.number().unwrap();
    let last_a = (0..1000).filter_map(|_| a.next()).max().unwrap();
    // a stalls past its ttl: b takes the number over and starts above a's mark.
    tokio::time::sleep(ttl + Duration::from_millis(50)).await;
    let b = MessageIds::new("b");
    let mut lease_b = NodeNumber::new(&store, "b", ttl);
    lease_b.acquire(&b).await.unwrap();
    assert_eq!(lease_b.number(), Some(n), "the expired number is taken over");
    let first_b = b.next().unwrap();
    assert!(first_b >> 10 > a.ceiling(), "b starts above every id a could issue");
    assert!(first_b > last_a);
    // a comes back: its renewal finds the number taken and switches to another.
    assert_eq!(lease_a.renew(&a).await.unwrap(), None);
    assert_ne!(lease_a.number(), Some(n));
    assert_eq!(a.next().unwrap() & 1023, lease_a.number().unwrap());
    t.cleanup().await;
}
