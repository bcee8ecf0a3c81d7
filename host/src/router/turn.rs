//! Turns: the order in which a session's concurrently finishing sends hand on their
//! deliveries.
//!
//! A session finishes several sends at once, so that their store round trips (a presence
//! lookup, a publish to another node) overlap instead of adding up. What must not overlap is
//! the moment each one hands its delivery on (queues it for a local connection, or for
//! another node's outbox): that must follow the order the client sent them in. Each send
//! gets a [`Turn`] chained to the previous one's: it [`wait`](Turn::wait)s for the previous
//! send to have handed its delivery on, hands its own on, and [`pass`](Turn::pass)es. A turn
//! dropped without passing (the send failed) passes on drop, so the chain never stalls.

use tokio::sync::oneshot;

/// One send's place in its session's order. See the module docs.
#[derive(Debug)]
pub struct Turn {
    previous: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// A turn bound to nothing: for a send that is alone (the HTTP API).
    pub fn any() -> Turn {
        Turn { previous: None, done: None }
    }

    /// The turn after the one whose completion `last` is, if any; `last` becomes this
    /// turn's completion.
    pub fn next(last: &mut Option<oneshot::Receiver<()>>) -> Turn {
        let (done, completed) = oneshot::channel();
        Turn { previous: last.replace(completed), done: Some(done) }
    }

    /// Waits until the previous send has handed its delivery on (or given up).
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            // An error means the previous turn was dropped: it is over either way.
            let _ = previous.await;
        }
    }

    /// Lets the next send hand its delivery on. Idempotent.
    pub fn pass(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pass();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn turns_hand_on_in_order_whatever_order_they_are_polled_in() {
        let mut last = None;
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let mut turn = Turn::next(&mut last);
            let order = order.clone();
            tasks.push(async move {
                // Later sends are ready first.
                for _ in 0..(20 - i) {
                    tokio::task::yield_now().await;
                }
                turn.wait().await;
                order.lock().unwrap().push(i);
                turn.pass();
            });
        }
        futures_util::future::join_all(tasks.into_iter().rev()).await;
        assert_eq!(*order.lock().unwrap(), (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_dropped_turn_lets_the_next_go() {
        let mut last = None;
        let first = Turn::next(&mut last);
        let mut second = Turn::next(&mut last);
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.wait()).await.unwrap();
    }
}
