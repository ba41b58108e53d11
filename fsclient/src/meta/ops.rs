//! The metadata operations, written once over [`Backend`]/[`Tx`].
//!
//! Each public operation is one transaction. Helpers here take `&mut dyn Tx` and never
//! commit; only the `MetaEngine` methods open transactions.

use parking_lot::Mutex;

use super::once::{self, Recorded};
use super::*;

/// How many inode numbers a client reserves at a time (fewer round trips on Redis).
const INODE_BATCH: u64 = 64;
/// How many slice ids a client reserves at a time.
const SLICE_BATCH: u64 = 256;

/// The metadata engine over a backend.
#[derive(Debug)]
pub struct Meta<B: Backend> {
    backend: B,
    inodes: Mutex<IdPool>,
    slices: Mutex<IdPool>,
}

/// Ids reserved from a counter and not handed out yet.
#[derive(Debug, Default)]
struct IdPool {
    next: u64,
    end: u64,
}

impl<B: Backend> Meta<B> {
    /// Runs mutation `f` in one write transaction, at most once for `req` (see `once.rs`).
    fn write_once<T: Recorded>(
        &self,
        req: Option<RequestId>,
        f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>,
    ) -> Result<T> {
        self.backend.write(&mut |tx| once::apply(tx, req, f))
    }

    pub fn new(backend: B) -> Self {
        Meta {
            backend,
            inodes: Mutex::new(IdPool::default()),
            slices: Mutex::new(IdPool::default()),
        }
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn next_id(&self, pool: &Mutex<IdPool>, counter: Counter, batch: u64) -> Result<u64> {
        let mut p = pool.lock();
        if p.next == p.end {
            let first = self.backend.write(&mut |tx| tx.alloc(counter, batch))?;
            p.next = first;
            p.end = first + batch;
        }
        let id = p.next;
        p.next += 1;
        Ok(id)
    }

    fn next_inode(&self) -> Result<Ino> {
        let id = self.next_id(&self.inodes, Counter::Inode, INODE_BATCH)?;
        if id > Ino::MAX {
            return Err(MetaError::NoSpace);
        }
        Ok(Ino(id))
    }
}

fn check_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(MetaError::Invalid);
    }
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong);
    }
    Ok(())
}

fn get_attr(tx: &mut dyn Tx, ino: Ino) -> Result<Attr> {
    tx.attr(ino)?.ok_or(MetaError::NotFound)
}

/// The attributes of `ino`, which must be a live directory.
fn get_dir(tx: &mut dyn Tx, ino: Ino) -> Result<Attr> {
    let a = get_attr(tx, ino)?;
    if a.kind != FileKind::Dir {
        return Err(MetaError::NotDir);
    }
    if a.nlink == 0 {
        // A removed directory that is still someone's cwd.
        return Err(MetaError::NotFound);
    }
    Ok(a)
}

/// Space a file of `size` bytes is accounted for: rounded up to 4 KiB.
fn space(size: u64) -> i64 {
    (size.div_ceil(4096) * 4096) as i64
}

fn space_of(attr: &Attr) -> i64 {
    match attr.kind {
        FileKind::File => space(attr.size),
        _ => 4096,
    }
}

/// Frees an inode that has no links and is not open: its attributes, xattrs, symlink
/// target, and layout (slices become dead).
fn free_inode(tx: &mut dyn Tx, ino: Ino, attr: &Attr, now: Timestamp) -> Result<()> {
    if attr.kind == FileKind::File && attr.size > 0 {
        let chunks = attr.size.div_ceil(CHUNK_SIZE) as u32;
        for idx in 0..chunks {
            drop_chunk(tx, ino, idx, now)?;
        }
    }
    if attr.kind == FileKind::Symlink {
        tx.del_symlink(ino)?;
    }
    tx.del_xattrs(ino)?;
    tx.set_locks(ino, &[])?;
    tx.del_attr(ino)?;
    tx.add_usage(-space_of(attr), -1)
}

/// Deletes a chunk record; its slices become dead.
fn drop_chunk(tx: &mut dyn Tx, ino: Ino, idx: u32, now: Timestamp) -> Result<()> {
    let slices = tx.chunk(ino, idx)?;
    if slices.is_empty() {
        return Ok(());
    }
    let mut seen = std::collections::HashSet::new();
    for s in slices.iter().filter(|s| s.id != 0) {
        if seen.insert(s.id) {
            tx.add_dead_slice(&DeadSlice {
                id: s.id,
                size: s.size,
                since: now,
            })?;
        }
    }
    tx.set_chunk(ino, idx, &[])
}

/// Makes bytes `from..to` of a file read as zeros (hole slices), within existing chunks.
fn zero_range(tx: &mut dyn Tx, ino: Ino, from: u64, to: u64) -> Result<()> {
    let mut pos = from;
    while pos < to {
        let idx = (pos / CHUNK_SIZE) as u32;
        let chunk_end = (u64::from(idx) + 1) * CHUNK_SIZE;
        let end = to.min(chunk_end);
        let in_chunk = (pos % CHUNK_SIZE) as u32;
        let len = (end - pos) as u32;
        if !tx.chunk(ino, idx)?.is_empty() {
            tx.append_slice(
                ino,
                idx,
                &Slice {
                    pos: in_chunk,
                    id: 0,
                    size: 0,
                    off: 0,
                    len,
                },
            )?;
        }
        pos = end;
    }
    Ok(())
}

/// Changes a file's size. Shrinking drops whole chunks past the end and hides the rest
/// of the last chunk behind a hole, so a later extension reads zeros.
fn resize(tx: &mut dyn Tx, ino: Ino, attr: &mut Attr, size: u64, now: Timestamp) -> Result<()> {
    if size > MAX_FILE_SIZE {
        return Err(MetaError::FileTooBig);
    }
    if size < attr.size {
        let old_chunks = attr.size.div_ceil(CHUNK_SIZE) as u32;
        let keep_chunks = size.div_ceil(CHUNK_SIZE) as u32;
        for idx in keep_chunks..old_chunks {
            drop_chunk(tx, ino, idx, now)?;
        }
        if size % CHUNK_SIZE != 0 {
            let chunk_end = u64::from(keep_chunks) * CHUNK_SIZE;
            zero_range(tx, ino, size, chunk_end.min(attr.size.max(size)))?;
        }
    }
    tx.add_usage(space(size) - space(attr.size), 0)?;
    attr.size = size;
    Ok(())
}

fn is_ancestor(tx: &mut dyn Tx, ancestor: Ino, mut ino: Ino) -> Result<bool> {
    // Bounded walk: a corrupt parent chain must not loop forever.
    for _ in 0..4096 {
        if ino == ancestor {
            return Ok(true);
        }
        if ino == Ino::ROOT {
            return Ok(false);
        }
        let a = get_attr(tx, ino)?;
        if a.parent == ino || a.parent.0 == 0 {
            return Ok(false);
        }
        ino = a.parent;
    }
    Err(MetaError::Corrupt(Corrupt {
        what: "directory parent chain",
    }))
}

/// Takes one link from the inode a name pointed to (the name is already removed).
fn drop_link(
    tx: &mut dyn Tx,
    sid: SessionId,
    ino: Ino,
    is_open: &dyn Fn(Ino) -> bool,
    now: Timestamp,
) -> Result<Removed> {
    let mut attr = get_attr(tx, ino)?;
    attr.ctime = now;
    if attr.kind == FileKind::Dir {
        attr.nlink = 0;
    } else {
        attr.nlink = attr.nlink.saturating_sub(1);
    }
    if attr.nlink > 0 {
        tx.set_attr(ino, &attr)?;
        return Ok(Removed { ino, kept: true });
    }
    if attr.kind == FileKind::File && is_open(ino) {
        tx.set_attr(ino, &attr)?;
        tx.add_sustained(sid, ino)?;
        return Ok(Removed { ino, kept: true });
    }
    free_inode(tx, ino, &attr, now)?;
    Ok(Removed { ino, kept: false })
}

/// Allocates the next readdir cookie of a directory (the caller stores `dir`).
fn take_cookie(dir: &mut Attr) -> u64 {
    let c = dir.next_cookie.max(FIRST_COOKIE);
    dir.next_cookie = c + 1;
    c
}

fn apply_time(t: TimeSet, now: Timestamp) -> Timestamp {
    match t {
        TimeSet::Now => now,
        TimeSet::At(t) => t,
    }
}

/// Merges `req` into `owner`'s locks (POSIX semantics: the new range replaces what the
/// owner held there; adjacent or overlapping ranges of the same type coalesce).
fn merge_lock(locks: &mut Vec<RangeLock>, req: &LockRequest) {
    let mut mine: Vec<RangeLock> = Vec::new();
    locks.retain(|l| {
        if l.owner == req.owner {
            mine.push(*l);
            false
        } else {
            true
        }
    });
    let mut out = Vec::new();
    for l in mine {
        if !l.overlaps(req.start, req.end) {
            out.push(l);
            continue;
        }
        if l.start < req.start {
            out.push(RangeLock {
                end: req.start - 1,
                ..l
            });
        }
        if l.end > req.end {
            out.push(RangeLock {
                start: req.end + 1,
                ..l
            });
        }
    }
    if let Some(typ) = req.typ {
        let mut new = RangeLock {
            owner: req.owner,
            typ,
            start: req.start,
            end: req.end,
            pid: req.pid,
        };
        // Coalesce with touching ranges of the same type.
        out.retain(|l| {
            let touches = l.typ == typ
                && (l.end.checked_add(1) == Some(new.start)
                    || new.end.checked_add(1) == Some(l.start));
            if touches {
                new.start = new.start.min(l.start);
                new.end = new.end.max(l.end);
            }
            !touches
        });
        out.push(new);
    }
    out.sort_by_key(|l| l.start);
    locks.extend(out);
}

fn conflict(locks: &[RangeLock], req: &LockRequest) -> Option<RangeLock> {
    let typ = req.typ?;
    locks
        .iter()
        .find(|l| {
            l.owner != req.owner
                && l.overlaps(req.start, req.end)
                && (typ == LockType::Write || l.typ == LockType::Write)
        })
        .copied()
}

fn release_session(tx: &mut dyn Tx, sid: SessionId, now: Timestamp) -> Result<()> {
    for ino in tx.sustained(sid)? {
        if let Some(attr) = tx.attr(ino)? {
            if attr.nlink == 0 {
                free_inode(tx, ino, &attr, now)?;
            }
        }
        tx.del_sustained(sid, ino)?;
    }
    for ino in tx.session_locked(sid)? {
        let mut locks = tx.locks(ino)?;
        locks.retain(|l| l.owner.sid != sid);
        tx.set_locks(ino, &locks)?;
        tx.del_session_locked(sid, ino)?;
    }
    tx.del_requests(sid, u64::MAX)?;
    tx.del_session(sid)
}

impl<B: Backend> MetaEngine for Meta<B> {
    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn format(&self, format: &Format, force: bool) -> Result<()> {
        self.backend.write(&mut |tx| {
            if let Some(old) = tx.format()? {
                if !force {
                    return Err(MetaError::AlreadyFormatted { name: old.name });
                }
                let mut f = format.clone();
                // The identity and layout of existing data cannot change.
                f.uuid = old.uuid;
                f.block_size = old.block_size;
                f.created = old.created;
                return tx.set_format(&f);
            }
            tx.set_format(format)?;
            if tx.attr(Ino::ROOT)?.is_none() {
                let mut root = Attr::new(FileKind::Dir, 0o777, 0, 0, format.created);
                root.parent = Ino::ROOT;
                tx.set_attr(Ino::ROOT, &root)?;
                tx.add_usage(4096, 1)?;
                // Make the inode counter hand out 2 next.
                tx.alloc(Counter::Inode, 1)?;
            }
            Ok(())
        })
    }

    fn load_format(&self) -> Result<Format> {
        self.backend
            .read(&mut |tx| tx.format()?.ok_or(MetaError::NotFormatted))
    }

    fn usage(&self) -> Result<Usage> {
        self.backend.read(&mut |tx| tx.usage())
    }

    fn new_session(&self, info: &SessionInfo) -> Result<SessionId> {
        self.backend.write(&mut |tx| {
            let sid = SessionId(tx.alloc(Counter::Session, 1)?);
            tx.set_session(sid, info)?;
            Ok(sid)
        })
    }

    fn resume_session(&self, sid: SessionId, info: &SessionInfo) -> Result<()> {
        self.backend.write(&mut |tx| {
            tx.session(sid)?.ok_or(MetaError::NotFound)?;
            tx.set_session(sid, info)
        })
    }

    fn heartbeat(&self, sid: SessionId, now: Timestamp) -> Result<()> {
        self.backend.write(&mut |tx| {
            let mut info = tx.session(sid)?.ok_or(MetaError::NotFound)?;
            info.heartbeat = now;
            tx.set_session(sid, &info)
        })
    }

    fn close_session(&self, sid: SessionId) -> Result<()> {
        let now = Timestamp::now();
        self.backend.write(&mut |tx| release_session(tx, sid, now))
    }

    fn list_sessions(&self) -> Result<Vec<(SessionId, SessionInfo)>> {
        self.backend.read(&mut |tx| tx.sessions())
    }

    fn session_holdings(&self, sid: SessionId) -> Result<SessionHoldings> {
        self.backend.read(&mut |tx| {
            let mut lockers = Vec::new();
            for ino in tx.session_locked(sid)? {
                for l in tx.locks(ino)? {
                    if l.owner.sid == sid {
                        lockers.push((ino, l.owner.owner));
                    }
                }
            }
            lockers.sort_unstable();
            lockers.dedup();
            Ok(SessionHoldings {
                unlinked: tx.sustained(sid)?,
                lockers,
            })
        })
    }

    fn clean_stale_sessions(&self, deadline: Timestamp) -> Result<Vec<SessionId>> {
        let stale: Vec<SessionId> = self
            .list_sessions()?
            .into_iter()
            .filter(|(_, info)| info.heartbeat < deadline)
            .map(|(sid, _)| sid)
            .collect();
        let now = Timestamp::now();
        let mut cleaned = Vec::new();
        for sid in stale {
            // Re-check inside the transaction: it may have sent a heartbeat meanwhile.
            let done = self.backend.write(&mut |tx| match tx.session(sid)? {
                Some(info) if info.heartbeat < deadline => {
                    release_session(tx, sid, now)?;
                    Ok(true)
                }
                _ => Ok(false),
            })?;
            if done {
                cleaned.push(sid);
            }
        }
        Ok(cleaned)
    }

    fn forget_requests(&self, sid: SessionId, below: u64) -> Result<()> {
        self.backend.write(&mut |tx| tx.del_requests(sid, below))
    }

    fn lookup(&self, parent: Ino, name: &[u8]) -> Result<(Ino, Attr)> {
        if name.len() > NAME_MAX {
            return Err(MetaError::NameTooLong);
        }
        self.backend.read(&mut |tx| {
            let dir = get_dir(tx, parent)?;
            if name == b"." {
                return Ok((parent, dir));
            }
            if name == b".." {
                return Ok((dir.parent, get_attr(tx, dir.parent)?));
            }
            let d = tx.dentry(parent, name)?.ok_or(MetaError::NotFound)?;
            Ok((d.ino, get_attr(tx, d.ino)?))
        })
    }

    fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.backend.read(&mut |tx| get_attr(tx, ino))
    }

    fn setattr(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        set: &SetAttr,
        now: Timestamp,
    ) -> Result<Attr> {
        let entry = self.write_once(req, &mut |tx| {
            let mut a = get_attr(tx, ino)?;
            let mut changed = false;
            if let Some(size) = set.size {
                match a.kind {
                    FileKind::File => {}
                    FileKind::Dir => return Err(MetaError::IsDir),
                    _ => return Err(MetaError::Invalid),
                }
                if size != a.size {
                    resize(tx, ino, &mut a, size, now)?;
                }
                a.mtime = now;
                changed = true;
            }
            if let Some(mode) = set.mode {
                a.perm = (mode & 0o7777) as u16;
                changed = true;
            }
            let owner_changed =
                set.uid.is_some_and(|u| u != a.uid) || set.gid.is_some_and(|g| g != a.gid);
            if let Some(uid) = set.uid {
                a.uid = uid;
                changed = true;
            }
            if let Some(gid) = set.gid {
                a.gid = gid;
                changed = true;
            }
            if owner_changed && a.kind != FileKind::Dir && set.mode.is_none() {
                // chown clears set-uid, and set-gid when group-executable.
                a.perm &= !(libc::S_ISUID as u16);
                if a.perm & 0o010 != 0 {
                    a.perm &= !(libc::S_ISGID as u16);
                }
            }
            if let Some(t) = set.atime {
                a.atime = apply_time(t, now);
                changed = true;
            }
            if let Some(t) = set.mtime {
                a.mtime = apply_time(t, now);
                changed = true;
            }
            if changed {
                a.ctime = set.ctime.unwrap_or(now);
            } else if let Some(c) = set.ctime {
                a.ctime = c;
            }
            tx.set_attr(ino, &a)?;
            Ok((ino, a))
        })?;
        Ok(entry.1)
    }

    fn mknod(
        &self,
        req: Option<RequestId>,
        parent: Ino,
        name: &[u8],
        node: &NewNode,
        caller: Caller,
    ) -> Result<(Ino, Attr)> {
        check_name(name)?;
        if node.kind == FileKind::Symlink
            && (node.target.is_empty() || node.target.len() > SYMLINK_MAX)
        {
            return Err(if node.target.is_empty() {
                MetaError::NotFound
            } else {
                MetaError::NameTooLong
            });
        }
        let ino = self.next_inode()?;
        let now = Timestamp::now();
        self.write_once(req, &mut |tx| {
            let mut dir = get_dir(tx, parent)?;
            if tx.dentry(parent, name)?.is_some() {
                return Err(MetaError::Exists);
            }
            let fmt = tx.format()?.ok_or(MetaError::NotFormatted)?;
            if fmt.inodes > 0 && tx.usage()?.used_inodes >= fmt.inodes {
                return Err(MetaError::NoSpace);
            }
            let mut perm = node.perm & 0o7777;
            let mut gid = caller.gid;
            if dir.perm & libc::S_ISGID as u16 != 0 {
                // BSD group semantics under a set-gid directory.
                gid = dir.gid;
                if node.kind == FileKind::Dir {
                    perm |= libc::S_ISGID as u16;
                }
            }
            let mut attr = Attr::new(node.kind, perm, caller.uid, gid, now);
            attr.rdev = node.rdev;
            match node.kind {
                FileKind::Dir => {
                    attr.parent = parent;
                    dir.nlink = dir.nlink.checked_add(1).ok_or(MetaError::TooManyLinks)?;
                }
                FileKind::Symlink => {
                    attr.size = node.target.len() as u64;
                    tx.set_symlink(ino, &node.target)?;
                }
                _ => {}
            }
            let cookie = take_cookie(&mut dir);
            dir.mtime = now;
            dir.ctime = now;
            tx.set_attr(ino, &attr)?;
            tx.set_attr(parent, &dir)?;
            tx.set_dentry(
                parent,
                name,
                &Dentry {
                    ino,
                    kind: node.kind,
                    cookie,
                },
            )?;
            tx.add_usage(space_of(&attr), 1)?;
            Ok((ino, attr))
        })
    }

    fn unlink(
        &self,
        req: Option<RequestId>,
        sid: SessionId,
        parent: Ino,
        name: &[u8],
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<Removed> {
        check_name(name)?;
        let now = Timestamp::now();
        self.write_once(req, &mut |tx| {
            let mut dir = get_dir(tx, parent)?;
            let d = tx.dentry(parent, name)?.ok_or(MetaError::NotFound)?;
            if d.kind == FileKind::Dir {
                return Err(MetaError::IsDir);
            }
            tx.del_dentry(parent, name, d.cookie)?;
            dir.mtime = now;
            dir.ctime = now;
            tx.set_attr(parent, &dir)?;
            drop_link(tx, sid, d.ino, is_open, now)
        })
    }

    fn rmdir(&self, req: Option<RequestId>, parent: Ino, name: &[u8]) -> Result<Removed> {
        if name == b"." {
            return Err(MetaError::Invalid);
        }
        if name == b".." {
            return Err(MetaError::NotEmpty);
        }
        check_name(name)?;
        let now = Timestamp::now();
        self.write_once(req, &mut |tx| {
            let mut dir = get_dir(tx, parent)?;
            let d = tx.dentry(parent, name)?.ok_or(MetaError::NotFound)?;
            if d.kind != FileKind::Dir {
                return Err(MetaError::NotDir);
            }
            if !tx.dir_is_empty(d.ino)? {
                return Err(MetaError::NotEmpty);
            }
            tx.del_dentry(parent, name, d.cookie)?;
            dir.nlink = dir.nlink.saturating_sub(1);
            dir.mtime = now;
            dir.ctime = now;
            tx.set_attr(parent, &dir)?;
            let attr = get_attr(tx, d.ino)?;
            free_inode(tx, d.ino, &attr, now)?;
            Ok(Removed {
                ino: d.ino,
                kept: false,
            })
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn rename(
        &self,
        req: Option<RequestId>,
        sid: SessionId,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: RenameFlags,
        is_open: &dyn Fn(Ino) -> bool,
    ) -> Result<Option<Removed>> {
        check_name(name)?;
        check_name(new_name)?;
        if flags.exchange && flags.noreplace {
            return Err(MetaError::Invalid);
        }
        let now = Timestamp::now();
        self.write_once(req, &mut |tx| {
            let src_dir = get_dir(tx, parent)?;
            let dst_dir = if new_parent == parent {
                src_dir.clone()
            } else {
                get_dir(tx, new_parent)?
            };
            let src = tx.dentry(parent, name)?.ok_or(MetaError::NotFound)?;
            let dst = tx.dentry(new_parent, new_name)?;
            if parent == new_parent && name == new_name {
                return if flags.exchange && dst.is_none() {
                    Err(MetaError::NotFound)
                } else {
                    Ok(None)
                };
            }
            // A directory cannot move below itself.
            if src.kind == FileKind::Dir
                && new_parent != parent
                && is_ancestor(tx, src.ino, new_parent)?
            {
                return Err(MetaError::Invalid);
            }
            if flags.exchange {
                let dst = dst.ok_or(MetaError::NotFound)?;
                if dst.kind == FileKind::Dir
                    && new_parent != parent
                    && is_ancestor(tx, dst.ino, parent)?
                {
                    return Err(MetaError::Invalid);
                }
                return exchange(
                    tx,
                    (parent, name, src, src_dir),
                    (new_parent, new_name, dst, dst_dir),
                    now,
                )
                .map(|()| None);
            }
            let mut replaced = None;
            if let Some(dst) = dst {
                if flags.noreplace {
                    return Err(MetaError::Exists);
                }
                if dst.ino == src.ino {
                    // Both names are links to the same inode: POSIX says do nothing.
                    return Ok(None);
                }
                match (src.kind == FileKind::Dir, dst.kind == FileKind::Dir) {
                    (true, false) => return Err(MetaError::NotDir),
                    (false, true) => return Err(MetaError::IsDir),
                    (true, true) => {
                        if !tx.dir_is_empty(dst.ino)? {
                            return Err(MetaError::NotEmpty);
                        }
                    }
                    (false, false) => {}
                }
                replaced = Some(dst);
            }
            // All scans are done; now write.
            let mut src_dir = src_dir;
            let mut dst_dir = dst_dir;
            tx.del_dentry(parent, name, src.cookie)?;
            if let Some(old) = replaced {
                tx.del_dentry(new_parent, new_name, old.cookie)?;
                if old.kind == FileKind::Dir {
                    dst_dir.nlink = dst_dir.nlink.saturating_sub(1);
                }
            }
            let same_dir = parent == new_parent;
            let cookie = take_cookie(if same_dir { &mut src_dir } else { &mut dst_dir });
            tx.set_dentry(
                new_parent,
                new_name,
                &Dentry {
                    ino: src.ino,
                    kind: src.kind,
                    cookie,
                },
            )?;
            let mut moved = get_attr(tx, src.ino)?;
            moved.ctime = now;
            if src.kind == FileKind::Dir && !same_dir {
                moved.parent = new_parent;
                src_dir.nlink = src_dir.nlink.saturating_sub(1);
                dst_dir.nlink = dst_dir
                    .nlink
                    .checked_add(1)
                    .ok_or(MetaError::TooManyLinks)?;
            }
            tx.set_attr(src.ino, &moved)?;
            src_dir.mtime = now;
            src_dir.ctime = now;
            if same_dir {
                // dst_dir is a stale copy of the same inode; only src_dir is written.
                if let Some(old) = replaced {
                    if old.kind == FileKind::Dir {
                        src_dir.nlink = src_dir.nlink.saturating_sub(1);
                    }
                }
                tx.set_attr(parent, &src_dir)?;
            } else {
                dst_dir.mtime = now;
                dst_dir.ctime = now;
                tx.set_attr(parent, &src_dir)?;
                tx.set_attr(new_parent, &dst_dir)?;
            }
            match replaced {
                Some(old) if old.kind == FileKind::Dir => {
                    let attr = get_attr(tx, old.ino)?;
                    free_inode(tx, old.ino, &attr, now)?;
                    Ok(Some(Removed {
                        ino: old.ino,
                        kept: false,
                    }))
                }
                Some(old) => drop_link(tx, sid, old.ino, is_open, now).map(Some),
                None => Ok(None),
            }
        })
    }

    fn link(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        new_parent: Ino,
        new_name: &[u8],
    ) -> Result<Attr> {
        check_name(new_name)?;
        let now = Timestamp::now();
        let entry = self.write_once(req, &mut |tx| {
            let mut dir = get_dir(tx, new_parent)?;
            let mut attr = get_attr(tx, ino)?;
            if attr.kind == FileKind::Dir {
                return Err(MetaError::NotPermitted);
            }
            if attr.nlink == 0 {
                // Linking an open-but-unlinked file back in is not allowed (ENOENT, as
                // Linux does for files without O_TMPFILE).
                return Err(MetaError::NotFound);
            }
            if tx.dentry(new_parent, new_name)?.is_some() {
                return Err(MetaError::Exists);
            }
            attr.nlink = attr.nlink.checked_add(1).ok_or(MetaError::TooManyLinks)?;
            attr.ctime = now;
            let cookie = take_cookie(&mut dir);
            dir.mtime = now;
            dir.ctime = now;
            tx.set_dentry(
                new_parent,
                new_name,
                &Dentry {
                    ino,
                    kind: attr.kind,
                    cookie,
                },
            )?;
            tx.set_attr(new_parent, &dir)?;
            tx.set_attr(ino, &attr)?;
            Ok((ino, attr))
        })?;
        Ok(entry.1)
    }

    fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.backend.read(&mut |tx| {
            let a = get_attr(tx, ino)?;
            if a.kind != FileKind::Symlink {
                return Err(MetaError::Invalid);
            }
            tx.symlink(ino)?
                .ok_or(MetaError::Corrupt(Corrupt { what: "symlink" }))
        })
    }

    fn readdir(&self, ino: Ino, cookie: u64, limit: usize, plus: bool) -> Result<Vec<DirEntry>> {
        self.backend.read(&mut |tx| {
            get_dir(tx, ino)?;
            let entries = tx.dir_entries(ino, cookie, limit)?;
            let mut out = Vec::with_capacity(entries.len());
            for (name, d) in entries {
                let attr = if plus {
                    match tx.attr(d.ino)? {
                        Some(a) => Some(a),
                        // Removed between the scan and now (Redis reads are not a snapshot).
                        None => continue,
                    }
                } else {
                    None
                };
                out.push(DirEntry {
                    name,
                    ino: d.ino,
                    kind: d.kind,
                    cookie: d.cookie,
                    attr,
                });
            }
            Ok(out)
        })
    }

    fn release_unlinked(&self, sid: SessionId, ino: Ino) -> Result<()> {
        let now = Timestamp::now();
        self.backend.write(&mut |tx| {
            if let Some(attr) = tx.attr(ino)? {
                if attr.nlink == 0 {
                    free_inode(tx, ino, &attr, now)?;
                }
            }
            tx.del_sustained(sid, ino)
        })
    }

    fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<Vec<u8>> {
        self.backend.read(&mut |tx| {
            get_attr(tx, ino)?;
            tx.xattr(ino, name)?.ok_or(MetaError::NoXattr)
        })
    }

    fn setxattr(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        name: &[u8],
        value: &[u8],
        mode: XattrMode,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(MetaError::Invalid);
        }
        if name.len() > 255 {
            return Err(MetaError::NameTooLong);
        }
        if value.len() > 65536 {
            return Err(MetaError::NoSpace);
        }
        let now = Timestamp::now();
        self.write_once(req, &mut |tx| {
            let mut attr = get_attr(tx, ino)?;
            let exists = tx.xattr(ino, name)?.is_some();
            match mode {
                XattrMode::Create if exists => return Err(MetaError::Exists),
                XattrMode::Replace if !exists => return Err(MetaError::NoXattr),
                _ => {}
            }
            tx.set_xattr(ino, name, value)?;
            attr.ctime = now;
            tx.set_attr(ino, &attr)
        })
    }

    fn listxattr(&self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        self.backend.read(&mut |tx| {
            get_attr(tx, ino)?;
            tx.xattr_names(ino)
        })
    }

    fn removexattr(&self, req: Option<RequestId>, ino: Ino, name: &[u8]) -> Result<()> {
        let now = Timestamp::now();
        self.write_once(req, &mut |tx| {
            let mut attr = get_attr(tx, ino)?;
            if tx.xattr(ino, name)?.is_none() {
                return Err(MetaError::NoXattr);
            }
            tx.del_xattr(ino, name)?;
            attr.ctime = now;
            tx.set_attr(ino, &attr)
        })
    }

    fn read_chunk(&self, ino: Ino, index: u32) -> Result<Vec<Slice>> {
        self.backend.read(&mut |tx| tx.chunk(ino, index))
    }

    fn new_slice_id(&self) -> Result<u64> {
        self.next_id(&self.slices, Counter::Slice, SLICE_BATCH)
    }

    fn write_slice(&self, ino: Ino, index: u32, slice: Slice, mtime: Timestamp) -> Result<Attr> {
        if u64::from(slice.pos) + u64::from(slice.len) > CHUNK_SIZE || slice.len == 0 {
            return Err(MetaError::Invalid);
        }
        let end = u64::from(index) * CHUNK_SIZE + u64::from(slice.pos) + u64::from(slice.len);
        self.backend.write(&mut |tx| {
            let mut attr = get_attr(tx, ino)?;
            if attr.kind != FileKind::File {
                return Err(MetaError::Invalid);
            }
            if end > attr.size {
                let fmt = tx.format()?.ok_or(MetaError::NotFormatted)?;
                let grow = space(end) - space(attr.size);
                if fmt.capacity > 0 && grow > 0 {
                    let used = tx.usage()?.used_bytes;
                    if used.saturating_add(grow as u64) > fmt.capacity {
                        return Err(MetaError::NoSpace);
                    }
                }
                tx.add_usage(grow, 0)?;
                attr.size = end;
            }
            tx.append_slice(ino, index, &slice)?;
            attr.mtime = mtime;
            attr.ctime = mtime;
            tx.set_attr(ino, &attr)?;
            Ok(attr)
        })
    }

    fn fallocate(
        &self,
        req: Option<RequestId>,
        ino: Ino,
        mode: Fallocate,
        offset: u64,
        len: u64,
        now: Timestamp,
    ) -> Result<Attr> {
        let end = offset.checked_add(len).ok_or(MetaError::FileTooBig)?;
        if len == 0 {
            return Err(MetaError::Invalid);
        }
        if end > MAX_FILE_SIZE {
            return Err(MetaError::FileTooBig);
        }
        let entry = self.write_once(req, &mut |tx| {
            let mut attr = get_attr(tx, ino)?;
            match attr.kind {
                FileKind::File => {}
                FileKind::Dir => return Err(MetaError::IsDir),
                _ => return Err(MetaError::NotSupported),
            }
            let (zero, keep_size) = match mode {
                Fallocate::Allocate { keep_size } => (false, keep_size),
                Fallocate::PunchHole => (true, true),
                Fallocate::ZeroRange { keep_size } => (true, keep_size),
            };
            if zero {
                zero_range(tx, ino, offset, end.min(attr.size))?;
            }
            if !keep_size && end > attr.size {
                let fmt = tx.format()?.ok_or(MetaError::NotFormatted)?;
                let grow = space(end) - space(attr.size);
                if fmt.capacity > 0
                    && tx.usage()?.used_bytes.saturating_add(grow as u64) > fmt.capacity
                {
                    return Err(MetaError::NoSpace);
                }
                tx.add_usage(grow, 0)?;
                attr.size = end;
            }
            if zero || !keep_size {
                attr.mtime = now;
            }
            attr.ctime = now;
            tx.set_attr(ino, &attr)?;
            Ok((ino, attr))
        })?;
        Ok(entry.1)
    }

    fn getlk(&self, ino: Ino, req: &LockRequest) -> Result<Option<RangeLock>> {
        if req.start > req.end {
            return Err(MetaError::Invalid);
        }
        self.backend.read(&mut |tx| {
            get_attr(tx, ino)?;
            Ok(conflict(&tx.locks(ino)?, req))
        })
    }

    fn setlk(&self, ino: Ino, req: &LockRequest) -> Result<()> {
        if req.start > req.end {
            return Err(MetaError::Invalid);
        }
        self.backend.write(&mut |tx| {
            get_attr(tx, ino)?;
            let mut locks = tx.locks(ino)?;
            if conflict(&locks, req).is_some() {
                return Err(MetaError::WouldBlock);
            }
            let before = locks.clone();
            merge_lock(&mut locks, req);
            if locks == before {
                return Ok(());
            }
            let holds = locks.iter().any(|l| l.owner.sid == req.owner.sid);
            tx.set_locks(ino, &locks)?;
            if holds {
                tx.add_session_locked(req.owner.sid, ino)
            } else {
                tx.del_session_locked(req.owner.sid, ino)
            }
        })
    }

    fn release_locks(&self, ino: Ino, owner: LockOwner) -> Result<()> {
        self.backend.write(&mut |tx| {
            let mut locks = tx.locks(ino)?;
            let before = locks.len();
            locks.retain(|l| l.owner != owner);
            if locks.len() == before {
                return Ok(());
            }
            tx.set_locks(ino, &locks)?;
            if !locks.iter().any(|l| l.owner.sid == owner.sid) {
                tx.del_session_locked(owner.sid, ino)?;
            }
            Ok(())
        })
    }

    fn dead_slices(&self, before: Timestamp, limit: usize) -> Result<Vec<DeadSlice>> {
        self.backend.read(&mut |tx| tx.dead_slices(before, limit))
    }

    fn forget_dead_slices(&self, ids: &[u64]) -> Result<()> {
        self.backend.write(&mut |tx| {
            for &id in ids {
                tx.del_dead_slice(id)?;
            }
            Ok(())
        })
    }
}

type Side<'a> = (Ino, &'a [u8], Dentry, Attr);

/// RENAME_EXCHANGE: swaps two names atomically.
fn exchange(tx: &mut dyn Tx, a: Side<'_>, b: Side<'_>, now: Timestamp) -> Result<()> {
    let (pa, na, da, mut dir_a) = a;
    let (pb, nb, db, mut dir_b) = b;
    if da.ino == db.ino {
        return Ok(());
    }
    let same_dir = pa == pb;
    tx.del_dentry(pa, na, da.cookie)?;
    tx.del_dentry(pb, nb, db.cookie)?;
    // Each name keeps its cookie: the entries stay where they were in the stream.
    tx.set_dentry(
        pa,
        na,
        &Dentry {
            ino: db.ino,
            kind: db.kind,
            cookie: da.cookie,
        },
    )?;
    tx.set_dentry(
        pb,
        nb,
        &Dentry {
            ino: da.ino,
            kind: da.kind,
            cookie: db.cookie,
        },
    )?;
    let mut ia = get_attr(tx, da.ino)?;
    let mut ib = get_attr(tx, db.ino)?;
    ia.ctime = now;
    ib.ctime = now;
    if !same_dir {
        if ia.kind == FileKind::Dir {
            ia.parent = pb;
            dir_a.nlink = dir_a.nlink.saturating_sub(1);
            dir_b.nlink += 1;
        }
        if ib.kind == FileKind::Dir {
            ib.parent = pa;
            dir_b.nlink = dir_b.nlink.saturating_sub(1);
            dir_a.nlink += 1;
        }
    }
    tx.set_attr(da.ino, &ia)?;
    tx.set_attr(db.ino, &ib)?;
    dir_a.mtime = now;
    dir_a.ctime = now;
    tx.set_attr(pa, &dir_a)?;
    if !same_dir {
        dir_b.mtime = now;
        dir_b.ctime = now;
        tx.set_attr(pb, &dir_b)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(o: u64) -> LockOwner {
        LockOwner {
            sid: SessionId(1),
            owner: o,
        }
    }

    fn req(o: u64, typ: Option<LockType>, start: u64, end: u64) -> LockRequest {
        LockRequest {
            owner: owner(o),
            typ,
            start,
            end,
            pid: 1,
        }
    }

    #[test]
    fn lock_split_and_merge() {
        let mut locks = Vec::new();
        merge_lock(&mut locks, &req(1, Some(LockType::Write), 0, 99));
        merge_lock(&mut locks, &req(1, None, 10, 19));
        assert_eq!(
            locks.iter().map(|l| (l.start, l.end)).collect::<Vec<_>>(),
            vec![(0, 9), (20, 99)]
        );
        merge_lock(&mut locks, &req(1, Some(LockType::Write), 10, 19));
        assert_eq!(
            locks.iter().map(|l| (l.start, l.end)).collect::<Vec<_>>(),
            vec![(0, 99)]
        );
        merge_lock(&mut locks, &req(1, Some(LockType::Read), 50, 59));
        assert_eq!(locks.len(), 3);
        assert!(conflict(&locks, &req(2, Some(LockType::Read), 50, 59)).is_none());
        assert!(conflict(&locks, &req(2, Some(LockType::Read), 40, 50)).is_some());
        assert!(conflict(&locks, &req(1, Some(LockType::Write), 0, u64::MAX)).is_none());
    }
}
