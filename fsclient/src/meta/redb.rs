//! The embedded engine: one redb file.
//!
//! Everything lives in one ordered table of byte keys, each starting with a one-byte
//! record type and big-endian numbers so that the scans the engine needs (a directory in
//! cookie order, the xattrs of an inode, dead slices by age) are key ranges:
//!
//! ```text
//! A ino                 -> attr            D parent name        -> dentry
//! C parent cookie       -> name            L ino                -> symlink target
//! X ino name            -> xattr value     K ino chunk-index    -> slice records
//! F                     -> format          N counter-name       -> u64 (last id)
//! U                     -> usage           S sid                -> session info
//! P sid ino             -> (sustained)     R ino                -> locks
//! Q sid ino             -> (locked by sid) G since id           -> slice size (dead)
//! g id                  -> since           O sid unique         -> request outcome
//! ```
//!
//! The database is opened in redb's multi-writer mode: during a live upgrade the old and
//! the new client both have it open, and redb serializes their write transactions with
//! file locks. Every commit is durable (fsync) before the operation is answered.
//!
//! Group commit: concurrent changes share one durable commit. An operation that arrives
//! while a commit is being made waits for it, then runs in the next transaction together
//! with every other operation that waited; the last of them to run commits it, and each is
//! answered once that commit is durable (and fails if it failed). Within a shared
//! transaction an operation's writes go to an overlay first, so one that fails leaves no
//! trace in the others' commit.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, WriteTransaction};
use parking_lot::{Condvar, Mutex};

use super::*;

const KV: TableDefinition<&[u8], &[u8]> = TableDefinition::new("baton");

/// The redb backend.
pub struct RedbBackend {
    db: Database,
    group: Mutex<Group>,
    /// Signalled when a commit ends.
    committed: Condvar,
}

impl std::fmt::Debug for RedbBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbBackend").finish_non_exhaustive()
    }
}

/// The group commit's state.
#[derive(Default)]
struct Group {
    /// The transaction operations are joining, if one is open.
    open: Option<WriteTransaction>,
    /// An operation of the open transaction changed something: it must be committed.
    dirty: bool,
    /// Number of the open transaction (or of the next one).
    batch: u64,
    /// How the open batch ends, shared with its operations: set when it ends.
    outcome: Arc<OnceLock<Result<(), Arc<str>>>>,
    /// A commit is being made (outside the lock).
    committing: bool,
    /// Operations waiting for that commit to end; they join the next transaction, and
    /// nobody commits it before all of them have run.
    waiting: usize,
    /// Every batch up to this one has ended.
    ended: u64,
}

#[derive(Debug)]
struct CommitFailed(Arc<str>);

impl std::fmt::Display for CommitFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "commit failed: {}", self.0)
    }
}

impl std::error::Error for CommitFailed {}

fn backend_err(e: impl std::error::Error + Send + Sync + 'static) -> MetaError {
    MetaError::Backend {
        backend: "redb",
        source: Box::new(e),
    }
}

impl RedbBackend {
    /// Opens (creating if needed) the database file at `path`; creates its directory.
    pub fn open(path: &Path) -> Result<Self> {
        let open_err = |e: Box<dyn std::error::Error + Send + Sync>| MetaError::Open {
            target: path.display().to_string(),
            source: e,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| open_err(Box::new(e)))?;
        }
        let db = Database::builder()
            .set_concurrency_mode(::redb::ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| open_err(Box::new(e)))?;
        // Create the table so that read transactions always find it.
        let w = db.begin_write().map_err(|e| open_err(Box::new(e)))?;
        w.open_table(KV).map_err(|e| open_err(Box::new(e)))?;
        w.commit().map_err(|e| open_err(Box::new(e)))?;
        Ok(RedbBackend {
            db,
            group: Mutex::new(Group {
                batch: 1,
                ..Group::default()
            }),
            committed: Condvar::new(),
        })
    }

    /// Runs `f` in the open shared transaction (opening one if needed), its writes kept
    /// only if it succeeds; then commits the transaction if nobody else will join it, or
    /// waits for the one who does.
    fn write_grouped<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let mut g = self.group.lock();
        g.waiting += 1;
        while g.committing {
            self.committed.wait(&mut g);
        }
        g.waiting -= 1;
        if g.open.is_none() {
            match self.db.begin_write() {
                Ok(w) => g.open = Some(w),
                Err(e) => {
                    let e = backend_err(e);
                    self.end_batch(&mut g, Some(&e));
                    return Err(e);
                }
            }
        }
        let batch = g.batch;
        let outcome = g.outcome.clone();
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            g.open.as_ref().map(|w| run_in(w, f))
        }));
        let ran = match ran {
            Ok(ran) => ran,
            Err(panic) => {
                // Nobody would commit (or fail) the batch its other operations wait for.
                if let Some(w) = g.open.take() {
                    let _ = w.abort();
                }
                let e = backend_err(CommitFailed("an operation of the batch panicked".into()));
                self.end_batch(&mut g, Some(&e));
                drop(g);
                std::panic::resume_unwind(panic);
            }
        };
        let out = match ran {
            Some(Ok((out, changed))) => {
                g.dirty |= changed;
                out
            }
            Some(Err(e)) => {
                // The transaction itself failed: nothing of this batch is committed.
                if let Some(w) = g.open.take() {
                    let _ = w.abort();
                }
                self.end_batch(&mut g, Some(&e));
                return Err(e);
            }
            None => unreachable!("a transaction was opened above"),
        };
        if g.waiting == 0 {
            let w = g.open.take();
            let dirty = std::mem::take(&mut g.dirty);
            g.committing = true;
            let res = parking_lot::MutexGuard::unlocked(&mut g, || match w {
                // Only failed operations ran: nothing to make durable.
                Some(w) if !dirty => w.abort().map_err(backend_err),
                Some(w) => w.commit().map_err(backend_err),
                None => Ok(()),
            });
            g.committing = false;
            self.end_batch(&mut g, res.as_ref().err());
            res?;
            return out;
        }
        while g.ended < batch {
            self.committed.wait(&mut g);
        }
        drop(g);
        match outcome.get() {
            Some(Ok(())) => out,
            Some(Err(why)) => Err(backend_err(CommitFailed(why.clone()))),
            None => Err(backend_err(CommitFailed(
                "the batch ended without an outcome".into(),
            ))),
        }
    }

    /// Ends the open batch, with its commit's error if it failed, and wakes its waiters.
    fn end_batch(&self, g: &mut Group, err: Option<&MetaError>) {
        let outcome = std::mem::take(&mut g.outcome);
        let _ = outcome.set(match err {
            Some(e) => Err(e.to_string().into()),
            None => Ok(()),
        });
        g.dirty = false;
        g.ended = g.batch;
        g.batch += 1;
        self.committed.notify_all();
    }
}

/// Runs `f` on the table of `w` through an overlay and applies the overlay if `f`
/// succeeded; also says whether it changed anything. The outer error is the
/// transaction's (it must not be committed); the inner one is the operation's.
fn run_in<T>(
    w: &WriteTransaction,
    f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>,
) -> Result<(Result<T>, bool)> {
    let table = w.open_table(KV).map_err(backend_err)?;
    let mut tx = RedbTx {
        table: TableRef::Write(table),
        overlay: BTreeMap::new(),
    };
    let out = f(&mut tx);
    let mut changed = false;
    if out.is_ok() {
        let RedbTx { table, overlay } = tx;
        changed = !overlay.is_empty();
        if let TableRef::Write(mut t) = table {
            for (k, v) in overlay {
                match v {
                    Some(v) => t.insert(k.as_slice(), v.as_slice()).map_err(backend_err)?,
                    None => t.remove(k.as_slice()).map_err(backend_err)?,
                };
            }
        }
    }
    Ok((out, changed))
}

impl Backend for RedbBackend {
    fn name(&self) -> &'static str {
        "redb"
    }

    fn write<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        self.write_grouped(f)
    }

    fn read<T>(&self, f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        let r = self.db.begin_read().map_err(backend_err)?;
        let table = r.open_table(KV).map_err(backend_err)?;
        let mut tx = RedbTx {
            table: TableRef::Read(table),
            overlay: BTreeMap::new(),
        };
        f(&mut tx)
    }
}

enum TableRef<'t> {
    Write(::redb::Table<'t, &'static [u8], &'static [u8]>),
    Read(::redb::ReadOnlyTable<&'static [u8], &'static [u8]>),
}

struct RedbTx<'t> {
    table: TableRef<'t>,
    /// This operation's writes (`None`: deleted), applied to the table if it succeeds.
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

fn key(tag: u8, parts: &[&[u8]]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + parts.iter().map(|p| p.len()).sum::<usize>());
    k.push(tag);
    for p in parts {
        k.extend_from_slice(p);
    }
    k
}

fn be(n: u64) -> [u8; 8] {
    n.to_be_bytes()
}

/// Sortable bytes of a signed timestamp.
fn ts_key(t: Timestamp) -> [u8; 8] {
    ((t.0 as u64) ^ (1 << 63)).to_be_bytes()
}

fn u64_at(b: &[u8], at: usize) -> Result<u64> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or(MetaError::Corrupt(Corrupt { what: "key" }))
}

/// The key just past every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

impl RedbTx<'_> {
    fn get(&self, k: &[u8]) -> Result<Option<Vec<u8>>> {
        if let Some(v) = self.overlay.get(k) {
            return Ok(v.clone());
        }
        let v = match &self.table {
            TableRef::Write(t) => t.get(k).map_err(backend_err)?.map(|g| g.value().to_vec()),
            TableRef::Read(t) => t.get(k).map_err(backend_err)?.map(|g| g.value().to_vec()),
        };
        Ok(v)
    }

    fn put(&mut self, k: &[u8], v: &[u8]) -> Result<()> {
        match &self.table {
            TableRef::Write(_) => {
                self.overlay.insert(k.to_vec(), Some(v.to_vec()));
                Ok(())
            }
            TableRef::Read(_) => Err(MetaError::ReadOnly),
        }
    }

    fn del(&mut self, k: &[u8]) -> Result<()> {
        match &self.table {
            TableRef::Write(_) => {
                self.overlay.insert(k.to_vec(), None);
                Ok(())
            }
            TableRef::Read(_) => Err(MetaError::ReadOnly),
        }
    }

    /// Keys and values in `[from, to)`, at most `limit`: the table's, as this operation's
    /// overlay changes them.
    fn scan(&self, from: &[u8], to: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        if from >= to {
            return Ok(out);
        }
        let mut ov = self
            .overlay
            .range::<[u8], _>((
                std::ops::Bound::Included(from),
                std::ops::Bound::Excluded(to),
            ))
            .peekable();
        // Emits the overlay's live entries before `upto` (all of them for `None`).
        let mut drain = |out: &mut Vec<(Vec<u8>, Vec<u8>)>, upto: Option<&[u8]>| {
            while let Some((k, v)) = ov.peek() {
                if upto.is_some_and(|u| k.as_slice() >= u) || out.len() >= limit {
                    break;
                }
                if let Some(v) = v {
                    out.push((k.to_vec(), v.clone()));
                }
                ov.next();
            }
        };
        macro_rules! collect {
            ($t:expr) => {{
                for item in $t.range::<&[u8]>(from..to).map_err(backend_err)? {
                    let (k, v) = item.map_err(backend_err)?;
                    let k = k.value();
                    drain(&mut out, Some(k));
                    if out.len() >= limit {
                        break;
                    }
                    if !self.overlay.contains_key(k) {
                        out.push((k.to_vec(), v.value().to_vec()));
                    }
                }
            }};
        }
        match &self.table {
            TableRef::Write(t) => collect!(t),
            TableRef::Read(t) => collect!(t),
        }
        drain(&mut out, None);
        Ok(out)
    }

    fn scan_prefix(&self, prefix: &[u8], limit: usize) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(prefix, &prefix_end(prefix), limit)
    }

    fn del_prefix(&mut self, prefix: &[u8]) -> Result<()> {
        for (k, _) in self.scan_prefix(prefix, usize::MAX)? {
            self.del(&k)?;
        }
        Ok(())
    }
}

impl Tx for RedbTx<'_> {
    fn attr(&mut self, ino: Ino) -> Result<Option<Attr>> {
        Ok(self
            .get(&key(b'A', &[&be(ino.0)]))?
            .map(|v| Attr::decode(&v))
            .transpose()?)
    }

    fn set_attr(&mut self, ino: Ino, attr: &Attr) -> Result<()> {
        self.put(&key(b'A', &[&be(ino.0)]), &attr.encode())
    }

    fn del_attr(&mut self, ino: Ino) -> Result<()> {
        self.del(&key(b'A', &[&be(ino.0)]))
    }

    fn dentry(&mut self, parent: Ino, name: &[u8]) -> Result<Option<Dentry>> {
        Ok(self
            .get(&key(b'D', &[&be(parent.0), name]))?
            .map(|v| Dentry::decode(&v))
            .transpose()?)
    }

    fn set_dentry(&mut self, parent: Ino, name: &[u8], dentry: &Dentry) -> Result<()> {
        self.put(&key(b'D', &[&be(parent.0), name]), &dentry.encode())?;
        self.put(&key(b'C', &[&be(parent.0), &be(dentry.cookie)]), name)
    }

    fn del_dentry(&mut self, parent: Ino, name: &[u8], cookie: u64) -> Result<()> {
        self.del(&key(b'D', &[&be(parent.0), name]))?;
        self.del(&key(b'C', &[&be(parent.0), &be(cookie)]))
    }

    fn dir_entries(
        &mut self,
        parent: Ino,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Dentry)>> {
        let from = key(b'C', &[&be(parent.0), &be(after.saturating_add(1))]);
        let to = prefix_end(&key(b'C', &[&be(parent.0)]));
        let mut out = Vec::new();
        for (_, name) in self.scan(&from, &to, limit)? {
            match self.dentry(parent, &name)? {
                Some(d) => out.push((name, d)),
                None => {
                    return Err(MetaError::Corrupt(Corrupt {
                        what: "directory index",
                    }));
                }
            }
        }
        Ok(out)
    }

    fn dir_is_empty(&mut self, parent: Ino) -> Result<bool> {
        Ok(self
            .scan_prefix(&key(b'D', &[&be(parent.0)]), 1)?
            .is_empty())
    }

    fn symlink(&mut self, ino: Ino) -> Result<Option<Vec<u8>>> {
        self.get(&key(b'L', &[&be(ino.0)]))
    }

    fn set_symlink(&mut self, ino: Ino, target: &[u8]) -> Result<()> {
        self.put(&key(b'L', &[&be(ino.0)]), target)
    }

    fn del_symlink(&mut self, ino: Ino) -> Result<()> {
        self.del(&key(b'L', &[&be(ino.0)]))
    }

    fn xattr(&mut self, ino: Ino, name: &[u8]) -> Result<Option<Vec<u8>>> {
        self.get(&key(b'X', &[&be(ino.0), name]))
    }

    fn set_xattr(&mut self, ino: Ino, name: &[u8], value: &[u8]) -> Result<()> {
        self.put(&key(b'X', &[&be(ino.0), name]), value)
    }

    fn del_xattr(&mut self, ino: Ino, name: &[u8]) -> Result<()> {
        self.del(&key(b'X', &[&be(ino.0), name]))
    }

    fn xattr_names(&mut self, ino: Ino) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .scan_prefix(&key(b'X', &[&be(ino.0)]), usize::MAX)?
            .into_iter()
            .map(|(k, _)| k[9..].to_vec())
            .collect())
    }

    fn del_xattrs(&mut self, ino: Ino) -> Result<()> {
        self.del_prefix(&key(b'X', &[&be(ino.0)]))
    }

    fn chunk(&mut self, ino: Ino, index: u32) -> Result<Vec<Slice>> {
        match self.get(&key(b'K', &[&be(ino.0), &index.to_be_bytes()]))? {
            Some(v) => Ok(Slice::decode_list(&v)?),
            None => Ok(Vec::new()),
        }
    }

    fn append_slice(&mut self, ino: Ino, index: u32, slice: &Slice) -> Result<()> {
        let k = key(b'K', &[&be(ino.0), &index.to_be_bytes()]);
        let mut v = self.get(&k)?.unwrap_or_default();
        slice.encode_into(&mut v);
        self.put(&k, &v)
    }

    fn set_chunk(&mut self, ino: Ino, index: u32, slices: &[Slice]) -> Result<()> {
        let k = key(b'K', &[&be(ino.0), &index.to_be_bytes()]);
        if slices.is_empty() {
            return self.del(&k);
        }
        let mut v = Vec::with_capacity(slices.len() * SLICE_LEN);
        for s in slices {
            s.encode_into(&mut v);
        }
        self.put(&k, &v)
    }

    fn format(&mut self) -> Result<Option<Format>> {
        Ok(self.get(b"F")?.map(|v| Format::decode(&v)).transpose()?)
    }

    fn set_format(&mut self, format: &Format) -> Result<()> {
        self.put(b"F", &format.encode())
    }

    fn alloc(&mut self, counter: Counter, n: u64) -> Result<u64> {
        let k = key(b'N', &[counter.key().as_bytes()]);
        let last = match self.get(&k)? {
            Some(v) => u64_at(&v, 0)?,
            None => 0,
        };
        let new_last = last.checked_add(n).ok_or(MetaError::NoSpace)?;
        self.put(&k, &be(new_last))?;
        Ok(last + 1)
    }

    fn add_usage(&mut self, bytes: i64, inodes: i64) -> Result<()> {
        let u = self.usage()?;
        let mut v = Vec::with_capacity(16);
        v.extend_from_slice(&u.used_bytes.saturating_add_signed(bytes).to_be_bytes());
        v.extend_from_slice(&u.used_inodes.saturating_add_signed(inodes).to_be_bytes());
        self.put(b"U", &v)
    }

    fn usage(&mut self) -> Result<Usage> {
        match self.get(b"U")? {
            Some(v) => Ok(Usage {
                used_bytes: u64_at(&v, 0)?,
                used_inodes: u64_at(&v, 8)?,
            }),
            None => Ok(Usage::default()),
        }
    }

    fn session(&mut self, sid: SessionId) -> Result<Option<SessionInfo>> {
        Ok(self
            .get(&key(b'S', &[&be(sid.0)]))?
            .map(|v| SessionInfo::decode(&v))
            .transpose()?)
    }

    fn set_session(&mut self, sid: SessionId, info: &SessionInfo) -> Result<()> {
        self.put(&key(b'S', &[&be(sid.0)]), &info.encode())
    }

    fn del_session(&mut self, sid: SessionId) -> Result<()> {
        self.del(&key(b'S', &[&be(sid.0)]))
    }

    fn sessions(&mut self) -> Result<Vec<(SessionId, SessionInfo)>> {
        self.scan_prefix(b"S", usize::MAX)?
            .into_iter()
            .map(|(k, v)| Ok((SessionId(u64_at(&k, 1)?), SessionInfo::decode(&v)?)))
            .collect()
    }

    fn sustained(&mut self, sid: SessionId) -> Result<Vec<Ino>> {
        self.scan_prefix(&key(b'P', &[&be(sid.0)]), usize::MAX)?
            .into_iter()
            .map(|(k, _)| Ok(Ino(u64_at(&k, 9)?)))
            .collect()
    }

    fn add_sustained(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.put(&key(b'P', &[&be(sid.0), &be(ino.0)]), &[])
    }

    fn del_sustained(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.del(&key(b'P', &[&be(sid.0), &be(ino.0)]))
    }

    fn locks(&mut self, ino: Ino) -> Result<Vec<RangeLock>> {
        match self.get(&key(b'R', &[&be(ino.0)]))? {
            Some(v) => Ok(RangeLock::decode_list(&v)?),
            None => Ok(Vec::new()),
        }
    }

    fn set_locks(&mut self, ino: Ino, locks: &[RangeLock]) -> Result<()> {
        let k = key(b'R', &[&be(ino.0)]);
        if locks.is_empty() {
            self.del(&k)
        } else {
            self.put(&k, &RangeLock::encode_list(locks))
        }
    }

    fn session_locked(&mut self, sid: SessionId) -> Result<Vec<Ino>> {
        self.scan_prefix(&key(b'Q', &[&be(sid.0)]), usize::MAX)?
            .into_iter()
            .map(|(k, _)| Ok(Ino(u64_at(&k, 9)?)))
            .collect()
    }

    fn add_session_locked(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.put(&key(b'Q', &[&be(sid.0), &be(ino.0)]), &[])
    }

    fn del_session_locked(&mut self, sid: SessionId, ino: Ino) -> Result<()> {
        self.del(&key(b'Q', &[&be(sid.0), &be(ino.0)]))
    }

    fn add_dead_slice(&mut self, dead: &DeadSlice) -> Result<()> {
        self.put(
            &key(b'G', &[&ts_key(dead.since), &be(dead.id)]),
            &dead.size.to_be_bytes(),
        )?;
        self.put(&key(b'g', &[&be(dead.id)]), &ts_key(dead.since))
    }

    fn dead_slices(&mut self, before: Timestamp, limit: usize) -> Result<Vec<DeadSlice>> {
        let to = key(b'G', &[&ts_key(before)]);
        self.scan(b"G", &to, limit)?
            .into_iter()
            .map(|(k, v)| {
                let since = Timestamp((u64_at(&k, 1)? ^ (1 << 63)) as i64);
                let size = v
                    .as_slice()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .map_err(|_| Corrupt { what: "dead slice" })?;
                Ok(DeadSlice {
                    id: u64_at(&k, 9)?,
                    size,
                    since,
                })
            })
            .collect()
    }

    fn del_dead_slice(&mut self, id: u64) -> Result<()> {
        let gk = key(b'g', &[&be(id)]);
        if let Some(since) = self.get(&gk)? {
            self.del(&key(b'G', &[&since, &be(id)]))?;
            self.del(&gk)?;
        }
        Ok(())
    }

    fn request(&mut self, sid: SessionId, unique: u64) -> Result<Option<Vec<u8>>> {
        self.get(&key(b'O', &[&be(sid.0), &be(unique)]))
    }

    fn set_request(&mut self, sid: SessionId, unique: u64, outcome: &[u8]) -> Result<()> {
        self.put(&key(b'O', &[&be(sid.0), &be(unique)]), outcome)
    }

    fn del_requests(&mut self, sid: SessionId, below: u64) -> Result<()> {
        let from = key(b'O', &[&be(sid.0)]);
        let to = key(b'O', &[&be(sid.0), &be(below)]);
        for (k, _) in self.scan(&from, &to, usize::MAX)? {
            self.del(&k)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend() -> (tempfile::TempDir, RedbBackend) {
        let dir = tempfile::tempdir().unwrap();
        let b = RedbBackend::open(&dir.path().join("meta.redb")).unwrap();
        (dir, b)
    }

    fn entry(ino: u64, cookie: u64) -> Dentry {
        Dentry {
            ino: Ino(ino),
            kind: FileKind::File,
            cookie,
        }
    }

    fn names(b: &RedbBackend, limit: usize) -> Vec<Vec<u8>> {
        b.read(&mut |tx| tx.dir_entries(Ino::ROOT, 0, limit))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    }

    #[test]
    fn scans_in_a_write_see_its_own_writes() {
        let (_dir, b) = backend();
        b.write(&mut |tx| {
            for (i, n) in [b"a", b"b", b"c"].iter().enumerate() {
                tx.set_dentry(Ino::ROOT, *n, &entry(10 + i as u64, 1 + i as u64))?;
            }
            Ok(())
        })
        .unwrap();
        let seen = b
            .write(&mut |tx| {
                tx.del_dentry(Ino::ROOT, b"b", 2)?;
                tx.set_dentry(Ino::ROOT, b"d", &entry(13, 4))?;
                tx.set_dentry(Ino::ROOT, b"a0", &entry(14, 0))?;
                let all = tx.dir_entries(Ino::ROOT, 0, usize::MAX)?;
                let two = tx.dir_entries(Ino::ROOT, 0, 2)?;
                let empty = tx.dir_is_empty(Ino::ROOT)?;
                Ok((all, two, empty))
            })
            .unwrap();
        let n = |v: &[(Vec<u8>, Dentry)]| v.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        // Cookie order: a (1), c (3), d (4); a0 has cookie 0, before the scan's start.
        assert_eq!(
            n(&seen.0),
            vec![b"a".to_vec(), b"c".to_vec(), b"d".to_vec()]
        );
        assert_eq!(n(&seen.1), vec![b"a".to_vec(), b"c".to_vec()]);
        assert!(!seen.2);
        assert_eq!(names(&b, usize::MAX), n(&seen.0));
    }

    #[test]
    fn a_failed_operation_leaves_nothing() {
        let (_dir, b) = backend();
        let r: Result<()> = b.write(&mut |tx| {
            tx.set_dentry(Ino::ROOT, b"x", &entry(10, 1))?;
            Err(MetaError::Exists)
        });
        assert!(matches!(r, Err(MetaError::Exists)));
        assert!(names(&b, usize::MAX).is_empty());
        assert!(
            b.read(&mut |tx| tx.dentry(Ino::ROOT, b"x"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn a_panicking_operation_fails_only_its_batch() {
        let (_dir, b) = backend();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            b.write(&mut |tx| -> Result<()> {
                tx.set_dentry(Ino::ROOT, b"lost", &entry(10, 1))?;
                panic!("an operation's bug")
            })
        }));
        assert!(r.is_err());
        b.write(&mut |tx| tx.set_dentry(Ino::ROOT, b"kept", &entry(11, 2)))
            .unwrap();
        assert_eq!(names(&b, usize::MAX), vec![b"kept".to_vec()]);
    }

    #[test]
    fn concurrent_operations_share_commits_and_keep_their_own_outcome() {
        let (_dir, b) = backend();
        let b = Arc::new(b);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        let name = format!("t{t}-{i}");
                        let fail = i % 5 == 0;
                        let r = b.write(&mut |tx| {
                            let cookie = tx.alloc(Counter::Inode, 1)?;
                            tx.set_dentry(Ino::ROOT, name.as_bytes(), &entry(cookie, cookie))?;
                            if fail {
                                return Err(MetaError::Exists);
                            }
                            Ok(cookie)
                        });
                        assert_eq!(r.is_err(), fail, "{name}: {r:?}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut got: Vec<String> = names(&b, usize::MAX)
            .into_iter()
            .map(|n| String::from_utf8(n).unwrap())
            .collect();
        got.sort();
        let mut want: Vec<String> = (0..8)
            .flat_map(|t| {
                (0..50)
                    .filter(|i| i % 5 != 0)
                    .map(move |i| format!("t{t}-{i}"))
            })
            .collect();
        want.sort();
        assert_eq!(got, want);
        // Failed operations allocated nothing: the counter moved once per success.
        let next = b.write(&mut |tx| tx.alloc(Counter::Inode, 1)).unwrap();
        assert_eq!(next, want.len() as u64 + 1);
    }
}
