//! The KVM UAPI this program uses: the stock ioctls it needs and the sharing series' own
//! (`arch/x86/include/uapi/asm/kvm.h` and `include/uapi/linux/kvm.h` of the series), with the
//! layouts checked against their C sizes.

use core::mem::size_of;

const KVMIO: u64 = 0xae;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}

pub const KVM_CREATE_VM: u64 = io(0x01);
pub const KVM_CHECK_EXTENSION: u64 = io(0x03);
pub const KVM_GET_SUPPORTED_CPUID: u64 = iowr(0x05, 8);
pub const KVM_CREATE_VCPU: u64 = io(0x41);
pub const KVM_SET_USER_MEMORY_REGION: u64 = iow(0x46, size_of::<UserMemoryRegion>());
pub const KVM_SET_CPUID2: u64 = iow(0x90, 8);
pub const KVM_PRE_FAULT_MEMORY: u64 = iowr(0xd5, size_of::<PreFaultMemory>());
pub const KVM_TDP_SHARE_REQUEST: u64 = iowr(0xd6, size_of::<TdpShare>());
pub const KVM_TDP_SHARE_STOP: u64 = io(0xd7);
pub const KVM_TDP_SHARE_PIN: u64 = iowr(0xd8, size_of::<TdpShareRange>());

pub const KVM_CAP_PRE_FAULT_MEMORY: u64 = 236;
pub const KVM_CAP_TDP_SHARE: u64 = 239;
pub const KVM_MEM_LOG_DIRTY_PAGES: u32 = 1;

pub const MODE_EXPORTED_IOPF: u32 = 1;
pub const MODE_PINNED: u32 = 3;
pub const FMT_EPT: u32 = 0;
pub const FMT_NPT: u32 = 1;
pub const VIOMMU_SHADOW: u32 = 2;
pub const IOMMU_VTD_SCALABLE: u32 = 1;
pub const IOMMU_F_SP2M: u32 = 1 << 0;
pub const IOMMU_F_SP1G: u32 = 1 << 1;
pub const IOMMU_F_SNOOP: u32 = 1 << 2;
pub const IOMMU_F_COHERENT: u32 = 1 << 3;
pub const R_INVALID: u32 = 1 << 31;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UserMemoryRegion {
    pub slot: u32,
    pub flags: u32,
    pub guest_phys_addr: u64,
    pub memory_size: u64,
    pub userspace_addr: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PreFaultMemory {
    pub gpa: u64,
    pub size: u64,
    pub flags: u64,
    pub padding: [u64; 5],
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TdpShareIommu {
    pub mode: u32,
    pub ept_levels: u32,
    pub npt_levels: u32,
    pub address_width: u32,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct TdpShare {
    pub mode: u32,
    pub flags: u32,
    pub viommu: u32,
    pub pad0: u32,
    pub iommu: TdpShareIommu,
    pub refusal: u32,
    pub kind: u32,
    pub levels: u32,
    pub max_huge_level: u32,
    pub snoop: u32,
    pub pad1: u32,
    pub reason: [u8; 256],
}

impl Default for TdpShare {
    fn default() -> Self {
        Self {
            mode: 0,
            flags: 0,
            viommu: 0,
            pad0: 0,
            iommu: TdpShareIommu::default(),
            refusal: 0,
            kind: 0,
            levels: 0,
            max_huge_level: 0,
            snoop: 0,
            pad1: 0,
            reason: [0; 256],
        }
    }
}

impl TdpShare {
    /// The refusal's reasons, as KVM wrote them.
    pub fn reason(&self) -> String {
        let end = self
            .reason
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.reason.len());
        String::from_utf8_lossy(&self.reason[..end]).into_owned()
    }
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct TdpShareRange {
    pub gpa: u64,
    pub size: u64,
    pub flags: u64,
    pub pinned: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuidEntry2 {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
    pub padding: [u32; 3],
}

/// `struct kvm_cpuid2` with room for `N` entries.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Cpuid2<const N: usize> {
    pub nent: u32,
    pub padding: u32,
    pub entries: [CpuidEntry2; N],
}

/// `IOMMU_HWPT_DATA_KVM` (the series' `include/uapi/linux/iommufd.h`): a hardware page table
/// that is a KVM VM's TDP table.
pub const IOMMU_HWPT_DATA_KVM: u32 = 16;

/// `struct iommu_hwpt_kvm`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct IommuHwptKvm {
    pub vm_fd: u32,
    pub reserved: u32,
}

/// VFIO's ioctl type and base (`include/uapi/linux/vfio.h`).
const fn vfio(nr: u64) -> u64 {
    ((b';' as u64) << 8) | (100 + nr)
}
pub const VFIO_DEVICE_GET_INFO: u64 = vfio(7);
pub const VFIO_DEVICE_GET_REGION_INFO: u64 = vfio(8);
pub const VFIO_DEVICE_RESET: u64 = vfio(11);
pub const VFIO_DEVICE_BIND_IOMMUFD: u64 = vfio(18);
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u64 = vfio(19);
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u64 = vfio(20);

// The C layouts.
const _: () = assert!(size_of::<UserMemoryRegion>() == 32);
const _: () = assert!(size_of::<PreFaultMemory>() == 64);
const _: () = assert!(size_of::<TdpShareIommu>() == 20);
const _: () = assert!(size_of::<TdpShare>() == 316);
const _: () = assert!(size_of::<TdpShareRange>() == 32);
const _: () = assert!(size_of::<CpuidEntry2>() == 40);
const _: () = assert!(KVM_TDP_SHARE_REQUEST == 0xc13c_aed6);
const _: () = assert!(size_of::<IommuHwptKvm>() == 8);
const _: () = assert!(VFIO_DEVICE_BIND_IOMMUFD == 0x3b76);
