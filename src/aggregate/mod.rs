//! Aggregates: what a metric keeps per group key and slice, and how partials merge.
//!
//! Every aggregate here is *mergeable*: a source partition keeps partial aggregates for
//! whatever keys its records carry, and an answer merges the partials of the partitions
//! and slices it covers. Counts and sums add (sums are exact integers of micro-units, so
//! merge order never changes a digit), sketches merge, `latest` keeps the latest by
//! (event time, partition, offset), and `top_n` keeps exact per-item totals so the top
//! of the merged totals is the true top.
//!
//! ```
//! use tally::aggregate::{AggKind, AggState};
//! use tally::event::{Record, Value};
//! let kind = AggKind::Sum { slot: 0 };
//! let mut a = AggState::new(&kind);
//! let mut b = AggState::new(&kind);
//! a.update(&kind, &Record { time_ms: 0, values: vec![Value::Float(0.1)], ..Default::default() }, 0, 0).unwrap();
//! b.update(&kind, &Record { time_ms: 0, values: vec![Value::Float(0.2)], ..Default::default() }, 1, 0).unwrap();
//! a.merge(&b).unwrap();
//! assert_eq!(a.number(), Some(0.3));
//! ```

pub mod sketch;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::{Record, Value};
use sketch::{Sketch, SketchError};

/// Sums are kept as integers of this many units per 1, so they add exactly.
pub const SUM_SCALE: f64 = 1_000_000.0;

/// Default HLL precision: 2^14 registers, 0.81 % standard error, 12 KiB dense.
pub const DEFAULT_PRECISION: u8 = 14;

/// An aggregate as configured, with its field slots resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateSpec {
    /// Name in answers: the alias, or the expression as written.
    pub name: String,
    /// What it computes.
    pub kind: AggKind,
}

/// What an aggregate computes.
#[derive(Debug, Clone, PartialEq)]
pub enum AggKind {
    /// Number of records.
    Count,
    /// Sum of a numeric field.
    Sum {
        /// Slot of the field.
        slot: usize,
    },
    /// Distinct values of a field (HLL++).
    Distinct {
        /// Slot of the field.
        slot: usize,
        /// Sketch precision.
        precision: u8,
    },
    /// The field's value in the latest record (by event time).
    Latest {
        /// Slot of the field.
        slot: usize,
    },
    /// The `n` items (values of `item`) with the highest count, or sum of `by`.
    TopN {
        /// Slot of the item field.
        item: usize,
        /// How many to report.
        n: usize,
        /// Slot of the summed field; `None` ranks by count.
        by: Option<usize>,
    },
}

impl AggKind {
    /// The kind's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            AggKind::Count => "count",
            AggKind::Sum { .. } => "sum",
            AggKind::Distinct { .. } => "distinct",
            AggKind::Latest { .. } => "latest",
            AggKind::TopN { .. } => "top_n",
        }
    }
}

impl AggregateSpec {
    /// Parses `count`, `sum(f)`, `distinct(f[, precision])`, `latest(f)`,
    /// `top_n(f, n[, sum(g)])`, optionally followed by `as alias`. `slot_of` gives (and
    /// allocates) the slot of a field name.
    pub fn parse(text: &str, mut slot_of: impl FnMut(&str) -> usize) -> Result<AggregateSpec, String> {
        let allowed = "allowed: count, sum(field), distinct(field[, precision 4..18]), latest(field), top_n(field, n[, sum(field)]), each optionally `as alias`";
        let (expr, alias) = match text.rsplit_once(" as ") {
            Some((e, a)) => (e.trim(), Some(a.trim())),
            None => (text.trim(), None),
        };
        if let Some(a) = alias {
            if a.is_empty() || !a.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("alias `{a}` must be letters, digits and `_`"));
            }
        }
        let (func, args) = match expr.split_once('(') {
            Some((f, rest)) => {
                let inner = rest.strip_suffix(')').ok_or_else(|| format!("`{expr}`: missing `)`; {allowed}"))?;
                (f.trim(), split_args(inner))
            }
            None => (expr, vec![]),
        };
        let field = |i: usize, args: &[String]| -> Result<String, String> {
            args.get(i)
                .filter(|a| !a.is_empty() && !a.contains('('))
                .cloned()
                .ok_or_else(|| format!("`{expr}`: argument {} must be a field name", i + 1))
        };
        let arity = |n: std::ops::RangeInclusive<usize>| -> Result<(), String> {
            if n.contains(&args.len()) {
                Ok(())
            } else {
                Err(format!("`{expr}` has {} argument(s); {allowed}", args.len()))
            }
        };
        let kind = match func {
            "count" => {
                if !(args.is_empty() || args.len() == 1 && args[0] == "*") {
                    return Err(format!("`{expr}`: count takes no field; {allowed}"));
                }
                AggKind::Count
            }
            "sum" => {
                arity(1..=1)?;
                AggKind::Sum { slot: slot_of(&field(0, &args)?) }
            }
            "latest" => {
                arity(1..=1)?;
                AggKind::Latest { slot: slot_of(&field(0, &args)?) }
            }
            "distinct" => {
                arity(1..=2)?;
                let precision = match args.get(1) {
                    None => DEFAULT_PRECISION,
                    Some(p) => p
                        .parse::<u8>()
                        .ok()
                        .filter(|p| (4..=18).contains(p))
                        .ok_or_else(|| format!("`{expr}`: precision `{p}` must be a whole number in 4..=18"))?,
                };
                AggKind::Distinct { slot: slot_of(&field(0, &args)?), precision }
            }
            "top_n" => {
                arity(2..=3)?;
                let n = args[1]
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=10_000).contains(n))
                    .ok_or_else(|| format!("`{expr}`: n `{}` must be a whole number in 1..=10000", args[1]))?;
                let by = match args.get(2) {
                    None => None,
                    Some(b) => {
                        let inner = b
                            .strip_prefix("sum(")
                            .and_then(|r| r.strip_suffix(')'))
                            .ok_or_else(|| format!("`{expr}`: rank by `count` (default) or `sum(field)`, not `{b}`"))?;
                        Some(slot_of(inner.trim()))
                    }
                };
                AggKind::TopN { item: slot_of(&field(0, &args)?), n, by }
            }
            other => return Err(format!("unknown aggregate `{other}`; {allowed}")),
        };
        Ok(AggregateSpec { name: alias.unwrap_or(expr).to_string(), kind })
    }
}

/// Splits on top-level commas.
fn split_args(s: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut depth = 0;
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(String::new());
                continue;
            }
            _ => {}
        }
        out.last_mut().unwrap().push(c);
    }
    let out: Vec<String> = out.into_iter().map(|a| a.trim().to_string()).collect();
    if out.len() == 1 && out[0].is_empty() {
        vec![]
    } else {
        out
    }
}

/// The latest value seen, with what orders it. Ties on event time go to the higher
/// (partition, offset), so every merge order picks the same one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    /// Event time of the record.
    pub time_ms: i64,
    /// Source partition of the record.
    pub partition: i32,
    /// Offset of the record.
    pub offset: i64,
    /// The value, as JSON text.
    pub value: String,
}

impl Latest {
    fn order(&self) -> (i64, i32, i64) {
        (self.time_ms, self.partition, self.offset)
    }
}

/// The state of one aggregate for one group key and slice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggState {
    /// Records counted.
    Count(u64),
    /// Sum in units of 1 / [`SUM_SCALE`].
    Sum(i128),
    /// Distinct values.
    Distinct(Sketch),
    /// Latest non-null value.
    Latest(Option<Latest>),
    /// Per-item totals (count, or sum in micro-units).
    TopN(BTreeMap<String, i128>),
}

/// A state that is not of its aggregate's kind: bytes stored or restored under another
/// layout of the metric (or another aggregate's partial), never applied.
#[derive(Debug, thiserror::Error)]
pub enum AggregateError {
    /// A state of one kind met an aggregate (or a partial) of another.
    #[error("a {found} state where a {expected} is configured")]
    Mismatch {
        /// What the configuration (or the other partial) says.
        expected: &'static str,
        /// What the state is.
        found: &'static str,
    },
    /// Two sketches that cannot merge (different precisions).
    #[error(transparent)]
    Sketch(#[from] SketchError),
}

/// Largest magnitude a summed value may have; larger ones are skipped like nulls, so a
/// hostile value cannot overflow a sum.
pub const MAX_SUMMAND: f64 = 1.0e18;

/// Converts a number to exact sum units; `None` for values that are not finite or too large.
pub fn to_units(v: f64) -> Option<i128> {
    (v.is_finite() && v.abs() <= MAX_SUMMAND).then(|| (v * SUM_SCALE).round() as i128)
}

impl AggState {
    /// The empty state of `kind`.
    pub fn new(kind: &AggKind) -> AggState {
        match kind {
            AggKind::Count => AggState::Count(0),
            AggKind::Sum { .. } => AggState::Sum(0),
            AggKind::Distinct { precision, .. } => AggState::Distinct(Sketch::new(*precision).expect("precision checked when the config was read")),
            AggKind::Latest { .. } => AggState::Latest(None),
            AggKind::TopN { .. } => AggState::TopN(BTreeMap::new()),
        }
    }

    /// The kind's name, for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            AggState::Count(_) => "count",
            AggState::Sum(_) => "sum",
            AggState::Distinct(_) => "distinct",
            AggState::Latest(_) => "latest",
            AggState::TopN(_) => "top_n",
        }
    }

    /// Whether this state is one of `kind` (a sketch of its precision): what a state read
    /// back from the store or the changelog must be before anything is folded into it.
    pub fn fits(&self, kind: &AggKind) -> bool {
        match (self, kind) {
            (AggState::Distinct(sk), AggKind::Distinct { precision, .. }) => sk.precision() == *precision,
            (AggState::Count(_), AggKind::Count)
            | (AggState::Sum(_), AggKind::Sum { .. })
            | (AggState::Latest(_), AggKind::Latest { .. })
            | (AggState::TopN(_), AggKind::TopN { .. }) => true,
            _ => false,
        }
    }

    /// Absorbs one record (from `partition` at `offset`). Null fields are skipped, as SQL
    /// aggregates skip NULL. A state of another kind than `kind` is an error, and unchanged.
    pub fn update(&mut self, kind: &AggKind, rec: &Record, partition: i32, offset: i64) -> Result<(), AggregateError> {
        match (self, kind) {
            (AggState::Count(c), AggKind::Count) => *c += 1,
            (AggState::Sum(s), AggKind::Sum { slot }) => {
                if let Some(u) = rec.values[*slot].as_f64().and_then(to_units) {
                    *s = s.saturating_add(u);
                }
            }
            (AggState::Distinct(sk), AggKind::Distinct { slot, .. }) => {
                let v = &rec.values[*slot];
                if *v != Value::Null {
                    v.with_text(|t| sk.insert(t));
                }
            }
            (AggState::Latest(l), AggKind::Latest { slot }) => {
                let v = &rec.values[*slot];
                if *v == Value::Null {
                    return Ok(());
                }
                let cand = Latest { time_ms: rec.time_ms, partition, offset, value: v.to_json().to_string() };
                if l.as_ref().is_none_or(|cur| cand.order() > cur.order()) {
                    *l = Some(cand);
                }
            }
            (AggState::TopN(m), AggKind::TopN { item, by, .. }) => {
                let it = &rec.values[*item];
                if *it == Value::Null {
                    return Ok(());
                }
                let add = match by {
                    None => 1,
                    Some(b) => match rec.values[*b].as_f64().and_then(to_units) {
                        Some(u) => u,
                        None => return Ok(()),
                    },
                };
                // Looked up by its text first: the item is almost always in the list already.
                it.with_text(|t| {
                    let t = String::from_utf8_lossy(t);
                    match m.get_mut(t.as_ref()) {
                        Some(total) => *total = total.saturating_add(add),
                        None => {
                            m.insert(t.into_owned(), add);
                        }
                    }
                });
            }
            (state, kind) => return Err(AggregateError::Mismatch { expected: kind.name(), found: state.kind_name() }),
        }
        Ok(())
    }

    /// Merges another partial of the same aggregate into this one.
    pub fn merge(&mut self, other: &AggState) -> Result<(), AggregateError> {
        match (self, other) {
            (AggState::Count(a), AggState::Count(b)) => *a = a.saturating_add(*b),
            (AggState::Sum(a), AggState::Sum(b)) => *a = a.saturating_add(*b),
            (AggState::Distinct(a), AggState::Distinct(b)) => a.merge(b)?,
            (AggState::Latest(a), AggState::Latest(Some(b))) => {
                if a.as_ref().is_none_or(|cur| b.order() > cur.order()) {
                    *a = Some(b.clone());
                }
            }
            (AggState::Latest(_), AggState::Latest(None)) => {}
            (AggState::TopN(a), AggState::TopN(b)) => {
                for (k, v) in b {
                    let total = a.entry(k.clone()).or_insert(0);
                    *total = total.saturating_add(*v);
                }
            }
            (a, b) => return Err(AggregateError::Mismatch { expected: a.kind_name(), found: b.kind_name() }),
        }
        Ok(())
    }

    /// The single number this aggregate stands for (ratios, ranking, `having`): count, sum,
    /// distinct estimate (rounded: it counts things), or a numeric latest value. `None` for top-N and non-numbers.
    pub fn number(&self) -> Option<f64> {
        match self {
            AggState::Count(c) => Some(*c as f64),
            AggState::Sum(s) => Some(*s as f64 / SUM_SCALE),
            AggState::Distinct(sk) => Some(sk.clone().estimate().round()),
            AggState::Latest(l) => l.as_ref().and_then(|l| l.value.parse::<f64>().ok()),
            AggState::TopN(_) => None,
        }
    }

    /// The answer as JSON.
    pub fn to_json(&self, kind: &AggKind) -> serde_json::Value {
        use serde_json::json;
        match (self, kind) {
            (AggState::Distinct(sk), _) => {
                let mut sk = sk.clone();
                let est = sk.estimate();
                json!({ "estimate": est.round(), "standard_error": sk.standard_error(), "precision": sk.precision() })
            }
            (AggState::Latest(l), _) => {
                l.as_ref().map_or(serde_json::Value::Null, |l| serde_json::from_str(&l.value).unwrap_or(serde_json::Value::Null))
            }
            (AggState::TopN(m), AggKind::TopN { n, by, .. }) => {
                let top: Vec<serde_json::Value> = rank(m, *n)
                    .into_iter()
                    .map(|(item, v)| {
                        let value = if by.is_some() { json!(v as f64 / SUM_SCALE) } else { json!(v) };
                        json!({ "item": item, "value": value })
                    })
                    .collect();
                serde_json::Value::Array(top)
            }
            (AggState::Count(c), _) => json!(c),
            (s, _) => s.number().map_or(serde_json::Value::Null, |n| json!(n)),
        }
    }
}

/// The `n` entries with the highest values, ties broken by item, highest first.
pub fn rank(totals: &BTreeMap<String, i128>, n: usize) -> Vec<(&str, i128)> {
    let mut all: Vec<(&str, i128)> = totals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    all.sort_by(|a, b| rank_order((a.0, a.1), (b.0, b.1)));
    all.truncate(n);
    all
}

/// The order of a top list, of (item, value): highest value first, ties by item.
pub fn rank_order(a: (&str, i128), b: (&str, i128)) -> std::cmp::Ordering {
    b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(t: i64, vals: &[Value]) -> Record {
        Record { time_ms: t, values: vals.to_vec(), ..Default::default() }
    }

    fn parse(text: &str) -> Result<AggregateSpec, String> {
        let mut names: Vec<String> = vec![];
        AggregateSpec::parse(text, |n| {
            names.iter().position(|x| x == n).unwrap_or_else(|| {
                names.push(n.to_string());
                names.len() - 1
            })
        })
    }

    #[test]
    fn parses_every_aggregate_and_rejects_the_rest() {
        assert_eq!(parse("count").unwrap().kind, AggKind::Count);
        assert_eq!(parse("count(*) as n").unwrap().name, "n");
        assert_eq!(parse("sum(x) as total").unwrap(), AggregateSpec { name: "total".into(), kind: AggKind::Sum { slot: 0 } });
        assert_eq!(parse("distinct(u, 12)").unwrap().kind, AggKind::Distinct { slot: 0, precision: 12 });
        assert_eq!(parse("distinct(u)").unwrap().kind, AggKind::Distinct { slot: 0, precision: DEFAULT_PRECISION });
        assert_eq!(parse("top_n(item, 10, sum(amount))").unwrap().kind, AggKind::TopN { item: 1, n: 10, by: Some(0) });
        for bad in [
            "avg(x)",
            "sum()",
            "sum(a, b)",
            "distinct(u, 30)",
            "top_n(x)",
            "top_n(x, 0)",
            "top_n(x, 3, max(y))",
            "sum(x",
            "count as bad-alias",
            "count(x)",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sums_are_exact_in_any_merge_order() {
        let kind = AggKind::Sum { slot: 0 };
        let vals = [0.1, 0.2, 33.8, -5.5, 1e-7, 12345.678901];
        let mut one = AggState::new(&kind);
        for v in vals {
            one.update(&kind, &rec(0, &[Value::Float(v)]), 0, 0).unwrap();
        }
        let mut merged = AggState::new(&kind);
        for v in vals.iter().rev() {
            let mut p = AggState::new(&kind);
            p.update(&kind, &rec(0, &[Value::Float(*v)]), 0, 0).unwrap();
            merged.merge(&p).unwrap();
        }
        assert_eq!(one, merged);
        assert_eq!(one, AggState::Sum(vals.iter().map(|v| to_units(*v).unwrap()).sum()));
        // Hostile magnitudes are skipped, and sums saturate instead of wrapping.
        let before = one.clone();
        one.update(&kind, &rec(0, &[Value::Float(1e300)]), 0, 0).unwrap();
        assert_eq!(one, before);
        let mut big = AggState::Sum(i128::MAX - 1);
        big.merge(&AggState::Sum(5)).unwrap();
        assert_eq!(big, AggState::Sum(i128::MAX));
        // Nulls and text that is no number are skipped; numeric text counts.
        one.update(&kind, &rec(0, &[Value::Null]), 0, 0).unwrap();
        one.update(&kind, &rec(0, &[Value::Str("x".into())]), 0, 0).unwrap();
        let before = one.clone();
        one.update(&kind, &rec(0, &[Value::Str("1.5".into())]), 0, 0).unwrap();
        assert_eq!(one.number().unwrap() - before.number().unwrap(), 1.5);
    }

    #[test]
    fn latest_is_order_independent() {
        let kind = AggKind::Latest { slot: 0 };
        let events = [(5, 0, 1, "a"), (9, 1, 4, "b"), (9, 0, 7, "c"), (2, 2, 9, "d")];
        let mut fwd = AggState::new(&kind);
        let mut parts: Vec<AggState> = vec![];
        for (t, p, o, v) in events {
            fwd.update(&kind, &rec(t, &[Value::Str(v.into())]), p, o).unwrap();
            let mut s = AggState::new(&kind);
            s.update(&kind, &rec(t, &[Value::Str(v.into())]), p, o).unwrap();
            parts.push(s);
        }
        let mut back = AggState::new(&kind);
        for s in parts.iter().rev() {
            back.merge(s).unwrap();
        }
        assert_eq!(fwd, back);
        assert_eq!(fwd.to_json(&kind), serde_json::json!("b"), "time 9 ties; partition 1 wins");
    }

    #[test]
    fn top_n_ranks_merged_totals() {
        let kind = AggKind::TopN { item: 0, n: 2, by: None };
        let mut a = AggState::new(&kind);
        let mut b = AggState::new(&kind);
        for it in ["x", "x", "y"] {
            a.update(&kind, &rec(0, &[Value::Str(it.into())]), 0, 0).unwrap();
        }
        for it in ["z", "z", "z", "y", "y"] {
            b.update(&kind, &rec(0, &[Value::Str(it.into())]), 1, 0).unwrap();
        }
        a.merge(&b).unwrap();
        assert_eq!(
            a.to_json(&kind),
            serde_json::json!([{ "item": "y", "value": 3 }, { "item": "z", "value": 3 }]),
            "partition a alone would put x on top; ties break by item"
        );
    }

    #[test]
    fn distinct_counts_canonical_text() {
        let kind = AggKind::Distinct { slot: 0, precision: 14 };
        let mut s = AggState::new(&kind);
        for v in [Value::Int(6), Value::Str("6".into()), Value::Float(6.0), Value::Null, Value::Int(7)] {
            s.update(&kind, &rec(0, &[v]), 0, 0).unwrap();
        }
        assert_eq!(s.number(), Some(2.0));
    }
}
