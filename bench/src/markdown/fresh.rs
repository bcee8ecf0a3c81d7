//! A fresh server: its CPU use with no client at all right after it started (`cim-bench
//! idle`), its memory then, and its memory per idle connection (the conns runs, made before
//! any message run).

use std::fmt::Write as _;

use super::Runs;
use super::wide::{header, per_kind, row};

/// The section; says so when there is neither an idle nor a conns run.
pub(super) fn section(runs: &Runs) -> String {
    if runs.idle.is_empty() && runs.conns.is_empty() {
        return "No idle or conns runs.\n".into();
    }
    let mut out = String::new();
    let idle = runs.idle.values().next().map_or_else(
        || "(no idle measurement in these results): ".to_owned(),
        |i| {
            format!(
                "first watched for {:.0} s with no client at all (`cim-bench idle`: user + system CPU \
                 time from `/proc/PID/stat`, counted by the kernel in 10 ms ticks, as a share of one \
                 core; what the server's own timers and housekeeping cost), then ",
                i.elapsed_s
            )
        },
    );
    let _ = writeln!(
        out,
        "Each server measured right after it was started for this run, {idle}idle connections \
         opened, held and closed (the smaller count first, details under Idle connections), before \
         any message was sent. Memory per connection: the server's VmRSS while the connections are \
         held minus just before, divided by the connections; below zero when the server gave back \
         more of its start-up memory meanwhile than the connections took (the larger count is the \
         better estimate).\n"
    );
    header(&mut out);
    let pct = |v: f64| format!("{v:.2}%");
    let i = &runs.idle;
    row(&mut out, "idle CPU, % of one core", per_kind(i, |r| Some(r.server_cores * 100.0)), pct, true);
    let busiest = per_kind(i, |r| r.max_cores.map(|c| c * 100.0));
    row(&mut out, "idle CPU, busiest second", busiest, pct, false);
    let ms = |v: f64| format!("{v:.0} ms");
    row(&mut out, "idle CPU time, total", per_kind(i, |r| Some(r.cpu_s * 1000.0)), ms, false);
    let mib = |v: f64| format!("{:.1} MiB", v / 1024.0);
    row(&mut out, "RSS at start", per_kind(i, |r| r.rss_kib.map(|k| k as f64)), mib, true);
    for (n, by) in &runs.conns {
        let kib = per_kind(by, |c| c.bytes_per_conn.map(|b| b / 1024.0));
        row(&mut out, &format!("memory per connection, {n} held"), kib, |v| format!("{v:.1} KiB"), true);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{ConnsReport, IdleReport};

    fn idle(cores: f64) -> IdleReport {
        IdleReport {
            server_pid: 1,
            secs: 10.0,
            elapsed_s: 10.0,
            cpu_s: cores * 10.0,
            server_cores: cores,
            max_cores: Some(cores * 2.0),
            samples: 11,
            rss_kib: Some(20 * 1024),
        }
    }

    fn conns(n: usize, bytes_per_conn: Option<f64>) -> ConnsReport {
        ConnsReport {
            n,
            connected: n,
            failed: 0,
            concurrency: 64,
            elapsed_s: 1.0,
            conns_per_s: n as f64,
            server_pid: Some(1),
            rss_before_kib: None,
            rss_held_kib: None,
            rss_after_close_kib: None,
            bytes_per_conn,
            first_errors: vec![],
        }
    }

    #[test]
    fn idle_cpu_and_memory_per_connection() {
        let mut runs = Runs::default();
        assert_eq!(section(&runs), "No idle or conns runs.\n");
        runs.conns.entry(1000).or_default().insert("cim".into(), conns(1000, Some(4096.0)));
        runs.conns.entry(1000).or_default().insert("cim-native".into(), conns(1000, Some(3072.0)));
        runs.conns.entry(1000).or_default().insert("mqtt".into(), conns(1000, None));
        let s = section(&runs);
        assert!(s.contains("this run, (no idle measurement in these results): idle connections"), "{s}");
        assert!(
            s.contains("| memory per connection, 1000 held | 4.0 KiB | 3.0 KiB | - | - | - | - |"),
            "{s}"
        );
        runs.idle.insert("cim".into(), idle(0.002));
        runs.idle.insert("nats".into(), idle(0.001));
        let s = section(&runs);
        assert!(s.contains("this run, first watched for 10 s with no client"), "{s}");
        assert!(s.contains("| idle CPU, % of one core | 0.20% | - | - | 0.10% | - | 2.00× |"), "{s}");
        assert!(s.contains("| idle CPU time, total | 20 ms | - | - | 10 ms |  |  |"), "{s}");
        assert!(s.contains("| RSS at start | 20.0 MiB | - | - | 20.0 MiB | - | 1.00× |"), "{s}");
    }
}
