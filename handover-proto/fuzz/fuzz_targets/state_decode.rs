//! An exported client state, as a successor decodes it after reassembly
//! (`state::decode`). Any input is either refused with a typed error or decodes to a
//! state that survives a round trip.

#![no_main]

use handover_proto::state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = state::decode(data) {
        let again = state::encode(&s).expect("a decoded state encodes");
        let back = state::decode(&again).expect("its own encoding decodes");
        assert_eq!(back, s);
    }
});
