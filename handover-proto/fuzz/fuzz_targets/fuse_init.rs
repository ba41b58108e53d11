//! FUSE_INIT bytes: a request as the supervisor reads it from /dev/fuse and a client
//! receives it (`InitRequest::parse`), a reply as the supervisor receives it from a
//! client (`InitReply::parse`). Typed errors only; what parses is consistent.

#![no_main]

use handover_proto::fuse_init::{FUSE_HAS_RESEND, FUSE_INIT_EXT, InitReply, InitRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = InitRequest::parse(data) {
        assert_eq!(r.has_resend(), r.flags & FUSE_HAS_RESEND != 0);
        assert!(r.flags >> 32 == 0 || r.flags & FUSE_INIT_EXT != 0);
    }
    // The reply's `unique` taken from the input itself, so that the fuzzer reaches the
    // checks behind it; and once with another one.
    let unique = data
        .get(8..16)
        .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
    if let Ok(r) = InitReply::parse(data, unique) {
        assert_eq!(r.major, 7);
        assert_eq!(r.unique, unique);
        assert!(r.flags >> 32 == 0 || r.flags & FUSE_INIT_EXT != 0);
    }
    let _ = InitReply::parse(data, unique ^ 1);
});
