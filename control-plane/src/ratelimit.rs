//! Per-source-address rate limiting (enrollment), a keyed GCRA limiter from `governor`.

use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Gov};
use std::net::IpAddr;
use std::num::NonZeroU32;

pub struct RateLimiter {
    inner: Gov<IpAddr, DefaultKeyedStateStore<IpAddr>, DefaultClock>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// `per_minute` sustained, `burst` at once; both at least 1.
    pub fn per_minute(per_minute: u32, burst: u32) -> RateLimiter {
        let rate = NonZeroU32::new(per_minute.max(1)).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst.max(1)).unwrap_or(NonZeroU32::MIN);
        RateLimiter {
            inner: Gov::keyed(Quota::per_minute(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// `Ok(())` when `ip` may go on, else the number of seconds to wait (for `Retry-After`, at least 1).
    pub fn check(&self, ip: IpAddr) -> Result<(), u64> {
        match self.inner.check_key(&ip) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Err(secs.max(1))
            }
        }
    }

    /// Drops state of addresses that are back to a full bucket.
    pub fn housekeep(&self) {
        self.inner.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refusal_with_retry_after() {
        let rl = RateLimiter::per_minute(1, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(rl.check(ip).is_ok());
        assert!(rl.check(ip).is_ok());
        let wait = rl.check(ip).unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(rl.check(other).is_ok(), "limits are per address");
    }
}
