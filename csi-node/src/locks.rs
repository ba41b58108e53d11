//! Serialization of operations. Two kinds:
//! - per CSI volume: a second call on a volume while one runs is refused with ABORTED, as
//!   the spec asks (the CO retries);
//! - per backend: calls for different volumes that share a backend wait their turn, so a
//!   mount is never torn down while another volume is being bound to it.

use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::error::CsiError;

/// Names with an operation in progress.
#[derive(Debug, Default, Clone)]
pub struct InFlight(Arc<Mutex<HashSet<String>>>);

/// Held while an operation runs; ends it when dropped.
#[derive(Debug)]
pub struct InFlightGuard {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl InFlight {
    /// Starts an operation on `key`, or ABORTED if one is running.
    pub fn try_begin(&self, key: &str) -> Result<InFlightGuard, CsiError> {
        let mut set = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if !set.insert(key.to_string()) {
            return Err(CsiError::Aborted(format!(
                "an operation on volume {key:?} is already in progress"
            )));
        }
        Ok(InFlightGuard {
            set: Arc::clone(&self.0),
            key: key.to_string(),
        })
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
    }
}

/// Blocking per-key mutual exclusion.
#[derive(Debug, Default, Clone)]
pub struct KeyedLock(Arc<(Mutex<HashSet<String>>, Condvar)>);

/// Holds one key of a [`KeyedLock`].
#[derive(Debug)]
pub struct KeyGuard {
    lock: Arc<(Mutex<HashSet<String>>, Condvar)>,
    key: String,
}

impl KeyedLock {
    /// Waits until nobody holds `key`, then holds it.
    pub fn lock(&self, key: &str) -> KeyGuard {
        let (m, cv) = &*self.0;
        let mut held = m.lock().unwrap_or_else(PoisonError::into_inner);
        while held.contains(key) {
            held = cv.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        held.insert(key.to_string());
        KeyGuard {
            lock: Arc::clone(&self.0),
            key: key.to_string(),
        }
    }
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let (m, cv) = &*self.lock;
        m.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.key);
        cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_operation_on_a_volume_is_aborted_until_the_first_ends() {
        let f = InFlight::default();
        let g = f.try_begin("v").expect("first");
        assert!(matches!(f.try_begin("v"), Err(CsiError::Aborted(_))));
        assert!(f.try_begin("w").is_ok());
        drop(g);
        assert!(f.try_begin("v").is_ok());
    }

    #[test]
    fn keyed_lock_serializes() {
        let l = KeyedLock::default();
        let g = l.lock("b");
        let l2 = l.clone();
        let t = std::thread::spawn(move || {
            let _g = l2.lock("b");
            std::time::Instant::now()
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let released = std::time::Instant::now();
        drop(g);
        let acquired = t.join().expect("thread");
        assert!(acquired >= released);
    }
}
