//! The node registry: each live node refreshes a Redis key with a TTL; a node whose key has
//! expired is dead, and [`Registry::reap_dead_nodes`] takes its users offline.
//!
//! A node must [`register`](Registry::register) before it claims users: a node that has
//! users but no registry key looks dead and is reaped — by its peers, never by itself. A node
//! whose refresh finds its own key gone (Redis lost it, or the node stalled past its TTL)
//! re-registers and puts its users back instead (see `cluster::member`).

use std::collections::BTreeSet;
use std::sync::LazyLock;
use std::time::Duration;

use redis::{AsyncCommands, Script};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::store::StoreError;
use crate::store::redis::{RedisConn, RedisKeys, RedisStore};

/// What a node tells the cluster about itself; refreshed with every
/// [`register`](Registry::register).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Where clients connect over TCP (`host:port`), as handed out by the route API.
    pub tcp_addr: String,
    /// Where clients connect over WebSocket (`ws://host:port/ws`).
    pub ws_url: String,
    /// The route/admin HTTP API (`host:port`).
    pub http_addr: String,
    /// Open client connections when last registered, for least-connections routing.
    pub connections: u64,
}

/// KEYS: online, node-users, nodes-with-users, node, nodes. ARGV: node id, and `force`.
/// If the node's registry key is gone (or ARGV[2] is `1`), removes the online entries it
/// still owns and its bookkeeping, and returns how many entries it removed; returns -1 if
/// the node is alive.
static REAP: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if ARGV[2] ~= '1' and redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
local n = 0
for _, u in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('HGET', KEYS[1], u)
  if v then
    local ok, e = pcall(cjson.decode, v)
    if ok and e.node_id == ARGV[1] then
      redis.call('HDEL', KEYS[1], u)
      n = n + 1
    end
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('SREM', KEYS[5], ARGV[1])
return n
",
    )
});

/// The node registry. Cheap to clone; shares the store's connection.
#[derive(Debug, Clone)]
pub struct Registry {
    conn: RedisConn,
    keys: RedisKeys,
}

fn unavailable(what: String, e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis registry: {what}: {e}"))
}

impl Registry {
    pub fn new(store: &RedisStore) -> Self {
        Registry { conn: store.connection(), keys: store.keys().clone() }
    }

    /// Announces `node` as alive for `ttl` (rounded up to whole milliseconds); call again
    /// well before it runs out (every `ttl / 3`, say). Returns whether its previous entry was
    /// still there: `false` on a first registration, and when Redis lost the entry or it
    /// expired (the node may have been reaped meanwhile).
    pub async fn register(&self, node: &NodeInfo, ttl: Duration) -> Result<bool, StoreError> {
        let json = serde_json::to_string(node)
            .map_err(|e| StoreError::Unavailable(format!("encoding node {}: {e}", node.id)))?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let (previous,): (Option<String>,) = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(self.keys.node(&node.id))
            .arg(json)
            .arg("PX")
            .arg(ttl_ms)
            .arg("GET")
            .sadd(self.keys.nodes(), &node.id)
            .ignore()
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(format!("register node {}", node.id), e))?;
        Ok(previous.is_some())
    }

    /// The registry entries of `ids` in one `MGET` (one slot: the keys share a hash tag);
    /// `None` where an entry is gone.
    async fn read_entries<'a>(
        &self,
        ids: impl Iterator<Item = &'a String>,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let keys: Vec<String> = ids.map(|id| self.keys.node(id)).collect();
        redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable("read nodes".into(), e))
    }

    /// The live nodes, sorted by id.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let mut conn = self.conn.clone();
        let ids: BTreeSet<String> =
            conn.smembers(self.keys.nodes()).await.map_err(|e| unavailable("list nodes".into(), e))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let values = self.read_entries(ids.iter()).await?;
        Ok(ids
            .iter()
            .zip(values)
            // None: the key expired; the id leaves the set at the next reap.
            .filter_map(|(id, v)| {
                let json = v?;
                serde_json::from_str(&json)
                    .map_err(|e| warn!(node = %id, error = %e, "skipping an unreadable registry entry"))
                    .ok()
            })
            .collect())
    }

    /// Removes `node_id` from the registry at once (graceful shutdown). Its users stay
    /// online until released or reaped.
    pub async fn remove(&self, node_id: &str) -> Result<(), StoreError> {
        redis::pipe()
            .atomic()
            .del(self.keys.node(node_id))
            .ignore()
            .srem(self.keys.nodes(), node_id)
            .ignore()
            .exec_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(format!("remove node {node_id}"), e))
    }

    /// The nodes other than `me` that hold users or have registered, and whose registry key
    /// is gone. `me` is never in it: a node that finds its own key gone re-registers.
    pub async fn dead_nodes(&self, me: &str) -> Result<BTreeSet<String>, StoreError> {
        let mut conn = self.conn.clone();
        let (with_users, registered): (BTreeSet<String>, BTreeSet<String>) = redis::pipe()
            .smembers(self.keys.nodes_with_users())
            .smembers(self.keys.nodes())
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable("list nodes".into(), e))?;
        let ids: Vec<&String> = with_users.union(&registered).filter(|id| *id != me).collect();
        if ids.is_empty() {
            return Ok(BTreeSet::new());
        }
        let values = self.read_entries(ids.iter().copied()).await?;
        Ok(ids.into_iter().zip(values).filter(|(_, v)| v.is_none()).map(|(id, _)| id.clone()).collect())
    }

    /// Takes offline every user `node` still holds and forgets it, if its registry key is
    /// gone (checked atomically with the removal). Returns how many users it removed, or
    /// `None` if the node is alive.
    pub async fn reap(&self, node: &str) -> Result<Option<usize>, StoreError> {
        self.run_reap(node, false).await
    }

    /// Removes every online entry that names `node`, alive or not: for a node that starts,
    /// before it registers, so that entries a previous run under the same id left behind
    /// (it was killed and restarted within its TTL) do not stay online for ever.
    pub async fn forget_users(&self, node: &str) -> Result<usize, StoreError> {
        Ok(self.run_reap(node, true).await?.unwrap_or(0))
    }

    async fn run_reap(&self, node: &str, force: bool) -> Result<Option<usize>, StoreError> {
        let n: i64 = REAP
            .key(self.keys.online())
            .key(self.keys.node_users(node))
            .key(self.keys.nodes_with_users())
            .key(self.keys.node(node))
            .key(self.keys.nodes())
            .arg(node)
            .arg(if force { "1" } else { "0" })
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| unavailable(format!("reap node {node}"), e))?;
        Ok(usize::try_from(n).ok())
    }

    /// Reaps at once every node but `me` whose registry key is gone (one atomic script per
    /// dead node). Returns how many users were removed. Safe to run on every node at once: a
    /// second reaper finds nothing left to do. The member loop waits before reaping a node
    /// it just found dead (see `cluster::member`); this is the immediate form.
    pub async fn reap_dead_nodes(&self, me: &str) -> Result<usize, StoreError> {
        let mut removed = 0;
        for node in self.dead_nodes(me).await? {
            if let Some(n) = self.reap(&node).await? {
                info!(node = %node, users = n, "reaped a dead node");
                removed += n;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use cim_proto::User;

    use super::*;
    use crate::cluster::tests::eventually;
    use crate::store::redis::test_support::TestRedis;
    use crate::store::{Claim, OnlineEntry};

    fn node(id: &str) -> NodeInfo {
        NodeInfo {
            id: id.into(),
            tcp_addr: format!("{id}.local:9000"),
            ws_url: format!("ws://{id}.local:8080/ws"),
            http_addr: format!("{id}.local:8080"),
            connections: 3,
        }
    }

    fn entry(id: u64, node: &str) -> OnlineEntry {
        OnlineEntry {
            user: User { id, name: format!("u{id}") },
            node_id: node.into(),
            conn_id: id,
            resume: String::new(),
        }
    }

    #[tokio::test]
    async fn register_list_and_remove() {
        let t = TestRedis::new();
        let reg = Registry::new(&t.store().await);
        assert_eq!(reg.nodes().await.unwrap(), vec![]);
        reg.register(&node("b"), Duration::from_secs(60)).await.unwrap();
        reg.register(&node("a"), Duration::from_secs(60)).await.unwrap();
        let mut a = node("a");
        a.connections = 10;
        reg.register(&a, Duration::from_secs(60)).await.unwrap();
        assert_eq!(reg.nodes().await.unwrap(), vec![a, node("b")]);
        reg.remove("b").await.unwrap();
        assert_eq!(reg.nodes().await.unwrap().len(), 1);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn an_expired_node_disappears_and_its_users_are_reaped() {
        let t = TestRedis::new();
        let store = t.store().await;
        let reg = Registry::new(&store);
        reg.register(&node("dying"), Duration::from_secs(1)).await.unwrap();
        reg.register(&node("alive"), Duration::from_secs(60)).await.unwrap();
        for (id, n) in [(1, "dying"), (2, "alive"), (3, "dying")] {
            assert_eq!(store.claim(entry(id, n)).await.unwrap(), Claim::Claimed);
        }
        // A user that left the dying node normally is not counted again.
        store.claim(entry(4, "dying")).await.unwrap();
        assert!(store.release(4, "dying", 4).await.unwrap());
        assert_eq!(reg.reap_dead_nodes("alive").await.unwrap(), 0, "nobody is dead yet");

        eventually(Duration::from_secs(5), "the 1 s registry key to expire", || async {
            reg.nodes().await.unwrap().iter().all(|n| n.id != "dying")
        })
        .await;
        assert_eq!(reg.nodes().await.unwrap(), vec![node("alive")]);
        assert_eq!(reg.reap_dead_nodes("alive").await.unwrap(), 2);
        let online: Vec<u64> = store.online().await.unwrap().iter().map(|e| e.user.id).collect();
        assert_eq!(online, vec![2]);
        assert_eq!(reg.reap_dead_nodes("alive").await.unwrap(), 0, "a second reap finds nothing");
        assert_eq!(
            store.claim(entry(1, "alive")).await.unwrap(),
            Claim::Claimed,
            "reaped users can log in again"
        );
        t.cleanup().await;
    }
}
