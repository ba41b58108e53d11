//! The filesystem as an application sees it: a real `baton mount` (embedded engine) used
//! through std::fs and libc. Every test asserts what a user cares about: bytes read back,
//! link counts, errno values.
#![allow(clippy::unwrap_used)]

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use testkit::mount::{MountOptions, TestMount};

fn mount() -> TestMount {
    TestMount::new(&MountOptions::default()).expect("baton mount")
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("expected an error")
        .raw_os_error()
        .expect("an OS error")
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn files_directories_and_errnos() {
    let m = mount();
    let d = m.path("dir");
    fs::create_dir(&d).unwrap();
    assert_eq!(errno_of(fs::create_dir(&d)), libc::EEXIST);
    fs::write(d.join("a.txt"), b"hello baton").unwrap();
    assert_eq!(fs::read(d.join("a.txt")).unwrap(), b"hello baton");
    let md = fs::metadata(d.join("a.txt")).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 11);
    assert_eq!(md.nlink(), 1);
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 2);
    fs::create_dir(d.join("sub")).unwrap();
    assert_eq!(fs::metadata(&d).unwrap().nlink(), 3);

    assert_eq!(errno_of(fs::read(d.join("missing"))), libc::ENOENT);
    assert_eq!(errno_of(fs::remove_dir(&d)), libc::ENOTEMPTY);
    assert_eq!(errno_of(fs::remove_file(&d)), libc::EISDIR);
    assert_eq!(errno_of(fs::read_dir(d.join("a.txt"))), libc::ENOTDIR);
    assert_eq!(errno_of(File::create(d.join("a.txt/x"))), libc::ENOTDIR);
    assert_eq!(errno_of(fs::remove_dir(d.join("a.txt"))), libc::ENOTDIR);
    let long = "x".repeat(256);
    assert_eq!(errno_of(File::create(d.join(&long))), libc::ENAMETOOLONG);
    File::create(d.join("x".repeat(255))).unwrap();
    assert_eq!(
        errno_of(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(d.join("a.txt"))
        ),
        libc::EEXIST
    );

    let mut names: Vec<String> = fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["a.txt".to_string(), "sub".into(), "x".repeat(255)]
    );

    fs::remove_file(d.join("a.txt")).unwrap();
    fs::remove_file(d.join("x".repeat(255))).unwrap();
    fs::remove_dir(d.join("sub")).unwrap();
    fs::remove_dir(&d).unwrap();
    assert!(fs::read_dir(m.mountpoint.clone()).unwrap().next().is_none());
    m.umount().unwrap();
}

#[test]
fn symlinks_hard_links_and_special_files() {
    let m = mount();
    fs::write(m.path("target"), b"data").unwrap();
    std::os::unix::fs::symlink("target", m.path("link")).unwrap();
    assert_eq!(fs::read_link(m.path("link")).unwrap(), Path::new("target"));
    assert_eq!(fs::read(m.path("link")).unwrap(), b"data");
    assert!(
        fs::symlink_metadata(m.path("link"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    std::os::unix::fs::symlink("nowhere", m.path("dangling")).unwrap();
    assert_eq!(errno_of(fs::read(m.path("dangling"))), libc::ENOENT);

    fs::hard_link(m.path("target"), m.path("hard")).unwrap();
    let a = fs::metadata(m.path("target")).unwrap();
    let b = fs::metadata(m.path("hard")).unwrap();
    assert_eq!(a.ino(), b.ino());
    assert_eq!(b.nlink(), 2);
    assert_eq!(
        errno_of(fs::hard_link(m.path("target"), m.path("hard"))),
        libc::EEXIST
    );
    fs::create_dir(m.path("d")).unwrap();
    assert_eq!(
        errno_of(fs::hard_link(m.path("d"), m.path("d2"))),
        libc::EPERM
    );
    fs::remove_file(m.path("target")).unwrap();
    assert_eq!(fs::metadata(m.path("hard")).unwrap().nlink(), 1);
    assert_eq!(fs::read(m.path("hard")).unwrap(), b"data");

    // A fifo and a device node.
    let fifo = cpath(&m.path("fifo"));
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(
        &fs::metadata(m.path("fifo")).unwrap().file_type()
    ));
    let dev = cpath(&m.path("null"));
    assert_eq!(
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::mknod(dev.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) },
        0
    );
    let md = fs::metadata(m.path("null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &md.file_type()
    ));
    assert_eq!(md.rdev(), libc::makedev(1, 3));
    m.umount().unwrap();
}

fn renameat2(from: &Path, to: &Path, flags: u32) -> i32 {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths; AT_FDCWD with absolute paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 { 0 } else { last_errno() }
}

#[test]
fn rename_variants() {
    let m = mount();
    fs::write(m.path("a"), b"A").unwrap();
    fs::write(m.path("b"), b"B").unwrap();
    // Rename over an existing file replaces it atomically.
    fs::rename(m.path("a"), m.path("b")).unwrap();
    assert_eq!(fs::read(m.path("b")).unwrap(), b"A");
    assert_eq!(errno_of(fs::metadata(m.path("a"))), libc::ENOENT);

    fs::write(m.path("c"), b"C").unwrap();
    assert_eq!(
        renameat2(&m.path("c"), &m.path("b"), libc::RENAME_NOREPLACE),
        libc::EEXIST
    );
    assert_eq!(
        renameat2(&m.path("c"), &m.path("b"), libc::RENAME_EXCHANGE),
        0
    );
    assert_eq!(fs::read(m.path("b")).unwrap(), b"C");
    assert_eq!(fs::read(m.path("c")).unwrap(), b"A");
    assert_eq!(
        renameat2(&m.path("c"), &m.path("nope"), libc::RENAME_EXCHANGE),
        libc::ENOENT
    );

    // Directories move with their contents; no moving below itself.
    fs::create_dir_all(m.path("x/y")).unwrap();
    fs::write(m.path("x/y/f"), b"deep").unwrap();
    fs::create_dir(m.path("z")).unwrap();
    fs::rename(m.path("x/y"), m.path("z/y")).unwrap();
    assert_eq!(fs::read(m.path("z/y/f")).unwrap(), b"deep");
    assert_eq!(fs::metadata(m.path("x")).unwrap().nlink(), 2);
    assert_eq!(fs::metadata(m.path("z")).unwrap().nlink(), 3);
    assert_eq!(
        errno_of(fs::rename(m.path("z"), m.path("z/y/inside"))),
        libc::EINVAL
    );
    // Onto an empty directory: replaced; onto a non-empty one: ENOTEMPTY.
    fs::rename(m.path("x"), m.path("z/y/empty_target_dir_missing")).unwrap();
    fs::create_dir(m.path("e")).unwrap();
    fs::rename(m.path("e"), m.path("z/y/empty_target_dir_missing")).unwrap();
    assert_eq!(
        errno_of(fs::rename(m.path("z"), m.path("b"))),
        libc::ENOTDIR
    );
    fs::create_dir(m.path("w")).unwrap();
    assert_eq!(
        errno_of(fs::rename(m.path("w"), m.path("z"))),
        libc::ENOTEMPTY
    );
    assert_eq!(errno_of(fs::rename(m.path("b"), m.path("w"))), libc::EISDIR);
    m.umount().unwrap();
}

#[test]
fn attributes_and_times() {
    let m = mount();
    let p = m.path("f");
    fs::write(&p, b"x").unwrap();
    fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(&p, Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    let f = File::options().write(true).open(&p).unwrap();
    let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
    f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t))
        .unwrap();
    let md = fs::metadata(&p).unwrap();
    assert_eq!((md.mtime(), md.mtime_nsec()), (1_600_000_000, 123_456_789));
    assert_eq!((md.atime(), md.atime_nsec()), (1_600_000_000, 123_456_789));
    // statfs answers with sane numbers.
    let c = cpath(&m.mountpoint);
    // SAFETY: zeroed statvfs is a valid out-parameter; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
    assert!(st.f_blocks > 0 && st.f_bfree <= st.f_blocks && st.f_files > 0);
    assert_eq!(st.f_namemax, 255);
    drop(f);
    m.umount().unwrap();
}

#[test]
fn sparse_files_truncate_and_fallocate() {
    let m = mount();
    let p = m.path("sparse");
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&p)
        .unwrap();
    f.seek(SeekFrom::Start(10 << 20)).unwrap();
    f.write_all(b"tail").unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::metadata(&p).unwrap().len(), (10 << 20) + 4);
    let all = fs::read(&p).unwrap();
    assert!(all[..10 << 20].iter().all(|&b| b == 0));
    assert_eq!(&all[10 << 20..], b"tail");

    // Shrink, then grow: the cut data must not come back.
    f.set_len(5).unwrap();
    assert_eq!(fs::read(&p).unwrap(), vec![0; 5]);
    f.set_len(100).unwrap();
    assert_eq!(fs::read(&p).unwrap(), vec![0; 100]);
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(&[7; 100]).unwrap();
    f.set_len(50).unwrap();
    f.set_len(80).unwrap();
    let mut expect = vec![7; 50];
    expect.extend_from_slice(&[0; 30]);
    assert_eq!(fs::read(&p).unwrap(), expect);

    // fallocate: mode 0 extends, punch-hole zeroes, unsupported modes are EOPNOTSUPP.
    let fd = f.as_raw_fd();
    // SAFETY: fd is open for writing.
    assert_eq!(unsafe { libc::fallocate(fd, 0, 0, 4096) }, 0);
    assert_eq!(fs::metadata(&p).unwrap().len(), 4096);
    assert_eq!(
        // SAFETY: as above.
        unsafe {
            libc::fallocate(
                fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                10,
                20,
            )
        },
        0
    );
    let data = fs::read(&p).unwrap();
    assert_eq!(&data[..10], &[7; 10]);
    assert!(data[10..30].iter().all(|&b| b == 0));
    assert_eq!(&data[30..50], &[7; 20]);
    assert_eq!(
        // SAFETY: as above.
        unsafe { libc::fallocate(fd, libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096) },
        -1
    );
    assert_eq!(last_errno(), libc::EOPNOTSUPP);
    // SEEK_DATA / SEEK_HOLE: the whole file is data.
    // SAFETY: as above.
    assert_eq!(unsafe { libc::lseek(fd, 100, libc::SEEK_DATA) }, 100);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::lseek(fd, 100, libc::SEEK_HOLE) }, 4096);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::lseek(fd, 5000, libc::SEEK_DATA) }, -1);
    assert_eq!(last_errno(), libc::ENXIO);
    drop(f);
    m.umount().unwrap();
}

#[test]
fn large_file_checksum_and_persistence_across_remount() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    let mnt = dir.path().join("mnt");
    let m = TestMount::at(&home, &mnt, &MountOptions::default()).unwrap();
    let size = 256 << 20;
    let mut hasher = crc32c_state();
    {
        let mut f = File::create(m.path("big")).unwrap();
        for i in 0..(size / (1 << 20)) {
            let block = pattern(1 << 20, i as u64);
            hasher = crc32c_update(hasher, &block);
            f.write_all(&block).unwrap();
        }
        f.sync_all().unwrap();
    }
    fs::write(m.path("small"), b"persist me").unwrap();
    fs::create_dir(m.path("dir")).unwrap();
    std::os::unix::fs::symlink("small", m.path("sym")).unwrap();
    m.umount().unwrap();

    let m = TestMount::at(&home, &mnt, &MountOptions::default()).unwrap();
    assert_eq!(fs::metadata(m.path("big")).unwrap().len(), size as u64);
    let mut f = File::open(m.path("big")).unwrap();
    let mut buf = vec![0; 1 << 20];
    let mut check = crc32c_state();
    let mut total = 0;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        check = crc32c_update(check, &buf[..n]);
        total += n;
    }
    assert_eq!(total, size);
    assert_eq!(
        check, hasher,
        "the 256 MiB file reads back with the same checksum"
    );
    // Random reads land on the right bytes too.
    for i in [0u64, 17, 131, 255] {
        f.seek(SeekFrom::Start(i << 20)).unwrap();
        let mut b = vec![0; 4096];
        f.read_exact(&mut b).unwrap();
        assert_eq!(b, pattern(1 << 20, i)[..4096]);
    }
    assert_eq!(fs::read(m.path("small")).unwrap(), b"persist me");
    assert!(fs::metadata(m.path("dir")).unwrap().is_dir());
    assert_eq!(fs::read_link(m.path("sym")).unwrap(), Path::new("small"));
    drop(f);
    m.umount().unwrap();
}

/// A small CRC (FNV-1a 64) to compare file contents without keeping them.
fn crc32c_state() -> u64 {
    0xcbf2_9ce4_8422_2325
}

fn crc32c_update(mut h: u64, data: &[u8]) -> u64 {
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

#[test]
fn unlink_while_open_keeps_data_until_close() {
    let m = mount();
    let p = m.path("doomed");
    fs::write(&p, b"still here").unwrap();
    let mut r = File::open(&p).unwrap();
    let mut w = OpenOptions::new().append(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    assert_eq!(errno_of(fs::metadata(&p)), libc::ENOENT);
    w.write_all(b", and more").unwrap();
    w.flush().unwrap();
    let mut s = String::new();
    r.read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here, and more");
    assert_eq!(r.metadata().unwrap().nlink(), 0);
    drop(r);
    drop(w);
    // A new file of the same name is a new file.
    fs::write(&p, b"new").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"new");
    m.umount().unwrap();
}

#[test]
fn xattrs() {
    let m = mount();
    let p = cpath(&m.path("f"));
    fs::write(m.path("f"), b"").unwrap();
    let set = |name: &str, val: &[u8], flags: i32| {
        let n = CString::new(name).unwrap();
        // SAFETY: valid pointers and lengths.
        let r = unsafe {
            libc::setxattr(
                p.as_ptr(),
                n.as_ptr(),
                val.as_ptr().cast(),
                val.len(),
                flags,
            )
        };
        if r == 0 { 0 } else { last_errno() }
    };
    let get = |name: &str| -> Result<Vec<u8>, i32> {
        let n = CString::new(name).unwrap();
        let mut buf = vec![0u8; 256];
        // SAFETY: valid pointers; buf has room for 256 bytes.
        let r =
            unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if r < 0 {
            return Err(last_errno());
        }
        buf.truncate(r as usize);
        Ok(buf)
    };
    assert_eq!(set("user.color", b"blue", 0), 0);
    assert_eq!(get("user.color").unwrap(), b"blue");
    assert_eq!(set("user.color", b"red", libc::XATTR_CREATE), libc::EEXIST);
    assert_eq!(
        set("user.shape", b"round", libc::XATTR_REPLACE),
        libc::ENODATA
    );
    assert_eq!(set("user.shape", &[0, 1, 2, 255], 0), 0);
    assert_eq!(get("user.shape").unwrap(), vec![0, 1, 2, 255]);
    assert_eq!(get("user.none"), Err(libc::ENODATA));
    // A buffer that is too small is ERANGE; size 0 asks for the size.
    let n = CString::new("user.color").unwrap();
    let mut tiny = [0u8; 2];
    assert_eq!(
        // SAFETY: valid pointers and lengths.
        unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), tiny.as_mut_ptr().cast(), 2) },
        -1
    );
    assert_eq!(last_errno(), libc::ERANGE);
    assert_eq!(
        // SAFETY: size 0 with a null buffer asks for the length.
        unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) },
        4
    );
    let mut list = vec![0u8; 256];
    // SAFETY: valid pointers and lengths.
    let len = unsafe { libc::listxattr(p.as_ptr(), list.as_mut_ptr().cast(), list.len()) };
    assert!(len > 0);
    let mut names: Vec<&[u8]> = list[..len as usize]
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .collect();
    names.sort();
    assert_eq!(names, vec![&b"user.color"[..], b"user.shape"]);
    // SAFETY: valid pointers.
    assert_eq!(unsafe { libc::removexattr(p.as_ptr(), n.as_ptr()) }, 0);
    assert_eq!(get("user.color"), Err(libc::ENODATA));
    m.umount().unwrap();
}

#[test]
fn posix_locks_and_flock_between_processes() {
    let m = mount();
    let p = m.path("locked");
    let q = m.path("flocked");
    fs::write(&p, b"0123456789").unwrap();
    fs::write(&q, b"").unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    let mut lk = flock_struct(libc::F_WRLCK, 0, 5);
    // SAFETY: valid fd and flock struct.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &lk) }, 0);
    let hold = File::open(&q).unwrap();
    // SAFETY: valid fd.
    assert_eq!(unsafe { libc::flock(hold.as_raw_fd(), libc::LOCK_EX) }, 0);

    // Another process (another lock owner) sees both locks and can lock elsewhere.
    let (pp, qq) = (p.clone(), q.clone());
    let code = run_in_child(move || {
        let g = OpenOptions::new().read(true).write(true).open(&pp).unwrap();
        let mut l = flock_struct(libc::F_WRLCK, 2, 1);
        // SAFETY: valid fd and flock struct.
        if unsafe { libc::fcntl(g.as_raw_fd(), libc::F_SETLK, &l) } != -1
            || last_errno() != libc::EAGAIN
        {
            return 1;
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(g.as_raw_fd(), libc::F_GETLK, &mut l) } != 0
            || l.l_type != libc::F_WRLCK as i16
        {
            return 2;
        }
        if (l.l_start, l.l_len) != (0, 5) {
            return 3;
        }
        let r = flock_struct(libc::F_WRLCK, 5, 5);
        // SAFETY: as above.
        if unsafe { libc::fcntl(g.as_raw_fd(), libc::F_SETLK, &r) } != 0 {
            return 4;
        }
        let h = File::open(&qq).unwrap();
        // SAFETY: valid fd.
        if unsafe { libc::flock(h.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != -1
            || last_errno() != libc::EWOULDBLOCK
        {
            return 5;
        }
        0
    });
    assert_eq!(
        code, 0,
        "the other process saw the locks (failed check #{code})"
    );

    // F_SETLKW waits until the holder unlocks.
    let pp = p.clone();
    let waiter = std::thread::spawn(move || {
        run_in_child(move || {
            let g = OpenOptions::new().read(true).write(true).open(&pp).unwrap();
            let l = flock_struct(libc::F_WRLCK, 0, 1);
            let t = std::time::Instant::now();
            // SAFETY: valid fd and flock struct.
            if unsafe { libc::fcntl(g.as_raw_fd(), libc::F_SETLKW, &l) } != 0 {
                return 1;
            }
            if t.elapsed() < std::time::Duration::from_millis(150) {
                return 2;
            }
            0
        })
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    lk.l_type = libc::F_UNLCK as i16;
    // SAFETY: valid fd and flock struct.
    assert_eq!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &lk) }, 0);
    assert_eq!(waiter.join().unwrap(), 0, "F_SETLKW waited for the unlock");

    // Closing releases: the flock with the file, POSIX locks with any close.
    drop(hold);
    assert_eq!(
        // SAFETY: valid fd and flock struct.
        unsafe {
            libc::fcntl(
                f.as_raw_fd(),
                libc::F_SETLK,
                &flock_struct(libc::F_RDLCK, 0, 0),
            )
        },
        0
    );
    drop(f);
    let (pp, qq) = (p.clone(), q.clone());
    let code = run_in_child(move || {
        let g = OpenOptions::new().read(true).write(true).open(&pp).unwrap();
        let l = flock_struct(libc::F_WRLCK, 0, 0);
        // SAFETY: valid fd and flock struct.
        if unsafe { libc::fcntl(g.as_raw_fd(), libc::F_SETLK, &l) } != 0 {
            return 1;
        }
        let h = File::open(&qq).unwrap();
        // The flock goes with the kernel's (asynchronous) RELEASE of the holder's file.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        // SAFETY: valid fd.
        while unsafe { libc::flock(h.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if std::time::Instant::now() > deadline {
                return 2;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        0
    });
    assert_eq!(code, 0, "locks were released (failed check #{code})");
    m.umount().unwrap();
}

fn flock_struct(typ: i32, start: i64, len: i64) -> libc::flock {
    libc::flock {
        l_type: typ as i16,
        l_whence: libc::SEEK_SET as i16,
        l_start: start,
        l_len: len,
        l_pid: 0,
    }
}

/// Runs `f` in a forked child (a separate lock owner) and returns its exit code.
fn run_in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child only runs `f` (file and fcntl calls) and exits with _exit.
    match unsafe { libc::fork() } {
        0 => {
            let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or(99);
            // SAFETY: terminate the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        pid if pid > 0 => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else {
                -1
            }
        }
        _ => panic!("fork failed"),
    }
}

#[test]
fn many_threads_create_in_one_directory() {
    let m = mount();
    let d = m.path("crowd");
    fs::create_dir(&d).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    fs::write(d.join(format!("t{t}-{i}")), format!("{t}:{i}")).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let entries: Vec<_> = fs::read_dir(&d).unwrap().map(|e| e.unwrap()).collect();
    assert_eq!(entries.len(), 800);
    let mut inos: Vec<u64> = entries.iter().map(|e| e.ino()).collect();
    inos.sort_unstable();
    inos.dedup();
    assert_eq!(inos.len(), 800, "every file has its own inode");
    // A DirEntry keeps its directory open.
    drop(entries);
    for t in 0..8 {
        for i in (0..100).step_by(33) {
            assert_eq!(
                fs::read_to_string(d.join(format!("t{t}-{i}"))).unwrap(),
                format!("{t}:{i}")
            );
        }
    }
    m.umount().unwrap();
}

#[test]
fn readdir_streams_large_directories() {
    let m = mount();
    let d = m.path("big");
    fs::create_dir(&d).unwrap();
    for i in 0..3000 {
        File::create(d.join(format!("entry-with-a-longish-name-{i:05}"))).unwrap();
    }
    let mut n = 0;
    for e in fs::read_dir(&d).unwrap() {
        let e = e.unwrap();
        assert!(e.file_type().unwrap().is_file());
        n += 1;
    }
    assert_eq!(n, 3000);
    m.umount().unwrap();
}

#[test]
fn permission_checks_for_a_non_root_caller() {
    let m = mount();
    fs::create_dir(m.path("private")).unwrap();
    fs::set_permissions(m.path("private"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::write(m.path("private/secret"), b"s").unwrap();
    fs::write(m.path("readonly"), b"r").unwrap();
    fs::set_permissions(m.path("readonly"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::create_dir(m.path("shared")).unwrap();
    fs::set_permissions(m.path("shared"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(m.path("shared/roots"), b"r").unwrap();
    let mp = m.mountpoint.clone();
    let code = run_in_child(move || {
        // SAFETY: dropping privileges in the forked child only.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(1000) != 0
                || libc::setuid(1000) != 0
            {
                return 10;
            }
        }
        if errno_of(fs::read(mp.join("private/secret"))) != libc::EACCES {
            return 1;
        }
        if errno_of(fs::read_dir(mp.join("private"))) != libc::EACCES {
            return 2;
        }
        if fs::read(mp.join("readonly")).ok().as_deref() != Some(b"r") {
            return 3;
        }
        if errno_of(OpenOptions::new().write(true).open(mp.join("readonly"))) != libc::EACCES {
            return 4;
        }
        if errno_of(fs::set_permissions(
            mp.join("readonly"),
            fs::Permissions::from_mode(0o777),
        )) != libc::EPERM
        {
            return 5;
        }
        // Sticky directory: can create own files, cannot delete root's.
        if fs::write(mp.join("shared/mine"), b"m").is_err() {
            return 6;
        }
        if fs::metadata(mp.join("shared/mine")).map(|m| m.uid()).ok() != Some(1000) {
            return 7;
        }
        if errno_of(fs::remove_file(mp.join("shared/roots"))) != libc::EPERM {
            return 8;
        }
        if errno_of(File::create(mp.join("private/not-allowed"))) != libc::EACCES {
            return 9;
        }
        0
    });
    assert_eq!(
        code, 0,
        "non-root caller got the right errnos (failed check #{code})"
    );
    m.umount().unwrap();
}

#[test]
fn fsync_and_concurrent_readers_writers() {
    let m = mount();
    let p = m.path("log");
    let mut w = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)
        .unwrap();
    let mut expected = Vec::new();
    for i in 0..2000 {
        let line = format!("record {i:06} {}\n", "x".repeat(i % 50));
        w.write_all(line.as_bytes()).unwrap();
        expected.extend_from_slice(line.as_bytes());
        if i % 500 == 0 {
            w.sync_data().unwrap();
            // Another open sees everything written before the fsync.
            let seen = fs::read(&p).unwrap();
            assert_eq!(seen, expected);
        }
    }
    drop(w);
    assert_eq!(fs::read(&p).unwrap(), expected);
    m.umount().unwrap();
}
