//! The CSI Controller service: the gRPC face of [`Provisioner`].

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::node::blocking;
use crate::proto::controller_server::Controller;
use crate::proto::{
    ControllerGetCapabilitiesRequest, ControllerGetCapabilitiesResponse,
    ControllerServiceCapability, CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeRequest,
    DeleteVolumeResponse, ValidateVolumeCapabilitiesRequest, ValidateVolumeCapabilitiesResponse,
    controller_service_capability,
};
use crate::provision::Provisioner;

#[derive(Debug, Clone)]
pub struct ControllerService {
    pub provisioner: Arc<Provisioner>,
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(name = %req.name, "CreateVolume");
        let p = Arc::clone(&self.provisioner);
        let volume = blocking("CreateVolume", move || p.create(&req)).await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(volume = %req.volume_id, "DeleteVolume");
        let p = Arc::clone(&self.provisioner);
        blocking("DeleteVolume", move || {
            p.delete(&req.volume_id, &req.secrets)
        })
        .await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        tracing::info!(volume = %req.volume_id, "ValidateVolumeCapabilities");
        let p = Arc::clone(&self.provisioner);
        let resp = blocking("ValidateVolumeCapabilities", move || p.validate(&req)).await?;
        Ok(Response::new(resp))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        use controller_service_capability::rpc::Type;
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: vec![ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc {
                        r#type: Type::CreateDeleteVolume as i32,
                    },
                )),
            }],
        }))
    }
}
