//! A real `baton-csi` process on a Unix socket in a temporary directory, a gRPC client
//! over that socket, and cleanup that leaves no mount and no process behind, even when
//! the test fails.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use csi_node::mountinfo::MountTable;
use csi_node::proto::controller_client::ControllerClient;
use csi_node::proto::identity_client::IdentityClient;
use csi_node::proto::node_client::NodeClient;
use csi_node::proto::{
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, ProbeRequest, VolumeCapability,
    volume_capability,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The `baton` CLI built by this workspace (`cargo test --workspace` builds it).
pub fn baton_bin() -> PathBuf {
    let b = testkit::mount::baton_bin();
    assert!(
        b.is_file(),
        "{} is missing: build it with `cargo build -p supervisor`",
        b.display()
    );
    b
}

/// Options of a driver process.
#[derive(Clone, Debug)]
pub struct DriverOptions {
    pub services: &'static str,
    pub mount_mode: &'static str,
    pub node_id: String,
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub mount_timeout_secs: u32,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            services: "node",
            mount_mode: "process",
            node_id: "test-node".into(),
            extra_args: Vec::new(),
            env: Vec::new(),
            mount_timeout_secs: 60,
        }
    }
}

/// A running `baton-csi` with its own state directory. Dropping it kills the process and
/// tears down every mount under its directory.
#[derive(Debug)]
pub struct Driver {
    pub dir: tempfile::TempDir,
    pub state: PathBuf,
    pub socket: PathBuf,
    pub opts: DriverOptions,
    child: Option<Child>,
}

impl Driver {
    pub fn start(opts: DriverOptions) -> Driver {
        let dir = tempfile::Builder::new()
            .prefix("baton-csi-test-")
            .tempdir()
            .unwrap();
        let state = dir.path().join("state");
        let socket = dir.path().join("csi.sock");
        let mut d = Driver {
            dir,
            state,
            socket,
            opts,
            child: None,
        };
        d.spawn();
        d
    }

    /// Starts (again) the process on the same state directory.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("baton-csi.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_baton-csi"));
        cmd.args(["--endpoint", &format!("unix://{}", self.socket.display())])
            .args(["--node-id", &self.opts.node_id])
            .args(["--services", self.opts.services])
            .args(["--mount-mode", self.opts.mount_mode])
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--baton-bin")
            .arg(baton_bin())
            .args(["--mount-timeout", &self.opts.mount_timeout_secs.to_string()])
            .args(&self.opts.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        let _ = std::fs::remove_file(&self.socket);
        self.child = Some(cmd.spawn().unwrap());
        let deadline = Instant::now() + Duration::from_secs(60);
        // The socket file appears at bind(2), before listen(2): wait until a connect works.
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("baton-csi exited with {st}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "baton-csi did not listen:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("baton-csi.log")).unwrap_or_default()
    }

    /// Every log this test's processes wrote: baton-csi's, the backends' supervisors and
    /// clients (`<state>/home/log/`, process mode), and the mount pods' output as the fake
    /// kubelet keeps it (`kubelet/`, pod mode).
    pub fn all_logs(&self) -> Vec<(PathBuf, String)> {
        let mut logs = vec![(self.dir.path().join("baton-csi.log"), self.log())];
        for dir in [self.state.join("home/log"), self.dir.path().join("kubelet")] {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let text = std::fs::read(e.path()).unwrap_or_default();
                logs.push((e.path(), String::from_utf8_lossy(&text).into_owned()));
            }
        }
        logs
    }

    /// Panics if any log, or any record in the state directory, contains one of `secrets`.
    pub fn assert_no_secret_logged(&self, secrets: &[&str]) {
        let mut files = self.all_logs();
        for dir in ["backends", "targets"] {
            for e in std::fs::read_dir(self.state.join(dir))
                .into_iter()
                .flatten()
                .flatten()
            {
                files.push((e.path(), std::fs::read_to_string(e.path()).unwrap()));
            }
        }
        for (path, text) in &files {
            for s in secrets {
                assert!(
                    !text.contains(s),
                    "{} contains the secret {s:?}:\n{text}",
                    path.display()
                );
            }
        }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn channel(&self) -> Channel {
        let path = self.socket.clone();
        Endpoint::try_from("http://[::1]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap()
    }

    pub async fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel().await)
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    pub async fn wait_ready(&self) {
        let mut id = self.identity().await;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = id.probe(ProbeRequest {}).await.unwrap().into_inner().ready;
            if ready == Some(true) {
                return;
            }
            assert!(Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A target path under the test directory (not created: the driver creates it).
    pub fn target(&self, name: &str) -> PathBuf {
        self.dir.path().join("pods").join(name).join("mount")
    }

    /// Baton mounts of backends (under state/mnt).
    pub fn backend_mounts(&self) -> Vec<PathBuf> {
        let mnt = self.state.join("mnt");
        MountTable::read()
            .unwrap()
            .0
            .into_iter()
            .filter(|e| e.is_baton() && e.mountpoint.starts_with(&mnt))
            .map(|e| e.mountpoint)
            .collect()
    }

    /// Records of backends in the state directory.
    pub fn backend_records(&self) -> usize {
        std::fs::read_dir(self.state.join("backends"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

/// Unmounts everything mounted under `root` (deepest first): through `baton umount` for
/// Baton mounts (the supervisor exits), then directly.
pub fn unmount_all_under(root: &Path, baton_home: &Path) {
    for _ in 0..3 {
        let Ok(t) = MountTable::read() else { return };
        let mut mps: Vec<_> =
            t.0.iter()
                .filter(|e| e.mountpoint.starts_with(root))
                .cloned()
                .collect();
        if mps.is_empty() {
            return;
        }
        mps.sort_by_key(|e| std::cmp::Reverse(e.mountpoint.as_os_str().len()));
        for e in mps {
            if e.is_baton() && e.root == Path::new("/") {
                let _ = Command::new(testkit::mount::baton_bin())
                    .arg("umount")
                    .arg(&e.mountpoint)
                    .arg("--lazy")
                    .env("BATON_HOME", baton_home)
                    .output();
            }
            let _ = nix::mount::umount2(&e.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.kill();
        unmount_all_under(self.dir.path(), &self.state.join("home"));
    }
}

/// A mount capability with `mode` and flags.
pub fn mount_cap(mode: volume_capability::access_mode::Mode, flags: &[&str]) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume {
                fs_type: String::new(),
                mount_flags: flags.iter().map(|s| s.to_string()).collect(),
                volume_mount_group: String::new(),
            },
        )),
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
    }
}

pub fn rw_cap() -> VolumeCapability {
    mount_cap(
        volume_capability::access_mode::Mode::MultiNodeMultiWriter,
        &[],
    )
}

/// An embedded Baton volume under `dir`, formatted by the driver on first use.
pub fn embedded_secrets(dir: &Path) -> HashMap<String, String> {
    HashMap::from([
        (
            "metaurl".into(),
            format!("redb://{}", dir.join("vol/meta.redb").display()),
        ),
        ("name".into(), "vol".into()),
        (
            "storage".into(),
            format!("fs://{}", dir.join("vol/data").display()),
        ),
    ])
}

pub fn publish_req(
    volume_id: &str,
    target: &Path,
    secrets: &HashMap<String, String>,
    subdir: Option<&str>,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(rw_cap()),
        readonly,
        secrets: secrets.clone(),
        volume_context: subdir
            .map(|s| HashMap::from([("subdir".to_string(), s.to_string())]))
            .unwrap_or_default(),
        ..Default::default()
    }
}

pub fn unpublish_req(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
    }
}

/// The gRPC code of a result.
pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => s.code(),
    }
}

/// Whether `path` is a mountpoint.
pub fn is_mounted(path: &Path) -> bool {
    MountTable::read().unwrap().at(path).is_some()
}
