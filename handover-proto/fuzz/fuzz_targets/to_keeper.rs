//! A frame to or from the descriptor keeper (`handover_proto::keeper`).
//! The check: `handover_proto::channel::check_frame_roundtrip`.

#![no_main]

use handover_proto::channel::check_frame_roundtrip;
use handover_proto::keeper::ToKeeper;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_frame_roundtrip::<ToKeeper>(data));
