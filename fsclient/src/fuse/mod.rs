//! The kernel side of the client: the fuser `Filesystem` ([`adapter`]) and the INIT relay
//! that starts its session on a connection the supervisor mounted ([`relay`]).

pub mod adapter;
pub mod relay;
