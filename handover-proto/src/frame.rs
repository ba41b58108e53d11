//! The frame: a 16-byte header (magic, format version, payload length, CRC32C) and the
//! payload. The layout is drawn in the crate documentation.

/// The four bytes every frame starts with.
pub const MAGIC: [u8; 4] = *b"BTON";
/// Format major version: a reader refuses any other major.
pub const FORMAT_MAJOR: u16 = 1;
/// Format minor version: only adds message variants (see the crate documentation).
pub const FORMAT_MINOR: u16 = 1;
/// Size of the header in bytes.
pub const HEADER_LEN: usize = 16;
/// Largest payload a reader accepts (1 MiB).
pub const MAX_PAYLOAD: usize = 1 << 20;
/// Largest frame: header plus the largest payload.
pub const MAX_FRAME: usize = HEADER_LEN + MAX_PAYLOAD;

/// The fixed-size header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub major: u16,
    pub minor: u16,
    pub payload_len: u32,
    pub crc: u32,
}

/// Why bytes are not a valid frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame too short: {got} bytes, need at least {need}")]
    Short { need: usize, got: usize },
    #[error("frame payload of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("bad frame magic {found:02x?} (expected \"BTON\")")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported frame format version {major}.{minor} (this side speaks {FORMAT_MAJOR}.x)")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error(
        "frame payload CRC32C mismatch: header says {expected:#010x}, payload has {actual:#010x}"
    )]
    BadCrc { expected: u32, actual: u32 },
    #[error("frame length mismatch: header announces {announced} payload bytes, {got} follow")]
    LengthMismatch { announced: usize, got: usize },
}

impl Header {
    /// Parses and checks a header: magic, major version, payload size cap. Does not look at
    /// the payload.
    pub fn parse(bytes: &[u8]) -> Result<Header, FrameError> {
        let Some(h) = bytes.get(..HEADER_LEN) else {
            return Err(FrameError::Short {
                need: HEADER_LEN,
                got: bytes.len(),
            });
        };
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let major = u16::from_le_bytes([h[4], h[5]]);
        let minor = u16::from_le_bytes([h[6], h[7]]);
        if major != FORMAT_MAJOR {
            return Err(FrameError::UnsupportedVersion { major, minor });
        }
        let payload_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
        if payload_len as usize > MAX_PAYLOAD {
            return Err(FrameError::Oversized {
                len: payload_len as usize,
                max: MAX_PAYLOAD,
            });
        }
        let crc = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        Ok(Header {
            major,
            minor,
            payload_len,
            crc,
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.major.to_le_bytes());
        out.extend_from_slice(&self.minor.to_le_bytes());
        out.extend_from_slice(&self.payload_len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }
}

/// Wraps `payload` in a frame of the current format version.
pub fn encode(payload: &[u8]) -> Result<Vec<u8>, FrameError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(FrameError::Oversized {
            len: payload.len(),
            max: MAX_PAYLOAD,
        });
    }
    let header = Header {
        major: FORMAT_MAJOR,
        minor: FORMAT_MINOR,
        // Fits: checked against MAX_PAYLOAD (< u32::MAX) above.
        payload_len: payload.len() as u32,
        crc: crc32c::crc32c(payload),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    header.write(&mut out);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Checks a whole frame (exactly one, nothing after it) and returns its header and
/// payload.
pub fn decode(frame: &[u8]) -> Result<(Header, &[u8]), FrameError> {
    let header = Header::parse(frame)?;
    let payload = &frame[HEADER_LEN..];
    let announced = header.payload_len as usize;
    if payload.len() < announced {
        return Err(FrameError::Short {
            need: HEADER_LEN + announced,
            got: frame.len(),
        });
    }
    if payload.len() > announced {
        return Err(FrameError::LengthMismatch {
            announced,
            got: payload.len(),
        });
    }
    let actual = crc32c::crc32c(payload);
    if actual != header.crc {
        return Err(FrameError::BadCrc {
            expected: header.crc,
            actual,
        });
    }
    Ok((header, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn layout_is_as_documented() {
        let f = encode(b"abc").expect("small payload");
        assert_eq!(&f[0..4], b"BTON");
        assert_eq!(u16::from_le_bytes([f[4], f[5]]), FORMAT_MAJOR);
        assert_eq!(u16::from_le_bytes([f[6], f[7]]), FORMAT_MINOR);
        assert_eq!(u32::from_le_bytes([f[8], f[9], f[10], f[11]]), 3);
        assert_eq!(
            u32::from_le_bytes([f[12], f[13], f[14], f[15]]),
            crc32c::crc32c(b"abc")
        );
        assert_eq!(&f[16..], b"abc");
    }

    #[test]
    fn crc32c_is_castagnoli() {
        // The standard check value of CRC-32C.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn typed_errors() {
        let good = encode(b"hello").expect("small payload");
        assert_eq!(
            decode(&good[..3]),
            Err(FrameError::Short { need: 16, got: 3 })
        );
        assert_eq!(
            decode(&good[..18]),
            Err(FrameError::Short { need: 21, got: 18 })
        );

        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(decode(&bad), Err(FrameError::BadMagic { .. })));

        let mut bad = good.clone();
        bad[4] = 2;
        assert_eq!(
            decode(&bad),
            Err(FrameError::UnsupportedVersion {
                major: 2,
                minor: FORMAT_MINOR
            })
        );

        // A newer minor of the same major is accepted.
        let mut newer = good.clone();
        newer[6] = 9;
        assert_eq!(
            decode(&newer).map(|(h, p)| (h.minor, p.to_vec())),
            Ok((9, b"hello".to_vec()))
        );

        let mut bad = good.clone();
        bad[20] ^= 1;
        assert!(matches!(decode(&bad), Err(FrameError::BadCrc { .. })));

        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        assert_eq!(
            decode(&bad),
            Err(FrameError::Oversized {
                len: MAX_PAYLOAD + 1,
                max: MAX_PAYLOAD
            })
        );

        let mut long = good.clone();
        long.push(0);
        assert_eq!(
            decode(&long),
            Err(FrameError::LengthMismatch {
                announced: 5,
                got: 6
            })
        );

        assert!(matches!(
            encode(&vec![0; MAX_PAYLOAD + 1]),
            Err(FrameError::Oversized { .. })
        ));
    }

    proptest! {
        #[test]
        fn roundtrip(payload in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let f = encode(&payload).expect("small payload");
            let (h, p) = decode(&f).expect("own frame");
            prop_assert_eq!(h.payload_len as usize, payload.len());
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected(
            payload in proptest::collection::vec(any::<u8>(), 1..512),
            pos in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut f = encode(&payload).expect("small payload");
            let i = pos.index(f.len());
            f[i] ^= 1 << bit;
            // Flipping a minor-version bit yields another acceptable frame; every other
            // bit flip must be refused.
            if !(6..8).contains(&i) {
                prop_assert!(decode(&f).is_err());
            }
        }
    }
}
