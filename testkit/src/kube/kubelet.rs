//! A fake kubelet: runs the pods bound to one node as local processes.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

/// A pod's process, as the fake kubelet runs it.
#[derive(Debug)]
struct Running {
    child: Child,
    restarts: i32,
    terminating_since: Option<Instant>,
}

/// Plays the kubelet of one node. Dropping it stops every process it started.
#[derive(Debug)]
pub struct FakeKubelet {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    procs: Arc<Mutex<HashMap<String, Running>>>,
    pub log_dir: PathBuf,
}

/// How the fake kubelet runs commands.
#[derive(Clone, Debug)]
pub struct KubeletConfig {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    /// Commands of containers (`command[0]`) mapped to local executables (used when
    /// `images` is empty).
    pub binaries: HashMap<String, PathBuf>,
    /// Images mapped to local directories holding their executables (`command[0]` is
    /// looked up there). When not empty, a pod of any other image does not start: its
    /// container waits with `ErrImagePull`, as with an image that cannot be pulled.
    pub images: HashMap<String, PathBuf>,
    /// Where pod process logs go (`<namespace>_<pod>.log`).
    pub log_dir: PathBuf,
}

impl FakeKubelet {
    pub fn start(config: KubeletConfig) -> anyhow::Result<FakeKubelet> {
        std::fs::create_dir_all(&config.log_dir)?;
        let stop = Arc::new(AtomicBool::new(false));
        let procs: Arc<Mutex<HashMap<String, Running>>> = Arc::default();
        let (stop2, procs2, cfg) = (Arc::clone(&stop), Arc::clone(&procs), config.clone());
        let thread = std::thread::Builder::new()
            .name("fake-kubelet".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("fake kubelet: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let client = loop {
                        match Kubeconfig::read_from(&cfg.kubeconfig) {
                            Ok(kc) => match kube::Config::from_custom_kubeconfig(
                                kc,
                                &KubeConfigOptions::default(),
                            )
                            .await
                            {
                                Ok(c) => match kube::Client::try_from(c) {
                                    Ok(client) => break client,
                                    Err(e) => eprintln!("fake kubelet: {e}"),
                                },
                                Err(e) => eprintln!("fake kubelet: {e}"),
                            },
                            Err(e) => eprintln!("fake kubelet: {e}"),
                        }
                        if stop2.load(Ordering::Acquire) {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    };
                    let kubelet = Kubelet {
                        client,
                        cfg,
                        procs: procs2,
                    };
                    while !stop2.load(Ordering::Acquire) {
                        if let Err(e) = kubelet.sync().await {
                            eprintln!("fake kubelet: {e:#}");
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                });
            })?;
        Ok(FakeKubelet {
            stop,
            thread: Some(thread),
            procs,
            log_dir: config.log_dir,
        })
    }

    /// Pods (namespace/name) whose process is running.
    pub fn running(&self) -> Vec<String> {
        let procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<String> = procs.keys().cloned().collect();
        v.sort();
        v
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // SIGTERM all, then SIGKILL what is left. A `baton mount` whose mount is held by a
        // descriptor keeper serves on after SIGTERM (it waits for a successor): the test's
        // driver detaches what is left mounted.
        for r in procs.values() {
            signal(&r.child, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        for r in procs.values_mut() {
            while matches!(r.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            kill_container(&r.child);
            let _ = r.child.wait();
        }
        procs.clear();
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we have not reaped yet.
    unsafe {
        libc::kill(child.id() as i32, sig);
    }
}

/// SIGKILL to every process of the container: the child's process group and all its
/// descendants (a container's cgroup holds them all, whatever process group they chose;
/// a `baton mount`'s clients run in their own).
fn kill_container(child: &Child) {
    let root = child.id() as i32;
    // Twice: a process forked while the first round ran is caught by the second.
    for _ in 0..2 {
        for pid in descendants(root) {
            // SAFETY: kill(2) has no memory effects; a pid that ended meanwhile is ESRCH.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        // SAFETY: the child leads its own process group (started with process_group(0)).
        unsafe {
            libc::kill(-root, libc::SIGKILL);
        }
    }
}

/// `root` and every process descending from it, from /proc.
fn descendants(root: i32) -> Vec<i32> {
    let mut parent: HashMap<i32, i32> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            parent.insert(pid, ppid);
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parent.iter().filter(|(_, pp)| **pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

struct Kubelet {
    client: kube::Client,
    cfg: KubeletConfig,
    procs: Arc<Mutex<HashMap<String, Running>>>,
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.clone().unwrap_or_default(),
        pod.metadata.name.clone().unwrap_or_default()
    )
}

fn now_rfc3339() -> String {
    // Status timestamps only need to parse; the fake kubelet does not track real time.
    "2026-01-01T00:00:00Z".to_string()
}

/// Expands `$(VAR)` like the kubelet (`$$` escapes).
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(j) if env.contains_key(&body[..j]) => {
                    out.push_str(&env[&body[..j]]);
                    rest = &body[j + 1..];
                }
                _ => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

impl Kubelet {
    fn pods(&self, ns: &str) -> Api<Pod> {
        Api::namespaced(self.client.clone(), ns)
    }

    async fn set_status(&self, pod: &Pod, status: Value) -> anyhow::Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        match self
            .pods(&ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The environment of the pod's first container, or why it cannot be built yet.
    async fn environment(&self, pod: &Pod) -> Result<BTreeMap<String, String>, String> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let c = &pod.spec.as_ref().ok_or("no spec")?.containers[0];
        let mut env = BTreeMap::new();
        let decode = |s: &Secret| -> BTreeMap<String, String> {
            let mut m: BTreeMap<String, String> = s
                .data
                .iter()
                .flatten()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
                .collect();
            m.extend(s.string_data.clone().unwrap_or_default());
            m
        };
        for ef in c.env_from.iter().flatten() {
            if let Some(sr) = &ef.secret_ref {
                let s = secrets
                    .get_opt(&sr.name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("secret \"{}\" not found", sr.name))?;
                let prefix = ef.prefix.clone().unwrap_or_default();
                env.extend(
                    decode(&s)
                        .into_iter()
                        .map(|(k, v)| (format!("{prefix}{k}"), v)),
                );
            }
        }
        for e in c.env.iter().flatten() {
            if let Some(v) = &e.value {
                let v = expand(v, &env);
                env.insert(e.name.clone(), v);
            } else if let Some(r) = e
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
            {
                let s = secrets
                    .get_opt(&r.name)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("secret \"{}\" not found", r.name))?;
                let v = decode(&s)
                    .get(&r.key)
                    .cloned()
                    .ok_or_else(|| format!("key {} not in secret", r.key))?;
                env.insert(e.name.clone(), v);
            } else if let Some(f) = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()) {
                let v = match f.field_path.as_str() {
                    "spec.nodeName" => self.cfg.node_name.clone(),
                    "metadata.namespace" => ns.clone(),
                    "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                    other => {
                        return Err(format!(
                            "fieldRef {other} is not supported by the fake kubelet"
                        ));
                    }
                };
                env.insert(e.name.clone(), v);
            }
        }
        Ok(env)
    }

    /// Host path of a container path, through the pod's hostPath volumes.
    fn host_path(pod: &Pod, arg: &str) -> String {
        let Some(spec) = pod.spec.as_ref() else {
            return arg.to_string();
        };
        let c = &spec.containers[0];
        for vm in c.volume_mounts.iter().flatten() {
            let host = spec
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == vm.name)
                .and_then(|v| v.host_path.as_ref())
                .map(|h| h.path.clone());
            if let (Some(host), Some(rest)) = (host, arg.strip_prefix(&vm.mount_path)) {
                if rest.is_empty() || rest.starts_with('/') {
                    return format!("{host}{rest}");
                }
            }
        }
        arg.to_string()
    }

    async fn start_pod(&self, pod: &Pod, restarts: i32) -> anyhow::Result<()> {
        let k = key(pod);
        let env = match self.environment(pod).await {
            Ok(env) => env,
            Err(why) => {
                let name = pod
                    .spec
                    .as_ref()
                    .map(|s| s.containers[0].name.clone())
                    .unwrap_or_default();
                return self
                    .set_status(pod, json!({"phase": "Pending", "containerStatuses": [{
                        "name": name, "ready": false, "restartCount": restarts, "image": "", "imageID": "",
                        "state": {"waiting": {"reason": "CreateContainerConfigError", "message": why}},
                    }]}))
                    .await;
            }
        };
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let c = &spec.containers[0];
        let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
        argv.extend(c.args.clone().unwrap_or_default());
        let argv: Vec<String> = argv
            .iter()
            .map(|a| Self::host_path(pod, &expand(a, &env)))
            .collect();
        let exe = if self.cfg.images.is_empty() {
            argv.first().and_then(|a| self.cfg.binaries.get(a)).cloned()
        } else {
            let image = c.image.clone().unwrap_or_default();
            match self.cfg.images.get(&image) {
                Some(dir) => argv.first().map(|a| dir.join(a)),
                None => {
                    let reported = pod
                        .status
                        .as_ref()
                        .and_then(|st| st.container_statuses.as_ref())
                        .and_then(|cs| cs.first())
                        .and_then(|cs| cs.state.as_ref())
                        .and_then(|st| st.waiting.as_ref())
                        .is_some_and(|w| w.reason.as_deref() == Some("ErrImagePull"));
                    if reported {
                        return Ok(());
                    }
                    return self
                        .set_status(pod, json!({"phase": "Pending", "containerStatuses": [{
                            "name": c.name, "ready": false, "restartCount": restarts, "image": image, "imageID": "",
                            "state": {"waiting": {"reason": "ErrImagePull", "message": format!("image {image} not found")}},
                        }]}))
                        .await;
                }
            }
        };
        let Some(exe) = exe else {
            bail!(
                "fake kubelet: no local binary for {:?} (pod {k})",
                argv.first()
            );
        };
        let log_path = self
            .cfg
            .log_dir
            .join(format!("{}.log", k.replace('/', "_")));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(&exe);
        cmd.args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        for (name, value) in &env {
            cmd.env(name, Self::host_path(pod, value));
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                k.clone(),
                Running {
                    child,
                    restarts,
                    terminating_since: None,
                },
            );
        self.set_status(pod, json!({"phase": "Running", "hostIP": "127.0.0.1", "startTime": now_rfc3339(),
            "containerStatuses": [{
                "name": c.name, "ready": true, "restartCount": restarts, "image": c.image.clone().unwrap_or_default(),
                "imageID": "", "state": {"running": {"startedAt": now_rfc3339()}},
            }]}))
            .await
    }

    async fn sync(&self) -> anyhow::Result<()> {
        let lp = ListParams::default().fields(&format!("spec.nodeName={}", self.cfg.node_name));
        let pods = Api::<Pod>::all(self.client.clone()).list(&lp).await?;
        let live: Vec<String> = pods.items.iter().map(key).collect();
        // Processes whose pod object is gone (force-deleted): kill them.
        {
            let mut procs = self
                .procs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            procs.retain(|k, r| {
                if live.contains(k) {
                    return true;
                }
                kill_container(&r.child);
                let _ = r.child.wait();
                false
            });
        }
        for pod in &pods.items {
            let k = key(pod);
            let ns = pod.metadata.namespace.clone().unwrap_or_default();
            let name = pod.metadata.name.clone().unwrap_or_default();
            let grace = pod
                .metadata
                .deletion_grace_period_seconds
                .or_else(|| {
                    pod.spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                })
                .unwrap_or(30);
            if pod.metadata.deletion_timestamp.is_some() {
                // Stop it, then remove the object, as a kubelet does.
                let finished = {
                    let mut procs = self
                        .procs
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match procs.get_mut(&k) {
                        None => true,
                        Some(r) => {
                            let since = *r.terminating_since.get_or_insert_with(|| {
                                signal(&r.child, libc::SIGTERM);
                                Instant::now()
                            });
                            let exited = matches!(r.child.try_wait(), Ok(Some(_)));
                            if exited || since.elapsed() > Duration::from_secs(grace.max(0) as u64)
                            {
                                kill_container(&r.child);
                                let _ = r.child.wait();
                                procs.remove(&k);
                                true
                            } else {
                                false
                            }
                        }
                    }
                };
                if finished {
                    let dp = DeleteParams {
                        grace_period_seconds: Some(0),
                        ..DeleteParams::default()
                    };
                    match self.pods(&ns).delete(&name, &dp).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                continue;
            }
            let phase = pod
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            let exited = {
                let mut procs = self
                    .procs
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match procs.get_mut(&k) {
                    None => None,
                    Some(r) => match r.child.try_wait() {
                        Ok(Some(st)) => {
                            let restarts = r.restarts;
                            procs.remove(&k);
                            Some((st.code().unwrap_or(137), restarts))
                        }
                        _ => continue,
                    },
                }
            };
            match exited {
                None if phase == "Succeeded" || phase == "Failed" => {}
                None => self.start_pod(pod, 0).await?,
                Some((code, restarts)) => {
                    let policy = pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.restart_policy.clone())
                        .unwrap_or_default();
                    let restart = match policy.as_str() {
                        "Never" => false,
                        "OnFailure" => code != 0,
                        _ => true,
                    };
                    if restart {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        self.start_pod(pod, restarts + 1).await?;
                    } else {
                        let phase = if code == 0 { "Succeeded" } else { "Failed" };
                        let c = &pod.spec.as_ref().context("no spec")?.containers[0];
                        self.set_status(pod, json!({"phase": phase, "containerStatuses": [{
                            "name": c.name, "ready": false, "restartCount": restarts, "image": "", "imageID": "",
                            "state": {"terminated": {"exitCode": code, "reason": if code == 0 { "Completed" } else { "Error" }}},
                        }]}))
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_like_the_kubelet() {
        let env: BTreeMap<String, String> = [("A".to_string(), "x".to_string())].into();
        assert_eq!(expand("--meta=$(A)/$(B)$$(A)", &env), "--meta=x/$(B)$(A)");
    }
}
