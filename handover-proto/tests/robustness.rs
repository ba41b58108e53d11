//! Bytes from a broken or hostile peer: every decoder of bytes that come from another
//! process — frames of the four message types, client states, state chunk sequences and
//! FUSE_INIT messages — turns random, truncated, oversized, bad-CRC, wrong-magic,
//! wrong-version and bit-flipped input into a typed error, never a panic or a misread.
//! (The fuzz targets in `fuzz/` explore the same decoders without a time limit.)

mod common;

use common::*;
use handover_proto::WireMessage;
use handover_proto::channel::{RecvError, decode_frame, encode_frame};
use handover_proto::codec::DecodeError;
use handover_proto::control::{ControlRequest, ControlResponse};
use handover_proto::frame::{self, FORMAT_MAJOR, FrameError, HEADER_LEN, MAX_PAYLOAD};
use handover_proto::fuse_init::{InitError, InitReply, InitRequest, MAX_INIT_LEN};
use handover_proto::keeper::{FromKeeper, ToKeeper};
use handover_proto::message::{StateChunk, ToClient, ToSupervisor};
use handover_proto::state::{self, Assembler, MAX_STATE_BYTES, StateError};
use proptest::prelude::*;

/// Runs the same check against the frame decoder of every message type.
fn for_each_type(bytes: &[u8], check: impl Fn(&str, Result<(), RecvError>)) {
    fn erase<M: WireMessage>(r: Result<M, RecvError>) -> Result<(), RecvError> {
        r.map(|_| ())
    }
    check("ToClient", erase(decode_frame::<ToClient>(bytes)));
    check("ToSupervisor", erase(decode_frame::<ToSupervisor>(bytes)));
    check(
        "ControlRequest",
        erase(decode_frame::<ControlRequest>(bytes)),
    );
    check(
        "ControlResponse",
        erase(decode_frame::<ControlResponse>(bytes)),
    );
    check("ToKeeper", erase(decode_frame::<ToKeeper>(bytes)));
    check("FromKeeper", erase(decode_frame::<FromKeeper>(bytes)));
}

/// A message of any of the four types.
#[derive(Clone, Debug)]
enum AnyMsg {
    C(ToClient),
    S(ToSupervisor),
    Q(ControlRequest),
    R(ControlResponse),
    K(ToKeeper),
    F(FromKeeper),
}

impl AnyMsg {
    fn frame(&self) -> Vec<u8> {
        match self {
            AnyMsg::C(m) => encode_frame(m),
            AnyMsg::S(m) => encode_frame(m),
            AnyMsg::Q(m) => encode_frame(m),
            AnyMsg::R(m) => encode_frame(m),
            AnyMsg::K(m) => encode_frame(m),
            AnyMsg::F(m) => encode_frame(m),
        }
        .expect("encode")
    }

    /// Decodes `bytes` as this message's own type.
    fn decode_own(&self, bytes: &[u8]) -> Result<(), RecvError> {
        match self {
            AnyMsg::C(_) => decode_frame::<ToClient>(bytes).map(|_| ()),
            AnyMsg::S(_) => decode_frame::<ToSupervisor>(bytes).map(|_| ()),
            AnyMsg::Q(_) => decode_frame::<ControlRequest>(bytes).map(|_| ()),
            AnyMsg::R(_) => decode_frame::<ControlResponse>(bytes).map(|_| ()),
            AnyMsg::K(_) => decode_frame::<ToKeeper>(bytes).map(|_| ()),
            AnyMsg::F(_) => decode_frame::<FromKeeper>(bytes).map(|_| ()),
        }
    }
}

fn any_msg() -> impl Strategy<Value = AnyMsg> {
    prop_oneof![
        to_client().prop_map(AnyMsg::C),
        to_supervisor().prop_map(AnyMsg::S),
        control_request().prop_map(AnyMsg::Q),
        control_response().prop_map(AnyMsg::R),
        to_keeper().prop_map(AnyMsg::K),
        from_keeper().prop_map(AnyMsg::F),
    ]
}

/// One valid frame of any type.
fn any_frame() -> impl Strategy<Value = Vec<u8>> {
    any_msg().prop_map(|m| m.frame())
}

fn payload_of(frame: &[u8]) -> Vec<u8> {
    frame[HEADER_LEN..].to_vec()
}

proptest! {
    /// What the fuzz targets check, on random bodies: refused, or a stable roundtrip.
    #[test]
    fn random_bodies_roundtrip_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        use handover_proto::channel::check_frame_roundtrip;
        check_frame_roundtrip::<ToClient>(&bytes);
        check_frame_roundtrip::<ToSupervisor>(&bytes);
        check_frame_roundtrip::<ControlRequest>(&bytes);
        check_frame_roundtrip::<ControlResponse>(&bytes);
        check_frame_roundtrip::<ToKeeper>(&bytes);
        check_frame_roundtrip::<FromKeeper>(&bytes);
    }

    #[test]
    fn random_bytes_are_typed_frame_errors(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        // Without the magic (the odds of random bytes having it are 2^-32) nothing is a
        // frame.
        for_each_type(&bytes, |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(_))), "{ty}: {r:?}");
        });
    }

    #[test]
    fn random_bytes_behind_a_valid_header_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut f = Vec::from(*b"BTON");
        f.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
        f.extend_from_slice(&bytes);
        for_each_type(&f, |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(_)) | Err(RecvError::Decode(_)) | Ok(())), "{ty}: {r:?}");
        });
    }

    #[test]
    fn random_payload_in_a_valid_frame_decodes_or_is_a_decode_error(payload in proptest::collection::vec(any::<u8>(), 0..600)) {
        let bytes = frame::encode(&payload).expect("frame");
        for_each_type(&bytes, |ty, r| {
            assert!(matches!(r, Ok(()) | Err(RecvError::Decode(_))), "{ty}: {r:?}");
        });
    }

    #[test]
    fn every_truncated_frame_is_short(f in any_frame(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(f.len());
        for_each_type(&f[..cut], |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(FrameError::Short { .. }))), "{ty} cut at {cut}: {r:?}");
        });
    }

    #[test]
    fn bytes_after_a_frame_are_refused(f in any_frame(), extra in proptest::collection::vec(any::<u8>(), 1..32)) {
        let mut long = f.clone();
        long.extend_from_slice(&extra);
        for_each_type(&long, |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(FrameError::LengthMismatch { .. }))), "{ty}: {r:?}");
        });
    }

    /// A payload cut short but framed correctly (a buggy peer, not a broken transport) is
    /// a decode error for its type: a shortened encoding is never a valid message.
    #[test]
    fn every_truncated_payload_is_a_decode_error(m in any_msg(), cut in any::<prop::sample::Index>()) {
        let payload = payload_of(&m.frame());
        let cut = cut.index(payload.len());
        let reframed = frame::encode(&payload[..cut]).expect("frame");
        let r = m.decode_own(&reframed);
        prop_assert!(matches!(r, Err(RecvError::Decode(DecodeError::Invalid(_)))), "{:?}", r);
    }

    /// Trailing bytes after a message body are refused, not ignored.
    #[test]
    fn trailing_payload_bytes_are_a_decode_error(m in any_msg(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let mut payload = payload_of(&m.frame());
        payload.extend_from_slice(&extra);
        let reframed = frame::encode(&payload).expect("frame");
        let r = m.decode_own(&reframed);
        prop_assert!(matches!(r, Err(RecvError::Decode(DecodeError::Trailing { extra: n })) if n == extra.len()), "{:?}", r);
    }

    /// Any single bit flipped anywhere in a frame: either the header check or the CRC
    /// catches it (a flip in the minor version is the one acceptable change).
    #[test]
    fn every_bit_flip_is_caught(f in any_frame(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bad = f.clone();
        let i = pos.index(bad.len());
        bad[i] ^= 1 << bit;
        if (6..8).contains(&i) {
            return Ok(());
        }
        for_each_type(&bad, |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(_))), "{ty}: flip at {i}: {r:?}");
        });
    }

    /// Bit flips inside the payload with a recomputed CRC (a peer with a bug, or another
    /// build) reach the decoders themselves: typed errors or other valid messages.
    #[test]
    fn bit_flips_behind_a_good_crc_never_panic(f in any_frame(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut payload = payload_of(&f);
        prop_assume!(!payload.is_empty());
        let i = pos.index(payload.len());
        payload[i] ^= 1 << bit;
        let reframed = frame::encode(&payload).expect("frame");
        for_each_type(&reframed, |ty, r| {
            assert!(matches!(r, Ok(()) | Err(RecvError::Decode(_))), "{ty}: {r:?}");
        });
    }

    #[test]
    fn wrong_magic_and_major_are_refused(f in any_frame(), magic in any::<[u8; 4]>(), major in any::<u16>()) {
        let mut bad = f.clone();
        bad[..4].copy_from_slice(&magic);
        if magic != *b"BTON" {
            for_each_type(&bad, |ty, r| {
                assert!(matches!(r, Err(RecvError::Frame(FrameError::BadMagic { .. }))), "{ty}: {r:?}");
            });
        }
        let mut bad = f.clone();
        bad[4..6].copy_from_slice(&major.to_le_bytes());
        if major != FORMAT_MAJOR {
            for_each_type(&bad, |ty, r| {
                assert!(
                    matches!(r, Err(RecvError::Frame(FrameError::UnsupportedVersion { major: m, .. })) if m == major),
                    "{ty}: {r:?}"
                );
            });
        }
    }

    #[test]
    fn oversized_length_is_refused_before_the_payload(f in any_frame(), len in (MAX_PAYLOAD as u32 + 1)..=u32::MAX) {
        let mut bad = f.clone();
        bad[8..12].copy_from_slice(&len.to_le_bytes());
        for_each_type(&bad, |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(FrameError::Oversized { .. }))), "{ty}: {r:?}");
        });
    }

    #[test]
    fn bad_crc_is_refused(f in any_frame(), crc in any::<u32>()) {
        let mut bad = f.clone();
        prop_assume!(crc != u32::from_le_bytes([bad[12], bad[13], bad[14], bad[15]]));
        bad[12..16].copy_from_slice(&crc.to_le_bytes());
        for_each_type(&bad, |ty, r| {
            assert!(matches!(r, Err(RecvError::Frame(FrameError::BadCrc { .. }))), "{ty}: {r:?}");
        });
    }

    // --- client states -------------------------------------------------------------------

    #[test]
    fn random_state_bytes_are_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        match state::decode(&bytes) {
            // Possible (a short input can be a valid state); it must then survive a round trip.
            Ok(s) => prop_assert_eq!(state::decode(&state::encode(&s).expect("encode")).expect("decode"), s),
            Err(StateError::Decode(_) | StateError::Trailing { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn every_truncated_state_is_a_decode_error(s in client_state(), cut in any::<prop::sample::Index>()) {
        let bytes = state::encode(&s).expect("encode");
        let cut = cut.index(bytes.len());
        prop_assert!(matches!(state::decode(&bytes[..cut]), Err(StateError::Decode(_))));
    }

    #[test]
    fn trailing_state_bytes_are_refused(s in client_state(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let mut bytes = state::encode(&s).expect("encode");
        bytes.extend_from_slice(&extra);
        prop_assert!(
            matches!(state::decode(&bytes), Err(StateError::Trailing { extra: n }) if n == extra.len()),
            "trailing bytes accepted"
        );
    }

    #[test]
    fn bit_flipped_states_never_panic(s in client_state(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = state::encode(&s).expect("encode");
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        match state::decode(&bytes) {
            // Another valid state (e.g. a flipped bit in a counter): the CRC of each frame
            // is what protects the transfer.
            Ok(_) => {}
            Err(StateError::Decode(_) | StateError::Trailing { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn random_delta_bytes_are_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        match state::decode_delta(&bytes) {
            Ok(d) => prop_assert_eq!(state::decode_delta(&state::encode_delta(&d).expect("encode")).expect("decode"), d),
            Err(StateError::Decode(_) | StateError::Trailing { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected error {e:?}"),
        }
    }

    #[test]
    fn every_truncated_delta_is_a_decode_error(d in state_delta(), cut in any::<prop::sample::Index>()) {
        let bytes = state::encode_delta(&d).expect("encode");
        let cut = cut.index(bytes.len());
        prop_assert!(matches!(state::decode_delta(&bytes[..cut]), Err(StateError::Decode(_))));
    }

    // --- state chunk sequences -----------------------------------------------------------

    /// Whatever chunks a peer sends, the assembler either refuses with a typed error or
    /// yields exactly the concatenation of chunks 0..total sent in order.
    #[test]
    fn assembler_on_arbitrary_chunks(chunks in proptest::collection::vec(
        (0u32..5, 0u32..5, proptest::collection::vec(any::<u8>(), 0..8))
            .prop_map(|(index, total, data)| StateChunk { index, total, data }),
        0..12,
    )) {
        let mut a = Assembler::default();
        let mut expected = Vec::new();
        for (n, c) in chunks.iter().enumerate() {
            let well_formed = c.index == n as u32 && c.index < c.total && c.total == chunks[0].total;
            match a.push(c.clone()) {
                Ok(got) => {
                    prop_assert!(well_formed, "accepted {c:?} at position {n}");
                    expected.extend_from_slice(&c.data);
                    if let Some(bytes) = got {
                        prop_assert_eq!(n as u32 + 1, c.total);
                        prop_assert_eq!(&bytes, &expected);
                        return Ok(());
                    }
                }
                Err(StateError::OutOfOrder { .. } | StateError::TotalChanged { .. }) => {
                    prop_assert!(!well_formed, "refused {c:?} at position {n}");
                    return Ok(());
                }
                Err(e) => prop_assert!(false, "unexpected error {e:?}"),
            }
        }
        // Ran out of chunks before the last one.
        let r = a.finish();
        prop_assert!(matches!(r, Err(StateError::Incomplete { .. })), "{:?}", r);
    }

    // --- FUSE_INIT -----------------------------------------------------------------------

    #[test]
    fn random_init_bytes_are_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..300), unique in any::<u64>()) {
        match InitRequest::parse(&bytes) {
            Ok(_) => prop_assert!(bytes.len() >= 56 && bytes.len() <= MAX_INIT_LEN),
            Err(InitError::Short { .. } | InitError::LengthMismatch { .. } | InitError::NotInit(_)) => {}
            Err(e) => prop_assert!(false, "unexpected request error {e:?}"),
        }
        match InitReply::parse(&bytes, unique) {
            Ok(r) => prop_assert_eq!(r.major, 7),
            Err(
                InitError::Short { .. }
                | InitError::LengthMismatch { .. }
                | InitError::ErrorReply(_)
                | InitError::WrongUnique { .. }
                | InitError::Major(_),
            ) => {}
            Err(e) => prop_assert!(false, "unexpected reply error {e:?}"),
        }
    }

    #[test]
    fn mutated_init_requests_never_panic(pos in 0usize..104, byte in any::<u8>(), cut in 0usize..=104) {
        let mut r = kernel_init_request();
        r[pos] = byte;
        r.truncate(cut);
        let _ = InitRequest::parse(&r);
        let _ = InitReply::parse(&r, 2);
    }
}

/// The 104-byte INIT request of an ABI 7.45 kernel (length 104, opcode 26, unique 2).
fn kernel_init_request() -> Vec<u8> {
    let mut b = Vec::with_capacity(104);
    b.extend_from_slice(&104u32.to_le_bytes());
    b.extend_from_slice(&26u32.to_le_bytes());
    b.extend_from_slice(&2u64.to_le_bytes());
    b.extend_from_slice(&[0; 24]);
    for v in [7u32, 45, 128 << 10, 0x73ff_fffb, 0x5fd] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.resize(104, 0);
    b
}

#[test]
fn kernel_request_parses() {
    let r = InitRequest::parse(&kernel_init_request()).expect("request");
    assert!(r.has_resend());
}

#[test]
fn an_unknown_variant_is_a_decode_error_for_every_type() {
    // Index 200 names no variant of any of the four enums (a newer minor's addition
    // reaching an older reader).
    let unknown = frame::encode(&[200]).expect("frame");
    for_each_type(&unknown, |ty, r| {
        assert!(
            matches!(r, Err(RecvError::Decode(DecodeError::Invalid(_)))),
            "{ty}: {r:?}"
        );
    });
}

#[test]
fn huge_length_prefixes_are_refused() {
    // ToClient::Init (variant 1) with a request length of u64::MAX: refused by the decode
    // limit before anything is allocated.
    let mut payload = vec![1u8, 253];
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    let f = frame::encode(&payload).expect("frame");
    assert!(matches!(
        decode_frame::<ToClient>(&f),
        Err(RecvError::Decode(DecodeError::Invalid(_)))
    ));

    // A state (variant 0 = V1) whose volume_uuid claims u64::MAX bytes.
    let mut bytes = vec![0u8, 0, 0, 253];
    bytes.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(state::decode(&bytes), Err(StateError::Decode(_))));
}

#[test]
fn an_oversized_state_is_refused_before_decoding() {
    // calloc'ed and never touched: the size check comes first.
    let bytes = vec![0u8; MAX_STATE_BYTES + 1];
    assert!(matches!(state::decode(&bytes), Err(StateError::TooLarge)));
}

#[test]
fn an_empty_frame_and_an_empty_state() {
    for_each_type(&[], |ty, r| {
        assert!(
            matches!(
                r,
                Err(RecvError::Frame(FrameError::Short { need: 16, got: 0 }))
            ),
            "{ty}: {r:?}"
        );
    });
    let empty = frame::encode(&[]).expect("frame");
    for_each_type(&empty, |ty, r| {
        assert!(
            matches!(r, Err(RecvError::Decode(DecodeError::Invalid(_)))),
            "{ty}: {r:?}"
        );
    });
    assert!(matches!(state::decode(&[]), Err(StateError::Decode(_))));
}
