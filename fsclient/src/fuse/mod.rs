//! The kernel side of the client: the fuser `Filesystem` ([`adapter`]), the INIT relay
//! that starts its session on a connection the supervisor mounted ([`relay`]), the gate
//! that freezes and thaws it for a live upgrade ([`park`]), the allocator that puts
//! fuser's request buffers in the mount's request log — or at least keeps them resident,
//! so that a kill never fails a request the kernel is copying ([`buffers`]) —, the request
//! log itself ([`reqlog`]) and the answering of what a dead predecessor left in it
//! ([`recover`]), and the probe that asks the kernel whether it still has an inode
//! ([`probe`]).

pub mod adapter;
pub mod buffers;
pub mod park;
pub mod probe;
pub mod recover;
pub mod relay;
pub mod reqlog;
