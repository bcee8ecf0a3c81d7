//! History on top of the log: one page of a user's inbox (their private messages, both
//! directions) or of the group stream as that user may see it.

use cim_proto::Positions;

use super::{RouteError, Router};
use crate::store::{LogEntry, LogStream};

/// The most entries one history page holds.
pub const MAX_HISTORY_PAGE: usize = 1000;

/// Which way a history page reads from its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    /// The newest entries before this position (0: the newest of all), newest first.
    Before(u64),
    /// The oldest entries after this position, oldest first.
    After(u64),
}

/// One page of history.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    pub entries: Vec<LogEntry>,
    /// Positions at or below this fell out of retention.
    pub trimmed_through: u64,
    /// The stream's newest position.
    pub last: u64,
}

impl Router {
    /// Up to `limit` entries of `user`'s `stream` that they may see (group messages meant for
    /// others are skipped, so a page may take several reads; it stops after a bounded amount
    /// of skipping and returns what it found).
    pub async fn history(
        &self,
        user: u64,
        group: bool,
        page: Page,
        limit: usize,
    ) -> Result<HistoryPage, RouteError> {
        let limit = limit.clamp(1, MAX_HISTORY_PAGE);
        let stream = if group { LogStream::Group } else { LogStream::Inbox(user) };
        let log = self.store().log();
        let mut out = HistoryPage::default();
        let mut cursor = page;
        // Each read looks at up to `limit` entries; at most 10 reads per page.
        for _ in 0..10 {
            let read = match cursor {
                Page::Before(p) => log.read_back(stream, p, limit).await?,
                Page::After(p) => log.read(stream, p, limit).await?,
            };
            out.trimmed_through = read.trimmed_through;
            out.last = read.last;
            let exhausted = read.entries.len() < limit;
            if let Some(e) = read.entries.last() {
                cursor = match cursor {
                    Page::Before(_) => Page::Before(e.position),
                    Page::After(_) => Page::After(e.position),
                };
            }
            out.entries.extend(read.entries.into_iter().filter(|e| e.message.visible_to(user)));
            if exhausted || out.entries.len() >= limit {
                break;
            }
        }
        out.entries.truncate(limit);
        Ok(out)
    }

    /// Where `user`'s replay starts: the client's positions where it gave them, else the ones
    /// kept from their acks; a user seen for the first time starts the group from now (and
    /// that is remembered), their inbox from its beginning (messages sent to them before).
    pub async fn resume_point(&self, user: u64, client: Positions) -> Result<Positions, RouteError> {
        let log = self.store().log();
        let kept = log.acked(user).await?;
        let kept = match kept {
            Some(kept) => kept,
            None => {
                let now = log.read_back(LogStream::Group, 0, 1).await?.last;
                let first = Positions { inbox: 0, group: now };
                log.ack(user, first).await?;
                first
            }
        };
        let pick = |given: u64, kept: u64| if given > 0 { given } else { kept };
        Ok(Positions { inbox: pick(client.inbox, kept.inbox), group: pick(client.group, kept.group) })
    }
}
