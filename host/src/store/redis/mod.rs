//! The Redis store backend: presence and key-value data shared by every node of a cluster,
//! through one shared auto-reconnecting connection.
//!
//! # Key schema
//! [`RedisKeys`] is the one place key and channel names are made. With the default prefix
//! `cim:`:
//!
//! | key | type | what |
//! |---|---|---|
//! | `{cim:presence}:online` | hash | user id → JSON `{name, node_id, conn_id}` |
//! | `{cim:presence}:node-users:<node>` | set | user ids claimed by that node |
//! | `{cim:presence}:nodes-with-users` | set | node ids that have a `node-users` set |
//! | `{cim:presence}:node:<node>` | string, TTL | the node's registry entry (JSON `NodeInfo`) |
//! | `{cim:presence}:nodes` | set | node ids that have registered |
//! | `{cim:presence}:node-numbers` | hash | message-id node number → lease and mark (`cluster::node_number`) |
//! | `cim:kv:<store>:<key>` | string or list | handler key-value data |
//! | `cim:kv-usage:<store>` | hash | `keys`, `bytes`: the store's size as its quota counts it |
//! | `cim:log:inbox:{<user>}`, `cim:log:{group}` | stream | the message log (see [`log`]) |
//! | `cim:log:dedup:{<sender>}:<client id>` | string, TTL | a client message id's first message id |
//! | `cim:log:acked:{<user>}` | hash | `inbox`, `group`: the positions a user acknowledged |
//!
//! Every presence and registry key carries the same hash tag, so in Redis Cluster they live
//! in one slot and a Lua script may change several of them atomically (claim, release, reap
//! a dead node). Key-value keys carry no tag and spread over the cluster. Log keys are
//! tagged by user (and the group stream by `group`): every log command touches one slot.

mod backend;
mod cluster_conn;
mod conn;
mod kv;
pub mod log;
mod restore;

use std::sync::LazyLock;

use cim_proto::User;
use redis::{AsyncCommands, RedisError, Script};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

pub use self::conn::{CLUSTER_SCHEME, Endpoint, RedisConn, ScanPosition, redacted};
pub use self::restore::{PresenceCounts, RESTORE_BATCH, Restored};
use super::{Claim, OnlineEntry, StoreError};

/// The key prefix used when none is configured (`--redis-prefix`).
pub const DEFAULT_PREFIX: &str = "cim:";

/// Keys asked of the server per `SCAN` step.
pub(crate) const SCAN_COUNT: usize = 1000;
/// Users asked per `HMGET` of the online hash.
const LOOKUP_CHUNK: usize = 1000;

/// Every key and channel name the cluster uses, derived from one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisKeys {
    prefix: String,
    /// `{<prefix>presence}`: the hash tag shared by every presence and registry key.
    tag: String,
}

impl RedisKeys {
    /// Fails if the prefix contains `{` or `}`, which would change the hash tag.
    pub fn new(prefix: &str) -> Result<Self, StoreError> {
        if prefix.contains(['{', '}']) {
            return Err(StoreError::Unavailable(format!(
                "invalid redis prefix {prefix:?}: it must not contain '{{' or '}}' (they would change the cluster hash tag)"
            )));
        }
        Ok(RedisKeys { prefix: prefix.to_owned(), tag: format!("{{{prefix}presence}}") })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Hash: user id → [`PresenceValue`] JSON.
    pub fn online(&self) -> String {
        format!("{}:online", self.tag)
    }

    /// Set: ids of the users claimed by `node_id`.
    pub fn node_users(&self, node_id: &str) -> String {
        format!("{}:node-users:{node_id}", self.tag)
    }

    /// Set: ids of the nodes that have a [`Self::node_users`] set.
    pub fn nodes_with_users(&self) -> String {
        format!("{}:nodes-with-users", self.tag)
    }

    /// String with a TTL: the registry entry of `node_id`.
    pub fn node(&self, node_id: &str) -> String {
        format!("{}:node:{node_id}", self.tag)
    }

    /// Set: ids of the nodes that have registered (some may have expired since).
    pub fn nodes(&self) -> String {
        format!("{}:nodes", self.tag)
    }

    /// Hash: the leases of message-id node numbers (see `cluster::node_number`).
    pub fn node_numbers(&self) -> String {
        format!("{}:node-numbers", self.tag)
    }

    /// The key-value key `key` of the handler store `store`.
    pub fn kv(&self, store: &str, key: &str) -> String {
        format!("{}{key}", self.kv_store(store))
    }

    /// Hash: the size of the handler store `store` (`keys`, `bytes`), kept by the hosts.
    pub fn kv_usage(&self, store: &str) -> String {
        format!("{}kv-usage:{}", self.prefix, encode_store(store))
    }

    /// The prefix of every key of the handler store `store`. `:` and `%` in the store name
    /// are percent-encoded so that store `a:b` never sees the keys of store `a`.
    pub fn kv_store(&self, store: &str) -> String {
        format!("{}kv:{}:", self.prefix, encode_store(store))
    }

    /// Stream: the message log's `stream`, tagged with its user (or `group`) so that each
    /// stream is one slot of a Redis Cluster.
    pub fn log_stream(&self, stream: crate::store::LogStream) -> String {
        match stream {
            crate::store::LogStream::Inbox(user) => format!("{}log:inbox:{{{user}}}", self.prefix),
            crate::store::LogStream::Group => format!("{}log:{{group}}", self.prefix),
        }
    }

    /// String with a TTL: the message id `sender` first sent with `client_msg_id`.
    pub fn log_dedup(&self, sender: u64, client_msg_id: &str) -> String {
        format!("{}log:dedup:{{{sender}}}:{client_msg_id}", self.prefix)
    }

    /// Hash `inbox`, `group`: the log positions `user` acknowledged.
    pub fn log_acked(&self, user: u64) -> String {
        format!("{}log:acked:{{{user}}}", self.prefix)
    }

    /// Pub/sub channel on which `node_id` receives messages for its users.
    pub fn inbox(&self, node_id: &str) -> String {
        format!("{}node:{node_id}:inbox", self.prefix)
    }

    /// Pub/sub channel every node listens to.
    pub fn cluster_channel(&self) -> String {
        format!("{}cluster", self.prefix)
    }
}

/// `:` and `%` of a store name percent-encoded.
fn encode_store(store: &str) -> String {
    store.replace('%', "%25").replace(':', "%3A")
}

/// An online entry as stored in the `online` hash. `conn_id` is a string so that the Lua
/// scripts (whose JSON numbers are doubles) compare it exactly.
#[derive(Debug, Serialize, Deserialize)]
struct PresenceValue {
    name: String,
    node_id: String,
    conn_id: String,
    /// Absent in entries written before resume tokens.
    #[serde(default)]
    resume: String,
}

impl PresenceValue {
    fn encode(entry: &OnlineEntry) -> String {
        let value = PresenceValue {
            name: entry.user.name.clone(),
            node_id: entry.node_id.clone(),
            conn_id: entry.conn_id.to_string(),
            resume: entry.resume.clone(),
        };
        // A struct of strings always serializes.
        serde_json::to_string(&value).unwrap_or_default()
    }

    fn decode(user_id: u64, json: &str) -> Result<OnlineEntry, StoreError> {
        let corrupt = |why: String| {
            StoreError::Unavailable(format!("corrupt presence entry for user {user_id}: {why}: {json:?}"))
        };
        let v: PresenceValue = serde_json::from_str(json).map_err(|e| corrupt(e.to_string()))?;
        let conn_id = v.conn_id.parse().map_err(|_| corrupt(format!("bad conn_id {:?}", v.conn_id)))?;
        Ok(OnlineEntry {
            user: User { id: user_id, name: v.name },
            node_id: v.node_id,
            conn_id,
            resume: v.resume,
        })
    }
}

/// KEYS: online, node-users, nodes-with-users. ARGV: user id, value, node id.
/// Returns nil when claimed, else the existing value.
static CLAIM: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 1 then
  redis.call('SADD', KEYS[2], ARGV[1])
  redis.call('SADD', KEYS[3], ARGV[3])
  return false
end
return redis.call('HGET', KEYS[1], ARGV[1])
",
    )
});

/// KEYS: online, node-users, nodes-with-users. ARGV: user id, node id, conn id.
/// Returns 1 if the entry belonged to that connection and was removed.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local ok, e = pcall(cjson.decode, v)
if not ok or e.node_id ~= ARGV[2] or e.conn_id ~= ARGV[3] then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[2]) end
return 1
",
    )
});

/// KEYS: online, old node-users, new node-users, nodes-with-users. ARGV: user id, old node id,
/// old conn id, new value, new node id. Returns 1 if the entry was still the old one and now
/// is the new one.
static REPLACE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local ok, e = pcall(cjson.decode, v)
if not ok or e.node_id ~= ARGV[2] or e.conn_id ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
if ARGV[2] ~= ARGV[5] then
  redis.call('SREM', KEYS[2], ARGV[1])
  if redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[4], ARGV[2]) end
end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[5])
return 1
",
    )
});

/// Maps a Redis error on `key` (the caller's key, not the Redis one) to a [`StoreError`].
pub(crate) fn store_error(op: &str, key: &str, e: RedisError) -> StoreError {
    if is_wrong_type(&e) {
        StoreError::WrongType { key: key.to_owned() }
    } else {
        StoreError::Unavailable(format!("redis {op} {key}: {e}"))
    }
}

/// A `WRONGTYPE` reply, alone or inside a transaction's results.
fn is_wrong_type(e: &RedisError) -> bool {
    e.code() == Some("WRONGTYPE")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errs| errs.iter().any(|(_, s)| s.code() == "WRONGTYPE"))
}

/// Redis glob syntax escaped, so that a literal prefix can be followed by `*`.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Presence and key-value data in Redis (one server or a Redis Cluster). Cheap to clone:
/// every clone shares one [`RedisConn`], which multiplexes commands and reconnects on its own.
#[derive(Debug, Clone)]
pub struct RedisStore {
    endpoint: Endpoint,
    conn: RedisConn,
    keys: RedisKeys,
}

impl RedisStore {
    /// Connects to `url` and checks the server answers: `redis://host:port/db` (one server,
    /// or any node of a Redis Cluster, which is detected) or
    /// `redis-cluster://host:port,host:port` (a cluster by several seed nodes).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let keys = RedisKeys::new(prefix)?;
        let (endpoint, detected) = Endpoint::parse(url)?.detect().await?;
        if detected {
            info!(redis = %endpoint.describe(), "the redis server is a Redis Cluster node; using the cluster client");
        }
        let conn = endpoint.connect().await?;
        Ok(RedisStore { endpoint, conn, keys })
    }

    pub fn keys(&self) -> &RedisKeys {
        &self.keys
    }

    /// The shared connection (a cheap handle).
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The message log in this Redis, kept per `retention`.
    pub fn log(&self, retention: crate::store::Retention) -> std::sync::Arc<log::RedisLog> {
        std::sync::Arc::new(log::RedisLog::new(self.conn.clone(), self.keys.clone(), retention))
    }

    /// Where the store connects, for callers that need a dedicated connection (pub/sub).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    pub async fn claim(&self, entry: OnlineEntry) -> Result<Claim, StoreError> {
        let user_id = entry.user.id;
        let existing: Option<String> = CLAIM
            .key(self.keys.online())
            .key(self.keys.node_users(&entry.node_id))
            .key(self.keys.nodes_with_users())
            .arg(user_id)
            .arg(PresenceValue::encode(&entry))
            .arg(&entry.node_id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| presence_error("claim", user_id, e))?;
        match existing {
            None => Ok(Claim::Claimed),
            Some(json) => Ok(Claim::AlreadyOnline(PresenceValue::decode(user_id, &json)?)),
        }
    }

    pub async fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> Result<bool, StoreError> {
        let released: i64 = RELEASE
            .key(self.keys.online())
            .key(self.keys.node_users(node_id))
            .key(self.keys.nodes_with_users())
            .arg(user_id)
            .arg(node_id)
            .arg(conn_id.to_string())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| presence_error("release", user_id, e))?;
        Ok(released == 1)
    }

    pub async fn replace(&self, old: &OnlineEntry, new: OnlineEntry) -> Result<bool, StoreError> {
        let user_id = new.user.id;
        let replaced: i64 = REPLACE
            .key(self.keys.online())
            .key(self.keys.node_users(&old.node_id))
            .key(self.keys.node_users(&new.node_id))
            .key(self.keys.nodes_with_users())
            .arg(user_id)
            .arg(&old.node_id)
            .arg(old.conn_id.to_string())
            .arg(PresenceValue::encode(&new))
            .arg(&new.node_id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| presence_error("replace", user_id, e))?;
        Ok(replaced == 1)
    }

    pub async fn lookup(&self, user_id: u64) -> Result<Option<OnlineEntry>, StoreError> {
        let json: Option<String> = self
            .conn
            .clone()
            .hget(self.keys.online(), user_id)
            .await
            .map_err(|e| presence_error("lookup", user_id, e))?;
        json.map(|j| PresenceValue::decode(user_id, &j)).transpose()
    }

    /// The entries of those of `user_ids` who are online (see [`crate::store::Store::lookup_many`]).
    /// An entry that cannot be read is logged and skipped.
    pub async fn lookup_many(&self, user_ids: &[u64]) -> Result<Vec<OnlineEntry>, StoreError> {
        let mut entries = Vec::new();
        for chunk in user_ids.chunks(LOOKUP_CHUNK) {
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(self.keys.online())
                .arg(chunk)
                .query_async(&mut self.conn.clone())
                .await
                .map_err(|e| StoreError::Unavailable(format!("redis HMGET {}: {e}", self.keys.online())))?;
            for (&id, json) in chunk.iter().zip(values) {
                let Some(json) = json else { continue };
                match PresenceValue::decode(id, &json) {
                    Ok(entry) => entries.push(entry),
                    Err(e) => warn!(error = %e, "skipping an online entry"),
                }
            }
        }
        Ok(entries)
    }

    /// Every online user, sorted by id. An entry that cannot be read is logged and skipped,
    /// so one bad entry does not hide everyone else.
    pub async fn online(&self) -> Result<Vec<OnlineEntry>, StoreError> {
        let all: Vec<(String, String)> = self
            .conn
            .clone()
            .hgetall(self.keys.online())
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis HGETALL {}: {e}", self.keys.online())))?;
        let mut entries: Vec<OnlineEntry> = all
            .into_iter()
            .filter_map(|(id, json)| {
                let parsed = id
                    .parse()
                    .map_err(|_| StoreError::Unavailable(format!("corrupt presence user id {id:?}")))
                    .and_then(|id| PresenceValue::decode(id, &json));
                parsed.map_err(|e| warn!(error = %e, "skipping an online entry")).ok()
            })
            .collect();
        entries.sort_by_key(|e| e.user.id);
        Ok(entries)
    }
}

fn presence_error(op: &str, user_id: u64, e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis presence {op} of user {user_id}: {e}"))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! A real Redis for tests: `CIM_TEST_REDIS` or 127.0.0.1:6379, one unique prefix per
    //! test, every key under it deleted by [`TestRedis::cleanup`].

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};

    use super::*;

    pub(crate) fn redis_url() -> String {
        std::env::var("CIM_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
    }

    pub(crate) fn unique_prefix() -> String {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        format!("cimtest:{}:{nanos:x}{}:", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
    }

    #[derive(Debug)]
    pub(crate) struct TestRedis {
        pub(crate) url: String,
        pub(crate) prefix: String,
    }

    impl TestRedis {
        pub(crate) fn new() -> Self {
            Self::on(redis_url())
        }

        /// A fresh prefix on the Redis (or Redis Cluster) at `url`.
        pub(crate) fn on(url: String) -> Self {
            TestRedis { url, prefix: unique_prefix() }
        }

        /// A store on this test's prefix; panics with a clear message if Redis is down.
        pub(crate) async fn store(&self) -> RedisStore {
            match RedisStore::connect(&self.url, &self.prefix).await {
                Ok(s) => s,
                Err(e) => panic!(
                    "these tests need a running Redis at {} (set CIM_TEST_REDIS to another URL): {e}",
                    self.url
                ),
            }
        }

        /// Deletes every key under this test's prefix (plain and hash-tagged).
        pub(crate) async fn cleanup(&self) {
            let store = self.store().await;
            let mut conn = store.connection();
            for pattern in [
                format!("{}*", glob_escape(&self.prefix)),
                format!("{}*", glob_escape(&format!("{{{}", self.prefix))),
            ] {
                let keys = conn.scan(&pattern).await.expect("scan test keys");
                if !keys.is_empty() {
                    conn.del::<_, ()>(keys).await.expect("delete test keys");
                }
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod test_cluster;
#[cfg(test)]
mod tests;
