//! The reconnect schedule: exponential backoff with jitter, bounded by [`ReconnectPolicy`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::ReconnectPolicy;

/// Yields the delay before each reconnect attempt: `initial_delay` doubling up to `max_delay`,
/// each delay drawn uniformly from its upper half so that clients dropped at the same moment
/// do not all come back at the same moment.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    policy: ReconnectPolicy,
    /// Attempts handed out so far.
    attempt: u32,
    /// State of the jitter generator; no `rand` dependency needed for this.
    seed: u64,
}

impl Backoff {
    pub(crate) fn new(policy: ReconnectPolicy, seed: u64) -> Self {
        Backoff { policy, attempt: 0, seed }
    }

    /// A seed that differs between users and between runs.
    pub(crate) fn seed_for(user_id: u64) -> u64 {
        let nanos =
            SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or_default();
        nanos ^ user_id.rotate_left(32)
    }

    /// The next attempt number (from 1) and the delay to wait before it,
    /// or `None` once `max_attempts` attempts were handed out.
    pub(crate) fn next_attempt(&mut self) -> Option<(u32, Duration)> {
        if self.policy.max_attempts.is_some_and(|max| self.attempt >= max) {
            return None;
        }
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = self.ceiling(self.attempt);
        let half = ceiling / 2;
        let spread = (ceiling - half).as_nanos() as u64;
        let jitter = if spread == 0 { 0 } else { splitmix64(&mut self.seed) % (spread + 1) };
        Some((self.attempt, half + Duration::from_nanos(jitter)))
    }

    /// The delay without jitter for `attempt` (from 1): `initial_delay * 2^(attempt-1)`,
    /// at most `max_delay`.
    fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.policy
            .initial_delay
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.policy.max_delay)
            .min(self.policy.max_delay)
    }
}

/// One step of the SplitMix64 generator: fast, and good enough for jitter.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: Option<u32>) -> ReconnectPolicy {
        ReconnectPolicy {
            max_attempts,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
        }
    }

    #[test]
    fn delays_double_up_to_the_cap_and_stay_in_the_upper_half() {
        let expected_ceilings = [100u64, 200, 400, 800, 1600, 3200, 5000, 5000, 5000];
        for seed in [0, 1, 42, u64::MAX] {
            let mut backoff = Backoff::new(policy(None), seed);
            for (i, ceiling) in expected_ceilings.iter().enumerate() {
                let (attempt, delay) = backoff.next_attempt().unwrap();
                assert_eq!(attempt as usize, i + 1);
                let ceiling = Duration::from_millis(*ceiling);
                assert!(delay >= ceiling / 2 && delay <= ceiling, "attempt {attempt}: {delay:?}");
            }
        }
    }

    #[test]
    fn gives_up_after_max_attempts() {
        let mut backoff = Backoff::new(policy(Some(3)), 7);
        assert_eq!(backoff.next_attempt().map(|a| a.0), Some(1));
        assert_eq!(backoff.next_attempt().map(|a| a.0), Some(2));
        assert_eq!(backoff.next_attempt().map(|a| a.0), Some(3));
        assert_eq!(backoff.next_attempt(), None);
        assert_eq!(Backoff::new(policy(Some(0)), 7).next_attempt(), None);
    }

    #[test]
    fn never_gives_up_without_a_limit_and_never_overflows() {
        let mut backoff = Backoff::new(policy(None), 7);
        backoff.attempt = u32::MAX - 1;
        for _ in 0..3 {
            let (_, delay) = backoff.next_attempt().unwrap();
            assert!(delay <= Duration::from_secs(5));
        }
    }

    #[test]
    fn jitter_differs_between_seeds() {
        let delays = |seed| {
            let mut backoff = Backoff::new(policy(None), seed);
            (0..8).map(|_| backoff.next_attempt().unwrap().1).collect::<Vec<_>>()
        };
        assert_ne!(delays(1), delays(2));
        assert_eq!(delays(3), delays(3));
    }
}
