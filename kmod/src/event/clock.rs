//! Time for event timestamps and measured costs.

use core::sync::atomic::{AtomicU64, Ordering};

/// A source of nanosecond timestamps. Kernel: `ktime_get_ns`; userspace: [`MonotonicClock`];
/// the simulator: [`ManualClock`], advanced by the scenario.
pub trait Clock {
    fn now_ns(&self) -> u64;

    /// Accounts for `ns` of modelled work (a cost not spent on this machine). A simulated clock
    /// moves forward; a real one ignores it.
    fn charge(&self, ns: u64) {
        let _ = ns;
    }
}

impl<C: Clock + ?Sized> Clock for &C {
    fn now_ns(&self) -> u64 {
        (**self).now_ns()
    }
    fn charge(&self, ns: u64) {
        (**self).charge(ns)
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub const fn new(ns: u64) -> Self {
        Self(AtomicU64::new(ns))
    }
    pub fn advance(&self, ns: u64) {
        self.0.fetch_add(ns, Ordering::Relaxed);
    }
    pub fn set(&self, ns: u64) {
        self.0.store(ns, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    fn charge(&self, ns: u64) {
        self.advance(ns);
    }
}

/// Nanoseconds since the clock was created.
#[cfg(feature = "std")]
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock(std::time::Instant);

#[cfg(feature = "std")]
impl MonotonicClock {
    pub fn new() -> Self {
        Self(std::time::Instant::now())
    }
}

#[cfg(feature = "std")]
impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(feature = "std")]
impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A UTC calendar time (proleptic Gregorian) of a Unix-epoch timestamp: how traces' times are
/// shown and partitioned (RFC 3339 via `Display`, the date alone via [`UtcTime::date`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcTime {
    pub year: i64,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

impl UtcTime {
    /// The calendar time of `unix_ns` ns after 1970-01-01T00:00:00Z.
    pub fn from_unix_ns(unix_ns: u64) -> Self {
        let secs = unix_ns / 1_000_000_000;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Howard Hinnant's civil_from_days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        Self {
            year: yoe + era * 400 + i64::from(month <= 2),
            month: month as u8,
            day: day as u8,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// `YYYY-MM-DD`.
    pub fn date(&self) -> alloc::string::String {
        alloc::format!("{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

impl core::fmt::Display for UtcTime {
    /// RFC 3339: `YYYY-MM-DDTHH:MM:SSZ`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

#[cfg(test)]
mod utc_tests {
    use super::UtcTime;

    #[test]
    fn calendar_times_of_known_instants() {
        let t = |ns| alloc::format!("{}", UtcTime::from_unix_ns(ns));
        assert_eq!(t(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year), 12:34:56.
        assert_eq!(t(951_827_696_000_000_000), "2000-02-29T12:34:56Z");
        assert_eq!(t(1_764_078_000_000_000_000), "2025-11-25T13:40:00Z");
        assert_eq!(UtcTime::from_unix_ns(u64::MAX).year, 2554);
        assert_eq!(
            UtcTime::from_unix_ns(86_399_999_999_999).date(),
            "1970-01-01"
        );
    }
}
