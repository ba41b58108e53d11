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

    /// Every log, each headed by its path, as one text (for a failure message).
    pub fn logs(&self) -> String {
        self.all_logs()
            .into_iter()
            .map(|(p, t)| format!("== {}\n{t}", p.display()))
            .collect()
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

// ---- Shared by the Kubernetes upgrade tests (upgrade_k8s, rollout_k8s,
// rollout_scale_k8s): a verifying workload, `baton status`, images played by
// directories, the rollout command, the slot Leases. ----

/// Writes numbered records to a file it keeps open (appending, reading each record back
/// at its offset) and to small files it rewrites, in every directory, until stopped;
/// counts every error and mismatch, and at the end checks that the held file has every
/// record, in order.
pub struct Workload {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    errors: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// What the test is doing now ([`Workload::phase`]), named in every problem.
    phase: std::sync::Arc<std::sync::Mutex<String>>,
    /// Records done, per directory (in the order given).
    per_dir: Vec<std::sync::Arc<std::sync::atomic::AtomicU64>>,
    threads: Vec<std::thread::JoinHandle<Vec<String>>>,
}

impl Workload {
    /// One thread per directory, a record every 2 ms.
    pub fn start(dirs: &[PathBuf]) -> Workload {
        Workload::start_paced(dirs, Duration::from_millis(2))
    }

    /// One thread per directory, sleeping `pace` between records (many mounts on two
    /// cores need a slower pace than one).
    pub fn start_paced(dirs: &[PathBuf], pace: Duration) -> Workload {
        use std::io::{Read, Seek, SeekFrom, Write};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let errors = Arc::new(AtomicU64::new(0));
        let phase = Arc::new(std::sync::Mutex::new(String::from("start")));
        let per_dir: Vec<Arc<AtomicU64>> = dirs.iter().map(|_| Arc::default()).collect();
        let threads = dirs
            .iter()
            .zip(&per_dir)
            .map(|(dir, records)| {
                let (dir, stop, errors, records, phase) = (
                    dir.clone(),
                    stop.clone(),
                    errors.clone(),
                    records.clone(),
                    phase.clone(),
                );
                std::thread::spawn(move || {
                    let mut problems = Vec::new();
                    let mut fail = |what: String| {
                        errors.fetch_add(1, Ordering::AcqRel);
                        if problems.len() < 10 {
                            let during = phase.lock().map(|p| p.clone()).unwrap_or_default();
                            let at = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap_or_default();
                            problems.push(format!(
                                "{}: {what} (during {during}, at {}.{:03} s since the epoch)",
                                dir.display(),
                                at.as_secs(),
                                at.subsec_millis()
                            ));
                        }
                    };
                    let held = std::fs::OpenOptions::new()
                        .create(true)
                        .read(true)
                        .append(true)
                        .open(dir.join("held.log"));
                    let mut held = match held {
                        Ok(f) => f,
                        Err(e) => {
                            fail(format!("open held.log: {e}"));
                            return problems;
                        }
                    };
                    let mut n: u64 = 0;
                    while !stop.load(Ordering::Acquire) {
                        let rec = format!("record {n:08}\n");
                        if let Err(e) = held.write_all(rec.as_bytes()) {
                            fail(format!("append {n}: {e}"));
                        }
                        let mut back = vec![0u8; rec.len()];
                        let read = held
                            .seek(SeekFrom::Start(n * rec.len() as u64))
                            .and_then(|_| held.read_exact(&mut back));
                        match read {
                            Ok(()) if back == rec.as_bytes() => {}
                            Ok(()) => fail(format!("record {n} read back as {back:?}")),
                            Err(e) => {
                                // The size this descriptor sees and a fresh lookup's.
                                let fstat = held.metadata().map(|m| m.len()).ok();
                                let stat = std::fs::metadata(dir.join("held.log"))
                                    .map(|m| m.len())
                                    .ok();
                                fail(format!(
                                    "read back {n}: {e} (size by fstat {fstat:?}, by stat {stat:?}, {} expected)",
                                    (n + 1) * rec.len() as u64
                                ))
                            }
                        }
                        let f = dir.join(format!("file-{}", n % 50));
                        match std::fs::write(&f, rec.as_bytes()).and_then(|()| std::fs::read(&f)) {
                            Ok(b) if b == rec.as_bytes() => {}
                            Ok(b) => fail(format!("file {n}: {b:?}")),
                            Err(e) => fail(format!("file {n}: {e}")),
                        }
                        records.fetch_add(1, Ordering::AcqRel);
                        n += 1;
                        std::thread::sleep(pace);
                    }
                    // Every record is there, in order.
                    let mut all = String::new();
                    if let Err(e) = std::fs::File::open(dir.join("held.log"))
                        .and_then(|mut f| f.read_to_string(&mut all))
                    {
                        fail(format!("reading held.log back: {e}"));
                    }
                    let want: String = (0..n).map(|i| format!("record {i:08}\n")).collect();
                    if all != want {
                        fail(format!(
                            "held.log has {} bytes, want {} ({n} records)",
                            all.len(),
                            want.len()
                        ));
                    }
                    problems
                })
            })
            .collect();
        Workload {
            stop,
            errors,
            phase,
            per_dir,
            threads,
        }
    }

    /// Names what the test does from now on: problems say during what they happened.
    pub fn phase(&self, what: &str) {
        if let Ok(mut p) = self.phase.lock() {
            *p = what.to_string();
        }
    }

    /// Records done so far, per directory.
    pub fn records_per_dir(&self) -> Vec<u64> {
        self.per_dir
            .iter()
            .map(|r| r.load(std::sync::atomic::Ordering::Acquire))
            .collect()
    }

    /// Errors so far.
    pub fn errors(&self) -> u64 {
        self.errors.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits until every directory has done `n` more records than now (`timeout` only
    /// bounds a hung test): every mount serves.
    pub async fn wait_progress(&self, what: &str, n: u64, timeout: Duration) {
        let before = self.records_per_dir();
        wait_until(what, timeout, || async {
            self.records_per_dir()
                .iter()
                .zip(&before)
                .all(|(now, then)| *now >= then + n)
        })
        .await;
    }

    /// Stops and returns (records, errors, problems).
    pub fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let problems: Vec<String> = self
            .threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let records = self
            .per_dir
            .iter()
            .map(|r| r.load(std::sync::atomic::Ordering::Acquire))
            .sum();
        (
            records,
            self.errors.load(std::sync::atomic::Ordering::Acquire),
            problems,
        )
    }
}

/// Polls `f` until it holds (`timeout` only bounds a hung test).
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `baton status MOUNTPOINT --json` on `d`'s node, or `None` if no supervisor answers.
pub fn try_mount_status(d: &Driver, mountpoint: impl AsRef<Path>) -> Option<serde_json::Value> {
    let out = Command::new(baton_bin())
        .arg("status")
        .arg(mountpoint.as_ref())
        .arg("--json")
        .env("BATON_HOME", d.state.join("home"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// `baton status MOUNTPOINT --json` on `d`'s node.
pub fn mount_status(d: &Driver, mountpoint: impl AsRef<Path>) -> serde_json::Value {
    let mp = mountpoint.as_ref();
    try_mount_status(d, mp).unwrap_or_else(|| panic!("no supervisor answers for {}", mp.display()))
}

/// The client generation serving `mountpoint`.
pub fn generation(d: &Driver, mountpoint: impl AsRef<Path>) -> u64 {
    mount_status(d, mountpoint)["generation"].as_u64().unwrap()
}

/// The version of the client serving `mountpoint`.
pub fn client_version(d: &Driver, mountpoint: impl AsRef<Path>) -> String {
    mount_status(d, mountpoint)["client_version"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// A hard link of `from` at `to` (a copy if they are on different filesystems): the
/// test binaries are hundreds of MB in a debug build.
pub fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

/// An executable shell script at `path` with `body`.
pub fn script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A directory playing an image for the fake kubelet: `baton` (this build) and `client`
/// as `baton-fs`, hard-linked, so the supervisor finds the image's client beside itself.
pub fn image_dir_linked(root: &Path, name: &str, client: &Path) -> PathBuf {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    link_or_copy(&baton_bin(), &dir.join("baton"));
    link_or_copy(client, &dir.join("baton-fs"));
    dir
}

/// Runs `baton-csi rollout --namespace NS --poll 1 ARGS` with `kubeconfig` (the cluster
/// admin's, written once: `KubeCluster::kubeconfig` rewrites the file in place), its API
/// requests counted into `counts`; returns (exit code, stdout).
pub async fn run_rollout(
    kubeconfig: &Path,
    namespace: &str,
    counts: &Path,
    args: &[&str],
) -> (i32, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_baton-csi"))
        .arg("rollout")
        .args(["--namespace", namespace, "--poll", "1"])
        .arg("--api-request-counts")
        .arg(counts)
        .args(args)
        .env("KUBECONFIG", kubeconfig)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!(
        "$ baton-csi rollout {}\n{stdout}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// API request counts written by `--api-request-counts FILE` (verb → count).
pub fn read_api_counts(path: &Path) -> std::collections::BTreeMap<String, u64> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// A Node's `baton.dev/upgrade` request and `baton.dev/upgrade-status`.
pub async fn node_upgrade(
    nodes: &kube::Api<k8s_openapi::api::core::v1::Node>,
    name: &str,
) -> (
    Option<String>,
    Option<csi_node::upgrade::request::UpgradeStatus>,
) {
    use csi_node::upgrade::request::{STATUS_ANNOTATION, UPGRADE_ANNOTATION, UpgradeStatus};
    let n = nodes.get(name).await.unwrap();
    let a = n.metadata.annotations.unwrap_or_default();
    (
        a.get(UPGRADE_ANNOTATION).cloned(),
        a.get(STATUS_ANNOTATION)
            .and_then(|s| UpgradeStatus::from_json(s)),
    )
}

/// A kube-apiserver + etcd with namespace `namespace`, its `default` service account and
/// the chart (release `release`) applied; returns the cluster and an admin client. `sa`
/// (e.g. `User::service_account(ns, "<release>-baton-csi-node")`) gets a token.
pub async fn cluster_with_chart(
    namespace: &str,
    release: &str,
    sa: &testkit::kube::User,
) -> (testkit::kube::KubeCluster, kube::Client) {
    use kube::api::{Api, PostParams};
    let cluster = testkit::kube::KubeCluster::start(std::slice::from_ref(sa))
        .await
        .unwrap();
    let admin = cluster.client().await.unwrap();
    let ns: k8s_openapi::api::core::v1::Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}})).unwrap();
    Api::all(admin.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    testkit::kube::create_service_account(&admin, namespace, "default")
        .await
        .unwrap();
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/helm/baton-csi");
    let objects =
        testkit::kube::render_chart(&chart, release, namespace, &serde_json::json!({})).unwrap();
    testkit::kube::apply_all(&admin, &objects, namespace)
        .await
        .unwrap();
    (cluster, admin)
}

/// Watches the upgrade slot Leases of `namespace`; records the most live holders seen at
/// once and every holder.
#[derive(Clone, Default)]
pub struct SlotWatch {
    pub holders: std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, String>>>,
    pub max_at_once: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub ever: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl SlotWatch {
    pub fn start(admin: kube::Client, namespace: &str) -> SlotWatch {
        use k8s_openapi::api::coordination::v1::Lease;
        use kube::api::{Api, WatchEvent, WatchParams};
        use std::sync::atomic::Ordering;
        use tokio_stream::StreamExt;
        let w = SlotWatch::default();
        let w2 = w.clone();
        let api: Api<Lease> = Api::namespaced(admin, namespace);
        tokio::spawn(async move {
            let mut version = "0".to_string();
            loop {
                // Ends with the cluster (at the end of the test).
                let Ok(stream) = api
                    .watch(&WatchParams::default().timeout(60), &version)
                    .await
                else {
                    return;
                };
                let mut stream = std::pin::pin!(stream);
                while let Some(Ok(ev)) = stream.next().await {
                    let (l, gone) = match ev {
                        WatchEvent::Added(l) | WatchEvent::Modified(l) => (l, false),
                        WatchEvent::Deleted(l) => (l, true),
                        _ => continue,
                    };
                    version = l.metadata.resource_version.clone().unwrap_or(version);
                    let Some(name) = l.metadata.name.clone() else {
                        continue;
                    };
                    if csi_node::upgrade::slots::slot_index(&name).is_none() {
                        continue;
                    }
                    let holder = l
                        .spec
                        .and_then(|s| s.holder_identity)
                        .filter(|h| !h.is_empty() && !gone);
                    let mut holders = w2.holders.lock().unwrap();
                    match holder {
                        Some(h) => {
                            w2.ever.lock().unwrap().insert(h.clone());
                            holders.insert(name, h);
                        }
                        None => {
                            holders.remove(&name);
                        }
                    }
                    w2.max_at_once
                        .fetch_max(holders.len() as u64, Ordering::AcqRel);
                }
            }
        });
        w
    }

    pub fn max_at_once(&self) -> u64 {
        self.max_at_once.load(std::sync::atomic::Ordering::Acquire)
    }
}
