//! Abuse limits: token buckets (`governor`) per user and per client address on sends, online
//! requests and logins. Over the limit, a request is answered `RATE_LIMITED` with how long to
//! wait; the connection stays up.

use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

/// What a client is doing, each with its own buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A private or group send (a frame or an HTTP send made with a user token).
    Send,
    /// An online-list request.
    Online,
    /// A route login (`POST /login`) or a LOGIN frame.
    Login,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Send => "sends",
            Action::Online => "online requests",
            Action::Login => "logins",
        }
    }
}

/// A sustained rate with a burst: `RATE` per second, or `RATE:BURST`. `0` turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const OFF: Rate = Rate { per_second: 0, burst: 0 };

    pub const fn new(per_second: u32, burst: u32) -> Self {
        Rate { per_second, burst }
    }

    pub(crate) fn quota(self) -> Option<Quota> {
        let rate = NonZeroU32::new(self.per_second)?;
        let burst = NonZeroU32::new(self.burst.max(self.per_second))?;
        Some(Quota::per_second(rate).allow_burst(burst))
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (rate, burst) = match s.split_once(':') {
            Some((r, b)) => (r, Some(b)),
            None => (s, None),
        };
        let rate: u32 = rate
            .trim()
            .parse()
            .map_err(|_| format!("expected RATE or RATE:BURST (per second), got {s:?}"))?;
        let burst = match burst {
            Some(b) => b.trim().parse().map_err(|_| format!("bad burst in {s:?}"))?,
            None => rate.saturating_mul(2),
        };
        if rate != 0 && burst < rate {
            return Err(format!("the burst ({burst}) must be at least the rate ({rate})"));
        }
        Ok(Rate { per_second: rate, burst })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per_second == 0 {
            f.write_str("off")
        } else {
            write!(f, "{}/s (burst {})", self.per_second, self.burst)
        }
    }
}

/// The configured rates of one action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActionRates {
    pub per_user: Rate,
    pub per_ip: Rate,
}

/// Every configured rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateConfig {
    pub send: ActionRates,
    pub online: ActionRates,
    pub login: ActionRates,
}

impl Default for RateConfig {
    /// Far above what a person typing produces, low enough that one client cannot flood a node.
    fn default() -> Self {
        RateConfig {
            send: ActionRates { per_user: Rate::new(50, 200), per_ip: Rate::new(500, 2000) },
            online: ActionRates { per_user: Rate::new(2, 10), per_ip: Rate::new(20, 100) },
            login: ActionRates { per_user: Rate::new(2, 10), per_ip: Rate::new(20, 100) },
        }
    }
}

impl RateConfig {
    /// No limits at all (benchmarks, tests of other things).
    pub const OFF: RateConfig = RateConfig {
        send: ActionRates { per_user: Rate::OFF, per_ip: Rate::OFF },
        online: ActionRates { per_user: Rate::OFF, per_ip: Rate::OFF },
        login: ActionRates { per_user: Rate::OFF, per_ip: Rate::OFF },
    };
}

/// Over the limit: try again after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many {action} from this {scope}; retry in {} ms", retry_after.as_millis())]
pub struct Limited {
    pub action: &'static str,
    pub scope: &'static str,
    pub retry_after: Duration,
}

impl Limited {
    pub fn retry_after_ms(&self) -> u64 {
        u64::try_from(self.retry_after.as_millis()).unwrap_or(u64::MAX).max(1)
    }
}

struct Buckets {
    per_user: Option<DefaultKeyedRateLimiter<u64>>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
}

impl Buckets {
    fn new(rates: ActionRates) -> Self {
        Buckets {
            per_user: rates.per_user.quota().map(DefaultKeyedRateLimiter::keyed),
            per_ip: rates.per_ip.quota().map(DefaultKeyedRateLimiter::keyed),
        }
    }
}

/// The node's rate limiters.
pub struct RateLimits {
    config: RateConfig,
    send: Buckets,
    online: Buckets,
    login: Buckets,
    clock: DefaultClock,
}

impl fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimits").field("config", &self.config).finish_non_exhaustive()
    }
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits::new(RateConfig::default())
    }
}

impl RateLimits {
    pub fn new(config: RateConfig) -> Self {
        RateLimits {
            config,
            send: Buckets::new(config.send),
            online: Buckets::new(config.online),
            login: Buckets::new(config.login),
            clock: DefaultClock::default(),
        }
    }

    pub fn config(&self) -> &RateConfig {
        &self.config
    }

    /// Takes one token from the user's bucket (when the user is known) and the address's
    /// bucket for `action`; `Err` says how long to wait. A refused request does not spend a
    /// token from the other bucket.
    pub fn check(&self, action: Action, user: Option<u64>, ip: Option<IpAddr>) -> Result<(), Limited> {
        let buckets = match action {
            Action::Send => &self.send,
            Action::Online => &self.online,
            Action::Login => &self.login,
        };
        let limited = |scope, retry_after| Limited { action: action.as_str(), scope, retry_after };
        if let (Some(limiter), Some(user)) = (&buckets.per_user, user) {
            take(limiter, &user, &self.clock).map_err(|d| limited("user", d))?;
        }
        if let (Some(limiter), Some(ip)) = (&buckets.per_ip, ip) {
            take(limiter, &ip, &self.clock).map_err(|d| limited("address", d))?;
        }
        Ok(())
    }

    /// Forgets buckets that are full again, so the maps do not grow with every user and
    /// address ever seen. Call it now and then (the node does every minute).
    pub fn forget_idle(&self) {
        for b in [&self.send, &self.online, &self.login] {
            if let Some(l) = &b.per_user {
                l.retain_recent();
                l.shrink_to_fit();
            }
            if let Some(l) = &b.per_ip {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
    }
}

fn take<K: Hash + Eq + Clone>(
    limiter: &DefaultKeyedRateLimiter<K>,
    key: &K,
    clock: &DefaultClock,
) -> Result<(), Duration> {
    limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(clock.now()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rates() {
        assert_eq!("10".parse::<Rate>().unwrap(), Rate::new(10, 20));
        assert_eq!("10:15".parse::<Rate>().unwrap(), Rate::new(10, 15));
        assert_eq!("0".parse::<Rate>().unwrap(), Rate::OFF);
        assert!("10:5".parse::<Rate>().is_err());
        assert!("fast".parse::<Rate>().is_err());
    }

    #[test]
    fn a_user_over_the_burst_is_told_when_to_retry() {
        let rates = ActionRates { per_user: Rate::new(1, 3), per_ip: Rate::OFF };
        let limits = RateLimits::new(RateConfig { send: rates, ..RateConfig::OFF });
        for _ in 0..3 {
            limits.check(Action::Send, Some(1), None).unwrap();
        }
        let err = limits.check(Action::Send, Some(1), None).unwrap_err();
        assert_eq!(err.scope, "user");
        assert!(err.retry_after > Duration::ZERO && err.retry_after <= Duration::from_secs(1), "{err:?}");
        assert!(err.to_string().contains("too many sends"), "{err}");
        // Another user, and another action, have their own buckets.
        limits.check(Action::Send, Some(2), None).unwrap();
        limits.check(Action::Online, Some(1), None).unwrap();
    }

    #[test]
    fn addresses_are_limited_across_users() {
        let rates = ActionRates { per_user: Rate::OFF, per_ip: Rate::new(1, 2) };
        let limits = RateLimits::new(RateConfig { login: rates, ..RateConfig::OFF });
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        limits.check(Action::Login, Some(1), Some(ip)).unwrap();
        limits.check(Action::Login, Some(2), Some(ip)).unwrap();
        assert_eq!(limits.check(Action::Login, Some(3), Some(ip)).unwrap_err().scope, "address");
        limits.check(Action::Login, Some(3), Some("10.0.0.2".parse().unwrap())).unwrap();
        limits.forget_idle();
    }
}
