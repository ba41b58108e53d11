//! The size the kernel is told (GETATTR, LOOKUP, READDIRPLUS) never falls below what
//! acknowledged writes made it, while a flush of the same file runs on another thread.
//!
//! Why it matters: Baton does not use the kernel's writeback cache, so the kernel takes the
//! size from these replies (it applies one sent after a write completed) and computes the
//! offset of every `O_APPEND` write from it. One reply that is too small makes the next
//! append overwrite the end of the file and every later read at the true end see EOF.
//! A flush commits buffered bytes to the metadata engine and then drops them from the
//! buffers; an attribute read that took the engine's size before the commit and looked at
//! the buffers after it saw the bytes in neither. A live upgrade's pre-flush (on the client's
//! control thread, while it serves) is such a flush: under load this lost an append on 2 of
//! 40 mounts of `csi-node/tests/rollout_scale_k8s.rs`.

#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use common::{ME, Volume};
use fsclient::meta::Ino;
use fsclient::vfs::Vfs;

/// Flushes the writer does while the readers look (each one commits a slice).
const FLUSHES: u64 = 400;
const RECORD: &[u8] = b"record 00000000\n";

#[test]
fn attributes_never_lose_acknowledged_bytes_to_a_concurrent_flush() {
    let vol = Volume::new("5f0c-attr-during-flush");
    let vfs = Vfs::open(vol.config(None), vol.rt.handle().clone()).unwrap();
    let (ino, _, fh) = vfs
        .create(
            None,
            ME,
            Ino::ROOT,
            b"held.log",
            0o644,
            0,
            libc::O_RDWR | libc::O_APPEND,
        )
        .unwrap();
    // Bytes whose write returned: every attribute read that starts later must see them.
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|kind| {
            let (vfs, acked, done) = (vfs.clone(), acked.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                let mut short = Vec::new();
                while !done.load(Ordering::Acquire) {
                    let want = acked.load(Ordering::Acquire);
                    let size = if kind == 0 {
                        vfs.getattr(ino).unwrap().size
                    } else {
                        vfs.lookup(Ino::ROOT, b"held.log").unwrap().1.size
                    };
                    reads += 1;
                    if size < want && short.len() < 5 {
                        short.push((size, want));
                    }
                }
                (reads, short)
            })
        })
        .collect();
    for _ in 0..FLUSHES {
        let end = acked.load(Ordering::Acquire);
        assert_eq!(
            vfs.write(ino, fh, end, RECORD).unwrap(),
            RECORD.len() as u32
        );
        acked.store(end + RECORD.len() as u64, Ordering::Release);
        // What a pre-flush does while the client serves.
        vfs.data().flush_all().unwrap();
    }
    done.store(true, Ordering::Release);
    for (kind, r) in readers.into_iter().enumerate() {
        let (reads, short) = r.join().unwrap();
        let what = if kind == 0 { "getattr" } else { "lookup" };
        assert!(reads > 0, "the {what} thread never ran");
        assert!(
            short.is_empty(),
            "{what} answered a size below the acknowledged writes (size, acknowledged): {short:?} ({reads} reads)"
        );
    }
    assert_eq!(
        vfs.getattr(ino).unwrap().size,
        FLUSHES * RECORD.len() as u64
    );
}
