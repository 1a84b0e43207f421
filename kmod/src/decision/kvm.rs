//! What the host's KVM does with TDP roots and memslot deletions, by kernel generation: the
//! facts behind how often a design that hands the vCPUs' root to the IOMMU gets a new one.

use core::fmt;
use core::str::FromStr;

/// CR0.PG (`X86_CR0_PG`).
pub const CR0_PG: u64 = 1 << 31;
/// CR0.WP (`X86_CR0_WP`).
pub const CR0_WP: u64 = 1 << 16;
/// CR0 bits in the MMU role: a change resets the vCPU's MMU context (`KVM_MMU_CR0_ROLE_BITS`,
/// arch/x86/kvm/mmu.h).
pub const CR0_ROLE_BITS: u64 = CR0_PG | CR0_WP;
/// CR4 bits in the MMU role (`KVM_MMU_CR4_ROLE_BITS`: PSE, PAE, LA57, SMEP, SMAP, PKE).
pub const CR4_ROLE_BITS: u64 = (1 << 4) | (1 << 5) | (1 << 12) | (1 << 20) | (1 << 21) | (1 << 22);
/// CR0 after RESET (ET, CD, NW).
pub const CR0_RESET: u64 = 0x6000_0010;

/// The KVM generation whose root lifecycle is modelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvmKernel {
    /// Linux 6.12, the target: TDP MMU roots persist until invalidated (since 6.4,
    /// "KVM: x86: Preserve TDP MMU roots until they are explicitly invalidated"), toggling only
    /// CR0.WP does not unload roots with TDP (since 6.4, `kvm_post_set_cr0`), and
    /// `KVM_X86_QUIRK_SLOT_ZAP_ALL` can be disabled so a memslot deletion zaps only that slot
    /// (`kvm_arch_flush_shadow_memslot`, new in 6.12).
    #[default]
    V6_12,
    /// Before 6.4 (the 2021 design's host): a root lives while a vCPU has it loaded — the last
    /// `kvm_mmu_unload` frees it — and every MMU context reset unloads: SMI and RSM
    /// (`kvm_smm_changed`), CR0.PG/WP and CR4 role-bit changes. A memslot deletion always
    /// invalidates every root (`kvm_mmu_zap_all_fast`).
    Pre6_4,
}

impl KvmKernel {
    /// Every generation.
    pub const ALL: [KvmKernel; 2] = [KvmKernel::V6_12, KvmKernel::Pre6_4];

    /// The name in scenario files and on the command line.
    pub const fn name(self) -> &'static str {
        match self {
            KvmKernel::V6_12 => "6.12",
            KvmKernel::Pre6_4 => "pre-6.4",
        }
    }

    /// A root stays until it is invalidated, not only while some vCPU has it loaded.
    pub const fn persistent_roots(self) -> bool {
        matches!(self, KvmKernel::V6_12)
    }

    /// A memslot deletion may zap only the slot (`KVM_X86_QUIRK_SLOT_ZAP_ALL` disabled).
    pub const fn slot_zap(self) -> bool {
        matches!(self, KvmKernel::V6_12)
    }

    /// A CR0 write from `old` to `new` resets the vCPU's MMU context (unloads its root) with
    /// TDP enabled.
    pub const fn cr0_resets(self, old: u64, new: u64) -> bool {
        let changed = old ^ new;
        if changed == CR0_WP && self.persistent_roots() {
            // 6.4+: WP is not part of a TDP root's role; kvm_init_mmu only.
            return false;
        }
        changed & CR0_ROLE_BITS != 0
    }

    /// A CR4 write from `old` to `new` resets the vCPU's MMU context.
    pub const fn cr4_resets(old: u64, new: u64) -> bool {
        (old ^ new) & CR4_ROLE_BITS != 0
    }
}

impl fmt::Display for KvmKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`KvmKernel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownKernel;

impl fmt::Display for UnknownKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a kernel is 6.12 or pre-6.4")
    }
}

impl FromStr for KvmKernel {
    type Err = UnknownKernel;
    fn from_str(s: &str) -> Result<KvmKernel, UnknownKernel> {
        KvmKernel::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or(UnknownKernel)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn only_6_12_keeps_roots_and_ignores_a_wp_toggle() {
        let on = CR0_RESET | CR0_PG | CR0_WP | 1;
        let off = on & !CR0_WP;
        assert!(!KvmKernel::V6_12.cr0_resets(on, off));
        assert!(KvmKernel::Pre6_4.cr0_resets(on, off));
        // Paging on resets both.
        assert!(KvmKernel::V6_12.cr0_resets(CR0_RESET | 1, on));
        // Cache-disable and PE changes reset neither.
        assert!(!KvmKernel::Pre6_4.cr0_resets(CR0_RESET, CR0_RESET | 1));
        assert!(KvmKernel::cr4_resets(0, 1 << 5));
        assert!(!KvmKernel::cr4_resets(0, 1 << 7), "PGE is no role bit");
        assert_eq!("pre-6.4".parse(), Ok(KvmKernel::Pre6_4));
        assert_eq!("6.12".parse::<KvmKernel>().unwrap().to_string(), "6.12");
        assert!("6.1".parse::<KvmKernel>().is_err());
    }
}
