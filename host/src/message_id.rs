//! Server-assigned message ids: unique across a cluster, increasing on each node.
//!
//! Layout (most significant first): 44 bits of a per-node counter that starts at the
//! current Unix time in milliseconds × 2^10 and only moves forward, then 10 bits of node
//! number. The counter takes `max(previous + 1, now_ms << 10)`, so ids stay unique through
//! bursts (a burst borrows from the next milliseconds) and clock steps backwards. The node
//! number is a hash of the node id on its own, and a number handed out by Redis (`INCR`) in a
//! cluster, so that up to 1024 live nodes never share one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 10;
const NODE_MASK: u64 = (1 << NODE_BITS) - 1;

#[derive(Debug)]
pub struct MessageIds {
    node: AtomicU64,
    counter: AtomicU64,
}

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl MessageIds {
    pub fn new(node_id: &str) -> Self {
        // FNV-1a: stable across runs and platforms, unlike std's hasher.
        let hash = node_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        MessageIds { node: AtomicU64::new(hash & NODE_MASK), counter: AtomicU64::new(0) }
    }

    /// Uses `number` (mod 1024) as this node's part of every id from now on.
    pub fn set_node_number(&self, number: u64) {
        self.node.store(number & NODE_MASK, Ordering::Relaxed);
    }

    fn node(&self) -> u64 {
        self.node.load(Ordering::Relaxed)
    }

    pub fn next(&self) -> u64 {
        let floor = now_ms() << SEQ_BITS;
        let prev = self
            .counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| Some((c + 1).max(floor)))
            .unwrap_or_else(|c| c);
        let counter = (prev + 1).max(floor);
        (counter << NODE_BITS) | self.node()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_increase_and_carry_the_node() {
        let ids = MessageIds::new("node-a");
        let mut last = 0;
        for _ in 0..10_000 {
            let id = ids.next();
            assert!(id > last);
            assert_eq!(id & 0x3ff, ids.node());
            last = id;
        }
    }

    #[test]
    fn two_nodes_never_collide() {
        let (a, b) = (MessageIds::new("node-a"), MessageIds::new("node-b"));
        assert_ne!(a.node(), b.node());
        let xs: std::collections::HashSet<u64> = (0..1000).map(|_| a.next()).collect();
        assert!((0..1000).all(|_| !xs.contains(&b.next())));
        // Numbered nodes differ even when their id hashes collide.
        let (c, d) = (MessageIds::new("same"), MessageIds::new("same"));
        c.set_node_number(1);
        d.set_node_number(2);
        assert_ne!(c.next() & NODE_MASK, d.next() & NODE_MASK);
    }
}
