//! Rate limits per caller identity and per source IP (GCRA, from `governor`): a steady
//! rate with a burst allowance, answered with how long to wait.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// One limit: `rate` requests per second on average, up to `burst` at once. A rate of
/// zero turns the limit off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Sustained requests per second.
    pub rate: f64,
    /// Requests allowed at once.
    pub burst: u32,
}

impl Limit {
    /// No limit.
    pub const OFF: Limit = Limit {
        rate: 0.0,
        burst: 0,
    };

    fn quota(self) -> Option<Quota> {
        if self.rate <= 0.0 || !self.rate.is_finite() {
            return None;
        }
        let period = Duration::try_from_secs_f64(1.0 / self.rate)
            .ok()?
            .max(Duration::from_nanos(1));
        let burst = NonZeroU32::new(self.burst.max(1))?;
        Quota::with_period(period).map(|q| q.allow_burst(burst))
    }
}

/// The limits, as configured (`[limits]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Per verified identity key, every authenticated call.
    pub identity: Limit,
    /// Per source IP, before anything else is looked at.
    pub source_ip: Limit,
    /// Per source IP, requests whose caller could not be identified (no, bad or
    /// unverifiable token; a malformed request): past it the source is refused before
    /// anything is looked at, and nothing is audited, until its allowance returns.
    pub unidentified: Limit,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            identity: Limit {
                rate: 20.0,
                burst: 40,
            },
            source_ip: Limit {
                rate: 200.0,
                burst: 400,
            },
            unidentified: Limit {
                rate: 1.0,
                burst: 30,
            },
        }
    }
}

/// Too many requests: retry after this long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// How long until one more request is allowed.
    pub retry_after: Duration,
}

impl Exceeded {
    /// Whole seconds to put in `Retry-After` (at least 1).
    pub fn retry_after_secs(&self) -> u64 {
        self.retry_after.as_secs_f64().ceil().max(1.0) as u64
    }
}

struct Keyed<K: Hash + Eq + Clone> {
    limit: Limit,
    limiter: Option<DefaultKeyedRateLimiter<K>>,
}

impl<K: Hash + Eq + Clone> Keyed<K> {
    fn new(limit: Limit) -> Keyed<K> {
        Keyed {
            limit,
            limiter: limit.quota().map(RateLimiter::keyed),
        }
    }

    fn check(&self, key: &K) -> Result<(), Exceeded> {
        let Some(l) = &self.limiter else {
            return Ok(());
        };
        l.check_key(key).map_err(|not_until| Exceeded {
            retry_after: not_until.wait_time_from(DefaultClock::default().now()),
        })
    }
}

/// The limiters of one broker. Reconfiguring (config reload) keeps the state of a limit
/// that did not change.
pub struct RateLimits {
    identity: RwLock<Arc<Keyed<String>>>,
    source_ip: RwLock<Arc<Keyed<IpAddr>>>,
    unidentified: RwLock<Arc<Keyed<IpAddr>>>,
    /// Sources over their unidentified allowance, until when they are refused.
    blocked: std::sync::Mutex<std::collections::HashMap<IpAddr, std::time::Instant>>,
    /// Whether `blocked` may hold anything: every request checks it, and it is almost
    /// always empty, so the lock is taken only when it is not.
    any_blocked: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimits")
            .field("limits", &self.limits())
            .finish()
    }
}

fn read<T: Clone>(l: &RwLock<T>) -> T {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

impl RateLimits {
    /// Limiters for `limits`.
    pub fn new(limits: Limits) -> RateLimits {
        RateLimits {
            identity: RwLock::new(Arc::new(Keyed::new(limits.identity))),
            source_ip: RwLock::new(Arc::new(Keyed::new(limits.source_ip))),
            unidentified: RwLock::new(Arc::new(Keyed::new(limits.unidentified))),
            blocked: std::sync::Mutex::new(std::collections::HashMap::new()),
            any_blocked: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> Limits {
        Limits {
            identity: read(&self.identity).limit,
            source_ip: read(&self.source_ip).limit,
            unidentified: read(&self.unidentified).limit,
        }
    }

    /// Applies new limits; a limit that changed starts from a clean slate.
    pub fn reconfigure(&self, limits: Limits) {
        if read(&self.identity).limit != limits.identity {
            *self.identity.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(Keyed::new(limits.identity));
        }
        if read(&self.source_ip).limit != limits.source_ip {
            *self.source_ip.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(Keyed::new(limits.source_ip));
        }
        if read(&self.unidentified).limit != limits.unidentified {
            *self.unidentified.write().unwrap_or_else(|e| e.into_inner()) =
                Arc::new(Keyed::new(limits.unidentified));
            self.blocked
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    /// Whether a source is refused for now, having spent its allowance of requests whose
    /// caller could not be identified. Costs a map lookup; checked before anything else.
    pub fn check_unidentified(&self, ip: IpAddr) -> Result<(), Exceeded> {
        if !self.any_blocked.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let key = crate::net::source_key(ip);
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let Some(until) = blocked.get(&key).copied() else {
            return Ok(());
        };
        let now = std::time::Instant::now();
        if until <= now {
            blocked.remove(&key);
            return Ok(());
        }
        Err(Exceeded {
            retry_after: until - now,
        })
    }

    /// Counts one request from `ip` whose caller could not be identified; past the
    /// allowance the source is refused (see [`RateLimits::check_unidentified`]) until one
    /// more is allowed. Answers whether this one was still within the allowance.
    pub fn charge_unidentified(&self, ip: IpAddr) -> bool {
        let key = crate::net::source_key(ip);
        match read(&self.unidentified).check(&key) {
            Ok(()) => true,
            Err(e) => {
                let until = std::time::Instant::now() + e.retry_after;
                self.blocked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, until);
                self.any_blocked
                    .store(true, std::sync::atomic::Ordering::Release);
                false
            }
        }
    }

    /// Counts one request by a verified identity.
    pub fn check_identity(&self, identity_key: &str) -> Result<(), Exceeded> {
        read(&self.identity).check(&identity_key.to_string())
    }

    /// Counts one request from a source address: an IPv4 address, or the IPv6 /64 it
    /// belongs to (one host's usual allocation, so a host cannot multiply its budget by
    /// changing the low bits of its address).
    pub fn check_source(&self, ip: IpAddr) -> Result<(), Exceeded> {
        read(&self.source_ip).check(&crate::net::source_key(ip))
    }

    /// Forgets callers whose allowance is full again, so the tables stay as small as the
    /// set of recently active callers.
    pub fn forget_idle(&self) {
        if let Some(l) = &read(&self.identity).limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &read(&self.source_ip).limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &read(&self.unidentified).limiter {
            l.retain_recent();
            l.shrink_to_fit();
        }
        let now = std::time::Instant::now();
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        blocked.retain(|_, until| *until > now);
        blocked.shrink_to_fit();
        if blocked.is_empty() {
            self.any_blocked
                .store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_with_a_wait_then_allowed_again() {
        let r = RateLimits::new(Limits {
            identity: Limit {
                rate: 50.0,
                burst: 3,
            },
            source_ip: Limit::OFF,
            unidentified: Limit::OFF,
        });
        for _ in 0..3 {
            r.check_identity("a").unwrap();
        }
        let e = r.check_identity("a").unwrap_err();
        assert!(e.retry_after > Duration::ZERO && e.retry_after <= Duration::from_millis(20));
        assert_eq!(e.retry_after_secs(), 1);
        r.check_identity("b")
            .expect("another identity has its own allowance");
        std::thread::sleep(e.retry_after + Duration::from_millis(5));
        r.check_identity("a").expect("allowed again after the wait");
        // Off means off.
        for _ in 0..1000 {
            r.check_source("127.0.0.1".parse().unwrap()).unwrap();
        }
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source() {
        let r = RateLimits::new(Limits {
            identity: Limit::OFF,
            source_ip: Limit {
                rate: 0.001,
                burst: 2,
            },
            unidentified: Limit::OFF,
        });
        r.check_source("2001:db8:1:2::1".parse().unwrap()).unwrap();
        r.check_source("2001:db8:1:2:ffff::9".parse().unwrap())
            .unwrap();
        assert!(
            r.check_source("2001:db8:1:2:abcd::1".parse().unwrap())
                .is_err(),
            "the /64 shares one budget"
        );
        r.check_source("2001:db8:1:3::1".parse().unwrap())
            .expect("another /64 has its own");
        r.check_source("192.0.2.1".parse().unwrap()).unwrap();
        r.check_source("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert!(
            r.check_source("192.0.2.1".parse().unwrap()).is_err(),
            "an IPv4-mapped address is its IPv4 address"
        );
    }

    #[test]
    fn reconfigure_keeps_unchanged_limits_and_applies_new_ones() {
        let r = RateLimits::new(Limits {
            identity: Limit {
                rate: 1.0,
                burst: 1,
            },
            source_ip: Limit::OFF,
            unidentified: Limit::OFF,
        });
        r.check_identity("a").unwrap();
        assert!(r.check_identity("a").is_err());
        r.reconfigure(r.limits());
        assert!(r.check_identity("a").is_err(), "same limit, same state");
        r.reconfigure(Limits {
            identity: Limit::OFF,
            source_ip: Limit::OFF,
            unidentified: Limit::OFF,
        });
        r.check_identity("a").unwrap();
        assert!(Limit {
            rate: f64::NAN,
            burst: 1
        }
        .quota()
        .is_none());
        r.forget_idle();
    }

    #[test]
    fn a_source_that_spends_its_unidentified_allowance_is_refused_until_it_returns() {
        let r = RateLimits::new(Limits {
            identity: Limit::OFF,
            source_ip: Limit::OFF,
            unidentified: Limit {
                rate: 20.0,
                burst: 2,
            },
        });
        let (a, a2, b) = (
            "2001:db8::1".parse().unwrap(),
            "2001:db8::2".parse().unwrap(),
            "192.0.2.7".parse().unwrap(),
        );
        r.check_unidentified(a).unwrap();
        assert!(r.charge_unidentified(a));
        assert!(r.charge_unidentified(a2), "same /64, same allowance");
        assert!(!r.charge_unidentified(a));
        let e = r.check_unidentified(a2).unwrap_err();
        assert!(e.retry_after <= Duration::from_millis(50), "{e:?}");
        r.check_unidentified(b)
            .expect("another source is not refused");
        std::thread::sleep(e.retry_after + Duration::from_millis(5));
        r.check_unidentified(a)
            .expect("refused only until one more is allowed");
        r.forget_idle();
        // Off means never refused.
        let off = RateLimits::new(Limits {
            identity: Limit::OFF,
            source_ip: Limit::OFF,
            unidentified: Limit::OFF,
        });
        for _ in 0..1000 {
            assert!(off.charge_unidentified(a));
        }
        off.check_unidentified(a).unwrap();
    }
}
