//! Presence in bulk, for a node that puts its sessions back after Redis lost them: claim
//! and release many users of one node in one script call each, so that restoring thousands
//! of users costs a few round trips, not one per user.

use std::sync::LazyLock;

use redis::{Script, Value};

use super::{PresenceValue, RedisStore};
use crate::store::{OnlineEntry, StoreError};

/// Users per script call of [`RedisStore::restore_many`] and [`RedisStore::release_many`]:
/// big enough that a rebuild of 15,000 users takes 15 round trips, small enough that one
/// call keeps the server busy for about a millisecond.
pub const RESTORE_BATCH: usize = 1000;

/// What [`RedisStore::restore_many`] found for one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restored {
    /// The user was not online; now they are, on this node and connection.
    Claimed,
    /// Redis already named this node and connection.
    Held,
    /// The user is online somewhere else (or on another connection of this node).
    Taken(OnlineEntry),
}

/// KEYS: online, node-users, nodes-with-users. ARGV: node id, then (user id, value, conn id)
/// per user. Per user: 0 if claimed, 1 if already this node's with this connection, else
/// the existing value.
static RESTORE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local out = {}
for i = 2, #ARGV, 3 do
  local u, v, c = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if redis.call('HSETNX', KEYS[1], u, v) == 1 then
    redis.call('SADD', KEYS[2], u)
    out[#out + 1] = 0
  else
    local cur = redis.call('HGET', KEYS[1], u)
    local ok, e = pcall(cjson.decode, cur)
    if ok and e.node_id == ARGV[1] and e.conn_id == c then
      redis.call('SADD', KEYS[2], u)
      out[#out + 1] = 1
    else
      out[#out + 1] = cur
    end
  end
end
if #ARGV > 1 then redis.call('SADD', KEYS[3], ARGV[1]) end
return out
",
    )
});

/// KEYS: online, node-users, nodes-with-users. ARGV: node id, then (user id, conn id) per
/// user. Removes each entry that still names that node and connection; returns how many.
static RELEASE_MANY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local n = 0
for i = 2, #ARGV, 2 do
  local u, c = ARGV[i], ARGV[i + 1]
  local v = redis.call('HGET', KEYS[1], u)
  if v then
    local ok, e = pcall(cjson.decode, v)
    if ok and e.node_id == ARGV[1] and e.conn_id == c then
      redis.call('HDEL', KEYS[1], u)
      redis.call('SREM', KEYS[2], u)
      n = n + 1
    end
  end
end
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('SREM', KEYS[3], ARGV[1]) end
return n
",
    )
});

/// KEYS: online, node-users of one node, nodes-with-users. ARGV: the node-users key of a
/// node with an empty id (the prefix every node's set shares). Returns that node's
/// node-users count, the online entries in all, and the node-users members in all.
static COUNTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local members = 0
for _, n in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  members = members + redis.call('SCARD', ARGV[1] .. n)
end
return {redis.call('SCARD', KEYS[2]), redis.call('HLEN', KEYS[1]), members}
",
    )
});

/// Presence counts, read in one atomic script (see [`RedisStore::presence_counts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceCounts {
    /// Users the node's `node-users` set names.
    pub mine: u64,
    /// Entries of the `online` hash (every node's).
    pub entries: u64,
    /// Members of every node's `node-users` set. Every presence script changes an entry
    /// and its member together, so this equals `entries` unless keys were lost or changed
    /// behind the scripts' back.
    pub members: u64,
}

fn bulk_error(op: &str, node_id: &str, n: usize, e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis presence {op} of {n} users of node {node_id}: {e}"))
}

impl RedisStore {
    /// Claims every entry of `entries` (all of node `node_id`) that is not online, in one
    /// atomic script per [`RESTORE_BATCH`] users; says per entry what it found, in order.
    pub async fn restore_many(
        &self,
        node_id: &str,
        entries: &[OnlineEntry],
    ) -> Result<Vec<Restored>, StoreError> {
        let mut out = Vec::with_capacity(entries.len());
        for batch in entries.chunks(RESTORE_BATCH) {
            let mut call = RESTORE.prepare_invoke();
            call.key(self.keys.online())
                .key(self.keys.node_users(node_id))
                .key(self.keys.nodes_with_users())
                .arg(node_id);
            for e in batch {
                call.arg(e.user.id).arg(PresenceValue::encode(e)).arg(e.conn_id.to_string());
            }
            let replies: Vec<Value> = call
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| bulk_error("restore", node_id, batch.len(), e))?;
            if replies.len() != batch.len() {
                return Err(StoreError::Unavailable(format!(
                    "redis presence restore: {} replies for {} users",
                    replies.len(),
                    batch.len()
                )));
            }
            for (e, reply) in batch.iter().zip(replies) {
                out.push(match reply {
                    Value::Int(0) => Restored::Claimed,
                    Value::Int(_) => Restored::Held,
                    other => {
                        let json: String = redis::from_redis_value(other)
                            .map_err(|err| bulk_error("restore", node_id, batch.len(), err.into()))?;
                        Restored::Taken(PresenceValue::decode(e.user.id, &json)?)
                    }
                });
            }
        }
        Ok(out)
    }

    /// One round trip: how many users node `node_id` holds by its `node-users` set, and
    /// whether the `online` hash and the `node-users` sets still agree (see [`PresenceCounts`]).
    /// Costs the server one `SCARD` per node, whatever the number of users.
    pub async fn presence_counts(&self, node_id: &str) -> Result<PresenceCounts, StoreError> {
        let (mine, entries, members): (u64, u64, u64) = COUNTS
            .key(self.keys.online())
            .key(self.keys.node_users(node_id))
            .key(self.keys.nodes_with_users())
            .arg(self.keys.node_users(""))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| StoreError::Unavailable(format!("redis presence counts of node {node_id}: {e}")))?;
        Ok(PresenceCounts { mine, entries, members })
    }

    /// Releases each `(user id, conn id)` whose entry still names node `node_id` and that
    /// connection, in one atomic script per [`RESTORE_BATCH`] users; returns how many it removed.
    pub async fn release_many(&self, node_id: &str, users: &[(u64, u64)]) -> Result<usize, StoreError> {
        let mut released = 0;
        for batch in users.chunks(RESTORE_BATCH) {
            let mut call = RELEASE_MANY.prepare_invoke();
            call.key(self.keys.online())
                .key(self.keys.node_users(node_id))
                .key(self.keys.nodes_with_users())
                .arg(node_id);
            for (user, conn) in batch {
                call.arg(user).arg(conn.to_string());
            }
            let n: usize = call
                .invoke_async(&mut self.conn.clone())
                .await
                .map_err(|e| bulk_error("release", node_id, batch.len(), e))?;
            released += n;
        }
        Ok(released)
    }
}
