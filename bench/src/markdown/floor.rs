//! The latency floor: a p2p run paced far below what any target can do (`cim-bench p2p
//! --pairs 1 --rate 1000`, no unpaced phase), so latency is one message's own cost end to
//! end, and the server's CPU per message at that rate.

use std::fmt::Write as _;

use super::wide::{cpu_us_per, header, per_kind, row};
use super::{Runs, note_failures, paced, us};
use crate::report::human;

/// The failure-counter case of these runs.
pub(super) const CASE: &str = "p2p-floor";

/// The subsection; says so when there are no paced-only runs.
pub(super) fn section(runs: &Runs) -> String {
    let p = &runs.p2p_paced;
    let Some((any, phase)) = p.values().find_map(|r| paced(r).map(|ph| (r, ph))) else {
        return "No paced-only p2p runs (`cim-bench p2p --rate R` without `--half-load`).\n".into();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} sender → receiver pair(s), {} messages of {} B paced at {} msgs/s in total, no unpaced \
         phase: the servers are nowhere near busy, so the latency is what one message costs end to end \
         (the floor under every other latency in this document), and the CPU per message is the \
         server's CPU time over the run divided by the messages (its own timers included).\n",
        any.pairs,
        any.messages_per_pair * any.pairs as u64,
        any.size,
        human(phase.target_rate.unwrap_or(phase.msgs_per_s))
    );
    header(&mut out);
    let at = |f: fn(&crate::report::P2pPhase) -> Option<f64>| per_kind(p, move |r| paced(r).and_then(f));
    row(&mut out, "achieved msgs/s", at(|ph| Some(ph.msgs_per_s)), human, false);
    row(&mut out, "p50", at(|ph| Some(ph.latency.p50_us)), us, true);
    row(&mut out, "p90", at(|ph| Some(ph.latency.p90_us)), us, true);
    row(&mut out, "p99", at(|ph| Some(ph.latency.p99_us)), us, true);
    row(&mut out, "max", at(|ph| Some(ph.latency.max_us)), us, true);
    row(&mut out, "server CPU, % of one core", at(|ph| ph.cpu.server_cores.map(|c| c * 100.0)), pct, false);
    let per_msg = at(|ph| cpu_us_per(ph.cpu.server_cores, ph.msgs_per_s));
    row(&mut out, "server CPU per message", per_msg, |v| format!("{v:.1} µs"), true);
    let failed = per_kind(p, |r| Some(r.phases.iter().map(|ph| ph.lost + ph.errors).sum::<u64>() as f64));
    row(&mut out, "lost + errors", failed, |v| format!("{v:.0}"), false);
    note_failures(&mut out, runs, CASE);
    out
}

fn pct(v: f64) -> String {
    format!("{v:.1}%")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markdown::fixtures::floor;

    #[test]
    fn floor_rows_per_target() {
        let mut runs = Runs::default();
        assert!(section(&runs).starts_with("No paced-only p2p runs"));
        runs.p2p_paced.insert("cim".into(), floor(80.0, 0.05));
        runs.p2p_paced.insert("mqtt".into(), floor(40.0, 0.02));
        let s = section(&runs);
        assert!(
            s.starts_with("1 sender → receiver pair(s), 5000 messages of 64 B paced at 1000 msgs/s"),
            "{s}"
        );
        assert!(s.contains("| p50 | 80 µs | - | 40 µs | - | 2.00× | - |"), "{s}");
        assert!(s.contains("| server CPU per message | 50.0 µs | - | 20.0 µs | - | 2.50× | - |"), "{s}");
    }
}
