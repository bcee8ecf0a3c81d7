//! Server-assigned message ids: never repeated within a cluster, across restarts, Redis
//! wipes and clock steps, and increasing on each node.
//!
//! # Layout
//! An id is 64 bits (the wire protocol's `uint64`), most significant first: a counter, then
//! 10 bits of node number. The counter ticks 1024 times per millisecond of wall time: it
//! takes `max(previous + 1, now_ms × 1024)`, so ids follow time, a burst borrows from the
//! coming milliseconds, and a clock stepping back never moves it back in a running process.
//! Counter and node number share one atomic, so [`MessageIds::next`] is one compare-and-swap
//! and a change of node number moves together with the counter. Ids are above 2^53, past
//! what a JavaScript number holds exactly: JSON gives them as decimal strings.
//!
//! # Reservations
//! A counter is issued only up to a *ceiling* that has been recorded durably first, so that
//! whoever uses the same node number next (this node after a restart, or another node)
//! starts above everything issued under it:
//! - **One node with a data directory** ([`MessageIds::persist_in`]): the ceiling is the
//!   number in `<data dir>/message-ids`, written (temp file, fsync, rename) [`FILE_BLOCK`]
//!   ticks — about 16 s of ids — ahead of the counter, and rewritten by
//!   [`MessageIds::refill`] off the hot path, or by `next` itself when a burst used up the
//!   whole block. A restart starts above the file's ceiling, whatever the clock says.
//! - **A cluster** (`cluster::node_number`): the node number is leased in Redis, and the
//!   lease's high-water mark is the ceiling, raised with every registry heartbeat. The
//!   counter follows Redis's clock there (an offset measured at each refresh), so one
//!   node's clock step cannot take its ids near another's. While no lease is held, or when
//!   it could not be refreshed for long enough that the ceiling ran out, `next` returns
//!   `None`: a send fails as unavailable rather than risk a duplicate.
//! - **Nothing** (a node on the memory store started in-process, as in tests): no ceiling;
//!   the node number is a hash of the node id. Ids are then unique while the process runs,
//!   but a restart with the clock stepped back may repeat some (the behaviour before
//!   reservations existed).

use std::fmt;
use std::fs;
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::warn;

const NODE_BITS: u32 = 10;
/// How many node numbers there are (`0..NODE_NUMBERS`).
pub const NODE_NUMBERS: u64 = 1 << NODE_BITS;
const NODE_MASK: u64 = NODE_NUMBERS - 1;
/// The counter advances `2^TICK_BITS` ticks per millisecond.
const TICK_BITS: u32 = 10;
/// How far ahead of the counter the data-directory ceiling is written: 2^24 ticks, about
/// 16 s of ids at the clock's pace. [`MessageIds::refill`] rewrites it once less than half
/// of it is left.
pub const FILE_BLOCK: u64 = 1 << 24;
/// Ticks a lease ceiling allows beyond the time it covers, for bursts faster than the
/// clock (64 ms of ids).
pub const BURST: u64 = 1 << 16;
/// The file under the data directory that holds the ceiling.
pub const FILE_NAME: &str = "message-ids";

/// Unix time in milliseconds (the source of a [`MessageIds`]' clock; tests inject others).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Unix time in microseconds (when a message was accepted, for the delivery latency).
pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub struct MessageIds {
    /// The last id issued (`counter << 10 | node number`); the next one is made from it.
    last: AtomicU64,
    /// The highest counter that may be issued: what the reservation covers. `u64::MAX`
    /// with no reservation, 0 while a reservation is being (re)made.
    ceiling: AtomicU64,
    /// Milliseconds added to the clock: in a cluster, Redis's clock minus this node's.
    offset_ms: AtomicI64,
    clock: Clock,
    /// The ceiling file, when ids are reserved in a data directory; the lock makes one
    /// writer at a time.
    file: Mutex<Option<PathBuf>>,
}

impl fmt::Debug for MessageIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MessageIds")
            .field("last", &self.last.load(SeqCst))
            .field("ceiling", &self.ceiling.load(SeqCst))
            .field("offset_ms", &self.offset_ms.load(SeqCst))
            .finish_non_exhaustive()
    }
}

impl MessageIds {
    /// Ids with no reservation, numbered by a hash of `node_id` (see the module docs).
    pub fn new(node_id: &str) -> Self {
        Self::with_clock(node_id, Arc::new(now_ms))
    }

    /// [`Self::new`] on another clock (tests step it back).
    pub fn with_clock(node_id: &str, clock: Clock) -> Self {
        // FNV-1a: stable across runs and platforms, unlike std's hasher.
        let hash = node_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        MessageIds {
            last: AtomicU64::new(hash & NODE_MASK),
            ceiling: AtomicU64::new(u64::MAX),
            offset_ms: AtomicI64::new(0),
            clock,
            file: Mutex::new(None),
        }
    }

    /// A new id, or `None` when the reservation ran out and cannot be renewed here (a
    /// cluster node whose lease could not be refreshed).
    pub fn next(&self) -> Option<u64> {
        if let Some(id) = self.try_next() {
            return Some(id);
        }
        // A burst outran the file's block (a lease is renewed by the heartbeat instead).
        if let Err(e) = self.refill() {
            warn!(error = %e, "could not reserve more message ids in the data directory");
        }
        self.try_next()
    }

    fn try_next(&self) -> Option<u64> {
        let floor = self.floor();
        let mut issued = None;
        let _ = self.last.fetch_update(SeqCst, SeqCst, |last| {
            let counter = ((last >> NODE_BITS) + 1).max(floor);
            issued =
                (counter <= self.ceiling.load(SeqCst)).then_some((counter << NODE_BITS) | (last & NODE_MASK));
            issued
        });
        issued
    }

    /// The clock's time in milliseconds, with the cluster offset applied.
    pub fn time_ms(&self) -> u64 {
        let ms =
            i64::try_from((self.clock)()).unwrap_or(i64::MAX).saturating_add(self.offset_ms.load(SeqCst));
        u64::try_from(ms).unwrap_or(0)
    }

    /// The local clock alone (for measuring the offset).
    pub fn clock_ms(&self) -> u64 {
        (self.clock)()
    }

    /// The lowest counter the clock allows now.
    fn floor(&self) -> u64 {
        self.time_ms().saturating_mul(1 << TICK_BITS)
    }

    /// The counter of the last id issued.
    pub fn counter(&self) -> u64 {
        self.last.load(SeqCst) >> NODE_BITS
    }

    /// This node's number in the ids it issues now.
    pub fn node(&self) -> u64 {
        self.last.load(SeqCst) & NODE_MASK
    }

    /// The highest counter the reservation covers now.
    pub fn ceiling(&self) -> u64 {
        self.ceiling.load(SeqCst)
    }

    /// A ceiling `ms` of clock time (plus [`BURST`]) past where the counter is now: what a
    /// lease refresh records before [`Self::extend`]ing to it.
    pub fn ceiling_ahead(&self, ms: u64) -> u64 {
        self.counter().max(self.floor()).saturating_add(ms << TICK_BITS).saturating_add(BURST)
    }

    /// Issues no id until [`Self::extend`]: the reservation is being made or was lost.
    pub fn suspend(&self) {
        self.ceiling.store(0, SeqCst);
    }

    /// Lets counters up to `ceiling` be issued; the caller has recorded it durably first.
    pub fn extend(&self, ceiling: u64) {
        self.ceiling.store(ceiling, SeqCst);
    }

    /// Uses node number `number` from now on, with counters above `mark` (the highest any
    /// previous holder of that number may have issued). Call between [`Self::suspend`] and
    /// [`Self::extend`].
    pub fn switch(&self, number: u64, mark: u64) {
        let _ = self.last.fetch_update(SeqCst, SeqCst, |last| {
            Some(((last >> NODE_BITS).max(mark) << NODE_BITS) | (number & NODE_MASK))
        });
    }

    /// Sets the cluster clock offset (Redis's clock minus the local one).
    pub fn set_offset_ms(&self, offset: i64) {
        self.offset_ms.store(offset, SeqCst);
    }

    /// Reserves ids in `dir` (one node): starts above the ceiling a previous run left in
    /// `dir/message-ids`, and writes a new one before any id is issued. A file that does
    /// not hold a number is an error: starting anyway could repeat ids.
    pub fn persist_in(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        let path = dir.join(FILE_NAME);
        let previous = match fs::read_to_string(&path) {
            Ok(text) => text.trim().parse::<u64>().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} should hold one number (a message-id ceiling), found {text:?}",
                        path.display()
                    ),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e),
        };
        self.suspend();
        let number = self.node();
        self.switch(number, previous);
        *self.file.lock().unwrap_or_else(|e| e.into_inner()) = Some(path);
        self.refill()
    }

    /// Rewrites the data-directory ceiling a [`FILE_BLOCK`] ahead once less than half a
    /// block is left; does nothing without a data directory. Called every few seconds off
    /// the hot path, and by `next` when a burst used the whole block.
    pub fn refill(&self) -> io::Result<()> {
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(path) = file.as_ref() else { return Ok(()) };
        let base = self.counter().max(self.floor());
        if self.ceiling() >= base.saturating_add(FILE_BLOCK / 2) {
            return Ok(());
        }
        let ceiling = base.saturating_add(FILE_BLOCK);
        write_ceiling(path, ceiling)?;
        self.extend(ceiling);
        Ok(())
    }
}

/// Writes `ceiling` to `path` so that a crash leaves either the old number or the new one.
fn write_ceiling(path: &Path, ceiling: u64) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    writeln!(file, "{ceiling}")?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    // The rename itself is durable once the directory is.
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests;
