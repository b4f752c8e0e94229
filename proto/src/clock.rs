//! The one clock every side reads wall time from: [`SystemClock`] in production, a
//! [`SampledClock`] where several processes must agree on time (coordinator replicas read the
//! database's), and [`ManualClock`] for tests, which move time by hand instead of sleeping.
//! Rules take the time their caller read from the clock it holds; nothing below a service reads
//! the system clock.

use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// Another machine's wall clock (the database's, which coordinator replicas share), sampled
/// now and then and carried on this machine's monotonic clock in between: a step of the local
/// wall clock (NTP, an operator's `date`) changes nothing, and replicas sampling one source
/// agree to within half a round trip. It never runs backwards, even when a sample is behind
/// what it already said.
#[derive(Debug)]
pub struct SampledClock {
    /// The monotonic instant offsets are counted from.
    origin: Instant,
    /// The source's unix milliseconds at `origin`, as the last sample put it.
    at_origin_unix_ms: AtomicI64,
    /// The latest time it said: what it says never goes below it.
    said_unix_ms: AtomicI64,
}

impl SampledClock {
    /// A clock from a first sample (see [`SampledClock::sample`]).
    pub fn new(sent: Instant, received: Instant, source_unix_ms: i64) -> Arc<SampledClock> {
        let clock = Arc::new(SampledClock {
            origin: sent,
            at_origin_unix_ms: AtomicI64::new(0),
            said_unix_ms: AtomicI64::new(i64::MIN),
        });
        clock.sample(sent, received, source_unix_ms);
        clock
    }

    /// Takes a reading of the source: asked at `sent`, answered at `received`, saying
    /// `source_unix_ms`. The reading is taken to be of the round trip's midpoint.
    pub fn sample(&self, sent: Instant, received: Instant, source_unix_ms: i64) {
        let midpoint = sent + received.saturating_duration_since(sent) / 2;
        let since_origin = signed_ms(midpoint, self.origin);
        self.at_origin_unix_ms.store(source_unix_ms - since_origin, Ordering::SeqCst);
    }

    /// The time at the monotonic instant `at`, as the last sample puts it (not clamped).
    fn unix_ms_at(&self, at: Instant) -> i64 {
        self.at_origin_unix_ms.load(Ordering::SeqCst) + signed_ms(at, self.origin)
    }

    /// How far the source runs ahead of this machine's wall clock now, in milliseconds
    /// (negative: behind), for a log line.
    pub fn offset_ms(&self) -> i64 {
        self.unix_ms_at(Instant::now()) - SystemClock.now_unix_ms()
    }
}

/// Milliseconds from `origin` to `at`, negative when `at` is earlier.
fn signed_ms(at: Instant, origin: Instant) -> i64 {
    match at.checked_duration_since(origin) {
        Some(after) => after.as_millis() as i64,
        None => -(origin.duration_since(at).as_millis() as i64),
    }
}

impl Clock for SampledClock {
    fn now_unix_ms(&self) -> i64 {
        let now = self.unix_ms_at(Instant::now());
        self.said_unix_ms.fetch_max(now, Ordering::SeqCst).max(now)
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

    #[test]
    fn a_sampled_clock_says_the_source_time_at_the_round_trips_midpoint() {
        // A source an hour ahead of this machine, read over a 400 ms round trip that ended now:
        // its answer is taken to be of 200 ms ago.
        let hour_ms = 3_600_000;
        let received = Instant::now();
        let sent = received - Duration::from_millis(400);
        let source_at_midpoint = SystemClock.now_unix_ms() + hour_ms - 200;
        let clock = SampledClock::new(sent, received, source_at_midpoint);
        let said = clock.now_unix_ms();
        let expected = SystemClock.now_unix_ms() + hour_ms;
        // Only the time this test itself takes separates the two readings.
        assert!((said - expected).abs() < 50, "said {said}, expected about {expected}");
        assert!((clock.offset_ms() - hour_ms).abs() < 50, "offset {}", clock.offset_ms());

        // A later sample moves it to the source's new reading: 10 s behind this machine.
        let received = Instant::now();
        clock.sample(received, received, SystemClock.now_unix_ms() - 10_000);
        assert!((clock.offset_ms() + 10_000).abs() < 50, "offset {}", clock.offset_ms());
    }

    #[test]
    fn a_sampled_clock_never_runs_backwards() {
        let now = Instant::now();
        let clock = SampledClock::new(now, now, 1_000_000);
        let first = clock.now_unix_ms();
        assert!(first >= 1_000_000);
        // The source says it is 5 s earlier than the clock already said: the clock holds.
        clock.sample(Instant::now(), Instant::now(), 995_000);
        assert!(clock.now_unix_ms() >= first);
        // A sample from before the clock's origin (a sent instant earlier than the first one).
        let earlier = now - Duration::from_secs(1);
        clock.sample(earlier, earlier, 2_000_000);
        let said = clock.now_unix_ms();
        assert!((said - 2_001_000).abs() < 50, "said {said}");
    }
}
