//! Point to point: `pairs` sender → receiver pairs, `messages` per pair.
//!
//! Flow control is end to end and the same on every target: a sender keeps at most
//! `window` messages per pair that its receiver has not received yet (MQTT QoS 0 and NATS
//! have no per-message ack to pipeline on; on cim a refused send — an ERROR frame for its
//! request id — also frees its slot). Unpaced, that is the maximum throughput; with a
//! rate, each sender follows its own schedule (phases spread over the interval) and sends
//! whatever is due in one write, so the server sees small bursts as from a 1 ms timer.
//! The payload is stamped with the send time just before the write.
//!
//! At least once (`--qos 1`, [`Delivery::AtLeastOnce`]): each target in its durable mode (see
//! [`crate::peer`]). The window stays end to end; a message counts as sent when the server
//! acknowledged it (cim ACK: in the log; MQTT PUBACK; JetStream PubAck), and a phase ends
//! only once every write has been acknowledged (or nothing moved for the idle timeout), so
//! `lost` is acknowledged but never delivered. Every mode counts duplicates (a sequence
//! number delivered twice within a phase); they neither count as delivered nor free a slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use tokio::sync::Semaphore;

use super::{Env, all_ok, close_all, connect_all, errors};
use crate::payload;
use crate::peer::{Delivery, Dest, ErrorLog, Hooks, Listen, Peer};
use crate::progress;
use crate::report::{P2pPhase, P2pReport};
use crate::stats::{CpuMeter, Latency, Recorder, histogram};

/// Most messages in one write.
const MAX_BATCH: usize = 64;
/// Bits of the sequence number that carry the phase (a late message of an earlier phase is
/// not counted in the next).
const PHASE_SHIFT: u32 = 24;

#[derive(Debug, Clone)]
pub struct P2pArgs {
    pub pairs: usize,
    /// Per pair.
    pub messages: u64,
    /// Total messages/s across all pairs; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    pub size: usize,
    pub window: usize,
    /// Unpaced runs (the median is the max throughput).
    pub runs: usize,
    /// After the unpaced runs, one paced run at half their median throughput.
    pub half_load: bool,
    /// A phase without any delivery for this long ends; what is missing counts as lost.
    pub idle_timeout: Duration,
    /// Each target's plain or durable mode (the connector's).
    pub delivery: Delivery,
}

#[derive(Debug)]
struct Pair {
    received: AtomicU64,
    duplicated: AtomicU64,
    /// One bit per sequence number of the current phase: delivered already.
    seen: Vec<AtomicU64>,
    last_ns: AtomicU64,
    recorder: Recorder,
    window: Semaphore,
}

#[derive(Debug)]
struct Shared {
    phase: AtomicU32,
    delivered: AtomicU64,
    /// Sends the servers acknowledged in this phase.
    acked: AtomicU64,
    pairs: Vec<Pair>,
}

pub async fn run(env: &Env, args: &P2pArgs) -> anyhow::Result<P2pReport> {
    anyhow::ensure!(args.pairs > 0 && args.messages > 0, "p2p needs at least one pair and one message");
    anyhow::ensure!(
        args.messages < 1 << PHASE_SHIFT,
        "at most {} messages per pair",
        (1u64 << PHASE_SHIFT) - 1
    );
    let window = args.window.max(1);
    let shared = Arc::new(Shared {
        phase: AtomicU32::new(0),
        delivered: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        pairs: (0..args.pairs)
            .map(|_| Pair {
                received: AtomicU64::new(0),
                duplicated: AtomicU64::new(0),
                seen: (0..args.messages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
                last_ns: AtomicU64::new(0),
                recorder: Recorder::default(),
                window: Semaphore::new(window),
            })
            .collect(),
    });
    let errors = errors();
    let c = &env.connector;
    let receiver_ids: Vec<u64> = (0..args.pairs as u64).map(|i| c.user_id(2 * i)).collect();
    let sender_ids: Vec<u64> = (0..args.pairs as u64).map(|i| c.user_id(2 * i + 1)).collect();

    let hooks = |i: usize| {
        let shared = shared.clone();
        Hooks::new(errors.clone()).on_message(move |p| receive(&shared, i, p))
    };
    let (receivers, _) = connect_all(env, &receiver_ids, Listen::Own, hooks, "receivers").await;
    let receivers = all_ok(receivers).context("connecting the receivers")?;
    let hooks = |i: usize| {
        let shared = shared.clone();
        let acked = shared.clone();
        Hooks::new(errors.clone()).on_failed(move || shared.pairs[i].window.add_permits(1)).on_acked(
            move || {
                acked.acked.fetch_add(1, Ordering::Relaxed);
            },
        )
    };
    let (senders, _) = connect_all(env, &sender_ids, Listen::Nothing, hooks, "senders").await;
    let mut senders = all_ok(senders).context("connecting the senders")?;
    // Subscriptions are acknowledged, but give the brokers a moment to settle.
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut phases = Vec::new();
    let mut max_rates = Vec::new();
    let unpaced_runs = if args.rate.is_some() && !args.half_load { 0 } else { args.runs.max(1) };
    for _ in 0..unpaced_runs {
        let (phase, back) = run_phase(env, args, &shared, &errors, senders, &receiver_ids, None).await?;
        senders = back;
        max_rates.push(phase.msgs_per_s);
        phases.push(phase);
    }
    let max = median(&max_rates);
    let paced = match (args.rate, max) {
        (Some(rate), _) if !args.half_load => Some(rate),
        (_, Some(max)) if args.half_load => Some(max / 2.0),
        _ => None,
    };
    if let Some(rate) = paced {
        let (phase, back) =
            run_phase(env, args, &shared, &errors, senders, &receiver_ids, Some(rate)).await?;
        senders = back;
        phases.push(phase);
    }
    close_all(senders).await;
    close_all(receivers).await;
    Ok(P2pReport {
        qos: match args.delivery {
            Delivery::AtMostOnce => 0,
            Delivery::AtLeastOnce => 1,
        },
        pairs: args.pairs,
        messages_per_pair: args.messages,
        size: args.size,
        window,
        max_msgs_per_s: max,
        phases,
    })
}

fn receive(shared: &Shared, i: usize, payload: &[u8]) {
    let Some((sent_ns, seq)) = payload::parse(payload) else { return };
    if seq >> PHASE_SHIFT != shared.phase.load(Ordering::Relaxed) {
        return;
    }
    let now = payload::now_ns();
    let pair = &shared.pairs[i];
    let k = (seq & ((1 << PHASE_SHIFT) - 1)) as usize;
    if let Some(word) = pair.seen.get(k / 64) {
        let bit = 1u64 << (k % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            pair.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    pair.recorder.record(now.saturating_sub(sent_ns));
    pair.last_ns.fetch_max(now, Ordering::Relaxed);
    pair.received.fetch_add(1, Ordering::Relaxed);
    shared.delivered.fetch_add(1, Ordering::Relaxed);
    pair.window.add_permits(1);
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// One phase with the already connected pairs; gives the senders back for the next.
async fn run_phase(
    env: &Env,
    args: &P2pArgs,
    shared: &Arc<Shared>,
    errors: &Arc<ErrorLog>,
    senders: Vec<Peer>,
    receiver_ids: &[u64],
    rate: Option<f64>,
) -> anyhow::Result<(P2pPhase, Vec<Peer>)> {
    let window = args.window.max(1);
    let phase = shared.phase.fetch_add(1, Ordering::SeqCst) + 1;
    for pair in &shared.pairs {
        pair.received.store(0, Ordering::Relaxed);
        pair.duplicated.store(0, Ordering::Relaxed);
        for word in &pair.seen {
            word.store(0, Ordering::Relaxed);
        }
        pair.last_ns.store(0, Ordering::Relaxed);
        pair.recorder.reset();
        let free = pair.window.available_permits();
        if free < window {
            pair.window.add_permits(window - free);
        }
    }
    shared.delivered.store(0, Ordering::SeqCst);
    shared.acked.store(0, Ordering::SeqCst);
    let errors_before = errors.count();
    let total = args.pairs as u64 * args.messages;
    let sent = Arc::new(AtomicU64::new(0));
    let bar = progress::bar(total, if rate.is_some() { "p2p paced" } else { "p2p max" });
    let cpu = CpuMeter::start(env.server_pid);
    let start_ns = payload::now_ns();
    let start = Instant::now();
    // Each sender's share of the rate, and its schedule's offset within one interval.
    let interval = rate.map(|r| Duration::from_secs_f64(args.pairs as f64 / r.max(1e-3)));
    let mut tasks = Vec::with_capacity(senders.len());
    for (i, peer) in senders.into_iter().enumerate() {
        let job = Sender {
            env: env.clone(),
            shared: shared.clone(),
            sent: sent.clone(),
            errors: errors.clone(),
            i,
            dest: Dest::User(receiver_ids[i]),
            phase,
            messages: args.messages,
            size: args.size,
            idle: args.idle_timeout,
            schedule: interval.map(|iv| (start + iv.mul_f64(i as f64 / args.pairs as f64), iv)),
        };
        tasks.push(tokio::spawn(job.run(peer)));
    }
    // Wait for every delivery, or for deliveries to stop coming.
    let mut last_seen = 0;
    let mut last_progress = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let delivered = shared.delivered.load(Ordering::Relaxed);
        bar.set_position(delivered);
        if delivered >= total {
            break;
        }
        if delivered != last_seen {
            last_seen = delivered;
            last_progress = Instant::now();
        } else if last_progress.elapsed() >= args.idle_timeout {
            errors.push(format!(
                "no delivery for {:?}: stopping with {delivered} of {total} delivered",
                args.idle_timeout
            ));
            break;
        }
    }
    bar.finish_and_clear();
    let mut senders = Vec::with_capacity(tasks.len());
    for t in tasks {
        senders.push(t.await.context("a sender task panicked")?);
    }
    let written = sent.load(Ordering::SeqCst);
    if args.delivery == Delivery::AtLeastOnce {
        // Acks may trail the deliveries: wait for all of them (or for them to stop coming).
        let mut last_seen = shared.acked.load(Ordering::SeqCst);
        let mut last_progress = Instant::now();
        while last_seen < written && last_progress.elapsed() < args.idle_timeout {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let acked = shared.acked.load(Ordering::SeqCst);
            if acked != last_seen {
                last_seen = acked;
                last_progress = Instant::now();
            }
        }
    }
    let cpu = cpu.stop();
    let delivered = shared.delivered.load(Ordering::SeqCst);
    let end_ns = shared.pairs.iter().map(|p| p.last_ns.load(Ordering::Relaxed)).max().unwrap_or(start_ns);
    let elapsed_s = (end_ns.saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let mut h: Histogram<u64> = histogram();
    for pair in &shared.pairs {
        pair.recorder.merge_into(&mut h);
    }
    let sent = match args.delivery {
        Delivery::AtMostOnce => written,
        Delivery::AtLeastOnce => shared.acked.load(Ordering::SeqCst),
    };
    let duplicated = shared.pairs.iter().map(|p| p.duplicated.load(Ordering::Relaxed)).sum();
    let report = P2pPhase {
        mode: if rate.is_some() { "paced" } else { "max" }.to_owned(),
        target_rate: rate,
        sent,
        delivered,
        lost: sent.saturating_sub(delivered),
        duplicated,
        errors: errors.count() - errors_before,
        first_errors: errors.first(),
        elapsed_s,
        msgs_per_s: delivered as f64 / elapsed_s,
        latency: Latency::of(&h),
        cpu,
    };
    Ok((report, senders))
}

/// One sender's part of a phase.
struct Sender {
    env: Env,
    shared: Arc<Shared>,
    sent: Arc<AtomicU64>,
    errors: Arc<ErrorLog>,
    i: usize,
    dest: Dest,
    phase: u32,
    messages: u64,
    size: usize,
    idle: Duration,
    /// First due time and interval between messages, when paced.
    schedule: Option<(Instant, Duration)>,
}

impl Sender {
    async fn run(self, mut peer: Peer) -> Peer {
        if let Err(e) = self.send_all(&mut peer).await {
            self.errors.push(format!("sender {}: {e:#}", peer.id));
        }
        peer
    }

    async fn send_all(&self, peer: &mut Peer) -> anyhow::Result<()> {
        let pair = &self.shared.pairs[self.i];
        let mut k = 0u64;
        while k < self.messages {
            let mut most = (MAX_BATCH as u64).min(self.messages - k);
            if let Some((first, interval)) = self.schedule {
                let due = first + interval.mul_f64(k as f64);
                tokio::time::sleep_until(due.into()).await;
                // Everything due by now goes in this write.
                let now = Instant::now();
                let due_by_now =
                    (now.saturating_duration_since(first).as_secs_f64() / interval.as_secs_f64()) as u64 + 1;
                most = most.min(due_by_now.saturating_sub(k).max(1));
            }
            let permit = tokio::time::timeout(self.idle, pair.window.acquire())
                .await
                .map_err(|_| anyhow::anyhow!("window stalled for {:?} (messages lost?)", self.idle))?
                .context("window closed")?;
            permit.forget();
            let mut n = 1;
            while n < most {
                match pair.window.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        n += 1;
                    }
                    Err(_) => break,
                }
            }
            let now = payload::now_ns();
            let texts = (k..k + n)
                .map(|s| payload::make(now, (self.phase << PHASE_SHIFT) | s as u32, self.size))
                .collect();
            self.env.connector.send(peer, self.dest, texts).await?;
            self.sent.fetch_add(n, Ordering::Relaxed);
            k += n;
        }
        Ok(())
    }
}
