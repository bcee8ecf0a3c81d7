//! The embedded log's one writer: group commit, acks, retention.

use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use cim_proto::Positions;
use fjall::{OwnedWriteBatch, PersistMode};
use tokio::sync::oneshot;

use super::super::StoreError;
use super::super::log::{Append, Appended, LogStream, Placed, Retention};
use super::keys::{self, Meta};
use super::{Tables, failed};
use crate::message_id::now_ms;

/// The most requests one commit takes; more wait for the next (bounds a commit's latency).
const MAX_BATCH_REQUESTS: usize = 1024;
/// The most entries one housekeeping pass deletes; the rest waits for the
/// next pass, readers already do not see them.
const MAX_TRIM: usize = 10_000;
/// The longest wait between two age sweeps.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// An append with its entry value already encoded (by the caller, off the writer's thread).
pub(super) struct Encoded {
    pub(super) append: Append,
    /// Timestamp ‖ encoded message ([`keys::entry_value_of`]); shared by every stream's row.
    pub(super) value: fjall::Slice,
}

pub(super) enum Request {
    Append { appends: Vec<Encoded>, reply: oneshot::Sender<Result<Vec<Appended>, StoreError>> },
    Ack { user: u64, positions: Positions, reply: oneshot::Sender<Result<(), StoreError>> },
}

pub(super) struct Writer {
    tables: Tables,
    retention: Retention,
    persist: PersistMode,
    queue: Receiver<Request>,
    /// Every stream's metadata this writer has touched; the writer is the only one to change
    /// it, so this is the truth (cleared if a commit fails).
    metas: HashMap<LogStream, Meta>,
    /// The age index bucket each stream last wrote a row for (cleared with `metas`).
    aged: HashMap<LogStream, u64>,
    age_bucket_ms: u64,
    sweep_every: Duration,
    next_sweep: Instant,
}

impl Writer {
    pub(super) fn new(
        tables: Tables,
        retention: Retention,
        persist: PersistMode,
        queue: Receiver<Request>,
    ) -> Self {
        let sweep_every = MAX_SWEEP_INTERVAL.min(retention.max_age / 2).max(Duration::from_millis(10));
        Writer {
            tables,
            retention,
            persist,
            queue,
            metas: HashMap::new(),
            aged: HashMap::new(),
            age_bucket_ms: super::age_bucket_ms(&retention),
            sweep_every,
            next_sweep: Instant::now(),
        }
    }

    /// Serves requests until every sender is gone.
    pub(super) fn run(mut self) {
        loop {
            let wait = self.next_sweep.saturating_duration_since(Instant::now());
            let first = match self.queue.recv_timeout(wait) {
                Ok(request) => request,
                Err(RecvTimeoutError::Timeout) => {
                    self.housekeeping(&[]);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut requests = vec![first];
            while requests.len() < MAX_BATCH_REQUESTS {
                match self.queue.try_recv() {
                    Ok(request) => requests.push(request),
                    Err(_) => break,
                }
            }
            let touched = match self.commit(&requests) {
                Ok((outcomes, touched)) => {
                    for (request, results) in requests.into_iter().zip(outcomes) {
                        match request {
                            Request::Append { reply, .. } => drop(reply.send(Ok(results))),
                            Request::Ack { reply, .. } => drop(reply.send(Ok(()))),
                        }
                    }
                    touched
                }
                Err(e) => {
                    tracing::error!(error = %e, "message log commit failed");
                    // Positions and age rows handed out in memory were not written.
                    self.metas.clear();
                    self.aged.clear();
                    for request in requests {
                        match request {
                            Request::Append { reply, .. } => drop(reply.send(Err(clone_error(&e)))),
                            Request::Ack { reply, .. } => drop(reply.send(Err(clone_error(&e)))),
                        }
                    }
                    Vec::new()
                }
            };
            self.housekeeping(&touched);
        }
    }

    fn meta(&mut self, stream: LogStream) -> Result<&mut Meta, StoreError> {
        if !self.metas.contains_key(&stream) {
            let value = self.tables.streams.get(keys::stream(stream)).map_err(failed)?;
            self.metas.insert(stream, Meta::read(value.as_deref())?);
        }
        Ok(self.metas.entry(stream).or_default())
    }

    /// Applies `requests` in order in one batch and commits it; returns each append's results
    /// (nothing for an ack) and the streams appended to.
    fn commit(&mut self, requests: &[Request]) -> Result<(Vec<Vec<Appended>>, Vec<LogStream>), StoreError> {
        let now = now_ms();
        let dedup_horizon = now.saturating_sub(self.retention.dedup_window.as_millis() as u64);
        let tables = self.tables.clone();
        let mut batch = tables.db.batch().durability(Some(self.persist));
        let mut touched: BTreeMap<LogStream, Meta> = BTreeMap::new();
        let mut acks: BTreeMap<u64, Positions> = BTreeMap::new();
        // Client ids used earlier in this batch: not yet readable from the database.
        let mut new_ids: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut outcomes = Vec::with_capacity(requests.len());
        for request in requests {
            match request {
                Request::Append { appends, .. } => {
                    let mut results = Vec::with_capacity(appends.len());
                    for Encoded { append, value } in appends {
                        let message = &append.message;
                        if !append.client_msg_id.is_empty() {
                            let key = keys::client_id(message.sender_id, &append.client_msg_id);
                            let earlier = match new_ids.get(&key) {
                                Some(id) => Some(*id),
                                None => match tables.client_ids.get(&key).map_err(failed)? {
                                    Some(v) => {
                                        let (id, at) = keys::parse_client_id_value(&v)?;
                                        (at >= dedup_horizon).then_some(id)
                                    }
                                    None => None,
                                },
                            };
                            if let Some(message_id) = earlier {
                                results.push(Appended::Duplicate { message_id });
                                continue;
                            }
                            batch.insert(
                                &tables.client_ids,
                                key.clone(),
                                keys::client_id_value(message.id, now),
                            );
                            new_ids.insert(key, message.id);
                        }
                        let mut positions = Vec::with_capacity(append.streams.len());
                        for &stream in &append.streams {
                            let meta = self.meta(stream)?;
                            meta.last += 1;
                            let meta = *meta;
                            touched.insert(stream, meta);
                            let bucket = message.timestamp_ms - message.timestamp_ms % self.age_bucket_ms;
                            if self.aged.insert(stream, bucket) != Some(bucket) {
                                batch.insert(&tables.age, keys::age(bucket, stream), Vec::new());
                            }
                            batch.insert(&tables.entries, keys::entry(stream, meta.last), value.clone());
                            positions.push(Placed::dense(meta.last));
                        }
                        results.push(Appended::Stored(positions));
                    }
                    outcomes.push(results);
                }
                Request::Ack { user, positions, .. } => {
                    let acked = match acks.get(user) {
                        Some(p) => *p,
                        None => match tables.acks.get(user.to_be_bytes()).map_err(failed)? {
                            Some(v) => keys::positions(&v)?,
                            None => Positions::default(),
                        },
                    };
                    acks.insert(*user, acked.max(*positions));
                    outcomes.push(Vec::new());
                }
            }
        }
        for (stream, meta) in &touched {
            batch.insert(&tables.streams, keys::stream(*stream), meta.bytes());
        }
        for (user, positions) in acks {
            batch.insert(&tables.acks, user.to_be_bytes(), keys::positions_bytes(positions));
        }
        batch.commit().map_err(failed)?;
        Ok((outcomes, touched.into_keys().collect()))
    }

    /// Deletes what retention dropped: streams in `touched` past their count by 1%, and on
    /// schedule entries and client ids past their age. Readers already do not see any of it,
    /// so this is not urgent and not fsynced.
    fn housekeeping(&mut self, touched: &[LogStream]) {
        let tables = self.tables.clone();
        let mut batch = tables.db.batch().durability(Some(PersistMode::Buffer));
        let result = (|| {
            // Small steps: each delete is a tombstone written in one batch.
            let slack = self.retention.max_entries / 100;
            for &stream in touched {
                let meta = *self.meta(stream)?;
                if meta.last - meta.trimmed_through > self.retention.max_entries + slack {
                    self.trim(&mut batch, stream, meta.last - self.retention.max_entries)?;
                }
            }
            if Instant::now() >= self.next_sweep {
                let more = self.sweep(&mut batch)?;
                self.next_sweep = if more { Instant::now() } else { Instant::now() + self.sweep_every };
            }
            batch.commit().map_err(failed)
        })();
        if let Err(e) = result {
            tracing::warn!(error = %e, "message log retention failed; will retry");
            self.metas.clear();
        }
    }

    /// Deletes `stream`'s entries up to `through` (at most [`MAX_TRIM`]) and records it.
    /// Positions are dense, so the keys are known: no read.
    fn trim(
        &mut self,
        batch: &mut OwnedWriteBatch,
        stream: LogStream,
        through: u64,
    ) -> Result<(), StoreError> {
        let tables = self.tables.clone();
        let meta = self.meta(stream)?;
        if through <= meta.trimmed_through {
            return Ok(());
        }
        let through = through.min(meta.trimmed_through + MAX_TRIM as u64);
        for position in meta.trimmed_through + 1..=through {
            batch.remove(&tables.entries, keys::entry(stream, position));
        }
        meta.trimmed_through = through;
        let bytes = meta.bytes();
        batch.insert(&tables.streams, keys::stream(stream), bytes);
        Ok(())
    }

    /// Deletes entries past the age; returns whether there is more to delete than one pass
    /// takes.
    fn sweep(&mut self, batch: &mut OwnedWriteBatch) -> Result<bool, StoreError> {
        let tables = self.tables.clone();
        let now = now_ms();
        let horizon = now.saturating_sub(self.retention.max_age.as_millis() as u64);
        // Buckets that ended before the horizon: every entry in them is past the age.
        let ended = horizon.saturating_sub(self.age_bucket_ms) + 1;
        let mut streams: BTreeMap<LogStream, Vec<Vec<u8>>> = BTreeMap::new();
        let mut more = false;
        for (n, kv) in tables.age.range(..keys::time(ended)).enumerate() {
            if n == MAX_TRIM {
                more = true;
                break;
            }
            let key = kv.key().map_err(failed)?;
            streams.entry(keys::parse_age(&key)?).or_default().push(key.to_vec());
        }
        // At most MAX_TRIM entries in all, as in one trim.
        let mut budget = MAX_TRIM;
        for (stream, rows) in streams {
            // The stream's oldest entries up to the first one inside the age.
            let meta = *self.meta(stream)?;
            let mut through = meta.trimmed_through;
            let mut done = true;
            if meta.last > meta.trimmed_through {
                let range = keys::entry(stream, meta.trimmed_through + 1)..=keys::entry(stream, meta.last);
                for kv in tables.entries.range(range) {
                    let (key, value) = kv.into_inner().map_err(failed)?;
                    if keys::entry_value(&value)?.0 >= horizon {
                        break;
                    }
                    if budget == 0 {
                        done = false;
                        break;
                    }
                    budget -= 1;
                    through = keys::entry_position(&key)?;
                }
                self.trim(batch, stream, through)?;
            }
            if done {
                for row in rows {
                    batch.remove(&tables.age, row);
                }
            } else {
                more = true;
            }
        }

        Ok(more)
    }
}

/// The same error again, for each caller of a failed batch.
fn clone_error(e: &StoreError) -> StoreError {
    match e {
        StoreError::Corrupt(m) => StoreError::Corrupt(m.clone()),
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        other => StoreError::Unavailable(other.to_string()),
    }
}
