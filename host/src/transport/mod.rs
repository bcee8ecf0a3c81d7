//! Client transports. Both feed [`crate::session::run`] with the same frame stream/sink
//! shape: [`tcp`] with the length-delimited codec, [`crate::http::ws`] with one envelope per
//! binary WebSocket message; both take their connection [`Slot`] from [`Sessions`].

pub mod tcp;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::router::Router;

/// What every transport needs to start sessions.
#[derive(Debug, Clone)]
pub struct Sessions {
    pub router: Arc<Router>,
    /// One permit per open client connection, shared by TCP and WebSocket.
    pub limit: Arc<Semaphore>,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// The admin API, when an admin token is configured.
    pub admin: Option<Arc<crate::http::admin::Admin>>,
}

/// Holds a connection slot; keeps the connection gauge right however the session ends.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    router: Arc<Router>,
}

impl Sessions {
    pub fn new(
        router: Arc<Router>,
        admin: Option<Arc<crate::http::admin::Admin>>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(router.config().max_connections));
        Sessions { router, limit, shutdown, tracker, admin }
    }

    /// Takes a connection slot, or `None` when the node is at its connection limit.
    pub fn slot(&self) -> Option<Slot> {
        let metrics = &self.router.metrics;
        match self.limit.clone().try_acquire_owned() {
            Ok(permit) => {
                Metrics::inc(&metrics.connections_total);
                Metrics::inc(&metrics.connections);
                Some(Slot { _permit: permit, router: self.router.clone() })
            }
            Err(_) => {
                Metrics::inc(&metrics.connections_refused_total);
                None
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.router.metrics.connections.dec();
    }
}
