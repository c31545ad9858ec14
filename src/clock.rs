//! The `Clock` seam: time comes in from outside so decisions, expiry, rotation and tests
//! are deterministic. Owns nothing else.

use std::future::Future;
use std::pin::Pin;
use std::time::SystemTime;

use tokio::sync::watch;

pub type Sleep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;

    /// Resolves once `now()` has reached `deadline` (at the earliest). Timers that act on
    /// credential lifetimes (rotation) wait through this, so a test clock controls them.
    fn sleep_until(&self, deadline: SystemTime) -> Sleep<'_>;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep<'_> {
        // A wall-clock step (NTP) can wake this early or late; callers re-read `now()`.
        let wait = deadline.duration_since(SystemTime::now()).unwrap_or_default();
        Box::pin(tokio::time::sleep(wait))
    }
}

/// A paused clock: says what it is told and moves only when the test moves it; sleepers
/// wake when it is set past their deadline.
#[derive(Debug)]
pub struct FixedClock(watch::Sender<SystemTime>);

impl FixedClock {
    pub fn new(at: SystemTime) -> Self {
        Self(watch::Sender::new(at))
    }

    pub fn set(&self, at: SystemTime) {
        self.0.send_replace(at);
    }

    pub fn advance(&self, by: std::time::Duration) {
        self.0.send_modify(|t| *t += by);
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        *self.0.borrow()
    }

    fn sleep_until(&self, deadline: SystemTime) -> Sleep<'_> {
        let mut rx = self.0.subscribe();
        Box::pin(async move {
            if rx.wait_for(|t| *t >= deadline).await.is_err() {
                // The clock is gone (test over): never wake.
                std::future::pending::<()>().await;
            }
        })
    }
}

/// UTC calendar date of a point in time (for inventory expiry).
pub fn utc_date(t: SystemTime) -> time::Date {
    time::OffsetDateTime::from(t).date()
}

pub fn unix_secs(t: SystemTime) -> i64 {
    time::OffsetDateTime::from(t).unix_timestamp()
}

/// Unix milliseconds (0 before the epoch, saturating far after it).
pub fn unix_millis(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The daemon's periodic tasks: ticks every `period` (a late tick is not caught up in a
/// burst) until `stop` turns true.
pub struct Ticker {
    tick: tokio::time::Interval,
    stop: watch::Receiver<bool>,
}

impl Ticker {
    pub fn new(period: std::time::Duration, stop: watch::Receiver<bool>) -> Self {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self { tick, stop }
    }

    /// The first tick comes a whole period from now (the interval's immediate one is skipped).
    pub async fn delayed(period: std::time::Duration, stop: watch::Receiver<bool>) -> Self {
        let mut t = Self::new(period, stop);
        t.tick.tick().await;
        t
    }

    /// Waits for the next tick: `false` once the daemon is stopping.
    pub async fn next(&mut self) -> bool {
        let stop = &mut self.stop;
        tokio::select! {
            _ = self.tick.tick() => true,
            () = async { let _ = stop.wait_for(|s| *s).await; } => false,
        }
    }
}

/// RFC 3339 in UTC to the second, e.g. `2026-12-02T06:15:00Z` (what AWS tools read).
pub fn rfc3339(t: SystemTime) -> String {
    let t = time::OffsetDateTime::from(t);
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A lifetime for people, in its largest whole units: `1h`, `1h30m`, `90s` → `1m30s`.
pub fn human_duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let mut out = String::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if n > 0 {
            out.push_str(&format!("{n}{unit}"));
        }
    }
    if out.is_empty() { "0s".into() } else { out }
}

/// Unix seconds as RFC 3339 (UTC), for people; the number itself if it is out of range.
pub fn rfc3339_secs(secs: i64) -> String {
    match u64::try_from(secs) {
        Ok(s) => rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)),
        Err(_) => secs.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn durations_and_times_read_as_people_write_them() {
        assert_eq!(human_duration(3600), "1h");
        assert_eq!(human_duration(5400), "1h30m");
        assert_eq!(human_duration(90), "1m30s");
        assert_eq!(human_duration(0), "0s");
        assert_eq!(rfc3339_secs(0), "1970-01-01T00:00:00Z");
    }

    #[tokio::test]
    async fn a_fixed_clock_wakes_sleepers_only_when_set_past_their_deadline() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let clock = std::sync::Arc::new(FixedClock::new(t0));
        let c = clock.clone();
        let sleeper = tokio::spawn(async move { c.sleep_until(t0 + Duration::from_secs(60)).await });
        clock.advance(Duration::from_secs(59));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        clock.advance(Duration::from_secs(1));
        tokio::time::timeout(Duration::from_secs(5), sleeper).await.unwrap().unwrap();
        assert_eq!(clock.now(), t0 + Duration::from_secs(60));
    }
}
