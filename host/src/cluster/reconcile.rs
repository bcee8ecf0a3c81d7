//! Putting this node's users back into Redis after Redis lost them (restarted empty, or the
//! node's entries were reaped while it stalled): by sets, in bulk, and safe against the
//! logins and logouts that go on meanwhile.
//!
//! The rebuild claims the set of local sessions in scripts of [`RESTORE_BATCH`] users
//! ([`RedisStore::restore_many`]), then looks at the local sessions again: a user who left
//! while the claims were on the wire is released (so no entry outlives its session), and a
//! user someone else holds now is closed here with `DUPLICATE_LOGIN`. Why no ghost is left:
//! a session leaves the local map before its own release is sent, so either that release
//! runs after the claim, or this check — made after the claim's reply — sees the session
//! gone and releases it.
//!
//! Redis can also lose some of a node's entries while the node's registry entry survives (a
//! Redis Cluster failover that lost the last writes, someone deleting `online` entries):
//! [`missing_entries`] finds that cheaply, so housekeeping can rebuild then too, and never
//! because of ordinary churn.

use std::collections::HashSet;

use cim_proto::ErrorCode;
use tracing::{info, warn};

use crate::router::Router;
use crate::store::redis::{RESTORE_BATCH, RedisStore, Restored};
use crate::store::{OnlineEntry, StoreError};

/// What one rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Sessions whose entries were missing and are back.
    pub restored: usize,
    /// Sessions whose entries were already there.
    pub held: usize,
    /// Local sessions closed because the user is online elsewhere now.
    pub kicked: usize,
    /// Entries claimed for sessions that closed during the rebuild, released again.
    pub released: usize,
}

/// Rebuilds this node's online entries from its local sessions (see the module docs).
pub async fn reconcile(store: &RedisStore, router: &Router) -> Result<Reconciled, StoreError> {
    let node_id = router.config().node_id.clone();
    let mut done = Reconciled::default();
    let sessions = router.local_entries();
    for batch in sessions.chunks(RESTORE_BATCH) {
        let found = store.restore_many(&node_id, batch).await?;
        let mut left = Vec::new();
        for (entry, found) in batch.iter().zip(found) {
            let OnlineEntry { user, conn_id, .. } = entry;
            let here = router.holds(user.id, *conn_id);
            match found {
                Restored::Claimed | Restored::Held if !here => left.push((user.id, *conn_id)),
                Restored::Claimed => done.restored += 1,
                Restored::Held => done.held += 1,
                Restored::Taken(_) if !here => {}
                Restored::Taken(other) => {
                    let why = format!("logged in again on node {}", other.node_id);
                    router.kick_conn(user.id, *conn_id, ErrorCode::DuplicateLogin, &why);
                    done.kicked += 1;
                }
            }
        }
        if !left.is_empty() {
            done.released += store.release_many(&node_id, &left).await?;
        }
    }
    Ok(done)
}

/// How many local sessions have no online entry in Redis at all (a loss to rebuild).
///
/// First one round trip of counts ([`RedisStore::presence_counts`]): the node's `node-users`
/// set holds at least its local sessions (a login claims before it binds locally, a logout
/// unbinds before it releases, so churn only ever makes the set larger for a moment), and
/// the `online` hash has as many entries as all `node-users` sets have members (every
/// presence script changes both at once). Only when either fails does it compare by sets:
/// it reads the local users' entries (one `HMGET` per thousand) and counts those with no
/// entry whose session is still here after the reply (a session that left meanwhile was
/// released, not lost). An entry naming another node is not a loss either: a take-over
/// moved it, and the kick is on its way.
pub async fn missing_entries(store: &RedisStore, router: &Router) -> Result<usize, StoreError> {
    let counts = store.presence_counts(&router.config().node_id).await?;
    let local = router.local_connections() as u64;
    if counts.mine >= local && counts.entries == counts.members {
        return Ok(0);
    }
    let sessions = router.local_entries();
    let ids: Vec<u64> = sessions.iter().map(|e| e.user.id).collect();
    let present: HashSet<u64> = store.lookup_many(&ids).await?.into_iter().map(|e| e.user.id).collect();
    Ok(sessions
        .iter()
        .filter(|e| !present.contains(&e.user.id) && router.holds(e.user.id, e.conn_id))
        .count())
}

/// Releases the entries of sessions that closed while Redis could not be reached (see
/// [`Router::logout`]); gives them back to the router if Redis still does not answer.
pub async fn release_leftovers(store: &RedisStore, router: &Router) {
    let pairs = router.take_unreleased();
    if pairs.is_empty() {
        return;
    }
    match store.release_many(&router.config().node_id, &pairs).await {
        Ok(n) => {
            info!(
                sessions = pairs.len(),
                released = n,
                "released the entries of sessions that closed while redis was away"
            );
            if n > 0 {
                router.presence_unlisted();
            }
        }
        Err(e) => {
            warn!(error = %e, sessions = pairs.len(), "could not release the entries of closed sessions; will retry");
            router.retry_release(pairs);
        }
    }
}
