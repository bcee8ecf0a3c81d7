//! Helpers for the cluster tests: several `cim-host` nodes sharing one Redis under a key
//! prefix of their own (removed afterwards), a `redis-server` a test owns (to stop and
//! start again), SDK clients that record what they receive, the `cim` terminal client, and
//! the admin calls a cluster-wide push needs.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cim_client::{Client, ClientConfig, ClientEvent, Delivery, MessageHandler, ReconnectPolicy};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::{ADMIN_TOKEN, DEADLINE, Host, binary, wait_for};

/// The shared Redis the tests use (`CIM_TEST_REDIS`, default `redis://127.0.0.1:6379`).
pub fn redis_url() -> String {
    std::env::var("CIM_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix no other test (or test run) uses: `cimtest:<pid>:<nanos>:<n>:`.
pub fn unique_prefix() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("cimtest:{}:{nanos}:{}:", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// A key prefix whose keys are deleted when it is dropped (best effort: a Redis that is
/// down is left alone).
#[derive(Debug)]
pub struct KeyPrefix {
    pub prefix: String,
    url: String,
}

impl KeyPrefix {
    pub fn new(url: &str) -> KeyPrefix {
        KeyPrefix { prefix: unique_prefix(), url: url.to_owned() }
    }

    /// Every key of this prefix: presence keys (`{<prefix>presence}:...`) and the rest
    /// (`<prefix>kv:...`).
    pub fn keys(&self) -> redis::RedisResult<Vec<String>> {
        let client = redis::Client::open(self.url.as_str())?;
        let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
        let mut keys = Vec::new();
        for pattern in [format!("{{{}*", self.prefix), format!("{}*", self.prefix)] {
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000)
                    .query(&mut conn)?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    fn clean(&self) -> redis::RedisResult<()> {
        let keys = self.keys()?;
        if !keys.is_empty() {
            let client = redis::Client::open(self.url.as_str())?;
            let mut conn = client.get_connection_with_timeout(Duration::from_secs(2))?;
            redis::cmd("DEL").arg(&keys).query::<()>(&mut conn)?;
        }
        Ok(())
    }
}

impl Drop for KeyPrefix {
    fn drop(&mut self) {
        let _ = self.clean();
    }
}

/// Nodes of one cluster: same Redis, same prefix. Nodes are killed, then the prefix's keys
/// removed, when it is dropped.
pub struct Cluster {
    /// In the order of the names given to [`Cluster::start`].
    pub nodes: Vec<Host>,
    pub prefix: KeyPrefix,
    pub url: String,
    /// `--node-ttl`.
    pub ttl: Duration,
}

impl Cluster {
    /// Starts one node per name (its `--node-id`) on `url` with a fresh prefix and
    /// `--node-ttl ttl_secs`. Node ids can repeat across tests: every key and channel
    /// carries the prefix.
    pub async fn start(url: &str, names: &[&str], ttl_secs: u64, extra: &[&str]) -> Cluster {
        Cluster::start_on(&vec![url; names.len()], names, ttl_secs, extra).await
    }

    /// Like [`Cluster::start`], each node with its own `--store` URL (the same Redis, named
    /// differently: a Redis Cluster by its seed list or by one of its nodes). The key
    /// prefix is cleaned through the first URL.
    pub async fn start_on(urls: &[&str], names: &[&str], ttl_secs: u64, extra: &[&str]) -> Cluster {
        assert_eq!(urls.len(), names.len(), "one store URL per node");
        let url = urls[0];
        let prefix = KeyPrefix::new(url);
        let ttl = ttl_secs.to_string();
        let mut starting = Vec::new();
        for (name, url) in names.iter().zip(urls) {
            let mut args: Vec<String> =
                ["--store", url, "--redis-prefix", &prefix.prefix, "--node-id", name, "--node-ttl", &ttl]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            starting.push(tokio::spawn(async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                Host::start(&args).await
            }));
        }
        let mut nodes = Vec::new();
        for (name, task) in names.iter().zip(starting) {
            let host =
                task.await.expect("start task").unwrap_or_else(|e| panic!("starting node {name}: {e:#}"));
            assert_eq!(&host.node_id, name);
            nodes.push(host);
        }
        Cluster { nodes, prefix, url: url.to_owned(), ttl: Duration::from_secs(ttl_secs) }
    }

    pub fn node(&self, id: &str) -> &Host {
        self.nodes.iter().find(|h| h.node_id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    pub fn node_mut(&mut self, id: &str) -> &mut Host {
        self.nodes.iter_mut().find(|h| h.node_id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Panics if a node process has exited.
    pub fn assert_all_running(&mut self) {
        for host in &mut self.nodes {
            if let Some(status) = host.child.try_wait().expect("try_wait") {
                panic!("node {} exited: {status}", host.node_id);
            }
        }
    }
}

/// One HTTP request that must be answered within the deadline (a node that hangs fails the
/// test instead of stalling it).
/// A `POST /login` body for a host without user tokens.
pub fn login_body(id: u64, name: &str) -> String {
    format!(r#"{{"user_id":{id},"user_name":"{name}"}}"#)
}

pub async fn http(host: &Host, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    tokio::time::timeout(DEADLINE, super::http(host.http, method, path, body))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} on {}: no answer within {DEADLINE:?}", host.node_id))
        .unwrap_or_else(|e| panic!("{method} {path} on {}: {e:#}", host.node_id))
}

/// `GET /online` as user id → node id.
pub async fn online_nodes(host: &Host) -> BTreeMap<u64, String> {
    online_if_up(host).await.unwrap_or_else(|| panic!("GET /online on {} did not answer 200", host.node_id))
}

/// `GET /online` on `host` as user id → node id, or `None` while it cannot answer (503).
pub async fn online_if_up(host: &Host) -> Option<BTreeMap<u64, String>> {
    let (status, body) = http(host, "GET", "/online", None).await;
    (status == 200).then(|| {
        body["users"]
            .as_array()
            .expect("users")
            .iter()
            .map(|u| (u["id"].as_u64().expect("id"), u["node_id"].as_str().expect("node_id").to_owned()))
            .collect()
    })
}

/// Waits until `GET /online` on `host` is exactly `expected` (user id → node id).
pub async fn wait_online_nodes(host: &Host, expected: &BTreeMap<u64, String>) {
    wait_for(&format!("GET /online on {} to be {expected:?}", host.node_id), || async {
        (online_nodes(host).await == *expected).then_some(())
    })
    .await
}

/// One admin request with the test token; the body parsed as JSON.
pub async fn admin(host: &Host, method: &str, path: &str) -> (u16, serde_json::Value) {
    tokio::time::timeout(DEADLINE, admin_once(host, method, path))
        .await
        .unwrap_or_else(|_| panic!("{method} {path} on {}: no answer within {DEADLINE:?}", host.node_id))
}

async fn admin_once(host: &Host, method: &str, path: &str) -> (u16, serde_json::Value) {
    use http_body_util::{BodyExt, Full};
    let stream = tokio::net::TcpStream::connect(host.http).await.expect("connect admin");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("http handshake");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", host.http.to_string())
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(bytes::Bytes::new()))
        .expect("request");
    let resp = sender.send_request(req).await.expect("admin request");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.expect("admin body").to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
}

/// The sha256 of the active component for `event` on `host` (`GET /admin/components`).
pub async fn active_sha(host: &Host, event: &str) -> String {
    let (status, body) = admin(host, "GET", "/admin/components").await;
    assert_eq!(status, 200, "GET /admin/components on {}: {body}", host.node_id);
    body["components"]
        .as_array()
        .expect("components")
        .iter()
        .find(|c| c["event"] == event && c["active"] == true)
        .and_then(|c| c["sha256"].as_str())
        .unwrap_or_else(|| panic!("no active {event} component on {}: {body}", host.node_id))
        .to_owned()
}

/// Runs the `cim-host` CLI (push, rollback) and returns its stdout; panics on failure.
pub fn cim_host_cli(args: &[&str]) -> String {
    let out = std::process::Command::new(binary("cim-host")).args(args).output().expect("run cim-host");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "cim-host {args:?} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A `redis-server` of the test's own on a free port, killed on drop. Without persistence
/// ([`OwnRedis::start`]) it is stopped and started again empty; with an append-only file
/// fsynced on every write ([`OwnRedis::start_aof`]) a restart reloads everything it
/// acknowledged, even after SIGKILL.
pub struct OwnRedis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    aof: bool,
}

impl OwnRedis {
    pub async fn start() -> OwnRedis {
        OwnRedis::start_with(false).await
    }

    /// With `--appendonly yes --appendfsync always` in a data directory of its own.
    pub async fn start_aof() -> OwnRedis {
        OwnRedis::start_with(true).await
    }

    async fn start_with(aof: bool) -> OwnRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = OwnRedis { port, child: None, dir: tempfile::tempdir().expect("tempdir"), aof };
        redis.start_again().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (on the same port) and waits until it answers PING.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(if self.aof {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn redis-server (is it installed?)");
        self.child = Some(child);
        let url = self.url();
        wait_for(&format!("redis-server on port {} to answer", self.port), || async {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut conn = client.get_multiplexed_async_connection().await.ok()?;
            let pong: String = redis::cmd("PING").query_async(&mut conn).await.ok()?;
            (pong == "PONG").then_some(())
        })
        .await;
    }

    /// Kills the server (SIGKILL: without an append-only file it keeps nothing) and waits
    /// for it to be gone.
    pub async fn stop(&mut self) {
        let mut child = self.child.take().expect("redis-server is not running");
        child.kill().await.expect("kill redis-server");
    }
}

/// What an SDK client's [`MessageHandler`] saw, forwarded to the test.
struct Recorder {
    deliveries: mpsc::UnboundedSender<Delivery>,
    events: mpsc::UnboundedSender<ClientEvent>,
}

impl MessageHandler for Recorder {
    fn on_delivery(&self, delivery: &Delivery) {
        let _ = self.deliveries.send(delivery.clone());
    }

    fn on_event(&self, event: &ClientEvent) {
        let _ = self.events.send(event.clone());
    }
}

/// A user logged in with the client SDK, whose deliveries and connection events the test
/// reads in order.
pub struct SdkUser {
    pub id: u64,
    pub name: String,
    pub client: Client,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    events: mpsc::UnboundedReceiver<ClientEvent>,
}

impl SdkUser {
    /// Logs in through the route API at `route`; reconnects at most 1 s apart.
    pub async fn login(route: &str, id: u64, name: &str) -> SdkUser {
        let (dtx, deliveries) = mpsc::unbounded_channel();
        let (etx, events) = mpsc::unbounded_channel();
        let mut config = ClientConfig::new(route, id, name);
        config.reconnect = ReconnectPolicy {
            max_attempts: Some(60),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let client = Client::login(config, Arc::new(Recorder { deliveries: dtx, events: etx }))
            .await
            .unwrap_or_else(|e| panic!("login of user {id} through {route}: {e}"));
        SdkUser { id, name: name.to_owned(), client, deliveries, events }
    }

    /// The next delivery, within the deadline.
    pub async fn delivery(&mut self) -> Delivery {
        tokio::time::timeout(DEADLINE, self.deliveries.recv())
            .await
            .unwrap_or_else(|_| panic!("user {} got no delivery within {DEADLINE:?}", self.id))
            .expect("delivery channel open")
    }

    /// Skips events until one matches `pred`, within `within`.
    pub async fn event(&mut self, within: Duration, pred: impl Fn(&ClientEvent) -> bool) -> ClientEvent {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .unwrap_or_else(|_| panic!("user {}: expected event not seen within {within:?}", self.id))
                .expect("event channel open");
            if pred(&event) {
                return event;
            }
        }
    }

    /// Asserts no delivery is waiting (after the positive cases were checked).
    pub fn assert_no_delivery(&mut self) {
        if let Ok(d) = self.deliveries.try_recv() {
            panic!("user {} got an unexpected delivery {d:?}", self.id);
        }
    }
}
