//! Keeping the client logged in: establishing a connection (route login, connect, LOGIN),
//! serving it, and reconnecting with backoff after an unrequested disconnect.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cim_proto::{Body, ErrorCode, User};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::{Inner, expect_ack};
use crate::connection::{Command, Connection, End, Identity, handshake};
use crate::error::ClientError;
use crate::handler::ClientEvent;
use crate::route::{self, Credentials};
use crate::token::{Claims, refresh_delay};
use crate::transport::{self, FrameSink, FrameStream};

/// How long to wait before trying again when a refresh failed (the token stays valid until
/// it expires; if it does, the server ends the connection and the client logs in anew).
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// A logged-in connection, not served yet.
pub(crate) struct Established {
    sink: FrameSink,
    stream: FrameStream,
    pub(crate) node_id: String,
    /// The heartbeat interval to use on this connection.
    heartbeat: Duration,
    /// When the server ends this connection unless the token is refreshed; 0: never.
    token_expires_at_ms: u64,
}

impl std::fmt::Debug for Established {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Established")
            .field("node_id", &self.node_id)
            .field("heartbeat", &self.heartbeat)
            .field("token_expires_at_ms", &self.token_expires_at_ms)
            .finish_non_exhaustive()
    }
}

/// A fresh token (when the client has a provider), route login, connect, LOGIN: each step
/// within the request timeout.
pub(crate) async fn establish(inner: &Inner) -> Result<Established, ClientError> {
    let config = &inner.config;
    let after = config.request_timeout;
    let token = fresh_token(inner).await?;
    // Without a user id, ask for the token's user (a route API that wants one in the body
    // gets it; one that reads the token checks it is the same).
    let claims = token.as_deref().map(Claims::peek).unwrap_or_default();
    let user_id = if config.user_id != 0 { config.user_id } else { claims.user_id.unwrap_or(0) };
    let user_name = match (&claims.name, config.user_name.is_empty()) {
        (Some(name), true) => name.as_str(),
        _ => config.user_name.as_str(),
    };
    let who = Credentials { user_id, user_name, token: token.as_deref() };
    let route = route_login(config, who).await?;
    let (mut sink, mut stream) =
        within("connect", after, transport::connect(config.transport, &route, config.max_frame)).await?;
    let user_id = if route.user_id != 0 { route.user_id } else { user_id };
    let who = Identity { user_id, user_name, token: token.as_deref().unwrap_or_default() };
    let accepted =
        handshake(&mut sink, &mut stream, inner.ids.next(), who, after, &inner.deliveries, &*inner.handler)
            .await?;
    let node_id = if accepted.node_id.is_empty() { route.node_id } else { accepted.node_id };
    // The server's word on who we are wins; older servers leave it empty.
    let user = if accepted.user.id != 0 {
        accepted.user
    } else if route.user_id != 0 {
        User { id: route.user_id, name: route.user_name }
    } else {
        User { id: user_id, name: user_name.to_owned() }
    };
    tracing::info!(node_id, user = user.id, token_expires_at_ms = accepted.token_expires_at_ms, "logged in");
    inner.set_user(user);
    Ok(Established {
        sink,
        stream,
        node_id,
        heartbeat: heartbeat(config.heartbeat, accepted.heartbeat_secs),
        token_expires_at_ms: accepted.token_expires_at_ms,
    })
}

/// A token from the provider, within the request timeout; `None` without a provider.
pub(crate) async fn fresh_token(inner: &Inner) -> Result<Option<String>, ClientError> {
    let Some(provider) = &inner.config.token else { return Ok(None) };
    let after = inner.config.request_timeout;
    let token =
        within("getting a token", after, async { provider.token().await.map_err(ClientError::Token) })
            .await?;
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(ClientError::Token("the token provider returned an empty token".into()));
    }
    Ok(Some(token))
}

/// Keeps the connection's token fresh: REFRESH with a new token from the provider at 80 % of
/// the current one's remaining lifetime (and at least a few seconds before it ends), then
/// again for the new token's `exp`. Runs until the connection ends (it is dropped then).
async fn keep_fresh(inner: &Inner, mut expires_at_ms: u64) -> Infallible {
    if expires_at_ms == 0 || inner.config.token.is_none() {
        return std::future::pending().await;
    }
    loop {
        let lifetime_ms = expires_at_ms.saturating_sub(now_ms());
        tokio::time::sleep(refresh_delay(expires_at_ms, SystemTime::now())).await;
        match refresh(inner, expires_at_ms).await {
            Ok(Some(token)) => {
                // An opaque token: assume it lives as long as the last one did.
                expires_at_ms = Claims::peek(&token).expires_at_ms.unwrap_or_else(|| now_ms() + lifetime_ms);
                tracing::debug!(expires_at_ms, "token refreshed");
                continue;
            }
            // A fixed token, or a provider that has no newer one yet: ask again later.
            Ok(None) => tracing::debug!(retry_in = ?REFRESH_RETRY, "no newer token to refresh with"),
            Err(e) => tracing::warn!(error = %e, retry_in = ?REFRESH_RETRY, "refreshing the token failed"),
        }
        tokio::time::sleep(REFRESH_RETRY).await;
        // The sleep at the top of the loop is then zero if the deadline is near.
        expires_at_ms = expires_at_ms.max(now_ms() + REFRESH_RETRY.as_millis() as u64);
    }
}

/// One REFRESH with a new token; returns that token once the server took it. `None`: the
/// provider's token expires no later than the current one (a fixed token), so sending it would
/// gain nothing.
async fn refresh(inner: &Inner, current_expires_at_ms: u64) -> Result<Option<String>, ClientError> {
    let token = fresh_token(inner).await?.ok_or(ClientError::Closed)?;
    if Claims::peek(&token).expires_at_ms.is_some_and(|exp| exp <= current_expires_at_ms) {
        return Ok(None);
    }
    expect_ack(inner.request(Body::Refresh { token: token.clone() }).await?)?;
    Ok(Some(token))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Route login through the first route URL that answers. `config.route` may list several,
/// comma-separated, so that clients can still find a node when the one they used is gone.
/// A definite answer (duplicate login, rejected) ends the search; only unreachable routes are
/// skipped.
async fn route_login(
    config: &crate::ClientConfig,
    who: Credentials<'_>,
) -> Result<route::RouteInfo, ClientError> {
    let after = config.request_timeout;
    let mut last = None;
    for url in config.route.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        match within("route login", after, route::login(url, who)).await {
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

/// The connection task: serves `established` (refreshing its token), and the connections
/// that replace it, until a shutdown, a KICK, or reconnecting fails for good. A KICK with
/// code `SHUTTING_DOWN` (or `UNAVAILABLE` from older servers), `IDLE_TIMEOUT` or
/// `TOKEN_EXPIRED` (the connection outlived its token) is treated as a lost connection: the
/// next login gets a new token.
pub(crate) async fn supervise(
    inner: Arc<Inner>,
    mut established: Established,
    mut commands: mpsc::Receiver<Command>,
    shutdown: CancellationToken,
) {
    loop {
        let connection = Connection {
            ids: &inner.ids,
            handler: &*inner.handler,
            deliveries: &inner.deliveries,
            heartbeat: established.heartbeat,
        };
        let end = tokio::select! {
            end = connection.run(established.sink, established.stream, commands, &shutdown) => end,
            never = keep_fresh(&inner, established.token_expires_at_ms) => match never {},
        };
        inner.detach();
        let reason = match end {
            End::Shutdown => return,
            // The node is going away (shutting down; UNAVAILABLE from servers before
            // SHUTTING_DOWN existed), not refusing us: another node (or the same one,
            // restarted) will take us. Heartbeats missed (a suspended laptop): log in again.
            // The token ran out before a refresh got through: a new one may do.
            End::Kicked {
                code:
                    code @ (ErrorCode::ShuttingDown
                    | ErrorCode::Unavailable
                    | ErrorCode::IdleTimeout
                    | ErrorCode::TokenExpired),
                reason,
            } => {
                format!("{reason} ({code})")
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
    let seed = Backoff::seed_for(inner.user().id);
    let mut backoff = Backoff::new(inner.config.reconnect.clone(), seed);
    let mut failed = 0u32;
    // At least this long before the next attempt: what a rate limit asked for.
    let mut retry_after = Duration::ZERO;
    // An expired token is worth one more try (the provider may have a new one by then), not
    // twenty: a fixed token stays expired.
    let mut expired_before = false;
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
                tokio::time::sleep(delay.max(retry_after)).await;
                establish(inner).await
            } => result,
        };
        retry_after = match &result {
            Err(ClientError::RateLimited { retry_after, .. }) => *retry_after,
            _ => Duration::ZERO,
        };
        let expired_again = match &result {
            Err(ClientError::TokenExpired(_)) => std::mem::replace(&mut expired_before, true),
            _ => false,
        };
        match result {
            Ok(established) => return Some(established),
            Err(e) if e.is_transient() && !expired_again => {
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
mod token_tests;

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
