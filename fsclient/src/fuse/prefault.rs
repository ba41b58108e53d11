//! Request buffers that are resident before the kernel copies a request into them.
//!
//! When a client is killed while one of its reader threads is inside read(2) on
//! /dev/fuse, the kernel fails the request it is copying into that thread's buffer with
//! EIO if it meets a page that is not resident yet: pinning it takes a page fault, which
//! a task with a fatal signal pending does not take. fuser gives each reader thread a
//! zeroed buffer of 16 MiB + 4 KiB (`vec![0; n]`, so calloc'ed and not resident), and the
//! first large WRITE request a thread reads is what faults most of it in: a kill -9 at
//! that moment turns an application's write(2) into EIO, a request that RESEND cannot
//! save (the kernel already ended it).
//!
//! [`PrefaultingAlloc`] (the global allocator of the client binaries) touches the part
//! of such a buffer a request can fill — `max_write` plus the headers — as it is
//! allocated: about 1 MiB per reader thread that normal traffic would make resident
//! anyway. Everything else is the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};

use super::adapter::MAX_WRITE;

/// Zeroed allocations at least this large are fuser's request buffers (nothing else in
/// the client allocates zeroed blocks of 16 MiB).
const REQUEST_BUFFER: usize = 16 << 20;
/// The part of a request buffer a request can fill: `max_write` of data, the request
/// headers and the alignment offset, rounded up.
const PREFAULT: usize = MAX_WRITE as usize + (64 << 10);
const PAGE: usize = 4096;

/// The system allocator, except that fuser's request buffers are made resident where a
/// request can land (see the module documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct PrefaultingAlloc;

// SAFETY: every method delegates to `System` with the caller's arguments; `alloc_zeroed`
// only writes zeros inside the block it returns, which is zeroed already.
unsafe impl GlobalAlloc for PrefaultingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && layout.size() >= REQUEST_BUFFER {
            let end = layout.size().min(PREFAULT);
            let mut off = 0;
            while off < end {
                // SAFETY: `off < layout.size()`: inside the block just allocated, which
                // is zeroed; writing a zero changes nothing but makes the page resident.
                unsafe { p.add(off).write_volatile(0) };
                off += PAGE;
            }
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is System's (the block came from System).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is System's (the block came from System).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_buffer_is_zeroed_and_usable() {
        let a = PrefaultingAlloc;
        let layout = Layout::from_size_align(REQUEST_BUFFER + 4096, 8).expect("layout");
        // SAFETY: a non-zero-sized layout; the block is freed with the same layout.
        unsafe {
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            let s = std::slice::from_raw_parts_mut(p, layout.size());
            assert!(s.iter().all(|b| *b == 0));
            s[layout.size() - 1] = 7;
            a.dealloc(p, layout);
        }
    }
}
