//! The reference model: a deliberately naive account of what every answer of tally means,
//! written from the README's semantics section and sharing no code with tally's window,
//! task, query or result code. Per source partition a watermark (the highest event time of
//! its valid records minus the source's delay, raised by idle steps); for each record every
//! window holding its event time, found from the window's lengths and zone; the record
//! counts for a window iff the window's end + grace is after the watermark before it; exact
//! accumulators (sets for distinct counts). Answers — windows, spans, top lists, ratios,
//! result rows — are computed from those on demand.

#![allow(dead_code)]

pub mod check;
pub mod expr;
pub mod spec;
pub mod value;
pub mod zone;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{Datelike, LocalResult, NaiveDate, NaiveDateTime, TimeZone};
use serde_json::Value as Json;

use spec::{Agg, Metric, Source, Spec, TimeSpec, WindowSpec};
use value::Val;

/// No watermark yet.
pub const NONE: i64 = i64::MIN;

/// One step of a source partition's input.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A record at the partition's next offset.
    Record { partition: i32, kafka_ts: Option<i64>, payload: Vec<u8> },
    /// The partition went idle: its watermark rises to at least this.
    Idle { partition: i32, watermark: i64 },
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Invalid(&'static str),
    /// Metric indices it was late for (every window closed) and partly late for.
    Counted {
        late: Vec<usize>,
        partly: Vec<usize>,
    },
}

/// A record a metric's filter let through, with what it counts for.
#[derive(Debug, Clone)]
pub struct Rec {
    pub t: i64,
    pub wm_before: i64,
    pub partition: i32,
    pub offset: i64,
    /// Group key parts (canonical text).
    pub key: Vec<String>,
    /// Per aggregate: the field values it reads (item, by / field).
    pub vals: Vec<(Val, Val)>,
}

/// A partition's event-time progress.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub max_t: i64,
    pub watermark: i64,
}

/// The model, fed with every source's steps.
pub struct Model {
    pub spec: Spec,
    /// Per source: its partition count.
    pub partitions: Vec<i32>,
    /// Per source: partitions' progress.
    pub progress: Vec<BTreeMap<i32, Progress>>,
    /// Per source, per partition: next offset.
    next: Vec<BTreeMap<i32, i64>>,
    /// Per metric: records its filter passed (late ones too: each window decides).
    pub recs: Vec<Vec<Rec>>,
    /// Per source: outcome of each record, in feeding order, with (partition, offset).
    pub outcomes: Vec<Vec<(i32, i64, Outcome)>>,
    /// Per table: key → its versions (partition, offset, timestamp, fields or deleted).
    pub tables: Vec<BTreeMap<String, Vec<Version>>>,
    /// Per source, per partition: the table positions its records joined as of, as
    /// (end offset, pin): records before `end` since the previous entry joined as of `pin`
    /// (per table, per table partition, the next offset visible).
    pub joins: Vec<Joins>,
    /// Per source, per lookup: records whose key was not found.
    pub missing: Vec<Vec<u64>>,
}

/// Per partition of a source, in order: (end offset, pin per table and table partition).
pub type Joins = BTreeMap<i32, Vec<(i64, Vec<Vec<i64>>)>>;

/// One value a table key had from a record on.
#[derive(Debug, Clone)]
pub struct Version {
    pub partition: i32,
    pub offset: i64,
    pub timestamp: i64,
    pub fields: Option<Vec<Val>>,
}

/// The table key a record key stands for (README: a key that is a JSON number or string is
/// that value's text, any other key its text); `None` for no usable key.
pub fn table_key(key: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(key).ok()?.trim();
    let k = match serde_json::from_str::<Json>(text) {
        Ok(v @ (Json::String(_) | Json::Number(_))) => Val::from_json(&v).text(),
        _ => text.to_string(),
    };
    (!k.is_empty()).then_some(k)
}

/// An accumulator of one aggregate over the records counting for one window and key.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    Count(u64),
    /// Micro-units.
    Sum(i128),
    Distinct(BTreeSet<String>, u8),
    Latest(Option<((i64, i32, i64), Val)>),
    TopN(BTreeMap<String, i128>, usize, bool),
}

fn units(v: &Val) -> Option<i128> {
    v.number().filter(|n| n.is_finite() && n.abs() <= 1.0e18).map(|n| (n * 1e6).round() as i128)
}

impl Acc {
    fn new(a: &Agg) -> Acc {
        match a {
            Agg::Count => Acc::Count(0),
            Agg::Sum(_) => Acc::Sum(0),
            Agg::Distinct(_, p) => Acc::Distinct(BTreeSet::new(), *p),
            Agg::Latest(_) => Acc::Latest(None),
            Agg::TopN { n, by, .. } => Acc::TopN(BTreeMap::new(), *n, by.is_some()),
        }
    }

    fn add(&mut self, r: &Rec, i: usize) {
        let (a, b) = &r.vals[i];
        match self {
            Acc::Count(c) => *c += 1,
            Acc::Sum(s) => *s += units(a).unwrap_or(0),
            Acc::Distinct(set, _) => {
                if *a != Val::Null {
                    set.insert(a.text());
                }
            }
            Acc::Latest(l) => {
                let order = (r.t, r.partition, r.offset);
                if *a != Val::Null && l.as_ref().is_none_or(|(o, _)| order > *o) {
                    *l = Some((order, a.clone()));
                }
            }
            Acc::TopN(m, _, by) => {
                if *a == Val::Null {
                    return;
                }
                let add = if *by {
                    match units(b) {
                        Some(u) => u,
                        None => return,
                    }
                } else {
                    1
                };
                *m.entry(a.text()).or_default() += add;
            }
        }
    }

    /// The single number it stands for (ratios, `having`, ranking).
    pub fn number(&self) -> Option<f64> {
        match self {
            Acc::Count(c) => Some(*c as f64),
            Acc::Sum(s) => Some(*s as f64 / 1e6),
            Acc::Distinct(set, p) => Some(check::sketch(set, *p).estimate().round()),
            Acc::Latest(l) => l.as_ref().and_then(|(_, v)| v.to_json().to_string().parse().ok()),
            Acc::TopN(..) => None,
        }
    }

    /// The ranked list of a top-N: (item, total), highest first, ties by item.
    pub fn ranked(m: &BTreeMap<String, i128>, n: usize) -> Vec<(String, i128)> {
        let mut all: Vec<(String, i128)> = m.iter().map(|(k, v)| (k.clone(), *v)).collect();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }
}

/// The value of a field at a dotted path, through aliases.
fn field(src: &Source, obj: &serde_json::Map<String, Json>, name: &str) -> Val {
    let path = src.aliases.get(name).map_or(name, String::as_str);
    let mut parts = path.split('.');
    let mut v = obj.get(parts.next().unwrap());
    for p in parts {
        v = v.and_then(|x| x.get(p));
    }
    v.map_or(Val::Null, Val::from_json)
}

/// Every field name a metric reads: filter, group-by and aggregate fields.
fn names_read(m: &Metric) -> Vec<String> {
    let mut names: Vec<String> = m.group_by.clone();
    names.extend(m.filter.as_ref().map(|f| f.names()).unwrap_or_default());
    for (_, a) in &m.aggs {
        match a {
            Agg::Count => {}
            Agg::Sum(f) | Agg::Distinct(f, _) | Agg::Latest(f) => names.push(f.clone()),
            Agg::TopN { item, by, .. } => names.extend(std::iter::once(item.clone()).chain(by.clone())),
        }
    }
    names
}

fn local_to_utc(tz: chrono_tz::Tz, local: NaiveDateTime) -> Option<i64> {
    match tz.from_local_datetime(&local) {
        LocalResult::Single(t) => Some(t.timestamp_millis()),
        LocalResult::Ambiguous(a, b) => Some(a.timestamp_millis().min(b.timestamp_millis())),
        LocalResult::None => None,
    }
}

/// The event time of a record by its source's rule, or why it has none.
fn event_time(src: &Source, get: &dyn Fn(&str) -> Val, kafka_ts: Option<i64>) -> Result<i64, &'static str> {
    let present = |f: &str| match get(f) {
        Val::Null => Err("missing_event_time"),
        v => Ok(v),
    };
    match &src.time {
        TimeSpec::Seconds { field } | TimeSpec::Millis { field } => {
            let n = present(field)?.number().filter(|n| n.is_finite()).ok_or("bad_event_time")?;
            // Seconds: to the microsecond, then down to the millisecond.
            let ms = if matches!(src.time, TimeSpec::Seconds { .. }) { (n * 1e6).round() / 1e3 } else { n };
            if ms.abs() > 8.0e15 {
                return Err("bad_event_time");
            }
            Ok(ms.floor() as i64)
        }
        TimeSpec::Text { field, format, tz } => {
            let Val::Str(s) = present(field)? else { return Err("bad_event_time") };
            let local = NaiveDateTime::parse_from_str(&s, format)
                .ok()
                .or_else(|| NaiveDate::parse_from_str(&s, format).ok().and_then(|d| d.and_hms_opt(0, 0, 0)))
                .ok_or("bad_event_time")?;
            local_to_utc(*tz, local).ok_or("bad_event_time")
        }
        TimeSpec::Parts { parts, year, tz } => {
            let names = ["year", "month", "day", "hour", "minute", "second"];
            let mut p = [None::<i64>; 6];
            // Parts are read in the order of the names above (so the first missing one is reported).
            for (i, n) in names.iter().enumerate() {
                if let Some((_, f)) = parts.iter().find(|(k, _)| k == n) {
                    let v = present(f)?;
                    let x = v.number().filter(|x| x.fract() == 0.0 && x.abs() < 1.0e6).ok_or("bad_event_time")?;
                    p[i] = Some(x as i64);
                }
            }
            let at = |y: i64| {
                let d = NaiveDate::from_ymd_opt(y as i32, p[1].unwrap_or(1) as u32, p[2].unwrap_or(1) as u32)?;
                local_to_utc(*tz, d.and_hms_opt(p[3].unwrap_or(0) as u32, p[4].unwrap_or(0) as u32, p[5].unwrap_or(0) as u32)?)
            };
            let t = match (p[0], year, kafka_ts) {
                (Some(y), _, _) => at(y),
                (None, Some(y), _) => at(*y as i64),
                (None, None, Some(ts)) => {
                    // The year that puts the time nearest the Kafka timestamp.
                    let y = chrono::DateTime::from_timestamp_millis(ts).unwrap().with_timezone(tz).year() as i64;
                    [y - 1, y, y + 1].into_iter().filter_map(at).min_by_key(|t| (t - ts).abs())
                }
                (None, None, None) => None,
            };
            t.ok_or("bad_event_time")
        }
    }
}

impl Model {
    /// A model of `spec` over sources with `partitions[s]` partitions.
    pub fn new(spec: Spec, partitions: &[i32]) -> Model {
        let (n, m) = (spec.sources.len(), spec.metrics.len());
        Model {
            partitions: partitions.to_vec(),
            progress: vec![BTreeMap::new(); n],
            next: vec![BTreeMap::new(); n],
            recs: vec![Vec::new(); m],
            outcomes: vec![Vec::new(); n],
            tables: vec![BTreeMap::new(); spec.tables.len()],
            joins: vec![BTreeMap::new(); n],
            missing: spec.sources.iter().map(|s| vec![0; s.lookups.len()]).collect(),
            spec,
        }
    }

    /// Feeds one record of table `t`'s topic (`payload` `None`: a tombstone). A record
    /// without a usable key, or whose value is not an object of the declared types, changes
    /// nothing.
    pub fn table_record(&mut self, t: usize, partition: i32, offset: i64, timestamp: i64, key: &[u8], payload: Option<&[u8]>) {
        let Some(key) = table_key(key) else { return };
        let fields = match payload {
            None => None,
            Some(p) => {
                let Ok(Json::Object(obj)) = serde_json::from_slice::<Json>(p) else { return };
                let spec = &self.spec.tables[t];
                let mut vals = Vec::new();
                for f in &spec.fields {
                    let mut v = obj.get(f.split('.').next().unwrap());
                    for part in f.split('.').skip(1) {
                        v = v.and_then(|x| x.get(part));
                    }
                    let v = v.map_or(Val::Null, Val::from_json);
                    let v = match spec.types.iter().find(|(n, _, _)| n == f) {
                        Some((_, _, true)) if v == Val::Null => return,
                        Some((_, ty, _)) if v != Val::Null => match v.typed(*ty) {
                            Some(t) => t,
                            None => return,
                        },
                        _ => v,
                    };
                    vals.push(v);
                }
                Some(vals)
            }
        };
        self.tables[t].entry(key).or_default().push(Version { partition, offset, timestamp, fields });
    }

    /// The fields of `key` in table `t` as of `pin` (README: per table partition the last
    /// version before its pinned offset; of those, the latest timestamp, then the higher
    /// partition).
    pub fn table_at(&self, t: usize, key: &str, pin: &[i64]) -> Option<Vec<Val>> {
        let versions = self.tables[t].get(key)?;
        let visible = |v: &&Version| v.offset < pin.get(v.partition as usize).copied().unwrap_or(0);
        let mut last: BTreeMap<i32, &Version> = BTreeMap::new();
        for v in versions.iter().filter(visible) {
            if last.get(&v.partition).is_none_or(|l| l.offset < v.offset) {
                last.insert(v.partition, v);
            }
        }
        let best = last.values().max_by_key(|v| (v.timestamp, v.partition))?;
        best.fields.clone()
    }

    /// The pin the record at `offset` of `source`'s `partition` joined as of.
    fn pin_of(&self, source: usize, partition: i32, offset: i64) -> &Vec<Vec<i64>> {
        let joins = self.joins[source].get(&partition).unwrap_or_else(|| panic!("no join positions for source {source} partition {partition}"));
        &joins.iter().find(|(end, _)| *end > offset).unwrap_or_else(|| panic!("no join position after offset {offset} of partition {partition}")).1
    }

    /// Feeds one step of source `s`.
    pub fn feed(&mut self, s: usize, step: &Step) {
        match step {
            Step::Idle { partition, watermark } => {
                let p = self.progress[s].entry(*partition).or_insert(Progress { max_t: NONE, watermark: NONE });
                p.watermark = p.watermark.max(*watermark);
            }
            Step::Record { partition, kafka_ts, payload } => {
                let offset = {
                    let o = self.next[s].entry(*partition).or_insert(0);
                    *o += 1;
                    *o - 1
                };
                let outcome = self.record(s, *partition, offset, *kafka_ts, payload);
                self.outcomes[s].push((*partition, offset, outcome));
            }
        }
    }

    fn record(&mut self, s: usize, partition: i32, offset: i64, kafka_ts: Option<i64>, payload: &[u8]) -> Outcome {
        let src = self.spec.sources[s].clone();
        let obj = match serde_json::from_slice::<Json>(payload) {
            Err(_) => return Outcome::Invalid("not_json"),
            Ok(Json::Object(o)) => o,
            Ok(_) => return Outcome::Invalid("not_an_object"),
        };
        // Declared types first, in field-name order; the typed values are what counts.
        let mut typed: BTreeMap<String, Val> = BTreeMap::new();
        for (f, ty, required) in &src.types {
            let v = field(&src, &obj, f);
            if v == Val::Null {
                if *required {
                    return Outcome::Invalid("missing_field");
                }
                continue;
            }
            match v.typed(*ty) {
                Some(t) => {
                    typed.insert(f.clone(), t);
                }
                None => return Outcome::Invalid("wrong_type"),
            }
        }
        let get = |name: &str| typed.get(name).cloned().unwrap_or_else(|| field(&src, &obj, name));
        let t = match event_time(&src, &get, kafka_ts) {
            Ok(t) => t,
            Err(reason) => return Outcome::Invalid(reason),
        };
        if kafka_ts.is_some_and(|ts| t > ts.saturating_add(src.max_ahead_ms)) {
            return Outcome::Invalid("event_time_too_far_ahead");
        }
        // Lookups: `table.field` values, and the lookups whose key was not found.
        let mut looked: BTreeMap<String, Val> = BTreeMap::new();
        let mut skipped: Vec<String> = Vec::new();
        for (li, l) in src.lookups.iter().enumerate() {
            let table = &self.spec.tables[l.table];
            let key = get(&l.key);
            let found = if key == Val::Null { None } else { self.table_at(l.table, &key.text(), &self.pin_of(s, partition, offset)[l.table]) };
            match found {
                Some(vals) => {
                    for (f, v) in table.fields.iter().zip(vals) {
                        looked.insert(format!("{}.{f}", table.name), v);
                    }
                }
                None if l.missing == spec::Missing::DeadLetter => return Outcome::Invalid("lookup_missing"),
                None => {
                    self.missing[s][li] += 1;
                    if l.missing == spec::Missing::Skip {
                        skipped.push(format!("{}.", table.name));
                    }
                }
            }
        }
        let get = |name: &str| looked.get(name).cloned().unwrap_or_else(|| get(name));
        let p = self.progress[s].entry(partition).or_insert(Progress { max_t: NONE, watermark: NONE });
        let wm_before = p.watermark;
        if t > p.max_t {
            p.max_t = t;
            p.watermark = p.watermark.max(t.saturating_sub(src.delay_ms));
        }
        let (mut late, mut partly) = (Vec::new(), Vec::new());
        for (mi, m) in self.spec.metrics.iter().enumerate().filter(|(_, m)| m.source == s) {
            if names_read(m).iter().any(|n| skipped.iter().any(|t| n.starts_with(t.as_str()))) {
                continue;
            }
            if m.filter.as_ref().is_some_and(|f| !f.eval(&get)) {
                continue;
            }
            let windows = zone::windows_containing(m.window, m.tz, t);
            let counted = windows.iter().filter(|w| counts(m, **w, wm_before)).count();
            if counted == 0 {
                late.push(mi);
            } else if counted < windows.len() {
                partly.push(mi);
            }
            let key = m.group_by.iter().map(|g| get(g).text()).collect();
            let vals = m
                .aggs
                .iter()
                .map(|(_, a)| match a {
                    Agg::Count => (Val::Null, Val::Null),
                    Agg::Sum(f) | Agg::Distinct(f, _) | Agg::Latest(f) => (get(f), Val::Null),
                    Agg::TopN { item, by, .. } => (get(item), by.as_deref().map_or(Val::Null, &get)),
                })
                .collect();
            self.recs[mi].push(Rec { t, wm_before, partition, offset, key, vals });
        }
        Outcome::Counted { late, partly }
    }

    /// The watermarks of `source`'s partitions: (lowest, `None` while one has none; highest).
    pub fn watermarks(&self, source: usize) -> (Option<i64>, Option<i64>) {
        let wms: Vec<i64> = (0..self.partitions[source]).map(|p| self.progress[source].get(&p).map_or(NONE, |x| x.watermark)).collect();
        let known: Vec<i64> = wms.iter().copied().filter(|w| *w != NONE).collect();
        let lowest = if known.len() == wms.len() { known.iter().copied().min() } else { None };
        (lowest, known.into_iter().max())
    }

    /// Highest event time of a valid record of `source`.
    pub fn latest_event(&self, source: usize) -> Option<i64> {
        self.progress[source].values().map(|p| p.max_t).filter(|t| *t != NONE).max()
    }

    /// Every window some record of metric `mi` counts for — of a cumulative span, those up
    /// to the step holding the latest event time seen, and those closed (by `grace`: the
    /// metric's, or its ratio's); later ones, still open, repeat the total.
    pub fn windows(&self, mi: usize, grace: i64) -> BTreeSet<(i64, i64)> {
        let m = &self.spec.metrics[mi];
        let reached = match (m.window, self.latest_event(m.source)) {
            (WindowSpec::Cumulate { step, .. }, Some(l)) => zone::cell(m.tz, zone::cell_of(m.tz, l, step), step).1,
            _ => i64::MAX,
        };
        let closed_by = self.watermarks(m.source).0.map_or(i64::MIN, |l| l.saturating_sub(grace));
        let mut out = BTreeSet::new();
        for r in &self.recs[mi] {
            for w in zone::windows_containing(m.window, m.tz, r.t) {
                if counts(m, w, r.wm_before) && (w.1 <= reached || w.1 <= closed_by) {
                    out.insert(w);
                }
            }
        }
        out
    }

    /// Per key, the accumulators of window `w` of metric `mi`.
    pub fn fold(&self, mi: usize, w: (i64, i64)) -> BTreeMap<Vec<String>, Vec<Acc>> {
        let m = &self.spec.metrics[mi];
        let mut out: BTreeMap<Vec<String>, Vec<Acc>> = BTreeMap::new();
        for r in self.recs[mi].iter().filter(|r| w.0 <= r.t && r.t < w.1 && counts(m, w, r.wm_before)) {
            let accs = out.entry(r.key.clone()).or_insert_with(|| m.aggs.iter().map(|(_, a)| Acc::new(a)).collect());
            for (i, a) in accs.iter_mut().enumerate() {
                a.add(r, i);
            }
        }
        out
    }

    /// Whether `accs` pass metric `mi`'s `having`.
    pub fn having(&self, mi: usize, accs: &[Acc]) -> bool {
        let m = &self.spec.metrics[mi];
        m.having.as_ref().is_none_or(|h| {
            let get = |name: &str| {
                let i = m.aggs.iter().position(|(n, _)| n == name).unwrap();
                accs[i].number().map_or(Val::Null, Val::Float)
            };
            h.eval(&get)
        })
    }

    /// Whether window `w` of metric `mi` is past its retention at watermark `highest`.
    pub fn expired(&self, mi: usize, w: (i64, i64), highest: Option<i64>) -> bool {
        let m = &self.spec.metrics[mi];
        match (m.retention_ms, highest) {
            (Some(r), Some(h)) => zone::span_end(m.window, m.tz, w).saturating_add(r) <= h,
            _ => false,
        }
    }

    /// Records of metric `mi` counting for at least one window, whose slice starts in
    /// `[from_slice_of(from), to)`.
    pub fn span(&self, mi: usize, from: Option<i64>, to: Option<i64>) -> BTreeMap<Vec<String>, Vec<Acc>> {
        let m = &self.spec.metrics[mi];
        let lo = from.map(|f| zone::slice_of(m.window, m.tz, f).0);
        let mut out: BTreeMap<Vec<String>, Vec<Acc>> = BTreeMap::new();
        for r in &self.recs[mi] {
            let s = zone::slice_of(m.window, m.tz, r.t).0;
            let any = zone::windows_containing(m.window, m.tz, r.t).into_iter().any(|w| counts(m, w, r.wm_before));
            if !any || lo.is_some_and(|lo| s < lo) || to.is_some_and(|to| s >= to) {
                continue;
            }
            let accs = out.entry(r.key.clone()).or_insert_with(|| m.aggs.iter().map(|(_, a)| Acc::new(a)).collect());
            for (i, a) in accs.iter_mut().enumerate() {
                a.add(r, i);
            }
        }
        out
    }

    /// Whether every window holding instant `t` of metric `mi` is past its retention: its
    /// slice may be gone from some partition.
    pub fn slice_gone(&self, mi: usize, t: i64, highest: Option<i64>) -> bool {
        let m = &self.spec.metrics[mi];
        zone::windows_containing(m.window, m.tz, t).into_iter().all(|w| self.expired(mi, w, highest))
    }
}

/// Whether a record with watermark `wm_before` counts for window `w` of `m`.
pub fn counts(m: &Metric, w: (i64, i64), wm_before: i64) -> bool {
    m.window == WindowSpec::Global || w.1.saturating_add(m.grace_ms) > wm_before
}
