//! The L2 VM: one vCPU in 32-bit protected mode running the payload (`payload/payload.s`),
//! memslots as the sequence gives them, on rust-vmm's kvm-ioctls.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, RawFd};

use anyhow::{Context, bail, ensure};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};

use super::memory::{Backing, Placed};
use crate::sys::errno_text;
use crate::uapi::{KVM_PRE_FAULT_MEMORY, PreFaultMemory};

/// The payload, assembled by build.rs.
pub const PAYLOAD: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/payload.bin"));
/// Where it runs: conventional memory, inside RAM in every layout QEMU's sequences leave when
/// the vCPU runs.
pub const PAYLOAD_GPA: u64 = 0x8000;
/// The port its result comes out of.
const RESULT_PORT: u16 = 0x10;
/// The payload's FILL step: dword i = seed + i * this.
const FILL_STEP: u32 = 0x9e37_79b9;

/// What the payload does in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `dwords` dwords of the pattern of `seed` at `gpa`.
    Fill { gpa: u64, dwords: u32, seed: u32 },
    /// One write to each of `pages` pages from `gpa`.
    Touch { gpa: u64, pages: u32 },
    /// The checksum of `dwords` dwords at `gpa`.
    Sum { gpa: u64, dwords: u32 },
}

/// The bytes the payload's FILL writes.
pub fn pattern(seed: u32, dwords: u32) -> Vec<u8> {
    (0..dwords)
        .flat_map(|i| seed.wrapping_add(i.wrapping_mul(FILL_STEP)).to_le_bytes())
        .collect()
}

/// The checksum the payload's SUM computes over `bytes` (whole dwords).
pub fn checksum(bytes: &[u8]) -> u32 {
    bytes.chunks_exact(4).fold(0u32, |acc, d| {
        acc.rotate_left(5) ^ u32::from_le_bytes([d[0], d[1], d[2], d[3]])
    })
}

/// A memslot as the L2 has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub as_id: u8,
    pub slot: u16,
    pub gpa: u64,
    pub size: u64,
    pub flags: u32,
    /// The host address of its memory.
    pub host: u64,
}

impl Slot {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        gpa >= self.gpa && gpa + len <= self.end()
    }

    pub fn readonly(&self) -> bool {
        self.flags & kvm_bindings::KVM_MEM_READONLY != 0
    }
}

/// The VM, its vCPU and its present memslots.
#[derive(Debug)]
pub struct L2 {
    pub vm: VmFd,
    vcpu: VcpuFd,
    slots: BTreeMap<(u8, u16), Slot>,
}

/// A flat 32-bit segment.
fn flat(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

impl L2 {
    /// A VM with one vCPU in 32-bit protected mode (no paging), its CPUID without VMX and SVM:
    /// a guest offered nested virtualization could run its own TDP tables (vEPT/vNPT), which
    /// sharing refuses.
    pub fn new(kvm: &Kvm) -> anyhow::Result<L2> {
        let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
        let vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .context("KVM_GET_SUPPORTED_CPUID")?;
        for e in cpuid.as_mut_slice() {
            match e.function {
                1 => e.ecx &= !(1 << 5),           // VMX
                0x8000_0001 => e.ecx &= !(1 << 2), // SVM
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
        let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
        sregs.cs = flat(0x8, 0xb);
        for seg in [
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            *seg = flat(0x10, 0x3);
        }
        sregs.cr0 = 0x11; // PE | ET
        sregs.cr4 = 0;
        sregs.efer = 0;
        vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
        Ok(L2 {
            vm,
            vcpu,
            slots: BTreeMap::new(),
        })
    }

    pub fn vm_fd(&self) -> RawFd {
        self.vm.as_raw_fd()
    }

    pub fn vcpu_fd(&self) -> RawFd {
        self.vcpu.as_raw_fd()
    }

    /// `KVM_SET_USER_MEMORY_REGION` for `s` (an add, a move or a flags change): the errno
    /// when KVM refuses.
    pub fn set_slot(&mut self, s: Slot) -> Result<(), i32> {
        let region = kvm_userspace_memory_region {
            slot: (u32::from(s.as_id) << 16) | u32::from(s.slot),
            flags: s.flags,
            guest_phys_addr: s.gpa,
            memory_size: s.size,
            userspace_addr: s.host,
        };
        // SAFETY: `host` points into the lab's Backing, which outlives the VM (the VM is
        // dropped first) and is `size` bytes long there (Backing::host checked it).
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.errno())?;
        self.slots.insert((s.as_id, s.slot), s);
        Ok(())
    }

    /// Deletes a slot (size 0): the slot it was, or the errno.
    pub fn delete_slot(&mut self, as_id: u8, slot: u16) -> Result<Slot, i32> {
        let Some(old) = self.slots.get(&(as_id, slot)).copied() else {
            return Err(libc::ENOENT);
        };
        let region = kvm_userspace_memory_region {
            slot: (u32::from(as_id) << 16) | u32::from(slot),
            flags: 0,
            guest_phys_addr: old.gpa,
            memory_size: 0,
            userspace_addr: old.host,
        };
        // SAFETY: deleting a slot maps nothing.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|e| e.errno())?;
        self.slots.remove(&(as_id, slot));
        Ok(old)
    }

    pub fn slot(&self, as_id: u8, slot: u16) -> Option<Slot> {
        self.slots.get(&(as_id, slot)).copied()
    }

    /// The present slots of address space 0.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.values().filter(|s| s.as_id == 0)
    }

    /// The slot of address space 0 holding `[gpa, gpa + len)`.
    pub fn slot_at(&self, gpa: u64, len: u64) -> Option<Slot> {
        self.slots().find(|s| s.contains(gpa, len)).copied()
    }

    /// The present slots of address space 0 by address, for the guest view.
    pub fn placed(&self) -> Vec<Placed> {
        let mut placed: Vec<Placed> = self
            .slots()
            .map(|s| Placed {
                gpa: s.gpa,
                size: s.size,
                host: s.host,
            })
            .collect();
        placed.sort_unstable_by_key(|p| p.gpa);
        placed
    }

    /// Runs the payload once: `op`'s result (FILL and TOUCH give 0, SUM the checksum).
    pub fn run(&mut self, backing: &Backing, op: Op) -> anyhow::Result<u32> {
        let (code, gpa, count, seed) = match op {
            Op::Fill { gpa, dwords, seed } => (1, gpa, dwords, seed),
            Op::Touch { gpa, pages } => (2, gpa, pages, 0),
            Op::Sum { gpa, dwords } => (3, gpa, dwords, 0),
        };
        ensure!(count > 0, "the payload takes a count of at least 1");
        ensure!(
            self.slot_at(PAYLOAD_GPA, PAYLOAD.len() as u64).is_some(),
            "no memslot holds the payload at {PAYLOAD_GPA:#x}"
        );
        ensure!(
            gpa <= u64::from(u32::MAX),
            "the payload runs without paging: {gpa:#x} is above 4 GiB"
        );
        backing
            .guest(&self.placed())?
            .write_slice(PAYLOAD, GuestAddress(PAYLOAD_GPA))
            .context("writing the payload")?;
        let mut regs = self.vcpu.get_regs().context("KVM_GET_REGS")?;
        regs.rip = PAYLOAD_GPA;
        regs.rflags = 2;
        regs.rax = code;
        regs.rdi = gpa;
        regs.rcx = u64::from(count);
        regs.rbx = u64::from(seed);
        self.vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
        loop {
            match self.vcpu.run() {
                Ok(VcpuExit::IoOut(RESULT_PORT, data)) => {
                    let mut v = [0u8; 4];
                    let n = data.len().min(4);
                    v[..n].copy_from_slice(&data[..n]);
                    let result = u32::from_le_bytes(v);
                    ensure!(result != u32::MAX, "the payload did not know {op:?}");
                    return Ok(result);
                }
                Ok(VcpuExit::MmioRead(addr, _) | VcpuExit::MmioWrite(addr, _)) => {
                    bail!("the payload ({op:?}) reached {addr:#x}, which no memslot holds")
                }
                Ok(VcpuExit::Hlt) => bail!("the payload halted before reporting ({op:?})"),
                Ok(other) => bail!("unexpected exit {other:?} running {op:?}"),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => bail!("KVM_RUN: {}", errno_text(e.errno())),
            }
        }
    }

    /// `KVM_PRE_FAULT_MEMORY` over `[gpa, gpa + size)`, until done (the ioctl returns after
    /// partial progress when interrupted).
    pub fn prefault(&self, gpa: u64, size: u64) -> Result<(), i32> {
        let mut range = PreFaultMemory {
            gpa,
            size,
            ..PreFaultMemory::default()
        };
        while range.size > 0 {
            // SAFETY: a struct kvm_pre_fault_memory, what KVM_PRE_FAULT_MEMORY takes.
            match unsafe { crate::sys::ioctl(self.vcpu_fd(), KVM_PRE_FAULT_MEMORY, &mut range) } {
                Ok(_) => {}
                Err(libc::EINTR | libc::EAGAIN) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_assembled_and_small() {
        // cld; cmp eax, 1 ... out dx, eax; hlt
        assert_eq!(PAYLOAD[0], 0xfc);
        assert!(PAYLOAD.len() < 256);
        assert!(PAYLOAD.windows(2).any(|w| w == [0xef, 0xf4]));
    }

    #[test]
    fn pattern_and_checksum_are_the_payload_s() {
        let p = pattern(7, 3);
        assert_eq!(&p[..4], &7u32.to_le_bytes());
        assert_eq!(&p[4..8], &7u32.wrapping_add(FILL_STEP).to_le_bytes());
        assert_eq!(p.len(), 12);
        // rol(rol(rol(0,5)^a,5)^b,5)^c
        let (a, b, c) = (
            7u32,
            7u32.wrapping_add(FILL_STEP),
            7u32.wrapping_add(FILL_STEP.wrapping_mul(2)),
        );
        assert_eq!(checksum(&p), ((a.rotate_left(5) ^ b).rotate_left(5)) ^ c);
    }
}
