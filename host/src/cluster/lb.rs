//! Which node a route login sends a user to.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::NodeInfo;

/// Load-balancing strategy of `POST /login` (`--lb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Strategy {
    /// The same user lands on the same node while the set of nodes is unchanged; adding or
    /// removing a node moves only about 1/N of the users.
    ConsistentHash,
    RoundRobin,
    Random,
    /// The node with the fewest connections (as last reported in the registry).
    LeastConn,
}

/// Virtual points per node on the hash ring: enough for an even spread over a few nodes.
const VIRTUAL_NODES: u32 = 160;

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// A 64-bit mix so that neighbouring ids land far apart (splitmix64's finaliser).
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[derive(Debug)]
pub struct Balancer {
    strategy: Strategy,
    counter: AtomicU64,
}

impl Balancer {
    pub fn new(strategy: Strategy) -> Self {
        Balancer { strategy, counter: AtomicU64::new(0) }
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    /// Picks one of `nodes` (live nodes, in any order) for `user_id`.
    pub fn pick<'a>(&self, user_id: u64, nodes: &'a [NodeInfo]) -> Option<&'a NodeInfo> {
        if nodes.is_empty() {
            return None;
        }
        match self.strategy {
            Strategy::ConsistentHash => {
                let mut ring = BTreeMap::new();
                for (i, node) in nodes.iter().enumerate() {
                    for v in 0..VIRTUAL_NODES {
                        ring.insert(mix(fnv1a(format!("{}#{v}", node.id).as_bytes())), i);
                    }
                }
                let point = mix(user_id);
                let (_, &i) = ring.range(point..).next().or_else(|| ring.iter().next())?;
                nodes.get(i)
            }
            Strategy::RoundRobin => {
                let n = self.counter.fetch_add(1, Ordering::Relaxed);
                nodes.get((n % nodes.len() as u64) as usize)
            }
            Strategy::Random => {
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                let n = mix(nanos ^ self.counter.fetch_add(1, Ordering::Relaxed));
                nodes.get((n % nodes.len() as u64) as usize)
            }
            Strategy::LeastConn => nodes.iter().min_by_key(|n| (n.connections, n.id.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<NodeInfo> {
        (0..n)
            .map(|i| NodeInfo {
                id: format!("node-{i}"),
                tcp_addr: String::new(),
                ws_url: String::new(),
                http_addr: String::new(),
                connections: (10 - i) as u64,
            })
            .collect()
    }

    #[test]
    fn consistent_hash_is_stable_balanced_and_moves_few_users() {
        let lb = Balancer::new(Strategy::ConsistentHash);
        let three = nodes(3);
        let mut counts = [0usize; 3];
        for user in 0..30_000u64 {
            let a = lb.pick(user, &three).unwrap();
            assert_eq!(a.id, lb.pick(user, &three).unwrap().id);
            counts[a.id[5..].parse::<usize>().unwrap()] += 1;
        }
        for c in counts {
            assert!((7_000..13_000).contains(&c), "unbalanced: {counts:?}");
        }
        // Removing node-2 moves only its users.
        let two = &three[..2];
        for user in 0..5_000u64 {
            let before = lb.pick(user, &three).unwrap();
            if before.id != "node-2" {
                assert_eq!(lb.pick(user, two).unwrap().id, before.id);
            }
        }
    }

    #[test]
    fn round_robin_and_least_conn() {
        let ns = nodes(3);
        let rr = Balancer::new(Strategy::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| rr.pick(1, &ns).unwrap().id.clone()).collect();
        assert_eq!(picks, ["node-0", "node-1", "node-2", "node-0", "node-1", "node-2"]);
        assert_eq!(Balancer::new(Strategy::LeastConn).pick(1, &ns).unwrap().id, "node-2");
        assert!(Balancer::new(Strategy::Random).pick(1, &ns).is_some());
        assert!(Balancer::new(Strategy::Random).pick(1, &[]).is_none());
    }
}
