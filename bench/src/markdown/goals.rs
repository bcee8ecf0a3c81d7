//! The goals table: each goal of the comparison, what this run measured, and whether it is met.

use std::fmt::Write as _;

use super::{Runs, alo, auth, paced, us};
use crate::report::human;

pub(super) fn goals(runs: &Runs) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "| goal | measured | status |\n|---|---|---|");
    let status = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "**not met**",
        None => "not measured",
    };
    let max = |k: &str| runs.p2p.get(k).and_then(|p| p.max_msgs_per_s);
    let (cim, mqtt, nats) = (max("cim"), max("mqtt"), max("nats"));
    let vs = |peer: Option<f64>, want: f64, name: &str| -> (String, Option<bool>) {
        match (cim, peer) {
            (Some(c), Some(p)) if p > 0.0 => {
                (format!("{:.2}× ({} vs {} msgs/s)", c / p, human(c), human(p)), Some(c / p >= want))
            }
            _ => (format!("no {name} run"), None),
        }
    };
    let (m, ok) = vs(mqtt, 1.5, "Mosquitto");
    let _ = writeln!(out, "| p2p throughput ≥ 1.5× Mosquitto | {m} | {} |", status(ok));
    let (m, ok) = vs(nats, 0.5, "NATS");
    let _ = writeln!(out, "| p2p throughput ≥ 0.5× NATS | {m} | {} |", status(ok));
    let half = runs.p2p.get("cim").and_then(paced);
    let (m, ok) = match half {
        Some(ph) => (
            format!(
                "p99 {} (p50 {}) at {} msgs/s",
                us(ph.latency.p99_us),
                us(ph.latency.p50_us),
                human(ph.msgs_per_s)
            ),
            Some(ph.latency.p99_us <= 1000.0),
        ),
        None => ("no half-load run".into(), None),
    };
    let _ = writeln!(out, "| p2p p99 ≤ 1 ms at half load | {m} | {} |", status(ok));
    let conns = runs.conns.iter().rev().find_map(|(n, by)| by.get("cim").map(|c| (n, c)));
    let (m, ok) = match conns.and_then(|(n, c)| c.bytes_per_conn.map(|b| (n, b))) {
        Some((n, b)) => {
            (format!("{:.1} KiB per connection at {n} connections", b / 1024.0), Some(b <= 4096.0))
        }
        None => ("no conns run with --server-pid".into(), None),
    };
    let _ = writeln!(out, "| ≤ 4 KiB server memory per idle connection | {m} | {} |", status(ok));
    let fan = runs.group.get(&10_000).and_then(|by| by.get("cim"));
    let (m, ok) = match fan {
        Some(g) if g.fanout.count > 0 => (
            format!(
                "p50 {}, p99 {}, max {} ({} of {} deliveries)",
                us(g.fanout.p50_us),
                us(g.fanout.p99_us),
                us(g.fanout.max_us),
                g.deliveries,
                g.expected_deliveries
            ),
            Some(g.fanout.p99_us <= 20_000.0 && g.deliveries == g.expected_deliveries),
        ),
        Some(g) => (format!("no message reached every recipient ({} errors)", g.errors), Some(false)),
        None => ("no run with 10,000 recipients".into(), None),
    };
    let _ = writeln!(out, "| group fan-out to 10,000 ≤ 20 ms (judged on p99) | {m} | {} |", status(ok));
    let (m, ok) = match &runs.handler {
        Some(h) if !h.kinds.is_empty() => {
            let worst = h.kinds.iter().map(|k| k.single.p50_us).fold(0.0, f64::max);
            let each: Vec<String> =
                h.kinds.iter().map(|k| format!("{} {:.1}", k.event, k.single.p50_us)).collect();
            (format!("median µs per call: {}", each.join(", ")), Some(worst <= 5.0))
        }
        _ => ("no handler run".into(), None),
    };
    let _ = writeln!(out, "| handler overhead ≤ 5 µs median (every kind) | {m} | {} |", status(ok));
    out.push_str(&auth::goal(runs));
    out.push_str(&alo::goals(runs));
    out
}
