//! A frame from a client, as the supervisor reads it (`channel::recv::<ToSupervisor>`).
//! The check: `handover_proto::channel::check_frame_roundtrip`.

#![no_main]

use handover_proto::channel::check_frame_roundtrip;
use handover_proto::message::ToSupervisor;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_frame_roundtrip::<ToSupervisor>(data));
