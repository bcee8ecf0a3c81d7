//! A rate limit on guest log lines, per component (a `governor` token bucket keyed by the
//! component's name), so a component logging in a loop cannot flood the host's log. Lines
//! over the limit are counted, not written; the next line let through is preceded by one
//! line saying how many were dropped.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};

use governor::DefaultKeyedRateLimiter;

use crate::limits::Rate;

/// Whether a log line may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Write it, after a summary of the `dropped` lines before it if there were any.
    Write { dropped: u64 },
    /// Over the limit: counted and not written.
    Drop,
}

/// The log buckets of every component of a runtime.
pub(crate) struct LogLimiter {
    /// `None`: no limit.
    buckets: Option<DefaultKeyedRateLimiter<Arc<str>>>,
    /// Lines dropped per component since its last written line.
    dropped: Mutex<HashMap<Arc<str>, u64>>,
}

impl fmt::Debug for LogLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogLimiter").field("limited", &self.buckets.is_some()).finish_non_exhaustive()
    }
}

impl LogLimiter {
    pub(crate) fn new(rate: Rate) -> Self {
        LogLimiter { buckets: rate.quota().map(DefaultKeyedRateLimiter::keyed), dropped: Mutex::default() }
    }

    /// Takes a token from `component`'s bucket for one line.
    pub(crate) fn admit(&self, component: &Arc<str>) -> Admit {
        let Some(buckets) = &self.buckets else { return Admit::Write { dropped: 0 } };
        // A poisoned map only holds counters: still fine to use.
        let mut dropped = self.dropped.lock().unwrap_or_else(|e| e.into_inner());
        if buckets.check_key(component).is_ok() {
            Admit::Write { dropped: dropped.remove(component).unwrap_or(0) }
        } else {
            *dropped.entry(component.clone()).or_default() += 1;
            Admit::Drop
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn a_burst_then_drops_then_one_summary() {
        let limiter = LogLimiter::new(Rate::new(20, 20));
        let (noisy, quiet): (Arc<str>, Arc<str>) = ("noisy".into(), "quiet".into());
        for _ in 0..20 {
            assert_eq!(limiter.admit(&noisy), Admit::Write { dropped: 0 });
        }
        // Dropped and counted until the bucket lets one through again (50 ms at 20/s); that
        // line carries the count.
        let (mut dropped, deadline) = (0, Instant::now() + Duration::from_secs(5));
        let summary = loop {
            match limiter.admit(&noisy) {
                Admit::Drop => dropped += 1,
                Admit::Write { dropped: n } => break n,
            }
            assert!(Instant::now() < deadline, "never let through again");
        };
        assert!(dropped > 0 && summary == dropped, "summary {summary}, dropped {dropped}");
        assert_eq!(limiter.admit(&noisy), Admit::Drop, "the summary is said once");
        assert_eq!(limiter.admit(&quiet), Admit::Write { dropped: 0 }, "buckets are per component");
        let off = LogLimiter::new(Rate::OFF);
        assert!((0..10_000).all(|_| off.admit(&noisy) == Admit::Write { dropped: 0 }));
    }
}
