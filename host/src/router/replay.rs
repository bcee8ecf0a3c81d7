//! Resuming a session: replaying the log after the client's positions before live traffic.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cim_proto::{Body, Delivery, Encoded, Frame, MessageKind, Positions};
use tracing::{debug, warn};

use super::{LocalConn, RouteError, Router};
use crate::metrics::Metrics;
use crate::store::{LogEntry, LogRead, LogStream};

/// Entries read per round trip while replaying.
const REPLAY_PAGE: usize = 256;

/// How long [`Router::fill`] waits for a delivery that was overtaken before it reads the log.
const GAP_GRACE: Duration = Duration::from_millis(5);

/// How long [`Router::fill`] keeps trying while the store does not answer.
pub const FILL_FOR: Duration = Duration::from_secs(30);

/// Where a session resumed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Replay started after these positions.
    pub from: Positions,
    /// Entries after `from` had already fallen out of retention: not replayed.
    pub missed_inbox: bool,
    pub missed_group: bool,
}

impl Router {
    /// Replays `conn`'s user's inbox and group entries after `from` into its queue, then
    /// lets live deliveries through (held meanwhile by the connection's seam, those already
    /// replayed dropped). `login_ack` makes the first frame, from what the first reads found.
    pub async fn replay(
        &self,
        conn: &LocalConn,
        from: Positions,
        login_ack: impl FnOnce(&Resumed) -> Encoded,
    ) -> Result<Resumed, RouteError> {
        let user = conn.user.id;
        let log = self.store().log();
        let inbox = log.read(LogStream::Inbox(user), from.inbox, REPLAY_PAGE).await?;
        let group = log.read(LogStream::Group, from.group, REPLAY_PAGE).await?;
        let resumed = Resumed {
            from,
            missed_inbox: inbox.trimmed_through > from.inbox,
            missed_group: group.trimmed_through > from.group,
        };
        if conn.tx.send(login_ack(&resumed)).await.is_err() {
            return Ok(resumed);
        }
        let mut through = from;
        for (kind, stream, first) in [
            (MessageKind::Private, LogStream::Inbox(user), inbox),
            (MessageKind::Group, LogStream::Group, group),
        ] {
            let mut read = first;
            loop {
                let full = read.entries.len() >= REPLAY_PAGE;
                if !self.send_replayed(conn, kind, &read, &mut through).await {
                    return Ok(resumed);
                }
                if !full {
                    break;
                }
                read = log.read(stream, through.of(kind), REPLAY_PAGE).await?;
            }
        }
        if !conn.go_live(through, &self.metrics) {
            self.fill(conn).await;
        }
        Ok(resumed)
    }

    /// Holds live deliveries to every live session on this node (closes their seams): for a
    /// node that just found its cluster inbox lost, before anything published after the
    /// resubscription arrives. Returns the sessions held, for [`Router::catch_up`].
    pub fn hold_live(&self) -> Vec<LocalConn> {
        self.local().values().filter(|c| c.seam.hold()).cloned().collect()
    }

    /// Sends each of `conns` (held by [`Router::hold_live`]) what the log holds for it past
    /// where it was, then lets its held live deliveries through (less those the catch-up
    /// sent): for a node whose cluster inbox was lost for a while (Redis restarted, the
    /// pub/sub connection dropped), so that deliveries published meanwhile still arrive, in
    /// order, without a reconnect. A message that was also delivered live before the loss is
    /// a duplicate the client drops by message id. Returns how many deliveries it queued.
    ///
    /// `from` holds, per user, where to start (their positions a little before the inbox was
    /// lost); a session not in it starts where it is now. A session is let go live once caught
    /// up; on an error those not caught up stay held, for the caller to try again (or to let
    /// go with [`LocalConn::go_live`]).
    pub async fn catch_up(
        &self,
        conns: Vec<LocalConn>,
        from: &HashMap<u64, Positions>,
    ) -> Result<usize, RouteError> {
        use futures_util::StreamExt;
        if conns.is_empty() {
            return Ok(0);
        }
        let start = |c: &LocalConn| {
            let now = c.seam.queued();
            from.get(&c.user.id)
                .map_or(now, |f| Positions { inbox: f.inbox.min(now.inbox), group: f.group.min(now.group) })
        };
        // The group once, from the earliest position any session here is at.
        let group_from = conns.iter().map(|c| start(c).group).min().unwrap_or(0);
        let group = self.read_all(LogStream::Group, group_from).await?;
        let sent = futures_util::stream::iter(conns)
            .map(|conn| {
                let group = &group;
                async move { self.catch_up_one(&conn, start(&conn), group).await }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        sent.into_iter().sum()
    }

    /// One session's catch-up: its inbox after `from`, then the group entries after `from`
    /// (read once for every session), then live, or on to [`Router::fill`] when a delivery
    /// held meanwhile still follows a gap.
    async fn catch_up_one(
        &self,
        conn: &LocalConn,
        from: Positions,
        group: &[LogEntry],
    ) -> Result<usize, RouteError> {
        let (sent, live) = self.send_missed(conn, from, group).await?;
        if !live {
            self.fill(conn).await;
        }
        Ok(sent)
    }

    /// Sends `conn` its inbox after `from` and the entries of `group` after `from`, then
    /// ends its hold ([`LocalConn::go_live`]). Returns how many deliveries it queued, and
    /// whether the seam is live (`false`: a held delivery still follows a gap).
    async fn send_missed(
        &self,
        conn: &LocalConn,
        from: Positions,
        group: &[LogEntry],
    ) -> Result<(usize, bool), RouteError> {
        let inbox = self.read_all(LogStream::Inbox(conn.user.id), from.inbox).await?;
        let mut through = from;
        let mut sent = 0;
        let group = group.iter().filter(|e| e.position > from.group);
        for (kind, entry) in
            inbox.iter().map(|e| (MessageKind::Private, e)).chain(group.map(|e| (MessageKind::Group, e)))
        {
            through.advance(kind, entry.position);
            if !entry.message.is_for(conn.user.id) {
                continue;
            }
            let frame = Encoded::from(Frame::push(Body::Delivery(delivery(kind, entry, false))));
            if conn.tx.send(frame).await.is_err() {
                return Ok((sent, true));
            }
            conn.seam.note(kind, entry.position);
            sent += 1;
        }
        Ok((sent, conn.go_live(through, &self.metrics)))
    }

    /// Sends `conn` what the log holds past where its seam is, until no held delivery
    /// follows a gap any more (see [`Seam`](super::Seam)): after a live delivery skipped
    /// entries (another node's delivery still on its way, or lost with a node that died
    /// between writing and publishing it). While the store does not answer it tries again
    /// for [`FILL_FOR`], the session's live deliveries held; then the connection is closed
    /// with `UNAVAILABLE`, so that the client resumes from its acknowledged position rather
    /// than acknowledging past a message it never got.
    pub async fn fill(&self, conn: &LocalConn) {
        loop {
            self.fill_until_live(conn).await;
            if conn.seam.fill_done(conn.closer.is_cancelled()) {
                return;
            }
        }
    }

    async fn fill_until_live(&self, conn: &LocalConn) {
        // Most gaps are a delivery overtaken by a later one (two sends whose writes finished
        // in one order and whose deliveries arrived in the other; the seam lets them through
        // as soon as it arrives): give it a moment before reading the log.
        tokio::time::sleep(GAP_GRACE).await;
        if conn.start_reading(&self.metrics) {
            return;
        }
        Metrics::inc(&self.metrics.gap_fills_total);
        let started = Instant::now();
        let mut wait = Duration::from_millis(20);
        loop {
            if conn.closer.is_cancelled() {
                return;
            }
            let from = conn.seam.queued();
            let read = match self.read_all(LogStream::Group, from.group).await {
                Ok(group) => self.send_missed(conn, from, &group).await,
                Err(e) => Err(e),
            };
            match read {
                Ok((_, true)) => return,
                // A delivery written after the read is held behind a gap: read again.
                Ok((_, false)) if conn.seam.queued() != from => {}
                Ok((_, false)) => {
                    // The read had nothing between: the entries are gone from the log
                    // (Redis lost its data, or retention dropped them).
                    warn!(
                        user = conn.user.id,
                        "entries before a live delivery are gone from the log; delivering past them"
                    );
                    conn.go_live_past_gaps(&self.metrics);
                    return;
                }
                Err(e) if started.elapsed() < FILL_FOR => {
                    debug!(user = conn.user.id, error = %e, "could not read the log to fill a gap yet");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    warn!(user = conn.user.id, error = %e, "could not read the log to fill a gap: closing the session so that it resumes");
                    conn.close_to_resume();
                    return;
                }
            }
        }
    }

    /// Every entry of `stream` after `after`, page by page.
    async fn read_all(&self, stream: LogStream, mut after: u64) -> Result<Vec<LogEntry>, RouteError> {
        let log = self.store().log();
        let mut all = Vec::new();
        loop {
            let read = log.read(stream, after, REPLAY_PAGE).await?;
            let full = read.entries.len() >= REPLAY_PAGE;
            after = read.entries.last().map_or(after, |e| e.position);
            all.extend(read.entries);
            if !full {
                return Ok(all);
            }
        }
    }

    /// Where every session on this node is: the highest positions queued to it.
    pub fn queued_positions(&self) -> HashMap<u64, Positions> {
        self.local().values().map(|c| (c.user.id, c.seam.queued())).collect()
    }

    /// Queues the entries of `read` meant for `conn`'s user (waiting for room: the client
    /// reads its backlog at its own pace) and moves `through` past all of them. `false`:
    /// the connection closed.
    async fn send_replayed(
        &self,
        conn: &LocalConn,
        kind: MessageKind,
        read: &LogRead,
        through: &mut Positions,
    ) -> bool {
        let user = conn.user.id;
        for entry in &read.entries {
            through.advance(kind, entry.position);
            conn.seam.note(kind, entry.position);
            if !entry.message.is_for(user) {
                continue;
            }
            let delivery = delivery(kind, entry, true);
            if conn.tx.send(Encoded::from(Frame::push(Body::Delivery(delivery)))).await.is_err() {
                return false;
            }
            Metrics::inc(&self.metrics.replayed_total);
        }
        true
    }
}

/// A log entry as a DELIVERY.
fn delivery(kind: MessageKind, entry: &LogEntry, replayed: bool) -> Delivery {
    let m = &entry.message;
    Delivery {
        message_id: m.id,
        sender: m.sender(),
        kind,
        text: m.text.clone(),
        timestamp_ms: m.timestamp_ms,
        position: entry.position,
        replayed,
    }
}
