//! The client state: encode/decode round trips (small and production-sized), cutting into
//! chunks and putting them back together around the chunk boundaries, every error of the
//! assembler, and the version helpers. Hostile bytes are in `robustness.rs`.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use handover_proto::channel::{decode_frame, encode_frame};
use handover_proto::message::{MountSpec, StateChunk, ToClient, ToSupervisor};
use handover_proto::state::v1::{ClientStateV1, DirHandleV1, FileHandleV1};
use handover_proto::state::{
    self, Assembler, CHUNK_BYTES, ClientState, MAX_STATE_BYTES, SUPPORTED_VERSIONS, StateError,
};
use proptest::prelude::*;

fn spec() -> MountSpec {
    MountSpec {
        volume: "datasets".into(),
        meta_url: "redb:///var/lib/baton/volumes/datasets/meta.redb".into(),
        mountpoint: PathBuf::from("/mnt/datasets"),
        home: PathBuf::from("/var/lib/baton"),
        threads: 8,
        attr_ttl_ms: 1000,
        entry_ttl_ms: 1000,
        cache_dir: None,
        cache_bytes: 10 << 30,
    }
}

/// A state the size of a busy node: `handles` open files, a tenth as many open
/// directories, `lookups` inodes known to the kernel.
fn big_state(handles: u64, lookups: u64) -> ClientStateV1 {
    ClientStateV1 {
        generation: 7,
        session: 0x1234_5678,
        volume_uuid: "0b7c5d1e-9a3f-4c2b-8e6d-5f4a3b2c1d0e".into(),
        spec: spec(),
        init_request: vec![0x5a; 104],
        init_reply: vec![0xa5; 80],
        // Inode numbers from a large engine, counts mostly 1.
        lookups: (0..lookups)
            .map(|i| (1_000_000 + i * 3, 1 + i % 4))
            .collect(),
        files: (0..handles)
            .map(|i| FileHandleV1 {
                // Handle numbers carry flags and a counter in their high bits.
                fh: (i << 8) | 0x8000_0000_0000_0000 | (i % 3),
                ino: 1_000_000 + i,
                flags: if i % 5 == 0 { 0o102001 } else { 0o100000 },
                lock_owners: if i % 100 == 0 {
                    vec![0xdead_beef_0000 + i]
                } else {
                    Vec::new()
                },
            })
            .collect(),
        dirs: (0..handles / 10)
            .map(|i| DirHandleV1 {
                fh: (i << 8) | 0x4000_0000_0000_0000,
                ino: 2_000_000 + i,
                cursor: i * 17,
            })
            .collect(),
        orphans: (0..handles / 100).map(|i| 3_000_000 + i).collect(),
        next_handle: u32::try_from(handles).expect("fits") + 1,
    }
}

/// Sends `bytes` the way a handover does: split, each chunk framed as the old client's
/// `ToSupervisor::State` and re-framed as the successor's `ToClient::State`, reassembled.
fn through_the_wire(bytes: &[u8]) -> Vec<u8> {
    let mut a = Assembler::default();
    let mut out = None;
    for chunk in state::split(bytes) {
        assert!(chunk.data.len() <= CHUNK_BYTES);
        let from_old = encode_frame(&ToSupervisor::State(chunk)).expect("chunk fits a frame");
        let ToSupervisor::State(chunk) =
            decode_frame::<ToSupervisor>(&from_old).expect("own frame")
        else {
            panic!("not a state chunk");
        };
        let to_new = encode_frame(&ToClient::State(chunk)).expect("chunk fits a frame");
        let ToClient::State(chunk) = decode_frame::<ToClient>(&to_new).expect("own frame") else {
            panic!("not a state chunk");
        };
        assert!(out.is_none(), "a chunk after the state was complete");
        out = a.push(chunk).expect("in order");
    }
    a.finish().expect("complete");
    out.expect("the last chunk completes the state")
}

proptest! {
    #[test]
    fn state_roundtrips(s in client_state()) {
        let bytes = state::encode(&s).expect("encode");
        prop_assert_eq!(state::decode(&bytes).expect("decode"), s.clone());
        prop_assert_eq!(state::decode(&through_the_wire(&bytes)).expect("decode"), s);
    }
}

proptest! {
    // Each case moves up to 1.5 MiB through frames: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn split_and_assemble_roundtrip(len in 0usize..3 * CHUNK_BYTES + 3, seed in any::<u8>()) {
        let bytes: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
        prop_assert!(through_the_wire(&bytes) == bytes);
    }
}

#[test]
fn split_around_chunk_boundaries() {
    for len in [
        0,
        1,
        CHUNK_BYTES - 1,
        CHUNK_BYTES,
        CHUNK_BYTES + 1,
        2 * CHUNK_BYTES - 1,
        2 * CHUNK_BYTES,
        2 * CHUNK_BYTES + 1,
        5 * CHUNK_BYTES + 17,
    ] {
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let chunks = state::split(&bytes);
        // At least one chunk, even for an empty state; full chunks but the last.
        let expected = len.div_ceil(CHUNK_BYTES).max(1);
        assert_eq!(chunks.len(), expected, "len {len}");
        for (i, c) in chunks.iter().enumerate() {
            assert_eq!((c.index as usize, c.total as usize), (i, expected));
            if i + 1 < expected {
                assert_eq!(c.data.len(), CHUNK_BYTES, "len {len}, chunk {i}");
            } else {
                assert!(len == 0 || !c.data.is_empty(), "empty last chunk for {len}");
            }
        }
        assert!(through_the_wire(&bytes) == bytes, "len {len}");
    }
}

/// 100k open files and 1M known inodes: encodes in well under the handover budget in a
/// debug build, takes a few bytes per entry, and travels through frames intact.
#[test]
fn production_sized_state() {
    let s = ClientState::V1(big_state(100_000, 1_000_000));

    let t = Instant::now();
    let bytes = state::encode(&s).expect("encode");
    let encode_time = t.elapsed();
    let t = Instant::now();
    let back = state::decode(&bytes).expect("decode");
    let decode_time = t.elapsed();
    assert!(back == s);

    // Varint encoding: a lookup is an inode (~3-5 bytes) and a count (1 byte); a file
    // handle about 20 bytes.
    let per_entry_budget = 1_000_000 * 8 + 100_000 * 32 + 10_000 * 24 + 4_096;
    eprintln!(
        "100k handles + 1M lookups: {} bytes ({} chunks), encode {encode_time:?}, decode {decode_time:?}",
        bytes.len(),
        bytes.len().div_ceil(CHUNK_BYTES)
    );
    assert!(
        bytes.len() < per_entry_budget,
        "{} bytes is more than {per_entry_budget}",
        bytes.len()
    );
    assert!(bytes.len() < MAX_STATE_BYTES / 64);
    // Generous bounds: debug build, 2 shared cores. The release build is ~10x faster.
    assert!(
        encode_time < Duration::from_secs(10),
        "encode {encode_time:?}"
    );
    assert!(
        decode_time < Duration::from_secs(10),
        "decode {decode_time:?}"
    );

    let t = Instant::now();
    let again = through_the_wire(&bytes);
    eprintln!("split + frame + reassemble: {:?}", t.elapsed());
    assert!(again == bytes);
}

#[test]
fn empty_state_roundtrips() {
    let s = ClientState::V1(big_state(0, 0));
    let bytes = state::encode(&s).expect("encode");
    assert_eq!(state::decode(&bytes).expect("decode"), s);
    assert_eq!(state::split(&bytes).len(), 1);
}

// --- Assembler errors -------------------------------------------------------------------

fn chunk(index: u32, total: u32, data: &[u8]) -> StateChunk {
    StateChunk {
        index,
        total,
        data: data.to_vec(),
    }
}

#[test]
fn assembler_refuses_a_skipped_chunk() {
    let mut a = Assembler::default();
    assert_eq!(a.push(chunk(0, 3, b"a")).expect("first"), None);
    assert!(matches!(
        a.push(chunk(2, 3, b"c")),
        Err(StateError::OutOfOrder {
            index: 2,
            total: 3,
            expected: 1
        })
    ));
}

#[test]
fn assembler_refuses_a_repeated_chunk() {
    let mut a = Assembler::default();
    assert_eq!(a.push(chunk(0, 2, b"a")).expect("first"), None);
    assert!(matches!(
        a.push(chunk(0, 2, b"a")),
        Err(StateError::OutOfOrder {
            index: 0,
            expected: 1,
            ..
        })
    ));
}

#[test]
fn assembler_refuses_a_first_chunk_that_is_not_chunk_zero() {
    let mut a = Assembler::default();
    assert!(matches!(
        a.push(chunk(1, 2, b"b")),
        Err(StateError::OutOfOrder {
            index: 1,
            expected: 0,
            ..
        })
    ));
}

#[test]
fn assembler_refuses_zero_chunks_and_an_index_past_the_end() {
    let mut a = Assembler::default();
    assert!(matches!(
        a.push(chunk(0, 0, b"")),
        Err(StateError::OutOfOrder { total: 0, .. })
    ));
    // A chunk after the state was complete.
    let mut a = Assembler::default();
    assert_eq!(
        a.push(chunk(0, 1, b"x")).expect("only chunk"),
        Some(b"x".to_vec())
    );
    assert!(matches!(
        a.push(chunk(1, 1, b"y")),
        Err(StateError::OutOfOrder {
            index: 1,
            total: 1,
            expected: 1
        })
    ));
}

#[test]
fn assembler_refuses_a_changed_total() {
    let mut a = Assembler::default();
    assert_eq!(a.push(chunk(0, 3, b"a")).expect("first"), None);
    assert!(matches!(
        a.push(chunk(1, 2, b"b")),
        Err(StateError::TotalChanged {
            total: 2,
            expected: 3
        })
    ));
}

#[test]
fn assembler_reports_an_incomplete_state() {
    assert!(matches!(
        Assembler::default().finish(),
        Err(StateError::Incomplete { got: 0, total: 0 })
    ));
    let mut a = Assembler::default();
    assert_eq!(a.push(chunk(0, 3, b"a")).expect("first"), None);
    assert_eq!(a.push(chunk(1, 3, b"b")).expect("second"), None);
    assert!(matches!(
        a.finish(),
        Err(StateError::Incomplete { got: 2, total: 3 })
    ));
    let mut a = Assembler::default();
    assert_eq!(
        a.push(chunk(0, 1, b"a")).expect("only"),
        Some(b"a".to_vec())
    );
    a.finish().expect("complete");
}

#[test]
fn assembler_refuses_a_state_larger_than_the_limit() {
    // One chunk past the limit: refused before its bytes are copied (the zeroed
    // allocation is never touched).
    let mut a = Assembler::default();
    let huge = StateChunk {
        index: 0,
        total: 1,
        data: vec![0; MAX_STATE_BYTES + 1],
    };
    assert!(matches!(a.push(huge), Err(StateError::TooLarge)));

    // The limit counts the sum of the chunks, not each one.
    let mut a = Assembler::default();
    assert_eq!(a.push(chunk(0, 2, &vec![0; 1 << 20])).expect("first"), None);
    let rest = StateChunk {
        index: 1,
        total: 2,
        data: vec![0; MAX_STATE_BYTES - (1 << 20) + 1],
    };
    assert!(matches!(a.push(rest), Err(StateError::TooLarge)));
}

// --- Versions ---------------------------------------------------------------------------

#[test]
fn versions() {
    assert_eq!(SUPPORTED_VERSIONS, &[1]);
    let latest = big_state(3, 5);
    let s = ClientState::export_as(latest.clone(), 1).expect("v1");
    assert_eq!(s.version(), 1);
    assert_eq!(s.into_latest(), latest);
    for v in [0, 2, u16::MAX] {
        assert!(matches!(
            ClientState::export_as(latest.clone(), v),
            Err(StateError::UnsupportedVersion(n)) if n == v
        ));
    }
    // Every supported version can be exported and read back.
    for &v in SUPPORTED_VERSIONS {
        let s = ClientState::export_as(latest.clone(), v).expect("supported");
        let back = state::decode(&state::encode(&s).expect("encode")).expect("decode");
        assert_eq!(back.version(), v);
        assert_eq!(back.into_latest(), latest);
    }
}
