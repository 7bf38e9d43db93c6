//! When a rotation is next due: a pure function of the schedule, the last run and now,
//! property-tested (never in the past, always inside the window, monotonic).

use std::time::Duration;

const DAY: i64 = 86_400;

/// A daily UTC window, `start..end` in seconds after midnight; `end < start` wraps past
/// midnight (`22:00-02:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Opens, seconds after 00:00 UTC.
    pub start: u32,
    /// Closes (exclusive), seconds after 00:00 UTC.
    pub end: u32,
}

impl Window {
    /// Parses `"HH:MM-HH:MM"` (UTC). Fails with a message on anything else, or an empty
    /// window.
    pub fn parse(s: &str) -> Result<Window, String> {
        let bad = || format!("{s:?} is not a window; write e.g. \"02:00-04:00\" (UTC)");
        let (a, b) = s.trim().split_once('-').ok_or_else(bad)?;
        let hm = |t: &str| -> Result<u32, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
            if h > 24 || m > 59 || (h == 24 && m != 0) {
                return Err(bad());
            }
            Ok(h * 3600 + m * 60)
        };
        let (start, end) = (hm(a)? % DAY as u32, hm(b)? % DAY as u32);
        if start == end {
            return Err(format!("{s:?} is an empty window"));
        }
        Ok(Window { start, end })
    }

    /// Whether the instant `t` (seconds since the epoch) falls inside the window.
    pub fn contains(&self, t: i64) -> bool {
        let s = t.rem_euclid(DAY) as u32;
        if self.start < self.end {
            (self.start..self.end).contains(&s)
        } else {
            s >= self.start || s < self.end
        }
    }

    /// The first instant at or after `t` inside the window.
    pub fn next_open(&self, t: i64) -> i64 {
        if self.contains(t) {
            return t;
        }
        let day = t - t.rem_euclid(DAY);
        let open = day + i64::from(self.start);
        if open >= t {
            open
        } else {
            open + DAY
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hm = |s: u32| format!("{:02}:{:02}", s / 3600, s % 3600 / 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

/// How often an item rotates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Time between rotations.
    pub period: Duration,
    /// Only rotate inside this daily window.
    pub window: Option<Window>,
    /// Spread: each item is due up to this much later, by a fixed per-item offset, so
    /// many items with the same period do not rotate in the same second.
    pub jitter: Duration,
}

/// A stable offset in `0..jitter` for `item` (FNV-1a of the name).
pub fn jitter_for(item: &str, jitter: Duration) -> i64 {
    let secs = jitter.as_secs();
    if secs == 0 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in item.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % secs) as i64
}

/// When the item is next due: `last + period + offset` (now when never run or overdue),
/// moved forward into the window. Never before `now`; always inside the window.
pub fn next_due(s: &Schedule, last: Option<i64>, now: i64, offset: i64) -> i64 {
    let period = i64::try_from(s.period.as_secs()).unwrap_or(i64::MAX);
    let base = match last {
        Some(l) => l.saturating_add(period).saturating_add(offset),
        None => now,
    };
    let t = base.max(now);
    match s.window {
        Some(w) => w.next_open(t),
        None => t,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn windows_parse_and_wrap() {
        let w = Window::parse("02:00-04:00").unwrap();
        assert_eq!(w.to_string(), "02:00-04:00");
        assert_eq!((w.start, w.end), (7200, 14400));
        assert!(w.contains(3 * 3600) && !w.contains(5 * 3600));
        let night = Window::parse("22:00-02:00").unwrap();
        assert!(night.contains(23 * 3600) && night.contains(3600) && !night.contains(12 * 3600));
        assert_eq!(night.next_open(12 * 3600), 22 * 3600);
        assert_eq!(w.next_open(5 * 3600), DAY + 7200, "tomorrow's window");
        for bad in ["", "2-4", "25:00-01:00", "02:00-02:00", "02:60-03:00", "x"] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn due_examples() {
        let s = Schedule {
            period: Duration::from_secs(86_400),
            window: None,
            jitter: Duration::ZERO,
        };
        assert_eq!(next_due(&s, None, 100, 0), 100, "never rotated: now");
        assert_eq!(next_due(&s, Some(1000), 2000, 0), 87_400);
        assert_eq!(next_due(&s, Some(0), 200_000, 0), 200_000, "overdue: now");
        assert_eq!(jitter_for("a", Duration::ZERO), 0);
        assert!(jitter_for("signing-key:orders", Duration::from_secs(600)) < 600);
    }

    fn arb_schedule() -> impl Strategy<Value = Schedule> {
        (
            60u64..90 * 86_400,
            proptest::option::of((0u32..1440, 1u32..1439)),
            0u64..3600,
        )
            .prop_map(|(p, w, j)| Schedule {
                period: Duration::from_secs(p),
                window: w.map(|(start, len)| Window {
                    start: start * 60,
                    end: ((start + len) % 1440) * 60,
                }),
                jitter: Duration::from_secs(j),
            })
    }

    proptest! {
        #[test]
        fn never_in_the_past_and_always_in_the_window(
            s in arb_schedule(),
            last in proptest::option::of(0i64..4_000_000_000),
            now in 0i64..4_000_000_000,
            item in "[a-z:-]{1,20}",
        ) {
            let off = jitter_for(&item, s.jitter);
            let due = next_due(&s, last, now, off);
            prop_assert!(due >= now);
            let earliest = last.map(|l| l + s.period.as_secs() as i64 + off).unwrap_or(now).max(now);
            prop_assert!(due >= earliest);
            match s.window {
                // The first instant inside the window at or after the earliest.
                Some(w) => prop_assert!(w.contains(due) && (due == earliest || !w.contains(due - 1))),
                None => prop_assert_eq!(due, earliest),
            }
        }

        #[test]
        fn monotonic_in_last_run_and_in_now(
            s in arb_schedule(),
            last in 0i64..4_000_000_000,
            dl in 0i64..10_000_000,
            now in 0i64..4_000_000_000,
            dn in 0i64..10_000_000,
        ) {
            let off = jitter_for("x", s.jitter);
            prop_assert!(next_due(&s, Some(last), now, off) <= next_due(&s, Some(last + dl), now, off));
            prop_assert!(next_due(&s, Some(last), now, off) <= next_due(&s, Some(last), now + dn, off));
        }
    }
}
