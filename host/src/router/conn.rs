//! A logged-in connection as the router sees it: its outbound queue (bounded in frames and in
//! bytes) and how to close it with a reason.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use cim_proto::{Body, Encoded, ErrorCode, Frame, MessageKind, Positions, User};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::metrics::Metrics;
use crate::store::Placed;

/// Closes one connection and remembers why, so the writer can tell the client last.
#[derive(Debug, Clone)]
pub struct Closer {
    token: CancellationToken,
    reason: Arc<OnceLock<Closing>>,
}

/// The last frame a closing connection gets.
#[derive(Debug, Clone)]
pub struct Closing {
    pub frame: Encoded,
    /// Deliver what is already queued first (not for a slow consumer, whose queue is the
    /// problem).
    pub drain: bool,
}

impl Closer {
    /// A closer that also fires when `parent` (server shutdown) does.
    pub fn child_of(parent: &CancellationToken) -> Self {
        Closer { token: parent.child_token(), reason: Arc::new(OnceLock::new()) }
    }

    /// Closes the connection; the first reason given wins.
    pub fn close(&self, code: ErrorCode, reason: impl Into<String>, drain: bool) {
        let frame = Encoded::from(Frame::push(Body::Kick { code, reason: reason.into() }));
        let _ = self.reason.set(Closing { frame, drain });
        self.token.cancel();
    }

    /// Closes without a reason (the peer is gone or the session ended normally).
    pub fn cancel(&self) {
        self.token.cancel();
    }

    pub fn reason(&self) -> Option<&Closing> {
        self.reason.get()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    pub fn cancelled(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }
}

/// A frame in a connection's outbound queue. A live delivery carries when its message was
/// accepted (`accepted_us`, Unix time in microseconds, on whichever node accepted it), so
/// that the writer can record the delivery latency once the frame is written; 0 for
/// everything else (answers, replays, kicks).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub frame: Encoded,
    pub accepted_us: u64,
}

impl Outgoing {
    /// A live delivery of a message accepted at `accepted_us`.
    pub fn delivery(frame: Encoded, accepted_us: u64) -> Self {
        Outgoing { frame, accepted_us }
    }
}

impl From<Encoded> for Outgoing {
    fn from(frame: Encoded) -> Self {
        Outgoing { frame, accepted_us: 0 }
    }
}

/// The sending side of a connection's outbound queue: at most `frames` frames and about
/// `max_bytes` bytes wait for the writer.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Outgoing>,
    queued: Arc<AtomicUsize>,
    max_bytes: usize,
}

/// The writer's side of an [`Outbox`].
#[derive(Debug)]
pub struct OutboxRx {
    rx: mpsc::Receiver<Outgoing>,
    queued: Arc<AtomicUsize>,
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue is at its frame or byte limit: the client is not reading fast enough.
    Full,
    /// The connection is closing.
    Closed,
}

impl Outbox {
    pub fn new(frames: usize, max_bytes: usize) -> (Outbox, OutboxRx) {
        let (tx, rx) = mpsc::channel(frames.max(1));
        let queued = Arc::new(AtomicUsize::new(0));
        (Outbox { tx, queued: queued.clone(), max_bytes }, OutboxRx { rx, queued })
    }

    /// Queues a frame without waiting. A frame larger than the byte limit still goes into an
    /// empty queue, so one big message is never refused for its size alone.
    pub fn try_send(&self, frame: impl Into<Outgoing>) -> Result<(), Refused> {
        let frame = frame.into();
        let len = frame.frame.0.len();
        let before = self.queued.fetch_add(len, Ordering::AcqRel);
        if before > 0 && before + len > self.max_bytes {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            return Err(Refused::Full);
        }
        self.tx.try_send(frame).map_err(|e| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }

    /// Queues an answer to the client's own request, waiting for a free slot (backpressure on
    /// that client's reader). Answers count towards the bytes but are not refused for them.
    pub async fn send(&self, frame: impl Into<Outgoing>) -> Result<(), Refused> {
        let frame = frame.into();
        let len = frame.frame.0.len();
        self.queued.fetch_add(len, Ordering::AcqRel);
        self.tx.send(frame).await.map_err(|_| {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            Refused::Closed
        })
    }

    /// The frame limit, for messages.
    pub fn max_frames(&self) -> usize {
        self.tx.max_capacity()
    }
}

impl OutboxRx {
    pub async fn recv(&mut self) -> Option<Outgoing> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.frame.0.len(), Ordering::AcqRel);
        Some(frame)
    }

    /// Frames waiting (not counting one just received).
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    pub fn try_recv(&mut self) -> Option<Outgoing> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.frame.0.len(), Ordering::AcqRel);
        Some(frame)
    }
}

/// A logged-in connection on this node, as the router sees it.
#[derive(Debug, Clone)]
pub struct LocalConn {
    pub conn_id: u64,
    pub user: User,
    /// The connection's bounded outbound queue.
    pub tx: Outbox,
    /// Closes the connection (kick, slow consumer, shutdown).
    pub closer: Closer,
    /// Holds live deliveries while the session replays the log after its login.
    pub seam: Arc<Seam>,
    /// The session's resume token (empty for sessions that do not hand one out).
    pub resume: String,
    /// It asked for PRESENCE frames (`Login.presence`).
    pub presence: bool,
}

/// Where a session's replay meets live traffic, and what keeps its deliveries in log order.
///
/// Until the replay is done, live deliveries are held here instead of queued; then those the
/// replay already sent (by position) are dropped and the rest queued, so the client sees
/// neither a gap nor a duplicate at the seam.
///
/// Once live, every delivery names the entry written before it in its stream (`prev`, see
/// [`Placed`]). The seam queues a delivery only when everything up to its `prev` was queued
/// (or was not for this user): a delivery that would skip entries (another node's delivery
/// still on its way, or lost because that node died between writing and publishing, or its
/// pub/sub message lost) closes the seam again and is held, and the router reads the entries
/// between from the log ([`Router::fill`](super::Router::fill)) before letting it through.
/// So a client receives each stream in position order, and its cumulative acks never cover
/// an entry it did not get.
///
/// It also remembers the highest position queued per stream, where a catch-up from the log
/// starts.
#[derive(Debug, Default)]
pub struct Seam {
    state: Mutex<SeamState>,
}

#[derive(Debug, Default)]
struct SeamState {
    live: bool,
    /// A fill for a gap is under way ([`Offered::Gap`] until [`Seam::fill_done`]): until it
    /// starts reading the log, a delivery that closes the gap lets the held ones through at
    /// once.
    filling: bool,
    /// The fill reads the log and sends what it found itself: held deliveries wait for it
    /// (letting one through meanwhile could send an entry the fill sends too).
    reading: bool,
    /// Deliveries waiting for the replay or a fill: `None` frames note entries not sent to
    /// this connection (its user's own messages), which still advance the chain.
    held: Vec<(MessageKind, Placed, Option<Outgoing>)>,
    queued: Positions,
}

/// What [`LocalConn::offer_delivery`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    /// Queued to the connection.
    Queued,
    /// Held until the replay or a fill is over (it goes out then).
    Held,
    /// Already sent (by a replay or a fill): dropped.
    Duplicate,
    /// Held: entries before it have not been sent. The caller must start a fill
    /// ([`Router::fill`](super::Router::fill)).
    Gap,
    /// The connection is closing or too slow; the message stays in the log for the next
    /// login.
    Refused,
}

impl Offered {
    /// Whether the delivery is (or will be) on its way to the client.
    pub fn reached(self) -> bool {
        !matches!(self, Offered::Refused)
    }
}

impl Seam {
    /// A seam already open: deliveries go straight to the queue (no replay).
    pub fn live() -> Arc<Seam> {
        let seam = Seam::default();
        seam.state().live = true;
        Arc::new(seam)
    }

    /// A seam closed until [`LocalConn::go_live`].
    pub fn replaying() -> Arc<Seam> {
        Arc::new(Seam::default())
    }

    /// Whether deliveries go straight to the queue (no replay or fill under way).
    pub fn is_live(&self) -> bool {
        self.state().live
    }

    /// The highest positions queued to this connection so far (everything up to them in
    /// each stream was sent or was not for this user).
    pub fn queued(&self) -> Positions {
        self.state().queued
    }

    /// Notes that the log was read up to `position` of `kind`'s stream and what of it was
    /// for this user queued (a replay or a fill reads contiguous entries).
    pub fn note(&self, kind: MessageKind, position: u64) {
        self.state().queued.advance(kind, position);
    }

    /// Ends a fill started by [`Offered::Gap`] if the seam is live again (or `closing`).
    /// `false`: a gap opened again as the fill ended; the fill must go on.
    pub fn fill_done(&self, closing: bool) -> bool {
        let mut state = self.state();
        if state.live || closing {
            state.filling = false;
            state.reading = false;
            return true;
        }
        false
    }

    /// Closes a live seam until [`LocalConn::go_live`] (a catch-up from the log comes first).
    /// `false`: it was not live (a replay or a fill is under way).
    pub fn hold(&self) -> bool {
        std::mem::replace(&mut self.state().live, false)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SeamState> {
        // Plain field updates: a panic cannot leave the state half-changed.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl LocalConn {
    /// Queues a delivery `at` its place in `kind`'s stream, or holds it while the session
    /// is replaying or filling a gap (see [`Seam`]). A `None` frame notes an entry this
    /// connection is not sent (its user's own message) so that the chain moves past it.
    pub(crate) fn offer_delivery(
        &self,
        kind: MessageKind,
        at: Placed,
        frame: Option<Outgoing>,
        metrics: &Metrics,
    ) -> Offered {
        let mut state = self.seam.state();
        let queued = state.queued.of(kind);
        if at.position <= queued {
            return Offered::Duplicate;
        }
        if !state.live || at.prev > queued {
            if state.held.len() >= self.tx.max_frames() {
                drop(state);
                self.slow_consumer(metrics);
                return Offered::Refused;
            }
            state.held.push((kind, at, frame));
            if state.live {
                state.live = false;
                if !state.filling {
                    state.filling = true;
                    return Offered::Gap;
                }
                return Offered::Held;
            }
            if state.filling && !state.reading {
                // Most gaps close by themselves: the delivery overtaken arrives.
                self.release_held(&mut state, false, metrics);
            }
            return Offered::Held;
        }
        if let Some(frame) = frame
            && !self.offer(frame, metrics)
        {
            return Offered::Refused;
        }
        state.queued.advance(kind, at.position);
        Offered::Queued
    }

    /// Ends a replay or a fill that read the log up to `through`: queues the deliveries
    /// held meanwhile in position order, less those at or before `through` (already sent),
    /// and lets later ones through directly. `false`: a held delivery still follows a gap
    /// (written after the log was read); the seam stays closed, and the caller reads the log
    /// again from [`Seam::queued`].
    pub(crate) fn go_live(&self, through: Positions, metrics: &Metrics) -> bool {
        self.release(through, false, metrics)
    }

    /// Ends a hold whatever gaps are left: for entries the log no longer has (Redis lost
    /// them, or retention dropped them), which no read can fill.
    pub(crate) fn go_live_past_gaps(&self, metrics: &Metrics) {
        self.release(Positions::default(), true, metrics);
    }

    /// Ends a fill's grace: `true` if the gap closed by itself (the seam is live), else the
    /// fill reads the log from now on and held deliveries wait for it.
    pub(crate) fn start_reading(&self, metrics: &Metrics) -> bool {
        let mut state = self.seam.state();
        if self.release_held(&mut state, false, metrics) {
            return true;
        }
        state.reading = true;
        false
    }

    fn release(&self, through: Positions, past_gaps: bool, metrics: &Metrics) -> bool {
        let mut state = self.seam.state();
        for kind in [MessageKind::Private, MessageKind::Group] {
            state.queued.advance(kind, through.of(kind));
        }
        self.release_held(&mut state, past_gaps, metrics)
    }

    /// Queues the held deliveries that follow what was queued, in position order; opens the
    /// seam if none is left. Whether it is open.
    fn release_held(&self, state: &mut SeamState, past_gaps: bool, metrics: &Metrics) -> bool {
        let mut held = std::mem::take(&mut state.held);
        held.sort_by_key(|(kind, at, _)| (*kind == MessageKind::Group, at.position));
        let mut waiting = Vec::new();
        for (kind, at, frame) in held {
            let queued = state.queued.of(kind);
            if at.position <= queued {
                continue;
            }
            if at.prev > queued && !past_gaps {
                waiting.push((kind, at, frame));
                continue;
            }
            if let Some(frame) = frame
                && !self.offer(frame, metrics)
            {
                // Closing: nothing more goes out; the log keeps the rest for the next login.
                state.live = true;
                return true;
            }
            state.queued.advance(kind, at.position);
        }
        state.live = waiting.is_empty();
        state.held = waiting;
        state.live
    }

    fn slow_consumer(&self, metrics: &Metrics) -> bool {
        warn!(user = self.user.id, conn = self.conn_id, "slow consumer: outbound queue full, disconnecting");
        Metrics::inc(&metrics.slow_consumers_total);
        let reason = format!(
            "slow consumer: the outbound queue ({} frames or {} bytes) filled up; disconnected",
            self.tx.max_frames(),
            self.tx.max_bytes
        );
        self.closer.close(ErrorCode::SlowConsumer, reason, false);
        false
    }

    /// Queues a frame without waiting. A full queue means the client cannot keep up: it is
    /// disconnected rather than allowed to hold up the sender.
    pub(crate) fn offer(&self, frame: Outgoing, metrics: &Metrics) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(Refused::Full) => self.slow_consumer(metrics),
            Err(Refused::Closed) => false,
        }
    }

    /// Tells the client why, then closes the connection.
    pub fn kick(&self, code: ErrorCode, reason: &str) {
        self.closer.close(code, reason, true);
    }

    /// Closes a session whose missed entries could not be read from the log, with
    /// `UNAVAILABLE`: the client logs in again and resumes from its acknowledged position,
    /// rather than acknowledging past messages it never got.
    pub fn close_to_resume(&self) {
        self.kick(
            ErrorCode::Unavailable,
            "the message log could not be read to send what this session missed; log in again to resume",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Outgoing {
        Encoded(bytes::Bytes::from(vec![0u8; len])).into()
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_bytes_as_well_as_frames() {
        let (tx, mut rx) = Outbox::new(10, 100);
        tx.try_send(frame(60)).unwrap();
        assert_eq!(tx.try_send(frame(60)), Err(Refused::Full), "over the byte limit");
        tx.try_send(frame(40)).unwrap();
        assert_eq!(rx.recv().await.unwrap().frame.0.len(), 60);
        tx.try_send(frame(60)).unwrap();
        assert_eq!(rx.try_recv().unwrap().frame.0.len(), 40);
        assert_eq!(rx.try_recv().unwrap().frame.0.len(), 60);
        // One frame bigger than the whole budget still fits an empty queue.
        tx.try_send(frame(500)).unwrap();
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
        drop(rx);
        assert!(tx.try_send(frame(1)).is_err());
    }

    fn conn() -> (LocalConn, OutboxRx) {
        let (tx, rx) = Outbox::new(100, 1 << 20);
        let conn = LocalConn {
            conn_id: 1,
            user: User { id: 7, name: "u7".into() },
            tx,
            closer: Closer::child_of(&CancellationToken::new()),
            seam: Seam::live(),
            resume: String::new(),
            presence: false,
        };
        (conn, rx)
    }

    fn at(position: u64, prev: u64) -> Placed {
        Placed { position, prev }
    }

    /// The frames queued so far, by their length (each test frame's length is its position).
    fn drained(rx: &mut OutboxRx) -> Vec<usize> {
        std::iter::from_fn(|| rx.try_recv()).map(|f| f.frame.0.len()).collect()
    }

    #[test]
    fn a_live_seam_queues_deliveries_in_log_order_and_holds_those_after_a_gap() {
        let metrics = Metrics::default();
        let (c, mut rx) = conn();
        let p = MessageKind::Private;
        assert_eq!(c.offer_delivery(p, at(1, 0), Some(frame(1)), &metrics), Offered::Queued);
        assert_eq!(c.offer_delivery(p, at(2, 1), Some(frame(2)), &metrics), Offered::Queued);
        // The user's own entry: noted, not sent.
        assert_eq!(c.offer_delivery(p, at(3, 2), None, &metrics), Offered::Queued);
        assert_eq!(c.offer_delivery(p, at(2, 1), Some(frame(2)), &metrics), Offered::Duplicate);
        // 4 is still on its way: 5 and 6 wait; the group stream has no gap and goes on.
        assert_eq!(c.offer_delivery(p, at(5, 4), Some(frame(5)), &metrics), Offered::Gap);
        assert_eq!(c.offer_delivery(p, at(6, 5), Some(frame(6)), &metrics), Offered::Held);
        assert_eq!(c.offer_delivery(MessageKind::Group, at(9, 0), Some(frame(9)), &metrics), Offered::Held);
        assert_eq!(drained(&mut rx), [1, 2, 9]);
        // A fill that read the log up to 3 only (4 was not written yet): still held.
        assert!(!c.go_live(Positions { inbox: 3, group: 0 }, &metrics));
        assert_eq!(drained(&mut rx), Vec::<usize>::new());
        // The fill sends 4 itself, then the held ones follow in order.
        c.tx.try_send(frame(4)).unwrap();
        assert!(c.go_live(Positions { inbox: 4, group: 0 }, &metrics));
        assert_eq!(drained(&mut rx), [4, 5, 6]);
        assert_eq!(c.seam.queued(), Positions { inbox: 6, group: 9 });
        assert!(c.seam.is_live());
    }

    #[test]
    fn a_gap_that_closes_by_itself_lets_the_held_deliveries_through_at_once() {
        let metrics = Metrics::default();
        let (c, mut rx) = conn();
        let p = MessageKind::Private;
        assert_eq!(c.offer_delivery(p, at(1, 0), Some(frame(1)), &metrics), Offered::Queued);
        // 3 overtook 2: held, and the caller starts a fill.
        assert_eq!(c.offer_delivery(p, at(3, 2), Some(frame(3)), &metrics), Offered::Gap);
        assert_eq!(drained(&mut rx), [1]);
        // 2 arrives before the fill reads anything: both go out, in order.
        assert_eq!(c.offer_delivery(p, at(2, 1), Some(frame(2)), &metrics), Offered::Held);
        assert_eq!(drained(&mut rx), [2, 3]);
        assert!(c.seam.is_live());
        // A new gap while that fill has not ended yet starts no second fill.
        assert_eq!(c.offer_delivery(p, at(5, 4), Some(frame(5)), &metrics), Offered::Held);
        assert!(!c.seam.fill_done(false), "the fill goes on");
        assert!(!c.go_live(Positions::default(), &metrics));
        assert_eq!(c.offer_delivery(p, at(6, 5), Some(frame(6)), &metrics), Offered::Held);
        assert!(c.go_live(Positions { inbox: 4, group: 0 }, &metrics));
        assert_eq!(drained(&mut rx), [5, 6]);
        assert!(c.seam.fill_done(false));
        // Once a fill reads the log, a late delivery waits for it (the fill may be sending
        // that entry itself).
        assert_eq!(c.offer_delivery(p, at(9, 8), Some(frame(9)), &metrics), Offered::Gap);
        assert!(!c.start_reading(&metrics));
        assert_eq!(c.offer_delivery(p, at(7, 6), Some(frame(7)), &metrics), Offered::Held);
        assert_eq!(drained(&mut rx), Vec::<usize>::new());
        assert!(c.go_live(Positions { inbox: 8, group: 0 }, &metrics));
        assert_eq!(drained(&mut rx), [9]);
        assert!(c.seam.fill_done(false));
    }

    #[test]
    fn entries_gone_from_the_log_are_passed() {
        let metrics = Metrics::default();
        let (c, mut rx) = conn();
        let p = MessageKind::Private;
        assert_eq!(c.offer_delivery(p, at(5, 4), Some(frame(5)), &metrics), Offered::Gap);
        assert!(!c.go_live(Positions::default(), &metrics));
        c.go_live_past_gaps(&metrics);
        assert_eq!(drained(&mut rx), [5]);
        assert!(c.seam.is_live());
    }

    #[tokio::test]
    async fn the_outbox_is_bounded_in_frames() {
        let (tx, _rx) = Outbox::new(2, 1 << 20);
        tx.try_send(frame(1)).unwrap();
        tx.try_send(frame(1)).unwrap();
        assert_eq!(tx.try_send(frame(1)), Err(Refused::Full));
    }
}
