//! etcd + kube-apiserver for one test, its users, and creating objects in it.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::scheduling::v1::PriorityClass;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

/// Where `scripts/k8s-test-deps.sh` caches the kube-apiserver it builds.
pub const DEFAULT_CACHE: &str = "/var/cache/baton-test";
/// The kube-apiserver version the script builds.
pub const KUBE_VERSION: &str = "1.20.2";
/// Token of the `admin` user (group `system:masters`).
pub const ADMIN_TOKEN: &str = "baton-test-admin-token";

const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// `$ENV_VAR`, else `name` in `PATH`, else the fallbacks.
fn find_bin(env_var: &str, name: &str, fallbacks: &[PathBuf]) -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let candidates = std::env::split_paths(&path)
        .map(|d| d.join(name))
        .chain(fallbacks.iter().cloned());
    for c in candidates {
        if c.is_file() {
            return Ok(c);
        }
    }
    bail!("{name} not found (run scripts/k8s-test-deps.sh, or set {env_var})")
}

pub fn etcd_bin() -> anyhow::Result<PathBuf> {
    find_bin("ETCD", "etcd", &[PathBuf::from("/usr/bin/etcd")])
}

pub fn apiserver_bin() -> anyhow::Result<PathBuf> {
    let cache = std::env::var_os("BATON_K8S_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| DEFAULT_CACHE.into());
    find_bin(
        "KUBE_APISERVER",
        "kube-apiserver",
        &[cache.join(format!("kube-apiserver-{KUBE_VERSION}"))],
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A child process killed and reaped on drop.
#[derive(Debug)]
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A static-token user of the test API server.
#[derive(Clone, Debug)]
pub struct User {
    pub token: String,
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// The user a service account's token authenticates as.
    pub fn service_account(namespace: &str, name: &str) -> User {
        User {
            token: format!("sa-{namespace}-{name}-token"),
            name: format!("system:serviceaccount:{namespace}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{namespace}"),
                "system:authenticated".into(),
            ],
        }
    }
}

/// etcd + kube-apiserver. Dropping it stops both.
#[derive(Debug)]
pub struct KubeCluster {
    // Field order: the API server stops before etcd, the directory goes last.
    _apiserver: Reaped,
    _etcd: Reaped,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl KubeCluster {
    /// Starts etcd and kube-apiserver (RBAC on, privileged pods allowed), with `admin`
    /// and `users`, and waits until the API server is ready (system priority classes
    /// included).
    pub async fn start(users: &[User]) -> anyhow::Result<KubeCluster> {
        let etcd_bin = etcd_bin()?;
        let apiserver_bin = apiserver_bin()?;
        let dir = tempfile::Builder::new().prefix("baton-kube-").tempdir()?;
        let d = dir.path();

        let (client_port, peer_port) = (free_port()?, free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let etcd_log = File::create(d.join("etcd.log"))?;
        let mut etcd = Reaped(
            Command::new(&etcd_bin)
                .args(["--name", "baton-test", "--data-dir"])
                .arg(d.join("etcd"))
                .args([
                    "--listen-client-urls",
                    &client_url,
                    "--advertise-client-urls",
                    &client_url,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer_url,
                    "--initial-advertise-peer-urls",
                    &peer_url,
                ])
                .args(["--initial-cluster", &format!("baton-test={peer_url}")])
                .args(["--unsafe-no-fsync"])
                .stdin(Stdio::null())
                .stdout(etcd_log.try_clone()?)
                .stderr(etcd_log)
                .spawn()
                .with_context(|| format!("starting {}", etcd_bin.display()))?,
        );
        let deadline = Instant::now() + READY_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", client_port)).is_err() {
            if let Some(st) = etcd.0.try_wait()? {
                bail!("etcd exited with {st}:\n{}", tail(&d.join("etcd.log"), 20));
            }
            if Instant::now() > deadline {
                bail!("etcd did not listen:\n{}", tail(&d.join("etcd.log"), 20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // Service account signing key (required by kube-apiserver >= 1.20).
        let key = d.join("sa.key");
        let out = Command::new("openssl")
            .args(["genrsa", "-out"])
            .arg(&key)
            .arg("2048")
            .output()
            .context("running openssl genrsa (apt-get install openssl)")?;
        if !out.status.success() {
            bail!(
                "openssl genrsa failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut tokens = format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n");
        for u in users {
            tokens.push_str(&format!(
                "{},{},{},\"{}\"\n",
                u.token,
                u.name,
                u.name,
                u.groups.join(",")
            ));
        }
        std::fs::write(d.join("tokens.csv"), tokens)?;

        let port = free_port()?;
        let log = File::create(d.join("apiserver.log"))?;
        let mut apiserver = Reaped(
            Command::new(&apiserver_bin)
                .arg(format!("--etcd-servers={client_url}"))
                .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
                .arg(format!("--secure-port={port}"))
                .arg("--insecure-port=0")
                .arg(format!("--cert-dir={}", d.join("certs").display()))
                .arg(format!(
                    "--token-auth-file={}",
                    d.join("tokens.csv").display()
                ))
                .arg("--authorization-mode=RBAC")
                .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
                .arg(format!("--service-account-key-file={}", key.display()))
                .arg(format!(
                    "--service-account-signing-key-file={}",
                    key.display()
                ))
                .arg("--service-cluster-ip-range=10.96.0.0/16")
                .arg("--allow-privileged=true")
                .arg("--enable-priority-and-fairness=false")
                .arg("--profiling=false")
                .arg("--logtostderr=true")
                .arg("--v=0")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", apiserver_bin.display()))?,
        );
        let cluster_ready = async {
            loop {
                if let Some(st) = apiserver.0.try_wait()? {
                    bail!(
                        "kube-apiserver exited with {st}:\n{}",
                        tail(&d.join("apiserver.log"), 30)
                    );
                }
                if Instant::now() > deadline {
                    bail!(
                        "kube-apiserver was not ready in time:\n{}",
                        tail(&d.join("apiserver.log"), 30)
                    );
                }
                if d.join("certs/apiserver.crt").exists()
                    && TcpStream::connect(("127.0.0.1", port)).is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(())
        };
        cluster_ready.await?;
        let cluster = KubeCluster {
            _apiserver: apiserver,
            _etcd: etcd,
            port,
            dir,
        };
        let client = cluster.client().await?;
        // Ready = it answers, and its bootstrap objects exist.
        loop {
            let ns = Api::<Namespace>::all(client.clone())
                .get_opt("default")
                .await;
            let pc = Api::<PriorityClass>::all(client.clone())
                .get_opt("system-node-critical")
                .await;
            if matches!((&ns, &pc), (Ok(Some(_)), Ok(Some(_)))) {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "kube-apiserver not ready ({ns:?}, {pc:?}):\n{}",
                    tail(&cluster.dir.path().join("apiserver.log"), 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(cluster)
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The kube-apiserver's process id (to read its CPU time and memory in /proc).
    pub fn apiserver_pid(&self) -> u32 {
        self._apiserver.0.id()
    }

    /// etcd's process id.
    pub fn etcd_pid(&self) -> u32 {
        self._etcd.0.id()
    }

    /// Writes a kubeconfig for `token` and returns its path.
    pub fn kubeconfig(&self, token: &str) -> anyhow::Result<PathBuf> {
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}", token.replace(['/', ':'], "_")));
        let cfg = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {
                "server": self.url(),
                "certificate-authority": self.dir.path().join("certs/apiserver.crt"),
            }}],
            "users": [{"name": "u", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "u"}}],
            "current-context": "test",
        });
        // JSON is YAML.
        std::fs::write(&path, serde_json::to_vec_pretty(&cfg)?)?;
        Ok(path)
    }

    /// A client authenticated by `token`.
    pub async fn client_for(&self, token: &str) -> anyhow::Result<kube::Client> {
        let kc = Kubeconfig::read_from(self.kubeconfig(token)?)?;
        let config =
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
        Ok(kube::Client::try_from(config)?)
    }

    /// The admin client.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        self.client_for(ADMIN_TOKEN).await
    }

    /// The last lines of the API server's log.
    pub fn apiserver_log(&self) -> String {
        tail(&self.dir.path().join("apiserver.log"), 40)
    }
}

/// Creates service account `name` in `namespace` with a token Secret, as the
/// controller-manager (which does not run here) would: 1.20's ServiceAccount admission
/// refuses pods whose service account has no token Secret.
pub async fn create_service_account(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<()> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": name}}))?;
    let sa = sas.create(&PostParams::default(), &sa).await?;
    let token_name = format!("{name}-token");
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": token_name, "annotations": {
            "kubernetes.io/service-account.name": name,
            "kubernetes.io/service-account.uid": sa.metadata.uid,
        }},
        "type": "kubernetes.io/service-account-token",
    }))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await?;
    sas.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"secrets": [{"name": token_name}]})),
    )
    .await?;
    Ok(())
}

/// Creates every object (JSON) in the cluster, in order, through discovery — the API
/// server validates each one for real. Namespaced objects without a namespace go to
/// `default_ns`.
pub async fn apply_all(
    client: &kube::Client,
    objects: &[Value],
    default_ns: &str,
) -> anyhow::Result<()> {
    for obj in objects {
        let mut o: DynamicObject =
            serde_json::from_value(obj.clone()).context("not a Kubernetes object")?;
        let types = o.types.clone().context("object without apiVersion/kind")?;
        let gvk = kube::core::GroupVersionKind::try_from(&types)?;
        let (ar, caps) = kube::discovery::pinned_kind(client, &gvk)
            .await
            .with_context(|| format!("the API server does not serve {gvk:?}"))?;
        let api: Api<DynamicObject> = if caps.scope == kube::discovery::Scope::Namespaced {
            let ns = o
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| default_ns.to_string());
            o.metadata.namespace = Some(ns.clone());
            Api::namespaced_with(client.clone(), &ns, &ar)
        } else {
            Api::all_with(client.clone(), &ar)
        };
        let name = o.metadata.name.clone().unwrap_or_default();
        api.create(&PostParams::default(), &o)
            .await
            .with_context(|| format!("creating {} {name}", types.kind))?;
    }
    Ok(())
}
