//! This node's number in message ids (`0..1024`), leased in Redis so that no two live nodes
//! issue ids under one number, with a high-water mark per number so that a node taking a
//! number over starts above every id its previous holders may have issued.
//!
//! # The lease table
//! One hash, `{<prefix>presence}:node-numbers` (under the presence hash tag: the script
//! below touches only it, so it runs on Redis Cluster too). Field `created`: Redis's clock
//! (ms) when the table was made. Field `<n>`: JSON `{"h", "n", "u", "m", "q"}`:
//! - `h`, the holder: `<node id>/<nonce>`, a nonce per process, so a restart is a new holder;
//! - `n`, the holder's node id: a restart under the same id takes its old number back;
//! - `u`, until when the lease lasts (Redis's clock); past it anyone may take the number;
//! - `m`, the mark: the highest counter its holders may issue (a decimal string, since Lua's
//!   numbers are doubles); a holder issues ids only up to a mark it has recorded here, and
//!   every new holder starts above the mark it found;
//! - `q`, quarantine: not before this time (Redis's clock) may the holder issue ids.
//!
//! # Redis wipes
//! A wipe (FLUSHALL, a restart with no persistence) loses the marks while nodes go on
//! issuing ids. A number missing from the table may therefore be in use by a live node that
//! has not refreshed since; so a number taken from a table younger than [`quarantine`]
//! becomes usable only once the table is that old. By then every live node has refreshed
//! (every `ttl / 3`) and put its number back, preempting a newcomer still in quarantine, or
//! has gone [`validity`] without a refresh and run past its ceiling, which covers only that
//! long of the (Redis-offset) clock. A node that finds its number taken switches to another.
//! Fresh clusters pay this wait once, at the first start.
//!
//! One round trip per heartbeat ([`NodeNumber::renew`]); a second one only when the
//! number changed.

use std::sync::LazyLock;
use std::time::Duration;

use redis::Script;
use tracing::{info, warn};

use crate::message_id::MessageIds;
use crate::store::StoreError;
use crate::store::redis::{RedisConn, RedisKeys, RedisStore};

/// KEYS: the table. ARGV: mode (`renew`, `release`), holder, node id, the number held (-1:
/// none), the mark to record, ttl ms, quarantine ms, `1` if the number held is in use.
/// Returns `{number, previous mark, usable from (0: now), Redis's time}`; number -1 when
/// every number is leased.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local holder, node, cur, mark = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local ttl, quarantine, in_use = tonumber(ARGV[6]), tonumber(ARGV[7]), ARGV[8] == '1'
local created = tonumber(redis.call('HGET', KEYS[1], 'created'))
if not created then
  created = now
  redis.call('HSET', KEYS[1], 'created', string.format('%.0f', now))
end
local young = created + quarantine
if young <= now then young = 0 end
local function higher(a, b)
  if #a ~= #b then if #a > #b then return a end return b end
  if a > b then return a end
  return b
end
local function decode(v)
  local ok, e = pcall(cjson.decode, v)
  if ok and type(e) == 'table' and type(e.m) == 'string' and tonumber(e.u) and tonumber(e.q) then return e end
  -- Unreadable: never expires, never anyone's, so its mark is never trusted.
  return {h = '', n = '', u = 1e300, m = '0', q = 0}
end
local function get(n)
  local v = redis.call('HGET', KEYS[1], tostring(n))
  if v then return decode(v) end
  return nil
end
local function put(n, m, q, u)
  if q <= now then q = 0 end
  local e = {h = holder, n = node, u = u or now + ttl, m = m, q = q}
  redis.call('HSET', KEYS[1], tostring(n), cjson.encode(e))
  return q
end
if ARGV[1] == 'release' then
  local e = get(cur)
  if e and e.h == holder then put(cur, higher(e.m, mark), e.q, 0) end
  return {cur, '0', 0, now}
end
if cur >= 0 then
  local e = get(cur)
  if not e then
    -- Lost in a wipe: a node using it goes on; one still waiting waits as a newcomer.
    if in_use then return {cur, '0', put(cur, mark, 0), now} end
    return {cur, '0', put(cur, mark, young), now}
  end
  if e.h == holder then return {cur, '0', put(cur, higher(e.m, mark), e.q), now} end
  -- A newcomer that took it after a wipe has issued nothing yet: the live holder keeps it.
  if in_use and e.q > now then return {cur, e.m, put(cur, higher(e.m, mark), 0), now} end
end
-- A lost number is not taken back from a later instance of this node id.
local allow_same = cur < 0
local same, expired, absent
local taken = {}
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local n = tonumber(all[i])
  if n and all[i] ~= 'created' then
    taken[n] = true
    local e = decode(all[i + 1])
    if allow_same and e.n == node and e.h ~= '' and not same then same = n
    elseif e.u < now and (not expired or n < expired) then expired = n end
  end
end
for n = 0, 1023 do
  if not taken[n] then absent = n break end
end
local n = same or expired or absent
if not n then return {-1, '0', 0, now} end
local e = get(n)
if e then return {n, e.m, put(n, higher(e.m, mark), e.q), now} end
return {n, '0', put(n, mark, young), now}
",
    )
});

/// How long a ceiling covers of the clock past its refresh: `2 ttl / 3`, two heartbeats.
pub fn validity(ttl: Duration) -> Duration {
    ttl * 2 / 3
}

/// How long after the table is (re)made a number missing from it stays unusable: longer than
/// any live node can go on issuing ids on a ceiling recorded before a wipe.
pub fn quarantine(ttl: Duration) -> Duration {
    validity(ttl) + Duration::from_millis(500)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// This node's lease on a number. Driven by one task (the heartbeat), so not shared.
#[derive(Debug)]
pub struct NodeNumber {
    conn: RedisConn,
    keys: RedisKeys,
    holder: String,
    node_id: String,
    ttl: Duration,
    /// The number leased, if any.
    number: Option<u64>,
    /// Whether ids are issued under it (it is out of quarantine).
    in_use: bool,
}

impl NodeNumber {
    /// A lease for `node_id`, to be [`acquire`](Self::acquire)d. `ttl` is the registry TTL:
    /// the lease lasts as long and is renewed with the same heartbeat.
    pub fn new(store: &RedisStore, node_id: &str, ttl: Duration) -> Self {
        let nonce = std::process::id() as u64 ^ crate::message_id::now_ms().rotate_left(20) ^ nonce_salt();
        NodeNumber {
            conn: store.connection(),
            keys: store.keys().clone(),
            holder: format!("{node_id}/{nonce:x}"),
            node_id: node_id.to_owned(),
            ttl,
            number: None,
            in_use: false,
        }
    }

    pub fn number(&self) -> Option<u64> {
        self.number
    }

    /// Takes a number for `ids` and waits until ids may be issued under it (see the module
    /// docs for the wait after a wipe, or on a fresh cluster).
    pub async fn acquire(&mut self, ids: &MessageIds) -> Result<(), StoreError> {
        ids.suspend();
        while let Some(wait) = self.renew(ids).await? {
            info!(number = ?self.number, wait_ms = millis(wait), "waiting before issuing message ids under a number a node may have held before redis lost it");
            tokio::time::sleep(wait).await;
        }
        Ok(())
    }

    /// Renews the lease and raises `ids`' ceiling: one round trip, two when the number was
    /// lost (Redis wiped, or this node stalled past its TTL) and another one taken. Returns
    /// how long the number stays in quarantine, if it does (ids are not issued meanwhile).
    pub async fn renew(&mut self, ids: &MessageIds) -> Result<Option<Duration>, StoreError> {
        for _ in 0..3 {
            let ceiling = ids.ceiling_ahead(millis(validity(self.ttl)));
            let before = ids.clock_ms();
            let (number, previous, usable_from, now): (i64, String, i64, i64) = LEASE
                .key(self.keys.node_numbers())
                .arg("renew")
                .arg(&self.holder)
                .arg(&self.node_id)
                .arg(self.number.map_or(-1, |n| n as i64))
                .arg(ceiling.to_string())
                .arg(millis(self.ttl))
                .arg(millis(quarantine(self.ttl)))
                .arg(if self.in_use { "1" } else { "0" })
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| StoreError::Unavailable(format!("redis node-number lease: {e}")))?;
            let after = ids.clock_ms();
            ids.set_offset_ms(now - (before / 2 + after / 2) as i64);
            let Ok(number) = u64::try_from(number) else {
                ids.suspend();
                (self.number, self.in_use) = (None, false);
                return Err(StoreError::Unavailable(
                    "every message-id node number (1024) is leased by a live node".into(),
                ));
            };
            let previous: u64 = previous.parse().map_err(|_| {
                StoreError::Unavailable(format!("corrupt node-number mark {previous:?} for number {number}"))
            })?;
            if self.number != Some(number) {
                ids.suspend();
                if let Some(old) = self.number {
                    warn!(
                        old,
                        new = number,
                        "this node's message-id number was taken (redis lost it, or this node stalled past its ttl); switched to another"
                    );
                }
                self.number = Some(number);
                self.in_use = false;
            }
            if previous > ids.counter() {
                // Start above what earlier holders may have issued; the ceiling recorded
                // may now be below the counter: record a higher one.
                ids.suspend();
                ids.switch(number, previous);
                self.in_use = false;
                continue;
            }
            ids.switch(number, previous);
            if usable_from > now {
                ids.suspend();
                self.in_use = false;
                return Ok(Some(Duration::from_millis((usable_from - now) as u64)));
            }
            if ceiling < ids.ceiling_ahead(millis(validity(self.ttl)) / 2) {
                // Made before the offset to Redis's clock was known (a clock far behind):
                // record one that covers the time ahead.
                continue;
            }
            ids.extend(ceiling);
            self.in_use = true;
            return Ok(None);
        }
        Err(StoreError::Unavailable("node-number lease: could not settle on a ceiling".into()))
    }

    /// Gives the number up (shutdown): the lease ends now and the next holder may take the
    /// number at once, starting above its mark (which covers every ceiling this node used).
    pub async fn release(&mut self, ids: &MessageIds) -> Result<(), StoreError> {
        let Some(number) = self.number else { return Ok(()) };
        let _: (i64, String, i64, i64) = LEASE
            .key(self.keys.node_numbers())
            .arg("release")
            .arg(&self.holder)
            .arg(&self.node_id)
            .arg(number)
            .arg(ids.counter().to_string())
            .arg(millis(self.ttl))
            .arg(millis(quarantine(self.ttl)))
            .arg("0")
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis node-number release: {e}")))?;
        Ok(())
    }
}

/// Tells apart leases taken in one process in the same millisecond.
fn nonce_salt() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests;
