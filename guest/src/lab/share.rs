//! The series' sharing calls on the L2 VM (`KVM_TDP_SHARE_*`, `arch/x86/kvm/tdp_share.c`).

use crate::sys::{ioctl, ioctl_val};
use crate::uapi::{
    FMT_EPT, FMT_NPT, KVM_CAP_TDP_SHARE, KVM_CHECK_EXTENSION, KVM_TDP_SHARE_PIN,
    KVM_TDP_SHARE_REQUEST, KVM_TDP_SHARE_STOP, MODE_PINNED, TdpShare, TdpShareIommu, TdpShareRange,
};

/// Whether the running kernel can share a VM's TDP table (`KVM_CAP_TDP_SHARE` on the VM).
pub fn offered(vm_fd: i32) -> bool {
    ioctl_val(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_TDP_SHARE).is_ok_and(|r| r > 0)
}

/// What `KVM_TDP_SHARE_REQUEST` granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// `KVM_TDP_SHARE_FMT_*`.
    pub kind: u32,
    pub levels: u32,
    pub max_huge_level: u32,
    pub snoop: bool,
}

impl Granted {
    pub fn format(&self) -> &'static str {
        match self.kind {
            FMT_EPT => "EPT",
            FMT_NPT => "NPT",
            _ => "?",
        }
    }
}

/// Why it was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub errno: i32,
    /// `KVM_TDP_SHARE_R_*` bits (0 when the refusal is no prerequisite's).
    pub refusal: u32,
    pub reason: String,
}

/// `KVM_TDP_SHARE_REQUEST` in the mode KVM implements (pinned, persistent root).
pub fn request(vm_fd: i32, iommu: TdpShareIommu) -> Result<Granted, Refused> {
    let mut req = TdpShare {
        mode: MODE_PINNED,
        iommu,
        ..TdpShare::default()
    };
    // SAFETY: a struct kvm_tdp_share, what KVM_TDP_SHARE_REQUEST takes.
    match unsafe { ioctl(vm_fd, KVM_TDP_SHARE_REQUEST, &mut req) } {
        Ok(_) => Ok(Granted {
            kind: req.kind,
            levels: req.levels,
            max_huge_level: req.max_huge_level,
            snoop: req.snoop != 0,
        }),
        Err(errno) => Err(Refused {
            errno,
            refusal: req.refusal,
            reason: req.reason(),
        }),
    }
}

/// `KVM_TDP_SHARE_PIN`: pages pinned, or the errno.
pub fn pin(vm_fd: i32, gpa: u64, size: u64) -> Result<u64, i32> {
    let mut range = TdpShareRange {
        gpa,
        size,
        ..TdpShareRange::default()
    };
    // SAFETY: a struct kvm_tdp_share_range, what KVM_TDP_SHARE_PIN takes.
    unsafe { ioctl(vm_fd, KVM_TDP_SHARE_PIN, &mut range) }.map(|_| range.pinned)
}

/// `KVM_TDP_SHARE_STOP`.
pub fn stop(vm_fd: i32) -> Result<(), i32> {
    ioctl_val(vm_fd, KVM_TDP_SHARE_STOP, 0).map(|_| ())
}
