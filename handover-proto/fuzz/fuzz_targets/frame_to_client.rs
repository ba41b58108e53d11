//! A frame from the supervisor, as a client reads it (`channel::recv::<ToClient>`).
//! The check: `handover_proto::channel::check_frame_roundtrip`.

#![no_main]

use handover_proto::channel::check_frame_roundtrip;
use handover_proto::message::ToClient;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_frame_roundtrip::<ToClient>(data));
