//! Two `cim-host` nodes with Redis a network hop away (a delaying TCP proxy between the nodes
//! and a Redis of the test's own): presence comes back within seconds of a Redis restart, no
//! live node is reaped (by a peer or by itself), route-login churn refuses nothing and
//! leaves no ghost online entry (also while Redis restarts), and a paced probe across a
//! Redis restart loses no acknowledged message.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cim_proto::{Body, Frame};
use common::chaos_client::{
    ChaosClient, Directory, Shared, Switches, acked_count, addr_of, more_acked, restart_the_redis,
    stop_sending, until,
};
use common::cluster::{Cluster, OwnRedis, login_body, online_if_up};
use common::proxy::DelayProxy;
use common::{DEADLINE, Host, RawClient, wait_for};
use futures_util::{SinkExt, StreamExt};

/// The nodes' extra arguments: no rate limits (the tests log thousands of users in), and a
/// 10 min heartbeat, so that the 30 min idle timeout never closes a connection that logged in
/// early while a slow ramp (12,000 logins at ~2.5 ms on a loaded machine) is still going.
const NODE_ARGS: &[&str] = &["--no-rate-limits", "--heartbeat", "600"];

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
    let cluster = Cluster::start(&proxy.url(), &["node-a", "node-b"], ttl, NODE_ARGS).await;
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
// Two worker threads: the churn generator must not be what limits the login rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_login_churn_with_redis_a_hop_away_leaves_no_ghost() {
    let workers = env_or("CIM_TEST_CHURN_WORKERS", 16);
    let staying_users = env_or("CIM_TEST_HOP_USERS", 1_000);
    let churn_for = Duration::from_secs(env_or("CIM_TEST_CHURN_SECS", 5));
    let redis = OwnRedis::start().await;
    let upstream = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy =
        DelayProxy::start(upstream, Duration::from_micros(env_or("CIM_TEST_HOP_DELAY_US", 600))).await;
    eprintln!("redis round trip through the proxy: {:?}", proxy.ping_rtt().await);
    let cluster = Cluster::start(&proxy.url(), &["node-a", "node-b"], 6, NODE_ARGS).await;
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

/// Route-login churn runs while Redis is a hop away (~1.4 ms) and is restarted (empty, or
/// reloading its append-only file): route logins are refused only while Redis is down, and
/// afterwards `GET /online` names exactly the users who stayed (presence whole, no ghost of a
/// churn session that closed while Redis was away or while presence was being rebuilt), and
/// nobody once everyone has left. `CIM_TEST_HOP_USERS` (staying), `CIM_TEST_HOP_DELAY_US`
/// and `CIM_TEST_CHURN_WORKERS` change the scale by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_login_churn_across_an_empty_redis_restart_leaves_presence_whole() {
    churn_across_a_restart(OwnRedis::start().await).await;
}

/// The same with a Redis that reloads its append-only file (entries of sessions that closed
/// while it was down must be released once it is back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_login_churn_across_an_aof_redis_restart_leaves_presence_whole() {
    churn_across_a_restart(OwnRedis::start_aof().await).await;
}

async fn churn_across_a_restart(mut redis: OwnRedis) {
    let workers = env_or("CIM_TEST_CHURN_WORKERS", 16);
    let staying_users = env_or("CIM_TEST_HOP_USERS", 600);
    let upstream = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy =
        DelayProxy::start(upstream, Duration::from_micros(env_or("CIM_TEST_HOP_DELAY_US", 600))).await;
    eprintln!("redis round trip through the proxy: {:?}", proxy.ping_rtt().await);
    let cluster = Cluster::start(&proxy.url(), &["node-a", "node-b"], 6, NODE_ARGS).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut staying = Vec::new();
    let mut placement = BTreeMap::new();
    for id in 1..=staying_users {
        let host = if id % 2 == 0 { a } else { b };
        staying.push(RawClient::login_tcp(host, id, &format!("u{id}")).await);
        placement.insert(id, host.node_id.clone());
    }
    assert_eq!(settle(a, &placement, DEADLINE).await, (0, 0), "(missing, extra) after the logins");

    let stop = Arc::new(AtomicBool::new(false));
    let logins = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let route = if w % 2 == 0 { a.http } else { b.http };
            let (stop, logins, refused) = (stop.clone(), logins.clone(), refused.clone());
            tokio::spawn(async move {
                let mut id = 1_000_000 + w * 1_000_000;
                while !stop.load(Ordering::SeqCst) {
                    id += 1;
                    if churn_login(route, id).await {
                        logins.fetch_add(1, Ordering::SeqCst);
                    } else {
                        refused.fetch_add(1, Ordering::SeqCst);
                        // Redis is down: do not spin on refusals (pacing, not synchronisation).
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            })
        })
        .collect();
    let count = |c: &AtomicU64| c.load(Ordering::SeqCst);
    wait_for("churn under way", || async { (count(&logins) >= 200).then_some(()) }).await;

    redis.stop().await;
    let stopped = Instant::now();
    wait_for("route logins to be refused while Redis is down", || async {
        (count(&refused) >= 10).then_some(())
    })
    .await;
    // Keep it down a while: churn sessions open at the stop close while it is down (chaos,
    // not synchronisation).
    tokio::time::sleep_until((stopped + Duration::from_millis(1500)).into()).await;
    let logins_before = count(&logins);
    redis.start_again().await;
    let restarted = Instant::now();
    let down_for = restarted - stopped;
    wait_for("route logins to succeed again after the restart", || async {
        (count(&logins) >= logins_before + 200).then_some(())
    })
    .await;
    let churning_again = restarted.elapsed();
    // Keep churning through the presence rebuild and a few refreshes after it.
    let refused_after_restart = count(&refused);
    let more = count(&logins) + 600;
    wait_for("600 more churn logins", || async { (count(&logins) >= more).then_some(()) }).await;
    stop.store(true, Ordering::SeqCst);
    for t in tasks {
        t.await.unwrap();
    }
    let late_refusals = count(&refused) - refused_after_restart;
    eprintln!(
        "churn across the restart: {} logins, {} refused ({} until churn logins went through \
         again {churning_again:?} after Redis was back, down {down_for:?}; {late_refusals} after)",
        count(&logins),
        count(&refused),
        refused_after_restart,
    );
    assert_eq!(late_refusals, 0, "route logins refused after the restart had settled");

    for host in [a, b] {
        let (missing, extra) = settle(host, &placement, Duration::from_secs(30)).await;
        eprintln!("after the churn on {}: {missing} missing, {extra} extra (ghosts)", host.node_id);
        assert_eq!((missing, extra), (0, 0), "(missing, extra) on {}", host.node_id);
    }
    drop(staying);
    let (_, ghosts) = settle(a, &BTreeMap::new(), DEADLINE).await;
    eprintln!("ghost online entries after every client disconnected: {ghosts}");
    assert_eq!(ghosts, 0);
}

/// One churn cycle: `POST /login` on `route`, connect, LOGIN, stay (every fourth id 0–280 ms), disconnect.
/// `false` if any step was refused or did not answer within the deadline.
async fn churn_login(route: std::net::SocketAddr, id: u64) -> bool {
    let cycle = async {
        let body = login_body(id, "churn");
        let (status, answer) = common::http(route, "POST", "/login", Some(&body)).await.ok()?;
        if status != 200 {
            return None;
        }
        let stream = tokio::net::TcpStream::connect(answer["tcp_addr"].as_str()?).await.ok()?;
        let mut conn = tokio_util::codec::Framed::new(stream, cim_proto::FrameCodec::default());
        conn.send(Frame::new(1, Body::login(id, "churn".into(), String::new()))).await.ok()?;
        loop {
            match conn.next().await?.ok()? {
                Ok(Frame { request_id: 1, body: Body::LoginAck(_) }) => break,
                Ok(Frame { request_id: 1, .. }) | Err(_) => return None,
                Ok(_) => {}
            }
        }
        // Sessions of different lengths, so that some are open across the stop and the rebuild
        // (workload, not synchronisation).
        if id.is_multiple_of(4) {
            tokio::time::sleep(Duration::from_millis(id / 4 % 8 * 40)).await;
        }
        Some(())
    };
    matches!(tokio::time::timeout(DEADLINE, cycle).await, Ok(Some(())))
}

/// A paced p2p probe across a Redis restart, Redis a hop away (~1.4 ms) with its append-only
/// file fsynced on every write: four pairs of raw-protocol clients, each pair across the two
/// nodes, send ~400 messages/s in all, each with a client message id, sent again with the
/// same id after an `UNAVAILABLE` or no answer; receivers ack positions and resume after a
/// dropped connection. Redis is killed and started again while they send. Every
/// acknowledged message reaches its receiver (after de-duplication by message id), in each
/// sender's order; sent, acknowledged, delivered, duplicated and lost are counted and the
/// latency from first send to first delivery printed. `CIM_TEST_PROBE_PAIRS`,
/// `CIM_TEST_PROBE_RATE` (messages/s in all), `CIM_TEST_PROBE_USERS` (idle connections
/// beside the probe, default none) and `CIM_TEST_HOP_DELAY_US` change it by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paced_probe_across_a_redis_restart_loses_nothing() {
    let pairs = env_or("CIM_TEST_PROBE_PAIRS", 4);
    let rate = env_or("CIM_TEST_PROBE_RATE", 400).max(1);
    let mut redis = OwnRedis::start_aof().await;
    let upstream = format!("127.0.0.1:{}", redis.port).parse().unwrap();
    let proxy =
        DelayProxy::start(upstream, Duration::from_micros(env_or("CIM_TEST_HOP_DELAY_US", 600))).await;
    eprintln!("redis round trip through the proxy: {:?}", proxy.ping_rtt().await);
    let cluster = Cluster::start(&proxy.url(), &["node-a", "node-b"], 6, NODE_ARGS).await;
    let mut idle = Vec::new();
    for id in 1_000..1_000 + env_or("CIM_TEST_PROBE_USERS", 0) {
        let host = cluster.node(if id % 2 == 0 { "node-a" } else { "node-b" });
        idle.push(RawClient::login_tcp(host, id, &format!("u{id}")).await);
    }
    let directory: Directory = Arc::new(Mutex::new(cluster.nodes.iter().map(addr_of).collect()));
    let switches = Arc::new(Switches::default());
    let clients = pairs * 2;
    let send_every = Duration::from_secs_f64(clients as f64 / rate as f64);
    let mut records: Vec<Shared> = Vec::new();
    let mut tasks = Vec::new();
    for id in 1..=clients {
        // Odd ids on node a, each sending to the next even id on node b, and back.
        let partner = if id % 2 == 1 { id + 1 } else { id - 1 };
        let home = if id % 2 == 1 { "node-a" } else { "node-b" };
        let record = Shared::default();
        records.push(record.clone());
        let mut client = ChaosClient::new(id, vec![partner], directory.clone(), switches.clone(), record);
        client.send_every = send_every;
        client.group_lines = false;
        tasks.push(tokio::spawn(client.run(addr_of(cluster.node(home)))));
    }
    until("every probe client to log in", DEADLINE, || {
        records.iter().all(|r| !r.lock().unwrap().logins.is_empty())
    })
    .await
    .unwrap();
    switches.go.store(true, Ordering::SeqCst);
    let traffic_from = Instant::now();
    until("probe traffic from every client", DEADLINE, || records.iter().all(|r| acked_count(r) >= 50))
        .await
        .unwrap();
    restart_the_redis(&mut redis, &records).await;
    more_acked(&records, 100, "probe traffic after the restart", Duration::from_secs(20)).await;
    stop_sending(&switches, &records).await;
    let traffic_for = traffic_from.elapsed();

    // Every acknowledged message: message id → (sender, seq, receiver, first sent).
    let mut accepted: BTreeMap<u64, (u64, u64, u64, Instant)> = BTreeMap::new();
    let (mut sent, mut requests, mut unavailable) = (0usize, 0u64, 0u64);
    for (i, r) in records.iter().enumerate() {
        let sender = i as u64 + 1;
        let r = r.lock().unwrap();
        assert!(r.id_mismatches.is_empty(), "user {sender}: a resend got another id: {:?}", r.id_mismatches);
        unavailable += r.unavailable;
        for s in &r.sends {
            sent += 1;
            requests += u64::from(s.attempts);
            let mid = s.message_id.unwrap_or_else(|| panic!("{:?} was never acknowledged", s.text));
            let value = (sender, s.seq, s.to.expect("private"), s.first_sent.expect("sent"));
            assert!(accepted.insert(mid, value).is_none(), "message id {mid} acknowledged twice");
        }
    }
    let expected = |receiver: u64| -> BTreeSet<u64> {
        accepted.iter().filter(|(_, a)| a.2 == receiver).map(|(mid, _)| *mid).collect()
    };
    let received =
        |i: usize| -> BTreeSet<u64> { records[i].lock().unwrap().got.iter().map(|g| g.message_id).collect() };
    let all_in = until("every receiver to get everything meant for it", Duration::from_secs(15), || {
        (0..records.len()).all(|i| expected(i as u64 + 1).is_subset(&received(i)))
    })
    .await;

    let (mut delivered, mut distinct, mut lost) = (0usize, 0usize, 0usize);
    let mut latencies = Vec::new();
    for (i, r) in records.iter().enumerate() {
        let receiver = i as u64 + 1;
        let r = r.lock().unwrap();
        delivered += r.got.len();
        let mut seen = BTreeSet::new();
        let mut last_seq: BTreeMap<u64, u64> = BTreeMap::new();
        for g in &r.got {
            if !seen.insert(g.message_id) {
                continue;
            }
            let &(sender, seq, to, first_sent) = accepted.get(&g.message_id).unwrap_or_else(|| {
                panic!("user {receiver} got message {} ({:?}) nobody had acknowledged", g.message_id, g.text)
            });
            assert_eq!(to, receiver, "user {receiver} got {:?}, meant for {to}", g.text);
            if let Some(prev) = last_seq.insert(sender, seq) {
                assert!(prev < seq, "user {receiver}: n{seq} from {sender} after n{prev}");
            }
            latencies.push(g.at.saturating_duration_since(first_sent));
        }
        distinct += seen.len();
        lost += expected(receiver).difference(&seen).count();
    }
    latencies.sort();
    let pct = |p: usize| latencies.get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)));
    let (p50, p99, max) = (pct(50).copied(), pct(99).copied(), latencies.last().copied());
    let achieved = sent as f64 / traffic_for.as_secs_f64();
    eprintln!(
        "probe: {pairs} pairs beside {} idle connections, {rate} msg/s asked, {achieved:.0} msg/s \
         over {traffic_for:.1?}, sent {sent} (requests {requests}, UNAVAILABLE answers {unavailable}), \
         acked {}, delivered {delivered}, duplicated {}, lost {lost}; latency p50 \
         {p50:?} p99 {p99:?} max {max:?}",
        idle.len(),
        accepted.len(),
        delivered - distinct,
    );
    eprintln!(
        "probe row: lost {lost} / {sent}, p99 {:.0} ms",
        p99.unwrap_or_default().as_secs_f64() * 1000.0
    );
    assert_eq!(lost, 0, "acknowledged messages lost");
    all_in.unwrap();
    for t in tasks {
        t.abort();
    }
}
