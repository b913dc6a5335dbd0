//! Store version 2 → 3: every state carries the fingerprint of its metric's layout, every
//! position the marks of the metrics it covers, and every layout record the metric's
//! settings.
//!
//! Version 2 told a metric's layout only in the local layout record (`L` · metric → the
//! layout as text): a changelog restored into an empty store carried none, so states of a
//! changed metric were read under the new layout. Version 3 puts the layout into each state
//! value, where it survives compaction and travels with the changelog.
//!
//! | key | version 2 | version 3 |
//! |-----|-----------|-----------|
//! | `S` state | `2` · bincode | `3` · fingerprint (u64 BE) · the same bincode |
//! | `P` position | `2` or `3` · bincode | `4` · bincode, with `marks: None` |
//! | `L` layout | the layout, text | `3` · JSON [`crate::layout::Manifest`] |
//!
//! A version 2 layout record whose text is what version 2 wrote for the configured metric
//! becomes the metric's current layout, so its states keep being read; any other keeps its
//! text, whose fingerprint no configured metric has (refused at run, with both layouts named).

use serde::Deserialize;

use super::{MigrationError, StepReport};
use crate::layout::{fingerprint, Manifest, UNKNOWN};
use crate::store::{PartitionMeta, TablePin};
use crate::topology::{Metric, Topology};

const STEP: &str = "store_v2_to_v3";

/// A version 2 state value with `fp` as its layout's fingerprint.
pub fn state(v2: &[u8], fp: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(v2.len() + 8);
    out.push(3);
    out.extend_from_slice(&fp.to_be_bytes());
    out.extend_from_slice(v2.get(1..).unwrap_or_default());
    out
}

/// [`PartitionMeta`] as format 2 wrote it (before tables).
#[derive(Deserialize)]
struct MetaV2 {
    next_offset: i64,
    watermark: i64,
    max_event_time: i64,
    changelog_offset: Option<i64>,
}

/// [`PartitionMeta`] as format 3 wrote it (with tables, before marks).
#[derive(Deserialize, serde::Serialize)]
struct MetaV3 {
    next_offset: i64,
    watermark: i64,
    max_event_time: i64,
    changelog_offset: Option<i64>,
    pin: Vec<TablePin>,
    joined: Vec<TablePin>,
    replay_until: i64,
}

/// `meta` in format 3, for a replica still running store version 2 (`state.upgrade_from`):
/// its marks are left out.
pub fn meta_v3(meta: &PartitionMeta) -> Vec<u8> {
    let PartitionMeta { next_offset, watermark, max_event_time, changelog_offset, pin, joined, replay_until, marks: _ } = meta.clone();
    let v3 = MetaV3 { next_offset, watermark, max_event_time, changelog_offset, pin, joined, replay_until };
    let mut out = vec![3];
    bincode::serde::encode_into_std_write(&v3, &mut out, bincode::config::standard()).expect("writing to a Vec cannot fail");
    out
}

fn decode_exact<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Option<T> {
    crate::store::decode_body(body).ok()
}

/// A format 2 or 3 position in the current format (`None`: unreadable).
pub fn meta(bytes: &[u8]) -> Option<Vec<u8>> {
    let body = bytes.get(1..)?;
    let meta = match bytes.first()? {
        2 => {
            let MetaV2 { next_offset, watermark, max_event_time, changelog_offset } = decode_exact(body)?;
            PartitionMeta { next_offset, watermark, max_event_time, changelog_offset, ..PartitionMeta::default() }
        }
        3 => {
            let MetaV3 { next_offset, watermark, max_event_time, changelog_offset, pin, joined, replay_until } = decode_exact(body)?;
            PartitionMeta { next_offset, watermark, max_event_time, changelog_offset, pin, joined, replay_until, marks: None }
        }
        _ => return None,
    };
    Some(meta.encode())
}

/// The layout text version 2 recorded for `m` (frozen: it is what old stores hold).
pub fn layout_v2(m: &Metric) -> String {
    use crate::aggregate::AggKind;
    let aggs: Vec<String> = m
        .aggregates
        .iter()
        .map(|a| match a.kind {
            AggKind::Count => "count".to_string(),
            AggKind::Sum { .. } => "sum".to_string(),
            AggKind::Distinct { precision, .. } => format!("distinct/{precision}"),
            AggKind::Latest { .. } => "latest".to_string(),
            AggKind::TopN { by, .. } => format!("top_n/{}", if by.is_some() { "sum" } else { "count" }),
        })
        .collect();
    let zone = serde_json::to_value(m.window.zone).unwrap_or_default();
    format!("{} | {:?} {} | keys/2", aggs.join(","), m.window.kind, zone.as_str().unwrap_or_default())
}

fn name_of(key: &[u8]) -> String {
    let len = key.get(1).copied().unwrap_or_default() as usize;
    String::from_utf8_lossy(key.get(2..2 + len).unwrap_or_default()).into_owned()
}

fn unreadable(key: &[u8], why: &str) -> MigrationError {
    MigrationError::Unreadable { step: STEP, key: String::from_utf8_lossy(key).into_owned(), why: why.to_string() }
}

/// Runs the step over `tree`: layout records first (they say each metric's fingerprint),
/// then states and positions.
pub fn run(tree: &sled::Tree, topo: &Topology) -> Result<StepReport, MigrationError> {
    let mut report = StepReport::default();
    let mut fingerprints = std::collections::HashMap::new();
    for kv in tree.scan_prefix(b"L") {
        let (k, v) = kv?;
        let name = name_of(&k);
        if let Some(m) = Manifest::decode(&v) {
            fingerprints.insert(name, fingerprint(&m.layout));
            report.unchanged += 1;
            continue;
        }
        let text = std::str::from_utf8(&v).map_err(|_| unreadable(&k, "a version 2 layout record is text"))?;
        let manifest = match topo.metric(&name) {
            Some((_, m)) if layout_v2(m) == text => Manifest::of(m),
            _ => Manifest { layout: text.to_string(), ..Manifest::default() },
        };
        fingerprints.insert(name, fingerprint(&manifest.layout));
        tree.insert(&k, manifest.encode())?;
        report.rewritten += 1;
    }
    for kv in tree.scan_prefix(b"S") {
        let (k, v) = kv?;
        match v.first() {
            Some(2) => {
                tree.insert(&k, state(&v, fingerprints.get(&name_of(&k)).copied().unwrap_or(UNKNOWN)))?;
                report.rewritten += 1;
            }
            Some(3) => report.unchanged += 1,
            other => return Err(unreadable(&k, &format!("state format {other:?}"))),
        }
    }
    for kv in tree.scan_prefix(b"P") {
        let (k, v) = kv?;
        match v.first() {
            Some(2 | 3) => {
                tree.insert(&k, meta(&v).ok_or_else(|| unreadable(&k, "a format 2 or 3 position does not decode"))?)?;
                report.rewritten += 1;
            }
            Some(4) => report.unchanged += 1,
            other => return Err(unreadable(&k, &format!("position format {other:?}"))),
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `state.upgrade_from = 2` writes is what version 2 reads: a format 3 position
    /// (marks left out) and format 2 states.
    #[test]
    fn the_bridge_writes_what_version_2_reads() {
        let meta = PartitionMeta {
            next_offset: 7,
            watermark: 5,
            pin: vec![TablePin { table: "t".into(), next: vec![3] }],
            marks: Some(vec![crate::layout::MetricMark {
                metric: "m".into(),
                layout: "count".into(),
                expired_before: Some(1),
                rebuild: None,
                rebuilding: None,
            }]),
            ..PartitionMeta::default()
        };
        let bridged = meta_v3(&meta);
        assert_eq!(bridged[0], 3);
        let back = PartitionMeta::decode(b"k", &bridged).unwrap();
        assert_eq!(back, PartitionMeta { marks: None, ..meta });
        assert!(decode_exact::<MetaV3>(&bridged[1..]).is_some(), "version 2's own decoder reads it whole");
        let topo = crate::topology::test_topology(
            "[state]\nupgrade_from = 2\n[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"global\" }\n",
        );
        let sealed =
            topo.metrics[0].layout.seal(&crate::store::StoredAggregate { max_offset: 1, states: vec![crate::aggregate::AggState::Count(2)] });
        assert_eq!(sealed[0], 2, "format 2, without the fingerprint");
        assert_eq!(state(&sealed, 9)[1..9], 9u64.to_be_bytes(), "and it migrates like any other");
    }
}
