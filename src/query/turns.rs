//! Turns at doing the same work: queries that miss the same read or merge at once (every one,
//! right after a flush) take turns, so the first does it and the others find its result kept.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// A fixed set of locks that keys map onto: two keys may share one, which only makes one wait
/// for the other's work.
pub struct Turns {
    locks: Vec<Mutex<()>>,
}

impl Turns {
    /// `n` locks (at least one).
    pub fn new(n: usize) -> Turns {
        Turns { locks: (0..n.max(1)).map(|_| Mutex::new(())).collect() }
    }

    /// Held while the work named by `key` is done and its result kept; with whether it had
    /// to wait for another's turn (only then may that one's result be there to find).
    pub fn of(&self, key: &impl Hash) -> (MutexGuard<'_, ()>, bool) {
        let mut hasher = DefaultHasher::new();
        key.hash(&mut hasher);
        let lock = &self.locks[(hasher.finish() % self.locks.len() as u64) as usize];
        match lock.try_lock() {
            Ok(turn) => (turn, false),
            Err(TryLockError::Poisoned(e)) => (e.into_inner(), false),
            Err(TryLockError::WouldBlock) => (lock.lock().unwrap_or_else(|e| e.into_inner()), true),
        }
    }
}
