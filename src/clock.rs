//! Wall-clock time the agent can sign with.
//!
//! Gateways without a real-time clock boot at 1970, and a token minted then is rejected.
//! [`Clock`] owns the correction: it learns the offset between the local clock and CHeKT's
//! from the HTTP `Date` header of any response, and signs with corrected time.
//!
//! Invariants:
//! - [`Clock::trusted_now`] never returns a time before [`MIN_PLAUSIBLE`]: with a local
//!   clock that is obviously wrong and no offset learned yet, it returns an error and the
//!   caller must first obtain a `Date` header.
//! - An offset is adopted only when the local clock differs from the server's by more than
//!   [`ADOPT_THRESHOLD_MS`] (the header has one-second resolution).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// 2026-01-01T00:00:00Z. A clock before this is wrong: this code did not exist yet.
pub const MIN_PLAUSIBLE: i64 = 1_767_225_600;

/// Offsets smaller than this are ignored (the `Date` header has 1 s resolution).
pub const ADOPT_THRESHOLD_MS: i64 = 2_000;

#[derive(Debug, thiserror::Error)]
#[error(
    "the local clock reads {local} (Unix seconds), before 2026: it is wrong and no time has been learned from CHeKT yet"
)]
pub struct ClockUntrusted {
    pub local: i64,
}

/// Local clock plus a learned correction. Shared by reference across tasks.
#[derive(Debug, Default)]
pub struct Clock {
    /// Added to the system clock before anything else: lets tests (and the torture suite)
    /// run the agent as if its clock were at 1970 or a day off. Zero in production.
    skew_ms: i64,
    offset_ms: AtomicI64,
    learned: AtomicBool,
}

impl Clock {
    pub fn system() -> Clock {
        Clock::default()
    }

    /// A clock whose local reading is off by `skew_ms` (testing and fault injection).
    pub fn skewed(skew_ms: i64) -> Clock {
        Clock {
            skew_ms,
            ..Clock::default()
        }
    }

    /// The local clock reading (system time + test skew), Unix ms.
    pub fn local_ms(&self) -> i64 {
        let sys = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        sys + self.skew_ms
    }

    /// Best estimate of true time, Unix ms (local clock + learned offset).
    pub fn now_ms(&self) -> i64 {
        self.local_ms() + self.offset_ms.load(Ordering::Relaxed)
    }

    /// True time in Unix seconds, or an error when it cannot be trusted.
    pub fn trusted_now(&self) -> Result<i64, ClockUntrusted> {
        let now = self.now_ms() / 1000;
        if now < MIN_PLAUSIBLE {
            return Err(ClockUntrusted {
                local: self.local_ms() / 1000,
            });
        }
        Ok(now)
    }

    pub fn offset_ms(&self) -> i64 {
        self.offset_ms.load(Ordering::Relaxed)
    }

    pub fn has_learned(&self) -> bool {
        self.learned.load(Ordering::Relaxed)
    }

    /// Learn from an HTTP `Date` header value. Returns the offset adopted, if it changed.
    pub fn observe_date_header(&self, value: &str) -> Option<i64> {
        let server = httpdate::parse_http_date(value).ok()?;
        let server_ms = server.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64;
        if server_ms / 1000 < MIN_PLAUSIBLE {
            return None; // a server with a broken clock teaches nothing
        }
        // The header truncates to the second: the true server time is up to 1 s later.
        let server_mid = server_ms + 500;
        let diff = server_mid - self.local_ms();
        let new = if diff.abs() > ADOPT_THRESHOLD_MS {
            diff
        } else {
            0
        };
        self.learned.store(true, Ordering::Relaxed);
        let old = self.offset_ms.swap(new, Ordering::Relaxed);
        if (old - new).abs() > ADOPT_THRESHOLD_MS {
            Some(new)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_at_1970_is_untrusted_until_it_learns() {
        let c = Clock::skewed(-(Clock::system().local_ms() - 5_000));
        assert!(c.trusted_now().is_err());
        let now = httpdate::fmt_http_date(SystemTime::now());
        assert!(c.observe_date_header(&now).is_some());
        let t = c.trusted_now().unwrap();
        let real = Clock::system().local_ms() / 1000;
        assert!((t - real).abs() <= 2, "{t} vs {real}");
    }

    #[test]
    fn small_differences_are_ignored() {
        let c = Clock::system();
        let now = httpdate::fmt_http_date(SystemTime::now());
        c.observe_date_header(&now);
        assert_eq!(c.offset_ms(), 0);
        assert!(c.observe_date_header("garbage").is_none());
    }
}
