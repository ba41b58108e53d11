//! The fuser `Filesystem` implementation: converts kernel requests to [`Vfs`] calls and
//! the results to replies. No filesystem logic lives here.
//!
//! Every request is answered exactly once: with the result, or with the errno of the
//! error (`FsError::errno`). Failures that are not POSIX outcomes are logged.
//!
//! Every handler enters the [`Gate`] before it touches the filesystem and holds its pass
//! until it has replied: that is how a live upgrade freezes the client (see
//! [`crate::fuse::park`]). fuser answers a few requests itself (INIT during the
//! handshake, DESTROY, INTERRUPT, opcodes it does not know, and the operations this
//! adapter does not implement: ENOSYS); they change nothing, so they need no gate.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use crate::fuse::park::{Gate, Pass, PassKind};
use crate::fuse::reqlog;
use crate::meta::RESEND_BIT;
use crate::meta::{Attr, Caller, FileKind, Ino, SetAttr, TimeSet, Timestamp};
use crate::vfs::{FsError, LockWait, Unique, Vfs};

/// Largest write the kernel sends in one request. Part of the INIT negotiation, which a
/// successor must repeat identically: never change it for a running mount.
pub const MAX_WRITE: u32 = 1 << 20;
/// Entries fetched from the metadata engine per readdir request.
const READDIR_BATCH: usize = 512;
/// `st_blksize`: the I/O size applications should use.
const BLKSIZE: u32 = 128 << 10;

/// Names in the mount root that a draining client looks up to bring idle reader threads
/// through a handler (`<prefix><pid>-<n>`): always answered ENOENT, never cached, never
/// passed to the filesystem. The name is reserved.
pub const DRAIN_NUDGE_PREFIX: &[u8] = b".baton-drain-";

/// Capabilities asked of the kernel (those it offers).
fn wanted_capabilities() -> InitFlags {
    InitFlags::FUSE_POSIX_LOCKS
        | InitFlags::FUSE_FLOCK_LOCKS
        | InitFlags::FUSE_DO_READDIRPLUS
        | InitFlags::FUSE_READDIRPLUS_AUTO
        | InitFlags::FUSE_PARALLEL_DIROPS
        | InitFlags::FUSE_AUTO_INVAL_DATA
        | InitFlags::FUSE_EXPORT_SUPPORT
        | InitFlags::FUSE_CACHE_SYMLINKS
}

/// Baton's fuser filesystem.
#[derive(Debug)]
pub struct BatonFs {
    vfs: Arc<Vfs>,
    gate: Arc<Gate>,
    attr_ttl: Duration,
    entry_ttl: Duration,
    /// Who runs the handlers: fuser's readers of /dev/fuse, or the threads that answer
    /// what a dead predecessor left in the request log (`fuse::recover`).
    kind: PassKind,
}

impl BatonFs {
    pub fn new(vfs: Arc<Vfs>, gate: Arc<Gate>) -> Self {
        let attr_ttl = vfs.config().attr_ttl;
        let entry_ttl = vfs.config().entry_ttl;
        BatonFs {
            vfs,
            gate,
            attr_ttl,
            entry_ttl,
            kind: PassKind::Worker,
        }
    }

    /// The same filesystem for the session that answers the requests a dead predecessor
    /// read from /dev/fuse and left in the request log: every request counts as one
    /// that may have been applied already (mutations look for their record first, as
    /// resent requests do).
    pub fn for_recovery(&self) -> Self {
        BatonFs {
            vfs: self.vfs.clone(),
            gate: self.gate.clone(),
            attr_ttl: self.attr_ttl,
            entry_ttl: self.entry_ttl,
            kind: PassKind::Recovery,
        }
    }

    /// Enters the gate for `req` (see [`crate::fuse::park`]).
    fn pass(&self, req: &Request) -> Pass<'_> {
        self.gate.enter_request(req.unique().0, self.kind)
    }

    /// The request's `unique` as mutations use it to apply a request at most once: as the
    /// kernel sent it (with the resend bit), or marked as possibly applied already for a
    /// request recovered from the request log.
    fn unique(&self, req: &Request) -> Option<Unique> {
        let u = req.unique().0;
        Some(Unique(match self.kind {
            PassKind::Worker => u,
            PassKind::Recovery => u | RESEND_BIT,
        }))
    }

    pub fn vfs(&self) -> &Arc<Vfs> {
        &self.vfs
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    fn fuse_attr(&self, ino: Ino, a: &Attr) -> FileAttr {
        to_file_attr(ino, a)
    }

    fn entry(&self, req: &Request, reply: ReplyEntry, r: Result<(Ino, Attr), FsError>, op: &str) {
        match r {
            Ok((ino, attr)) => reply.entry_with_ttls(
                &self.attr_ttl,
                &self.entry_ttl,
                &self.fuse_attr(ino, &attr),
                Generation(0),
            ),
            Err(e) => reply.error(failed(req, &e, op)),
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::File => FileType::RegularFile,
        FileKind::Dir => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::CharDev => FileType::CharDevice,
        FileKind::BlockDev => FileType::BlockDevice,
        FileKind::Socket => FileType::Socket,
    }
}

pub fn to_file_attr(ino: Ino, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.atime.to_system_time(),
        mtime: a.mtime.to_system_time(),
        ctime: a.ctime.to_system_time(),
        crtime: a.ctime.to_system_time(),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: BLKSIZE,
        flags: 0,
    }
}

/// The errno to answer; engine failures are logged here, once.
fn errno(e: &FsError, op: &str) -> Errno {
    if !e.is_posix() {
        tracing::warn!(op, error = %DisplayChain(e), "request failed");
    }
    Errno::from_i32(e.errno())
}

/// The errno that answers `req` with `e`, marked applied in the request log: an error
/// reply is the whole answer, and a successor gives it again rather than run the request
/// a second time (it might succeed then, over what the application did after the error).
fn failed(req: &Request, e: &FsError, op: &str) -> Errno {
    let errno = errno(e, op);
    reqlog::applied(req.unique().0, errno.code(), 0);
    errno
}

/// Formats an error with its chain of sources.
struct DisplayChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut s = self.0.source();
        while let Some(e) = s {
            write!(f, ": {e}")?;
            s = e.source();
        }
        Ok(())
    }
}

fn time_set(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(t) => TimeSet::At(Timestamp::from_system_time(t)),
    }
}

/// Answers a request whose reply is only an error code. Its effect is complete: the
/// result is marked applied in the request log first, so that a successor answers it
/// with the same result instead of running it again (see `handover_proto::reqlog`).
fn empty(req: &Request, reply: ReplyEmpty, r: Result<(), FsError>, op: &str) {
    let unique = req.unique().0;
    match r {
        Ok(()) => {
            reqlog::applied(unique, 0, 0);
            reply.ok()
        }
        Err(e) => reply.error(failed(req, &e, op)),
    }
}

impl Filesystem for BatonFs {
    fn init(&mut self, _initreq: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let offered = config.capabilities();
        let wanted = wanted_capabilities() & offered;
        if let Err(missing) = config.add_capabilities(wanted) {
            tracing::warn!(?missing, "kernel refused capabilities");
        }
        if let Err(max) = config.set_max_write(MAX_WRITE) {
            let _ = config.set_max_write(max);
        }
        let _ = config.set_max_background(64);
        tracing::info!(abi = ?config.kernel_abi(), capabilities = ?wanted, max_write = MAX_WRITE, "FUSE connection initialized");
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut pass = self.pass(req);
        if parent.0 == Ino::ROOT.0 && name.as_bytes().starts_with(DRAIN_NUDGE_PREFIX) {
            // A drain nudge: the reply matters less than this thread passing the gate.
            pass.internal();
            reply.error(Errno::ENOENT);
            return;
        }
        self.entry(
            req,
            reply,
            self.vfs.lookup(Ino(parent.0), name.as_bytes()),
            "lookup",
        );
    }

    // FORGET has no reply, so it is never resent: one parked when the process exits for a
    // handover is lost. That leaks a lookup count in the successor's table, which is
    // harmless (inode numbers are the engine's and stay valid). BATCH_FORGET goes through
    // fuser's default, one `forget` per inode (fuser does not export the type of its
    // argument), so a freeze may park it halfway: the rest is lost the same way.
    fn forget(&self, req: &Request, ino: INodeNo, nlookup: u64) {
        let mut pass = self.pass(req);
        pass.no_reply();
        self.vfs.forget(Ino(ino.0), nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let _pass = self.pass(req);
        match self.vfs.getattr(Ino(ino.0)) {
            Ok(a) => reply.attr(&self.attr_ttl, &self.fuse_attr(Ino(ino.0), &a)),
            Err(e) => reply.error(failed(req, &e, "getattr")),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let _pass = self.pass(req);
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(time_set),
            mtime: mtime.map(time_set),
            ctime: ctime.map(Timestamp::from_system_time),
        };
        match self.vfs.setattr(self.unique(req), Ino(ino.0), &set) {
            Ok(a) => reply.attr(&self.attr_ttl, &self.fuse_attr(Ino(ino.0), &a)),
            Err(e) => reply.error(failed(req, &e, "setattr")),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        let _pass = self.pass(req);
        match self.vfs.readlink(Ino(ino.0)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(failed(req, &e, "readlink")),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.pass(req);
        let r = self.vfs.mknod(
            self.unique(req),
            caller(req),
            Ino(parent.0),
            name.as_bytes(),
            mode,
            umask,
            rdev,
        );
        self.entry(req, reply, r, "mknod");
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let _pass = self.pass(req);
        let r = self.vfs.mkdir(
            self.unique(req),
            caller(req),
            Ino(parent.0),
            name.as_bytes(),
            mode,
            umask,
        );
        self.entry(req, reply, r, "mkdir");
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs
                .unlink(self.unique(req), Ino(parent.0), name.as_bytes()),
            "unlink",
        );
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs
                .rmdir(self.unique(req), Ino(parent.0), name.as_bytes()),
            "rmdir",
        );
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let _pass = self.pass(req);
        let r = self.vfs.symlink(
            self.unique(req),
            caller(req),
            Ino(parent.0),
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
        );
        self.entry(req, reply, r, "symlink");
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        let r = self.vfs.rename(
            self.unique(req),
            Ino(parent.0),
            name.as_bytes(),
            Ino(newparent.0),
            newname.as_bytes(),
            flags.bits(),
        );
        empty(req, reply, r, "rename");
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let _pass = self.pass(req);
        let r = self.vfs.link(
            self.unique(req),
            Ino(ino.0),
            Ino(newparent.0),
            newname.as_bytes(),
        );
        self.entry(req, reply, r, "link");
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.pass(req);
        match self.vfs.open_file(Ino(ino.0), flags.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(failed(req, &e, "open")),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _pass = self.pass(req);
        match self.vfs.read(Ino(ino.0), fh.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(failed(req, &e, "read")),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let _pass = self.pass(req);
        match self.vfs.write(Ino(ino.0), fh.0, offset, data) {
            Ok(n) => {
                // The bytes are in the write journal: a successor answers this size
                // rather than write them again over what later requests wrote.
                reqlog::applied(req.unique().0, 0, n);
                reply.written(n)
            }
            Err(e) => reply.error(failed(req, &e, "write")),
        }
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs.flush(Ino(ino.0), fh.0, lock_owner.0),
            "flush",
        );
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs.release(Ino(ino.0), fh.0, lock_owner.map(|o| o.0)),
            "release",
        );
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        empty(req, reply, self.vfs.fsync(Ino(ino.0), fh.0), "fsync");
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let _pass = self.pass(req);
        match self.vfs.opendir(Ino(ino.0)) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(failed(req, &e, "opendir")),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let _pass = self.pass(req);
        match self
            .vfs
            .readdir(Ino(ino.0), fh.0, offset, READDIR_BATCH, false)
        {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino.0),
                        e.cookie,
                        kind(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(failed(req, &e, "readdir")),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        let _pass = self.pass(req);
        match self
            .vfs
            .readdir(Ino(ino.0), fh.0, offset, READDIR_BATCH, true)
        {
            Ok(entries) => {
                for e in entries {
                    let Some(attr) = e.attr.as_ref() else {
                        continue;
                    };
                    let fattr = self.fuse_attr(e.ino, attr);
                    let name = OsStr::from_bytes(&e.name);
                    if reply.add(
                        INodeNo(e.ino.0),
                        e.cookie,
                        name,
                        &self.entry_ttl,
                        &fattr,
                        Generation(0),
                    ) {
                        break;
                    }
                    // The kernel takes a lookup reference on every entry but "." and "..".
                    if e.name != b"." && e.name != b".." {
                        self.vfs.readdirplus_sent(e.ino);
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(failed(req, &e, "readdirplus")),
        }
    }

    fn releasedir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        self.vfs.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        // Every metadata change is committed durably before it is answered.
        reply.ok();
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let _pass = self.pass(req);
        match self.vfs.statfs() {
            Ok(s) => reply.statfs(
                s.blocks, s.bfree, s.bfree, s.files, s.ffree, s.bsize, s.namelen, s.bsize,
            ),
            Err(e) => reply.error(failed(req, &e, "statfs")),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs
                .setxattr(self.unique(req), Ino(ino.0), name.as_bytes(), value, flags),
            "setxattr",
        );
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let _pass = self.pass(req);
        xattr_reply(
            req,
            reply,
            size,
            self.vfs.getxattr(Ino(ino.0), name.as_bytes()),
            "getxattr",
        );
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let _pass = self.pass(req);
        xattr_reply(
            req,
            reply,
            size,
            self.vfs.listxattr(Ino(ino.0)),
            "listxattr",
        );
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs
                .removexattr(self.unique(req), Ino(ino.0), name.as_bytes()),
            "removexattr",
        );
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs.access(caller(req), Ino(ino.0), mask.bits() as u32),
            "access",
        );
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let _pass = self.pass(req);
        match self.vfs.create(
            self.unique(req),
            caller(req),
            Ino(parent.0),
            name.as_bytes(),
            mode,
            umask,
            flags,
        ) {
            Ok((ino, attr, fh)) => reply.created(
                &self.entry_ttl,
                &self.fuse_attr(ino, &attr),
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(failed(req, &e, "create")),
        }
    }

    fn getlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        let _pass = self.pass(req);
        match self
            .vfs
            .getlk(Ino(ino.0), lock_owner.0, typ, start, end, pid)
        {
            Ok(Some(l)) => {
                let t = match l.typ {
                    crate::meta::LockType::Read => libc::F_RDLCK,
                    crate::meta::LockType::Write => libc::F_WRLCK,
                };
                reply.locked(l.start, l.end, t, l.pid);
            }
            Ok(None) => reply.locked(start, end, libc::F_UNLCK, 0),
            Err(e) => reply.error(failed(req, &e, "getlk")),
        }
    }

    fn setlk(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        let pass = self.pass(req);
        // A blocking wait gives way to a resend freeze between attempts (park.rs).
        let wait: Option<&dyn LockWait> = if sleep { Some(&pass) } else { None };
        empty(
            req,
            reply,
            self.vfs
                .setlk(Ino(ino.0), lock_owner.0, typ, start, end, pid, wait),
            "setlk",
        );
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let _pass = self.pass(req);
        empty(
            req,
            reply,
            self.vfs
                .fallocate(self.unique(req), Ino(ino.0), fh.0, offset, length, mode),
            "fallocate",
        );
    }

    fn lseek(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        let _pass = self.pass(req);
        match self.vfs.lseek(Ino(ino.0), fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(failed(req, &e, "lseek")),
        }
    }
}

fn xattr_reply(req: &Request, reply: ReplyXattr, size: u32, r: Result<Vec<u8>, FsError>, op: &str) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() <= size as usize => reply.data(&v),
        Ok(_) => reply.error(Errno::ERANGE),
        Err(e) => reply.error(failed(req, &e, op)),
    }
}
