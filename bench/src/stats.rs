//! Latency histograms (`hdrhistogram`, nanoseconds) and their summary in microseconds, plus
//! what `/proc` says about a process: resident memory and CPU time.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Highest latency recorded; anything above is clamped (a minute is a broken run anyway).
const MAX_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds, three significant digits.
pub fn histogram() -> Histogram<u64> {
    // Bounds are constants that hdrhistogram accepts.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1, MAX_NS, 3).unwrap()
}

/// A histogram many tasks record into (one per receiver keeps the lock uncontended).
#[derive(Debug)]
pub struct Recorder(Mutex<Histogram<u64>>);

impl Default for Recorder {
    fn default() -> Self {
        Recorder(Mutex::new(histogram()))
    }
}

impl Recorder {
    pub fn record(&self, ns: u64) {
        if let Ok(mut h) = self.0.lock() {
            h.saturating_record(ns.clamp(1, MAX_NS));
        }
    }

    pub fn reset(&self) {
        if let Ok(mut h) = self.0.lock() {
            h.reset();
        }
    }

    /// Adds this histogram into `into`.
    pub fn merge_into(&self, into: &mut Histogram<u64>) {
        if let Ok(h) = self.0.lock() {
            let _ = into.add(&*h);
        }
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Latency {
        if h.is_empty() {
            return Latency::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            count: h.len(),
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// Resident memory of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// User + system CPU time of a process in seconds (`/proc/<pid>/stat`, fields 14 and 15;
/// the kernel's clock tick is 100 Hz on every Linux we run on).
pub fn cpu_secs(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_owned(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces: count fields after its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// CPU used by the server and by this process over an interval, in cores.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    server_pid: Option<u32>,
    server0: Option<f64>,
    self0: Option<f64>,
    start: std::time::Instant,
}

/// Average cores used during a run (`None` when unknown).
#[derive(Debug, Clone, Copy, Default, Serialize, serde::Deserialize)]
pub struct CpuUse {
    pub server_cores: Option<f64>,
    pub bench_cores: Option<f64>,
}

impl CpuMeter {
    pub fn start(server_pid: Option<u32>) -> CpuMeter {
        CpuMeter {
            server_pid,
            server0: server_pid.and_then(|p| cpu_secs(Some(p))),
            self0: cpu_secs(None),
            start: std::time::Instant::now(),
        }
    }

    pub fn stop(&self) -> CpuUse {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let server = match (self.server_pid, self.server0) {
            (Some(p), Some(s0)) => cpu_secs(Some(p)).map(|s1| (s1 - s0) / wall),
            _ => None,
        };
        let bench = self.self0.and_then(|s0| cpu_secs(None).map(|s1| (s1 - s0) / wall));
        CpuUse { server_cores: server, bench_cores: bench }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_in_microseconds() {
        let r = Recorder::default();
        for us in 1..=100u64 {
            r.record(us * 1000);
        }
        let mut h = histogram();
        r.merge_into(&mut h);
        let l = Latency::of(&h);
        assert_eq!(l.count, 100);
        assert!((l.p50_us - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.max_us - 100.0).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn own_process_is_readable() {
        assert!(rss_kib(std::process::id()).is_some_and(|k| k > 0));
        assert!(cpu_secs(None).is_some());
    }
}
