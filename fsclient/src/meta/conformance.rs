//! The conformance suite every metadata engine passes.
//!
//! [`run`] calls each case with a fresh, unformatted engine from the caller's factory. The
//! cases assert the POSIX outcomes a user sees (errno, link counts, what readdir lists),
//! not how an engine stores them. Engine test files (`tests/meta_redb.rs`,
//! `tests/meta_redis.rs`) only provide the factory.
//!
//! This module is part of the library (not `#[cfg(test)]`) so that integration tests of
//! each engine can share it; it panics on failure like any test code.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use super::*;

type Engine = Arc<dyn MetaEngine>;
type Case = fn(&Engine);

/// Every case, by name.
pub fn cases() -> Vec<(&'static str, Case)> {
    vec![
        ("format", format),
        ("create_lookup_getattr", create_lookup_getattr),
        ("mkdir_rmdir_nlink", mkdir_rmdir_nlink),
        ("names", names),
        ("symlink", symlink),
        ("hard_links", hard_links),
        ("unlink_open_file", unlink_open_file),
        ("rename_basic", rename_basic),
        ("rename_replace", rename_replace),
        ("rename_dirs", rename_dirs),
        ("rename_flags", rename_flags),
        ("readdir_cookies", readdir_cookies),
        ("setattr", setattr),
        ("setgid_dir", setgid_dir),
        ("xattrs", xattrs),
        ("layout_and_truncate", layout_and_truncate),
        ("fallocate", fallocate),
        ("locks", locks),
        ("sessions", sessions),
        ("resume_session", resume_session),
        ("quota", quota),
        ("concurrent_creates", concurrent_creates),
        ("concurrent_renames", concurrent_renames),
        ("exactly_once", exactly_once),
        (
            "exactly_once_rename_unlink_rmdir",
            exactly_once_rename_unlink_rmdir,
        ),
        ("request_records_are_dropped", request_records_are_dropped),
    ]
}

/// Runs every case, each on a fresh engine from `new_engine`.
pub fn run(new_engine: &mut dyn FnMut() -> Engine) {
    for (name, case) in cases() {
        eprintln!("conformance: {name}");
        let engine = new_engine();
        case(&engine);
    }
}

const ME: Caller = Caller {
    uid: 1000,
    gid: 1000,
    pid: 42,
};

fn fmt(name: &str) -> Format {
    Format {
        name: name.to_string(),
        uuid: format!("uuid-{name}"),
        storage: "fs:///tmp/none".into(),
        block_size: Format::DEFAULT_BLOCK_SIZE,
        capacity: 0,
        inodes: 0,
        created: Timestamp::now(),
    }
}

fn formatted(m: &Engine) -> SessionId {
    m.format(&fmt("vol"), false).unwrap();
    m.new_session(&session_info()).unwrap()
}

fn session_info() -> SessionInfo {
    SessionInfo {
        host: "host".into(),
        mountpoint: "/mnt".into(),
        pid: 1,
        version: "test".into(),
        heartbeat: Timestamp::now(),
    }
}

fn node(kind: FileKind, perm: u16) -> NewNode {
    NewNode {
        kind,
        perm,
        rdev: 0,
        target: Vec::new(),
    }
}

fn file(m: &Engine, parent: Ino, name: &str) -> Ino {
    m.mknod(
        None,
        parent,
        name.as_bytes(),
        &node(FileKind::File, 0o644),
        ME,
    )
    .unwrap()
    .0
}

fn dir(m: &Engine, parent: Ino, name: &str) -> Ino {
    m.mknod(
        None,
        parent,
        name.as_bytes(),
        &node(FileKind::Dir, 0o755),
        ME,
    )
    .unwrap()
    .0
}

fn names_in(m: &Engine, d: Ino) -> Vec<String> {
    let mut v: Vec<String> = m
        .readdir(d, 0, usize::MAX, false)
        .unwrap()
        .into_iter()
        .map(|e| String::from_utf8(e.name).unwrap())
        .collect();
    v.sort();
    v
}

fn never_open(_: Ino) -> bool {
    false
}

fn always_open(_: Ino) -> bool {
    true
}

macro_rules! assert_err {
    ($e:expr, $pat:pat) => {
        match $e {
            Err($pat) => {}
            other => panic!("expected {}, got {:?}", stringify!($pat), other),
        }
    };
}

fn format(m: &Engine) {
    assert_err!(m.load_format(), MetaError::NotFormatted);
    let f = fmt("one");
    m.format(&f, false).unwrap();
    assert_eq!(m.load_format().unwrap(), f);
    assert_err!(
        m.format(&fmt("two"), false),
        MetaError::AlreadyFormatted { .. }
    );
    // --force updates settings but keeps identity.
    let mut g = fmt("two");
    g.capacity = 1 << 30;
    m.format(&g, true).unwrap();
    let h = m.load_format().unwrap();
    assert_eq!(h.name, "two");
    assert_eq!(h.capacity, 1 << 30);
    assert_eq!(h.uuid, f.uuid);
    let root = m.getattr(Ino::ROOT).unwrap();
    assert_eq!(root.kind, FileKind::Dir);
    assert_eq!(root.nlink, 2);
    assert_eq!(m.lookup(Ino::ROOT, b"..").unwrap().0, Ino::ROOT);
    assert_eq!(m.usage().unwrap().used_inodes, 1);
}

fn create_lookup_getattr(m: &Engine) {
    formatted(m);
    let (ino, attr) = m
        .mknod(None, Ino::ROOT, b"a", &node(FileKind::File, 0o640), ME)
        .unwrap();
    assert!(ino.0 > 1 && ino.0 <= Ino::MAX);
    assert_eq!(attr.kind, FileKind::File);
    assert_eq!(attr.perm, 0o640);
    assert_eq!(
        (attr.uid, attr.gid, attr.nlink, attr.size),
        (1000, 1000, 1, 0)
    );
    let (ino2, attr2) = m.lookup(Ino::ROOT, b"a").unwrap();
    assert_eq!(ino2, ino);
    assert_eq!(attr2, attr);
    assert_eq!(m.getattr(ino).unwrap(), attr);
    assert_err!(
        m.mknod(None, Ino::ROOT, b"a", &node(FileKind::File, 0o644), ME),
        MetaError::Exists
    );
    assert_err!(m.lookup(Ino::ROOT, b"missing"), MetaError::NotFound);
    assert_err!(m.lookup(ino, b"x"), MetaError::NotDir);
    assert_err!(
        m.mknod(None, ino, b"x", &node(FileKind::File, 0o644), ME),
        MetaError::NotDir
    );
    assert_err!(m.getattr(Ino(999_999)), MetaError::NotFound);
    // Inode numbers are unique and stable.
    let b = file(m, Ino::ROOT, "b");
    assert_ne!(b, ino);
    assert_eq!(m.lookup(Ino::ROOT, b"b").unwrap().0, b);
    // Special files.
    let (_, fifo) = m
        .mknod(None, Ino::ROOT, b"fifo", &node(FileKind::Fifo, 0o600), ME)
        .unwrap();
    assert_eq!(fifo.kind, FileKind::Fifo);
    let dev = NewNode {
        kind: FileKind::CharDev,
        perm: 0o600,
        rdev: 0x0103,
        target: Vec::new(),
    };
    let (_, c) = m.mknod(None, Ino::ROOT, b"null", &dev, ME).unwrap();
    assert_eq!(c.rdev, 0x0103);
    // The parent's mtime moved.
    assert!(m.getattr(Ino::ROOT).unwrap().mtime >= attr.mtime);
    assert_eq!(m.usage().unwrap().used_inodes, 5);
}

fn mkdir_rmdir_nlink(m: &Engine) {
    let sid = formatted(m);
    let d = dir(m, Ino::ROOT, "d");
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 3);
    assert_eq!(m.getattr(d).unwrap().nlink, 2);
    assert_eq!(m.lookup(d, b"..").unwrap().0, Ino::ROOT);
    assert_eq!(m.lookup(d, b".").unwrap().0, d);
    let sub = dir(m, d, "sub");
    assert_eq!(m.getattr(d).unwrap().nlink, 3);
    file(m, d, "f");
    assert_err!(m.rmdir(None, Ino::ROOT, b"d"), MetaError::NotEmpty);
    assert_err!(m.rmdir(None, d, b"f"), MetaError::NotDir);
    assert_err!(
        m.unlink(None, sid, Ino::ROOT, b"d", &never_open),
        MetaError::IsDir
    );
    m.unlink(None, sid, d, b"f", &never_open).unwrap();
    let r = m.rmdir(None, d, b"sub").unwrap();
    assert_eq!(
        r,
        Removed {
            ino: sub,
            kept: false
        }
    );
    assert_err!(m.getattr(sub), MetaError::NotFound);
    assert_eq!(m.getattr(d).unwrap().nlink, 2);
    m.rmdir(None, Ino::ROOT, b"d").unwrap();
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 2);
    assert_err!(m.rmdir(None, Ino::ROOT, b"d"), MetaError::NotFound);
    assert_eq!(m.usage().unwrap().used_inodes, 1);
}

fn names(m: &Engine) {
    formatted(m);
    let long = vec![b'x'; NAME_MAX + 1];
    assert_err!(
        m.mknod(None, Ino::ROOT, &long, &node(FileKind::File, 0o644), ME),
        MetaError::NameTooLong
    );
    assert_err!(m.lookup(Ino::ROOT, &long), MetaError::NameTooLong);
    let max = vec![b'y'; NAME_MAX];
    m.mknod(None, Ino::ROOT, &max, &node(FileKind::File, 0o644), ME)
        .unwrap();
    // Names are bytes, not UTF-8.
    let odd = [0xff, 0xfe, b'a', 0x80];
    let (ino, _) = m
        .mknod(None, Ino::ROOT, &odd, &node(FileKind::File, 0o644), ME)
        .unwrap();
    assert_eq!(m.lookup(Ino::ROOT, &odd).unwrap().0, ino);
    let listed = m.readdir(Ino::ROOT, 0, 100, false).unwrap();
    assert!(listed.iter().any(|e| e.name == odd));
    assert_err!(
        m.mknod(None, Ino::ROOT, b"a/b", &node(FileKind::File, 0o644), ME),
        MetaError::Invalid
    );
}

fn symlink(m: &Engine) {
    formatted(m);
    let target = b"../some/where".to_vec();
    let n = NewNode {
        kind: FileKind::Symlink,
        perm: 0o777,
        rdev: 0,
        target: target.clone(),
    };
    let (ino, attr) = m.mknod(None, Ino::ROOT, b"l", &n, ME).unwrap();
    assert_eq!(attr.kind, FileKind::Symlink);
    assert_eq!(attr.size, target.len() as u64);
    assert_eq!(m.readlink(ino).unwrap(), target);
    let f = file(m, Ino::ROOT, "f");
    assert_err!(m.readlink(f), MetaError::Invalid);
    let long = NewNode {
        target: vec![b'a'; SYMLINK_MAX + 1],
        ..n
    };
    assert_err!(
        m.mknod(None, Ino::ROOT, b"l2", &long, ME),
        MetaError::NameTooLong
    );
}

fn hard_links(m: &Engine) {
    let sid = formatted(m);
    let f = file(m, Ino::ROOT, "f");
    let d = dir(m, Ino::ROOT, "d");
    let a = m.link(None, f, d, b"g").unwrap();
    assert_eq!(a.nlink, 2);
    assert_eq!(m.lookup(d, b"g").unwrap().0, f);
    assert_err!(m.link(None, f, d, b"g"), MetaError::Exists);
    assert_err!(
        m.link(None, d, Ino::ROOT, b"dlink"),
        MetaError::NotPermitted
    );
    let r = m.unlink(None, sid, Ino::ROOT, b"f", &never_open).unwrap();
    assert_eq!(r, Removed { ino: f, kept: true });
    assert_eq!(m.getattr(f).unwrap().nlink, 1);
    let r = m.unlink(None, sid, d, b"g", &never_open).unwrap();
    assert_eq!(
        r,
        Removed {
            ino: f,
            kept: false
        }
    );
    assert_err!(m.getattr(f), MetaError::NotFound);
}

fn unlink_open_file(m: &Engine) {
    let sid = formatted(m);
    let f = file(m, Ino::ROOT, "f");
    m.write_slice(
        f,
        0,
        Slice {
            pos: 0,
            id: m.new_slice_id().unwrap(),
            size: 10,
            off: 0,
            len: 10,
        },
        Timestamp::now(),
    )
    .unwrap();
    let r = m.unlink(None, sid, Ino::ROOT, b"f", &always_open).unwrap();
    assert_eq!(r, Removed { ino: f, kept: true });
    assert_err!(m.lookup(Ino::ROOT, b"f"), MetaError::NotFound);
    // Still readable through the open handle.
    let a = m.getattr(f).unwrap();
    assert_eq!((a.nlink, a.size), (0, 10));
    assert_eq!(m.read_chunk(f, 0).unwrap().len(), 1);
    assert!(m.dead_slices(Timestamp(i64::MAX), 10).unwrap().is_empty());
    // Last close frees it and its data.
    m.release_unlinked(sid, f).unwrap();
    assert_err!(m.getattr(f), MetaError::NotFound);
    assert_eq!(m.dead_slices(Timestamp(i64::MAX), 10).unwrap().len(), 1);
    // A session that ends (or dies) frees what it kept.
    let g = file(m, Ino::ROOT, "g");
    m.unlink(None, sid, Ino::ROOT, b"g", &always_open).unwrap();
    m.close_session(sid).unwrap();
    assert_err!(m.getattr(g), MetaError::NotFound);
}

fn rename_basic(m: &Engine) {
    let sid = formatted(m);
    let f = file(m, Ino::ROOT, "a");
    let d = dir(m, Ino::ROOT, "d");
    assert_eq!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"a",
            Ino::ROOT,
            b"b",
            RenameFlags::default(),
            &never_open
        )
        .unwrap(),
        None
    );
    assert_err!(m.lookup(Ino::ROOT, b"a"), MetaError::NotFound);
    assert_eq!(m.lookup(Ino::ROOT, b"b").unwrap().0, f);
    m.rename(
        None,
        sid,
        Ino::ROOT,
        b"b",
        d,
        b"c",
        RenameFlags::default(),
        &never_open,
    )
    .unwrap();
    assert_eq!(m.lookup(d, b"c").unwrap().0, f);
    assert_eq!(names_in(m, Ino::ROOT), vec!["d"]);
    assert_err!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"nope",
            d,
            b"x",
            RenameFlags::default(),
            &never_open
        ),
        MetaError::NotFound
    );
    // Renaming onto itself is a no-op.
    m.rename(
        None,
        sid,
        d,
        b"c",
        d,
        b"c",
        RenameFlags::default(),
        &never_open,
    )
    .unwrap();
    assert_eq!(m.lookup(d, b"c").unwrap().0, f);
}

fn rename_replace(m: &Engine) {
    let sid = formatted(m);
    let a = file(m, Ino::ROOT, "a");
    let b = file(m, Ino::ROOT, "b");
    let r = m
        .rename(
            None,
            sid,
            Ino::ROOT,
            b"a",
            Ino::ROOT,
            b"b",
            RenameFlags::default(),
            &never_open,
        )
        .unwrap();
    assert_eq!(
        r,
        Some(Removed {
            ino: b,
            kept: false
        })
    );
    assert_eq!(m.lookup(Ino::ROOT, b"b").unwrap().0, a);
    assert_err!(m.getattr(b), MetaError::NotFound);
    // Replacing an open file keeps it until its last close.
    let c = file(m, Ino::ROOT, "c");
    let r = m
        .rename(
            None,
            sid,
            Ino::ROOT,
            b"b",
            Ino::ROOT,
            b"c",
            RenameFlags::default(),
            &always_open,
        )
        .unwrap();
    assert_eq!(r, Some(Removed { ino: c, kept: true }));
    assert_eq!(m.getattr(c).unwrap().nlink, 0);
    // Two links to one inode: rename of one onto the other does nothing.
    m.link(None, a, Ino::ROOT, b"a2").unwrap();
    m.rename(
        None,
        sid,
        Ino::ROOT,
        b"c",
        Ino::ROOT,
        b"a2",
        RenameFlags::default(),
        &never_open,
    )
    .unwrap();
    assert_eq!(m.lookup(Ino::ROOT, b"c").unwrap().0, a);
    assert_eq!(m.lookup(Ino::ROOT, b"a2").unwrap().0, a);
    assert_eq!(m.getattr(a).unwrap().nlink, 2);
    // File onto dir and dir onto file.
    dir(m, Ino::ROOT, "d");
    assert_err!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"c",
            Ino::ROOT,
            b"d",
            RenameFlags::default(),
            &never_open
        ),
        MetaError::IsDir
    );
    assert_err!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"d",
            Ino::ROOT,
            b"c",
            RenameFlags::default(),
            &never_open
        ),
        MetaError::NotDir
    );
}

fn rename_dirs(m: &Engine) {
    let sid = formatted(m);
    let a = dir(m, Ino::ROOT, "a");
    let b = dir(m, Ino::ROOT, "b");
    let sub = dir(m, a, "sub");
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 4);
    m.rename(
        None,
        sid,
        a,
        b"sub",
        b,
        b"sub",
        RenameFlags::default(),
        &never_open,
    )
    .unwrap();
    assert_eq!(m.getattr(a).unwrap().nlink, 2);
    assert_eq!(m.getattr(b).unwrap().nlink, 3);
    assert_eq!(m.lookup(sub, b"..").unwrap().0, b);
    // No moving a directory below itself.
    let deep = dir(m, sub, "deep");
    assert_err!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"b",
            deep,
            b"x",
            RenameFlags::default(),
            &never_open
        ),
        MetaError::Invalid
    );
    assert_err!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"b",
            b,
            b"x",
            RenameFlags::default(),
            &never_open
        ),
        MetaError::Invalid
    );
    // Replace an empty directory; refuse a non-empty one.
    let e = dir(m, Ino::ROOT, "empty");
    let r = m
        .rename(
            None,
            sid,
            Ino::ROOT,
            b"a",
            Ino::ROOT,
            b"empty",
            RenameFlags::default(),
            &never_open,
        )
        .unwrap();
    assert_eq!(
        r,
        Some(Removed {
            ino: e,
            kept: false
        })
    );
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 4);
    assert_err!(
        m.rename(
            None,
            sid,
            Ino::ROOT,
            b"empty",
            Ino::ROOT,
            b"b",
            RenameFlags::default(),
            &never_open
        ),
        MetaError::NotEmpty
    );
    // Replace an empty directory in another parent: link counts stay right.
    let e2 = dir(m, deep, "e2");
    let _ = e2;
    m.rename(
        None,
        sid,
        Ino::ROOT,
        b"empty",
        deep,
        b"e2",
        RenameFlags::default(),
        &never_open,
    )
    .unwrap();
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 3);
    assert_eq!(m.getattr(deep).unwrap().nlink, 3);
    assert_eq!(m.lookup(a, b"..").unwrap().0, deep);
}

fn rename_flags(m: &Engine) {
    let sid = formatted(m);
    let a = file(m, Ino::ROOT, "a");
    let d = dir(m, Ino::ROOT, "d");
    let b = file(m, d, "b");
    let noreplace = RenameFlags {
        noreplace: true,
        exchange: false,
    };
    let exchange = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    assert_err!(
        m.rename(None, sid, Ino::ROOT, b"a", d, b"b", noreplace, &never_open),
        MetaError::Exists
    );
    m.rename(None, sid, Ino::ROOT, b"a", d, b"c", noreplace, &never_open)
        .unwrap();
    assert_err!(
        m.rename(None, sid, d, b"c", Ino::ROOT, b"zz", exchange, &never_open),
        MetaError::NotFound
    );
    m.rename(None, sid, d, b"c", d, b"b", exchange, &never_open)
        .unwrap();
    assert_eq!(m.lookup(d, b"c").unwrap().0, b);
    assert_eq!(m.lookup(d, b"b").unwrap().0, a);
    // Exchange a file and a directory across parents.
    let e = dir(m, Ino::ROOT, "e");
    let inner = dir(m, e, "inner");
    m.rename(None, sid, d, b"b", e, b"inner", exchange, &never_open)
        .unwrap();
    assert_eq!(m.lookup(d, b"b").unwrap().0, inner);
    assert_eq!(m.lookup(e, b"inner").unwrap().0, a);
    assert_eq!(m.lookup(inner, b"..").unwrap().0, d);
    assert_eq!(m.getattr(d).unwrap().nlink, 3);
    assert_eq!(m.getattr(e).unwrap().nlink, 2);
    assert_err!(
        m.rename(
            None,
            sid,
            d,
            b"b",
            e,
            b"x",
            RenameFlags {
                noreplace: true,
                exchange: true
            },
            &never_open
        ),
        MetaError::Invalid
    );
}

fn readdir_cookies(m: &Engine) {
    let sid = formatted(m);
    let d = dir(m, Ino::ROOT, "d");
    for i in 0..100 {
        file(m, d, &format!("f{i:03}"));
    }
    // Page through with small limits; cookies are increasing and resumable.
    let mut seen = Vec::new();
    let mut cookie = 0;
    loop {
        let page = m.readdir(d, cookie, 7, false).unwrap();
        if page.is_empty() {
            break;
        }
        for e in &page {
            assert!(e.cookie > cookie);
            cookie = e.cookie;
            seen.push(e.clone());
        }
    }
    assert_eq!(seen.len(), 100);
    // Removing entries does not shift the others: resuming from an old cookie sees the
    // entries after it, as before.
    let mid = seen[49].cookie;
    for e in &seen[..50] {
        m.unlink(None, sid, d, &e.name, &never_open).unwrap();
    }
    let rest = m.readdir(d, mid, usize::MAX, false).unwrap();
    assert_eq!(rest, seen[50..].to_vec());
    // New entries come after existing ones; plus carries attributes.
    file(m, d, "new");
    let plus = m.readdir(d, mid, usize::MAX, true).unwrap();
    assert_eq!(plus.len(), 51);
    let last = plus.last().unwrap();
    assert_eq!(last.name, b"new");
    assert_eq!(last.attr.as_ref().unwrap().kind, FileKind::File);
    assert_err!(m.readdir(last.ino, 0, 10, false), MetaError::NotDir);
}

fn setattr(m: &Engine) {
    formatted(m);
    let (f, a0) = m
        .mknod(None, Ino::ROOT, b"f", &node(FileKind::File, 0o6755), ME)
        .unwrap();
    assert_eq!(a0.perm, 0o6755);
    let now = Timestamp::now();
    let a = m
        .setattr(
            None,
            f,
            &SetAttr {
                mode: Some(0o100600),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(a.perm, 0o600);
    assert_eq!(a.ctime, now);
    m.setattr(
        None,
        f,
        &SetAttr {
            mode: Some(0o6755),
            ..Default::default()
        },
        now,
    )
    .unwrap();
    // chown clears set-uid and (group-executable) set-gid.
    let a = m
        .setattr(
            None,
            f,
            &SetAttr {
                uid: Some(0),
                gid: Some(0),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!((a.uid, a.gid, a.perm), (0, 0, 0o755));
    let t = Timestamp(1_000_000_123);
    let a = m
        .setattr(
            None,
            f,
            &SetAttr {
                atime: Some(TimeSet::At(t)),
                mtime: Some(TimeSet::At(t)),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!((a.atime, a.mtime), (t, t));
    let a = m
        .setattr(
            None,
            f,
            &SetAttr {
                mtime: Some(TimeSet::Now),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(a.mtime, now);
    assert_eq!(m.getattr(f).unwrap(), a);
    let a = m
        .setattr(
            None,
            f,
            &SetAttr {
                size: Some(12345),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(a.size, 12345);
    assert_err!(
        m.setattr(
            None,
            Ino::ROOT,
            &SetAttr {
                size: Some(1),
                ..Default::default()
            },
            now
        ),
        MetaError::IsDir
    );
    assert_err!(
        m.setattr(None, Ino(424242), &SetAttr::default(), now),
        MetaError::NotFound
    );
}

fn setgid_dir(m: &Engine) {
    formatted(m);
    let (d, _) = m
        .mknod(
            None,
            Ino::ROOT,
            b"d",
            &node(FileKind::Dir, 0o2775),
            Caller {
                uid: 5,
                gid: 77,
                pid: 1,
            },
        )
        .unwrap();
    let (_, f) = m
        .mknod(None, d, b"f", &node(FileKind::File, 0o644), ME)
        .unwrap();
    assert_eq!(f.gid, 77);
    let (_, sub) = m
        .mknod(None, d, b"sub", &node(FileKind::Dir, 0o755), ME)
        .unwrap();
    assert_eq!(sub.gid, 77);
    assert_eq!(sub.perm & 0o2000, 0o2000);
}

fn xattrs(m: &Engine) {
    formatted(m);
    let f = file(m, Ino::ROOT, "f");
    assert_err!(m.getxattr(f, b"user.a"), MetaError::NoXattr);
    m.setxattr(None, f, b"user.a", b"1", XattrMode::Any)
        .unwrap();
    m.setxattr(None, f, b"user.b", &[0, 255, 7], XattrMode::Create)
        .unwrap();
    assert_err!(
        m.setxattr(None, f, b"user.b", b"x", XattrMode::Create),
        MetaError::Exists
    );
    assert_err!(
        m.setxattr(None, f, b"user.c", b"x", XattrMode::Replace),
        MetaError::NoXattr
    );
    m.setxattr(None, f, b"user.a", b"22", XattrMode::Replace)
        .unwrap();
    assert_eq!(m.getxattr(f, b"user.a").unwrap(), b"22");
    assert_eq!(m.getxattr(f, b"user.b").unwrap(), vec![0, 255, 7]);
    m.setxattr(None, f, b"user.empty", b"", XattrMode::Any)
        .unwrap();
    assert_eq!(m.getxattr(f, b"user.empty").unwrap(), b"");
    let mut names = m.listxattr(f).unwrap();
    names.sort();
    assert_eq!(
        names,
        vec![
            b"user.a".to_vec(),
            b"user.b".to_vec(),
            b"user.empty".to_vec()
        ]
    );
    m.removexattr(None, f, b"user.a").unwrap();
    assert_err!(m.removexattr(None, f, b"user.a"), MetaError::NoXattr);
    assert_eq!(m.listxattr(f).unwrap().len(), 2);
    assert_err!(
        m.setxattr(None, f, b"user.big", &vec![0; 65537], XattrMode::Any),
        MetaError::NoSpace
    );
    // Directories have xattrs too; they go with the inode.
    let d = dir(m, Ino::ROOT, "d");
    m.setxattr(None, d, b"user.x", b"y", XattrMode::Any)
        .unwrap();
    m.rmdir(None, Ino::ROOT, b"d").unwrap();
    assert_err!(m.getxattr(d, b"user.x"), MetaError::NotFound);
}

fn layout_and_truncate(m: &Engine) {
    formatted(m);
    let f = file(m, Ino::ROOT, "f");
    let s1 = Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: 4096,
        off: 0,
        len: 4096,
    };
    let a = m.write_slice(f, 0, s1, Timestamp(7)).unwrap();
    assert_eq!((a.size, a.mtime), (4096, Timestamp(7)));
    let s2 = Slice {
        pos: 100,
        id: m.new_slice_id().unwrap(),
        size: 50,
        off: 0,
        len: 50,
    };
    assert_ne!(s1.id, s2.id);
    let a = m.write_slice(f, 0, s2, Timestamp(8)).unwrap();
    assert_eq!(a.size, 4096);
    assert_eq!(m.read_chunk(f, 0).unwrap(), vec![s1, s2]);
    // A slice in chunk 2 extends the size across a gap.
    let s3 = Slice {
        pos: 10,
        id: m.new_slice_id().unwrap(),
        size: 5,
        off: 0,
        len: 5,
    };
    let a = m.write_slice(f, 2, s3, Timestamp(9)).unwrap();
    assert_eq!(a.size, 2 * CHUNK_SIZE + 15);
    assert!(m.read_chunk(f, 1).unwrap().is_empty());
    assert_err!(
        m.write_slice(
            f,
            0,
            Slice {
                pos: (CHUNK_SIZE - 1) as u32,
                id: 9,
                size: 2,
                off: 0,
                len: 2
            },
            Timestamp(1)
        ),
        MetaError::Invalid
    );
    // Shrinking drops chunk 2 (its slice becomes dead) and hides the tail of chunk 0.
    let now = Timestamp::now();
    let a = m
        .setattr(
            None,
            f,
            &SetAttr {
                size: Some(1000),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(a.size, 1000);
    assert!(m.read_chunk(f, 2).unwrap().is_empty());
    let c0 = m.read_chunk(f, 0).unwrap();
    let hole = c0.last().unwrap();
    assert_eq!((hole.id, hole.pos), (0, 1000));
    assert!(u64::from(hole.pos + hole.len) >= 4096);
    let dead = m.dead_slices(Timestamp(i64::MAX), 10).unwrap();
    assert_eq!(dead.iter().map(|d| d.id).collect::<Vec<_>>(), vec![s3.id]);
    assert!(m.dead_slices(Timestamp(0), 10).unwrap().is_empty());
    m.forget_dead_slices(&[s3.id]).unwrap();
    assert!(m.dead_slices(Timestamp(i64::MAX), 10).unwrap().is_empty());
    // Truncate to zero drops everything; usage follows the size.
    m.setattr(
        None,
        f,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
        now,
    )
    .unwrap();
    assert!(m.read_chunk(f, 0).unwrap().is_empty());
    assert_eq!(m.dead_slices(Timestamp(i64::MAX), 10).unwrap().len(), 2);
    let before = m.usage().unwrap().used_bytes;
    m.setattr(
        None,
        f,
        &SetAttr {
            size: Some(8192),
            ..Default::default()
        },
        now,
    )
    .unwrap();
    assert_eq!(m.usage().unwrap().used_bytes, before + 8192);
    assert_err!(
        m.setattr(
            None,
            f,
            &SetAttr {
                size: Some(MAX_FILE_SIZE + 1),
                ..Default::default()
            },
            now
        ),
        MetaError::FileTooBig
    );
}

fn fallocate(m: &Engine) {
    formatted(m);
    let f = file(m, Ino::ROOT, "f");
    let now = Timestamp::now();
    let a = m
        .fallocate(
            None,
            f,
            Fallocate::Allocate { keep_size: false },
            0,
            10_000,
            now,
        )
        .unwrap();
    assert_eq!(a.size, 10_000);
    let a = m
        .fallocate(
            None,
            f,
            Fallocate::Allocate { keep_size: true },
            0,
            20_000,
            now,
        )
        .unwrap();
    assert_eq!(a.size, 10_000);
    let s = Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: 10_000,
        off: 0,
        len: 10_000,
    };
    m.write_slice(f, 0, s, now).unwrap();
    let a = m
        .fallocate(None, f, Fallocate::PunchHole, 100, 200, now)
        .unwrap();
    assert_eq!(a.size, 10_000);
    let c = m.read_chunk(f, 0).unwrap();
    assert_eq!(
        c.last().unwrap(),
        &Slice {
            pos: 100,
            id: 0,
            size: 0,
            off: 0,
            len: 200
        }
    );
    let a = m
        .fallocate(
            None,
            f,
            Fallocate::ZeroRange { keep_size: false },
            9_000,
            2_000,
            now,
        )
        .unwrap();
    assert_eq!(a.size, 11_000);
    assert_err!(
        m.fallocate(
            None,
            Ino::ROOT,
            Fallocate::Allocate { keep_size: false },
            0,
            1,
            now
        ),
        MetaError::IsDir
    );
    assert_err!(
        m.fallocate(None, f, Fallocate::Allocate { keep_size: false }, 0, 0, now),
        MetaError::Invalid
    );
}

fn locks(m: &Engine) {
    let s1 = formatted(m);
    let s2 = m.new_session(&session_info()).unwrap();
    let f = file(m, Ino::ROOT, "f");
    let a = LockOwner { sid: s1, owner: 1 };
    let b = LockOwner { sid: s2, owner: 1 };
    let lk = |owner, typ, start, end| LockRequest {
        owner,
        typ,
        start,
        end,
        pid: 9,
    };
    m.setlk(f, &lk(a, Some(LockType::Write), 0, 99)).unwrap();
    assert_err!(
        m.setlk(f, &lk(b, Some(LockType::Read), 50, 60)),
        MetaError::WouldBlock
    );
    let held = m
        .getlk(f, &lk(b, Some(LockType::Read), 50, 60))
        .unwrap()
        .unwrap();
    assert_eq!(
        (held.owner, held.start, held.end, held.typ, held.pid),
        (a, 0, 99, LockType::Write, 9)
    );
    m.setlk(f, &lk(b, Some(LockType::Write), 100, u64::MAX))
        .unwrap();
    assert!(
        m.getlk(f, &lk(b, Some(LockType::Write), 200, 300))
            .unwrap()
            .is_none()
    );
    // Downgrade to a read lock: shared readers can join.
    m.setlk(f, &lk(a, Some(LockType::Read), 0, 99)).unwrap();
    m.setlk(f, &lk(b, Some(LockType::Read), 0, 99)).unwrap();
    assert_err!(
        m.setlk(f, &lk(b, Some(LockType::Write), 0, 99)),
        MetaError::WouldBlock
    );
    // Partial unlock, then release everything of an owner.
    m.setlk(f, &lk(a, None, 0, 49)).unwrap();
    assert!(
        m.getlk(
            f,
            &lk(
                LockOwner { sid: s2, owner: 2 },
                Some(LockType::Write),
                0,
                49
            )
        )
        .unwrap()
        .is_some()
    );
    m.release_locks(f, b).unwrap();
    assert!(
        m.getlk(f, &lk(b, Some(LockType::Write), 0, 49))
            .unwrap()
            .is_none()
    );
    assert_err!(
        m.setlk(f, &lk(b, Some(LockType::Write), 60, 70)),
        MetaError::WouldBlock
    );
    // A session that ends drops its locks.
    m.close_session(s1).unwrap();
    m.setlk(f, &lk(b, Some(LockType::Write), 0, u64::MAX))
        .unwrap();
    assert_err!(
        m.setlk(f, &lk(b, Some(LockType::Write), 10, 5)),
        MetaError::Invalid
    );
}

fn sessions(m: &Engine) {
    let s1 = formatted(m);
    let s2 = m.new_session(&session_info()).unwrap();
    assert_ne!(s1, s2);
    let listed: Vec<SessionId> = m
        .list_sessions()
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert!(listed.contains(&s1) && listed.contains(&s2));
    let later = Timestamp(Timestamp::now().0 + 60_000_000_000);
    m.heartbeat(s2, later).unwrap();
    // s1's heartbeat is older than the deadline: another client cleans it up, with its
    // locks and kept inodes.
    let f = file(m, Ino::ROOT, "f");
    let owner = LockOwner { sid: s1, owner: 5 };
    m.setlk(
        f,
        &LockRequest {
            owner,
            typ: Some(LockType::Write),
            start: 0,
            end: u64::MAX,
            pid: 1,
        },
    )
    .unwrap();
    m.unlink(None, s1, Ino::ROOT, b"f", &always_open).unwrap();
    let cleaned = m.clean_stale_sessions(Timestamp(later.0 - 1)).unwrap();
    assert_eq!(cleaned, vec![s1]);
    assert_err!(m.getattr(f), MetaError::NotFound);
    assert_err!(m.heartbeat(s1, later), MetaError::NotFound);
    assert_eq!(m.list_sessions().unwrap().len(), 1);
    m.close_session(s2).unwrap();
    assert!(m.list_sessions().unwrap().is_empty());
}

fn resume_session(m: &Engine) {
    let sid = formatted(m);
    let other = m.new_session(&session_info()).unwrap();
    // The session holds a lock and keeps an unlinked file.
    let f = file(m, Ino::ROOT, "locked");
    let kept = file(m, Ino::ROOT, "kept");
    let mine = LockOwner { sid, owner: 7 };
    m.setlk(
        f,
        &LockRequest {
            owner: mine,
            typ: Some(LockType::Write),
            start: 0,
            end: u64::MAX,
            pid: 1,
        },
    )
    .unwrap();
    m.unlink(None, sid, Ino::ROOT, b"kept", &always_open)
        .unwrap();

    // A successor process takes it over: new pid, version and heartbeat.
    let successor = SessionInfo {
        pid: 2,
        version: "next".into(),
        heartbeat: Timestamp(Timestamp::now().0 + 1),
        ..session_info()
    };
    m.resume_session(sid, &successor).unwrap();
    let listed = m.list_sessions().unwrap();
    let (_, info) = listed.iter().find(|(s, _)| *s == sid).unwrap();
    assert_eq!(info, &successor);
    assert_eq!(listed.len(), 2, "resuming adds no session");

    // What the session held is still held, under the same id.
    let theirs = LockOwner {
        sid: other,
        owner: 7,
    };
    let req = LockRequest {
        owner: theirs,
        typ: Some(LockType::Read),
        start: 0,
        end: 10,
        pid: 3,
    };
    assert_err!(m.setlk(f, &req), MetaError::WouldBlock);
    assert_eq!(m.getattr(kept).unwrap().nlink, 0);
    m.release_locks(f, mine).unwrap();
    m.setlk(f, &req).unwrap();
    m.release_unlinked(sid, kept).unwrap();
    assert_err!(m.getattr(kept), MetaError::NotFound);

    // A session that was closed (or cleaned up as stale) cannot be resumed.
    m.close_session(sid).unwrap();
    assert_err!(m.resume_session(sid, &successor), MetaError::NotFound);
    assert_err!(
        m.resume_session(SessionId(9_999), &successor),
        MetaError::NotFound
    );
    assert_eq!(
        m.list_sessions().unwrap().len(),
        1,
        "a failed resume creates nothing"
    );
}

fn quota(m: &Engine) {
    let mut f = fmt("q");
    f.inodes = 3;
    f.capacity = 16384;
    m.format(&f, false).unwrap();
    let a = file(m, Ino::ROOT, "a");
    file(m, Ino::ROOT, "b");
    assert_err!(
        m.mknod(None, Ino::ROOT, b"c", &node(FileKind::File, 0o644), ME),
        MetaError::NoSpace
    );
    let s = Slice {
        pos: 0,
        id: m.new_slice_id().unwrap(),
        size: 8192,
        off: 0,
        len: 8192,
    };
    m.write_slice(a, 0, s, Timestamp::now()).unwrap();
    // Root (4 KiB) + 8 KiB used; another 8 KiB would pass the 16 KiB capacity.
    let s = Slice {
        pos: 8192,
        id: m.new_slice_id().unwrap(),
        size: 8192,
        off: 0,
        len: 8192,
    };
    assert_err!(m.write_slice(a, 0, s, Timestamp::now()), MetaError::NoSpace);
}

fn concurrent_creates(m: &Engine) {
    formatted(m);
    let d = dir(m, Ino::ROOT, "d");
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for i in 0..40 {
                    m.mknod(
                        None,
                        d,
                        format!("t{t}-{i}").as_bytes(),
                        &node(FileKind::File, 0o644),
                        ME,
                    )
                    .unwrap();
                    // Everyone also races for one shared name: exactly one wins.
                    let _ = m.mknod(
                        None,
                        d,
                        format!("shared-{i}").as_bytes(),
                        &node(FileKind::Dir, 0o755),
                        ME,
                    );
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let entries = m.readdir(d, 0, usize::MAX, false).unwrap();
    assert_eq!(entries.len(), 8 * 40 + 40);
    let mut inos: Vec<u64> = entries.iter().map(|e| e.ino.0).collect();
    inos.sort_unstable();
    inos.dedup();
    assert_eq!(inos.len(), entries.len(), "inode numbers are unique");
    let mut cookies: Vec<u64> = entries.iter().map(|e| e.cookie).collect();
    cookies.dedup();
    assert_eq!(
        cookies.len(),
        entries.len(),
        "cookies are unique and ordered"
    );
    assert_eq!(m.getattr(d).unwrap().nlink, 2 + 40);
    assert_eq!(m.usage().unwrap().used_inodes, 2 + 8 * 40 + 40);
}

fn concurrent_renames(m: &Engine) {
    let sid = formatted(m);
    let a = dir(m, Ino::ROOT, "a");
    let b = dir(m, Ino::ROOT, "b");
    let n = 20;
    for i in 0..n {
        file(m, a, &format!("f{i}"));
    }
    // Two threads move every file back and forth between the directories; whatever the
    // interleaving, each file ends in exactly one place.
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let m = m.clone();
            std::thread::spawn(move || {
                for round in 0..5 {
                    for i in 0..n {
                        let name = format!("f{i}");
                        let (from, to) = if (round + t) % 2 == 0 { (a, b) } else { (b, a) };
                        let _ = m.rename(
                            None,
                            sid,
                            from,
                            name.as_bytes(),
                            to,
                            name.as_bytes(),
                            RenameFlags::default(),
                            &never_open,
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let total = m.readdir(a, 0, usize::MAX, false).unwrap().len()
        + m.readdir(b, 0, usize::MAX, false).unwrap().len();
    assert_eq!(total, n);
    assert_eq!(m.usage().unwrap().used_inodes, 3 + n as u64);
}

/// Kernel request `unique` of session `sid`, as first delivered.
fn sent(sid: SessionId, unique: u64) -> Option<RequestId> {
    Some(RequestId::from_fuse(sid, unique))
}

/// The same request delivered again after FUSE_NOTIFY_RESEND (bit 63 set).
fn resent(sid: SessionId, unique: u64) -> Option<RequestId> {
    Some(RequestId::from_fuse(sid, unique | RESEND_BIT))
}

/// A mutation applied by a client that died before answering, delivered again: the same
/// answer, applied once. A resent request that was never applied is applied.
fn exactly_once(m: &Engine) {
    let sid = formatted(m);
    // mkdir: not EEXIST, the same inode, the parent's link count moved once.
    let (d, _) = m
        .mknod(
            sent(sid, 2),
            Ino::ROOT,
            b"d",
            &node(FileKind::Dir, 0o755),
            ME,
        )
        .unwrap();
    let (d2, a2) = m
        .mknod(
            resent(sid, 2),
            Ino::ROOT,
            b"d",
            &node(FileKind::Dir, 0o755),
            ME,
        )
        .unwrap();
    assert_eq!(d2, d);
    assert_eq!(a2, m.getattr(d).unwrap());
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 3);
    // create with O_EXCL (the engine's mknod of a file): the same inode.
    let (f, _) = m
        .mknod(
            sent(sid, 4),
            Ino::ROOT,
            b"f",
            &node(FileKind::File, 0o600),
            ME,
        )
        .unwrap();
    assert_eq!(
        m.mknod(
            resent(sid, 4),
            Ino::ROOT,
            b"f",
            &node(FileKind::File, 0o600),
            ME
        )
        .unwrap()
        .0,
        f
    );
    // symlink and a special file.
    let target = NewNode {
        kind: FileKind::Symlink,
        perm: 0o777,
        rdev: 0,
        target: b"f".to_vec(),
    };
    let (l, _) = m.mknod(sent(sid, 6), Ino::ROOT, b"l", &target, ME).unwrap();
    assert_eq!(
        m.mknod(resent(sid, 6), Ino::ROOT, b"l", &target, ME)
            .unwrap()
            .0,
        l
    );
    assert_eq!(m.readlink(l).unwrap(), b"f");
    let (p, _) = m
        .mknod(
            sent(sid, 8),
            Ino::ROOT,
            b"p",
            &node(FileKind::Fifo, 0o600),
            ME,
        )
        .unwrap();
    assert_eq!(
        m.mknod(
            resent(sid, 8),
            Ino::ROOT,
            b"p",
            &node(FileKind::Fifo, 0o600),
            ME
        )
        .unwrap()
        .0,
        p
    );
    assert_eq!(m.usage().unwrap().used_inodes, 5);
    // A resent request the dead client never applied is applied now, then once only.
    let (n, _) = m
        .mknod(
            resent(sid, 10),
            Ino::ROOT,
            b"n",
            &node(FileKind::File, 0o600),
            ME,
        )
        .unwrap();
    assert_eq!(m.lookup(Ino::ROOT, b"n").unwrap().0, n);
    assert_eq!(
        m.mknod(
            resent(sid, 10),
            Ino::ROOT,
            b"n",
            &node(FileKind::File, 0o600),
            ME
        )
        .unwrap()
        .0,
        n
    );
    // A failed request leaves no record: delivered again, it fails again.
    assert_err!(
        m.mknod(
            sent(sid, 12),
            Ino::ROOT,
            b"f",
            &node(FileKind::File, 0o600),
            ME
        ),
        MetaError::Exists
    );
    assert_err!(
        m.mknod(
            resent(sid, 12),
            Ino::ROOT,
            b"f",
            &node(FileKind::File, 0o600),
            ME
        ),
        MetaError::Exists
    );
    // Records belong to their session: the same unique of another session is its own request.
    let other = m.new_session(&session_info()).unwrap();
    assert_err!(
        m.mknod(
            resent(other, 2),
            Ino::ROOT,
            b"d",
            &node(FileKind::Dir, 0o755),
            ME
        ),
        MetaError::Exists
    );

    // link: the link count goes up once.
    let a = m.link(sent(sid, 14), f, d, b"f2").unwrap();
    assert_eq!(a.nlink, 2);
    let a = m.link(resent(sid, 14), f, d, b"f2").unwrap();
    assert_eq!(a.nlink, 2);
    assert_eq!(m.getattr(f).unwrap().nlink, 2);

    // setattr (truncate): applied once. Another client's later change stays, and the
    // answer carries the current attributes.
    let now = Timestamp::now();
    let a = m
        .setattr(
            sent(sid, 16),
            f,
            &SetAttr {
                size: Some(100_000),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(a.size, 100_000);
    m.setattr(
        None,
        f,
        &SetAttr {
            size: Some(10),
            ..Default::default()
        },
        now,
    )
    .unwrap();
    let a = m
        .setattr(
            resent(sid, 16),
            f,
            &SetAttr {
                size: Some(100_000),
                ..Default::default()
            },
            now,
        )
        .unwrap();
    assert_eq!(a.size, 10);
    assert_eq!(m.getattr(f).unwrap().size, 10);
    let chmod = SetAttr {
        mode: Some(0o640),
        ..Default::default()
    };
    m.setattr(sent(sid, 18), f, &chmod, now).unwrap();
    assert_eq!(
        m.setattr(resent(sid, 18), f, &chmod, now).unwrap().perm,
        0o640
    );

    // xattrs: XATTR_CREATE is not EEXIST, remove is not ENODATA.
    m.setxattr(sent(sid, 20), f, b"user.k", b"v", XattrMode::Create)
        .unwrap();
    m.setxattr(resent(sid, 20), f, b"user.k", b"v", XattrMode::Create)
        .unwrap();
    m.removexattr(sent(sid, 22), f, b"user.k").unwrap();
    m.removexattr(resent(sid, 22), f, b"user.k").unwrap();
    assert_err!(m.getxattr(f, b"user.k"), MetaError::NoXattr);

    // fallocate: applied once (a later truncate is not undone by the resent request).
    let alloc = Fallocate::Allocate { keep_size: false };
    assert_eq!(
        m.fallocate(sent(sid, 24), f, alloc, 0, 1 << 20, Timestamp::now())
            .unwrap()
            .size,
        1 << 20
    );
    m.setattr(
        None,
        f,
        &SetAttr {
            size: Some(0),
            ..Default::default()
        },
        now,
    )
    .unwrap();
    assert_eq!(
        m.fallocate(resent(sid, 24), f, alloc, 0, 1 << 20, Timestamp::now())
            .unwrap()
            .size,
        0
    );
    assert_eq!(m.getattr(f).unwrap().size, 0);
    assert_eq!(m.usage().unwrap().used_inodes, 6);
}

/// The removing mutations: delivered again, they answer what they did the first time,
/// not ENOENT, and change nothing more.
fn exactly_once_rename_unlink_rmdir(m: &Engine) {
    let sid = formatted(m);
    let a = file(m, Ino::ROOT, "a");
    let b = file(m, Ino::ROOT, "b");
    let d = dir(m, Ino::ROOT, "d");
    let plain = RenameFlags::default();
    // A rename that replaced a file: the same answer, and the moved file is not moved on.
    let r = m
        .rename(
            sent(sid, 2),
            sid,
            Ino::ROOT,
            b"a",
            Ino::ROOT,
            b"b",
            plain,
            &never_open,
        )
        .unwrap();
    assert_eq!(
        r,
        Some(Removed {
            ino: b,
            kept: false
        })
    );
    let r = m
        .rename(
            resent(sid, 2),
            sid,
            Ino::ROOT,
            b"a",
            Ino::ROOT,
            b"b",
            plain,
            &never_open,
        )
        .unwrap();
    assert_eq!(
        r,
        Some(Removed {
            ino: b,
            kept: false
        })
    );
    assert_eq!(m.lookup(Ino::ROOT, b"b").unwrap().0, a);
    assert_err!(m.lookup(Ino::ROOT, b"a"), MetaError::NotFound);
    // Moved on by someone else meanwhile: the resent rename does not move it back.
    m.rename(
        sent(sid, 4),
        sid,
        Ino::ROOT,
        b"b",
        d,
        b"c",
        plain,
        &never_open,
    )
    .unwrap();
    m.rename(None, sid, d, b"c", Ino::ROOT, b"z", plain, &never_open)
        .unwrap();
    assert_eq!(
        m.rename(
            resent(sid, 4),
            sid,
            Ino::ROOT,
            b"b",
            d,
            b"c",
            plain,
            &never_open
        )
        .unwrap(),
        None
    );
    assert_eq!(m.lookup(Ino::ROOT, b"z").unwrap().0, a);
    assert_err!(m.lookup(d, b"c"), MetaError::NotFound);
    // RENAME_EXCHANGE must not swap back.
    let x = file(m, Ino::ROOT, "x");
    let swap = RenameFlags {
        noreplace: false,
        exchange: true,
    };
    m.rename(
        sent(sid, 6),
        sid,
        Ino::ROOT,
        b"x",
        Ino::ROOT,
        b"z",
        swap,
        &never_open,
    )
    .unwrap();
    m.rename(
        resent(sid, 6),
        sid,
        Ino::ROOT,
        b"x",
        Ino::ROOT,
        b"z",
        swap,
        &never_open,
    )
    .unwrap();
    assert_eq!(m.lookup(Ino::ROOT, b"x").unwrap().0, a);
    assert_eq!(m.lookup(Ino::ROOT, b"z").unwrap().0, x);

    // unlink of an open file: kept, and the same answer again (not ENOENT).
    let r = m
        .unlink(sent(sid, 8), sid, Ino::ROOT, b"x", &always_open)
        .unwrap();
    assert_eq!(r, Removed { ino: a, kept: true });
    assert_eq!(
        m.unlink(resent(sid, 8), sid, Ino::ROOT, b"x", &always_open)
            .unwrap(),
        r
    );
    assert_eq!(m.getattr(a).unwrap().nlink, 0);
    // unlink of a file with another link: the count goes down once.
    m.link(None, x, d, b"x2").unwrap();
    let r = m
        .unlink(sent(sid, 10), sid, Ino::ROOT, b"z", &never_open)
        .unwrap();
    assert_eq!(r, Removed { ino: x, kept: true });
    assert_eq!(
        m.unlink(resent(sid, 10), sid, Ino::ROOT, b"z", &never_open)
            .unwrap(),
        r
    );
    assert_eq!(m.getattr(x).unwrap().nlink, 1);
    m.unlink(None, sid, d, b"x2", &never_open).unwrap();

    // rmdir: not ENOENT, the parent's link count goes down once.
    let e = dir(m, Ino::ROOT, "e");
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 4);
    let r = m.rmdir(sent(sid, 12), Ino::ROOT, b"e").unwrap();
    assert_eq!(
        r,
        Removed {
            ino: e,
            kept: false
        }
    );
    assert_eq!(m.rmdir(resent(sid, 12), Ino::ROOT, b"e").unwrap(), r);
    assert_eq!(m.getattr(Ino::ROOT).unwrap().nlink, 3);
    // What is there now is not touched by a resent rmdir of the old name.
    let e2 = dir(m, Ino::ROOT, "e");
    assert_eq!(m.rmdir(resent(sid, 12), Ino::ROOT, b"e").unwrap(), r);
    assert_eq!(m.lookup(Ino::ROOT, b"e").unwrap().0, e2);
    // root, d, e2 and a (open, unlinked).
    assert_eq!(m.usage().unwrap().used_inodes, 4);
}

/// Records below a unique are dropped on request, and all of a session's with it.
fn request_records_are_dropped(m: &Engine) {
    let sid = formatted(m);
    let dnode = node(FileKind::Dir, 0o755);
    let (a, _) = m
        .mknod(sent(sid, 100), Ino::ROOT, b"a", &dnode, ME)
        .unwrap();
    let (b, _) = m
        .mknod(sent(sid, 200), Ino::ROOT, b"b", &dnode, ME)
        .unwrap();
    m.forget_requests(sid, 150).unwrap();
    // 100 is forgotten: delivered again, it is applied again.
    assert_err!(
        m.mknod(resent(sid, 100), Ino::ROOT, b"a", &dnode, ME),
        MetaError::Exists
    );
    assert_eq!(m.lookup(Ino::ROOT, b"a").unwrap().0, a);
    assert_eq!(
        m.mknod(resent(sid, 200), Ino::ROOT, b"b", &dnode, ME)
            .unwrap()
            .0,
        b
    );
    // Another session's records are not touched.
    let other = m.new_session(&session_info()).unwrap();
    let (c, _) = m
        .mknod(sent(other, 100), Ino::ROOT, b"c", &dnode, ME)
        .unwrap();
    m.close_session(sid).unwrap();
    assert_err!(
        m.mknod(resent(sid, 200), Ino::ROOT, b"b", &dnode, ME),
        MetaError::Exists
    );
    assert_eq!(
        m.mknod(resent(other, 100), Ino::ROOT, b"c", &dnode, ME)
            .unwrap()
            .0,
        c
    );
    m.forget_requests(other, u64::MAX).unwrap();
    assert_err!(
        m.mknod(resent(other, 100), Ino::ROOT, b"c", &dnode, ME),
        MetaError::Exists
    );
}
