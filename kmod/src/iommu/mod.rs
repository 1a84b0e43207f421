//! The IOMMU layer: the device side of sharing — the hardware page walker that translates DMA
//! through a table exactly as the IOMMU would ([`walker`]), the IOTLB with its invalidations
//! and cost model ([`iotlb`]), and a domain that puts them together ([`domain`]). What the
//! IOMMU *can* do (its capabilities) is negotiated in the decision layer.
//!
//! May use: `decision`, `event`, `table`. Nothing above.

pub mod domain;
pub mod iotlb;
pub mod walker;

pub use domain::{DomainStats, IommuDomain};
pub use iotlb::{CostModel, FlushOutcome, FlushRequest, Iotlb};
pub use walker::{Access, DmaFault, DmaWalker, Translation};
