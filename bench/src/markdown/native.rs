//! The WASM tax: plain cim (handlers as WebAssembly components, a fresh instance per request)
//! beside the same host with `--builtin-handlers` (the same logic compiled into the host;
//! kind `cim-native`, from `cim-bench --kind cim-native`), with WASM ÷ native per row.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::wide::cpu_us_per;
use super::{Runs, best_max, paced, ratio, us};
use crate::report::{GroupReport, human};

/// The report kind of a host with `--builtin-handlers`.
pub(super) const KIND: &str = "cim-native";

/// One row: WASM, native, WASM ÷ native.
fn row(out: &mut String, label: &str, [wasm, native]: [Option<f64>; 2], fmt: impl Fn(f64) -> String) {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), &fmt);
    let _ = writeln!(out, "| {label} | {} | {} | {} |", cell(wasm), cell(native), ratio(wasm, native));
}

fn both<T>(map: &BTreeMap<String, T>, f: impl Fn(&T) -> Option<f64>) -> [Option<f64>; 2] {
    ["cim", KIND].map(|k| map.get(k).and_then(&f))
}

/// Whether any result is from a native host.
fn any(runs: &Runs) -> bool {
    runs.p2p.contains_key(KIND)
        || runs.p2p_paced.contains_key(KIND)
        || runs.idle.contains_key(KIND)
        || [&runs.group, &runs.group_unpaced].iter().any(|m| m.values().any(|by| by.contains_key(KIND)))
        || runs.conns.values().any(|by| by.contains_key(KIND))
}

/// The section; says so when there are no runs against a native host.
pub(super) fn section(runs: &Runs) -> String {
    if !any(runs) {
        return "No runs with native handlers (`cim-host up --builtin-handlers`, reported with \
                `cim-bench --kind cim-native`).\n"
            .into();
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "The same host binary started a second time with `--store memory --builtin-handlers`: login, \
         private send, group send, online list and the message callback run as Rust compiled into \
         the host instead of as WebAssembly components (a fresh instance per request). It gets the \
         same sequence of runs as plain cim (idle, both connection counts, p2p, the small group, the \
         latency floor, unpaced fan-out), one host at a time. The ratio is WASM ÷ native: above 1× \
         for latency, CPU and memory, below 1× for throughput is what the components cost.\n"
    );
    let _ = writeln!(
        out,
        "| | cim (WASM components) | cim (native handlers) | WASM ÷ native |\n|---|---:|---:|---:|"
    );
    let p = &runs.p2p;
    row(&mut out, "p2p max msgs/s (median)", both(p, |r| r.max_msgs_per_s), human);
    row(&mut out, "p2p latency at max: p50", both(p, |r| best_max(r).map(|ph| ph.latency.p50_us)), us);
    row(&mut out, "p2p latency at max: p99", both(p, |r| best_max(r).map(|ph| ph.latency.p99_us)), us);
    let per_msg = both(p, |r| best_max(r).and_then(|ph| cpu_us_per(ph.cpu.server_cores, ph.msgs_per_s)));
    row(&mut out, "p2p server CPU per message at max", per_msg, |v| format!("{v:.1} µs"));
    row(&mut out, "p2p half load: p50", both(p, |r| paced(r).map(|ph| ph.latency.p50_us)), us);
    row(&mut out, "p2p half load: p99", both(p, |r| paced(r).map(|ph| ph.latency.p99_us)), us);
    let f = &runs.p2p_paced;
    row(&mut out, "latency floor: p50", both(f, |r| paced(r).map(|ph| ph.latency.p50_us)), us);
    row(&mut out, "latency floor: p99", both(f, |r| paced(r).map(|ph| ph.latency.p99_us)), us);
    let per_msg = both(f, |r| paced(r).and_then(|ph| cpu_us_per(ph.cpu.server_cores, ph.msgs_per_s)));
    row(&mut out, "latency floor: server CPU per message", per_msg, |v| format!("{v:.1} µs"));
    for (users, by) in runs.group.iter().filter(|(_, by)| by.contains_key(KIND)) {
        let fanout = |f: fn(&GroupReport) -> f64| both(by, move |g| (g.fanout.count > 0).then(|| f(g)));
        row(&mut out, &format!("group {users}: deliveries/s"), both(by, |g| Some(g.deliveries_per_s)), human);
        row(&mut out, &format!("group {users}: fan-out p50"), fanout(|g| g.fanout.p50_us), us);
        row(&mut out, &format!("group {users}: fan-out p99"), fanout(|g| g.fanout.p99_us), us);
    }
    for (users, by) in runs.group_unpaced.iter().filter(|(_, by)| by.contains_key(KIND)) {
        let label = format!("unpaced fan-out {users}: deliveries/s");
        row(&mut out, &label, both(by, |g| Some(g.deliveries_per_s)), human);
        let per = both(by, |g| cpu_us_per(g.cpu.server_cores, g.deliveries_per_s));
        let label = format!("unpaced fan-out {users}: server CPU per delivery");
        row(&mut out, &label, per, |v| format!("{v:.2} µs"));
    }
    for (n, by) in runs.conns.iter().filter(|(_, by)| by.contains_key(KIND)) {
        let kib = both(by, |c| c.bytes_per_conn.map(|b| b / 1024.0));
        row(&mut out, &format!("memory per connection, {n} held"), kib, |v| format!("{v:.1} KiB"));
    }
    let i = &runs.idle;
    row(&mut out, "idle CPU, % of one core", both(i, |r| Some(r.server_cores * 100.0)), |v| {
        format!("{v:.2}%")
    });
    row(&mut out, "RSS at start", both(i, |r| r.rss_kib.map(|k| k as f64)), |v| {
        format!("{:.1} MiB", v / 1024.0)
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::markdown::fixtures::{floor, group};

    #[test]
    fn wasm_over_native_per_row() {
        let mut runs = Runs::default();
        assert!(section(&runs).starts_with("No runs with native handlers"));
        runs.p2p_paced.insert("cim".into(), floor(90.0, 0.06));
        assert!(
            section(&runs).starts_with("No runs with native handlers"),
            "plain cim alone is no comparison"
        );
        runs.p2p_paced.insert(KIND.into(), floor(60.0, 0.03));
        let s = section(&runs);
        assert!(s.contains("| latency floor: p50 | 90 µs | 60 µs | 1.50× |"), "{s}");
        assert!(s.contains("| latency floor: server CPU per message | 60.0 µs | 30.0 µs | 2.00× |"), "{s}");
        assert!(s.contains("| p2p max msgs/s (median) | - | - | - |"), "{s}");
        assert!(!s.contains("| unpaced fan-out"), "{s}");
        let by = runs.group_unpaced.entry(200).or_default();
        by.insert("cim".into(), group(200, 32, 100_000.0));
        by.insert(KIND.into(), group(200, 32, 125_000.0));
        let s = section(&runs);
        assert!(s.contains("| unpaced fan-out 200: deliveries/s | 100.0k | 125.0k | 0.80× |"), "{s}");
    }
}
