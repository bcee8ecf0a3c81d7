//! `docs/BENCHMARKS.md` from a directory of JSON reports: the machine, the goals and
//! whether they are met, one table per scenario with cim, Mosquitto, NATS and the ratios.
//! Any report may be missing (older result directories): its table says so or shows `-`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;

mod alo;
mod auth;
mod fanout;
#[cfg(test)]
mod fixtures;
mod floor;
mod fresh;
mod goals;
mod native;
mod wide;

use crate::report::{
    ConnsReport, GroupReport, HandlerReport, IdleReport, Outcome, P2pPhase, P2pReport, Report, human,
};

/// Targets in column order, with their display names.
const KINDS: [(&str, &str); 3] = [("cim", "cim"), ("mqtt", "Mosquitto"), ("nats", "NATS")];

#[derive(Default)]
struct Runs {
    /// By kind.
    p2p: BTreeMap<String, P2pReport>,
    /// At least once (`p2p --qos 1`), by kind.
    p2p_alo: BTreeMap<String, P2pReport>,
    /// Paced phases only (`p2p --rate R` without `--half-load`: the latency floor), by kind.
    p2p_paced: BTreeMap<String, P2pReport>,
    /// One message in flight (`group --window 1`), by recipients, then kind.
    group: BTreeMap<usize, BTreeMap<String, GroupReport>>,
    /// More than one in flight (`group --window N`, N > 1), by recipients, then kind.
    group_unpaced: BTreeMap<usize, BTreeMap<String, GroupReport>>,
    /// A server with no clients (`idle`), by kind.
    idle: BTreeMap<String, IdleReport>,
    /// By connections, then kind.
    conns: BTreeMap<usize, BTreeMap<String, ConnsReport>>,
    handler: Option<HandlerReport>,
    started: Option<u64>,
    /// cim's failure counters that grew during a case (`p2p`, `group:N`, `conns:N`, …;
    /// `(auth on)`, `(Redis)` or `(native)` after it for those hosts).
    cim_failures: BTreeMap<String, String>,
}

/// The failure-like counters that grew, as `name +n, …` (empty if none).
fn failures(counters: &Option<BTreeMap<String, f64>>) -> String {
    let Some(c) = counters else { return String::new() };
    c.iter()
        .filter(|(k, v)| **v > 0.0 && (k.contains("fail") || k.contains("dropped") || k.contains("slow")))
        .map(|(k, v)| format!("`{k}` +{v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn load(dir: &Path) -> anyhow::Result<Runs> {
    let mut reports = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "json") {
            let text = std::fs::read_to_string(&path)?;
            let r: Report =
                serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            reports.push(r);
        }
    }
    // Later runs of the same case replace earlier ones.
    reports.sort_by_key(|r| r.started_unix);
    let mut runs = Runs::default();
    for r in reports {
        runs.started = Some(runs.started.map_or(r.started_unix, |s| s.min(r.started_unix)));
        let kind = r.kind.clone().unwrap_or_default();
        let case = match &r.outcome {
            Outcome::P2p(p) if p.qos > 0 => "p2p-alo".to_owned(),
            Outcome::P2p(p) if paced_only(p) => floor::CASE.to_owned(),
            Outcome::P2p(_) => "p2p".to_owned(),
            Outcome::Group(g) if g.window > 1 => fanout::case(g.users),
            Outcome::Group(g) => format!("group:{}", g.users),
            Outcome::Conns(c) => format!("conns:{}", c.n),
            _ => String::new(),
        };
        let host = match kind.as_str() {
            "cim" => Some(""),
            auth::KIND => Some(" (auth on)"),
            alo::REDIS => Some(" (Redis)"),
            native::KIND => Some(" (native)"),
            _ => None,
        };
        if let Some(host) = host {
            runs.cim_failures.insert(format!("{case}{host}"), failures(&r.server_counters));
        }
        match r.outcome {
            Outcome::P2p(p) if p.qos > 0 => {
                runs.p2p_alo.insert(kind, p);
            }
            Outcome::P2p(p) if paced_only(&p) => {
                runs.p2p_paced.insert(kind, p);
            }
            Outcome::P2p(p) => {
                runs.p2p.insert(kind, p);
            }
            Outcome::Group(g) if g.window > 1 => {
                runs.group_unpaced.entry(g.users).or_default().insert(kind, g);
            }
            Outcome::Group(g) => {
                runs.group.entry(g.users).or_default().insert(kind, g);
            }
            Outcome::Idle(i) => {
                runs.idle.insert(kind, i);
            }
            Outcome::Conns(c) => {
                runs.conns.entry(c.n).or_default().insert(kind, c);
            }
            Outcome::Handler(h) => runs.handler = Some(h),
            Outcome::Smoke(_) => {}
        }
    }
    Ok(runs)
}

/// A p2p run with paced phases only (`--rate` without `--half-load`).
fn paced_only(p: &P2pReport) -> bool {
    !p.phases.is_empty() && p.phases.iter().all(|ph| ph.mode == "paced")
}

/// `YYYY-MM-DD HH:MM UTC` for a Unix time (Howard Hinnant's civil-from-days).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
    String::from_utf8_lossy(&text).lines().next().map(|l| l.trim().to_owned())
}

fn machine(versions: &[String]) -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "?".into());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or_else(|| "?".into(), |kib| format!("{:.1} GiB", kib / 1024.0 / 1024.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mut out = String::new();
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| cores (nproc) | {cores} |");
    let _ = writeln!(out, "| CPU | {model} |");
    let _ = writeln!(out, "| memory | {mem} |");
    let _ = writeln!(out, "| kernel | Linux {kernel} |");
    for v in versions {
        let (name, version) = v.split_once(' ').unwrap_or((v, ""));
        let _ = writeln!(out, "| {name} | {version} |");
    }
    if let Some(rustc) = first_line("rustc", &["--version"]) {
        let _ = writeln!(out, "| compiler | {rustc} |");
    }
    if let Some(commit) = first_line("git", &["rev-parse", "--short", "HEAD"]) {
        let _ = writeln!(out, "| cim commit | {commit} (plus uncommitted changes, if any) |");
    }
    out
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        // A negative value (memory given back during a conns run) has no meaningful ratio.
        (Some(a), Some(b)) if a >= 0.0 && b > 0.0 => format!("{:.2}×", a / b),
        _ => "-".into(),
    }
}

/// One table row: a label, the value per kind, and cim's ratio to each peer.
fn row(out: &mut String, label: &str, values: [Option<f64>; 3], fmt: impl Fn(f64) -> String, ratios: bool) {
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), &fmt);
    let (r1, r2) = if ratios {
        (ratio(values[0], values[1]), ratio(values[0], values[2]))
    } else {
        ("".into(), "".into())
    };
    let _ = writeln!(
        out,
        "| {label} | {} | {} | {} | {r1} | {r2} |",
        cell(values[0]),
        cell(values[1]),
        cell(values[2])
    );
}

fn header(out: &mut String, first: &str) {
    let _ = writeln!(out, "| {first} | cim | Mosquitto | NATS | cim ÷ Mosquitto | cim ÷ NATS |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
}

fn per_kind<T>(map: &BTreeMap<String, T>, f: impl Fn(&T) -> Option<f64>) -> [Option<f64>; 3] {
    KINDS.map(|(k, _)| map.get(k).and_then(&f))
}

fn us(v: f64) -> String {
    if v >= 10_000.0 { format!("{:.1} ms", v / 1000.0) } else { format!("{v:.0} µs") }
}

fn paced(p: &P2pReport) -> Option<&P2pPhase> {
    p.phases.iter().find(|ph| ph.mode == "paced")
}

fn best_max(p: &P2pReport) -> Option<&P2pPhase> {
    // The unpaced phase closest to the median (its latencies go with the throughput quoted).
    let m = p.max_msgs_per_s?;
    p.phases
        .iter()
        .filter(|ph| ph.mode == "max")
        .min_by(|a, b| (a.msgs_per_s - m).abs().total_cmp(&(b.msgs_per_s - m).abs()))
}

fn p2p_section(runs: &Runs) -> String {
    let mut out = String::new();
    let Some(any) = runs.p2p.values().next() else {
        return "No p2p runs.\n".into();
    };
    let _ = writeln!(
        out,
        "{} sender → receiver pairs (one connection per user), {} messages per pair, {} B payloads, at \
         most {} messages per pair in flight (sent, not yet received). Throughput: messages delivered \
         per second, median of the unpaced runs. Half load: paced at 50% of that median; latency is \
         end to end (stamped just before the write, taken when the receiver reads it).\n",
        any.pairs, any.messages_per_pair, any.size, any.window
    );
    header(&mut out, "");
    let p = &runs.p2p;
    row(&mut out, "max msgs/s (median)", per_kind(p, |r| r.max_msgs_per_s), human, true);
    let _ = writeln!(
        out,
        "| unpaced runs, msgs/s | {} | | |",
        KINDS
            .map(|(k, _)| p.get(k).map_or_else(
                || "-".to_owned(),
                |r| r
                    .phases
                    .iter()
                    .filter(|ph| ph.mode == "max")
                    .map(|ph| human(ph.msgs_per_s))
                    .collect::<Vec<_>>()
                    .join(" / ")
            ))
            .join(" | ")
    );
    row(&mut out, "latency at max: p50", per_kind(p, |r| best_max(r).map(|ph| ph.latency.p50_us)), us, true);
    row(&mut out, "latency at max: p99", per_kind(p, |r| best_max(r).map(|ph| ph.latency.p99_us)), us, true);
    row(
        &mut out,
        "server CPU at max, cores",
        per_kind(p, |r| best_max(r).and_then(|ph| ph.cpu.server_cores)),
        |v| format!("{v:.2}"),
        false,
    );
    row(
        &mut out,
        "cim-bench CPU at max, cores",
        per_kind(p, |r| best_max(r).and_then(|ph| ph.cpu.bench_cores)),
        |v| format!("{v:.2}"),
        false,
    );
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
    row(
        &mut out,
        "half load: server CPU, cores",
        per_kind(p, |r| paced(r).and_then(|ph| ph.cpu.server_cores)),
        |v| format!("{v:.2}"),
        false,
    );
    row(
        &mut out,
        "lost + errors (all phases)",
        per_kind(p, |r| Some(r.phases.iter().map(|ph| ph.lost + ph.errors).sum::<u64>() as f64)),
        |v| format!("{v:.0}"),
        false,
    );
    note_failures(&mut out, runs, "p2p");
    let _ = writeln!(
        out,
        "\nRatios: for throughput higher is better for cim; for latency lower is better for cim."
    );
    out
}

fn group_section(runs: &Runs) -> String {
    let mut out = String::new();
    if runs.group.is_empty() {
        return "No group runs.\n".into();
    }
    for (users, by) in &runs.group {
        let any = by.values().next();
        let _ = writeln!(
            out,
            "### {users} recipients\n\nOne sender, {users} recipients online (one connection each), {} group \
             messages of {} B, {} in flight at a time. Fan-out latency: from the send until the last \
             recipient has the message.\n",
            any.map_or(0, |g| g.messages),
            any.map_or(0, |g| g.size),
            any.map_or(0, |g| g.window)
        );
        header(&mut out, "");
        row(&mut out, "deliveries/s", per_kind(by, |g| Some(g.deliveries_per_s)), human, true);
        row(
            &mut out,
            "fan-out p50",
            per_kind(by, |g| (g.fanout.count > 0).then_some(g.fanout.p50_us)),
            us,
            true,
        );
        row(
            &mut out,
            "fan-out p99",
            per_kind(by, |g| (g.fanout.count > 0).then_some(g.fanout.p99_us)),
            us,
            true,
        );
        row(
            &mut out,
            "fan-out max",
            per_kind(by, |g| (g.fanout.count > 0).then_some(g.fanout.max_us)),
            us,
            true,
        );
        row(&mut out, "per delivery p50", per_kind(by, |g| Some(g.delivery.p50_us)), us, true);
        row(&mut out, "per delivery p99", per_kind(by, |g| Some(g.delivery.p99_us)), us, true);
        row(
            &mut out,
            "server CPU, cores",
            per_kind(by, |g| g.cpu.server_cores),
            |v| format!("{v:.2}"),
            false,
        );
        row(
            &mut out,
            "cim-bench CPU, cores",
            per_kind(by, |g| g.cpu.bench_cores),
            |v| format!("{v:.2}"),
            false,
        );
        row(
            &mut out,
            "connect + subscribe all, s",
            per_kind(by, |g| Some(g.connect_s)),
            |v| format!("{v:.2}"),
            false,
        );
        row(
            &mut out,
            "missing deliveries + errors",
            per_kind(by, |g| {
                Some((g.expected_deliveries - g.deliveries.min(g.expected_deliveries) + g.errors) as f64)
            }),
            |v| format!("{v:.0}"),
            false,
        );
        note_failures(&mut out, runs, &format!("group:{users}"));
        out.push('\n');
    }
    out
}

fn note_failures(out: &mut String, runs: &Runs, case: &str) {
    if let Some(f) = runs.cim_failures.get(case).filter(|f| !f.is_empty()) {
        let _ = writeln!(out, "\ncim's own counters grew during this case: {f} (see Observations).");
    }
}

fn conns_section(runs: &Runs) -> String {
    let mut out = String::new();
    if runs.conns.is_empty() {
        return "No conns runs.\n".into();
    }
    for (n, by) in &runs.conns {
        let _ = writeln!(
            out,
            "### {n} connections\n\nOpened and logged in (cim: route `POST /login` + TCP LOGIN; MQTT: \
             CONNECT; NATS: CONNECT + PING) {} at a time, held 2 s, then closed, on a fresh server \
             (before any message run). Memory: the server's VmRSS while held minus before, per \
             connection.\n",
            by.values().next().map_or(0, |c| c.concurrency)
        );
        header(&mut out, "");
        row(&mut out, "connections/s", per_kind(by, |c| Some(c.conns_per_s)), human, true);
        row(
            &mut out,
            "RSS per connection",
            per_kind(by, |c| c.bytes_per_conn),
            |b| format!("{:.1} KiB", b / 1024.0),
            true,
        );
        let mib = |v: f64| format!("{:.1} MiB", v / 1024.0);
        row(&mut out, "RSS before", per_kind(by, |c| c.rss_before_kib.map(|v| v as f64)), mib, false);
        row(&mut out, "RSS held", per_kind(by, |c| c.rss_held_kib.map(|v| v as f64)), mib, false);
        row(
            &mut out,
            "RSS after closing",
            per_kind(by, |c| c.rss_after_close_kib.map(|v| v as f64)),
            mib,
            false,
        );
        row(&mut out, "failed", per_kind(by, |c| Some(c.failed as f64)), |v| format!("{v:.0}"), false);
        out.push('\n');
    }
    out
}

fn handler_section(runs: &Runs) -> String {
    let Some(h) = &runs.handler else {
        return "No handler run.\n".into();
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "The components of `{}` in the host's runtime (pooling allocator, fresh instance per call), \
         called {} times per kind one after another, in process: instantiate + call + drop, on the \
         caller's thread (a call that runs past its first epoch tick moves to the runtime's \
         `cim-wasm` threads). Batched: one call with {} requests (the message kinds take a list), \
         per message.\n",
        h.manifest, h.calls, h.batch
    );
    let _ = writeln!(out, "| event | component | p50 | p90 | p99 | max | batched, per message (p50) |");
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for k in &h.kinds {
        let per = k
            .batched
            .map_or_else(|| "-".to_owned(), |b| format!("{:.2} µs", b.p50_us / h.batch.max(1) as f64));
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} µs | {:.1} µs | {:.1} µs | {:.0} µs | {per} |",
            k.event, k.component, k.single.p50_us, k.single.p90_us, k.single.p99_us, k.single.max_us
        );
    }
    out
}

/// The whole document.
pub fn render(
    dir: &Path,
    command: &str,
    observations: Option<&Path>,
    versions: &[String],
) -> anyhow::Result<String> {
    let runs = load(dir)?;
    let date = utc(runs.started.unwrap_or(0));
    let mut out = String::new();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "cim next to Mosquitto (MQTT, QoS 0) and NATS with the same workload, driven by `cim-bench` \
         (one user = one connection on every target; the load generator runs on the same machine); \
         at least once, cim's durable log next to Mosquitto QoS 1 with persistence and NATS JetStream. \
         Measured {date}, generated by `cim-bench report` from the runs of:\n\n```sh\n{command}\n```\n\n\
         One machine, one run: compare ratios rather than absolutes, and expect ±10–20% between runs \
         (see shared notes on noise). The generator shares the two cores with the server under test, \
         so every number here includes its cost.\n"
    );
    let _ = writeln!(out, "## Machine\n\n{}", machine(versions));
    let _ = writeln!(out, "## Goals\n\n{}", goals::goals(&runs));
    let _ = writeln!(out, "## Point to point\n\n{}", p2p_section(&runs));
    let _ = writeln!(out, "### Latency floor\n\n{}", floor::section(&runs));
    let _ = writeln!(out, "## At least once\n\n{}", alo::section(&runs));
    let _ = writeln!(out, "## Group fan-out\n\n{}", group_section(&runs));
    out.push_str(&fanout::section(&runs));
    let _ = writeln!(out, "## Fresh server: idle CPU and memory per connection\n\n{}", fresh::section(&runs));
    let _ = writeln!(out, "## Idle connections\n\n{}", conns_section(&runs));
    let _ = writeln!(out, "## Handler overhead\n\n{}", handler_section(&runs));
    let _ = writeln!(out, "## WASM tax: native handlers\n\n{}", native::section(&runs));
    let _ = writeln!(out, "## Authentication on\n\n{}", auth::section(&runs));
    if let Some(path) = observations {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let _ = writeln!(out, "## Observations\n\n{}", text.trim_end());
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "## Reproduce\n\n```sh\nbench/compare.sh            # everything above, ~9 minutes on 2 cores\n\
         cargo run --release -p cim-bench -- --help   # one scenario at a time, any target\n```"
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_767_225_600), "2026-01-01 00:00 UTC");
        assert_eq!(utc(951_782_400 + 3_660), "2000-02-29 01:01 UTC");
    }

    #[test]
    fn renders_whatever_reports_there_are() -> anyhow::Result<()> {
        let dir = std::env::temp_dir().join(format!("cim-bench-report-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let report = |kind: &str, outcome: Outcome| Report {
            tool: "cim-bench test".into(),
            target: None,
            kind: Some(kind.into()),
            started_unix: 1_767_225_600,
            server_counters: None,
            outcome,
        };
        let idle = IdleReport {
            server_pid: 1,
            secs: 10.0,
            elapsed_s: 10.0,
            cpu_s: 0.03,
            server_cores: 0.003,
            max_cores: Some(0.01),
            samples: 11,
            rss_kib: Some(30_000),
        };
        let files = [
            ("idle-cim.json", report("cim", Outcome::Idle(idle))),
            ("p2p-floor-cim.json", report("cim", Outcome::P2p(fixtures::floor(80.0, 0.05)))),
            ("p2p-floor-cim-native.json", report(native::KIND, Outcome::P2p(fixtures::floor(50.0, 0.03)))),
            ("fanout-nats.json", report("nats", Outcome::Group(fixtures::group(200, 32, 1e6)))),
        ];
        for (name, r) in &files {
            std::fs::write(dir.join(name), serde_json::to_string(r)?)?;
        }
        let doc = render(&dir, "bench/compare.sh", None, &[]);
        std::fs::remove_dir_all(&dir)?;
        let doc = doc?;
        for want in [
            "No p2p runs.",
            "### Latency floor\n\n1 sender → receiver pair(s)",
            "| p50 | 80 µs | 50 µs | - | - | - | - |",
            "### Unpaced fan-out: 200 recipients",
            "| idle CPU, % of one core | 0.30% | - | - | - | - | - |",
            "| latency floor: p50 | 80 µs | 50 µs | 1.60× |",
            "No group runs.",
            "No runs with authentication on",
        ] {
            assert!(doc.contains(want), "{want:?} missing from:\n{doc}");
        }
        Ok(())
    }

    #[test]
    fn ratios() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), "1.50×");
        assert_eq!(ratio(None, Some(2.0)), "-");
        assert_eq!(ratio(Some(1.0), Some(0.0)), "-");
        assert_eq!(ratio(Some(-1.0), Some(2.0)), "-");
    }
}
