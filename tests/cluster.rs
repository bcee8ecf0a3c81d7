//! Several `cim-host` nodes on Redis behaving as one IM: route logins spread users over
//! nodes, messages and the online list cross nodes, duplicate logins are refused
//! cluster-wide; a SIGKILLed node's clients move to survivors; a Redis restart is survived
//! without restarting anything; a component pushed to one node runs on all of them.
//!
//! Each test uses its own key prefix, so they run in parallel against one Redis
//! (`CIM_TEST_REDIS`, default 127.0.0.1:6379); the Redis restart test runs its own server,
//! and the Redis Cluster test its own three-primary cluster.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use cim_client::ClientEvent;
use cim_proto::{Body, ErrorCode, Frame};
use common::cluster::{
    Cluster, OwnRedis, SdkUser, active_sha, cim_host_cli, http, login_body, online_nodes, redis_url,
    wait_online_nodes,
};
use common::redis_cluster::RedisCluster;
use common::terminal::Cim;
use common::{ADMIN_TOKEN, DEADLINE, Host, RawClient, component, expect_error, wait_for};

const NAMES: [&str; 6] = ["alice", "bob", "carol", "dave", "erin", "frank"];

/// Three nodes; six `cim` terminal clients log in through node A's route API and land on
/// several nodes; group and private messages cross nodes; every node and every client sees
/// all six online; a second login of an online user is refused on any node.
#[tokio::test]
async fn three_nodes_act_as_one_im() {
    let started = Instant::now();
    let cluster = Cluster::start(&redis_url(), &["node-a", "node-b", "node-c"], 2, &[]).await;
    let a = cluster.node("node-a");

    let mut cims = Vec::new();
    let mut landed = BTreeMap::new();
    for (i, name) in NAMES.iter().enumerate() {
        let id = i as u64 + 1;
        let (cim, node) = Cim::start(&a.route(), id, name, &[]).await;
        landed.insert(id, node);
        cims.push(cim);
    }
    let used: BTreeSet<&String> = landed.values().collect();
    eprintln!("placement by consistent hash: {landed:?}");
    assert!(used.len() >= 2, "all six users landed on one node: {landed:?}");

    // Every node's route API lists all six, each on the node it landed on.
    for host in &cluster.nodes {
        assert_eq!(online_nodes(host).await, landed, "GET /online on {}", host.node_id);
    }
    // :olu (the protocol's online request) on every client shows all six.
    let expected: Vec<String> = NAMES.iter().enumerate().map(|(i, n)| format!("{} {n}", i + 1)).collect();
    for cim in &mut cims {
        assert_eq!(cim.online(6).await, expected);
    }

    // A group line reaches the five others, wherever they are.
    cims[0].type_line("hello cluster").await;
    for cim in &mut cims[1..] {
        assert_eq!(cim.line().await, "[group] alice(1): hello cluster");
    }
    // Private messages around the ring (some of them cross nodes, since two nodes are used).
    for i in 0..6 {
        let (from, to) = (i, (i + 1) % 6);
        cims[from].type_line(&format!("{};;psst from {}", to + 1, NAMES[from])).await;
        let line = cims[to].line().await;
        assert_eq!(line, format!("[private] {}({}): psst from {}", NAMES[from], from + 1, NAMES[from]));
    }

    // Duplicate login, on a node other than the user's: the route API says 409...
    let home = &landed[&1];
    let other = cluster.nodes.iter().find(|h| &h.node_id != home).unwrap();
    let (status, body) = http(other, "POST", "/login", Some(&login_body(1, "alice-again"))).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("duplicate_login")), "{body}");
    // ...and a LOGIN frame sent straight to that node gets DUPLICATE_LOGIN.
    let mut raw = RawClient::tcp(other).await;
    raw.send(Frame::new(1, Body::login(1, "alice-again".into(), String::new()))).await;
    match raw.frame().await.body {
        Body::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::DuplicateLogin, "{message}");
        }
        other => panic!("expected a DUPLICATE_LOGIN error, got {other:?}"),
    }
    // The terminal client says so and exits non-zero.
    let mut dup = Cim::spawn(&other.route(), 1, "alice-again", &[]);
    let line = dup.line().await;
    assert!(line.starts_with("error:") && line.contains("already online"), "{line}");
    assert_ne!(dup.exit_code().await, 0);
    for host in &cluster.nodes {
        assert_eq!(online_nodes(host).await, landed, "the refused logins changed nothing");
    }

    // Quitting takes everyone offline everywhere.
    for cim in &mut cims {
        cim.type_line(":q").await;
        assert_eq!(cim.exit_code().await, 0);
    }
    for host in &cluster.nodes {
        wait_online_nodes(host, &BTreeMap::new()).await;
    }
    eprintln!("three_nodes_act_as_one_im: {:?}", started.elapsed());
}

/// SIGKILL one node: its SDK clients reconnect through the route to survivors by
/// themselves and chat again; the survivors drop the dead node's routes within about two
/// TTLs; the survivors keep running.
#[tokio::test]
async fn a_killed_node_s_clients_move_to_survivors() {
    let started = Instant::now();
    let mut cluster = Cluster::start(&redis_url(), &["node-a", "node-b", "node-c"], 2, &[]).await;
    let route = cluster.node("node-a").route();
    let mut users = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        users.push(SdkUser::login(&route, i as u64 + 1, name).await);
    }
    kill_the_busiest_of_b_and_c(&mut cluster, &mut users).await;
    eprintln!("a_killed_node_s_clients_move_to_survivors: {:?}", started.elapsed());
}

/// SIGKILLs whichever of node-b and node-c holds more of `users` (logged in through
/// node-a), then checks that the survivors forget its routes within about two TTLs, that
/// its clients reconnect to survivors by themselves and chat again, and that nothing
/// crashed.
async fn kill_the_busiest_of_b_and_c(cluster: &mut Cluster, users: &mut [SdkUser]) {
    let placement: BTreeMap<u64, String> = users.iter().map(|u| (u.id, u.client.node_id())).collect();
    eprintln!("placement: {placement:?}");
    // The victim: the node other than the route's with the most users.
    let victim = ["node-b", "node-c"]
        .into_iter()
        .max_by_key(|n| placement.values().filter(|v| v == n).count())
        .unwrap()
        .to_owned();
    let moved: Vec<u64> = placement.iter().filter(|(_, n)| **n == victim).map(|(id, _)| *id).collect();
    assert!(!moved.is_empty(), "nobody landed on node-b or node-c: {placement:?}");
    for host in &cluster.nodes {
        wait_online_nodes(host, &placement).await;
    }

    // Before: a message to a user on the victim carries its server-assigned id end to end.
    let (target, sender) =
        (moved[0], placement.iter().find(|(_, n)| **n != victim).map(|(id, _)| *id).unwrap());
    let id = users[sender as usize - 1].client.send_private(target, "before").await.unwrap().message_id;
    let d = users[target as usize - 1].delivery().await;
    assert_eq!((d.message_id, d.sender.id, d.text.as_str()), (id, sender, "before"));

    let killed_at = Instant::now();
    cluster.node_mut(&victim).child.kill().await.unwrap();

    // The survivors drop the dead node's routes (registry TTL, then a survivor reaps).
    let survivors: Vec<&Host> = cluster.nodes.iter().filter(|h| h.node_id != victim).collect();
    for host in &survivors {
        wait_for(&format!("{} to forget the routes of {victim}", host.node_id), || async {
            (!online_nodes(host).await.values().any(|n| *n == victim)).then_some(())
        })
        .await;
    }
    let forgotten = killed_at.elapsed();
    eprintln!("stale routes of {victim} gone from GET /online after {forgotten:?}");
    assert!(forgotten <= 3 * cluster.ttl, "stale routes lasted {forgotten:?} (ttl {:?})", cluster.ttl);

    // Its clients reconnect through the route to a survivor, by themselves.
    for id in &moved {
        let user = &mut users[*id as usize - 1];
        let event = user.event(DEADLINE, |e| matches!(e, ClientEvent::Reconnected { .. })).await;
        let ClientEvent::Reconnected { node_id } = event else { unreachable!() };
        assert_ne!(node_id, victim, "user {id} reconnected to the dead node");
        assert_eq!(user.client.node_id(), node_id);
    }
    eprintln!("all {} clients of {victim} reconnected after {:?}", moved.len(), killed_at.elapsed());
    let now: BTreeMap<u64, String> = users.iter().map(|u| (u.id, u.client.node_id())).collect();
    assert!(now.values().all(|n| *n != victim), "{now:?}");
    for host in &survivors {
        wait_online_nodes(host, &now).await;
    }

    // They chat again: a moved user to everyone in the group, and privately across nodes.
    let mover = moved[0] as usize - 1;
    let gid = users[mover].client.send_group("back again").await.unwrap().message_id;
    for (i, user) in users.iter_mut().enumerate() {
        if i != mover {
            let d = user.delivery().await;
            assert_eq!((d.message_id, d.sender.id, d.text.as_str()), (gid, moved[0], "back again"));
        }
    }
    for id in &moved {
        let to = if *id == 1 { 2 } else { 1 };
        let mid = users[*id as usize - 1]
            .client
            .send_private(to, format!("hi from {id}"))
            .await
            .unwrap()
            .message_id;
        let d = users[to as usize - 1].delivery().await;
        assert_eq!((d.message_id, d.text), (mid, format!("hi from {id}")));
    }
    for user in users.iter_mut() {
        user.assert_no_delivery();
    }

    // Nothing crashed.
    let victim_host = cluster.nodes.iter().position(|h| h.node_id == victim).unwrap();
    cluster.nodes.remove(victim_host);
    cluster.assert_all_running();
    for host in &cluster.nodes {
        let (status, body) = http(host, "GET", "/healthz", None).await;
        assert_eq!(status, 200, "{body}");
    }
}

/// Redis stopped for 5 s and started again, empty: meanwhile requests that need it fail
/// with a clear error and sessions stay up; afterwards the nodes, not restarted, put their
/// users back online and chat resumes across nodes.
#[tokio::test]
async fn nodes_recover_from_a_redis_restart_by_themselves() {
    let started = Instant::now();
    let mut redis = OwnRedis::start().await;
    let mut cluster = Cluster::start(&redis.url(), &["node-a", "node-b"], 2, &[]).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut u1 = RawClient::login_tcp(a, 1, "alice").await;
    let mut u2 = RawClient::login_tcp(a, 2, "bob").await;
    let mut u3 = RawClient::login_tcp(b, 3, "carol").await;
    let mut u4 = RawClient::login_tcp(b, 4, "dave").await;
    let placement: BTreeMap<u64, String> =
        [(1, "node-a"), (2, "node-a"), (3, "node-b"), (4, "node-b")].map(|(u, n)| (u, n.to_owned())).into();
    wait_online_nodes(a, &placement).await;
    assert!(matches!(u1.request(10, Body::private(3, "before".into())).await, Body::Ack { .. }));
    assert_eq!(u3.delivery().await.text, "before");

    redis.stop().await;
    let stopped_at = Instant::now();

    // Requests that need Redis get a clear error...
    for host in [a, b] {
        wait_for(&format!("route login on {} to answer 503", host.node_id), || async {
            let (status, body) = http(host, "POST", "/login", Some(&login_body(9, "zed"))).await;
            (status == 503).then_some(body)
        })
        .await;
        let (status, body) = http(host, "POST", "/login", Some(&login_body(9, "zed"))).await;
        assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
        assert!(body["message"].as_str().unwrap().contains("redis"), "{body}");
        let (status, body) = http(host, "GET", "/online", None).await;
        assert_eq!((status, body["error"].as_str()), (503, Some("unavailable")), "{body}");
    }
    let answer = u1.request(11, Body::group("anyone?".into())).await;
    let message = expect_error(answer, ErrorCode::Unavailable);
    assert!(message.contains("redis"), "{message}");
    // ...and the sessions stay up.
    for c in [&mut u1, &mut u2, &mut u3, &mut u4] {
        assert!(matches!(c.request(20, Body::Ping).await, Body::Pong));
    }
    tokio::time::sleep_until((stopped_at + Duration::from_secs(5)).into()).await;
    for c in [&mut u1, &mut u2, &mut u3, &mut u4] {
        assert!(matches!(c.request(21, Body::Ping).await, Body::Pong));
    }
    cluster.assert_all_running();

    // Redis comes back with nothing in it.
    redis.start_again().await;
    let restarted_at = Instant::now();
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    for host in [a, b] {
        wait_online_nodes(host, &placement).await;
    }
    eprintln!("online entries re-published {:?} after Redis restarted", restarted_at.elapsed());

    // Chat resumes across nodes once each node listens on its inbox again (a message
    // published before that is refused with UNAVAILABLE, so retrying is safe).
    async fn private_until_accepted(from: &mut RawClient, to: u64, text: &str) {
        let deadline = Instant::now() + DEADLINE;
        for req in 100.. {
            match from.request(req, Body::private(to, text.into())).await {
                Body::Ack { .. } => return,
                Body::Error { code: ErrorCode::Unavailable, .. } => {}
                other => panic!("unexpected answer {other:?}"),
            }
            assert!(Instant::now() < deadline, "a private message to {to} was not accepted in time");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    private_until_accepted(&mut u1, 3, "a to b").await;
    assert_eq!(u3.delivery().await.text, "a to b");
    private_until_accepted(&mut u4, 2, "b to a").await;
    assert_eq!(u2.delivery().await.text, "b to a");
    eprintln!("cross-node chat resumed {:?} after Redis restarted", restarted_at.elapsed());
    assert!(matches!(u2.request(200, Body::group("all back".into())).await, Body::Ack { .. }));
    for c in [&mut u1, &mut u3, &mut u4] {
        let d = c.delivery().await;
        assert_eq!((d.sender.id, d.text.as_str()), (2, "all back"));
    }
    // New route logins work again.
    let (status, body) = http(b, "POST", "/login", Some(&login_body(9, "zed"))).await;
    assert_eq!(status, 200, "{body}");
    cluster.assert_all_running();
    eprintln!("nodes_recover_from_a_redis_restart_by_themselves: {:?}", started.elapsed());
}

/// `cim-host push` to node A: nodes B and C run the new version within a second (same
/// sha256 in every node's admin API; a group message from B arrives masked on C); a
/// rollback on C reaches every node the same way.
#[tokio::test]
async fn a_component_pushed_to_one_node_runs_on_all() {
    let started = Instant::now();
    let cluster = Cluster::start(&redis_url(), &["node-a", "node-b", "node-c"], 2, &[]).await;
    let (a, b, c) = (cluster.node("node-a"), cluster.node("node-b"), cluster.node("node-c"));
    let mut on_a = RawClient::login_tcp(a, 1, "alice").await;
    let mut on_b = RawClient::login_tcp(b, 2, "bob").await;
    let mut on_c = RawClient::login_tcp(c, 3, "carol").await;
    let original = active_sha(a, "group").await;
    for host in [b, c] {
        assert_eq!(active_sha(host, "group").await, original);
    }

    let wasm = component("word_filter");
    let out = cim_host_cli(&[
        "push",
        "group-send",
        wasm.to_str().unwrap(),
        "--to",
        &a.route(),
        "--token",
        ADMIN_TOKEN,
    ]);
    let pushed_at = Instant::now();
    assert!(out.starts_with("pushed group-send"), "{out}");
    let pushed = active_sha(a, "group").await;
    assert_ne!(pushed, original);
    assert!(out.contains(&pushed), "{out} should name {pushed}");
    for host in [b, c] {
        wait_for(&format!("{} to run the pushed version", host.node_id), || async {
            (active_sha(host, "group").await == pushed).then_some(())
        })
        .await;
    }
    let took = pushed_at.elapsed();
    eprintln!("nodes B and C run the pushed version {took:?} after the push returned");
    assert!(took < Duration::from_secs(1), "took {took:?}");

    // spin.toml gives the filter blocked_words = "darn,heck".
    assert!(matches!(on_b.request(10, Body::group("darn it, Heck!".into())).await, Body::Ack { .. }));
    assert_eq!(on_c.delivery().await.text, "**** it, ****!");
    assert_eq!(on_a.delivery().await.text, "**** it, ****!");

    // Rolled back on C: every node follows.
    let out = cim_host_cli(&["rollback", "group-send", "--to", &c.route(), "--token", ADMIN_TOKEN]);
    let rolled_at = Instant::now();
    assert!(out.starts_with("rolled back to"), "{out}");
    for host in [a, b, c] {
        wait_for(&format!("{} to run the original version", host.node_id), || async {
            (active_sha(host, "group").await == original).then_some(())
        })
        .await;
    }
    let took = rolled_at.elapsed();
    eprintln!("every node runs the original version {took:?} after the rollback returned");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    assert!(matches!(on_b.request(11, Body::group("darn".into())).await, Body::Ack { .. }));
    assert_eq!(on_c.delivery().await.text, "darn");
    assert_eq!(on_a.delivery().await.text, "darn");
    eprintln!("a_component_pushed_to_one_node_runs_on_all: {:?}", started.elapsed());
}

/// Presence crosses nodes: a session on node A that asked for presence hears of logins and
/// logouts on node B; a message from A to B is counted in B's delivery latency histogram.
#[tokio::test]
async fn presence_and_delivery_latency_cross_nodes() {
    let cluster = Cluster::start(&redis_url(), &["node-a", "node-b"], 2, &[]).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut alice = RawClient::login_watching_presence(a, 1, "alice").await;
    assert_eq!(alice.presence().await, (vec![1], vec![]));
    let mut bob = RawClient::login_tcp(b, 2, "bob").await;
    assert_eq!(alice.presence().await, (vec![2], vec![]), "bob's login on node-b");
    assert!(matches!(alice.request(7, Body::private(2, "hi bob".into())).await, Body::Ack { .. }));
    assert_eq!(bob.delivery().await.text, "hi bob");
    drop(bob);
    assert_eq!(alice.presence().await, (vec![], vec![2]), "bob's logout on node-b");
    let (_, metrics) = http(b, "GET", "/metrics", None).await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("cim_delivery_seconds_count{node=\"node-b\"} "))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(count.is_some_and(|c| c >= 1.0), "node-b counted bob's delivery:\n{metrics}");
}

/// Clients given several route URLs survive the loss of the node they logged in through.
#[tokio::test]
async fn clients_with_two_routes_survive_the_loss_of_the_first() {
    let mut cluster = Cluster::start(&redis_url(), &["node-a", "node-b"], 2, &[]).await;
    let routes = format!("{},{}", cluster.node("node-a").route(), cluster.node("node-b").route());
    let mut users = Vec::new();
    for (i, name) in NAMES.iter().take(4).enumerate() {
        users.push(SdkUser::login(&routes, i as u64 + 1, name).await);
    }
    let on_a: Vec<u64> = users.iter().filter(|u| u.client.node_id() == "node-a").map(|u| u.id).collect();
    assert!(!on_a.is_empty(), "nobody landed on node-a");
    // Kill the node every client logged in through.
    cluster.node_mut("node-a").child.kill().await.unwrap();
    for id in &on_a {
        let user = &mut users[*id as usize - 1];
        let event = user.event(DEADLINE, |e| matches!(e, ClientEvent::Reconnected { .. })).await;
        assert!(matches!(&event, ClientEvent::Reconnected { node_id } if node_id == "node-b"), "{event:?}");
    }
    let (from, to) = (on_a[0], users.iter().map(|u| u.id).find(|id| *id != on_a[0]).unwrap());
    users[from as usize - 1].client.send_private(to, "still here").await.unwrap();
    assert_eq!(users[to as usize - 1].delivery().await.text, "still here");
}

/// The same IM on a Redis Cluster (three primaries of the test's own): nodes given the seed
/// list or a single cluster node's URL; users spread over the nodes through one route; group
/// and private messages cross nodes with their ids; the online list, duplicate logins,
/// history and a cluster-wide push work as on one Redis; a SIGKILLed node's clients move to
/// survivors.
#[tokio::test]
async fn a_redis_cluster_backs_the_whole_im() {
    let started = Instant::now();
    let redis = tokio::task::spawn_blocking(|| RedisCluster::start(3)).await.unwrap();
    let (seeds, one_node) = (redis.url(), redis.node_url(2));
    let mut cluster =
        Cluster::start_on(&[&seeds, &one_node, &seeds], &["node-a", "node-b", "node-c"], 2, &[]).await;
    let a = cluster.node("node-a");
    let mut users = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        users.push(SdkUser::login(&a.route(), i as u64 + 1, name).await);
    }
    let placement: BTreeMap<u64, String> = users.iter().map(|u| (u.id, u.client.node_id())).collect();
    let used: BTreeSet<&String> = placement.values().collect();
    assert!(used.len() >= 2, "all six users landed on one node: {placement:?}");
    for host in &cluster.nodes {
        wait_online_nodes(host, &placement).await;
    }

    // Group: one id for everyone, wherever they are.
    let gid = users[0].client.send_group("hello cluster").await.unwrap().message_id;
    for user in &mut users[1..] {
        let d = user.delivery().await;
        assert_eq!((d.message_id, d.sender.id, d.text.as_str()), (gid, 1, "hello cluster"));
    }
    // Private, between users on different nodes.
    let (from, to) = placement
        .iter()
        .find_map(|(f, nf)| placement.iter().find(|(_, nt)| nt != &nf).map(|(t, _)| (*f, *t)))
        .unwrap();
    let pid = users[from as usize - 1].client.send_private(to, "across").await.unwrap().message_id;
    let d = users[to as usize - 1].delivery().await;
    assert_eq!((d.message_id, d.text.as_str()), (pid, "across"));
    // The default message callback wrote the history (key-value data spread over the shards).
    let other = cluster.nodes.iter().find(|h| h.node_id != placement[&to]).unwrap();
    wait_for(&format!("history of user {to} on {}", other.node_id), || async {
        let (status, body) = http(other, "GET", &format!("/history/{to}"), None).await;
        (status == 200 && body.to_string().contains("across")).then_some(())
    })
    .await;
    // A second login of an online user is refused on any node.
    let home = &placement[&1];
    let elsewhere = cluster.nodes.iter().find(|h| &h.node_id != home).unwrap();
    let (status, body) = http(elsewhere, "POST", "/login", Some(&login_body(1, "alice-again"))).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("duplicate_login")), "{body}");

    // A push to node A runs on B and C within a second.
    let wasm = component("word_filter");
    let token = ["--to", &a.route(), "--token", ADMIN_TOKEN];
    let out = cim_host_cli(&[&["push", "group-send", wasm.to_str().unwrap()][..], &token].concat());
    let pushed_at = Instant::now();
    let pushed = active_sha(a, "group").await;
    assert!(out.contains(&pushed), "{out}");
    for host in &cluster.nodes[1..] {
        wait_for(&format!("{} to run the pushed version", host.node_id), || async {
            (active_sha(host, "group").await == pushed).then_some(())
        })
        .await;
    }
    let took = pushed_at.elapsed();
    eprintln!("on a Redis Cluster, nodes B and C run the pushed version {took:?} after the push");
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let gid = users[5].client.send_group("darn").await.unwrap().message_id;
    for user in &mut users[..5] {
        let d = user.delivery().await;
        assert_eq!((d.message_id, d.text.as_str()), (gid, "****"));
    }

    kill_the_busiest_of_b_and_c(&mut cluster, &mut users).await;
    eprintln!("a_redis_cluster_backs_the_whole_im: {:?}", started.elapsed());
}

/// A cluster node bound to a wildcard address must say where clients reach it: otherwise
/// the route API would send other nodes' users to 0.0.0.0. It refuses to start, saying so.
#[test]
fn a_cluster_node_bound_to_a_wildcard_address_must_advertise() {
    let prefix = common::cluster::KeyPrefix::new(&redis_url());
    let out = std::process::Command::new(common::binary("cim-host"))
        .args(["up", "--builtin-handlers", "--tcp", "0.0.0.0:0", "--http", "127.0.0.1:0"])
        .args(["--store", &redis_url(), "--redis-prefix", &prefix.prefix])
        // Authentication is not what this is about (without it, a wildcard bind is refused
        // for that reason first).
        .arg("--insecure-no-auth")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("pass --advertise-tcp HOST:PORT"), "{stderr}");
    assert!(prefix.keys().unwrap().is_empty(), "the refused node left keys behind");
}

/// A client that sends many private messages to a user on another node without waiting for
/// the answers: the node carries them out concurrently (their Redis round trips overlap) and
/// batches them into few publishes, yet they arrive in the order they were sent, each
/// answered in order with its id.
#[tokio::test]
async fn pipelined_sends_across_nodes_arrive_in_order() {
    // 300 sends at once is over the default per-user rate limit, which is not what this tests.
    let cluster = Cluster::start(&redis_url(), &["node-a", "node-b"], 2, &["--no-rate-limits"]).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut alice = RawClient::login_tcp(a, 1, "alice").await;
    let mut bob = RawClient::login_tcp(b, 2, "bob").await;
    wait_online_nodes(a, &[(1, "node-a".to_owned()), (2, "node-b".to_owned())].into()).await;
    const N: u64 = 300;
    for i in 0..N {
        alice.send(Frame::new(100 + i, Body::private(2, format!("m{i}")))).await;
    }
    let mut ids = Vec::new();
    for i in 0..N {
        match alice.frame().await {
            Frame { request_id, body: Body::Ack { message_id, .. } } => {
                assert_eq!(request_id, 100 + i, "answers out of order");
                ids.push(message_id);
            }
            other => panic!("expected an ack, got {other:?}"),
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let d = bob.delivery().await;
        assert_eq!((d.message_id, d.text), (*id, format!("m{i}")), "delivery {i} out of order");
    }
    // The log holds them in that order too: a replay or the history shows them as sent.
    let (status, page) = http(b, "GET", "/history/2?stream=inbox&after=0&limit=1000", None).await;
    assert_eq!(status, 200, "{page}");
    let logged: Vec<String> =
        page["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(logged, ids.iter().map(u64::to_string).collect::<Vec<_>>(), "the log's order");
}

/// A group handler that names its members (`recipients: only`) reaches exactly those, on
/// whichever node they are: the sending node looks up only the members, not the whole
/// online set.
#[tokio::test]
async fn a_member_list_group_reaches_its_members_on_every_node() {
    let cluster = Cluster::start(&redis_url(), &["node-a", "node-b"], 2, &[]).await;
    let (a, b) = (cluster.node("node-a"), cluster.node("node-b"));
    let mut u1 = RawClient::login_tcp(a, 1, "alice").await;
    let mut u2 = RawClient::login_tcp(b, 2, "bob").await;
    let mut u3 = RawClient::login_tcp(b, 3, "carol").await;
    let mut u4 = RawClient::login_tcp(a, 4, "dave").await;
    let wasm = component("group_members");
    cim_host_cli(&["push", "group-send", wasm.to_str().unwrap(), "--to", &a.route(), "--token", ADMIN_TOKEN]);
    let pushed = active_sha(a, "group").await;
    wait_for("node-b to run the member-list handler", || async {
        (active_sha(b, "group").await == pushed).then_some(())
    })
    .await;

    let Body::Ack { message_id, .. } = u1.request(10, Body::group("to:2,4,99 members only".into())).await
    else {
        panic!("the group message was not accepted")
    };
    for member in [&mut u2, &mut u4] {
        let d = member.delivery().await;
        assert_eq!((d.message_id, d.sender.id, d.text.as_str()), (message_id, 1, "members only"));
    }
    // Carol is not a member: the next thing she gets is a message that names her.
    assert!(matches!(u4.request(11, Body::group("to:3 just you".into())).await, Body::Ack { .. }));
    let d = u3.delivery().await;
    assert_eq!((d.sender.id, d.text.as_str()), (4, "just you"));
    let answer = u1.request(12, Body::group("no list".into())).await;
    expect_error(answer, ErrorCode::Rejected);
}
