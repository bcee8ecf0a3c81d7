//! Shared state that outlives one connection: who is online where (routes and the online
//! set) and the key-value stores that handlers use. One node uses [`memory`]; a cluster
//! shares Redis ([`redis`](self::redis)) behind the same [`Store`] surface.

pub mod memory;
pub mod redis;

use std::sync::Arc;

use cim_proto::User;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;

/// Where one online user is connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineEntry {
    pub user: User,
    pub node_id: String,
    /// The connection on that node; lets a closing connection release only its own entry.
    pub conn_id: u64,
}

/// Outcome of trying to mark a user online.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    Claimed,
    /// The user is already online; here is where.
    AlreadyOnline(OnlineEntry),
}

#[derive(Debug, thiserror::Error)]
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

/// The store backend in use. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Store {
    Memory(Arc<MemoryStore>),
    Redis(Arc<RedisStore>),
}

impl Store {
    pub fn memory() -> Self {
        Store::Memory(Arc::new(MemoryStore::default()))
    }

    /// Connects to Redis at `url`; every key starts with `prefix` (see [`RedisKeys`](self::redis::RedisKeys)).
    pub async fn redis(url: &str, prefix: &str) -> Result<Self, StoreError> {
        Ok(Store::Redis(Arc::new(RedisStore::connect(url, prefix).await?)))
    }

    /// Marks `entry.user` online unless they already are (atomically).
    pub async fn claim(&self, entry: OnlineEntry) -> Result<Claim, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.claim(entry)),
            Store::Redis(r) => r.claim(entry).await,
        }
    }

    /// Removes the user's online entry if it still belongs to this node and connection.
    pub async fn release(&self, user_id: u64, node_id: &str, conn_id: u64) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.release(user_id, node_id, conn_id)),
            Store::Redis(r) => r.release(user_id, node_id, conn_id).await,
        }
    }

    pub async fn lookup(&self, user_id: u64) -> Result<Option<OnlineEntry>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.lookup(user_id)),
            Store::Redis(r) => r.lookup(user_id).await,
        }
    }

    /// The online entries of those of `user_ids` who are online, in no particular order: one
    /// `HMGET` per 1,000 users on Redis, so a group given as a member list costs its size,
    /// not the size of the whole online set.
    pub async fn lookup_many(&self, user_ids: &[u64]) -> Result<Vec<OnlineEntry>, StoreError> {
        match self {
            Store::Memory(m) => Ok(user_ids.iter().filter_map(|&id| m.lookup(id)).collect()),
            Store::Redis(r) => r.lookup_many(user_ids).await,
        }
    }

    /// Every online user, sorted by id.
    pub async fn online(&self) -> Result<Vec<OnlineEntry>, StoreError> {
        match self {
            Store::Memory(m) => Ok(m.online()),
            Store::Redis(r) => r.online().await,
        }
    }

    pub async fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            Store::Memory(m) => m.kv_get(store, key),
            Store::Redis(r) => r.kv_get(store, key).await,
        }
    }

    /// Stores `value` under `key` unless that would take `store` over `quota`.
    pub async fn kv_set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => m.kv_set(store, key, value, quota),
            Store::Redis(r) => r.kv_set(store, key, value, quota).await,
        }
    }

    pub async fn kv_delete(&self, store: &str, key: &str) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                m.kv_delete(store, key);
                Ok(())
            }
            Store::Redis(r) => r.kv_delete(store, key).await,
        }
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
        let limit = limit.clamp(1, MAX_PAGE);
        match self {
            Store::Memory(m) => Ok(m.kv_list_keys(store, prefix, cursor, limit)),
            Store::Redis(r) => r.kv_list_keys(store, prefix, cursor, limit).await,
        }
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
        match self {
            Store::Memory(m) => m.kv_append(store, key, value, max_len, quota),
            Store::Redis(r) => r.kv_append(store, key, value, max_len, quota).await,
        }
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
        match self {
            Store::Memory(m) => m.kv_append_many(store, entries, max_len, quota),
            Store::Redis(r) => r.kv_append_many(store, entries, max_len, quota).await,
        }
    }

    /// How many keys and bytes `store` holds, as its quota counts them (exact in memory;
    /// the host's counters on Redis, see [`RedisStore::kv_usage`]).
    pub async fn kv_usage(&self, store: &str) -> Result<(u64, u64), StoreError> {
        match self {
            Store::Memory(m) => Ok(m.kv_usage(store)),
            Store::Redis(r) => r.kv_usage(store).await,
        }
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
        let max = max.clamp(1, MAX_PAGE);
        match self {
            Store::Memory(m) => m.kv_range(store, key, start, stop, max),
            Store::Redis(r) => r.kv_range(store, key, start, stop, max).await,
        }
    }
}
