//! Pinning guest memory for DMA (the kernel's `pin_user_pages(FOLL_LONGTERM)`).
//!
//! Pinning costs are either *modelled* ([`ModelledPinner`], per-page costs from published
//! measurements) or *measured* ([`RealMemoryPinner`], feature `std`: a real anonymous mapping
//! locked with `mlock`). [`Pinner::cost_source`] says which, so every report can say how it got
//! its figures.

use alloc::collections::BTreeSet;
use core::fmt;

use crate::sharing::vm::Memslot;

/// How a cost figure was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CostSource {
    /// Timed on this machine doing the real work.
    Measured,
    /// Computed from a model whose parameters come from published measurements.
    Modelled,
}

impl fmt::Display for CostSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CostSource::Measured => "measured",
            CostSource::Modelled => "modelled",
        })
    }
}

/// Why memory could not be pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinError {
    /// guest_memfd (private) memory cannot be pinned through the user mapping.
    GuestMemfd { slot: u16 },
    /// The host refused (e.g. `mlock` with errno).
    Host { what: &'static str, errno: i32 },
}

impl fmt::Display for PinError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PinError::GuestMemfd { slot } => {
                write!(
                    f,
                    "memslot {slot} is guest_memfd memory, which cannot be pinned"
                )
            }
            PinError::Host { what, errno } => write!(f, "{what} failed with errno {errno}"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for PinError {}

/// Pins and unpins the host memory behind memslots.
pub trait Pinner {
    /// Pins the backing of `slot`; returns the cost in ns.
    fn pin(&mut self, slot: &Memslot) -> Result<u64, PinError>;
    /// Releases the backing of `slot`; returns the cost in ns.
    fn unpin(&mut self, slot: &Memslot) -> u64;
    /// 4 KiB pages pinned now.
    fn pinned_pages(&self) -> u64;
    fn cost_source(&self) -> CostSource;
}

impl<P: Pinner + ?Sized> Pinner for alloc::boxed::Box<P> {
    fn pin(&mut self, slot: &Memslot) -> Result<u64, PinError> {
        (**self).pin(slot)
    }
    fn unpin(&mut self, slot: &Memslot) -> u64 {
        (**self).unpin(slot)
    }
    fn pinned_pages(&self) -> u64 {
        (**self).pinned_pages()
    }
    fn cost_source(&self) -> CostSource {
        (**self).cost_source()
    }
}

/// Per-page pinning costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinCostModel {
    /// Pinning a 4 KiB page never touched before (fault + zeroing + pin). QEMU's pin of 8 GiB
    /// including zeroing took 2.54 s (kernel commit 4d83de6da265): 1211 ns per page.
    pub first_touch_4k_ns: u64,
    /// Pinning an already populated 4 KiB-backed page: VFIO map of 16 GiB with MAP_POPULATE,
    /// 0.280 s (v6.16-rc4 series): 67 ns per page.
    pub populated_4k_ns: u64,
    /// Pinning a page backed by a huge page (THP): 16 GiB in 0.047 s: 11 ns per 4 KiB page.
    pub huge_backed_ns: u64,
    /// Unpinning, per 4 KiB page.
    pub unpin_ns: u64,
}

impl Default for PinCostModel {
    fn default() -> Self {
        Self {
            first_touch_4k_ns: 1211,
            populated_4k_ns: 67,
            huge_backed_ns: 11,
            unpin_ns: 5,
        }
    }
}

/// A pinner that counts pages and models the cost.
#[derive(Debug, Clone)]
pub struct ModelledPinner {
    model: PinCostModel,
    huge_backed: bool,
    /// Host 2 MiB chunks already populated (first touch paid).
    populated: BTreeSet<u64>,
    pinned: u64,
}

impl ModelledPinner {
    pub fn new(model: PinCostModel, huge_backed: bool) -> Self {
        Self {
            model,
            huge_backed,
            populated: BTreeSet::new(),
            pinned: 0,
        }
    }
}

impl Pinner for ModelledPinner {
    fn pin(&mut self, slot: &Memslot) -> Result<u64, PinError> {
        if slot.guest_memfd() {
            return Err(PinError::GuestMemfd { slot: slot.id });
        }
        let pages = slot.frames();
        self.pinned += pages;
        if self.huge_backed {
            return Ok(pages * self.model.huge_backed_ns);
        }
        let mut cost = 0;
        let chunk = 1 << 21;
        let (start, end) = (slot.hpa.0, slot.hpa.0 + slot.size);
        let mut at = start & !(chunk - 1);
        while at < end {
            let from = at.max(start);
            let to = (at + chunk).min(end);
            let n = crate::decision::addr::bytes_to_frames(to - from);
            cost += if self.populated.insert(at) {
                n * self.model.first_touch_4k_ns
            } else {
                n * self.model.populated_4k_ns
            };
            at += chunk;
        }
        Ok(cost)
    }

    fn unpin(&mut self, slot: &Memslot) -> u64 {
        let pages = slot.frames().min(self.pinned);
        self.pinned -= pages;
        pages * self.model.unpin_ns
    }

    fn pinned_pages(&self) -> u64 {
        self.pinned
    }

    fn cost_source(&self) -> CostSource {
        CostSource::Modelled
    }
}

#[cfg(feature = "std")]
pub use real::RealMemoryPinner;

#[cfg(feature = "std")]
mod real {
    use super::*;
    use std::collections::BTreeMap;
    use std::time::Instant;

    /// Host memory is mapped in chunks of this size, on demand, so that slots aliasing the same
    /// host memory (QEMU re-adding a range) share it.
    const CHUNK: u64 = 1 << 30;

    /// Backs guest memory with real anonymous mappings and pins with `mlock`, timing it.
    ///
    /// The slot's `hpa` names the host memory (the VMM's userspace address in scenarios from
    /// QEMU traces); each 1 GiB chunk of that space is mapped on first use.
    #[derive(Debug)]
    pub struct RealMemoryPinner {
        chunks: BTreeMap<u64, (*mut libc::c_void, usize)>,
        pinned: u64,
    }

    impl Default for RealMemoryPinner {
        fn default() -> Self {
            Self::new()
        }
    }

    impl RealMemoryPinner {
        pub fn new() -> Self {
            Self {
                chunks: BTreeMap::new(),
                pinned: 0,
            }
        }

        /// The mapping of the chunk holding `hpa`, created if needed.
        fn chunk(&mut self, hpa: u64) -> Result<*mut u8, PinError> {
            let base = hpa & !(CHUNK - 1);
            if let Some(&(ptr, _)) = self.chunks.get(&base) {
                return Ok(ptr.cast());
            }
            // SAFETY: an anonymous private mapping at an address of the kernel's choice has no
            // effect on existing memory; the result is checked against MAP_FAILED.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    CHUNK as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                    -1,
                    0,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(PinError::Host {
                    what: "mmap",
                    errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                });
            }
            self.chunks.insert(base, (ptr, CHUNK as usize));
            Ok(ptr.cast())
        }

        /// Applies `op` (mlock / munlock) to every chunk piece of `[hpa, hpa + size)`.
        fn each_piece(
            &mut self,
            hpa: u64,
            size: u64,
            what: &'static str,
            op: unsafe extern "C" fn(*const libc::c_void, libc::size_t) -> libc::c_int,
        ) -> Result<(), PinError> {
            let mut at = hpa;
            while at < hpa + size {
                let base = at & !(CHUNK - 1);
                let to = (base + CHUNK).min(hpa + size);
                let ptr = self.chunk(at)?;
                // SAFETY: `at - base < CHUNK` and `to - at <= CHUNK - (at - base)`, so the
                // piece lies inside the chunk's live mapping.
                let rc = unsafe { op(ptr.add((at - base) as usize).cast(), (to - at) as usize) };
                if rc != 0 {
                    return Err(PinError::Host {
                        what,
                        errno: std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
                    });
                }
                at = to;
            }
            Ok(())
        }
    }

    impl Pinner for RealMemoryPinner {
        fn pin(&mut self, slot: &Memslot) -> Result<u64, PinError> {
            if slot.guest_memfd() {
                return Err(PinError::GuestMemfd { slot: slot.id });
            }
            let start = Instant::now();
            self.each_piece(slot.hpa.0, slot.size, "mlock", libc::mlock)?;
            self.pinned += slot.frames();
            Ok(u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX))
        }

        fn unpin(&mut self, slot: &Memslot) -> u64 {
            let start = Instant::now();
            // munlock of a mapped range cannot fail for a reason the caller could act on.
            let _ = self.each_piece(slot.hpa.0, slot.size, "munlock", libc::munlock);
            self.pinned = self.pinned.saturating_sub(slot.frames());
            u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
        }

        fn pinned_pages(&self) -> u64 {
            self.pinned
        }

        fn cost_source(&self) -> CostSource {
            CostSource::Measured
        }
    }

    impl Drop for RealMemoryPinner {
        fn drop(&mut self) {
            for &(ptr, len) in self.chunks.values() {
                // SAFETY: each chunk was mapped by `mmap` with this length and is unmapped once.
                unsafe { libc::munmap(ptr, len) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sharing::vm::SlotKind;

    fn slot(hpa: u64, size: u64) -> Memslot {
        Memslot {
            id: 1,
            as_id: 0,
            gpa: crate::decision::addr::Gpa(0),
            size,
            flags: 0,
            hpa: crate::decision::addr::Hpa(hpa),
            kind: SlotKind::User,
        }
    }

    #[test]
    fn first_touch_costs_more_than_a_repin() {
        let mut p = ModelledPinner::new(PinCostModel::default(), false);
        let s = slot(0x1_0000_0000, 4 << 20);
        let first = p.pin(&s).unwrap();
        assert_eq!(first, 1024 * 1211);
        p.unpin(&s);
        assert_eq!(p.pinned_pages(), 0);
        assert_eq!(p.pin(&s).unwrap(), 1024 * 67);
        let mut huge = ModelledPinner::new(PinCostModel::default(), true);
        assert_eq!(huge.pin(&s).unwrap(), 1024 * 11);
    }

    #[test]
    fn guest_memfd_cannot_be_pinned() {
        let mut p = ModelledPinner::new(PinCostModel::default(), true);
        let s = Memslot {
            flags: crate::event::Memslot::FLAG_GUEST_MEMFD,
            ..slot(0, 4096)
        };
        assert_eq!(p.pin(&s), Err(PinError::GuestMemfd { slot: 1 }));
    }

    #[cfg(feature = "std")]
    #[test]
    fn real_memory_is_locked() {
        let mut p = RealMemoryPinner::new();
        let s = slot(0x7f00_0000_0000, 8 << 20);
        match p.pin(&s) {
            Ok(ns) => {
                assert!(ns > 0);
                assert_eq!(p.pinned_pages(), 2048);
                p.unpin(&s);
                assert_eq!(p.pinned_pages(), 0);
            }
            // Without CAP_IPC_LOCK and a small RLIMIT_MEMLOCK, mlock is refused: say so.
            Err(PinError::Host { what, errno }) => {
                println!("skipped: {what} refused with errno {errno} (no CAP_IPC_LOCK?)")
            }
            Err(e) => panic!("{e}"),
        }
    }
}
