//! Tasks: the processing core. One [`PartitionTask`] per owned source partition, driven by
//! a [`TaskSet`] — plain synchronous Rust over in-memory types and the store, no Kafka.
//!
//! For each record: decode it, advance the partition's watermark, and for each metric of
//! its source whose filter passes, fold it into the partial aggregate of (metric,
//! partition, slice, group key) for the windows of the slice that are still open (see
//! [`crate::window::WindowSpec::place`]). A record for which every window has closed is
//! *late* for that metric and is reported instead; one that some windows still take is
//! counted there and reported as *partly late*.
//!
//! Updates land in a write-back cache; [`TaskSet::flush`] writes the dirty entries, the
//! partitions' positions and the deletions of expired slices to the store in one atomic
//! batch and fsyncs it. Offsets may be committed to Kafka only after that.
//!
//! Each stored aggregate remembers the highest offset it absorbed, and a record at or below
//! it is skipped: replaying a partition from an older position (after a crash, or on a
//! replica restoring someone else's state) never counts a record twice.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use crate::aggregate::AggState;
use crate::changelog::{Change, ChangeSink, ChangelogError};
use crate::config::Missing;
use crate::event::{DecodeError, Record};
use crate::hash::KeyHash;
use crate::layout::{MetricMark, Rebuilding, Refusals};
use crate::store::{self, PartitionMeta, Store, StoreError, StoredAggregate, TablePin, WriteBatch, GROUP_SEPARATOR};
use crate::table::{Positions, Tables};
use crate::topology::Topology;
use crate::window::Admit;

/// Watermark of a partition that has seen nothing yet.
pub const NO_WATERMARK: i64 = i64::MIN;

/// Position and event-time progress of one owned source partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionTask {
    /// Next offset to process; everything before it is in the state.
    pub next_offset: i64,
    /// Highest event time seen.
    pub max_event_time: i64,
    /// `max_event_time - watermark delay`.
    pub watermark: i64,
    /// Watermark at the last flush, which expiry acts on (see [`TaskSet::flush`]).
    flushed_watermark: i64,
    /// Whether the position moved since the last flush.
    dirty: bool,
    /// The tables' position its records join as of (see [`crate::table`]).
    pub pin: Arc<Positions>,
    /// The pin stays until `next_offset` reaches this (a torn flush's records are replayed).
    pub replay_until: i64,
    /// Metrics being rebuilt on this partition from records before `next_offset`.
    rebuilds: Vec<Rebuild>,
}

/// Expiry horizons by metric and partition, in dense vectors: read for every metric of
/// every record, where a hash lookup would cost a tenth of the processing.
#[derive(Debug, Default)]
struct Horizons(Vec<Vec<i64>>);

impl Horizons {
    fn get(&self, mi: usize, partition: i32) -> Option<i64> {
        let h = *self.0.get(mi)?.get(usize::try_from(partition).ok()?)?;
        (h != i64::MIN).then_some(h)
    }

    /// Raises the horizon of (metric, partition) to `to` if that is later.
    fn raise(&mut self, mi: usize, partition: i32, to: i64) {
        let Ok(p) = usize::try_from(partition) else { return };
        if self.0.len() <= mi {
            self.0.resize(mi + 1, Vec::new());
        }
        let of = &mut self.0[mi];
        if of.len() <= p {
            of.resize(p + 1, i64::MIN);
        }
        of[p] = of[p].max(to);
    }
}

/// A rebuild in progress: metric `metric` reads the partition's records again from `at.next`,
/// with its own watermark, until it reaches the partition's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rebuild {
    metric: usize,
    at: Rebuilding,
}

impl PartitionTask {
    /// A partition that has seen nothing, joining as of `pin`.
    fn new(pin: Arc<Positions>) -> PartitionTask {
        PartitionTask {
            next_offset: 0,
            max_event_time: NO_WATERMARK,
            watermark: NO_WATERMARK,
            flushed_watermark: NO_WATERMARK,
            dirty: false,
            pin,
            replay_until: 0,
            rebuilds: Vec::new(),
        }
    }
}

fn misfit(m: &crate::topology::Metric, why: &str) -> StoreError {
    StoreError::Layout { metric: m.name.clone(), stored: why.to_string(), configured: m.layout.text.clone() }
}

/// The rebuilds a stored position calls for: a metric with a rebuild token its mark does not
/// carry starts one from the partition's beginning; one the mark says is under way goes on.
fn rebuilds_of(topo: &Topology, source: usize, meta: &PartitionMeta) -> Vec<Rebuild> {
    let pending = |mi: usize| crate::layout::rebuild_pending(&topo.metrics[mi], meta).map(|at| Rebuild { metric: mi, at });
    topo.sources[source].metrics.iter().filter_map(|&mi| pending(mi)).collect()
}

/// Where consuming a partition resumes from its stored position: the position, or the
/// earliest rebuild's next offset.
pub fn resume_offset(topo: &Topology, source: usize, meta: &PartitionMeta) -> i64 {
    rebuilds_of(topo, source, meta).iter().map(|r| r.at.next).fold(meta.next_offset, i64::min)
}

/// Decodes `payload` into `record` and looks its keys up in the tables as of `pin`: the
/// indices of the lookups that missed, or why the record is invalid.
fn decode(
    tables: &Tables,
    topo: &Topology,
    source: usize,
    pin: &Positions,
    (payload, kafka_ts): (&[u8], Option<i64>),
    record: &mut Record,
    key: &mut Vec<u8>,
) -> Result<Result<Vec<usize>, DecodeError>, StoreError> {
    let src = &topo.sources[source];
    if let Err(e) = src.decoder.decode(payload, kafka_ts, record) {
        return Ok(Err(e));
    }
    let t = record.time_ms;
    if let Some(ts) = kafka_ts {
        if t > ts.saturating_add(src.max_ahead_ms) {
            return Ok(Err(DecodeError::TooFarAhead { time_ms: t, limit_ms: src.max_ahead_ms }));
        }
    }
    let mut missing = Vec::new();
    for (li, l) in src.lookups.iter().enumerate() {
        key.clear();
        let k = &record.values[l.key_slot];
        let found = *k != crate::event::Value::Null && {
            k.write_text(key);
            let values = &mut record.values;
            let pin = pin.get(l.table).map_or(&[][..], Vec::as_slice);
            tables.lookup(l.table, key, pin, |fields| {
                for &(f, slot) in &l.slots {
                    values[slot] = fields.get(f).cloned().unwrap_or_default();
                }
            })?
        };
        if !found && l.missing == Missing::DeadLetter {
            let key = String::from_utf8_lossy(key).chars().take(64).collect();
            return Ok(Err(DecodeError::LookupMissing { table: topo.tables[l.table].name.clone(), key }));
        }
        if !found {
            missing.push(li);
        }
    }
    Ok(Ok(missing))
}

/// A pin with its tables' names, as stored.
fn named_pin(topo: &Topology, pin: &Positions) -> Vec<TablePin> {
    topo.tables.iter().zip(pin).map(|(t, next)| TablePin { table: t.name.clone(), next: next.clone() }).collect()
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Folded into the open windows of every metric it matched.
    Processed {
        /// Indices of the metrics for which every window holding it had closed.
        late: Vec<usize>,
        /// Indices of the metrics for which some, not all, windows holding it had closed.
        partly_late: Vec<usize>,
        /// Indices (in its source's lookups) of the lookups that did not find its key.
        missing: Vec<usize>,
    },
    /// It could not be decoded.
    Invalid(DecodeError),
    /// Its offset is already in the state (a replay).
    AlreadyApplied,
    /// Read again for the metrics being rebuilt only (its side outputs went out the first time).
    Rebuilt,
    /// Its partition is not assigned to this task set (a record fetched before a
    /// revocation); it is left for the partition's owner.
    NotOwned,
}

/// What a flush wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Aggregates written.
    pub puts: usize,
    /// Expired aggregates deleted.
    pub deletes: usize,
    /// Records written to the changelog (changes and positions), by source.
    pub changelog_records: Vec<usize>,
    /// Bytes the write-back cache keeps after the flush.
    pub cache_bytes: usize,
    /// Where the flush's time went.
    pub stages: FlushStages,
}

/// Where a flush's time went, stage by stage (the drain breakdown of `tally bench`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStages {
    /// Finding the expired slices' stored keys.
    pub expiry: std::time::Duration,
    /// Sealing the dirty aggregates into their stored encoding.
    pub seal: std::time::Duration,
    /// Sending to the changelog; in [`TaskSet::flush`], also waiting for its
    /// acknowledgements (a pipelined flush waits while processing goes on).
    pub changelog: std::time::Duration,
    /// Applying the write batch to the store.
    pub write: std::time::Duration,
    /// Making it durable (fsync).
    pub fsync: std::time::Duration,
}

impl FlushStages {
    /// The stages with their names, as metrics label them.
    pub fn named(&self) -> [(&'static str, std::time::Duration); 5] {
        [("expiry", self.expiry), ("seal", self.seal), ("changelog", self.changelog), ("write", self.write), ("fsync", self.fsync)]
    }
}

/// A flush that did not complete; nothing of it counts as done.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The changelog did not take the changes.
    #[error(transparent)]
    Changelog(#[from] ChangelogError),
}

struct CacheEntry {
    metric: usize,
    partition: i32,
    slice: i64,
    value: StoredAggregate,
    dirty: bool,
    /// What it takes in memory, as of the last flush that wrote it (see [`entry_bytes`]).
    bytes: usize,
}

/// A cache entry's size: its key, its value as sealed (a sketch's registers, a top list's
/// items) and the map's and the struct's own share.
fn entry_bytes(key: &[u8], sealed: &[u8]) -> usize {
    key.len() + sealed.len() + 96
}

/// The tasks of one replica and their shared write-back cache.
pub struct TaskSet {
    topo: Arc<Topology>,
    store: Store,
    tables: Arc<Tables>,
    tasks: HashMap<(usize, i32), PartitionTask>,
    cache: HashMap<Vec<u8>, CacheEntry, KeyHash>,
    record: Record,
    key: Vec<u8>,
    /// Metrics refused (by index): never processed here again, named in every answer.
    refused: Vec<bool>,
    refusals: Arc<Refusals>,
    /// Per (metric, partition), the expiry horizon: slices before it are gone for good.
    horizons: Horizons,
    /// Per (metric, partition), the latest slice the store may hold states of: a slice after
    /// it is read from no store (a high-cardinality stream's first touches of a new slice
    /// were store misses costing a tree search each). Only ever raised.
    stored_up_to: Horizons,
    /// States of an earlier generation a finished rebuild left, deleted by the next flush.
    pending_deletes: Vec<(usize, i32, Vec<u8>)>,
    /// (metric, partition) whose rebuild finished since the last flush: read only states of
    /// the new generation there.
    fresh: HashSet<(usize, i32)>,
}

impl TaskSet {
    /// Tasks over `store`, owning no partition yet, for a topology without tables.
    pub fn new(topo: Arc<Topology>, store: Store) -> TaskSet {
        Self::with_tables(topo, store, Arc::new(Tables::none()))
    }

    /// Tasks over `store` looking records up in `tables`.
    pub fn with_tables(topo: Arc<Topology>, store: Store, tables: Arc<Tables>) -> TaskSet {
        let refused = vec![false; topo.metrics.len()];
        TaskSet {
            topo,
            store,
            tables,
            tasks: HashMap::new(),
            cache: HashMap::default(),
            record: Record::default(),
            key: Vec::new(),
            refused,
            refusals: Arc::default(),
            horizons: Horizons::default(),
            stored_up_to: Horizons::default(),
            pending_deletes: Vec::new(),
            fresh: HashSet::new(),
        }
    }

    /// The metrics refused so far, shared with whoever answers queries.
    pub fn refusals(&self) -> &Arc<Refusals> {
        &self.refusals
    }

    /// Refuses metric `mi` from now on: its states are of another layout than configured,
    /// or miss records. The other metrics go on.
    pub fn refuse(&mut self, mi: usize, why: &StoreError) {
        if !std::mem::replace(&mut self.refused[mi], true) {
            let metric = &self.topo.metrics[mi].name;
            tracing::error!(metric = %metric, "{why}; this metric is not processed or answered, the others are");
            self.refusals.refuse(metric, why.to_string());
        }
    }

    /// Judges what the stored position of `source`'s `partition` says of each metric: a
    /// mark of another layout, or states without a mark (they miss the records processed
    /// while the metric was not), refuse the metric; a mark's expiry horizon is kept. A
    /// position without marks (an older format) is judged by its first state.
    fn judge(&mut self, source: usize, partition: i32, meta: &PartitionMeta) -> Result<(), StoreError> {
        let topo = Arc::clone(&self.topo);
        let rebuilt = rebuilds_of(&topo, source, meta);
        for &mi in &topo.sources[source].metrics {
            let m = &topo.metrics[mi];
            if rebuilt.iter().any(|r| r.metric == mi) {
                continue;
            }
            match (meta.marks.as_ref(), meta.mark(&m.name)) {
                (_, Some(mark)) if mark.layout != m.layout.text => {
                    self.refuse(mi, &misfit(m, &format!("layout `{}` on partition {partition}", mark.layout)))
                }
                (_, Some(mark)) => {
                    if let Some(h) = mark.expired_before {
                        self.horizons.raise(mi, partition, h);
                    }
                }
                (Some(_), None) if self.store.has_states_before(m, partition, meta.next_offset)? => {
                    let why =
                        format!("states on partition {partition} that stop before offset {} (records since were not counted)", meta.next_offset);
                    self.refuse(mi, &misfit(m, &why));
                }
                (Some(_), None) => {}
                // A position from before marks: its states tell their layout only one by one
                // (each is checked when read); the first one tells the common case at once.
                (None, _) => {
                    if let Err(e @ StoreError::Layout { .. }) = self.store.first_state(m, partition) {
                        self.refuse(mi, &e);
                    }
                }
            }
        }
        Ok(())
    }

    /// The tables looked up in.
    pub fn tables(&self) -> &Arc<Tables> {
        &self.tables
    }

    /// The topology run.
    pub fn topology(&self) -> &Arc<Topology> {
        &self.topo
    }

    /// The store written to.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Takes ownership of a source partition, resuming from its stored position. Returns
    /// the offset to resume consuming at, or `None` when the store has never seen it — with
    /// tables, flush before processing it then, so its pin is on record.
    pub fn assign(&mut self, source: usize, partition: i32) -> Result<Option<i64>, StoreError> {
        let meta = self.store.partition_meta(&self.topo.sources[source].name, partition)?;
        if let Some(meta) = &meta {
            self.judge(source, partition, meta)?;
        }
        let resume = meta.as_ref().map(|m| resume_offset(&self.topo, source, m));
        let task = match meta {
            Some(m) => PartitionTask {
                rebuilds: rebuilds_of(&self.topo, source, &m),
                next_offset: m.next_offset,
                max_event_time: m.max_event_time,
                watermark: m.watermark,
                flushed_watermark: m.watermark,
                dirty: false,
                pin: self.stored_pin(source, partition, &m.pin),
                replay_until: m.replay_until,
            },
            // Its first records' pin must be on record before they are processed (a replay
            // after a crash would take a newer one): the first flush writes the position
            // even with nothing processed, and the consumer flushes before it takes records.
            None => PartitionTask { dirty: !self.topo.tables.is_empty(), ..PartitionTask::new(self.tables.position()) },
        };
        self.tasks.insert((source, partition), task);
        for &mi in &self.topo.sources[source].metrics {
            if let Some(slice) = self.store.newest_slice(&self.topo.metrics[mi].name, partition)? {
                self.stored_up_to.raise(mi, partition, slice);
            }
        }
        self.caught_up(source, partition, 0)?;
        Ok(resume)
    }

    /// The pin a stored position names, table by table; a table it does not name (added
    /// since) joins as of now, and so does one whose history no longer reaches back to it.
    fn stored_pin(&self, source: usize, partition: i32, stored: &[TablePin]) -> Arc<Positions> {
        let now = self.tables.position();
        if self.topo.tables.is_empty() {
            return now;
        }
        let mut pin: Positions = self
            .topo
            .tables
            .iter()
            .enumerate()
            .map(|(t, table)| stored.iter().find(|p| p.table == table.name).map_or_else(|| now[t].clone(), |p| p.next.clone()))
            .collect();
        for name in self.tables.inexact_at(&pin) {
            tracing::warn!(source = %self.topo.sources[source].name, partition, table = name,
                "the stored position joins as of a table version older than the table's history: it joins as of now instead (raise the table's history)");
            if let Some(t) = self.topo.tables.iter().position(|t| t.name == name) {
                pin[t] = now[t].clone();
            }
        }
        Arc::new(pin)
    }

    /// The pin of an owned partition.
    pub fn pin(&self, source: usize, partition: i32) -> Option<&Arc<Positions>> {
        self.tasks.get(&(source, partition)).map(|t| &t.pin)
    }

    /// Whether a metric is being rebuilt on `source`'s `partition`.
    pub fn rebuilding(&self, source: usize, partition: i32) -> bool {
        self.tasks.get(&(source, partition)).is_some_and(|t| !t.rebuilds.is_empty())
    }

    /// Ends the rebuilds of `source`'s `partition` that have nothing left to read before its
    /// position: the records before `read` are read or gone, up to the position, or none is
    /// left between a rebuild and the position.
    pub fn caught_up(&mut self, source: usize, partition: i32, read: i64) -> Result<(), StoreError> {
        let Some(task) = self.tasks.get_mut(&(source, partition)) else { return Ok(()) };
        if task.rebuilds.is_empty() || !(read >= task.next_offset || task.rebuilds.iter().all(|r| r.at.next >= task.next_offset)) {
            return Ok(());
        }
        task.dirty = true;
        let done = std::mem::take(&mut task.rebuilds);
        self.finish_rebuilds(partition, &done)
    }

    /// Gives a partition up. Flush first: its unflushed updates are dropped.
    pub fn revoke(&mut self, source: usize, partition: i32) {
        self.tasks.remove(&(source, partition));
        self.pending_deletes.retain(|(s, p, _)| (*s, *p) != (source, partition));
        self.fresh.retain(|(mi, p)| !(*p == partition && self.topo.metrics[*mi].source == source));
        let topo = &self.topo;
        self.cache.retain(|_, e| !(e.partition == partition && topo.metrics[e.metric].source == source));
    }

    /// The owned partitions: ((source, partition), task).
    pub fn tasks(&self) -> impl Iterator<Item = (&(usize, i32), &PartitionTask)> {
        self.tasks.iter()
    }

    /// Processes one record of `source`'s `partition` at `offset`; `kafka_ts` is its Kafka
    /// timestamp, which bounds how far ahead its event time may be.
    pub fn process(&mut self, source: usize, partition: i32, offset: i64, kafka_ts: Option<i64>, payload: &[u8]) -> Result<Outcome, StoreError> {
        let topo = Arc::clone(&self.topo);
        let src = &topo.sources[source];
        let Some(task) = self.tasks.get_mut(&(source, partition)) else {
            return Ok(Outcome::NotOwned);
        };
        if offset < task.next_offset {
            if task.rebuilds.iter().any(|r| r.at.next <= offset) {
                return self.rebuild(source, partition, offset, kafka_ts, payload);
            }
            return Ok(Outcome::AlreadyApplied);
        }
        if !task.rebuilds.is_empty() {
            // Every record before the position has been read again (some offsets may not exist).
            let done = std::mem::take(&mut task.rebuilds);
            self.finish_rebuilds(partition, &done)?;
            return self.process(source, partition, offset, kafka_ts, payload);
        }
        task.next_offset = offset + 1;
        task.dirty = true;
        let missing = match decode(&self.tables, &topo, source, &task.pin, (payload, kafka_ts), &mut self.record, &mut self.key)? {
            Ok(missing) => missing,
            Err(e) => return Ok(Outcome::Invalid(e)),
        };
        let t = self.record.time_ms;
        // Lateness is judged against the watermark before this record, as a record cannot
        // make itself late.
        let watermark = task.watermark;
        if t > task.max_event_time {
            task.max_event_time = t;
            task.watermark = task.watermark.max(t.saturating_sub(src.watermark_delay_ms));
        }

        let (mut late, mut partly_late) = (Vec::new(), Vec::new());
        for &mi in &src.metrics {
            let m = &topo.metrics[mi];
            let skipped = |li: &usize| missing.contains(li) && src.lookups[*li].missing == Missing::Skip;
            if self.refused[mi] || m.lookups.iter().any(skipped) {
                continue;
            }
            if let Some(f) = &m.filter {
                if !f.matches(&self.record.values) {
                    continue;
                }
            }
            let (slice, admit) = self.admit(mi, partition, t, watermark);
            let from_end = match admit {
                Admit::All => store::EVERY_WINDOW,
                Admit::From(end) => {
                    partly_late.push(mi);
                    end
                }
                Admit::Late => {
                    late.push(mi);
                    continue;
                }
            };
            self.fold(mi, partition, slice, from_end, offset, false)?;
        }
        Ok(Outcome::Processed { late, partly_late, missing })
    }

    /// Where metric `mi`'s record at event time `t` goes on `partition` at `watermark`: every
    /// window of its slice still open, only the later ones, or none (late, or in a slice
    /// expiry has deleted).
    fn admit(&self, mi: usize, partition: i32, t: i64, watermark: i64) -> (i64, Admit) {
        let m = &self.topo.metrics[mi];
        let (slice, admit) = m.window.place(t, watermark, m.grace_ms);
        match self.horizons.get(mi, partition) {
            Some(h) if slice < h => (slice, Admit::Late),
            _ => (slice, admit),
        }
    }

    /// Reads a record before the partition's position again for the metrics being rebuilt
    /// there, each with its own watermark; no other metric sees it.
    fn rebuild(&mut self, source: usize, partition: i32, offset: i64, kafka_ts: Option<i64>, payload: &[u8]) -> Result<Outcome, StoreError> {
        let topo = Arc::clone(&self.topo);
        let src = &topo.sources[source];
        let Some(task) = self.tasks.get_mut(&(source, partition)) else { return Ok(Outcome::NotOwned) };
        task.dirty = true;
        let mut rebuilds = task.rebuilds.clone();
        let decoded = decode(&self.tables, &topo, source, &task.pin, (payload, kafka_ts), &mut self.record, &mut self.key)?;
        let t = self.record.time_ms;
        for r in rebuilds.iter_mut().filter(|r| r.at.next <= offset) {
            r.at.next = offset + 1;
            let Ok(missing) = &decoded else { continue };
            let watermark = r.at.watermark;
            if t > r.at.max_event_time {
                r.at.max_event_time = t;
                r.at.watermark = r.at.watermark.max(t.saturating_sub(src.watermark_delay_ms));
            }
            let m = &topo.metrics[r.metric];
            let skipped = |li: &usize| missing.contains(li) && src.lookups[*li].missing == Missing::Skip;
            if m.lookups.iter().any(skipped) || m.filter.as_ref().is_some_and(|f| !f.matches(&self.record.values)) {
                continue;
            }
            let (slice, admit) = self.admit(r.metric, partition, t, watermark);
            let from_end = match admit {
                Admit::Late => continue,
                Admit::All => store::EVERY_WINDOW,
                Admit::From(end) => end,
            };
            self.fold(r.metric, partition, slice, from_end, offset, true)?;
        }
        let Some(task) = self.tasks.get_mut(&(source, partition)) else { return Ok(Outcome::NotOwned) };
        task.rebuilds = rebuilds;
        if task.rebuilds.iter().all(|r| r.at.next >= task.next_offset) {
            let done = std::mem::take(&mut task.rebuilds);
            self.finish_rebuilds(partition, &done)?;
        }
        Ok(Outcome::Rebuilt)
    }

    /// Ends rebuilds that have reached the partition's position: what is left of the metric's
    /// states from before (no record of the rebuild replaced them) is deleted at the next
    /// flush, so only the rebuilt generation answers.
    fn finish_rebuilds(&mut self, partition: i32, done: &[Rebuild]) -> Result<(), StoreError> {
        for r in done {
            let m = &self.topo.metrics[r.metric];
            // A cached key holds the rebuilt generation, and the store will: a sealed flush in
            // flight has not written it yet, so the store may still show the old one.
            let mut stale = self.store.stale_states(m, partition)?;
            stale.retain(|k| !self.cache.contains_key(k.as_ref()));
            tracing::info!(metric = %m.name, partition, up_to = r.at.next, stale = stale.len(), "rebuilt from the source");
            let source = m.source;
            self.pending_deletes.extend(stale.into_iter().map(|k| (source, partition, k.to_vec())));
            // Until the flush deletes them, the old generation's states are still stored.
            self.fresh.insert((r.metric, partition));
        }
        Ok(())
    }

    /// Folds the current record into metric `mi`'s aggregate of (partition, slice,
    /// from_end, its group key), unless that aggregate holds it already (a replay).
    /// `rebuilding`: a stored state of an earlier generation is not read but replaced.
    fn fold(&mut self, mi: usize, partition: i32, slice: i64, from_end: i64, offset: i64, rebuilding: bool) -> Result<(), StoreError> {
        let m = &self.topo.metrics[mi];
        self.key.clear();
        store::state_key_prefix(&mut self.key, &m.name, partition, slice, from_end);
        for (i, &g) in m.group_slots.iter().enumerate() {
            if i > 0 {
                self.key.push(GROUP_SEPARATOR);
            }
            let start = self.key.len();
            self.record.values[g].write_text(&mut self.key);
            // Values almost never hold the separator: escape only when one does.
            if store::needs_escape(&self.key[start..]) {
                let part = self.key.split_off(start);
                store::push_group_part(&mut self.key, &part);
            }
        }
        let entry = match self.cache.get_mut(self.key.as_slice()) {
            Some(e) => e,
            None => {
                let current_only = rebuilding || (!self.fresh.is_empty() && self.fresh.contains(&(mi, partition)));
                let stored = match self.stored_up_to.get(mi, partition) {
                    Some(newest) if slice <= newest && current_only => self.store.get_current(m, &self.key),
                    Some(newest) if slice <= newest => self.store.get(m, &self.key),
                    _ => Ok(None),
                };
                let value = match stored {
                    Ok(Some(v)) => v,
                    Ok(None) => StoredAggregate { max_offset: -1, states: m.aggregates.iter().map(|a| AggState::new(&a.kind)).collect() },
                    Err(e @ StoreError::Layout { .. }) => {
                        self.refuse(mi, &e);
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                self.cache.entry(self.key.clone()).or_insert(CacheEntry { metric: mi, partition, slice, value, dirty: false, bytes: 0 })
            }
        };
        if entry.value.max_offset >= offset {
            return Ok(());
        }
        for (state, spec) in entry.value.states.iter_mut().zip(&m.aggregates) {
            // The gate checked the kinds when the value was read: this cannot fail.
            state.update(&spec.kind, &self.record, partition, offset).map_err(|e| misfit(m, &e.to_string()))?;
        }
        entry.value.max_offset = offset;
        entry.dirty = true;
        Ok(())
    }

    /// Advances an idle partition's watermark to `watermark` (if that is later): a
    /// partition that has received nothing for its source's `idle_timeout` stops holding
    /// windows open. The move is part of the partition's position, flushed and changelogged
    /// like one made by a record, so a replay from the next position judges the same.
    pub fn advance_idle(&mut self, source: usize, partition: i32, watermark: i64) {
        if let Some(task) = self.tasks.get_mut(&(source, partition)).filter(|t| watermark > t.watermark) {
            task.watermark = watermark;
            task.dirty = true;
        }
    }

    /// The marks of a position of `source`'s `partition`: every metric not refused, its
    /// layout, and its horizon once this flush's expiry (`expiring`) is applied.
    fn marks(&self, source: usize, partition: i32, expiring: &HashMap<(usize, i32), i64>) -> Vec<MetricMark> {
        let horizon = |mi: usize| {
            let now = expiring.get(&(mi, partition)).copied();
            self.horizons.get(mi, partition).max(now)
        };
        let live = self.topo.sources[source].metrics.iter().filter(|&&mi| !self.refused[mi]);
        let rebuilds = self.tasks.get(&(source, partition)).map_or(&[][..], |t| t.rebuilds.as_slice());
        live.map(|&mi| {
            let m = &self.topo.metrics[mi];
            MetricMark {
                metric: m.name.clone(),
                layout: m.layout.text.clone(),
                expired_before: horizon(mi),
                rebuild: m.rebuild.clone(),
                rebuilding: rebuilds.iter().find(|r| r.metric == mi).map(|r| r.at),
            }
        })
        .collect()
    }

    /// Writes dirty aggregates, positions and expiry deletions — first to `changelog` when
    /// there is one, then to the store in one atomic batch, fsynced: [`TaskSet::seal`], the
    /// changelog's acknowledgements, then [`TaskSet::complete`].
    pub fn flush(&mut self, changelog: Option<&mut dyn ChangeSink>) -> Result<FlushStats, FlushError> {
        let Some(sink) = changelog else {
            let sealed = self.seal(None)?;
            return self.complete(sealed, Vec::new());
        };
        let sealed = self.seal(Some(&mut *sink))?;
        let waited = std::time::Instant::now();
        let offsets = loop {
            if let Some(offsets) = sink.acknowledged(std::time::Duration::from_millis(1))? {
                break offsets;
            }
        };
        let waited = waited.elapsed();
        let mut stats = self.complete(sealed, offsets)?;
        stats.stages.changelog += waited;
        Ok(stats)
    }

    /// Decides a flush and sends it to `changelog`: dirty aggregates, positions and expiry
    /// deletions. From here on the cache holds only what changed since, and processing may
    /// go on; the store takes the flush in [`TaskSet::complete`], once the changelog has
    /// acknowledged it. Until then nothing may evict a sealed entry (the store does not hold
    /// it yet) or revoke a partition. A flush that fails after its seal is undone by reading
    /// every partition back from the store (revoke and assign): its entries were marked clean.
    ///
    /// Expiry acts on the watermark of the previous flush, not the current one: a crash
    /// after this flush's changelog records but before its position record resumes from
    /// the previous position, and every record replayed from there is late for any slice
    /// expired at that position's watermark — so no replayed record can revive a slice
    /// whose deletion is already in the changelog.
    pub fn seal(&mut self, changelog: Option<&mut dyn ChangeSink>) -> Result<SealedFlush, FlushError> {
        let mut clock = std::time::Instant::now();
        let mut stages = FlushStages::default();
        let mut lap = |stage: &mut std::time::Duration| {
            let now = std::time::Instant::now();
            *stage += now - clock;
            clock = now;
        };
        let logged = changelog.is_some();
        let mut sealed = SealedFlush::default();
        // The changelog's records: sent, not kept.
        let mut changes = Vec::new();
        let mut touched: HashSet<(usize, i32)> = HashSet::new();
        // Before this flush's writes, which replace some of them.
        for (source, partition, k) in std::mem::take(&mut self.pending_deletes) {
            sealed.batch.delete(&k);
            touched.insert((source, partition));
            if logged {
                changes.push(Change { source, partition, key: k, value: None });
            }
        }
        self.seal_expiry(&mut sealed, &mut changes, &mut touched, logged)?;
        lap(&mut stages.expiry);
        self.seal_cache(&mut sealed, &mut changes, logged);
        self.seal_positions(&mut sealed, &touched);
        lap(&mut stages.seal);
        if let Some(sink) = changelog {
            let positions = self.position_records(&sealed.metas);
            sink.send(&changes, &positions)?;
            lap(&mut stages.changelog);
        }
        sealed.stats.changelog_records = vec![0; self.topo.sources.len()];
        if logged {
            for source in changes.iter().map(|c| c.source).chain(sealed.metas.iter().map(|m| m.0)) {
                sealed.stats.changelog_records[source] += 1;
            }
        }
        sealed.fresh = self.fresh.clone();
        sealed.stats.stages = stages;
        Ok(sealed)
    }

    /// The expired slices' stored keys, deleted (and logged); their partitions' positions
    /// record the moved horizons.
    fn seal_expiry(
        &mut self,
        sealed: &mut SealedFlush,
        changes: &mut Vec<Change>,
        touched: &mut HashSet<(usize, i32)>,
        logged: bool,
    ) -> Result<(), StoreError> {
        let topo = Arc::clone(&self.topo);
        for (&(source, partition), task) in &self.tasks {
            if task.flushed_watermark == NO_WATERMARK {
                continue;
            }
            for &mi in &topo.sources[source].metrics {
                let m = &topo.metrics[mi];
                if let Some(before) = m.window.expired_before(task.flushed_watermark, m.retention_ms) {
                    for k in self.store.keys_before(&m.name, partition, before)? {
                        sealed.batch.delete(&k);
                        if logged {
                            changes.push(Change { source, partition, key: k.to_vec(), value: None });
                        }
                    }
                    // The position records the horizon: a moved one is written even when
                    // nothing else changed.
                    if self.horizons.get(mi, partition).is_none_or(|h| before > h) {
                        touched.insert((source, partition));
                    }
                    sealed.expired_before.insert((mi, partition), before);
                }
            }
        }
        Ok(())
    }

    /// The dirty entries, sealed into the batch (and logged) and marked clean; expired
    /// entries leave the cache (their stored copies are deleted by the expiry).
    fn seal_cache(&mut self, sealed: &mut SealedFlush, changes: &mut Vec<Change>, logged: bool) {
        let topo = &self.topo;
        let expired_before = &sealed.expired_before;
        let expired = |e: &CacheEntry| expired_before.get(&(e.metric, e.partition)).is_some_and(|b| e.slice < *b);
        let mut cache_bytes = 0;
        self.cache.retain(|k, e| {
            if expired(e) {
                // An entry that never reached the store needs no tombstone; deleting it
                // again costs nothing.
                sealed.batch.delete(k);
                return false;
            }
            if e.dirty {
                self.stored_up_to.raise(e.metric, e.partition, e.slice);
                let bytes = topo.metrics[e.metric].layout.seal(&e.value);
                e.bytes = entry_bytes(k, &bytes);
                e.dirty = false;
                sealed.batch.put_encoded(k, &bytes);
                if logged {
                    changes.push(Change { source: topo.metrics[e.metric].source, partition: e.partition, key: k.clone(), value: Some(bytes) });
                }
            }
            cache_bytes += e.bytes;
            true
        });
        sealed.stats.cache_bytes = cache_bytes;
    }

    /// The positions of the partitions that moved, and each partition's next offset; the
    /// tasks take this flush's watermark (for the next expiry) and pins.
    fn seal_positions(&mut self, sealed: &mut SealedFlush, touched: &HashSet<(usize, i32)>) {
        // The pin each partition's next records join as of: the tables' position now, except
        // while a torn flush's records are replayed.
        let now = self.tables.position();
        let topo = Arc::clone(&self.topo);
        let keys: Vec<(usize, i32)> = self.tasks.keys().copied().collect();
        for (source, partition) in keys {
            let Some(task) = self.tasks.get(&(source, partition)) else { continue };
            let pin = if task.next_offset >= task.replay_until { Arc::clone(&now) } else { Arc::clone(&task.pin) };
            let moved = !topo.tables.is_empty() && pin != task.pin;
            if task.dirty || moved || touched.contains(&(source, partition)) {
                let meta = PartitionMeta {
                    next_offset: task.next_offset,
                    watermark: task.watermark,
                    max_event_time: task.max_event_time,
                    changelog_offset: None,
                    pin: named_pin(&topo, &pin),
                    joined: named_pin(&topo, &task.pin),
                    replay_until: task.replay_until,
                    marks: Some(self.marks(source, partition, &sealed.expired_before)),
                };
                sealed.metas.push((source, partition, meta));
            }
            sealed.positions.push(SealedPosition { source, partition, next_offset: task.next_offset, watermark: task.watermark });
            if let Some(task) = self.tasks.get_mut(&(source, partition)) {
                task.dirty = false;
                task.flushed_watermark = task.watermark;
                task.pin = pin;
            }
        }
    }

    /// The position records of `metas`, in the format the changelog's readers expect.
    fn position_records(&self, metas: &[(usize, i32, PartitionMeta)]) -> Vec<Change> {
        let topo = &self.topo;
        metas
            .iter()
            .map(|(s, p, meta)| Change {
                source: *s,
                partition: *p,
                key: store::meta_key(&topo.sources[*s].name, *p),
                value: Some(match topo.upgrade_from {
                    Some(2) => crate::migrations::store_v2_to_v3::meta_v3(meta),
                    _ => meta.encode(),
                }),
            })
            .collect()
    }

    /// Writes a sealed flush to the store in one atomic batch and fsyncs it, its positions
    /// carrying `offsets` (where the changelog put each position record; none without a
    /// changelog). Past the cache's budget, the entries not changed since the seal are let
    /// go (read again when needed).
    pub fn complete(&mut self, sealed: SealedFlush, offsets: Vec<i64>) -> Result<FlushStats, FlushError> {
        let mut clock = std::time::Instant::now();
        let SealedFlush { mut batch, mut metas, expired_before, fresh, mut stats, .. } = sealed;
        for ((_, _, meta), off) in metas.iter_mut().zip(offsets) {
            meta.changelog_offset = Some(off);
        }
        for (source, partition, meta) in &metas {
            batch.put_meta(&self.topo.sources[*source].name, *partition, meta);
        }
        (stats.puts, stats.deletes) = (batch.puts, batch.deletes);
        self.store.apply(batch)?;
        let now = std::time::Instant::now();
        stats.stages.write += now - clock;
        clock = now;
        self.store.flush()?;
        stats.stages.fsync += clock.elapsed();
        for ((mi, partition), before) in expired_before {
            self.horizons.raise(mi, partition, before);
        }
        // A rebuild finished since the seal has its old generation still stored.
        let topo = &self.topo;
        if !fresh.is_empty() {
            let pending: HashSet<(usize, i32)> = self.pending_deletes.iter().map(|(s, p, _)| (*s, *p)).collect();
            self.fresh.retain(|f| !fresh.contains(f) || pending.contains(&(topo.metrics[f.0].source, f.1)));
        }
        if stats.cache_bytes > topo.cache_max_bytes {
            self.cache.retain(|_, e| e.dirty);
            stats.cache_bytes = self.cache.values().map(|e| e.bytes).sum();
        }
        Ok(stats)
    }
}

/// A flush sealed by [`TaskSet::seal`], for [`TaskSet::complete`].
#[derive(Default)]
pub struct SealedFlush {
    batch: WriteBatch,
    metas: Vec<(usize, i32, PartitionMeta)>,
    expired_before: HashMap<(usize, i32), i64>,
    /// Rebuilt (metric, partition)s whose old generation this flush deletes.
    fresh: HashSet<(usize, i32)>,
    positions: Vec<SealedPosition>,
    stats: FlushStats,
}

impl SealedFlush {
    /// Each partition's position at the seal (durable once the flush is complete), taken
    /// out of the flush.
    pub fn take_positions(&mut self) -> Vec<SealedPosition> {
        std::mem::take(&mut self.positions)
    }
}

/// Where a partition stood when its flush was sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedPosition {
    /// Source index.
    pub source: usize,
    /// Source partition.
    pub partition: i32,
    /// Next offset to process.
    pub next_offset: i64,
    /// Its watermark ([`NO_WATERMARK`] before any record).
    pub watermark: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topo() -> Arc<Topology> {
        crate::topology::test_topology(TOPO)
    }

    const TOPO: &str = r#"
            [[metrics]]
            name = "per_min"
            source = "s"
            group_by = ["k"]
            aggregates = ["count", "sum(v) as total"]
            window = { type = "tumbling", size = "1m" }
            retention = "2m"
            [[metrics]]
            name = "ones"
            source = "s"
            filter = "v = 1"
            aggregates = ["count"]
            window = { type = "global" }
        "#;

    fn rec(ts: i64, k: &str, v: i64) -> Vec<u8> {
        format!(r#"{{"ts":{ts},"k":"{k}","v":{v}}}"#).into_bytes()
    }

    #[test]
    fn past_its_budget_the_cache_lets_its_entries_go_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut small = (*topo()).clone();
        small.cache_max_bytes = 1;
        let mut tasks = TaskSet::new(Arc::new(small), store.clone());
        tasks.assign(0, 0).unwrap();
        tasks.process(0, 0, 0, None, &rec(70, "a", 1)).unwrap();
        assert_eq!(tasks.flush(None).unwrap().cache_bytes, 0, "over budget: let go");
        assert!(tasks.cache.is_empty());
        tasks.process(0, 0, 1, None, &rec(80, "a", 2)).unwrap();
        tasks.flush(None).unwrap();
        assert_eq!(
            stored(&store, "per_min", 60_000, "a").unwrap().states,
            vec![AggState::Count(2), AggState::Sum(3_000_000)],
            "read back, then added to"
        );
        let mut roomy = TaskSet::new(topo(), store.clone());
        roomy.assign(0, 0).unwrap();
        roomy.process(0, 0, 2, None, &rec(90, "b", 1)).unwrap();
        assert!(roomy.flush(None).unwrap().cache_bytes > 0, "within the budget: kept");
    }

    fn stored(store: &Store, metric: &str, slice: i64, group: &str) -> Option<StoredAggregate> {
        stored_as(&topo(), store, metric, slice, group)
    }

    /// The state `topo`'s `metric` has stored for `group`, if it is of that topology's
    /// layout and generation.
    fn stored_as(topo: &Topology, store: &Store, metric: &str, slice: i64, group: &str) -> Option<StoredAggregate> {
        let mut k = Vec::new();
        store::state_key_prefix(&mut k, metric, 0, slice, store::EVERY_WINDOW);
        k.extend_from_slice(group.as_bytes());
        store.get_current(topo.metric(metric).unwrap().1, &k).unwrap()
    }

    #[test]
    fn late_invalid_replayed_and_expired_records() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut tasks = TaskSet::new(topo(), store.clone());
        assert_eq!(tasks.assign(0, 0).unwrap(), None);
        assert_eq!(
            tasks.process(0, 0, 0, None, &rec(65, "a", 1)).unwrap(),
            Outcome::Processed { late: vec![], partly_late: vec![], missing: vec![] }
        );
        assert_eq!(
            tasks.process(0, 0, 1, None, &rec(130, "a", 2)).unwrap(),
            Outcome::Processed { late: vec![], partly_late: vec![], missing: vec![] }
        );
        // Watermark is 120: the [60,120) slice has closed.
        assert_eq!(
            tasks.process(0, 0, 2, None, &rec(100, "a", 1)).unwrap(),
            Outcome::Processed { late: vec![0], partly_late: vec![], missing: vec![] }
        );
        assert!(matches!(tasks.process(0, 0, 3, None, b"{oops").unwrap(), Outcome::Invalid(_)));
        assert_eq!(tasks.process(0, 0, 1, None, &rec(130, "a", 2)).unwrap(), Outcome::AlreadyApplied);
        // Ten days ahead of its Kafka timestamp: dead-lettered, the watermark stays put.
        let ahead = tasks.process(0, 0, 4, Some(130_000), &rec(864_130, "a", 1)).unwrap();
        assert!(matches!(ahead, Outcome::Invalid(DecodeError::TooFarAhead { .. })), "{ahead:?}");
        let stats = tasks.flush(None).unwrap();
        assert_eq!(stats.puts, 3);
        assert_eq!(stored(&store, "per_min", 60_000, "a").unwrap().states, vec![AggState::Count(1), AggState::Sum(1_000_000)]);
        assert_eq!(stored(&store, "ones", 0, "").unwrap().states, vec![AggState::Count(2)], "the late record still counts all-time");
        assert_eq!(store.partition_meta("s", 0).unwrap().unwrap().next_offset, 5);
        assert_eq!(store.partition_meta("s", 0).unwrap().unwrap().watermark, 120_000);

        // A new TaskSet on the same store resumes, and skips what its aggregates hold.
        let mut again = TaskSet::new(topo(), store.clone());
        assert_eq!(again.assign(0, 0).unwrap(), Some(5));
        assert_eq!(again.process(0, 0, 2, None, &rec(100, "a", 1)).unwrap(), Outcome::AlreadyApplied);
        // Far ahead: slices before 400 - 10 - 120 - 60 = 210 s expire — at the next flush,
        // which acts on the watermark this one made durable.
        again.process(0, 0, 5, None, &rec(400, "b", 1)).unwrap();
        assert_eq!(again.flush(None).unwrap().deletes, 0);
        assert!(stored(&store, "per_min", 60_000, "a").is_some());
        let stats = again.flush(None).unwrap();
        assert_eq!(stats.deletes, 2);
        assert!(stored(&store, "per_min", 60_000, "a").is_none());
        assert_eq!(stored(&store, "ones", 0, "").unwrap().states, vec![AggState::Count(3)]);
    }

    /// A metric changed from `sum` to `count` whose old states come back (a wiped disk
    /// restored from the changelog): processing refuses them with a message naming the
    /// metric and its layout, and panics nowhere.
    #[test]
    fn states_of_another_layout_are_refused_not_folded_into() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut k = Vec::new();
        store::state_key_prefix(&mut k, "ones", 0, 0, store::EVERY_WINDOW);
        let mut batch = WriteBatch::default();
        let mut v2 = vec![2];
        bincode::serde::encode_into_std_write(
            StoredAggregate { max_offset: 0, states: vec![AggState::Sum(2_000_000)] },
            &mut v2,
            bincode::config::standard(),
        )
        .unwrap();
        batch.put_encoded(&k, &v2);
        store.apply(batch).unwrap();
        let mut tasks = TaskSet::new(topo(), store.clone());
        tasks.assign(0, 0).unwrap();
        let processed = tasks.process(0, 0, 1, None, &rec(10, "a", 1)).unwrap();
        assert!(matches!(processed, Outcome::Processed { .. }), "the other metrics go on");
        let err = tasks.refusals().get("ones").expect("refused");
        assert!(err.contains("metric `ones`") && err.contains("sum") && err.contains("new name"), "{err}");
        tasks.flush(None).unwrap();
        let marks = store.partition_meta("s", 0).unwrap().unwrap().marks.unwrap();
        assert_eq!(marks.iter().map(|m| m.metric.as_str()).collect::<Vec<_>>(), vec!["per_min"], "a refused metric's state is not complete");
        assert_eq!(stored(&store, "per_min", 0, "a").unwrap().states[0], AggState::Count(1));
        // A later run finds the gap and refuses the metric again.
        let mut again = TaskSet::new(topo(), store);
        again.assign(0, 0).unwrap();
        assert!(again.refusals().get("ones").is_some());
        let mut a = AggState::Count(1);
        assert!(a.merge(&AggState::Sum(1)).is_err(), "partials of two kinds do not merge");
    }

    /// A rebuild that ends while a flush is sealed but not written: the keys that flush
    /// rebuilt still show their old generation in the store, yet they are the new one's and
    /// must survive the deletion of what the rebuild left over.
    #[test]
    fn a_rebuild_ending_inside_a_sealed_flush_keeps_what_it_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let records = [rec(10, "a", 1), rec(20, "b", 1), rec(30, "c", 1)];
        let mut first = TaskSet::new(topo(), store.clone());
        first.assign(0, 0).unwrap();
        for (o, r) in records.iter().enumerate() {
            first.process(0, 0, o as i64, None, r).unwrap();
        }
        first.flush(None).unwrap();
        let rebuilt = crate::topology::test_topology(&TOPO.replace("retention = \"2m\"", "retention = \"2m\"\nrebuild = \"t\""));
        let mut tasks = TaskSet::new(rebuilt.clone(), store.clone());
        assert_eq!(tasks.assign(0, 0).unwrap(), Some(0), "the rebuild reads from the start");
        tasks.process(0, 0, 0, None, &records[0]).unwrap();
        let sealed = tasks.seal(None).unwrap();
        // "a" is in the sealed flush only; the rebuild ends with "c", before the store has "a".
        tasks.process(0, 0, 1, None, &records[1]).unwrap();
        assert_eq!(tasks.process(0, 0, 2, None, &records[2]).unwrap(), Outcome::Rebuilt);
        assert!(!tasks.rebuilding(0, 0));
        tasks.complete(sealed, Vec::new()).unwrap();
        tasks.flush(None).unwrap();
        for k in ["a", "b", "c"] {
            assert_eq!(
                stored_as(&rebuilt, &store, "per_min", 0, k).map(|s| s.states),
                Some(vec![AggState::Count(1), AggState::Sum(1_000_000)]),
                "{k}"
            );
        }
    }

    #[test]
    fn per_aggregate_offsets_make_replays_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut tasks = TaskSet::new(topo(), store.clone());
        assert_eq!(tasks.process(0, 0, 0, None, &rec(10, "a", 1)).unwrap(), Outcome::NotOwned);
        tasks.assign(0, 0).unwrap();
        for (o, ts) in [10, 20, 30].into_iter().enumerate() {
            tasks.process(0, 0, o as i64, None, &rec(ts, "a", 1)).unwrap();
        }
        tasks.flush(None).unwrap();
        // Lose the position but keep the aggregates: a replay from 0 must not double count.
        let mut fresh = TaskSet::new(topo(), store.clone());
        fresh.tasks.insert((0, 0), PartitionTask::new(Arc::default()));
        for (o, ts) in [10, 20, 30, 40].into_iter().enumerate() {
            fresh.process(0, 0, o as i64, None, &rec(ts, "a", 1)).unwrap();
        }
        fresh.flush(None).unwrap();
        assert_eq!(stored(&store, "per_min", 0, "a").unwrap().states[0], AggState::Count(4));
    }
}
