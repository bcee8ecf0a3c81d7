//! The durable message log: what makes delivery at least once.
//!
//! Every accepted message is appended before its sender is told it was accepted, then
//! delivered. A private message goes into the receiver's inbox and the sender's (one user's
//! inbox holds both directions of their private conversations); a group message goes into
//! the group stream once, with the recipient filter its handler decided. Each entry gets a
//! position that only grows within its stream; clients acknowledge positions, and a login
//! replays every entry after the client's position.
//!
//! Retention drops the oldest entries of a stream past a count or an age; a read says how
//! far that went ([`LogRead::trimmed_through`]), so a client that was away too long learns it
//! missed messages instead of silently not getting them.
//!
//! Backends: [`MemoryLog`] here (tests, `--store memory`), the on-disk embedded log
//! (`store::embedded`), Redis Streams (`store::redis::log`).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use cim_proto::{MessageKind, Positions, User};
use serde::{Deserialize, Serialize};

use super::StoreError;
use crate::message_id::now_ms;

/// Which stream an entry lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LogStream {
    /// One user's private messages, sent and received.
    Inbox(u64),
    /// The group's messages.
    Group,
}

impl LogStream {
    /// The stream a delivery of `kind` to `user` is positioned in.
    pub fn of(kind: MessageKind, user: u64) -> LogStream {
        match kind {
            MessageKind::Private => LogStream::Inbox(user),
            MessageKind::Group => LogStream::Group,
        }
    }

    /// A stable name, used as (part of) a storage key: `inbox:<user>` or `group`.
    pub fn key(&self) -> String {
        match self {
            LogStream::Inbox(user) => format!("inbox:{user}"),
            LogStream::Group => "group".to_owned(),
        }
    }
}

/// A message as the log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoggedMessage {
    pub id: u64,
    pub sender_id: u64,
    pub sender_name: String,
    pub group: bool,
    pub text: String,
    pub timestamp_ms: u64,
    /// A private message's receiver (0 for a group message).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub to: u64,
    /// A group message's recipients as its handler chose them; `None`: everyone but the
    /// sender.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients: Option<Vec<u64>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl LoggedMessage {
    pub fn kind(&self) -> MessageKind {
        if self.group { MessageKind::Group } else { MessageKind::Private }
    }

    pub fn sender(&self) -> User {
        User { id: self.sender_id, name: self.sender_name.clone() }
    }

    /// Whether `user` is one of the message's recipients (a sender is not its own).
    pub fn is_for(&self, user: u64) -> bool {
        if self.sender_id == user && !self.recipients.as_ref().is_some_and(|r| r.contains(&user)) {
            return false;
        }
        match (&self.recipients, self.group) {
            (_, false) => self.to == user,
            (None, true) => true,
            (Some(ids), true) => ids.contains(&user),
        }
    }

    /// Whether `user` may read it in their history: they sent it or it was for them.
    pub fn visible_to(&self, user: u64) -> bool {
        self.sender_id == user || self.is_for(user)
    }

    /// The encoded form backends store.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StoreError::Corrupt(format!("a log entry does not decode: {e}")))
    }
}

/// One message to append: to every stream in `streams` (one position each), unless
/// `client_msg_id` was already used by its sender within the de-dup window.
#[derive(Debug, Clone)]
pub struct Append {
    pub message: LoggedMessage,
    pub streams: Vec<LogStream>,
    /// The sender's id for this send (empty: none); keyed by sender.
    pub client_msg_id: String,
}

/// Where an entry was written: its position, and the position of the entry written just
/// before it in the same stream (0: none, the stream was empty or lost).
///
/// `prev` lets a node that receives deliveries out of the log's order, or misses one (the
/// writing node died before publishing it, a pub/sub message was lost), see the gap: a live
/// delivery whose `prev` is past what a session was sent is held until the entries between
/// are read from the log (see `router::Seam`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Placed {
    pub position: u64,
    pub prev: u64,
}

impl Placed {
    /// An entry of a log whose positions are dense (1, 2, 3, …): its predecessor is
    /// `position - 1`.
    pub fn dense(position: u64) -> Placed {
        Placed { position, prev: position.saturating_sub(1) }
    }
}

/// What an [`Append`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Written: where, in each of its streams, in the order given.
    Stored(Vec<Placed>),
    /// The sender already sent this client message id: the first send's message id;
    /// nothing was written.
    Duplicate { message_id: u64 },
    /// The sender already sent this client message id, but that send may not have been
    /// written (its node died between claiming the id and writing): written now, under the
    /// first send's message id (so the log may hold it twice under one id, never zero times).
    /// Only the Redis log, whose claim and write are two steps, answers this.
    Rewritten { message_id: u64, placed: Vec<Placed> },
}

/// One entry read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogEntry {
    pub position: u64,
    pub message: LoggedMessage,
}

/// A page of one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogRead {
    /// In the order asked for (oldest first for [`MessageLog::read`], newest first for
    /// [`MessageLog::read_back`]).
    pub entries: Vec<LogEntry>,
    /// The highest position retention has dropped from the stream (0: none): a reader whose
    /// position is below it missed messages.
    pub trimmed_through: u64,
    /// The stream's newest position (0: empty, never written).
    pub last: u64,
}

/// How long and how much the log keeps, per stream; and how long a client message id is
/// remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub max_entries: u64,
    pub max_age: Duration,
    pub dedup_window: Duration,
}

impl Default for Retention {
    /// 10,000 entries and 7 days per stream; client message ids for 10 minutes.
    fn default() -> Self {
        Retention {
            max_entries: 10_000,
            max_age: Duration::from_secs(7 * 86_400),
            dedup_window: Duration::from_secs(600),
        }
    }
}

/// The longest client message id a send may carry, in bytes.
pub const MAX_CLIENT_MSG_ID: usize = 64;

/// A durable message log. See the module docs.
#[async_trait]
pub trait MessageLog: Send + Sync + std::fmt::Debug {
    /// Appends each of `appends` in order, with one commit for the whole batch; returns one
    /// result per append. Positions within a stream follow the order of the appends and of
    /// calls that do not overlap.
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, StoreError>;

    /// At most `limit` entries of `stream` after position `after`, oldest first.
    async fn read(&self, stream: LogStream, after: u64, limit: usize) -> Result<LogRead, StoreError>;

    /// At most `limit` entries of `stream` before position `before` (0: from the newest),
    /// newest first.
    async fn read_back(&self, stream: LogStream, before: u64, limit: usize) -> Result<LogRead, StoreError>;

    /// The positions `user` acknowledged last (`None`: never seen).
    async fn acked(&self, user: u64) -> Result<Option<Positions>, StoreError>;

    /// Records that `user` received everything up to `positions`; never moves a stream's
    /// position back (acks may arrive out of order).
    async fn ack(&self, user: u64, positions: Positions) -> Result<(), StoreError>;
}

#[derive(Debug, Default)]
struct Stream {
    entries: VecDeque<LogEntry>,
    last: u64,
    trimmed_through: u64,
}

impl Stream {
    /// Drops entries past the retention's count and age.
    fn trim(&mut self, retention: &Retention, now_ms: u64) {
        let oldest_kept = now_ms.saturating_sub(retention.max_age.as_millis() as u64);
        while let Some(front) = self.entries.front() {
            let too_many = self.entries.len() as u64 > retention.max_entries;
            if !too_many && front.message.timestamp_ms >= oldest_kept {
                break;
            }
            self.trimmed_through = front.position;
            self.entries.pop_front();
        }
    }

    fn read(&self, after: u64, limit: usize) -> LogRead {
        let start = self.entries.partition_point(|e| e.position <= after);
        LogRead {
            entries: self.entries.range(start..).take(limit).cloned().collect(),
            trimmed_through: self.trimmed_through,
            last: self.last,
        }
    }

    fn read_back(&self, before: u64, limit: usize) -> LogRead {
        let end = if before == 0 {
            self.entries.len()
        } else {
            self.entries.partition_point(|e| e.position < before)
        };
        LogRead {
            entries: self.entries.range(..end).rev().take(limit).cloned().collect(),
            trimmed_through: self.trimmed_through,
            last: self.last,
        }
    }
}

/// Remembered client message ids, oldest first, forgotten after the de-dup window.
#[derive(Debug, Default)]
pub(crate) struct DedupWindow {
    ids: HashMap<(u64, String), u64>,
    order: VecDeque<(u64, (u64, String))>,
}

impl DedupWindow {
    pub(crate) fn get(
        &mut self,
        sender: u64,
        client_msg_id: &str,
        window: Duration,
        now_ms: u64,
    ) -> Option<u64> {
        let horizon = now_ms.saturating_sub(window.as_millis() as u64);
        while self.order.front().is_some_and(|(at, _)| *at < horizon) {
            if let Some((_, key)) = self.order.pop_front() {
                self.ids.remove(&key);
            }
        }
        self.ids.get(&(sender, client_msg_id.to_owned())).copied()
    }

    pub(crate) fn insert(&mut self, sender: u64, client_msg_id: String, message_id: u64, now_ms: u64) {
        let key = (sender, client_msg_id);
        self.ids.insert(key.clone(), message_id);
        self.order.push_back((now_ms, key));
    }
}

/// The log in this process: `--store memory` and tests. Lost with the process.
#[derive(Debug, Default)]
pub struct MemoryLog {
    retention: Retention,
    state: Mutex<MemoryLogState>,
}

#[derive(Debug, Default)]
struct MemoryLogState {
    streams: BTreeMap<LogStream, Stream>,
    dedup: DedupWindow,
    acked: HashMap<u64, Positions>,
}

impl MemoryLog {
    pub fn new(retention: Retention) -> Self {
        MemoryLog { retention, state: Mutex::default() }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemoryLogState> {
        // Every update below completes under the lock without panicking half-way.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl MessageLog for MemoryLog {
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, StoreError> {
        let now = now_ms();
        let mut state = self.state();
        let state = &mut *state;
        let mut results = Vec::with_capacity(appends.len());
        for append in appends {
            let sender = append.message.sender_id;
            if !append.client_msg_id.is_empty() {
                if let Some(message_id) =
                    state.dedup.get(sender, &append.client_msg_id, self.retention.dedup_window, now)
                {
                    results.push(Appended::Duplicate { message_id });
                    continue;
                }
                state.dedup.insert(sender, append.client_msg_id.clone(), append.message.id, now);
            }
            let mut positions = Vec::with_capacity(append.streams.len());
            for stream in &append.streams {
                let s = state.streams.entry(*stream).or_default();
                s.last += 1;
                s.entries.push_back(LogEntry { position: s.last, message: append.message.clone() });
                s.trim(&self.retention, now);
                positions.push(Placed::dense(s.last));
            }
            results.push(Appended::Stored(positions));
        }
        Ok(results)
    }

    async fn read(&self, stream: LogStream, after: u64, limit: usize) -> Result<LogRead, StoreError> {
        let mut state = self.state();
        let Some(s) = state.streams.get_mut(&stream) else { return Ok(LogRead::default()) };
        s.trim(&self.retention, now_ms());
        Ok(s.read(after, limit))
    }

    async fn read_back(&self, stream: LogStream, before: u64, limit: usize) -> Result<LogRead, StoreError> {
        let mut state = self.state();
        let Some(s) = state.streams.get_mut(&stream) else { return Ok(LogRead::default()) };
        s.trim(&self.retention, now_ms());
        Ok(s.read_back(before, limit))
    }

    async fn acked(&self, user: u64) -> Result<Option<Positions>, StoreError> {
        Ok(self.state().acked.get(&user).copied())
    }

    async fn ack(&self, user: u64, positions: Positions) -> Result<(), StoreError> {
        let mut state = self.state();
        let acked = state.acked.entry(user).or_default();
        *acked = acked.max(positions);
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Behaviour every backend must have; each backend's tests call these.
    use super::*;

    pub(crate) fn private(id: u64, from: u64, to: u64, text: &str) -> LoggedMessage {
        LoggedMessage {
            id,
            sender_id: from,
            sender_name: format!("u{from}"),
            group: false,
            text: text.into(),
            timestamp_ms: now_ms(),
            to,
            recipients: None,
        }
    }

    pub(crate) fn group(id: u64, from: u64, recipients: Option<Vec<u64>>) -> LoggedMessage {
        LoggedMessage { group: true, to: 0, recipients, ..private(id, from, 0, "to all") }
    }

    fn append(message: LoggedMessage, streams: Vec<LogStream>, client_msg_id: &str) -> Append {
        Append { message, streams, client_msg_id: client_msg_id.into() }
    }

    /// Positions grow per stream, reads page after a position, read_back goes newest first.
    pub(crate) async fn positions_grow_and_reads_page(log: &dyn MessageLog) {
        let mut appends = Vec::new();
        for i in 1..=5 {
            appends.push(append(
                private(i, 1, 2, &format!("m{i}")),
                vec![LogStream::Inbox(2), LogStream::Inbox(1)],
                "",
            ));
        }
        let results = log.append(appends).await.unwrap();
        // Each entry names the one written before it in its stream: a chain per stream.
        let (mut last, mut last_of_1) = (0, 0);
        for r in &results {
            let Appended::Stored(p) = r else { panic!("{r:?}") };
            assert_eq!(p.len(), 2);
            assert!(p[0].position > last, "{results:?}");
            assert_eq!((p[0].prev, p[1].prev), (last, last_of_1), "{results:?}");
            (last, last_of_1) = (p[0].position, p[1].position);
        }
        let all = log.read(LogStream::Inbox(2), 0, 100).await.unwrap();
        assert_eq!(all.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
        assert_eq!(all.last, last);
        let after = log.read(LogStream::Inbox(2), all.entries[1].position, 2).await.unwrap();
        assert_eq!(after.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), vec![3, 4]);
        let back = log.read_back(LogStream::Inbox(2), all.entries[3].position, 2).await.unwrap();
        assert_eq!(back.entries.iter().map(|e| e.message.id).collect::<Vec<_>>(), vec![3, 2]);
        let newest = log.read_back(LogStream::Inbox(1), 0, 1).await.unwrap();
        assert_eq!(newest.entries[0].message.id, 5);
        assert!(log.read(LogStream::Inbox(99), 0, 10).await.unwrap().entries.is_empty());
    }

    /// A client message id is used once per sender; another sender may reuse it.
    pub(crate) async fn client_ids_deduplicate(log: &dyn MessageLog) {
        let first =
            log.append(vec![append(group(10, 1, None), vec![LogStream::Group], "c-1")]).await.unwrap();
        assert!(matches!(first[0], Appended::Stored(_)));
        let again =
            log.append(vec![append(group(11, 1, None), vec![LogStream::Group], "c-1")]).await.unwrap();
        assert_eq!(again[0], Appended::Duplicate { message_id: 10 });
        let other =
            log.append(vec![append(group(12, 2, None), vec![LogStream::Group], "c-1")]).await.unwrap();
        assert!(matches!(other[0], Appended::Stored(_)));
        let ids: Vec<u64> =
            log.read(LogStream::Group, 0, 100).await.unwrap().entries.iter().map(|e| e.message.id).collect();
        assert_eq!(ids, vec![10, 12]);
    }

    /// Acks only move forward, stream by stream.
    pub(crate) async fn acks_only_move_forward(log: &dyn MessageLog) {
        assert_eq!(log.acked(7).await.unwrap(), None);
        log.ack(7, Positions { inbox: 5, group: 2 }).await.unwrap();
        log.ack(7, Positions { inbox: 3, group: 9 }).await.unwrap();
        assert_eq!(log.acked(7).await.unwrap(), Some(Positions { inbox: 5, group: 9 }));
    }

    /// Past the count, the oldest go and the read says how far.
    pub(crate) async fn retention_is_reported(log: &dyn MessageLog, max_entries: u64) {
        let n = max_entries + 3;
        for i in 1..=n {
            log.append(vec![append(private(100 + i, 1, 3, "x"), vec![LogStream::Inbox(3)], "")])
                .await
                .unwrap();
        }
        let read = log.read(LogStream::Inbox(3), 0, 1000).await.unwrap();
        assert!(read.trimmed_through > 0, "{read:?}");
        assert!(read.entries.len() as u64 <= max_entries + 1, "{}", read.entries.len());
        assert!(read.entries.iter().all(|e| e.position > read.trimmed_through));
        assert_eq!(read.entries.last().unwrap().message.id, 100 + n);
    }

    #[test]
    fn recipients_are_who_the_handler_chose() {
        let p = private(1, 1, 2, "hi");
        assert!(p.is_for(2) && !p.is_for(1) && !p.is_for(3) && p.visible_to(1));
        let everyone = group(2, 1, None);
        assert!(everyone.is_for(2) && everyone.is_for(3) && !everyone.is_for(1));
        let some = group(3, 1, Some(vec![2]));
        assert!(some.is_for(2) && !some.is_for(3) && !some.visible_to(3) && some.visible_to(1));
        assert_eq!(LoggedMessage::decode(&some.encode()).unwrap(), some);
    }

    #[tokio::test]
    async fn memory_log() {
        positions_grow_and_reads_page(&MemoryLog::default()).await;
        client_ids_deduplicate(&MemoryLog::default()).await;
        acks_only_move_forward(&MemoryLog::default()).await;
        let small = Retention { max_entries: 4, ..Retention::default() };
        retention_is_reported(&MemoryLog::new(small), 4).await;
    }
}
