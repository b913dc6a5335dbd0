//! Merged reads kept while every partition they merge stands still: dashboards ask the same
//! span or top list many times between two flushes, and merging every partition's sketches
//! again for each costs far more than reading them. A merge is the state of the partitions
//! at the positions they were read at (the per-partition read cache rests on the same rule),
//! so it is answered again only for exactly those positions, from the same replicas.
//!
//! After a flush every query of a dashboard misses at once; [`Memo::merged`] makes them merge
//! once between them: the first merges, the others wait for it and find its merge.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::fetch::{Fetched, MetricRead, Position};
use super::turns::Turns;
use super::Partials;

/// What a fetch's partials merge to, per read.
#[derive(Debug, Default)]
pub struct Merged {
    /// Per read: group → (slice, first window end) → merged states.
    pub partials: Vec<Partials>,
    /// Per read: the newest slice holding data, when asked.
    pub newest: Vec<Option<i64>>,
    /// Per read: the first slice's start and last slice's end of merged reads.
    pub bounds: Vec<Option<(i64, i64)>>,
}

impl Merged {
    fn groups(&self) -> usize {
        self.partials.iter().map(|p| p.len()).sum()
    }
}

/// Which partitions a merge is of: each one's number, who answered it, its position and
/// standby lag.
type Answers = Vec<(i32, String, Position, Option<u64>)>;

fn answers(fetched: &Fetched) -> Answers {
    fetched.parts.iter().map(|a| (a.partials.partition, a.replica.clone(), a.partials.position, a.partials.standby_lag)).collect()
}

/// Whether `fetched` answered exactly the partitions of `at`, from the same replicas.
fn same_answers(at: &Answers, fetched: &Fetched) -> bool {
    at.len() == fetched.parts.len()
        && at.iter().zip(&fetched.parts).all(|((p, replica, position, lag), a)| {
            (*p, *position, *lag) == (a.partials.partition, a.partials.position, a.partials.standby_lag) && *replica == a.replica
        })
}

/// Merges kept at most (the map is emptied when full).
const ENTRIES: usize = 1_000;
/// A merge of more groups than this is not kept: it would hold much memory for one answer.
const LARGEST: usize = 5_000;

/// Per source, per reads: the partitions merged and their merge. Nested so that a lookup
/// borrows the source and reads asked instead of building a key.
type Kept = HashMap<String, HashMap<Vec<MetricRead>, (Answers, Arc<Merged>)>>;

/// Locks of [`Memo::merged`].
const TURNS: usize = 16;

/// The kept merges, by source and reads.
pub struct Memo {
    map: Mutex<(Kept, usize)>,
    merging: Turns,
}

impl Default for Memo {
    fn default() -> Memo {
        Memo { map: Mutex::default(), merging: Turns::new(TURNS) }
    }
}

impl Memo {
    /// The merge of `reads` of `source` for the partitions `fetched` answered: the one kept,
    /// or else `merge`'s, kept. Whoever asks for the same meanwhile waits for it.
    pub fn merged<E>(
        &self,
        source: &str,
        reads: &[MetricRead],
        fetched: &Fetched,
        merge: impl FnOnce() -> Result<Merged, E>,
    ) -> Result<Arc<Merged>, E> {
        if let Some(kept) = self.get(source, reads, fetched) {
            return Ok(kept);
        }
        let (_merging, _) = self.merging.of(&(source, reads));
        if let Some(kept) = self.get(source, reads, fetched) {
            return Ok(kept);
        }
        let merged = Arc::new(merge()?);
        self.put(source, reads, fetched, &merged);
        Ok(merged)
    }

    /// The merge of `reads` of `source` kept for exactly the partitions `fetched` answered.
    fn get(&self, source: &str, reads: &[MetricRead], fetched: &Fetched) -> Option<Arc<Merged>> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (at, merged) = map.0.get(source)?.get(reads)?;
        same_answers(at, fetched).then(|| Arc::clone(merged))
    }

    /// Keeps `merged`, the merge of what `fetched` answered for `reads` of `source`.
    fn put(&self, source: &str, reads: &[MetricRead], fetched: &Fetched, merged: &Arc<Merged>) {
        if merged.groups() > LARGEST {
            return;
        }
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let (kept, entries) = &mut *map;
        if *entries >= ENTRIES {
            kept.clear();
            *entries = 0;
        }
        let of_source = kept.entry(source.to_string()).or_default();
        if of_source.insert(reads.to_vec(), (answers(fetched), Arc::clone(merged))).is_none() {
            *entries += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::fetch::{Answered, PartitionPartials};

    fn fetched(parts: &[(i32, &str, i64)]) -> Fetched {
        let answered = |&(partition, replica, next_offset): &(i32, &str, i64)| Answered {
            replica: replica.into(),
            partials: PartitionPartials {
                partition,
                position: Position { next_offset, watermark: Some(1), max_event_time: Some(2) },
                reads: vec![],
                standby_lag: None,
                stale_since_ms: None,
            },
        };
        Fetched { parts: parts.iter().map(answered).collect(), missing: vec![] }
    }

    /// A merge is answered again only for the very partitions, replicas and positions it
    /// was read at.
    #[test]
    fn a_merge_is_kept_only_while_its_partitions_stand_still() {
        let memo = Memo::default();
        let reads = [MetricRead { metric: "m".into(), layout: "l".into(), lo: 0, hi: 1, group: None, newest: false, merged: true }];
        let at = fetched(&[(0, "a", 5), (1, "b", 7)]);
        memo.put("s", &reads, &at, &Arc::new(Merged { newest: vec![Some(3)], ..Merged::default() }));
        assert_eq!(memo.get("s", &reads, &at).map(|m| m.newest.clone()), Some(vec![Some(3)]));
        assert!(memo.get("s", &reads, &fetched(&[(0, "a", 5), (1, "b", 8)])).is_none(), "a partition moved");
        assert!(memo.get("s", &reads, &fetched(&[(0, "a", 5), (1, "c", 7)])).is_none(), "another replica answered");
        assert!(memo.get("s", &reads, &fetched(&[(0, "a", 5)])).is_none(), "a partition missing");
        assert!(memo.get("t", &reads, &at).is_none(), "another source");
        let other = [MetricRead { hi: 2, ..reads[0].clone() }];
        assert!(memo.get("s", &other, &at).is_none(), "other reads");
    }

    /// Queries missing the same merge at once merge it once between them.
    #[test]
    fn a_merge_missed_at_once_is_merged_once() {
        let memo = Memo::default();
        let reads = [MetricRead { metric: "m".into(), layout: "l".into(), lo: 0, hi: 1, group: None, newest: false, merged: true }];
        let at = fetched(&[(0, "a", 5)]);
        let merges = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    let merged = memo.merged("s", &reads, &at, || {
                        merges.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        Ok::<_, ()>(Merged { newest: vec![Some(9)], ..Merged::default() })
                    });
                    assert_eq!(merged.map(|m| m.newest.clone()), Ok(vec![Some(9)]));
                });
            }
        });
        assert_eq!(merges.into_inner(), 1);
        let moved = fetched(&[(0, "a", 6)]);
        assert_eq!(memo.merged("s", &reads, &moved, || Err("unreadable")).map(|_| ()), Err("unreadable"));
        let again = memo.merged("s", &reads, &moved, || Ok::<_, &str>(Merged::default()));
        assert_eq!(again.map(|m| m.newest.clone()), Ok(vec![]), "merged again: the partition moved, and the failure was not kept");
    }
}
