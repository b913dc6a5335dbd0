//! Results out: each metric's window rows, merged over every partition, as records for the
//! result topic — a row per key and window once the window has closed (`emit = "final"`),
//! or every time a flush changes it (`emit = "updates"`).
//!
//! # Where the rows come from
//!
//! No replica owns every partition, but the changelogs hold every partition's partial
//! aggregates and, after each flush's changes, its position with its watermark. A
//! [`ResultView`] is a store fed with all of them, answered by the same [`QueryEngine`] as
//! the HTTP API, so a result row is exactly what a query over all partitions answers.
//!
//! A window is closed when its end + grace is at or before the *lowest* partition watermark
//! (the frontier): a partition's position record follows that flush's changes in its
//! changelog, so once every partition's record past the window has been read, every change
//! to the window has been too, and no partition accepts more records for it.
//!
//! # Why a row is never wrong
//!
//! Rows are deterministic (merging partials does not depend on order, sketches are
//! canonical), so a row sent twice — after a crash, or by the next replica that builds the
//! view — carries the same value and an idempotent upsert downstream is unaffected. A value
//! can only go missing from the view, never change: partitions tombstone expired slices,
//! and compaction may then drop the value. So the view ignores tombstones (it prunes closed
//! windows itself, so a partition running ahead and expiring early takes nothing away), and
//! leaves out — counted, never sent short — windows over a slice whose tombstone arrived
//! without a value, and windows some partition may have expired before the view was built
//! (when compaction may have removed value and tombstone both).
//!
//! ```
//! # use std::sync::Arc;
//! use tally::config::Config;
//! use tally::results::ResultView;
//! use tally::topology::Topology;
//! let cfg = Config::from_toml_str(r#"
//!     [kafka]
//!     bootstrap_servers = "127.0.0.1:9092"
//!     application_id = "doc"
//!     [[sources]]
//!     name = "s"
//!     topic = "t"
//!     event_time = { field = "ts", kind = "epoch_millis" }
//!     [[metrics]]
//!     name = "clicks"
//!     source = "s"
//!     aggregates = ["count"]
//!     window = { type = "tumbling", size = "1m" }
//! "#).unwrap();
//! let dir = tempfile::tempdir().unwrap();
//! let mut view = ResultView::open(Arc::new(Topology::compile(&cfg).unwrap()), dir.path(), &[2]).unwrap();
//! // Nothing read yet: no partition has a watermark, so nothing is closed.
//! assert!(view.take().unwrap().is_empty());
//! ```

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use crate::config::Emit;
use crate::ownership::{Ownership, PartitionState};
use crate::query::{Ask, QueryEngine, QueryError, Range, WindowRow, WindowRows};
use crate::store::{parse_key, KeyRef, PartitionMeta, Store, StoreError};
use crate::task::NO_WATERMARK;
use crate::topology::Topology;
use crate::window::{WindowKind, GLOBAL};

/// Why the view failed.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// The view's store.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Answering from the view.
    #[error(transparent)]
    Query(#[from] QueryError),
}

/// One record for the result topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultRecord {
    /// The output it is a row of: a metric index, or the number of metrics plus a ratio
    /// index (see [`ResultView::output_name`]).
    pub metric: usize,
    /// JSON `{"metric", "key", "window"}`: what a sink upserts on.
    pub key: Vec<u8>,
    /// JSON `{"metric", "key", "window", "values", "final"}`.
    pub value: Vec<u8>,
}

/// What the view has read and left out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViewStats {
    /// Changelog records applied.
    pub applied: u64,
    /// Records ignored: tombstones (the view prunes by itself), values for windows already
    /// closed and pruned, foreign keys or formats.
    pub ignored: u64,
}

/// One row source: a metric or a ratio (by index into the topology's lists).
#[derive(Debug, Clone, Copy)]
enum Output {
    Metric(usize),
    Ratio(usize),
}

/// Every partition's state of every source, read from the changelogs, and the rows it owes
/// the result topic.
pub struct ResultView {
    topo: Arc<Topology>,
    store: Store,
    engine: QueryEngine,
    partitions: Vec<i32>,
    metric_index: HashMap<String, usize>,
    source_index: HashMap<String, usize>,
    /// Per metric: the grace after which every output reading it (itself, the ratios of
    /// it) has closed a window, so its slices may leave the view.
    prune_grace: Vec<i64>,
    /// Per metric: whether some output sends its updates.
    wants_updates: Vec<bool>,
    /// Per source: the frontier up to which final rows have been sent.
    sent: Vec<Option<i64>>,
    /// Per source: the frontier of the last [`ResultView::take`], sent once committed.
    taken: Vec<Option<i64>>,
    /// Per source, once the view has read the changelogs as they were when it started (see
    /// [`ResultView::caught_up`]): the highest watermark read by then. Windows past their
    /// retention at it may have lost values to compaction before this view read them.
    built_at: Option<Vec<Option<i64>>>,
    /// Per output: windows ending up to here were answered at the last take. A cumulative
    /// span's later steps are answered once the latest event time reaches them or they
    /// close, with no record added: their `updates` rows are owed then.
    listed_until: Vec<Option<i64>>,
    /// Per metric: (slice, first window end, group) changed since the last take.
    touched: Vec<BTreeSet<(i64, i64, Vec<u8>)>>,
    /// Per metric: slices whose data this view is missing (tombstone without a value).
    incomplete: Vec<BTreeSet<i64>>,
    /// Per output (metrics, then ratios): windows left out as possibly incomplete.
    pub skipped: Vec<u64>,
    /// What was read.
    pub stats: ViewStats,
}

impl ResultView {
    /// A view in `dir`, emptied first (it is rebuilt from the changelogs), over sources with
    /// `partitions[s]` partitions each.
    pub fn open(topo: Arc<Topology>, dir: &Path, partitions: &[i32]) -> Result<ResultView, ResultsError> {
        let _ = std::fs::remove_dir_all(dir);
        // Small: the view holds one row per window, and is read by the emitter only.
        let store = Store::open_with_cache(dir, 16 << 20)?;
        let owned = Arc::new(Ownership::default());
        for (s, &n) in partitions.iter().enumerate() {
            for p in 0..n {
                owned.set(s, p, PartitionState::Active);
            }
        }
        let engine = QueryEngine::local(Arc::clone(&topo), store.clone(), owned).keeping_expired();
        let n = topo.metrics.len();
        let mut prune_grace: Vec<i64> = topo.metrics.iter().map(|m| m.grace_ms).collect();
        let mut wants_updates: Vec<bool> = topo.metrics.iter().map(|m| m.emit == Emit::Updates).collect();
        for d in &topo.derived {
            for side in [d.numerator.0, d.denominator.0] {
                prune_grace[side] = prune_grace[side].max(d.grace_ms);
                wants_updates[side] |= d.emit == Emit::Updates;
            }
        }
        Ok(ResultView {
            metric_index: topo.metrics.iter().enumerate().map(|(i, m)| (m.name.clone(), i)).collect(),
            source_index: topo.sources.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect(),
            sent: vec![None; topo.sources.len()],
            taken: vec![None; topo.sources.len()],
            built_at: None,
            listed_until: vec![None; n + topo.derived.len()],
            touched: vec![BTreeSet::new(); n],
            incomplete: vec![BTreeSet::new(); n],
            skipped: vec![0; n + topo.derived.len()],
            partitions: partitions.to_vec(),
            prune_grace,
            wants_updates,
            topo,
            store,
            engine,
            stats: ViewStats::default(),
        })
    }

    /// The name of output `i` (as [`ResultRecord::metric`] and [`ResultView::skipped`] count).
    pub fn output_name(&self, i: usize) -> &str {
        match self.topo.metrics.get(i) {
            Some(m) => &m.name,
            None => &self.topo.derived[i - self.topo.metrics.len()].name,
        }
    }

    /// Applies one changelog record (store key, value; `None`: tombstone).
    pub fn apply(&mut self, key: &[u8], value: Option<&[u8]>) -> Result<(), ResultsError> {
        let applied = match parse_key(key) {
            Some(KeyRef::Meta { source, .. }) if self.source_index.contains_key(source) => match value {
                Some(v) if PartitionMeta::decode(key, v).is_ok() => {
                    self.store.put_encoded(key, Some(v))?;
                    true
                }
                _ => false,
            },
            Some(KeyRef::State { metric, at }) => match (self.metric_index.get(metric).copied(), value) {
                (Some(m), _) if self.prune_cut(m).is_some_and(|cut| at.slice < cut) => false,
                (Some(m), None) => {
                    if !self.store.contains(key)? {
                        self.incomplete[m].insert(at.slice);
                    }
                    false
                }
                (Some(m), Some(v)) if crate::migrations::upcast_state(v).is_ok() => {
                    self.store.put_encoded(key, Some(v))?;
                    if self.wants_updates[m] {
                        self.touched[m].insert((at.slice, at.from_end, at.group.to_vec()));
                    }
                    true
                }
                _ => false,
            },
            _ => false,
        };
        if applied {
            self.stats.applied += 1;
        } else {
            self.stats.ignored += 1;
        }
        Ok(())
    }

    /// Records that the view has read every changelog to where it ended when the view was
    /// opened: what it lacks of windows already past their retention then, compaction may
    /// have taken, so those are left out; everything read from here on is complete. (The
    /// first [`ResultView::take`] calls it if nobody has.)
    pub fn caught_up(&mut self) -> Result<(), ResultsError> {
        let highest = (0..self.topo.sources.len()).map(|s| Ok(self.watermarks(s)?.1)).collect::<Result<_, ResultsError>>()?;
        self.built_at = Some(highest);
        Ok(())
    }

    /// The lowest and the highest watermark over `source`'s partitions (the lowest is
    /// `None` while any partition has none).
    fn watermarks(&self, source: usize) -> Result<(Option<i64>, Option<i64>), ResultsError> {
        let metas = self.store.partitions(&self.topo.sources[source].name)?;
        let known: Vec<i64> = metas.iter().map(|(_, m)| m.watermark).filter(|w| *w != NO_WATERMARK).collect();
        let lowest = if (known.len() as i32) < self.partitions[source] { None } else { known.iter().copied().min() };
        Ok((lowest, known.into_iter().max()))
    }

    /// Slices of metric `m` before this belong only to windows already sent closed.
    fn prune_cut(&self, m: usize) -> Option<i64> {
        let metric = &self.topo.metrics[m];
        self.sent[metric.source].and_then(|f| metric.window.expired_before(f, self.prune_grace[m]))
    }

    /// The rows owed since the last take: final rows of windows closed since, and updated
    /// rows of everything changed since. Send them, then [`ResultView::commit`].
    pub fn take(&mut self) -> Result<Vec<ResultRecord>, ResultsError> {
        if self.built_at.is_none() {
            self.caught_up()?;
        }
        let mut out = Vec::new();
        let outputs: Vec<(Output, Emit)> = (0..self.topo.metrics.len())
            .map(|i| (Output::Metric(i), self.topo.metrics[i].emit))
            .chain(self.topo.derived.iter().enumerate().map(|(i, d)| (Output::Ratio(i), d.emit)))
            .collect();
        let mut held = Vec::new();
        for s in 0..self.topo.sources.len() {
            // A metric being rebuilt holds its source's final rows back (none is skipped:
            // the frontier waits), and its updates until its rebuilt states come in.
            if self.rebuilding(s)? {
                held.push(s);
                continue;
            }
            let since = self.sent[s];
            let Some(f) = self.watermarks(s)?.0.filter(|&f| since.is_none_or(|e| f > e)) else { continue };
            for &(o, emit) in &outputs {
                if emit == Emit::Final && self.topo.metrics[self.base(o)].source == s {
                    self.final_rows(o, since, f, &mut out)?;
                }
            }
            self.taken[s] = Some(f);
        }
        for &(o, emit) in &outputs {
            if emit == Emit::Updates && !held.contains(&self.topo.metrics[self.base(o)].source) {
                self.updated_rows(o, &mut out)?;
            }
        }
        for t in &mut self.touched {
            t.clear();
        }
        Ok(out)
    }

    /// Whether a metric of `source` is being rebuilt on some partition, by the view's positions.
    fn rebuilding(&self, source: usize) -> Result<bool, ResultsError> {
        let metas = self.store.partitions(&self.topo.sources[source].name)?;
        let metrics = self.topo.metrics.iter().filter(|m| m.source == source && m.rebuild.is_some());
        Ok(metrics.into_iter().any(|m| metas.iter().any(|(_, meta)| crate::layout::rebuild_pending(m, meta).is_some())))
    }

    /// Records that the last take's rows were sent: its windows are done, and their slices
    /// leave the view.
    pub fn commit(&mut self) -> Result<(), ResultsError> {
        let mut moved = vec![false; self.topo.sources.len()];
        for ((taken, sent), moved) in self.taken.iter_mut().zip(&mut self.sent).zip(&mut moved) {
            if let Some(f) = taken.take() {
                *sent = Some(f);
                *moved = true;
            }
        }
        // Only a source whose frontier moved has windows to drop.
        for m in (0..self.topo.metrics.len()).filter(|&m| moved[self.topo.metrics[m].source]) {
            let Some(cut) = self.prune_cut(m) else { continue };
            for p in 0..self.partitions[self.topo.metrics[m].source] {
                for k in self.store.keys_before(&self.topo.metrics[m].name, p, cut)? {
                    self.store.put_encoded(&k, None)?;
                }
            }
            self.incomplete[m] = self.incomplete[m].split_off(&cut);
        }
        Ok(())
    }

    /// The frontier up to which final rows of `source` have been sent.
    pub fn sent_frontier(&self, source: usize) -> Option<i64> {
        self.sent[source]
    }

    /// The metric an output's windows and keys are those of.
    fn base(&self, o: Output) -> usize {
        match o {
            Output::Metric(m) => m,
            Output::Ratio(d) => self.topo.derived[d].numerator.0,
        }
    }

    fn index(&self, o: Output) -> usize {
        match o {
            Output::Metric(m) => m,
            Output::Ratio(d) => self.topo.metrics.len() + d,
        }
    }

    /// The grace after which output `o`'s windows are closed.
    fn grace(&self, o: Output) -> i64 {
        match o {
            Output::Metric(m) => self.topo.metrics[m].grace_ms,
            Output::Ratio(d) => self.topo.derived[d].grace_ms,
        }
    }

    /// The metrics output `o` reads.
    fn sides(&self, o: Output) -> Vec<usize> {
        match o {
            Output::Metric(m) => vec![m],
            Output::Ratio(d) => vec![self.topo.derived[d].numerator.0, self.topo.derived[d].denominator.0],
        }
    }

    /// Whether window `[start, end)` of output `o` may lack values: it spans a slice whose
    /// data the view is missing, or some partition may have expired it before the view was
    /// built.
    fn incomplete(&self, o: Output, start: i64, end: i64) -> bool {
        self.sides(o).into_iter().any(|m| {
            let metric = &self.topo.metrics[m];
            let w = crate::window::Window { start, end };
            let before_view = self.built_at.as_ref().and_then(|b| b[metric.source]).is_some_and(|h| metric.window.expired(w, h, metric.retention_ms));
            before_view || self.incomplete[m].range(start..end).next().is_some()
        })
    }

    /// Rows of windows of `o` closing in `(since, f]`.
    fn final_rows(&mut self, o: Output, since: Option<i64>, f: i64, out: &mut Vec<ResultRecord>) -> Result<(), ResultsError> {
        let grace = self.grace(o);
        let range = Range { from: since.map(|e| e.saturating_sub(grace)), to: Some(f.saturating_sub(grace)) };
        let rows = self.rows(o, range)?;
        for row in &rows.rows {
            let Some((start, end)) = bounds(row) else { continue };
            let close = end.saturating_add(grace);
            if since.is_some_and(|e| close <= e) || close > f {
                continue;
            }
            if self.incomplete(o, start, end) {
                let i = self.index(o);
                self.skipped[i] += 1;
                continue;
            }
            out.push(self.record(o, &rows, row, true));
        }
        Ok(())
    }

    /// Where `o`'s answered windows end now: for a cumulative window, up to the step of the
    /// latest event time, or the last closed one if later (see
    /// [`crate::window::WindowSpec::windows_of_slices`]); `None` for other windows.
    fn listed_to(&self, o: Output) -> Result<Option<i64>, ResultsError> {
        let m = &self.topo.metrics[self.base(o)];
        if !matches!(m.window.kind, WindowKind::Cumulate { .. }) {
            return Ok(None);
        }
        let metas = self.store.partitions(&self.topo.sources[m.source].name)?;
        let Some(latest) = metas.iter().map(|(_, p)| p.max_event_time).filter(|t| *t != NO_WATERMARK).max() else { return Ok(None) };
        let reached = m.window.slice_end(m.window.slice_start(latest));
        let closed = self.watermarks(m.source)?.0.map_or(i64::MIN, |wm| wm.saturating_sub(self.grace(o)));
        Ok(Some(reached.max(closed)))
    }

    /// Rows of `o` in the windows holding the slices changed since the last take, and of
    /// cumulative windows answered since.
    fn updated_rows(&mut self, o: Output, out: &mut Vec<ResultRecord>) -> Result<(), ResultsError> {
        let sides = self.sides(o);
        let m = &self.topo.metrics[self.base(o)];
        let mut wanted: HashSet<(Option<i64>, &[u8])> = HashSet::new();
        let (mut lo, mut hi) = (i64::MAX, i64::MIN);
        let listed = self.listed_to(o)?;
        let newly = match (self.listed_until[self.index(o)], listed) {
            (Some(before), Some(now)) if now > before => Some((before, now)),
            _ => None,
        };
        if let Some((before, now)) = newly {
            lo = before.saturating_sub(m.window.reach_ms());
            hi = now;
        }
        for &side in &sides {
            for (slice, from_end, group) in &self.touched[side] {
                for w in m.window.windows_containing(*slice).into_iter().filter(|w| w.end >= *from_end) {
                    lo = lo.min(w.start);
                    hi = hi.max(w.end);
                    wanted.insert(((m.window.kind != WindowKind::Global).then_some(w.start), group.as_slice()));
                }
            }
        }
        let i = self.index(o);
        if wanted.is_empty() && newly.is_none() {
            self.listed_until[i] = listed;
            return Ok(());
        }
        let range = if m.window.kind == WindowKind::Global { Range::default() } else { Range { from: Some(lo), to: Some(hi) } };
        let rows = self.rows(o, range)?;
        let mut owed = Vec::new();
        for row in &rows.rows {
            let window = bounds(row);
            let new = window.zip(newly).is_some_and(|((_, end), (before, now))| end > before && end <= now);
            if !new && !wanted.contains(&(window.map(|b| b.0), row.group.as_slice())) {
                continue;
            }
            if window.is_some_and(|(start, end)| self.incomplete(o, start, end)) {
                self.skipped[i] += 1;
                continue;
            }
            owed.push(self.record(o, &rows, row, row.closed));
        }
        self.listed_until[i] = listed;
        out.append(&mut owed);
        Ok(())
    }

    fn rows(&self, o: Output, range: Range) -> Result<WindowRows, ResultsError> {
        let name = match o {
            Output::Metric(m) => &self.topo.metrics[m].name,
            Output::Ratio(d) => &self.topo.derived[d].name,
        };
        Ok(self.engine.window_rows(name, None, range, usize::MAX, &Ask::default())?)
    }

    fn record(&self, o: Output, rows: &WindowRows, row: &WindowRow, is_final: bool) -> ResultRecord {
        let i = self.index(o);
        let name = self.output_name(i);
        let window = match bounds(row) {
            Some((start, end)) => json!({ "start": start, "end": end }),
            None => json!({ "global": true }),
        };
        let m = &self.topo.metrics[rows.metric];
        let key_json = QueryEngine::key_json(m, &row.group);
        let values = self.engine.values_of(m, &row.values, false);
        let key = json!({ "metric": name, "key": key_json, "window": window });
        let value = json!({ "metric": name, "key": key_json, "window": window, "values": values, "final": is_final });
        ResultRecord { metric: i, key: key.to_string().into_bytes(), value: value.to_string().into_bytes() }
    }
}

/// A row's window as (start, end); `None` for the global window.
fn bounds(row: &WindowRow) -> Option<(i64, i64)> {
    (row.window != GLOBAL).then_some((row.window.start, row.window.end))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::changelog::{Change, ChangeSink, ChangelogError};
    use crate::task::TaskSet;
    use serde_json::Value as Json;

    /// A changelog record: store key, value (`None`: tombstone).
    type Record = (Vec<u8>, Option<Vec<u8>>);
    /// Per (window start s, key): count, sum, ones.
    type Rows = BTreeMap<(i64, String), (i64, i64, i64)>;

    /// Two partitions' changelogs as lists, as the broker would keep them (no compaction).
    /// And the offsets of the last flush's position records, acknowledged at once.
    #[derive(Default)]
    struct Log(Vec<Vec<Record>>, Vec<i64>);

    impl ChangeSink for Log {
        fn send(&mut self, changes: &[Change], positions: &[Change]) -> Result<(), ChangelogError> {
            for (i, c) in changes.iter().chain(positions).enumerate() {
                let log = &mut self.0[c.partition as usize];
                log.push((c.key.clone(), c.value.clone()));
                if i >= changes.len() {
                    self.1.push(log.len() as i64 - 1);
                }
            }
            Ok(())
        }

        fn acknowledged(&mut self, _: std::time::Duration) -> Result<Option<Vec<i64>>, ChangelogError> {
            Ok(Some(std::mem::take(&mut self.1)))
        }
    }

    fn topo() -> Arc<Topology> {
        crate::topology::test_topology(
            r#"
            [[metrics]]
            name = "per_min"
            source = "s"
            group_by = ["k"]
            aggregates = ["count", "sum(v) as total"]
            window = { type = "tumbling", size = "1m" }
            [[metrics]]
            name = "ones_per_min"
            source = "s"
            filter = "v = 1"
            group_by = ["k"]
            aggregates = ["count"]
            window = { type = "tumbling", size = "1m" }
            emit = "none"
            [[metrics]]
            name = "ones"
            source = "s"
            filter = "v = 1"
            aggregates = ["count"]
            window = { type = "global" }
            emit = "updates"
            [[derived]]
            name = "share"
            ratio = { numerator = "ones_per_min", denominator = "per_min" }
        "#,
        )
    }

    /// Event `i` of a partition: seconds 0..600, every 7th 15 s out of order (some late).
    fn event(i: i64) -> (i64, String, i64) {
        let ts = if i % 7 == 0 { (i - 15).max(0) } else { i };
        (ts, ["a", "b", "c"][(i % 3) as usize].to_string(), i % 2)
    }

    /// Exact answers: per (window start s, key) → (count, sum, ones), over records not late
    /// (slice end <= the partition's watermark before them), and all ones (a global window
    /// is never late).
    fn truth(per_partition: i64) -> (Rows, i64) {
        let mut rows = Rows::new();
        let mut ones = 0;
        for _ in 0..2 {
            let mut wm = i64::MIN;
            for i in 0..per_partition {
                let (ts, k, v) = event(i);
                let start = ts.div_euclid(60) * 60;
                if (start + 60) * 1000 > wm {
                    let r = rows.entry((start, k)).or_default();
                    r.0 += 1;
                    r.1 += v;
                    r.2 += v;
                }
                ones += v;
                wm = wm.max((ts - 10) * 1000);
            }
        }
        (rows, ones)
    }

    /// A view built after partition 0 has run ahead sends every window that closes later:
    /// nothing of them was past retention (a cumulative span expires whole), so nothing of
    /// them can have been compacted away.
    #[test]
    fn a_rebuilt_view_sends_the_windows_it_owes() {
        let topo = crate::topology::test_topology(
            r#"
            [[metrics]]
            name = "run"
            source = "s"
            aggregates = ["count"]
            window = { type = "cumulate", step = "1m", max = "10m" }
            retention = "1m"
        "#,
        );
        let dir = tempfile::tempdir().unwrap();
        let mut tasks = TaskSet::new(Arc::clone(&topo), Store::open(&dir.path().join("state")).unwrap());
        tasks.assign(0, 0).unwrap();
        tasks.assign(0, 1).unwrap();
        let mut log = Log(vec![Vec::new(), Vec::new()], Vec::new());
        let mut offsets = [0i64; 2];
        let mut send = |tasks: &mut TaskSet, p: i32, ts: i64| {
            tasks.process(0, p, offsets[p as usize], None, format!(r#"{{"ts":{ts}}}"#).as_bytes()).unwrap();
            offsets[p as usize] += 1;
        };
        for m in 0..9 {
            send(&mut tasks, 0, m * 60 + 1);
        }
        send(&mut tasks, 1, 1);
        send(&mut tasks, 1, 180);
        tasks.flush(Some(&mut log)).unwrap();
        tasks.flush(Some(&mut log)).unwrap();
        // Built now, with partition 0's watermark at 471 s and partition 1's at 170 s.
        let mut view = ResultView::open(Arc::clone(&topo), &dir.path().join("view"), &[2]).unwrap();
        let mut read = [0usize; 2];
        let mut sent: Vec<Json> = Vec::new();
        let mut pump = |view: &mut ResultView, log: &Log, sent: &mut Vec<Json>| {
            for (part, read) in log.0.iter().zip(read.iter_mut()) {
                for (k, v) in &part[*read..] {
                    view.apply(k, v.as_deref()).unwrap();
                }
                *read = part.len();
            }
            sent.extend(view.take().unwrap().iter().map(|r| serde_json::from_slice::<Json>(&r.value).unwrap()));
            view.commit().unwrap();
        };
        pump(&mut view, &log, &mut sent);
        // Both partitions move on to 540 s and beyond: the steps ending at 4 to 8 minutes
        // close now.
        send(&mut tasks, 0, 550);
        send(&mut tasks, 1, 540);
        tasks.flush(Some(&mut log)).unwrap();
        pump(&mut view, &log, &mut sent);
        sent.sort_by_key(|v| v["window"]["end"].as_i64());
        let ends: Vec<i64> = sent.iter().map(|v| v["window"]["end"].as_i64().unwrap() / 60_000).collect();
        assert_eq!(ends, (1..=8).collect::<Vec<_>>(), "a final row for each closed step; left out: {:?}", view.skipped);
        // Step k holds partition 0's k records, partition 1's at 1 s, and from step 4 on its one at 180 s.
        let counts: Vec<i64> = sent.iter().map(|v| v["values"]["count"].as_i64().unwrap()).collect();
        assert_eq!(counts, (1..=8).map(|k| k + 1 + i64::from(k >= 4)).collect::<Vec<_>>());
    }

    /// Partition 0 runs four times ahead of partition 1, far enough to expire (tombstone)
    /// windows partition 1 has not closed: final rows must still hold both partitions' part.
    #[test]
    fn final_rows_equal_a_recomputation_while_partitions_drift_apart() {
        const N: i64 = 600;
        let topo = topo();
        let dir = tempfile::tempdir().unwrap();
        let mut tasks = TaskSet::new(Arc::clone(&topo), Store::open(&dir.path().join("state")).unwrap());
        tasks.assign(0, 0).unwrap();
        tasks.assign(0, 1).unwrap();
        let mut log = Log(vec![Vec::new(), Vec::new()], Vec::new());
        let mut view = ResultView::open(Arc::clone(&topo), &dir.path().join("view"), &[2]).unwrap();
        let (mut next, mut read) = ([0i64; 2], [0usize; 2]);
        let mut sent: Vec<Json> = Vec::new();
        while next[1] < N {
            for (p, step) in [(0, 40), (1, 10)] {
                for _ in 0..step {
                    if next[p] < N {
                        let (ts, k, v) = event(next[p]);
                        let payload = format!(r#"{{"ts":{ts},"k":"{k}","v":{v}}}"#);
                        tasks.process(0, p as i32, next[p], None, payload.as_bytes()).unwrap();
                        next[p] += 1;
                    }
                }
            }
            tasks.flush(Some(&mut log)).unwrap();
            // Partition 1's records are read first: the view sees the partitions in no
            // particular order.
            for p in [1, 0] {
                for (k, v) in &log.0[p][read[p]..] {
                    view.apply(k, v.as_deref()).unwrap();
                }
                read[p] = log.0[p].len();
            }
            for r in view.take().unwrap() {
                let key: Json = serde_json::from_slice(&r.key).unwrap();
                let value: Json = serde_json::from_slice(&r.value).unwrap();
                assert_eq!((&key["metric"], &key["key"], &key["window"]), (&value["metric"], &value["key"], &value["window"]));
                sent.push(value);
            }
            view.commit().unwrap();
        }
        let tombstones = log.0[0].iter().filter(|(_, v)| v.is_none()).count();
        assert!(tombstones > 0, "partition 0 must have expired windows ahead of partition 1");

        let (want, ones) = truth(N);
        // Both partitions end at 599 s: watermark 589 s, so windows ending by 540 s closed.
        let closed: BTreeMap<_, _> = want.iter().filter(|((s, _), _)| (s + 60) * 1000 <= 589_000).collect();
        let mut finals: BTreeMap<(String, i64, String), &Json> = BTreeMap::new();
        for v in sent.iter().filter(|v| v["final"] == json!(true)) {
            let k = (
                v["metric"].as_str().unwrap().to_string(),
                v["window"]["start"].as_i64().unwrap() / 1000,
                v["key"]["k"].as_str().unwrap().to_string(),
            );
            assert!(finals.insert(k.clone(), v).is_none(), "one final row per key and window: {k:?}");
        }
        assert_eq!(finals.len(), 2 * closed.len(), "a final row of per_min and of share for every closed window and key");
        for ((start, k), (count, sum, n_ones)) in closed {
            let row = finals[&("per_min".to_string(), *start, k.clone())];
            assert_eq!((row["values"]["count"].as_i64(), row["values"]["total"].as_f64()), (Some(*count), Some(*sum as f64)), "per_min {start} {k}");
            assert_eq!(row["window"]["end"].as_i64(), Some((start + 60) * 1000));
            let share = finals[&("share".to_string(), *start, k.clone())];
            assert_eq!(share["values"]["ratio"].as_f64(), Some(*n_ones as f64 / *count as f64), "share {start} {k}");
        }
        let last_ones = sent.iter().rev().find(|v| v["metric"] == json!("ones")).unwrap();
        assert_eq!(last_ones["values"]["count"].as_i64(), Some(ones));
        assert_eq!((&last_ones["window"], &last_ones["final"]), (&json!({ "global": true }), &json!(false)));
        assert!(view.skipped.iter().all(|&n| n == 0), "nothing left out: {:?}", view.skipped);
        assert!(!sent.iter().any(|v| v["metric"] == json!("ones_per_min")), "emit = none sends nothing");

        // A view built later from the same log sends the same final rows again — except
        // those some partition had already expired when it was built: those it leaves out,
        // as compaction could have taken their values.
        let mut again = ResultView::open(Arc::clone(&topo), &dir.path().join("again"), &[2]).unwrap();
        for p in [0, 1] {
            for (k, v) in &log.0[p] {
                again.apply(k, v.as_deref()).unwrap();
            }
        }
        let rebuilt: Vec<Json> =
            again.take().unwrap().iter().map(|r| serde_json::from_slice(&r.value).unwrap()).filter(|v: &Json| v["final"] == json!(true)).collect();
        assert!(!rebuilt.is_empty() && again.skipped[0] > 0, "some rows sent, some left out");
        for v in &rebuilt {
            let k = (
                v["metric"].as_str().unwrap().to_string(),
                v["window"]["start"].as_i64().unwrap() / 1000,
                v["key"]["k"].as_str().unwrap().to_string(),
            );
            assert_eq!(v, finals[&k], "a rebuilt view sends the same row");
        }
        assert_eq!(rebuilt.len() as u64 + again.skipped[0] + again.skipped[3], finals.len() as u64);
    }
}
