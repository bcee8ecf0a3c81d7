//! The writer task of a connection: drains its outbound queue onto the transport, batching
//! what is ready into one flush, and gives up on a client that stops reading.

use std::sync::Arc;
use std::time::Duration;

use cim_proto::{CodecError, Encoded};
use futures_util::{Sink, SinkExt};
use tracing::{debug, warn};

use super::CLOSE_FLUSH;
use crate::message_id::now_us;
use crate::metrics::Metrics;
use crate::router::{Closer, OutboxRx, Router};

/// Sends queued frames until the queue closes or the connection is closed; on close,
/// flushes what is already queued (a last error or kick) first. A write that makes no
/// progress for `write_timeout` (the client stopped reading) closes the connection.
pub(super) async fn write_loop<Si>(
    mut sink: Si,
    mut rx: OutboxRx,
    closer: Closer,
    write_timeout: Duration,
    router: Arc<Router>,
) where
    Si: Sink<Encoded, Error = CodecError> + Unpin,
{
    let metrics = &router.metrics;
    // When the live deliveries of the batch being written were accepted.
    let mut accepted: Vec<u64> = Vec::new();
    let result: Result<(), CodecError> = async {
        loop {
            tokio::select! {
                // Closing wins over queued frames: a slow consumer's queue is not drained.
                biased;
                _ = closer.cancelled() => {
                    let reason = closer.reason();
                    let last = async {
                        if reason.is_none_or(|r| r.drain) {
                            while let Some(out) = rx.try_recv() {
                                sink.feed(out.frame).await?;
                            }
                        }
                        if let Some(r) = reason {
                            sink.feed(r.frame.clone()).await?;
                        }
                        Ok::<_, CodecError>(())
                    };
                    if tokio::time::timeout(write_timeout.min(CLOSE_FLUSH), last).await.is_err() {
                        return Ok(());
                    }
                    break;
                }
                out = rx.recv() => {
                    let Some(mut out) = out else { break };
                    // How deep the queue was when the writer woke: this frame and those behind it.
                    metrics.outbound_queue_frames.observe((rx.len() + 1) as f64);
                    accepted.clear();
                    let batch = async {
                        let mut fed = 0;
                        // Batch whatever else is ready into one flush.
                        loop {
                            if out.accepted_us != 0 {
                                accepted.push(out.accepted_us);
                            }
                            sink.feed(out.frame).await?;
                            fed += 1;
                            if closer.is_cancelled() {
                                break;
                            }
                            let Some(next) = rx.try_recv() else { break };
                            out = next;
                        }
                        metrics.frames_out_total.inc_by(fed);
                        sink.flush().await
                    };
                    let written = tokio::time::timeout(write_timeout, batch).await;
                    match written {
                        Ok(r) => {
                            r?;
                            // Written: from acceptance (on whichever node) to here.
                            if !accepted.is_empty() {
                                let now = now_us();
                                for &at in &accepted {
                                    metrics.delivery_seconds.observe(now.saturating_sub(at) as f64 / 1e6);
                                }
                            }
                        }
                        Err(_) => {
                            warn!(timeout = ?write_timeout, "write timed out: the client is not reading; closing");
                            Metrics::inc(&metrics.write_timeouts_total);
                            return Ok(());
                        }
                    }
                }
            }
        }
        sink.close().await
    }
    .await;
    if let Err(e) = result {
        debug!(error = %e, "writer stopped");
    }
    // A writer that stops on its own (peer gone) closes the whole connection.
    closer.cancel();
}
