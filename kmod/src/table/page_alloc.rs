//! Page-table memory: real 4 KiB pages of 512 atomic entries, named by physical address.
//!
//! Locking rule: every method of [`PageAllocator`] may be called from any thread at any time.
//!
//! A table that is unlinked may still be in use by a walker that read the link before it was
//! removed (a vCPU, the IOMMU, a software walk). So [`PageAllocator::free_table`] only *retires*
//! a page; it is reused once every read-side section that began before the retirement has ended
//! — RCU in the kernel (`call_rcu` / `rcu_read_lock`), an epoch scheme in [`Arena`].

use core::sync::atomic::AtomicU64;

use crate::decision::addr::{ENTRIES_PER_TABLE, Hpa};

/// One page-table page: 512 entries, changed only atomically (hardware walkers read them).
pub type Table = [AtomicU64; ENTRIES_PER_TABLE];

/// Where page-table pages come from. Kernel: `alloc_page(GFP_KERNEL_ACCOUNT | __GFP_ZERO)`,
/// `page_address`, `call_rcu`; userspace: [`Arena`].
pub trait PageAllocator: Sync {
    /// Held while walking tables without the writer's lock (`rcu_read_lock`).
    type ReadGuard<'a>
    where
        Self: 'a;

    /// A 4 KiB-aligned page with every entry set to `init` (the format's non-present value:
    /// KVM's memory caches fill new pages with `SHADOW_NONPRESENT_VALUE`); `None` when out of
    /// memory.
    fn alloc_table(&self, init: u64) -> Option<Hpa>;

    /// A 4 KiB-aligned page whose entries the caller writes, all 512 of them, before anything
    /// can see it (a table built complete before it is linked): it need not be zeroed first
    /// (kernel: a page without `__GFP_ZERO`). `None` when out of memory.
    fn alloc_table_to_fill(&self) -> Option<Hpa> {
        self.alloc_table(0)
    }

    /// Retires a page no table links to any more; it is reused only after every read-side
    /// section that began before this call has ended.
    fn free_table(&self, pa: Hpa);

    /// The table at `pa`, or `None` when `pa` is not a page of this allocator (a walker turns
    /// that into a fault, never into a wild read).
    fn table(&self, pa: Hpa) -> Option<&Table>;

    fn read_lock(&self) -> Self::ReadGuard<'_>;

    /// Pages handed out and not yet retired: the page-table memory footprint.
    fn pages_in_use(&self) -> u64;
}

impl<T: PageAllocator> PageAllocator for &T {
    type ReadGuard<'a>
        = T::ReadGuard<'a>
    where
        Self: 'a;

    fn alloc_table(&self, init: u64) -> Option<Hpa> {
        (**self).alloc_table(init)
    }
    fn alloc_table_to_fill(&self) -> Option<Hpa> {
        (**self).alloc_table_to_fill()
    }
    fn free_table(&self, pa: Hpa) {
        (**self).free_table(pa)
    }
    fn table(&self, pa: Hpa) -> Option<&Table> {
        (**self).table(pa)
    }
    fn read_lock(&self) -> Self::ReadGuard<'_> {
        (**self).read_lock()
    }
    fn pages_in_use(&self) -> u64 {
        (**self).pages_in_use()
    }
}

#[cfg(feature = "std")]
pub use arena::{Arena, ArenaReadGuard};

#[cfg(feature = "std")]
mod arena {
    use super::*;
    use core::ptr::NonNull;
    use core::sync::atomic::{AtomicUsize, Ordering, fence};
    use std::alloc::{Layout, alloc_zeroed, dealloc};
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    use std::sync::Mutex;
    use std::vec::Vec;

    /// Fake physical base of the arena, so that no table sits at address 0.
    const PHYS_BASE: Hpa = Hpa(0x10_0000_0000);
    /// Bytes of one page.
    const PAGE_SIZE: usize = crate::decision::addr::PAGE_SIZE as usize;
    /// Read-side sections that can be open at once.
    const READER_SLOTS: usize = 128;
    /// Retired pages gathered before a reclaim is attempted.
    const RECLAIM_BATCH: usize = 64;

    /// A userspace page allocator: one zeroed, 4 KiB-aligned reservation of `capacity` pages
    /// (the OS commits pages on first touch), a free list, and epoch-based deferred reuse.
    ///
    /// Epochs: a reader publishes the global epoch it saw in a slot while it walks; a retired
    /// page is stamped with the epoch, which is then advanced. A page is reused once no slot
    /// holds an epoch at or below its stamp — every reader that could have seen its link is gone.
    pub struct Arena {
        base: NonNull<u8>,
        layout: Layout,
        capacity: usize,
        next: AtomicUsize,
        /// Reusable pages, handed out lowest first: tables built one after another then sit
        /// in ascending memory, as fresh ones do (a LIFO order halves the fill rate).
        free: Mutex<BinaryHeap<Reverse<u32>>>,
        retired: Mutex<Vec<(u32, u64)>>,
        epoch: AtomicU64,
        readers: [AtomicU64; READER_SLOTS],
        in_use: AtomicU64,
        peak: AtomicU64,
    }

    // SAFETY: the reservation is owned by the arena and only reached through atomics
    // (`Table` entries) or under the arena's own locks; nothing is tied to a thread.
    unsafe impl Send for Arena {}
    // SAFETY: as above; every shared access goes through atomics or mutexes.
    unsafe impl Sync for Arena {}

    impl core::fmt::Debug for Arena {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("Arena")
                .field("capacity", &self.capacity)
                .field("in_use", &self.pages_in_use())
                .finish_non_exhaustive()
        }
    }

    impl Arena {
        /// Reserves room for `capacity` pages; `None` if the reservation fails.
        pub fn new(capacity: usize) -> Option<Self> {
            let capacity = capacity.clamp(1, u32::MAX as usize);
            let layout =
                Layout::from_size_align(capacity.checked_mul(PAGE_SIZE)?, PAGE_SIZE).ok()?;
            // SAFETY: the layout has a non-zero size.
            let base = NonNull::new(unsafe { alloc_zeroed(layout) })?;
            Some(Self {
                base,
                layout,
                capacity,
                next: AtomicUsize::new(0),
                free: Mutex::new(BinaryHeap::new()),
                retired: Mutex::new(Vec::new()),
                epoch: AtomicU64::new(1),
                readers: [const { AtomicU64::new(0) }; READER_SLOTS],
                in_use: AtomicU64::new(0),
                peak: AtomicU64::new(0),
            })
        }

        pub fn capacity(&self) -> usize {
            self.capacity
        }

        /// Most pages in use at once.
        pub fn peak_pages(&self) -> u64 {
            self.peak.load(Ordering::Relaxed)
        }

        /// Retired pages not yet reusable.
        pub fn pages_retired(&self) -> usize {
            self.retired.lock().unwrap_or_else(|e| e.into_inner()).len()
        }

        fn page_ptr(&self, index: usize) -> *mut Table {
            // SAFETY: callers pass `index < capacity`, so the offset stays inside the
            // reservation.
            unsafe { self.base.as_ptr().add(index * PAGE_SIZE).cast() }
        }

        fn index_of(&self, pa: Hpa) -> Option<usize> {
            let off = pa.0.checked_sub(PHYS_BASE.0)?;
            if off % PAGE_SIZE as u64 != 0 {
                return None;
            }
            let index = usize::try_from(off / PAGE_SIZE as u64).ok()?;
            (index < self.next.load(Ordering::Acquire).min(self.capacity)).then_some(index)
        }

        /// A page with every entry `init`, or as it comes when `init` is `None`: a reused one,
        /// or the next never-used one (zero: the reservation is zeroed memory).
        fn alloc(&self, init: Option<u64>) -> Option<Hpa> {
            let reused = {
                let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
                if free.is_empty() && self.next.load(Ordering::Relaxed) >= self.capacity {
                    drop(free);
                    self.reclaim();
                    free = self.free.lock().unwrap_or_else(|e| e.into_inner());
                }
                free.pop().map(|Reverse(page)| page)
            };
            let (index, fresh) = match reused {
                Some(page) => (page as usize, false),
                None => {
                    let index = self.next.fetch_add(1, Ordering::AcqRel);
                    if index >= self.capacity {
                        self.next.store(self.capacity, Ordering::Release);
                        return None;
                    }
                    (index, true)
                }
            };
            if let Some(init) = init.filter(|&v| v != 0 || !fresh) {
                // SAFETY: `index < capacity`; `Table` is atomics only, so a shared reference
                // is sound even if a (misbehaving) walker still reads it.
                let table = unsafe { &*self.page_ptr(index) };
                for e in table {
                    e.store(init, Ordering::Relaxed);
                }
            }
            let n = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
            self.peak.fetch_max(n, Ordering::Relaxed);
            Some(PHYS_BASE.offset((index * PAGE_SIZE) as u64))
        }

        /// Moves retired pages no reader can still see to the free list.
        pub fn reclaim(&self) {
            fence(Ordering::SeqCst);
            let oldest_reader = self
                .readers
                .iter()
                .map(|r| r.load(Ordering::SeqCst))
                .filter(|&e| e != 0)
                .min()
                .unwrap_or(u64::MAX);
            let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
            let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
            retired.retain(|&(page, stamp)| {
                if stamp < oldest_reader {
                    free.push(Reverse(page));
                    false
                } else {
                    true
                }
            });
        }
    }

    impl Drop for Arena {
        fn drop(&mut self) {
            // SAFETY: `base` came from `alloc_zeroed` with this very layout.
            unsafe { dealloc(self.base.as_ptr(), self.layout) };
        }
    }

    /// An open read-side section of an [`Arena`].
    #[derive(Debug)]
    pub struct ArenaReadGuard<'a> {
        slot: &'a AtomicU64,
    }

    impl Drop for ArenaReadGuard<'_> {
        fn drop(&mut self) {
            self.slot.store(0, Ordering::Release);
        }
    }

    impl PageAllocator for Arena {
        type ReadGuard<'a> = ArenaReadGuard<'a>;

        fn alloc_table(&self, init: u64) -> Option<Hpa> {
            self.alloc(Some(init))
        }

        fn alloc_table_to_fill(&self) -> Option<Hpa> {
            self.alloc(None)
        }

        fn free_table(&self, pa: Hpa) {
            let Some(index) = self.index_of(pa) else {
                return;
            };
            self.in_use.fetch_sub(1, Ordering::Relaxed);
            let stamp = self.epoch.fetch_add(1, Ordering::SeqCst);
            let batch = {
                let mut retired = self.retired.lock().unwrap_or_else(|e| e.into_inner());
                retired.push((index as u32, stamp));
                retired.len()
            };
            if batch >= RECLAIM_BATCH {
                self.reclaim();
            }
        }

        fn table(&self, pa: Hpa) -> Option<&Table> {
            let index = self.index_of(pa)?;
            // SAFETY: `index` is below the bump pointer, so the page lies inside the zeroed
            // reservation; `Table` is atomics only, so shared references are sound.
            Some(unsafe { &*self.page_ptr(index) })
        }

        fn read_lock(&self) -> ArenaReadGuard<'_> {
            loop {
                let epoch = self.epoch.load(Ordering::SeqCst);
                for slot in &self.readers {
                    if slot
                        .compare_exchange(0, epoch, Ordering::SeqCst, Ordering::Relaxed)
                        .is_ok()
                    {
                        // Order the slot's publication before every table read of the section.
                        fence(Ordering::SeqCst);
                        return ArenaReadGuard { slot };
                    }
                }
                std::thread::yield_now();
            }
        }

        fn pages_in_use(&self) -> u64 {
            self.in_use.load(Ordering::Relaxed)
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn pages_are_aligned_zeroed_and_bounded() {
            let arena = Arena::new(3).unwrap();
            let pages: Vec<_> = (0..3).map(|_| arena.alloc_table(0).unwrap()).collect();
            assert!(arena.alloc_table(0).is_none());
            for &pa in &pages {
                assert!(pa.is_aligned(PAGE_SIZE as u64));
                let t = arena.table(pa).unwrap();
                assert!(t.iter().all(|e| e.load(Ordering::Relaxed) == 0));
                assert_eq!(t.as_ptr() as usize % PAGE_SIZE, 0);
            }
            assert!(arena.table(pages[0] + 8).is_none());
            assert!(arena.table(Hpa(0)).is_none());
            assert_eq!(arena.pages_in_use(), 3);
        }

        #[test]
        fn reused_pages_go_out_lowest_first_and_zeroed_unless_to_fill() {
            let arena = Arena::new(4).unwrap();
            let pages: Vec<_> = (0..4).map(|_| arena.alloc_table(0).unwrap()).collect();
            for &pa in pages.iter().rev() {
                arena.table(pa).unwrap()[3].store(9, Ordering::Relaxed);
                arena.free_table(pa);
            }
            arena.reclaim();
            assert_eq!(arena.alloc_table_to_fill(), Some(pages[0]));
            assert_eq!(arena.alloc_table(1 << 63), Some(pages[1]));
            assert!(
                arena
                    .table(pages[1])
                    .unwrap()
                    .iter()
                    .all(|e| e.load(Ordering::Relaxed) == 1 << 63)
            );
            // A page to fill is not cleared first: its writer overwrites every entry.
            assert_eq!(arena.table(pages[0]).unwrap()[3].load(Ordering::Relaxed), 9);
        }

        #[test]
        fn retired_page_waits_for_older_readers() {
            let arena = Arena::new(1).unwrap();
            let pa = arena.alloc_table(0).unwrap();
            arena.table(pa).unwrap()[7].store(42, Ordering::Relaxed);
            let guard = arena.read_lock();
            arena.free_table(pa);
            assert_eq!(arena.pages_in_use(), 0);
            // The reader may still be looking at the page: no reuse, its content intact.
            assert!(arena.alloc_table(0).is_none());
            assert_eq!(arena.table(pa).unwrap()[7].load(Ordering::Relaxed), 42);
            drop(guard);
            // A reader that starts after the retirement does not hold it back.
            let _late = arena.read_lock();
            let again = arena.alloc_table(0).unwrap();
            assert_eq!(again, pa);
            assert_eq!(arena.table(pa).unwrap()[7].load(Ordering::Relaxed), 0);
        }
    }
}
