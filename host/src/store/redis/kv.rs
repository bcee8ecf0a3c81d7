//! The key-value half of the Redis store: handler data under `<prefix>kv:<store>:`, bounded
//! reads (`LRANGE` with a clamped stop, `SCAN` pages) and the per-store size counters that
//! quotas are checked against.
//!
//! # Quota counters
//! Redis keeps no per-prefix size, so the hosts keep one: the hash `<prefix>kv-usage:<store>`
//! (`keys`, `bytes`). Every write runs as a script on its own key that measures what it adds
//! and frees (a value's old length, the list entries its trim drops) and, for `set` and
//! `append`, refuses itself if the counters as read just before plus that growth would pass
//! the quota (`append-many` measures its whole batch by a dry run of the same script first);
//! the host then adds the growth to the counters (`HINCRBY`, logged if it fails). The counters are
//! another key (another slot on a cluster), so this is not one atomic step: concurrent
//! writers may together overshoot by what they write at once, a host that dies (or a
//! `HINCRBY` that fails) between a write and its count leaves the counters off by that write, and data written before
//! the counters existed (by a 0.1 host) is not counted. Deleting the hash restarts the count.

use std::collections::HashMap;
use std::sync::LazyLock;

use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};

use super::{RedisStore, ScanPosition, glob_escape, store_error};
use crate::store::{KeyPage, Quota, StoreError};

/// `SCAN` steps one `list-keys` page may take before it returns what it has (perhaps
/// nothing, with a cursor), so a sparse prefix on a large keyspace costs bounded work per call.
const MAX_SCAN_STEPS: usize = 8;

/// KEYS: the list. ARGV: start, stop (LRANGE indexes, maybe negative), max.
/// `LRANGE` of at most `max` items from the resolved start. Lua numbers are doubles: the
/// extremes of an i64 lose precision, but only in comparisons against the list's length,
/// and only indexes within the list reach `LRANGE`.
static BOUNDED_RANGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local len = redis.call('LLEN', KEYS[1])
local s, e, max = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if s < 0 then s = len + s end
if e < 0 then e = len + e end
if s < 0 then s = 0 end
if s >= len then return {} end
if e > s + max - 1 then e = s + max - 1 end
if e >= len then e = len - 1 end
if e < s then return {} end
return redis.call('LRANGE', KEYS[1], s, e)
",
    )
});

/// A `list-keys` cursor on Redis, as JSON (opaque to guests).
#[derive(Debug, Serialize, Deserialize)]
struct ListCursor {
    /// Where `SCAN` goes on; `None` once it has been everywhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    next: Option<ScanPosition>,
    /// Keys a step returned beyond the last page's room, listed first next time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pending: Vec<String>,
}

/// KEYS: the key. ARGV: value, key length, keys used, bytes used, max keys, max bytes.
/// `SET`s the value unless the growth it measures breaks the quota. Returns `{status, keys
/// growth, bytes growth}`; status 0 is written, 1 over the key limit, 2 over the byte limit.
static SET: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TYPE', KEYS[1]).ok
local klen = tonumber(ARGV[2])
local old = 0
if t == 'string' then
  old = klen + redis.call('STRLEN', KEYS[1])
elseif t == 'list' then
  old = klen
  for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do old = old + #v end
elseif t ~= 'none' then
  old = klen
end
local dk = (t == 'none') and 1 or 0
local db = klen + #ARGV[1] - old
if dk > 0 and tonumber(ARGV[3]) + dk > tonumber(ARGV[5]) then return {1, 0, 0} end
if db > 0 and tonumber(ARGV[4]) + db > tonumber(ARGV[6]) then return {2, 0, 0} end
redis.call('SET', KEYS[1], ARGV[1])
return {0, dk, db}
",
    )
});

/// KEYS: the list. ARGV: max length, key length, keys used, bytes used, max keys, max bytes,
/// `dry` or `write`, then the values in push order (for `dry`, only their lengths).
/// Measures what pushing them and trimming to max length adds and frees; `write` then does
/// it (1,000 values per `LPUSH`: Lua's `unpack` has a stack limit) unless that breaks the quota. Returns `{status, keys growth, bytes growth}` like SET.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local k = KEYS[1]
local t = redis.call('TYPE', k).ok
if t ~= 'none' and t ~= 'list' then
  return redis.error_reply('WRONGTYPE Operation against a key holding the wrong kind of value')
end
local maxlen, klen = tonumber(ARGV[1]), tonumber(ARGV[2])
local dry = ARGV[7] == 'dry'
local first, n = 8, #ARGV - 7
if n == 0 then return {0, 0, 0} end
local keep_new = math.min(n, maxlen)
local kept = 0
for i = #ARGV - keep_new + 1, #ARGV do
  if dry then kept = kept + tonumber(ARGV[i]) else kept = kept + #ARGV[i] end
end
local dropped = 0
local keep_old = maxlen - keep_new
if redis.call('LLEN', k) > keep_old then
  for _, v in ipairs(redis.call('LRANGE', k, keep_old, -1)) do dropped = dropped + #v end
end
local dk = (t == 'none') and 1 or 0
local db = kept - dropped + dk * klen
if dry then return {0, dk, db} end
if dk > 0 and tonumber(ARGV[3]) + dk > tonumber(ARGV[5]) then return {1, 0, 0} end
if db > 0 and tonumber(ARGV[4]) + db > tonumber(ARGV[6]) then return {2, 0, 0} end
for i = first, #ARGV, 1000 do
  redis.call('LPUSH', k, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('LTRIM', k, 0, maxlen - 1)
return {0, dk, db}
",
    )
});

/// KEYS: the key. Deletes it; returns `{keys freed, bytes freed}` (key length in ARGV[1]).
static DELETE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TYPE', KEYS[1]).ok
if t == 'none' then return {0, 0} end
local size = tonumber(ARGV[1])
if t == 'string' then
  size = size + redis.call('STRLEN', KEYS[1])
elseif t == 'list' then
  for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do size = size + #v end
end
redis.call('DEL', KEYS[1])
return {1, size}
",
    )
});

/// What a write script answered: written with this growth, or refused by the quota.
fn outcome(store: &str, quota: Quota, reply: (i64, i64, i64)) -> Result<(i64, i64), StoreError> {
    let limit = match reply.0 {
        0 => return Ok((reply.1, reply.2)),
        1 => format!("{} keys", quota.max_keys),
        _ => format!("{} bytes", quota.max_bytes),
    };
    Err(StoreError::OverQuota { store: store.to_owned(), limit })
}

impl RedisStore {
    /// The size counters of `store`: `(keys, bytes)` as the hosts counted them (see the
    /// module docs for their precision). Negative counts (a drift) read as zero.
    pub async fn kv_usage(&self, store: &str) -> Result<(u64, u64), StoreError> {
        let key = self.keys.kv_usage(store);
        let (keys, bytes): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("keys")
            .arg("bytes")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis HMGET {key}: {e}")))?;
        let clamp = |n: Option<i64>| u64::try_from(n.unwrap_or(0)).unwrap_or(0);
        Ok((clamp(keys), clamp(bytes)))
    }

    /// The usage `quota` is checked against: none is read when there is no quota.
    async fn usage_for(&self, store: &str, quota: Quota) -> Result<(u64, u64), StoreError> {
        if quota == Quota::NONE { Ok((0, 0)) } else { self.kv_usage(store).await }
    }

    /// Adds a write's growth to the counters of `store`. The write itself has happened, so a
    /// failure here is logged (the counters drift by that write), not reported: an append
    /// the guest retried would land twice.
    async fn count(&self, store: &str, (keys, bytes): (i64, i64)) {
        if keys == 0 && bytes == 0 {
            return;
        }
        let key = self.keys.kv_usage(store);
        let counted = redis::pipe()
            .hincr(&key, "keys", keys)
            .ignore()
            .hincr(&key, "bytes", bytes)
            .ignore()
            .exec_async(&mut self.conn.clone())
            .await;
        if let Err(e) = counted {
            tracing::warn!(store, keys, bytes, error = %e, "a key-value write was not counted towards the store's quota");
        }
    }

    pub async fn kv_get(&self, store: &str, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.conn.clone().get(self.keys.kv(store, key)).await.map_err(|e| store_error("GET", key, e))
    }

    /// `SET` by script, measuring and checking the growth against `quota` (see the module
    /// docs), then counted.
    pub async fn kv_set(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        quota: Quota,
    ) -> Result<(), StoreError> {
        let (keys, bytes) = self.usage_for(store, quota).await?;
        let reply = SET
            .key(self.keys.kv(store, key))
            .arg(value)
            .arg(key.len())
            .arg(keys)
            .arg(bytes)
            .arg(quota.max_keys)
            .arg(quota.max_bytes)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("SET", key, e))?;
        let growth = outcome(store, quota, reply)?;
        self.count(store, growth).await;
        Ok(())
    }

    pub async fn kv_delete(&self, store: &str, key: &str) -> Result<(), StoreError> {
        let (keys, bytes): (i64, i64) = DELETE
            .key(self.keys.kv(store, key))
            .arg(key.len())
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("DEL", key, e))?;
        self.count(store, (-keys, -bytes)).await;
        Ok(())
    }

    /// One page of at most `limit` keys of `store` that start with `prefix` (without the
    /// Redis prefix, sorted within the page), from at most [`MAX_SCAN_STEPS`] `SCAN` steps
    /// of about the room left on the page each.
    ///
    /// The cursor carries the `SCAN` position (and on a cluster, which primary it is on) and
    /// the few keys a step returned beyond the page's room (`SCAN`'s `COUNT` is a hint), so
    /// no key is skipped and a page never exceeds `limit`. `SCAN` itself may return a key
    /// twice (while Redis resizes its table); a listing may then repeat it.
    pub async fn kv_list_keys(
        &self,
        store: &str,
        prefix: &str,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<KeyPage, StoreError> {
        let limit = limit.max(1);
        let base = self.keys.kv_store(store);
        let pattern = format!("{}*", glob_escape(&format!("{base}{prefix}")));
        let mut at = match cursor {
            None => ListCursor { next: Some(ScanPosition::default()), pending: Vec::new() },
            Some(c) => serde_json::from_str(c).map_err(|e| StoreError::BadCursor(e.to_string()))?,
        };
        let take = at.pending.len().min(limit);
        let mut keys: Vec<String> = at.pending.drain(..take).collect();
        let mut steps = 0;
        while keys.len() < limit && steps < MAX_SCAN_STEPS {
            let Some(from) = at.next.take() else { break };
            let (batch, next) = self.conn.scan_step(&pattern, &from, limit - keys.len()).await?;
            at.next = next;
            steps += 1;
            for key in batch.into_iter().filter_map(|k| k.strip_prefix(&base).map(str::to_owned)) {
                if keys.len() < limit { keys.push(key) } else { at.pending.push(key) }
            }
        }
        keys.sort_unstable();
        keys.dedup();
        let cursor = if at.next.is_none() && at.pending.is_empty() {
            None
        } else {
            Some(serde_json::to_string(&at).map_err(|e| StoreError::BadCursor(e.to_string()))?)
        };
        Ok(KeyPage { keys, cursor })
    }

    /// `LPUSH` then `LTRIM` to `max_len` (at least 1) in one script, which measures and
    /// checks the growth against `quota` first; then counted.
    pub async fn kv_append(
        &self,
        store: &str,
        key: &str,
        value: Vec<u8>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        let usage = self.usage_for(store, quota).await?;
        let reply = self.append_script(store, key, vec![value], max_len, usage, quota).await?;
        let growth = outcome(store, quota, reply)?;
        self.count(store, growth).await;
        Ok(())
    }

    /// One [`APPEND`] of `values` to `key`, checked against `quota` from `usage`.
    async fn append_script(
        &self,
        store: &str,
        key: &str,
        values: Vec<Vec<u8>>,
        max_len: usize,
        usage: (u64, u64),
        quota: Quota,
    ) -> Result<(i64, i64, i64), StoreError> {
        APPEND
            .key(self.keys.kv(store, key))
            .arg(max_len.max(1))
            .arg(key.len())
            .arg(usage.0)
            .arg(usage.1)
            .arg(quota.max_keys)
            .arg(quota.max_bytes)
            .arg("write")
            .arg(values)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| store_error("LPUSH", key, e))
    }

    /// Appends every `(key, value)` in order: per key, one [`APPEND`] script pushing its
    /// values (the last one ends up at the head) and trimming; the keys' scripts go out
    /// together on the multiplexed connection. Keys may live on different shards of a Redis
    /// Cluster.
    ///
    /// With a quota, a dry run of every key's script (values' lengths only) measures the
    /// batch's growth first, together with reading the counters; the batch is written only
    /// if the whole fits, so a refused batch (or a key holding a plain value) writes nothing.
    /// That is two round trips more than without one.
    pub async fn kv_append_many(
        &self,
        store: &str,
        entries: Vec<(String, Vec<u8>)>,
        max_len: usize,
        quota: Quota,
    ) -> Result<(), StoreError> {
        // Values grouped by key, keys in first-seen order.
        let mut by_key: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        for (key, value) in entries {
            match index.get(&key) {
                Some(&i) => by_key[i].1.push(value),
                None => {
                    index.insert(key.clone(), by_key.len());
                    by_key.push((key, vec![value]));
                }
            }
        }
        if quota != Quota::NONE {
            let dry_runs = by_key.iter().map(|(key, values)| {
                let mut conn = self.conn.clone();
                let lengths: Vec<usize> = values.iter().map(Vec::len).collect();
                let mut script = APPEND.key(self.keys.kv(store, key));
                script.arg(max_len.max(1)).arg(key.len()).arg(vec![0u64; 4]).arg("dry").arg(lengths);
                async move {
                    let reply: (i64, i64, i64) =
                        script.invoke_async(&mut conn).await.map_err(|e| store_error("LPUSH", key, e))?;
                    Ok::<_, StoreError>((reply.1, reply.2))
                }
            });
            let (usage, growths) = futures_util::future::try_join(
                self.kv_usage(store),
                futures_util::future::try_join_all(dry_runs),
            )
            .await?;
            let growth = growths.iter().fold((0, 0), |(k, b), (dk, db)| (k + dk, b + db));
            quota.check(store, usage, growth)?;
        }
        let appends = by_key.into_iter().map(|(key, values)| async move {
            self.append_script(store, &key, values, max_len, (0, 0), Quota::NONE).await
        });
        let results = futures_util::future::join_all(appends).await;
        let mut growth = (0, 0);
        let mut failed = None;
        for result in results {
            match result {
                Ok((_, dk, db)) => growth = (growth.0 + dk, growth.1 + db),
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        self.count(store, growth).await;
        failed.map_or(Ok(()), Err)
    }

    /// At most `max` items from `start..=stop`: `LRANGE` with the stop clamped to
    /// `start + max - 1`; when an index counts from the end, a script resolves it with
    /// `LLEN` first (atomically, one round trip). Redis never sends more than `max` items.
    pub async fn kv_range(
        &self,
        store: &str,
        key: &str,
        start: i64,
        stop: i64,
        max: usize,
    ) -> Result<Vec<Vec<u8>>, StoreError> {
        let max = i64::try_from(max.max(1)).unwrap_or(i64::MAX);
        let redis_key = self.keys.kv(store, key);
        let mut conn = self.conn.clone();
        if start >= 0 && stop >= 0 {
            let stop = stop.min(start.saturating_add(max - 1));
            return redis::cmd("LRANGE")
                .arg(redis_key)
                .arg(start)
                .arg(stop)
                .query_async(&mut conn)
                .await
                .map_err(|e| store_error("LRANGE", key, e));
        }
        BOUNDED_RANGE
            .key(redis_key)
            .arg(start)
            .arg(stop)
            .arg(max)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| store_error("LRANGE", key, e))
    }
}
