//! Addresses and sizes: guest frame numbers ([`Gfn`]), guest-physical ([`Gpa`]), host-physical
//! ([`Hpa`]) and IO-virtual ([`Iova`]) addresses, paging levels ([`Level`]) and leaf sizes
//! ([`PageSize`]) — and every conversion between them, here and nowhere else.
//!
//! A gfn passed where a gpa is expected is a type error. The raw value stays reachable (`.0`)
//! for the boundaries that need it: a table entry's bits, a tracepoint field, a UAPI struct.
//! Arithmetic on addresses wraps instead of panicking (the kernel builds with overflow checks);
//! the `checked_*` forms are for values that come from outside.

use core::fmt;
use core::ops::{Add, Sub};
use core::str::FromStr;

/// log2 of the 4 KiB base page.
pub const PAGE_SHIFT: u32 = 12;
/// The base page, in bytes.
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// The offset bits of an address within its base page.
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;
/// Entries in one page-table page.
pub const ENTRIES_PER_TABLE: usize = 512;

/// Bytes in `frames` base pages.
pub const fn frames_to_bytes(frames: u64) -> u64 {
    frames.wrapping_shl(PAGE_SHIFT)
}

/// Base pages that `bytes` fill (rounded down).
pub const fn bytes_to_frames(bytes: u64) -> u64 {
    bytes >> PAGE_SHIFT
}

macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(pub u64);

        impl $name {
            /// The byte offset within its 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & PAGE_MASK
            }

            /// Aligned to `size` bytes (a power of two).
            pub const fn is_aligned(self, size: u64) -> bool {
                self.0 & size.wrapping_sub(1) == 0
            }

            /// Rounded down to a multiple of `size` bytes (a power of two).
            pub const fn align_down(self, size: u64) -> Self {
                Self(self.0 & !size.wrapping_sub(1))
            }

            /// `bytes` further on (wrapping).
            pub const fn offset(self, bytes: u64) -> Self {
                Self(self.0.wrapping_add(bytes))
            }

            /// `bytes` further on, or `None` past the end of the address space.
            pub const fn checked_offset(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }

            /// Bytes from `base` up to `self` (wrapping: `base` must not lie above `self`).
            pub const fn bytes_since(self, base: Self) -> u64 {
                self.0.wrapping_sub(base.0)
            }
        }

        impl Add<u64> for $name {
            type Output = $name;
            /// `bytes` further on (wrapping).
            fn add(self, bytes: u64) -> $name {
                self.offset(bytes)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:#x})", stringify!($name), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl fmt::LowerHex for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    };
}

address!(
    /// A guest-physical address: what the guest's memory and the vCPUs' TDP table are indexed by.
    Gpa
);
address!(
    /// A host-physical address: a page of RAM, a device BAR, or a page-table page.
    Hpa
);
address!(
    /// An IO-virtual address: what a device's DMA names. When the IOMMU walks KVM's table the
    /// IOVA space *is* the guest-physical space ([`Iova::gpa`]).
    Iova
);

impl Gpa {
    /// The 4 KiB frame holding this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }

    /// The DMA address of this guest-physical address when the IOMMU translates guest-physical
    /// addresses (no vIOMMU, or a nested one).
    pub const fn iova(self) -> Iova {
        Iova(self.0)
    }
}

impl Iova {
    /// The guest-physical address a device reaches through a table indexed by guest-physical
    /// addresses (KVM's).
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0)
    }

    /// The 4 KiB frame holding this address.
    pub const fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }
}

impl Hpa {
    /// The host page frame number.
    pub const fn pfn(self) -> u64 {
        self.0 >> PAGE_SHIFT
    }

    /// The host address `frames` base pages further on (wrapping).
    pub const fn offset_frames(self, frames: u64) -> Hpa {
        self.offset(frames_to_bytes(frames))
    }
}

/// A guest frame number: a guest-physical address divided by 4 KiB.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Gfn(pub u64);

impl Gfn {
    /// The frame's first byte.
    pub const fn gpa(self) -> Gpa {
        Gpa(self.0.wrapping_shl(PAGE_SHIFT))
    }

    /// The frame's first byte as a DMA address (see [`Gpa::iova`]).
    pub const fn iova(self) -> Iova {
        self.gpa().iova()
    }

    /// `frames` frames further on (wrapping).
    pub const fn offset(self, frames: u64) -> Gfn {
        Gfn(self.0.wrapping_add(frames))
    }

    /// `frames` frames further on, or `None` past the end.
    pub const fn checked_offset(self, frames: u64) -> Option<Gfn> {
        match self.0.checked_add(frames) {
            Some(v) => Some(Gfn(v)),
            None => None,
        }
    }

    /// Frames from `base` up to `self` (wrapping: `base` must not lie above `self`).
    pub const fn frames_since(self, base: Gfn) -> u64 {
        self.0.wrapping_sub(base.0)
    }

    /// The first frame of the `level` entry covering this frame.
    pub const fn align_down(self, level: Level) -> Gfn {
        Gfn(self.0 & !level.frames().wrapping_sub(1))
    }

    /// This frame is the first of an entry at `level`.
    pub const fn is_aligned(self, level: Level) -> bool {
        self.0 & level.frames().wrapping_sub(1) == 0
    }
}

impl Add<u64> for Gfn {
    type Output = Gfn;
    /// `frames` frames further on (wrapping).
    fn add(self, frames: u64) -> Gfn {
        self.offset(frames)
    }
}

impl Sub for Gfn {
    type Output = u64;
    /// Frames between two gfns (wrapping).
    fn sub(self, base: Gfn) -> u64 {
        self.frames_since(base)
    }
}

impl fmt::Debug for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gfn({:#x})", self.0)
    }
}

impl fmt::Display for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::LowerHex for Gfn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

/// A paging level in KVM's numbering: 1 holds 4 KiB leaves, 2 the 2 MiB entries, 3 the 1 GiB
/// ones, 4 and 5 are the PML4 and PML5 roots. Always in 1..=5.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Level(u8);

impl Level {
    /// 4 KiB leaves.
    pub const L1: Level = Level(1);
    /// 2 MiB entries.
    pub const L2: Level = Level(2);
    /// 1 GiB entries.
    pub const L3: Level = Level(3);
    /// 512 GiB entries (the 4-level root).
    pub const L4: Level = Level(4);
    /// 256 TiB entries (the 5-level root).
    pub const L5: Level = Level(5);

    /// Level `n`, if it is one (1..=5).
    pub const fn new(n: u8) -> Option<Level> {
        match n {
            1..=5 => Some(Level(n)),
            _ => None,
        }
    }

    /// The level's number.
    pub const fn get(self) -> u8 {
        self.0
    }

    /// log2 of the bytes one entry at this level maps.
    pub const fn shift(self) -> u32 {
        match self.0 {
            1 => 12,
            2 => 21,
            3 => 30,
            4 => 39,
            _ => 48,
        }
    }

    /// Bytes one entry at this level maps.
    pub const fn size(self) -> u64 {
        match self.0 {
            1 => 1 << 12,
            2 => 1 << 21,
            3 => 1 << 30,
            4 => 1 << 39,
            _ => 1 << 48,
        }
    }

    /// Guest frames one entry at this level covers.
    pub const fn frames(self) -> u64 {
        match self.0 {
            1 => 1,
            2 => 1 << 9,
            3 => 1 << 18,
            4 => 1 << 27,
            _ => 1 << 36,
        }
    }

    /// Guest frames a whole table at this level covers (512 entries).
    pub const fn table_frames(self) -> u64 {
        match self.0 {
            1 => 1 << 9,
            2 => 1 << 18,
            3 => 1 << 27,
            4 => 1 << 36,
            _ => 1 << 45,
        }
    }

    /// The index of `gfn`'s entry in a table at this level.
    pub const fn index(self, gfn: Gfn) -> usize {
        let shift = match self.0 {
            1 => 0,
            2 => 9,
            3 => 18,
            4 => 27,
            _ => 36,
        };
        ((gfn.0 >> shift) & 511) as usize
    }

    /// The level below, if any.
    pub const fn down(self) -> Option<Level> {
        Level::new(self.0.wrapping_sub(1))
    }

    /// The level above, if any.
    pub const fn up(self) -> Option<Level> {
        Level::new(self.0.wrapping_add(1))
    }

    /// The leaf size of this level, for the levels that hold leaves (1..=3).
    pub const fn page_size(self) -> Option<PageSize> {
        PageSize::from_level(self)
    }
}

impl fmt::Debug for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "L{}", self.0)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The size of a leaf mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PageSize {
    /// 4 KiB, level 1.
    Size4K,
    /// 2 MiB, level 2.
    Size2M,
    /// 1 GiB, level 3.
    Size1G,
}

impl PageSize {
    /// Every size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// Bytes of one leaf of this size.
    pub const fn bytes(self) -> u64 {
        self.level().size()
    }

    /// The level leaves of this size sit at.
    pub const fn level(self) -> Level {
        match self {
            PageSize::Size4K => Level::L1,
            PageSize::Size2M => Level::L2,
            PageSize::Size1G => Level::L3,
        }
    }

    /// The leaf size of `level`, if leaves sit there.
    pub const fn from_level(level: Level) -> Option<PageSize> {
        match level.0 {
            1 => Some(PageSize::Size4K),
            2 => Some(PageSize::Size2M),
            3 => Some(PageSize::Size1G),
            _ => None,
        }
    }

    /// Its short name (`4K`, `2M`, `1G`): the trace format's spelling.
    pub const fn name(self) -> &'static str {
        match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        }
    }

    /// Index 0, 1, 2 for 4K, 2M, 1G (for per-size counters).
    pub const fn index(self) -> usize {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => 1,
            PageSize::Size1G => 2,
        }
    }
}

/// A name that is no [`PageSize`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownPageSize;

impl fmt::Display for UnknownPageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a page size is 4K, 2M or 1G")
    }
}

impl FromStr for PageSize {
    type Err = UnknownPageSize;
    /// Parses [`PageSize::name`].
    fn from_str(s: &str) -> Result<PageSize, UnknownPageSize> {
        PageSize::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or(UnknownPageSize)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
#[allow(
    clippy::arithmetic_side_effects,
    clippy::unwrap_used,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;

    #[test]
    fn conversions() {
        assert_eq!(Gpa(0x1234_5678).gfn(), Gfn(0x12345));
        assert_eq!(Gfn(0x12345).gpa(), Gpa(0x1234_5000));
        assert_eq!(Gpa(0x1234_5678).page_offset(), 0x678);
        assert_eq!(Hpa(0x40_0000_0000).offset_frames(3), Hpa(0x40_0000_3000));
        assert_eq!(Gfn(513).align_down(Level::L2), Gfn(512));
        assert!(Gfn(1 << 18).is_aligned(Level::L3));
        assert_eq!(Gfn(7) - Gfn(5), 2);
        assert_eq!(Gpa(u64::MAX).checked_offset(1), None);
        assert_eq!(frames_to_bytes(3), 0x3000);
        assert_eq!(bytes_to_frames(0x3fff), 3);
    }

    #[test]
    fn levels() {
        assert_eq!(Level::new(0), None);
        assert_eq!(Level::new(6), None);
        for n in 1..=5u8 {
            let l = Level::new(n).unwrap();
            assert_eq!(l.size(), 1 << l.shift());
            assert_eq!(l.frames() << 12, l.size());
            assert_eq!(l.table_frames(), l.frames() * 512);
            assert_eq!(l.up().map(Level::frames), (n < 5).then(|| l.frames() * 512));
        }
        assert_eq!(Level::L1.down(), None);
        assert_eq!(Level::L1.index(Gfn(0x1ff)), 511);
        assert_eq!(Level::L2.index(Gfn(1 << 9)), 1);
        for size in PageSize::ALL {
            assert_eq!(PageSize::from_level(size.level()), Some(size));
            assert_eq!(size.name().parse(), Ok(size));
        }
        assert_eq!(Level::L4.page_size(), None);
    }
}
