//! The per-volume lock table.
//!
//! A call takes the keys of every object it touches (`volume/<id>`,
//! `snapshot/<id>`, ...) before it is queued and holds them until its work is
//! done. A second call on a held key is refused at once with ABORTED, as the
//! CSI spec's concurrency section asks, so no worker ever waits for another
//! call's volume and calls on other volumes proceed in parallel.

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::Mutex;

/// The set of keys held by calls in progress.
#[derive(Debug, Default)]
pub struct LockTable {
    held: Mutex<HashSet<String>>,
}

/// Keys held by one call; released when dropped, whatever the outcome.
#[derive(Debug)]
pub struct LockGuard {
    table: Arc<LockTable>,
    keys: Vec<String>,
}

impl LockTable {
    /// Takes every key in `keys`, or none of them: when one is held, returns
    /// that key and leaves the table unchanged.
    pub fn try_lock(self: &Arc<Self>, keys: Vec<String>) -> Result<LockGuard, String> {
        let mut held = self.held.lock();
        if let Some(busy) = keys.iter().find(|k| held.contains(*k)) {
            return Err(busy.clone());
        }
        let mut taken = Vec::with_capacity(keys.len());
        for key in keys {
            // A call may name one object twice (clone of itself, say):
            // keep one entry so release removes it once.
            if held.insert(key.clone()) {
                taken.push(key);
            }
        }
        Ok(LockGuard {
            table: Arc::clone(self),
            keys: taken,
        })
    }

    /// How many keys are held right now.
    pub fn len(&self) -> usize {
        self.held.lock().len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.held.lock().is_empty()
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut held = self.table.held.lock();
        for key in &self.keys {
            held.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> Vec<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn second_lock_on_a_key_is_refused_until_release() {
        let table = Arc::new(LockTable::default());
        let guard = table.try_lock(keys(&["volume/a"])).unwrap();
        assert_eq!(table.try_lock(keys(&["volume/a"])).unwrap_err(), "volume/a");
        drop(guard);
        assert!(table.try_lock(keys(&["volume/a"])).is_ok());
    }

    #[test]
    fn other_keys_proceed() {
        let table = Arc::new(LockTable::default());
        let _a = table.try_lock(keys(&["volume/a"])).unwrap();
        let _b = table.try_lock(keys(&["volume/b"])).unwrap();
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn all_or_nothing() {
        let table = Arc::new(LockTable::default());
        let _b = table.try_lock(keys(&["volume/b"])).unwrap();
        let err = table.try_lock(keys(&["volume/a", "volume/b"])).unwrap_err();
        assert_eq!(err, "volume/b");
        // volume/a was not left held by the failed attempt.
        assert!(table.try_lock(keys(&["volume/a"])).is_ok());
    }

    #[test]
    fn duplicate_keys_in_one_call_release_cleanly() {
        let table = Arc::new(LockTable::default());
        let g = table.try_lock(keys(&["volume/a", "volume/a"])).unwrap();
        drop(g);
        assert!(table.is_empty());
    }

    #[test]
    fn no_keys_always_succeeds() {
        let table = Arc::new(LockTable::default());
        let _g1 = table.try_lock(Vec::new()).unwrap();
        let _g2 = table.try_lock(Vec::new()).unwrap();
        assert!(table.is_empty());
    }
}
