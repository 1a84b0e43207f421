//! What the sharing engine needs from the system it runs on, as one trait ([`Platform`], after
//! `Hal` in rcore-os/virtio-drivers): table memory, the IOMMU driver, pinning, an event sink,
//! a clock for timestamps and a timer for measured work. The kernel provides them from
//! `alloc_page`/RCU, the VT-d driver, `pin_user_pages`, tracepoints and `ktime_get_ns`; the
//! simulator provides userspace fakes (`crate::sim::platform`), kept apart from the engine.

use crate::decision::addr::{Hpa, Level};
use crate::event::EventSink;
use crate::event::clock::Clock;
use crate::iommu::domain::IommuDomain;
use crate::iommu::iotlb::{FlushOutcome, FlushRequest};
use crate::sharing::pin::Pinner;
use crate::table::mmu::TdpMmu;
use crate::table::page_alloc::PageAllocator;

/// The services one VM's sharing engine runs on; a type-level bundle (no value of it exists):
/// the values are handed over in [`Parts`].
pub trait Platform {
    /// Page-table memory, shared by the vCPUs' MMU and a separate IOMMU table (a handle: it is
    /// copied into each MMU).
    type Alloc: PageAllocator + Copy;
    /// The IOMMU driver of the assigned device's domain.
    type Iommu: IommuDriver;
    /// Pins guest memory for DMA.
    type Pinner: Pinner;
    /// Where every event goes (cloned into each MMU; clones feed the same stream).
    type Sink: EventSink + Clone;
    /// Event timestamps.
    type Clock: Clock + Clone;
    /// Measures real work (pre-population time).
    type Timer: Clock;
}

/// A TDP MMU on the platform's table memory, event sink and clock.
pub type PlatformMmu<P> =
    TdpMmu<<P as Platform>::Alloc, <P as Platform>::Sink, <P as Platform>::Clock>;

/// The platform's values for one engine.
pub struct Parts<P: Platform> {
    pub alloc: P::Alloc,
    pub iommu: P::Iommu,
    pub pinner: P::Pinner,
    pub sink: P::Sink,
    pub clock: P::Clock,
    pub timer: P::Timer,
}

impl<P: Platform> core::fmt::Debug for Parts<P> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Parts").finish_non_exhaustive()
    }
}

/// What the engine asks of the IOMMU driver: the notifications of the sharing protocol.
pub trait IommuDriver {
    /// The domain the assigned device is in.
    fn domain_id(&self) -> u16;
    /// The level of the roots the IOMMU walks for this domain.
    fn levels(&self) -> Level;
    /// Root update: walk `root` from now on (`None`: no table, every DMA faults), dropping every
    /// cached translation of the domain.
    fn switch_root(&self, root: Option<Hpa>) -> FlushOutcome;
    /// Content update: drop the cached translations `request` covers.
    fn invalidate(&self, request: FlushRequest) -> FlushOutcome;
}

impl IommuDriver for &IommuDomain<'_> {
    fn domain_id(&self) -> u16 {
        self.id
    }
    fn levels(&self) -> Level {
        self.walker().levels
    }
    fn switch_root(&self, root: Option<Hpa>) -> FlushOutcome {
        self.set_root(root)
    }
    fn invalidate(&self, request: FlushRequest) -> FlushOutcome {
        self.flush(request)
    }
}
