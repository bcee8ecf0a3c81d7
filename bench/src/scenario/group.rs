//! Group fan-out: `users` recipients online, one more user sends `messages` group messages,
//! at most `window` of them not yet received by everyone. For each message: the time until
//! its last recipient has it (fan-out latency), and for each delivery its own latency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::Semaphore;

use super::{Env, all_ok, close_all, connect_all, errors};
use crate::payload;
use crate::peer::{Dest, Hooks, Listen};
use crate::progress;
use crate::report::GroupReport;
use crate::stats::{CpuMeter, Latency, Recorder, histogram};

#[derive(Debug, Clone)]
pub struct GroupArgs {
    pub users: usize,
    pub messages: u64,
    pub size: usize,
    pub window: usize,
    pub idle_timeout: Duration,
}

#[derive(Debug)]
struct Shared {
    users: u32,
    /// Per message: recipients that have it.
    counts: Vec<AtomicU32>,
    deliveries: AtomicU64,
    last_ns: AtomicU64,
    fanout: Recorder,
    /// One per recipient, so recording never contends.
    delivery: Vec<Recorder>,
    window: Semaphore,
}

pub async fn run(env: &Env, args: &GroupArgs) -> anyhow::Result<GroupReport> {
    anyhow::ensure!(args.users > 0 && args.messages > 0, "group needs at least one user and one message");
    let window = args.window.max(1);
    let shared = Arc::new(Shared {
        users: u32::try_from(args.users).context("too many users")?,
        counts: (0..args.messages).map(|_| AtomicU32::new(0)).collect(),
        deliveries: AtomicU64::new(0),
        last_ns: AtomicU64::new(0),
        fanout: Recorder::default(),
        delivery: (0..args.users).map(|_| Recorder::default()).collect(),
        window: Semaphore::new(window),
    });
    let errors = errors();
    let c = &env.connector;
    let ids: Vec<u64> = (0..args.users as u64).map(|i| c.user_id(i + 1)).collect();
    let hooks = |i: usize| {
        let shared = shared.clone();
        Hooks::new(errors.clone()).on_message(move |p| receive(&shared, i, p))
    };
    let connect_start = Instant::now();
    let (receivers, _) = connect_all(env, &ids, Listen::Group, hooks, "recipients").await;
    let receivers = all_ok(receivers).context("connecting the recipients")?;
    let sender_hooks = {
        let shared = shared.clone();
        Hooks::new(errors.clone()).on_failed(move || shared.window.add_permits(1))
    };
    let mut sender =
        c.connect(c.user_id(0), Listen::Nothing, sender_hooks).await.context("connecting the sender")?;
    let connect_s = connect_start.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let expected = args.users as u64 * args.messages;
    let bar = progress::bar(expected, "group");
    let cpu = CpuMeter::start(env.server_pid);
    let start_ns = payload::now_ns();
    let mut sent = 0u64;
    let mut last_seen = 0;
    let mut last_progress = Instant::now();
    let mut stalled = false;
    while sent < args.messages {
        match tokio::time::timeout(Duration::from_millis(50), shared.window.acquire()).await {
            Ok(permit) => permit.context("window closed")?.forget(),
            Err(_) => {
                let d = shared.deliveries.load(Ordering::Relaxed);
                bar.set_position(d);
                if d != last_seen {
                    (last_seen, last_progress) = (d, Instant::now());
                } else if last_progress.elapsed() >= args.idle_timeout {
                    stalled = true;
                    break;
                }
                continue;
            }
        }
        let text = payload::make(payload::now_ns(), sent as u32, args.size);
        c.send(&mut sender, Dest::Group, vec![text]).await.context("sending a group message")?;
        sent += 1;
        if sent.is_multiple_of(16) {
            bar.set_position(shared.deliveries.load(Ordering::Relaxed));
        }
    }
    // Wait for the last deliveries.
    while !stalled {
        let d = shared.deliveries.load(Ordering::Relaxed);
        bar.set_position(d);
        if d >= sent * args.users as u64 {
            break;
        }
        if d != last_seen {
            (last_seen, last_progress) = (d, Instant::now());
        } else if last_progress.elapsed() >= args.idle_timeout {
            stalled = true;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bar.finish_and_clear();
    let cpu = cpu.stop();
    let deliveries = shared.deliveries.load(Ordering::SeqCst);
    if stalled {
        errors.push(format!(
            "no delivery for {:?}: stopping with {deliveries} of {expected} deliveries",
            args.idle_timeout
        ));
    }
    let elapsed_s = (shared.last_ns.load(Ordering::SeqCst).saturating_sub(start_ns) as f64 / 1e9).max(1e-9);
    let mut fanout = histogram();
    shared.fanout.merge_into(&mut fanout);
    let mut delivery = histogram();
    for r in &shared.delivery {
        r.merge_into(&mut delivery);
    }
    sender.close().await;
    close_all(receivers).await;
    Ok(GroupReport {
        users: args.users,
        messages: args.messages,
        size: args.size,
        window,
        connect_s,
        sent,
        deliveries,
        expected_deliveries: expected,
        errors: errors.count(),
        first_errors: errors.first(),
        elapsed_s,
        deliveries_per_s: deliveries as f64 / elapsed_s,
        fanout: Latency::of(&fanout),
        delivery: Latency::of(&delivery),
        cpu,
    })
}

fn receive(shared: &Shared, i: usize, payload: &[u8]) {
    let Some((sent_ns, seq)) = payload::parse(payload) else { return };
    let Some(count) = shared.counts.get(seq as usize) else { return };
    let now = payload::now_ns();
    let latency = now.saturating_sub(sent_ns);
    shared.delivery[i].record(latency);
    shared.last_ns.fetch_max(now, Ordering::Relaxed);
    shared.deliveries.fetch_add(1, Ordering::Relaxed);
    if count.fetch_add(1, Ordering::AcqRel) + 1 == shared.users {
        shared.fanout.record(latency);
        shared.window.add_permits(1);
    }
}
