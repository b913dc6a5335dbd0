//! Config changes as a plan: what a restart with a new config would do to a stored state,
//! metric by metric (`tally check --config NEW --against STATE_DIR`).
//!
//! A metric is compared with what the store remembers of it (its
//! [`crate::layout::Manifest`]) and with the positions' marks:
//!
//! * **unchanged**, or **compatible** — filter, `having`, titles, emit: the state is read as
//!   it is (a changed filter applies to records from the stored positions on);
//! * **changes windows** — grace or retention: the state is kept, and the plan says which
//!   windows the change reaches (expired slices never come back: see the horizons);
//! * **incompatible** — the layout (aggregates, fields, group-by, window, zone), or states
//!   that miss records: a restart refuses the metric, the others go on; the safe routes are
//!   a new name or a rebuild;
//! * **rebuilds** — a new `rebuild` token: the state is recomputed from the source;
//! * **new** or **removed**.

use std::fmt::Write as _;

use crate::layout::Manifest;
use crate::store::{Store, StoreError};
use crate::topology::{Metric, Topology};

/// What a restart does to one metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing that matters to the state changed.
    Unchanged,
    /// Read as stored; only what counts from now on changes.
    Compatible,
    /// Kept, but which windows stay open or stored changes.
    ChangesWindows,
    /// Refused at restart: the stored states are another layout.
    Incompatible,
    /// Dropped and recomputed from the source's retained records (a new rebuild token).
    Rebuilds,
    /// Not in the store: counted from the source's stored positions on.
    New,
    /// In the store, not in the config: its state stays, unused.
    Removed,
}

impl Verdict {
    fn word(self) -> &'static str {
        match self {
            Verdict::Unchanged => "unchanged",
            Verdict::Compatible => "compatible",
            Verdict::ChangesWindows => "changes windows",
            Verdict::Incompatible => "incompatible",
            Verdict::Rebuilds => "rebuilds",
            Verdict::New => "new",
            Verdict::Removed => "removed",
        }
    }
}

/// One metric's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricPlan {
    /// The metric.
    pub metric: String,
    /// What happens to it.
    pub verdict: Verdict,
    /// Why, and what to do, one line each.
    pub notes: Vec<String>,
}

/// The plan of running `topo` on `store`.
pub fn plan(topo: &Topology, store: &Store) -> Result<Vec<MetricPlan>, StoreError> {
    let stored = store.manifests()?;
    let mut out = Vec::new();
    for m in &topo.metrics {
        let was = stored.iter().find(|(n, _)| *n == m.name).map(|(_, w)| w);
        let plan = match was {
            Some(was) => compare(topo, store, m, was)?,
            None => MetricPlan {
                metric: m.name.clone(),
                verdict: Verdict::New,
                notes: vec![match m.rebuild {
                    Some(_) => "no stored state: computed over the records the source still holds (it has a `rebuild` token)".into(),
                    None => "no stored state: counts from the source's stored positions on".into(),
                }],
            },
        };
        let plan = match refused_on(topo, store, m)? {
            Some(why)
                if m.rebuild.is_none()
                    && matches!(plan.verdict, Verdict::Unchanged | Verdict::Compatible | Verdict::ChangesWindows | Verdict::New) =>
            {
                MetricPlan {
                    metric: m.name.clone(),
                    verdict: Verdict::Incompatible,
                    notes: vec![format!("{why}: a restart refuses it; give it a new name or a `rebuild` token")],
                }
            }
            _ => plan,
        };
        out.push(plan);
    }
    for d in &topo.derived {
        let over = [d.numerator.0, d.denominator.0].map(|mi| &topo.metrics[mi].name);
        if let Some(m) = over.iter().find(|m| out.iter().any(|p: &MetricPlan| p.metric.as_str() == m.as_str() && p.verdict == Verdict::Incompatible))
        {
            out.push(MetricPlan {
                metric: d.name.clone(),
                verdict: Verdict::Incompatible,
                notes: vec![format!("a ratio over `{m}`: refused with it")],
            });
        }
    }
    for (name, _) in stored.iter().filter(|(n, _)| topo.metric(n).is_none()) {
        out.push(MetricPlan {
            metric: name.clone(),
            verdict: Verdict::Removed,
            notes: vec![
                "not in the config: its state stays in the store, unread (a metric of this name later reads it if its layout is the same)".into()
            ],
        });
    }
    Ok(out)
}

fn compare(topo: &Topology, store: &Store, m: &Metric, was: &Manifest) -> Result<MetricPlan, StoreError> {
    let mut notes = Vec::new();
    if let Some(token) = m.rebuild.as_ref().filter(|t| was.rebuild.as_ref() != Some(*t)) {
        if was.layout != m.layout.text {
            notes.push(format!("layout `{}` → `{}`", was.layout, m.layout.text));
        }
        notes.push(format!(
            "rebuild `{token}`: its state is dropped and recomputed from the records the source topic `{}` still holds, partition by partition \
             (answers 503 `rebuilding` with the offset reached meanwhile); the other metrics run on",
            topo.sources[m.source].topic
        ));
        return Ok(MetricPlan { metric: m.name.clone(), verdict: Verdict::Rebuilds, notes });
    }
    // An unmigrated store of version 2 holds the layout as version 2 wrote it; its migration
    // takes it as this metric's.
    if was.layout != m.layout.text && was.layout != crate::migrations::store_v2_to_v3::layout_v2(m) {
        notes.push(format!("stored as   `{}`", was.layout));
        notes.push(format!("configured  `{}`", m.layout.text));
        notes.push(format!(
            "a restart refuses `{}` (answers 409 naming both layouts); the other metrics go on. Safe routes: give the changed metric a new name \
             (it counts from the source's stored positions on; the old state stays under `{}`), or set `rebuild = \"1\"` on it \
             (its state is recomputed from the source topic's retained records)",
            m.name, m.name
        ));
        return Ok(MetricPlan { metric: m.name.clone(), verdict: Verdict::Incompatible, notes });
    }
    let mut verdict = Verdict::Unchanged;
    // A store of version 2 recorded no filter (nor grace): no change can be told.
    if was.grace_ms.is_some() && was.filter != m.filter_text {
        verdict = Verdict::Compatible;
        notes.push(format!(
            "filter {} → {}: records from the stored positions on are filtered the new way; stored windows keep what the old filter let in",
            shown(&was.filter),
            shown(&m.filter_text)
        ));
    }
    let (horizon, watermark) = progress(topo, store, m)?;
    if let Some(g) = was.grace_ms.filter(|g| *g != m.grace_ms) {
        verdict = Verdict::ChangesWindows;
        notes.push(grace_note(g, m.grace_ms, watermark));
    }
    if let Some(r) = was.retention_ms.filter(|r| *r != m.retention_ms) {
        verdict = Verdict::ChangesWindows;
        notes.push(retention_note(r, m, horizon, watermark));
    }
    Ok(MetricPlan { metric: m.name.clone(), verdict, notes })
}

fn shown(f: &Option<String>) -> String {
    f.as_deref().map_or("(none)".into(), |f| format!("`{f}`"))
}

/// A partition whose position's marks leave `m` out while states of it are stored.
/// Why a restart would refuse `m` by what the positions say, as `TaskSet` judges them: a
/// mark of another layout, or states a position's marks leave out.
fn refused_on(topo: &Topology, store: &Store, m: &Metric) -> Result<Option<String>, StoreError> {
    for (p, meta) in store.partitions(&topo.sources[m.source].name)? {
        match meta.mark(&m.name) {
            Some(mark) if mark.layout != m.layout.text => return Ok(Some(format!("partition {p} holds it as `{}`", mark.layout))),
            None if meta.marks.is_some() && store.has_states_before(m, p, meta.next_offset)? => {
                let why = format!(
                    "its states on partition {p} stop before the stored position (records were processed while it was refused or not configured)"
                );
                return Ok(Some(why));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// The metric's expiry horizon (latest over partitions) and highest watermark, as stored.
fn progress(topo: &Topology, store: &Store, m: &Metric) -> Result<(Option<i64>, Option<i64>), StoreError> {
    let mut horizon: Option<i64> = None;
    let mut watermark: Option<i64> = None;
    for (_, meta) in store.partitions(&topo.sources[m.source].name)? {
        horizon = horizon.max(meta.mark(&m.name).and_then(|mk| mk.expired_before));
        watermark = watermark.max(Some(meta.watermark).filter(|w| *w != crate::task::NO_WATERMARK));
    }
    Ok((horizon, watermark))
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or(ms.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

fn duration(ms: i64) -> String {
    crate::config::format_duration_ms(ms)
}

fn grace_note(was: i64, now: i64, watermark: Option<i64>) -> String {
    let at = watermark.map_or(String::new(), |w| format!(" (stored watermark {})", time(w)));
    if now > was {
        format!(
            "grace {} → {}: windows that closed under the old grace but end within {} of the watermark{at} take records again; \
             records dropped as late while they were closed are not counted (they went to the late topic)",
            duration(was),
            duration(now),
            duration(now)
        )
    } else {
        format!("grace {} → {}: windows close sooner; records later than the new grace go to the late topic", duration(was), duration(now))
    }
}

fn retention_note(was: i64, m: &Metric, horizon: Option<i64>, watermark: Option<i64>) -> String {
    let kept = horizon.map_or("nothing has expired yet".to_string(), |h| format!("slices before {} have expired and stay unanswered", time(h)));
    if m.retention_ms > was {
        format!(
            "retention {} → {}: {kept}; windows after that are kept {} after they end",
            duration(was),
            duration(m.retention_ms),
            duration(m.retention_ms)
        )
    } else {
        let cut = watermark.and_then(|w| m.window.expired_before(w, m.retention_ms));
        let cut = cut.map_or(String::new(), |c| format!(" (at the stored watermark: slices before {})", time(c)));
        format!(
            "retention {} → {}: windows ending more than {} ago are deleted at the first flush{cut}",
            duration(was),
            duration(m.retention_ms),
            duration(m.retention_ms)
        )
    }
}

/// The plan in words, for `tally check --against`; `version`: the store's, for a state directory.
pub fn render(against: &str, version: Option<u32>, plans: &[MetricPlan]) -> String {
    let mut out = String::new();
    let _ = match version {
        Some(v) => writeln!(out, "against {against} (store version {v}):"),
        None => writeln!(out, "against {against}:"),
    };
    let width = plans.iter().map(|p| p.metric.len()).max().unwrap_or(0);
    for p in plans {
        let _ = writeln!(out, "  {:width$}  {}", p.metric, p.verdict.word());
        for n in &p.notes {
            let _ = writeln!(out, "  {:width$}    {n}", "");
        }
    }
    let refused: Vec<&str> = plans.iter().filter(|p| p.verdict == Verdict::Incompatible).map(|p| p.metric.as_str()).collect();
    let _ = match refused.len() {
        0 => writeln!(out, "a restart with this config keeps every stored metric"),
        _ => writeln!(out, "a restart with this config refuses {}; the others run", refused.join(", ")),
    };
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::test_topology;

    const BASE: &str =
        "[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\nretention = \"1h\"\n";

    fn plan_of(before: &str, after: &str) -> Vec<MetricPlan> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for m in &test_topology(before).metrics {
            store.put_manifest(m).unwrap();
        }
        plan(&test_topology(after), &store).unwrap()
    }

    #[test]
    fn each_kind_of_change_gets_its_verdict() {
        assert_eq!(plan_of(BASE, BASE)[0].verdict, Verdict::Unchanged);
        assert_eq!(plan_of(BASE, &BASE.replace("\"count\"", "\"count as n\"")).remove(0).verdict, Verdict::Unchanged, "an alias");
        let changed = plan_of(BASE, &BASE.replace("\"count\"", "\"sum(v)\"")).remove(0);
        assert_eq!(changed.verdict, Verdict::Incompatible);
        assert!(changed.notes.iter().any(|n| n.contains("new name")), "{changed:?}");
        assert_eq!(plan_of(BASE, &BASE.replace("1m", "5m"))[0].verdict, Verdict::Incompatible, "a window");
        let longer = plan_of(BASE, &BASE.replace("1h", "1d")).remove(0);
        assert_eq!(longer.verdict, Verdict::ChangesWindows);
        assert!(longer.notes[0].contains("retention 1h → 1d"), "{longer:?}");
        let filtered = plan_of(&format!("{BASE}filter = \"v = 1\"\n"), &format!("{BASE}filter = \"v = 2\"\n")).remove(0);
        assert_eq!(filtered.verdict, Verdict::Compatible);
        let rebuilt = plan_of(BASE, &format!("{}rebuild = \"1\"\n", BASE.replace("\"count\"", "\"sum(v)\""))).remove(0);
        assert_eq!(rebuilt.verdict, Verdict::Rebuilds, "{rebuilt:?}");
        let renamed = plan_of(BASE, &BASE.replace("name = \"m\"", "name = \"m2\""));
        assert_eq!(renamed.iter().map(|p| p.verdict).collect::<Vec<_>>(), vec![Verdict::New, Verdict::Removed]);
    }

    /// A metric whose states a position's marks leave out missed records: the plan says a
    /// restart refuses it, though its layout is the same.
    #[test]
    fn a_metric_whose_states_miss_records_is_incompatible() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let topo = test_topology(BASE);
        let m = &topo.metrics[0];
        store.put_manifest(m).unwrap();
        let mut batch = crate::store::WriteBatch::default();
        let mut k = Vec::new();
        crate::store::state_key_prefix(&mut k, "m", 0, 0, crate::store::EVERY_WINDOW);
        batch.put_encoded(&k, &m.layout.seal(&crate::store::StoredAggregate { max_offset: 0, states: vec![crate::aggregate::AggState::Count(1)] }));
        batch.put_meta("s", 0, &crate::store::PartitionMeta { next_offset: 5, marks: Some(vec![]), ..Default::default() });
        store.apply(batch).unwrap();
        let plan = plan(&topo, &store).unwrap().remove(0);
        assert_eq!(plan.verdict, Verdict::Incompatible, "{plan:?}");
    }
}
