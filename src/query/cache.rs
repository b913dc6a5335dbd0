//! Partitions' partials read recently, by (read, partition), with the position they are the
//! state of: dashboards ask the same thing many times between two flushes, and a partition
//! whose position has not moved has not changed (every flush of it moves its position).
//!
//! After a flush every query misses at once; [`ReadCache::reading`] makes them read each
//! partition once between them: the first reads the store, the others wait for it and find
//! what it read here.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::fetch::{MetricPartials, MetricRead, Position};
use super::turns::Turns;

/// What the cache keeps at most, in stored bytes plus [`ENTRY_OVERHEAD`] per entry (it is
/// emptied when a read would pass it): a top list of thousands of keys on forty partitions
/// fits many times over.
const BUDGET: usize = 128 << 20;
/// A read weighing more than this share of the budget is not kept.
const LARGEST: usize = BUDGET / 8;
/// An entry's share of a read's weight besides its stored bytes: its decoded form's structs
/// and vectors.
pub const ENTRY_OVERHEAD: usize = 96;
/// Locks of [`ReadCache::reading`].
const TURNS: usize = 64;

/// One partition's partials of one read, as of `at`.
struct Kept {
    at: Position,
    partials: Arc<MetricPartials>,
    weight: usize,
}

#[derive(Default)]
struct Entries {
    by_read: HashMap<MetricRead, HashMap<i32, Kept>>,
    weight: usize,
    /// The ownership generation the entries were read under: any change of what this
    /// replica owns or copies empties the cache (the partition may have another state now).
    generation: u64,
}

/// The cache; see the module's documentation.
pub struct ReadCache {
    kept: Mutex<Entries>,
    reading: Turns,
}

impl Default for ReadCache {
    fn default() -> ReadCache {
        ReadCache { kept: Mutex::default(), reading: Turns::new(TURNS) }
    }
}

impl ReadCache {
    fn kept(&self) -> MutexGuard<'_, Entries> {
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partition `p`'s partials of `r` if they were read at `at`, under `generation`.
    pub fn get(&self, p: i32, r: &MetricRead, at: Position, generation: u64) -> Option<Arc<MetricPartials>> {
        let mut kept = self.kept();
        if generation != kept.generation {
            *kept = Entries { generation, ..Entries::default() };
            return None;
        }
        kept.by_read.get(r)?.get(&p).filter(|k| k.at == at).map(|k| Arc::clone(&k.partials))
    }

    /// Whether every one of `reads` of partition `p` is kept as of `at`, under `generation`:
    /// then a query needs no turn at [`ReadCache::reading`].
    pub fn holds(&self, p: i32, reads: &[MetricRead], at: Position, generation: u64) -> bool {
        let kept = self.kept();
        generation == kept.generation && reads.iter().all(|r| kept.by_read.get(r).and_then(|m| m.get(&p)).is_some_and(|k| k.at == at))
    }

    /// Keeps partition `p`'s partials of `r`, read at `at` under `generation`; `weight` is
    /// what they were read from (see [`ENTRY_OVERHEAD`]).
    pub fn put(&self, p: i32, r: &MetricRead, at: Position, partials: &Arc<MetricPartials>, weight: usize, generation: u64) {
        let mut kept = self.kept();
        if weight > LARGEST || generation != kept.generation {
            return;
        }
        if kept.weight + weight > BUDGET {
            kept.by_read.clear();
            kept.weight = 0;
        }
        kept.weight += weight;
        let by_partition = match kept.by_read.get_mut(r) {
            Some(m) => m,
            None => kept.by_read.entry(r.clone()).or_default(),
        };
        if let Some(old) = by_partition.insert(p, Kept { at, partials: Arc::clone(partials), weight }) {
            kept.weight -= old.weight;
        }
    }

    /// Held while `reads` of partition `p` of source `source` are read for the cache:
    /// whoever asks for the same meanwhile waits, then finds them here instead of reading the
    /// store again. Other reads of the partition go on meanwhile. With whether it waited.
    pub fn reading(&self, source: usize, p: i32, reads: &[MetricRead]) -> (MutexGuard<'_, ()>, bool) {
        self.reading.of(&(source, p, reads))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(metric: &str) -> MetricRead {
        MetricRead { metric: metric.into(), layout: "v1".into(), lo: 0, hi: 10, group: None, newest: false, merged: false }
    }

    fn at(next_offset: i64) -> Position {
        Position { next_offset, watermark: None, max_event_time: None }
    }

    #[test]
    fn reads_are_kept_while_their_partition_stands_still_and_within_the_budget() {
        let cache = ReadCache::default();
        let mp = Arc::new(MetricPartials::default());
        cache.put(3, &read("a"), at(5), &mp, 100, 0);
        assert!(cache.get(3, &read("a"), at(5), 0).is_some());
        assert!(cache.get(3, &read("a"), at(6), 0).is_none(), "the partition moved");
        assert!(cache.holds(3, &[read("a")], at(5), 0) && !cache.holds(3, &[read("a"), read("b")], at(5), 0));
        assert!(cache.get(4, &read("a"), at(5), 0).is_none(), "another partition");
        assert!(cache.get(3, &read("b"), at(5), 0).is_none(), "another read");
        cache.put(3, &read("b"), at(5), &mp, LARGEST + 1, 0);
        assert!(cache.get(3, &read("b"), at(5), 0).is_none(), "too heavy to keep");
        for p in 0..8 {
            cache.put(p, &read("c"), at(5), &mp, LARGEST, 0);
        }
        assert!(cache.get(3, &read("a"), at(5), 0).is_none(), "emptied when full");
        assert!(cache.get(7, &read("c"), at(5), 0).is_some(), "the read that emptied it is kept");
        assert!(cache.kept().weight <= BUDGET);
        assert!(cache.get(7, &read("c"), at(5), 1).is_none(), "another ownership generation");
    }
}
