//! A sequence of state chunks from a peer, fed to `state::Assembler`. Whatever the
//! sequence, the assembler either refuses a chunk with a typed error or yields exactly
//! the concatenation of chunks 0..total sent in order, with one `total` throughout.

#![no_main]

use handover_proto::message::StateChunk;
use handover_proto::state::{Assembler, StateError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|chunks: Vec<(u32, u32, Vec<u8>)>| {
    let mut a = Assembler::default();
    let mut expected = Vec::new();
    let first_total = chunks.first().map(|c| c.1);
    for (n, (index, total, data)) in chunks.into_iter().enumerate() {
        let well_formed =
            u32::try_from(n) == Ok(index) && index < total && Some(total) == first_total;
        expected.extend_from_slice(&data);
        match a.push(StateChunk { index, total, data }) {
            Ok(got) => {
                assert!(
                    well_formed,
                    "accepted chunk {index}/{total} at position {n}"
                );
                if let Some(bytes) = got {
                    assert_eq!(index + 1, total);
                    assert_eq!(bytes, expected);
                    a.finish().expect("complete after the last chunk");
                    return;
                }
            }
            Err(StateError::OutOfOrder { .. } | StateError::TotalChanged { .. }) => {
                assert!(
                    !well_formed,
                    "refused chunk {index}/{total} at position {n}"
                );
                return;
            }
            Err(StateError::TooLarge) => return,
            Err(e) => panic!("unexpected error {e:?}"),
        }
    }
    assert!(matches!(a.finish(), Err(StateError::Incomplete { .. })));
});
