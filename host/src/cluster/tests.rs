//! A node's presence against a real Redis: it never reaps itself, it puts its users back
//! when Redis lost them, in a few round trips per thousand users, and churn during the
//! rebuild leaves no ghost.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cim_proto::User;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

use super::reconcile::reconcile;
use super::{Cluster, NodeInfo, Strategy};
use crate::config::Config;
use crate::handlers::Backend;
use crate::router::{Closer, LocalConn, Outbox, Router};
use crate::store::redis::test_support::TestRedis;
use crate::store::redis::{RESTORE_BATCH, RedisStore};
use crate::store::{OnlineEntry, Store};

fn node(id: &str) -> NodeInfo {
    NodeInfo {
        id: id.into(),
        tcp_addr: format!("{id}.local:9000"),
        ws_url: format!("ws://{id}.local:8080/ws"),
        http_addr: format!("{id}.local:8080"),
        connections: 0,
    }
}

fn router(store: &Arc<RedisStore>, node_id: &str) -> Arc<Router> {
    let config = Config { node_id: node_id.into(), ..Config::default() };
    Router::new(Arc::new(config), Store::from_redis(store.clone(), Default::default()), Backend::Builtin)
}

/// Logs user `id` in on `router` (claims it in Redis, binds it locally); returns its conn id.
async fn login(router: &Router, id: u64) -> u64 {
    let (tx, _rx) = Outbox::new(4, 1 << 16);
    let conn_id = router.next_conn_id();
    let user = User { id, name: format!("u{id}") };
    let conn = LocalConn {
        conn_id,
        user,
        tx,
        closer: Closer::child_of(&CancellationToken::new()),
        seam: crate::router::Seam::live(),
        resume: String::new(),
        presence: false,
    };
    router.login(conn, None, "").await.expect("login");
    conn_id
}

/// What Redis says `node` holds: the online entries naming it.
async fn online_on(store: &RedisStore, node: &str) -> BTreeSet<u64> {
    store.online().await.unwrap().into_iter().filter(|e| e.node_id == node).map(|e| e.user.id).collect()
}

fn local_ids(router: &Router) -> BTreeSet<u64> {
    router.local_entries().into_iter().map(|e| e.user.id).collect()
}

/// Forgets every presence key of this test, as a Redis restarted without persistence would.
async fn wipe_presence(store: &RedisStore) {
    let keys = store.keys().clone();
    let mut conn = store.connection();
    let all: Vec<String> = conn.scan(&format!("{{{}presence}}*", keys.prefix())).await.unwrap();
    if !all.is_empty() {
        conn.del::<_, ()>(all).await.unwrap();
    }
}

/// Polls `cond` until it holds or `within` has passed.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_node_whose_entry_expired_does_not_reap_itself() {
    let t = TestRedis::new();
    let store = Arc::new(t.store().await);
    let cluster = Cluster::new(store.clone(), Strategy::RoundRobin, Duration::from_millis(300));
    cluster.registry.register(&node("a"), cluster.ttl).await.unwrap();
    let a = router(&store, "a");
    for id in 1..=3 {
        login(&a, id).await;
    }
    // Node a stalls past its TTL: its own key expires.
    eventually(Duration::from_secs(5), "a's 300 ms registry key to expire", || async {
        cluster.registry.nodes().await.unwrap().is_empty()
    })
    .await;
    assert!(cluster.registry.dead_nodes("a").await.unwrap().is_empty(), "a never counts itself dead");
    assert_eq!(cluster.registry.reap_dead_nodes("a").await.unwrap(), 0);
    assert_eq!(online_on(&store, "a").await, BTreeSet::from([1, 2, 3]), "a reaped its own users");

    // A peer does reap it; a, on its next refresh, finds its entry gone and puts them back.
    assert_eq!(cluster.registry.reap_dead_nodes("b").await.unwrap(), 3);
    assert!(online_on(&store, "a").await.is_empty());
    assert!(!cluster.registry.register(&node("a"), cluster.ttl).await.unwrap(), "the entry was gone");
    let done = reconcile(&store, &a).await.unwrap();
    assert_eq!((done.restored, done.held, done.kicked, done.released), (3, 0, 0, 0));
    assert_eq!(online_on(&store, "a").await, BTreeSet::from([1, 2, 3]));
    assert!(cluster.registry.register(&node("a"), cluster.ttl).await.unwrap(), "the entry is there");
    t.cleanup().await;
}

/// The member loop itself: Redis loses everything (presence and the registry entry); the
/// heartbeat notices and housekeeping puts the users back, while nothing else changes.
#[tokio::test]
async fn a_member_puts_its_users_back_after_redis_lost_them() {
    let t = TestRedis::new();
    let store = Arc::new(t.store().await);
    let ttl = Duration::from_millis(600);
    let cluster = Cluster::new(store.clone(), Strategy::RoundRobin, ttl);
    let a = router(&store, "a");
    let mut number = super::node_number::NodeNumber::new(&store, "a", ttl);
    number.acquire(a.ids()).await.unwrap();
    let inbox = cluster.join(&node("a")).await.unwrap();
    let stop = CancellationToken::new();
    let member =
        tokio::spawn(super::member::run(cluster.clone(), a.clone(), node("a"), number, inbox, stop.clone()));
    for id in 1..=50 {
        login(&a, id).await;
    }
    let all: BTreeSet<u64> = (1..=50).collect();
    assert_eq!(online_on(&store, "a").await, all);

    wipe_presence(&store).await;
    let wiped = Instant::now();
    eventually(Duration::from_secs(3), "a's users to be back", || async {
        online_on(&store, "a").await == all
    })
    .await;
    eprintln!("users back {:?} after the wipe (ttl {ttl:?})", wiped.elapsed());
    assert!(wiped.elapsed() < ttl, "back after {:?}", wiped.elapsed());
    // And they stay: nobody reaps a live node.
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(online_on(&store, "a").await, all);

    stop.cancel();
    member.await.unwrap();
    assert!(cluster.registry.nodes().await.unwrap().is_empty(), "a left the registry on shutdown");
    t.cleanup().await;
}

#[tokio::test]
async fn a_reconcile_costs_round_trips_per_batch_not_per_user() {
    const USERS: u64 = 15_000;
    let t = TestRedis::new();
    let store = Arc::new(t.store().await);
    let a = router(&store, "a");
    let logins: Vec<_> = (1..=USERS)
        .map(|id| {
            let a = a.clone();
            tokio::spawn(async move { login(&a, id).await })
        })
        .collect();
    for l in logins {
        l.await.unwrap();
    }
    wipe_presence(&store).await;

    let before = store.connection().requests();
    let started = Instant::now();
    let done = reconcile(&store, &a).await.unwrap();
    let took = started.elapsed();
    let trips = store.connection().requests() - before;
    eprintln!("reconcile of {USERS} users: {trips} round trips, {took:?}");
    assert_eq!(done.restored, USERS as usize);
    let batches = USERS.div_ceil(RESTORE_BATCH as u64);
    // One script call per batch, plus loading the script once (EVALSHA refused, then EVAL).
    assert!(trips <= batches + 2, "{trips} round trips for {batches} batches");
    assert_eq!(online_on(&store, "a").await.len(), USERS as usize);

    // A second rebuild finds everything in place, at the same cost.
    let before = store.connection().requests();
    let again = reconcile(&store, &a).await.unwrap();
    assert_eq!((again.restored, again.held), (0, USERS as usize));
    assert_eq!(store.connection().requests() - before, batches);
    t.cleanup().await;
}

/// Users log out and in while the rebuild runs: afterwards Redis names exactly the local
/// sessions, and once everyone has left, nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_during_a_rebuild_leaves_no_ghost() {
    const USERS: u64 = 4_000;
    let t = TestRedis::new();
    let store = Arc::new(t.store().await);
    let a = router(&store, "a");
    let mut conns = Vec::new();
    for id in 1..=USERS {
        conns.push((id, login(&a, id).await));
    }
    wipe_presence(&store).await;

    // Half the users leave and some new ones arrive while the rebuild is on the wire.
    let churn: Vec<_> = (0..4u64)
        .map(|lane| {
            let a = a.clone();
            let leaving: Vec<(u64, u64)> =
                conns.iter().copied().filter(|(id, _)| id % 2 == 0 && (id / 2) % 4 == lane).collect();
            tokio::spawn(async move {
                for (i, (id, conn)) in leaving.into_iter().enumerate() {
                    a.logout(id, conn).await;
                    if i % 10 == 0 {
                        login(&a, USERS + id).await;
                    }
                }
            })
        })
        .collect();
    // Start the rebuild once the churn is under way, so it claims users already gone.
    eventually(Duration::from_secs(10), "the churn to start", || async {
        a.local_connections() < USERS as usize - 300
    })
    .await;
    let done = reconcile(&store, &a).await.unwrap();
    assert!(churn.iter().any(|c| !c.is_finished()), "the churn ended before the rebuild did");
    for c in churn {
        c.await.unwrap();
    }
    eprintln!("rebuild under churn: {done:?}");
    let (redis, local) = (online_on(&store, "a").await, local_ids(&a));
    let ghosts: Vec<_> = redis.difference(&local).collect();
    let missing: Vec<_> = local.difference(&redis).collect();
    assert!(ghosts.is_empty() && missing.is_empty(), "ghosts {ghosts:?}, missing {missing:?}");
    assert!(done.released > 0, "no session left during the rebuild: {done:?}");

    for OnlineEntry { user, conn_id, .. } in a.local_entries() {
        a.logout(user.id, conn_id).await;
    }
    assert_eq!(online_on(&store, "a").await, BTreeSet::new(), "ghosts left after everyone left");
    let users: usize = store.connection().scard(store.keys().node_users("a")).await.unwrap();
    assert_eq!(users, 0);
    t.cleanup().await;
}

/// A member of a cluster with a `ttl` registry entry, running until `stop` is cancelled.
async fn start_member(
    store: &Arc<RedisStore>,
    a: &Arc<Router>,
    ttl: Duration,
    stop: &CancellationToken,
) -> (Cluster, tokio::task::JoinHandle<()>) {
    let cluster = Cluster::new(store.clone(), Strategy::RoundRobin, ttl);
    let mut number = super::node_number::NodeNumber::new(store, "a", ttl);
    number.acquire(a.ids()).await.unwrap();
    let inbox = cluster.join(&node("a")).await.unwrap();
    let run = super::member::run(cluster.clone(), a.clone(), node("a"), number, inbox, stop.clone());
    (cluster, tokio::spawn(run))
}

/// Redis loses some of a node's entries while its registry entry survives (someone deletes
/// `online` entries; a failover loses the last claims, entry and set member both): the
/// presence check notices and they are back within a few heartbeats, each time with one
/// rebuild, while the node's registry entry never went away.
#[tokio::test]
async fn entries_lost_behind_a_live_nodes_back_come_back() {
    let t = TestRedis::new();
    let store = Arc::new(t.store().await);
    let ttl = Duration::from_millis(600);
    let a = router(&store, "a");
    let stop = CancellationToken::new();
    let (cluster, member) = start_member(&store, &a, ttl, &stop).await;
    for id in 1..=50 {
        login(&a, id).await;
    }
    let all: BTreeSet<u64> = (1..=50).collect();
    let keys = store.keys().clone();
    let mut conn = store.connection();

    // 1. Ten `online` entries deleted; the node's set still names them.
    let gone: Vec<u64> = (1..=10).collect();
    conn.hdel::<_, _, ()>(keys.online(), &gone).await.unwrap();
    let deleted = Instant::now();
    eventually(ttl * 3, "the deleted entries to be back", || async { online_on(&store, "a").await == all })
        .await;
    eprintln!("10 deleted online entries back {:?} after (ttl {ttl:?})", deleted.elapsed());
    assert_eq!(cluster.rebuilds.load(std::sync::atomic::Ordering::Relaxed), 1);

    // 2. Five claims lost as a failover would lose them: the entries and the set members.
    let gone: Vec<u64> = (20..25).collect();
    redis::pipe()
        .hdel(keys.online(), &gone)
        .srem(keys.node_users("a"), &gone)
        .exec_async(&mut conn)
        .await
        .unwrap();
    let lost = Instant::now();
    eventually(ttl * 3, "the lost claims to be back", || async { online_on(&store, "a").await == all }).await;
    eprintln!("5 lost claims back {:?} after", lost.elapsed());
    assert_eq!(cluster.rebuilds.load(std::sync::atomic::Ordering::Relaxed), 2);
    let members: BTreeSet<u64> = conn.smembers(keys.node_users("a")).await.unwrap();
    assert_eq!(members, all, "the node's set is whole again");
    assert!(cluster.registry.register(&node("a"), ttl).await.unwrap(), "a's registry entry never went away");

    stop.cancel();
    member.await.unwrap();
    t.cleanup().await;
}

/// Logins and logouts go on for many presence checks: no check finds anything missing and
/// the member never rebuilds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_alone_never_triggers_a_rebuild() {
    let t = TestRedis::new();
    let store = Arc::new(t.store().await);
    let ttl = Duration::from_millis(600);
    let a = router(&store, "a");
    let stop = CancellationToken::new();
    let (cluster, member) = start_member(&store, &a, ttl, &stop).await;
    for id in 1..=200 {
        login(&a, id).await;
    }
    let churn_for = ttl * 5;
    let started = Instant::now();
    let churn: Vec<_> = (0..4u64)
        .map(|lane| {
            let a = a.clone();
            tokio::spawn(async move {
                let mut cycles = 0u64;
                while started.elapsed() < churn_for {
                    let id = 1_000 + lane * 100_000 + cycles;
                    let conn = login(&a, id).await;
                    a.logout(id, conn).await;
                    cycles += 1;
                }
                cycles
            })
        })
        .collect();
    // The check itself, asked as often as it can be while the churn runs.
    let mut checks = 0;
    while started.elapsed() < churn_for {
        assert_eq!(
            super::reconcile::missing_entries(&store, &a).await.unwrap(),
            0,
            "a check saw churn as loss"
        );
        checks += 1;
    }
    let mut cycles = 0;
    for c in churn {
        cycles += c.await.unwrap();
    }
    eprintln!("{cycles} login/logout cycles, {checks} direct checks, over {churn_for:?}");
    assert!(cycles > 100, "too little churn: {cycles}");
    assert_eq!(cluster.rebuilds.load(std::sync::atomic::Ordering::Relaxed), 0, "churn triggered a rebuild");
    assert_eq!(online_on(&store, "a").await, (1..=200).collect(), "ghosts or losses after the churn");

    stop.cancel();
    member.await.unwrap();
    t.cleanup().await;
}
