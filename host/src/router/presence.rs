//! Pushed presence: sessions that logged in with `Login.presence` get PRESENCE frames saying
//! whose presence changed, gathered for about a second (see `proto/cim.proto`).
//!
//! Each node notes the users whose sessions it bound or released. Once per [`INTERVAL`] it
//! tells every other live node which users those were, and, when sessions here asked for
//! presence, reads the current state of every user noted here or by another node from the
//! store: so a frame says what is true when it is sent, whatever order the changes came in
//! (a user moving to another node is released on one and bound on the other, and the two
//! notes can arrive either way round). Each subscriber then gets what the online-list handler
//! lets them see. When changes cannot be listed (more than [`MAX_CHANGES`], the store did not
//! answer, entries were removed wholesale: a dead node reaped, leftovers released after a
//! Redis outage), subscribers are told to ask for the whole list again (`resync`).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use cim_proto::{Body, Encoded, Frame, User};
use futures_util::StreamExt;
use tracing::debug;

use super::{LocalConn, Outgoing, Router};
use crate::cluster::ClusterMessage;

/// How long changes are gathered before they are pushed.
pub const INTERVAL: Duration = Duration::from_secs(1);
/// The most users one PRESENCE frame lists; with more changes it says `resync`.
pub const MAX_CHANGES: usize = 1000;
/// Subscribers whose frames are prepared at once (each is an online-handler call).
const CONCURRENT_SUBSCRIBERS: usize = 32;

/// Users whose presence changed, not yet pushed.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    state: Mutex<ChangesState>,
    /// Wakes the pushing task (which sleeps while nothing changes).
    wake: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct ChangesState {
    /// Changed on this node, not yet told to the other nodes.
    local: BTreeMap<u64, String>,
    /// Changed here or on another node, not yet pushed to this node's subscribers.
    pending: BTreeMap<u64, String>,
    /// Entries were removed without a list of whose: subscribers here must ask again.
    resync: bool,
    /// The same, still to be told to the other nodes.
    resync_others: bool,
}

/// What one round has to push and to tell the other nodes.
#[derive(Debug, Default, PartialEq, Eq)]
struct Round {
    tell: Vec<(u64, String)>,
    tell_resync: bool,
    push: BTreeMap<u64, String>,
    push_resync: bool,
}

impl Changes {
    fn state(&self) -> std::sync::MutexGuard<'_, ChangesState> {
        // Plain inserts: a panic cannot leave the maps half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A session of `user` was bound or released on this node.
    pub(crate) fn note(&self, user: &User) {
        let mut state = self.state();
        state.local.insert(user.id, user.name.clone());
        state.pending.insert(user.id, user.name.clone());
        self.wake.notify_one();
    }

    /// Online entries were removed without a list of whose (a dead node reaped, leftovers
    /// released): every subscriber, here and on the other nodes, asks for the list again.
    pub(crate) fn note_unlisted(&self) {
        let mut state = self.state();
        state.resync = true;
        state.resync_others = true;
        self.wake.notify_one();
    }

    /// Another node's changes.
    pub(crate) fn note_remote(&self, users: Vec<(u64, String)>, resync: bool) {
        let mut state = self.state();
        state.pending.extend(users);
        state.resync |= resync;
        self.wake.notify_one();
    }

    fn take(&self) -> Round {
        let mut state = self.state();
        Round {
            tell: std::mem::take(&mut state.local).into_iter().collect(),
            tell_resync: std::mem::take(&mut state.resync_others),
            push: std::mem::take(&mut state.pending),
            push_resync: std::mem::take(&mut state.resync),
        }
    }
}

/// Pushes presence changes, gathered for [`INTERVAL`] after the first, until the router is
/// gone. Sleeps while nothing changes.
pub(crate) async fn run(changes: Arc<Changes>, router: Weak<Router>) {
    loop {
        changes.wake.notified().await;
        tokio::time::sleep(INTERVAL).await;
        let Some(router) = router.upgrade() else { return };
        router.push_presence(false).await;
    }
}

impl Router {
    /// Tells the other nodes at once what changed here (at shutdown, once the sessions have
    /// closed: the process may end before the next round), waiting up to a second for it.
    pub async fn flush_presence(&self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.push_presence(true)).await;
    }

    /// One round: tells the other nodes what changed here, then pushes what changed
    /// anywhere to the sessions here that asked for it. `wait`: until the other nodes' messages
    /// are published.
    async fn push_presence(&self, wait: bool) {
        let round = self.presence.take();
        if let Some(cluster) = self.cluster.get()
            && (!round.tell.is_empty() || round.tell_resync)
        {
            match cluster.registry.nodes().await {
                Ok(nodes) => {
                    let mut published = Vec::new();
                    for node in nodes.iter().filter(|n| n.id != self.config.node_id) {
                        let msg =
                            ClusterMessage::Presence { users: round.tell.clone(), resync: round.tell_resync };
                        // A node that does not hear it misses changes its subscribers see at
                        // their next ONLINE request.
                        published.push(cluster.bus.enqueue(&node.id, msg));
                    }
                    if wait {
                        futures_util::future::join_all(published).await;
                    }
                }
                Err(e) => debug!(error = %e, "could not tell other nodes about presence changes"),
            }
        }
        if round.push.is_empty() && !round.push_resync {
            return;
        }
        let subscribers: Vec<LocalConn> = self.local().values().filter(|c| c.presence).cloned().collect();
        if subscribers.is_empty() {
            return;
        }
        let changes = if round.push_resync || round.push.len() > MAX_CHANGES {
            None
        } else {
            let ids: Vec<u64> = round.push.keys().copied().collect();
            match self.store().lookup_many(&ids).await {
                Ok(entries) => {
                    let online: Vec<User> = entries.into_iter().map(|e| e.user).collect();
                    let here: HashSet<u64> = online.iter().map(|u| u.id).collect();
                    let offline: Vec<User> = round
                        .push
                        .into_iter()
                        .filter(|(id, _)| !here.contains(id))
                        .map(|(id, name)| User { id, name })
                        .collect();
                    Some((online, offline))
                }
                Err(e) => {
                    debug!(error = %e, "could not read presence changes; subscribers will ask again");
                    None
                }
            }
        };
        let changes = &changes;
        futures_util::stream::iter(subscribers)
            .for_each_concurrent(CONCURRENT_SUBSCRIBERS, |conn| async move {
                let body = self.presence_for(&conn, changes.as_ref()).await;
                if let Some(body) = body {
                    conn.offer(Outgoing::from(Encoded::from(Frame::push(body))), &self.metrics);
                }
            })
            .await;
    }

    /// The PRESENCE frame `conn` gets for `changes` (`None`: resync), filtered by the
    /// online-list handler; `None` when it may see none of them.
    async fn presence_for(&self, conn: &LocalConn, changes: Option<&(Vec<User>, Vec<User>)>) -> Option<Body> {
        let resync = Body::Presence { online: Vec::new(), offline: Vec::new(), resync: true };
        let Some((online, offline)) = changes else { return Some(resync) };
        let all: Vec<User> = online.iter().chain(offline).cloned().collect();
        let visible: HashSet<u64> = match self.handlers.online(conn.user.clone(), all).await {
            Ok(users) => users.into_iter().map(|u| u.id).collect(),
            // Its ONLINE request will say what is wrong.
            Err(_) => return Some(resync),
        };
        let pick = |users: &[User]| -> Vec<User> {
            users.iter().filter(|u| visible.contains(&u.id)).cloned().collect()
        };
        let (online, offline) = (pick(online), pick(offline));
        (!online.is_empty() || !offline.is_empty()).then_some(Body::Presence {
            online,
            offline,
            resync: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64) -> User {
        User { id, name: format!("u{id}") }
    }

    #[test]
    fn a_round_takes_local_changes_for_others_and_every_change_for_subscribers() {
        let changes = Changes::default();
        changes.note(&user(2));
        changes.note(&user(1));
        changes.note(&user(2));
        changes.note_remote(vec![(3, "u3".into())], false);
        let round = changes.take();
        assert_eq!(round.tell, vec![(1, "u1".into()), (2, "u2".into())], "each user once, by id");
        assert_eq!(round.push.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert!(!round.tell_resync && !round.push_resync);
        assert_eq!(changes.take(), Round::default(), "taken");
        changes.note_unlisted();
    }

    #[test]
    fn unlisted_removals_make_everyone_ask_again() {
        let changes = Changes::default();
        changes.note_unlisted();
        let round = changes.take();
        assert!(round.tell_resync && round.push_resync);
        // Another node's resync is pushed here but not told on (it told everyone itself).
        changes.note_remote(Vec::new(), true);
        let round = changes.take();
        assert!(round.push_resync && !round.tell_resync);
    }
}
