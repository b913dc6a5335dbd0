//! Which source partitions this replica owns right now, and whether each is still being
//! restored from its changelog.
//!
//! The consumer thread writes it (on rebalances and as restores progress); the query API
//! reads it, so that an answer covers exactly the partitions this replica owns and is up
//! to date on — never local state it has handed over, never a half-restored partition.
//!
//! ```
//! use tally::ownership::{Ownership, PartitionState};
//! let owned = Ownership::default();
//! owned.set(0, 3, PartitionState::Restoring { restored: 0, total: 1000 });
//! assert!(!owned.ready());
//! owned.set(0, 3, PartitionState::Active);
//! owned.mark_joined();
//! assert!(owned.ready());
//! assert_eq!(owned.of_source(0), vec![(3, PartitionState::Active)]);
//! ```

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Where an owned partition stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// Its state is being read back from the changelog; it answers no query yet.
    Restoring {
        /// Changelog records read so far.
        restored: u64,
        /// Changelog records to read in all.
        total: u64,
    },
    /// Restored and processing.
    Active,
}

/// A warm copy this replica keeps of a partition another replica owns, by following its
/// changelog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standby {
    /// Changelog records it is behind the changelog's end.
    pub lag: u64,
    /// Whether it holds a whole flush's state (it has caught up and applied a position
    /// since): only then may queries read it.
    pub queryable: bool,
}

/// The owned partitions of one replica, by (source index, partition).
#[derive(Debug, Default)]
pub struct Ownership {
    parts: Mutex<BTreeMap<(usize, i32), PartitionState>>,
    standbys: Mutex<BTreeMap<(usize, i32), Standby>>,
    /// Partitions lost without being handed over (the group session expired), with when
    /// (wall clock, ms): their state here is as of the last flush, answered only as a last
    /// resort, until the group assigns again.
    lost: Mutex<BTreeMap<(usize, i32), i64>>,
    /// Bumped whenever a partition is taken, given up, finishes restoring, or a standby copy
    /// starts, stops or becomes queryable: what was read before may belong to another owner.
    generation: std::sync::atomic::AtomicU64,
    joined: AtomicBool,
    stopping: AtomicBool,
}

impl Ownership {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(usize, i32), PartitionState>> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a partition's state (taking ownership of it if new).
    pub fn set(&self, source: usize, partition: i32, state: PartitionState) {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).remove(&(source, partition));
        let old = self.lock().insert((source, partition), state);
        if old.is_none_or(|o| std::mem::discriminant(&o) != std::mem::discriminant(&state)) {
            self.bump();
        }
    }

    /// Updates the progress of a partition still restoring; one given up meanwhile (or
    /// restored) is left alone.
    pub fn restoring(&self, source: usize, partition: i32, restored: u64, total: u64) {
        if let Some(s @ PartitionState::Restoring { .. }) = self.lock().get_mut(&(source, partition)) {
            *s = PartitionState::Restoring { restored, total };
        }
    }

    /// Gives a partition up.
    pub fn remove(&self, source: usize, partition: i32) {
        self.lock().remove(&(source, partition));
        self.bump();
    }

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Changes with every change of what is owned or copied (see the field).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The owned partitions of `source`, in partition order.
    pub fn of_source(&self, source: usize) -> Vec<(i32, PartitionState)> {
        self.lock().range((source, i32::MIN)..=(source, i32::MAX)).map(|(&(_, p), &s)| (p, s)).collect()
    }

    /// Gives a partition up without handing it over, at `at_ms` (see the field `lost`).
    pub fn lose(&self, source: usize, partition: i32, at_ms: i64) {
        self.remove(source, partition);
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).insert((source, partition), at_ms);
    }

    /// When the partition was lost, if it was and the group has not assigned since.
    pub fn lost(&self, source: usize, partition: i32) -> Option<i64> {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).get(&(source, partition)).copied()
    }

    /// The group assigns again: its owners answer for the partitions lost before.
    pub fn forget_lost(&self) {
        self.lost.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// Records the state of a standby copy.
    pub fn set_standby(&self, source: usize, partition: i32, standby: Standby) {
        let old = self.standbys.lock().unwrap_or_else(|p| p.into_inner()).insert((source, partition), standby);
        if old.is_none_or(|o| o.queryable != standby.queryable) {
            self.bump();
        }
    }

    /// Stops keeping a standby copy.
    pub fn remove_standby(&self, source: usize, partition: i32) {
        if self.standbys.lock().unwrap_or_else(|p| p.into_inner()).remove(&(source, partition)).is_some() {
            self.bump();
        }
    }

    /// The standby copy of a partition, if one is kept.
    pub fn standby(&self, source: usize, partition: i32) -> Option<Standby> {
        self.standbys.lock().unwrap_or_else(|p| p.into_inner()).get(&(source, partition)).copied()
    }

    /// Every standby copy, by (source index, partition).
    pub fn standbys(&self) -> Vec<((usize, i32), Standby)> {
        self.standbys.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, s)| (*k, *s)).collect()
    }

    /// Whether the partition is owned (active or restoring).
    pub fn owns(&self, source: usize, partition: i32) -> bool {
        self.lock().contains_key(&(source, partition))
    }

    /// Every owned partition with its state, by (source index, partition).
    pub fn snapshot(&self) -> Vec<((usize, i32), PartitionState)> {
        self.lock().iter().map(|(k, s)| (*k, *s)).collect()
    }

    /// Number of partitions owned, and of those still restoring.
    pub fn counts(&self) -> (usize, usize) {
        let parts = self.lock();
        (parts.len(), parts.values().filter(|s| matches!(s, PartitionState::Restoring { .. })).count())
    }

    /// Notes that the replica has received its first assignment from the group.
    pub fn mark_joined(&self) {
        self.joined.store(true, Ordering::Relaxed);
    }

    /// Notes that the replica is shutting down (it stops being ready).
    pub fn mark_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// Ready: joined the group, not stopping, and no owned partition still restoring.
    pub fn ready(&self) -> bool {
        self.joined.load(Ordering::Relaxed) && !self.stopping.load(Ordering::Relaxed) && self.counts().1 == 0
    }
}
