//! The message log on Redis Streams: one stream per inbox and one for the group.
//!
//! # Keys
//! Made by [`RedisKeys`]; every one carries a hash tag, so on a Redis Cluster each command
//! and each script touches one slot (no script ever spans two streams):
//!
//! | key | type | what |
//! |---|---|---|
//! | `<prefix>log:inbox:{<user>}` | stream | one user's private messages, field `m`: [`LoggedMessage::encode`] |
//! | `<prefix>log:{group}` | stream | the group's messages |
//! | `<prefix>log:dedup:{<sender>}:<client id>` | string, TTL | the message id first sent with that client id |
//! | `<prefix>log:acked:{<user>}` | hash | `inbox`, `group`: the positions the user acknowledged |
//!
//! # Positions
//! A stream entry id `ms-seq` is the position `(ms << 20) | seq`, so positions order as the
//! ids do. This needs `seq < 2^20`, which the append script guarantees: it makes the ids
//! itself the way `XADD *` would (the server clock, or the last id's millisecond when the
//! clock is behind it) and moves on to the next millisecond after 2^20 entries in one, which
//! keeps the order. Ids come from the Redis server's clock, so positions keep growing after
//! Redis loses its data (a wipe, a restart without persistence): a client's saved position
//! never hides entries written after that. (Messages stored before a wipe are gone.)
//!
//! The append script also answers each stream's last id before it wrote, so that every
//! entry written knows its predecessor ([`Placed::prev`]; `0` when the stream was empty or
//! lost) and nodes can see a gap in what reached them live.
//!
//! # Round trips
//! An [`append`](MessageLog::append) of a whole batch is one pipeline of `SET NX GET` for its
//! client ids (none when no append carries one) and one pipeline with one script call per
//! stream written, whatever the batch size. On a Redis Cluster a pipeline may address one
//! slot only, so each is split by slot and the parts run concurrently. A read is one
//! pipeline (`XRANGE` + `XINFO STREAM`) on one key.
//!
//! # De-duplication
//! A client id is claimed before its entries are written, in another slot than the streams,
//! so the two are not one atomic step; the claim says whether its entries were written:
//! `SET NX GET` leaves `<message id>`, and once the entries are in, it becomes
//! `<message id>:written` (one more pipelined round trip per batch that carries client ids).
//! A resend that finds a written claim is a duplicate: nothing is written, the first message
//! id is answered. A resend that finds an unfinished claim (its node died between the two
//! steps, or the first attempt is still under way) writes the message again **under the
//! first message id**: at worst the log holds it twice with one id, which receivers drop
//! by id (at least once, never lost). If writing the entries fails, the fresh claims are
//! deleted again (a write that failed part-way, on one primary of a cluster, keeps what it
//! wrote, and the resend writes that again: at least once).
//!
//! # Trimming
//! Retention trims exactly (not `~`), on every append to the stream, in the append script:
//! the count past [`Retention::max_entries`] and the entries older than
//! [`Retention::max_age`] by their id's millisecond. Redis records only what `XDEL` drops as
//! the stream's `max-deleted-entry-id`, not what trimming drops, so the script sets it
//! (`XSETID … MAXDELETEDID`) to the last entry it dropped; reads report it as
//! [`LogRead::trimmed_through`]. A stream nobody appends to keeps its old entries until the
//! next append.

use std::collections::HashMap;
use std::sync::LazyLock;

use async_trait::async_trait;
use cim_proto::Positions;
use futures_util::future::try_join_all;
use redis::cluster_routing::Slot;
use redis::{Cmd, RedisError, RedisResult, Script, Value};

use super::{RedisConn, RedisKeys};
use crate::store::StoreError;
use crate::store::log::{
    Append, Appended, LogEntry, LogRead, LogStream, LoggedMessage, MessageLog, Placed, Retention,
};

/// Bits of a position that hold the entry id's sequence number.
const SEQ_BITS: u32 = 20;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
/// The largest millisecond a position can hold (year 2527).
const MAX_MS: u64 = u64::MAX >> SEQ_BITS;

/// The position of the stream entry id `ms-seq`.
pub fn position_of(id: &str) -> Result<u64, StoreError> {
    let bad = |why: &str| StoreError::Corrupt(format!("stream entry id {id:?} {why}"));
    let (ms, seq) = id.split_once('-').ok_or_else(|| bad("is not ms-seq"))?;
    let ms: u64 = ms.parse().map_err(|_| bad("has a bad millisecond part"))?;
    let seq: u64 = seq.parse().map_err(|_| bad("has a bad sequence part"))?;
    if seq > SEQ_MASK || ms > MAX_MS {
        return Err(bad("does not fit a position (sequence ≥ 2^20 or millisecond ≥ 2^44)"));
    }
    Ok((ms << SEQ_BITS) | seq)
}

/// The stream entry id of `position`.
pub fn id_of(position: u64) -> String {
    format!("{}-{}", position >> SEQ_BITS, position & SEQ_MASK)
}

/// KEYS: one stream. ARGV: max entries, max age in ms, then the encoded entries.
/// Appends the entries with ids made here (see the module docs), trims past the count and
/// the age exactly, and records the last dropped id as the stream's `max-deleted-entry-id`
/// (Redis records only what `XDEL` drops there, not what trimming drops).
/// Returns the stream's last id before the call (`0-0`: no stream), then the new entries' ids.
static APPEND: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local key = KEYS[1]
local seqs = 1048576
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms, seq = now, -1
local prev = '0-0'
if redis.call('EXISTS', key) == 1 then
  local info = redis.call('XINFO', 'STREAM', key)
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      prev = info[i + 1]
      local m, s = string.match(prev, '^(%d+)-(%d+)$')
      m, s = tonumber(m), tonumber(s)
      if m >= now then ms, seq = m, s end
    end
  end
end
local ids = {prev}
for i = 3, #ARGV do
  seq = seq + 1
  if seq >= seqs then ms, seq = ms + 1, 0 end
  local id = string.format('%d-%d', ms, seq)
  redis.call('XADD', key, id, 'm', ARGV[i])
  ids[#ids + 1] = id
end
local dropped = false
local over = redis.call('XLEN', key) - tonumber(ARGV[1])
if over > 0 then
  local gone = redis.call('XRANGE', key, '-', '+', 'COUNT', over)
  dropped = gone[#gone][1]
  redis.call('XTRIM', key, 'MAXLEN', ARGV[1])
end
local cutoff = now - tonumber(ARGV[2])
if cutoff > 0 then
  local oldest = string.format('%d-0', cutoff)
  -- XREVRANGE from an id below every entry walks the whole stream (1.6 ms at 10,000
  -- entries on Redis 7.0): look for it only when the first entry is past the age.
  local old = {}
  if #redis.call('XRANGE', key, '-', '(' .. oldest, 'COUNT', 1) > 0 then
    old = redis.call('XREVRANGE', key, '(' .. oldest, '-', 'COUNT', 1)
  end
  if #old > 0 then
    dropped = old[1][1]
    redis.call('XTRIM', key, 'MINID', oldest)
  end
end
if dropped and #ids > 1 then
  redis.call('XSETID', key, ids[#ids], 'MAXDELETEDID', dropped)
end
return ids
",
    )
});

/// KEYS: a user's acked hash. ARGV: inbox, group positions (decimal). Raises each field to
/// its argument if that is larger. Compared as decimal strings: positions pass 2^53, where
/// Lua's numbers stop being exact.
static ACK: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local fields = {'inbox', 'group'}
for i = 1, 2 do
  local new = ARGV[i]
  local cur = redis.call('HGET', KEYS[1], fields[i])
  if not cur or #new > #cur or (#new == #cur and new > cur) then
    redis.call('HSET', KEYS[1], fields[i], new)
  end
end
return 1
",
    )
});

/// The log in Redis, shared by every node of a cluster.
#[derive(Debug, Clone)]
pub struct RedisLog {
    conn: RedisConn,
    keys: RedisKeys,
    retention: Retention,
}

/// What a batch found for its client ids.
struct Claims {
    each: Vec<Claim>,
    /// The keys this batch claimed (deleted again if its entries cannot be written).
    set: Vec<String>,
    /// The keys to mark written, with their message ids, once the entries are in.
    to_mark: Vec<(String, u64)>,
}

/// One append's client id.
#[derive(Debug, Clone, Copy)]
enum Claim {
    /// None, or claimed by this append.
    Fresh,
    /// Claimed and written by an earlier send: a duplicate.
    Written(u64),
    /// Claimed by an earlier send that may not have written its entries.
    Unfinished(u64),
}

/// The entries one append script call writes to one stream: which append and which of its
/// streams each is.
struct StreamWrite {
    key: String,
    targets: Vec<(usize, usize)>,
    entries: Vec<Vec<u8>>,
}

impl RedisLog {
    pub fn new(conn: RedisConn, keys: RedisKeys, retention: Retention) -> Self {
        RedisLog { conn, keys, retention }
    }

    /// Claims the client ids of `appends`, one [`Claim`] per append. Returns the keys this
    /// call set (to undo on failure) and the keys to mark written once the entries are in.
    async fn claim_client_ids(&self, appends: &[Append]) -> Result<Claims, StoreError> {
        let window_ms = u64::try_from(self.retention.dedup_window.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut cmds = Vec::new();
        let mut which = Vec::new();
        for (i, a) in appends.iter().enumerate() {
            if a.client_msg_id.is_empty() {
                continue;
            }
            let key = self.keys.log_dedup(a.message.sender_id, &a.client_msg_id);
            let mut cmd = redis::cmd("SET");
            cmd.arg(&key).arg(a.message.id).arg("NX").arg("GET").arg("PX").arg(window_ms);
            cmds.push((key, cmd));
            which.push(i);
        }
        let mut claims =
            Claims { each: vec![Claim::Fresh; appends.len()], set: Vec::new(), to_mark: Vec::new() };
        if cmds.is_empty() {
            return Ok(claims);
        }
        let keys: Vec<String> = cmds.iter().map(|(k, _)| k.clone()).collect();
        let results = run_batched(&self.conn, cmds).await.map_err(|e| unavailable("SET NX (de-dup)", e))?;
        let mut failure = None;
        for ((i, key), result) in which.into_iter().zip(keys).zip(results) {
            let id = appends[i].message.id;
            match result.and_then(|v| Ok(redis::from_redis_value::<Option<String>>(v)?)) {
                Ok(None) => {
                    claims.set.push(key.clone());
                    claims.to_mark.push((key, id));
                }
                Ok(Some(first)) => {
                    let (digits, written) = match first.strip_suffix(":written") {
                        Some(digits) => (digits, true),
                        None => (first.as_str(), false),
                    };
                    match digits.parse::<u64>() {
                        // Claimed by an earlier append of this very batch: written with it.
                        Ok(first) if written || claims.set.contains(&key) => {
                            claims.each[i] = Claim::Written(first)
                        }
                        Ok(first) => {
                            claims.each[i] = Claim::Unfinished(first);
                            claims.to_mark.push((key, first));
                        }
                        Err(_) => {
                            failure = Some(StoreError::Corrupt(format!("de-dup key {key} holds {first:?}")))
                        }
                    }
                }
                Err(e) => failure = Some(unavailable(&format!("SET NX {key}"), e)),
            }
        }
        if let Some(e) = failure {
            self.release_client_ids(std::mem::take(&mut claims.set)).await;
            return Err(e);
        }
        Ok(claims)
    }

    /// Marks claims written, keeping their expiry: a later resend is then a plain duplicate.
    async fn mark_written(&self, to_mark: Vec<(String, u64)>) -> Result<(), StoreError> {
        if to_mark.is_empty() {
            return Ok(());
        }
        let cmds = to_mark
            .into_iter()
            .map(|(key, id)| {
                let mut cmd = redis::cmd("SET");
                cmd.arg(&key).arg(format!("{id}:written")).arg("XX").arg("KEEPTTL");
                (key, cmd)
            })
            .collect();
        let results = run_batched(&self.conn, cmds).await.map_err(|e| unavailable("SET XX (de-dup)", e))?;
        for r in results {
            r.map_err(|e| unavailable("SET XX (de-dup)", e))?;
        }
        Ok(())
    }

    /// Best effort: the claims of a batch whose entries were not written.
    async fn release_client_ids(&self, keys: Vec<String>) {
        if keys.is_empty() {
            return;
        }
        let cmds = keys
            .into_iter()
            .map(|k| {
                let mut cmd = redis::cmd("DEL");
                cmd.arg(&k);
                (k, cmd)
            })
            .collect();
        if let Err(e) = run_batched(&self.conn, cmds).await {
            tracing::warn!(error = %e, "could not release the client ids of a failed append");
        }
    }

    /// Runs the append script once per stream of `writes`; returns each call's entry ids.
    async fn write_streams(&self, writes: &[StreamWrite]) -> Result<Vec<Vec<String>>, StoreError> {
        let call = |w: &StreamWrite| {
            let mut cmd = redis::cmd("EVALSHA");
            cmd.arg(APPEND.get_hash())
                .arg(1)
                .arg(&w.key)
                .arg(self.retention.max_entries)
                .arg(u64::try_from(self.retention.max_age.as_millis()).unwrap_or(u64::MAX));
            for e in &w.entries {
                cmd.arg(e.as_slice());
            }
            (w.key.clone(), cmd)
        };
        let failed = |e| unavailable("append script", e);
        let mut results = run_batched(&self.conn, writes.iter().map(call).collect()).await.map_err(failed)?;
        // After a restart or SCRIPT FLUSH the script is not cached: load it and run only the
        // calls that were refused (no other call ran, so no stream is written twice).
        let missing: Vec<usize> =
            (0..results.len()).filter(|&i| matches!(&results[i], Err(e) if is_noscript(e))).collect();
        if !missing.is_empty() {
            APPEND.load_async(&mut self.conn.clone()).await.map_err(failed)?;
            let again = run_batched(&self.conn, missing.iter().map(|&i| call(&writes[i])).collect())
                .await
                .map_err(failed)?;
            for (i, r) in missing.into_iter().zip(again) {
                results[i] = r;
            }
        }
        results
            .into_iter()
            .zip(writes)
            .map(|(r, w)| {
                r.and_then(|v| Ok(redis::from_redis_value::<Vec<String>>(v)?))
                    .map_err(|e| unavailable(&format!("append to {}", w.key), e))
            })
            .collect()
    }

    /// `XRANGE`/`XREVRANGE` (`cmd`, on `stream`) and `XINFO STREAM` in one pipeline.
    async fn range(&self, stream: LogStream, mut cmd: Cmd, limit: usize) -> Result<LogRead, StoreError> {
        if limit == 0 {
            // `COUNT 0` is not "none" on every server version; ask only for the bounds.
            cmd = redis::cmd("XLEN");
            cmd.arg(self.keys.log_stream(stream));
        }
        let key = self.keys.log_stream(stream);
        let mut info = redis::cmd("XINFO");
        info.arg("STREAM").arg(&key);
        let mut results = run_batched(&self.conn, vec![(key.clone(), cmd), (key.clone(), info)])
            .await
            .map_err(|e| unavailable(&format!("read {key}"), e))?
            .into_iter();
        let (Some(range), Some(info)) = (results.next(), results.next()) else {
            return Err(StoreError::Unavailable(format!("redis read {key}: a reply is missing")));
        };
        let info = match info {
            Ok(info) => info,
            // No such stream: never written, or wiped.
            Err(e) if e.detail().is_some_and(|d| d.contains("no such key")) => return Ok(LogRead::default()),
            Err(e) => return Err(unavailable(&format!("XINFO STREAM {key}"), e)),
        };
        let info: HashMap<String, Value> = redis::from_redis_value(info)
            .map_err(|e| StoreError::Corrupt(format!("XINFO STREAM {key}: {e}")))?;
        let id = |field: &str| -> Result<u64, StoreError> {
            match info.get(field) {
                Some(v) => {
                    let id: String = redis::from_redis_value_ref(v)
                        .map_err(|e| StoreError::Corrupt(format!("XINFO STREAM {key} {field}: {e}")))?;
                    position_of(&id)
                }
                None => Err(StoreError::Corrupt(format!(
                    "XINFO STREAM {key} has no {field} (the log needs Redis 7.0 or later)"
                ))),
            }
        };
        let (last, trimmed_through) = (id("last-generated-id")?, id("max-deleted-entry-id")?);
        let range = range.map_err(|e| unavailable(&format!("range of {key}"), e))?;
        let mut entries = Vec::new();
        if limit > 0 {
            let rows: Vec<(String, Vec<Vec<u8>>)> = redis::from_redis_value(range)
                .map_err(|e| StoreError::Corrupt(format!("range of {key}: {e}")))?;
            for (id, fields) in rows {
                let Some(bytes) = fields.chunks(2).find(|f| f[0] == b"m").and_then(|f| f.get(1)) else {
                    return Err(StoreError::Corrupt(format!("entry {id} of {key} has no field m")));
                };
                entries
                    .push(LogEntry { position: position_of(&id)?, message: LoggedMessage::decode(bytes)? });
            }
        }
        Ok(LogRead { entries, trimmed_through, last })
    }
}

#[async_trait]
impl MessageLog for RedisLog {
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, StoreError> {
        let claims = self.claim_client_ids(&appends).await?;
        let mut writes: Vec<StreamWrite> = Vec::new();
        let mut by_stream: HashMap<LogStream, usize> = HashMap::new();
        for (i, a) in appends.iter().enumerate() {
            let encoded = match claims.each[i] {
                Claim::Written(_) => continue,
                Claim::Fresh => a.message.encode(),
                // Written again under the first attempt's id, so receivers can drop a copy.
                Claim::Unfinished(first) => LoggedMessage { id: first, ..a.message.clone() }.encode(),
            };
            for (j, stream) in a.streams.iter().enumerate() {
                let w = *by_stream.entry(*stream).or_insert_with(|| {
                    writes.push(StreamWrite {
                        key: self.keys.log_stream(*stream),
                        targets: Vec::new(),
                        entries: Vec::new(),
                    });
                    writes.len() - 1
                });
                writes[w].targets.push((i, j));
                writes[w].entries.push(encoded.clone());
            }
        }
        let mut placed: Vec<Vec<Placed>> =
            appends.iter().map(|a| vec![Placed::default(); a.streams.len()]).collect();
        if !writes.is_empty() {
            let ids = match self.write_streams(&writes).await {
                Ok(ids) => ids,
                Err(e) => {
                    self.release_client_ids(claims.set).await;
                    return Err(e);
                }
            };
            for (w, ids) in writes.iter().zip(ids) {
                // The stream's last id before this call, then one id per entry.
                if ids.len() != w.targets.len() + 1 {
                    return Err(StoreError::Corrupt(format!(
                        "append to {} returned {} ids for {} entries",
                        w.key,
                        ids.len().saturating_sub(1),
                        w.targets.len()
                    )));
                }
                let mut prev = position_of(&ids[0])?;
                for (&(i, j), id) in w.targets.iter().zip(&ids[1..]) {
                    let position = position_of(id)?;
                    placed[i][j] = Placed { position, prev };
                    prev = position;
                }
            }
        }
        // Entries are in; if marking fails the claims stay unfinished and a resend writes
        // the message again under its first id (harmless), so the append still succeeded.
        if let Err(e) = self.mark_written(claims.to_mark).await {
            tracing::warn!(error = %e, "could not mark client ids as written");
        }
        Ok(claims
            .each
            .into_iter()
            .zip(placed)
            .map(|(claim, placed)| match claim {
                Claim::Fresh => Appended::Stored(placed),
                Claim::Written(message_id) => Appended::Duplicate { message_id },
                Claim::Unfinished(message_id) => Appended::Rewritten { message_id, placed },
            })
            .collect())
    }

    async fn read(&self, stream: LogStream, after: u64, limit: usize) -> Result<LogRead, StoreError> {
        let start = if after == 0 { "-".to_owned() } else { format!("({}", id_of(after)) };
        let mut cmd = redis::cmd("XRANGE");
        cmd.arg(self.keys.log_stream(stream)).arg(start).arg("+").arg("COUNT").arg(limit);
        self.range(stream, cmd, limit).await
    }

    async fn read_back(&self, stream: LogStream, before: u64, limit: usize) -> Result<LogRead, StoreError> {
        let end = if before == 0 { "+".to_owned() } else { format!("({}", id_of(before)) };
        let mut cmd = redis::cmd("XREVRANGE");
        cmd.arg(self.keys.log_stream(stream)).arg(end).arg("-").arg("COUNT").arg(limit);
        self.range(stream, cmd, limit).await
    }

    async fn acked(&self, user: u64) -> Result<Option<Positions>, StoreError> {
        let key = self.keys.log_acked(user);
        let (inbox, group): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
            .arg(&key)
            .arg("inbox")
            .arg("group")
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(&format!("HMGET {key}"), e))?;
        if inbox.is_none() && group.is_none() {
            return Ok(None);
        }
        Ok(Some(Positions { inbox: inbox.unwrap_or(0), group: group.unwrap_or(0) }))
    }

    async fn ack(&self, user: u64, positions: Positions) -> Result<(), StoreError> {
        let key = self.keys.log_acked(user);
        ACK.key(&key)
            .arg(positions.inbox.to_string())
            .arg(positions.group.to_string())
            .invoke_async::<()>(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(&format!("ack {key}"), e))
    }
}

fn unavailable(op: &str, e: RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis log {op}: {e}"))
}

fn is_noscript(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}

/// Runs `cmds` (each given with the key it touches) in as few round trips as the
/// connection allows: one pipeline on a single server; on a Redis Cluster, where a pipeline
/// addresses one slot, one per slot, all at once. Results come in the order of `cmds`; a
/// command the server refused is that command's `Err`, the others still count.
async fn run_batched(conn: &RedisConn, cmds: Vec<(String, Cmd)>) -> RedisResult<Vec<RedisResult<Value>>> {
    let mut groups: Vec<(Option<Slot>, Vec<usize>, redis::Pipeline)> = Vec::new();
    for (i, (key, cmd)) in cmds.into_iter().enumerate() {
        let slot = conn.is_cluster().then(|| Slot::for_key(key.as_bytes()));
        let g = match groups.iter().position(|(s, _, _)| *s == slot) {
            Some(g) => g,
            None => {
                let mut pipe = redis::pipe();
                pipe.ignore_errors();
                groups.push((slot, Vec::new(), pipe));
                groups.len() - 1
            }
        };
        groups[g].1.push(i);
        groups[g].2.add_command(cmd);
    }
    let total = groups.iter().map(|(_, idx, _)| idx.len()).sum();
    let replies = try_join_all(groups.iter().map(|(_, _, pipe)| {
        let mut conn = conn.clone();
        async move { pipe.query_async::<Vec<RedisResult<Value>>>(&mut conn).await }
    }))
    .await?;
    let mut out: Vec<Option<RedisResult<Value>>> = (0..total).map(|_| None).collect();
    for ((_, idx, _), replies) in groups.iter().zip(replies) {
        for (&i, r) in idx.iter().zip(replies) {
            out[i] = Some(r);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| Err(RedisError::from((redis::ErrorKind::Parse, "no reply in the pipeline"))))
        })
        .collect())
}

#[cfg(test)]
#[path = "log_tests.rs"]
mod tests;
