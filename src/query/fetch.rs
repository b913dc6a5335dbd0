//! Typed partials: what an answer reads of each source partition, from this replica's store
//! or, through [`crate::cluster`], from the replica that owns the partition.
//!
//! A query is planned into a [`FetchRequest`] (which metrics, which slices, which group),
//! answered per partition with [`PartitionPartials`] (the partition's position and its
//! stored partials, unmerged) or a reason it is [`Unavailable`]. The query engine merges
//! the partials of every partition and renders the answer; nothing here knows JSON. These
//! types are also the internal wire format between replicas ([`encode`], [`decode`]).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cache::{ReadCache, ENTRY_OVERHEAD};
use super::QueryError;
use crate::aggregate::AggState;
use crate::health::{Faults, Link};
use crate::layout::Refusals;
use crate::ownership::{Ownership, PartitionState};
use crate::store::{PartitionMeta, Store, StoreError};
use crate::task::NO_WATERMARK;
use crate::topology::Topology;

/// Version of the wire encoding; a replica refuses another (a rolling upgrade then answers
/// 503 for the other version's partitions until it is done, never a misread).
pub const WIRE_FORMAT: u8 = 2;
/// The largest request or reply decoded: bounds what a hostile body can make us allocate.
pub const MAX_WIRE_BYTES: usize = 512 << 20;
/// The longest a request may wait for a position (a request asking more is clamped).
const MAX_WAIT: Duration = Duration::from_secs(60);
/// How often a partition is read again when a flush changed it during the read.
const CONSISTENT_READ_TRIES: usize = 8;
/// How often a replica looks again at a partition's position while waiting for it.
const POSITION_POLL: Duration = Duration::from_millis(10);

/// What to read of one metric.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MetricRead {
    /// Metric name.
    pub metric: String,
    /// Its layout ([`crate::topology::Metric::layout`]): partials of another layout do not merge.
    pub layout: String,
    /// Slices starting in `[lo, hi)`.
    pub lo: i64,
    /// See `lo`.
    pub hi: i64,
    /// Only this group key.
    pub group: Option<Vec<u8>>,
    /// Also say which is the newest slice holding data.
    pub newest: bool,
    /// Merge each group's slices into one entry on the partition's owner (a span: the
    /// answer merges them all anyway, and one partial per group is far less to send).
    pub merged: bool,
}

/// What one answer needs of a source's partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    /// Source name.
    pub source: String,
    /// The partitions to read (`None`: every partition of the source).
    pub partitions: Option<Vec<i32>>,
    /// The metrics to read.
    pub reads: Vec<MetricRead>,
    /// Per partition, the offset its state must have reached (a position token's).
    pub min_offsets: Vec<(i32, i64)>,
    /// How long to wait for `min_offsets`, ms.
    pub wait_ms: u64,
    /// `Some(lag)`: a partition this replica keeps a standby copy of is answered from it if
    /// the copy is at most `lag` changelog records behind.
    pub max_standby_lag: Option<u64>,
}

/// Where a partition's state stands: every record before `next_offset` is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The next source offset to process.
    pub next_offset: i64,
    /// Its watermark (`None`: no valid record yet).
    pub watermark: Option<i64>,
    /// Highest event time seen.
    pub max_event_time: Option<i64>,
}

impl Position {
    fn of(meta: Option<&PartitionMeta>) -> Position {
        let known = |t: i64| (t != NO_WATERMARK).then_some(t);
        match meta {
            None => Position { next_offset: 0, watermark: None, max_event_time: None },
            Some(m) => Position { next_offset: m.next_offset, watermark: known(m.watermark), max_event_time: known(m.max_event_time) },
        }
    }
}

/// One stored partial aggregate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Group key.
    pub group: Vec<u8>,
    /// Slice start.
    pub slice: i64,
    /// The first window end it counts for.
    pub from_end: i64,
    /// One state per aggregate.
    pub states: Vec<AggState>,
}

/// One metric's partials of one partition.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricPartials {
    /// The partials read.
    pub entries: Vec<Entry>,
    /// The newest slice holding data, when asked.
    pub newest: Option<i64>,
    /// Merged reads: the first slice's start and the last slice's end among the entries.
    pub bounds: Option<(i64, i64)>,
    /// The partition's expiry horizon of the metric: slices before it are deleted, whatever
    /// the retention is now (see [`crate::layout::MetricMark`]).
    pub expired_before: Option<i64>,
}

/// One partition's answer to a [`FetchRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionPartials {
    /// The partition.
    pub partition: i32,
    /// The position whose state the partials are: read before and after them, unchanged.
    pub position: Position,
    /// Per [`FetchRequest::reads`], in order (shared with the read cache).
    pub reads: Vec<std::sync::Arc<MetricPartials>>,
    /// `Some(lag)`: read from a standby copy this many changelog records behind.
    pub standby_lag: Option<u64>,
    /// `Some(t)`: the state read is as of a flush before `t` (wall clock, ms) — the owner's
    /// flushes have been held since (brokers or disk failing), or the replica read lost the
    /// partition then without handing it over (its group session expired) and answers from
    /// its state only because no owner or standby can.
    pub stale_since_ms: Option<i64>,
}

/// Why a partition has no answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Unavailable {
    /// The replica asked does not own it (any more).
    #[error("not owned by the replica asked")]
    NotOwned,
    /// Its state is being restored from the changelog.
    #[error("being restored ({restored} of {total} changelog records)")]
    Restoring {
        /// Records read so far.
        restored: u64,
        /// Records to read.
        total: u64,
    },
    /// Its state has not reached the asked position within the wait.
    #[error("at offset {at}, behind the asked position {wanted}")]
    Behind {
        /// Where it is.
        at: i64,
        /// Where it was asked to be.
        wanted: i64,
    },
    /// No live replica announces it.
    #[error("no live replica owns it (rebalancing, or its owner is down)")]
    NoOwner,
    /// Its owner did not answer in time, or failed.
    #[error("its owner did not answer: {0}")]
    Unreachable(String),
    /// Its owner runs another version or config of the metric.
    #[error("its owner's config differs: {0}")]
    Mismatch(String),
    /// The metric is refused there: its state is of another layout, or misses records.
    #[error("{0}")]
    Refused(String),
    /// The metric is being rebuilt there from the source's records.
    #[error("metric `{metric}` is being rebuilt from the source (at offset {at} of {until})")]
    Rebuilding {
        /// The metric.
        metric: String,
        /// The next offset the rebuild reads.
        at: i64,
        /// The partition's position, where the rebuild ends.
        until: i64,
    },
}

impl Unavailable {
    /// A short name for the answer's `missing` list.
    pub fn reason(&self) -> &'static str {
        match self {
            Unavailable::NotOwned => "not_owned",
            Unavailable::Restoring { .. } => "restoring",
            Unavailable::Behind { .. } => "behind_position",
            Unavailable::NoOwner => "no_owner",
            Unavailable::Unreachable(_) => "unreachable",
            Unavailable::Mismatch(_) => "config_mismatch",
            Unavailable::Refused(_) => "metric_refused",
            Unavailable::Rebuilding { .. } => "rebuilding",
        }
    }
}

/// One partition's reply: its partials, or why there are none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PartitionReply {
    /// Read.
    Partials(PartitionPartials),
    /// Not read.
    Unavailable {
        /// The partition.
        partition: i32,
        /// Why.
        why: Unavailable,
    },
}

/// A partition's partials with the replica that answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Answered {
    /// The replica's name.
    pub replica: String,
    /// What it read.
    pub partials: PartitionPartials,
}

/// What a fetch gathered: the partitions answered, and those that were not.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Fetched {
    /// Answered partitions, in partition order.
    pub parts: Vec<Answered>,
    /// Partitions without an answer, in partition order.
    pub missing: Vec<(i32, Unavailable)>,
}

/// Reads partials for the query engine: this replica's store, or the whole cluster.
pub trait Fetch: Send + Sync {
    /// Reads what `req` asks of every partition it names.
    fn fetch(&self, req: &FetchRequest) -> Result<Fetched, QueryError>;
}

/// Bytes of `v` in the wire format.
pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![WIRE_FORMAT];
    bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard()).expect("writing to a Vec cannot fail");
    out
}

/// Reads [`encode`]'s bytes; anything else is an error, never a panic.
pub fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T, String> {
    match bytes.first() {
        Some(&WIRE_FORMAT) => {}
        other => return Err(format!("wire format {other:?}, expected {WIRE_FORMAT}")),
    }
    let config = bincode::config::standard().with_limit::<MAX_WIRE_BYTES>();
    let (v, used) = bincode::serde::decode_from_slice(&bytes[1..], config).map_err(|e| e.to_string())?;
    if used != bytes.len() - 1 {
        return Err("trailing bytes".into());
    }
    Ok(v)
}

/// A metric's partials as read, with their weight in the read cache when read from the
/// store (`None`: the cache's own).
type Weighed = (std::sync::Arc<MetricPartials>, Option<usize>);

/// Stored positions by (source, partition): their bytes and what they decode to.
type Decoded = HashMap<(usize, i32), (sled::IVec, std::sync::Arc<PartitionMeta>)>;

/// A partition's stored position as [`LocalFetch::stored_position`] read it.
struct StoredPosition {
    position: Position,
    meta: Option<std::sync::Arc<PartitionMeta>>,
    bytes: Option<sled::IVec>,
}

/// Reads this replica's store, for the partitions it owns and has restored.
#[derive(Clone)]
pub struct LocalFetch {
    topo: std::sync::Arc<Topology>,
    store: Store,
    owned: std::sync::Arc<Ownership>,
    /// With [`LocalFetch::caching`].
    cache: Option<std::sync::Arc<ReadCache>>,
    /// The metrics this replica refuses (see [`LocalFetch::refusing`]).
    refusals: std::sync::Arc<Refusals>,
    /// With [`LocalFetch::showing_faults`]: while flushes are held, answers say since when.
    faults: Option<std::sync::Arc<Faults>>,
    /// This replica's name, as answers report it.
    pub replica: String,
    /// Each partition's stored position as last decoded, by (source, partition), with its
    /// bytes: decoding the marks is most of a cached read's cost, and the bytes tell whether
    /// they changed.
    decoded: std::sync::Arc<std::sync::Mutex<Decoded>>,
}

impl LocalFetch {
    /// Reads `store` for the partitions `owned` says are this replica's.
    pub fn new(topo: std::sync::Arc<Topology>, store: Store, owned: std::sync::Arc<Ownership>, replica: String) -> LocalFetch {
        LocalFetch { topo, store, owned, cache: None, refusals: Default::default(), faults: None, replica, decoded: Default::default() }
    }

    /// The metrics this replica refuses.
    pub fn refusals(&self) -> &std::sync::Arc<Refusals> {
        &self.refusals
    }

    /// The same, answering the metrics `refusals` names with why they are refused.
    pub fn refusing(self, refusals: std::sync::Arc<Refusals>) -> LocalFetch {
        LocalFetch { refusals, ..self }
    }

    /// The same, keeping recent reads while their partition's position stands still. Only
    /// for a store whose every change moves the changed partition's position: the state
    /// store is; the result view, which drops windows it has sent, is not.
    pub fn caching(self) -> LocalFetch {
        LocalFetch { cache: Some(Default::default()), ..self }
    }

    /// The same, marking the partitions it answers stale while this replica's flushes are
    /// held (see [`crate::health`]): their state is as of the last flush before then.
    pub fn showing_faults(self, faults: std::sync::Arc<Faults>) -> LocalFetch {
        LocalFetch { faults: Some(faults), ..self }
    }

    /// Checks another replica's partials for `req` against this replica's config: one read
    /// per metric asked, one state per aggregate, each of the aggregate's kind. A reply that
    /// does not fit is not merged (it would panic, or answer short or wrong).
    pub fn check(&self, req: &FetchRequest, partials: &PartitionPartials) -> Result<(), Unavailable> {
        let wrong = |why: String| Err(Unavailable::Mismatch(why));
        if partials.reads.len() != req.reads.len() {
            return wrong(format!("{} reads answered, {} asked", partials.reads.len(), req.reads.len()));
        }
        for (r, mp) in req.reads.iter().zip(&partials.reads) {
            let Some((_, m)) = self.topo.metric(&r.metric) else { return wrong(format!("no metric `{}` here", r.metric)) };
            let kinds: Vec<_> = m.aggregates.iter().map(|a| std::mem::discriminant(&AggState::new(&a.kind))).collect();
            for e in &mp.entries {
                let fits = e.states.len() == kinds.len() && e.states.iter().zip(&kinds).all(|(st, k)| std::mem::discriminant(st) == *k);
                if !fits {
                    return wrong(format!("a partial of `{}` does not have its aggregates", r.metric));
                }
            }
        }
        Ok(())
    }

    /// One reply per partition of `req` (every owned one, without a list).
    pub fn read(&self, req: &FetchRequest) -> Result<Vec<PartitionReply>, QueryError> {
        let source = self
            .topo
            .sources
            .iter()
            .position(|s| s.name == req.source)
            .ok_or_else(|| QueryError::BadParam { param: "source", why: format!("no source named `{}` in this replica's config", req.source) })?;
        let owned = self.owned.of_source(source);
        let wanted: Vec<i32> = match &req.partitions {
            Some(list) => list.clone(),
            None => owned.iter().map(|(p, _)| *p).collect(),
        };
        let now = Instant::now();
        let deadline = now.checked_add(Duration::from_millis(req.wait_ms).min(MAX_WAIT)).unwrap_or(now);
        let mut out = Vec::with_capacity(wanted.len());
        let held = self.faults.as_ref().and_then(|f| f.since(&Link::HOLDING_FLUSHES));
        for p in wanted {
            // A standby copy answers for a partition this replica does not own, or is being
            // promoted to own (until the promotion is done).
            let copy = req.max_standby_lag.zip(self.owned.standby(source, p)).filter(|(max, c)| c.queryable && c.lag <= *max).map(|(_, c)| c);
            // So does, as a last resort, the state of a partition this replica lost.
            let lost = req.max_standby_lag.and_then(|_| self.owned.lost(source, p));
            let reply = match (owned.iter().find(|(q, _)| *q == p).map(|(_, s)| *s), copy, lost) {
                (Some(PartitionState::Active), _, _) => {
                    self.read_partition(req, (source, p), deadline)?.map(|r| PartitionPartials { stale_since_ms: held, ..r })
                }
                (_, Some(copy), _) => {
                    self.read_partition(req, (source, p), deadline)?.map(|r| PartitionPartials { standby_lag: Some(copy.lag), ..r })
                }
                (Some(PartitionState::Restoring { restored, total }), None, _) => Err(Unavailable::Restoring { restored, total }),
                (None, None, Some(at)) => {
                    self.read_partition(req, (source, p), deadline)?.map(|r| PartitionPartials { stale_since_ms: Some(at), ..r })
                }
                (None, None, None) => Err(Unavailable::NotOwned),
            };
            out.push(match reply {
                Ok(partials) => PartitionReply::Partials(partials),
                Err(why) => PartitionReply::Unavailable { partition: p, why },
            });
        }
        Ok(out)
    }

    /// Waits (until `deadline`) for `p` to reach its asked offset, then reads it. The outer
    /// error is the store's; the inner says why the partition has no answer.
    #[allow(clippy::type_complexity)]
    fn read_partition(
        &self,
        req: &FetchRequest,
        (source, p): (usize, i32),
        deadline: Instant,
    ) -> Result<Result<PartitionPartials, Unavailable>, StoreError> {
        let generation = self.owned.generation();
        let wanted = req.min_offsets.iter().find(|(q, _)| *q == p).map(|(_, o)| *o);
        let mut at = loop {
            let at = self.stored_position(source, p)?;
            match wanted {
                Some(w) if at.position.next_offset < w => {
                    if Instant::now() >= deadline {
                        return Ok(Err(Unavailable::Behind { at: at.position.next_offset, wanted: w }));
                    }
                    std::thread::sleep(POSITION_POLL);
                }
                _ => break at,
            }
        };
        // Queries asking at once read the partition once (see `ReadCache::reading`): the
        // position is read again if this one waited for its turn, as the one before may have
        // read a newer one. What the cache holds already needs no turn.
        let reading = self.cache.as_ref().filter(|c| !c.holds(p, &req.reads, at.position, generation)).map(|c| c.reading(source, p, &req.reads));
        if reading.as_ref().is_some_and(|(_, waited)| *waited) {
            at = self.stored_position(source, p)?;
        }
        // A flush applied between reading the position and the partials would make them
        // newer than it says; every flush of the partition rewrites its position, so read
        // again until the stored position stands still around the partials.
        for _ in 0..CONSISTENT_READ_TRIES {
            let position = at.position;
            let reads = match self.read_metrics(req, p, (position, at.meta.as_deref()), generation)? {
                Ok(reads) => reads,
                Err(why) => return Ok(Err(why)),
            };
            if self.store.partition_meta_bytes(&req.source, p)? == at.bytes {
                if let Some(cache) = &self.cache {
                    for (r, mp, weight) in req.reads.iter().zip(&reads).filter_map(|(r, (mp, w))| w.map(|w| (r, mp, w))) {
                        cache.put(p, r, position, mp, weight, generation);
                    }
                }
                let reads = reads.into_iter().map(|(mp, _)| mp).collect();
                return Ok(Ok(PartitionPartials { partition: p, position, reads, standby_lag: None, stale_since_ms: None }));
            }
            at = self.stored_position(source, p)?;
        }
        Ok(Err(Unavailable::Unreachable(format!("its state kept changing during {CONSISTENT_READ_TRIES} reads"))))
    }

    /// The stored position of `source`'s partition `p`, decoded, with its bytes (to tell
    /// cheaply whether it has moved since).
    fn stored_position(&self, source: usize, p: i32) -> Result<StoredPosition, StoreError> {
        let name = &self.topo.sources[source].name;
        let bytes = self.store.partition_meta_bytes(name, p)?;
        let meta = match &bytes {
            None => None,
            Some(b) => Some(self.decode_position(source, p, b)?),
        };
        Ok(StoredPosition { position: Position::of(meta.as_deref()), meta, bytes })
    }

    fn decode_position(&self, source: usize, p: i32, bytes: &sled::IVec) -> Result<std::sync::Arc<PartitionMeta>, StoreError> {
        let mut decoded = self.decoded.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, meta)) = decoded.get(&(source, p)).filter(|(b, _)| b == bytes) {
            return Ok(std::sync::Arc::clone(meta));
        }
        let meta = std::sync::Arc::new(PartitionMeta::decode(&crate::store::meta_key(&self.topo.sources[source].name, p), bytes)?);
        decoded.insert((source, p), (bytes.clone(), std::sync::Arc::clone(&meta)));
        Ok(meta)
    }

    /// Reads `req`'s metrics of partition `p`, which was at `position` (stored as `meta`)
    /// just before.
    fn read_metrics(
        &self,
        req: &FetchRequest,
        p: i32,
        (position, meta): (Position, Option<&PartitionMeta>),
        generation: u64,
    ) -> Result<Result<Vec<Weighed>, Unavailable>, StoreError> {
        let mut reads = Vec::with_capacity(req.reads.len());
        for r in &req.reads {
            if let Some(mp) = self.cache.as_ref().and_then(|c| c.get(p, r, position, generation)) {
                reads.push((mp, None));
                continue;
            }
            let Some((_, m)) = self.topo.metric(&r.metric) else {
                return Ok(Err(Unavailable::Mismatch(format!("no metric `{}` here", r.metric))));
            };
            if let Some(why) = self.refusals.get(&m.name) {
                return Ok(Err(Unavailable::Refused(why)));
            }
            if let Some(r) = meta.and_then(|meta| crate::layout::rebuild_pending(m, meta)) {
                return Ok(Err(Unavailable::Rebuilding { metric: m.name.clone(), at: r.next, until: position.next_offset }));
            }
            if m.layout.text != r.layout {
                return Ok(Err(Unavailable::Mismatch(format!("metric `{}` has layout `{}` here, `{}` there", r.metric, m.layout.text, r.layout))));
            }
            let mut entries: Vec<Entry> = Vec::new();
            let mut bounds: Option<(i64, i64)> = None;
            let mut weight = 0;
            let mut merged: std::collections::BTreeMap<Vec<u8>, Vec<AggState>> = std::collections::BTreeMap::new();
            let scanned: Box<dyn Iterator<Item = Result<crate::store::ScanEntry, StoreError>>> = match &r.group {
                Some(g) => Box::new(self.store.scan_group(m, p, (r.lo, r.hi), g)),
                None => Box::new(self.store.scan(m, p, r.lo, r.hi)),
            };
            for e in scanned {
                let e = match e {
                    Err(e @ StoreError::Layout { .. }) => return Ok(Err(Unavailable::Refused(e.to_string()))),
                    e => e?,
                };
                weight += e.stored_bytes + ENTRY_OVERHEAD;
                if !r.merged {
                    entries.push(Entry { group: e.group, slice: e.slice, from_end: e.from_end, states: e.value.states });
                    continue;
                }
                let (lo, hi) = bounds.unwrap_or((e.slice, i64::MIN));
                bounds = Some((lo.min(e.slice), hi.max(m.window.slice_end(e.slice))));
                match merged.entry(e.group) {
                    std::collections::btree_map::Entry::Vacant(v) => {
                        v.insert(e.value.states);
                    }
                    std::collections::btree_map::Entry::Occupied(mut o) => {
                        for (a, b) in o.get_mut().iter_mut().zip(&e.value.states) {
                            a.merge(b).map_err(|why| StoreError::Corrupt { key: format!("{} partition {p}", m.name), why: why.to_string() })?;
                        }
                    }
                }
            }
            // One key for every partition's merged entry, so they merge with each other.
            entries.extend(merged.into_iter().map(|(group, states)| Entry { group, slice: r.lo, from_end: i64::MIN, states }));
            let newest = if r.newest { self.store.last_slice(&m.name, p)? } else { None };
            let expired_before = meta.and_then(|mt| mt.mark(&m.name)).and_then(|mk| mk.expired_before);
            reads.push((std::sync::Arc::new(MetricPartials { entries, newest, bounds, expired_before }), Some(weight)));
        }
        Ok(Ok(reads))
    }
}

impl Fetch for LocalFetch {
    fn fetch(&self, req: &FetchRequest) -> Result<Fetched, QueryError> {
        let mut fetched = Fetched::default();
        for reply in self.read(req)? {
            match reply {
                PartitionReply::Partials(partials) => fetched.parts.push(Answered { replica: self.replica.clone(), partials }),
                PartitionReply::Unavailable { partition, why } => fetched.missing.push((partition, why)),
            }
        }
        Ok(fetched)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_format_round_trips_and_refuses_what_it_did_not_write() {
        let reply = vec![
            PartitionReply::Partials(PartitionPartials {
                partition: 3,
                position: Position { next_offset: 42, watermark: Some(7), max_event_time: None },
                reads: vec![std::sync::Arc::new(MetricPartials {
                    entries: vec![Entry { group: b"101".to_vec(), slice: 60_000, from_end: i64::MIN, states: vec![AggState::Count(5)] }],
                    newest: Some(60_000),
                    bounds: None,
                    expired_before: Some(0),
                })],
                standby_lag: Some(12),
                stale_since_ms: None,
            }),
            PartitionReply::Unavailable { partition: 4, why: Unavailable::Restoring { restored: 1, total: 9 } },
        ];
        let bytes = encode(&reply);
        assert_eq!(decode::<Vec<PartitionReply>>(&bytes).unwrap(), reply);
        assert!(decode::<Vec<PartitionReply>>(&bytes[..bytes.len() - 1]).is_err(), "truncated");
        let mut other = bytes.clone();
        other[0] = WIRE_FORMAT + 1;
        assert!(decode::<Vec<PartitionReply>>(&other).is_err(), "another version");
        assert!(decode::<Vec<PartitionReply>>(&[]).is_err());
        // A length prefix claiming more than the limit is refused before allocating.
        assert!(decode::<Vec<u8>>(&[WIRE_FORMAT, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]).is_err());
    }
}
