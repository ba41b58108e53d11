//! The metadata conformance suite on the embedded redb engine, and redb specifics.

use std::sync::Arc;

use fsclient::meta::{self, Caller, FileKind, Ino, MetaEngine, NewNode, conformance};

fn engine(dir: &tempfile::TempDir, n: usize) -> Arc<dyn MetaEngine> {
    meta::open(&format!("redb://{}/meta-{n}.redb", dir.path().display())).expect("open redb")
}

#[test]
fn conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let mut n = 0;
    conformance::run(&mut || {
        n += 1;
        engine(&dir, n)
    });
}

#[test]
fn data_persists_across_reopen_and_two_handles_share_it() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redb://{}/vol/meta.redb", dir.path().display());
    let ino = {
        let m = meta::open(&url).unwrap();
        m.format(&fsclient_format(), false).unwrap();
        let node = NewNode {
            kind: FileKind::File,
            perm: 0o644,
            rdev: 0,
            target: vec![],
        };
        m.mknod(None, Ino::ROOT, b"kept", &node, Caller::ROOT)
            .unwrap()
            .0
    };
    let a = meta::open(&url).unwrap();
    assert_eq!(a.lookup(Ino::ROOT, b"kept").unwrap().0, ino);
    // A second handle on the same file (as during a live upgrade) sees the first's commits.
    let b = meta::open(&url).unwrap();
    let node = NewNode {
        kind: FileKind::Dir,
        perm: 0o755,
        rdev: 0,
        target: vec![],
    };
    let (d, _) = a
        .mknod(None, Ino::ROOT, b"from-a", &node, Caller::ROOT)
        .unwrap();
    assert_eq!(b.lookup(Ino::ROOT, b"from-a").unwrap().0, d);
    // Ids handed out by the two handles never collide.
    let (x, _) = b
        .mknod(None, Ino::ROOT, b"from-b", &node, Caller::ROOT)
        .unwrap();
    assert_ne!(x, d);
}

#[test]
fn bad_urls_are_clear_errors() {
    for url in [
        "redb://",
        "nosuch://x",
        "not a url",
        "redb:///proc/forbidden/meta.redb",
    ] {
        let err = meta::open(url).unwrap_err().to_string();
        assert!(!err.is_empty(), "{url}");
    }
}

fn fsclient_format() -> meta::Format {
    meta::Format {
        name: "vol".into(),
        uuid: "u".into(),
        storage: "fs:///tmp/x".into(),
        block_size: meta::Format::DEFAULT_BLOCK_SIZE,
        capacity: 0,
        inodes: 0,
        created: meta::Timestamp::now(),
    }
}
