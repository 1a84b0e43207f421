//! QEMU's `edu` device through VFIO's device cdev and iommufd: found in sysfs, bound to
//! vfio-pci, bound to an iommufd, attached to a hardware page table (the KVM-backed one, or an
//! IOAS's own) and driven: BAR0's DMA registers, polled to completion.
//!
//! edu (QEMU `hw/misc/edu.c`): BAR0 0x80 DMA source, 0x88 destination, 0x90 count, 0x98
//! command (bit 0 start and busy, bit 1 direction: 1 = buffer to RAM); the 4 KiB buffer sits at
//! device address 0x40000. A transfer runs on a 100 ms virtual-time timer. QEMU 7.2 aborts on a
//! transfer ending exactly at 0x41000 and on any range outside the buffer, so counts are
//! checked here before anything is written.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use vfio_bindings::bindings::vfio::{
    VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP,
    vfio_device_attach_iommufd_pt, vfio_device_bind_iommufd, vfio_device_detach_iommufd_pt,
    vfio_region_info,
};

use crate::sys::{errno_text, ioctl};
use crate::uapi::{
    VFIO_DEVICE_ATTACH_IOMMUFD_PT, VFIO_DEVICE_BIND_IOMMUFD, VFIO_DEVICE_DETACH_IOMMUFD_PT,
    VFIO_DEVICE_GET_REGION_INFO,
};

const EDU_VENDOR: &str = "0x1234";
const EDU_DEVICE: &str = "0x11e8";
/// The device address of edu's DMA buffer, and its size.
pub const EDU_BUFFER: u64 = 0x40000;
pub const EDU_BUFFER_SIZE: u64 = 0x1000;
/// The largest transfer QEMU 7.2's edu survives (one ending at 0x41000 aborts it).
pub const EDU_MAX_COUNT: u64 = 4095;
const REG_IDENT: u64 = 0x00;
const REG_DMA_SRC: u64 = 0x80;
const REG_DMA_DST: u64 = 0x88;
const REG_DMA_COUNT: u64 = 0x90;
const REG_DMA_CMD: u64 = 0x98;
const CMD_RUN: u64 = 1;
const CMD_TO_RAM: u64 = 2;
const PCI_COMMAND: u64 = 0x4;
const PCI_COMMAND_MEMORY: u16 = 0x2;
const PCI_COMMAND_MASTER: u16 = 0x4;

/// The edu device's PCI address (`0000:00:03.0`), found by vendor and device id.
pub fn find_edu() -> anyhow::Result<String> {
    let dir = Path::new("/sys/bus/pci/devices");
    let entries = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in entries {
        let path = e?.path();
        let read = |f: &str| std::fs::read_to_string(path.join(f)).unwrap_or_default();
        if read("vendor").trim() == EDU_VENDOR && read("device").trim() == EDU_DEVICE {
            return Ok(path
                .file_name()
                .context("a device name")?
                .to_string_lossy()
                .into_owned());
        }
    }
    bail!("no edu device (1234:11e8) on the PCI bus: QEMU needs -device edu")
}

/// Binds `bdf` to vfio-pci (driver_override, then a probe) unless it is bound already, and
/// returns its VFIO device cdev (`/dev/vfio/devices/vfioN`).
pub fn bind_vfio(bdf: &str) -> anyhow::Result<PathBuf> {
    let dev = Path::new("/sys/bus/pci/devices").join(bdf);
    let driver = std::fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    if driver.as_deref() != Some("vfio-pci") {
        if driver.is_some() {
            std::fs::write(dev.join("driver/unbind"), bdf)
                .with_context(|| format!("unbinding {bdf} from {driver:?}"))?;
        }
        std::fs::write(dev.join("driver_override"), "vfio-pci")
            .with_context(|| format!("setting {bdf}'s driver_override"))?;
        std::fs::write("/sys/bus/pci/drivers_probe", bdf)
            .with_context(|| format!("probing {bdf} with vfio-pci"))?;
    }
    let vfio_dev = dev.join("vfio-dev");
    let name = std::fs::read_dir(&vfio_dev)
        .with_context(|| {
            format!(
                "{} is missing: vfio-pci did not take {bdf}, or the kernel lacks \
                 CONFIG_VFIO_DEVICE_CDEV",
                vfio_dev.display()
            )
        })?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("vfio"))
        .with_context(|| format!("no vfioN under {}", vfio_dev.display()))?;
    Ok(Path::new("/dev/vfio/devices").join(name))
}

/// `VFIO_DEVICE_BIND_IOMMUFD`: the device's id in `iommufd`.
fn bind(file: &File, iommufd: i32) -> anyhow::Result<u32> {
    let mut bind = vfio_device_bind_iommufd {
        argsz: size_of::<vfio_device_bind_iommufd>() as u32,
        flags: 0,
        iommufd,
        out_devid: 0,
        token_uuid_ptr: 0,
    };
    // SAFETY: a struct vfio_device_bind_iommufd whose argsz is its size.
    unsafe { ioctl(file.as_raw_fd(), VFIO_DEVICE_BIND_IOMMUFD, &mut bind) }
        .map_err(|e| anyhow::anyhow!("VFIO_DEVICE_BIND_IOMMUFD: {}", errno_text(e)))?;
    Ok(bind.out_devid)
}

/// An opened edu: its cdev bound to an iommufd and BAR0 mapped.
#[derive(Debug)]
pub struct Edu {
    file: File,
    bar: *mut u8,
    bar_len: usize,
    config_offset: u64,
    /// The device's id in the iommufd it is bound to.
    pub dev_id: u32,
}

impl Edu {
    /// Opens the cdev, binds it to `iommufd` (a device cdev answers nothing else before),
    /// maps BAR0 and turns on memory decoding and bus mastering.
    pub fn open(cdev: &Path, iommufd: i32) -> anyhow::Result<Edu> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(cdev)
            .with_context(|| format!("opening {}", cdev.display()))?;
        let dev_id = bind(&file, iommufd)?;
        let region = |index: u32| -> anyhow::Result<vfio_region_info> {
            let mut info = vfio_region_info {
                argsz: size_of::<vfio_region_info>() as u32,
                index,
                ..Default::default()
            };
            // SAFETY: a struct vfio_region_info whose argsz is its size.
            unsafe { ioctl(file.as_raw_fd(), VFIO_DEVICE_GET_REGION_INFO, &mut info) }
                .map_err(|e| anyhow::anyhow!("VFIO_DEVICE_GET_REGION_INFO: {}", errno_text(e)))?;
            Ok(info)
        };
        let bar0 = region(VFIO_PCI_BAR0_REGION_INDEX)?;
        let config = region(VFIO_PCI_CONFIG_REGION_INDEX)?;
        ensure!(
            bar0.flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && bar0.size >= 0x100,
            "edu's BAR0 cannot be mapped (flags {:#x}, size {:#x})",
            bar0.flags,
            bar0.size
        );
        let bar_len = usize::try_from(bar0.size)?;
        // SAFETY: mapping the device's BAR0 region through its VFIO fd, at the offset VFIO
        // gave; the result is checked and unmapped in Drop.
        let bar = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                bar0.offset as libc::off_t,
            )
        };
        ensure!(
            bar != libc::MAP_FAILED,
            "mapping edu's BAR0: {}",
            std::io::Error::last_os_error()
        );
        let edu = Edu {
            file,
            bar: bar.cast(),
            bar_len,
            config_offset: config.offset,
            dev_id,
        };
        let mut cmd = [0u8; 2];
        edu.file
            .read_exact_at(&mut cmd, edu.config_offset + PCI_COMMAND)
            .context("reading edu's PCI command register")?;
        let cmd = u16::from_le_bytes(cmd) | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        edu.file
            .write_all_at(&cmd.to_le_bytes(), edu.config_offset + PCI_COMMAND)
            .context("enabling edu's bus mastering")?;
        let ident = edu.read32(REG_IDENT);
        ensure!(
            ident & 0xff == 0xed,
            "BAR0 of the device is not edu's (identification {ident:#x})"
        );
        Ok(edu)
    }

    /// Registers below 0x80 answer 32-bit accesses only (edu returns all ones otherwise).
    fn read32(&self, reg: u64) -> u32 {
        // SAFETY: `reg` is one of edu's registers, inside the mapped BAR (at least 256 bytes,
        // checked at open); MMIO wants volatile accesses of the register's width.
        unsafe { std::ptr::read_volatile(self.bar.add(reg as usize).cast::<u32>()) }
    }

    /// The DMA registers (0x80 and up) take 64-bit accesses.
    fn read(&self, reg: u64) -> u64 {
        // SAFETY: `reg` is one of edu's registers, inside the mapped BAR (at least 256 bytes,
        // checked at open); MMIO wants volatile accesses of the register's width.
        unsafe { std::ptr::read_volatile(self.bar.add(reg as usize).cast::<u64>()) }
    }

    fn write(&self, reg: u64, value: u64) {
        // SAFETY: as in `read`.
        unsafe { std::ptr::write_volatile(self.bar.add(reg as usize).cast::<u64>(), value) }
    }

    /// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` to `pt_id` (an IOAS or a hardware page table).
    pub fn attach(&self, pt_id: u32) -> Result<(), i32> {
        let mut attach = vfio_device_attach_iommufd_pt {
            argsz: size_of::<vfio_device_attach_iommufd_pt>() as u32,
            flags: 0,
            pt_id,
            pasid: 0,
        };
        // SAFETY: a struct vfio_device_attach_iommufd_pt whose argsz is its size.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                VFIO_DEVICE_ATTACH_IOMMUFD_PT,
                &mut attach,
            )
        }
        .map(|_| ())
    }

    /// `VFIO_DEVICE_DETACH_IOMMUFD_PT`.
    pub fn detach(&self) -> Result<(), i32> {
        let mut detach = vfio_device_detach_iommufd_pt {
            argsz: size_of::<vfio_device_detach_iommufd_pt>() as u32,
            flags: 0,
            pasid: 0,
        };
        // SAFETY: a struct vfio_device_detach_iommufd_pt whose argsz is its size.
        unsafe {
            ioctl(
                self.file.as_raw_fd(),
                VFIO_DEVICE_DETACH_IOMMUFD_PT,
                &mut detach,
            )
        }
        .map(|_| ())
    }

    /// One DMA transfer of `count` bytes between I/O virtual address `iova` and the start of
    /// edu's buffer, to RAM when `to_ram`; waits for completion (or `timeout`).
    pub fn dma(
        &self,
        iova: u64,
        count: u64,
        to_ram: bool,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        ensure!(
            (1..=EDU_MAX_COUNT).contains(&count),
            "edu transfers 1..={EDU_MAX_COUNT} bytes (QEMU 7.2 aborts on more), not {count}"
        );
        let (src, dst, cmd) = if to_ram {
            (EDU_BUFFER, iova, CMD_RUN | CMD_TO_RAM)
        } else {
            (iova, EDU_BUFFER, CMD_RUN)
        };
        ensure!(
            self.read(REG_DMA_CMD) & CMD_RUN == 0,
            "edu is still busy with a transfer"
        );
        self.write(REG_DMA_SRC, src);
        self.write(REG_DMA_DST, dst);
        self.write(REG_DMA_COUNT, count);
        let start = Instant::now();
        self.write(REG_DMA_CMD, cmd);
        while self.read(REG_DMA_CMD) & CMD_RUN != 0 {
            ensure!(
                start.elapsed() < timeout,
                "edu's transfer did not complete in {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(start.elapsed())
    }
}

impl Drop for Edu {
    fn drop(&mut self) {
        // SAFETY: unmapping the BAR mapping this value made.
        unsafe { libc::munmap(self.bar.cast(), self.bar_len) };
    }
}
