//! Two `cim-host` nodes with Redis a network hop away (a delaying TCP proxy between the nodes
//! and a Redis of the test's own): presence comes back within seconds of a Redis restart, no
//! live node is reaped (by a peer or by itself), and route-login churn refuses nothing and
//! leaves no ghost online entry.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cim_proto::Body;
use common::cluster::{Cluster, OwnRedis, login_body, online_if_up};
use common::proxy::DelayProxy;
use common::{DEADLINE, Host, RawClient, wait_for};

/// Waits up to `within` for `GET /online` on `host` to be `expected`; returns how many of
/// `expected` were missing and how many entries were extra (ghosts) at the end. Counts, not
/// the maps: a failure at 12,000 users stays readable.
async fn settle(host: &Host, expected: &BTreeMap<u64, String>, within: Duration) -> (usize, usize) {
    let deadline = Instant::now() + within;
    loop {
        let online = online_if_up(host).await.unwrap_or_default();
        let missing = expected.iter().filter(|(id, n)| online.get(id) != Some(n)).count();
        let extra = online.iter().filter(|(id, n)| expected.get(id) != Some(n)).count();
        if (missing, extra) == (0, 0) || Instant::now() >= deadline {
            return (missing, extra);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A number from the environment (to run a test at another scale by hand), or `default`.
fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Redis a network hop away (a proxy adds 0.6 ms each way, ~1.4 ms round trip; the measured
/// one is printed), two nodes holding 600 users: after Redis restarts empty, the full online
/// set is back within 5 s, and no live node is reaped afterwards (by a peer or by itself).
/// `CIM_TEST_HOP_USERS` and `CIM_TEST_HOP_DELAY_US` (one way) change the scale by hand.
#[tokio::test]
async fn presence_is_back_within_5s_of_a_redis_restart_with_redis_a_hop_away() {
    let env =
        |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let users = env("CIM_TEST_HOP_USERS", 600);
    let delay = Duration::from_micros(env("CIM_TEST_HOP_DELAY_US", 600));
    let mut redis = OwnRedis::start().await;
    let upstream = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy = DelayProxy::start(upstream, delay).await;
    eprintln!("redis round trip through the proxy: {:?}", proxy.ping_rtt().await);
    let ttl = 6;
    let cluster = Cluster::start(&proxy.url(), &["node-a", "node-b"], ttl, &["--no-rate-limits"]).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut clients = Vec::new();
    let mut placement = BTreeMap::new();
    for id in 1..=users {
        let host = if id % 2 == 0 { a } else { b };
        clients.push(RawClient::login_tcp(host, id, &format!("u{id}")).await);
        placement.insert(id, host.node_id.clone());
    }
    assert_eq!(settle(a, &placement, DEADLINE).await, (0, 0), "(missing, extra) after the logins");

    redis.stop().await;
    // Long enough for every node to notice (a refresh fails) and for routes to answer 503.
    wait_for("GET /online to answer 503 on both nodes", || async {
        (online_if_up(a).await.is_none() && online_if_up(b).await.is_none()).then_some(())
    })
    .await;
    redis.start_again().await;
    let restarted_at = Instant::now();
    let (missing, extra) = settle(a, &placement, Duration::from_secs(30)).await;
    let back = restarted_at.elapsed();
    assert_eq!((missing, extra), (0, 0), "(missing, extra) {back:?} after the restart");
    eprintln!("{users} users back on GET /online {back:?} after Redis restarted empty");
    assert!(back < Duration::from_secs(5), "presence took {back:?} to come back");

    // No live node is reaped: the set stays whole for longer than a TTL plus the reap grace.
    let watch_until = Instant::now() + Duration::from_secs(ttl + ttl / 2 + 1);
    while Instant::now() < watch_until {
        for host in [a, b] {
            let changed = settle(host, &placement, Duration::ZERO).await;
            assert_eq!(changed, (0, 0), "(missing, extra) on {} after presence was back", host.node_id);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("no live node reaped: GET /online stayed whole for {}s after", ttl + ttl / 2 + 1);
    for c in clients.iter_mut().take(4) {
        assert!(matches!(c.request(7, Body::Ping).await, Body::Pong));
    }
}

/// Route-login churn with Redis a hop away (~1.4 ms): while 1,000 users stay connected,
/// 16 workers log fresh users in through `POST /login` and disconnect them again for 5 s.
/// No route login is refused, nobody who stayed drops out (no node is reaped, no rebuild
/// kicks anyone), and once everyone has left `GET /online` is empty: no ghost entries.
/// `CIM_TEST_HOP_USERS` (staying), `CIM_TEST_HOP_DELAY_US` (one way), `CIM_TEST_CHURN_SECS`
/// and `CIM_TEST_CHURN_WORKERS` change the scale by hand.
#[tokio::test]
async fn route_login_churn_with_redis_a_hop_away_leaves_no_ghost() {
    let workers = env_or("CIM_TEST_CHURN_WORKERS", 16);
    let staying_users = env_or("CIM_TEST_HOP_USERS", 1_000);
    let churn_for = Duration::from_secs(env_or("CIM_TEST_CHURN_SECS", 5));
    let redis = OwnRedis::start().await;
    let upstream = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy =
        DelayProxy::start(upstream, Duration::from_micros(env_or("CIM_TEST_HOP_DELAY_US", 600))).await;
    eprintln!("redis round trip through the proxy: {:?}", proxy.ping_rtt().await);
    let cluster = Cluster::start(&proxy.url(), &["node-a", "node-b"], 6, &["--no-rate-limits"]).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut staying = Vec::new();
    let mut placement = BTreeMap::new();
    for id in 1..=staying_users {
        let host = if id % 2 == 0 { a } else { b };
        staying.push(RawClient::login_tcp(host, id, &format!("u{id}")).await);
        placement.insert(id, host.node_id.clone());
    }
    assert_eq!(settle(a, &placement, DEADLINE).await, (0, 0), "(missing, extra) after the logins");

    let started = Instant::now();
    let workers: Vec<_> = (0..workers)
        .map(|w| {
            let route = if w % 2 == 0 { a.http } else { b.http };
            tokio::spawn(async move {
                let (mut logins, mut refused) = (0u64, Vec::new());
                let mut id = 1_000_000 + w * 1_000_000;
                while started.elapsed() < churn_for {
                    id += 1;
                    let body = login_body(id, "churn");
                    let (status, answer) = common::http(route, "POST", "/login", Some(&body)).await.unwrap();
                    if status != 200 {
                        refused.push(format!("{status} {answer}"));
                        continue;
                    }
                    let addr = answer["tcp_addr"].as_str().expect("tcp_addr").to_owned();
                    let stream = tokio::net::TcpStream::connect(&addr).await.expect("connect");
                    let mut c = RawClient::Tcp(tokio_util::codec::Framed::new(stream, Default::default()));
                    c.login(id, "churn").await;
                    logins += 1;
                }
                (logins, refused)
            })
        })
        .collect();
    let (mut logins, mut refused) = (0, Vec::new());
    for w in workers {
        let (n, r) = w.await.unwrap();
        logins += n;
        refused.extend(r);
    }
    let rate = logins as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "churn: {logins} route logins + connects + disconnects, {rate:.0}/s; refused: {}",
        refused.len()
    );
    assert!(refused.is_empty(), "route logins refused: {:?}", &refused[..refused.len().min(5)]);

    // Those who stayed are all still there: the churn did not make any node drop them.
    for host in [a, b] {
        let (missing, extra) = settle(host, &placement, DEADLINE).await;
        eprintln!("after the churn on {}: {missing} missing, {extra} extra", host.node_id);
        assert_eq!((missing, extra), (0, 0), "(missing, extra) on {}", host.node_id);
    }
    drop(staying);
    let (_, ghosts) = settle(a, &BTreeMap::new(), DEADLINE).await;
    eprintln!("ghost online entries after every client disconnected: {ghosts}");
    assert_eq!(ghosts, 0);
}
