//! Public API tests: every message round-trips through a real socketpair; bytes from a
//! broken or hostile peer become typed errors, never a panic.

use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use handover_proto::channel::{self, RecvError, SendError, decode_frame, encode_frame};
use handover_proto::control::{ControlRequest, ControlResponse, MountStatus};
use handover_proto::fdpass;
use handover_proto::frame::{self, FrameError, MAX_PAYLOAD};
use handover_proto::message::{Generation, MountSpec, ToClient, ToSupervisor};
use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use proptest::prelude::*;

fn pair() -> (OwnedFd, OwnedFd) {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .expect("socketpair")
}

fn spec() -> impl Strategy<Value = MountSpec> {
    (
        ".{0,20}",
        ".{0,40}",
        "/[a-z/]{0,30}",
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        proptest::option::of("/[a-z]{0,10}"),
        any::<u64>(),
    )
        .prop_map(
            |(volume, meta_url, mp, threads, attr, entry, cache_dir, cache_bytes)| MountSpec {
                volume,
                meta_url,
                mountpoint: PathBuf::from(mp),
                home: PathBuf::from("/var/lib/baton"),
                threads,
                attr_ttl_ms: attr,
                entry_ttl_ms: entry,
                cache_dir: cache_dir.map(PathBuf::from),
                cache_bytes,
            },
        )
}

fn to_client() -> impl Strategy<Value = ToClient> {
    prop_oneof![
        (any::<u64>(), spec()).prop_map(|(g, spec)| ToClient::Start {
            generation: Generation(g),
            spec
        }),
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|request| ToClient::Init { request }),
        Just(ToClient::Serve),
        Just(ToClient::Shutdown),
    ]
}

fn to_supervisor() -> impl Strategy<Value = ToSupervisor> {
    prop_oneof![
        (any::<u32>(), ".{0,20}")
            .prop_map(|(pid, version)| ToSupervisor::Prepared { pid, version }),
        ".{0,200}".prop_map(|reason| ToSupervisor::Failed { reason }),
        proptest::collection::vec(any::<u8>(), 0..300)
            .prop_map(|reply| ToSupervisor::InitReply { reply }),
        proptest::option::of(".{0,50}").prop_map(|error| ToSupervisor::ShutdownDone { error }),
        proptest::option::of(".{0,50}").prop_map(|error| ToSupervisor::SessionEnded { error }),
    ]
}

fn control_response() -> impl Strategy<Value = ControlResponse> {
    prop_oneof![
        proptest::option::of(".{0,50}")
            .prop_map(|flush_error| ControlResponse::Umounted { flush_error }),
        Just(ControlResponse::Busy),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(|(g, pid, up)| {
            ControlResponse::Status(MountStatus {
                mountpoint: PathBuf::from("/mnt/x"),
                volume: "default".into(),
                meta_url: "redb:///m".into(),
                supervisor_pid: pid,
                generation: Generation(g),
                client_pid: pid.wrapping_add(1),
                client_version: "0.1.0".into(),
                uptime_ms: up,
                fuse_minor: 45,
                max_write: 1 << 20,
            })
        }),
        ".{0,50}".prop_map(|message| ControlResponse::Error { message }),
    ]
}

proptest! {
    #[test]
    fn to_client_roundtrips_over_a_socket(msg in to_client()) {
        let (a, b) = pair();
        let (keep, _other) = pair();
        let fds = if matches!(msg, ToClient::Init { .. }) { vec![keep.as_fd()] } else { vec![] };
        channel::send(a.as_fd(), &msg, &fds).expect("send");
        let (got, got_fds) = channel::recv::<ToClient>(b.as_fd(), Some(Duration::from_secs(5))).expect("recv");
        prop_assert_eq!(got_fds.len(), fds.len());
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn to_supervisor_roundtrips_over_a_socket(msg in to_supervisor()) {
        let (a, b) = pair();
        channel::send(a.as_fd(), &msg, &[]).expect("send");
        let (got, fds) = channel::recv::<ToSupervisor>(b.as_fd(), None).expect("recv");
        prop_assert!(fds.is_empty());
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn control_roundtrips(resp in control_response(), lazy in any::<bool>()) {
        let bytes = encode_frame(&resp).expect("encode");
        prop_assert_eq!(decode_frame::<ControlResponse>(&bytes).expect("decode"), resp);
        let req = if lazy { ControlRequest::Umount { lazy } } else { ControlRequest::Status };
        let bytes = encode_frame(&req).expect("encode");
        prop_assert_eq!(decode_frame::<ControlRequest>(&bytes).expect("decode"), req);
    }

    #[test]
    fn random_bytes_are_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        prop_assert!(decode_frame::<ToClient>(&bytes).is_err());
        prop_assert!(decode_frame::<ToSupervisor>(&bytes).is_err());
        prop_assert!(decode_frame::<ControlRequest>(&bytes).is_err());
    }

    #[test]
    fn random_payload_in_a_valid_frame_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..512)) {
        let bytes = frame::encode(&payload).expect("frame");
        // May or may not decode (small payloads can be valid messages); must not panic.
        let _ = decode_frame::<ToClient>(&bytes);
        let _ = decode_frame::<ToSupervisor>(&bytes);
        let _ = decode_frame::<ControlResponse>(&bytes);
    }

    #[test]
    fn every_truncation_is_an_error(msg in to_client(), cut in any::<prop::sample::Index>()) {
        let bytes = encode_frame(&msg).expect("encode");
        let cut = cut.index(bytes.len());
        prop_assert!(decode_frame::<ToClient>(&bytes[..cut]).is_err());
    }
}

#[test]
fn specific_corruptions_give_specific_errors() {
    let msg = ToClient::Init {
        request: vec![1, 2, 3, 4],
    };
    let good = encode_frame(&msg).expect("encode");

    let mut bad = good.clone();
    bad[..4].copy_from_slice(b"JUNK");
    assert!(matches!(
        decode_frame::<ToClient>(&bad),
        Err(RecvError::Frame(FrameError::BadMagic { .. }))
    ));

    let mut bad = good.clone();
    bad[4] = 7;
    assert!(matches!(
        decode_frame::<ToClient>(&bad),
        Err(RecvError::Frame(FrameError::UnsupportedVersion {
            major: 7,
            ..
        }))
    ));

    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    assert!(matches!(
        decode_frame::<ToClient>(&bad),
        Err(RecvError::Frame(FrameError::BadCrc { .. }))
    ));

    let mut bad = good.clone();
    bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode_frame::<ToClient>(&bad),
        Err(RecvError::Frame(FrameError::Oversized { .. }))
    ));

    assert!(matches!(
        decode_frame::<ToClient>(&good[..10]),
        Err(RecvError::Frame(FrameError::Short { .. }))
    ));

    // A valid frame whose payload names a variant that does not exist.
    let unknown = frame::encode(&[200]).expect("frame");
    assert!(matches!(
        decode_frame::<ToClient>(&unknown),
        Err(RecvError::Decode(_))
    ));
}

#[test]
fn oversized_message_is_refused_by_the_sender() {
    let (a, _b) = pair();
    let msg = ToSupervisor::InitReply {
        reply: vec![0; MAX_PAYLOAD + 1],
    };
    assert!(matches!(
        channel::send(a.as_fd(), &msg, &[]),
        Err(SendError::Frame(FrameError::Oversized { .. }))
    ));
}

#[test]
fn fd_count_is_checked_on_both_sides() {
    let (a, b) = pair();
    // Init must carry the /dev/fuse descriptor.
    let init = ToClient::Init {
        request: vec![0; 104],
    };
    assert!(matches!(
        channel::send(a.as_fd(), &init, &[]),
        Err(SendError::FdCount {
            expected: 1,
            got: 0,
            ..
        })
    ));

    // A peer that sends it without the descriptor is caught on receipt.
    let bytes = encode_frame(&init).expect("encode");
    fdpass::send(a.as_fd(), &bytes, &[]).expect("raw send");
    assert!(matches!(
        channel::recv::<ToClient>(b.as_fd(), None),
        Err(RecvError::FdCount {
            expected: 1,
            got: 0,
            ..
        })
    ));

    // And one that attaches a descriptor to a message that carries none.
    let bytes = encode_frame(&ToClient::Serve).expect("encode");
    fdpass::send(a.as_fd(), &bytes, &[a.as_fd()]).expect("raw send");
    assert!(matches!(
        channel::recv::<ToClient>(b.as_fd(), None),
        Err(RecvError::FdCount {
            expected: 0,
            got: 1,
            ..
        })
    ));
}

#[test]
fn closed_peer_and_timeout() {
    let (a, b) = pair();
    let err = channel::recv::<ToClient>(b.as_fd(), Some(Duration::from_millis(20)))
        .expect_err("nothing sent");
    assert!(err.is_timeout());
    drop(a);
    let err =
        channel::recv::<ToClient>(b.as_fd(), Some(Duration::from_secs(1))).expect_err("closed");
    assert!(err.is_closed());
}
