//! One worker thread: picks steps of the profile at random and checks everything it
//! reads against what it knows was written. Every system call goes through
//! [`Recorder::op`], so its latency and errno are recorded.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::applog;
use super::layout;
use super::pattern::{self, Rng};
use super::stats::{OpKind, Recorder};
use super::{Profile, Shared};

/// Closes `f` with `close(2)` and returns its error (std's drop ignores it, and on FUSE
/// `close` is a FLUSH request that can fail).
pub fn close(f: File) -> io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: `fd` came from `into_raw_fd`, so this is its only owner and it is closed once.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[derive(Clone, Copy, Debug)]
enum Step {
    Pread,
    Append,
    StatLoop,
    Churn,
    SmallRead,
    ShardChunk,
    Checkpoint,
}

fn weights(p: Profile) -> &'static [(Step, u32)] {
    match p {
        Profile::Mixed => &[
            (Step::Pread, 28),
            (Step::Append, 14),
            (Step::StatLoop, 18),
            (Step::Churn, 20),
            (Step::SmallRead, 10),
            (Step::ShardChunk, 8),
            (Step::Checkpoint, 2),
        ],
        Profile::Training => &[
            (Step::SmallRead, 45),
            (Step::ShardChunk, 30),
            (Step::Pread, 8),
            (Step::Append, 10),
            (Step::Checkpoint, 2),
            (Step::StatLoop, 3),
            (Step::Churn, 2),
        ],
    }
}

/// A churn file: its content seed and length, unknown after a failed operation.
type Content = Option<(u64, usize)>;

/// What the worker knows about its private churn directory.
#[derive(Debug)]
struct Churn {
    dir: PathBuf,
    files: BTreeMap<String, Content>,
    dirs: BTreeMap<String, ()>,
    counter: u64,
    /// An operation failed, so the directory's state is unknown until listed again.
    resync: bool,
}

#[derive(Debug)]
struct ShardCursor {
    file: File,
    index: usize,
    offset: u64,
}

/// One worker thread's state.
#[derive(Debug)]
pub struct Worker {
    id: usize,
    shared: Arc<Shared>,
    rng: Rng,
    pub rec: Recorder,
    churn: Churn,
    shard: Option<ShardCursor>,
    ckpt_gen: u64,
    buf: Vec<u8>,
}

impl Worker {
    pub fn new(id: usize, shared: Arc<Shared>, rec: Recorder) -> io::Result<Worker> {
        let dir = shared.run_dir.join(format!("churn-{id}"));
        fs::create_dir_all(&dir)?;
        let rng = Rng::new(pattern::mix(shared.cfg.seed ^ (id as u64 + 1)));
        Ok(Worker {
            id,
            rng,
            rec,
            churn: Churn {
                dir,
                files: BTreeMap::new(),
                dirs: BTreeMap::new(),
                counter: 0,
                resync: false,
            },
            shard: None,
            ckpt_gen: 0,
            buf: vec![0; layout::READ_CHUNK],
            shared,
        })
    }

    /// Runs steps until the workload is stopped, then a last strict check of the churn
    /// directory.
    pub fn run(mut self) -> Recorder {
        let w = weights(self.shared.cfg.profile);
        let total: u32 = w.iter().map(|(_, n)| n).sum();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let mut pick = self.rng.below(u64::from(total)) as u32;
            let step = w
                .iter()
                .find(|(_, n)| {
                    if pick < *n {
                        true
                    } else {
                        pick -= n;
                        false
                    }
                })
                .map_or(Step::Pread, |(s, _)| *s);
            match step {
                Step::Pread => self.pread(),
                Step::Append => self.append(),
                Step::StatLoop => self.stat_loop(),
                Step::Churn => self.churn(),
                Step::SmallRead => self.small_read(),
                Step::ShardChunk => self.shard_chunk(),
                Step::Checkpoint => self.checkpoint(),
            }
        }
        if let Some(c) = self.shard.take() {
            let name = layout::shard_path(&self.shared.data_dir, c.index);
            self.rec.op(
                OpKind::ShardClose,
                || name.display().to_string(),
                || close(c.file),
            );
        }
        self.check_listing(true);
        self.rec
    }

    /// `pread` at a random offset through the shared long-lived descriptor.
    fn pread(&mut self) {
        let size = self.shared.cfg.pattern_size;
        let max = self.shared.cfg.pread_max.min(size as usize).max(1);
        let len = if self.rng.one_in(4) {
            self.rng.range(1, max as u64) as usize
        } else {
            4096.min(max)
        };
        let off = self.rng.below(size - len as u64 + 1);
        let shared = self.shared.clone();
        let buf = &mut self.buf[..len];
        let Some(n) = self.rec.op(
            OpKind::Pread,
            || format!("pattern @{off}+{len}"),
            || shared.pattern.read_at(buf, off),
        ) else {
            return;
        };
        if n != len {
            self.rec.check_failed(|| {
                format!("pread of {len} bytes at {off} of the pattern file returned {n}")
            });
        } else if let Some(i) = pattern::first_mismatch(layout::PATTERN_SEED, off, &self.buf[..len])
        {
            self.rec.check_failed(|| {
                format!(
                    "pread at {off}: byte {} differs from the pattern",
                    off + i as u64
                )
            });
        }
    }

    /// One record through the shared `O_APPEND` descriptor; `fsync` now and then.
    fn append(&mut self) {
        let mut a = self
            .shared
            .appender
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let seq = a.written.next_seq;
        a.written.next_seq += 1;
        let rec = applog::encode(seq);
        let a = &mut *a;
        let file = &a.file;
        match self.rec.op(
            OpKind::Append,
            || format!("record {seq}"),
            || (&*file).write(&rec),
        ) {
            Some(n) if n == rec.len() => {
                a.written.acknowledged.insert(seq);
            }
            Some(n) => {
                a.written.uncertain.insert(seq);
                self.rec.check_failed(|| {
                    format!("append of record {seq}: short write {n} of {}", rec.len())
                });
            }
            None => {
                a.written.uncertain.insert(seq);
            }
        }
        a.since_fsync += 1;
        if a.since_fsync >= self.shared.cfg.fsync_every {
            a.since_fsync = 0;
            let acked = a.written.acknowledged.len() as u64;
            if self
                .rec
                .op(
                    OpKind::AppendFsync,
                    || "append log".into(),
                    || file.sync_data(),
                )
                .is_some()
            {
                a.written.fsynced = acked;
            }
        }
    }

    /// stat, open, read to the end, close one of the fixed files; check size and bytes.
    fn stat_loop(&mut self) {
        let i = self.rng.below(self.shared.cfg.files as u64) as usize;
        let path = layout::file_path(&self.shared.data_dir, i);
        let (seed, len) = (layout::file_seed(i), layout::file_len(i));
        let t = || path.display().to_string();
        let Some(md) = self.rec.op(OpKind::Stat, t, || fs::metadata(&path)) else {
            return;
        };
        if !md.is_file() || md.len() != len as u64 {
            self.rec.check_failed(|| {
                format!(
                    "stat {}: size {} (file: {}), expected {len}",
                    t(),
                    md.len(),
                    md.is_file()
                )
            });
        }
        self.read_whole(
            &path,
            seed,
            len,
            [OpKind::Open, OpKind::Read, OpKind::Close],
        );
    }

    /// open, read until EOF, close, and check the bytes. Returns whether all went well.
    fn read_whole(&mut self, path: &Path, seed: u64, len: usize, kinds: [OpKind; 3]) -> bool {
        let t = || path.display().to_string();
        let Some(mut f) = self.rec.op(kinds[0], t, || File::open(path)) else {
            return false;
        };
        let mut data = Vec::with_capacity(len);
        let mut ok = true;
        loop {
            let buf = &mut self.buf;
            let Some(n) = self.rec.op(kinds[1], t, || f.read(buf)) else {
                ok = false;
                break;
            };
            if n == 0 {
                break;
            }
            data.extend_from_slice(&self.buf[..n]);
            if data.len() > len {
                break;
            }
        }
        if self.rec.op(kinds[2], t, || close(f)).is_none() {
            ok = false;
        }
        if ok && data.len() != len {
            self.rec
                .check_failed(|| format!("{}: read {} bytes, expected {len}", t(), data.len()));
            return false;
        }
        if ok && let Some(i) = pattern::first_mismatch(seed, 0, &data) {
            self.rec
                .check_failed(|| format!("{}: byte {i} differs from what was written", t()));
            return false;
        }
        ok
    }

    fn small_read(&mut self) {
        let i = self.rng.below(self.shared.cfg.small_files as u64) as usize;
        let path = layout::small_path(&self.shared.data_dir, i);
        self.read_whole(
            &path,
            layout::small_seed(i),
            layout::small_len(i),
            [OpKind::SmallOpen, OpKind::SmallRead, OpKind::SmallClose],
        );
    }

    /// Streams the shards sequentially, one chunk per step.
    fn shard_chunk(&mut self) {
        let data_dir = self.shared.data_dir.clone();
        let cursor = match self.shard.take() {
            Some(c) => c,
            None => {
                let index = self.rng.below(self.shared.cfg.shards as u64) as usize;
                let path = layout::shard_path(&data_dir, index);
                let Some(file) = self.rec.op(
                    OpKind::ShardOpen,
                    || path.display().to_string(),
                    || File::open(&path),
                ) else {
                    return;
                };
                ShardCursor {
                    file,
                    index,
                    offset: 0,
                }
            }
        };
        let mut c = cursor;
        let path = layout::shard_path(&data_dir, c.index);
        let t = || path.display().to_string();
        let size = self.shared.cfg.shard_size;
        let buf = &mut self.buf;
        let file = &mut c.file;
        let Some(n) = self.rec.op(OpKind::ShardRead, t, || file.read(buf)) else {
            self.rec.op(OpKind::ShardClose, t, || close(c.file));
            return;
        };
        let expect = (size - c.offset).min(self.buf.len() as u64) as usize;
        if n != expect {
            self.rec.check_failed(|| {
                format!("{} @{}: read {n} bytes, expected {expect}", t(), c.offset)
            });
        } else if let Some(i) =
            pattern::first_mismatch(layout::shard_seed(c.index), c.offset, &self.buf[..n])
        {
            self.rec.check_failed(|| {
                format!(
                    "{}: byte {} differs from what was written",
                    t(),
                    c.offset + i as u64
                )
            });
        }
        c.offset += n as u64;
        if n == 0 || n != expect {
            self.rec.op(OpKind::ShardClose, t, || close(c.file));
        } else {
            self.shard = Some(c);
        }
    }

    /// Writes a checkpoint to a temporary name, fsyncs, renames it into place, reads it
    /// back.
    fn checkpoint(&mut self) {
        self.ckpt_gen += 1;
        let seed = layout::ckpt_seed(self.id, self.ckpt_gen);
        let size = self.shared.cfg.checkpoint_size as usize;
        let dir = &self.shared.run_dir;
        let tmp = dir.join(format!("ckpt-{}.tmp", self.id));
        let dst = dir.join(format!("ckpt-{}", self.id));
        let t = || tmp.display().to_string();
        let Some(mut f) = self.rec.op(OpKind::CkptCreate, t, || {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
        }) else {
            return;
        };
        let mut off = 0usize;
        let mut ok = true;
        while off < size {
            let n = (size - off).min(layout::READ_CHUNK);
            let chunk = pattern::bytes(seed, off as u64, n);
            match self.rec.op(OpKind::CkptWrite, t, || f.write(&chunk)) {
                Some(w) if w == n => off += n,
                Some(w) => {
                    self.rec
                        .check_failed(|| format!("{}: short write {w} of {n}", t()));
                    ok = false;
                    break;
                }
                None => {
                    ok = false;
                    break;
                }
            }
        }
        if ok {
            ok = self.rec.op(OpKind::CkptFsync, t, || f.sync_all()).is_some();
        }
        ok &= self.rec.op(OpKind::CkptClose, t, || close(f)).is_some();
        if !ok {
            return;
        }
        if self
            .rec
            .op(OpKind::CkptRename, t, || fs::rename(&tmp, &dst))
            .is_none()
        {
            return;
        }
        self.read_whole(
            &dst,
            seed,
            size,
            [OpKind::CkptOpen, OpKind::CkptRead, OpKind::CkptClose],
        );
    }

    /// create / write / rename / unlink / mkdir / rmdir / read back / readdir in the
    /// worker's own directory.
    fn churn(&mut self) {
        if self.churn.resync {
            self.check_listing(false);
            return;
        }
        let max = self.shared.cfg.churn_files;
        let nfiles = self.churn.files.len();
        let action = self.rng.below(12);
        match action {
            0..=3 if nfiles < max => self.churn_create(),
            0..=5 if nfiles > 0 => self.churn_rename(),
            6..=7 if nfiles > 0 => self.churn_unlink(),
            8 if self.churn.dirs.len() < 4 => self.churn_mkdir(),
            8 if !self.churn.dirs.is_empty() => self.churn_rmdir(),
            9..=10 if nfiles > 0 => self.churn_read_back(),
            _ if nfiles == 0 => self.churn_create(),
            _ => self.check_listing(false),
        }
    }

    fn pick_file(&mut self) -> Option<(String, Content)> {
        let n = self.churn.files.len() as u64;
        let i = self.rng.below(n) as usize;
        self.churn.files.iter().nth(i).map(|(k, v)| (k.clone(), *v))
    }

    fn churn_create(&mut self) {
        self.churn.counter += 1;
        let name = format!("f{}", self.churn.counter);
        let path = self.churn.dir.join(&name);
        let seed = pattern::mix((self.id as u64) << 32 ^ self.churn.counter);
        let len = self.rng.below(4096) as usize;
        let t = || path.display().to_string();
        let Some(mut f) = self.rec.op(OpKind::Create, t, || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(&path)
        }) else {
            self.churn.resync = true;
            return;
        };
        self.churn.files.insert(name.clone(), None);
        let data = pattern::bytes(seed, 0, len);
        let wrote = if len == 0 {
            Some(0)
        } else {
            self.rec.op(OpKind::Write, t, || f.write(&data))
        };
        let closed = self.rec.op(OpKind::Close, t, || close(f)).is_some();
        if wrote == Some(len) && closed {
            self.churn.files.insert(name, Some((seed, len)));
        } else {
            if let Some(w) = wrote.filter(|w| *w != len) {
                self.rec
                    .check_failed(|| format!("{}: short write {w} of {len}", t()));
            }
            self.churn.resync = true;
        }
    }

    fn churn_rename(&mut self) {
        let Some((from, content)) = self.pick_file() else {
            return;
        };
        self.churn.counter += 1;
        // Now and then onto an existing name (replacing it), usually to a new one.
        let to = match self.pick_file() {
            Some((other, _)) if other != from && self.rng.one_in(4) => other,
            _ => format!("r{}", self.churn.counter),
        };
        let (a, b) = (self.churn.dir.join(&from), self.churn.dir.join(&to));
        if self
            .rec
            .op(
                OpKind::Rename,
                || format!("{} -> {to}", a.display()),
                || fs::rename(&a, &b),
            )
            .is_none()
        {
            self.churn.resync = true;
            return;
        }
        self.churn.files.remove(&from);
        self.churn.files.insert(to, content);
    }

    fn churn_unlink(&mut self) {
        let Some((name, _)) = self.pick_file() else {
            return;
        };
        let path = self.churn.dir.join(&name);
        if self
            .rec
            .op(
                OpKind::Unlink,
                || path.display().to_string(),
                || fs::remove_file(&path),
            )
            .is_none()
        {
            self.churn.resync = true;
            return;
        }
        self.churn.files.remove(&name);
    }

    fn churn_mkdir(&mut self) {
        self.churn.counter += 1;
        let name = format!("d{}", self.churn.counter);
        let path = self.churn.dir.join(&name);
        if self
            .rec
            .op(
                OpKind::Mkdir,
                || path.display().to_string(),
                || fs::create_dir(&path),
            )
            .is_none()
        {
            self.churn.resync = true;
            return;
        }
        self.churn.dirs.insert(name, ());
    }

    fn churn_rmdir(&mut self) {
        let Some(name) = self.churn.dirs.keys().next().cloned() else {
            return;
        };
        let path = self.churn.dir.join(&name);
        if self
            .rec
            .op(
                OpKind::Rmdir,
                || path.display().to_string(),
                || fs::remove_dir(&path),
            )
            .is_none()
        {
            self.churn.resync = true;
            return;
        }
        self.churn.dirs.remove(&name);
    }

    fn churn_read_back(&mut self) {
        let Some((name, Some((seed, len)))) = self.pick_file() else {
            return;
        };
        let path = self.churn.dir.join(&name);
        if !self.read_whole(
            &path,
            seed,
            len,
            [OpKind::Open, OpKind::Read, OpKind::Close],
        ) {
            self.churn.resync = true;
        }
    }

    /// Lists the churn directory and compares with what this worker created and did not
    /// remove. After a failed operation (`resync`), adopts the listing instead.
    fn check_listing(&mut self, final_check: bool) {
        let dir = self.churn.dir.clone();
        let listed = self.rec.op(
            OpKind::Readdir,
            || dir.display().to_string(),
            || {
                let mut files = Vec::new();
                let mut dirs = Vec::new();
                for e in fs::read_dir(&dir)? {
                    let e = e?;
                    let name = e.file_name().to_string_lossy().into_owned();
                    if e.file_type()?.is_dir() {
                        dirs.push(name)
                    } else {
                        files.push(name)
                    }
                }
                Ok((files, dirs))
            },
        );
        let Some((files, dirs)) = listed else {
            self.churn.resync = true;
            return;
        };
        if !self.churn.resync {
            let missing: Vec<&String> = self
                .churn
                .files
                .keys()
                .chain(self.churn.dirs.keys())
                .filter(|n| !files.contains(n) && !dirs.contains(n))
                .collect();
            let extra: Vec<&String> = files
                .iter()
                .filter(|n| !self.churn.files.contains_key(*n))
                .chain(dirs.iter().filter(|n| !self.churn.dirs.contains_key(*n)))
                .collect();
            if !missing.is_empty() || !extra.is_empty() {
                let when = if final_check {
                    "at the end"
                } else {
                    "during the run"
                };
                self.rec.check_failed(|| {
                    format!(
                        "readdir {} {when}: missing {missing:?}, unexpected {extra:?}",
                        dir.display()
                    )
                });
            }
        }
        // After a failed operation the content under a name is unknown (a rename that
        // failed may still have happened), so only names are adopted.
        let known = std::mem::take(&mut self.churn.files);
        let keep_content = !self.churn.resync;
        self.churn.files = files
            .into_iter()
            .map(|n| {
                let c = if keep_content {
                    known.get(&n).copied().flatten()
                } else {
                    None
                };
                (n, c)
            })
            .collect();
        self.churn.dirs = dirs.into_iter().map(|n| (n, ())).collect();
        self.churn.resync = false;
    }
}
