//! The request log: every FUSE request a client has read and not answered yet, in memory
//! that outlives the client process, so that a successor can answer it on kernels that
//! cannot resend (no `FUSE_HAS_RESEND`, Linux < 6.9) and on mounts made with
//! `--no-resend`.
//!
//! The kernel keeps a request it handed to a reader in the reading file's processing list
//! until a reply with its `unique` is written to that open file, through any duplicate of
//! it. When the reader dies, nobody answers it and its caller waits forever, unless the
//! successor (which holds a duplicate) knows which requests were read and what they were.
//! The supervisor creates one memfd per mount ([`create`]) and gives it to every client
//! generation; a client makes the buffer each fuser reader thread reads requests into
//! a *slot* of it, so that the kernel itself copies every request into the log before
//! `read(2)` returns: there is no moment at which a request was read and is not in the
//! log, and no copy on the data path (WRITE payloads are already in the write journal's
//! memory once applied: they are not copied a second time).
//!
//! ```text
//!  memfd (sparse): | header (4 KiB) | slot table: slots × 64 B, to a page | areas: slots × area |
//!
//!  header (little endian): written by the supervisor, read by clients
//!     0 magic "BATONRQL" u64     8 layout version u32     12 flags u32 (bit 0: resend disabled)
//!    16 slots u32               20 area bytes u32        24 table offset u64   32 areas offset u64
//!    40 resent generation u64: the supervisor wrote FUSE_NOTIFY_RESEND before it told this
//!       generation to serve (what dead clients read was re-delivered: their slots are void)
//!
//!  slot control block (64 bytes, each field one aligned 64-bit word):
//!     0 owner:   state << 32 | pid        state 0 free, 1 reading, 2 recovering
//!     8 done:    unique of the last request read into this slot that is answered
//!    16 applied: unique of a request whose effect is complete, answered by `result`
//!    24 result:  errno (low 32 bits, positive) | bytes written (high 32 bits)
//!    32 answer:  unique whose whole reply is stored in the area (recovering slots)
//!    40 answer at: offset in the area << 32 | reply length
//!    48 reserved (zero)
//!
//!  area (area bytes, a page multiple): the request as the kernel wrote it, fuse_in_header
//!  first; a recovering slot may also hold the reply to it, after the request.
//! ```
//!
//! The protocol, and what a crash at any instruction leaves:
//!
//! - **Reading** (state 1, owner = the reader's process). The client zeroes the area and
//!   then stores the owner word; its reader thread reads requests into the area. The kernel
//!   writes the whole request before `read(2)` returns — it completes the copy even for a
//!   process being killed, as long as the pages are resident, which they are (the client
//!   touched them). A slot's request is therefore always whole: the `unique` in its header
//!   names it, and `done` tells whether it was answered.
//! - **Applied.** For every error reply, and for requests whose successful answer is a
//!   bare header or a WRITE's size, the client stores `result` and then `applied` = unique
//!   *before* it writes the reply; after
//!   the reply, `done` = unique. A successor never executes an applied request again: it
//!   writes the recorded answer (if the kernel had it already, that write fails with ENOENT
//!   and harms nothing). Other mutations are made exactly once by the metadata engine's
//!   request records; reads are executed again.
//! - **Recovering** (state 2, owner = the successor). A successor claims every slot of a
//!   dead owner that holds a request `done` does not name, answers it, stores the answer
//!   (`answer at`, then `answer`) before it writes it to the kernel, then frees the slot.
//!   Dying half way leaves the slot recovering under a dead owner: the next successor does
//!   the same, and writes the stored answer instead of executing the request again.
//! - Stores are single aligned 64-bit words written with release ordering, in the order
//!   given above, and read with acquire ordering: a torn word cannot happen, and a crash
//!   between two stores leaves an earlier, consistent state. A header whose length,
//!   opcode or unique makes no sense is counted and skipped (see [`classify`]).
//!
//! What it must never do: let a successor run a request that was answered and whose
//! effect a later request may have changed (a WRITE, a lock), lose a request that was
//! read, or be used while another process reads the same connection (the supervisor
//! serves one generation at a time; a client touches the slots only after `Serve`).

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

/// The layout version drawn in the module documentation.
pub const LAYOUT_VERSION: u32 = 1;
/// "BATONRQL", little endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BATONRQL");
/// Bytes of the header page.
pub const HEADER_BYTES: u64 = 4096;
/// Bytes of a slot control block.
pub const SLOT_BYTES: u64 = 64;
/// Bytes of a slot's request area: the largest request (a WRITE of 1 MiB, the `max_write`
/// Baton negotiates, with its headers) and room for a reply, rounded to pages.
pub const AREA_BYTES: u32 = (1 << 20) + (64 << 10);
/// Slots a supervisor creates: reader threads of the serving client, those a successor
/// needs while it still answers its predecessor's requests, and margin.
pub const DEFAULT_SLOTS: u32 = 256;
/// The most slots a log may declare (bounds what a reader maps).
pub const MAX_SLOTS: u32 = 4096;
const PAGE: u64 = 4096;

/// Header flags.
pub mod flags {
    /// The mount was made with `--no-resend`: behave as on a kernel without
    /// FUSE_HAS_RESEND (never write the notification, drain on upgrade, recover through
    /// the log).
    pub const RESEND_DISABLED: u32 = 1;
    /// Flags this build knows.
    pub const KNOWN: u32 = RESEND_DISABLED;
}

/// Header field offsets.
pub mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 8;
    pub const FLAGS: u64 = 12;
    pub const SLOTS: u64 = 16;
    pub const AREA: u64 = 20;
    pub const TABLE: u64 = 24;
    pub const AREAS: u64 = 32;
    pub const RESENT: u64 = 40;
    /// Bytes of the header that carry fields.
    pub const LEN: usize = 48;
}

/// Slot control block field offsets (each a 64-bit word).
pub mod slot {
    pub const OWNER: u64 = 0;
    pub const DONE: u64 = 8;
    pub const APPLIED: u64 = 16;
    pub const RESULT: u64 = 24;
    pub const ANSWER: u64 = 32;
    pub const ANSWER_AT: u64 = 40;
}

/// Slot states (the high half of the owner word).
pub mod state {
    pub const FREE: u32 = 0;
    pub const READING: u32 = 1;
    pub const RECOVERING: u32 = 2;
}

/// The owner word of a slot.
pub fn owner_word(state: u32, pid: u32) -> u64 {
    u64::from(state) << 32 | u64::from(pid)
}

/// `(state, pid)` of an owner word.
pub fn owner_parts(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// The result word of an applied request: its errno (0 for success) and, for a WRITE,
/// the bytes written.
pub fn result_word(errno: i32, written: u32) -> u64 {
    u64::from(written) << 32 | u64::from(errno.unsigned_abs())
}

/// `(errno, written)` of a result word.
pub fn result_parts(word: u64) -> (i32, u32) {
    let errno = i32::try_from(word as u32).unwrap_or(libc::EIO);
    (errno, (word >> 32) as u32)
}

/// The answer-at word: where in the area a stored reply starts, and its length.
pub fn answer_at_word(offset: u32, len: u32) -> u64 {
    u64::from(offset) << 32 | u64::from(len)
}

/// `(offset, len)` of an answer-at word.
pub fn answer_at_parts(word: u64) -> (u32, u32) {
    ((word >> 32) as u32, word as u32)
}

/// Where things are in a log of `slots` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub slots: u32,
    pub area: u32,
}

impl Geometry {
    pub fn new(slots: u32) -> Geometry {
        Geometry {
            slots,
            area: AREA_BYTES,
        }
    }

    /// Where the slot table starts.
    pub fn table_offset(&self) -> u64 {
        HEADER_BYTES
    }

    /// Where slot `i`'s control block is.
    pub fn slot_offset(&self, i: u32) -> u64 {
        self.table_offset() + u64::from(i) * SLOT_BYTES
    }

    /// Where the areas start (after the table, at a page boundary).
    pub fn areas_offset(&self) -> u64 {
        (self.table_offset() + u64::from(self.slots) * SLOT_BYTES).div_ceil(PAGE) * PAGE
    }

    /// Where slot `i`'s area is (page aligned).
    pub fn area_offset(&self, i: u32) -> u64 {
        self.areas_offset() + u64::from(i) * u64::from(self.area)
    }

    /// Bytes of the whole log.
    pub fn total(&self) -> u64 {
        self.area_offset(self.slots)
    }
}

/// What a log's header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub geometry: Geometry,
    pub flags: u32,
}

impl Header {
    /// Whether the operator disabled FUSE_NOTIFY_RESEND for this mount.
    pub fn resend_disabled(&self) -> bool {
        self.flags & flags::RESEND_DISABLED != 0
    }
}

/// Creating or reading a request log failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot create the request log memfd")]
    Create(#[source] Errno),
    #[error("cannot size the request log to {bytes} bytes")]
    Size {
        bytes: u64,
        #[source]
        source: Errno,
    },
    #[error("cannot write the request log header")]
    Write(#[source] Errno),
    #[error("cannot read the request log header")]
    Read(#[source] Errno),
    #[error("the descriptor holds no request log (magic {0:#x})")]
    BadMagic(u64),
    #[error("the request log has layout version {0}, this build reads version {LAYOUT_VERSION}")]
    Version(u32),
    #[error("the request log header is inconsistent: {0}")]
    Inconsistent(&'static str),
}

/// Reads exactly `buf.len()` bytes at `offset`.
fn pread_exact(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64).map_err(|_| Errno::EFBIG)?;
        match nix::sys::uio::pread(fd, &mut buf[done..], off) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn pwrite_all(fd: std::os::fd::BorrowedFd<'_>, buf: &[u8], offset: u64) -> Result<(), Errno> {
    let mut done = 0;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset + done as u64).map_err(|_| Errno::EFBIG)?;
        match nix::sys::uio::pwrite(fd, &buf[done..], off) {
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => done += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn encode_header(h: &Header) -> [u8; hdr::LEN] {
    let g = &h.geometry;
    let mut b = [0u8; hdr::LEN];
    b[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..12].copy_from_slice(&LAYOUT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&h.flags.to_le_bytes());
    b[16..20].copy_from_slice(&g.slots.to_le_bytes());
    b[20..24].copy_from_slice(&g.area.to_le_bytes());
    b[24..32].copy_from_slice(&g.table_offset().to_le_bytes());
    b[32..40].copy_from_slice(&g.areas_offset().to_le_bytes());
    b
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Decodes a header, checking that it describes a log of at most `size` bytes.
pub fn decode_header(b: &[u8; hdr::LEN], size: u64) -> Result<Header, LogError> {
    let magic = u64_at(b, 0);
    if magic != MAGIC {
        return Err(LogError::BadMagic(magic));
    }
    let version = u32_at(b, 8);
    if version != LAYOUT_VERSION {
        return Err(LogError::Version(version));
    }
    let geometry = Geometry {
        slots: u32_at(b, 16),
        area: u32_at(b, 20),
    };
    if geometry.slots == 0 || geometry.slots > MAX_SLOTS {
        return Err(LogError::Inconsistent("slot count out of range"));
    }
    if geometry.area == 0 || u64::from(geometry.area) % PAGE != 0 {
        return Err(LogError::Inconsistent("area size is not a page multiple"));
    }
    if u64_at(b, 24) != geometry.table_offset() || u64_at(b, 32) != geometry.areas_offset() {
        return Err(LogError::Inconsistent("offsets do not match the geometry"));
    }
    if geometry.total() > size {
        return Err(LogError::Inconsistent("the memfd is smaller than the log"));
    }
    Ok(Header {
        geometry,
        flags: u32_at(b, 12),
    })
}

/// Creates a sparse, close-on-exec memfd holding an empty log of `slots` slots with
/// `flags` ([`flags`]). Only the header is written; pages are allocated as clients touch
/// them.
pub fn create(slots: u32, flags: u32) -> Result<OwnedFd, LogError> {
    let geometry = Geometry::new(slots.clamp(1, MAX_SLOTS));
    let fd =
        nix::sys::memfd::memfd_create(c"baton-requests", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(LogError::Create)?;
    let bytes = geometry.total();
    let len = libc::off_t::try_from(bytes).map_err(|_| LogError::Size {
        bytes,
        source: Errno::EFBIG,
    })?;
    nix::unistd::ftruncate(&fd, len).map_err(|source| LogError::Size { bytes, source })?;
    let h = Header { geometry, flags };
    pwrite_all(fd.as_fd(), &encode_header(&h), 0).map_err(LogError::Write)?;
    Ok(fd)
}

/// Reads and checks the header of the log in `fd`.
pub fn read_header(fd: std::os::fd::BorrowedFd<'_>) -> Result<Header, LogError> {
    let st = nix::sys::stat::fstat(fd).map_err(LogError::Read)?;
    let size = u64::try_from(st.st_size).unwrap_or(0);
    let mut b = [0u8; hdr::LEN];
    pread_exact(fd, &mut b, 0).map_err(LogError::Read)?;
    decode_header(&b, size)
}

/// Records that the supervisor writes FUSE_NOTIFY_RESEND before generation `generation`
/// serves (on a `--no-resend` mount, when the log cannot carry what the dead client had
/// read: it did not read into this log, or the successor cannot answer from it). That
/// generation then frees the dead clients' slots instead of answering from them: the
/// kernel re-delivers those requests. Written before the notification.
pub fn mark_resent(fd: std::os::fd::BorrowedFd<'_>, generation: u64) -> Result<(), LogError> {
    pwrite_all(fd, &generation.to_le_bytes(), hdr::RESENT).map_err(LogError::Write)
}

/// Sets `add` in the header's flags (a take-over with `--no-resend` of a mount made
/// without it). Only the supervisor writes the header; clients read it at `Serve`.
pub fn add_flags(fd: std::os::fd::BorrowedFd<'_>, add: u32) -> Result<Header, LogError> {
    let mut h = read_header(fd)?;
    if h.flags & add != add {
        h.flags |= add;
        pwrite_all(fd, &h.flags.to_le_bytes(), hdr::FLAGS).map_err(LogError::Write)?;
    }
    Ok(h)
}

// --- what a successor finds in a slot --------------------------------------------------

/// FUSE opcodes the log treats specially (`<linux/fuse.h>`).
pub mod opcode {
    pub const FORGET: u32 = 2;
    pub const WRITE: u32 = 16;
    pub const INIT: u32 = 26;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    /// The largest opcode a kernel sends today (FUSE_STATX is 52; room for more).
    pub const MAX_KNOWN: u32 = 64;

    /// Opcodes whose success reply is only a `fuse_out_header` (or a WRITE's size): the
    /// ones an applied mark of success may answer (an error is answerable for any).
    pub fn answerable_from_result(op: u32) -> bool {
        matches!(
            op,
            10 // UNLINK
            | 11 // RMDIR
            | 12 // RENAME
            | 16 // WRITE
            | 18 // RELEASE
            | 20 // FSYNC
            | 21 // SETXATTR
            | 24 // REMOVEXATTR
            | 25 // FLUSH
            | 29 // RELEASEDIR
            | 30 // FSYNCDIR
            | 32 // SETLK
            | 33 // SETLKW
            | 34 // ACCESS
            | 43 // FALLOCATE
            | 45 // RENAME2
        )
    }
}

/// The fields of a `fuse_in_header` a successor needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
}

/// Reads a `fuse_in_header` from the start of an area.
pub fn request_header(area: &[u8]) -> Option<RequestHeader> {
    if area.len() < 16 {
        return None;
    }
    Some(RequestHeader {
        len: u32_at(area, 0),
        opcode: u32_at(area, 4),
        unique: u64_at(area, 8),
    })
}

/// The control words of one slot, as loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotWords {
    pub owner: u64,
    pub done: u64,
    pub applied: u64,
    pub result: u64,
    pub answer: u64,
    pub answer_at: u64,
}

/// What a successor does with a slot whose owner is dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing in it is waiting for an answer: free it.
    Idle,
    /// A request nobody will answer unless we do: execute it and answer.
    Execute(RequestHeader),
    /// A request whose effect is complete: answer it with the recorded result, never run
    /// it again.
    AnswerResult {
        header: RequestHeader,
        errno: i32,
        written: u32,
    },
    /// A request whose whole reply is stored at `offset` (`len` bytes) in the area: write
    /// it again.
    AnswerStored {
        header: RequestHeader,
        offset: u32,
        len: u32,
    },
    /// A request the kernel expects no answer to (FORGET, INTERRUPT, ...): free the slot.
    NoReply(RequestHeader),
    /// The area does not hold a request that makes sense: free the slot (counted).
    Garbage(&'static str),
}

/// Decides what a successor does with a slot of a dead owner, from its control words and
/// the start of its area (at least the request header; the whole area for stored
/// answers to be checked). Pure: the caller loads the words with acquire ordering.
pub fn classify(words: &SlotWords, area: &[u8], area_len: u32) -> Verdict {
    let (state, _) = owner_parts(words.owner);
    if state == state::FREE {
        return Verdict::Idle;
    }
    let Some(h) = request_header(area) else {
        return Verdict::Garbage("the area is too small for a request header");
    };
    if h.unique == 0 || h.unique == words.done {
        return Verdict::Idle;
    }
    if (h.len as usize) < crate::fuse_init::IN_HEADER_LEN || h.len > area_len {
        return Verdict::Garbage("the request length is out of range");
    }
    if h.opcode == 0 || h.opcode > opcode::MAX_KNOWN {
        return Verdict::Garbage("the opcode is unknown");
    }
    if matches!(
        h.opcode,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::INTERRUPT | opcode::NOTIFY_REPLY
    ) {
        return Verdict::NoReply(h);
    }
    if state == state::RECOVERING && words.answer == h.unique {
        let (offset, len) = answer_at_parts(words.answer_at);
        let fits = u64::from(offset) + u64::from(len) <= u64::from(area_len)
            && u64::from(offset) >= u64::from(h.len)
            && len as usize >= crate::fuse_init::OUT_HEADER_LEN;
        if fits {
            return Verdict::AnswerStored {
                header: h,
                offset,
                len,
            };
        }
    }
    if words.applied == h.unique {
        let (errno, written) = result_parts(words.result);
        // An error reply is a bare header whatever the request: it is the whole answer.
        if errno != 0 || opcode::answerable_from_result(h.opcode) {
            return Verdict::AnswerResult {
                header: h,
                errno,
                written,
            };
        }
    }
    Verdict::Execute(h)
}

/// The reply a successor writes for [`Verdict::AnswerResult`]: a `fuse_out_header`, and
/// for a successful WRITE a `fuse_write_out` with the size.
pub fn result_reply(header: &RequestHeader, errno: i32, written: u32) -> Vec<u8> {
    let write_ok = header.opcode == opcode::WRITE && errno == 0;
    let len: u32 = if write_ok { 24 } else { 16 };
    let mut b = Vec::with_capacity(len as usize);
    b.extend_from_slice(&len.to_le_bytes());
    b.extend_from_slice(&(-errno.abs()).to_le_bytes());
    b.extend_from_slice(&header.unique.to_le_bytes());
    if write_ok {
        b.extend_from_slice(&written.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(len: u32, op: u32, unique: u64) -> Vec<u8> {
        let mut b = vec![0u8; len.max(40) as usize];
        b[0..4].copy_from_slice(&len.to_le_bytes());
        b[4..8].copy_from_slice(&op.to_le_bytes());
        b[8..16].copy_from_slice(&unique.to_le_bytes());
        b
    }

    fn reading(done: u64) -> SlotWords {
        SlotWords {
            owner: owner_word(state::READING, 77),
            done,
            ..SlotWords::default()
        }
    }

    #[test]
    fn geometry_is_page_aligned_and_sized() {
        let g = Geometry::new(DEFAULT_SLOTS);
        assert_eq!(g.areas_offset() % PAGE, 0);
        assert!(g.areas_offset() >= g.slot_offset(g.slots - 1) + SLOT_BYTES);
        assert_eq!(g.area_offset(1) - g.area_offset(0), u64::from(AREA_BYTES));
        assert_eq!(g.total(), g.area_offset(g.slots));
        assert_eq!(u64::from(AREA_BYTES) % PAGE, 0);
    }

    #[test]
    fn a_created_log_reads_back_and_keeps_added_flags() {
        let fd = create(8, 0).expect("create");
        let h = read_header(fd.as_fd()).expect("read");
        assert_eq!(h.geometry, Geometry::new(8));
        assert!(!h.resend_disabled());
        let h = add_flags(fd.as_fd(), flags::RESEND_DISABLED).expect("add");
        assert!(h.resend_disabled());
        assert!(read_header(fd.as_fd()).expect("read").resend_disabled());
        let st = nix::sys::stat::fstat(&fd).expect("fstat");
        assert_eq!(st.st_size as u64, Geometry::new(8).total());
        // Sparse: nothing but the header page is allocated.
        assert!(st.st_blocks * 512 <= 8192, "{} blocks", st.st_blocks);
    }

    #[test]
    fn a_descriptor_that_is_no_log_is_refused() {
        let fd = nix::sys::memfd::memfd_create(c"x", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&fd, 1 << 20).expect("size");
        assert!(matches!(
            read_header(fd.as_fd()),
            Err(LogError::BadMagic(0))
        ));
        let fd = create(4, 0).expect("create");
        nix::unistd::ftruncate(&fd, 8192).expect("shrink");
        assert!(matches!(
            read_header(fd.as_fd()),
            Err(LogError::Inconsistent(_))
        ));
    }

    #[test]
    fn classify_tells_pending_from_answered() {
        let area = request(64, 1, 10);
        assert_eq!(
            classify(&SlotWords::default(), &area, AREA_BYTES),
            Verdict::Idle
        );
        assert_eq!(classify(&reading(10), &area, AREA_BYTES), Verdict::Idle);
        assert!(matches!(
            classify(&reading(8), &area, AREA_BYTES),
            Verdict::Execute(RequestHeader { unique: 10, .. })
        ));
        // A zeroed area (a reader that has read nothing yet).
        assert_eq!(classify(&reading(0), &[0u8; 64], AREA_BYTES), Verdict::Idle);
        // FORGET: the kernel waits for nothing.
        assert!(matches!(
            classify(&reading(0), &request(48, opcode::FORGET, 12), AREA_BYTES),
            Verdict::NoReply(_)
        ));
        // Nonsense.
        assert!(matches!(
            classify(&reading(0), &request(8, 1, 12), AREA_BYTES),
            Verdict::Garbage(_)
        ));
        assert!(matches!(
            classify(&reading(0), &request(64, 999, 12), AREA_BYTES),
            Verdict::Garbage(_)
        ));
    }

    #[test]
    fn an_applied_write_is_answered_from_its_result_never_run_again() {
        let area = request(80 + 4096, opcode::WRITE, 14);
        let mut w = reading(12);
        w.applied = 14;
        w.result = result_word(0, 4096);
        let v = classify(&w, &area, AREA_BYTES);
        let Verdict::AnswerResult {
            header,
            errno,
            written,
        } = v
        else {
            panic!("{v:?}")
        };
        assert_eq!((errno, written), (0, 4096));
        let r = result_reply(&header, errno, written);
        assert_eq!(r.len(), 24);
        assert_eq!(u64_at(&r, 8), 14);
        assert_eq!(u32_at(&r, 16), 4096);
        // An applied mark of an earlier request does not answer this one.
        w.applied = 12;
        assert!(matches!(
            classify(&w, &area, AREA_BYTES),
            Verdict::Execute(_)
        ));
        // A failed SETLK is answered with its error.
        let area = request(64, 32, 20);
        let mut w = reading(0);
        w.applied = 20;
        w.result = result_word(libc::EAGAIN, 0);
        let Verdict::AnswerResult { header, errno, .. } = classify(&w, &area, AREA_BYTES) else {
            panic!()
        };
        let r = result_reply(&header, errno, 0);
        assert_eq!(r.len(), 16);
        assert_eq!(i32::from_le_bytes([r[4], r[5], r[6], r[7]]), -libc::EAGAIN);
        // A LOOKUP's success cannot be rebuilt from a result: it is run again; its error
        // is given again.
        let area = request(64, 1, 22);
        let mut w = reading(0);
        w.applied = 22;
        assert!(matches!(
            classify(&w, &area, AREA_BYTES),
            Verdict::Execute(_)
        ));
        w.result = result_word(libc::ENOENT, 0);
        assert!(matches!(
            classify(&w, &area, AREA_BYTES),
            Verdict::AnswerResult {
                errno: libc::ENOENT,
                ..
            }
        ));
    }

    #[test]
    fn a_stored_answer_is_written_again_when_it_lies_after_the_request() {
        let area = request(64, 1, 30);
        let mut w = SlotWords {
            owner: owner_word(state::RECOVERING, 5),
            answer: 30,
            answer_at: answer_at_word(4096, 144),
            ..SlotWords::default()
        };
        assert_eq!(
            classify(&w, &area, AREA_BYTES),
            Verdict::AnswerStored {
                header: request_header(&area).unwrap(),
                offset: 4096,
                len: 144
            }
        );
        // Overlapping the request, too short, or past the area: executed instead.
        for at in [
            answer_at_word(16, 144),
            answer_at_word(4096, 8),
            answer_at_word(AREA_BYTES, 16),
        ] {
            w.answer_at = at;
            assert!(matches!(
                classify(&w, &area, AREA_BYTES),
                Verdict::Execute(_)
            ));
        }
        // An answer stored for another unique does not count.
        w.answer_at = answer_at_word(4096, 144);
        w.answer = 28;
        assert!(matches!(
            classify(&w, &area, AREA_BYTES),
            Verdict::Execute(_)
        ));
    }

    proptest! {
        #[test]
        fn words_round_trip(state in 0u32..3, pid: u32, errno in 0i32..4096, written: u32, off: u32, len: u32) {
            prop_assert_eq!(owner_parts(owner_word(state, pid)), (state, pid));
            prop_assert_eq!(result_parts(result_word(errno, written)), (errno, written));
            prop_assert_eq!(answer_at_parts(answer_at_word(off, len)), (off, len));
        }

        #[test]
        fn classify_never_panics_and_answers_only_what_it_may(
            words in (any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()),
            area in proptest::collection::vec(any::<u8>(), 0..128),
        ) {
            let w = SlotWords { owner: words.0, done: words.1, applied: words.2, result: words.3, answer: words.4, answer_at: words.5 };
            match classify(&w, &area, AREA_BYTES) {
                Verdict::AnswerResult { header, errno, .. } => {
                    prop_assert_eq!(header.unique, w.applied);
                    prop_assert!(errno != 0 || opcode::answerable_from_result(header.opcode));
                }
                Verdict::AnswerStored { header, offset, len } => {
                    prop_assert_eq!(header.unique, w.answer);
                    prop_assert!(u64::from(offset) + u64::from(len) <= u64::from(AREA_BYTES));
                }
                Verdict::Execute(h) => {
                    prop_assert!(h.unique != 0 && h.unique != w.done);
                    prop_assert!(h.len as usize >= 40 && h.len <= AREA_BYTES);
                }
                Verdict::Idle | Verdict::NoReply(_) | Verdict::Garbage(_) => {}
            }
        }
    }
}
