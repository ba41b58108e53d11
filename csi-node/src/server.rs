//! Serving the CSI services on a Unix socket (`unix:///csi/csi.sock`).

use std::future::Future;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeService;
use crate::proto::controller_server::ControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;

/// Serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid endpoint {0:?}: use unix:///path/to/csi.sock")]
    Endpoint(String),
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the gRPC server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// The socket path of `unix:///path` (or a plain absolute path).
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ServeError> {
    let p = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if p.starts_with('/') {
        Ok(PathBuf::from(p))
    } else {
        Err(ServeError::Endpoint(endpoint.to_string()))
    }
}

/// Binds the socket, replacing a stale one left by a previous run. The socket is 0600:
/// whoever can connect can mount anything anywhere, so only root (the kubelet, the CSI
/// sidecars) may, whatever the umask.
pub fn listen(path: &Path) -> Result<UnixListener, ServeError> {
    let err = |source| ServeError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    Ok(listener)
}

/// Serves until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    identity: IdentityService,
    node: Option<NodeService>,
    controller: Option<ControllerService>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_optional_service(node.map(NodeServer::new))
        .add_optional_service(controller.map(ControllerServer::new))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}
