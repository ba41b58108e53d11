//! `baton-csi`: parse the command line, set up logging, reconcile the node, serve CSI on
//! the Unix socket until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use csi_node::baton::Baton;
use csi_node::controller::ControllerService;
use csi_node::identity::IdentityService;
use csi_node::keeper::{Keeper, socket_path as keeper_socket_path};
use csi_node::kube::counting::{ApiCounts, counting_client};
use csi_node::kube::mountpod::{MountPodConfig, PodMounter, mount_pod_selector};
use csi_node::layout::Layout;
use csi_node::mounter::Mounter;
use csi_node::mounter::process::ProcessMounter;
use csi_node::node::NodeService;
use csi_node::provision::Provisioner;
use csi_node::publish::Publisher;
use csi_node::rollout::{Action, Ended, Rollout};
use csi_node::upgrade::binaries::BinaryStore;
use csi_node::upgrade::evicted::Replacements;
use csi_node::upgrade::executor::Executor;
use csi_node::upgrade::handle::Handler;
use csi_node::upgrade::pod::PodUpgrader;
use csi_node::upgrade::slots::{DEFAULT_LEASE_SECS, SlotPool};
use csi_node::upgrade::watch::WatchConfig;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Service {
    Node,
    Controller,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum MountMode {
    /// Detached `baton` supervisors (hosts, tests).
    Process,
    /// A mount pod per backend on this node (Kubernetes).
    Pod,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum UpgradeWatch {
    /// In pod mode only.
    Auto,
    On,
    Off,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("invalid number of seconds {s:?}"))
}

/// Baton's CSI driver.
#[derive(Debug, Parser)]
#[command(name = "baton-csi", version, args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// CSI endpoint (a Unix socket).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// This node's name (the Kubernetes node name); required by the node service.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// CSI services to serve (Identity is always served).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "node")]
    services: Vec<Service>,
    /// Who runs the FUSE servers.
    #[arg(long, value_enum, default_value_t = MountMode::Process)]
    mount_mode: MountMode,
    /// State directory (a host path, mounted at the same path in mount pods).
    #[arg(long, default_value = "/var/lib/baton-csi")]
    state_dir: PathBuf,
    /// The `baton` binary [default: next to baton-csi, else from PATH].
    #[arg(long)]
    baton_bin: Option<PathBuf>,
    /// How long a new mount may take to serve, in seconds.
    #[arg(long, default_value = "120", value_parser = parse_secs)]
    mount_timeout: Duration,
    /// How often unused backends are looked for, in seconds.
    #[arg(long, default_value = "60", value_parser = parse_secs)]
    reconcile_interval: Duration,
    /// How long the descriptor keeper holds a mount whose processes all died with no
    /// supervisor re-seeding it, in seconds; then the mount fails with ENOTCONN.
    #[arg(long, default_value = "90", value_parser = parse_secs)]
    keeper_orphan_grace: Duration,
    /// Namespace of the mount pods (pod mode).
    #[arg(long, env = "POD_NAMESPACE", default_value = "baton-system")]
    namespace: String,
    /// Image of the mount pods (pod mode).
    #[arg(
        long,
        env = "BATON_MOUNT_IMAGE",
        default_value = "ghcr.io/baton-fs/baton:latest"
    )]
    mount_image: String,
    /// Priority class of the mount pods ("" for none).
    #[arg(long, default_value = "system-node-critical")]
    mount_pod_priority_class: String,
    /// CPU and memory requests of a mount pod (e.g. 100m, 256Mi; "" for none).
    #[arg(long, default_value = "100m")]
    mount_pod_cpu_request: String,
    #[arg(long, default_value = "256Mi")]
    mount_pod_memory_request: String,
    /// Memory limit of a mount pod ("" for none).
    #[arg(long, default_value = "")]
    mount_pod_memory_limit: String,
    /// Log output format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Watch for `baton.dev/upgrade` annotations (node service; needs the API server).
    #[arg(long, value_enum, default_value_t = UpgradeWatch::Auto)]
    upgrade_watch: UpgradeWatch,
    /// Client binaries this image carries, as <DIR>/<version>/baton-fs; copied into
    /// <state-dir>/bin/ at start.
    #[arg(long, default_value = "/opt/baton/clients")]
    client_binaries_dir: PathBuf,
    /// Bound on one mount's `baton upgrade`, in seconds.
    #[arg(long, default_value = "120", value_parser = parse_secs)]
    upgrade_timeout: Duration,
    /// Label selector narrowing the PersistentVolume watch further (e.g.
    /// baton.dev/driver=csi.baton.dev, if your PVs carry such a label).
    #[arg(long)]
    pv_label_selector: Option<String>,
    /// Write the API requests made so far, counted by verb, to this JSON file (diagnostics).
    #[arg(long)]
    api_request_counts: Option<PathBuf>,
    /// Cluster-wide limit on mount upgrades running at once: the number of Lease slots
    /// (`baton-upgrade-slot-<i>` in --namespace) a node takes one of per mount upgrade
    /// (0: no limit, no Lease).
    #[arg(long, default_value = "0")]
    upgrade_slots: usize,
    /// How long a taken slot lives without renewal, in seconds (renewed every third).
    #[arg(long, default_value_t = DEFAULT_LEASE_SECS)]
    upgrade_slot_lease: i32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Roll an upgrade across the cluster's nodes (the `baton rollout` of the docs).
    Rollout(RolloutArgs),
}

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["to", "resume", "pause", "status"])))]
struct RolloutArgs {
    /// The upgrade: binary:<version> or pod:<image>.
    #[arg(long)]
    to: Option<String>,
    /// Label selector of the nodes to upgrade (default: every node).
    #[arg(long)]
    selector: Option<String>,
    /// Nodes annotated per batch (the cluster's upgrade slots bound the real concurrency).
    #[arg(long, default_value = "10")]
    max_parallel: usize,
    /// Continue a paused or interrupted rollout.
    #[arg(long)]
    resume: bool,
    /// Pause the rollout: the batch in flight finishes, no new one starts.
    #[arg(long)]
    pause: bool,
    /// Show the rollout's progress.
    #[arg(long)]
    status: bool,
    /// The driver's namespace (where the rollout state is kept).
    #[arg(long, env = "POD_NAMESPACE", default_value = "baton-system")]
    namespace: String,
    /// How often progress is looked at, in seconds.
    #[arg(long, default_value = "2", value_parser = parse_secs)]
    poll: Duration,
    /// Write the API requests of this command, counted by verb, to this JSON file.
    #[arg(long)]
    api_request_counts: Option<PathBuf>,
}

async fn rollout(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let counts = ApiCounts::new(args.api_request_counts.clone());
    let client = counting_client(&counts)
        .await
        .context("connecting to the API server")?;
    let action = match (args.to, args.resume, args.pause) {
        (Some(target), _, _) => Action::Start {
            target,
            selector: args.selector,
            max_parallel: args.max_parallel,
        },
        (None, true, _) => Action::Resume,
        (None, false, true) => Action::Pause,
        (None, false, false) => Action::Status,
    };
    let mut r = Rollout {
        client,
        namespace: args.namespace,
        poll: args.poll,
        out: std::io::stdout(),
    };
    let ended = r.run(action).await?;
    tracing::info!(requests = ?counts.snapshot(), "API requests of this command");
    Ok(match ended {
        Ended::Succeeded | Ended::Paused | Ended::Running => ExitCode::SUCCESS,
        Ended::Failed { .. } => ExitCode::from(2),
    })
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("baton-csi: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match args.command {
        Some(Command::Rollout(r)) => runtime.block_on(rollout(r)),
        None => runtime.block_on(run(args)).map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "baton-csi failed");
            eprintln!("baton-csi: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down (mounts keep serving)");
}

async fn run(args: Args) -> anyhow::Result<()> {
    let socket = csi_node::server::socket_path(&args.endpoint)?;
    let layout = Layout::new(args.state_dir.clone());
    layout
        .create()
        .with_context(|| format!("creating the state directory {}", args.state_dir.display()))?;
    let ready = Arc::new(AtomicBool::new(false));
    let serve_node = args.services.contains(&Service::Node);
    // The node's descriptor keeper: mounts whose processes all die wait for a new
    // supervisor instead of failing (csi_node::keeper).
    let keeper = if serve_node {
        match Keeper::start(
            keeper_socket_path(&args.state_dir),
            args.keeper_orphan_grace,
        ) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::error!(error = %csi_node::error::chain(&e), "no descriptor keeper: a mount whose processes all die fails");
                None
            }
        }
    } else {
        None
    };
    let baton = Baton {
        bin: args.baton_bin.clone().unwrap_or_else(Baton::default_bin),
        home: layout.baton_home(),
        keeper: keeper.as_ref().map(|k| k.path().to_path_buf()),
    };
    let serve_controller = args.services.contains(&Service::Controller);

    let node = if serve_node {
        let node_id = args
            .node_id
            .clone()
            .context("--node-id (or NODE_ID) is required by the node service")?;
        let api_counts = ApiCounts::new(args.api_request_counts.clone());
        let watch_upgrades = match args.upgrade_watch {
            UpgradeWatch::Auto => matches!(args.mount_mode, MountMode::Pod),
            UpgradeWatch::On => true,
            UpgradeWatch::Off => false,
        };
        let client = if watch_upgrades || matches!(args.mount_mode, MountMode::Pod) {
            Some(
                counting_client(&api_counts)
                    .await
                    .context("connecting to the API server")?,
            )
        } else {
            None
        };
        let pod_config = matches!(args.mount_mode, MountMode::Pod).then(|| MountPodConfig {
            namespace: args.namespace.clone(),
            node_name: node_id.clone(),
            image: args.mount_image.clone(),
            state_dir: args.state_dir.clone(),
            priority_class: Some(args.mount_pod_priority_class.clone()).filter(|s| !s.is_empty()),
            cpu_request: Some(args.mount_pod_cpu_request.clone()).filter(|s| !s.is_empty()),
            memory_request: Some(args.mount_pod_memory_request.clone()).filter(|s| !s.is_empty()),
            memory_limit: Some(args.mount_pod_memory_limit.clone()).filter(|s| !s.is_empty()),
            mount_timeout: args.mount_timeout,
            keeper: baton.keeper.clone(),
        });
        let mounter: Arc<dyn Mounter> = match &pod_config {
            Some(config) => {
                let client = client.clone().context("no API client")?;
                let config = config.clone();
                Arc::new(PodMounter::new(
                    client,
                    config,
                    baton.clone(),
                    tokio::runtime::Handle::current(),
                ))
            }
            None => Arc::new(ProcessMounter {
                baton: baton.clone(),
                mount_timeout: args.mount_timeout,
            }),
        };
        let publisher = Arc::new(Publisher::new(layout.clone(), mounter, baton.clone()));
        // Rediscover the node before answering anything.
        let p = Arc::clone(&publisher);
        let in_use = tokio::task::spawn_blocking(move || p.reconcile(true)).await??;
        tracing::info!(node = %node_id, backends_in_use = in_use.len(), "node reconciled");
        let p = Arc::clone(&publisher);
        let interval = args.reconcile_interval;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let p = Arc::clone(&p);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || p.reconcile(false)).await {
                    tracing::warn!(error = %e, "periodic reconcile failed");
                }
            }
        });
        if let (true, Some(client)) = (watch_upgrades, client) {
            let store = BinaryStore::new(args.state_dir.join("bin"));
            let installed = store
                .install_from(&args.client_binaries_dir)
                .context("installing client binaries")?;
            tracing::info!(?installed, "client binaries on the node");
            let handler = Handler {
                client: client.clone(),
                node_name: node_id.clone(),
                layout: layout.clone(),
                store,
                executor: Executor {
                    baton: baton.clone(),
                    timeout: args.upgrade_timeout,
                },
                slots: (args.upgrade_slots > 0).then(|| SlotPool {
                    client: client.clone(),
                    namespace: args.namespace.clone(),
                    count: args.upgrade_slots,
                    holder: node_id.clone(),
                    lease_secs: args.upgrade_slot_lease.max(3),
                }),
                pods: pod_config.map(|config| PodUpgrader {
                    client: client.clone(),
                    config,
                }),
                node_written: Default::default(),
            };
            let cfg = WatchConfig {
                namespace: args.namespace.clone(),
                node_name: node_id.clone(),
                mount_pod_labels: mount_pod_selector(&node_id),
                pv_labels: args.pv_label_selector.clone(),
            };
            let replacements = matches!(args.mount_mode, MountMode::Pod).then(|| {
                let p = Arc::clone(&publisher);
                Replacements {
                    ensure: Arc::new(move |id| p.ensure_served(id).map_err(|e| e.to_string())),
                    in_use: in_use.iter().map(|(id, _)| id.clone()).collect(),
                }
            });
            tokio::spawn(csi_node::upgrade::run(client, cfg, handler, replacements));
            tracing::info!("watching for upgrade requests");
        }
        Some(NodeService { node_id, publisher })
    } else {
        None
    };
    let controller = serve_controller.then(|| ControllerService {
        provisioner: Arc::new(Provisioner::new(
            &args.state_dir,
            baton.clone(),
            args.mount_timeout,
        )),
    });
    let identity = IdentityService {
        controller: serve_controller,
        ready: Arc::clone(&ready),
    };
    let listener = csi_node::server::listen(&socket)?;
    ready.store(true, Ordering::Release);
    tracing::info!(endpoint = %args.endpoint, node = serve_node, controller = serve_controller, "serving CSI");
    csi_node::server::serve(listener, identity, node, controller, shutdown_signal()).await?;
    Ok(())
}
