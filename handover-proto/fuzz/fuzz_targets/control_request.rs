//! A frame from the CLI or the CSI plugin, as the supervisor reads it.
//! The check: `handover_proto::channel::check_frame_roundtrip`.

#![no_main]

use handover_proto::channel::check_frame_roundtrip;
use handover_proto::control::ControlRequest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| check_frame_roundtrip::<ControlRequest>(data));
