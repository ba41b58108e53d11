//! Mount, use, unmount, as a user would: `baton mount` (foreground and `--background`),
//! files written and read back through the mount, `baton status`, `baton umount` (busy,
//! lazy), SIGTERM, a client killed under a live mount, a mount removed from outside.
//! Runs as root with the real /dev/fuse; every test detaches its mount and stops its
//! processes even when it fails.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use handover_proto::message::CHANNEL_FD_ENV;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const BATON: &str = env!("CARGO_BIN_EXE_baton");
const TIMEOUT: Duration = Duration::from_secs(30);

fn root_with_client() -> bool {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root");
        return false;
    }
    let client = Path::new(BATON).with_file_name("baton-fs");
    assert!(
        client.exists(),
        "{} is missing: run `cargo test --workspace`",
        client.display()
    );
    true
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A temp home and mountpoint, and the supervisor we started; on drop: SIGTERM (then
/// SIGKILL) to that supervisor, and the mountpoint detached.
struct Fixture {
    dir: tempfile::TempDir,
    supervisor: Option<Child>,
    log: std::fs::File,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("baton-cycle-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("mnt")).expect("mkdir");
        let log = tempfile::tempfile().expect("log file");
        Fixture {
            dir,
            supervisor: None,
            log,
        }
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BATON);
        c.args(args)
            .env("BATON_HOME", self.home())
            .env_remove(CHANNEL_FD_ENV)
            .stdin(Stdio::null());
        c
    }

    /// `baton` with a result; never a serving command.
    fn run(&self, args: &[&str]) -> std::process::Output {
        self.cmd(args).output().expect("run baton")
    }

    /// Starts `baton mount` in the foreground and waits until it serves.
    fn mount_foreground(&mut self, extra: &[&str]) {
        let mnt = self.mnt().display().to_string();
        let mut args = vec!["mount", mnt.as_str()];
        args.extend_from_slice(extra);
        let child = self
            .cmd(&args)
            .stdout(self.log.try_clone().expect("dup"))
            .stderr(self.log.try_clone().expect("dup"))
            .spawn()
            .expect("spawn baton mount");
        self.supervisor = Some(child);
        let mnt = self.mnt();
        wait_until("the mount serves", || {
            if let Some(Ok(Some(status))) = self.supervisor.as_mut().map(Child::try_wait) {
                panic!("baton mount exited early ({status}): {}", self.log_text());
            }
            is_mounted(&mnt) && std::fs::metadata(&mnt).is_ok()
        });
    }

    fn log_text(&self) -> String {
        let mut f = self.log.try_clone().expect("dup");
        let mut s = String::new();
        let _ = f.seek(SeekFrom::Start(0));
        let _ = f.read_to_string(&mut s);
        s
    }

    /// Waits for the foreground supervisor to exit.
    fn wait_supervisor(&mut self) -> ExitStatus {
        let child = self.supervisor.as_mut().expect("a foreground supervisor");
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                self.supervisor = None;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "supervisor did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn supervisor_pid(&self) -> Pid {
        Pid::from_raw(self.supervisor.as_ref().expect("supervisor").id() as i32)
    }

    /// The client's pid, from `baton status`.
    fn client_pid(&self) -> Pid {
        let out = self.run(&["status", &self.mnt().display().to_string()]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let pid = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("client:"))
            .and_then(|l| l.split("pid ").nth(1))
            .and_then(|l| l.split(',').next())
            .and_then(|p| p.trim().parse::<i32>().ok())
            .unwrap_or_else(|| panic!("no client pid in {text}"));
        Pid::from_raw(pid)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(mut child) = self.supervisor.take() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.mnt()) {
            // A background supervisor: ask it, then detach whatever is left.
            let _ = self.run(&["umount", "--lazy", &self.mnt().display().to_string()]);
        }
        while is_mounted(&self.mnt()) {
            if nix::mount::umount2(&self.mnt(), nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

#[test]
fn foreground_mount_write_read_umount_and_remount() {
    if !root_with_client() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_foreground(&[]);
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::create_dir(f.mnt().join("dir")).expect("mkdir");
    std::fs::write(f.mnt().join("dir/file"), &data).expect("write");
    assert_eq!(std::fs::read(f.mnt().join("dir/file")).expect("read"), data);

    let status = f.run(&["status", &f.mnt().display().to_string()]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        status.status.success()
            && text.contains("generation 1")
            && text.contains("volume:     default"),
        "{text}"
    );

    let out = f.run(&["umount", &f.mnt().display().to_string()]);
    assert!(
        out.status.success(),
        "umount: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(f.wait_supervisor().success(), "{}", f.log_text());
    assert!(!is_mounted(&f.mnt()));
    assert!(
        std::fs::read_dir(f.home().join("run"))
            .expect("run dir")
            .next()
            .is_none(),
        "socket left behind"
    );

    // Everything was flushed: a new mount sees it.
    f.mount_foreground(&[]);
    assert_eq!(
        std::fs::read(f.mnt().join("dir/file")).expect("read after remount"),
        data
    );
    let out = f.run(&["umount", &f.mnt().display().to_string()]);
    assert!(out.status.success());
    assert!(f.wait_supervisor().success());
}

#[test]
fn sigterm_unmounts_cleanly() {
    if !root_with_client() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_foreground(&[]);
    std::fs::write(f.mnt().join("kept"), b"after sigterm").expect("write");
    kill(f.supervisor_pid(), Signal::SIGTERM).expect("kill");
    assert!(f.wait_supervisor().success(), "{}", f.log_text());
    assert!(!is_mounted(&f.mnt()));
    f.mount_foreground(&[]);
    assert_eq!(
        std::fs::read(f.mnt().join("kept")).expect("read"),
        b"after sigterm"
    );
}

#[test]
fn busy_umount_keeps_serving_and_lazy_detaches() {
    if !root_with_client() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_foreground(&[]);
    let mnt = f.mnt().display().to_string();
    let file = std::fs::File::create(f.mnt().join("open")).expect("create");
    let out = f.run(&["umount", &mnt]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("busy"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&f.mnt()));
    assert!(
        std::fs::metadata(f.mnt().join("open")).is_ok(),
        "still serving after a busy umount"
    );
    let out = f.run(&["umount", "--lazy", &mnt]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(file);
    assert!(f.wait_supervisor().success(), "{}", f.log_text());
    assert!(!is_mounted(&f.mnt()));
}

#[test]
fn background_mount_returns_once_serving() {
    if !root_with_client() {
        return;
    }
    let f = Fixture::new();
    let mnt = f.mnt().display().to_string();
    let out = f.run(&["mount", &mnt, "--background"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Serving right away, not eventually.
    std::fs::write(f.mnt().join("bg"), b"background").expect("write");
    assert_eq!(
        std::fs::read(f.mnt().join("bg")).expect("read"),
        b"background"
    );
    let logs: Vec<_> = std::fs::read_dir(f.home().join("log"))
        .expect("log dir")
        .collect();
    assert_eq!(logs.len(), 1);
    let out = f.run(&["umount", &mnt]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_until("unmounted", || !is_mounted(&f.mnt()));

    // A background mount that cannot start says why and exits non-zero.
    let out = f.run(&[
        "mount",
        &mnt,
        "--background",
        "--meta",
        "redb:///nonexistent/x/meta.redb",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not formatted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!is_mounted(&f.mnt()));
}

#[test]
fn killed_client_is_replaced_and_the_mount_serves_on() {
    if !root_with_client() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_foreground(&[]);
    std::fs::write(f.mnt().join("kept"), b"before the kill").expect("write");
    let first = f.client_pid();
    kill(first, Signal::SIGKILL).expect("kill client");
    // A successor takes the connection over; nothing was unmounted.
    wait_until("another client serves", || {
        let out = f.run(&["status", &f.mnt().display().to_string()]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("state:      serving") && !text.contains(&format!("pid {first},"))
    });
    assert!(is_mounted(&f.mnt()));
    assert_eq!(
        std::fs::read(f.mnt().join("kept")).expect("read after the kill"),
        b"before the kill"
    );
    std::fs::write(f.mnt().join("new"), b"after the kill").expect("write after the kill");
    assert!(
        f.log_text().contains("exited unexpectedly"),
        "{}",
        f.log_text()
    );
    kill(f.supervisor_pid(), Signal::SIGTERM).expect("kill");
    assert!(f.wait_supervisor().success(), "{}", f.log_text());
    assert!(!is_mounted(&f.mnt()));
}

#[test]
fn mount_removed_from_outside_stops_the_supervisor() {
    if !root_with_client() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_foreground(&[]);
    nix::mount::umount2(&f.mnt(), nix::mount::MntFlags::empty()).expect("umount2");
    assert!(f.wait_supervisor().success(), "{}", f.log_text());
}

#[test]
fn umount_without_a_supervisor_unmounts_directly() {
    if !root_with_client() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_foreground(&[]);
    let client = f.client_pid();
    kill(f.supervisor_pid(), Signal::SIGKILL).expect("kill supervisor");
    f.wait_supervisor();
    // The client still holds the connection: the mount serves.
    assert!(std::fs::read_dir(f.mnt()).is_ok());
    let out = f.run(&["umount", &f.mnt().display().to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("unmounted it directly"));
    assert!(!is_mounted(&f.mnt()));
    // The orphaned client notices the end of its connection, flushes and exits.
    wait_until("the client exits", || kill(client, None).is_err());
}
