//! Baton's filesystem client.
//!
//! What it does: serves one Baton volume over a FUSE connection it is handed — the
//! namespace and attributes from a metadata engine ([`meta`]: embedded redb or Redis), file
//! data as immutable blocks in object storage ([`data`], over opendal), the POSIX rules in
//! [`vfs`], and the fuser adapter in [`fuse`]. A client hands its connection over to a
//! successor process without unmounting ([`handover`], [`fuse::park`], [`client`]).
//!
//! What it must never do: mount or unmount (the supervisor owns the mount and the
//! connection), keep state that a successor process cannot rebuild from the metadata
//! engine and the handed-over state, or answer a request it did not execute.

pub mod client;
pub mod data;
pub mod fuse;
pub mod handover;
pub mod meta;
mod shm;
pub mod vfs;
