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
