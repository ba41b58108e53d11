//! CSI v1 messages and services, generated from `proto/csi.proto` at build time.
//!
//! The messages that carry secrets (`csi_secret` fields: metadata URLs, storage
//! credentials) have no derived `Debug`; theirs below prints the secrets' keys only, so
//! that a `{:?}` of a request can never put a credential into a log.

use std::collections::HashMap;
use std::fmt;

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    missing_debug_implementations
)]
mod generated {
    tonic::include_proto!("csi.v1");
}

pub use generated::*;

/// The keys of a secrets map, sorted, for Debug output.
struct Redacted<'a>(&'a HashMap<String, String>);

impl fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<&str> = self.0.keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut m = f.debug_map();
        for k in keys {
            m.entry(&k, &"<redacted>");
        }
        m.finish()
    }
}

impl fmt::Debug for CreateVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CreateVolumeRequest")
            .field("name", &self.name)
            .field("capacity_range", &self.capacity_range)
            .field("volume_capabilities", &self.volume_capabilities)
            .field("parameters", &self.parameters)
            .field("secrets", &Redacted(&self.secrets))
            .field("volume_content_source", &self.volume_content_source)
            .field(
                "accessibility_requirements",
                &self.accessibility_requirements,
            )
            .finish()
    }
}

impl fmt::Debug for DeleteVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeleteVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("secrets", &Redacted(&self.secrets))
            .finish()
    }
}

impl fmt::Debug for ValidateVolumeCapabilitiesRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ValidateVolumeCapabilitiesRequest")
            .field("volume_id", &self.volume_id)
            .field("volume_context", &self.volume_context)
            .field("volume_capabilities", &self.volume_capabilities)
            .field("parameters", &self.parameters)
            .field("secrets", &Redacted(&self.secrets))
            .finish()
    }
}

impl fmt::Debug for NodePublishVolumeRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodePublishVolumeRequest")
            .field("volume_id", &self.volume_id)
            .field("publish_context", &self.publish_context)
            .field("staging_target_path", &self.staging_target_path)
            .field("target_path", &self.target_path)
            .field("volume_capability", &self.volume_capability)
            .field("readonly", &self.readonly)
            .field("secrets", &Redacted(&self.secrets))
            .field("volume_context", &self.volume_context)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let secrets: HashMap<String, String> = [
            (
                "metaurl".to_string(),
                "redis://:hunter2@db:6379/1".to_string(),
            ),
            (
                "AWS_SECRET_ACCESS_KEY".to_string(),
                "s3cr3t-key".to_string(),
            ),
        ]
        .into();
        let outputs = [
            format!(
                "{:?}",
                NodePublishVolumeRequest {
                    volume_id: "v".into(),
                    secrets: secrets.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                CreateVolumeRequest {
                    name: "n".into(),
                    secrets: secrets.clone(),
                    ..Default::default()
                }
            ),
            format!(
                "{:?}",
                DeleteVolumeRequest {
                    volume_id: "v".into(),
                    secrets: secrets.clone()
                }
            ),
            format!(
                "{:?}",
                ValidateVolumeCapabilitiesRequest {
                    volume_id: "v".into(),
                    secrets,
                    ..Default::default()
                }
            ),
        ];
        for out in outputs {
            assert!(!out.contains("hunter2") && !out.contains("s3cr3t"), "{out}");
            assert!(
                out.contains("metaurl") && out.contains("<redacted>"),
                "{out}"
            );
        }
    }
}
