//! Shared state that outlives one connection: who is online where (routes and the online
//! set, [`Presence`]), the key-value stores that handlers use ([`KeyValue`]) and the durable
//! message log ([`MessageLog`]). [`Store`] puts one backend behind each surface: everything
//! in this process ([`memory`]), a log on disk beside in-process presence (`embedded`), or
//! Redis shared by a cluster ([`redis`](self::redis)), a file (or folder) per backend.

pub mod embedded;
pub mod log;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use cim_proto::User;

pub use self::log::{
    Append, Appended, LogEntry, LogRead, LogStream, LoggedMessage, MessageLog, Placed, Retention,
};
pub use self::redis::RedisStore;
pub use memory::MemoryStore;

/// Where one online user is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineEntry {
    pub user: User,
    pub node_id: String,
    /// The connection on that node; lets a closing connection release only its own entry.
    pub conn_id: u64,
    /// The session's resume token: a LOGIN presenting it takes the session over.
    pub resume: String,
}

/// Outcome of trying to mark a user online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// The user is already online; here is where.
    AlreadyOnline(OnlineEntry),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("value at {key} is not a list")]
    WrongType { key: String },
    /// A `list-keys` cursor this store did not make, or one that no longer applies (the
    /// Redis Cluster node it was scanning is gone).
    #[error("invalid list-keys cursor: {0}")]
    BadCursor(String),
    /// The write would take the store over its [`Quota`]; nothing was written.
    #[error("key-value store `{store}` would go over its quota of {limit}")]
    OverQuota { store: String, limit: String },
    /// Stored data that does not read back (a damaged file, a foreign writer).
    #[error("store data is damaged: {0}")]
    Corrupt(String),
}

/// The most one key-value store may hold, checked on every guest write (`set`, `append`,
/// `append-many`). A store's size is its number of keys and its bytes: each key's length
/// plus its value's (a list's: the sum of its entries). A write that would take either over
/// the quota is refused whole, unless it does not grow that measure (so a store over a
/// lowered quota can still be overwritten and shrunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub max_keys: u64,
    pub max_bytes: u64,
}

impl Quota {
    /// No limit: the host's own writes (pushed components, built-in history).
    pub const NONE: Quota = Quota { max_keys: u64::MAX, max_bytes: u64::MAX };

    /// Why `usage` moved by `(keys, bytes)` breaks this quota, if it does.
    pub(crate) fn check(&self, store: &str, usage: (u64, u64), growth: (i64, i64)) -> Result<(), StoreError> {
        let over =
            |used: u64, delta: i64, max: u64| delta > 0 && used.saturating_add(delta.unsigned_abs()) > max;
        let limit = if over(usage.0, growth.0, self.max_keys) {
            format!("{} keys", self.max_keys)
        } else if over(usage.1, growth.1, self.max_bytes) {
            format!("{} bytes", self.max_bytes)
        } else {
            return Ok(());
        };
        Err(StoreError::OverQuota { store: store.to_owned(), limit })
    }
}

impl Default for Quota {
    /// 100,000 keys and 64 MiB per store.
    fn default() -> Self {
        Quota { max_keys: 1_000_000, max_bytes: 1 << 30 }
    }
}

/// Key-value stores whose names begin with this belong to the host (pushed components live
/// in `cim-components`): a manifest may not grant one, and a guest asking for one is denied.
pub const RESERVED_STORE_PREFIX: &str = "cim-";

/// Whether `store` is one of the host's own (see [`RESERVED_STORE_PREFIX`]).
pub fn is_reserved_store(store: &str) -> bool {
    store.starts_with(RESERVED_STORE_PREFIX)
}

/// The most entries one `kv_range` call returns and the most keys one `kv_list_keys` page
/// holds: what a guest may get from one call, whatever it asked for.
pub const MAX_PAGE: usize = 1000;

/// One page of [`Store::kv_list_keys`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPage {
    /// At most the limit asked for, sorted.
    pub keys: Vec<String>,
    /// Opaque: pass it back for the next page; `None` once every key has been listed.
    pub cursor: Option<String>,
}

/// Who is online where. Claims are atomic: a user is online at most once.
#[async_trait]
pub trait Presence: Send + Sync + std::fmt::Debug {
    /// Marks `entry.user` online unless they already are.
    async fn claim(&self, entry: OnlineEntry) -> Result<Claim, StoreError>;
    /// Removes the user's entry if it still belongs to this node and connection.
    async fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> Result<bool, StoreError>;
    async fn lookup(&self, user_id: u64) -> Result<Option<OnlineEntry>, StoreError>;
    /// The entries of those of `user_ids` who are online, in no particular order.
    async fn lookup_many(&self, user_ids: &[u64]) -> Result<Vec<OnlineEntry>, StoreError>;
    /// Every online user, sorted by id.
    async fn online(&self) -> Result<Vec<OnlineEntry>, StoreError>;
    /// Puts `new` in place of the user's entry if that is still `old` (same node and
    /// connection): a session taking over another. `false`: the entry changed meanwhile.
    async fn replace(&self, old: &OnlineEntry, new: OnlineEntry) -> Result<bool, StoreError>;
}

/// The handlers' key-value stores. See the methods of [`Store`] of the same names.
#[async_trait]
pub trait KeyValue: Send + Sync + std::fmt::Debug {
    async fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    async fn kv_set(&self, store: &str, key: &str, value: Vec<u8>, quota: Quota) -> Result<(), StoreError>;
    async fn kv_delete(&self, store: &str, key: &str) -> Result<(), StoreError>;
    async fn kv_list_keys(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError>;
    async fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError>;
    async fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError>;
    async fn kv_usage(&self, store: &str) -> Result<(u64, u64), StoreError>;
    async fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError>;
}

/// The store in use: one backend per surface. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    presence: Arc<dyn Presence>,
    kv: Arc<dyn KeyValue>,
    log: Arc<dyn MessageLog>,
    /// Set when the node shares Redis with a cluster.
    redis: Option<Arc<RedisStore>>,
}

impl Store {
    /// Everything in this process, lost with it (tests, comparisons).
    pub fn memory() -> Self {
        Self::memory_with(Retention::default())
    }

    /// Everything in this process, the log kept per `retention`.
    pub fn memory_with(retention: Retention) -> Self {
        let memory = Arc::new(MemoryStore::default());
        Store {
            presence: memory.clone(),
            kv: memory,
            log: Arc::new(log::MemoryLog::new(retention)),
            redis: None,
        }
    }

    /// One node's default: presence and key-value data in this process, the message log on
    /// disk in `dir`.
    pub fn embedded(
        dir: &std::path::Path,
        retention: Retention,
        sync: embedded::LogSync,
    ) -> Result<Self, StoreError> {
        Ok(Self::with_log(embedded::open(dir, retention, sync)?))
    }

    /// Presence and key-value data in this process, the message log in `log`.
    pub fn with_log(log: Arc<dyn MessageLog>) -> Self {
        let memory = Arc::new(MemoryStore::default());
        Store { presence: memory.clone(), kv: memory, log, redis: None }
    }

    /// Connects to Redis at `url`; every key starts with `prefix` (see [`RedisKeys`](self::redis::RedisKeys)).
    pub async fn redis(url: &str, prefix: &str, retention: Retention) -> Result<Self, StoreError> {
        Ok(Self::from_redis(Arc::new(RedisStore::connect(url, prefix).await?), retention))
    }

    /// Everything in `redis`, shared with the cluster; the log kept per `retention`.
    pub fn from_redis(redis: Arc<RedisStore>, retention: Retention) -> Self {
        Store { presence: redis.clone(), kv: redis.clone(), log: redis.log(retention), redis: Some(redis) }
    }

    /// The Redis backend, when the node shares one with a cluster.
    pub fn as_redis(&self) -> Option<&Arc<RedisStore>> {
        self.redis.as_ref()
    }

    /// The durable message log.
    pub fn log(&self) -> &dyn MessageLog {
        &*self.log
    }

    /// Marks `entry.user` online unless they already are (atomically).
    pub async fn claim(&self, entry: OnlineEntry) -> Result<Claim, StoreError> {
        self.presence.claim(entry).await
    }

    /// Removes the user's online entry if it still belongs to this node and connection.
    pub async fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> Result<bool, StoreError> {
        self.presence.release(user_id, node_id, conn_id).await
    }

    pub async fn lookup(&self, user_id: u64) -> Result<Option<OnlineEntry>, StoreError> {
        self.presence.lookup(user_id).await
    }

    /// The online entries of those of `user_ids` who are online, in no particular order: one
    /// `HMGET` per 1,000 users on Redis, so a group given as a member list costs its size,
    /// not the size of the whole online set.
    pub async fn lookup_many(&self, user_ids: &[u64]) -> Result<Vec<OnlineEntry>, StoreError> {
        self.presence.lookup_many(user_ids).await
    }

    /// Every online user, sorted by id.
    pub async fn online(&self) -> Result<Vec<OnlineEntry>, StoreError> {
        self.presence.online().await
    }

    /// Puts `new` in place of the user's entry if it is still `old` (a take-over).
    pub async fn replace(&self, old: &OnlineEntry, new: OnlineEntry) -> Result<bool, StoreError> {
        self.presence.replace(old, new).await
    }

    pub async fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv.kv_get(store, key).await
    }

    /// Stores `value` under `key` unless that would take `store` over `quota`.
    pub async fn kv_set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<(), StoreError> {
        self.kv.kv_set(store, key, value, quota).await
    }

    pub async fn kv_delete(&self, store: &str, key: &str) -> Result<(), StoreError> {
        self.kv.kv_delete(store, key).await
    }

    /// One page of at most `limit` (1..=[`MAX_PAGE`]) keys of `store` that start with
    /// `prefix`, after `cursor` (`None`: from the start). The work per call is bounded: the
    /// memory store walks its sorted map from the cursor, Redis runs a few `SCAN` steps.
    pub async fn kv_list_keys(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        self.kv.kv_list_keys(store, prefix, cursor, limit.clamp(1, MAX_PAGE)).await
    }

    /// Pushes `value` at the head of the list at `key`, keeping at most `max_len` items,
    /// unless that would take `store` over `quota`.
    pub async fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        self.kv.kv_append(store, key, value, max_len, quota).await
    }

    /// Appends every `(key, value)` in order, as [`Store::kv_append`] would one after another;
    /// one round trip on Redis (plus the quota's). Atomic per key, not across keys; a call
    /// that would take `store` over `quota` writes nothing.
    pub async fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        self.kv.kv_append_many(store, entries, max_len, quota).await
    }

    /// How many keys and bytes `store` holds, as its quota counts them (exact in memory;
    /// the host's counters on Redis, see [`RedisStore::kv_usage`]).
    pub async fn kv_usage(&self, store: &str) -> Result<(u64, u64), StoreError> {
        self.kv.kv_usage(store).await
    }

    /// Items `start..=stop` of the list at `key`, newest first; negative indexes count from
    /// the end (like Redis LRANGE). At most `max` (1..=[`MAX_PAGE`]) items, the first ones
    /// of the range: the backend itself stops there, so a long list is never read whole.
    pub async fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        self.kv.kv_range(store, key, start, stop, max.clamp(1, MAX_PAGE)).await
    }
}

/// Opens the store `--store` names: `embedded` (the log in `data_dir/log`), `memory`, or a
/// Redis URL (`redis://`, `rediss://`, `redis-cluster://`) with every key under `redis_prefix`.
pub async fn open(
    spec: &str,
    data_dir: &std::path::Path,
    redis_prefix: &str,
    retention: Retention,
    sync: embedded::LogSync,
) -> anyhow::Result<Store> {
    use anyhow::Context as _;
    Ok(match spec {
        "embedded" => {
            let dir = data_dir.join("log");
            Store::embedded(&dir, retention, sync)
                .with_context(|| format!("opening the message log in {}", dir.display()))?
        }
        "memory" => {
            tracing::warn!(
                "--store memory: messages are lost when the host stops (use the default `embedded` to keep them)"
            );
            Store::memory_with(retention)
        }
        url if ["redis://", "rediss://", self::redis::CLUSTER_SCHEME].iter().any(|s| url.starts_with(s)) => {
            Store::redis(url, redis_prefix, retention)
                .await
                .with_context(|| format!("connecting to the store {}", self::redis::redacted(url)))?
        }
        other => {
            anyhow::bail!(
                "--store must be `embedded`, `memory`, a redis:// or a redis-cluster:// URL, got {other:?}"
            )
        }
    })
}
