//! The kernel's FUSE_INIT request and the filesystem's reply, as raw bytes.
//!
//! These bytes cross process boundaries: the supervisor reads the request from /dev/fuse
//! and sends it to the client (`ToClient::Init`); the client's fuser answers it through the
//! INIT relay and sends the reply back (`ToSupervisor::InitReply`); the supervisor checks
//! the reply, writes it to /dev/fuse and keeps it as the negotiated parameters of the
//! connection. Both sides check the bytes with this module. Only the layout of the
//! kernel ABI (`<linux/fuse.h>`) is used here, no FUSE library.
//!
//! ```text
//! request: fuse_in_header (40)                     fuse_init_in (16, 64 since 7.36)
//!   len u32 | opcode u32 (26) | unique u64 | nodeid u64 | uid | gid | pid | extlen u16 | pad u16
//!   major u32 | minor u32 | max_readahead u32 | flags u32 | flags2 u32 | unused
//! reply:   fuse_out_header (16)                    fuse_init_out (8, 24, 64 since 7.23+)
//!   len u32 | error i32 | unique u64
//!   major | minor | max_readahead | flags | max_background u16 | congestion u16 | max_write
//!   | time_gran | max_pages u16 | map_alignment u16 | flags2 | ...
//! ```
//!
//! `flags` is 32 bits wide in both structures; since ABI 7.36 the kernel sets
//! [`FUSE_INIT_EXT`] in it and puts bits 32..63 in `flags2`. `flags2` means something only
//! when `FUSE_INIT_EXT` is set (that is how the kernel reads a reply, and how it builds a
//! request), so the parsers here fold it into the 64-bit `flags` only then.
//!
//! # What the supervisor needs for a handover
//!
//! - [`InitRequest::has_resend`]: whether the kernel offered `FUSE_HAS_RESEND` (bit 39,
//!   kernels >= 6.9). The kernel needs nothing from the reply to honour a resend
//!   notification, so the offer in the request decides between the resend and the drain
//!   mode of a handover.
//! - [`notify_resend`]: the 16-byte `FUSE_NOTIFY_RESEND` message. Written to /dev/fuse it
//!   moves every request that was read but not answered back to the head of the pending
//!   queue, with bit 63 of `unique` set ([`RESENT_UNIQUE_BIT`]); the reply must echo that
//!   `unique`. Write it only while no process reads the connection (after the old client
//!   was reaped, before the successor serves): requests a live reader is processing would
//!   otherwise run twice.

/// `FUSE_INIT`.
pub const FUSE_INIT: u32 = 26;
/// Size of `fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `fuse_out_header`.
pub const OUT_HEADER_LEN: usize = 16;
/// Smallest `fuse_init_in` (ABI < 7.36).
const MIN_INIT_IN: usize = 16;
/// Smallest `fuse_init_out` the kernel accepts (ABI 7.0 compat: major and minor).
const MIN_INIT_OUT: usize = 8;
/// Largest INIT message we accept either way (the structures are 104 and 80 bytes today).
pub const MAX_INIT_LEN: usize = 4096;
/// The FUSE major version Baton speaks.
pub const FUSE_MAJOR: u32 = 7;
/// INIT flag: `flags2` carries bits 32..63 of the flags (ABI 7.36).
pub const FUSE_INIT_EXT: u64 = 1 << 30;
/// INIT flag offered by kernels that accept [`FUSE_NOTIFY_RESEND`] (Linux 6.9, ABI 7.40).
pub const FUSE_HAS_RESEND: u64 = 1 << 39;
/// Notify code of the resend notification (`fuse_notify_code`), sent in the `error`
/// field of a `fuse_out_header` whose `unique` is 0.
pub const FUSE_NOTIFY_RESEND: i32 = 7;
/// Bit of `fuse_in_header.unique` the kernel sets on a request it re-delivers after
/// [`FUSE_NOTIFY_RESEND`]; the reply must carry the same `unique`, bit included.
pub const RESENT_UNIQUE_BIT: u64 = 1 << 63;

/// The bytes are not a usable FUSE_INIT request or reply.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitError {
    #[error("INIT message of {len} bytes: shorter than {min}")]
    Short { len: usize, min: usize },
    #[error("INIT message of {len} bytes: longer than {MAX_INIT_LEN}")]
    TooLong { len: usize },
    #[error("length field says {field} bytes, message has {actual}")]
    LengthMismatch { field: u32, actual: usize },
    #[error("opcode {0} is not FUSE_INIT (26)")]
    NotInit(u32),
    #[error("INIT reply is an error: errno {0}")]
    ErrorReply(i32),
    #[error("INIT reply answers request {got:#x}, not {expected:#x}")]
    WrongUnique { expected: u64, got: u64 },
    #[error("FUSE major version {0} (only 7 is spoken)")]
    Major(u32),
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    b.get(off..off + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    b.get(off..off + 8).map_or(0, |s| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    })
}

/// The 64-bit flags of an INIT message: `flags2` counts only under [`FUSE_INIT_EXT`].
fn flags64(flags: u32, flags2: u32) -> u64 {
    let low = u64::from(flags);
    if low & FUSE_INIT_EXT != 0 {
        low | (u64::from(flags2) << 32)
    } else {
        low
    }
}

fn check_len(bytes: &[u8], min: usize) -> Result<(), InitError> {
    if bytes.len() < min {
        return Err(InitError::Short {
            len: bytes.len(),
            min,
        });
    }
    if bytes.len() > MAX_INIT_LEN {
        return Err(InitError::TooLong { len: bytes.len() });
    }
    let field = u32_at(bytes, 0);
    if field as usize != bytes.len() {
        return Err(InitError::LengthMismatch {
            field,
            actual: bytes.len(),
        });
    }
    Ok(())
}

/// A checked FUSE_INIT request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitRequest {
    pub unique: u64,
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` as offered by the kernel (`flags2` only when the kernel set
    /// [`FUSE_INIT_EXT`]).
    pub flags: u64,
}

impl InitRequest {
    /// Checks the request: length field and opcode. The major version is returned, not
    /// checked.
    pub fn parse(bytes: &[u8]) -> Result<InitRequest, InitError> {
        check_len(bytes, IN_HEADER_LEN + MIN_INIT_IN)?;
        let opcode = u32_at(bytes, 4);
        if opcode != FUSE_INIT {
            return Err(InitError::NotInit(opcode));
        }
        let b = &bytes[IN_HEADER_LEN..];
        Ok(InitRequest {
            unique: u64_at(bytes, 8),
            major: u32_at(b, 0),
            minor: u32_at(b, 4),
            max_readahead: u32_at(b, 8),
            flags: flags64(u32_at(b, 12), u32_at(b, 16)),
        })
    }

    /// Whether the kernel offered `FUSE_HAS_RESEND` (Linux >= 6.9): the supervisor may
    /// then hand over in resend mode and write [`notify_resend`]; otherwise it must drain.
    pub fn has_resend(&self) -> bool {
        self.flags & FUSE_HAS_RESEND != 0
    }
}

/// A checked, successful FUSE_INIT reply: the negotiated parameters of the connection.
/// Fields the reply is too short to carry (old ABI) are 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitReply {
    pub unique: u64,
    pub major: u32,
    pub minor: u32,
    pub max_readahead: u32,
    /// `flags | flags2 << 32` as accepted by the filesystem (`flags2` only when the reply
    /// sets [`FUSE_INIT_EXT`], as the kernel reads it).
    pub flags: u64,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_write: u32,
    pub time_gran: u32,
    pub max_pages: u16,
}

impl InitReply {
    /// Checks that `bytes` is a successful reply to the request `unique`.
    pub fn parse(bytes: &[u8], unique: u64) -> Result<InitReply, InitError> {
        check_len(bytes, OUT_HEADER_LEN)?;
        let error = u32_at(bytes, 4) as i32;
        if error != 0 {
            // `error` is a negative errno; a peer may send anything, i32::MIN included.
            return Err(InitError::ErrorReply(error.saturating_neg()));
        }
        let got = u64_at(bytes, 8);
        if got != unique {
            return Err(InitError::WrongUnique {
                expected: unique,
                got,
            });
        }
        if bytes.len() < OUT_HEADER_LEN + MIN_INIT_OUT {
            return Err(InitError::Short {
                len: bytes.len(),
                min: OUT_HEADER_LEN + MIN_INIT_OUT,
            });
        }
        let b = &bytes[OUT_HEADER_LEN..];
        let major = u32_at(b, 0);
        if major != FUSE_MAJOR {
            return Err(InitError::Major(major));
        }
        Ok(InitReply {
            unique,
            major,
            minor: u32_at(b, 4),
            max_readahead: u32_at(b, 8),
            flags: flags64(u32_at(b, 12), u32_at(b, 32)),
            max_background: u16_at(b, 16),
            congestion_threshold: u16_at(b, 18),
            max_write: u32_at(b, 20),
            time_gran: u32_at(b, 24),
            max_pages: u16_at(b, 28),
        })
    }
}

/// The `FUSE_NOTIFY_RESEND` notification: a bare `fuse_out_header { len: 16, error: 7,
/// unique: 0 }`, little-endian. See the module documentation for when it may be written.
pub fn notify_resend() -> [u8; OUT_HEADER_LEN] {
    let mut b = [0u8; OUT_HEADER_LEN];
    b[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    // unique 0: a notification, not a reply.
    b
}

/// A reply that fails request `unique` with `errno` (a bare `fuse_out_header`).
pub fn error_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut b = [0u8; OUT_HEADER_LEN];
    b[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&errno.saturating_neg().to_le_bytes());
    b[8..16].copy_from_slice(&unique.to_le_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A request as the 6.x kernel sends it (ABI 7.45, 104 bytes).
    pub(crate) fn request(unique: u64) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&104u32.to_le_bytes());
        b.extend_from_slice(&FUSE_INIT.to_le_bytes());
        b.extend_from_slice(&unique.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes()); // nodeid
        b.extend_from_slice(&[0u8; 16]); // uid gid pid extlen pad
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&45u32.to_le_bytes());
        b.extend_from_slice(&(128u32 << 10).to_le_bytes());
        b.extend_from_slice(&0xffff_ffffu32.to_le_bytes());
        b.extend_from_slice(&0x0000_00ffu32.to_le_bytes());
        b.extend_from_slice(&[0u8; 44]);
        b
    }

    fn reply(unique: u64) -> Vec<u8> {
        reply_with_flags(unique, 0x4000_0040, 2)
    }

    /// A 7.45 reply (80 bytes) with the given `flags` and `flags2`.
    fn reply_with_flags(unique: u64, flags: u32, flags2: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&80u32.to_le_bytes());
        b.extend_from_slice(&0i32.to_le_bytes());
        b.extend_from_slice(&unique.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&45u32.to_le_bytes());
        b.extend_from_slice(&(128u32 << 10).to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&64u16.to_le_bytes()); // max_background
        b.extend_from_slice(&48u16.to_le_bytes()); // congestion
        b.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_write
        b.extend_from_slice(&1u32.to_le_bytes()); // time_gran
        b.extend_from_slice(&256u16.to_le_bytes()); // max_pages
        b.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
        b.extend_from_slice(&flags2.to_le_bytes());
        b.extend_from_slice(&[0u8; 28]);
        b
    }

    #[test]
    fn parses_request_and_reply() {
        let r = InitRequest::parse(&request(9)).expect("request");
        assert_eq!(
            (r.unique, r.major, r.minor, r.max_readahead),
            (9, 7, 45, 128 << 10)
        );
        assert_eq!(r.flags, 0xff_ffff_ffff);
        let p = InitReply::parse(&reply(9), 9).expect("reply");
        assert_eq!(p.max_write, 1 << 20);
        assert_eq!(p.max_pages, 256);
        assert_eq!(p.max_background, 64);
        assert_eq!(p.flags, FUSE_INIT_EXT | 0x40 | (2 << 32));
    }

    /// The INIT request this machine's kernel (Linux 6.18, ABI 7.45) sent for a fresh
    /// mount, byte for byte (read from /dev/fuse after mount(2) with `fd=N`).
    #[rustfmt::skip]
    const LINUX_6_18_INIT: [u8; 104] = [
        // fuse_in_header: len 104, opcode 26, unique 2
        0x68, 0x00, 0x00, 0x00, 0x1a, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // nodeid 0, uid 0, gid 0
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // pid 0, total_extlen 0, padding; fuse_init_in: major 7, minor 45
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00, 0x00, 0x2d, 0x00, 0x00, 0x00,
        // max_readahead 128 KiB, flags 0x73fffffb, flags2 0x5fd, unused[0]
        0x00, 0x00, 0x02, 0x00, 0xfb, 0xff, 0xff, 0x73, 0xfd, 0x05, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // unused[1..11]
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn parses_the_request_of_a_real_kernel() {
        let r = InitRequest::parse(&LINUX_6_18_INIT).expect("kernel request");
        assert_eq!(
            (r.unique, r.major, r.minor, r.max_readahead),
            (2, 7, 45, 128 << 10)
        );
        // flags 0x73fffffb (FUSE_INIT_EXT set), flags2 0x5fd.
        assert_eq!(r.flags, 0x0000_05fd_73ff_fffb);
        assert_ne!(r.flags & FUSE_INIT_EXT, 0);
        assert!(r.has_resend());
    }

    /// A request of a kernel older than 6.9: FUSE_INIT_EXT set, bit 39 clear.
    #[test]
    fn no_resend_before_6_9() {
        let mut r = LINUX_6_18_INIT;
        // flags2 = 0x5fd with bit 7 (39 - 32) cleared.
        r[56..60].copy_from_slice(&(0x5fdu32 & !(1 << 7)).to_le_bytes());
        let p = InitRequest::parse(&r).expect("request");
        assert!(!p.has_resend());
        assert_eq!(p.flags >> 32, 0x57d);
    }

    /// `flags2` is only read under FUSE_INIT_EXT, as the kernel does.
    #[test]
    fn flags2_counts_only_with_init_ext() {
        let mut r = LINUX_6_18_INIT;
        let low = 0x73ff_fffbu32 & !(1 << 30);
        r[52..56].copy_from_slice(&low.to_le_bytes());
        let p = InitRequest::parse(&r).expect("request");
        assert_eq!(p.flags, u64::from(low));
        assert!(!p.has_resend());

        let p = InitReply::parse(&reply_with_flags(3, 0x40, 2), 3).expect("reply");
        assert_eq!(p.flags, 0x40);
        let p = InitReply::parse(&reply_with_flags(3, 0x4000_0040, 2), 3).expect("reply");
        assert_eq!(p.flags, 0x4000_0040 | (2 << 32));
    }

    /// ABI < 7.36: a 56-byte request (16-byte `fuse_init_in`, no `flags2`), and the
    /// 24-byte reply of ABI 7.5-7.22.
    #[test]
    fn parses_old_abi_layouts() {
        let mut r = Vec::new();
        r.extend_from_slice(&56u32.to_le_bytes());
        r.extend_from_slice(&LINUX_6_18_INIT[4..40]);
        r.extend_from_slice(&7u32.to_le_bytes());
        r.extend_from_slice(&31u32.to_le_bytes());
        r.extend_from_slice(&(128u32 << 10).to_le_bytes());
        r.extend_from_slice(&0x03ff_fffbu32.to_le_bytes());
        let p = InitRequest::parse(&r).expect("old request");
        assert_eq!((p.minor, p.flags), (31, 0x03ff_fffb));
        assert!(!p.has_resend());

        let mut b = reply_with_flags(2, 0x1, 0);
        b.truncate(OUT_HEADER_LEN + 24);
        b[0..4].copy_from_slice(&40u32.to_le_bytes());
        let p = InitReply::parse(&b, 2).expect("old reply");
        // 24 bytes end with max_write: time_gran and what follows are absent, so 0.
        assert_eq!((p.max_write, p.time_gran, p.max_pages), (1 << 20, 0, 0));

        // The 8-byte compat reply (major, minor) is the shortest accepted.
        let mut b = reply_with_flags(2, 0, 0);
        b.truncate(OUT_HEADER_LEN + 8);
        b[0..4].copy_from_slice(&24u32.to_le_bytes());
        let p = InitReply::parse(&b, 2).expect("compat reply");
        assert_eq!((p.major, p.minor, p.max_write), (7, 45, 0));
        b.truncate(OUT_HEADER_LEN + 4);
        b[0..4].copy_from_slice(&20u32.to_le_bytes());
        assert!(matches!(
            InitReply::parse(&b, 2),
            Err(InitError::Short { .. })
        ));
    }

    #[test]
    fn refuses_another_major_in_the_reply() {
        let mut b = reply(1);
        b[16..20].copy_from_slice(&8u32.to_le_bytes());
        assert_eq!(InitReply::parse(&b, 1), Err(InitError::Major(8)));
    }

    /// Found by the `fuse_init` fuzz target: an error field of i32::MIN overflowed the
    /// negation (a panic in debug builds) instead of being a typed error.
    #[test]
    fn error_field_of_i32_min_is_a_typed_error() {
        let input = [
            28, 0, 0, 0, 0, 0, 0, 128, 0, 36, 0, 185, 255, 255, 255, 255, 255, 255, 0, 0, 0, 0,
            255, 3, 250, 220, 116, 6,
        ];
        let unique = u64_at(&input, 8);
        assert_eq!(
            InitReply::parse(&input, unique),
            Err(InitError::ErrorReply(i32::MAX))
        );
        let b = error_reply(1, i32::MIN);
        assert_eq!(u32_at(&b, 4) as i32, i32::MAX);
    }

    #[test]
    fn notify_resend_layout() {
        let b = notify_resend();
        assert_eq!(
            b,
            [16, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "fuse_out_header {{ len: 16, error: FUSE_NOTIFY_RESEND, unique: 0 }}"
        );
        assert_eq!(u32_at(&b, 0) as usize, OUT_HEADER_LEN);
        assert_eq!(u32_at(&b, 4) as i32, FUSE_NOTIFY_RESEND);
        assert_eq!(u64_at(&b, 8), 0);
    }

    #[test]
    fn refuses_bad_messages() {
        let mut r = request(1);
        r[4] = 1;
        assert_eq!(InitRequest::parse(&r), Err(InitError::NotInit(1)));
        assert!(matches!(
            InitRequest::parse(&request(1)[..50]),
            Err(InitError::Short { .. })
        ));
        let mut r = request(1);
        r.push(0);
        assert!(matches!(
            InitRequest::parse(&r),
            Err(InitError::LengthMismatch { .. })
        ));
        assert_eq!(
            InitReply::parse(&reply(3), 4),
            Err(InitError::WrongUnique {
                expected: 4,
                got: 3
            })
        );
        assert_eq!(
            InitReply::parse(&error_reply(5, libc::EIO), 5),
            Err(InitError::ErrorReply(libc::EIO))
        );
    }

    #[test]
    fn error_reply_layout() {
        let b = error_reply(0x1234, libc::EIO);
        assert_eq!(u32_at(&b, 0), 16);
        assert_eq!(u32_at(&b, 4) as i32, -libc::EIO);
        assert_eq!(u64_at(&b, 8), 0x1234);
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), unique in any::<u64>()) {
            let _ = InitRequest::parse(&bytes);
            let _ = InitReply::parse(&bytes, unique);
        }
    }
}
