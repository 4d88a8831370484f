//! Per-client quotas on what a client can make every instance spend: writes
//! (HTTP and WebSocket mutations alike) and new rooms, as token buckets keyed
//! by the client's address.
//!
//! The buckets live in each instance, not in Redis: a shared bucket would put
//! a Redis round trip in front of every write, and behind a balancer that
//! spreads one client over N instances a client gets at most N times its
//! quota, which still bounds it. Idle buckets are dropped by [`Quotas::prune`],
//! so addresses that come and go (or are spoofed) do not pile up.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// Quota settings (see the README's configuration table).
#[derive(Debug, Clone, Copy)]
pub struct QuotaConfig {
    /// Mutations per second per client address, sustained...
    pub writes_per_second: u32,
    /// ...with bursts of this many.
    pub write_burst: u32,
    /// New rooms per minute per client address (also the burst).
    pub rooms_per_minute: u32,
}

/// A refusal: the client may try again after `retry_after`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds for a `Retry-After` header, at least one.
    pub fn retry_after_secs(&self) -> u64 {
        (self.retry_after.as_secs_f64().ceil() as u64).max(1)
    }
}

pub struct Quotas {
    writes: DefaultKeyedRateLimiter<IpAddr>,
    rooms: DefaultKeyedRateLimiter<IpAddr>,
    clock: DefaultClock,
}

fn at_least_one(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl Quotas {
    pub fn new(config: QuotaConfig, clock: DefaultClock) -> Self {
        let writes = Quota::per_second(at_least_one(config.writes_per_second))
            .allow_burst(at_least_one(config.write_burst));
        let rooms = Quota::per_minute(at_least_one(config.rooms_per_minute));
        Quotas {
            writes: RateLimiter::dashmap_with_clock(writes, clock.clone()),
            rooms: RateLimiter::dashmap_with_clock(rooms, clock.clone()),
            clock,
        }
    }

    /// Takes one write from the client's bucket.
    pub fn write(&self, client: IpAddr) -> Result<(), RateLimited> {
        self.take(&self.writes, client)
    }

    /// Takes one new room from the client's bucket.
    pub fn create_room(&self, client: IpAddr) -> Result<(), RateLimited> {
        self.take(&self.rooms, client)
    }

    fn take(
        &self,
        limiter: &DefaultKeyedRateLimiter<IpAddr>,
        client: IpAddr,
    ) -> Result<(), RateLimited> {
        limiter.check_key(&client).map_err(|not_until| RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
        })
    }

    /// Forgets the buckets that are full again (clients idle long enough), and
    /// gives their memory back.
    pub fn prune(&self) {
        for limiter in [&self.writes, &self.rooms] {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Buckets held (for tests and metrics).
    pub fn len(&self) -> usize {
        self.writes.len() + self.rooms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_has_its_own_buckets() {
        let quotas = Quotas::new(
            QuotaConfig {
                writes_per_second: 1,
                write_burst: 3,
                rooms_per_minute: 2,
            },
            DefaultClock::default(),
        );
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        for _ in 0..3 {
            assert!(quotas.write(a).is_ok());
        }
        let refused = quotas.write(a).expect_err("the burst is used up");
        assert!(refused.retry_after <= Duration::from_secs(1));
        assert!(refused.retry_after_secs() >= 1);
        assert!(quotas.write(b).is_ok(), "another address is not affected");
        assert!(quotas.create_room(a).is_ok());
        assert!(quotas.create_room(a).is_ok());
        let refused = quotas.create_room(a).expect_err("two rooms a minute");
        assert!(refused.retry_after_secs() >= 1 && refused.retry_after_secs() <= 30);
    }
}
