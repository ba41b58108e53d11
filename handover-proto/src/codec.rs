//! Encoding of message bodies: the only module that knows bincode.
//!
//! Configuration (part of the format; changing it is a new major version): bincode 2
//! "standard" — little endian, variable-length integers, enum variants by index — with a
//! decode limit of [`MAX_PAYLOAD`] bytes so that a hostile length prefix cannot make the
//! reader allocate more than a frame can hold.

use bincode::config::{Configuration, Limit, LittleEndian, Varint};

use crate::frame::MAX_PAYLOAD;

pub use bincode::{Decode, Encode};

type Config = Configuration<LittleEndian, Varint, Limit<MAX_PAYLOAD>>;

fn config() -> Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_PAYLOAD>()
}

/// A value could not be encoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message body")]
pub struct EncodeError(#[source] bincode::error::EncodeError);

/// Bytes are not a valid encoding of the expected type.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot decode message body")]
    Invalid(#[source] bincode::error::DecodeError),
    #[error("{extra} unexpected bytes after the message body")]
    Trailing { extra: usize },
}

/// Encodes `value`.
pub fn encode<T: Encode>(value: &T) -> Result<Vec<u8>, EncodeError> {
    bincode::encode_to_vec(value, config()).map_err(EncodeError)
}

/// Decodes exactly one `T` from `bytes`; trailing bytes are an error.
pub fn decode<T: Decode<()>>(bytes: &[u8]) -> Result<T, DecodeError> {
    let (value, used) =
        bincode::decode_from_slice(bytes, config()).map_err(DecodeError::Invalid)?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing {
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Encode, Decode)]
    struct Sample {
        a: u64,
        b: Vec<u8>,
        c: Option<String>,
    }

    #[test]
    fn roundtrip_and_trailing() {
        let s = Sample {
            a: 300,
            b: vec![1, 2, 3],
            c: Some("x".into()),
        };
        let mut bytes = encode(&s).expect("encodes");
        assert_eq!(decode::<Sample>(&bytes).expect("decodes"), s);
        bytes.push(0);
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(DecodeError::Trailing { extra: 1 })
        ));
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        // a = 0, then a Vec length of u64::MAX (varint marker 253 + 8 bytes).
        let mut bytes = vec![0u8, 253];
        bytes.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Sample>(&bytes),
            Err(DecodeError::Invalid(_))
        ));
    }
}
