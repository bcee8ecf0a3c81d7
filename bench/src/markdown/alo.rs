//! At least once: the p2p workload with every target in its durable mode (`cim-bench p2p
//! --qos 1`): cim on its embedded store and on Redis (kind `cim-redis`), Mosquitto QoS 1 with
//! persistence, NATS JetStream; the table and the two goals (≥ 1.5× Mosquitto, ≥ 1× JetStream).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Runs, best_max, note_failures, paced, ratio, us};
use crate::report::{P2pReport, human};

/// The report kind of cim on the Redis store (`cim-bench --kind cim-redis`).
pub(super) const REDIS: &str = "cim-redis";

/// Columns, with their display names.
const KINDS: [(&str, &str); 4] = [
    ("cim", "cim (embedded)"),
    (REDIS, "cim (Redis)"),
    ("mqtt", "Mosquitto QoS 1"),
    ("nats", "NATS JetStream"),
];

/// cim (embedded) at least this many times Mosquitto QoS 1's throughput…
const VS_MQTT: f64 = 1.5;
/// …and JetStream's.
const VS_NATS: f64 = 1.0;

fn per_kind(map: &BTreeMap<String, P2pReport>, f: impl Fn(&P2pReport) -> Option<f64>) -> [Option<f64>; 4] {
    KINDS.map(|(k, _)| map.get(k).and_then(&f))
}

/// One row: the value per column, then both cims' ratios to each peer.
fn row(out: &mut String, label: &str, v: [Option<f64>; 4], fmt: impl Fn(f64) -> String, ratios: bool) {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), &fmt);
    let r = |a: Option<f64>, b: Option<f64>| if ratios { ratio(a, b) } else { String::new() };
    let _ = writeln!(
        out,
        "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |",
        cell(v[0]),
        cell(v[1]),
        cell(v[2]),
        cell(v[3]),
        r(v[0], v[2]),
        r(v[0], v[3]),
        r(v[1], v[2]),
        r(v[1], v[3])
    );
}

/// The goals-table rows, judged on cim's default (embedded) store; Redis is quoted beside.
pub(super) fn goals(runs: &Runs) -> String {
    let max = |k: &str| runs.p2p_alo.get(k).and_then(|p| p.max_msgs_per_s);
    let (cim, redis) = (max("cim"), max(REDIS));
    let mut out = String::new();
    for (peer, name, want) in [("mqtt", "Mosquitto QoS 1", VS_MQTT), ("nats", "JetStream", VS_NATS)] {
        let (measured, status) = match (cim, max(peer)) {
            (Some(c), Some(p)) if p > 0.0 => {
                let on_redis = redis.map(|r| format!("; cim on Redis {:.2}× ({})", r / p, human(r)));
                (
                    format!(
                        "{:.2}× ({} vs {} msgs/s){}",
                        c / p,
                        human(c),
                        human(p),
                        on_redis.unwrap_or_default()
                    ),
                    if c / p >= want { "met" } else { "**not met**" },
                )
            }
            _ => (format!("no at-least-once run of cim and {name}"), "not measured"),
        };
        let _ = writeln!(out, "| durable p2p ≥ {want}× {name} | {measured} | {status} |");
    }
    out
}

/// The section; says so when there are no at-least-once runs.
pub(super) fn section(runs: &Runs) -> String {
    let p = &runs.p2p_alo;
    let Some(any) = p.values().next() else {
        return "No at-least-once runs (`cim-bench p2p --qos 1`).\n".into();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "The point-to-point workload above ({} pairs, {} messages per pair, {} B, at most {} in flight \
         per pair), with every target in its durable mode (`cim-bench p2p --qos 1`, servers as \
         `bench/compare.sh` starts them):\n\n\
         - **cim (embedded)**: the default store (`--store embedded --log-sync os`): an accepted \
         message is in the on-disk log (fjall journal, group-committed, written to the OS; no fsync) \
         before its ACK. Sends carry a `client_msg_id`; receivers acknowledge their inbox position \
         after 64 deliveries or 100 ms, whichever comes first.\n\
         - **cim (Redis)**: the same host on `--store redis://…`, the log in Redis Streams on a \
         redis-server of its own with `appendonly yes`, `appendfsync everysec`. Its server CPU is \
         cim-host's alone (Redis's is not counted).\n\
         - **Mosquitto QoS 1**: publish and subscribe at QoS 1 on persistent sessions (clean session \
         off), `persistence true`: Mosquitto keeps messages in memory and writes its database every \
         `autosave_interval` (default 30 min) and at shutdown, so a PUBACK does not mean on disk.\n\
         - **NATS JetStream**: `nats-server -js`, one file-storage stream with a subject per \
         receiver, a durable pull consumer per receiver with `AckPolicy::All` (acknowledged like \
         cim's, after 64 messages or 100 ms); senders publish with a `Nats-Msg-Id` and count the \
         PubAck (the message is in the stream's file store; NATS syncs it to disk on its own \
         schedule, not per message).\n\n\
         A message counts as sent when the server acknowledged it (cim ACK, PUBACK, PubAck); lost = \
         acknowledged but not delivered; duplicated = delivered twice within a phase. Throughput and \
         latency as in the point-to-point section.\n",
        any.pairs, any.messages_per_pair, any.size, any.window
    );
    let names = KINDS.map(|(_, name)| name);
    let _ = writeln!(
        out,
        "| | {} | cim ÷ Mosquitto | cim ÷ NATS | cim (Redis) ÷ Mosquitto | cim (Redis) ÷ NATS |",
        names.join(" | ")
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cores = |v: f64| format!("{v:.2}");
    let count = |v: f64| format!("{v:.0}");
    row(&mut out, "max msgs/s (median)", per_kind(p, |r| r.max_msgs_per_s), human, true);
    let runs_cell = |k: &str| {
        p.get(k).map_or_else(
            || "-".to_owned(),
            |r| {
                let each: Vec<String> =
                    r.phases.iter().filter(|ph| ph.mode == "max").map(|ph| human(ph.msgs_per_s)).collect();
                each.join(" / ")
            },
        )
    };
    let _ =
        writeln!(out, "| unpaced runs, msgs/s | {} | | | | |", KINDS.map(|(k, _)| runs_cell(k)).join(" | "));
    row(&mut out, "latency at max: p50", per_kind(p, |r| best_max(r).map(|ph| ph.latency.p50_us)), us, true);
    row(&mut out, "latency at max: p99", per_kind(p, |r| best_max(r).map(|ph| ph.latency.p99_us)), us, true);
    let at_max = per_kind(p, |r| best_max(r).and_then(|ph| ph.cpu.server_cores));
    row(&mut out, "server CPU at max, cores", at_max, cores, false);
    let bench = per_kind(p, |r| best_max(r).and_then(|ph| ph.cpu.bench_cores));
    row(&mut out, "cim-bench CPU at max, cores", bench, cores, false);
    row(
        &mut out,
        "half load: asked msgs/s",
        per_kind(p, |r| paced(r).and_then(|ph| ph.target_rate)),
        human,
        false,
    );
    row(
        &mut out,
        "half load: achieved msgs/s",
        per_kind(p, |r| paced(r).map(|ph| ph.msgs_per_s)),
        human,
        false,
    );
    row(&mut out, "half load: p50", per_kind(p, |r| paced(r).map(|ph| ph.latency.p50_us)), us, true);
    row(&mut out, "half load: p90", per_kind(p, |r| paced(r).map(|ph| ph.latency.p90_us)), us, true);
    row(&mut out, "half load: p99", per_kind(p, |r| paced(r).map(|ph| ph.latency.p99_us)), us, true);
    row(&mut out, "half load: max", per_kind(p, |r| paced(r).map(|ph| ph.latency.max_us)), us, true);
    let half = per_kind(p, |r| paced(r).and_then(|ph| ph.cpu.server_cores));
    row(&mut out, "half load: server CPU, cores", half, cores, false);
    let sum = |f: fn(&crate::report::P2pPhase) -> u64| {
        per_kind(p, move |r| Some(r.phases.iter().map(f).sum::<u64>() as f64))
    };
    row(&mut out, "lost (all phases)", sum(|ph| ph.lost), count, false);
    row(&mut out, "duplicated (all phases)", sum(|ph| ph.duplicated), count, false);
    row(&mut out, "errors (all phases)", sum(|ph| ph.errors), count, false);
    note_failures(&mut out, runs, "p2p-alo");
    note_failures(&mut out, runs, "p2p-alo (Redis)");
    let _ = writeln!(
        out,
        "\nRatios: for throughput higher is better for cim; for latency lower is better for cim."
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p2p(max: f64) -> P2pReport {
        P2pReport {
            qos: 1,
            pairs: 16,
            messages_per_pair: 100,
            size: 64,
            window: 64,
            max_msgs_per_s: Some(max),
            phases: vec![],
        }
    }

    #[test]
    fn goals_are_computed_from_the_embedded_store() {
        let mut runs = Runs::default();
        assert!(goals(&runs).contains("not measured"));
        assert!(section(&runs).starts_with("No at-least-once runs"));
        runs.p2p_alo.insert("cim".into(), p2p(90_000.0));
        runs.p2p_alo.insert(REDIS.into(), p2p(30_000.0));
        runs.p2p_alo.insert("mqtt".into(), p2p(50_000.0));
        runs.p2p_alo.insert("nats".into(), p2p(100_000.0));
        let g = goals(&runs);
        let lines: Vec<&str> = g.lines().collect();
        assert_eq!(lines.len(), 2, "{g}");
        assert!(lines[0].contains("1.80×") && lines[0].ends_with("| met |"), "{g}");
        assert!(lines[0].contains("cim on Redis 0.60×"), "{g}");
        assert!(lines[1].contains("0.90×") && lines[1].ends_with("| **not met** |"), "{g}");
        assert!(section(&runs).contains("| max msgs/s (median) | 90.0k | 30.0k | 50.0k | 100.0k | 1.80× |"));
    }
}
