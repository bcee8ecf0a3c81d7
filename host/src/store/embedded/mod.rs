//! The embedded store's message log: on disk under `--data-dir`, so a restart loses nothing.
//!
//! One [fjall](https://docs.rs/fjall) database (an LSM tree with a write-ahead journal) in
//! the log's directory. One writer thread owns every write: it takes all the requests queued
//! at that moment, applies them in order in one write batch, commits it once (handed to the
//! OS, or fsynced: [`LogSync`]) and then answers every caller. Reads go straight to the
//! database, each on one snapshot.
//!
//! Keyspaces (`keys` has the encodings):
//! - `entries`: stream ‖ position → timestamp ‖ message;
//! - `age`: time bucket ‖ stream → (), one row per stream per bucket ([`age_bucket_ms`]
//!   wide) that has entries from it, so the age sweep finds old entries without visiting
//!   every stream, and without a row per entry;
//! - `streams`: stream → last position ‖ trimmed through, written in the same batch as the
//!   stream's entries, so positions continue after a restart;
//! - `acks`: user → acknowledged positions;
//! - `client_ids`: sender ‖ client message id → message id ‖ time. Reads ignore ids past the
//!   de-dup window; compaction drops them ([`ForgetOldClientIds`]), so no index or sweep.
//!
//! Retention is exact for readers and amortised on disk: a read hides what is past the count
//! or the age, and reports it as trimmed; the writer deletes it later (a stream 1% over its
//! count, a periodic sweep by age). Deleting by count needs no read: positions are dense, so
//! the keys to delete are known.

mod keys;
mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use async_trait::async_trait;
use cim_proto::Positions;
use fjall::compaction::filter;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use tokio::sync::oneshot;

use super::StoreError;
use super::log::{Append, Appended, LogEntry, LogRead, LogStream, LoggedMessage, MessageLog, Retention};
use crate::message_id::now_ms;
use writer::{Encoded, Request, Writer};

/// When the embedded log's writes reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogSync {
    /// Every group commit is handed to the operating system before senders are answered:
    /// it survives the host being killed, not a power loss or kernel crash (the OS writes it
    /// out within seconds).
    #[default]
    Os,
    /// Every group commit is also fsynced before senders are answered: it survives a power
    /// loss, at the disk's fsync latency per commit.
    Fsync,
}

impl LogSync {
    fn persist_mode(self) -> PersistMode {
        match self {
            LogSync::Os => PersistMode::Buffer,
            LogSync::Fsync => PersistMode::SyncData,
        }
    }
}

/// Opens (creating if need be) the log in `dir`.
pub fn open(dir: &Path, retention: Retention, sync: LogSync) -> Result<Arc<dyn MessageLog>, StoreError> {
    Ok(Arc::new(EmbeddedLog::open(dir, retention, sync)?))
}

/// The database's keyspaces; cheap to clone (handles).
#[derive(Clone)]
struct Tables {
    db: Database,
    entries: Keyspace,
    age: Keyspace,
    streams: Keyspace,
    acks: Keyspace,
    client_ids: Keyspace,
}

impl Tables {
    fn open(dir: &Path, retention: &Retention) -> Result<Tables, StoreError> {
        let opening = |e| open_error(dir, e);
        std::fs::create_dir_all(dir).map_err(|e| opening(fjall::Error::Io(e)))?;
        let forget = Arc::new(ForgetOldClientIds { window_ms: retention.dedup_window.as_millis() as u64 });
        let db = Database::builder(dir)
            .with_compaction_filter_factories(Arc::new(move |keyspace: &str| {
                (keyspace == "client_ids").then(|| forget.clone() as Arc<dyn filter::Factory>)
            }))
            .open()
            .map_err(opening)?;
        let keyspace =
            |name: &str| db.keyspace(name, KeyspaceCreateOptions::default).map_err(|e| open_error(dir, e));
        Tables {
            entries: keyspace("entries")?,
            age: keyspace("age")?,
            streams: keyspace("streams")?,
            acks: keyspace("acks")?,
            client_ids: keyspace("client_ids")?,
            db,
        }
        .upgraded(dir, retention)
    }

    /// Replaces the per-entry age index of a log written by an earlier version (`expiry`:
    /// timestamp ‖ entry key) by the `age` index, once.
    fn upgraded(self, dir: &Path, retention: &Retention) -> Result<Tables, StoreError> {
        // The earlier expiry index of client ids: compaction forgets them now.
        const OLD_CLIENT_IDS: &str = "client_id_expiry";
        if self.db.keyspace_exists(OLD_CLIENT_IDS) {
            let old = self
                .db
                .keyspace(OLD_CLIENT_IDS, KeyspaceCreateOptions::default)
                .map_err(|e| open_error(dir, e))?;
            self.db.delete_keyspace(old).map_err(failed)?;
        }
        const OLD: &str = "expiry";
        if !self.db.keyspace_exists(OLD) {
            return Ok(self);
        }
        let old = self.db.keyspace(OLD, KeyspaceCreateOptions::default).map_err(|e| open_error(dir, e))?;
        let width = age_bucket_ms(retention);
        let mut rows = std::collections::BTreeSet::new();
        for kv in old.iter() {
            let (timestamp_ms, stream) = keys::parse_old_expiry(&kv.key().map_err(failed)?)?;
            rows.insert((timestamp_ms - timestamp_ms % width, stream));
        }
        let mut batch = self.db.batch().durability(Some(PersistMode::SyncData));
        for (bucket, stream) in rows {
            batch.insert(&self.age, keys::age(bucket, stream), Vec::new());
        }
        batch.commit().map_err(failed)?;
        self.db.delete_keyspace(old).map_err(failed)?;
        Ok(self)
    }
}

/// Drops client message ids past the de-dup window whenever compaction rewrites them: reads
/// already ignore them, so they need no index and no sweep (an id that is never compacted
/// again stays on disk, unused).
struct ForgetOldClientIds {
    window_ms: u64,
}

impl filter::Factory for ForgetOldClientIds {
    fn name(&self) -> &str {
        "cim-forget-old-client-ids"
    }

    fn make_filter(&self, _: &filter::Context) -> Box<dyn filter::CompactionFilter> {
        Box::new(ClientIdsBefore { horizon_ms: now_ms().saturating_sub(self.window_ms) })
    }
}

/// One compaction's filter: ids first used before `horizon_ms` go.
struct ClientIdsBefore {
    horizon_ms: u64,
}

impl filter::CompactionFilter for ClientIdsBefore {
    fn filter_item(
        &mut self,
        item: filter::ItemAccessor<'_>,
        _: &filter::Context,
    ) -> filter::CompactionFilterResult {
        Ok(match keys::parse_client_id_value(&item.value()?) {
            Ok((_, at)) if at < self.horizon_ms => filter::Verdict::Remove,
            _ => filter::Verdict::Keep,
        })
    }
}

/// How wide one bucket of the age index is: a sixteenth of the age limit, between 1 ms and
/// a minute, so the sweep deletes entries at most that late and a busy stream writes one
/// index row per bucket.
fn age_bucket_ms(retention: &Retention) -> u64 {
    (retention.max_age.as_millis() as u64 / 16).clamp(1, 60_000)
}

/// Why the log in `dir` does not open, in words an operator acts on.
fn open_error(dir: &Path, e: fjall::Error) -> StoreError {
    let dir = dir.display();
    StoreError::Unavailable(match e {
        fjall::Error::Locked => format!("the message log in {dir} is in use by another cim-host"),
        fjall::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            format!("cannot open the message log in {dir}: permission denied ({io})")
        }
        fjall::Error::Io(io) => format!("cannot open the message log in {dir}: {io}"),
        other => format!("cannot open the message log in {dir}: {other:?}"),
    })
}

/// A failed read or write of an open log.
fn failed(e: fjall::Error) -> StoreError {
    match e {
        fjall::Error::Poisoned => StoreError::Unavailable(
            "the message log failed to write to its disk earlier and refuses writes; restart cim-host"
                .to_owned(),
        ),
        fjall::Error::Io(io) => StoreError::Unavailable(format!("message log: {io}")),
        other => StoreError::Unavailable(format!("message log: {other:?}")),
    }
}

/// The on-disk log. See the module docs.
pub struct EmbeddedLog {
    dir: PathBuf,
    tables: Tables,
    retention: Retention,
    /// To the writer thread; `None` once dropping.
    requests: Option<mpsc::Sender<Request>>,
    writer: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for EmbeddedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLog").field("dir", &self.dir).field("retention", &self.retention).finish()
    }
}

impl EmbeddedLog {
    /// Opens (creating if need be) the log in `dir` and starts its writer thread.
    pub fn open(dir: &Path, retention: Retention, sync: LogSync) -> Result<EmbeddedLog, StoreError> {
        let tables = Tables::open(dir, &retention)?;
        let (requests, queue) = mpsc::channel();
        let writer = Writer::new(tables.clone(), retention, sync.persist_mode(), queue);
        let writer = std::thread::Builder::new()
            .name("cim-log-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start the message log's writer: {e}")))?;
        Ok(EmbeddedLog {
            dir: dir.to_owned(),
            tables,
            retention,
            requests: Some(requests),
            writer: Some(writer),
        })
    }

    /// Queues `request` for the writer and waits for its answer.
    async fn submit<T>(
        &self,
        request: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Request,
    ) -> Result<T, StoreError> {
        let stopped = || StoreError::Unavailable("the message log's writer has stopped".to_owned());
        let (reply, answer) = oneshot::channel();
        let requests = self.requests.as_ref().ok_or_else(stopped)?;
        requests.send(request(reply)).map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Runs a read on the blocking pool: a scan may touch the disk.
    async fn reading<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Tables, &Retention) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tables, retention) = (self.tables.clone(), self.retention);
        tokio::task::spawn_blocking(move || read(&tables, &retention))
            .await
            .map_err(|e| StoreError::Unavailable(format!("a message log read failed: {e}")))?
    }
}

impl Drop for EmbeddedLog {
    /// Lets the writer finish what is queued, so the directory is unlocked when this returns
    /// (once reads in flight end).
    fn drop(&mut self) {
        self.requests = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

/// What a reader of one stream may see: positions above `floor`, entries not older than
/// `horizon_ms`.
struct Visible {
    floor: u64,
    last: u64,
    horizon_ms: u64,
}

impl Visible {
    fn of(
        snapshot: &fjall::Snapshot,
        tables: &Tables,
        stream: &[u8],
        retention: &Retention,
    ) -> Result<Self, StoreError> {
        let meta = keys::Meta::read(snapshot.get(&tables.streams, stream).map_err(failed)?.as_deref())?;
        Ok(Visible {
            floor: meta.trimmed_through.max(meta.last.saturating_sub(retention.max_entries)),
            last: meta.last,
            horizon_ms: now_ms().saturating_sub(retention.max_age.as_millis() as u64),
        })
    }
}

fn entry(key: &[u8], value: &[u8]) -> Result<(u64, LogEntry), StoreError> {
    let (position, (timestamp_ms, message)) = (keys::entry_position(key)?, keys::entry_value(value)?);
    Ok((timestamp_ms, LogEntry { position, message: LoggedMessage::decode(message)? }))
}

fn read(
    tables: &Tables,
    retention: &Retention,
    stream: LogStream,
    after: u64,
    limit: usize,
) -> Result<LogRead, StoreError> {
    let snapshot = tables.db.snapshot();
    let prefix = keys::stream(stream);
    let mut visible = Visible::of(&snapshot, tables, &prefix, retention)?;
    let start = keys::entry(stream, after.max(visible.floor).saturating_add(1));
    let mut entries = Vec::new();
    for kv in snapshot.range(&tables.entries, start..=keys::entry(stream, u64::MAX)) {
        if entries.len() >= limit {
            break;
        }
        let (key, value) = kv.into_inner().map_err(failed)?;
        let (timestamp_ms, e) = entry(&key, &value)?;
        if entries.is_empty() && timestamp_ms < visible.horizon_ms {
            // Past its age: the sweep has yet to delete it.
            visible.floor = visible.floor.max(e.position);
            continue;
        }
        entries.push(e);
    }
    Ok(LogRead { entries, trimmed_through: visible.floor, last: visible.last })
}

fn read_back(
    tables: &Tables,
    retention: &Retention,
    stream: LogStream,
    before: u64,
    limit: usize,
) -> Result<LogRead, StoreError> {
    let snapshot = tables.db.snapshot();
    let prefix = keys::stream(stream);
    let mut visible = Visible::of(&snapshot, tables, &prefix, retention)?;
    let end = if before == 0 { visible.last } else { (before - 1).min(visible.last) };
    let mut entries = Vec::new();
    if end > visible.floor {
        let range = keys::entry(stream, visible.floor + 1)..=keys::entry(stream, end);
        for kv in snapshot.range(&tables.entries, range).rev() {
            if entries.len() >= limit {
                break;
            }
            let (key, value) = kv.into_inner().map_err(failed)?;
            let (timestamp_ms, e) = entry(&key, &value)?;
            if timestamp_ms < visible.horizon_ms {
                // Past its age, and so is everything before it.
                visible.floor = visible.floor.max(e.position);
                break;
            }
            entries.push(e);
        }
    }
    Ok(LogRead { entries, trimmed_through: visible.floor, last: visible.last })
}

#[async_trait]
impl MessageLog for EmbeddedLog {
    async fn append(&self, appends: Vec<Append>) -> Result<Vec<Appended>, StoreError> {
        if appends.is_empty() {
            return Ok(Vec::new());
        }
        // Encoded here, on the caller's thread: the one writer thread has enough to do.
        let appends = appends
            .into_iter()
            .map(|append| {
                let value = keys::entry_value_of(append.message.timestamp_ms, &append.message.encode());
                Encoded { append, value: fjall::Slice::from(value) }
            })
            .collect();
        self.submit(|reply| Request::Append { appends, reply }).await
    }

    async fn read(&self, stream: LogStream, after: u64, limit: usize) -> Result<LogRead, StoreError> {
        self.reading(move |tables, retention| read(tables, retention, stream, after, limit)).await
    }

    async fn read_back(&self, stream: LogStream, before: u64, limit: usize) -> Result<LogRead, StoreError> {
        self.reading(move |tables, retention| read_back(tables, retention, stream, before, limit)).await
    }

    async fn acked(&self, user: u64) -> Result<Option<Positions>, StoreError> {
        self.reading(move |tables, _| {
            tables.acks.get(user.to_be_bytes()).map_err(failed)?.as_deref().map(keys::positions).transpose()
        })
        .await
    }

    async fn ack(&self, user: u64, positions: Positions) -> Result<(), StoreError> {
        self.submit(|reply| Request::Ack { user, positions, reply }).await
    }
}
