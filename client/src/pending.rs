//! Request ids and the map of requests waiting for their answer.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use cim_proto::Body;
use tokio::sync::oneshot;

/// Hands out request ids: nonzero (0 marks a server push), unique for the client's lifetime
/// (it is shared by all the connections a client opens), so a late answer from an old
/// connection can never be taken for the answer to a new request.
#[derive(Debug)]
pub(crate) struct RequestIds {
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        Self::starting_at(1)
    }

    pub(crate) fn starting_at(first: u64) -> Self {
        RequestIds { next: AtomicU64::new(first) }
    }

    pub(crate) fn next(&self) -> u64 {
        loop {
            let id = self.next.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                return id;
            }
        }
    }
}

/// Where an answer goes: the body of the frame that carries the request's id.
pub(crate) type Reply = oneshot::Sender<Body>;

/// Prune abandoned entries when the map grows beyond this.
const PRUNE_AT: usize = 1024;

/// Requests sent on one connection and not answered yet. Dropping it (when the connection
/// ends) drops every reply sender, so each waiting caller sees the connection as closed.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    waiting: Mutex<HashMap<u64, Reply>>,
}

impl Pending {
    pub(crate) fn insert(&self, request_id: u64, reply: Reply) {
        let mut waiting = self.lock();
        if waiting.len() >= PRUNE_AT {
            // Callers that timed out dropped their receiver; their entries are useless.
            waiting.retain(|_, reply| !reply.is_closed());
        }
        waiting.insert(request_id, reply);
    }

    /// Hands `body` to the request `request_id`. Returns `false` if no one waits for it
    /// (an unknown id, a heartbeat PONG, or a caller that already gave up).
    pub(crate) fn complete(&self, request_id: u64, body: Body) -> bool {
        let reply = self.lock().remove(&request_id);
        match reply {
            Some(reply) => reply.send(body).is_ok(),
            None => false,
        }
    }

    /// Drops the entries whose caller stopped waiting.
    pub(crate) fn prune(&self) {
        self.lock().retain(|_, reply| !reply.is_closed());
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Reply>> {
        // A panic while holding this lock cannot leave the map inconsistent.
        self.waiting.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_start_at_one_and_skip_zero_on_wrap() {
        let ids = RequestIds::new();
        assert_eq!((ids.next(), ids.next()), (1, 2));
        let ids = RequestIds::starting_at(u64::MAX);
        assert_eq!((ids.next(), ids.next(), ids.next()), (u64::MAX, 1, 2));
    }

    #[test]
    fn ids_are_unique_across_threads() {
        let ids = std::sync::Arc::new(RequestIds::new());
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ids = ids.clone();
                std::thread::spawn(move || (0..1000).map(|_| ids.next()).collect::<Vec<_>>())
            })
            .collect();
        let mut all: Vec<u64> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4000);
    }

    #[test]
    fn an_answer_reaches_its_request_once() {
        let pending = Pending::default();
        let (tx, mut rx) = oneshot::channel();
        pending.insert(5, tx);
        assert!(!pending.complete(6, Body::Pong));
        assert!(pending.complete(5, Body::ack(9)));
        assert_eq!(rx.try_recv().unwrap(), Body::ack(9));
        assert!(!pending.complete(5, Body::ack(9)));
        assert_eq!(pending.len(), 0);
    }

    #[test]
    fn dropping_the_map_closes_every_waiting_request() {
        let pending = Pending::default();
        let (tx, mut rx) = oneshot::channel();
        pending.insert(1, tx);
        drop(pending);
        assert_eq!(rx.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[test]
    fn abandoned_requests_are_pruned() {
        let pending = Pending::default();
        let (tx, rx) = oneshot::channel();
        pending.insert(1, tx);
        let (tx, _kept) = oneshot::channel();
        pending.insert(2, tx);
        drop(rx);
        assert!(!pending.complete(1, Body::Pong), "the caller gave up");
        let (tx, rx) = oneshot::channel();
        pending.insert(3, tx);
        drop(rx);
        pending.prune();
        assert_eq!(pending.len(), 1);
    }
}
