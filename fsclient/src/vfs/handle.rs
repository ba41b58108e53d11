//! File and directory handles.
//!
//! A handle number ([`Fh`]) carries everything needed to rebuild the handle in a process
//! that has never seen it (a successor after a live upgrade or a crash): the inode, the
//! open mode and a counter that makes it unique among the inode's open handles.
//!
//! ```text
//!  63            44 43  42  41  40 39                                   0
//! +----------------+---+---+---+---+--------------------------------------+
//! | counter (20 b) |dir|app| w | r |            inode (40 bits)           |
//! +----------------+---+---+---+---+--------------------------------------+
//! ```
//!
//! The counter's high 8 bits are the *epoch* of the process that opened the handle (its
//! client generation, modulo 256), the low 12 bits a sequence within that process. A
//! successor that took over after a crash never saw its predecessor's handles, and the
//! kernel may still hold any of them: its own numbers carry another epoch, so they
//! cannot repeat one of them (unless a handle opened 256 generations earlier is still
//! open and was never used since). A successor of a live upgrade receives every handle
//! and checks new numbers against them.
//!
//! The per-process part of a handle (read-ahead state) is a cache: losing it costs only a
//! cold read-ahead.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;

use crate::data::ReadState;
use crate::meta::Ino;

const INO_BITS: u32 = 40;
const FLAG_SHIFT: u32 = INO_BITS;
const COUNTER_SHIFT: u32 = 44;
const COUNTER_MASK: u32 = (1 << 20) - 1;
/// Bits of the counter below the epoch.
const SEQ_BITS: u32 = 12;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;
const EPOCH_MASK: u32 = 0xff;

/// Set in an exported `next_handle` when the exporter's table may miss handles the kernel
/// holds (it, or a predecessor, took over after a crash): the importer must stay careful
/// too (see `Vfs::take_over_after_crash`). Outside the 20 counter bits, so a build that
/// does not know it masks it away.
pub const NEXT_HANDLE_INCOMPLETE: u32 = 1 << 31;

/// How a handle was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct HandleFlags {
    pub read: bool,
    pub write: bool,
    pub append: bool,
    pub dir: bool,
}

impl HandleFlags {
    /// From open(2) flags.
    pub fn from_open_flags(flags: i32) -> Self {
        let acc = flags & libc::O_ACCMODE;
        HandleFlags {
            read: acc == libc::O_RDONLY || acc == libc::O_RDWR,
            write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
            append: flags & libc::O_APPEND != 0,
            dir: false,
        }
    }

    pub fn directory() -> Self {
        HandleFlags {
            read: true,
            dir: true,
            ..Default::default()
        }
    }

    fn bits(self) -> u64 {
        u64::from(self.read)
            | u64::from(self.write) << 1
            | u64::from(self.append) << 2
            | u64::from(self.dir) << 3
    }

    fn from_bits(b: u64) -> Self {
        HandleFlags {
            read: b & 1 != 0,
            write: b & 2 != 0,
            append: b & 4 != 0,
            dir: b & 8 != 0,
        }
    }
}

/// A file handle number as the kernel sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fh(pub u64);

impl Fh {
    pub fn new(ino: Ino, flags: HandleFlags, counter: u32) -> Self {
        debug_assert!(ino.0 <= Ino::MAX);
        Fh((ino.0 & Ino::MAX)
            | flags.bits() << FLAG_SHIFT
            | u64::from(counter & COUNTER_MASK) << COUNTER_SHIFT)
    }

    pub fn ino(self) -> Ino {
        Ino(self.0 & Ino::MAX)
    }

    pub fn flags(self) -> HandleFlags {
        HandleFlags::from_bits((self.0 >> FLAG_SHIFT) & 0xf)
    }

    pub fn counter(self) -> u32 {
        (self.0 >> COUNTER_SHIFT) as u32 & COUNTER_MASK
    }
}

/// An open file or directory.
#[derive(Debug)]
pub struct Handle {
    pub fh: Fh,
    pub read_state: Mutex<ReadState>,
}

impl Handle {
    pub fn ino(&self) -> Ino {
        self.fh.ino()
    }

    pub fn flags(&self) -> HandleFlags {
        self.fh.flags()
    }
}

/// The open handles of this process, and how many each inode has.
#[derive(Debug, Default)]
pub struct HandleTable {
    inner: Mutex<Tables>,
    /// Sequence of the next handle (its low [`SEQ_BITS`] are used).
    counter: AtomicU32,
    /// This process's epoch: the high bits of the counter of every handle it opens.
    epoch: AtomicU32,
}

#[derive(Debug, Default)]
struct Tables {
    handles: HashMap<Fh, Arc<Handle>>,
    open: HashMap<Ino, u32>,
    /// Handles opened or closed since the last base export ([`HandleTable::export_base`]);
    /// `None` while no base is out.
    changed: Option<HashSet<Fh>>,
}

impl Tables {
    fn insert(&mut self, fh: Fh) -> Arc<Handle> {
        let h = Arc::new(Handle {
            fh,
            read_state: Mutex::new(ReadState::default()),
        });
        self.handles.insert(fh, h.clone());
        if let Some(c) = &mut self.changed {
            c.insert(fh);
        }
        if !fh.flags().dir {
            *self.open.entry(fh.ino()).or_insert(0) += 1;
        }
        h
    }
}

impl HandleTable {
    /// Sets the epoch of the handles opened from now on: the client generation (modulo
    /// 256). Called before the process serves.
    pub fn set_epoch(&self, generation: u64) {
        self.epoch
            .store((generation as u32) & EPOCH_MASK, Ordering::Relaxed);
    }

    /// Opens a new handle; `None` when every number of this epoch for `ino` and `flags`
    /// is taken (2^12 handles open at once on one inode with the same flags).
    pub fn open(&self, ino: Ino, flags: HandleFlags) -> Option<Arc<Handle>> {
        let mut t = self.inner.lock();
        let epoch = self.epoch.load(Ordering::Relaxed) << SEQ_BITS;
        for _ in 0..=SEQ_MASK {
            let c = epoch | (self.counter.fetch_add(1, Ordering::Relaxed) & SEQ_MASK);
            let fh = Fh::new(ino, flags, c);
            if !t.handles.contains_key(&fh) {
                return Some(t.insert(fh));
            }
        }
        None
    }

    /// The handle for `fh`; rebuilt from the number if this process has not seen it (it
    /// was opened by a predecessor). `None` if `fh` does not belong to `ino`.
    pub fn get(&self, ino: Ino, fh: u64) -> Option<Arc<Handle>> {
        let fh = Fh(fh);
        if fh.ino() != ino {
            return None;
        }
        let mut t = self.inner.lock();
        if let Some(h) = t.handles.get(&fh) {
            return Some(h.clone());
        }
        Some(t.insert(fh))
    }

    /// Closes a handle; returns whether it was the inode's last open file handle here.
    pub fn close(&self, fh: u64) -> bool {
        let fh = Fh(fh);
        let mut t = self.inner.lock();
        if t.handles.remove(&fh).is_none() {
            return false;
        }
        if let Some(c) = &mut t.changed {
            c.insert(fh);
        }
        if fh.flags().dir {
            return false;
        }
        let ino = fh.ino();
        match t.open.get_mut(&ino) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                t.open.remove(&ino);
                true
            }
            None => false,
        }
    }

    pub fn is_open(&self, ino: Ino) -> bool {
        self.inner.lock().open.contains_key(&ino)
    }

    /// Every open handle number (for the state handed to a successor).
    pub fn all(&self) -> Vec<Fh> {
        self.inner.lock().handles.keys().copied().collect()
    }

    /// Every open handle number, in order, and the next counter value (epoch and
    /// sequence): what a successor needs to go on without reusing a number the kernel
    /// still holds.
    pub fn snapshot(&self) -> (Vec<Fh>, u32) {
        let t = self.inner.lock();
        let mut fhs: Vec<Fh> = t.handles.keys().copied().collect();
        fhs.sort_unstable();
        let epoch = self.epoch.load(Ordering::Relaxed) << SEQ_BITS;
        (
            fhs,
            epoch | (self.counter.load(Ordering::Relaxed) & SEQ_MASK),
        )
    }

    /// [`HandleTable::snapshot`], and from now on records which handles open and close
    /// (anew if a base was out already).
    pub fn export_base(&self) -> (Vec<Fh>, u32) {
        let mut t = self.inner.lock();
        t.changed = Some(HashSet::new());
        let mut fhs: Vec<Fh> = t.handles.keys().copied().collect();
        drop(t);
        fhs.sort_unstable();
        (fhs, self.next_value())
    }

    /// What opened and closed since [`HandleTable::export_base`]: (open now, closed), and
    /// the next counter value; `None` if no base was out. Stops recording.
    pub fn take_changes(&self) -> Option<(Vec<Fh>, Vec<Fh>, u32)> {
        let mut t = self.inner.lock();
        let changed = t.changed.take()?;
        let (mut open, mut closed): (Vec<Fh>, Vec<Fh>) = changed
            .into_iter()
            .partition(|fh| t.handles.contains_key(fh));
        drop(t);
        open.sort_unstable();
        closed.sort_unstable();
        Some((open, closed, self.next_value()))
    }

    /// The base is dropped: stop recording.
    pub fn stop_recording(&self) {
        self.inner.lock().changed = None;
    }

    /// The open file handles of `inos`.
    pub fn files_of(&self, inos: &HashSet<Ino>) -> Vec<Fh> {
        if inos.is_empty() {
            return Vec::new();
        }
        let t = self.inner.lock();
        let mut fhs: Vec<Fh> = t
            .handles
            .keys()
            .filter(|fh| !fh.flags().dir && inos.contains(&fh.ino()))
            .copied()
            .collect();
        fhs.sort_unstable();
        fhs
    }

    fn next_value(&self) -> u32 {
        let epoch = self.epoch.load(Ordering::Relaxed) << SEQ_BITS;
        epoch | (self.counter.load(Ordering::Relaxed) & SEQ_MASK)
    }

    /// Adds a predecessor's handles (known ones are kept as they are). If the predecessor
    /// had this process's epoch, the sequence moves to `next` unless it is there already
    /// (new numbers are also checked against every known handle).
    pub fn restore(&self, fhs: &[Fh], next: u32) {
        let mut t = self.inner.lock();
        for fh in fhs {
            if !t.handles.contains_key(fh) {
                t.insert(*fh);
            }
        }
        let next = next & COUNTER_MASK;
        if next >> SEQ_BITS == self.epoch.load(Ordering::Relaxed) {
            self.counter.fetch_max(next & SEQ_MASK, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn fh_roundtrip(ino in 1u64..=Ino::MAX, r: bool, w: bool, a: bool, d: bool, c in 0u32..(1 << 20)) {
            let flags = HandleFlags { read: r, write: w, append: a, dir: d };
            let fh = Fh::new(Ino(ino), flags, c);
            prop_assert_eq!(fh.ino(), Ino(ino));
            prop_assert_eq!(fh.flags(), flags);
            prop_assert_eq!(fh.counter(), c);
        }
    }

    #[test]
    fn open_counts_and_rebuild() {
        let t = HandleTable::default();
        let a = t
            .open(
                Ino(5),
                HandleFlags::from_open_flags(libc::O_RDWR | libc::O_APPEND),
            )
            .unwrap();
        let b = t
            .open(Ino(5), HandleFlags::from_open_flags(libc::O_RDONLY))
            .unwrap();
        assert_ne!(a.fh, b.fh);
        assert!(a.flags().write && a.flags().append && !b.flags().write);
        assert!(t.is_open(Ino(5)));
        assert!(!t.close(a.fh.0));
        assert!(t.close(b.fh.0));
        assert!(!t.is_open(Ino(5)));
        // A handle number from another process is rebuilt, with its mode.
        let other = HandleTable::default();
        let h = other.get(Ino(5), a.fh.0).unwrap();
        assert!(h.flags().append);
        assert!(other.is_open(Ino(5)));
        assert!(other.get(Ino(6), a.fh.0).is_none());
    }

    #[test]
    fn snapshot_restore_keeps_handles_counts_and_counter() {
        let t = HandleTable::default();
        let a = t
            .open(Ino(5), HandleFlags::from_open_flags(libc::O_WRONLY))
            .unwrap();
        let b = t
            .open(Ino(5), HandleFlags::from_open_flags(libc::O_RDONLY))
            .unwrap();
        let d = t.open(Ino(1), HandleFlags::directory()).unwrap();
        let (fhs, next) = t.snapshot();
        assert_eq!(fhs.len(), 3);
        assert_eq!(next, 3);

        let successor = HandleTable::default();
        successor.restore(&fhs, next);
        assert!(successor.is_open(Ino(5)));
        assert!(!successor.close(a.fh.0), "b is still open");
        assert!(successor.close(b.fh.0), "the inode's last handle");
        assert!(!successor.close(d.fh.0), "directories are not counted");
        // New handles do not reuse a number the kernel may still hold.
        let c = successor
            .open(Ino(5), HandleFlags::from_open_flags(libc::O_RDONLY))
            .unwrap();
        assert_eq!(c.fh.counter(), 3);
    }

    #[test]
    fn a_crash_successor_never_reuses_a_number_of_its_dead_predecessor() {
        // Generation 3 opened many handles of one inode; it died, and the kernel holds
        // all of them. Generation 4 has seen none.
        let dead = HandleTable::default();
        dead.set_epoch(3);
        let held: std::collections::HashSet<Fh> = (0..5000)
            .map(|i| {
                let flags = if i % 2 == 0 {
                    HandleFlags::from_open_flags(libc::O_RDONLY)
                } else {
                    HandleFlags::from_open_flags(libc::O_WRONLY | libc::O_APPEND)
                };
                dead.open(Ino(9), flags).unwrap().fh
            })
            .collect();
        let successor = HandleTable::default();
        successor.set_epoch(4);
        for i in 0..5000 {
            let flags = if i % 2 == 0 {
                HandleFlags::from_open_flags(libc::O_RDONLY)
            } else {
                HandleFlags::from_open_flags(libc::O_WRONLY | libc::O_APPEND)
            };
            let fh = successor.open(Ino(9), flags).unwrap().fh;
            assert!(
                !held.contains(&fh),
                "{fh:?} repeats a handle the kernel holds"
            );
        }
        // A held handle used after the crash is rebuilt with its mode, and a new handle
        // never takes its number.
        let old = *held
            .iter()
            .find(|f| f.flags().append)
            .expect("an append handle");
        let h = successor.get(Ino(9), old.0).expect("rebuilt");
        assert!(h.flags().write && h.flags().append && !h.flags().read);
        assert!(successor.is_open(Ino(9)));
    }

    #[test]
    fn an_upgrade_successor_goes_on_from_its_predecessors_sequence_in_its_own_epoch() {
        let old = HandleTable::default();
        old.set_epoch(7);
        let a = old
            .open(Ino(2), HandleFlags::from_open_flags(libc::O_RDONLY))
            .unwrap();
        let (fhs, next) = old.snapshot();
        assert_eq!(next >> SEQ_BITS, 7);
        let new = HandleTable::default();
        new.set_epoch(8);
        new.restore(&fhs, next);
        let b = new
            .open(Ino(2), HandleFlags::from_open_flags(libc::O_RDONLY))
            .unwrap();
        assert_ne!(a.fh, b.fh);
        assert_eq!(b.fh.counter() >> SEQ_BITS, 8);
        assert!(!new.close(a.fh.0), "b is still open");
        assert!(new.close(b.fh.0));
    }

    #[test]
    fn a_full_epoch_for_one_inode_is_an_error_not_a_hang() {
        let t = HandleTable::default();
        let flags = HandleFlags::from_open_flags(libc::O_RDONLY);
        let held: Vec<_> = (0..=SEQ_MASK)
            .map(|_| t.open(Ino(3), flags).unwrap())
            .collect();
        assert!(t.open(Ino(3), flags).is_none());
        // Other inodes and other flags still get numbers, and a close frees one.
        assert!(t.open(Ino(4), flags).is_some());
        assert!(
            t.open(Ino(3), HandleFlags::from_open_flags(libc::O_WRONLY))
                .is_some()
        );
        t.close(held[7].fh.0);
        assert!(t.open(Ino(3), flags).is_some());
    }
}
