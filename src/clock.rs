//! The `Clock` seam: time comes in from outside so decisions, expiry and tests are
//! deterministic. Owns nothing else.

use std::sync::Mutex;
use std::time::SystemTime;

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that says what it is told; for tests.
#[derive(Debug)]
pub struct FixedClock(Mutex<SystemTime>);

impl FixedClock {
    pub fn new(at: SystemTime) -> Self {
        Self(Mutex::new(at))
    }

    pub fn set(&self, at: SystemTime) {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// UTC calendar date of a point in time (for inventory expiry).
pub fn utc_date(t: SystemTime) -> time::Date {
    time::OffsetDateTime::from(t).date()
}

pub fn unix_secs(t: SystemTime) -> i64 {
    time::OffsetDateTime::from(t).unix_timestamp()
}
