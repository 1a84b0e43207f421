//! The one event model shared by the kernel side, the probes, `sharetop`, the analysis and the bench.
//!
//! An [`Event`] looks the same whether it came from a live kernel (the eBPF probes), from the
//! simulator, or from a replayed trace file: only [`Event::source`] tells them apart. Everything
//! here is `no_std`; serde derives sit behind the `serde` feature and define the field names of the
//! trace file format (`docs/trace-format.md`), so renaming a field is a format change.
//!
//! Units: timestamps and durations are nanoseconds; guest physical ranges are bytes
//! ([`GpaRange`]); `gfn` fields are 4 KiB guest frame numbers; `level` is KVM's numbering
//! (1 = 4 KiB leaf, 2 = 2 MiB, 3 = 1 GiB, 4/5 = the PML4/PML5 root).

pub mod clock;
#[cfg(feature = "serde")]
mod serde_impls;
pub mod slot_tracker;
pub mod splits;
pub mod stats;
#[cfg(feature = "std")]
pub mod trace;

use alloc::string::String;
use core::fmt;

pub use crate::decision::addr::{Gfn, Gpa, Iova, PageSize};
use crate::decision::addr::{Level, bytes_to_frames};
use crate::decision::format::{Perms, PteFormat};
pub use crate::decision::policy::ShareMode;

#[cfg(feature = "serde")]
use serde::{Deserialize, Serialize};

/// Identifies a VM: the VMM's pid for live events, the simulator's VM number otherwise.
pub type VmId = u64;

/// Where an event was observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Source {
    /// The eBPF probes on a running kernel.
    Live,
    /// The deterministic simulator driving this crate.
    Simulator,
    /// Read back from a trace file.
    Replay,
}

/// A range of guest physical (or IO virtual) addresses, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct GpaRange {
    pub start: Gpa,
    pub size: u64,
}

impl GpaRange {
    pub const fn new(start: Gpa, size: u64) -> Self {
        Self { start, size }
    }

    /// `frames` guest frames from `gfn`.
    pub const fn of_frames(gfn: Gfn, frames: u64) -> Self {
        Self::new(gfn.gpa(), crate::decision::addr::frames_to_bytes(frames))
    }

    /// One past the last byte; saturates instead of wrapping.
    pub const fn end(&self) -> Gpa {
        Gpa(self.start.0.saturating_add(self.size))
    }

    /// The range contains `gpa`.
    pub const fn contains(&self, gpa: Gpa) -> bool {
        gpa.0 >= self.start.0 && gpa.0 < self.end().0
    }

    /// Number of 4 KiB frames the range touches.
    pub const fn pages_4k(&self) -> u64 {
        if self.size == 0 {
            return 0;
        }
        let first = self.start.gfn().0;
        let last = bytes_to_frames(self.end().0 - 1);
        last - first + 1
    }
}

/// Why a root was allocated, switched to or freed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum RootCause {
    /// First root of a vCPU / address space.
    Initial,
    /// A memslot deletion or move made KVM invalidate all roots (fast zap).
    MemslotChange,
    /// A vCPU entered or left SMM (the SMM address space has its own root).
    Smm,
    /// The vCPU's MMU context was reset (CR0/CR4/EFER change, nested transition).
    ContextReset,
    /// The last reference went away (after invalidation, or VM teardown).
    Released,
    /// Observed live without enough context to tell.
    Unknown,
}

/// A TDP root: its identity (the root table's physical address for live events, an id in the
/// simulator), its level and its address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Root {
    pub root: u64,
    pub level: u8,
    pub smm: bool,
    pub cause: RootCause,
}

/// Why a range was pre-populated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum PrepopCause {
    /// Sharing began: all pinned memory into the shared table (a full pre-population).
    SharingStart,
    /// A new root replaced the shared one: all pinned memory again (a full pre-population, the
    /// seed design's dominant boot cost).
    NewRoot,
    /// A memslot was added while sharing: its range only.
    MemslotAdd,
    /// A huge page was split: its range only.
    HugePageSplit,
    /// The VMM asked for it (`KVM_PRE_FAULT_MEMORY`): its range only.
    PreFault,
}

impl PrepopCause {
    /// Covers all pinned memory rather than one range.
    pub const fn is_full(self) -> bool {
        matches!(self, PrepopCause::SharingStart | PrepopCause::NewRoot)
    }
}

/// `n` leaves of `size`, as a [`EventKind::PrepopulateEnd`]'s `leaves` (4 KiB, 2 MiB, 1 GiB).
pub const fn leaves_of(size: PageSize, n: u64) -> [u64; 3] {
    match size {
        PageSize::Size4K => [n, 0, 0],
        PageSize::Size2M => [0, n, 0],
        PageSize::Size1G => [0, 0, n],
    }
}

/// What an IOTLB invalidation covered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum FlushScope {
    /// Every domain.
    All,
    /// One domain, every address.
    Domain,
    /// One domain, a range of IO virtual addresses: leaves and the paging-structure cache
    /// entries of the range.
    Range,
    /// One domain, a range, leaf entries only (VT-d's invalidation hint, `IH` = 1): the
    /// paging-structure caches keep their entries, so no table may have been unlinked.
    RangeLeaves,
}

/// A KVM memslot as a memslot event reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Memslot {
    /// Slot id within its address space.
    pub slot: u16,
    /// Address space: 0 normal, 1 SMM.
    pub as_id: u8,
    pub gpa: Gpa,
    pub size: u64,
    /// `KVM_MEM_*` flags (bit 0 dirty logging, bit 1 read-only, bit 2 guest_memfd).
    pub flags: u32,
    /// The VMM's userspace address of the slot's memory (`userspace_addr`); the host memory
    /// behind it, so slots re-added over the same memory can be recognised.
    pub ua: u64,
}

impl Memslot {
    pub const FLAG_LOG_DIRTY: u32 = 1 << 0;
    pub const FLAG_READONLY: u32 = 1 << 1;
    pub const FLAG_GUEST_MEMFD: u32 = 1 << 2;

    pub const fn range(&self) -> GpaRange {
        GpaRange::new(self.gpa, self.size)
    }
}

/// The permission and state bits of a TDP entry, independent of the EPT/NPT encoding.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SpteFlags(u16);

impl SpteFlags {
    pub const PRESENT: SpteFlags = SpteFlags(1 << 0);
    pub const READ: SpteFlags = SpteFlags(1 << 1);
    pub const WRITE: SpteFlags = SpteFlags(1 << 2);
    pub const EXEC: SpteFlags = SpteFlags(1 << 3);
    /// A leaf above level 1 (2 MiB / 1 GiB page).
    pub const HUGE: SpteFlags = SpteFlags(1 << 4);
    pub const ACCESSED: SpteFlags = SpteFlags(1 << 5);
    pub const DIRTY: SpteFlags = SpteFlags(1 << 6);
    /// VT-d second-level snoop (bit 11 in the entry).
    pub const SNOOP: SpteFlags = SpteFlags(1 << 7);
    /// Pinned for DMA: the entry may only change non-zero → non-zero.
    pub const PINNED: SpteFlags = SpteFlags(1 << 8);

    /// The letters of the text form, in bit order.
    const LETTERS: [u8; 9] = *b"prwxhadsP";

    pub const fn empty() -> Self {
        SpteFlags(0)
    }
    pub const fn bits(self) -> u16 {
        self.0
    }
    pub const fn from_bits_truncate(bits: u16) -> Self {
        SpteFlags(bits & ((1 << Self::LETTERS.len()) - 1))
    }
    pub const fn contains(self, other: SpteFlags) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn union(self, other: SpteFlags) -> Self {
        SpteFlags(self.0 | other.0)
    }
    pub const fn difference(self, other: SpteFlags) -> Self {
        SpteFlags(self.0 & !other.0)
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The flags of TDP entry `e` of `format` at `level`.
    pub fn of_entry(format: &PteFormat, e: u64, level: Level) -> SpteFlags {
        if !format.is_present(e) {
            return SpteFlags::empty();
        }
        let mut f = SpteFlags::PRESENT;
        if format.is_leaf(e, level) {
            let p = format.perms(e);
            let pairs = [
                (Perms::R, SpteFlags::READ),
                (Perms::W, SpteFlags::WRITE),
                (Perms::X, SpteFlags::EXEC),
            ];
            for (perm, flag) in pairs {
                if p.contains(perm) {
                    f = f | flag;
                }
            }
            if level > Level::L1 {
                f = f | SpteFlags::HUGE;
            }
            if e & format.dirty != 0 {
                f = f | SpteFlags::DIRTY;
            }
            if format.attrs(e).snoop {
                f = f | SpteFlags::SNOOP;
            }
            if format.is_pinned(e) {
                f = f | SpteFlags::PINNED;
            }
        }
        if e & format.accessed != 0 {
            f = f | SpteFlags::ACCESSED;
        }
        f
    }

    /// Parses the text form written by `Display` (e.g. `prw-h-----`); `None` on a foreign letter.
    pub fn parse(text: &str) -> Option<Self> {
        let bytes = text.as_bytes();
        if bytes.len() != Self::LETTERS.len() {
            return None;
        }
        let mut bits = 0u16;
        for (i, (&b, &letter)) in bytes.iter().zip(Self::LETTERS.iter()).enumerate() {
            if b == letter {
                bits |= 1 << i;
            } else if b != b'-' {
                return None;
            }
        }
        Some(SpteFlags(bits))
    }
}

impl core::ops::BitOr for SpteFlags {
    type Output = SpteFlags;
    fn bitor(self, rhs: SpteFlags) -> SpteFlags {
        self.union(rhs)
    }
}

impl fmt::Display for SpteFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &letter) in Self::LETTERS.iter().enumerate() {
            let c = if self.0 & (1 << i) != 0 { letter } else { b'-' };
            fmt::Write::write_char(f, c as char)?;
        }
        Ok(())
    }
}

impl fmt::Debug for SpteFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpteFlags({self})")
    }
}

#[cfg(feature = "serde")]
impl Serialize for SpteFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> Deserialize<'de> for SpteFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <alloc::borrow::Cow<'de, str>>::deserialize(d)?;
        SpteFlags::parse(&text).ok_or_else(|| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&text),
                &"nine flag letters `prwxhadsP` or `-`",
            )
        })
    }
}

/// What happened. The serde tag (`type`) is the event's name in trace files.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(tag = "type", rename_all = "snake_case"))]
pub enum EventKind {
    /// Pre-population of a pinned range began (seed path 1).
    PrepopulateStart {
        range: GpaRange,
        page_size: PageSize,
        cause: PrepopCause,
    },
    /// Pre-population of a range finished: `entries` leaf entries written in `ns`; `page_size`
    /// is the largest leaf used; `leaves`, where the source counts them, splits `entries` by
    /// size (4 KiB, 2 MiB, 1 GiB) — the kernel tracepoint does not.
    PrepopulateEnd {
        range: GpaRange,
        page_size: PageSize,
        cause: PrepopCause,
        entries: u64,
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        leaves: Option<[u64; 3]>,
        ns: u64,
    },
    /// A new root table was allocated (seed path 2: root update).
    RootAlloc(Root),
    /// A vCPU (or the IOMMU) switched to a root.
    RootSwitch(Root),
    /// A root table was freed.
    RootFree(Root),
    /// All roots invalidated at once (`kvm_mmu_zap_all_fast`).
    FastZap {
        generation: u64,
        pages: u64,
    },
    /// Entries of a range were zapped (`tables`: page tables freed too, not only leaves).
    Zap {
        range: GpaRange,
        tables: bool,
        entries: u64,
    },
    /// A huge leaf at `gfn` of `level` was replaced by a table of smaller leaves.
    HugePageSplit {
        gfn: Gfn,
        level: u8,
    },
    /// A table of leaves at `gfn` was replaced by one huge leaf of `level`.
    HugePageCollapse {
        gfn: Gfn,
        level: u8,
    },
    /// One TDP entry changed.
    SpteSet {
        gfn: Gfn,
        level: u8,
        old: SpteFlags,
        new: SpteFlags,
    },
    /// A TDP page fault taken by a vCPU.
    PageFault {
        gfn: Gfn,
        error_code: u64,
    },
    /// `size` bytes at `iova` were mapped for DMA, taking `ns` (0 when not timed: the IOMMU
    /// driver's tracepoint; a VFIO/iommufd map ioctl is timed and includes pinning).
    IommuMap {
        iova: Iova,
        size: u64,
        ns: u64,
    },
    /// `size` bytes at `iova` were unmapped, taking `ns` (0 when not timed).
    IommuUnmap {
        iova: Iova,
        size: u64,
        ns: u64,
    },
    /// An IOTLB invalidation (seed path 3); `range` is set for the range scopes.
    IotlbFlush {
        scope: FlushScope,
        domain: Option<u32>,
        range: Option<GpaRange>,
        ns: u64,
    },
    /// Guest memory was pinned for DMA (FOLL_LONGTERM).
    Pin {
        range: GpaRange,
        pages: u64,
    },
    /// Pinned guest memory was released.
    Unpin {
        range: GpaRange,
        pages: u64,
    },
    MemslotAdd(Memslot),
    MemslotDelete(Memslot),
    /// A slot moved from `old_gpa` to `slot.gpa`.
    MemslotMove {
        old_gpa: Gpa,
        slot: Memslot,
    },
    /// Only the flags of a slot changed (e.g. dirty logging on/off).
    MemslotFlags {
        old_flags: u32,
        slot: Memslot,
    },
    SharingRequested {
        mode: ShareMode,
    },
    SharingStarted {
        mode: ShareMode,
        handle: u64,
    },
    /// Sharing ended; `unpinned` pages were released.
    SharingStopped {
        mode: ShareMode,
        unpinned: u64,
    },
    /// The handshake refused sharing; `reason` names every failed prerequisite.
    SharingRefused {
        mode: ShareMode,
        reason: String,
    },
    /// The device faulted on `iova`; `resolved` when the TDP fault path mapped it.
    IoPageFault {
        iova: Iova,
        write: bool,
        resolved: bool,
    },
    /// A vCPU entered (`enter`) or left SMM (`kvm:kvm_smm_transition`): its MMU context is
    /// reset, and it runs on the root of the other address space.
    SmmTransition {
        enter: bool,
    },
    /// A vCPU wrote control register `cr` (0 or 4): `value` when the tracepoint carries it
    /// (`kvm:kvm_cr`), `None` when only the exit was seen (`kvm:kvm_exit`, e.g. under TCG's SVM
    /// without decode assists). A change of the MMU-role bits resets the vCPU's MMU context.
    CrWrite {
        cr: u8,
        #[cfg_attr(
            feature = "serde",
            serde(default, skip_serializing_if = "Option::is_none")
        )]
        value: Option<u64>,
    },
    /// The VM's name: its VMM's `-name` (or its program), as the recorder found it when the
    /// VM's first event came; written once, before that event. Traces carry no other identity
    /// than the VMM's pid, which means nothing once the VMM has exited.
    VmName {
        name: String,
    },
}

impl EventKind {
    /// Every event name (the trace format's `type` tag), in declaration order.
    pub const NAMES: [&'static str; 28] = [
        "prepopulate_start",
        "prepopulate_end",
        "root_alloc",
        "root_switch",
        "root_free",
        "fast_zap",
        "zap",
        "huge_page_split",
        "huge_page_collapse",
        "spte_set",
        "page_fault",
        "iommu_map",
        "iommu_unmap",
        "iotlb_flush",
        "pin",
        "unpin",
        "memslot_add",
        "memslot_delete",
        "memslot_move",
        "memslot_flags",
        "sharing_requested",
        "sharing_started",
        "sharing_stopped",
        "sharing_refused",
        "io_page_fault",
        "smm_transition",
        "cr_write",
        "vm_name",
    ];

    /// This event's name, as written in trace files.
    pub const fn name(&self) -> &'static str {
        Self::NAMES[self.index()]
    }

    /// Position in [`EventKind::NAMES`]; stable for a given format version.
    pub const fn index(&self) -> usize {
        match self {
            EventKind::PrepopulateStart { .. } => 0,
            EventKind::PrepopulateEnd { .. } => 1,
            EventKind::RootAlloc(_) => 2,
            EventKind::RootSwitch(_) => 3,
            EventKind::RootFree(_) => 4,
            EventKind::FastZap { .. } => 5,
            EventKind::Zap { .. } => 6,
            EventKind::HugePageSplit { .. } => 7,
            EventKind::HugePageCollapse { .. } => 8,
            EventKind::SpteSet { .. } => 9,
            EventKind::PageFault { .. } => 10,
            EventKind::IommuMap { .. } => 11,
            EventKind::IommuUnmap { .. } => 12,
            EventKind::IotlbFlush { .. } => 13,
            EventKind::Pin { .. } => 14,
            EventKind::Unpin { .. } => 15,
            EventKind::MemslotAdd(_) => 16,
            EventKind::MemslotDelete(_) => 17,
            EventKind::MemslotMove { .. } => 18,
            EventKind::MemslotFlags { .. } => 19,
            EventKind::SharingRequested { .. } => 20,
            EventKind::SharingStarted { .. } => 21,
            EventKind::SharingStopped { .. } => 22,
            EventKind::SharingRefused { .. } => 23,
            EventKind::IoPageFault { .. } => 24,
            EventKind::SmmTransition { .. } => 25,
            EventKind::CrWrite { .. } => 26,
            EventKind::VmName { .. } => 27,
        }
    }

    /// The seed design's path this event belongs to, for grouping in views and reports.
    pub const fn path(&self) -> Path {
        match self {
            EventKind::PrepopulateStart { .. }
            | EventKind::PrepopulateEnd { .. }
            | EventKind::SpteSet { .. }
            | EventKind::PageFault { .. }
            | EventKind::HugePageSplit { .. }
            | EventKind::HugePageCollapse { .. } => Path::Prepopulation,
            EventKind::RootAlloc(_)
            | EventKind::RootSwitch(_)
            | EventKind::RootFree(_)
            | EventKind::FastZap { .. }
            | EventKind::Zap { .. }
            | EventKind::SmmTransition { .. }
            | EventKind::CrWrite { .. } => Path::RootUpdate,
            EventKind::IommuMap { .. }
            | EventKind::IommuUnmap { .. }
            | EventKind::IotlbFlush { .. }
            | EventKind::IoPageFault { .. }
            | EventKind::Pin { .. }
            | EventKind::Unpin { .. } => Path::Iommu,
            EventKind::MemslotAdd(_)
            | EventKind::MemslotDelete(_)
            | EventKind::MemslotMove { .. }
            | EventKind::MemslotFlags { .. } => Path::Memslot,
            EventKind::SharingRequested { .. }
            | EventKind::SharingStarted { .. }
            | EventKind::SharingStopped { .. }
            | EventKind::SharingRefused { .. }
            | EventKind::VmName { .. } => Path::Sharing,
        }
    }
}

/// The seed design's three paths, plus memslot and sharing-control events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum Path {
    Prepopulation,
    RootUpdate,
    Iommu,
    Memslot,
    Sharing,
}

impl Path {
    /// The name views and files use (the serde spelling).
    pub const fn name(self) -> &'static str {
        match self {
            Path::Prepopulation => "prepopulation",
            Path::RootUpdate => "root_update",
            Path::Iommu => "iommu",
            Path::Memslot => "memslot",
            Path::Sharing => "sharing",
        }
    }
}

/// One observation.
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize, Deserialize))]
pub struct Event {
    /// Nanoseconds since the trace's start time (the header's `start_unix_ns`).
    pub ts_ns: u64,
    pub vm: VmId,
    #[cfg_attr(
        feature = "serde",
        serde(default, skip_serializing_if = "Option::is_none")
    )]
    pub vcpu: Option<u32>,
    pub source: Source,
    pub kind: EventKind,
}

impl Event {
    pub const fn new(ts_ns: u64, vm: VmId, source: Source, kind: EventKind) -> Self {
        Self {
            ts_ns,
            vm,
            vcpu: None,
            source,
            kind,
        }
    }

    pub const fn on_vcpu(mut self, vcpu: u32) -> Self {
        self.vcpu = Some(vcpu);
        self
    }
}

/// Where the kernel side sends every event it emits. One sink per consumer chain; the kernel
/// build implements it with tracepoints, userspace with a channel, a recorder or a counter.
pub trait EventSink {
    fn emit(&mut self, event: Event);
}

/// Drops everything (a kernel build without tracing).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EventSink for NullSink {
    fn emit(&mut self, _event: Event) {}
}

impl EventSink for alloc::vec::Vec<Event> {
    fn emit(&mut self, event: Event) {
        self.push(event);
    }
}

impl<S: EventSink + ?Sized> EventSink for &mut S {
    fn emit(&mut self, event: Event) {
        (**self).emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_text_round_trips() {
        let f = SpteFlags::PRESENT | SpteFlags::READ | SpteFlags::HUGE | SpteFlags::PINNED;
        let text = alloc::format!("{f}");
        assert_eq!(text, "pr--h---P");
        assert_eq!(SpteFlags::parse(&text), Some(f));
        assert_eq!(SpteFlags::parse("pr--h---"), None);
        assert_eq!(SpteFlags::parse("pr--z---P"), None);
    }

    #[test]
    fn range_pages_count_partial_frames() {
        assert_eq!(GpaRange::new(Gpa(0), 0).pages_4k(), 0);
        assert_eq!(GpaRange::new(Gpa(0), 1).pages_4k(), 1);
        assert_eq!(GpaRange::new(Gpa(0xfff), 2).pages_4k(), 2);
        assert_eq!(GpaRange::new(Gpa(0x1000), 0x2000).pages_4k(), 2);
        assert!(GpaRange::new(Gpa(0x1000), 0x2000).contains(Gpa(0x2fff)));
        assert!(!GpaRange::new(Gpa(0x1000), 0x2000).contains(Gpa(0x3000)));
    }

    #[test]
    fn entry_flags_follow_the_format() {
        let f = PteFormat::EPT4;
        let attrs = crate::decision::format::LeafAttrs {
            snoop: true,
            pinned: true,
            ..Default::default()
        };
        let e = f.leaf(
            crate::decision::addr::Hpa(0x20_0000),
            Level::L2,
            Perms::RW,
            attrs,
        );
        assert_eq!(
            SpteFlags::of_entry(&f, e, Level::L2).to_string(),
            "prw-h--sP"
        );
        assert_eq!(SpteFlags::of_entry(&f, 0, Level::L1), SpteFlags::empty());
        let table = f.table(crate::decision::addr::Hpa(0x1000));
        assert_eq!(
            SpteFlags::of_entry(&f, table, Level::L2).to_string(),
            "p--------"
        );
    }
}
