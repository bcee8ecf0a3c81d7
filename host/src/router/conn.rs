//! A logged-in connection as the router sees it: its outbound queue (bounded in frames and in
//! bytes) and how to close it with a reason.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use cim_proto::{Body, Encoded, ErrorCode, Frame, User};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;

/// Closes one connection and remembers why, so the writer can tell the client last.
#[derive(Debug, Clone)]
pub struct Closer {
    token: CancellationToken,
    reason: Arc<OnceLock<Closing>>,
}

/// The last frame a closing connection gets.
#[derive(Debug, Clone)]
pub struct Closing {
    pub frame: Encoded,
    /// Deliver what is already queued first (not for a slow consumer, whose queue is the
    /// problem).
    pub drain: bool,
}

impl Closer {
    /// A closer that also fires when `parent` (server shutdown) does.
    pub fn child_of(parent: &CancellationToken) -> Self {
        Closer { token: parent.child_token(), reason: Arc::new(OnceLock::new()) }
    }

    /// Closes the connection; the first reason given wins.
    pub fn close(&self, code: ErrorCode, reason: impl Into<String>, drain: bool) {
        let frame = Encoded::from(Frame::push(Body::Kick { code, reason: reason.into() }));
        let _ = self.reason.set(Closing { frame, drain });
        self.token.cancel();
    }

    /// Closes without a reason (the peer is gone or the session ended normally).
    pub fn cancel(&self) {
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<&Closing> {
        self.reason.get()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// The sending side of a connection's outbound queue: at most `frames` frames and about
/// `max_bytes` bytes wait for the writer.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Encoded>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The writer's side of an [`Outbox`].
#[derive(Debug)]
pub struct OutboxRx {
    rx: mpsc::Receiver<Encoded>,
    queued: Arc<AtomicUsize>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at its frame or byte limit: the client is not reading fast enough.
    Full,
    /// The connection is closing.
    Closed,
}

impl Outbox {
    pub fn new(frames: usize, max_bytes: usize) -> (Outbox, OutboxRx) {
        let (tx, rx) = mpsc::channel(frames.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        (Outbox { tx, queued: queued.clone(), max_bytes }, OutboxRx { rx, queued })
    }

    /// Queues a frame without waiting. A frame larger than the byte limit still goes into an
    /// empty queue, so one big message is never refused for its size alone.
    pub fn try_send(&self, frame: Encoded) -> Result<(), Refused> {
        let len = frame.0.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        self.tx.try_send(frame).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }

    /// Queues an answer to the client's own request, waiting for a free slot (backpressure on
    /// that client's reader). Answers count towards the bytes but are not refused for them.
    pub async fn send(&self, frame: Encoded) -> Result<(), Refused> {
        let len = frame.0.len();
        self.queued.fetch_add(len, Ordering::AcqRel);
        self.tx.send(frame).await.map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            Refused::Closed
        })
    }

    /// The frame limit, for messages.
    pub fn max_frames(&self) -> usize {
        self.tx.max_capacity()
    }
}

impl OutboxRx {
    pub async fn recv(&mut self) -> Option<Encoded> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.0.len(), Ordering::AcqRel);
        Some(frame)
    }

    pub fn try_recv(&mut self) -> Option<Encoded> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.0.len(), Ordering::AcqRel);
        Some(frame)
    }
}

/// A logged-in connection on this node, as the router sees it.
#[derive(Debug, Clone)]
pub struct LocalConn {
    pub conn_id: u64,
    pub user: User,
    /// The connection's bounded outbound queue.
    pub tx: Outbox,
    /// Closes the connection (kick, slow consumer, shutdown).
    pub closer: Closer,
}

impl LocalConn {
    /// Queues a frame without waiting. A full queue means the client cannot keep up: it is
    /// disconnected rather than allowed to hold up the sender.
    pub(crate) fn offer(&self, frame: Encoded, metrics: &Metrics) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(Refused::Full) => {
                warn!(
                    user = self.user.id,
                    conn = self.conn_id,
                    "slow consumer: outbound queue full, disconnecting"
                );
                Metrics::inc(&metrics.slow_consumers_total);
                let reason = format!(
                    "slow consumer: the outbound queue ({} frames or {} bytes) filled up; disconnected",
                    self.tx.max_frames(),
                    self.tx.max_bytes
                );
                self.closer.close(ErrorCode::SlowConsumer, reason, false);
                false
            }
            Err(Refused::Closed) => false,
        }
    }

    /// Tells the client why, then closes the connection.
    pub fn kick(&self, code: ErrorCode, reason: &str) {
        self.closer.close(code, reason, true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Encoded {
        Encoded(bytes::Bytes::from(vec![0u8; len]))
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_bytes_as_well_as_frames() {
        let (tx, mut rx) = Outbox::new(10, 100);
        tx.try_send(frame(60)).unwrap();
        assert_eq!(tx.try_send(frame(60)), Err(Refused::Full), "over the byte limit");
        tx.try_send(frame(40)).unwrap();
        assert_eq!(rx.recv().await.unwrap().0.len(), 60);
        tx.try_send(frame(60)).unwrap();
        assert_eq!(rx.try_recv().unwrap().0.len(), 40);
        assert_eq!(rx.try_recv().unwrap().0.len(), 60);
        // One frame bigger than the whole budget still fits an empty queue.
        tx.try_send(frame(500)).unwrap();
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
        drop(rx);
        assert!(tx.try_send(frame(1)).is_err());
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_frames() {
        let (tx, _rx) = Outbox::new(2, 1 << 20);
        tx.try_send(frame(1)).unwrap();
        tx.try_send(frame(1)).unwrap();
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
    }
}
