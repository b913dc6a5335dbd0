//! The changelog: what a flush writes ahead of the local store, and how a partition's store
//! is rebuilt from it. The Kafka side (producing, reading topics) is in
//! [`crate::kafka::changelog`]; this module is plain Rust over the store.
//!
//! # What the changelog holds
//!
//! One compacted topic per source (`<app>-<source>-changelog`), partition for partition
//! with the source topic. Its records are the store's own: the key is the store key, the
//! value the versioned encoding the store keeps (sketches in their canonical form), and a
//! deleted key (an expired slice) is a tombstone. A flush writes, per touched partition, the
//! changed aggregates and *then* — once those are acknowledged — one position record (the
//! partition's [`PartitionMeta`]: next offset, watermark). Compaction keeps each key's
//! latest value, and every aggregate carries the highest source offset it absorbed, so a
//! compacted changelog still restores a state that replays idempotently.
//!
//! # Restoring
//!
//! [`plan`] decides where to read from: only the tail after the local checkpoint when the
//! local store is valid, else everything (after wiping the partition's local keys). A
//! [`Restoration`] applies records in order and ends by recording the last position read
//! together with the new checkpoint.

use std::collections::HashMap;

use crate::hash::KeyHash;
use crate::migrations::{upcast_state, Upcast};
use crate::store::{self, PartitionMeta, Store, StoreError, WriteBatch, STATE_FORMAT};
use crate::topology::Topology;

/// One record of the changelog: a store key and its new value (`None`: deleted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Source index (which changelog topic).
    pub source: usize,
    /// Partition (of the source topic and of its changelog).
    pub partition: i32,
    /// Store key.
    pub key: Vec<u8>,
    /// Encoded value, `None` for a tombstone.
    pub value: Option<Vec<u8>>,
}

/// A changelog failure.
#[derive(Debug, thiserror::Error)]
#[error("changelog: {0}")]
pub struct ChangelogError(pub String);

/// Where a flush writes its changes before the local store.
pub trait ChangeSink {
    /// Sends `changes` and `positions` (one per partition) — a position never durable
    /// without its partition's changes before it. Durable once [`ChangeSink::acknowledged`]
    /// says so.
    fn send(&mut self, changes: &[Change], positions: &[Change]) -> Result<(), ChangelogError>;

    /// Waits at most `wait` for everything sent to be acknowledged: then the offset each
    /// position record got, in order; `None` while some records are in flight. An error once
    /// a record failed or waited too long: the flush is lost, and the sink ready for the next.
    fn acknowledged(&mut self, wait: std::time::Duration) -> Result<Option<Vec<i64>>, ChangelogError>;
}

/// Where a partition's restore starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// The local store is up to date with the changelog: nothing to read.
    UpToDate,
    /// Read from this offset on; the local store is valid up to just before it.
    Tail(i64),
    /// Wipe the partition's local state and read the whole changelog (from its start).
    Scratch,
}

/// Decides how to restore one partition: `local` is its stored position, `low..high` the
/// changelog partition's offsets.
///
/// The local store is valid when its checkpoint lies inside the changelog. A checkpoint at
/// or beyond `high` means the changelog is not the one the store was written against
/// (recreated, or another cluster); one before `low - 1` means records after it are gone.
/// Either way, and with no checkpoint at all, the partition is rebuilt from scratch.
pub fn plan(local: Option<PartitionMeta>, low: i64, high: i64) -> Plan {
    match local.and_then(|m| m.changelog_offset) {
        Some(c) if c >= low - 1 && c < high => {
            if c + 1 == high {
                Plan::UpToDate
            } else {
                Plan::Tail(c + 1)
            }
        }
        _ => Plan::Scratch,
    }
}

/// What a restore read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreStats {
    /// Changelog records applied.
    pub records: u64,
    /// Their key and value bytes.
    pub bytes: u64,
    /// Records that were not this partition's or were unreadable, and were skipped.
    pub rejected: u64,
    /// Distinct keys written to the store (the records' latest versions).
    pub keys_written: u64,
}

/// Bytes of keys and values a restore buffers per partition before writing them to the
/// store, unless [`Restoration::limit_buffer`] says otherwise.
const RESTORE_BUFFER_BYTES: usize = 4 << 20;

/// A restore of one source partition in progress.
///
/// An uncompacted changelog holds many versions of a key (one per flush that touched it);
/// only the last matters, so records are gathered in memory by key (up to
/// `RESTORE_BUFFER_BYTES`) and each surviving key is written once, in key order — restore
/// cost follows distinct keys, not records.
///
/// They are written outside any atomic batch (sled batches of many keys are several times
/// slower). That is safe because the position is written last, by
/// [`Restoration::finish`]: a crash before it leaves the old checkpoint (from scratch: none,
/// as the wipe removed it), so the next restore reads the same records again and writes
/// the same values.
pub struct Restoration {
    store: Store,
    /// Key prefixes (tag, metric name) of the source's metrics.
    metric_prefixes: Vec<Vec<u8>>,
    meta_key: Vec<u8>,
    /// The latest value read of each key not yet written (`None`: deleted).
    buffer: HashMap<Vec<u8>, Option<Vec<u8>>, KeyHash>,
    buffered_bytes: usize,
    /// Past this many buffered bytes the buffer is written (`RESTORE_BUFFER_BYTES` unless
    /// [`Restoration::limit_buffer`] says otherwise).
    buffer_limit: usize,
    position: Option<PartitionMeta>,
    /// Following (a standby): keys are written only together with the position record that
    /// ends their flush, in one atomic batch, so what queries read is always a flush's cut.
    following: bool,
    /// The highest source offset any aggregate read holds: beyond the position when a flush
    /// was torn, and then the position's pin must stay until the replay passes it.
    high_water: i64,
    /// What was read so far.
    pub stats: RestoreStats,
}

impl std::ops::AddAssign for RestoreStats {
    fn add_assign(&mut self, o: RestoreStats) {
        self.records += o.records;
        self.bytes += o.bytes;
        self.rejected += o.rejected;
        self.keys_written += o.keys_written;
    }
}

impl Restoration {
    /// Starts restoring `source`'s `partition` into `store`; with `scratch`, first deletes
    /// everything stored for it.
    pub fn begin(store: &Store, topo: &Topology, source: usize, partition: i32, scratch: bool) -> Result<Restoration, StoreError> {
        let src = &topo.sources[source];
        let names = src.metrics.iter().map(|&m| topo.metrics[m].name.as_str());
        let mut position = store.partition_meta(&src.name, partition)?;
        if !scratch && position.is_some() {
            // The keys read from here on are written before the position that goes with
            // them: until then the stored position is withdrawn, so no reader takes the
            // mix for the old state (it is rewritten by `commit` / `finish`; a crash before
            // that leaves no checkpoint, and the next restore reads everything).
            store.put_encoded(&store::meta_key(&src.name, partition), None)?;
        }
        if scratch {
            store.delete_partition(names.clone(), &src.name, partition)?;
            position = None;
        }
        let metric_prefixes = names
            .map(|n| {
                let mut p = Vec::new();
                store::partition_prefix(&mut p, n, partition);
                p
            })
            .collect();
        Ok(Restoration {
            store: store.clone(),
            metric_prefixes,
            meta_key: store::meta_key(&src.name, partition),
            buffer: HashMap::default(),
            buffered_bytes: 0,
            buffer_limit: RESTORE_BUFFER_BYTES,
            position,
            following: false,
            high_water: -1,
            stats: RestoreStats::default(),
        })
    }

    /// Bounds the buffer to `bytes` (the updater shares one budget among its restores).
    pub fn limit_buffer(&mut self, bytes: usize) {
        self.buffer_limit = bytes;
    }

    /// From now on, writes only whole flushes, atomically ([`Restoration::commit`]): the
    /// partition is a standby that queries may read. Writes what is buffered first.
    pub fn follow(&mut self) -> Result<(), StoreError> {
        self.write_buffer()?;
        self.following = true;
        Ok(())
    }

    /// Following: writes the buffered keys and the position read, with `last` (the position
    /// record's offset) as the checkpoint, in one atomic batch. Not following, or before any
    /// position was read, it does nothing: [`Restoration::finish`] writes what is left.
    pub fn commit(&mut self, last: i64) -> Result<(), StoreError> {
        let Some(mut position) = self.position.clone().filter(|_| self.following) else { return Ok(()) };
        position.changelog_offset = Some(last);
        position.replay_until = position.replay_until.max(self.high_water + 1);
        let mut batch = WriteBatch::default();
        let n = self.buffer.len() as u64;
        for (k, v) in self.buffer.drain() {
            match v {
                Some(v) => batch.put_encoded(&k, &v),
                None => batch.delete(&k),
            }
        }
        batch.put_encoded(&self.meta_key, &position.encode());
        self.store.apply(batch)?;
        self.stats.keys_written += n;
        self.buffered_bytes = 0;
        Ok(())
    }

    /// Applies one changelog record; `true` when it was a position record (the end of a
    /// flush). Records of other partitions or metrics, and values that are not in a known
    /// format, are skipped and counted: a foreign record must not stop a restore, nor land
    /// in the state.
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<bool, StoreError> {
        if key == self.meta_key.as_slice() {
            match value.map(|v| PartitionMeta::decode(key, v)) {
                Some(Ok(meta)) => self.position = Some(meta),
                Some(Err(e @ StoreError::Newer { .. })) => return Err(e),
                _ => {
                    self.stats.rejected += 1;
                    return Ok(false);
                }
            }
            self.stats.records += 1;
            self.stats.bytes += (key.len() + value.map_or(0, <[u8]>::len)) as u64;
            // Following, the flush's keys and this position go in together, by `commit`.
            if !self.following {
                self.write_if_full()?;
            }
            return Ok(true);
        } else if self.metric_prefixes.iter().any(|p| key.len() >= p.len() + store::SLICE_KEY_BYTES && key.starts_with(p)) {
            // Kept as written (the store mirrors the changelog); the layout gate reads them.
            match value.map(upcast_state) {
                Some(Err(Upcast::Newer(found))) => return Err(StoreError::Newer { what: "changelog state", found, supported: STATE_FORMAT }),
                Some(Err(Upcast::Unknown(_))) => {
                    self.stats.rejected += 1;
                    return Ok(false);
                }
                _ => {}
            }
            if let Some(offset) = value.and_then(crate::layout::max_offset_of) {
                self.high_water = self.high_water.max(offset);
            }
            // Most records are newer versions of a buffered key: replace in place, without
            // allocating the key again. The buffer's size counts what it holds, not what
            // was read: a replaced version is gone.
            let held = value.map_or(0, <[u8]>::len);
            match self.buffer.get_mut(key) {
                Some(v) => {
                    let before = v.as_ref().map_or(0, Vec::len);
                    *v = value.map(<[u8]>::to_vec);
                    self.buffered_bytes = (self.buffered_bytes + held).saturating_sub(before);
                }
                None => {
                    self.buffer.insert(key.to_vec(), value.map(<[u8]>::to_vec));
                    self.buffered_bytes += key.len() + held;
                }
            }
        } else {
            self.stats.rejected += 1;
            return Ok(false);
        }
        let size = key.len() + value.map_or(0, <[u8]>::len);
        self.stats.records += 1;
        self.stats.bytes += size as u64;
        if !self.following {
            self.write_if_full()?;
        }
        Ok(false)
    }

    fn write_if_full(&mut self) -> Result<(), StoreError> {
        if self.buffered_bytes >= self.buffer_limit {
            self.write_buffer()?;
        }
        Ok(())
    }

    /// Writes the buffered keys, in key order (sled's fastest).
    fn write_buffer(&mut self) -> Result<(), StoreError> {
        let mut entries: Vec<(Vec<u8>, Option<Vec<u8>>)> = self.buffer.drain().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for (k, v) in &entries {
            self.store.put_encoded(k, v.as_deref())?;
        }
        self.stats.keys_written += entries.len() as u64;
        self.buffered_bytes = 0;
        Ok(())
    }

    /// Ends the restore at changelog offset `last` (the last record read, or the checkpoint
    /// if nothing was): stores the last position read with `last` as its checkpoint. The
    /// caller fsyncs ([`Store::flush`]) before processing the partition. Returns the
    /// position to resume processing from (`None`: the changelog held no position, so the
    /// partition is processed from the source's beginning).
    pub fn finish(mut self, last: i64) -> Result<(Option<PartitionMeta>, RestoreStats), StoreError> {
        self.write_buffer()?;
        if let Some(p) = &mut self.position {
            p.changelog_offset = Some(last);
            p.replay_until = p.replay_until.max(self.high_water + 1);
            self.store.put_encoded(&self.meta_key, Some(&p.encode()))?;
        }
        Ok((self.position, self.stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(c: Option<i64>) -> Option<PartitionMeta> {
        Some(PartitionMeta { next_offset: 10, changelog_offset: c, ..PartitionMeta::default() })
    }

    #[test]
    fn restores_only_the_tail_of_a_valid_checkpoint() {
        assert_eq!(plan(meta(Some(41)), 0, 100), Plan::Tail(42));
        assert_eq!(plan(meta(Some(99)), 0, 100), Plan::UpToDate);
        assert_eq!(plan(meta(Some(100)), 0, 100), Plan::Scratch, "checkpoint beyond the log: another changelog");
        assert_eq!(plan(meta(Some(5)), 10, 100), Plan::Scratch, "records after the checkpoint were deleted");
        assert_eq!(plan(meta(Some(9)), 10, 100), Plan::Tail(10));
        assert_eq!(plan(meta(None), 0, 100), Plan::Scratch, "state written without a changelog");
        assert_eq!(plan(None, 0, 0), Plan::Scratch);
    }

    /// Records of the previous version (key format 1, value and position format 1) are
    /// rejected and counted, never read under the new key layout; with no position left, the
    /// partition is recomputed from its source.
    #[test]
    fn a_previous_versions_records_are_refused_not_misread() {
        let topo = crate::topology::test_topology(
            "[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = Restoration::begin(&store, &topo, 0, 0, true).unwrap();
        // Old layout: prefix · slice · group, with a group long enough to pass for a window end.
        let mut old_key = Vec::new();
        store::slice_prefix(&mut old_key, "m", 0, 60_000);
        old_key.extend_from_slice(b"product-101");
        let mut old_value =
            topo.metrics[0].layout.seal(&crate::store::StoredAggregate { max_offset: 3, states: vec![crate::aggregate::AggState::Count(7)] });
        old_value[0] = 1;
        r.apply(&old_key, Some(&old_value)).unwrap();
        let mut old_meta = PartitionMeta { next_offset: 4, ..PartitionMeta::default() }.encode();
        old_meta[0] = 1;
        r.apply(&store::meta_key("s", 0), Some(&old_meta)).unwrap();
        let (position, stats) = r.finish(1).unwrap();
        assert_eq!((position, stats.rejected, stats.keys_written), (None, 2, 0));
        assert!(store.first_state(&topo.metrics[0], 0).unwrap().is_none() && store.partition_meta("s", 0).unwrap().is_none());
    }

    /// A record written by a newer tally stops the restore with a message: skipping it would
    /// lose state, reading it would misread it.
    #[test]
    fn a_newer_versions_records_stop_the_restore() {
        let topo = crate::topology::test_topology(
            "[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n",
        );
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut r = Restoration::begin(&store, &topo, 0, 0, true).unwrap();
        let mut key = Vec::new();
        store::state_key_prefix(&mut key, "m", 0, 60_000, store::EVERY_WINDOW);
        let mut value =
            topo.metrics[0].layout.seal(&crate::store::StoredAggregate { max_offset: 3, states: vec![crate::aggregate::AggState::Count(7)] });
        value[0] = STATE_FORMAT + 1;
        assert!(matches!(r.apply(&key, Some(&value)), Err(StoreError::Newer { .. })));
        let mut meta = PartitionMeta::default().encode();
        meta[0] = store::META_FORMAT + 1;
        let err = r.apply(&store::meta_key("s", 0), Some(&meta)).unwrap_err().to_string();
        assert!(err.contains("newer tally"), "{err}");
    }
}
