//! Baton's supervisor and host CLI (`baton`).
//!
//! What it does: formats volumes ([`format`](mod@format)); mounts them — it opens /dev/fuse, calls
//! mount(2) and reads the kernel's FUSE_INIT itself ([`mount`]), starts a filesystem client
//! ([`spawn`]) and hands it the connection through the INIT relay, then supervises the
//! mount ([`supervise`]), in the foreground or detached ([`background`]); answers the CLI
//! on a per-mount control socket ([`control`], [`umount`], [`status`]).
//!
//! What it must never do: serve filesystem requests itself, close its /dev/fuse descriptor
//! while the mount should live (the connection dies with the last holder), leave a mount
//! that nobody will ever answer, or import clap (the command line is the binary's).

pub mod background;
pub mod control;
pub mod format;
pub mod home;
pub mod mount;
pub mod spawn;
pub mod status;
pub mod supervise;
pub mod umount;
