//! The `baton` CLI's error cases, run like a user would (as root, with the real /dev/fuse):
//! each must fail with a clear message and a non-zero exit, and leave nothing mounted.
//!
//! The client-failure cases use a fake client: this test binary itself, started through a
//! small wrapper script, speaks the startup protocol and misbehaves on cue.

use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use handover_proto::channel;
use handover_proto::message::{CHANNEL_FD_ENV, Hello, ToClient, ToSupervisor};

const BATON: &str = env!("CARGO_BIN_EXE_baton");

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// How long one `baton` command may take in these tests (none of them should serve).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// Kills the process it holds (by its pid, which we started) unless it was reaped.
struct KillOnDrop(Option<Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `baton` with `BATON_HOME=home`; fails the test if it runs longer than
/// [`COMMAND_TIMEOUT`] (the caller's [`Scratch`] then detaches whatever it mounted).
fn baton(home: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BATON);
    cmd.args(args)
        .env("BATON_HOME", home)
        .env_remove(CHANNEL_FD_ENV)
        .stdin(Stdio::null());
    // Files, not pipes: a chatty child never blocks on a full pipe while we poll it.
    let mut out = tempfile::tempfile().expect("tempfile");
    let mut err = tempfile::tempfile().expect("tempfile");
    cmd.stdout(out.try_clone().expect("dup"))
        .stderr(err.try_clone().expect("dup"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut guard = KillOnDrop(Some(cmd.spawn().expect("run baton")));
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    loop {
        let child = guard.0.as_mut().expect("child");
        if let Some(status) = child.try_wait().expect("try_wait") {
            guard.0 = None;
            let read = |f: &mut std::fs::File| {
                let mut v = Vec::new();
                f.seek(SeekFrom::Start(0)).expect("seek");
                f.read_to_end(&mut v).expect("read");
                v
            };
            return Output {
                status,
                stdout: read(&mut out),
                stderr: read(&mut err),
            };
        }
        assert!(
            Instant::now() < deadline,
            "baton {args:?} did not finish within {COMMAND_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let want = path.display().to_string();
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// A temporary home and mountpoint; whatever is mounted there is detached on drop.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("baton-cli-")
            .tempdir()
            .expect("tempdir");
        std::fs::create_dir(dir.path().join("mnt")).expect("mkdir mnt");
        Scratch { dir }
    }
    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }
    fn mnt(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }
    fn mnt_str(&self) -> String {
        self.mnt().display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        while is_mounted(&self.mnt()) {
            if nix::mount::umount2(&self.mnt(), nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

/// Asserts a failed `baton` run whose message contains `needle`, and that nothing is
/// mounted at `mnt`.
fn assert_fails(o: &Output, needle: &str, mnt: &Path) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(
        err.contains(needle),
        "stderr does not mention {needle:?}: {err}"
    );
    assert!(!err.contains("panicked"), "baton panicked: {err}");
    assert!(!is_mounted(mnt), "{} was left mounted", mnt.display());
}

#[test]
fn not_root_is_refused() {
    let s = Scratch::new();
    let have_setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !is_root() || !have_setpriv {
        eprintln!("skipped: needs root and setpriv");
        return;
    }
    for extra in [&[][..], &["--background"][..]] {
        let mut cmd = Command::new("setpriv");
        cmd.args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            BATON,
            "mount",
        ])
        .arg(s.mnt())
        .args(extra)
        .env("BATON_HOME", s.home());
        let o = cmd.output().expect("setpriv baton");
        assert_fails(&o, "must run as root", &s.mnt());
    }
}

#[test]
fn missing_mountpoint() {
    let s = Scratch::new();
    let missing = s.dir.path().join("nope");
    let o = baton(&s.home(), &["mount", &missing.display().to_string()], &[]);
    if !is_root() {
        return assert_fails(&o, "must run as root", &missing);
    }
    assert_fails(&o, "does not exist", &missing);
}

#[test]
fn mountpoint_that_is_a_file() {
    let s = Scratch::new();
    let file = s.dir.path().join("file");
    std::fs::write(&file, b"x").expect("write");
    let o = baton(&s.home(), &["mount", &file.display().to_string()], &[]);
    if !is_root() {
        return;
    }
    assert_fails(&o, "is not a directory", &file);
}

#[test]
fn busy_mountpoint() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let s = Scratch::new();
    nix::mount::mount(
        Some("none"),
        &s.mnt(),
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mount tmpfs");
    let o = baton(&s.home(), &["mount", &s.mnt_str()], &[]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("is busy") && err.contains("tmpfs"), "{err}");
    // Only the tmpfs is there, and the home has no socket left behind.
    let run = s.home().join("run");
    assert!(!run.exists() || std::fs::read_dir(&run).expect("run dir").next().is_none());
}

#[test]
fn unformatted_volume() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let s = Scratch::new();
    let db = s.dir.path().join("x/meta.redb");
    let url = format!("redb://{}", db.display());
    let o = baton(&s.home(), &["mount", &s.mnt_str(), "--meta", &url], &[]);
    assert_fails(&o, "not formatted", &s.mnt());
    assert!(
        stderr(&o).contains("baton format"),
        "the message says what to do: {}",
        stderr(&o)
    );
    assert!(!db.exists(), "the check must not create a database");

    // An existing but empty database is unformatted too.
    std::fs::create_dir_all(db.parent().expect("parent")).expect("mkdir");
    drop(fsclient::meta::open(&url).expect("create empty db"));
    let o = baton(&s.home(), &["mount", &s.mnt_str(), "--meta", &url], &[]);
    assert_fails(&o, "not formatted", &s.mnt());
}

#[test]
fn bad_metadata_urls() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let s = Scratch::new();
    let o = baton(
        &s.home(),
        &["mount", &s.mnt_str(), "--meta", "foo://bar"],
        &[],
    );
    assert_fails(&o, "invalid metadata URL", &s.mnt());
    // Nothing listens on port 1.
    let o = baton(
        &s.home(),
        &["mount", &s.mnt_str(), "--meta", "redis://127.0.0.1:1/0"],
        &[],
    );
    assert_fails(&o, "127.0.0.1:1", &s.mnt());
}

#[test]
fn format_rules() {
    let s = Scratch::new();
    let o = baton(&s.home(), &["format", "vol1"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(s.home().join("vol1/meta.redb").is_file());
    assert!(s.home().join("vol1/data").is_dir());
    let o = baton(&s.home(), &["format", "vol1"], &[]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("already formatted") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    let o = baton(
        &s.home(),
        &["format", "vol1", "--force", "--capacity", "10G"],
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = baton(&s.home(), &["format", "vol2", "--block-size", "3K"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("block size"), "{}", stderr(&o));
    let o = baton(&s.home(), &["format", "../evil"], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("invalid volume name"), "{}", stderr(&o));
}

#[test]
fn bad_storage_url_fails_before_mounting() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let s = Scratch::new();
    let url = format!("redb://{}", s.dir.path().join("bad/meta.redb").display());
    let o = baton(
        &s.home(),
        &["format", "bad", "--meta", &url, "--storage", "bogus://x"],
        &[],
    );
    assert!(
        o.status.success(),
        "format accepts any URL syntax: {}",
        stderr(&o)
    );
    let client = Path::new(BATON).with_file_name("baton-fs");
    assert!(
        client.exists(),
        "{} is missing: run `cargo test --workspace`",
        client.display()
    );
    let o = baton(&s.home(), &["mount", &s.mnt_str(), "--meta", &url], &[]);
    assert_fails(&o, "client cannot serve the volume", &s.mnt());
}

#[test]
fn umount_of_something_not_mounted() {
    let s = Scratch::new();
    let o = baton(&s.home(), &["umount", &s.mnt_str()], &[]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not mounted"), "{}", stderr(&o));
}

// --- a misbehaving client -------------------------------------------------------------

const FAKE_MODE: &str = "BATON_TEST_FAKE_CLIENT";

/// A wrapper script that runs this test binary as the client, in [`fake_client`].
/// `baton rollout` runs `baton-csi rollout` with the arguments as given (options
/// included) and exits with its status; without a `baton-csi` it says where it looked.
#[test]
fn rollout_runs_baton_csi_rollout() {
    let s = Scratch::new();
    let fake = s.dir.path().join("baton-csi");
    let seen = s.dir.path().join("args");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf '%s\\n' \"$@\" > {}\nexit 2\n",
            seen.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let fake_env = fake.display().to_string();
    let o = baton(
        s.dir.path(),
        &[
            "rollout",
            "--to",
            "pod:baton:2",
            "--max-parallel",
            "5",
            "--help",
        ],
        &[("BATON_CSI", fake_env.as_str())],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap(),
        "rollout\n--to\npod:baton:2\n--max-parallel\n5\n--help\n"
    );

    let o = baton(
        s.dir.path(),
        &["rollout", "--status"],
        &[("BATON_CSI", "/nonexistent/baton-csi")],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("cannot run /nonexistent/baton-csi"),
        "{}",
        stderr(&o)
    );
}

fn fake_client_script(dir: &Path) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let script = dir.join("fake-client.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec '{}' --exact fake_client --nocapture --test-threads=1\n",
            exe.display()
        ),
    )
    .expect("write script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    script
}

/// Not a test of its own: when started by `baton mount` through the wrapper script, acts
/// as a client that fails in the way `BATON_TEST_FAKE_CLIENT` says. A no-op otherwise.
#[test]
fn fake_client() {
    let (Ok(fd), Ok(mode)) = (std::env::var(CHANNEL_FD_ENV), std::env::var(FAKE_MODE)) else {
        return;
    };
    let fd: i32 = fd.parse().expect("fd number");
    // SAFETY: the supervisor passed us this descriptor; nothing else here owns it.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let sock: BorrowedFd<'_> = sock.as_fd();
    let t = Some(Duration::from_secs(30));
    let (start, _) = channel::recv::<ToClient>(sock, t).expect("Start");
    assert!(matches!(start, ToClient::Start { .. }));
    if mode == "fail-at-start" {
        let reason = "fake: the object store said no".to_string();
        channel::send(sock, &ToSupervisor::Failed { reason }, &[]).expect("send");
        std::process::exit(1);
    }
    let prepared = ToSupervisor::Prepared {
        pid: std::process::id(),
        version: "fake".into(),
        hello: Hello {
            state_versions: vec![1],
            capabilities: Vec::new(),
        },
        session: 1,
    };
    channel::send(sock, &prepared, &[]).expect("send");
    let (init, fds) = channel::recv::<ToClient>(sock, t).expect("Init");
    assert!(matches!(init, ToClient::Init { .. }) && fds.len() == 1);
    match mode.as_str() {
        "die-at-init" => std::process::exit(3),
        "bad-reply" => {
            channel::send(
                sock,
                &ToSupervisor::InitReply {
                    reply: vec![16, 0, 0, 0, 0, 0, 0, 0],
                },
                &[],
            )
            .expect("send");
            // Wait for the supervisor's Shutdown and answer it.
            let (msg, _) = channel::recv::<ToClient>(sock, t).expect("Shutdown");
            assert_eq!(msg, ToClient::Shutdown);
            channel::send(sock, &ToSupervisor::ShutdownDone { error: None }, &[]).expect("send");
            std::process::exit(0);
        }
        other => panic!("unknown fake mode {other}"),
    }
}

fn run_with_fake(mode: &str) -> (Scratch, Output) {
    let s = Scratch::new();
    let script = fake_client_script(s.dir.path());
    let o = baton(
        &s.home(),
        &[
            "mount",
            &s.mnt_str(),
            "--client",
            &script.display().to_string(),
        ],
        &[(FAKE_MODE, mode)],
    );
    (s, o)
}

#[test]
fn client_failing_at_start_leaves_nothing_mounted() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (s, o) = run_with_fake("fail-at-start");
    assert_fails(&o, "fake: the object store said no", &s.mnt());
}

#[test]
fn client_dying_before_the_init_reply_does_not_leave_a_hanging_mount() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (s, o) = run_with_fake("die-at-init");
    assert_fails(&o, "client exited", &s.mnt());
    // The mountpoint is an ordinary, usable directory again.
    assert!(std::fs::read_dir(s.mnt()).is_ok());
}

#[test]
fn unusable_init_reply_is_refused() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let (s, o) = run_with_fake("bad-reply");
    assert_fails(&o, "INIT reply is unusable", &s.mnt());
    assert!(std::fs::read_dir(s.mnt()).is_ok());
}

#[test]
fn missing_client_binary() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let s = Scratch::new();
    let o = baton(
        &s.home(),
        &["mount", &s.mnt_str(), "--client", "/nonexistent/baton-fs"],
        &[],
    );
    assert_fails(&o, "/nonexistent/baton-fs", &s.mnt());
}
