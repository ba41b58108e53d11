//! The values the metadata engines store and return, and their stored byte layout.
//!
//! Every record that is persisted has an explicit, versioned little-endian layout written
//! here by hand (not derived), so that a volume written by one release is read by the next
//! and by other clients of another release sharing a Redis volume. A decoder never panics:
//! a short or unknown record is [`Corrupt`].

use std::fmt;

/// Size of one chunk of a file: files are split at these boundaries, each chunk holds a
/// list of slices. Fixed for every volume (it is part of the layout, not a setting).
pub const CHUNK_SIZE: u64 = 64 << 20;

/// Longest file name accepted (bytes), as on Linux.
pub const NAME_MAX: usize = 255;

/// Longest symlink target (bytes).
pub const SYMLINK_MAX: usize = 4096;

/// Largest file size the layout can address (chunk index is a u32).
pub const MAX_FILE_SIZE: u64 = CHUNK_SIZE * (u32::MAX as u64);

/// An inode number. Allocated by the engine, stable forever; it is the FUSE node id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ino(pub u64);

impl Ino {
    /// The root directory of every volume.
    pub const ROOT: Ino = Ino(1);
    /// Inode numbers must fit in 40 bits so that a file handle can carry them (see
    /// `vfs::handle`). 2^40 inodes is far beyond any volume.
    pub const MAX: u64 = (1 << 40) - 1;
}

impl fmt::Display for Ino {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A mount's session in the metadata engine: it owns locks and open-but-unlinked files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A record read from the engine could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt {what} record")]
pub struct Corrupt {
    pub what: &'static str,
}

/// The type of an inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    CharDev,
    BlockDev,
    Socket,
}

impl FileKind {
    fn code(self) -> u8 {
        match self {
            FileKind::File => 1,
            FileKind::Dir => 2,
            FileKind::Symlink => 3,
            FileKind::Fifo => 4,
            FileKind::CharDev => 5,
            FileKind::BlockDev => 6,
            FileKind::Socket => 7,
        }
    }

    fn from_code(code: u8) -> Result<Self, Corrupt> {
        Ok(match code {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::Symlink,
            4 => FileKind::Fifo,
            5 => FileKind::CharDev,
            6 => FileKind::BlockDev,
            7 => FileKind::Socket,
            _ => return Err(Corrupt { what: "file kind" }),
        })
    }

    /// The `S_IFMT` bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => libc::S_IFREG,
            FileKind::Dir => libc::S_IFDIR,
            FileKind::Symlink => libc::S_IFLNK,
            FileKind::Fifo => libc::S_IFIFO,
            FileKind::CharDev => libc::S_IFCHR,
            FileKind::BlockDev => libc::S_IFBLK,
            FileKind::Socket => libc::S_IFSOCK,
        }
    }

    /// The kind named by the `S_IFMT` bits of `mode`, if any.
    pub fn from_mode(mode: u32) -> Option<Self> {
        Some(match mode & libc::S_IFMT {
            libc::S_IFREG => FileKind::File,
            libc::S_IFDIR => FileKind::Dir,
            libc::S_IFLNK => FileKind::Symlink,
            libc::S_IFIFO => FileKind::Fifo,
            libc::S_IFCHR => FileKind::CharDev,
            libc::S_IFBLK => FileKind::BlockDev,
            libc::S_IFSOCK => FileKind::Socket,
            _ => return None,
        })
    }
}

/// A point in time, nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn now() -> Self {
        let d = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        Timestamp(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
    }

    pub fn from_system_time(t: std::time::SystemTime) -> Self {
        match t.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => Timestamp(i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)),
            Err(e) => Timestamp(-i64::try_from(e.duration().as_nanos()).unwrap_or(i64::MAX)),
        }
    }

    pub fn to_system_time(self) -> std::time::SystemTime {
        let base = std::time::UNIX_EPOCH;
        if self.0 >= 0 {
            base + std::time::Duration::from_nanos(self.0 as u64)
        } else {
            base - std::time::Duration::from_nanos(self.0.unsigned_abs())
        }
    }

    pub fn secs(self) -> i64 {
        self.0.div_euclid(1_000_000_000)
    }
}

/// The attributes of an inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    pub kind: FileKind,
    /// Permission bits including set-uid, set-gid and sticky (`0o7777`).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Bytes for files, target length for symlinks, 0 for the rest.
    pub size: u64,
    pub rdev: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    /// For directories: the parent directory (answers ".."). 0 for other kinds.
    pub parent: Ino,
    /// For directories: the next readdir cookie to hand out. Cookies are stable across
    /// processes, so a directory stream can be continued by another client generation.
    pub next_cookie: u64,
}

/// First cookie given to a directory entry; 1 and 2 are "." and "..".
pub const FIRST_COOKIE: u64 = 3;

const ATTR_V1: u8 = 1;
const ATTR_LEN_V1: usize = 1 + 1 + 2 + 4 * 3 + 8 + 4 + 8 * 3 + 8 + 8;

impl Attr {
    /// A new inode's attributes at `now`.
    pub fn new(kind: FileKind, perm: u16, uid: u32, gid: u32, now: Timestamp) -> Self {
        Attr {
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == FileKind::Dir { 2 } else { 1 },
            size: 0,
            rdev: 0,
            atime: now,
            mtime: now,
            ctime: now,
            parent: Ino(0),
            next_cookie: if kind == FileKind::Dir {
                FIRST_COOKIE
            } else {
                0
            },
        }
    }

    /// Full `st_mode`: type and permission bits.
    pub fn mode(&self) -> u32 {
        self.kind.mode_bits() | u32::from(self.perm)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ATTR_LEN_V1);
        b.push(ATTR_V1);
        b.push(self.kind.code());
        b.extend_from_slice(&self.perm.to_le_bytes());
        b.extend_from_slice(&self.uid.to_le_bytes());
        b.extend_from_slice(&self.gid.to_le_bytes());
        b.extend_from_slice(&self.nlink.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.rdev.to_le_bytes());
        b.extend_from_slice(&self.atime.0.to_le_bytes());
        b.extend_from_slice(&self.mtime.0.to_le_bytes());
        b.extend_from_slice(&self.ctime.0.to_le_bytes());
        b.extend_from_slice(&self.parent.0.to_le_bytes());
        b.extend_from_slice(&self.next_cookie.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Corrupt> {
        const C: Corrupt = Corrupt { what: "attr" };
        if b.len() < ATTR_LEN_V1 || b[0] != ATTR_V1 {
            return Err(C);
        }
        let mut r = Reader::new(&b[1..], "attr");
        Ok(Attr {
            kind: FileKind::from_code(r.u8()?)?,
            perm: r.u16()?,
            uid: r.u32()?,
            gid: r.u32()?,
            nlink: r.u32()?,
            size: r.u64()?,
            rdev: r.u32()?,
            atime: Timestamp(r.i64()?),
            mtime: Timestamp(r.i64()?),
            ctime: Timestamp(r.i64()?),
            parent: Ino(r.u64()?),
            next_cookie: r.u64()?,
        })
    }
}

/// A directory entry as stored: the target inode, its kind (so readdir needs no attr
/// read), and the entry's readdir cookie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dentry {
    pub ino: Ino,
    pub kind: FileKind,
    pub cookie: u64,
}

const DENTRY_V1: u8 = 1;

impl Dentry {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(18);
        b.push(DENTRY_V1);
        b.push(self.kind.code());
        b.extend_from_slice(&self.ino.0.to_le_bytes());
        b.extend_from_slice(&self.cookie.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Corrupt> {
        if b.first() != Some(&DENTRY_V1) {
            return Err(Corrupt { what: "dentry" });
        }
        let mut r = Reader::new(&b[1..], "dentry");
        Ok(Dentry {
            kind: FileKind::from_code(r.u8()?)?,
            ino: Ino(r.u64()?),
            cookie: r.u64()?,
        })
    }
}

/// One entry returned by readdir.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
    /// Pass this cookie back to continue after this entry.
    pub cookie: u64,
    /// Filled for readdirplus.
    pub attr: Option<Attr>,
}

/// A piece of a chunk: `len` bytes at chunk offset `pos`, taken from offset `off` of the
/// immutable slice object `id` (whose total size is `size`). Id 0 is a hole (zeros).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Slice {
    pub pos: u32,
    pub id: u64,
    pub size: u32,
    pub off: u32,
    pub len: u32,
}

/// Stored size of one slice record.
pub const SLICE_LEN: usize = 4 + 8 + 4 + 4 + 4;

impl Slice {
    pub fn encode_into(&self, b: &mut Vec<u8>) {
        b.extend_from_slice(&self.pos.to_le_bytes());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        b.extend_from_slice(&self.off.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(SLICE_LEN);
        self.encode_into(&mut b);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Corrupt> {
        let mut r = Reader::new(b, "slice");
        let s = Slice {
            pos: r.u32()?,
            id: r.u64()?,
            size: r.u32()?,
            off: r.u32()?,
            len: r.u32()?,
        };
        if u64::from(s.pos) + u64::from(s.len) > CHUNK_SIZE
            || (s.id != 0 && u64::from(s.off) + u64::from(s.len) > u64::from(s.size))
        {
            return Err(Corrupt { what: "slice" });
        }
        Ok(s)
    }

    /// Decode a concatenation of slice records.
    pub fn decode_list(b: &[u8]) -> Result<Vec<Self>, Corrupt> {
        if b.len() % SLICE_LEN != 0 {
            return Err(Corrupt { what: "slice list" });
        }
        b.chunks_exact(SLICE_LEN).map(Slice::decode).collect()
    }
}

/// Volume settings, written once by `baton format`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Format {
    pub name: String,
    pub uuid: String,
    /// Object storage URL (opendal scheme), without credentials.
    pub storage: String,
    /// Size of the blocks slices are cut into, in bytes.
    pub block_size: u32,
    /// Capacity in bytes reported by statfs; 0 = unlimited.
    pub capacity: u64,
    /// Maximum number of inodes; 0 = unlimited.
    pub inodes: u64,
    pub created: Timestamp,
}

const FORMAT_V1: u8 = 1;

impl Format {
    pub const DEFAULT_BLOCK_SIZE: u32 = 4 << 20;
    pub const MIN_BLOCK_SIZE: u32 = 64 << 10;
    pub const MAX_BLOCK_SIZE: u32 = 16 << 20;

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![FORMAT_V1];
        put_bytes(&mut b, self.name.as_bytes());
        put_bytes(&mut b, self.uuid.as_bytes());
        put_bytes(&mut b, self.storage.as_bytes());
        b.extend_from_slice(&self.block_size.to_le_bytes());
        b.extend_from_slice(&self.capacity.to_le_bytes());
        b.extend_from_slice(&self.inodes.to_le_bytes());
        b.extend_from_slice(&self.created.0.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Corrupt> {
        if b.first() != Some(&FORMAT_V1) {
            return Err(Corrupt { what: "format" });
        }
        let mut r = Reader::new(&b[1..], "format");
        let f = Format {
            name: r.string()?,
            uuid: r.string()?,
            storage: r.string()?,
            block_size: r.u32()?,
            capacity: r.u64()?,
            inodes: r.u64()?,
            created: Timestamp(r.i64()?),
        };
        if !(Self::MIN_BLOCK_SIZE..=Self::MAX_BLOCK_SIZE).contains(&f.block_size)
            || !f.block_size.is_power_of_two()
        {
            return Err(Corrupt { what: "format" });
        }
        Ok(f)
    }
}

/// What a session holds in the engine (see `MetaEngine::session_holdings`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionHoldings {
    /// Inodes unlinked while open, kept for the session until it releases them.
    pub unlinked: Vec<Ino>,
    /// (inode, lock owner) of every lock the session holds.
    pub lockers: Vec<(Ino, u64)>,
}

/// What a mount says about itself when it opens a session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    pub host: String,
    pub mountpoint: String,
    pub pid: u32,
    pub version: String,
    /// Last heartbeat.
    pub heartbeat: Timestamp,
}

const SESSION_V1: u8 = 1;

impl SessionInfo {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![SESSION_V1];
        put_bytes(&mut b, self.host.as_bytes());
        put_bytes(&mut b, self.mountpoint.as_bytes());
        b.extend_from_slice(&self.pid.to_le_bytes());
        put_bytes(&mut b, self.version.as_bytes());
        b.extend_from_slice(&self.heartbeat.0.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, Corrupt> {
        if b.first() != Some(&SESSION_V1) {
            return Err(Corrupt { what: "session" });
        }
        let mut r = Reader::new(&b[1..], "session");
        Ok(SessionInfo {
            host: r.string()?,
            mountpoint: r.string()?,
            pid: r.u32()?,
            version: r.string()?,
            heartbeat: Timestamp(r.i64()?),
        })
    }
}

/// Kind of a byte-range lock.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LockType {
    Read,
    Write,
}

/// Who holds a lock: the mount's session and the kernel's lock owner id (the POSIX
/// owner, or the open file for flock).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockOwner {
    pub sid: SessionId,
    pub owner: u64,
}

/// A held byte-range lock: bytes `start..=end` (`end == u64::MAX` means to EOF).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RangeLock {
    pub owner: LockOwner,
    pub typ: LockType,
    pub start: u64,
    pub end: u64,
    pub pid: u32,
}

const LOCKS_V1: u8 = 1;
const RANGE_LOCK_LEN: usize = 8 + 8 + 1 + 8 + 8 + 4;

impl RangeLock {
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }

    pub fn encode_list(locks: &[RangeLock]) -> Vec<u8> {
        let mut b = Vec::with_capacity(1 + locks.len() * RANGE_LOCK_LEN);
        b.push(LOCKS_V1);
        for l in locks {
            b.extend_from_slice(&l.owner.sid.0.to_le_bytes());
            b.extend_from_slice(&l.owner.owner.to_le_bytes());
            b.push(match l.typ {
                LockType::Read => 1,
                LockType::Write => 2,
            });
            b.extend_from_slice(&l.start.to_le_bytes());
            b.extend_from_slice(&l.end.to_le_bytes());
            b.extend_from_slice(&l.pid.to_le_bytes());
        }
        b
    }

    pub fn decode_list(b: &[u8]) -> Result<Vec<RangeLock>, Corrupt> {
        const C: Corrupt = Corrupt { what: "lock" };
        if b.first() != Some(&LOCKS_V1) || (b.len() - 1) % RANGE_LOCK_LEN != 0 {
            return Err(C);
        }
        b[1..]
            .chunks_exact(RANGE_LOCK_LEN)
            .map(|c| {
                let mut r = Reader::new(c, "lock");
                Ok(RangeLock {
                    owner: LockOwner {
                        sid: SessionId(r.u64()?),
                        owner: r.u64()?,
                    },
                    typ: match r.u8()? {
                        1 => LockType::Read,
                        2 => LockType::Write,
                        _ => return Err(C),
                    },
                    start: r.u64()?,
                    end: r.u64()?,
                    pid: r.u32()?,
                })
            })
            .collect()
    }
}

/// Usage figures for statfs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Usage {
    pub used_bytes: u64,
    pub used_inodes: u64,
}

fn put_bytes(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
    b.extend_from_slice(s);
}

/// A bounds-checked little-endian reader over a record.
struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], Corrupt> {
        let (head, rest) = self
            .b
            .split_first_chunk::<N>()
            .ok_or(Corrupt { what: self.what })?;
        self.b = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8, Corrupt> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, Corrupt> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, Corrupt> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, Corrupt> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, Corrupt> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn string(&mut self) -> Result<String, Corrupt> {
        let n = self.u32()? as usize;
        if n > self.b.len() {
            return Err(Corrupt { what: self.what });
        }
        let (s, rest) = self.b.split_at(n);
        self.b = rest;
        String::from_utf8(s.to_vec()).map_err(|_| Corrupt { what: self.what })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind() -> impl Strategy<Value = FileKind> {
        prop_oneof![
            Just(FileKind::File),
            Just(FileKind::Dir),
            Just(FileKind::Symlink),
            Just(FileKind::Fifo),
            Just(FileKind::CharDev),
            Just(FileKind::BlockDev),
            Just(FileKind::Socket),
        ]
    }

    proptest! {
        #[test]
        fn attr_roundtrip(k in kind(), perm in 0u16..0o7777, uid: u32, gid: u32, nlink: u32,
                          size: u64, rdev: u32, a: i64, m: i64, c: i64, p: u64, n: u64) {
            let attr = Attr { kind: k, perm, uid, gid, nlink, size, rdev,
                atime: Timestamp(a), mtime: Timestamp(m), ctime: Timestamp(c),
                parent: Ino(p), next_cookie: n };
            prop_assert_eq!(Attr::decode(&attr.encode()), Ok(attr));
        }

        #[test]
        fn decoders_never_panic(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Attr::decode(&b);
            let _ = Dentry::decode(&b);
            let _ = Slice::decode_list(&b);
            let _ = Format::decode(&b);
            let _ = SessionInfo::decode(&b);
            let _ = RangeLock::decode_list(&b);
        }
    }

    #[test]
    fn slice_list_roundtrip() {
        let s = [
            Slice {
                pos: 0,
                id: 7,
                size: 100,
                off: 10,
                len: 90,
            },
            Slice {
                pos: 4096,
                id: 0,
                size: 0,
                off: 0,
                len: 1 << 20,
            },
        ];
        let mut b = Vec::new();
        for x in &s {
            x.encode_into(&mut b);
        }
        assert_eq!(Slice::decode_list(&b).unwrap(), s);
        assert!(Slice::decode_list(&b[1..]).is_err());
    }

    #[test]
    fn timestamps_before_epoch() {
        let t = Timestamp(-1_500_000_000);
        assert_eq!(Timestamp::from_system_time(t.to_system_time()), t);
        assert_eq!(t.secs(), -2);
    }
}
