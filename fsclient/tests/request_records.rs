//! Exactly once through the `Vfs`, as the FUSE adapter drives it: a client applies
//! mutations for kernel requests and "dies" (is dropped without answering); its successor
//! resumes the session and gets the same requests again with the resend bit: each answers
//! as the first execution did, and nothing is applied twice. Records are then dropped once
//! their uniques are old.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{ME, Volume};
use fsclient::meta::{Ino, RESEND_BIT};
use fsclient::vfs::{Unique, Vfs, VfsConfig};

impl Volume {
    fn open(&self, config: VfsConfig) -> Arc<Vfs> {
        Vfs::open(config, self.rt.handle().clone()).unwrap()
    }
}

fn sent(u: u64) -> Option<Unique> {
    Some(Unique(u))
}

fn resent(u: u64) -> Option<Unique> {
    Some(Unique(u | RESEND_BIT))
}

#[test]
fn a_successor_answers_resent_requests_its_predecessor_applied() {
    let vol = Volume::new("exactly-once-test");
    let dead = vol.open(vol.config(None));
    let sid = dead.session();
    // Applied and committed by the client that dies before answering.
    let (d, _) = dead.mkdir(sent(2), ME, Ino::ROOT, b"d", 0o755, 0).unwrap();
    let (f, _, _) = dead
        .create(
            sent(4),
            ME,
            Ino::ROOT,
            b"f",
            0o644,
            0,
            libc::O_RDWR | libc::O_EXCL,
        )
        .unwrap();
    dead.link(sent(6), f, d, b"f2").unwrap();
    dead.setxattr(sent(8), f, b"user.k", b"v", libc::XATTR_CREATE)
        .unwrap();
    dead.rename(sent(10), Ino::ROOT, b"f", Ino::ROOT, b"g", 0)
        .unwrap();
    let (s, _) = dead.symlink(sent(12), ME, Ino::ROOT, b"s", b"g").unwrap();
    dead.unlink(sent(14), Ino::ROOT, b"s").unwrap();
    let (e, _) = dead.mkdir(sent(16), ME, Ino::ROOT, b"e", 0o755, 0).unwrap();
    dead.rmdir(sent(18), Ino::ROOT, b"e").unwrap();
    dead.abandon();
    drop(dead);

    let next = vol.open(vol.config(Some(sid)));
    assert_eq!(
        next.mkdir(resent(2), ME, Ino::ROOT, b"d", 0o755, 0)
            .unwrap()
            .0,
        d
    );
    let (f_again, attr, fh) = next
        .create(
            resent(4),
            ME,
            Ino::ROOT,
            b"f",
            0o644,
            0,
            libc::O_RDWR | libc::O_EXCL,
        )
        .unwrap();
    assert_eq!(f_again, f);
    // Renamed since: the answer carries current attributes and a handle that works.
    assert_eq!(attr.nlink, 2);
    assert_eq!(next.write(f, fh, 0, b"hello").unwrap(), 5);
    next.flush(f, fh, 0).unwrap();
    assert_eq!(next.read(f, fh, 0, 16).unwrap(), b"hello");
    let (_, a) = next.link(resent(6), f, d, b"f2").unwrap();
    assert_eq!(a.nlink, 2);
    next.setxattr(resent(8), f, b"user.k", b"v", libc::XATTR_CREATE)
        .unwrap();
    next.rename(resent(10), Ino::ROOT, b"f", Ino::ROOT, b"g", 0)
        .unwrap();
    assert_eq!(
        next.symlink(resent(12), ME, Ino::ROOT, b"s", b"g")
            .unwrap()
            .0,
        s
    );
    next.unlink(resent(14), Ino::ROOT, b"s").unwrap();
    assert_eq!(
        next.mkdir(resent(16), ME, Ino::ROOT, b"e", 0o755, 0)
            .unwrap()
            .0,
        e
    );
    next.rmdir(resent(18), Ino::ROOT, b"e").unwrap();

    // Applied once each.
    assert_eq!(next.lookup(Ino::ROOT, b"g").unwrap().0, f);
    assert_eq!(next.getattr(f).unwrap().nlink, 2);
    assert_eq!(next.lookup(d, b"f2").unwrap().0, f);
    assert_eq!(next.getxattr(f, b"user.k").unwrap(), b"v");
    for gone in [&b"f"[..], b"s", b"e"] {
        assert_eq!(
            next.lookup(Ino::ROOT, gone).unwrap_err().errno(),
            libc::ENOENT
        );
    }
    assert_eq!(next.getattr(Ino::ROOT).unwrap().nlink, 3);
    next.release(f, fh, None).unwrap();
    next.shutdown().unwrap();
}

#[test]
fn records_are_dropped_once_their_uniques_are_old() {
    let vol = Volume::new("exactly-once-test");
    let mut config = vol.config(None);
    config.heartbeat = Duration::from_millis(50);
    config.request_retention = Duration::from_millis(200);
    let vfs = vol.open(config);
    let (d, _) = vfs.mkdir(sent(2), ME, Ino::ROOT, b"d", 0o755, 0).unwrap();
    // Other requests keep coming (uniques grow), as on a live mount.
    let mut unique = 4;
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        match vfs.mkdir(resent(2), ME, Ino::ROOT, b"d", 0o755, 0) {
            // Still recorded: answered from the record.
            Ok((ino, _)) => assert_eq!(ino, d),
            // Dropped: delivered again now, it is a new mkdir of an existing name.
            Err(e) => {
                assert_eq!(e.errno(), libc::EEXIST);
                break;
            }
        }
        assert!(
            Instant::now() < give_up,
            "the record of unique 2 was never dropped"
        );
        vfs.setxattr(sent(unique), d, b"user.tick", b"x", 0)
            .unwrap();
        unique += 2;
        std::thread::sleep(Duration::from_millis(20));
    }
    vfs.shutdown().unwrap();
}
