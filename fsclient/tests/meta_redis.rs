//! The metadata conformance suite on the Redis engine, and what is specific to Redis:
//! optimistic transactions under contention from separate clients, read-your-writes inside
//! a transaction, connection errors, binary names, and cookies shared between clients.
//!
//! Every test starts its own `redis-server` (testkit) on a free loopback port.
// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use fsclient::meta::redis::RedisBackend;
use fsclient::meta::{
    self, Attr, Backend, Caller, DeadSlice, Dentry, FileKind, Format, Ino, LockOwner, LockType,
    MetaEngine, MetaError, NewNode, RangeLock, RenameFlags, SessionId, SessionInfo, Slice,
    Timestamp, XattrMode, conformance,
};
use testkit::redis::RedisServer;

fn server() -> RedisServer {
    RedisServer::start().expect("start redis-server (apt-get install redis-server)")
}

fn open(url: &str) -> Arc<dyn MetaEngine> {
    meta::open(url).expect("open redis engine")
}

fn flushdb(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("FLUSHDB").exec(&mut con).unwrap();
}

fn format(m: &Arc<dyn MetaEngine>) {
    m.format(
        &Format {
            name: "vol".into(),
            uuid: "u".into(),
            storage: "fs:///tmp/x".into(),
            block_size: Format::DEFAULT_BLOCK_SIZE,
            capacity: 0,
            inodes: 0,
            created: Timestamp::now(),
        },
        false,
    )
    .unwrap();
}

fn session(m: &Arc<dyn MetaEngine>) -> SessionId {
    m.new_session(&SessionInfo {
        host: "h".into(),
        mountpoint: "/mnt".into(),
        pid: 1,
        version: "t".into(),
        heartbeat: Timestamp::now(),
    })
    .unwrap()
}

fn file() -> NewNode {
    NewNode {
        kind: FileKind::File,
        perm: 0o644,
        rdev: 0,
        target: vec![],
    }
}

fn dir() -> NewNode {
    NewNode {
        kind: FileKind::Dir,
        perm: 0o755,
        rdev: 0,
        target: vec![],
    }
}

fn all_entries(m: &Arc<dyn MetaEngine>, ino: Ino) -> Vec<meta::DirEntry> {
    let mut out = Vec::new();
    let mut cookie = 0;
    loop {
        let page = m.readdir(ino, cookie, 17, false).unwrap();
        let Some(last) = page.last() else { return out };
        cookie = last.cookie;
        out.extend(page);
    }
}

#[test]
fn conformance_suite() {
    let srv = server();
    let url = srv.url(0);
    conformance::run(&mut || {
        flushdb(&url);
        open(&url)
    });
}

/// Separate clients (one engine each, as on separate nodes) create files in one directory
/// and move one file back and forth, all at once. Every create must succeed exactly once,
/// and the renames must be serialized: each success moves the file from where the previous
/// one left it.
#[test]
fn concurrent_clients_create_and_rename() {
    const CREATORS: usize = 4;
    const FILES: usize = 30;
    const RENAMERS: usize = 3;
    const RENAMES: usize = 25;

    let srv = server();
    let url = srv.url(1);
    let m = open(&url);
    format(&m);
    let sid = session(&m);
    let (shared, _) = m
        .mknod(None, Ino::ROOT, b"shared", &dir(), Caller::ROOT)
        .unwrap();
    let (other, _) = m
        .mknod(None, Ino::ROOT, b"other", &dir(), Caller::ROOT)
        .unwrap();
    let (hot, _) = m
        .mknod(None, shared, b"hot", &file(), Caller::ROOT)
        .unwrap();

    let moves = AtomicU32::new(0);
    std::thread::scope(|s| {
        for t in 0..CREATORS {
            let url = &url;
            s.spawn(move || {
                let m = open(url);
                for j in 0..FILES {
                    let name = format!("t{t}-f{j}");
                    match m.mknod(None, shared, name.as_bytes(), &file(), Caller::ROOT) {
                        Ok(_) => {}
                        Err(e) => panic!("create {name}: {e:?}"),
                    }
                }
            });
        }
        for _ in 0..RENAMERS {
            let (url, moves) = (&url, &moves);
            s.spawn(move || {
                let m = open(url);
                for k in 0..RENAMES {
                    let (from, to) = if k % 2 == 0 {
                        (shared, other)
                    } else {
                        (other, shared)
                    };
                    match m.rename(
                        None,
                        sid,
                        from,
                        b"hot",
                        to,
                        b"hot",
                        RenameFlags::default(),
                        &|_| false,
                    ) {
                        Ok(None) => {
                            moves.fetch_add(1, Ordering::Relaxed);
                        }
                        // Another client moved it first.
                        Err(MetaError::NotFound) => {}
                        other => panic!("rename: {other:?}"),
                    }
                }
            });
        }
    });

    let check = open(&url);
    let entries = all_entries(&check, shared);
    let mut names: Vec<Vec<u8>> = entries.iter().map(|e| e.name.clone()).collect();
    let moved = moves.load(Ordering::Relaxed);
    let hot_in_shared = moved % 2 == 0;
    let mut want: Vec<Vec<u8>> = (0..CREATORS)
        .flat_map(|t| (0..FILES).map(move |j| format!("t{t}-f{j}").into_bytes()))
        .collect();
    if hot_in_shared {
        want.push(b"hot".to_vec());
    }
    names.sort();
    want.sort();
    assert_eq!(names, want, "after {moved} renames");
    // Distinct inodes and cookies, cookies in stream order.
    let mut inos: Vec<Ino> = entries.iter().map(|e| e.ino).collect();
    inos.sort();
    inos.dedup();
    assert_eq!(inos.len(), entries.len());
    assert!(entries.windows(2).all(|w| w[0].cookie < w[1].cookie));
    for e in &entries {
        let (ino, attr) = check.lookup(shared, &e.name).unwrap();
        assert_eq!(ino, e.ino);
        assert_eq!(attr.nlink, 1);
    }
    // Where the renames left the file is where it is, and only there.
    let (in_shared, in_other) = (check.lookup(shared, b"hot"), check.lookup(other, b"hot"));
    assert_eq!(in_shared.is_ok(), hot_in_shared);
    assert_eq!(in_other.is_ok(), !hot_in_shared);
    assert_eq!(check.getattr(hot).unwrap().nlink, 1);
    assert_eq!(
        all_entries(&check, other).len(),
        usize::from(!hot_in_shared)
    );
    assert_eq!(check.getattr(shared).unwrap().nlink, 2);
    assert_eq!(check.getattr(Ino::ROOT).unwrap().nlink, 4);
    // root, shared, other, hot and the files.
    let inodes = check.usage().unwrap().used_inodes;
    assert_eq!(inodes, (4 + CREATORS * FILES) as u64);
}

fn attr(size: u64) -> Attr {
    let mut a = Attr::new(FileKind::File, 0o644, 1, 1, Timestamp(5));
    a.size = size;
    a
}

fn slice(id: u64) -> Slice {
    Slice {
        pos: 0,
        id,
        size: 10,
        off: 0,
        len: 10,
    }
}

/// Point reads inside a write transaction see that transaction's own queued writes; a
/// failed transaction leaves nothing behind; a read transaction refuses writes.
#[test]
fn transaction_reads_its_own_writes() {
    let srv = server();
    let b = RedisBackend::open(&srv.url(0)).unwrap();
    let ino = Ino(100);
    let lock = RangeLock {
        owner: LockOwner {
            sid: SessionId(1),
            owner: 7,
        },
        typ: LockType::Write,
        start: 0,
        end: 9,
        pid: 1,
    };
    // Committed state the next transaction builds on.
    b.write(&mut |tx| {
        tx.append_slice(ino, 0, &slice(1))?;
        tx.set_xattr(ino, b"user.old", b"o")
    })
    .unwrap();

    b.write(&mut |tx| {
        assert_eq!(tx.attr(ino)?, None);
        tx.set_attr(ino, &attr(3))?;
        assert_eq!(tx.attr(ino)?, Some(attr(3)));
        tx.del_attr(ino)?;
        assert_eq!(tx.attr(ino)?, None);
        tx.set_attr(ino, &attr(4))?;

        let d = Dentry {
            ino,
            kind: FileKind::File,
            cookie: 3,
        };
        tx.set_dentry(Ino::ROOT, b"n", &d)?;
        assert_eq!(tx.dentry(Ino::ROOT, b"n")?, Some(d));
        tx.del_dentry(Ino::ROOT, b"n", 3)?;
        assert_eq!(tx.dentry(Ino::ROOT, b"n")?, None);
        tx.set_dentry(Ino::ROOT, b"m", &d)?;

        // Appends to a chunk not read yet, then read: committed slices, then ours.
        tx.append_slice(ino, 0, &slice(2))?;
        assert_eq!(tx.chunk(ino, 0)?, vec![slice(1), slice(2)]);
        tx.append_slice(ino, 0, &slice(3))?;
        assert_eq!(tx.chunk(ino, 0)?, vec![slice(1), slice(2), slice(3)]);
        tx.set_chunk(ino, 1, &[slice(4)])?;
        tx.append_slice(ino, 1, &slice(5))?;
        assert_eq!(tx.chunk(ino, 1)?, vec![slice(4), slice(5)]);

        assert_eq!(tx.xattr(ino, b"user.old")?, Some(b"o".to_vec()));
        tx.set_xattr(ino, b"user.a", b"1")?;
        assert_eq!(
            tx.xattr_names(ino)?,
            vec![b"user.a".to_vec(), b"user.old".to_vec()]
        );
        tx.del_xattrs(ino)?;
        assert_eq!(tx.xattr(ino, b"user.old")?, None);
        tx.set_xattr(ino, b"user.b", b"2")?;
        assert_eq!(tx.xattr_names(ino)?, vec![b"user.b".to_vec()]);

        tx.set_symlink(ino, b"target")?;
        assert_eq!(tx.symlink(ino)?, Some(b"target".to_vec()));
        tx.set_locks(ino, &[lock])?;
        assert_eq!(tx.locks(ino)?, vec![lock]);
        tx.add_usage(4096, 2)?;
        assert_eq!(tx.usage()?.used_inodes, 2);
        Ok(())
    })
    .unwrap();

    b.read(&mut |tx| {
        assert_eq!(tx.attr(ino)?, Some(attr(4)));
        assert!(tx.dentry(Ino::ROOT, b"n")?.is_none());
        assert!(tx.dentry(Ino::ROOT, b"m")?.is_some());
        assert_eq!(tx.dir_entries(Ino::ROOT, 0, 10)?.len(), 1);
        assert_eq!(tx.chunk(ino, 0)?, vec![slice(1), slice(2), slice(3)]);
        assert_eq!(tx.chunk(ino, 1)?, vec![slice(4), slice(5)]);
        assert_eq!(tx.xattr_names(ino)?, vec![b"user.b".to_vec()]);
        assert_eq!(tx.locks(ino)?, vec![lock]);
        assert_eq!(tx.usage()?.used_bytes, 4096);
        assert_eq!(
            tx.set_attr(ino, &attr(1)).unwrap_err().to_string(),
            MetaError::ReadOnly.to_string()
        );
        Ok(())
    })
    .unwrap();

    // A closure that fails commits nothing, and its connection is usable afterwards.
    let err = b
        .write(&mut |tx| {
            tx.attr(ino)?;
            tx.set_attr(ino, &attr(99))?;
            Err::<(), _>(MetaError::Exists)
        })
        .unwrap_err();
    assert!(matches!(err, MetaError::Exists));
    assert_eq!(b.read(&mut |tx| tx.attr(ino)).unwrap(), Some(attr(4)));
}

/// A key read in a write transaction and changed by another client before EXEC makes the
/// transaction run again, and the rerun sees the other client's value.
#[test]
fn conflicting_write_is_rerun() {
    let srv = server();
    let url = srv.url(0);
    let b = RedisBackend::open(&url).unwrap();
    let ino = Ino(7);
    b.write(&mut |tx| tx.set_attr(ino, &attr(1))).unwrap();

    let other = RedisBackend::open(&url).unwrap();
    let mut runs = 0;
    let seen = b
        .write(&mut |tx| {
            runs += 1;
            let a = tx.attr(ino)?.ok_or(MetaError::NotFound)?;
            if runs == 1 {
                other.write(&mut |tx| tx.set_attr(ino, &attr(50)))?;
            }
            tx.set_attr(ino, &attr(a.size + 1))?;
            Ok(a.size)
        })
        .unwrap();
    assert_eq!(runs, 2);
    assert_eq!(seen, 50);
    assert_eq!(b.read(&mut |tx| tx.attr(ino)).unwrap(), Some(attr(51)));
}

/// Ids come from INCRBY outside the transaction: never handed out twice, even across
/// reruns and across clients.
#[test]
fn alloc_hands_out_disjoint_ranges() {
    let srv = server();
    let url = srv.url(0);
    let a = RedisBackend::open(&url).unwrap();
    let b = RedisBackend::open(&url).unwrap();
    assert_eq!(
        a.write(&mut |tx| tx.alloc(meta::Counter::Slice, 10))
            .unwrap(),
        1
    );
    assert_eq!(
        b.write(&mut |tx| tx.alloc(meta::Counter::Slice, 5))
            .unwrap(),
        11
    );
    assert_eq!(
        a.write(&mut |tx| tx.alloc(meta::Counter::Slice, 1))
            .unwrap(),
        16
    );
    assert!(matches!(
        a.read(&mut |tx| tx.alloc(meta::Counter::Slice, 1)),
        Err(MetaError::ReadOnly)
    ));
}

/// Dead slices come back in exact `since` order even within one millisecond, where the
/// sorted set alone orders by member.
#[test]
fn dead_slices_keep_nanosecond_order() {
    let srv = server();
    let b = RedisBackend::open(&srv.url(0)).unwrap();
    let t = 1_700_000_000_123_000_000i64;
    // Within one millisecond the ids sort ("10" < "9" < "900") against their times.
    let dead = [
        DeadSlice {
            id: 900,
            size: 1,
            since: Timestamp(t + 1),
        },
        DeadSlice {
            id: 9,
            size: 2,
            since: Timestamp(t + 2),
        },
        DeadSlice {
            id: 10,
            size: 3,
            since: Timestamp(t + 3),
        },
        DeadSlice {
            id: 5,
            size: 4,
            since: Timestamp(t - 2_000_000),
        },
        DeadSlice {
            id: 6,
            size: 5,
            since: Timestamp(t + 5_000_000),
        },
    ];
    b.write(&mut |tx| {
        for d in &dead {
            tx.add_dead_slice(d)?;
        }
        Ok(())
    })
    .unwrap();
    let ids = |before: i64, limit: usize| -> Vec<u64> {
        b.read(&mut |tx| tx.dead_slices(Timestamp(before), limit))
            .unwrap()
            .iter()
            .map(|d| d.id)
            .collect()
    };
    assert_eq!(ids(i64::MAX, 100), vec![5, 900, 9, 10, 6]);
    assert_eq!(ids(i64::MAX, 2), vec![5, 900]);
    assert_eq!(ids(i64::MAX, 3), vec![5, 900, 9]);
    assert_eq!(ids(t + 3, 100), vec![5, 900, 9]);
    assert_eq!(ids(t + 1, 1), vec![5]);
    let all = b
        .read(&mut |tx| tx.dead_slices(Timestamp(i64::MAX), 100))
        .unwrap();
    assert_eq!(all[1], dead[0]);
    b.write(&mut |tx| tx.del_dead_slice(9)).unwrap();
    assert_eq!(ids(i64::MAX, 100), vec![5, 900, 10, 6]);
}

/// Nothing listens: the error says so at once and names the target without its password.
#[test]
fn unreachable_server_is_a_quick_open_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://:sekrit@127.0.0.1:{port}/0");
    let started = Instant::now();
    let err = meta::open(&url).unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    let MetaError::Open { target, .. } = &err else {
        panic!("want Open, got {err:?}")
    };
    assert!(target.contains(&format!("127.0.0.1:{port}")), "{target}");
    let mut text = format!("{err} {err:?}");
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(&format!(" {s} {s:?}"));
        source = s.source();
    }
    assert!(!text.contains("sekrit"), "{text}");

    // A black-holed address fails within the connect timeout instead of hanging.
    let started = Instant::now();
    assert!(meta::open("redis://192.0.2.1:6379/0").is_err());
    assert!(started.elapsed() < Duration::from_secs(10));

    let err = meta::open("rediss://127.0.0.1:6379/0").unwrap_err();
    assert!(
        err.to_string().contains("TLS") || format!("{err:?}").contains("TLS"),
        "{err:?}"
    );
}

/// Names, xattrs and symlink targets are bytes, not UTF-8.
#[test]
fn binary_names_round_trip() {
    let srv = server();
    let m = open(&srv.url(0));
    format(&m);
    let names: [&[u8]; 5] = [
        b"\xff\xfe\x80",
        b"a b\nc",
        b"*?[x]",
        b"\\\"'",
        "ünï".as_bytes(),
    ];
    let mut inos = Vec::new();
    for n in names {
        inos.push(
            m.mknod(None, Ino::ROOT, n, &file(), Caller::ROOT)
                .unwrap()
                .0,
        );
    }
    for (n, ino) in names.iter().zip(&inos) {
        assert_eq!(m.lookup(Ino::ROOT, n).unwrap().0, *ino);
    }
    let mut listed: Vec<Vec<u8>> = all_entries(&m, Ino::ROOT)
        .into_iter()
        .map(|e| e.name)
        .collect();
    let mut want: Vec<Vec<u8>> = names.iter().map(|n| n.to_vec()).collect();
    listed.sort();
    want.sort();
    assert_eq!(listed, want);

    m.rename(
        None,
        SessionId(0),
        Ino::ROOT,
        names[0],
        Ino::ROOT,
        b"\x01\x02",
        RenameFlags::default(),
        &|_| false,
    )
    .unwrap();
    assert_eq!(m.lookup(Ino::ROOT, b"\x01\x02").unwrap().0, inos[0]);
    assert!(matches!(
        m.lookup(Ino::ROOT, names[0]),
        Err(MetaError::NotFound)
    ));

    m.setxattr(
        None,
        inos[1],
        b"user.\xff",
        b"\x00\xff\x00",
        XattrMode::Create,
    )
    .unwrap();
    assert_eq!(m.getxattr(inos[1], b"user.\xff").unwrap(), b"\x00\xff\x00");
    assert_eq!(m.listxattr(inos[1]).unwrap(), vec![b"user.\xff".to_vec()]);

    let link = NewNode {
        kind: FileKind::Symlink,
        perm: 0o777,
        rdev: 0,
        target: b"\xc3\x28/x".to_vec(),
    };
    let (l, _) = m
        .mknod(None, Ino::ROOT, b"link", &link, Caller::ROOT)
        .unwrap();
    assert_eq!(m.readlink(l).unwrap(), b"\xc3\x28/x");
}

/// A directory stream started by one client is continued by another (as a successor
/// process does after an upgrade): same cookies, nothing skipped or repeated.
#[test]
fn readdir_cookies_are_shared_between_clients() {
    let srv = server();
    let url = srv.url(0);
    let a = open(&url);
    format(&a);
    let b = open(&url);
    let (d, _) = a
        .mknod(None, Ino::ROOT, b"d", &dir(), Caller::ROOT)
        .unwrap();
    for i in 0..20 {
        a.mknod(
            None,
            d,
            format!("e{i:02}").as_bytes(),
            &file(),
            Caller::ROOT,
        )
        .unwrap();
    }
    let first = a.readdir(d, 0, 7, true).unwrap();
    assert_eq!(first.len(), 7);
    assert!(first.iter().all(|e| e.attr.is_some()));
    // Removing an entry already returned does not move the others.
    a.unlink(None, SessionId(0), d, b"e01", &|_| false).unwrap();
    let mut rest = Vec::new();
    let mut cookie = first[6].cookie;
    loop {
        let page = b.readdir(d, cookie, 5, false).unwrap();
        let Some(last) = page.last() else { break };
        cookie = last.cookie;
        rest.extend(page);
    }
    let mut names: Vec<Vec<u8>> = first.iter().chain(&rest).map(|e| e.name.clone()).collect();
    names.sort();
    let want: Vec<Vec<u8>> = (0..20).map(|i| format!("e{i:02}").into_bytes()).collect();
    assert_eq!(names, want);
    // Both clients hand out the same cookie for the same entry.
    let via_a: Vec<(Vec<u8>, u64)> = all_entries(&a, d)
        .into_iter()
        .map(|e| (e.name, e.cookie))
        .collect();
    let via_b: Vec<(Vec<u8>, u64)> = all_entries(&b, d)
        .into_iter()
        .map(|e| (e.name, e.cookie))
        .collect();
    assert_eq!(via_a, via_b);
    assert_eq!(via_a.len(), 19);
}

/// Closes every client connection but the caller's, as a Redis restart or an idle timeout
/// would.
fn kill_clients(url: &str) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("CLIENT")
        .arg(&["KILL", "TYPE", "normal", "SKIPME", "yes"][..])
        .exec(&mut con)
        .unwrap();
}

/// A pooled connection the server closed is replaced without failing the operation.
#[test]
fn lost_connections_are_replaced() {
    let srv = server();
    let url = srv.url(0);
    let m = open(&url);
    format(&m);
    let (f, _) = m
        .mknod(None, Ino::ROOT, b"f", &file(), Caller::ROOT)
        .unwrap();
    kill_clients(&url);
    assert_eq!(m.getattr(f).unwrap().nlink, 1);
    kill_clients(&url);
    m.setxattr(None, f, b"user.k", b"v", XattrMode::Any)
        .unwrap();
    assert_eq!(m.getxattr(f, b"user.k").unwrap(), b"v");
}
