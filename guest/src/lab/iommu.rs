//! The IOMMU side: iommufd (rust-vmm's iommufd-ioctls) for the address space and the
//! hardware page tables, the VT-d's capabilities as iommufd reports them, the table a device's
//! context or PASID entry really points at (the VT-d debugfs), and the DMAR faults the L1's
//! driver logs.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd};

use anyhow::{Context, bail};
use iommufd_bindings::iommufd::{
    iommu_hw_info, iommu_hw_info_vtd, iommu_hwpt_alloc, iommu_ioas_alloc, iommu_ioas_map,
    iommu_ioas_unmap, iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE,
    iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE,
};
use iommufd_ioctls::{IommuFd, IommufdError};

use crate::uapi::{
    IOMMU_F_COHERENT, IOMMU_F_SNOOP, IOMMU_F_SP1G, IOMMU_F_SP2M, IOMMU_HWPT_DATA_KVM,
    IOMMU_VTD_SCALABLE, IommuHwptKvm, TdpShareIommu,
};

/// The errno inside an iommufd-ioctls error.
pub fn iommufd_errno(e: &IommufdError) -> i32 {
    use std::error::Error;
    let mut cur: Option<&(dyn Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(sys) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return sys.errno();
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error().unwrap_or(0);
        }
        cur = err.source();
    }
    0
}

/// An iommufd with one IOAS.
pub struct Iommu {
    pub fd: IommuFd,
    pub ioas: u32,
}

impl std::fmt::Debug for Iommu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Iommu")
            .field("fd", &self.fd.as_raw_fd())
            .field("ioas", &self.ioas)
            .finish()
    }
}

impl Iommu {
    /// Opens `/dev/iommu` and allocates an IOAS.
    pub fn open() -> anyhow::Result<Iommu> {
        let fd = IommuFd::new().context("opening /dev/iommu (CONFIG_IOMMUFD)")?;
        let mut alloc = iommu_ioas_alloc {
            size: size_of::<iommu_ioas_alloc>() as u32,
            flags: 0,
            out_ioas_id: 0,
        };
        fd.alloc_iommu_ioas(&mut alloc)
            .context("IOMMU_IOAS_ALLOC")?;
        Ok(Iommu {
            fd,
            ioas: alloc.out_ioas_id,
        })
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `IOMMU_GET_HW_INFO` of a VT-d: its capability and extended capability registers.
    pub fn vtd_registers(&self, dev_id: u32) -> anyhow::Result<(u64, u64)> {
        let mut vtd = iommu_hw_info_vtd::default();
        // SAFETY: iommu_hw_info is plain old data (integers and a union of integers).
        let mut info: iommu_hw_info = unsafe { std::mem::zeroed() };
        info.size = size_of::<iommu_hw_info>() as u32;
        info.dev_id = dev_id;
        info.data_len = size_of::<iommu_hw_info_vtd>() as u32;
        info.data_uptr = &raw mut vtd as u64;
        self.fd
            .get_hw_info(&mut info)
            .context("IOMMU_GET_HW_INFO")?;
        // SAFETY: the kernel wrote out_data_type, the union's only member it sets on return.
        let kind = unsafe { info.__bindgen_anon_1.out_data_type };
        if kind != iommufd_bindings::iommufd::iommu_hw_info_type_IOMMU_HW_INFO_TYPE_INTEL_VTD {
            bail!("the device's IOMMU is no VT-d (hw info type {kind})");
        }
        Ok((vtd.cap_reg, vtd.ecap_reg))
    }

    /// `IOMMU_HWPT_ALLOC` of the series' KVM type: a hardware page table that is the VM's TDP
    /// table. The errno when refused.
    pub fn alloc_kvm_hwpt(&self, dev_id: u32, vm_fd: i32) -> Result<u32, i32> {
        let data = IommuHwptKvm {
            vm_fd: vm_fd as u32,
            reserved: 0,
        };
        let mut alloc = iommu_hwpt_alloc {
            size: size_of::<iommu_hwpt_alloc>() as u32,
            flags: 0,
            dev_id,
            pt_id: self.ioas,
            out_hwpt_id: 0,
            __reserved: 0,
            data_type: IOMMU_HWPT_DATA_KVM,
            data_len: size_of::<IommuHwptKvm>() as u32,
            data_uptr: &raw const data as u64,
            fault_id: 0,
            __reserved2: 0,
        };
        self.fd
            .alloc_iommu_hwpt(&mut alloc)
            .map_err(|e| iommufd_errno(&e))?;
        Ok(alloc.out_hwpt_id)
    }

    /// `IOMMU_IOAS_MAP` of `len` bytes at `user_va` to `iova` (the IOMMU's own table: pins).
    pub fn map(&self, iova: u64, user_va: u64, len: u64, writable: bool) -> anyhow::Result<()> {
        let mut flags = iommufd_ioas_map_flags_IOMMU_IOAS_MAP_FIXED_IOVA
            | iommufd_ioas_map_flags_IOMMU_IOAS_MAP_READABLE;
        if writable {
            flags |= iommufd_ioas_map_flags_IOMMU_IOAS_MAP_WRITEABLE;
        }
        let map = iommu_ioas_map {
            size: size_of::<iommu_ioas_map>() as u32,
            flags,
            ioas_id: self.ioas,
            __reserved: 0,
            user_va,
            length: len,
            iova,
        };
        self.fd
            .map_iommu_ioas(&map)
            .with_context(|| format!("IOMMU_IOAS_MAP {iova:#x}+{len:#x}"))
    }

    /// `IOMMU_IOAS_UNMAP`.
    pub fn unmap(&self, iova: u64, len: u64) -> anyhow::Result<()> {
        let mut unmap = iommu_ioas_unmap {
            size: size_of::<iommu_ioas_unmap>() as u32,
            ioas_id: self.ioas,
            iova,
            length: len,
        };
        self.fd
            .unmap_iommu_ioas(&mut unmap)
            .with_context(|| format!("IOMMU_IOAS_UNMAP {iova:#x}+{len:#x}"))
    }

    /// `IOMMU_DESTROY` of an object (a hardware page table).
    pub fn destroy(&self, id: u32) -> anyhow::Result<()> {
        self.fd
            .destroy_iommu_object(id)
            .with_context(|| format!("IOMMU_DESTROY {id}"))
    }
}

/// Whether the L1 kernel was told its VT-d is QEMU's model (`intel_iommu_tdp_emulated=1`, the
/// series' test-setup parameter): then the unit walks NPT-format tables and counts as coherent.
pub fn vtd_emulated() -> bool {
    let param = "/sys/module/kernel/parameters/intel_iommu_tdp_emulated";
    match std::fs::read_to_string(param) {
        Ok(v) => matches!(v.trim(), "Y" | "1"),
        Err(_) => std::fs::read_to_string("/proc/cmdline").is_ok_and(|c| {
            c.split_whitespace().any(|w| {
                matches!(
                    w,
                    "intel_iommu_tdp_emulated=1" | "intel_iommu_tdp_emulated=Y"
                )
            })
        }),
    }
}

/// What KVM is told of the VT-d, from its registers (VT-d spec 11.4.2/11.4.3): SAGAW (bits
/// 8-12: bit 2 4-level, bit 3 5-level), MGAW (16-21), SLLPS (34-37); ECAP C (0), SC (7),
/// SMTS (43), SMPWC (48). `scalable`: the driver runs the unit in scalable mode, where SMPWC
/// rather than C says whether page walks snoop. Second-level tables have EPT's layout; NPT
/// tables are claimed, and coherency assumed, only for QEMU's model (`emulated`), as the
/// driver does. The driver's own description at attach is what KVM finally checks.
pub fn vtd_caps(cap: u64, ecap: u64, scalable: bool, emulated: bool) -> TdpShareIommu {
    let sagaw = (cap >> 8) & 0x1f;
    let mut levels = 0u32;
    if sagaw & (1 << 2) != 0 {
        levels |= 1 << 4;
    }
    if sagaw & (1 << 3) != 0 {
        levels |= 1 << 5;
    }
    let sllps = (cap >> 34) & 0xf;
    let scalable = scalable && ecap & (1 << 43) != 0;
    let mut flags = 0;
    if sllps & 1 != 0 {
        flags |= IOMMU_F_SP2M;
    }
    if sllps & 2 != 0 {
        flags |= IOMMU_F_SP1G;
    }
    if ecap & (1 << 7) != 0 {
        flags |= IOMMU_F_SNOOP;
    }
    let coherent_bit = if scalable { 48 } else { 0 };
    if ecap & (1 << coherent_bit) != 0 || emulated {
        flags |= IOMMU_F_COHERENT;
    }
    TdpShareIommu {
        mode: if scalable { IOMMU_VTD_SCALABLE } else { 0 },
        ept_levels: levels,
        npt_levels: if emulated { levels } else { 0 },
        address_width: (((cap >> 16) & 0x3f) + 1) as u32,
        flags,
    }
}

/// The second-stage table `bdf`'s translation entry points at, from
/// `/sys/kernel/debug/iommu/intel/dmar_translation_struct`: scalable mode's PASID-table entry
/// (SLPTPTR, bits 12-63 of its first quadword) or legacy mode's context entry (ASR, bits 12-63
/// of its low quadword). `None` when the device has no present entry.
pub fn translation_root(bdf: &str) -> anyhow::Result<Option<u64>> {
    let path = "/sys/kernel/debug/iommu/intel/dmar_translation_struct";
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("reading {path} (debugfs mounted? CONFIG_INTEL_IOMMU_DEBUGFS?)")
    })?;
    Ok(parse_translation_root(&text, bdf))
}

/// [`translation_root`]'s parser. A line: `BB:DD.F\tRT_HI:RT_LO\tCTX_HI:CTX_LO\tPASID\t
/// PTE2:PTE1:PTE0` (PASID -1 and zeros in legacy mode).
pub fn parse_translation_root(text: &str, bdf: &str) -> Option<u64> {
    // "0000:00:03.0" → "00:03.0"
    let short = bdf.split_once(':').map_or(bdf, |(_, rest)| rest);
    let hex = |s: &str| u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[0] != short {
            continue;
        }
        let pasid: i64 = fields[3].parse().ok()?;
        let addr = if pasid >= 0 {
            hex(fields[4].rsplit(':').next()?)?
        } else {
            hex(fields[2].rsplit(':').next()?)?
        };
        let root = addr & !0xfff & ((1 << 52) - 1);
        if root != 0 {
            return Some(root);
        }
    }
    None
}

/// A DMAR fault as the L1's driver logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarFault {
    pub write: bool,
    pub addr: u64,
    pub reason: u32,
    /// The whole message.
    pub text: String,
}

/// Parses `DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x4000000 [fault
/// reason 0x06] PTE Read access is not set` (drivers/iommu/intel/dmar.c, `dmar_fault_do_one`).
pub fn parse_dmar_fault(message: &str) -> Option<DmarFault> {
    let at = message.find("[DMA ")?;
    let rest = &message[at..];
    let write = rest.starts_with("[DMA Write");
    let addr_at = rest.find("fault addr 0x")? + "fault addr 0x".len();
    let addr_end = rest[addr_at..].find(|c: char| !c.is_ascii_hexdigit())? + addr_at;
    let addr = u64::from_str_radix(&rest[addr_at..addr_end], 16).ok()?;
    let reason_at = rest.find("fault reason 0x")? + "fault reason 0x".len();
    let reason_end = rest[reason_at..].find(|c: char| !c.is_ascii_hexdigit())? + reason_at;
    let reason = u32::from_str_radix(&rest[reason_at..reason_end], 16).ok()?;
    Some(DmarFault {
        write,
        addr,
        reason,
        text: message.trim().to_owned(),
    })
}

/// The kernel log from the moment this was opened (`/dev/kmsg`, read without blocking).
#[derive(Debug)]
pub struct KernelLog {
    file: File,
}

impl KernelLog {
    /// Opens `/dev/kmsg` positioned at its end: only messages from now on are read.
    pub fn open() -> anyhow::Result<KernelLog> {
        // SAFETY: open(2) with a constant path; the result is checked and owned by the File.
        let fd = unsafe { libc::open(c"/dev/kmsg".as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
        if fd < 0 {
            bail!("opening /dev/kmsg: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: lseek on the descriptor the File owns.
        unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
        Ok(KernelLog { file })
    }

    /// The messages logged since the last call.
    pub fn read(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 8192];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // "prio,seq,usec,flags;message\n" (continuation lines follow, indented).
                    let rec = String::from_utf8_lossy(&buf[..n]);
                    if let Some((_, msg)) = rec.split_once(';') {
                        out.push(msg.lines().next().unwrap_or("").to_owned());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // EPIPE: records were overwritten before this read; carry on from the next.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(_) => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_is_read_from_the_pasid_entry_or_the_context_entry() {
        // As 6.12's debugfs prints them (print_tbl_walk): scalable mode, then legacy mode.
        let scalable = "IOMMU dmar0: Root Table Address: 0x1234000\n\
B.D.F\tRoot_entry\t\t\t\tContext_entry\t\t\t\tPASID\tPASID_table_entry\n\
00:03.0\t0x0000000000000000:0x0000000001235001\t0x0000000000000000:0x0000000001236001\t0     \t0x0000000000000000:0x0000000000000042:0x0000000104567089\n";
        assert_eq!(
            parse_translation_root(scalable, "0000:00:03.0"),
            Some(0x1_0456_7000)
        );
        let legacy = "00:03.0\t0x0000000000000000:0x0000000001235001\t0x0000000000000102:0x0000000002345003\t-1    \t0x0000000000000000:0x0000000000000000:0x0000000000000000\n";
        assert_eq!(
            parse_translation_root(legacy, "0000:00:03.0"),
            Some(0x234_5000)
        );
        assert_eq!(parse_translation_root(legacy, "0000:00:04.0"), None);
    }

    #[test]
    fn a_dmar_fault_line_gives_address_direction_and_reason() {
        let f = parse_dmar_fault(
            "DMAR: [DMA Write NO_PASID] Request device [00:03.0] fault addr 0x4000000 \
             [fault reason 0x06] PTE Read access is not set",
        )
        .unwrap();
        assert_eq!((f.write, f.addr, f.reason), (true, 0x400_0000, 6));
        let f = parse_dmar_fault(
            "DMAR: [DMA Read PASID 0x0] Request device [00:03.0] fault addr 0x20000000 \
             [fault reason 0x5a] SM: Present bit in PASID table entry is clear",
        )
        .unwrap();
        assert_eq!((f.write, f.addr, f.reason), (false, 0x2000_0000, 0x5a));
        assert!(parse_dmar_fault("DMAR: DRHD: handling fault status reg 2").is_none());
    }

    #[test]
    fn vtd_registers_become_kvm_s_iommu_description() {
        // QEMU 7.2 with aw-bits=48: SAGAW 4-level (bit 10 of CAP), MGAW 47, SLLPS 2M+1G;
        // ECAP with SMTS and SC.
        let cap = (1u64 << 10) | (47 << 16) | (3 << 34);
        let ecap = (1u64 << 43) | (1 << 7);
        let i = vtd_caps(cap, ecap, true, true);
        assert_eq!(i.mode, IOMMU_VTD_SCALABLE);
        assert_eq!((i.ept_levels, i.npt_levels), (1 << 4, 1 << 4));
        assert_eq!(i.address_width, 48);
        // QEMU's model advertises neither C nor SMPWC; the parameter vouches for it.
        assert_eq!(
            i.flags,
            IOMMU_F_SP2M | IOMMU_F_SP1G | IOMMU_F_SNOOP | IOMMU_F_COHERENT
        );
        // Real hardware: EPT-format only, coherency as the mode's bit says.
        let hw = vtd_caps(cap, ecap | (1 << 48), true, false);
        assert_eq!(
            (hw.npt_levels, hw.flags & IOMMU_F_COHERENT),
            (0, IOMMU_F_COHERENT)
        );
        let legacy = vtd_caps(cap, ecap | (1 << 48), false, false);
        assert_eq!((legacy.mode, legacy.flags & IOMMU_F_COHERENT), (0, 0));
        assert_eq!(
            vtd_caps(cap, ecap | 1, false, false).flags & IOMMU_F_COHERENT,
            IOMMU_F_COHERENT
        );
        assert_eq!(vtd_caps(cap, ecap, false, true).mode, 0);
    }
}
