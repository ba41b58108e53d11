//! Exactly once after a crash, end to end: for every mutating operation, the client is
//! made to abort right after the operation committed and before its reply
//! (`BATON_FAULT=after-apply:<op>`); the supervisor restarts a client, the kernel resends
//! the request — or, without FUSE_NOTIFY_RESEND (`--no-resend`, as on kernels before 6.9),
//! the successor finds it in the request log and runs it — and the application sees the
//! success it would have seen without the crash (no EEXIST after mkdir, no ENOENT after
//! unlink...), with the change applied once. Each test runs both ways, on the embedded
//! engine for every operation, and on Redis for the namespace operations.
#![allow(clippy::unwrap_used)]

mod common;

use std::ffi::CString;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

use common::Resend;
use fsclient::vfs::fault::{self, Op};
use testkit::mount::{MountOptions, TestMount, baton};
use testkit::redis::RedisServer;

/// `Ok` if a libc call returned 0.
fn sys(ret: libc::c_int) -> std::io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn set_xattr(p: &Path, name: &str, value: &[u8], flags: libc::c_int) -> std::io::Result<()> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    sys(unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

fn get_xattr(p: &Path, name: &str) -> std::io::Result<Vec<u8>> {
    let (p, n) = (cpath(p), CString::new(name).unwrap());
    let mut buf = vec![0u8; 256];
    // SAFETY: valid NUL-terminated strings and a buffer of the given length.
    let n = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn read(p: &Path) -> Vec<u8> {
    let mut v = Vec::new();
    fs::File::open(p).unwrap().read_to_end(&mut v).unwrap();
    v
}

/// Where the volume's metadata lives.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Redb,
    Redis,
}

/// On the embedded engine: see [`crash_after_on`].
fn crash_after(
    op: Op,
    setup: impl Fn(&Path),
    act: impl Fn(&Path) -> std::io::Result<()>,
    check: impl Fn(&Path),
) {
    crash_after_on(Engine::Redb, op, setup, act, check);
}

/// [`crash_after_in`] with the kernel's resend, then without it.
fn crash_after_on(
    engine: Engine,
    op: Op,
    setup: impl Fn(&Path),
    act: impl Fn(&Path) -> std::io::Result<()>,
    check: impl Fn(&Path),
) {
    for mode in Resend::BOTH {
        crash_after_in(engine, mode, op, &setup, &act, &check);
    }
}

/// Mounts with a client that aborts after its first `op`, runs `setup` (which must not use
/// `op`), then `act` (the faulted operation, which must succeed), then `check`, and makes
/// sure the client did crash and was replaced.
fn crash_after_in(
    engine: Engine,
    mode: Resend,
    op: Op,
    setup: &dyn Fn(&Path),
    act: &dyn Fn(&Path) -> std::io::Result<()>,
    check: &dyn Fn(&Path),
) {
    let dir = tempfile::tempdir().unwrap();
    let client = common::client_bin();
    let wrapper = common::script(
        dir.path(),
        &format!("baton-fs-fault-{op}"),
        &format!(
            "export {}='after-apply:{op}'\nexec {} \"$@\"",
            fault::ENV,
            client.display()
        ),
    );
    let mut args = vec!["--client".into(), wrapper.display().to_string()];
    args.extend(mode.args());
    let home = dir.path().join("home");
    let mnt = dir.path().join("mnt");
    let mut redis = None;
    let opts = match engine {
        Engine::Redb => MountOptions { meta: None, args },
        Engine::Redis => {
            let server = RedisServer::start().unwrap();
            let meta = server.url(0);
            redis = Some(server);
            let storage = format!("fs://{}/objects", dir.path().display());
            let out = baton(
                &home,
                &["format", "shared", "--meta", &meta, "--storage", &storage],
            )
            .unwrap();
            assert!(
                out.status.success(),
                "format failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            MountOptions {
                meta: Some(meta),
                args,
            }
        }
    };
    let m = TestMount::at(&home, &mnt, &opts).unwrap();
    let root = m.mountpoint.clone();
    setup(&root);
    let before = common::status(&m);
    if let Err(e) = act(&root) {
        panic!("{op} across a crash of the client ({mode:?} resend) failed: {e}");
    }
    let after = common::status(&m);
    assert!(
        after.restarts > before.restarts && after.client_pid != before.client_pid,
        "{op}: the client was not restarted (the fault did not fire?): {before:?} -> {after:?}"
    );
    if mode == Resend::Disabled {
        common::wait_answered_from_log(&m, 0);
        let (times, requests) = common::answered_from_log(&m);
        assert!(
            times >= 1 && requests >= 1,
            "{op}: the successor answered nothing from the request log"
        );
    }
    check(&root);
    m.umount().unwrap();
    drop(redis);
}

#[test]
fn mkdir_is_applied_once() {
    crash_after(
        Op::Mkdir,
        |_| {},
        |r| fs::create_dir(r.join("d")),
        |r| {
            assert!(r.join("d").is_dir());
            let names: Vec<_> = fs::read_dir(r)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(names, ["d"]);
            assert_eq!(fs::metadata(r).unwrap().nlink(), 3);
        },
    );
}

#[test]
fn exclusive_create_is_applied_once() {
    crash_after(
        Op::Create,
        |_| {},
        |r| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(r.join("f"))?;
            // The descriptor the resent CREATE opened works.
            f.write_all(b"created once")?;
            f.sync_all()
        },
        |r| {
            assert_eq!(read(&r.join("f")), b"created once");
            assert_eq!(fs::metadata(r.join("f")).unwrap().mode() & 0o777, 0o600);
        },
    );
}

#[test]
fn unlink_is_applied_once() {
    crash_after(
        Op::Unlink,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| fs::remove_file(r.join("f")),
        |r| assert!(!r.join("f").exists()),
    );
}

#[test]
fn rmdir_is_applied_once() {
    crash_after(
        Op::Rmdir,
        |r| fs::create_dir(r.join("d")).unwrap(),
        |r| fs::remove_dir(r.join("d")),
        |r| {
            assert!(!r.join("d").exists());
            assert_eq!(fs::metadata(r).unwrap().nlink(), 2);
        },
    );
}

#[test]
fn rename_is_applied_once() {
    crash_after(
        Op::Rename,
        |r| {
            fs::write(r.join("a"), b"moved").unwrap();
            fs::write(r.join("b"), b"replaced").unwrap();
        },
        |r| fs::rename(r.join("a"), r.join("b")),
        |r| {
            assert!(!r.join("a").exists());
            assert_eq!(read(&r.join("b")), b"moved");
        },
    );
}

#[test]
fn link_is_applied_once() {
    crash_after(
        Op::Link,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| fs::hard_link(r.join("f"), r.join("g")),
        |r| {
            assert_eq!(fs::metadata(r.join("f")).unwrap().nlink(), 2);
            assert_eq!(
                fs::metadata(r.join("g")).unwrap().ino(),
                fs::metadata(r.join("f")).unwrap().ino()
            );
        },
    );
}

#[test]
fn symlink_is_applied_once() {
    crash_after(
        Op::Symlink,
        |_| {},
        |r| std::os::unix::fs::symlink("some/target", r.join("l")),
        |r| {
            assert_eq!(
                fs::read_link(r.join("l")).unwrap(),
                Path::new("some/target")
            )
        },
    );
}

#[test]
fn mknod_is_applied_once() {
    crash_after(
        Op::Mknod,
        |_| {},
        // SAFETY: a valid NUL-terminated path.
        |r| sys(unsafe { libc::mkfifo(cpath(&r.join("p")).as_ptr(), 0o600) }),
        |r| {
            assert!(
                fs::symlink_metadata(r.join("p"))
                    .unwrap()
                    .file_type()
                    .is_fifo()
            )
        },
    );
}

#[test]
fn truncate_is_applied_once() {
    crash_after(
        Op::Setattr,
        |r| fs::write(r.join("f"), b"0123456789").unwrap(),
        |r| OpenOptions::new().write(true).open(r.join("f"))?.set_len(3),
        |r| assert_eq!(read(&r.join("f")), b"012"),
    );
}

#[test]
fn setxattr_create_is_applied_once() {
    crash_after(
        Op::Setxattr,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| set_xattr(&r.join("f"), "user.k", b"v", libc::XATTR_CREATE),
        |r| assert_eq!(get_xattr(&r.join("f"), "user.k").unwrap(), b"v"),
    );
}

#[test]
fn removexattr_is_applied_once() {
    crash_after(
        Op::Removexattr,
        |r| {
            fs::write(r.join("f"), b"x").unwrap();
            set_xattr(&r.join("f"), "user.k", b"v", 0).unwrap();
        },
        |r| {
            let (p, n) = (cpath(&r.join("f")), CString::new("user.k").unwrap());
            // SAFETY: valid NUL-terminated strings.
            sys(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) })
        },
        |r| {
            let e = get_xattr(&r.join("f"), "user.k").unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ENODATA));
        },
    );
}

#[test]
fn fallocate_is_applied_once() {
    crash_after(
        Op::Fallocate,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| {
            let f = OpenOptions::new().write(true).open(r.join("f"))?;
            // SAFETY: a valid open descriptor.
            sys(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, 1 << 20) })
        },
        |r| {
            let v = read(&r.join("f"));
            assert_eq!(v.len(), 1 << 20);
            assert_eq!(v[0], b'x');
            assert!(v[1..].iter().all(|b| *b == 0));
        },
    );
}

#[test]
fn append_is_applied_once() {
    crash_after(
        Op::Write,
        // Created without a write: the first write is the faulted one.
        |r| drop(fs::File::create(r.join("log")).unwrap()),
        |r| {
            let mut f = OpenOptions::new().append(true).open(r.join("log"))?;
            f.write_all(b"one record\n")?;
            // The descriptor keeps working after the crash; its offset follows the size.
            f.write_all(b"two\n")
        },
        |r| assert_eq!(read(&r.join("log")), b"one record\ntwo\n"),
    );
}

#[test]
fn on_redis_mkdir_is_applied_once() {
    crash_after_on(
        Engine::Redis,
        Op::Mkdir,
        |_| {},
        |r| fs::create_dir(r.join("d")),
        |r| {
            assert!(r.join("d").is_dir());
            assert_eq!(fs::metadata(r).unwrap().nlink(), 3);
        },
    );
}

#[test]
fn on_redis_exclusive_create_is_applied_once() {
    crash_after_on(
        Engine::Redis,
        Op::Create,
        |_| {},
        |r| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(r.join("f"))
                .map(drop)
        },
        |r| assert!(r.join("f").is_file()),
    );
}

#[test]
fn on_redis_unlink_is_applied_once() {
    crash_after_on(
        Engine::Redis,
        Op::Unlink,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| fs::remove_file(r.join("f")),
        |r| assert!(!r.join("f").exists()),
    );
}

#[test]
fn on_redis_rename_is_applied_once() {
    crash_after_on(
        Engine::Redis,
        Op::Rename,
        |r| fs::write(r.join("a"), b"moved").unwrap(),
        |r| fs::rename(r.join("a"), r.join("b")),
        |r| {
            assert!(!r.join("a").exists());
            assert_eq!(read(&r.join("b")), b"moved");
        },
    );
}

#[test]
fn on_redis_link_is_applied_once() {
    crash_after_on(
        Engine::Redis,
        Op::Link,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| fs::hard_link(r.join("f"), r.join("g")),
        |r| assert_eq!(fs::metadata(r.join("f")).unwrap().nlink(), 2),
    );
}

#[test]
fn on_redis_setxattr_create_is_applied_once() {
    crash_after_on(
        Engine::Redis,
        Op::Setxattr,
        |r| fs::write(r.join("f"), b"x").unwrap(),
        |r| set_xattr(&r.join("f"), "user.k", b"v", libc::XATTR_CREATE),
        |r| assert_eq!(get_xattr(&r.join("f"), "user.k").unwrap(), b"v"),
    );
}
