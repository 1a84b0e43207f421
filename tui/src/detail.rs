//! What the VM detail view shows beyond the totals: activity over time for the three seed
//! paths, the current roots, the memslots, and huge-page coverage of pinned memory.

use std::collections::{BTreeMap, VecDeque};

use tdpshare::event::{Event, EventKind, Memslot};

/// Per-second activity of one path, newest last; `window` buckets kept.
#[derive(Debug, Clone, Default)]
pub struct Series {
    buckets: VecDeque<u64>,
    /// The second (of event time) the last bucket covers.
    last_second: Option<u64>,
}

impl Series {
    fn add(&mut self, second: u64, n: u64, window: usize) {
        match self.last_second {
            Some(last) if second <= last => {
                let back = (last - second) as usize;
                let len = self.buckets.len();
                if back < len {
                    self.buckets[len - 1 - back] += n;
                }
            }
            _ => {
                let gap = self
                    .last_second
                    .map_or(1, |l| second - l)
                    .min(window as u64) as usize;
                for _ in 1..gap {
                    self.buckets.push_back(0);
                }
                self.buckets.push_back(n);
                self.last_second = Some(second);
            }
        }
        while self.buckets.len() > window {
            self.buckets.pop_front();
        }
    }

    /// The buckets, oldest first.
    pub fn values(&self) -> Vec<u64> {
        self.buckets.iter().copied().collect()
    }

    /// The buckets up to second `now` of the source's clock, oldest first: the seconds since
    /// the last event are idle ones, not left out (a quiet VM's line runs down to zero rather
    /// than showing its last burst as current).
    pub fn values_at(&self, now: u64, window: usize) -> Vec<u64> {
        let mut v = self.values();
        if let Some(last) = self.last_second {
            let idle = now.saturating_sub(last).min(window as u64) as usize;
            v.extend(std::iter::repeat_n(0, idle));
        }
        let keep = v.len().saturating_sub(window.max(1));
        v.drain(..keep);
        v
    }
}

/// A root the VM has now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveRoot {
    pub level: u8,
    pub smm: bool,
    /// Event time it appeared.
    pub since_ns: u64,
}

/// The detail of one VM.
#[derive(Debug, Clone)]
pub struct VmDetail {
    /// Sparkline window, in seconds.
    pub window: usize,
    pub prepopulation: Series,
    pub root_updates: Series,
    pub iotlb_flushes: Series,
    pub roots: BTreeMap<u64, LiveRoot>,
    pub memslots: BTreeMap<(u8, u16), Memslot>,
    /// Sharing as the VM's events tell it: `-` (never asked), `requested <mode>`,
    /// `granted <mode>`, `refused <mode>: <reasons>`, `stopped <mode>`.
    pub sharing: String,
}

impl Default for VmDetail {
    fn default() -> Self {
        Self::new(60)
    }
}

impl VmDetail {
    pub fn new(window: usize) -> Self {
        Self {
            window: window.max(1),
            prepopulation: Series::default(),
            root_updates: Series::default(),
            iotlb_flushes: Series::default(),
            roots: BTreeMap::new(),
            memslots: BTreeMap::new(),
            sharing: "-".into(),
        }
    }

    pub fn record(&mut self, e: &Event) {
        let second = e.ts_ns / 1_000_000_000;
        let w = self.window;
        match &e.kind {
            EventKind::PrepopulateEnd { entries, .. } => {
                self.prepopulation.add(second, *entries, w)
            }
            EventKind::RootAlloc(r) => {
                self.root_updates.add(second, 1, w);
                self.roots.insert(
                    r.root,
                    LiveRoot {
                        level: r.level,
                        smm: r.smm,
                        since_ns: e.ts_ns,
                    },
                );
            }
            EventKind::RootFree(r) => {
                if !self.roots.contains_key(&r.root) {
                    // Live root frees do not say which root: the oldest of that address space.
                    if let Some(&id) = self
                        .roots
                        .iter()
                        .find(|(_, v)| v.smm == r.smm)
                        .map(|(k, _)| k)
                    {
                        self.roots.remove(&id);
                    }
                } else {
                    self.roots.remove(&r.root);
                }
            }
            EventKind::IotlbFlush { .. } => self.iotlb_flushes.add(second, 1, w),
            EventKind::MemslotAdd(s)
            | EventKind::MemslotMove { slot: s, .. }
            | EventKind::MemslotFlags { slot: s, .. } => {
                self.memslots.insert((s.as_id, s.slot), *s);
            }
            EventKind::MemslotDelete(s) => {
                self.memslots.remove(&(s.as_id, s.slot));
            }
            EventKind::SharingRequested { mode } => self.sharing = format!("requested {mode}"),
            EventKind::SharingStarted { mode, .. } => self.sharing = format!("granted {mode}"),
            EventKind::SharingStopped { mode, .. } => self.sharing = format!("stopped {mode}"),
            EventKind::SharingRefused { mode, reason } => {
                let prefix = format!("sharing in mode {mode} refused: ");
                let why = reason.strip_prefix(&prefix).unwrap_or(reason);
                self.sharing = format!("refused {mode}: {why}");
            }
            _ => {}
        }
        // Keep the three series aligned on the same last second.
        for s in [
            &mut self.prepopulation,
            &mut self.root_updates,
            &mut self.iotlb_flushes,
        ] {
            s.add(second, 0, w);
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn idle_seconds_up_to_the_clock_count_as_zero() {
        let mut s = Series::default();
        s.add(3, 5, 60);
        s.add(4, 7, 60);
        assert_eq!(s.values_at(4, 60), [5, 7]);
        // Two quiet seconds later the line ends at zero, not at the last burst.
        assert_eq!(s.values_at(6, 60), [5, 7, 0, 0]);
        // The window still bounds it.
        assert_eq!(s.values_at(100, 3), [0, 0, 0]);
        assert!(Series::default().values_at(9, 60).is_empty());
    }

    use super::*;
    use tdpshare::event::{Root, RootCause, Source};

    #[test]
    fn sharing_state_follows_the_events() {
        use tdpshare::event::ShareMode;
        let mut d = VmDetail::default();
        assert_eq!(d.sharing, "-");
        let ev = |kind| Event::new(0, 1, Source::Simulator, kind);
        let mode = ShareMode::Optimized;
        d.record(&ev(EventKind::SharingRequested { mode }));
        assert_eq!(d.sharing, "requested optimized");
        d.record(&ev(EventKind::SharingRefused {
            mode,
            reason: "sharing in mode optimized refused: the device cannot take IO page faults"
                .into(),
        }));
        assert_eq!(
            d.sharing,
            "refused optimized: the device cannot take IO page faults"
        );
        d.record(&ev(EventKind::SharingStarted { mode, handle: 1 }));
        assert_eq!(d.sharing, "granted optimized");
        d.record(&ev(EventKind::SharingStopped { mode, unpinned: 3 }));
        assert_eq!(d.sharing, "stopped optimized");
    }

    #[test]
    fn series_fill_gaps_and_keep_the_window() {
        let mut s = Series::default();
        s.add(0, 1, 3);
        s.add(2, 5, 3);
        assert_eq!(s.values(), vec![1, 0, 5]);
        s.add(2, 1, 3);
        s.add(1, 2, 3);
        assert_eq!(s.values(), vec![1, 2, 6]);
        s.add(10, 1, 3);
        assert_eq!(s.values(), vec![0, 0, 1]);
    }

    #[test]
    fn roots_come_and_go() {
        let mut d = VmDetail::new(10);
        let root = |root, smm| Root {
            root,
            level: 4,
            smm,
            cause: RootCause::Unknown,
        };
        d.record(&Event::new(
            5,
            1,
            Source::Live,
            EventKind::RootAlloc(root(1, false)),
        ));
        d.record(&Event::new(
            6,
            1,
            Source::Live,
            EventKind::RootAlloc(root(2, true)),
        ));
        d.record(&Event::new(
            7,
            1,
            Source::Live,
            EventKind::RootFree(root(0, false)),
        ));
        assert_eq!(d.roots.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(d.root_updates.values(), vec![2]);
    }
}
