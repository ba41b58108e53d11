//! The write journal: every acknowledged write, kept in memory that outlives the client
//! process until its bytes are committed to the metadata engine.
//!
//! The supervisor creates one memfd per mount and hands it to every client generation
//! with `Start`; the client maps it shared. [`super::DataStore::write`] appends a record
//! (the bytes and where they go) before it returns, so a write that returned success is
//! either committed or in the journal. When a flush has committed an inode's slices, the
//! records whose bytes went into them are marked committed and the ring's tail moves past
//! them. After a crash, the next client scans the journal and replays the acknowledged,
//! uncommitted records through the normal write path before it serves anything.
//!
//! ```text
//!  memfd (sparse): | header page (4 KiB) | ring: capacity bytes, a multiple of 4 KiB  |
//!
//!  header (little endian, offsets fixed for every layout version where marked *):
//!    0 magic "BATONJNL" u64 *   8 version u32 *     12 header bytes u32
//!   16 capacity u64            24 head u64 *       32 tail u64 *
//!   40 owner pid u32           48 takeovers u64    56 volume uuid length u32
//!   64 volume uuid [u8; 128]
//!
//!  head and tail are logical byte positions (they only grow); the byte at logical
//!  position p is at ring offset p % capacity. [tail, head) is a chain of records:
//!
//!   tail                                                            head
//!    v                                                               v
//!    | rec (committed) | rec (acked) | pad ..end of ring || rec | rec (reserved) |
//!
//!  record (64-byte header, then the data, then zeros to a multiple of 64 bytes):
//!    0 magic "BJR1" u32   4 state u32        8 pos u64 (= its logical position: the
//!   16 ino u64           24 offset u64         record's sequence number)
//!   32 len u32 (data)    36 crc32c u32       40 span u64 (header + data + padding)
//!   48 zero [u8; 16]     64 data [u8; len]
//!  state: 1 reserved -> 2 acked -> 3 committed | 4 dead; 5 pad (skip to the ring's end)
//!  crc32c covers pos, ino, offset, len (little endian) and the data.
//! ```
//!
//! The protocol, and what a crash at any instruction leaves:
//!
//! - Append: under the in-process lock, write the new record's header (state reserved)
//!   and then publish `head` past it (a record that would straddle the ring's end is
//!   preceded by a pad record); outside the lock, copy the data, store the CRC, then store
//!   the state acked. A crash before `head` moves leaves nothing; after, a reserved record
//!   that a scan steps over by its span and never replays (its write never returned).
//! - Commit: a flush that committed every slice an inode had when it started marks the
//!   records registered before that moment committed; a deleted inode's records are
//!   marked dead. The tail then advances over committed, dead and pad records, in order:
//!   an old live record holds it (and, when the ring is full, the writer flushes that
//!   record's inode: a record is never dropped to make room).
//! - Recovery: a client that takes the journal over scans [tail, head) and returns the
//!   acked records whose CRC matches, in sequence order; reserved ones and CRC mismatches
//!   (which cannot be acknowledged writes) are marked dead. The caller replays the records
//!   through the write path (positional writes: replaying twice is harmless), which adopts
//!   them instead of appending new ones, and flushes: a crash during a replay leaves the
//!   records as they were for the next client.
//! - Ownership: only one process may write the ring. The owner holds a POSIX record lock
//!   on the memfd's first byte, which the kernel releases when the process dies. A client
//!   that finds the lock free at start (first mount, or its predecessor is dead: a crash
//!   restart) takes the journal over at once, before it reports itself prepared; one that
//!   finds it held (a live upgrade: the old client still serves) defers, and takes it over
//!   when told to serve, after the old client flushed, froze and exited.
//!
//! Memory: while writes keep coming, pages the tail left behind stay in the memfd for the
//! head to reuse when it comes around (a page punched out and faulted in again costs an
//! allocation, a zeroing and a fault: a third of a streaming writer's CPU, more on a VM
//! whose host takes freed memory back). Once [`Journal::trim_if_idle`] (called from the
//! client's background tick) saw no record appended for a while, those pages are
//! returned to the kernel (punched out) in units of [`TRIM_UNIT`]: an idle journal holds
//! about as much memory as the written, uncommitted data, a busy one up to its capacity.
//!
//! What it must never do: let a record be overwritten or skipped before its bytes are
//! committed, replay a write that never returned success as if it had, or be written by
//! two processes at once.

use std::fmt;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{FallocateFlags, FcntlArg, fallocate, fcntl};
use parking_lot::Mutex;

use crate::meta::{Ino, MAX_FILE_SIZE};
use crate::shm::Mapping;

/// Bytes before the ring: the header, alone in its page.
pub const HEADER_BYTES: u64 = 4096;
/// Version of the layout drawn in the module documentation.
pub const LAYOUT_VERSION: u32 = 1;
/// The smallest ring a journal may have.
pub const MIN_CAPACITY: u64 = 256 << 10;
/// The largest record's data: longer writes are journaled as several records.
pub const MAX_RECORD_DATA: u64 = 4 << 20;
/// Freed ring memory is returned to the kernel in runs of at least this many bytes.
pub const TRIM_UNIT: u64 = 8 << 20;

const MAGIC: u64 = u64::from_le_bytes(*b"BATONJNL");
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"BJR1");
const RECORD_HEADER: u64 = 64;
const ALIGN: u64 = 64;
const PAGE: u64 = 4096;
const VOLUME_MAX: usize = 128;

/// Header field offsets.
mod hdr {
    pub const MAGIC: u64 = 0;
    pub const VERSION: u64 = 8;
    pub const HEADER_BYTES: u64 = 12;
    pub const CAPACITY: u64 = 16;
    pub const HEAD: u64 = 24;
    pub const TAIL: u64 = 32;
    pub const OWNER_PID: u64 = 40;
    pub const TAKEOVERS: u64 = 48;
    pub const VOLUME_LEN: u64 = 56;
    pub const VOLUME: u64 = 64;
}

/// Record header field offsets.
mod rec {
    pub const MAGIC: u64 = 0;
    pub const STATE: u64 = 4;
    pub const POS: u64 = 8;
    pub const INO: u64 = 16;
    pub const OFFSET: u64 = 24;
    pub const LEN: u64 = 32;
    pub const CRC: u64 = 36;
    pub const SPAN: u64 = 40;
    pub const ZERO: u64 = 48;
}

/// Record states.
mod state {
    pub const RESERVED: u32 = 1;
    pub const ACKED: u32 = 2;
    pub const COMMITTED: u32 = 3;
    pub const DEAD: u32 = 4;
    pub const PAD: u32 = 5;
}

/// A record in the journal, named by its logical position (which is also its sequence
/// number: positions only grow).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId(pub u64);

/// An acknowledged, uncommitted record found by [`Journal::take_over`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveRecord {
    pub id: RecordId,
    pub ino: Ino,
    pub offset: u64,
    pub len: u32,
}

/// What a takeover found in the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    /// Records to replay, in sequence order.
    pub live: Vec<LiveRecord>,
    /// Records whose write never returned (reserved, or data not complete): skipped.
    pub torn: u64,
    /// Acked records whose CRC does not match: skipped (never expected; logged).
    pub corrupt: u64,
    /// Bytes past a broken record chain, which could not be read (never expected).
    pub unreadable_bytes: u64,
    /// Why the journal was (re)initialized instead of scanned, if it was.
    pub initialized: Option<&'static str>,
}

/// How full the journal is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalUsage {
    pub capacity: u64,
    /// Bytes between tail and head: live records and the committed ones the tail has not
    /// passed yet.
    pub used: u64,
    /// Records appended by this process.
    pub appended: u64,
}

/// Opening (mapping) a journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalOpenError {
    #[error("cannot inspect the journal descriptor")]
    Stat(#[source] Errno),
    #[error("the journal is {bytes} bytes; at least {min} are needed")]
    TooSmall { bytes: u64, min: u64 },
    #[error("cannot map the journal")]
    Map(#[source] std::io::Error),
}

/// Taking a journal over failed; nothing in it was changed.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("cannot lock the journal")]
    Lock(#[source] Errno),
    #[error("another live process still owns the journal after {0:?}")]
    Busy(Duration),
    #[error(
        "the journal holds records in layout version {found}, which this build cannot read \
         (it reads version {LAYOUT_VERSION}); start a build that can"
    )]
    UnknownVersion { found: u32 },
    #[error("the journal holds records of volume {found:?}, not of this volume {expected:?}")]
    OtherVolume { found: String, expected: String },
}

/// Attaching the mount's journal to the data path, or taking it over, failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot open the write journal")]
    Open(#[source] JournalOpenError),
    #[error("a write journal is attached to this data path already")]
    Attached,
    #[error("cannot take the write journal over")]
    Takeover(#[source] TakeoverError),
    #[error("replaying a journaled write to inode {ino} failed")]
    Replay {
        ino: Ino,
        #[source]
        source: Box<super::DataError>,
    },
}

/// What taking the journal over found and did ([`super::DataStore::attach_journal`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Acknowledged, uncommitted writes applied again through the write path.
    pub records: usize,
    pub bytes: u64,
    /// Files those writes went to.
    pub inodes: usize,
    /// Records of files deleted before their writes were committed: dropped.
    pub deleted: usize,
    /// Records whose write never returned (skipped).
    pub torn: u64,
    /// Records failing their checksum (skipped; never expected).
    pub corrupt: u64,
    /// Why the journal was initialized instead of scanned, if it was.
    pub initialized: Option<&'static str>,
    /// Files whose flush after the replay failed: their writes stay buffered and in the
    /// journal, and the next flush tries again.
    pub unflushed: Vec<(Ino, String)>,
}

/// Why a record could not be appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AppendError {
    /// No room until the oldest live record is committed: `oldest` is its inode when its
    /// write is complete (`None` while it is still being copied).
    Full { oldest: Option<Ino> },
    /// This process has not taken the journal over.
    NotOwner,
}

/// The positions of the ring, mirrored from the header by the owner.
#[derive(Debug, Default)]
struct Ring {
    head: u64,
    tail: u64,
    /// Logical position below which ring memory was returned to the kernel.
    trimmed: u64,
}

/// A mount's write journal, mapped by this process. Share it as `Arc<Journal>`.
pub struct Journal {
    fd: OwnedFd,
    map: Mapping,
    /// Ring bytes.
    capacity: u64,
    /// Holds the ownership lock (see the module documentation).
    locked: AtomicBool,
    /// Took the journal over: appends are allowed.
    owned: AtomicBool,
    trim: AtomicBool,
    ring: Mutex<Ring>,
    appended: AtomicU64,
    /// `appended` at the previous [`Journal::trim_if_idle`], and when it was first seen.
    idle_since: Mutex<(u64, Instant)>,
}

impl fmt::Debug for Journal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ring = self.ring.lock();
        f.debug_struct("Journal")
            .field("fd", &self.fd.as_raw_fd())
            .field("capacity", &self.capacity)
            .field("owned", &self.owned.load(Ordering::Relaxed))
            .field("head", &ring.head)
            .field("tail", &ring.tail)
            .finish()
    }
}

/// Creates an empty journal memfd of `bytes` bytes, as the supervisor does for a mount
/// (for tests and benchmarks; the supervisor's own lives in `supervisor::mount`).
pub fn create_memfd(bytes: u64) -> std::io::Result<OwnedFd> {
    let fd =
        nix::sys::memfd::memfd_create(c"baton-journal", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)?;
    let len = libc::off_t::try_from(bytes).map_err(|_| std::io::Error::from(Errno::EFBIG))?;
    nix::unistd::ftruncate(&fd, len)?;
    Ok(fd)
}

fn align_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

fn record_crc(pos: u64, ino: Ino, offset: u64, data: &[u8]) -> u32 {
    let mut head = [0u8; 28];
    head[..8].copy_from_slice(&pos.to_le_bytes());
    head[8..16].copy_from_slice(&ino.0.to_le_bytes());
    head[16..24].copy_from_slice(&offset.to_le_bytes());
    head[24..28].copy_from_slice(&(data.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&head), data)
}

impl Journal {
    /// Maps the journal memfd `fd`. Reads and writes nothing: see [`Journal::try_lock`]
    /// and [`Journal::take_over`].
    pub fn open(fd: OwnedFd) -> Result<Journal, JournalOpenError> {
        let st = nix::sys::stat::fstat(&fd).map_err(JournalOpenError::Stat)?;
        let bytes = u64::try_from(st.st_size).unwrap_or(0);
        let capacity = bytes.saturating_sub(HEADER_BYTES) / PAGE * PAGE;
        if capacity < MIN_CAPACITY {
            return Err(JournalOpenError::TooSmall {
                bytes,
                min: HEADER_BYTES + MIN_CAPACITY,
            });
        }
        let map =
            Mapping::new(fd.as_fd(), HEADER_BYTES + capacity).map_err(JournalOpenError::Map)?;
        Ok(Journal {
            fd,
            map,
            capacity,
            locked: AtomicBool::new(false),
            owned: AtomicBool::new(false),
            trim: AtomicBool::new(true),
            ring: Mutex::new(Ring::default()),
            appended: AtomicU64::new(0),
            idle_since: Mutex::new((u64::MAX, Instant::now())),
        })
    }

    /// Ring bytes.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The largest record's data for this ring: longer writes take several records.
    pub fn max_record_data(&self) -> u64 {
        // A record of a quarter of the ring always fits once the ring drains, even after
        // a pad to the ring's end.
        MAX_RECORD_DATA.min(self.capacity / 4 - RECORD_HEADER)
    }

    /// Whether this process took the journal over (and may append).
    pub fn is_owned(&self) -> bool {
        self.owned.load(Ordering::Acquire)
    }

    /// Whether ring memory the tail left behind is returned to the kernel (default: yes).
    pub fn set_trim(&self, on: bool) {
        self.trim.store(on, Ordering::Relaxed);
    }

    /// Returns ring memory behind the tail to the kernel if no record was appended for
    /// `idle` (as far as calls at `now` saw: see the module documentation); whether it
    /// did.
    pub fn trim_if_idle(&self, now: Instant, idle: Duration) -> bool {
        let appended = self.appended.load(Ordering::Relaxed);
        {
            let mut seen = self.idle_since.lock();
            if seen.0 != appended {
                *seen = (appended, now);
                return false;
            }
            if now.saturating_duration_since(seen.1) < idle {
                return false;
            }
        }
        let mut ring = self.ring.lock();
        self.trim(&mut ring);
        true
    }

    pub fn usage(&self) -> JournalUsage {
        let ring = self.ring.lock();
        JournalUsage {
            capacity: self.capacity,
            used: ring.head - ring.tail,
            appended: self.appended.load(Ordering::Relaxed),
        }
    }

    /// Takes the ownership lock if no other live process holds it; `Ok(false)` when one
    /// does. Holding it is what makes this process the journal's only writer; the kernel
    /// releases it when the process dies (and when it closes any descriptor of the memfd,
    /// which is why the journal keeps its one descriptor for its whole life).
    pub fn try_lock(&self) -> Result<bool, TakeoverError> {
        if self.locked.load(Ordering::Acquire) {
            return Ok(true);
        }
        let lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 1,
            l_pid: 0,
        };
        match fcntl(&self.fd, FcntlArg::F_SETLK(&lock)) {
            Ok(_) => {
                self.locked.store(true, Ordering::Release);
                Ok(true)
            }
            Err(Errno::EAGAIN | Errno::EACCES) => Ok(false),
            Err(e) => Err(TakeoverError::Lock(e)),
        }
    }

    /// Waits up to `timeout` for the ownership lock.
    pub fn lock(&self, timeout: Duration) -> Result<(), TakeoverError> {
        let started = Instant::now();
        loop {
            if self.try_lock()? {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(TakeoverError::Busy(started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn rec_at(&self, pos: u64, field: u64) -> u64 {
        HEADER_BYTES + pos % self.capacity + field
    }

    fn record_state(&self, pos: u64) -> &AtomicU32 {
        self.map.u32_at(self.rec_at(pos, rec::STATE))
    }

    fn record_span(&self, pos: u64) -> u64 {
        self.map
            .u64_at(self.rec_at(pos, rec::SPAN))
            .load(Ordering::Relaxed)
    }

    /// Writes a record header at logical position `pos`.
    fn write_header(&self, pos: u64, state: u32, ino: Ino, offset: u64, len: u32, span: u64) {
        let m = &self.map;
        m.u32_at(self.rec_at(pos, rec::MAGIC))
            .store(RECORD_MAGIC, Ordering::Relaxed);
        m.u32_at(self.rec_at(pos, rec::STATE))
            .store(state, Ordering::Relaxed);
        m.u64_at(self.rec_at(pos, rec::POS))
            .store(pos, Ordering::Relaxed);
        m.u64_at(self.rec_at(pos, rec::INO))
            .store(ino.0, Ordering::Relaxed);
        m.u64_at(self.rec_at(pos, rec::OFFSET))
            .store(offset, Ordering::Relaxed);
        m.u32_at(self.rec_at(pos, rec::LEN))
            .store(len, Ordering::Relaxed);
        m.u32_at(self.rec_at(pos, rec::CRC))
            .store(0, Ordering::Relaxed);
        m.u64_at(self.rec_at(pos, rec::SPAN))
            .store(span, Ordering::Relaxed);
        m.u64_at(self.rec_at(pos, rec::ZERO))
            .store(0, Ordering::Relaxed);
        m.u64_at(self.rec_at(pos, rec::ZERO + 8))
            .store(0, Ordering::Relaxed);
    }

    fn header_volume(&self) -> Option<String> {
        let len = self.map.u32_at(hdr::VOLUME_LEN).load(Ordering::Relaxed) as usize;
        if len > VOLUME_MAX {
            return None;
        }
        // SAFETY: the header is only written by the owner, which is this process now
        // (takeover runs with the lock held, before any append).
        let bytes = unsafe { self.map.read(hdr::VOLUME, len) };
        String::from_utf8(bytes).ok()
    }

    /// Writes a fresh, empty header for `volume`. The magic goes last: a crash half way
    /// leaves a journal that the next takeover initializes again.
    fn initialize(&self, volume: &str) {
        let m = &self.map;
        m.u64_at(hdr::MAGIC).store(0, Ordering::Release);
        m.u32_at(hdr::VERSION)
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        m.u32_at(hdr::HEADER_BYTES)
            .store(HEADER_BYTES as u32, Ordering::Relaxed);
        m.u64_at(hdr::CAPACITY)
            .store(self.capacity, Ordering::Relaxed);
        m.u64_at(hdr::HEAD).store(0, Ordering::Relaxed);
        m.u64_at(hdr::TAIL).store(0, Ordering::Relaxed);
        let v = volume.as_bytes();
        let v = &v[..v.len().min(VOLUME_MAX)];
        // SAFETY: the header is written only by the owner (this process, before any append).
        unsafe { m.write(hdr::VOLUME, v) };
        m.u32_at(hdr::VOLUME_LEN)
            .store(v.len() as u32, Ordering::Relaxed);
        m.u64_at(hdr::MAGIC).store(MAGIC, Ordering::Release);
    }

    /// Takes the journal over for `volume` (the volume's uuid; at most 128 bytes are
    /// compared): initializes a new or unusable one, or scans it and returns the records
    /// to replay. Needs the ownership lock ([`Journal::try_lock`]). Afterwards this
    /// process may append; the returned records stay live until the caller commits them.
    pub fn take_over(&self, volume: &str) -> Result<Scan, TakeoverError> {
        if !self.locked.load(Ordering::Acquire) {
            return Err(TakeoverError::Lock(Errno::ENOLCK));
        }
        let mut ring = self.ring.lock();
        let m = &self.map;
        let magic = m.u64_at(hdr::MAGIC).load(Ordering::Acquire);
        let version = m.u32_at(hdr::VERSION).load(Ordering::Relaxed);
        let head = m.u64_at(hdr::HEAD).load(Ordering::Relaxed);
        let tail = m.u64_at(hdr::TAIL).load(Ordering::Relaxed);
        let empty = head == tail;
        let mut scan = Scan::default();
        let fresh = if magic == 0 {
            Some("new journal")
        } else if magic != MAGIC {
            tracing::error!(
                magic = format_args!("{magic:#x}"),
                "the journal memfd holds no journal; initializing it"
            );
            Some("not a journal")
        } else if version != LAYOUT_VERSION {
            if !empty {
                return Err(TakeoverError::UnknownVersion { found: version });
            }
            Some("empty journal of another layout version")
        } else if self.header_volume().as_deref() != Some(&volume[..volume.len().min(VOLUME_MAX)]) {
            if !empty {
                return Err(TakeoverError::OtherVolume {
                    found: self.header_volume().unwrap_or_default(),
                    expected: volume.to_string(),
                });
            }
            Some("empty journal of another volume")
        } else if m.u64_at(hdr::CAPACITY).load(Ordering::Relaxed) != self.capacity
            || m.u32_at(hdr::HEADER_BYTES).load(Ordering::Relaxed) != HEADER_BYTES as u32
            || head < tail
            || head - tail > self.capacity
            || tail % ALIGN != 0
            || head % ALIGN != 0
        {
            if !empty {
                tracing::error!(
                    head,
                    tail,
                    "the journal's header is damaged: its records cannot be found"
                );
            }
            Some("damaged header")
        } else {
            None
        };
        if let Some(why) = fresh {
            self.initialize(volume);
            *ring = Ring::default();
            scan.initialized = Some(why);
        } else {
            *ring = Ring {
                head,
                tail,
                trimmed: tail,
            };
            self.scan(&mut ring, &mut scan);
        }
        m.u32_at(hdr::OWNER_PID)
            .store(std::process::id(), Ordering::Relaxed);
        m.u64_at(hdr::TAKEOVERS).fetch_add(1, Ordering::Relaxed);
        self.advance_tail(&mut ring);
        self.owned.store(true, Ordering::Release);
        Ok(scan)
    }

    /// Walks [tail, head): collects the replayable records, marks the others dead, and
    /// cuts the ring at a broken chain (which only memory corruption can cause).
    fn scan(&self, ring: &mut Ring, scan: &mut Scan) {
        let m = &self.map;
        let mut pos = ring.tail;
        while pos < ring.head {
            let at = pos % self.capacity;
            let fits = self.capacity - at >= RECORD_HEADER;
            let span = if fits { self.record_span(pos) } else { 0 };
            let valid = fits
                && m.u32_at(self.rec_at(pos, rec::MAGIC))
                    .load(Ordering::Relaxed)
                    == RECORD_MAGIC
                && m.u64_at(self.rec_at(pos, rec::POS)).load(Ordering::Relaxed) == pos
                && span >= RECORD_HEADER
                && span % ALIGN == 0
                && at + span <= self.capacity
                && pos + span <= ring.head;
            if !valid {
                scan.unreadable_bytes = ring.head - pos;
                tracing::error!(
                    at = pos,
                    bytes = scan.unreadable_bytes,
                    "broken record chain in the journal: the rest cannot be read"
                );
                ring.head = pos;
                m.u64_at(hdr::HEAD).store(pos, Ordering::Release);
                break;
            }
            let st = self.record_state(pos);
            match st.load(Ordering::Acquire) {
                state::COMMITTED | state::DEAD | state::PAD => {}
                state::ACKED => match self.check_record(pos, span) {
                    Some(live) => scan.live.push(live),
                    None => {
                        scan.corrupt += 1;
                        tracing::error!(
                            record = pos,
                            "a journal record does not match its checksum: skipped"
                        );
                        st.store(state::DEAD, Ordering::Release);
                    }
                },
                _ => {
                    // Reserved: its write was being copied when the process died, so it
                    // never returned success.
                    scan.torn += 1;
                    st.store(state::DEAD, Ordering::Release);
                }
            }
            pos += span;
        }
    }

    /// The acked record at `pos` if its fields are sane and its CRC matches.
    fn check_record(&self, pos: u64, span: u64) -> Option<LiveRecord> {
        let m = &self.map;
        let ino = Ino(m.u64_at(self.rec_at(pos, rec::INO)).load(Ordering::Relaxed));
        let offset = m
            .u64_at(self.rec_at(pos, rec::OFFSET))
            .load(Ordering::Relaxed);
        let len = m.u32_at(self.rec_at(pos, rec::LEN)).load(Ordering::Relaxed);
        let crc = m.u32_at(self.rec_at(pos, rec::CRC)).load(Ordering::Relaxed);
        if RECORD_HEADER + u64::from(len) > span
            || offset
                .checked_add(u64::from(len))
                .is_none_or(|e| e > MAX_FILE_SIZE)
        {
            return None;
        }
        let live = LiveRecord {
            id: RecordId(pos),
            ino,
            offset,
            len,
        };
        (record_crc(pos, ino, offset, &self.read(&live)) == crc).then_some(live)
    }

    /// The data of a record found by [`Journal::take_over`] (still live).
    pub fn read(&self, record: &LiveRecord) -> Vec<u8> {
        // SAFETY: a live record's data is written once, before it became acked, and not
        // again until it is committed and the ring comes around.
        unsafe {
            self.map
                .read(self.rec_at(record.id.0, RECORD_HEADER), record.len as usize)
        }
    }

    /// Appends a record of `data` (at most [`Journal::max_record_data`] bytes) for a write
    /// at `offset` of `ino`. When it returns, the record survives this process. (The
    /// writer reserves and fills under its own lock instead: `writer.rs`.)
    #[cfg(test)]
    pub(crate) fn append(
        &self,
        ino: Ino,
        offset: u64,
        data: &[u8],
    ) -> Result<RecordId, AppendError> {
        let id = self.reserve(ino, offset, data.len())?;
        self.fill(id, ino, offset, data);
        Ok(id)
    }

    /// Reserves a record (state reserved) and publishes it in the chain. The caller must
    /// [`Journal::fill`] it soon: the tail cannot pass it until then.
    pub(crate) fn reserve(
        &self,
        ino: Ino,
        offset: u64,
        len: usize,
    ) -> Result<RecordId, AppendError> {
        if !self.owned.load(Ordering::Acquire) {
            return Err(AppendError::NotOwner);
        }
        assert!(
            len as u64 <= self.max_record_data(),
            "journal record of {len} bytes"
        );
        let span = align_up(RECORD_HEADER + len as u64, ALIGN);
        let mut ring = self.ring.lock();
        let to_end = self.capacity - ring.head % self.capacity;
        let pad = if span > to_end { to_end } else { 0 };
        let fits = |r: &Ring| r.head + pad + span - r.tail <= self.capacity;
        if !fits(&ring) {
            self.advance_tail(&mut ring);
            if !fits(&ring) {
                return Err(AppendError::Full {
                    oldest: self.oldest_live(&ring),
                });
            }
        }
        if pad > 0 {
            self.write_header(ring.head, state::PAD, Ino(0), 0, 0, pad);
            ring.head += pad;
        }
        let pos = ring.head;
        self.write_header(pos, state::RESERVED, ino, offset, len as u32, span);
        ring.head += span;
        // Publishing the head after the headers: a scan never meets an unwritten header.
        self.map
            .u64_at(hdr::HEAD)
            .store(ring.head, Ordering::Release);
        Ok(RecordId(pos))
    }

    /// Copies the data of a reserved record, then its CRC, then marks it acked.
    pub(crate) fn fill(&self, id: RecordId, ino: Ino, offset: u64, data: &[u8]) {
        let at = self.rec_at(id.0, RECORD_HEADER);
        self.map.populate(at, data.len() as u64);
        // SAFETY: the record was reserved by this thread: nobody else touches its data
        // until it is acked (the tail stops at a reserved record).
        unsafe { self.map.write(at, data) };
        let crc = record_crc(id.0, ino, offset, data);
        self.map
            .u32_at(self.rec_at(id.0, rec::CRC))
            .store(crc, Ordering::Relaxed);
        self.record_state(id.0)
            .store(state::ACKED, Ordering::Release);
        self.appended.fetch_add(1, Ordering::Relaxed);
    }

    /// The inode of the record at the tail, if its write is complete.
    fn oldest_live(&self, ring: &Ring) -> Option<Ino> {
        if ring.tail == ring.head
            || self.record_state(ring.tail).load(Ordering::Acquire) != state::ACKED
        {
            return None;
        }
        Some(Ino(self
            .map
            .u64_at(self.rec_at(ring.tail, rec::INO))
            .load(Ordering::Relaxed)))
    }

    /// Marks records committed: their bytes are in the metadata engine.
    pub(crate) fn commit(&self, ids: &[RecordId]) {
        self.finish(ids, state::COMMITTED);
    }

    /// Marks records dead: their inode is gone, or their write failed.
    pub(crate) fn kill(&self, ids: &[RecordId]) {
        self.finish(ids, state::DEAD);
    }

    fn finish(&self, ids: &[RecordId], to: u32) {
        if ids.is_empty() || !self.owned.load(Ordering::Acquire) {
            return;
        }
        for id in ids {
            debug_assert_eq!(
                self.map
                    .u64_at(self.rec_at(id.0, rec::POS))
                    .load(Ordering::Relaxed),
                id.0
            );
            self.record_state(id.0).store(to, Ordering::Release);
        }
        let mut ring = self.ring.lock();
        self.advance_tail(&mut ring);
    }

    /// Moves the tail over committed, dead and pad records.
    fn advance_tail(&self, ring: &mut Ring) {
        let start = ring.tail;
        while ring.tail < ring.head {
            match self.record_state(ring.tail).load(Ordering::Acquire) {
                state::COMMITTED | state::DEAD | state::PAD => {}
                _ => break,
            }
            let span = self.record_span(ring.tail);
            if span < RECORD_HEADER || span % ALIGN != 0 {
                tracing::error!(
                    at = ring.tail,
                    span,
                    "damaged journal record: the tail stops here"
                );
                break;
            }
            ring.tail += span;
        }
        if ring.tail != start {
            self.map
                .u64_at(hdr::TAIL)
                .store(ring.tail, Ordering::Release);
        }
    }

    /// Returns to the kernel whole pages of ring memory behind the tail that the head has
    /// not reused yet (under the ring lock: the head cannot move into them meanwhile).
    fn trim(&self, ring: &mut Ring) {
        if !self.trim.load(Ordering::Relaxed) {
            return;
        }
        let from = align_up(
            ring.trimmed.max(ring.head.saturating_sub(self.capacity)),
            PAGE,
        );
        let to = ring.tail / PAGE * PAGE;
        if to <= from || to - from < TRIM_UNIT {
            return;
        }
        let mut pos = from;
        while pos < to {
            let at = pos % self.capacity;
            let len = (to - pos).min(self.capacity - at);
            let punched = fallocate(
                &self.fd,
                FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                (HEADER_BYTES + at) as libc::off_t,
                len as libc::off_t,
            );
            if let Err(e) = punched {
                tracing::warn!(error = %e, "cannot return journal memory to the kernel; keeping it");
                self.trim.store(false, Ordering::Relaxed);
                return;
            }
            pos += len;
        }
        ring.trimmed = to;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const VOL: &str = "journal-test-volume";

    fn memfd(ring: u64) -> OwnedFd {
        create_memfd(HEADER_BYTES + ring).unwrap()
    }

    /// Maps `fd` again and takes it over, as a successor process would.
    fn successor(fd: &OwnedFd) -> (Journal, Scan) {
        let j = Journal::open(fd.try_clone().unwrap()).unwrap();
        assert!(j.try_lock().unwrap());
        let scan = j.take_over(VOL).unwrap();
        (j, scan)
    }

    fn data(seed: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (seed as usize * 31 + i * 7) as u8)
            .collect()
    }

    fn replayed(j: &Journal, scan: &Scan) -> Vec<(Ino, u64, Vec<u8>)> {
        scan.live
            .iter()
            .map(|r| (r.ino, r.offset, j.read(r)))
            .collect()
    }

    #[test]
    fn a_new_journal_is_initialized_and_appends_need_a_takeover() {
        let fd = memfd(MIN_CAPACITY);
        let j = Journal::open(fd.try_clone().unwrap()).unwrap();
        assert_eq!(j.append(Ino(2), 0, b"x"), Err(AppendError::NotOwner));
        assert!(matches!(j.take_over(VOL), Err(TakeoverError::Lock(_))));
        assert!(j.try_lock().unwrap());
        let scan = j.take_over(VOL).unwrap();
        assert_eq!(scan.initialized, Some("new journal"));
        assert!(scan.live.is_empty());
        j.append(Ino(2), 0, b"x").unwrap();
        assert!(matches!(
            Journal::open(create_memfd(HEADER_BYTES + 4096).unwrap()),
            Err(JournalOpenError::TooSmall { .. })
        ));
    }

    #[test]
    fn acked_records_survive_the_process_and_committed_or_dead_ones_do_not() {
        let fd = memfd(MIN_CAPACITY);
        let (j, _) = successor(&fd);
        let a = j.append(Ino(2), 0, &data(1, 1000)).unwrap();
        let b = j.append(Ino(3), 4096, &data(2, 10)).unwrap();
        let c = j.append(Ino(2), 1000, &data(3, 5000)).unwrap();
        let d = j.append(Ino(4), 7, &data(4, 1)).unwrap();
        j.commit(&[a]);
        j.kill(&[d]);
        assert!(a < b && b < c && c < d, "ids are sequence numbers");
        drop(j);
        let (j2, scan) = successor(&fd);
        assert_eq!(scan.initialized, None);
        assert_eq!(
            replayed(&j2, &scan),
            vec![(Ino(3), 4096, data(2, 10)), (Ino(2), 1000, data(3, 5000))]
        );
        assert_eq!(
            scan.live.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![b, c]
        );
        // Replaying again after another crash finds the same records until committed.
        drop(j2);
        let (j3, again) = successor(&fd);
        assert_eq!(again.live, scan.live);
        j3.commit(&[b, c]);
        assert_eq!(j3.usage().used, 0, "the tail passed every finished record");
        drop(j3);
        assert!(successor(&fd).1.live.is_empty());
    }

    #[test]
    fn torn_and_corrupt_records_are_skipped_and_the_chain_goes_on() {
        let fd = memfd(MIN_CAPACITY);
        let (j, _) = successor(&fd);
        let a = j.append(Ino(2), 0, &data(1, 100)).unwrap();
        // Reserved, data never copied: the process died inside `append`.
        let torn = j.reserve(Ino(2), 100, 300).unwrap();
        // Data copied but not the CRC nor the state.
        let half = j.reserve(Ino(5), 0, 64).unwrap();
        // SAFETY: test: the record is reserved by this thread.
        unsafe { j.map.write(j.rec_at(half.0, RECORD_HEADER), &data(9, 64)) };
        let bad = j.append(Ino(3), 0, &data(2, 200)).unwrap();
        let c = j.append(Ino(2), 400, &data(3, 50)).unwrap();
        // Flip a data byte of an acked record: its CRC no longer matches.
        let at = j.rec_at(bad.0, RECORD_HEADER + 17);
        // SAFETY: test: nobody else uses the mapping.
        let byte = unsafe { j.map.read(at, 1) }[0];
        // SAFETY: as above.
        unsafe { j.map.write(at, &[byte ^ 0x40]) };
        drop(j);
        let (j2, scan) = successor(&fd);
        assert_eq!(
            scan.live.iter().map(|r| r.id).collect::<Vec<_>>(),
            vec![a, c]
        );
        assert_eq!((scan.torn, scan.corrupt, scan.unreadable_bytes), (2, 1, 0));
        assert_ne!(torn, half);
        // The skipped records were marked dead: committing the live ones empties the ring.
        j2.commit(&[a, c]);
        assert_eq!(j2.usage().used, 0);
    }

    #[test]
    fn records_wrap_around_the_ring_end_with_a_pad() {
        let fd = memfd(MIN_CAPACITY);
        let (j, _) = successor(&fd);
        let max = j.max_record_data() as usize / 2;
        let mut kept: Vec<(RecordId, Ino, u64, Vec<u8>)> = Vec::new();
        // Each round appends three records and commits the two kept from the round before
        // and one of its own, so live records keep landing across the ring's end.
        for round in 0..20u64 {
            let mut new = Vec::new();
            for k in 0..3u64 {
                let len = max - 700 * ((round + k) % 7) as usize;
                let bytes = data(round * 3 + k, len);
                let id = j.append(Ino(10 + k), round * 1000, &bytes).unwrap();
                new.push((id, Ino(10 + k), round * 1000, bytes));
            }
            let mut done: Vec<_> = kept.drain(..).map(|x| x.0).collect();
            done.push(new[1].0);
            j.commit(&done);
            kept = vec![new[0].clone(), new[2].clone()];
        }
        assert!(
            j.ring.lock().head > 3 * j.capacity,
            "the ring came around several times"
        );
        drop(j);
        let (j2, scan) = successor(&fd);
        let got: Vec<_> = scan
            .live
            .iter()
            .map(|r| (r.id, r.ino, r.offset, j2.read(r)))
            .collect();
        assert_eq!(got, kept);
    }

    #[test]
    fn a_full_ring_names_the_oldest_live_inode_and_never_overwrites_it() {
        let fd = memfd(MIN_CAPACITY);
        let (j, _) = successor(&fd);
        let chunk = data(7, 10_000);
        let first = j.append(Ino(42), 0, &chunk).unwrap();
        let mut others = Vec::new();
        let full = loop {
            match j.append(Ino(43), others.len() as u64 * 10_000, &chunk) {
                Ok(id) => others.push(id),
                Err(e) => break e,
            }
        };
        assert_eq!(
            full,
            AppendError::Full {
                oldest: Some(Ino(42))
            }
        );
        // A record still being copied at the tail has no inode to flush yet.
        drop(j);
        let (j2, scan) = successor(&fd);
        assert_eq!(scan.live.len(), others.len() + 1);
        assert_eq!(scan.live[0].id, first);
        // Two records freed at the tail always make room for one more (a pad is shorter
        // than a record).
        j2.commit(&[first, others[0]]);
        j2.append(Ino(44), 0, &chunk).unwrap();
        let fd2 = memfd(MIN_CAPACITY);
        let (j3, _) = successor(&fd2);
        let r = j3
            .reserve(Ino(5), 0, j3.max_record_data() as usize)
            .unwrap();
        while j3.append(Ino(6), 0, &chunk).is_ok() {}
        assert_eq!(
            j3.append(Ino(6), 0, &chunk),
            Err(AppendError::Full { oldest: None })
        );
        j3.fill(r, Ino(5), 0, &data(1, j3.max_record_data() as usize));
        assert_eq!(
            j3.append(Ino(6), 0, &chunk),
            Err(AppendError::Full {
                oldest: Some(Ino(5))
            })
        );
    }

    #[test]
    fn another_process_or_build_or_volume_cannot_take_a_journal_with_records() {
        let fd = memfd(MIN_CAPACITY);
        let (j, _) = successor(&fd);
        j.append(Ino(2), 0, b"kept").unwrap();
        drop(j);
        let other = Journal::open(fd.try_clone().unwrap()).unwrap();
        assert!(other.try_lock().unwrap());
        assert!(matches!(
            other.take_over("another-volume"),
            Err(TakeoverError::OtherVolume { .. })
        ));
        other
            .map
            .u32_at(hdr::VERSION)
            .store(LAYOUT_VERSION + 1, Ordering::Relaxed);
        assert!(matches!(
            other.take_over(VOL),
            Err(TakeoverError::UnknownVersion { found: 2 })
        ));
        other
            .map
            .u32_at(hdr::VERSION)
            .store(LAYOUT_VERSION, Ordering::Relaxed);
        // Nothing was changed by the refusals.
        let scan = other.take_over(VOL).unwrap();
        assert_eq!(replayed(&other, &scan), vec![(Ino(2), 0, b"kept".to_vec())]);
        other.commit(&[scan.live[0].id]);
        drop(other);
        // Empty: another version or volume may start over.
        let last = Journal::open(fd.try_clone().unwrap()).unwrap();
        assert!(last.try_lock().unwrap());
        assert_eq!(
            last.take_over("another-volume").unwrap().initialized,
            Some("empty journal of another volume")
        );
    }

    #[test]
    fn the_ownership_lock_excludes_another_process_until_it_dies() {
        let fd = memfd(MIN_CAPACITY);
        let (read_end, write_end) = nix::unistd::pipe().unwrap();
        let (go_r, go_w) = nix::unistd::pipe().unwrap();
        // SAFETY: the child only calls async-signal-safe functions (fcntl, write, read,
        // _exit) before it exits.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let lock = libc::flock {
                    l_type: libc::F_WRLCK as libc::c_short,
                    l_whence: libc::SEEK_SET as libc::c_short,
                    l_start: 0,
                    l_len: 1,
                    l_pid: 0,
                };
                // SAFETY: plain syscalls on descriptors this process holds.
                unsafe {
                    let ok = libc::fcntl(fd.as_raw_fd(), libc::F_SETLK, &lock) == 0;
                    libc::write(write_end.as_raw_fd(), [u8::from(ok)].as_ptr().cast(), 1);
                    let mut b = [0u8; 1];
                    libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                    libc::_exit(0);
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                let mut b = [0u8; 1];
                nix::unistd::read(&read_end, &mut b).unwrap();
                assert_eq!(b[0], 1, "the child took the lock");
                let j = Journal::open(fd.try_clone().unwrap()).unwrap();
                assert!(!j.try_lock().unwrap(), "a live owner holds the journal");
                assert!(matches!(
                    j.lock(Duration::from_millis(20)),
                    Err(TakeoverError::Busy(_))
                ));
                nix::unistd::write(&go_w, &[1]).unwrap();
                nix::sys::wait::waitpid(child, None).unwrap();
                j.lock(Duration::from_secs(5)).unwrap();
                j.take_over(VOL).unwrap();
            }
        }
    }

    #[test]
    fn memory_behind_the_tail_is_returned_to_the_kernel() {
        let ring = 4 * TRIM_UNIT;
        let fd = memfd(ring);
        let (j, _) = successor(&fd);
        let chunk = data(3, j.max_record_data() as usize);
        let blocks = |fd: &OwnedFd| nix::sys::stat::fstat(fd).unwrap().st_blocks as u64 * 512;
        for round in 0..12u64 {
            let id = j.append(Ino(9), round, &chunk).unwrap();
            j.commit(&[id]);
        }
        // Busy: nothing is returned (the head reuses the pages).
        let t0 = Instant::now();
        let idle = Duration::from_secs(60);
        assert!(!j.trim_if_idle(t0, idle));
        assert!(!j.trim_if_idle(t0 + idle / 2, idle));
        assert!(blocks(&fd) > 2 * TRIM_UNIT + HEADER_BYTES + 2 * j.max_record_data());
        // Nothing appended for `idle`: returned.
        assert!(j.trim_if_idle(t0 + idle, idle));
        assert!(
            blocks(&fd) <= 2 * TRIM_UNIT + HEADER_BYTES + 2 * j.max_record_data(),
            "{} bytes held for a ring of {ring} with nothing live",
            blocks(&fd)
        );
        // Live data is never punched: every record comes back intact.
        let ids: Vec<_> = (0..6u64)
            .map(|k| j.append(Ino(9), k, &chunk).unwrap())
            .collect();
        j.commit(&ids[..3]);
        drop(j);
        let (j2, scan) = successor(&fd);
        assert_eq!(
            scan.live.iter().map(|r| r.id).collect::<Vec<_>>(),
            ids[3..].to_vec()
        );
        assert!(scan.live.iter().all(|r| j2.read(r) == chunk));
    }

    #[derive(Clone, Debug)]
    enum Op {
        Append {
            ino: u64,
            offset: u64,
            len: usize,
        },
        /// Appended but the process died before the data was complete.
        Torn {
            ino: u64,
            len: usize,
        },
        /// Commit the oldest `n` live records of an inode (a flush).
        Commit {
            ino: u64,
            n: usize,
        },
        /// The inode was deleted.
        Kill {
            ino: u64,
        },
        /// The process dies; a successor takes over.
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..4u64, 0..1_000_000u64, 1..40_000usize).prop_map(|(ino, offset, len)| Op::Append { ino, offset, len }),
            1 => (0..4u64, 1..5_000usize).prop_map(|(ino, len)| Op::Torn { ino, len }),
            3 => (0..4u64, 1..4usize).prop_map(|(ino, n)| Op::Commit { ino, n }),
            1 => (0..4u64).prop_map(|ino| Op::Kill { ino }),
            1 => Just(Op::Crash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Against a model (the live records of each inode, in order): whatever the
        /// sequence of appends, commits, deletions, torn appends and crashes, a successor
        /// finds exactly the live records, in sequence order, with their bytes.
        #[test]
        fn a_successor_finds_exactly_the_live_records(ops in proptest::collection::vec(op(), 1..120)) {
            let fd = memfd(MIN_CAPACITY);
            let (mut j, _) = successor(&fd);
            let mut live: BTreeMap<RecordId, (Ino, u64, Vec<u8>)> = BTreeMap::new();
            let mut seed = 0u64;
            for op in ops {
                match op {
                    Op::Append { ino, offset, len } => {
                        seed += 1;
                        let bytes = data(seed, len.min(j.max_record_data() as usize));
                        let id = loop {
                            match j.append(Ino(ino), offset, &bytes) {
                                Ok(id) => break id,
                                Err(AppendError::Full { oldest: Some(victim) }) => {
                                    // Backpressure: the writer flushes the oldest inode.
                                    let ids: Vec<_> = live.iter().filter(|(_, v)| v.0 == victim).map(|(k, _)| *k).collect();
                                    prop_assert!(!ids.is_empty());
                                    j.commit(&ids);
                                    live.retain(|_, v| v.0 != victim);
                                }
                                Err(e) => prop_assert!(false, "append failed: {e:?}"),
                            }
                        };
                        live.insert(id, (Ino(ino), offset, bytes));
                    }
                    Op::Torn { ino, len } => {
                        // Only when it fits: a torn append never waits.
                        let _ = j.reserve(Ino(ino), 0, len);
                        drop(j);
                        let (next, scan) = successor(&fd);
                        j = next;
                        let got: Vec<_> = scan.live.iter().map(|r| (r.id, (r.ino, r.offset, j.read(r)))).collect();
                        prop_assert_eq!(got, live.clone().into_iter().collect::<Vec<_>>());
                    }
                    Op::Commit { ino, n } => {
                        let ids: Vec<_> = live.iter().filter(|(_, v)| v.0 == Ino(ino)).map(|(k, _)| *k).take(n).collect();
                        j.commit(&ids);
                        for id in ids {
                            live.remove(&id);
                        }
                    }
                    Op::Kill { ino } => {
                        let ids: Vec<_> = live.iter().filter(|(_, v)| v.0 == Ino(ino)).map(|(k, _)| *k).collect();
                        j.kill(&ids);
                        live.retain(|_, v| v.0 != Ino(ino));
                    }
                    Op::Crash => {
                        drop(j);
                        let (next, scan) = successor(&fd);
                        j = next;
                        prop_assert_eq!(scan.corrupt, 0);
                        let got: Vec<_> = scan.live.iter().map(|r| (r.id, (r.ino, r.offset, j.read(r)))).collect();
                        prop_assert_eq!(got, live.clone().into_iter().collect::<Vec<_>>());
                    }
                }
                let used = j.usage().used;
                prop_assert!(used <= j.capacity());
            }
        }
    }
}
