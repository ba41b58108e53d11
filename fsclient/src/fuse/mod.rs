//! The kernel side of the client: the fuser `Filesystem` ([`adapter`]), the INIT relay
//! that starts its session on a connection the supervisor mounted ([`relay`]), and the
//! gate that freezes and thaws it for a live upgrade ([`park`]).

pub mod adapter;
pub mod park;
pub mod relay;
