//! An in-process [`KeyValue`]: the control plane's store for tests and for groups whose members
//! are threads of one process.

use super::KeyValue;
use anyhow::{bail, Result};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A [`KeyValue`] held in memory: `set` stores and wakes every waiting `get`.
#[derive(Debug, Default)]
pub struct MemoryKeyValue {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemoryKeyValue {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Vec<u8>>> {
        // A panic while holding the lock cannot leave the map half-updated (insert is the only
        // mutation), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KeyValue for MemoryKeyValue {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        self.lock().insert(key.to_owned(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut map = self.lock();
        loop {
            if let Some(value) = map.get(key) {
                return Ok(value.clone());
            }
            let left = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            if left.is_zero() {
                bail!("key-value store: key {key:?} was not set within {timeout:?}");
            }
            map = self
                .changed
                .wait_timeout(map, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn memory_kv_get_waits_for_set_and_times_out() {
        let kv = Arc::new(MemoryKeyValue::new());
        let err = kv.get("missing", Duration::from_millis(20)).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");

        let setter = {
            let kv = kv.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(30));
                kv.set("a/b", b"hello").unwrap();
            })
        };
        assert_eq!(kv.get("a/b", Duration::from_secs(10)).unwrap(), b"hello");
        setter.join().unwrap();
        kv.set("a/b", b"again").unwrap();
        assert_eq!(kv.get("a/b", Duration::ZERO).unwrap(), b"again");
    }
}
