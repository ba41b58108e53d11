//! A client that takes a session over after its predecessor crashed, as the FUSE adapter
//! drives it: no tables came with the session, so handles are rebuilt from their numbers,
//! the session's locks and open-but-unlinked files are read from the metadata engine, and
//! no inode is known to be closed (an unlinked file is freed when the kernel forgets it).
//! What it must never do: drop a lock a descriptor still holds, keep one whose descriptor
//! closed, or free a file the kernel may still have open.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{ME, Volume};
use fsclient::meta::{Ino, MetaError, SessionId};
use fsclient::vfs::handle::NEXT_HANDLE_INCOMPLETE;
use fsclient::vfs::{FsError, Unique, Vfs};

const HOLDER: u64 = 77;
const OTHER: u64 = 88;

impl Volume {
    fn open(&self, resume: Option<SessionId>, generation: u64) -> Arc<Vfs> {
        let vfs = Vfs::open(self.config(resume), self.rt.handle().clone()).unwrap();
        vfs.set_handle_epoch(generation);
        vfs
    }
}

fn u(n: u64) -> Option<Unique> {
    Some(Unique(n))
}

fn gone(vfs: &Vfs, ino: Ino) -> bool {
    matches!(
        vfs.getattr(ino),
        Err(FsError::Meta(MetaError::NotFound)) | Err(FsError::Posix(libc::ENOENT))
    )
}

fn locked_by_other(vfs: &Vfs, ino: Ino) -> bool {
    vfs.getlk(ino, OTHER, libc::F_WRLCK, 0, 99, 2)
        .unwrap()
        .is_some()
}

#[test]
fn a_crash_successor_keeps_locks_and_unlinked_files_until_the_kernel_lets_go() {
    let vol = Volume::new("crash-takeover-test");
    let dead = vol.open(None, 1);
    let sid = dead.session();
    let rw = libc::O_RDWR;
    let (f, _, fh) = dead
        .create(u(2), ME, Ino::ROOT, b"locked", 0o644, 0, rw)
        .unwrap();
    dead.setlk(f, HOLDER, libc::F_WRLCK, 0, 99, 1, None)
        .unwrap();
    let (gone_file, _, gfh) = dead
        .create(u(4), ME, Ino::ROOT, b"unlinked", 0o644, 0, rw)
        .unwrap();
    dead.write(gone_file, gfh, 0, b"still here").unwrap();
    dead.flush(gone_file, gfh, 0).unwrap();
    dead.unlink(u(6), Ino::ROOT, b"unlinked").unwrap();
    // The kernel holds `fh` and `gfh`; the process dies without a word.
    dead.abandon();
    drop(dead);

    let next = vol.open(Some(sid), 2);
    next.take_over_after_crash().unwrap();
    // The lock is still held: another owner conflicts with it.
    assert!(locked_by_other(&next, f), "the lock was lost");
    // A FORGET of an inode this process never looked up is ignored.
    next.forget(f, 3);
    assert!(next.getattr(f).is_ok());
    // The close of the descriptor (its flush, with the owner) releases the lock.
    next.flush(f, fh, HOLDER).unwrap();
    assert!(
        !locked_by_other(&next, f),
        "the close did not release the lock"
    );
    next.release(f, fh, None).unwrap();

    // The unlinked file reads back through the dead process's handle; the last release
    // seen here may not be the kernel's last, so it is kept until the kernel forgets it.
    assert_eq!(next.read(gone_file, gfh, 0, 64).unwrap(), b"still here");
    next.release(gone_file, gfh, None).unwrap();
    assert!(
        !gone(&next, gone_file),
        "freed at a release: another descriptor may be open"
    );
    next.forget(gone_file, 1);
    assert!(
        gone(&next, gone_file),
        "not freed when the kernel forgot it"
    );

    // A file this process unlinks is kept too: a descriptor it never saw may be open.
    let (w, _, wfh) = next
        .create(u(8), ME, Ino::ROOT, b"w", 0o644, 0, rw)
        .unwrap();
    next.release(w, wfh, None).unwrap();
    next.unlink(u(10), Ino::ROOT, b"w").unwrap();
    assert!(!gone(&next, w));
    next.forget(w, 1);
    assert!(gone(&next, w));

    // A live upgrade of this process hands the caution over with its tables.
    let (x, _, xfh) = next
        .create(u(12), ME, Ino::ROOT, b"x", 0o644, 0, rw)
        .unwrap();
    next.release(x, xfh, None).unwrap();
    let tables = next.export_tables();
    assert_ne!(tables.next_handle & NEXT_HANDLE_INCOMPLETE, 0);
    next.abandon();
    drop(next);
    let upgraded = vol.open(Some(sid), 3);
    upgraded.import_tables(&tables);
    upgraded.unlink(u(14), Ino::ROOT, b"x").unwrap();
    assert!(
        !gone(&upgraded, x),
        "the successor of a crash successor freed at unlink"
    );
    upgraded.forget(x, 1);
    assert!(gone(&upgraded, x));
    upgraded.shutdown().unwrap();
}

#[test]
fn without_a_crash_a_file_is_freed_at_its_last_close() {
    let vol = Volume::new("crash-takeover-test");
    let vfs = vol.open(None, 1);
    let (f, _, fh) = vfs
        .create(u(2), ME, Ino::ROOT, b"f", 0o644, 0, libc::O_RDWR)
        .unwrap();
    vfs.unlink(u(4), Ino::ROOT, b"f").unwrap();
    assert!(!gone(&vfs, f), "freed while open");
    vfs.release(f, fh, None).unwrap();
    assert!(gone(&vfs, f), "kept after the last close");
    let tables = vfs.export_tables();
    assert_eq!(tables.next_handle & NEXT_HANDLE_INCOMPLETE, 0);
    vfs.shutdown().unwrap();
}

#[test]
fn inherited_unlinked_files_the_kernel_no_longer_has_are_swept() {
    let vol = Volume::new("crash-takeover-test");
    let dead = vol.open(None, 1);
    let sid = dead.session();
    let rw = libc::O_RDWR;
    let (held, _, _) = dead
        .create(u(2), ME, Ino::ROOT, b"held", 0o644, 0, rw)
        .unwrap();
    let (dropped, _, _) = dead
        .create(u(4), ME, Ino::ROOT, b"dropped", 0o644, 0, rw)
        .unwrap();
    dead.unlink(u(6), Ino::ROOT, b"held").unwrap();
    dead.unlink(u(8), Ino::ROOT, b"dropped").unwrap();
    // The kernel closed `dropped` and forgot it, but the dead client read that FORGET.
    dead.abandon();
    drop(dead);

    let next = vol.open(Some(sid), 2);
    next.take_over_after_crash().unwrap();
    let freed = next.sweep_orphans(&|ino| Ok(ino == held));
    assert_eq!(freed, 1);
    assert!(
        gone(&next, dropped),
        "the file the kernel forgot was not freed"
    );
    assert!(!gone(&next, held), "a file the kernel still has was freed");
    // A probe that fails frees nothing.
    let freed = next.sweep_orphans(&|_| Err(std::io::Error::from_raw_os_error(libc::EBADF)));
    assert_eq!(freed, 0);
    assert!(!gone(&next, held));
    next.forget(held, 1);
    assert!(gone(&next, held));
    next.shutdown().unwrap();
}
