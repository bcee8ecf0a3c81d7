//! What a run reports: one JSON document per invocation (`--json FILE`), and the same as a
//! readable table on the terminal.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::{CpuUse, Latency};

/// One invocation's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// `cim-bench <version>`.
    pub tool: String,
    /// The target URL (`None` for scenarios that need no server).
    pub target: Option<String>,
    /// `cim`, `mqtt` or `nats`.
    pub kind: Option<String>,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    /// cim only: how much each server counter (`GET /metrics`) grew during the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_counters: Option<std::collections::BTreeMap<String, f64>>,
    #[serde(flatten)]
    pub outcome: Outcome,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "scenario", rename_all = "lowercase")]
pub enum Outcome {
    P2p(P2pReport),
    Group(GroupReport),
    Conns(ConnsReport),
    Handler(HandlerReport),
    Smoke(SmokeReport),
    Idle(IdleReport),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct P2pReport {
    /// 0: each target's plain mode; 1: at least once (each target's durable mode).
    #[serde(default)]
    pub qos: u8,
    pub pairs: usize,
    pub messages_per_pair: u64,
    pub size: usize,
    pub window: usize,
    /// Median throughput of the unpaced phases, messages delivered per second.
    pub max_msgs_per_s: Option<f64>,
    pub phases: Vec<P2pPhase>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct P2pPhase {
    /// `max` (closed loop, as fast as the window allows) or `paced`.
    pub mode: String,
    /// Asked total rate in messages/s (paced phases).
    pub target_rate: Option<f64>,
    /// Written; at least once: acknowledged by the server.
    pub sent: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Deliveries of a message already delivered in this phase (not counted in `delivered`).
    #[serde(default)]
    pub duplicated: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    /// From the first send to the last delivery.
    pub elapsed_s: f64,
    pub msgs_per_s: f64,
    /// End to end: the sender stamps the payload just before writing it.
    pub latency: Latency,
    pub cpu: CpuUse,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    /// Recipients (the sender comes on top).
    pub users: usize,
    pub messages: u64,
    pub size: usize,
    pub window: usize,
    pub connect_s: f64,
    pub sent: u64,
    pub deliveries: u64,
    pub expected_deliveries: u64,
    pub errors: u64,
    pub first_errors: Vec<String>,
    pub elapsed_s: f64,
    pub deliveries_per_s: f64,
    /// Send → the last recipient has it, per message.
    pub fanout: Latency,
    /// Send → each recipient has it, per delivery.
    pub delivery: Latency,
    pub cpu: CpuUse,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnsReport {
    pub n: usize,
    pub connected: usize,
    pub failed: usize,
    pub concurrency: usize,
    pub elapsed_s: f64,
    pub conns_per_s: f64,
    pub server_pid: Option<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_held_kib: Option<u64>,
    pub rss_after_close_kib: Option<u64>,
    /// (held − before) / connected.
    pub bytes_per_conn: Option<f64>,
    pub first_errors: Vec<String>,
}

/// A server left alone: its CPU use with no clients (`cim-bench idle`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    pub server_pid: u32,
    /// The asked duration.
    pub secs: f64,
    /// Between the first and the last sample.
    pub elapsed_s: f64,
    /// User + system CPU time the server used in that time (`/proc/PID/stat`, 10 ms ticks).
    pub cpu_s: f64,
    /// `cpu_s / elapsed_s`: 0.01 is 1% of one core.
    pub server_cores: f64,
    /// The busiest sampling interval (about a second), in cores.
    pub max_cores: Option<f64>,
    /// Samples taken, the first and last included.
    pub samples: usize,
    /// The server's resident memory at the first sample.
    pub rss_kib: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandlerReport {
    pub manifest: String,
    pub calls: usize,
    pub batch: usize,
    pub kinds: Vec<HandlerKind>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandlerKind {
    pub event: String,
    pub component: String,
    /// One request per call: a fresh instance, the call, the drop.
    pub single: Latency,
    /// One call with `batch` requests (message kinds only); divide by `batch` per message.
    pub batched: Option<Latency>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmokeReport {
    pub checks: Vec<SmokeCheck>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmokeCheck {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

impl SmokeReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
}

/// A readable number: 123456 → "123.5k".
pub fn human(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

fn latency_line(l: &Latency) -> String {
    format!(
        "p50 {:.0} µs  p90 {:.0} µs  p99 {:.0} µs  p99.9 {:.0} µs  max {:.0} µs  (n={})",
        l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us, l.count
    )
}

fn cpu_line(c: &CpuUse) -> String {
    format!("server {} cores, bench {} cores", opt(c.server_cores, 2), opt(c.bench_cores, 2))
}

/// The report as a readable table.
pub fn table(r: &Report) -> String {
    let mut out = String::new();
    let target = r.target.as_deref().unwrap_or("(in process)");
    match &r.outcome {
        Outcome::P2p(p) => {
            let _ = writeln!(
                out,
                "p2p against {target}: {} pairs, {} messages per pair, {} B, window {}{}",
                p.pairs,
                p.messages_per_pair,
                p.size,
                p.window,
                if p.qos > 0 { ", at least once (sent = acknowledged)" } else { "" }
            );
            for ph in &p.phases {
                let rate = ph.target_rate.map(|r| format!(" @ {}/s", human(r))).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {:<6}{rate:<12} {:>10} msgs/s  delivered {}/{}  lost {}  duplicated {}  errors {}  {:.2} s",
                    ph.mode,
                    human(ph.msgs_per_s),
                    ph.delivered,
                    ph.sent,
                    ph.lost,
                    ph.duplicated,
                    ph.errors,
                    ph.elapsed_s
                );
                let _ = writeln!(out, "        latency {}", latency_line(&ph.latency));
                let _ = writeln!(out, "        cpu     {}", cpu_line(&ph.cpu));
                for e in &ph.first_errors {
                    let _ = writeln!(out, "        error: {e}");
                }
            }
            if let Some(m) = p.max_msgs_per_s {
                let _ = writeln!(out, "  max throughput (median of unpaced runs): {} msgs/s", human(m));
            }
        }
        Outcome::Group(g) => {
            let _ = writeln!(
                out,
                "group against {target}: 1 sender → {} recipients, {} messages, {} B, window {}",
                g.users, g.messages, g.size, g.window
            );
            let _ = writeln!(
                out,
                "  {} deliveries/s  deliveries {}/{}  errors {}  {:.2} s (connect {:.2} s)",
                human(g.deliveries_per_s),
                g.deliveries,
                g.expected_deliveries,
                g.errors,
                g.elapsed_s,
                g.connect_s
            );
            let _ = writeln!(out, "  fan-out (last recipient) {}", latency_line(&g.fanout));
            let _ = writeln!(out, "  per delivery             {}", latency_line(&g.delivery));
            let _ = writeln!(out, "  cpu {}", cpu_line(&g.cpu));
            for e in &g.first_errors {
                let _ = writeln!(out, "  error: {e}");
            }
        }
        Outcome::Conns(c) => {
            let _ = writeln!(out, "conns against {target}: {} connections, {} at a time", c.n, c.concurrency);
            let _ = writeln!(
                out,
                "  connected {} (failed {}) in {:.2} s: {} connections/s",
                c.connected,
                c.failed,
                c.elapsed_s,
                human(c.conns_per_s)
            );
            let kib = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v} KiB"));
            let _ = writeln!(
                out,
                "  server RSS: before {}, held {}, after close {}; per connection {} B",
                kib(c.rss_before_kib),
                kib(c.rss_held_kib),
                kib(c.rss_after_close_kib),
                opt(c.bytes_per_conn, 0)
            );
            for e in &c.first_errors {
                let _ = writeln!(out, "  error: {e}");
            }
        }
        Outcome::Handler(h) => {
            let _ = writeln!(
                out,
                "handler overhead ({}; {} calls per kind, batch {})",
                h.manifest, h.calls, h.batch
            );
            let _ = writeln!(
                out,
                "  {:<9} {:<18} {:>9} {:>9} {:>9}   {:>16}",
                "event", "component", "p50 µs", "p99 µs", "max µs", "per msg @batch µs"
            );
            for k in &h.kinds {
                let per_msg = k.batched.map(|b| format!("{:.2}", b.p50_us / h.batch.max(1) as f64));
                let _ = writeln!(
                    out,
                    "  {:<9} {:<18} {:>9.1} {:>9.1} {:>9.1}   {:>16}",
                    k.event,
                    k.component,
                    k.single.p50_us,
                    k.single.p99_us,
                    k.single.max_us,
                    per_msg.unwrap_or_else(|| "-".into())
                );
            }
        }
        Outcome::Idle(i) => {
            let _ = writeln!(out, "idle server (pid {}), no clients, {:.1} s:", i.server_pid, i.elapsed_s);
            let _ = writeln!(
                out,
                "  cpu {:.3} s: {:.2}% of one core (busiest interval {}%), {} samples; RSS {}",
                i.cpu_s,
                i.server_cores * 100.0,
                opt(i.max_cores.map(|c| c * 100.0), 1),
                i.samples,
                i.rss_kib.map_or_else(|| "-".to_owned(), |k| format!("{k} KiB"))
            );
        }
        Outcome::Smoke(s) => {
            let _ = writeln!(out, "smoke against {target}: {}", if s.ok() { "ok" } else { "FAILED" });
            for c in &s.checks {
                let _ = writeln!(out, "  [{}] {:<12} {}", if c.ok { "ok" } else { "FAIL" }, c.name, c.detail);
            }
        }
    }
    if let Some(c) = &r.server_counters {
        let failures: Vec<String> = c
            .iter()
            .filter(|(k, v)| **v > 0.0 && (k.contains("fail") || k.contains("dropped") || k.contains("slow")))
            .map(|(k, v)| format!("{k} +{v}"))
            .collect();
        let _ = writeln!(
            out,
            "  server counters: messages +{}, deliveries +{}{}",
            c.get("cim_messages_total").copied().unwrap_or(0.0),
            c.get("cim_deliveries_total").copied().unwrap_or(0.0),
            if failures.is_empty() { String::new() } else { format!(", {}", failures.join(", ")) }
        );
    }
    out
}
