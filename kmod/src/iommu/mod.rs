//! The IOMMU layer: the DMA walker and the IOTLB.
pub mod iotlb;
pub mod walker;

pub use iotlb::{CostModel, FlushOutcome, FlushRequest, Iotlb};
pub use walker::{Access, DmaFault, DmaWalker, DomainStats, IommuDomain, Translation};
