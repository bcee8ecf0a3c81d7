//! Keeping the client logged in: establishing a connection (route login, connect, LOGIN),
//! serving it, and reconnecting with backoff after an unrequested disconnect.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use cim_proto::ErrorCode;
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::Inner;
use crate::connection::{Command, Connection, End, Identity, handshake};
use crate::error::ClientError;
use crate::handler::ClientEvent;
use crate::route;
use crate::transport::{self, FrameSink, FrameStream};

/// A logged-in connection, not served yet.
pub(crate) struct Established {
    sink: FrameSink,
    stream: FrameStream,
    pub(crate) node_id: String,
    /// The heartbeat interval to use on this connection.
    heartbeat: Duration,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("node_id", &self.node_id)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

/// Route login, connect, LOGIN: each step within the request timeout.
pub(crate) async fn establish(inner: &Inner) -> Result<Established, ClientError> {
    let config = &inner.config;
    let after = config.request_timeout;
    let route = route_login(config).await?;
    let (mut sink, mut stream) =
        within("connect", after, transport::connect(config.transport, &route, config.max_frame)).await?;
    let who = Identity { user_id: config.user_id, user_name: &config.user_name };
    let accepted = handshake(&mut sink, &mut stream, inner.ids.next(), who, after, &*inner.handler).await?;
    let node_id = if accepted.node_id.is_empty() { route.node_id } else { accepted.node_id };
    tracing::info!(node_id, user = config.user_id, "logged in");
    Ok(Established { sink, stream, node_id, heartbeat: heartbeat(config.heartbeat, accepted.heartbeat_secs) })
}

/// Route login through the first route URL that answers. `config.route` may list several,
/// comma-separated, so that clients can still find a node when the one they used is gone.
/// A definite answer (duplicate login, rejected) ends the search; only unreachable routes are
/// skipped.
async fn route_login(config: &crate::ClientConfig) -> Result<route::RouteInfo, ClientError> {
    let after = config.request_timeout;
    let mut last = None;
    for url in config.route.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        match within("route login", after, route::login(url, config.user_id, &config.user_name)).await {
            Ok(info) => return Ok(info),
            Err(e @ (ClientError::Io(_) | ClientError::Route(_) | ClientError::Timeout { .. })) => {
                tracing::debug!(route = url, error = %e, "route unreachable; trying the next one");
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| ClientError::Config("no route URL given".into())))
}

/// Ours, or the server's if it asks for a shorter one (0: it did not ask).
fn heartbeat(ours: Duration, server_secs: u32) -> Duration {
    match server_secs {
        0 => ours,
        secs => ours.min(Duration::from_secs(u64::from(secs))),
    }
}

async fn within<T>(
    what: &'static str,
    after: Duration,
    step: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ClientError> {
    timeout(after, step).await.map_err(|_| ClientError::Timeout { what, after })?
}

/// The connection task: serves `established`, and the connections that replace it,
/// until a shutdown, a KICK, or reconnecting fails for good. A KICK with code
/// `UNAVAILABLE` (the node is shutting down) is treated as a lost connection.
pub(crate) async fn supervise(
    inner: Arc<Inner>,
    mut established: Established,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    loop {
        let connection =
            Connection { ids: &inner.ids, handler: &*inner.handler, heartbeat: established.heartbeat };
        let end = connection.run(established.sink, established.stream, commands, &shutdown).await;
        inner.detach();
        let reason = match end {
            End::Shutdown => return,
            // The node is going away (shutting down), not refusing us: another node
            // (or the same one, restarted) will take us.
            End::Kicked { code: ErrorCode::Unavailable, reason } => {
                format!("{reason} ({})", ErrorCode::Unavailable)
            }
            End::Kicked { code, reason } => {
                tracing::warn!(%code, %reason, "kicked by the server");
                inner.handler.on_event(&ClientEvent::Kicked { code, reason });
                return;
            }
            End::Lost(reason) => reason,
        };
        tracing::warn!(%reason, "connection lost");
        match reconnect(&inner, reason, &shutdown).await {
            Some(next) => {
                commands = inner.attach(&next.node_id);
                inner.handler.on_event(&ClientEvent::Reconnected { node_id: next.node_id.clone() });
                established = next;
            }
            None => return,
        }
    }
}

/// Tries to log in again with backoff. `None`: stopped by a shutdown, or gave up (the
/// handler got [`ClientEvent::Disconnected`]).
async fn reconnect(inner: &Inner, mut reason: String, shutdown: &CancellationToken) -> Option<Established> {
    let seed = Backoff::seed_for(inner.config.user_id);
    let mut backoff = Backoff::new(inner.config.reconnect.clone(), seed);
    let mut failed = 0u32;
    loop {
        let Some((attempt, delay)) = backoff.next_attempt() else {
            let reason = if failed == 0 {
                format!("connection lost: {reason}")
            } else {
                format!("gave up after {failed} reconnect attempts: {reason}")
            };
            inner.handler.on_event(&ClientEvent::Disconnected { reason });
            return None;
        };
        inner.handler.on_event(&ClientEvent::Reconnecting { attempt, reason: reason.clone() });
        let result = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            result = async {
                tokio::time::sleep(delay).await;
                establish(inner).await
            } => result,
        };
        match result {
            Ok(established) => return Some(established),
            Err(e) if e.is_transient() => {
                tracing::debug!(attempt, error = %e, "reconnect attempt failed");
                failed += 1;
                reason = e.to_string();
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconnecting is refused");
                inner
                    .handler
                    .on_event(&ClientEvent::Disconnected { reason: format!("reconnecting failed: {e}") });
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shorter_heartbeat_wins() {
        let minute = Duration::from_secs(60);
        assert_eq!(heartbeat(minute, 0), minute);
        assert_eq!(heartbeat(minute, 30), Duration::from_secs(30));
        assert_eq!(heartbeat(minute, 120), minute);
    }
}
