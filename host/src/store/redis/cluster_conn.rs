//! A Redis Cluster connection that is built again from its seeds when it stops finding the
//! cluster.
//!
//! redis-rs's cluster client repairs lost connections and follows slot moves on its own, but
//! one state it never leaves: a slot refresh that read an empty layout (a node answering
//! `CLUSTER SLOTS` while the cluster is re-forming after a restart) drops every connection,
//! and from then on each refresh fails with "No connections found", in a busy loop, for
//! good: a node's users could not send, and it logged millions of lines. [`Rebuilt`] watches
//! the outcome of every request and replaces such a client with a new one from the seeds:
//! at once when the client says it has no connection, after [`FAILING_FOR`] when every
//! request has failed to reach the cluster. The old client ends when its last request does.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, RedisResult};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::conn::Endpoint;

/// Requests failing to reach the cluster for this long start a rebuild.
pub(super) const FAILING_FOR: Duration = Duration::from_secs(5);
/// Rebuilds start at least this far apart (one runs at a time).
pub(super) const REBUILD_EVERY: Duration = Duration::from_secs(2);
/// How long building a new client may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(10);

/// What a request's outcome says about the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    /// The cluster answered (an error reply such as `CLUSTERDOWN` included): the client works.
    Reached,
    /// The client has no connection to try: it will not recover by itself.
    NoConnection,
    /// The cluster could not be reached (refused, timed out, dropped): perhaps down, perhaps
    /// the client.
    Unreachable,
}

impl Outcome {
    pub(super) fn of<T>(result: &RedisResult<T>) -> Outcome {
        match result {
            Ok(_) => Outcome::Reached,
            Err(e) => Outcome::of_error(e),
        }
    }

    fn of_error(e: &RedisError) -> Outcome {
        if e.kind() == ErrorKind::ClusterConnectionNotFound {
            Outcome::NoConnection
        } else if e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
        {
            Outcome::Unreachable
        } else {
            Outcome::Reached
        }
    }
}

/// When requests have been failing and when the last rebuild started.
#[derive(Debug, Default)]
pub(super) struct Health {
    failing_since: Option<Instant>,
    last_rebuild: Option<Instant>,
    rebuilding: bool,
}

impl Health {
    /// Notes `outcome` at `now`; true if a rebuild should start (and is then marked running).
    pub(super) fn note(&mut self, outcome: Outcome, now: Instant) -> bool {
        let failing_since = match outcome {
            Outcome::Reached => {
                self.failing_since = None;
                return false;
            }
            Outcome::NoConnection | Outcome::Unreachable => *self.failing_since.get_or_insert(now),
        };
        let due = match outcome {
            Outcome::NoConnection => true,
            _ => now.duration_since(failing_since) >= FAILING_FOR,
        };
        let spaced = self.last_rebuild.is_none_or(|at| now.duration_since(at) >= REBUILD_EVERY);
        if due && spaced && !self.rebuilding {
            self.rebuilding = true;
            self.last_rebuild = Some(now);
            return true;
        }
        false
    }

    /// A rebuild ended; `replaced` if a new client is now in use.
    pub(super) fn rebuilt(&mut self, replaced: bool) {
        self.rebuilding = false;
        if replaced {
            self.failing_since = None;
        }
    }
}

/// The shared cluster client, replaced when it stops finding the cluster.
pub(super) struct Rebuilt {
    seeds: Vec<String>,
    home: Handle,
    current: RwLock<ClusterConnection>,
    /// Set while requests fail, so that a working client's requests skip the lock.
    failing: AtomicBool,
    health: Mutex<Health>,
    rebuilds: AtomicU64,
}

impl Rebuilt {
    pub(super) fn new(seeds: Vec<String>, home: Handle, conn: ClusterConnection) -> Arc<Rebuilt> {
        Arc::new(Rebuilt {
            seeds,
            home,
            current: RwLock::new(conn),
            failing: AtomicBool::new(false),
            health: Mutex::default(),
            rebuilds: AtomicU64::new(0),
        })
    }

    /// The client in use now (a cheap handle onto it).
    pub(super) fn conn(&self) -> ClusterConnection {
        self.current.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// How many times the client has been replaced.
    pub(super) fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// Notes a request's outcome; starts a rebuild when it is due.
    pub(super) fn observe<T>(self: &Arc<Self>, result: &RedisResult<T>) {
        let outcome = Outcome::of(result);
        if outcome == Outcome::Reached && !self.failing.load(Ordering::Relaxed) {
            return;
        }
        let start = {
            let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
            let start = health.note(outcome, Instant::now());
            self.failing.store(health.failing_since.is_some(), Ordering::Relaxed);
            start
        };
        if start {
            if let Err(e) = result {
                warn!(error = %e, "redis cluster client: rebuilding it from the seeds");
            }
            self.home.spawn(self.clone().rebuild());
        }
    }

    async fn rebuild(self: Arc<Self>) {
        let build = async {
            Endpoint::cluster_client(&self.seeds, None::<super::conn::NoPush>)?.get_async_connection().await
        };
        let replaced = match tokio::time::timeout(BUILD_TIMEOUT, build).await {
            Ok(Ok(conn)) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = conn;
                let n = self.rebuilds.fetch_add(1, Ordering::Relaxed) + 1;
                info!(rebuilds = n, "redis cluster client rebuilt from the seeds");
                true
            }
            Ok(Err(e)) => {
                warn!(error = %e, "redis cluster client: rebuilding failed; trying again on the next failed request");
                false
            }
            Err(_) => {
                warn!(
                    "redis cluster client: rebuilding took over {BUILD_TIMEOUT:?}; trying again on the next failed request"
                );
                false
            }
        };
        let mut health = self.health.lock().unwrap_or_else(|e| e.into_inner());
        health.rebuilt(replaced);
        self.failing.store(health.failing_since.is_some(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: ErrorKind) -> RedisError {
        RedisError::from((kind, "test"))
    }

    #[test]
    fn outcomes_tell_a_lost_client_from_an_answer() {
        assert_eq!(Outcome::of(&Ok::<(), _>(())), Outcome::Reached);
        assert_eq!(Outcome::of_error(&err(ErrorKind::ClusterConnectionNotFound)), Outcome::NoConnection);
        assert_eq!(
            Outcome::of_error(&RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))),
            Outcome::Unreachable
        );
        assert_eq!(Outcome::of_error(&err(ErrorKind::Io)), Outcome::Unreachable);
        // An error reply is an answer: the client reached the cluster.
        assert_eq!(
            Outcome::of_error(&err(ErrorKind::Server(redis::ServerErrorKind::ClusterDown))),
            Outcome::Reached
        );
    }

    #[test]
    fn a_client_without_connections_is_rebuilt_at_once_and_not_in_a_loop() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(h.note(Outcome::NoConnection, t0), "rebuilt at the first sign");
        assert!(!h.note(Outcome::NoConnection, t0 + Duration::from_millis(10)), "one at a time");
        h.rebuilt(false);
        assert!(!h.note(Outcome::NoConnection, t0 + REBUILD_EVERY / 2), "spaced out");
        assert!(h.note(Outcome::NoConnection, t0 + REBUILD_EVERY), "again once spaced");
        h.rebuilt(true);
        assert!(!h.note(Outcome::Reached, t0 + REBUILD_EVERY * 2));
    }

    #[test]
    fn failures_to_reach_the_cluster_rebuild_only_when_they_last() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert!(!h.note(Outcome::Unreachable, t0));
        assert!(!h.note(Outcome::Unreachable, t0 + FAILING_FOR / 2));
        // An answer in between starts the count again.
        assert!(!h.note(Outcome::Reached, t0 + FAILING_FOR / 2));
        assert!(!h.note(Outcome::Unreachable, t0 + FAILING_FOR));
        assert!(h.note(Outcome::Unreachable, t0 + FAILING_FOR * 2));
        h.rebuilt(false);
        // The cluster is still down: tried again, spaced out, while requests keep failing.
        assert!(!h.note(Outcome::Unreachable, t0 + FAILING_FOR * 2 + REBUILD_EVERY / 2));
        assert!(h.note(Outcome::Unreachable, t0 + FAILING_FOR * 2 + REBUILD_EVERY));
    }
}
