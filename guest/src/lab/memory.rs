//! The L2's memory: host mappings standing in for the VMM's (QEMU's) memory, and the guest's
//! view of whatever memslots are present.
//!
//! A recorded memslot sequence names each slot's memory by QEMU's userspace address (`ua`);
//! QEMU re-adds slots over the same RAM (the PAM/SMRAM aliases SeaBIOS toggles), so two slots
//! may share memory. [`Backing`] maps one anonymous region per contiguous extent of the
//! recorded addresses and translates `ua` into it, keeping every alias an alias.
//! [`Backing::guest`] is the guest-physical view of the present slots, as vm-memory's
//! `GuestMemoryMmap` over that same memory.

use std::collections::BTreeMap;

use anyhow::{Context, ensure};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// One anonymous mapping backing the recorded addresses `[ua, ua + len)`.
#[derive(Debug)]
struct Pool {
    ua: u64,
    region: MmapRegion,
}

/// Host memory for every address a memslot sequence uses.
#[derive(Debug, Default)]
pub struct Backing {
    pools: Vec<Pool>,
}

/// A present memslot as the guest view needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub gpa: u64,
    pub size: u64,
    /// The host address of its first byte.
    pub host: u64,
}

impl Backing {
    /// Maps the union of `extents` (recorded address, length): one mapping per contiguous
    /// run. Nothing is touched: the memory is allocated when the guest, the device or a pin
    /// first touches it (`MAP_NORESERVE`).
    pub fn new(extents: impl IntoIterator<Item = (u64, u64)>) -> anyhow::Result<Self> {
        let mut runs: BTreeMap<u64, u64> = BTreeMap::new();
        for (ua, len) in extents {
            if len == 0 {
                continue;
            }
            let start = ua & !0xfff;
            let end = (ua + len + 0xfff) & !0xfff;
            runs.entry(start)
                .and_modify(|e| *e = (*e).max(end))
                .or_insert(end);
        }
        // Merge overlapping or touching runs.
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (start, end) in runs {
            match merged.last_mut() {
                Some(last) if start <= last.1 => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        let mut pools = Vec::new();
        for (start, end) in merged {
            let len = usize::try_from(end - start).context("an extent larger than memory")?;
            let region = MmapRegion::new(len)
                .with_context(|| format!("mapping {len:#x} bytes for the L2's memory"))?;
            pools.push(Pool { ua: start, region });
        }
        Ok(Self { pools })
    }

    /// Adds a mapping of `len` bytes at recorded address `ua` (the lab's own slots).
    pub fn add(&mut self, ua: u64, len: u64) -> anyhow::Result<()> {
        ensure!(
            self.host(ua, len).is_err(),
            "recorded address {ua:#x} is already backed"
        );
        let region = MmapRegion::new(usize::try_from(len)?)
            .with_context(|| format!("mapping {len:#x} bytes"))?;
        self.pools.push(Pool { ua, region });
        Ok(())
    }

    /// The host address of recorded address `ua`, whose `len` bytes must lie in one mapping.
    pub fn host(&self, ua: u64, len: u64) -> anyhow::Result<u64> {
        self.pools
            .iter()
            .find(|p| ua >= p.ua && ua + len <= p.ua + p.region.size() as u64)
            .map(|p| p.region.as_ptr() as u64 + (ua - p.ua))
            .with_context(|| format!("recorded address {ua:#x}+{len:#x} is not backed"))
    }

    /// The guest-physical view of `slots` (present, non-overlapping, as KVM has them).
    pub fn guest(&self, slots: &[Placed]) -> anyhow::Result<GuestMemoryMmap> {
        let mut regions = Vec::new();
        for s in slots {
            ensure!(
                self.pools.iter().any(|p| {
                    let base = p.region.as_ptr() as u64;
                    s.host >= base && s.host + s.size <= base + p.region.size() as u64
                }),
                "slot at {:#x} points outside the backing",
                s.gpa
            );
            // SAFETY: [host, host + size) lies inside one of this Backing's mappings (checked
            // above), which outlive the view (it borrows `self`'s lifetime through the caller,
            // who drops the view before the Backing); the prot and flags are the mapping's.
            let region = unsafe {
                MmapRegion::build_raw(
                    s.host as *mut u8,
                    usize::try_from(s.size)?,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE,
                )
            }
            .context("a view of slot memory")?;
            regions.push(
                GuestRegionMmap::new(region, GuestAddress(s.gpa))
                    .context("a guest region (overflowing address)")?,
            );
        }
        GuestMemoryMmap::from_regions(regions).context("the guest's memory view")
    }

    /// FNV-1a over every backing mapping's bytes: changes when anything in the L2's memory
    /// changes (the check that a faulting DMA wrote nothing anywhere).
    pub fn digest(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for p in &self.pools {
            // SAFETY: the mapping is live and readable for its whole size; it is read only
            // while no DMA or vCPU runs (the callers' sequencing), so the slice does not change
            // under the read.
            let bytes = unsafe {
                std::slice::from_raw_parts(p.region.as_ptr().cast_const(), p.region.size())
            };
            for chunk in bytes.chunks(8) {
                let mut w = [0u8; 8];
                w[..chunk.len()].copy_from_slice(chunk);
                h ^= u64::from_le_bytes(w);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn aliases_share_memory_and_views_see_it() {
        // QEMU's RAM at ua 0x10000 (64 KiB) and a ROM elsewhere; a slot re-added over the
        // RAM's second half.
        let b = Backing::new([(0x10000, 0x10000), (0x18000, 0x8000), (0x90000, 0x1000)]).unwrap();
        assert_eq!(b.pools.len(), 2);
        let ram = b.host(0x10000, 0x10000).unwrap();
        let alias = b.host(0x18000, 0x8000).unwrap();
        assert_eq!(alias, ram + 0x8000);
        assert!(b.host(0x1f000, 0x2000).is_err());
        let view = b
            .guest(&[
                Placed {
                    gpa: 0,
                    size: 0x10000,
                    host: ram,
                },
                Placed {
                    gpa: 0x100000,
                    size: 0x8000,
                    host: alias,
                },
            ])
            .unwrap();
        view.write_obj(0xdead_beef_u32, GuestAddress(0x8000))
            .unwrap();
        let back: u32 = view.read_obj(GuestAddress(0x100000)).unwrap();
        assert_eq!(back, 0xdead_beef);
        assert_eq!(view.num_regions(), 2);
        let before = b.digest();
        view.write_obj(1u8, GuestAddress(0x100)).unwrap();
        assert_ne!(b.digest(), before);
    }

    #[test]
    fn a_view_outside_the_backing_is_refused() {
        let b = Backing::new([(0x10000, 0x1000)]).unwrap();
        let err = b
            .guest(&[Placed {
                gpa: 0,
                size: 0x2000,
                host: 0x1000,
            }])
            .unwrap_err();
        assert!(err.to_string().contains("outside the backing"), "{err}");
    }
}
