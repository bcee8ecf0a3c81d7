//! The cost of authentication: plain cim beside cim with a token per user (kind `cim-auth`,
//! from `cim-bench --token-secret-file`), with the ratio and the 95 % throughput bar.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{Runs, best_max, paced, ratio, us};
use crate::report::human;

/// The report kind of runs with a token per user.
pub(super) const KIND: &str = "cim-auth";

/// With authentication on, p2p throughput must stay at or above this share of plain cim's.
const BAR: f64 = 0.95;

/// One row: plain, auth on, and auth on ÷ plain.
fn row(out: &mut String, label: &str, [off, on]: [Option<f64>; 2], fmt: impl Fn(f64) -> String) {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), &fmt);
    let _ = writeln!(out, "| {label} | {} | {} | {} |", cell(off), cell(on), ratio(on, off));
}

fn both<T>(map: &BTreeMap<String, T>, f: impl Fn(&T) -> Option<f64>) -> [Option<f64>; 2] {
    ["cim", KIND].map(|k| map.get(k).and_then(&f))
}

/// The goals-table row for the 95 % bar.
pub(super) fn goal(runs: &Runs) -> String {
    let [off, on] = both(&runs.p2p, |r| r.max_msgs_per_s);
    let (measured, ok) = match (off, on) {
        (Some(off), Some(on)) if off > 0.0 => (
            format!("{:.2}× ({} vs {} msgs/s)", on / off, human(on), human(off)),
            if on / off >= BAR { "met" } else { "**not met**" },
        ),
        _ => ("no p2p run with --token-secret-file".into(), "not measured"),
    };
    format!("| p2p throughput with authentication on ≥ 0.95× off | {measured} | {ok} |\n")
}

/// The section; says so when there are no runs with tokens.
pub(super) fn section(runs: &Runs) -> String {
    let any = runs.p2p.contains_key(KIND)
        || runs.group.values().any(|by| by.contains_key(KIND))
        || runs.conns.values().any(|by| by.contains_key(KIND));
    if !any {
        return "No runs with authentication on (`cim-bench --token-secret-file`).\n".into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "The same host binary started a second time with `--auth-hmac-secret-file`: every simulated \
         user logs in with its own HS256 token (verified on `POST /login` and on LOGIN; minted by \
         the generator before it logs in, outside the measured sends). The bar: throughput with \
         authentication on at least {:.0}% of plain cim's.\n",
        BAR * 100.0
    );
    let _ = writeln!(out, "| | cim | cim (auth on) | on ÷ off |\n|---|---:|---:|---:|");
    let p = &runs.p2p;
    row(&mut out, "p2p max msgs/s (median)", both(p, |r| r.max_msgs_per_s), human);
    row(&mut out, "p2p latency at max: p50", both(p, |r| best_max(r).map(|ph| ph.latency.p50_us)), us);
    row(&mut out, "p2p latency at max: p99", both(p, |r| best_max(r).map(|ph| ph.latency.p99_us)), us);
    row(&mut out, "p2p half load: p50", both(p, |r| paced(r).map(|ph| ph.latency.p50_us)), us);
    row(&mut out, "p2p half load: p99", both(p, |r| paced(r).map(|ph| ph.latency.p99_us)), us);
    for (users, by) in runs.group.iter().filter(|(_, by)| by.contains_key(KIND)) {
        let fanout =
            |f: fn(&crate::report::GroupReport) -> f64| both(by, move |g| (g.fanout.count > 0).then(|| f(g)));
        row(&mut out, &format!("group {users}: deliveries/s"), both(by, |g| Some(g.deliveries_per_s)), human);
        row(&mut out, &format!("group {users}: fan-out p50"), fanout(|g| g.fanout.p50_us), us);
        row(&mut out, &format!("group {users}: fan-out p99"), fanout(|g| g.fanout.p99_us), us);
    }
    for (n, by) in runs.conns.iter().filter(|(_, by)| by.contains_key(KIND)) {
        row(&mut out, &format!("{n} logins: connections/s"), both(by, |c| Some(c.conns_per_s)), human);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::P2pReport;

    fn p2p(max: f64) -> P2pReport {
        P2pReport {
            qos: 0,
            pairs: 16,
            messages_per_pair: 100,
            size: 64,
            window: 64,
            max_msgs_per_s: Some(max),
            phases: vec![],
        }
    }

    #[test]
    fn the_bar_is_95_percent_of_plain_throughput() {
        let mut runs = Runs::default();
        assert!(goal(&runs).contains("not measured"));
        assert!(section(&runs).starts_with("No runs with authentication on"));
        runs.p2p.insert("cim".into(), p2p(100_000.0));
        runs.p2p.insert(KIND.into(), p2p(96_000.0));
        assert!(goal(&runs).contains("0.96×") && goal(&runs).ends_with("| met |\n"), "{}", goal(&runs));
        assert!(section(&runs).contains("| p2p max msgs/s (median) |"), "{}", section(&runs));
        runs.p2p.insert(KIND.into(), p2p(90_000.0));
        assert!(goal(&runs).contains("**not met**"), "{}", goal(&runs));
    }
}
