//! A conformance suite for baton-csi, written for this project after the CSI spec's
//! Identity, Controller and Node expectations (the checks csi-sanity makes, and the
//! spec's idempotency and error-code rules). One driver serves the node and controller
//! services; the Baton volume lives in a throwaway redis-server (so the controller and the
//! node can mount it at the same time) with local object storage.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use csi_node::proto::{
    CapacityRange, ControllerGetCapabilitiesRequest, CreateVolumeRequest, DeleteVolumeRequest,
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetCapabilitiesRequest,
    NodeGetInfoRequest, NodeGetVolumeStatsRequest, ProbeRequest, ValidateVolumeCapabilitiesRequest,
    VolumeCapability, VolumeContentSource, controller_service_capability, node_service_capability,
    plugin_capability, volume_capability, volume_content_source,
};
use tonic::Code;

struct Suite {
    d: Driver,
    _redis: testkit::redis::RedisServer,
    secrets: HashMap<String, String>,
}

fn suite() -> Suite {
    let redis = testkit::redis::RedisServer::start().unwrap();
    let d = Driver::start(DriverOptions {
        services: "node,controller",
        ..Default::default()
    });
    let secrets = HashMap::from([
        ("metaurl".to_string(), redis.url(1)),
        ("name".to_string(), "shared".to_string()),
        (
            "storage".to_string(),
            format!("fs://{}", d.dir.path().join("objects").display()),
        ),
    ]);
    Suite {
        d,
        _redis: redis,
        secrets,
    }
}

fn create_req(s: &Suite, name: &str, required: i64, limit: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        volume_capabilities: vec![rw_cap()],
        secrets: s.secrets.clone(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identity_service() {
    let s = suite();
    s.d.wait_ready().await;
    let mut id = s.d.identity().await;
    let info = id
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    // The name follows domain name notation and is at most 63 characters.
    assert!(info.name.len() <= 63 && info.name.contains('.'));
    assert!(
        info.name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    );
    assert!(!info.vendor_version.is_empty());
    let caps = id
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let services: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|plugin_capability::Type::Service(s)| s.r#type)
        })
        .collect();
    assert_eq!(
        services,
        [plugin_capability::service::Type::ControllerService as i32]
    );
    assert_eq!(
        id.probe(ProbeRequest {}).await.unwrap().into_inner().ready,
        Some(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn controller_service() {
    let s = suite();
    s.d.wait_ready().await;
    let mut ctl = s.d.controller().await;

    let caps = ctl
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpc: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    assert_eq!(
        rpc,
        [controller_service_capability::rpc::Type::CreateDeleteVolume as i32]
    );

    // CreateVolume: required fields.
    assert_eq!(
        code(ctl.create_volume(create_req(&s, "", 0, 0)).await),
        Code::InvalidArgument
    );
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.volume_capabilities.clear();
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.volume_capabilities[0].access_mode = None;
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.volume_capabilities[0].access_type = None;
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.volume_capabilities = vec![VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        ..rw_cap()
    }];
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.secrets.clear();
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.parameters.insert("onDelete".into(), "shred".into());
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.parameters.insert("colour".into(), "blue".into());
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    let mut r = create_req(&s, "pvc-x", 0, 0);
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "s".into(),
            },
        )),
    });
    assert_eq!(code(ctl.create_volume(r).await), Code::InvalidArgument);
    assert_eq!(
        code(ctl.create_volume(create_req(&s, "pvc-x", 10, 5)).await),
        Code::OutOfRange
    );
    assert_eq!(
        code(ctl.create_volume(create_req(&s, "pvc-x", -1, 0)).await),
        Code::InvalidArgument
    );

    // CreateVolume: created with the capacity asked, idempotent, ALREADY_EXISTS when the
    // same name comes with an incompatible capacity.
    let mut r = create_req(&s, "pvc-1", 1 << 30, 0);
    r.parameters
        .insert("csi.storage.k8s.io/pvc/name".into(), "data".into());
    let v = ctl
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 1 << 30);
    assert_eq!(v.volume_id, "pvc-1");
    assert_eq!(
        v.volume_context.get("subdir").map(String::as_str),
        Some("volumes/pvc-1")
    );
    let again = ctl
        .create_volume(r)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, v);
    assert_eq!(
        code(ctl.create_volume(create_req(&s, "pvc-1", 2 << 30, 0)).await),
        Code::AlreadyExists
    );
    let fits = ctl
        .create_volume(create_req(&s, "pvc-1", 1 << 20, 4 << 30))
        .await
        .unwrap();
    assert_eq!(fits.into_inner().volume.unwrap().volume_id, "pvc-1");
    let weird = ctl
        .create_volume(create_req(&s, "a name / with slashes", 0, 0))
        .await
        .unwrap();
    let weird_id = weird.into_inner().volume.unwrap().volume_id;
    assert!(weird_id.starts_with("h-"));

    // ValidateVolumeCapabilities.
    let validate = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        secrets: s.secrets.clone(),
        ..Default::default()
    };
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("", vec![rw_cap()]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("pvc-1", vec![]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("pvc-none", vec![rw_cap()]))
                .await
        ),
        Code::NotFound
    );
    let ok = ctl
        .validate_volume_capabilities(validate("pvc-1", vec![rw_cap()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.confirmed.unwrap().volume_capabilities, vec![rw_cap()]);
    let block = VolumeCapability {
        access_type: Some(volume_capability::AccessType::Block(
            volume_capability::BlockVolume {},
        )),
        ..rw_cap()
    };
    let no = ctl
        .validate_volume_capabilities(validate("pvc-1", vec![block]))
        .await
        .unwrap()
        .into_inner();
    assert!(no.confirmed.is_none() && !no.message.is_empty());

    // DeleteVolume: required id; unknown and malformed ids are OK; twice is OK.
    let del = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        secrets: s.secrets.clone(),
    };
    assert_eq!(
        code(ctl.delete_volume(del("")).await),
        Code::InvalidArgument
    );
    ctl.delete_volume(del("pvc-never-created")).await.unwrap();
    ctl.delete_volume(del("../../etc")).await.unwrap();
    ctl.delete_volume(del("pvc-1")).await.unwrap();
    ctl.delete_volume(del("pvc-1")).await.unwrap();
    ctl.delete_volume(del(&weird_id)).await.unwrap();
    assert_eq!(
        code(
            ctl.validate_volume_capabilities(validate("pvc-1", vec![rw_cap()]))
                .await
        ),
        Code::NotFound
    );
    assert!(s.d.backend_mounts().is_empty());
    let leftovers = csi_node::mountinfo::MountTable::read()
        .unwrap()
        .0
        .into_iter()
        .filter(|e| e.mountpoint.starts_with(s.d.dir.path()))
        .count();
    assert_eq!(leftovers, 0, "the controller left a mount");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_service() {
    let s = suite();
    s.d.wait_ready().await;
    let mut node = s.d.node().await;
    let info = node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.node_id.is_empty());
    assert!(info.max_volumes_per_node >= 0);
    let caps = node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner();
    let rpc: Vec<i32> = caps
        .capabilities
        .iter()
        .filter_map(|c| {
            c.r#type
                .as_ref()
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    use node_service_capability::rpc::Type;
    assert!(rpc.contains(&(Type::GetVolumeStats as i32)));
    assert!(
        !rpc.contains(&(Type::StageUnstageVolume as i32)),
        "publish does it all"
    );

    // A statically provisioned volume: the whole Baton volume, published twice.
    let (t1, t2) = (s.d.target("n1"), s.d.target("n2"));
    node.node_publish_volume(publish_req("static-1", &t1, &s.secrets, None, false))
        .await
        .unwrap();
    node.node_publish_volume(publish_req("static-1", &t1, &s.secrets, None, false))
        .await
        .unwrap();
    node.node_publish_volume(publish_req("static-1", &t2, &s.secrets, None, false))
        .await
        .unwrap();
    std::fs::write(t1.join("f"), b"1").unwrap();
    let stats = |p: &std::path::Path| NodeGetVolumeStatsRequest {
        volume_id: "static-1".into(),
        volume_path: p.display().to_string(),
        staging_target_path: String::new(),
    };
    let st = node
        .node_get_volume_stats(stats(&t2))
        .await
        .unwrap()
        .into_inner();
    assert!(
        st.usage
            .iter()
            .all(|u| u.total >= u.used && u.available >= 0)
    );
    node.node_unpublish_volume(unpublish_req("static-1", &t1))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req("static-1", &t2))
        .await
        .unwrap();
    node.node_unpublish_volume(unpublish_req("static-1", &t2))
        .await
        .unwrap();
    assert_eq!(
        code(node.node_get_volume_stats(stats(&t2)).await),
        Code::NotFound
    );
    assert!(s.d.backend_mounts().is_empty());

    // A reader-only access mode publishes read-only even without `readonly`.
    let t3 = s.d.target("n3");
    let mut ro = publish_req("static-ro", &t3, &s.secrets, None, false);
    ro.volume_capability = Some(mount_cap(
        volume_capability::access_mode::Mode::MultiNodeReaderOnly,
        &[],
    ));
    node.node_publish_volume(ro).await.unwrap();
    assert_eq!(std::fs::read(t3.join("f")).unwrap(), b"1");
    assert_eq!(
        std::fs::write(t3.join("g"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    node.node_unpublish_volume(unpublish_req("static-ro", &t3))
        .await
        .unwrap();
    // Unpublishing a target directory that exists but is not mounted removes it.
    std::fs::create_dir_all(&t3).unwrap();
    node.node_unpublish_volume(unpublish_req("static-ro", &t3))
        .await
        .unwrap();
    assert!(!t3.exists());
    assert!(s.d.backend_mounts().is_empty());
}

/// CreateVolume -> NodePublishVolume (with the context it returned) -> data ->
/// NodeUnpublishVolume -> DeleteVolume, for both deletion policies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dynamic_volume_lifecycle() {
    let s = suite();
    s.d.wait_ready().await;
    let mut ctl = s.d.controller().await;
    let mut node = s.d.node().await;
    let mut archived = create_req(&s, "pvc-archive", 1 << 20, 0);
    archived
        .parameters
        .insert("onDelete".into(), "archive".into());
    for (req, policy) in [
        (create_req(&s, "pvc-del", 1 << 20, 0), "delete"),
        (archived, "archive"),
    ] {
        let v = ctl
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .unwrap();
        let t = s.d.target(&v.volume_id);
        let mut p = publish_req(&v.volume_id, &t, &s.secrets, None, false);
        p.volume_context = v.volume_context.clone();
        node.node_publish_volume(p).await.unwrap();
        std::fs::write(t.join("data.bin"), vec![7u8; 4096]).unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&t).unwrap().permissions());
        assert_eq!(
            mode & 0o777,
            0o777,
            "a new volume is writable by any pod user"
        );
        // Another volume's publish must not see this one's data.
        node.node_unpublish_volume(unpublish_req(&v.volume_id, &t))
            .await
            .unwrap();
        ctl.delete_volume(DeleteVolumeRequest {
            volume_id: v.volume_id.clone(),
            secrets: s.secrets.clone(),
        })
        .await
        .unwrap();
        // Look into the Baton volume root (a static publish of the whole volume).
        let root = s.d.target("root");
        node.node_publish_volume(publish_req("root", &root, &s.secrets, None, true))
            .await
            .unwrap();
        assert!(
            !root.join("volumes").join(&v.volume_id).exists(),
            "{policy}: data left in place"
        );
        let trash: Vec<String> = std::fs::read_dir(root.join(".baton-csi/trash"))
            .map(|d| {
                d.map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        let kept = trash
            .iter()
            .find(|n| n.starts_with(&format!("{}-", v.volume_id)));
        match policy {
            "archive" => {
                let kept = kept.expect("archived");
                let bytes =
                    std::fs::read(root.join(".baton-csi/trash").join(kept).join("data.bin"))
                        .unwrap();
                assert_eq!(bytes, vec![7u8; 4096]);
            }
            _ => assert!(kept.is_none()),
        }
        node.node_unpublish_volume(unpublish_req("root", &root))
            .await
            .unwrap();
    }
    assert!(s.d.backend_mounts().is_empty());
}

/// The spec's concurrency rule on the controller: a second CreateVolume for a name whose
/// first one is still running is ABORTED; the CO's retry then finds the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_controller_calls_on_one_name_are_aborted() {
    let s = suite();
    s.d.wait_ready().await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(s.d.controller().await);
    }
    // Every call is sent together: the first mounts the Baton volume (a child process and
    // FUSE) while the others arrive.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(clients.len()));
    let mut calls = Vec::new();
    for mut ctl in clients {
        let req = create_req(&s, "pvc-race", 1 << 20, 0);
        let start = std::sync::Arc::clone(&start);
        calls.push(tokio::spawn(async move {
            start.wait().await;
            ctl.create_volume(req).await.map(|r| r.into_inner().volume)
        }));
    }
    let (mut ok, mut aborted) = (0, 0);
    for c in calls {
        match c.await.unwrap() {
            Ok(v) => {
                assert_eq!(v.unwrap().volume_id, "pvc-race");
                ok += 1;
            }
            Err(st) if st.code() == Code::Aborted => aborted += 1,
            Err(st) => panic!("unexpected {st:?}"),
        }
    }
    assert!(ok >= 1 && aborted >= 1, "ok {ok}, aborted {aborted}");
    let mut ctl = s.d.controller().await;
    let v = ctl
        .create_volume(create_req(&s, "pvc-race", 1 << 20, 0))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(v.capacity_bytes, 1 << 20);
    ctl.delete_volume(DeleteVolumeRequest {
        volume_id: v.volume_id,
        secrets: s.secrets.clone(),
    })
    .await
    .unwrap();
    let leftovers = csi_node::mountinfo::MountTable::read()
        .unwrap()
        .0
        .into_iter()
        .filter(|e| e.mountpoint.starts_with(s.d.dir.path()))
        .count();
    assert_eq!(leftovers, 0, "the controller left a mount");
}
