//! Baton's supervisor and host CLI (`baton`).
//!
//! What it does: formats volumes ([`format`](mod@format)); mounts them — it opens /dev/fuse, calls
//! mount(2) and reads the kernel's FUSE_INIT itself ([`mount`]), starts a filesystem client
//! ([`spawn`]) and hands it the connection through the INIT relay, then supervises the
//! mount ([`supervise`]), in the foreground or detached ([`background`]); replaces the
//! client under the live mount — live upgrade, rollback, restart from the handed-over
//! state ([`upgrade`]: a sans-IO machine and its driver); answers the CLI on a per-mount
//! control socket ([`control`], [`umount`], [`status`], [`upgrade::command`]) and serves
//! metrics ([`metrics`]). The supervisor is replaceable too: a restarted `baton mount`
//! adopts the client of a live mount whose supervisor died ([`adopt`]), and `baton upgrade
//! --supervisor` hands the mount to a new supervisor binary ([`replace`]).
//!
//! What it must never do: serve filesystem requests itself, close its /dev/fuse descriptor
//! while the mount should live (the connection dies with the last holder), leave a mount
//! that nobody will ever answer, write FUSE_NOTIFY_RESEND while a client may read, or
//! import clap (the command line is the binary's).

pub mod adopt;
pub mod background;
pub mod control;
pub mod format;
pub mod home;
pub mod keeper;
pub mod metrics;
pub mod mount;
pub mod replace;
pub mod spawn;
pub mod status;
pub mod supervise;
pub mod umount;
pub mod upgrade;
