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
    /// `flags | flags2 << 32` as offered by the kernel.
    pub flags: u64,
}

impl InitRequest {
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
            flags: u64::from(u32_at(b, 12)) | (u64::from(u32_at(b, 16)) << 32),
        })
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
    /// `flags | flags2 << 32` as accepted by the filesystem.
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
            return Err(InitError::ErrorReply(-error));
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
            flags: u64::from(u32_at(b, 12)) | (u64::from(u32_at(b, 32)) << 32),
            max_background: u16_at(b, 16),
            congestion_threshold: u16_at(b, 18),
            max_write: u32_at(b, 20),
            time_gran: u32_at(b, 24),
            max_pages: u16_at(b, 28),
        })
    }
}

/// A reply that fails request `unique` with `errno` (a bare `fuse_out_header`).
pub fn error_reply(unique: u64, errno: i32) -> [u8; OUT_HEADER_LEN] {
    let mut b = [0u8; OUT_HEADER_LEN];
    b[0..4].copy_from_slice(&(OUT_HEADER_LEN as u32).to_le_bytes());
    b[4..8].copy_from_slice(&(-errno).to_le_bytes());
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
        let mut b = Vec::new();
        b.extend_from_slice(&80u32.to_le_bytes());
        b.extend_from_slice(&0i32.to_le_bytes());
        b.extend_from_slice(&unique.to_le_bytes());
        b.extend_from_slice(&7u32.to_le_bytes());
        b.extend_from_slice(&45u32.to_le_bytes());
        b.extend_from_slice(&(128u32 << 10).to_le_bytes());
        b.extend_from_slice(&0x40u32.to_le_bytes()); // flags
        b.extend_from_slice(&64u16.to_le_bytes()); // max_background
        b.extend_from_slice(&48u16.to_le_bytes()); // congestion
        b.extend_from_slice(&(1u32 << 20).to_le_bytes()); // max_write
        b.extend_from_slice(&1u32.to_le_bytes()); // time_gran
        b.extend_from_slice(&256u16.to_le_bytes()); // max_pages
        b.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
        b.extend_from_slice(&2u32.to_le_bytes()); // flags2
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
        assert_eq!(p.flags, 0x40 | (2 << 32));
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
