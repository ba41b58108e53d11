//! The client state handed from one client generation to the next.
//!
//! [`ClientState`] is a versioned enum: one variant per schema version, never changed
//! once released. A client announces the versions it can export and import (`Hello`);
//! the supervisor asks the old client for the newest version both support. A reader
//! turns any version it knows into its newest with explicit migrations
//! ([`ClientState::into_latest`], `From<V1> for V2` when V2 exists).
//!
//! The encoded state can be larger than a frame: [`split`] cuts it into
//! [`StateChunk`]s and [`Assembler`] puts them back together, checking order and size.

pub mod delta;
pub mod v1;

use crate::codec::{Decode, Encode};
use crate::message::StateChunk;

pub use delta::{StateDelta, StateDeltaV1};
pub use v1::ClientStateV1;

/// Schema versions this build can export and import.
pub const SUPPORTED_VERSIONS: &[u16] = &[1];

/// Largest encoded state accepted (1M cached inodes and 100k handles fit many times).
pub const MAX_STATE_BYTES: usize = 1 << 30;

/// Largest chunk payload (well below the frame limit).
pub const CHUNK_BYTES: usize = 512 << 10;

/// A client state in one of the schema versions.
#[derive(Clone, Debug, PartialEq, Eq, Encode, Decode)]
pub enum ClientState {
    V1(ClientStateV1),
}

impl ClientState {
    pub fn version(&self) -> u16 {
        match self {
            ClientState::V1(_) => 1,
        }
    }

    /// The state in the newest schema this build knows.
    pub fn into_latest(self) -> ClientStateV1 {
        match self {
            ClientState::V1(s) => s,
        }
    }

    /// The state in schema `version`, for a successor that reads only that one.
    pub fn export_as(latest: ClientStateV1, version: u16) -> Result<ClientState, StateError> {
        match version {
            1 => Ok(ClientState::V1(latest)),
            v => Err(StateError::UnsupportedVersion(v)),
        }
    }
}

/// Encoding, decoding or reassembling a state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state schema version {0} is not supported by this build")]
    UnsupportedVersion(u16),
    #[error("cannot encode the state")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("cannot decode the state")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("{extra} unexpected bytes after the state")]
    Trailing { extra: usize },
    #[error("state is larger than {MAX_STATE_BYTES} bytes")]
    TooLarge,
    #[error("state chunk {index} of {total} arrived where chunk {expected} was due")]
    OutOfOrder {
        index: u32,
        total: u32,
        expected: u32,
    },
    #[error("state chunk says {total} chunks, earlier ones said {expected}")]
    TotalChanged { total: u32, expected: u32 },
    #[error("the state is incomplete: {got} of {total} chunks")]
    Incomplete { got: u32, total: u32 },
    #[error(
        "the changes are of generation {}, session {}; the base is of generation {}, session {}",
        delta.0, delta.1, base.0, base.1
    )]
    OtherBase { base: (u64, u64), delta: (u64, u64) },
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_STATE_BYTES>()
}

/// Encodes a state (the only place its bytes are made).
pub fn encode(state: &ClientState) -> Result<Vec<u8>, StateError> {
    encode_limited(state)
}

/// Decodes a state; never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<ClientState, StateError> {
    decode_limited(bytes)
}

/// Encodes the changes since a base.
pub fn encode_delta(delta: &StateDelta) -> Result<Vec<u8>, StateError> {
    encode_limited(delta)
}

/// Decodes the changes since a base; never panics on any input.
pub fn decode_delta(bytes: &[u8]) -> Result<StateDelta, StateError> {
    decode_limited(bytes)
}

fn encode_limited<T: Encode>(value: &T) -> Result<Vec<u8>, StateError> {
    let b = bincode::encode_to_vec(value, config()).map_err(StateError::Encode)?;
    if b.len() > MAX_STATE_BYTES {
        return Err(StateError::TooLarge);
    }
    Ok(b)
}

fn decode_limited<T: Decode<()>>(bytes: &[u8]) -> Result<T, StateError> {
    if bytes.len() > MAX_STATE_BYTES {
        return Err(StateError::TooLarge);
    }
    let (value, used) = bincode::decode_from_slice(bytes, config()).map_err(StateError::Decode)?;
    if used != bytes.len() {
        return Err(StateError::Trailing {
            extra: bytes.len() - used,
        });
    }
    Ok(value)
}

/// `base` and `delta` (both encoded, schema `version`) as one encoded whole state of that
/// version: what a restart from a state kept after a delta handover sends.
pub fn merge(version: u16, base: &[u8], delta: &[u8]) -> Result<Vec<u8>, StateError> {
    let base = decode(base)?;
    let delta = decode_delta(delta)?;
    if base.version() != version {
        return Err(StateError::UnsupportedVersion(base.version()));
    }
    if delta.version() != version {
        return Err(StateError::UnsupportedVersion(delta.version()));
    }
    let mut whole = base.into_latest();
    delta.into_latest().apply(&mut whole)?;
    encode(&ClientState::export_as(whole, version)?)
}

/// Cuts an encoded state into chunks (at least one, even when empty).
pub fn split(bytes: &[u8]) -> Vec<StateChunk> {
    let pieces: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[][..]]
    } else {
        bytes.chunks(CHUNK_BYTES).collect()
    };
    let total = pieces.len() as u32;
    pieces
        .into_iter()
        .enumerate()
        .map(|(i, d)| StateChunk {
            index: i as u32,
            total,
            data: d.to_vec(),
        })
        .collect()
}

/// Reassembles chunks sent in order.
#[derive(Debug, Default)]
pub struct Assembler {
    bytes: Vec<u8>,
    next: u32,
    total: Option<u32>,
}

impl Assembler {
    /// Adds the next chunk; returns the whole state once the last chunk is in.
    pub fn push(&mut self, chunk: StateChunk) -> Result<Option<Vec<u8>>, StateError> {
        let total = *self.total.get_or_insert(chunk.total);
        if chunk.total != total {
            return Err(StateError::TotalChanged {
                total: chunk.total,
                expected: total,
            });
        }
        if chunk.index != self.next || chunk.index >= total {
            return Err(StateError::OutOfOrder {
                index: chunk.index,
                total,
                expected: self.next,
            });
        }
        if self.bytes.len() + chunk.data.len() > MAX_STATE_BYTES {
            return Err(StateError::TooLarge);
        }
        self.bytes.extend_from_slice(&chunk.data);
        self.next += 1;
        if self.next == total {
            return Ok(Some(std::mem::take(&mut self.bytes)));
        }
        Ok(None)
    }

    /// Fails unless every chunk arrived.
    pub fn finish(self) -> Result<(), StateError> {
        match self.total {
            Some(t) if self.next == t => Ok(()),
            t => Err(StateError::Incomplete {
                got: self.next,
                total: t.unwrap_or(0),
            }),
        }
    }
}
