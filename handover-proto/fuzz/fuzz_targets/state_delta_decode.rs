//! The changes since a base state, as a successor decodes them after reassembly
//! (`state::decode_delta`). Any input is either refused with a typed error or decodes to
//! a delta that survives a round trip.

#![no_main]

use handover_proto::state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = state::decode_delta(data) {
        let again = state::encode_delta(&d).expect("a decoded delta encodes");
        let back = state::decode_delta(&again).expect("its own encoding decodes");
        assert_eq!(back, d);
    }
});
