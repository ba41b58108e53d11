//! Shared memory that outlives a client process: a shared, read-write mapping of a whole
//! memfd (the write journal, the request log) with bounds-checked atomic and byte access.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64};

use nix::errno::Errno;

const PAGE: u64 = 4096;

/// A shared, read-write mapping of a whole file.
pub(crate) struct Mapping {
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: the mapping is plain memory. Fields shared between threads are only accessed
// through atomics; data areas are written by the one thread that reserved them (see the
// protocol in the module documentation).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    pub(crate) fn new(fd: BorrowedFd<'_>, len: u64) -> std::io::Result<Mapping> {
        let size = usize::try_from(len).map_err(|_| std::io::Error::from(Errno::EFBIG))?;
        // SAFETY: a new mapping chosen by the kernel (no fixed address), of a descriptor
        // we hold; nothing else in this process refers to it yet.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base =
            NonNull::new(ptr.cast::<u8>()).ok_or_else(|| std::io::Error::from(Errno::ENOMEM))?;
        Ok(Mapping { base, len })
    }

    /// The address of `off`, checked to be inside the mapping with `len` bytes after it.
    pub(crate) fn ptr(&self, off: u64, len: u64) -> *mut u8 {
        self.check(off, len, 1);
        // SAFETY: in bounds (checked).
        unsafe { self.base.as_ptr().add(off as usize) }
    }

    fn check(&self, off: u64, len: u64, align: u64) {
        assert!(
            off % align == 0 && off.checked_add(len).is_some_and(|end| end <= self.len),
            "shared memory access at {off}+{len} outside the mapping of {} bytes",
            self.len
        );
    }

    pub(crate) fn u64_at(&self, off: u64) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: in bounds and 8-byte aligned (checked; the mapping is page aligned);
        // AtomicU64 has the layout of u64, and the memory lives as long as `self`.
        unsafe { &*self.base.as_ptr().add(off as usize).cast::<AtomicU64>() }
    }

    pub(crate) fn u32_at(&self, off: u64) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: in bounds and 4-byte aligned (checked); AtomicU32 has the layout of u32.
        unsafe { &*self.base.as_ptr().add(off as usize).cast::<AtomicU32>() }
    }

    /// Makes the pages of `off..off + len` resident in one call, instead of one page fault
    /// per page during the copy that follows (the pages the tail left behind were
    /// returned to the kernel). Best effort: kernels before 5.14 lack it.
    pub(crate) fn populate(&self, off: u64, len: u64) {
        self.check(off, len, 1);
        let start = off / PAGE * PAGE;
        let Ok(len) = usize::try_from(off + len - start) else {
            return;
        };
        if len < 2 * PAGE as usize {
            return;
        }
        // SAFETY: advice on pages inside the mapping (checked); MADV_POPULATE_WRITE only
        // faults them in writable, it changes no byte.
        unsafe {
            libc::madvise(
                self.base.as_ptr().add(start as usize).cast(),
                len,
                libc::MADV_POPULATE_WRITE,
            )
        };
    }

    /// Copies `data` to `off`.
    ///
    /// # Safety
    /// No other thread may access `off..off + data.len()` meanwhile.
    pub(crate) unsafe fn write(&self, off: u64, data: &[u8]) {
        self.check(off, data.len() as u64, 1);
        // SAFETY: in bounds (checked); the caller owns the range; `data` cannot overlap
        // the mapping's range it is copied to unless the caller passed the mapping itself,
        // which no caller does.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(off as usize),
                data.len(),
            )
        }
    }

    /// Copies `len` bytes at `off` out.
    ///
    /// # Safety
    /// No other thread may write `off..off + len` meanwhile.
    pub(crate) unsafe fn read(&self, off: u64, len: usize) -> Vec<u8> {
        self.check(off, len as u64, 1);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds (checked); nobody writes the range (the caller's promise).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(off as usize),
                out.as_mut_ptr(),
                len,
            )
        };
        out
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference into it outlives
        // `self` (every accessor borrows `self`).
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len as usize) };
    }
}
