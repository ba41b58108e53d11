//! Volumes shared by several mounts (Redis metadata), and object storage over S3: what
//! one mount does, another sees (close-to-open), and locks hold across mounts.
#![allow(clippy::unwrap_used)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use testkit::mount::{MountOptions, TestMount, baton};
use testkit::redis::RedisServer;
use testkit::s3::S3Server;

/// Formats a volume and returns mount options for it. No attribute caching, so that a
/// test sees another mount's changes without waiting for a cache to expire.
fn format(home: &std::path::Path, name: &str, meta: &str, storage: &str) -> MountOptions {
    let out = baton(
        home,
        &["format", name, "--meta", meta, "--storage", storage],
    )
    .unwrap();
    assert!(
        out.status.success(),
        "format failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    MountOptions {
        meta: Some(meta.to_string()),
        args: ["--attr-cache", "0", "--entry-cache", "0"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
    }
}

#[test]
fn two_mounts_of_one_redis_volume_see_each_other() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let storage = format!("fs://{}/objects", dir.path().display());
    let opts = format(&home, "shared", &redis.url(1), &storage);
    let a = TestMount::at(&home, &dir.path().join("a"), &opts).unwrap();
    let b = TestMount::at(&home.join("b"), &dir.path().join("b"), &opts).unwrap();

    // Creates and writes on A are visible on B after A's close.
    fs::create_dir(a.path("dir")).unwrap();
    fs::write(a.path("dir/file"), b"written on a").unwrap();
    assert_eq!(fs::read(b.path("dir/file")).unwrap(), b"written on a");
    assert_eq!(
        fs::metadata(a.path("dir/file")).unwrap().ino(),
        fs::metadata(b.path("dir/file")).unwrap().ino()
    );

    // Overwrite on B, read on A.
    let mut f = OpenOptions::new()
        .write(true)
        .open(b.path("dir/file"))
        .unwrap();
    f.write_all(b"WRITTEN").unwrap();
    drop(f);
    assert_eq!(fs::read(a.path("dir/file")).unwrap(), b"WRITTEN on a");

    // Renames and unlinks propagate.
    fs::rename(a.path("dir/file"), a.path("dir/renamed")).unwrap();
    assert!(!b.path("dir/file").exists());
    assert_eq!(fs::read(b.path("dir/renamed")).unwrap(), b"WRITTEN on a");
    fs::remove_file(b.path("dir/renamed")).unwrap();
    assert!(!a.path("dir/renamed").exists());
    let mut names: Vec<_> = fs::read_dir(a.path("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    assert!(names.is_empty());

    // A big file written on B reads back on A.
    let data: Vec<u8> = (0..(24 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    fs::write(b.path("big"), &data).unwrap();
    let mut back = Vec::new();
    File::open(a.path("big"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(
        back == data,
        "24 MiB written on one mount reads back identically on the other"
    );

    a.umount().unwrap();
    b.umount().unwrap();
}

#[test]
fn a_lock_on_one_mount_blocks_the_other() {
    let redis = RedisServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let storage = format!("fs://{}/objects", dir.path().display());
    let opts = format(&home, "locks", &redis.url(2), &storage);
    let a = TestMount::at(&home, &dir.path().join("a"), &opts).unwrap();
    let b = TestMount::at(&home.join("b"), &dir.path().join("b"), &opts).unwrap();
    fs::write(a.path("f"), b"x").unwrap();

    let fa = OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.path("f"))
        .unwrap();
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.path("f"))
        .unwrap();
    let whole = |typ: i32| libc::flock {
        l_type: typ as i16,
        l_whence: 0,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: valid fds and flock structs.
    unsafe {
        assert_eq!(
            libc::fcntl(fa.as_raw_fd(), libc::F_SETLK, &whole(libc::F_WRLCK)),
            0
        );
        assert_eq!(
            libc::fcntl(fb.as_raw_fd(), libc::F_SETLK, &whole(libc::F_RDLCK)),
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EAGAIN)
        );
        let mut probe = whole(libc::F_WRLCK);
        assert_eq!(libc::fcntl(fb.as_raw_fd(), libc::F_GETLK, &mut probe), 0);
        assert_eq!(probe.l_type, libc::F_WRLCK as i16);
    }
    // Releasing on A (close) lets B take it.
    drop(fa);
    // SAFETY: valid fd and flock struct.
    unsafe {
        assert_eq!(
            libc::fcntl(fb.as_raw_fd(), libc::F_SETLK, &whole(libc::F_RDLCK)),
            0
        );
        assert_eq!(
            libc::fcntl(fb.as_raw_fd(), libc::F_SETLK, &whole(libc::F_UNLCK)),
            0
        );
    }
    drop(fb);
    // flock across mounts too.
    let ga = File::open(a.path("f")).unwrap();
    let gb = File::open(b.path("f")).unwrap();
    // SAFETY: valid fds.
    unsafe {
        assert_eq!(libc::flock(ga.as_raw_fd(), libc::LOCK_EX), 0);
        assert_eq!(
            libc::flock(gb.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB),
            -1
        );
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::EWOULDBLOCK)
        );
    }
    drop(ga);
    // The kernel releases a flock when it sends RELEASE, which is asynchronous: close(2)
    // may return a moment before the lock is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    // SAFETY: valid fd.
    while unsafe { libc::flock(gb.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "flock still held 5 s after the holder closed"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(gb);
    a.umount().unwrap();
    b.umount().unwrap();
}

#[test]
fn s3_object_storage() {
    let s3 = S3Server::start().unwrap();
    s3.create_bucket("baton-test").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let meta = format!("redb://{}/meta.redb", dir.path().display());
    let opts = format(&home, "ons3", &meta, &s3.url("baton-test"));
    let m = TestMount::at(&home, &dir.path().join("mnt"), &opts).unwrap();
    let data: Vec<u8> = (0..(9 << 20) + 123).map(|i: u32| (i % 251) as u8).collect();
    fs::write(m.path("obj"), &data).unwrap();
    fs::create_dir(m.path("d")).unwrap();
    fs::rename(m.path("obj"), m.path("d/obj")).unwrap();
    m.umount().unwrap();
    // A fresh cache directory proves the bytes come from S3.
    let m = TestMount::at(&home.join("fresh"), &dir.path().join("mnt"), &opts).unwrap();
    assert!(
        fs::read(m.path("d/obj")).unwrap() == data,
        "bytes read back from S3 equal bytes written"
    );
    m.umount().unwrap();
}
