//! Where fuser's reader threads read requests into: slots of the mount's request log when
//! the client has one, else resident memory of its own. This is the global allocator of
//! the client binaries ([`RequestBufferAlloc`]).
//!
//! fuser gives each reader thread a zeroed buffer of 16 MiB + 4 KiB (`vec![0; n]`, so
//! `alloc_zeroed`) when the thread starts, reads every request of that thread into it and
//! runs the handler on the same thread. The allocator recognizes them by that size (only
//! the exact size is given a log slot; any zeroed block of 16 MiB or more is made
//! resident). Two things depend on where such
//! a buffer lives:
//!
//! - **Resident pages.** When a client is killed while a reader thread is inside read(2)
//!   on /dev/fuse, the kernel fails the request it is copying with EIO if it meets a page
//!   that is not resident: pinning it takes a page fault, which a task with a fatal signal
//!   pending does not take. So the part of a buffer a request can fill — `max_write` plus
//!   the headers — is made resident before the thread reads.
//! - **The request log.** Once [`arm`]ed with slots of the log (`super::reqlog`), the next
//!   request buffers are built as a region whose first [`AREA_BYTES`] are the slot's area
//!   in the log memfd (`MAP_SHARED | MAP_FIXED`, populated) and the rest private anonymous
//!   memory that no request reaches. The kernel then writes each request straight into
//!   memory the supervisor holds: a successor finds every request this process read, with
//!   no copy on the data path. The thread remembers its slot ([`current_slot`]) so that
//!   its handlers can mark requests answered or applied.
//!
//! The allocator itself never allocates, logs or panics: a slot that cannot be mapped
//! falls back to ordinary memory, and [`fallbacks`] counts it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use handover_proto::reqlog::AREA_BYTES;

use super::adapter::MAX_WRITE;

/// Zeroed allocations at least this large are fuser's request buffers (made resident).
const REQUEST_BUFFER: usize = 16 << 20;
/// The exact size of fuser 0.18's request buffer (`MAX_WRITE_SIZE + 4096`, a `Vec<u8>`):
/// only such allocations are given log slots, so that another large zeroed block (a
/// block of the cache) made while the allocator is armed cannot take one.
const FUSER_BUFFER: usize = (16 << 20) + 4096;
/// The part of a request buffer a request can fill: `max_write` of data, the request
/// headers and the alignment offset, rounded up.
const PREFAULT: usize = MAX_WRITE as usize + (64 << 10);
const PAGE: usize = 4096;
/// The most reader threads that can read into the log at once.
pub const MAX_GRANTS: usize = 256;

const _: () = assert!(
    PREFAULT <= AREA_BYTES as usize,
    "a request must fit a slot's area"
);

/// The log memfd the slots are mapped from (-1: none).
static LOG_FD: AtomicI32 = AtomicI32::new(-1);
/// Offset of slot 0's area in the memfd, and the distance between two areas.
static AREAS_OFFSET: AtomicU64 = AtomicU64::new(0);
static AREA_STRIDE: AtomicU64 = AtomicU64::new(0);
/// Slots handed out to the next request buffers, in order.
static GRANTS: [AtomicU32; MAX_GRANTS] = [const { AtomicU32::new(u32::MAX) }; MAX_GRANTS];
static GRANT_COUNT: AtomicUsize = AtomicUsize::new(0);
static GRANT_NEXT: AtomicUsize = AtomicUsize::new(0);
/// Base address of each request buffer built on a grant (0: none), for `dealloc`.
static MAPPED: [AtomicUsize; MAX_GRANTS] = [const { AtomicUsize::new(0) }; MAX_GRANTS];
/// Grants that could not be mapped (ordinary memory was used instead).
static FALLBACKS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The log slot this thread reads requests into (`u32::MAX`: none).
    static SLOT: Cell<u32> = const { Cell::new(u32::MAX) };
}

/// The log slot the calling thread reads requests into, if any.
pub fn current_slot() -> Option<u32> {
    SLOT.try_with(Cell::get).ok().filter(|s| *s != u32::MAX)
}

/// Makes the next `slots.len()` request buffers slots `slots` of the log in `fd`, whose
/// areas start at `areas_offset` and are `stride` bytes apart. The areas must be zeroed
/// and the descriptor must stay open for the life of the process. Returns how many slots
/// were taken (at most [`MAX_GRANTS`]).
pub fn arm(fd: i32, areas_offset: u64, stride: u64, slots: &[u32]) -> usize {
    let n = slots.len().min(MAX_GRANTS);
    GRANT_COUNT.store(0, Ordering::SeqCst);
    LOG_FD.store(fd, Ordering::SeqCst);
    AREAS_OFFSET.store(areas_offset, Ordering::SeqCst);
    AREA_STRIDE.store(stride, Ordering::SeqCst);
    for (g, s) in GRANTS.iter().zip(&slots[..n]) {
        g.store(*s, Ordering::SeqCst);
    }
    GRANT_NEXT.store(0, Ordering::SeqCst);
    GRANT_COUNT.store(n, Ordering::SeqCst);
    n
}

/// How many grants of the last [`arm`] were taken so far.
pub fn granted() -> usize {
    GRANT_NEXT
        .load(Ordering::SeqCst)
        .min(GRANT_COUNT.load(Ordering::SeqCst))
}

/// Stops handing out slots; returns the ones of the last [`arm`] no buffer took.
pub fn disarm() -> Vec<u32> {
    let count = GRANT_COUNT.swap(0, Ordering::SeqCst);
    // Claim what is left so that a late allocation cannot take it any more.
    let taken = GRANT_NEXT.swap(MAX_GRANTS, Ordering::SeqCst).min(count);
    GRANTS[taken..count]
        .iter()
        .map(|g| g.load(Ordering::SeqCst))
        .collect()
}

/// Grants that fell back to ordinary memory since the process started.
pub fn fallbacks() -> usize {
    FALLBACKS.load(Ordering::Relaxed)
}

/// Touches the first `PREFAULT` bytes of a zeroed block so they are resident.
///
/// # Safety
/// `p` points to a writable, zeroed block of at least `len` bytes.
unsafe fn prefault(p: *mut u8, len: usize) {
    let end = len.min(PREFAULT);
    let mut off = 0;
    while off < end {
        // SAFETY: `off < len`: inside the block, which is zeroed; writing a zero changes
        // nothing but makes the page resident.
        unsafe { p.add(off).write_volatile(0) };
        off += PAGE;
    }
}

/// A request buffer of `len` bytes whose first bytes are log slot `slot`'s area, or null.
fn map_slot(slot: u32, len: usize) -> *mut u8 {
    let fd = LOG_FD.load(Ordering::SeqCst);
    let offset =
        AREAS_OFFSET.load(Ordering::SeqCst) + u64::from(slot) * AREA_STRIDE.load(Ordering::SeqCst);
    let (Ok(offset), true) = (libc::off_t::try_from(offset), fd >= 0) else {
        return std::ptr::null_mut();
    };
    // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let area = (AREA_BYTES as usize).min(len);
    // SAFETY: replaces the first `area` bytes of the mapping made above (ours alone) with
    // the slot's area of the log memfd; `fd` is kept open for the process's life.
    let shared = unsafe {
        libc::mmap(
            base,
            area,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_FIXED | libc::MAP_POPULATE,
            fd,
            offset,
        )
    };
    if shared == libc::MAP_FAILED {
        // SAFETY: unmaps the region mapped above, which nothing else uses.
        unsafe { libc::munmap(base, len) };
        return std::ptr::null_mut();
    }
    // Kept resident (shmem can be swapped out): a copy into a page that is not would fail
    // the request for a process being killed. Best effort: a memlock limit refuses it.
    // SAFETY: the range was just mapped.
    unsafe { libc::mlock(base, area) };
    base.cast()
}

/// The system allocator, except for fuser's request buffers (see the module
/// documentation).
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestBufferAlloc;

// SAFETY: every block not built on a grant comes from `System` with the caller's layout
// and goes back to it; a block built on a grant is a fresh mapping of at least the
// layout's size, page aligned (every alignment a request buffer asks for), zeroed (the
// slot area was zeroed before the grant, the rest is new anonymous memory), and is
// recognized by its address in `MAPPED` when it is freed or resized.
unsafe impl GlobalAlloc for RequestBufferAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() == FUSER_BUFFER && layout.align() == 1 {
            let i = GRANT_NEXT.fetch_add(1, Ordering::SeqCst);
            if i < GRANT_COUNT.load(Ordering::SeqCst) {
                let slot = GRANTS[i].load(Ordering::SeqCst);
                let p = map_slot(slot, layout.size());
                if !p.is_null() {
                    MAPPED[i].store(p as usize, Ordering::SeqCst);
                    let _ = SLOT.try_with(|s| s.set(slot));
                    return p;
                }
                FALLBACKS.fetch_add(1, Ordering::Relaxed);
            }
        }
        // SAFETY: the caller's contract is System's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() && layout.size() >= REQUEST_BUFFER {
            // SAFETY: `p` is the zeroed block of `layout.size()` bytes just allocated.
            unsafe { prefault(p, layout.size()) };
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.size() >= REQUEST_BUFFER {
            for m in &MAPPED {
                if m.load(Ordering::SeqCst) == ptr as usize
                    && m.compare_exchange(ptr as usize, 0, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    let _ = SLOT.try_with(|s| s.set(u32::MAX));
                    // SAFETY: `ptr` is a mapping of `layout.size()` bytes made by
                    // `map_slot` and handed out once; the caller gives it back now.
                    unsafe { libc::munmap(ptr.cast(), layout.size()) };
                    return;
                }
            }
        }
        // SAFETY: the caller's contract is System's (the block came from System).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let mapped = layout.size() >= REQUEST_BUFFER
            && MAPPED
                .iter()
                .any(|m| m.load(Ordering::SeqCst) == ptr as usize);
        if !mapped {
            // SAFETY: the caller's contract is System's (the block came from System).
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        // A request buffer is never resized; should it be, copy it to ordinary memory.
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        // SAFETY: a valid layout of non-zero size (`new_size` is non-zero by contract).
        let q = unsafe { System.alloc(new_layout) };
        if !q.is_null() {
            // SAFETY: both blocks are valid for the smaller of the two sizes and distinct.
            unsafe { std::ptr::copy_nonoverlapping(ptr, q, layout.size().min(new_size)) };
            // SAFETY: `ptr` was allocated by this allocator with `layout`.
            unsafe { self.dealloc(ptr, layout) };
        }
        q
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_buffer_is_zeroed_and_usable() {
        let a = RequestBufferAlloc;
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

    /// A fuser request buffer made while armed lies over its log slot: what is written to
    /// it is in the memfd; other large zeroed blocks are not given a slot.
    #[test]
    fn an_armed_request_buffer_is_the_slot_area() {
        use handover_proto::reqlog::{self, Geometry};
        use std::os::fd::AsRawFd;
        let log = reqlog::create(4, 0).expect("log");
        let g = Geometry::new(4);
        let a = RequestBufferAlloc;
        let other = Layout::from_size_align(16 << 20, 1).expect("layout");
        let layout = Layout::from_size_align(FUSER_BUFFER, 1).expect("layout");
        assert_eq!(
            arm(log.as_raw_fd(), g.areas_offset(), u64::from(g.area), &[2]),
            1
        );
        // SAFETY: non-zero-sized layouts; each block is freed with its layout.
        unsafe {
            let big = a.alloc_zeroed(other);
            assert!(!big.is_null());
            assert_eq!(granted(), 0, "a cache block took the reader's slot");
            let p = a.alloc_zeroed(layout);
            assert!(!p.is_null());
            assert_eq!(granted(), 1);
            assert_eq!(current_slot(), Some(2));
            let s = std::slice::from_raw_parts_mut(p, layout.size());
            assert!(s.iter().all(|b| *b == 0), "zeroed");
            s[..8].copy_from_slice(b"request!");
            s[layout.size() - 1] = 1; // the private part is usable too
            let mut back = [0u8; 8];
            let off = libc::off_t::try_from(g.area_offset(2)).expect("offset");
            nix::sys::uio::pread(&log, &mut back, off).expect("pread");
            assert_eq!(&back, b"request!", "the buffer is the slot's area");
            a.dealloc(p, layout);
            a.dealloc(big, other);
        }
        assert_eq!(current_slot(), None);
        assert!(disarm().is_empty());
    }
}
