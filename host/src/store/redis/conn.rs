//! Where the Redis store connects ([`Endpoint`]: one server or a Redis Cluster) and the one
//! shared connection every command goes through ([`RedisConn`]).

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use redis::aio::AsyncPushSender;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{ProtocolVersion, RedisError, RedisFuture, RedisResult, Value};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::SCAN_COUNT;
use super::cluster_conn::Rebuilt;
use crate::store::StoreError;

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one command may wait for its reply. The library default (500 ms) is short for
/// a reap script or a large `HGETALL` on a busy server.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);
/// Connection attempts after the first when the shared connection is lost (100 ms, then
/// 200 ms apart). Commands wait for these attempts, so while Redis is down a request fails
/// after about 0.3 s instead of the library default's ~7 s (6 retries); the next command
/// starts a new round, so reconnecting goes on for as long as there is traffic (and the
/// registry heartbeat is traffic every `ttl / 3`).
const RECONNECT_RETRIES: usize = 2;
/// Retries of one command on a Redis Cluster (after `MOVED`, `TRYAGAIN`, a lost node...),
/// the first 100 ms after the failure, growing to at most 1 s.
const CLUSTER_RETRIES: u32 = 3;

/// The URL scheme that names a Redis Cluster by several of its nodes.
pub const CLUSTER_SCHEME: &str = "redis-cluster://";

/// What `--store` names: one Redis server, or a Redis Cluster known by some of its nodes.
#[derive(Debug, Clone)]
pub enum Endpoint {
    Single(redis::Client),
    /// Seed URLs (`redis://[auth@]host:port`), any of which can tell the cluster's layout.
    Cluster(Vec<String>),
}

impl Endpoint {
    /// Parses `redis://[user:pass@]HOST:PORT[/DB]` (one server, or one node of a cluster:
    /// see [`Endpoint::detect`]) or `redis-cluster://[user:pass@]HOST:PORT[,HOST:PORT...]`.
    pub fn parse(url: &str) -> Result<Endpoint, StoreError> {
        let invalid =
            |why: &str| StoreError::Unavailable(format!("invalid redis url {:?}: {why}", redacted(url)));
        let Some(rest) = url.strip_prefix(CLUSTER_SCHEME) else {
            return redis::Client::open(url).map(Endpoint::Single).map_err(|e| invalid(&e.to_string()));
        };
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((auth, hosts)) => (format!("{auth}@"), hosts),
            None => (String::new(), rest),
        };
        let hosts = hosts.strip_suffix('/').unwrap_or(hosts);
        if hosts.contains('/') {
            return Err(invalid("a Redis Cluster has only database 0; leave the /DB out"));
        }
        let seeds: Vec<String> = hosts.split(',').map(|h| format!("redis://{auth}{}", h.trim())).collect();
        for seed in &seeds {
            if seed.ends_with("://") || seed.ends_with('@') {
                return Err(invalid("empty host in the list"));
            }
            redis::Client::open(seed.as_str()).map_err(|e| invalid(&e.to_string()))?;
        }
        Ok(Endpoint::Cluster(seeds))
    }

    /// A single-server endpoint whose server turns out to be a Redis Cluster node becomes a
    /// cluster endpoint seeded by it, so `--store redis://any-cluster-node:7000` just works.
    pub async fn detect(self) -> Result<(Endpoint, bool), StoreError> {
        let Endpoint::Single(client) = &self else { return Ok((self, false)) };
        let addr = client.get_connection_info().addr().to_string();
        let unreachable =
            |e: RedisError| StoreError::Unavailable(format!("connecting to redis at {addr}: {e}"));
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT));
        // Probe on database 0: a cluster node refuses SELECT, and that must not hide what it is.
        let info = client.get_connection_info().clone();
        let db0 = info.clone().set_redis_settings(info.redis_settings().clone().set_db(0));
        let probe = redis::Client::open(db0).map_err(unreachable)?;
        let mut conn =
            probe.get_multiplexed_async_connection_with_config(&config).await.map_err(unreachable)?;
        let info: String = match redis::cmd("INFO").arg("cluster").query_async(&mut conn).await {
            Ok(info) => info,
            Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
                return Err(unreachable(e));
            }
            // A server that refuses INFO (an ACL, a renamed command) is taken as a plain one.
            Err(e) => {
                tracing::debug!(error = %e, "INFO cluster refused; assuming a standalone redis");
                return Ok((self, false));
            }
        };
        if !info.lines().any(|l| l.trim() == "cluster_enabled:1") {
            return Ok((self, false));
        }
        let db = client.get_connection_info().redis_settings().db();
        if db != 0 {
            return Err(StoreError::Unavailable(format!(
                "redis at {addr} is a Redis Cluster node, which has only database 0 (the url asks for {db})"
            )));
        }
        let seed = client.get_connection_info().clone();
        Ok((Endpoint::Cluster(vec![seed_url(&seed)]), true))
    }

    /// A cluster client with the store's timeouts; `push` receives pub/sub messages (it
    /// needs RESP3).
    pub(crate) fn cluster_client(
        seeds: &[String],
        push: Option<impl AsyncPushSender>,
    ) -> RedisResult<ClusterClient> {
        let mut builder = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
            .connection_timeout(CONNECT_TIMEOUT)
            .response_timeout(RESPONSE_TIMEOUT)
            .retries(CLUSTER_RETRIES)
            .min_retry_wait(100)
            .max_retry_wait(1000);
        if let Some(push) = push {
            builder = builder.use_protocol(ProtocolVersion::RESP3).push_sender(push);
        }
        builder.build()
    }

    /// Opens the shared connection.
    pub async fn connect(&self) -> Result<RedisConn, StoreError> {
        let home = Handle::try_current()
            .map_err(|e| StoreError::Unavailable(format!("the redis store needs a tokio runtime: {e}")))?;
        let kind = match self {
            Endpoint::Single(client) => {
                let addr = client.get_connection_info().addr().to_string();
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CONNECT_TIMEOUT))
                    .set_response_timeout(Some(RESPONSE_TIMEOUT))
                    .set_number_of_retries(RECONNECT_RETRIES)
                    .set_max_delay(Duration::from_secs(2));
                let conn = ConnectionManager::new_with_config(client.clone(), config)
                    .await
                    .map_err(|e| StoreError::Unavailable(format!("connecting to redis at {addr}: {e}")))?;
                Kind::Single(conn)
            }
            Endpoint::Cluster(seeds) => {
                let failed = |e: RedisError| {
                    StoreError::Unavailable(format!(
                        "connecting to the redis cluster at {}: {e}",
                        self.describe()
                    ))
                };
                let client = Self::cluster_client(seeds, None::<NoPush>).map_err(failed)?;
                let conn = client.get_async_connection().await.map_err(failed)?;
                Kind::Cluster(Rebuilt::new(seeds.clone(), home.clone(), conn))
            }
        };
        Ok(RedisConn { kind, home, requests: Arc::default() })
    }

    /// The addresses, without credentials, for messages and logs.
    pub fn describe(&self) -> String {
        match self {
            Endpoint::Single(client) => client.get_connection_info().addr().to_string(),
            Endpoint::Cluster(seeds) => {
                let hosts: Vec<String> = seeds
                    .iter()
                    .map(|s| {
                        s.rsplit_once('@').map_or(s.trim_start_matches("redis://"), |(_, h)| h).to_owned()
                    })
                    .collect();
                format!("{CLUSTER_SCHEME}{}", hosts.join(","))
            }
        }
    }
}

/// `info` as a `redis://` URL (with its credentials), to seed a cluster client.
fn seed_url(info: &redis::ConnectionInfo) -> String {
    let settings = info.redis_settings();
    let auth = match (settings.username(), settings.password()) {
        (Some(user), Some(pass)) => format!("{}:{}@", encode(user), encode(pass)),
        (None, Some(pass)) => format!(":{}@", encode(pass)),
        (Some(user), None) => format!("{}@", encode(user)),
        (None, None) => String::new(),
    };
    format!("redis://{auth}{}", info.addr())
}

/// Percent-encodes what may not appear in a URL's user-info part.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `url` without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***{}", &url[..scheme], &url[at..]),
        _ => url.to_owned(),
    }
}

/// A push sender type for clients that take no pushes.
pub(super) type NoPush = tokio::sync::mpsc::UnboundedSender<redis::PushInfo>;

/// The one shared connection: a [`ConnectionManager`] to a single server (which reconnects
/// on its own) or a cluster connection (which follows the cluster's layout, `MOVED` and
/// lost nodes on its own, and is built again from the seeds when it stops finding the
/// cluster: [`Rebuilt`]). Cheap to clone; every clone multiplexes on the same sockets.
///
/// Commands are polled on the runtime the connection was made on, whichever runtime calls
/// it. Handlers' host calls may run on the `cim-wasm` runtime (a guest moves there once it
/// has run for an epoch tick), and a connection reconnects (opens a socket, spawns a task)
/// on the runtime that notices the loss: a reconnect started on a runtime that is shut down
/// or lacks an IO driver fails and poisons the shared connection for good.
#[derive(Clone)]
pub struct RedisConn {
    kind: Kind,
    home: Handle,
    /// Requests sent through this connection and its clones (a pipeline counts once): the
    /// round trips a piece of work cost, for tests and logs.
    requests: Arc<AtomicU64>,
}

#[derive(Clone)]
enum Kind {
    Single(ConnectionManager),
    Cluster(Arc<Rebuilt>),
}

impl fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::Single(_) => "RedisConn::Single",
            Kind::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl RedisConn {
    pub fn is_cluster(&self) -> bool {
        matches!(self.kind, Kind::Cluster(_))
    }

    /// How many times the cluster client was built again from the seeds (0 on one server).
    pub fn cluster_rebuilds(&self) -> u64 {
        match &self.kind {
            Kind::Single(_) => 0,
            Kind::Cluster(c) => c.rebuilds(),
        }
    }

    /// How many requests (round trips) this connection and its clones have sent so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Every key matching `pattern`, via `SCAN` (never `KEYS`, which blocks the server), on
    /// every primary of a cluster.
    pub async fn scan(&self, pattern: &str) -> RedisResult<Vec<String>> {
        let mut keys = BTreeSet::new();
        match &self.kind {
            Kind::Single(_) => scan_node(self.clone(), None, pattern, &mut keys).await?,
            Kind::Cluster(_) => {
                for (host, port) in self.primaries().await? {
                    let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                    scan_node(self.clone(), Some(route), pattern, &mut keys).await?;
                }
            }
        }
        Ok(keys.into_iter().collect())
    }

    /// One `SCAN` step from `at` asking for about `count` keys: the keys it returned (may be
    /// none, may be a few more than `count`) and where to go on, `None` once every primary
    /// (or the single server) has been scanned to the end.
    ///
    /// On a cluster the position names the primary by address; an address that is no longer
    /// a primary is refused rather than followed, so a forged position cannot send commands
    /// to an arbitrary host.
    pub async fn scan_step(
        &self,
        pattern: &str,
        at: &ScanPosition,
        count: usize,
    ) -> Result<(Vec<String>, Option<ScanPosition>), StoreError> {
        let failed = |e: &dyn fmt::Display| StoreError::Unavailable(format!("redis SCAN {pattern}: {e}"));
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(at.cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count.max(1));
        if !self.is_cluster() {
            let reply = self.route(cmd, None).await.map_err(|e| failed(&e))?;
            let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply).map_err(|e| failed(&e))?;
            return Ok((keys, (next != 0).then_some(ScanPosition { node: None, cursor: next })));
        }
        // Sorted as the strings the cursor carries, so "the next one" is well defined.
        let mut primaries: Vec<String> = self
            .primaries()
            .await
            .map_err(|e| failed(&e))?
            .into_iter()
            .map(|(h, p)| format!("{h}:{p}"))
            .collect();
        primaries.sort_unstable();
        let node = match &at.node {
            None => primaries.first().cloned().ok_or_else(|| {
                StoreError::Unavailable("redis cluster: CLUSTER SLOTS lists no primary".to_owned())
            })?,
            Some(node) if primaries.contains(node) => node.clone(),
            Some(node) => {
                return Err(StoreError::BadCursor(format!(
                    "redis cluster node {node} is not a primary any more; list again from the start"
                )));
            }
        };
        let (host, port) = node
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
            .ok_or_else(|| StoreError::BadCursor(format!("bad node address {node:?}")))?;
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let reply = self.route(cmd, Some(route)).await.map_err(|e| failed(&e))?;
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(reply).map_err(|e| failed(&e))?;
        let after = if next != 0 {
            Some(ScanPosition { node: Some(node), cursor: next })
        } else {
            // Primaries are visited in address order; this one is done.
            primaries
                .iter()
                .find(|p| p.as_str() > node.as_str())
                .map(|p| ScanPosition { node: Some(p.clone()), cursor: 0 })
        };
        Ok((keys, after))
    }

    /// The `(host, port)` of every primary, from `CLUSTER SLOTS`.
    async fn primaries(&self) -> RedisResult<BTreeSet<(String, u16)>> {
        let slots = self.route(redis::cmd("CLUSTER").arg("SLOTS").clone(), None).await?;
        let mut primaries = BTreeSet::new();
        let Value::Array(ranges) = slots else { return Ok(primaries) };
        for range in ranges {
            // [start, end, [host, port, id, ...], replicas...]
            let Value::Array(parts) = range else { continue };
            let Some(Value::Array(primary)) = parts.get(2) else { continue };
            let host = primary.first().and_then(|v| redis::from_redis_value_ref::<String>(v).ok());
            let port = primary.get(1).and_then(|v| redis::from_redis_value_ref::<u16>(v).ok());
            if let (Some(host), Some(port)) = (host, port) {
                primaries.insert((host, port));
            }
        }
        Ok(primaries)
    }

    /// Runs `cmd` on the node `route` names (a cluster only), else wherever it belongs.
    async fn route(&self, cmd: redis::Cmd, route: Option<RoutingInfo>) -> RedisResult<Value> {
        let mut conn = self.clone();
        match (&mut conn.kind, route) {
            (Kind::Cluster(c), route) => {
                let route = route.unwrap_or(RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random));
                let (home, rebuilt) = (conn.home.clone(), c.clone());
                let mut cluster = rebuilt.conn();
                let result = OnHome { fut: Box::pin(cluster.route_command(cmd, route)), home }.await;
                rebuilt.observe(&result);
                result
            }
            (Kind::Single(_), _) => cmd.query_async(&mut conn).await,
        }
    }
}

/// Where a paged `SCAN` of the whole keyspace stands. The default is the start.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanPosition {
    /// `host:port` of the primary being scanned (a Redis Cluster); `None` on a single
    /// server, or at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `SCAN`'s own cursor on that node.
    pub cursor: u64,
}

/// `SCAN` of one node (`route`) or of the single server.
async fn scan_node(
    conn: RedisConn,
    route: Option<RoutingInfo>,
    pattern: &str,
    keys: &mut BTreeSet<String>,
) -> RedisResult<()> {
    let mut cursor: u64 = 0;
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
        let reply = conn.route(cmd, route.clone()).await?;
        let (next, batch): (u64, Vec<String>) = redis::from_redis_value(reply)?;
        // SCAN may return a key more than once; the set removes duplicates.
        keys.extend(batch);
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Polls `fut` with `home` entered.
struct OnHome<F> {
    home: Handle,
    fut: F,
}

impl<F: Future + Unpin> Future for OnHome<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _entered = this.home.enter();
        Pin::new(&mut this.fut).poll(cx)
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, Value> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let home = self.home.clone();
        let fut = match &mut self.kind {
            Kind::Single(c) => c.req_packed_command(cmd),
            Kind::Cluster(c) => {
                let (rebuilt, mut cluster) = (c.clone(), c.conn());
                Box::pin(async move {
                    let result = cluster.req_packed_command(cmd).await;
                    rebuilt.observe(&result);
                    result
                })
            }
        };
        Box::pin(OnHome { fut, home })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let home = self.home.clone();
        let fut = match &mut self.kind {
            Kind::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Kind::Cluster(c) => {
                let (rebuilt, mut cluster) = (c.clone(), c.conn());
                Box::pin(async move {
                    let result = cluster.req_packed_commands(pipeline, offset, count).await;
                    rebuilt.observe(&result);
                    result
                })
            }
        };
        Box::pin(OnHome { fut, home })
    }

    fn get_db(&self) -> i64 {
        match &self.kind {
            Kind::Single(c) => c.get_db(),
            Kind::Cluster(_) => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_name_every_seed() {
        let Endpoint::Cluster(seeds) = Endpoint::parse("redis-cluster://a:7000,b:7001/").unwrap() else {
            panic!("not a cluster endpoint")
        };
        assert_eq!(seeds, ["redis://a:7000", "redis://b:7001"]);
        let Endpoint::Cluster(seeds) = Endpoint::parse("redis-cluster://u:p%40ss@a:7000,b:7001").unwrap()
        else {
            panic!("not a cluster endpoint")
        };
        assert_eq!(seeds, ["redis://u:p%40ss@a:7000", "redis://u:p%40ss@b:7001"]);
        let e = Endpoint::parse("redis-cluster://u:secret@a:7000").unwrap();
        assert_eq!(e.describe(), "redis-cluster://a:7000");
        assert!(matches!(Endpoint::parse("redis://127.0.0.1:6379/2").unwrap(), Endpoint::Single(_)));
    }

    #[test]
    fn bad_cluster_urls_are_refused() {
        for url in
            ["redis-cluster://a:7000/1", "redis-cluster://", "redis-cluster://a:7000,", "redis-cluster://a:x"]
        {
            let e = Endpoint::parse(url).err().unwrap_or_else(|| panic!("{url} was accepted"));
            assert!(e.to_string().contains("invalid redis url"), "{url}: {e}");
        }
        let e = Endpoint::parse("redis-cluster://u:secret@a:7000/3").err().unwrap();
        assert!(!e.to_string().contains("secret"), "{e}");
    }

    #[test]
    fn seed_urls_keep_credentials_encoded() {
        let info: redis::ConnectionInfo = "redis://us%40er:p%3Ass@h:7000".parse().unwrap();
        let url = seed_url(&info);
        let back: redis::ConnectionInfo = url.parse().unwrap();
        assert_eq!(back.redis_settings().username(), Some("us@er"));
        assert_eq!(back.redis_settings().password(), Some("p:ss"));
        assert_eq!(back.addr().to_string(), "h:7000");
    }
}
