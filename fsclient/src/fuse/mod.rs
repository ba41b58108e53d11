//! The kernel side of the client: the fuser `Filesystem` ([`adapter`]), the INIT relay
//! that starts its session on a connection the supervisor mounted ([`relay`]), and the
//! gate that freezes and thaws it for a live upgrade ([`park`]), and the allocator that
//! keeps fuser's request buffers resident so that a kill never fails a request the
//! kernel is copying ([`prefault`]), and the probe that asks the kernel whether it still
//! has an inode ([`probe`]).

pub mod adapter;
pub mod park;
pub mod prefault;
pub mod probe;
pub mod relay;
