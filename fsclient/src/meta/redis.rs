//! The Redis engine (being written).
use super::*;

/// The Redis backend.
#[derive(Debug)]
pub struct RedisBackend;

impl RedisBackend {
    pub fn open(url: &str) -> Result<Self> {
        Err(MetaError::BadUrl { url: url.into(), reason: "redis engine not built yet".into() })
    }
}

impl Backend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }
    fn write<T>(&self, _f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        Err(MetaError::ReadOnly)
    }
    fn read<T>(&self, _f: &mut dyn FnMut(&mut dyn Tx) -> Result<T>) -> Result<T> {
        Err(MetaError::ReadOnly)
    }
}
