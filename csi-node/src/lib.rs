//! `baton-csi`: Baton's CSI driver. It serves CSI v1 (Identity, Node, Controller) over
//! gRPC on a Unix socket, publishes a volume by mounting its Baton volume once per node
//! (a *backend*) and bind-mounting the volume's directory to each target path, counts a
//! backend's users from the host's mount table, and unmounts it after the last one.
//!
//! The FUSE server of a backend must outlive this process: it runs in a mount pod on the
//! node (Kubernetes) or as a detached `baton` supervisor (hosts, tests). A restarted
//! `baton-csi` rediscovers everything from /proc/self/mountinfo, its state directory and
//! the API server; nothing lives only in its memory.
//!
//! It must never log, or put into an error message, a secret (metadata URL, credentials).

pub mod baton;
pub mod controller;
pub mod error;
pub mod identity;
pub mod keeper;
pub mod kube;
pub mod layout;
pub mod locks;
pub mod mounter;
pub mod mountinfo;
pub mod node;
pub mod proto;
pub mod provision;
pub mod publish;
pub mod rollout;
pub mod server;
pub mod sys;
pub mod upgrade;
pub mod volume;
