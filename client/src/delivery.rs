//! What the client remembers about delivered messages across its connections: the positions
//! received and acknowledged per stream (for batched ACKs and for resuming at LOGIN), the
//! last resume token, and the recent message ids (exactly-once display).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use cim_proto::{Delivery, Positions};

/// How often received positions are acknowledged while deliveries arrive.
pub(crate) const ACK_INTERVAL: Duration = Duration::from_secs(1);

/// How many recent message ids are remembered to drop a delivery seen before.
pub(crate) const RECENT_IDS: usize = 10_000;

/// Positions, resume token and recent ids, shared by every connection of one client.
#[derive(Debug, Default)]
pub(crate) struct Deliveries {
    state: Mutex<State>,
    duplicates: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    /// The highest position received per stream.
    received: Positions,
    /// What `received` was at the previous ACK tick: acknowledged at the next one.
    due: Positions,
    /// The positions the server was told (or told us, at LOGIN).
    acked: Positions,
    /// The last non-empty `LoginAck.resume_token`.
    resume_token: String,
    recent: RecentIds,
}

impl Deliveries {
    /// Records `delivery`; `false` if its message was delivered before (drop it).
    pub(crate) fn accept(&self, delivery: &Delivery) -> bool {
        let mut state = self.lock();
        state.received.advance(delivery.kind, delivery.position);
        if state.recent.insert(delivery.message_id) {
            return true;
        }
        drop(state);
        self.duplicates.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(message_id = delivery.message_id, "dropping a duplicate delivery");
        false
    }

    /// Deliveries dropped because their message had been delivered already.
    pub(crate) fn duplicates_dropped(&self) -> u64 {
        self.duplicates.load(Ordering::Relaxed)
    }

    /// One ACK tick: the positions to acknowledge now, if they moved — those received by the
    /// previous tick (a late delivery of a lower position from another sender still lands
    /// before its stream is acknowledged past it).
    pub(crate) fn tick(&self) -> Option<Positions> {
        let mut state = self.lock();
        let received = state.received;
        let due = std::mem::replace(&mut state.due, received);
        state.acknowledge(due)
    }

    /// Everything received, if not acknowledged yet (a clean close).
    pub(crate) fn flush(&self) -> Option<Positions> {
        let mut state = self.lock();
        let received = state.received;
        state.acknowledge(received)
    }

    /// Where the next LOGIN resumes from, and the resume token to present.
    pub(crate) fn resume(&self) -> (Positions, String) {
        let state = self.lock();
        (state.acked, state.resume_token.clone())
    }

    /// The server accepted a LOGIN: it replays after `resume_from`, so those positions count
    /// as received and acknowledged; `resume_token` (if any) goes with the next LOGIN.
    pub(crate) fn logged_in(&self, resume_from: Positions, resume_token: &str) {
        let mut state = self.lock();
        state.received = state.received.max(resume_from);
        state.due = state.due.max(resume_from);
        state.acked = state.acked.max(resume_from);
        if !resume_token.is_empty() {
            resume_token.clone_into(&mut state.resume_token);
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent even if a holder panicked.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl State {
    /// Moves `acked` to `to`; the new positions when that changed anything.
    fn acknowledge(&mut self, to: Positions) -> Option<Positions> {
        let next = self.acked.max(to);
        (next != self.acked).then(|| {
            self.acked = next;
            next
        })
    }
}

/// The last [`RECENT_IDS`] message ids seen.
#[derive(Debug, Default)]
struct RecentIds {
    set: HashSet<u64>,
    order: VecDeque<u64>,
}

impl RecentIds {
    /// `false` if `id` was seen (0, "no id", is never a duplicate).
    fn insert(&mut self, id: u64) -> bool {
        if id == 0 {
            return true;
        }
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > RECENT_IDS
            && let Some(oldest) = self.order.pop_front()
        {
            self.set.remove(&oldest);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cim_proto::{MessageKind, User};

    fn delivery(message_id: u64, kind: MessageKind, position: u64) -> Delivery {
        Delivery {
            message_id,
            sender: User { id: 2, name: "bob".into() },
            kind,
            text: "x".into(),
            timestamp_ms: 0,
            position,
            replayed: false,
        }
    }

    #[test]
    fn acks_lag_one_tick_and_only_when_something_moved() {
        let d = Deliveries::default();
        assert_eq!(d.tick(), None);
        assert!(d.accept(&delivery(1, MessageKind::Private, 5)));
        assert!(d.accept(&delivery(2, MessageKind::Group, 3)));
        assert_eq!(d.tick(), None, "received after the last tick: not yet");
        assert!(d.accept(&delivery(3, MessageKind::Private, 6)));
        assert_eq!(d.tick(), Some(Positions { inbox: 5, group: 3 }));
        assert_eq!(d.tick(), Some(Positions { inbox: 6, group: 3 }));
        assert_eq!(d.tick(), None);
        assert_eq!(d.resume().0, Positions { inbox: 6, group: 3 });
    }

    #[test]
    fn a_flush_acks_everything_received() {
        let d = Deliveries::default();
        d.accept(&delivery(1, MessageKind::Group, 9));
        assert_eq!(d.flush(), Some(Positions { inbox: 0, group: 9 }));
        assert_eq!(d.flush(), None);
        assert_eq!(d.tick(), None, "already acknowledged");
    }

    #[test]
    fn duplicates_are_dropped_and_counted() {
        let d = Deliveries::default();
        assert!(d.accept(&delivery(7, MessageKind::Private, 1)));
        assert!(!d.accept(&delivery(7, MessageKind::Private, 1)));
        assert!(d.accept(&delivery(0, MessageKind::Private, 0)));
        assert!(d.accept(&delivery(0, MessageKind::Private, 0)));
        assert_eq!(d.duplicates_dropped(), 1);
    }

    #[test]
    fn recent_ids_are_bounded() {
        let mut recent = RecentIds::default();
        for id in 1..=(RECENT_IDS as u64 + 1) {
            assert!(recent.insert(id));
        }
        assert_eq!(recent.set.len(), RECENT_IDS);
        assert!(recent.insert(1), "the oldest id was forgotten");
        assert!(!recent.insert(RECENT_IDS as u64 + 1));
    }

    #[test]
    fn a_login_moves_positions_and_keeps_the_last_token() {
        let d = Deliveries::default();
        d.logged_in(Positions { inbox: 4, group: 0 }, "t1");
        d.logged_in(Positions::default(), "");
        assert_eq!(d.resume(), (Positions { inbox: 4, group: 0 }, "t1".to_owned()));
    }
}
