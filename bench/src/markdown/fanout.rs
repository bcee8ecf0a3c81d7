//! Unpaced fan-out: the group workload with more than one message in flight (`cim-bench
//! group --window N`, N > 1), so it measures how many deliveries per second a server makes
//! rather than one message's fan-out latency.

use std::fmt::Write as _;

use super::wide::{cpu_us_per, header, per_kind, row};
use super::{Runs, note_failures, us};
use crate::report::{GroupReport, human};

/// The failure-counter case of the run with `users` recipients.
pub(super) fn case(users: usize) -> String {
    format!("group-unpaced:{users}")
}

/// One subsection per recipient count; says so when there are no such runs.
pub(super) fn section(runs: &Runs) -> String {
    if runs.group_unpaced.is_empty() {
        return "### Unpaced fan-out\n\nNo unpaced group runs (`cim-bench group --window N`, N > 1).\n\n"
            .into();
    }
    let mut out = String::new();
    for (users, by) in &runs.group_unpaced {
        let any = by.values().next();
        let _ = writeln!(
            out,
            "### Unpaced fan-out: {users} recipients\n\nOne sender, {users} recipients, {} group messages of \
             {} B, up to {} of them in flight (not yet at every recipient) instead of one: the server's \
             fan-out rate in deliveries/s. Fan-out latency here includes the wait behind the messages \
             ahead; CPU per delivery is the server's CPU time over the run divided by the deliveries.\n",
            any.map_or(0, |g| g.messages),
            any.map_or(0, |g| g.size),
            any.map_or(0, |g| g.window)
        );
        header(&mut out);
        let fanout = |f: fn(&GroupReport) -> f64| per_kind(by, move |g| (g.fanout.count > 0).then(|| f(g)));
        row(&mut out, "deliveries/s", per_kind(by, |g| Some(g.deliveries_per_s)), human, true);
        row(&mut out, "fan-out p50", fanout(|g| g.fanout.p50_us), us, true);
        row(&mut out, "fan-out p99", fanout(|g| g.fanout.p99_us), us, true);
        row(&mut out, "per delivery p50", per_kind(by, |g| Some(g.delivery.p50_us)), us, true);
        row(&mut out, "per delivery p99", per_kind(by, |g| Some(g.delivery.p99_us)), us, true);
        let cores = per_kind(by, |g| g.cpu.server_cores);
        row(&mut out, "server CPU, cores", cores, |v| format!("{v:.2}"), false);
        let per = per_kind(by, |g| cpu_us_per(g.cpu.server_cores, g.deliveries_per_s));
        row(&mut out, "server CPU per delivery", per, |v| format!("{v:.2} µs"), true);
        let missing =
            per_kind(by, |g| Some((g.expected_deliveries.saturating_sub(g.deliveries) + g.errors) as f64));
        row(&mut out, "missing deliveries + errors", missing, |v| format!("{v:.0}"), false);
        note_failures(&mut out, runs, &case(*users));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markdown::fixtures::group;

    #[test]
    fn deliveries_per_second_per_target() {
        let mut runs = Runs::default();
        assert!(section(&runs).contains("No unpaced group runs"));
        let by = runs.group_unpaced.entry(1000).or_default();
        by.insert("cim".into(), group(1000, 32, 200_000.0));
        by.insert("cim-native".into(), group(1000, 32, 250_000.0));
        by.insert("nats".into(), group(1000, 32, 400_000.0));
        let s = section(&runs);
        assert!(s.starts_with("### Unpaced fan-out: 1000 recipients\n"), "{s}");
        assert!(s.contains("up to 32 of them in flight"), "{s}");
        assert!(s.contains("| deliveries/s | 200.0k | 250.0k | - | 400.0k | - | 0.50× |"), "{s}");
        assert!(
            s.contains("| server CPU per delivery | 5.00 µs | 4.00 µs | - | 2.50 µs | - | 2.00× |"),
            "{s}"
        );
    }
}
