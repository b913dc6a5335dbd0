//! Layouts: what a metric's stored states are, and the one gate every state read back passes.
//!
//! A metric's [`Layout`] is what its stored states mean: the aggregates with their fields,
//! the group-by fields, the window and its time zone, the key format. Two configs of a
//! metric with the same layout read each other's states; anything else is another metric
//! under the same name. Filters, `having`, grace, retention and titles are not part of it
//! (changing them is compatible; grace and retention are handled by the marks' horizons).
//!
//! Every state value carries its layout's [`fingerprint`], in the store and in the changelog
//! alike, and every position record carries [`MetricMark`]s: which metrics, of which layout,
//! its state is complete for. [`Layout::open`] is the decode gate: the format brought to the
//! current one ([`crate::migrations`]), the fingerprint compared, the states' kinds checked —
//! a value that does not fit is never folded into or answered from; it is an error naming
//! the metric and both layouts ([`crate::store::StoreError::Layout`]).

use serde::{Deserialize, Serialize};

use crate::aggregate::{AggKind, AggState, AggregateSpec};
use crate::store::{StoreError, StoredAggregate, STATE_FORMAT};
use crate::window::{WindowKind, WindowSpec};

/// Fingerprint of a state whose layout is not known (written before layouts travelled with
/// states): it is read if its kinds fit.
pub const UNKNOWN: u64 = 0;

/// Bytes of a state value before its bincode body: the format byte and the fingerprint.
pub const STATE_HEADER_BYTES: usize = 9;

/// The stable fingerprint of a layout's text (XXH3, never [`UNKNOWN`]).
pub fn fingerprint(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes()).max(1)
}

/// A metric's layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Layout {
    /// What its states are, in words, e.g. `count, sum(amount) | by product | tumbling 60000ms UTC | keys/2`.
    pub text: String,
    /// [`fingerprint`] of `text`.
    #[serde(skip)]
    pub fingerprint: u64,
    /// The aggregates' kinds, in order (what each state must be).
    #[serde(skip)]
    kinds: Vec<AggKind>,
    /// Seal states in format 2, without the fingerprint (`state.upgrade_from = 2`).
    #[serde(skip)]
    pub legacy: bool,
}

impl Layout {
    /// The layout of a metric with these aggregates, group-by fields and window; `field`
    /// names a slot.
    pub fn describe(aggregates: &[AggregateSpec], group_by: &[String], window: &WindowSpec, field: impl Fn(usize) -> String) -> Layout {
        let aggs: Vec<String> = aggregates
            .iter()
            .map(|a| match &a.kind {
                AggKind::Count => "count".to_string(),
                AggKind::Sum { slot } => format!("sum({})", field(*slot)),
                AggKind::Distinct { slot, precision } => format!("distinct({})/{precision}", field(*slot)),
                AggKind::Latest { slot } => format!("latest({})", field(*slot)),
                AggKind::TopN { item, by: None, .. } => format!("top_n({})", field(*item)),
                AggKind::TopN { item, by: Some(b), .. } => format!("top_n({}, sum({}))", field(*item), field(*b)),
            })
            .collect();
        let zone = serde_json::to_value(window.zone).unwrap_or_default();
        // Written out field by field: a persisted identity must not follow a type's Debug form.
        let windows = match window.kind {
            WindowKind::Tumbling { size_ms } => format!("tumbling {size_ms}ms"),
            WindowKind::Hopping { size_ms, slide_ms } => format!("hopping {size_ms}ms/{slide_ms}ms"),
            WindowKind::Cumulate { step_ms, max_ms } => format!("cumulate {step_ms}ms/{max_ms}ms"),
            WindowKind::Global => "global".to_string(),
        };
        let text = format!(
            "{} | by {} | {windows} {} | keys/{}",
            aggs.join(", "),
            if group_by.is_empty() { "-".to_string() } else { group_by.join(", ") },
            zone.as_str().unwrap_or_default(),
            crate::store::KEY_FORMAT
        );
        Layout { fingerprint: fingerprint(&text), text, kinds: aggregates.iter().map(|a| a.kind.clone()).collect(), legacy: false }
    }

    /// Encodes `value` as a state of this layout (in format 2 when `legacy`).
    pub fn seal(&self, value: &StoredAggregate) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if self.legacy {
            out.push(2);
        } else {
            out.push(STATE_FORMAT);
            out.extend_from_slice(&self.fingerprint.to_be_bytes());
        }
        bincode::serde::encode_into_std_write(value, &mut out, bincode::config::standard()).expect("writing to a Vec cannot fail");
        out
    }

    /// The decode gate: `bytes`, read under `key` for metric `metric`, as a state of this
    /// layout — or why not.
    pub fn open(&self, metric: &str, key: &[u8], bytes: &[u8]) -> Result<StoredAggregate, StoreError> {
        let corrupt = |why: String| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), why };
        let bytes = crate::migrations::upcast_state(bytes).map_err(|e| match e {
            crate::migrations::Upcast::Newer(found) => StoreError::Newer { what: "state", found, supported: STATE_FORMAT },
            e => corrupt(e.to_string()),
        })?;
        let (fp, body) = header(&bytes).ok_or_else(|| corrupt("shorter than its header".into()))?;
        let refuse = |stored: String| StoreError::Layout { metric: metric.to_string(), stored, configured: self.text.clone() };
        if fp != UNKNOWN && fp != self.fingerprint {
            return Err(refuse(format!("layout {fp:016x}")));
        }
        let value: StoredAggregate = crate::store::decode_body(body).map_err(corrupt)?;
        if !self.fits(&value.states) {
            let kinds: Vec<&str> = value.states.iter().map(AggState::kind_name).collect();
            return Err(refuse(format!("states {kinds:?}")));
        }
        Ok(value)
    }

    /// Whether `states` are one per aggregate, each of its kind.
    fn fits(&self, states: &[AggState]) -> bool {
        states.len() == self.kinds.len() && states.iter().zip(&self.kinds).all(|(s, k)| s.fits(k))
    }
}

/// A current-format state's fingerprint and bincode body.
pub fn header(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let fp = u64::from_be_bytes(bytes.get(1..STATE_HEADER_BYTES)?.try_into().ok()?);
    Some((fp, &bytes[STATE_HEADER_BYTES..]))
}

/// Whether `bytes` are a current-format state of exactly `m`'s layout and generation.
pub fn is_current(m: &crate::topology::Metric, bytes: &[u8]) -> bool {
    bytes.first() == Some(&STATE_FORMAT) && header(bytes).is_some_and(|(fp, _)| fp == m.layout.fingerprint)
}

/// Reads only `max_offset` (the first field of the body) of a state of any readable format.
pub fn max_offset_of(bytes: &[u8]) -> Option<i64> {
    let bytes = crate::migrations::upcast_state(bytes).ok()?;
    let (_, body) = header(&bytes)?;
    bincode::serde::decode_from_slice::<i64, _>(body, bincode::config::standard()).ok().map(|(v, _)| v)
}

/// One metric's part of a position: its state in the partition is complete up to the
/// position, in `layout`, and nothing before `expired_before` is kept any more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricMark {
    /// The metric's name.
    pub metric: String,
    /// Its layout's text.
    pub layout: String,
    /// The highest slice start expiry has deleted before, on this partition: slices before
    /// it never take a record again, whatever the retention is raised to.
    pub expired_before: Option<i64>,
    /// The rebuild token the state was built under.
    pub rebuild: Option<String>,
    /// While a rebuild runs: how far it has got (the state is complete only when it is done).
    pub rebuilding: Option<Rebuilding>,
}

/// A rebuild of one metric on one partition in progress: the source's records before the
/// partition's position are read again for that metric alone, with their own watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rebuilding {
    /// The next offset the rebuild folds in.
    pub next: i64,
    /// The rebuild's own watermark, advanced by the records it reads again as the
    /// partition's was on their first pass.
    pub watermark: i64,
    /// Highest event time the rebuild has seen.
    pub max_event_time: i64,
}

/// Where `m`'s rebuild stands on a partition stored as `meta`: `None` when its state is of
/// this generation and complete; a fresh rebuild when the position does not carry the
/// metric's token; else the progress the position records.
pub fn rebuild_pending(m: &crate::topology::Metric, meta: &crate::store::PartitionMeta) -> Option<Rebuilding> {
    let token = m.rebuild.as_ref()?;
    match meta.mark(&m.name) {
        Some(mark) if mark.rebuild.as_ref() == Some(token) => mark.rebuilding,
        _ => Some(Rebuilding { next: 0, watermark: crate::task::NO_WATERMARK, max_event_time: crate::task::NO_WATERMARK }),
    }
}

/// The metrics a replica refuses, each with why: shared by the tasks, which stop
/// processing them, and the query side, which answers them with the reason.
#[derive(Debug, Default)]
pub struct Refusals {
    map: std::sync::RwLock<std::collections::BTreeMap<String, String>>,
}

impl Refusals {
    /// Refuses `metric` with `why` (the first reason stays).
    pub fn refuse(&self, metric: &str, why: String) {
        self.map.write().unwrap_or_else(|e| e.into_inner()).entry(metric.to_string()).or_insert(why);
    }

    /// Why `metric` is refused, if it is.
    pub fn get(&self, metric: &str) -> Option<String> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).get(metric).cloned()
    }

    /// Every refused metric, with why.
    pub fn all(&self) -> std::collections::BTreeMap<String, String> {
        self.map.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the store remembers of a metric (the `L` record): its layout and the settings it
/// last ran with, for `tally check --against`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Its layout's text.
    pub layout: String,
    /// Its grace, ms (`None`: not recorded, a store of version 2).
    pub grace_ms: Option<i64>,
    /// Its retention, ms.
    pub retention_ms: Option<i64>,
    /// Its filter as written.
    pub filter: Option<String>,
    /// Its rebuild token.
    #[serde(default)]
    pub rebuild: Option<String>,
}

/// Format byte of a [`Manifest`] record.
const MANIFEST_FORMAT: u8 = 3;

impl Manifest {
    /// What `m` is now.
    pub fn of(m: &crate::topology::Metric) -> Manifest {
        Manifest {
            layout: m.layout.text.clone(),
            grace_ms: Some(m.grace_ms),
            retention_ms: Some(m.retention_ms),
            filter: m.filter_text.clone(),
            rebuild: m.rebuild.clone(),
        }
    }

    /// Versioned bytes (JSON, to be read by people too).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![MANIFEST_FORMAT];
        serde_json::to_writer(&mut out, self).expect("writing to a Vec cannot fail");
        out
    }

    /// Reads [`Manifest::encode`]'s bytes (`None`: another format).
    pub fn decode(bytes: &[u8]) -> Option<Manifest> {
        match bytes.split_first() {
            Some((&MANIFEST_FORMAT, json)) => serde_json::from_slice(json).ok(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::test_topology;

    fn metric(aggs: &str, window: &str) -> Layout {
        let topo =
            test_topology(&format!("[[metrics]]\nname = \"m\"\nsource = \"s\"\ngroup_by = [\"g\"]\naggregates = [{aggs}]\nwindow = {window}\n"));
        topo.metrics[0].layout.clone()
    }

    #[test]
    fn the_gate_reads_its_own_layout_and_refuses_another() {
        let tumbling = "{ type = \"tumbling\", size = \"1m\" }";
        let count = metric("\"count\"", tumbling);
        let value = StoredAggregate { max_offset: 4, states: vec![AggState::Count(7)] };
        let bytes = count.seal(&value);
        assert_eq!(count.open("m", b"k", &bytes).unwrap(), value);
        assert_eq!(max_offset_of(&bytes), Some(4));

        let sum = metric("\"sum(v) as count\"", tumbling);
        let err = sum.open("m", b"k", &bytes).unwrap_err().to_string();
        assert!(err.contains("metric `m`") && err.contains("sum(v)") && err.contains("layout"), "{err}");
        let wider = metric("\"count\"", "{ type = \"tumbling\", size = \"2m\" }");
        assert!(matches!(wider.open("m", b"k", &bytes), Err(StoreError::Layout { .. })), "same kinds, another window");
        assert_eq!(metric("\"count as n\"", tumbling).fingerprint, count.fingerprint, "an alias is not part of the layout");

        // A state of unknown layout (format 2) is read when its kinds fit, refused when not.
        let mut v2 = vec![2];
        v2.extend_from_slice(&bytes[STATE_HEADER_BYTES..]);
        assert_eq!(count.open("m", b"k", &v2).unwrap(), value);
        assert!(matches!(sum.open("m", b"k", &v2), Err(StoreError::Layout { .. })));
        let mut newer = bytes.clone();
        newer[0] = STATE_FORMAT + 1;
        assert!(matches!(count.open("m", b"k", &newer), Err(StoreError::Newer { .. })));
        assert!(count.open("m", b"k", &bytes[..5]).is_err());
    }
}

#[cfg(test)]
mod garbage {
    use super::*;
    use crate::store::PartitionMeta;

    /// Bytes no tally wrote — random, truncated or bit-flipped versions of real values —
    /// read back through every decoder of stored and restored bytes: errors, never a panic.
    #[test]
    fn no_stored_byte_panics_a_decoder() {
        let topo = crate::topology::test_topology(
            "[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\", \"distinct(v)\", \"top_n(k, 3)\", \"latest(v)\", \"sum(v)\"]\nwindow = { type = \"global\" }\n",
        );
        let m = &topo.metrics[0];
        let states = m.aggregates.iter().map(|a| AggState::new(&a.kind)).collect();
        let real = [
            m.layout.seal(&StoredAggregate { max_offset: 7, states }),
            PartitionMeta { next_offset: 3, marks: Some(vec![]), ..PartitionMeta::default() }.encode(),
            Manifest::of(m).encode(),
        ];
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for i in 0..20_000 {
            let mut bytes = real[i % real.len()].clone();
            match next() % 3 {
                0 => bytes.truncate((next() % (bytes.len() as u64 + 1)) as usize),
                1 => {
                    for _ in 0..1 + next() % 4 {
                        let at = (next() % bytes.len().max(1) as u64) as usize;
                        if let Some(b) = bytes.get_mut(at) {
                            *b ^= 1 << (next() % 8);
                        }
                    }
                }
                _ => bytes = (0..next() % 64).map(|_| next() as u8).collect(),
            }
            let _ = m.layout.open("m", b"k", &bytes);
            let _ = max_offset_of(&bytes);
            let _ = PartitionMeta::decode(b"k", &bytes);
            let _ = Manifest::decode(&bytes);
            let _ = crate::migrations::upcast_meta(&bytes);
            let _ = crate::migrations::store_v2_to_v3::meta(&bytes);
        }
    }
}
