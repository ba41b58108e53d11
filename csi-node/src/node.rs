//! The CSI Node service: the gRPC face of [`Publisher`]. Each call runs on a blocking
//! thread (mounting is syscalls and child processes), and logs the volume and target,
//! never the secrets.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::error::CsiError;
use crate::proto::node_server::Node;
use crate::proto::{
    NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse, NodeGetInfoRequest,
    NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse,
    NodePublishVolumeRequest, NodePublishVolumeResponse, NodeServiceCapability,
    NodeUnpublishVolumeRequest, NodeUnpublishVolumeResponse, node_service_capability,
};
use crate::publish::Publisher;

#[derive(Debug, Clone)]
pub struct NodeService {
    pub node_id: String,
    pub publisher: Arc<Publisher>,
}

/// Runs `f` on a blocking thread and turns its error into a gRPC status.
pub(crate) async fn blocking<T, F>(call: &'static str, f: F) -> Result<T, Status>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, CsiError> + Send + 'static,
{
    let result = tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("{call} panicked: {e}")))?;
    if let Err(e) = &result {
        tracing::warn!(call, code = ?e.code(), error = %e, "call failed");
    }
    result.map_err(Status::from)
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(volume = %req.volume_id, target = %req.target_path, readonly = req.readonly, "NodePublishVolume");
        let p = Arc::clone(&self.publisher);
        blocking("NodePublishVolume", move || p.publish(&req)).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(volume = %req.volume_id, target = %req.target_path, "NodeUnpublishVolume");
        let p = Arc::clone(&self.publisher);
        blocking("NodeUnpublishVolume", move || {
            p.unpublish(&req.volume_id, &req.target_path)
        })
        .await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        let p = Arc::clone(&self.publisher);
        let resp = blocking("NodeGetVolumeStats", move || {
            p.stats(&req.volume_id, &req.volume_path)
        })
        .await?;
        Ok(Response::new(resp))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        use node_service_capability::rpc::Type;
        let capabilities = [
            Type::GetVolumeStats,
            Type::VolumeCondition,
            Type::SingleNodeMultiWriter,
        ]
        .into_iter()
        .map(|t| NodeServiceCapability {
            r#type: Some(node_service_capability::Type::Rpc(
                node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities }))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
