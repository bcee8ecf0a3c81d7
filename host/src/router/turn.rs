//! Turns: the order in which a session's concurrently finishing sends write to the log and
//! hand on their deliveries.
//!
//! A session finishes several sends at once, so that their store round trips (a presence
//! lookup, a publish to another node) overlap instead of adding up. What must not overlap is
//! the moment each one hands its delivery on (queues it for a local connection, or for
//! another node's outbox): that must follow the order the client sent them in. Each send
//! gets a [`Turn`] chained to the previous one's: it [`wait`](Turn::wait)s for the previous
//! send to have handed its delivery on, hands its own on, and [`pass`](Turn::pass)es. A turn
//! dropped without passing (the send failed) passes on drop, so the chain never stalls.
//!
//! Their log entries must follow that order too: the log's order is the order every
//! recipient gets them in, live or replayed. Two appends in flight at once may land in
//! either order (two round trips, two slots of a Redis Cluster), so a session's appends go
//! through its [`Appends`]: each send queues its append in turn (a second chain), and one
//! batch is written at a time, holding whatever queued up meanwhile — pipelined sends still
//! share round trips, and the log gets them in the order they were sent.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::store::{Append, Appended, MessageLog, StoreError};

/// A session's sends in order. See the module docs.
#[derive(Debug, Default)]
pub struct Turns {
    last: Option<oneshot::Receiver<()>>,
    last_queued: Option<oneshot::Receiver<()>>,
    appends: Arc<Appends>,
}

impl Turns {
    /// The next send's turn.
    pub fn next_turn(&mut self) -> Turn {
        let (done, completed) = oneshot::channel();
        let (queued, was_queued) = oneshot::channel();
        Turn {
            previous: self.last.replace(completed),
            done: Some(done),
            previous_queued: self.last_queued.replace(was_queued),
            queued: Some(queued),
            appends: Some(self.appends.clone()),
        }
    }
}

/// One send's place in its session's order. See the module docs.
#[derive(Debug)]
pub struct Turn {
    previous: Option<oneshot::Receiver<()>>,
    done: Option<oneshot::Sender<()>>,
    previous_queued: Option<oneshot::Receiver<()>>,
    queued: Option<oneshot::Sender<()>>,
    appends: Option<Arc<Appends>>,
}

impl Turn {
    /// A turn bound to nothing: for a send that is alone (the HTTP API).
    pub fn any() -> Turn {
        Turn { previous: None, done: None, previous_queued: None, queued: None, appends: None }
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

    /// Writes `append` to `log` after the session's earlier sends' appends (see the module
    /// docs); a turn bound to nothing writes at once.
    pub async fn append(&mut self, log: &dyn MessageLog, append: Append) -> Result<Appended, StoreError> {
        let Some(appends) = self.appends.clone() else {
            let mut results = log.append(vec![append]).await?;
            return results.pop().ok_or_else(|| StoreError::Unavailable("the log answered no append".into()));
        };
        if let Some(previous) = self.previous_queued.take() {
            let _ = previous.await;
        }
        let answer = appends.queue(append);
        self.pass_queued();
        appends.wait(log, answer).await
    }

    fn pass_queued(&mut self) {
        if let Some(queued) = self.queued.take() {
            let _ = queued.send(());
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pass_queued();
        self.pass();
    }
}

type Answer = oneshot::Sender<Result<Appended, StoreError>>;

/// A session's appends waiting to be written, in the order its sends queued them; one
/// batch is written at a time.
#[derive(Debug, Default)]
pub struct Appends {
    queued: Mutex<Vec<(Append, Answer)>>,
    writing: tokio::sync::Mutex<()>,
}

impl Appends {
    fn queue(&self, append: Append) -> oneshot::Receiver<Result<Appended, StoreError>> {
        let (tx, rx) = oneshot::channel();
        self.queued.lock().unwrap_or_else(|e| e.into_inner()).push((append, tx));
        rx
    }

    /// Waits for `answer`; whichever waiter gets to write first writes everything queued
    /// (in one [`MessageLog::append`]) while the others wait for their answers.
    async fn wait(
        &self,
        log: &dyn MessageLog,
        mut answer: oneshot::Receiver<Result<Appended, StoreError>>,
    ) -> Result<Appended, StoreError> {
        loop {
            tokio::select! {
                biased;
                result = &mut answer => {
                    return result.unwrap_or_else(|_| Err(StoreError::Unavailable("an append was dropped".into())));
                }
                _writing = self.writing.lock() => {
                    let batch = std::mem::take(&mut *self.queued.lock().unwrap_or_else(|e| e.into_inner()));
                    if batch.is_empty() {
                        continue;
                    }
                    let (appends, answers): (Vec<Append>, Vec<Answer>) = batch.into_iter().unzip();
                    match log.append(appends).await {
                        Ok(results) if results.len() == answers.len() => {
                            for (answer, result) in answers.into_iter().zip(results) {
                                let _ = answer.send(Ok(result));
                            }
                        }
                        Ok(results) => {
                            let e = format!("the log answered {} of {} appends", results.len(), answers.len());
                            for answer in answers {
                                let _ = answer.send(Err(StoreError::Unavailable(e.clone())));
                            }
                        }
                        Err(e) => {
                            for answer in answers {
                                let _ = answer.send(Err(e.clone()));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MessageLog;

    #[tokio::test]
    async fn turns_hand_on_in_order_whatever_order_they_are_polled_in() {
        let mut turns = Turns::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..20u32 {
            let mut turn = turns.next_turn();
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
    async fn a_session_s_appends_reach_the_log_in_send_order_whatever_order_they_finish_in() {
        use crate::store::log::{LogStream, LoggedMessage, MemoryLog, Retention};
        let log = MemoryLog::new(Retention::default());
        let mut turns = Turns::default();
        let mut tasks = Vec::new();
        for i in 1..=20u64 {
            let mut turn = turns.next_turn();
            let log = &log;
            tasks.push(async move {
                // Later sends are ready first.
                for _ in 0..(20 - i) {
                    tokio::task::yield_now().await;
                }
                let message = LoggedMessage {
                    id: i,
                    sender_id: 1,
                    sender_name: "a".into(),
                    group: false,
                    text: format!("m{i}"),
                    timestamp_ms: crate::message_id::now_ms(),
                    to: 2,
                    recipients: None,
                };
                let append =
                    Append { message, streams: vec![LogStream::Inbox(2)], client_msg_id: String::new() };
                turn.append(log, append).await.unwrap()
            });
        }
        futures_util::future::join_all(tasks.into_iter().rev()).await;
        let read = log.read(LogStream::Inbox(2), 0, 100).await.unwrap();
        assert_eq!(
            read.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(),
            (1..=20).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn a_dropped_turn_lets_the_next_go() {
        let mut turns = Turns::default();
        let first = turns.next_turn();
        let mut second = turns.next_turn();
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(1), second.wait()).await.unwrap();
    }
}
