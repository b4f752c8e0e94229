//! The one clock every side reads wall time from: [`SystemClock`] in production, and
//! [`ManualClock`] for tests, which move time by hand instead of sleeping. Rules take the time
//! their caller read from the clock it holds; nothing below a service reads the system clock.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Wall time, as unix milliseconds.
pub trait Clock: Send + Sync + Debug {
    /// Milliseconds since the unix epoch.
    fn now_unix_ms(&self) -> i64;

    /// Seconds since the unix epoch.
    fn now_unix(&self) -> i64 {
        self.now_unix_ms().div_euclid(1000)
    }
}

/// A clock shared by everything a service runs.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |elapsed| elapsed.as_millis() as i64)
    }
}

/// The system clock, shared: what a service holds unless a test gives it another.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told: tests of expiry, lapses and grace periods advance it
/// instead of sleeping.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_unix_ms: AtomicI64,
}

impl ManualClock {
    /// A clock standing at the system's time now.
    pub fn starting_now() -> Arc<ManualClock> {
        Arc::new(ManualClock { now_unix_ms: AtomicI64::new(SystemClock.now_unix_ms()) })
    }

    /// A clock standing at `unix_ms`.
    pub fn at(unix_ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock { now_unix_ms: AtomicI64::new(unix_ms) })
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.now_unix_ms.fetch_add(by.as_millis() as i64, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> i64 {
        self.now_unix_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = ManualClock::at(1_500);
        assert_eq!((clock.now_unix_ms(), clock.now_unix()), (1_500, 1));
        clock.advance(Duration::from_secs(2));
        assert_eq!((clock.now_unix_ms(), clock.now_unix()), (3_500, 3));
        assert!(SystemClock.now_unix() > 1_700_000_000);
    }
}
