//! Public API tests: every message of every type round-trips, through a real socketpair
//! where descriptors are involved; descriptor counts are checked on both sides. Hostile
//! bytes are the subject of `robustness.rs`.

mod common;

use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use common::*;
use handover_proto::WireMessage;
use handover_proto::channel::{self, RecvError, SendError, decode_frame, encode_frame};
use handover_proto::control::{ControlRequest, ControlResponse};
use handover_proto::fdpass;
use handover_proto::frame::{FrameError, MAX_PAYLOAD};
use handover_proto::message::{StateChunk, ToClient, ToSupervisor};
use handover_proto::state::CHUNK_BYTES;
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

/// Sends `msg` over a fresh socketpair with as many descriptors as it carries, and
/// returns what arrived.
fn over_a_socket<M: WireMessage + Clone>(msg: &M) -> (M, usize) {
    let (a, b) = pair();
    let (spare, _other) = pair();
    let fds = vec![spare.as_fd(); msg.fd_count()];
    channel::send(a.as_fd(), msg, &fds).expect("send");
    let (got, got_fds) = channel::recv::<M>(b.as_fd(), Some(Duration::from_secs(5))).expect("recv");
    (got, got_fds.len())
}

#[test]
fn strategies_cover_every_variant() {
    assert_eq!(
        names_drawn(to_client(), to_client_name, 500),
        TO_CLIENT.iter().copied().collect()
    );
    assert_eq!(
        names_drawn(to_supervisor(), to_supervisor_name, 500),
        TO_SUPERVISOR.iter().copied().collect()
    );
    assert_eq!(
        names_drawn(control_request(), control_request_name, 200),
        CONTROL_REQUEST.iter().copied().collect()
    );
    assert_eq!(
        names_drawn(control_response(), control_response_name, 300),
        CONTROL_RESPONSE.iter().copied().collect()
    );
    assert_eq!(
        names_drawn(to_keeper(), to_keeper_name, 50),
        TO_KEEPER.iter().copied().collect()
    );
    assert_eq!(
        names_drawn(from_keeper(), from_keeper_name, 100),
        FROM_KEEPER.iter().copied().collect()
    );
    assert_eq!(
        names_drawn(client_state(), client_state_name, 20),
        CLIENT_STATE.iter().copied().collect()
    );
}

proptest! {
    #[test]
    fn to_client_roundtrips_over_a_socket(msg in to_client()) {
        let (got, fds) = over_a_socket(&msg);
        prop_assert_eq!(fds, msg.fd_count());
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn to_supervisor_roundtrips_over_a_socket(msg in to_supervisor()) {
        let (got, fds) = over_a_socket(&msg);
        prop_assert_eq!(fds, msg.fd_count());
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn control_request_roundtrips_over_a_socket(msg in control_request()) {
        let (got, fds) = over_a_socket(&msg);
        prop_assert_eq!(fds, 0);
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn keeper_messages_roundtrip_over_a_socket(k in to_keeper(), f in from_keeper()) {
        // A deposit and a withdrawal's answer carry the FUSE connection and, if the mount
        // has one, the journal.
        let (got, fds) = over_a_socket(&k);
        prop_assert_eq!(fds, k.fd_count());
        prop_assert_eq!(got, k);
        let (got, fds) = over_a_socket(&f);
        prop_assert_eq!(fds, f.fd_count());
        prop_assert_eq!(got, f);
    }

    #[test]
    fn control_response_roundtrips_over_a_socket(msg in control_response()) {
        let (got, fds) = over_a_socket(&msg);
        // Only HandingOver carries a descriptor (the control socket).
        prop_assert_eq!(fds, usize::from(control_response_name(&msg) == "HandingOver"));
        prop_assert_eq!(got, msg);
    }

    #[test]
    fn frames_roundtrip_without_a_socket(
        c in to_client(),
        s in to_supervisor(),
        q in control_request(),
        r in control_response(),
    ) {
        prop_assert_eq!(decode_frame::<ToClient>(&encode_frame(&c).expect("encode")).expect("decode"), c);
        prop_assert_eq!(decode_frame::<ToSupervisor>(&encode_frame(&s).expect("encode")).expect("decode"), s);
        prop_assert_eq!(decode_frame::<ControlRequest>(&encode_frame(&q).expect("encode")).expect("decode"), q);
        prop_assert_eq!(decode_frame::<ControlResponse>(&encode_frame(&r).expect("encode")).expect("decode"), r);
    }
}

#[test]
fn init_start_and_request_log_carry_one_descriptor() {
    for msg in draw(to_client(), 300) {
        // Init carries the FUSE fd, Start the write-journal memfd, RequestLog the log's.
        let expected = usize::from(matches!(
            to_client_name(&msg),
            "Init" | "Start" | "RequestLog"
        ));
        assert_eq!(msg.fd_count(), expected, "{msg:?}");
    }
}

/// The largest state chunk travels in one frame, in both directions, over a socket.
#[test]
fn a_full_state_chunk_fits_in_a_frame() {
    let chunk = StateChunk {
        index: u32::MAX - 1,
        total: u32::MAX,
        data: vec![0xa5; CHUNK_BYTES],
    };
    let to_new = ToClient::State(chunk.clone());
    let from_old = ToSupervisor::State(chunk);
    assert!(encode_frame(&to_new).expect("fits").len() < MAX_PAYLOAD);
    assert_eq!(over_a_socket(&to_new).0, to_new);
    assert_eq!(over_a_socket(&from_old).0, from_old);
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
    let msg = ToClient::State(StateChunk {
        index: 0,
        total: 1,
        data: vec![0; MAX_PAYLOAD],
    });
    assert!(matches!(
        encode_frame(&msg),
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

    // And one that attaches a descriptor to a message that carries none, in each type.
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
    let bytes = encode_frame(&ToSupervisor::Thawed).expect("encode");
    fdpass::send(a.as_fd(), &bytes, &[a.as_fd()]).expect("raw send");
    assert!(matches!(
        channel::recv::<ToSupervisor>(b.as_fd(), None),
        Err(RecvError::FdCount {
            expected: 0,
            got: 1,
            ..
        })
    ));
    let bytes = encode_frame(&ControlRequest::Status).expect("encode");
    fdpass::send(a.as_fd(), &bytes, &[a.as_fd()]).expect("raw send");
    assert!(matches!(
        channel::recv::<ControlRequest>(b.as_fd(), None),
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
