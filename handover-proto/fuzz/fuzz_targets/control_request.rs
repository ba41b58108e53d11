//! A frame from the CLI or the CSI plugin, as the supervisor reads it.
//! Any input is either refused with a typed error or decodes to a message that encodes
//! back to a frame decoding to the same message.
//!
//! An input that starts with the magic `BTON` is taken as a whole frame (header, CRC and
//! body from the fuzzer); any other input is a body put into a valid frame, so that the
//! fuzzer reaches the body decoder without having to solve the CRC.

#![no_main]

use handover_proto::channel::{decode_frame, encode_frame};
use handover_proto::control::ControlRequest;
use handover_proto::frame::{self, MAGIC};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let wrapped;
    let bytes = if data.starts_with(&MAGIC) {
        data
    } else {
        let Ok(f) = frame::encode(data) else {
            return;
        };
        wrapped = f;
        &wrapped
    };
    if let Ok(msg) = decode_frame::<ControlRequest>(bytes) {
        let again = encode_frame(&msg).expect("a decoded message encodes");
        let back = decode_frame::<ControlRequest>(&again).expect("its own frame decodes");
        assert_eq!(back, msg);
    }
});
