//! Raw system calls and the check report both programs print.

/// The calling thread's errno.
pub fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `ioctl(fd, req, arg)`: the return value, or the errno.
///
/// # Safety
///
/// `T` must be the type (layout and size) request `req` reads and writes: the kernel accesses
/// as many bytes as the request says.
pub unsafe fn ioctl<T>(fd: i32, req: u64, arg: &mut T) -> Result<i32, i32> {
    // SAFETY: `arg` is a live, exclusive value of the layout `req` expects (the caller's
    // contract).
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, std::ptr::from_mut(arg)) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// `ioctl(fd, req, value)` for requests that take an integer.
pub fn ioctl_val(fd: i32, req: u64, value: u64) -> Result<i32, i32> {
    // SAFETY: the request takes an integer argument, not a pointer.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, value as libc::c_ulong) };
    if r < 0 { Err(errno()) } else { Ok(r) }
}

/// An errno in words: `EBUSY (Device or resource busy)`.
pub fn errno_text(e: i32) -> String {
    format!("errno {e} ({})", std::io::Error::from_raw_os_error(e))
}

/// Checks, one line each (`<prefix>: ok   name: detail` / `FAIL`), and their count.
#[derive(Debug)]
pub struct Report {
    prefix: &'static str,
    pub passed: u32,
    pub failed: u32,
}

impl Report {
    pub fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            passed: 0,
            failed: 0,
        }
    }

    /// Prints one check and counts it.
    pub fn check(&mut self, name: &str, ok: bool, detail: impl AsRef<str>) {
        let verdict = if ok { "ok" } else { "FAIL" };
        println!("{}: {verdict:4} {name}: {}", self.prefix, detail.as_ref());
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
        }
    }

    /// A line that is no check (what was measured, what a check compares).
    pub fn note(&self, text: impl AsRef<str>) {
        println!("{}: note {}", self.prefix, text.as_ref());
    }
}
