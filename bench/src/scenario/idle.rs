//! An idle server: no clients, only its own timers. Samples the server's user + system CPU
//! time (`/proc/PID/stat`) about once a second for `duration` and reports the average and
//! the busiest interval, in cores, and its resident memory at the start.

use std::time::{Duration, Instant};

use anyhow::Context as _;

use crate::report::IdleReport;
use crate::stats::{cpu_secs, rss_kib};

/// Longest time between two samples.
const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct IdleArgs {
    pub server_pid: u32,
    pub duration: Duration,
}

/// One reading: seconds since the first, the server's CPU seconds so far.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Sample {
    at_s: f64,
    cpu_s: f64,
}

/// CPU seconds used over the samples, the average in cores and the busiest interval's.
fn summarize(samples: &[Sample]) -> Option<(f64, f64, Option<f64>)> {
    let (first, last) = (samples.first()?, samples.last()?);
    let elapsed = last.at_s - first.at_s;
    if elapsed <= 0.0 {
        return None;
    }
    let cpu = (last.cpu_s - first.cpu_s).max(0.0);
    let busiest = samples
        .windows(2)
        .filter(|w| w[1].at_s > w[0].at_s)
        .map(|w| ((w[1].cpu_s - w[0].cpu_s) / (w[1].at_s - w[0].at_s)).max(0.0))
        .reduce(f64::max);
    Some((cpu, cpu / elapsed, busiest))
}

pub async fn run(args: &IdleArgs) -> anyhow::Result<IdleReport> {
    let pid = args.server_pid;
    let read = || cpu_secs(Some(pid)).with_context(|| format!("reading /proc/{pid}/stat"));
    let rss = rss_kib(pid);
    let start = Instant::now();
    let mut samples = vec![Sample { at_s: 0.0, cpu_s: read()? }];
    let end = start + args.duration;
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        tokio::time::sleep_until((now + INTERVAL.min(end - now)).into()).await;
        samples.push(Sample { at_s: start.elapsed().as_secs_f64(), cpu_s: read()? });
    }
    let (cpu_s, server_cores, max_cores) =
        summarize(&samples).context("the idle measurement needs a duration above zero")?;
    Ok(IdleReport {
        server_pid: pid,
        secs: args.duration.as_secs_f64(),
        elapsed_s: samples.last().map_or(0.0, |s| s.at_s),
        cpu_s,
        server_cores,
        max_cores,
        samples: samples.len(),
        rss_kib: rss,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(at_s: f64, cpu_s: f64) -> Sample {
        Sample { at_s, cpu_s }
    }

    #[test]
    fn average_and_busiest_interval() {
        let (cpu, cores, busiest) =
            summarize(&[s(0.0, 1.00), s(1.0, 1.01), s(2.0, 1.05), s(4.0, 1.06)]).unwrap();
        assert!((cpu - 0.06).abs() < 1e-9, "{cpu}");
        assert!((cores - 0.015).abs() < 1e-9, "{cores}");
        assert!((busiest.unwrap() - 0.04).abs() < 1e-9, "{busiest:?}");
    }

    #[test]
    fn no_time_no_answer() {
        assert!(summarize(&[]).is_none());
        assert!(summarize(&[s(0.0, 1.0)]).is_none());
    }

    #[tokio::test]
    async fn measures_a_live_process() {
        let args = IdleArgs { server_pid: std::process::id(), duration: Duration::from_millis(300) };
        let r = run(&args).await.unwrap();
        assert_eq!(r.samples, 2, "{r:?}");
        assert!(r.elapsed_s >= 0.3 && r.server_cores >= 0.0, "{r:?}");
        assert!(r.rss_kib.is_some_and(|k| k > 0), "{r:?}");
    }

    #[tokio::test]
    async fn a_missing_process_is_an_error() {
        let args = IdleArgs { server_pid: u32::MAX, duration: Duration::from_millis(10) };
        assert!(run(&args).await.is_err());
    }
}
