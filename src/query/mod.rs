//! Answers: partial aggregates merged over partitions and slices.
//!
//! A query names a metric and a time range. The engine plans which slices the range needs,
//! has a [`Fetch`] read the partials of every partition of the metric's source
//! ([`fetch`]: this replica's store, or the owners across the cluster), merges them per
//! group key (counts add, sketches merge, top-N lists add per item), then builds each
//! window from its slices. Every answer says which partitions it covers — with the replica
//! that answered, its position and watermark — the lowest watermark (windows ending after
//! it may still grow), and a position token: passed back as `min_position`, any replica
//! answers only from state at or past it, so a reader never sees a number go backwards.
//!
//! Only what a flush has made durable is visible, so an answer never shows state that a
//! crash could take back.

mod cache;
pub mod fetch;
mod memo;
mod turns;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value as Json};

use crate::aggregate::{rank_order, AggKind, AggState};
use crate::event::time::MAX_TIME_MS;
use crate::event::Value;
use crate::store::{encode_group, split_group, StoreError};
use crate::topology::{Metric, Topology};
use crate::window::{Window, WindowKind, GLOBAL};
use fetch::{Entry, Fetch, FetchRequest, Fetched, MetricRead, Unavailable};
use memo::{Memo, Merged};

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// No metric or derived metric of that name.
    #[error("no metric named `{0}`")]
    UnknownMetric(String),
    /// A parameter is malformed or does not apply.
    #[error("parameter `{param}`: {why}")]
    BadParam {
        /// The parameter.
        param: &'static str,
        /// What is wrong and what is allowed.
        why: String,
    },
    /// Some partitions the answer needs have no answering owner right now (restoring,
    /// mid-rebalance, down, behind the asked position): an answer now would be short.
    #[error("{} of source `{source_name}` cannot be answered now ({}); ask again shortly, or pass partial=true for an answer marked incomplete", plural(missing.len()), describe(missing))]
    Unavailable {
        /// The source.
        source_name: String,
        /// The partitions without an answer, and why.
        missing: Vec<(i32, Unavailable)>,
    },
    /// The answer would reach into windows some covered partition may already have deleted
    /// (past the metric's retention), so it would be short.
    #[error("metric `{metric}` keeps windows for {retention_ms} ms after they end (its `retention`); the state before {earliest} ms may be gone on some partition, so this is not answered; ask from {earliest} on, or raise `retention`")]
    Expired {
        /// The metric.
        metric: String,
        /// Its retention, ms.
        retention_ms: i64,
        /// The earliest time still answered in full.
        earliest: i64,
    },
    /// A metric this answer needs is refused: its state is of another layout than
    /// configured, or misses records (the message says which, and what to do).
    #[error("{0}")]
    Refused(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn plural(n: usize) -> String {
    if n == 1 {
        "1 partition".into()
    } else {
        format!("{n} partitions")
    }
}

/// The partitions by reason, each reason once (`0-39: no live replica owns it …`): a
/// message that lists forty partitions one by one is not read.
fn describe(missing: &[(i32, Unavailable)]) -> String {
    let mut by_reason: Vec<(String, Vec<i32>)> = Vec::new();
    for (p, why) in missing {
        let why = why.to_string();
        match by_reason.iter_mut().find(|(w, _)| *w == why) {
            Some((_, partitions)) => partitions.push(*p),
            None => by_reason.push((why, vec![*p])),
        }
    }
    let described: Vec<String> = by_reason
        .into_iter()
        .map(|(why, mut partitions)| {
            partitions.sort_unstable();
            format!("{}: {why}", runs(&partitions))
        })
        .collect();
    described.join("; ")
}

/// Sorted partitions as runs: `0-3, 7, 9-10`.
fn runs(partitions: &[i32]) -> String {
    let mut out = Vec::new();
    let mut start = 0;
    while start < partitions.len() {
        let mut end = start;
        while end + 1 < partitions.len() && partitions[end + 1] == partitions[end] + 1 {
            end += 1;
        }
        out.push(match end == start {
            true => partitions[start].to_string(),
            false => format!("{}-{}", partitions[start], partitions[end]),
        });
        start = end + 1;
    }
    out.join(", ")
}

fn bad(param: &'static str, why: impl Into<String>) -> QueryError {
    QueryError::BadParam { param, why: why.into() }
}

/// A half-open time range `[from, to)` in epoch ms; `None` is unbounded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    /// Start, inclusive.
    pub from: Option<i64>,
    /// End, exclusive.
    pub to: Option<i64>,
}

/// Parses a time parameter: epoch milliseconds or RFC 3339.
pub fn parse_time(param: &'static str, text: &str) -> Result<i64, QueryError> {
    let ms = match text.parse::<i64>() {
        Ok(ms) => ms,
        Err(_) => chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_millis())
            .map_err(|_| bad(param, format!("`{text}` is neither epoch milliseconds nor an RFC 3339 time like 2021-09-06T16:00:00+08:00")))?,
    };
    if !(-MAX_TIME_MS..=MAX_TIME_MS).contains(&ms) {
        return Err(bad(param, format!("`{text}` is outside ±{MAX_TIME_MS} ms, the range of event times")));
    }
    Ok(ms)
}

/// How an answer may be given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ask {
    /// Answer from the partitions that can be, marked `"complete": false`, instead of
    /// refusing the whole answer when some cannot.
    pub partial: bool,
    /// A position token (an answer's `coverage.position`): answer only from state at or past it.
    pub min_position: Option<String>,
}

/// Which partitions an answer covers, who answered them and how far their event time has got.
#[derive(Debug, Clone, PartialEq)]
struct Coverage {
    source: String,
    /// Each answered partition.
    answered: Vec<AnsweredBy>,
    missing: Vec<(i32, Unavailable)>,
    /// The lowest watermark; `None` when some partition has none or is missing (it may
    /// still add to any window: nothing is closed).
    watermark: Option<i64>,
    /// Highest event time seen on any covered partition.
    latest_event: Option<i64>,
    /// Highest watermark of the covered partitions: the one expiry may have acted on.
    highest_watermark: Option<i64>,
    /// Whether expiry applies (see [`QueryEngine::keeping_expired`]).
    expiry: bool,
    /// Per metric, the latest expiry horizon of any covered partition.
    horizons: std::collections::HashMap<String, i64>,
}

use fetch::Position;

/// Who answered a partition, and from what.
#[derive(Debug, Clone, PartialEq)]
struct AnsweredBy {
    replica: String,
    partition: i32,
    position: Position,
    /// Read from a standby copy this many changelog records behind.
    standby_lag: Option<u64>,
    /// Read from the state of a replica that lost the partition then (see
    /// [`fetch::PartitionPartials::stale_since_ms`]).
    stale_since_ms: Option<i64>,
}

impl Coverage {
    fn of(source: &str, fetched: &Fetched, reads: &[MetricRead], expiry: bool) -> Coverage {
        let mut horizons: std::collections::HashMap<String, i64> = Default::default();
        for (r, h) in fetched.parts.iter().flat_map(|a| reads.iter().zip(&a.partials.reads).filter_map(|(r, mp)| Some((r, mp.expired_before?)))) {
            let at = horizons.entry(r.metric.clone()).or_insert(h);
            *at = (*at).max(h);
        }
        let positions: Vec<Position> = fetched.parts.iter().map(|a| a.partials.position).collect();
        let open = !fetched.missing.is_empty() || positions.iter().any(|p| p.watermark.is_none());
        Coverage {
            source: source.to_string(),
            answered: fetched
                .parts
                .iter()
                .map(|a| AnsweredBy {
                    replica: a.replica.clone(),
                    partition: a.partials.partition,
                    position: a.partials.position,
                    standby_lag: a.partials.standby_lag,
                    stale_since_ms: a.partials.stale_since_ms,
                })
                .collect(),
            missing: fetched.missing.clone(),
            watermark: if open { None } else { positions.iter().filter_map(|p| p.watermark).min() },
            latest_event: positions.iter().filter_map(|p| p.max_event_time).max(),
            highest_watermark: positions.iter().filter_map(|p| p.watermark).max(),
            expiry,
            horizons,
        }
    }

    /// Whether some partition may already have deleted part of `w` (it is past the
    /// retention there): such a window is no longer answered, rather than answered short.
    fn expired(&self, m: &Metric, w: Window) -> bool {
        let gone = self.horizons.get(&m.name).is_some_and(|h| w.start < *h);
        self.expiry && (gone || self.highest_watermark.is_some_and(|wm| m.window.expired(w, wm, m.retention_ms)))
    }

    /// The windows of `m` answered from `slices`, for an output closing with `grace_ms` (see
    /// [`crate::window::WindowSpec::windows_of_slices`]).
    fn listed(&self, m: &Metric, slices: &Slices, grace_ms: i64) -> Vec<Window> {
        let mut starts: Vec<i64> = slices.keys().map(|k| k.0).collect();
        starts.dedup();
        let closed_by = self.watermark.map_or(i64::MIN, |wm| wm.saturating_sub(grace_ms));
        m.window.windows_of_slices(&starts, self.latest_event.unwrap_or(i64::MAX), closed_by)
    }

    /// The first slice start not deleted on any partition (`None`: nothing deleted).
    fn retained_from(&self, m: &Metric) -> Option<i64> {
        let by_retention = self.highest_watermark.filter(|_| self.expiry).and_then(|wm| m.window.expired_before(wm, m.retention_ms));
        by_retention.max(self.horizons.get(&m.name).copied().filter(|_| self.expiry))
    }

    /// Refuses an answer over slices starting at `lo` or later if some may be deleted.
    fn check_retained(&self, m: &Metric, lo: i64) -> Result<(), QueryError> {
        match self.retained_from(m) {
            Some(cut) if lo < cut => Err(QueryError::Expired { metric: m.name.clone(), retention_ms: m.retention_ms, earliest: cut }),
            _ => Ok(()),
        }
    }

    /// The position token of this answer: the source and each answered partition's offset.
    fn token(&self) -> String {
        let mut t = self.source.clone();
        for a in &self.answered {
            t.push_str(&format!("~{}-{}", a.partition, a.position.next_offset));
        }
        t
    }

    fn to_json(&self) -> Json {
        let partitions: Vec<Json> = self
            .answered
            .iter()
            .map(|a| {
                let mut j = json!({ "partition": a.partition, "replica": a.replica, "next_offset": a.position.next_offset, "watermark": a.position.watermark });
                if let Some(lag) = a.standby_lag {
                    j["standby_lag"] = json!(lag);
                }
                if let Some(t) = a.stale_since_ms {
                    j["stale_since"] = json!(t);
                }
                j
            })
            .collect();
        let stale = self.answered.iter().any(|a| a.stale_since_ms.is_some());
        let missing: Vec<Json> =
            self.missing.iter().map(|(p, why)| json!({ "partition": p, "reason": why.reason(), "detail": why.to_string() })).collect();
        json!({
            "partitions": partitions,
            "watermark": self.watermark,
            "complete": self.missing.is_empty(),
            "missing": missing,
            "stale": stale,
            "position": self.token(),
        })
    }
}

/// Reads a position token of `source` (an answer's `coverage.position`: the source name, then
/// `~partition-offset` per answered partition) into (partition, offset) pairs.
pub fn parse_position(source: &str, text: &str) -> Result<Vec<(i32, i64)>, QueryError> {
    let wrong =
        || bad("min_position", format!("`{text}` is not a position token of source `{source}` (answers carry theirs in `coverage.position`)"));
    let rest = text.strip_prefix(source).ok_or_else(wrong)?;
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let rest = rest.strip_prefix('~').ok_or_else(wrong)?;
    rest.split('~')
        .map(|part| {
            let (p, o) = part.split_once('-').ok_or_else(wrong)?;
            match (p.parse::<i32>(), o.parse::<i64>()) {
                (Ok(p), Ok(o)) if p >= 0 && o >= 0 => Ok((p, o)),
                _ => Err(wrong()),
            }
        })
        .collect()
}

/// A number as JSON, whole numbers as integers (counts stay counts).
fn number_json(x: f64) -> Json {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// Per group key, per (slice start, first window end it counts for), merged partials.
type Slices = BTreeMap<(i64, i64), Vec<AggState>>;
type Partials = BTreeMap<Vec<u8>, Slices>;

/// What a windowed row holds.
#[derive(Debug, Clone, PartialEq)]
pub enum RowValues {
    /// A metric's merged states, one per aggregate.
    States(Vec<AggState>),
    /// A ratio's two sides (the numerator 0 where its metric has no records).
    Ratio {
        /// The numerator's aggregate.
        numerator: f64,
        /// The denominator's aggregate.
        denominator: f64,
    },
}

/// One row of a windowed answer.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    /// The window ([`GLOBAL`] for the global window).
    pub window: Window,
    /// Whether it has closed on every covered partition.
    pub closed: bool,
    /// The group key, as stored.
    pub group: Vec<u8>,
    /// What the row holds.
    pub values: RowValues,
}

/// A windowed answer, typed: its rows and what they cover.
#[derive(Debug, Clone)]
pub struct WindowRows {
    /// The metric's or ratio's name.
    pub name: String,
    /// The metric whose group-by names the keys (a ratio's numerator).
    pub metric: usize,
    cov: Coverage,
    /// Newest window first, then by key.
    pub rows: Vec<WindowRow>,
    /// Whether rows were left out for the limit.
    pub truncated: bool,
}

/// What [`QueryEngine::gather`] brings back: the coverage, and per read the partials merged
/// over partitions and the newest slice holding data.
struct Gathered {
    cov: Coverage,
    merged: Arc<Merged>,
}

/// Answers queries from partials a [`Fetch`] reads (this replica's store, or the cluster).
#[derive(Clone)]
pub struct QueryEngine {
    topo: Arc<Topology>,
    fetch: Arc<dyn Fetch>,
    /// Whether windows some partition may have expired are left out (see `Coverage::expired`).
    expiry: bool,
    /// The metrics this replica refuses: answered with why, whoever owns their partitions.
    refusals: Arc<crate::layout::Refusals>,
    /// With [`QueryEngine::remembering`].
    memo: Option<Arc<Memo>>,
}

fn merge_into(acc: &mut [AggState], other: &[AggState]) -> Result<(), QueryError> {
    for (a, b) in acc.iter_mut().zip(other) {
        a.merge(b).map_err(|e| QueryError::Store(StoreError::Corrupt { key: "sketch".into(), why: e.to_string() }))?;
    }
    Ok(())
}

/// Merges the partials of one key from every partition. Sketches merge pairwise, as a
/// balanced tree: merged one after another, each sparse merge re-sorts all merged so far,
/// which costs the square of the partitions. Any order gives the same states (partitions
/// already come in whatever order their replicas answer).
fn merge_all(parts: &[&[AggState]]) -> Result<Vec<AggState>, QueryError> {
    let Some((first, rest)) = parts.split_first() else { return Ok(Vec::new()) };
    if !first.iter().any(|s| matches!(s, AggState::Distinct(_))) {
        let mut acc = first.to_vec();
        for p in rest {
            merge_into(&mut acc, p)?;
        }
        return Ok(acc);
    }
    let mut level: Vec<Vec<AggState>> = parts.iter().map(|p| p.to_vec()).collect();
    while level.len() > 1 {
        let mut pairs = level.into_iter();
        let mut next = Vec::with_capacity(pairs.len().div_ceil(2));
        while let Some(mut a) = pairs.next() {
            if let Some(b) = pairs.next() {
                merge_into(&mut a, &b)?;
            }
            next.push(a);
        }
        level = next;
    }
    Ok(level.pop().unwrap_or_default())
}

/// Merges entries of the same (group, slice, first window end) from every partition. Each
/// partition's entries come in store order — slice, window end, group — so a stable sort by
/// that order merges sorted runs instead of sorting from scratch; a map of maps costs a
/// tree search per entry, which at thousands of groups is most of a query.
fn merge_entries<'a>(entries: impl Iterator<Item = &'a Entry>) -> Result<Partials, QueryError> {
    let mut all: Vec<&Entry> = entries.collect();
    all.sort_by(|a, b| (a.slice, a.from_end, &a.group).cmp(&(b.slice, b.from_end, &b.group)));
    let mut states = Vec::new();
    let mut parts: Vec<&[AggState]> = Vec::new();
    for run in all.chunk_by(|a, b| (a.slice, a.from_end, &a.group) == (b.slice, b.from_end, &b.group)) {
        parts.clear();
        parts.extend(run.iter().map(|e| e.states.as_slice()));
        states.push((run[0].group.as_slice(), (run[0].slice, run[0].from_end), merge_all(&parts)?));
    }
    // By group, each group's slices still in order.
    states.sort_by(|a, b| a.0.cmp(b.0));
    let mut partials = Partials::new();
    let mut states = states.into_iter().peekable();
    while let Some((g, at, st)) = states.next() {
        let mut slices = Slices::from([(at, st)]);
        while let Some((_, at, st)) = states.next_if(|next| next.0 == g) {
            slices.insert(at, st);
        }
        partials.insert(g.to_vec(), slices);
    }
    Ok(partials)
}

/// Folds one partial into an accumulator that may still be empty.
fn accumulate(acc: &mut Option<Vec<AggState>>, other: &[AggState]) -> Result<(), QueryError> {
    match acc {
        None => *acc = Some(other.to_vec()),
        Some(a) => merge_into(a, other)?,
    }
    Ok(())
}

/// A group's item text: its parts joined by `|`.
fn item_label(g: &[u8]) -> String {
    let mut label = String::with_capacity(g.len());
    for (i, part) in split_group(g).iter().enumerate() {
        if i > 0 {
            label.push('|');
        }
        label.push_str(&String::from_utf8_lossy(part));
    }
    label
}

/// Whether window `w` overlaps `range`.
fn overlaps(range: Range, w: Window) -> bool {
    range.from.is_none_or(|f| w.end > f) && range.to.is_none_or(|t| w.start < t)
}

/// What to read of `m`: slices in `[lo, hi)`, of `group` only if given.
fn read(m: &Metric, lo: i64, hi: i64, group: Option<&[u8]>, newest: bool) -> MetricRead {
    MetricRead { metric: m.name.clone(), layout: m.layout.text.clone(), lo, hi, group: group.map(<[u8]>::to_vec), newest, merged: false }
}

impl QueryEngine {
    /// An engine answering from what `fetch` reads.
    pub fn new(topo: Arc<Topology>, fetch: Arc<dyn Fetch>) -> QueryEngine {
        QueryEngine { topo, fetch, expiry: true, refusals: Arc::default(), memo: None }
    }

    /// The same engine, keeping each merge of partitions' partials while the positions it
    /// was read at stand still (see `query/memo.rs`). Only over partials that change only
    /// with their partition's position: the state store's are; the result view's are not.
    pub fn remembering(self) -> QueryEngine {
        QueryEngine { memo: Some(Arc::default()), ..self }
    }

    /// The same engine, refusing the metrics `refusals` names.
    pub fn refusing(self, refusals: Arc<crate::layout::Refusals>) -> QueryEngine {
        QueryEngine { refusals, ..self }
    }

    /// An engine over one store, answering for the partitions `owned` holds (the result
    /// view; one process on its own).
    pub fn local(topo: Arc<Topology>, store: crate::store::Store, owned: Arc<crate::ownership::Ownership>) -> QueryEngine {
        let fetch = fetch::LocalFetch::new(Arc::clone(&topo), store, owned, "local".into());
        QueryEngine::new(topo, Arc::new(fetch))
    }

    /// The same engine over a store that keeps expired windows until it drops them itself
    /// (the result view): every stored window is answered.
    pub fn keeping_expired(self) -> QueryEngine {
        QueryEngine { expiry: false, ..self }
    }

    /// Names exported as `tally_metric_value`.
    pub fn exported(&self) -> &[String] {
        &self.topo.exported
    }

    /// Every metric and derived metric, with its definition.
    pub fn list(&self) -> Json {
        let metrics: Vec<Json> = self
            .topo
            .metrics
            .iter()
            .map(|m| {
                let mut v = serde_json::to_value(m).unwrap_or(Json::Null);
                v["source"] = json!(self.topo.sources[m.source].name);
                v["kind"] = json!("metric");
                v
            })
            .collect();
        let derived: Vec<Json> = self
            .topo
            .derived
            .iter()
            .map(|d| {
                let side = |(m, a): (usize, usize)| format!("{}.{}", self.topo.metrics[m].name, self.topo.metrics[m].aggregates[a].name);
                json!({
                    "name": d.name,
                    "kind": "ratio",
                    "numerator": side(d.numerator),
                    "denominator": side(d.denominator),
                    "group_by": self.topo.metrics[d.numerator.0].group_by,
                    "display": d.display,
                })
            })
            .collect();
        json!({ "metrics": metrics, "derived": derived })
    }

    fn metric(&self, name: &str) -> Result<(usize, &Metric), QueryError> {
        self.topo.metric(name).ok_or_else(|| QueryError::UnknownMetric(name.to_string()))
    }

    /// Reads `reads` of every partition of `source` and merges each over the partitions.
    /// Refuses (unless `ask.partial`) when some partition has no answer.
    fn gather(&self, source: usize, reads: Vec<MetricRead>, ask: &Ask) -> Result<Gathered, QueryError> {
        if let Some(why) = reads.iter().find_map(|r| self.refusals.get(&r.metric)) {
            return Err(QueryError::Refused(why));
        }
        let name = &self.topo.sources[source].name;
        let min_offsets = ask.min_position.as_deref().map(|t| parse_position(name, t)).transpose()?.unwrap_or_default();
        let wait_ms = if min_offsets.is_empty() { 0 } else { self.topo.cluster.position_wait_ms };
        let req = FetchRequest { source: name.clone(), partitions: None, reads, min_offsets, wait_ms, max_standby_lag: None };
        let fetched = self.fetch.fetch(&req)?;
        // A refused metric is not answered, not even in part: what it holds is another metric's.
        if let Some((_, Unavailable::Refused(why))) = fetched.missing.iter().find(|(_, w)| matches!(w, Unavailable::Refused(_))) {
            return Err(QueryError::Refused(why.clone()));
        }
        if !fetched.missing.is_empty() && !ask.partial {
            return Err(QueryError::Unavailable { source_name: name.clone(), missing: fetched.missing });
        }
        let cov = Coverage::of(name, &fetched, &req.reads, self.expiry);
        let merge = || Self::merge(&req.reads, &fetched);
        let merged = match &self.memo {
            Some(memo) => memo.merged(name, &req.reads, &fetched, merge)?,
            None => Arc::new(merge()?),
        };
        Ok(Gathered { cov, merged })
    }

    /// Merges every partition's partials of each read.
    fn merge(reads: &[MetricRead], fetched: &Fetched) -> Result<Merged, QueryError> {
        let mut merged = Merged { partials: Vec::with_capacity(reads.len()), newest: vec![None; reads.len()], bounds: vec![None; reads.len()] };
        for ri in 0..reads.len() {
            let of_read = || fetched.parts.iter().filter_map(move |a| a.partials.reads.get(ri));
            for mp in of_read() {
                merged.newest[ri] = merged.newest[ri].max(mp.newest);
                if let Some((lo, hi)) = mp.bounds {
                    merged.bounds[ri] = Some(merged.bounds[ri].map_or((lo, hi), |(a, b)| (a.min(lo), b.max(hi))));
                }
            }
            merged.partials.push(merge_entries(of_read().flat_map(|mp| &mp.entries))?);
        }
        Ok(merged)
    }

    fn group_bytes(&self, m: &Metric, key: &str) -> Result<Vec<u8>, QueryError> {
        let parts: Vec<&str> = if m.group_by.len() <= 1 { vec![key] } else { key.split('|').collect() };
        if parts.len() != m.group_by.len() {
            return Err(bad("key", format!("metric `{}` groups by {:?}: give {} value(s) separated by `|`", m.name, m.group_by, m.group_by.len())));
        }
        Ok(encode_group(parts.iter().map(|p| p.as_bytes())))
    }

    /// A stored group key as the JSON object rows carry: group-by field → value.
    pub fn key_json(m: &Metric, group: &[u8]) -> Json {
        let mut obj = Map::new();
        if !m.group_by.is_empty() {
            for (f, v) in m.group_by.iter().zip(split_group(group)) {
                obj.insert(f.clone(), json!(String::from_utf8_lossy(&v)));
            }
        }
        Json::Object(obj)
    }

    fn slice_bounds(m: &Metric, range: Range) -> (i64, i64) {
        if m.window.kind == WindowKind::Global {
            return (GLOBAL.start, GLOBAL.start + 1);
        }
        // Windows overlapping the range reach one window length beyond it on both sides.
        let lo = range.from.map_or(i64::MIN, |f| m.window.slice_start(f.saturating_sub(m.window.reach_ms())));
        let hi = range.to.map_or(i64::MAX, |t| t.saturating_add(m.window.reach_ms()));
        (lo, hi)
    }

    /// Merged states of one window: its slices' partials that count for it (those for every
    /// window of their slice, and those for windows ending at or after a time it ends by).
    fn window_states(w: Window, slices: &Slices) -> Result<Option<Vec<AggState>>, QueryError> {
        let mut acc: Option<Vec<AggState>> = None;
        let (lo, hi) = if w == GLOBAL { (GLOBAL.start, GLOBAL.start + 1) } else { (w.start, w.end) };
        for (&(_, from_end), st) in slices.range((lo, i64::MIN)..(hi, i64::MIN)) {
            if from_end <= w.end {
                accumulate(&mut acc, st)?;
            }
        }
        Ok(acc)
    }

    /// The values of one row; with `sketches`, distinct aggregates also carry their
    /// canonical sketch encoding in hex (for comparing sketches built by different paths).
    fn values_json(m: &Metric, states: &[AggState], sketches: bool) -> Json {
        let mut obj = Map::new();
        for (spec, st) in m.aggregates.iter().zip(states) {
            let mut v = st.to_json(&spec.kind);
            if let (true, AggState::Distinct(sk)) = (sketches, st) {
                v["sketch"] = json!(sk.to_canonical().iter().map(|b| format!("{b:02x}")).collect::<String>());
            }
            obj.insert(spec.name.clone(), v);
        }
        Json::Object(obj)
    }

    /// The `n` groups of `partials` with the highest value of aggregate `ai` in window `w`
    /// (ties broken by item), highest first, with that aggregate's state. Groups whose parts
    /// join to the same item text are one item, the last of them in group order.
    fn rank_groups(m: &Metric, w: Window, ai: usize, partials: &Partials, n: usize) -> Result<Vec<(String, AggState)>, QueryError> {
        let mut items: Vec<(String, i128, AggState)> = Vec::new();
        for (g, slices) in partials {
            let Some(mut st) = Self::window_states(w, slices)? else { continue };
            if !Self::passes_having(m, &st) {
                continue;
            }
            if let Some(v) = st[ai].number() {
                items.push((item_label(g), (v * 1e6).round() as i128, st.swap_remove(ai)));
            }
        }
        // Reversed, so that the stable sort puts the last group of an item first and `dedup`
        // keeps it.
        items.reverse();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items.dedup_by(|later, kept| later.0 == kept.0);
        let by_rank = |a: &(String, i128, AggState), b: &(String, i128, AggState)| rank_order((&a.0, a.1), (&b.0, b.1));
        if n < items.len() {
            items.select_nth_unstable_by(n, by_rank);
            items.truncate(n);
        }
        items.sort_unstable_by(by_rank);
        Ok(items.into_iter().map(|(item, _, st)| (item, st)).collect())
    }

    fn passes_having(m: &Metric, states: &[AggState]) -> bool {
        match &m.having {
            None => true,
            Some(h) => {
                let vals: Vec<Value> = states.iter().map(|s| s.number().map_or(Value::Null, Value::Float)).collect();
                h.matches(&vals)
            }
        }
    }

    fn window_json(grace_ms: i64, w: Window, watermark: Option<i64>) -> Json {
        let closed = watermark.is_some_and(|wm| w.end.saturating_add(grace_ms) <= wm);
        if w == GLOBAL {
            return json!({ "global": true, "closed": false });
        }
        json!({ "start": w.start, "end": w.end, "closed": closed })
    }

    /// Windowed rows (window, key, merged values) — per window overlapping `range`, per
    /// key (or just `key`), newest window first, at most `limit` rows — as JSON. For a
    /// derived metric, rows hold the ratio.
    pub fn windows(&self, name: &str, key: Option<&str>, range: Range, limit: usize, sketches: bool, ask: &Ask) -> Result<Json, QueryError> {
        let r = self.window_rows(name, key, range, limit, ask)?;
        let rows: Vec<Json> = r.rows.iter().map(|row| self.row_json(&r, row, sketches)).collect();
        Ok(json!({ "metric": r.name, "coverage": r.cov.to_json(), "truncated": r.truncated, "rows": rows }))
    }

    /// The same rows, typed (the result view renders them itself).
    pub fn window_rows(&self, name: &str, key: Option<&str>, range: Range, limit: usize, ask: &Ask) -> Result<WindowRows, QueryError> {
        let mut r = match self.topo.derived.iter().position(|d| d.name == name) {
            Some(di) => self.ratio_rows(di, key, range, ask)?,
            None => self.metric_rows(name, key, range, ask)?,
        };
        r.rows.sort_by(|a, b| b.window.cmp(&a.window).then_with(|| a.group.cmp(&b.group)));
        r.truncated = r.rows.len() > limit;
        r.rows.truncate(limit);
        Ok(r)
    }

    fn metric_rows(&self, name: &str, key: Option<&str>, range: Range, ask: &Ask) -> Result<WindowRows, QueryError> {
        let (mi, m) = self.metric(name)?;
        let group = key.map(|k| self.group_bytes(m, k)).transpose()?;
        let (lo, hi) = Self::slice_bounds(m, range);
        let Gathered { cov, merged } = self.gather(m.source, vec![read(m, lo, hi, group.as_deref(), false)], ask)?;
        let mut rows = Vec::new();
        for (g, slices) in &merged.partials[0] {
            for w in cov.listed(m, slices, m.grace_ms).into_iter().filter(|w| overlaps(range, *w) && !cov.expired(m, *w)) {
                if let Some(states) = Self::window_states(w, slices)? {
                    if Self::passes_having(m, &states) {
                        let closed = Self::closed(m.grace_ms, w, cov.watermark);
                        rows.push(WindowRow { window: w, closed, group: g.clone(), values: RowValues::States(states) });
                    }
                }
            }
        }
        Ok(WindowRows { name: m.name.clone(), metric: mi, cov, rows, truncated: false })
    }

    fn ratio_rows(&self, di: usize, key: Option<&str>, range: Range, ask: &Ask) -> Result<WindowRows, QueryError> {
        let d = &self.topo.derived[di];
        let (num_m, den_m) = (&self.topo.metrics[d.numerator.0], &self.topo.metrics[d.denominator.0]);
        let group = key.map(|k| self.group_bytes(num_m, k)).transpose()?;
        let (lo, hi) = Self::slice_bounds(num_m, range);
        let reads = vec![read(num_m, lo, hi, group.as_deref(), false), read(den_m, lo, hi, group.as_deref(), false)];
        let Gathered { cov, merged } = self.gather(num_m.source, reads, ask)?;
        let (nums, dens) = (&merged.partials[0], &merged.partials[1]);
        let empty = BTreeMap::new();
        let mut rows = Vec::new();
        for (g, den_slices) in dens {
            let num_slices = nums.get(g).unwrap_or(&empty);
            let expired = |w: &Window| cov.expired(num_m, *w) || cov.expired(den_m, *w);
            for w in cov.listed(num_m, den_slices, d.grace_ms).into_iter().filter(|w| overlaps(range, *w) && !expired(w)) {
                // A row where the denominator has one: a window it has no records in is
                // not a window of the ratio.
                let Some(den) = Self::window_states(w, den_slices)? else { continue };
                let denominator = den.get(d.denominator.1).and_then(AggState::number).unwrap_or(0.0);
                let numerator = Self::window_states(w, num_slices)?.and_then(|s| s.get(d.numerator.1).and_then(AggState::number)).unwrap_or(0.0);
                let closed = Self::closed(d.grace_ms, w, cov.watermark);
                rows.push(WindowRow { window: w, closed, group: g.clone(), values: RowValues::Ratio { numerator, denominator } });
            }
        }
        Ok(WindowRows { name: d.name.clone(), metric: d.numerator.0, cov, rows, truncated: false })
    }

    fn closed(grace_ms: i64, w: Window, watermark: Option<i64>) -> bool {
        w != GLOBAL && watermark.is_some_and(|wm| w.end.saturating_add(grace_ms) <= wm)
    }

    /// One typed row of `r` as the API renders it.
    pub fn row_json(&self, r: &WindowRows, row: &WindowRow, sketches: bool) -> Json {
        let m = &self.topo.metrics[r.metric];
        let window = if row.window == GLOBAL {
            json!({ "global": true, "closed": false })
        } else {
            json!({ "start": row.window.start, "end": row.window.end, "closed": row.closed })
        };
        json!({ "window": window, "key": Self::key_json(m, &row.group), "values": self.values_of(m, &row.values, sketches) })
    }

    /// A row's values as JSON: a metric's aggregates by name, or a ratio's three numbers.
    pub fn values_of(&self, m: &Metric, values: &RowValues, sketches: bool) -> Json {
        match values {
            RowValues::States(states) => Self::values_json(m, states, sketches),
            RowValues::Ratio { numerator, denominator } => {
                let ratio = if *denominator == 0.0 { Json::Null } else { json!(numerator / denominator) };
                json!({ "ratio": ratio, "numerator": number_json(*numerator), "denominator": number_json(*denominator) })
            }
        }
    }

    /// The window "as of" event time `t`: of the windows holding `t`, the one that ends
    /// first — the last hour up to `t` for a sliding hour, the running total up to `t`'s
    /// step for a cumulative day.
    fn current_window(m: &Metric, t: i64) -> Window {
        m.window.windows_containing(t).into_iter().min_by_key(|w| w.end).unwrap_or(GLOBAL)
    }

    /// Start of the newest slice holding data on any partition, unless it is past the
    /// retention (then some partition may have deleted it, and nothing is kept); with the
    /// coverage it was read at.
    fn newest_slice(&self, m: &Metric, ask: &Ask) -> Result<(Coverage, Option<i64>), QueryError> {
        let g = self.gather(m.source, vec![read(m, 0, 0, None, true)], ask)?;
        let newest = g.merged.newest[0].filter(|s| g.cov.retained_from(m).is_none_or(|cut| *s >= cut));
        Ok((g.cov, newest))
    }

    /// The current window's numeric values of a metric without group-by (or a ratio), as
    /// (aggregate, value): what `tally_metric_value` exports. Reads only that window's slices.
    pub fn current_values(&self, name: &str) -> Result<Vec<(String, f64)>, QueryError> {
        let m = match self.topo.derived.iter().find(|d| d.name == name) {
            Some(d) => &self.topo.metrics[d.numerator.0],
            None => self.metric(name)?.1,
        };
        let Some(window) = self.newest_slice(m, &Ask::default())?.1.map(|s| Self::current_window(m, s)) else {
            return Ok(vec![]);
        };
        let range = if window == GLOBAL { Range::default() } else { Range { from: Some(window.end - 1), to: Some(window.end) } };
        let answer = self.windows(name, None, range, usize::MAX, false, &Ask::default())?;
        let row = answer["rows"].as_array().and_then(|rows| {
            rows.iter().find(|r| window == GLOBAL || (r["window"]["start"] == json!(window.start) && r["window"]["end"] == json!(window.end)))
        });
        let Some(Json::Object(values)) = row.map(|r| r["values"].clone()) else {
            return Ok(vec![]);
        };
        Ok(values
            .into_iter()
            .filter(|(k, _)| k != "numerator" && k != "denominator")
            .filter_map(|(k, v)| v.as_f64().or_else(|| v["estimate"].as_f64()).map(|x| (k, x)))
            .collect())
    }

    /// One merged value per key over every slice starting in `range` — e.g. the UV of the
    /// last 6 hours from per-slice sketches. `last_ms` instead means the span of that length
    /// ending at the latest event time seen (so the freshest, still-open slices count too).
    pub fn span(&self, name: &str, key: Option<&str>, range: Range, last_ms: Option<i64>, sketches: bool, ask: &Ask) -> Result<Json, QueryError> {
        let (_, m) = self.metric(name)?;
        let group = key.map(|k| self.group_bytes(m, k)).transpose()?;
        let global = m.window.kind == WindowKind::Global;
        // Where the span starts: at `from`'s slice, `last` before the latest event time, or
        // (unbounded) at the first slice kept on every partition — those two need the
        // partitions' positions first. A partition may expire further meanwhile: then the
        // start is refused (410), or for an unbounded span looked up once more.
        let mut attempts = 0;
        let (cov, merged, bounds) = loop {
            attempts += 1;
            let lo = match (global, range.from, last_ms) {
                (true, ..) => GLOBAL.start,
                (false, Some(f), None) => m.window.slice_start(f),
                (false, _, Some(len)) => {
                    let latest =
                        self.gather(m.source, vec![], ask)?.cov.latest_event.ok_or_else(|| bad("last", "the metric has seen no records yet"))?;
                    m.window.slice_start(latest.saturating_sub(len))
                }
                (false, None, None) => self.gather(m.source, vec![], ask)?.cov.retained_from(m).unwrap_or(i64::MIN),
            };
            let hi = if global { GLOBAL.start + 1 } else { range.to.unwrap_or(i64::MAX) };
            let r = MetricRead { merged: true, ..read(m, lo, hi, group.as_deref(), false) };
            let Gathered { cov, merged } = self.gather(m.source, vec![r], ask)?;
            match cov.check_retained(m, lo) {
                Err(_) if attempts < 3 && range.from.is_none() && last_ms.is_none() => continue,
                Err(e) => return Err(e),
                Ok(()) => break (cov, Arc::clone(&merged), merged.bounds[0]),
            }
        };
        let mut rows = Vec::new();
        for (g, slices) in &merged.partials[0] {
            let mut acc: Option<Vec<AggState>> = None;
            for st in slices.values() {
                accumulate(&mut acc, st)?;
            }
            if let Some(states) = acc {
                rows.push(json!({ "key": Self::key_json(m, g), "values": Self::values_json(m, &states, sketches) }));
            }
        }
        let covered = bounds.map_or(Json::Null, |(start, end)| json!({ "start": start, "end": end }));
        Ok(json!({ "metric": m.name, "coverage": cov.to_json(), "span": covered, "rows": rows }))
    }

    /// The `n` keys with the highest value of `aggregate` in the window as of `at` (default:
    /// the newest slice with data; see `current_window`); for a `top_n` aggregate, its own list.
    pub fn top(&self, name: &str, n: usize, at: Option<i64>, aggregate: Option<&str>, ask: &Ask) -> Result<Json, QueryError> {
        let (_, m) = self.metric(name)?;
        let ai = match aggregate {
            None => 0,
            Some(a) => m.aggregates.iter().position(|x| x.name == a).ok_or_else(|| {
                let names: Vec<&str> = m.aggregates.iter().map(|a| a.name.as_str()).collect();
                bad("aggregate", format!("`{a}` is not an aggregate of `{}`; it has {names:?}", m.name))
            })?,
        };
        let w = match at {
            Some(t) => Self::current_window(m, t),
            // The newest kept data: of the windows holding it, the first ending one still kept.
            None => {
                let (cov, newest) = self.newest_slice(m, ask)?;
                let w = newest.and_then(|s| {
                    let mut ws = m.window.windows_containing(s);
                    ws.sort_by_key(|w| w.end);
                    ws.into_iter().find(|w| cov.check_retained(m, w.start).is_ok())
                });
                let Some(w) = w else {
                    return Ok(json!({ "metric": m.name, "coverage": cov.to_json(), "window": Json::Null, "top": [] }));
                };
                w
            }
        };
        let (lo, hi) = if w == GLOBAL { (GLOBAL.start, GLOBAL.start + 1) } else { (w.start, w.end) };
        let Gathered { cov, merged } = self.gather(m.source, vec![read(m, lo, hi, None, false)], ask)?;
        cov.check_retained(m, w.start)?;
        let partials = &merged.partials[0];
        let spec = &m.aggregates[ai];
        let top = if let AggKind::TopN { .. } = spec.kind {
            let mut acc: Option<AggState> = None;
            for slices in partials.values() {
                if let Some(st) = Self::window_states(w, slices)? {
                    match &mut acc {
                        None => acc = Some(st[ai].clone()),
                        Some(a) => a.merge(&st[ai]).map_err(|e| bad("aggregate", e.to_string()))?,
                    }
                }
            }
            let mut list = acc.map_or(json!([]), |a| a.to_json(&spec.kind));
            if let Json::Array(items) = &mut list {
                items.truncate(n);
            }
            list
        } else {
            let ranked = Self::rank_groups(m, w, ai, partials, n)?;
            Json::Array(ranked.into_iter().map(|(item, st)| json!({ "item": item, "value": st.to_json(&spec.kind) })).collect())
        };
        Ok(
            json!({ "metric": m.name, "aggregate": spec.name, "coverage": cov.to_json(), "window": Self::window_json(m.grace_ms, w, cov.watermark), "top": top }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Forty partitions' sketches merged as a tree equal, in the canonical encoding, the
    /// same merged one after another: while they stay sparse, and once the union turns dense.
    #[test]
    fn sketches_merged_as_a_tree_equal_those_merged_in_turn() {
        use crate::aggregate::sketch::Sketch;
        for per_partition in [40u64, 2_000] {
            let parts: Vec<Vec<AggState>> = (0..40u64)
                .map(|p| {
                    let mut sk = Sketch::new(14).unwrap();
                    // Overlapping ranges: every value is in two partitions.
                    for v in p * per_partition / 2..p * per_partition / 2 + per_partition {
                        sk.insert(v.to_string().as_bytes());
                    }
                    vec![AggState::Distinct(sk), AggState::Count(p)]
                })
                .collect();
            let refs: Vec<&[AggState]> = parts.iter().map(|p| p.as_slice()).collect();
            let tree = merge_all(&refs).unwrap();
            let mut in_turn = parts[0].clone();
            for p in &parts[1..] {
                merge_into(&mut in_turn, p).unwrap();
            }
            let canonical = |states: &[AggState]| match &states[0] {
                AggState::Distinct(sk) => sk.to_canonical(),
                other => panic!("{other:?}"),
            };
            assert_eq!(canonical(&tree), canonical(&in_turn), "{per_partition} values per partition");
            assert_eq!(tree[1], AggState::Count(780));
        }
    }

    #[test]
    fn unavailable_partitions_are_described_once_per_reason() {
        let mut missing: Vec<(i32, Unavailable)> = (0..40).rev().filter(|p| *p != 7).map(|p| (p, Unavailable::NoOwner)).collect();
        missing.push((7, Unavailable::Restoring { restored: 1, total: 2 }));
        let e = QueryError::Unavailable { source_name: "s".into(), missing }.to_string();
        assert!(e.starts_with("40 partitions of source `s` cannot be answered now (0-6, 8-39: no live replica owns it"), "{e}");
        assert!(e.contains("; 7: being restored (1 of 2 changelog records))"), "{e}");
        assert_eq!(runs(&[0, 2, 3, 4, 9]), "0, 2-4, 9");
    }
}
