//! Per-VM totals over an event stream: the one place where events become the figures every
//! consumer shows (sharetop's overview, the simulator's summary, the bench report).

use crate::event::{Event, EventKind, PageSize};

/// A log2 histogram of nanosecond latencies: bucket `i` counts values in `[2^i, 2^(i+1))`
/// (bucket 0 also holds 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log2Histogram {
    pub buckets: [u64; 64],
    pub count: u64,
    pub sum: u64,
    pub max: u64,
}

impl Default for Log2Histogram {
    fn default() -> Self {
        Self {
            buckets: [0; 64],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

impl Log2Histogram {
    pub fn record(&mut self, value: u64) {
        let bucket = 63 - (value | 1).leading_zeros() as usize;
        self.buckets[bucket] += 1;
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
        self.max = self.max.max(value);
    }

    /// Upper bound (exclusive) of the bucket holding quantile `q` (0.0..=1.0), capped at `max`;
    /// `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let q = q.clamp(0.0, 1.0);
        // Rank of the wanted sample, 1-based; ceil without std.
        let exact = q * self.count as f64;
        let mut rank = exact as u64;
        if (rank as f64) < exact {
            rank += 1;
        }
        let rank = rank.max(1);
        let mut seen = 0;
        for (i, &n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                let upper = if i >= 63 {
                    u64::MAX
                } else {
                    (1u64 << (i + 1)) - 1
                };
                return Some(upper.min(self.max));
            }
        }
        Some(self.max)
    }

    pub fn merge(&mut self, other: &Log2Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }
}

/// Totals for one VM. Every field is a plain sum over the events seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmStats {
    pub events: u64,
    pub first_ts_ns: Option<u64>,
    pub last_ts_ns: u64,
    /// Completed pre-populations and the leaf entries they wrote.
    pub prepopulations: u64,
    /// Of those, the full ones (all pinned memory: at sharing start and on every new root).
    pub full_prepopulations: u64,
    pub prepop_entries: u64,
    pub prepop_ns: Log2Histogram,
    /// Leaf entries written by pre-population, by page size (4K, 2M, 1G).
    pub prepop_entries_by_size: [u64; 3],
    pub roots_allocated: u64,
    pub root_switches: u64,
    pub roots_freed: u64,
    pub fast_zaps: u64,
    pub zaps: u64,
    pub zapped_entries: u64,
    pub splits: u64,
    pub collapses: u64,
    pub spte_sets: u64,
    pub page_faults: u64,
    pub dma_maps: u64,
    pub dma_map_bytes: u64,
    /// Latency of timed DMA maps (VFIO / iommufd map ioctls: pinning included).
    pub dma_map_ns: Log2Histogram,
    pub dma_unmaps: u64,
    pub iotlb_flushes: u64,
    pub iotlb_flush_ns: Log2Histogram,
    pub io_page_faults: u64,
    pub io_page_faults_unresolved: u64,
    /// 4 KiB pages pinned now (pins minus unpins).
    pub pinned_pages: u64,
    pub pinned_pages_peak: u64,
    pub memslot_ops: u64,
    pub sharing_refusals: u64,
    /// SMM entries and exits of vCPUs (each resets the vCPU's MMU context).
    pub smm_transitions: u64,
    /// CR0/CR4 writes seen (with or without their value).
    pub cr_writes: u64,
}

impl VmStats {
    /// Root updates as the seed counts them: every new root the IOMMU must be told about.
    pub fn root_updates(&self) -> u64 {
        self.roots_allocated
    }

    /// Nanoseconds spent in pre-population.
    pub fn prepop_total_ns(&self) -> u64 {
        self.prepop_ns.sum
    }

    pub fn iotlb_flush_total_ns(&self) -> u64 {
        self.iotlb_flush_ns.sum
    }

    /// Span between the first and the last event.
    pub fn span_ns(&self) -> u64 {
        self.first_ts_ns
            .map_or(0, |first| self.last_ts_ns.saturating_sub(first))
    }

    pub fn record(&mut self, event: &Event) {
        if let EventKind::VmName { .. } = event.kind {
            // Who the VM is, not something it did.
            return;
        }
        self.events += 1;
        if self.first_ts_ns.is_none_or(|first| event.ts_ns < first) {
            self.first_ts_ns = Some(event.ts_ns);
        }
        self.last_ts_ns = self.last_ts_ns.max(event.ts_ns);
        match &event.kind {
            EventKind::PrepopulateStart { .. } => {}
            EventKind::PrepopulateEnd {
                page_size,
                cause,
                entries,
                ns,
                ..
            } => {
                self.prepopulations += 1;
                if cause.is_full() {
                    self.full_prepopulations += 1;
                }
                self.prepop_entries += entries;
                self.prepop_ns.record(*ns);
                let i = match page_size {
                    PageSize::Size4K => 0,
                    PageSize::Size2M => 1,
                    PageSize::Size1G => 2,
                };
                self.prepop_entries_by_size[i] += entries;
            }
            EventKind::RootAlloc(_) => self.roots_allocated += 1,
            EventKind::RootSwitch(_) => self.root_switches += 1,
            EventKind::RootFree(_) => self.roots_freed += 1,
            EventKind::FastZap { .. } => self.fast_zaps += 1,
            EventKind::Zap { entries, .. } => {
                self.zaps += 1;
                self.zapped_entries += entries;
            }
            EventKind::HugePageSplit { .. } => self.splits += 1,
            EventKind::HugePageCollapse { .. } => self.collapses += 1,
            EventKind::SpteSet { .. } => self.spte_sets += 1,
            EventKind::PageFault { .. } => self.page_faults += 1,
            EventKind::IommuMap { size, ns, .. } => {
                self.dma_maps += 1;
                self.dma_map_bytes = self.dma_map_bytes.saturating_add(*size);
                if *ns > 0 {
                    self.dma_map_ns.record(*ns);
                }
            }
            EventKind::IommuUnmap { .. } => self.dma_unmaps += 1,
            EventKind::IotlbFlush { ns, .. } => {
                self.iotlb_flushes += 1;
                self.iotlb_flush_ns.record(*ns);
            }
            EventKind::Pin { pages, .. } => {
                self.pinned_pages = self.pinned_pages.saturating_add(*pages);
                self.pinned_pages_peak = self.pinned_pages_peak.max(self.pinned_pages);
            }
            EventKind::Unpin { pages, .. } => {
                self.pinned_pages = self.pinned_pages.saturating_sub(*pages);
            }
            EventKind::MemslotAdd(_)
            | EventKind::MemslotDelete(_)
            | EventKind::MemslotMove { .. }
            | EventKind::MemslotFlags { .. } => self.memslot_ops += 1,
            EventKind::SharingRefused { .. } => self.sharing_refusals += 1,
            EventKind::SharingRequested { .. }
            | EventKind::SharingStarted { .. }
            | EventKind::SharingStopped { .. } => {}
            EventKind::IoPageFault { resolved, .. } => {
                self.io_page_faults += 1;
                if !resolved {
                    self.io_page_faults_unresolved += 1;
                }
            }
            EventKind::SmmTransition { .. } => self.smm_transitions += 1,
            EventKind::CrWrite { .. } => self.cr_writes += 1,
            EventKind::VmName { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{GpaRange, Root, RootCause, Source};

    #[test]
    fn histogram_quantiles_bound_the_samples() {
        let mut h = Log2Histogram::default();
        for v in [0, 1, 3, 100, 1000, 1000, 1000, 5000] {
            h.record(v);
        }
        assert_eq!(h.count, 8);
        assert_eq!(h.max, 5000);
        assert_eq!(h.quantile(0.0), Some(1));
        assert_eq!(h.quantile(0.5), Some(127)); // 4th sample (100) lives in [64, 128)
        assert_eq!(h.quantile(0.99), Some(5000));
        assert_eq!(Log2Histogram::default().quantile(0.5), None);
    }

    #[test]
    fn pins_and_prepopulations_add_up() {
        let mut s = VmStats::default();
        let ev = |ts, kind| Event::new(ts, 1, Source::Simulator, kind);
        let range = GpaRange::new(crate::event::Gpa(0), 1 << 30);
        s.record(&ev(
            5,
            EventKind::Pin {
                range,
                pages: 262144,
            },
        ));
        s.record(&ev(6, EventKind::Unpin { range, pages: 1000 }));
        s.record(&ev(
            9,
            EventKind::PrepopulateEnd {
                range,
                page_size: PageSize::Size2M,
                cause: crate::event::PrepopCause::NewRoot,
                entries: 512,
                leaves: None,
                ns: 40,
            },
        ));
        s.record(&ev(
            3,
            EventKind::RootAlloc(Root {
                root: 1,
                level: 4,
                smm: false,
                cause: RootCause::Initial,
            }),
        ));
        assert_eq!(s.pinned_pages, 261144);
        assert_eq!(s.pinned_pages_peak, 262144);
        assert_eq!(s.prepop_entries_by_size, [0, 512, 0]);
        assert_eq!(s.full_prepopulations, 1);
        assert_eq!(s.prepop_total_ns(), 40);
        assert_eq!(s.root_updates(), 1);
        assert_eq!(s.span_ns(), 6);
    }
}
