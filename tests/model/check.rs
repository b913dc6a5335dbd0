//! Tally's answers (JSON, from the HTTP API or the query engine directly) against the
//! model's. Every check returns the differences it found instead of panicking, so a
//! differential test can shrink a failing case.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Value as Json};
use tally::aggregate::sketch::Sketch;

use super::spec::{Agg, WindowSpec};
use super::{zone, Acc, Model};

/// A sketch of exactly these values, built in one pass.
pub fn sketch(values: &BTreeSet<String>, precision: u8) -> Sketch {
    let mut s = Sketch::new(precision).unwrap();
    for v in values {
        s.insert(v.as_bytes());
    }
    s
}

fn hex(s: &Sketch) -> String {
    s.to_canonical().iter().map(|b| format!("{b:02x}")).collect()
}

/// Exact units of a sum as JSON shows it.
fn units(v: &Json) -> Option<i128> {
    v.as_f64().map(|x| (x * 1e6).round() as i128)
}

/// A time range `[from, to)`, either end open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Range {
    pub from: Option<i64>,
    pub to: Option<i64>,
}

impl Range {
    fn overlaps(&self, w: (i64, i64)) -> bool {
        self.from.is_none_or(|f| w.1 > f) && self.to.is_none_or(|t| w.0 < t)
    }
}

/// Differences found, in words.
pub type Diffs = Vec<String>;

/// A window and a key (its parts' canonical text).
pub type RowKey = ((i64, i64), Vec<String>);

/// A metric's rows: accumulators per window and key.
pub type Rows = BTreeMap<RowKey, Vec<Acc>>;

/// A ratio's rows: (numerator, denominator) per window and key.
pub type RatioRows = BTreeMap<RowKey, (f64, f64)>;

/// Compares one aggregate's answer with its accumulator.
pub fn value(what: &str, got: &Json, want: &Acc) -> Result<(), String> {
    let bad = |why: String| Err(format!("{what}: {why}: got {got}, want {want:?}"));
    match want {
        Acc::Count(c) => {
            if got.as_u64() != Some(*c) {
                return bad("count".into());
            }
        }
        Acc::Sum(s) => {
            if units(got) != Some(*s) {
                return bad("sum".into());
            }
        }
        Acc::Distinct(set, p) => {
            let est = got["estimate"].as_f64().ok_or("no estimate")?;
            let se = got["standard_error"].as_f64().ok_or("no standard error")?;
            let n = set.len() as f64;
            if (est - n).abs() > 3.0 * se * n + 1.0 {
                return bad(format!("estimate off by more than 3 standard errors of {n}"));
            }
            if let Some(h) = got.get("sketch") {
                if h.as_str() != Some(hex(&sketch(set, *p)).as_str()) {
                    return bad("sketch differs from one built from the model's records".into());
                }
            }
        }
        Acc::Latest(l) => {
            let w = l.as_ref().map_or(Json::Null, |(_, v)| v.to_json());
            if *got != w {
                return bad("latest".into());
            }
        }
        Acc::TopN(m, n, by) => {
            let want: Vec<(String, i128)> = Acc::ranked(m, *n);
            let items = got.as_array().ok_or("not a list")?;
            let got_pairs: Vec<(String, Option<i128>)> = items
                .iter()
                .map(|e| {
                    (e["item"].as_str().unwrap_or_default().to_string(), if *by { units(&e["value"]) } else { e["value"].as_i64().map(i128::from) })
                })
                .collect();
            let want_pairs: Vec<(String, Option<i128>)> = want.into_iter().map(|(k, v)| (k, Some(v))).collect();
            if got_pairs != want_pairs {
                return bad("top list".into());
            }
        }
    }
    Ok(())
}

impl Model {
    /// A key as answers show it.
    pub fn key_json(&self, mi: usize, key: &[String]) -> Json {
        let m = &self.spec.metrics[mi];
        Json::Object(m.group_by.iter().zip(key).map(|(f, v)| (f.clone(), json!(v))).collect())
    }

    fn window_json(&self, mi: usize, w: (i64, i64), grace: i64) -> Json {
        if self.spec.metrics[mi].window == WindowSpec::Global {
            return json!({ "global": true, "closed": false });
        }
        let lowest = self.watermarks(self.spec.metrics[mi].source).0;
        json!({ "start": w.0, "end": w.1, "closed": lowest.is_some_and(|l| w.1.saturating_add(grace) <= l) })
    }

    /// Every row metric `mi` answers over `range` (and `key`): (window, key) → accumulators.
    pub fn rows(&self, mi: usize, range: Range, key: Option<&[String]>) -> Rows {
        let highest = self.watermarks(self.spec.metrics[mi].source).1;
        let mut out = BTreeMap::new();
        for w in self.windows(mi, self.spec.metrics[mi].grace_ms).into_iter().filter(|w| range.overlaps(*w) && !self.expired(mi, *w, highest)) {
            for (k, accs) in self.fold(mi, w) {
                if key.is_none_or(|want| want == k.as_slice()) && self.having(mi, &accs) {
                    out.insert((w, k), accs);
                }
            }
        }
        out
    }

    fn row_key(&self, mi: usize, row: &Json) -> Option<RowKey> {
        let m = &self.spec.metrics[mi];
        let w = if m.window == WindowSpec::Global { zone::GLOBAL } else { (row["window"]["start"].as_i64()?, row["window"]["end"].as_i64()?) };
        let key = m.group_by.iter().map(|g| row["key"][g].as_str().map(str::to_string)).collect::<Option<Vec<_>>>()?;
        Some((w, key))
    }

    /// Checks a windowed answer of metric `mi` (its `rows`) over `range` and `key`.
    pub fn check_windows(&self, mi: usize, answer: &Json, range: Range, key: Option<&[String]>) -> Diffs {
        let m = &self.spec.metrics[mi];
        let want = self.rows(mi, range, key);
        let mut diffs = Vec::new();
        let mut seen = BTreeSet::new();
        for row in answer["rows"].as_array().into_iter().flatten() {
            let Some(k) = self.row_key(mi, row) else {
                diffs.push(format!("{}: unreadable row {row}", m.name));
                continue;
            };
            seen.insert(k.clone());
            let Some(accs) = want.get(&k) else {
                diffs.push(format!("{}: row {k:?} should not be there: {row}", m.name));
                continue;
            };
            let wj = self.window_json(mi, k.0, m.grace_ms);
            if row["window"] != wj {
                diffs.push(format!("{}: window {k:?}: got {}, want {wj}", m.name, row["window"]));
            }
            for ((name, _), acc) in m.aggs.iter().zip(accs) {
                if let Err(e) = value(&format!("{} {k:?} {name}", m.name), &row["values"][name], acc) {
                    diffs.push(e);
                }
            }
        }
        for k in want.keys().filter(|k| !seen.contains(*k)) {
            diffs.push(format!("{}: missing row {k:?} = {:?}", m.name, want[k]));
        }
        diffs
    }

    /// Ratio `ri`'s rows: (window, key) → (numerator, denominator).
    pub fn ratio_rows(&self, ri: usize, range: Range) -> RatioRows {
        let r = &self.spec.ratios[ri];
        let (nm, dm) = (r.num.0, r.den.0);
        let highest = self.watermarks(self.spec.metrics[dm].source).1;
        let mut out = BTreeMap::new();
        for w in self
            .windows(dm, self.ratio_grace(ri))
            .into_iter()
            .filter(|w| range.overlaps(*w) && !self.expired(nm, *w, highest) && !self.expired(dm, *w, highest))
        {
            let nums = self.fold(nm, w);
            for (k, accs) in self.fold(dm, w) {
                let den = accs[r.den.1].number().unwrap_or(0.0);
                let num = nums.get(&k).and_then(|a| a[r.num.1].number()).unwrap_or(0.0);
                out.insert((w, k), (num, den));
            }
        }
        out
    }

    /// A ratio's grace: the later of its metrics'.
    pub fn ratio_grace(&self, ri: usize) -> i64 {
        let r = &self.spec.ratios[ri];
        self.spec.metrics[r.num.0].grace_ms.max(self.spec.metrics[r.den.0].grace_ms)
    }

    /// Checks a ratio's answer.
    pub fn check_ratio(&self, ri: usize, answer: &Json, range: Range) -> Diffs {
        let r = &self.spec.ratios[ri];
        let grace = self.ratio_grace(ri);
        let want = self.ratio_rows(ri, range);
        let mut diffs = Vec::new();
        let mut seen = BTreeSet::new();
        for row in answer["rows"].as_array().into_iter().flatten() {
            let Some(k) = self.row_key(r.num.0, row) else {
                diffs.push(format!("{}: unreadable row {row}", r.name));
                continue;
            };
            seen.insert(k.clone());
            let Some(&(num, den)) = want.get(&k) else {
                diffs.push(format!("{}: row {k:?} should not be there: {row}", r.name));
                continue;
            };
            let wj = self.window_json(r.num.0, k.0, grace);
            if row["window"] != wj {
                diffs.push(format!("{}: window {k:?}: got {}, want {wj}", r.name, row["window"]));
            }
            let v = &row["values"];
            let ratio_ok = if den == 0.0 {
                v["ratio"].is_null()
            } else {
                v["ratio"].as_f64().is_some_and(|x| (x - num / den).abs() <= 1e-12 * (num / den).abs().max(1.0))
            };
            if units(&v["numerator"]) != Some((num * 1e6).round() as i128)
                || units(&v["denominator"]) != Some((den * 1e6).round() as i128)
                || !ratio_ok
            {
                diffs.push(format!("{}: {k:?}: got {v}, want {num} / {den}", r.name));
            }
        }
        for k in want.keys().filter(|k| !seen.contains(*k)) {
            diffs.push(format!("{}: missing row {k:?} = {:?}", r.name, want[k]));
        }
        diffs
    }

    /// The first slice start a span over `from` may use, or `Err(())` when it reaches into
    /// slices some partition may have deleted.
    fn span_floor(&self, mi: usize, from: Option<i64>, highest: Option<i64>) -> Result<Option<i64>, ()> {
        let m = &self.spec.metrics[mi];
        match from {
            Some(f) => {
                let s = zone::slice_of(m.window, m.tz, f).0;
                if m.window != WindowSpec::Global && self.slice_gone(mi, s, highest) {
                    Err(())
                } else {
                    Ok(Some(s))
                }
            }
            // Unbounded: every slice still kept everywhere.
            None => Ok(None),
        }
    }

    /// Checks a span answer (or its refusal, `Err(message)`) over `[from, to)`.
    pub fn check_span(&self, mi: usize, answer: Result<Json, String>, from: Option<i64>, to: Option<i64>, key: Option<&[String]>) -> Diffs {
        let m = &self.spec.metrics[mi];
        let highest = self.watermarks(m.source).1;
        let what = format!("{} span {from:?}..{to:?}", m.name);
        match (self.span_floor(mi, from, highest), answer) {
            (Err(()), Err(_)) => vec![],
            (Err(()), Ok(a)) => vec![format!("{what}: reaches into expired slices, should be refused; got {a}")],
            (Ok(_), Err(e)) => vec![format!("{what}: refused: {e}")],
            (Ok(lo), Ok(a)) => {
                // Without a lower bound, what a partition may have deleted is left out.
                let mut rows = if m.window == WindowSpec::Global { self.span(mi, lo, to) } else { self.span_kept(mi, lo, to, highest) };
                rows.retain(|k, _| key.is_none_or(|want| want == k.as_slice()));
                let mut diffs = Vec::new();
                let mut seen = BTreeSet::new();
                for row in a["rows"].as_array().into_iter().flatten() {
                    let k: Vec<String> = m.group_by.iter().map(|g| row["key"][g].as_str().unwrap_or_default().to_string()).collect();
                    seen.insert(k.clone());
                    let Some(accs) = rows.get(&k) else {
                        diffs.push(format!("{what}: key {k:?} should not be there"));
                        continue;
                    };
                    for ((name, _), acc) in m.aggs.iter().zip(accs) {
                        if let Err(e) = value(&format!("{what} {k:?} {name}"), &row["values"][name], acc) {
                            diffs.push(e);
                        }
                    }
                }
                for k in rows.keys().filter(|k| !seen.contains(*k)) {
                    diffs.push(format!("{what}: missing key {k:?}"));
                }
                diffs
            }
        }
    }

    /// A span's rows without the slices that may be gone somewhere.
    fn span_kept(&self, mi: usize, lo: Option<i64>, to: Option<i64>, highest: Option<i64>) -> BTreeMap<Vec<String>, Vec<Acc>> {
        let m = &self.spec.metrics[mi];
        let first_kept = self.recs[mi].iter().map(|r| zone::slice_of(m.window, m.tz, r.t).0).filter(|s| !self.slice_gone(mi, *s, highest)).min();
        let lo = match (lo, first_kept) {
            (Some(l), _) => Some(l),
            (None, Some(k)) => Some(k),
            (None, None) => return BTreeMap::new(),
        };
        self.span(mi, lo, to)
    }

    /// The window a top list is taken over: of those holding `at`, the one ending first;
    /// without `at`, of those holding the newest slice with data still kept, the first ending
    /// one whose first slice is kept.
    pub fn top_window(&self, mi: usize, at: Option<i64>, highest: Option<i64>) -> Option<(i64, i64)> {
        let m = &self.spec.metrics[mi];
        let newest = || {
            self.recs[mi]
                .iter()
                .filter(|r| zone::windows_containing(m.window, m.tz, r.t).into_iter().any(|w| super::counts(m, w, r.wm_before)))
                .map(|r| zone::slice_of(m.window, m.tz, r.t).0)
                .filter(|s| m.window == WindowSpec::Global || !self.slice_gone(mi, *s, highest))
                .max()
        };
        match at {
            Some(t) => zone::windows_containing(m.window, m.tz, t).into_iter().min_by_key(|w| w.1),
            None => {
                let mut ws = zone::windows_containing(m.window, m.tz, newest()?);
                ws.sort_by_key(|w| w.1);
                ws.into_iter().find(|w| m.window == WindowSpec::Global || !self.slice_gone(mi, w.0, highest))
            }
        }
    }

    /// Checks `top?n=&at=&aggregate=` (aggregate index `ai`).
    pub fn check_top(&self, mi: usize, answer: Result<Json, String>, n: usize, at: Option<i64>, ai: usize) -> Diffs {
        let m = &self.spec.metrics[mi];
        let what = format!("{} top {n} at {at:?} of {}", m.name, m.aggs[ai].0);
        let highest = self.watermarks(m.source).1;
        let Some(w) = self.top_window(mi, at, highest) else {
            return match answer {
                Ok(a) if a["top"] == json!([]) => vec![],
                other => vec![format!("{what}: no data, want an empty list; got {other:?}")],
            };
        };
        let gone = m.window != WindowSpec::Global && self.slice_gone(mi, w.0, highest);
        let a = match (gone, answer) {
            (true, Err(_)) => return vec![],
            (true, Ok(a)) => return vec![format!("{what}: window {w:?} is past retention, should be refused; got {a}")],
            (false, Err(e)) => return vec![format!("{what}: refused: {e}")],
            (false, Ok(a)) => a,
        };
        let folded = self.fold(mi, w);
        let mut diffs = Vec::new();
        let wj = self.window_json(mi, w, m.grace_ms);
        if a["window"] != wj {
            diffs.push(format!("{what}: window: got {}, want {wj}", a["window"]));
        }
        match &m.aggs[ai].1 {
            Agg::TopN { n: agg_n, by, .. } => {
                let mut merged: BTreeMap<String, i128> = BTreeMap::new();
                for accs in folded.values() {
                    if let Acc::TopN(items, _, _) = &accs[ai] {
                        for (k, v) in items {
                            *merged.entry(k.clone()).or_default() += v;
                        }
                    }
                }
                let want = Acc::TopN(merged, (*agg_n).min(n), by.is_some());
                if let Err(e) = value(&what, &a["top"], &want) {
                    diffs.push(e);
                }
            }
            _ => {
                let mut ranked: Vec<(i128, String, &Acc)> = folded
                    .iter()
                    .filter(|(_, accs)| self.having(mi, accs))
                    .filter_map(|(k, accs)| accs[ai].number().map(|v| ((v * 1e6).round() as i128, k.join("|"), &accs[ai])))
                    .collect();
                ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                ranked.truncate(n);
                let got = a["top"].as_array().cloned().unwrap_or_default();
                if got.len() != ranked.len() {
                    diffs.push(format!("{what}: {} entries, want {}: {}", got.len(), ranked.len(), a["top"]));
                }
                for (e, (_, label, acc)) in got.iter().zip(&ranked) {
                    if e["item"].as_str() != Some(label.as_str()) {
                        diffs.push(format!("{what}: got {}, want {label} at this place", e["item"]));
                    } else if let Err(err) = value(&what, &e["value"], acc) {
                        diffs.push(err);
                    }
                }
            }
        }
        diffs
    }
}

/// One output of the result topic: a metric or a ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Metric(usize),
    Ratio(usize),
}

impl Model {
    /// Every output and what it emits.
    pub fn outputs(&self) -> Vec<(Output, String, super::spec::Emit)> {
        let metrics = self.spec.metrics.iter().enumerate().map(|(i, m)| (Output::Metric(i), m.name.clone(), m.emit));
        metrics.chain(self.spec.ratios.iter().enumerate().map(|(i, r)| (Output::Ratio(i), r.name.clone(), r.emit))).collect()
    }

    /// The metric whose windows and keys an output has, and its grace.
    fn base(&self, o: Output) -> (usize, i64) {
        match o {
            Output::Metric(m) => (m, self.spec.metrics[m].grace_ms),
            Output::Ratio(r) => (self.spec.ratios[r].den.0, self.ratio_grace(r)),
        }
    }

    /// Whether some slice of an output's window may be gone at watermark `highest`.
    pub fn output_expired(&self, o: Output, w: (i64, i64), highest: Option<i64>) -> bool {
        match o {
            Output::Metric(m) => self.expired(m, w, highest),
            Output::Ratio(r) => self.expired(self.spec.ratios[r].num.0, w, highest) || self.expired(self.spec.ratios[r].den.0, w, highest),
        }
    }

    /// An output's rows over its whole history (windows past retention too): (window, key)
    /// → `Ok(accumulators)` of a metric or `Err((numerator, denominator))` of a ratio.
    fn history(&self, o: Output) -> BTreeMap<RowKey, Result<Vec<Acc>, (f64, f64)>> {
        let (base, grace) = self.base(o);
        let mut out = BTreeMap::new();
        for w in self.windows(base, grace) {
            match o {
                Output::Metric(m) => {
                    for (k, accs) in self.fold(m, w).into_iter().filter(|(_, a)| self.having(m, a)) {
                        out.insert((w, k), Ok(accs));
                    }
                }
                Output::Ratio(r) => {
                    let r = &self.spec.ratios[r];
                    let nums = self.fold(r.num.0, w);
                    for (k, accs) in self.fold(r.den.0, w) {
                        let num = nums.get(&k).and_then(|a| a[r.num.1].number()).unwrap_or(0.0);
                        out.insert((w, k), Err((num, accs[r.den.1].number().unwrap_or(0.0))));
                    }
                }
            }
        }
        out
    }

    /// Checks the rows of a result topic (values, in the order sent; copies allowed): every
    /// final row exact and of a closed window, every window closed by the lowest watermark
    /// sent (unless `may_skip` it), and the last update of each window exact.
    pub fn check_result_rows(&self, rows: &[Json], may_skip: &dyn Fn(Output, (i64, i64)) -> bool) -> Diffs {
        let mut diffs = Vec::new();
        let mut sent: BTreeSet<(String, (i64, i64), String)> = BTreeSet::new();
        let mut last: BTreeMap<(String, (i64, i64), String), &Json> = BTreeMap::new();
        for (o, name, emit) in self.outputs() {
            if emit == super::spec::Emit::None {
                continue;
            }
            let (base, grace) = self.base(o);
            let lowest = self.watermarks(self.spec.metrics[base].source).0;
            let closed =
                |w: (i64, i64)| self.spec.metrics[base].window != WindowSpec::Global && lowest.is_some_and(|l| w.1.saturating_add(grace) <= l);
            let history = self.history(o);
            for row in rows.iter().filter(|r| r["metric"] == json!(name)) {
                let Some(k) = self.row_key(base, row) else {
                    diffs.push(format!("result row of {name}: unreadable: {row}"));
                    continue;
                };
                let id = (name.clone(), k.0, row["key"].to_string());
                if row["final"] == json!(true) {
                    if !closed(k.0) {
                        diffs.push(format!("result row of {name}: final row of an open window: {row}"));
                    }
                    sent.insert(id.clone());
                    diffs.extend(self.row_values(o, &name, row, history.get(&k)));
                }
                last.insert(id, row);
            }
            for (k, want) in &history {
                let id = (name.clone(), k.0, self.key_json(base, &k.1).to_string());
                if emit == super::spec::Emit::Final && closed(k.0) && !sent.contains(&id) && !may_skip(o, k.0) {
                    diffs.push(format!("result rows: no final row of {name} {k:?}"));
                }
                if emit == super::spec::Emit::Updates {
                    match last.get(&id) {
                        Some(row) => diffs.extend(self.row_values(o, &name, row, Some(want))),
                        None => diffs.push(format!("result rows: no update of {name} {k:?}")),
                    }
                }
            }
        }
        diffs
    }

    fn row_values(&self, o: Output, name: &str, row: &Json, want: Option<&Result<Vec<Acc>, (f64, f64)>>) -> Diffs {
        let v = &row["values"];
        match (o, want) {
            (_, None) => vec![format!("result row of {name}: no such window and key: {row}")],
            (Output::Metric(m), Some(Ok(accs))) => self.spec.metrics[m]
                .aggs
                .iter()
                .zip(accs)
                .filter_map(|((agg, _), acc)| value(&format!("result row of {name} {agg}"), &v[agg], acc).err())
                .collect(),
            (_, Some(Err((num, den)))) => {
                let ratio_ok = if *den == 0.0 {
                    v["ratio"].is_null()
                } else {
                    v["ratio"].as_f64().is_some_and(|x| (x - num / den).abs() <= 1e-12 * (num / den).abs().max(1.0))
                };
                if units(&v["numerator"]) == Some((num * 1e6).round() as i128)
                    && units(&v["denominator"]) == Some((den * 1e6).round() as i128)
                    && ratio_ok
                {
                    vec![]
                } else {
                    vec![format!("result row of {name}: got {v}, want {num} / {den}")]
                }
            }
            _ => vec![format!("result row of {name}: not a row of its kind: {row}")],
        }
    }
}
