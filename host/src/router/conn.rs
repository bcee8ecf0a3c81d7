//! A logged-in connection as the router sees it: its bounded outbound queue and how to close
//! it with a reason.

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

/// A logged-in connection on this node, as the router sees it.
#[derive(Debug, Clone)]
pub struct LocalConn {
    pub conn_id: u64,
    pub user: User,
    /// The connection's bounded outbound queue.
    pub tx: mpsc::Sender<Encoded>,
    /// Closes the connection (kick, slow consumer, shutdown).
    pub closer: Closer,
}

impl LocalConn {
    /// Queues a frame without waiting. A full queue means the client cannot keep up: it is
    /// disconnected rather than allowed to hold up the sender.
    pub(crate) fn offer(&self, frame: Encoded, metrics: &Metrics) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                warn!(
                    user = self.user.id,
                    conn = self.conn_id,
                    "slow consumer: outbound queue full, disconnecting"
                );
                Metrics::inc(&metrics.slow_consumers_total);
                let reason = format!(
                    "slow consumer: {} frames were waiting to be read; disconnected",
                    self.tx.max_capacity()
                );
                self.closer.close(ErrorCode::SlowConsumer, reason, false);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Tells the client why, then closes the connection.
    pub fn kick(&self, code: ErrorCode, reason: &str) {
        self.closer.close(code, reason, true);
    }
}
