//! Differential tests: random configs and random streams through the real processing core,
//! sled store, changelog restore, query engine and result view, every answer compared with
//! the reference model (`tests/model`). Streams carry records in and out of order, within
//! and beyond the watermark delay, far in the past, of the wrong type, without fields, and
//! idle steps; runs crash (losing the write-back cache), lose the disk (restoring from the
//! changelog), tear flushes (changes in the changelog, no position) and process records
//! while a flush is sealed but not yet in the store (crashing there too). A failing case
//! prints its seed and a minimised input.
//!
//! `TALLY_DIFF_CASES` sets the number of cases (default sized for about two minutes of CI),
//! `TALLY_DIFF_SEED` runs one seed (`7`) or a range of them (`1000..2000`).

mod common;
mod model;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Instant;

use serde_json::{json, Value as Json};
use tally::changelog::{plan, ChangeSink, Plan, Restoration};
use tally::config::Config;
use tally::ownership::{Ownership, PartitionState};
use tally::query::{Ask, QueryEngine, Range};
use tally::results::ResultView;
use tally::store::Store;
use tally::table::store::{TableChange, TableRecord};
use tally::table::{decode_record, Tables};
use tally::task::{Outcome, SealedFlush, TaskSet};
use tally::topology::Topology;

use common::changelog::TearingLog;
use common::Rng;
use model::check::{Diffs, Range as MRange};
use model::spec::{Agg, Spec, WindowSpec};
use model::{Model, Step};

/// Cases per run: about two minutes of an unoptimised build on the CI machine.
const CASES: u64 = 1_500;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

/// What the harness does after a step, the first time it runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Nothing,
    Flush,
    /// Drop the tasks and their cache unflushed; restore what the changelog has beyond the
    /// local checkpoint, resume from the stored positions.
    Crash,
    /// As a crash, on an empty disk: everything comes back from the changelog.
    LoseDisk,
    /// A flush whose changes reach the changelog but not its positions, then a crash.
    TornFlush,
    /// A flush sealed and sent to the changelog, its store write left for the next action:
    /// records are processed meanwhile, as while a flush awaits its acknowledgements; a crash
    /// drops it (the changelog has it, the store not).
    Seal,
}

#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    toml: String,
    partitions: i32,
    steps: Vec<(Step, Action)>,
    /// Records of the table `tt` (key, value; `None`: a tombstone) produced before each
    /// step, by step index: table updates interleaved with the stream.
    table: BTreeMap<usize, Vec<TableUpdate>>,
}

/// A record of the table's topic: key and value (`None`: a tombstone).
type TableUpdate = (Vec<u8>, Option<Vec<u8>>);

const ZONES: [&str; 6] = ["UTC", "America/New_York", "Europe/Berlin", "Asia/Shanghai", "Australia/Lord_Howe", "Antarctica/Casey"];
/// Stream starts: around New York's and Berlin's changes of 2021, Casey's three-hour one of
/// 2023, and an ordinary day.
const BASES: [i64; 5] = [1_636_257_600_000, 1_615_683_600_000, 1_635_634_800_000, 1_678_280_000_000, 1_630_915_200_000];

fn dur(ms: i64) -> String {
    if ms % HOUR == 0 {
        format!("{}h", ms / HOUR)
    } else if ms % MIN == 0 {
        format!("{}m", ms / MIN)
    } else {
        format!("{}ms", ms)
    }
}

/// A random filter over the generated fields.
fn filter(r: &mut Rng, depth: u32) -> String {
    if depth > 0 && r.chance(0.4) {
        let (a, b) = (filter(r, depth - 1), filter(r, depth - 1));
        return match r.below(3) {
            0 => format!("({a} and {b})"),
            1 => format!("({a} or {b})"),
            _ => format!("not ({a})"),
        };
    }
    match r.below(7) {
        0 => format!("k = '{}'", r.pick(&["a", "b", "c"])),
        1 => format!("g >= {}", r.range(0, 3)),
        2 => format!("v > {}", r.range(-2, 12)),
        3 => "flag = true".into(),
        4 => "k in ('a', 'c')".into(),
        5 => format!("u != 'u{}'", r.range(0, 5)),
        _ => "v != null".into(),
    }
}

/// A random config: one source, 1–4 metrics, maybe a ratio.
fn config(r: &mut Rng, time_kind: u64, unit: i64) -> String {
    let mut t = String::from("[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\napplication_id = \"diff\"\n[[sources]]\nname = \"s\"\ntopic = \"t\"\n");
    let zone = *r.pick(&ZONES);
    let _ = writeln!(
        t,
        "{}",
        match time_kind {
            0 => "event_time = { field = \"ts\", kind = \"epoch_millis\" }".to_string(),
            1 => format!("event_time = {{ field = \"when\", format = \"%Y-%m-%d %H:%M:%S\", timezone = \"{zone}\" }}"),
            _ => format!("event_time = {{ kind = \"parts\", parts = {{ month = \"mo\", day = \"d\", hour = \"h\" }}, timezone = \"{zone}\" }}"),
        }
    );
    let _ = writeln!(t, "watermark_delay = \"{}\"", dur(unit * r.range(0, 3)));
    let _ = writeln!(t, "grace = \"{}\"", dur(unit / 2 * r.range(0, 2)));
    if r.chance(0.3) {
        let _ = writeln!(t, "max_ahead = \"1h\"");
    }
    let mut types = Vec::new();
    if r.chance(0.5) {
        types.push(format!("v = \"{}\"", r.pick(&["int", "float", "DOUBLE", "BIGINT"])));
    }
    if r.chance(0.4) {
        types.push(format!("g = \"{}\"", r.pick(&["int", "int not null", "string"])));
    }
    if r.chance(0.3) {
        types.push("k = \"VARCHAR\"".into());
    }
    if r.chance(0.2) {
        types.push("flag = \"boolean\"".into());
    }
    if !types.is_empty() {
        let _ = writeln!(t, "types = {{ {} }}", types.join(", "));
    }
    let lookup = r.chance(0.3);
    if lookup {
        let _ = writeln!(t, "lookups = [{{ table = \"tt\", key = \"k\", missing = \"{}\" }}]", r.pick(&["skip", "null", "dead_letter"]));
    }
    let metrics = r.range(1, 4);
    let mut windowed = Vec::new();
    for i in 0..metrics {
        let wzone = if r.chance(0.5) { None } else { Some(*r.pick(&ZONES)) };
        let (window, global) = match r.below(5) {
            0 => (format!("type = \"tumbling\", size = \"{}\"", dur(unit * r.range(1, 3))), false),
            1 | 2 => {
                let slide = unit * r.range(1, 2);
                (format!("type = \"hopping\", size = \"{}\", slide = \"{}\"", dur(slide * r.range(1, 4) + unit * r.range(0, 1)), dur(slide)), false)
            }
            3 => (format!("type = \"cumulate\", step = \"{}\", max = \"{}\"", dur(unit), dur(unit * r.range(2, 8))), false),
            _ => ("type = \"global\"".into(), true),
        };
        let window = match wzone {
            Some(z) if !global => format!("{{ {window}, timezone = \"{z}\" }}"),
            _ => format!("{{ {window} }}"),
        };
        let group = match r.below(if lookup { 6 } else { 4 }) {
            0 => "[]",
            1 => "[\"k\"]",
            2 => "[\"g\"]",
            3 => "[\"k\", \"g\"]",
            4 => "[\"tt.cat\"]",
            _ => "[\"tt.cat\", \"g\"]",
        };
        let mut aggs = vec!["count as n".to_string()];
        let choices = [
            "sum(v) as total",
            "distinct(u) as users",
            "distinct(u, 6) as rough",
            "latest(v) as last_v",
            "latest(k) as last_k",
            "top_n(k, 2) as top_k",
            "top_n(u, 3, sum(v)) as spenders",
        ];
        for _ in 0..r.range(0, 3) {
            let a = r.pick(&choices).to_string();
            if !aggs.contains(&a) {
                aggs.push(a);
            }
        }
        let _ = writeln!(t, "[[metrics]]\nname = \"m{i}\"\nsource = \"s\"\nwindow = {window}\ngroup_by = {group}");
        let _ = writeln!(t, "aggregates = [{}]", aggs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", "));
        if lookup && r.chance(0.2) {
            let _ = writeln!(t, "filter = \"tt.cat != 'x'\"");
        } else if r.chance(0.4) {
            let _ = writeln!(t, "filter = \"{}\"", filter(r, 2));
        }
        let grace = unit / 2 * r.range(0, 2);
        if r.chance(0.4) {
            let _ = writeln!(t, "grace = \"{}\"", dur(grace));
        }
        if !global && r.chance(0.5) {
            let _ = writeln!(t, "retention = \"{}\"", dur(unit * 2 + unit * r.range(0, 6)));
        }
        if r.chance(0.2) {
            let _ = writeln!(t, "having = \"n >= 2\"");
        }
        if global {
            let _ = writeln!(t, "emit = \"{}\"", r.pick(&["updates", "none"]));
        } else if r.chance(0.2) {
            let _ = writeln!(t, "emit = \"updates\"");
        }
        if !global {
            windowed.push((i, window, group));
        }
    }
    if let Some((i, window, group)) = windowed.first().cloned().filter(|_| r.chance(0.5)) {
        // A twin of a windowed metric over fewer records, and their ratio.
        let _ = writeln!(t, "[[metrics]]\nname = \"part\"\nsource = \"s\"\nwindow = {window}\ngroup_by = {group}\naggregates = [\"count as n\", \"sum(v) as total\"]\nfilter = \"{}\"", filter(r, 1));
        let _ = writeln!(t, "grace = \"{}\"\nretention = \"{}\"", dur(unit / 2 * r.range(0, 2)), dur(unit * r.range(2, 8)));
        let _ =
            writeln!(t, "[[derived]]\nname = \"share\"\nratio = {{ numerator = \"part.{}\", denominator = \"m{i}.n\" }}", r.pick(&["n", "total"]));
    }
    if lookup {
        let _ = writeln!(t, "[[tables]]\nname = \"tt\"\ntopic = \"tt\"\nfields = [\"cat\"]");
    }
    t
}

/// A random record of the table `tt`: a key the stream's `k` takes (as text or a number),
/// a category, sometimes a tombstone or a value that is not an object.
fn table_update(r: &mut Rng) -> TableUpdate {
    let key = r.pick(&["a", "b", "c", "1", "2", "\"a\""]).as_bytes().to_vec();
    let value = match r.below(10) {
        0 => None,
        1 => Some(b"[1]".to_vec()),
        2 => Some(br#"{"cat": 7}"#.to_vec()),
        _ => Some(format!(r#"{{"cat": "{}"}}"#, r.pick(&["x", "y", "z"])).into_bytes()),
    };
    (key, value)
}

/// Local text of instant `t` in `zone`, as the `when` field carries it.
fn local_text(t: i64, zone: &str) -> String {
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    chrono::DateTime::from_timestamp_millis(t).unwrap().with_timezone(&tz).format("%Y-%m-%d %H:%M:%S").to_string()
}

fn local_parts(t: i64, zone: &str) -> (u32, u32, u32) {
    use chrono::{Datelike, Timelike};
    let tz: chrono_tz::Tz = zone.parse().unwrap();
    let d = chrono::DateTime::from_timestamp_millis(t).unwrap().with_timezone(&tz);
    (d.month(), d.day(), d.hour())
}

/// A random record's payload at event time `t`.
fn payload(r: &mut Rng, t: i64, time_kind: u64, zone: &str) -> Vec<u8> {
    if r.chance(0.02) {
        return r.pick(&[&b"{oops"[..], b"[1, 2]", b"\"text\"", b""]).to_vec();
    }
    let mut o = serde_json::Map::new();
    match time_kind {
        0 => {
            let v = if r.chance(0.1) { json!(t.to_string()) } else { json!(t) };
            if !r.chance(0.01) {
                o.insert("ts".into(), v);
            }
        }
        1 => {
            let text = match r.below(50) {
                0 => "yesterday".to_string(),
                // Unpadded fields, as some producers write them.
                1 => local_text(t, zone).replace("-0", "-").replace(" 0", " "),
                _ => local_text(t, zone),
            };
            o.insert("when".into(), json!(text));
        }
        _ => {
            let (mo, d, h) = local_parts(t, zone);
            o.insert("mo".into(), json!(mo));
            o.insert("d".into(), if r.chance(0.05) { json!(d.to_string()) } else { json!(d) });
            o.insert("h".into(), json!(h));
        }
    }
    let k = r.pick(&["a", "b", "c"]);
    o.insert("k".into(), if r.chance(0.1) { json!(r.range(1, 3)) } else { json!(k) });
    if !r.chance(0.05) {
        o.insert("g".into(), if r.chance(0.1) { json!(r.range(0, 3).to_string()) } else { json!(r.range(0, 3)) });
    }
    let v = match r.below(12) {
        0 => json!(r.range(0, 20) as f64 + 0.5),
        1 => json!(r.range(0, 9).to_string()),
        2 => json!("abc"),
        3 => Json::Null,
        _ => json!(r.range(-5, 20)),
    };
    if !r.chance(0.05) {
        o.insert("v".into(), v);
    }
    o.insert("u".into(), if r.chance(0.2) { json!(r.range(0, 30)) } else { json!(format!("u{}", r.range(0, 30))) });
    o.insert("flag".into(), if r.chance(0.05) { json!("TRUE") } else { json!(r.chance(0.5)) });
    serde_json::to_vec(&Json::Object(o)).unwrap()
}

fn generate(seed: u64) -> Case {
    let mut r = Rng(seed);
    let time_kind = match r.below(10) {
        0..=5 => 0,
        6..=8 => 1,
        _ => 2,
    };
    let unit = if time_kind == 2 { HOUR } else { *r.pick(&[MIN, 10 * MIN, HOUR]) };
    let mut toml = config(&mut r, time_kind, unit);
    if seed.is_multiple_of(3) {
        // A cache that lets every entry go after each flush: each record after it reads its
        // aggregate back from the store.
        toml.push_str("[state]\ncache_max_bytes = 1\n");
    }
    let zone = toml.split("timezone = \"").nth(1).map_or("UTC", |s| s.split('"').next().unwrap()).to_string();
    let delay = Spec::parse(&toml).sources[0].delay_ms;
    let partitions = r.range(1, 3) as i32;
    let n = r.range(20, 250);
    let base = *r.pick(&BASES) + r.range(-3, 3) * unit;
    let step = (unit * r.range(10, 40)) / n;
    let mut steps = Vec::new();
    let mut table: BTreeMap<usize, Vec<TableUpdate>> = BTreeMap::new();
    if toml.contains("[[tables]]") {
        table.insert(0, (0..3).map(|_| table_update(&mut r)).collect());
    }
    let mut highest = i64::MIN;
    for i in 0..n {
        if !table.is_empty() && r.chance(0.05) {
            table.entry(steps.len()).or_default().push(table_update(&mut r));
        }
        let mut t = base + i * step + r.range(0, step.max(1));
        if r.chance(0.2) {
            t -= r.range(0, 3 * delay + 2 * unit);
        } else if r.chance(0.03) {
            t -= unit * r.range(10, 50);
        }
        highest = highest.max(t);
        let partition = r.below(partitions as u64) as i32;
        let kafka_ts = match r.below(50) {
            0 => None,
            1 => Some(t - 3 * HOUR),
            _ => Some(t + r.range(0, 5_000)),
        };
        let action = match r.below(1000) {
            0..=4 => Action::Crash,
            5..=7 => Action::LoseDisk,
            8..=10 => Action::TornFlush,
            11..=70 => Action::Flush,
            71..=130 => Action::Seal,
            _ => Action::Nothing,
        };
        steps.push((Step::Record { partition, kafka_ts, payload: payload(&mut r, t, time_kind, &zone) }, action));
        if r.chance(0.01) {
            let partition = r.below(partitions as u64) as i32;
            steps.push((Step::Idle { partition, watermark: highest - delay }, Action::Nothing));
        }
    }
    Case { seed, toml, partitions, steps, table }
}

/// Tally's side of a run: tasks over a store, its changelog and a result view.
struct Tally {
    topo: Arc<Topology>,
    dir: tempfile::TempDir,
    disks: u32,
    store: Store,
    /// The global tables, in the store; a lost disk loses them too, and they are read again
    /// from `table_log` (the table's topic) as a fresh replica would.
    tables: Arc<Tables>,
    table_log: Vec<TableRecord>,
    tasks: TaskSet,
    log: TearingLog,
    /// A flush sealed and sent, not yet in the store.
    sealed: Option<SealedFlush>,
    view: ResultView,
    read: Vec<usize>,
    rows: Vec<Json>,
    partitions: i32,
}

impl Tally {
    fn new(topo: Arc<Topology>, partitions: i32) -> Result<Tally, String> {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("disk0")).map_err(|e| e.to_string())?;
        let mut view = ResultView::open(Arc::clone(&topo), &dir.path().join("view"), &[partitions]).map_err(|e| e.to_string())?;
        // Built along with the changelog: nothing of it is missing.
        view.caught_up().map_err(|e| e.to_string())?;
        let tables = open_tables(&topo, &store, &[])?;
        let tasks = TaskSet::with_tables(Arc::clone(&topo), store.clone(), Arc::clone(&tables));
        let log = TearingLog::new(partitions as usize);
        let read = vec![0; partitions as usize];
        let mut t =
            Tally { topo, dir, disks: 0, store, tables, table_log: vec![], tasks, log, sealed: None, view, read, rows: Vec::new(), partitions };
        for p in 0..partitions {
            t.tasks.assign(0, p).map_err(|e| e.to_string())?;
        }
        // As the consumer does: the pin of a partition without a position goes on record first.
        t.flush()?;
        Ok(t)
    }

    /// Produces `updates` to the table's topic; the table loader decodes and applies them.
    fn table(&mut self, updates: &[TableUpdate]) -> Result<(), String> {
        let Some(table) = self.topo.tables.first() else { return Ok(()) };
        let mut scratch = tally::event::Record::default();
        let start = self.table_log.len();
        for (key, value) in updates {
            let at = (0, self.table_log.len() as i64, 0);
            let record = decode_record(table, at, Some(key), value.as_deref(), &mut scratch).unwrap_or(TableRecord {
                partition: 0,
                offset: at.1,
                timestamp: 0,
                key: vec![],
                change: TableChange::Nothing,
            });
            self.table_log.push(record);
        }
        self.tables.apply(0, &self.table_log[start..], 0).map_err(|e| e.to_string())
    }

    /// Flushes (the sealed flush completed first); the result view then reads the new
    /// changelog records and sends its rows.
    fn flush(&mut self) -> Result<(), String> {
        self.complete()?;
        self.tasks.flush(Some(&mut self.log)).map_err(|e| e.to_string())?;
        self.pump()
    }

    /// Seals a flush and sends it (the sealed one completed first): the store takes it at
    /// [`Tally::complete`].
    fn seal(&mut self) -> Result<(), String> {
        self.complete()?;
        self.sealed = Some(self.tasks.seal(Some(&mut self.log)).map_err(|e| e.to_string())?);
        Ok(())
    }

    /// The sealed flush, acknowledged, into the store; the result view reads its records.
    fn complete(&mut self) -> Result<(), String> {
        let Some(sealed) = self.sealed.take() else { return Ok(()) };
        let offsets = self.log.acknowledged(std::time::Duration::ZERO).map_err(|e| e.to_string())?;
        self.tasks.complete(sealed, offsets.unwrap_or_default()).map_err(|e| e.to_string())?;
        self.pump()
    }

    fn pump(&mut self) -> Result<(), String> {
        for p in 0..self.partitions as usize {
            for (k, v) in &self.log.parts[p][self.read[p]..] {
                self.view.apply(k, v.as_deref()).map_err(|e| e.to_string())?;
            }
            self.read[p] = self.log.parts[p].len();
        }
        for r in self.view.take().map_err(|e| e.to_string())? {
            self.rows.push(serde_json::from_slice(&r.value).unwrap());
        }
        self.view.commit().map_err(|e| e.to_string())
    }

    /// A restart: new tasks (an empty cache) on the same disk, or on a new one; each
    /// partition restored from the changelog as its plan says. Returns where each resumes.
    fn restart(&mut self, lose_disk: bool) -> Result<Vec<i64>, String> {
        // A crash: the sealed flush never reaches the store.
        self.sealed = None;
        if lose_disk {
            self.disks += 1;
            self.store = Store::open(&self.dir.path().join(format!("disk{}", self.disks))).map_err(|e| e.to_string())?;
        }
        let mut resume = Vec::new();
        for p in 0..self.partitions {
            let log = &self.log.parts[p as usize];
            let local = self.store.partition_meta("s", p).map_err(|e| e.to_string())?;
            let (from, scratch) = match plan(local, 0, log.len() as i64) {
                Plan::UpToDate => (log.len(), false),
                Plan::Tail(o) => (o as usize, false),
                Plan::Scratch => (0, true),
            };
            if from < log.len() || scratch {
                let mut r = Restoration::begin(&self.store, &self.topo, 0, p, scratch).map_err(|e| e.to_string())?;
                for (k, v) in &log[from..] {
                    r.apply(k, v.as_deref()).map_err(|e| e.to_string())?;
                }
                r.finish(log.len() as i64 - 1).map_err(|e| e.to_string())?;
            }
        }
        self.store.flush().map_err(|e| e.to_string())?;
        if lose_disk {
            self.tables = open_tables(&self.topo, &self.store, &self.table_log)?;
        }
        self.tasks = TaskSet::with_tables(Arc::clone(&self.topo), self.store.clone(), Arc::clone(&self.tables));
        for p in 0..self.partitions {
            resume.push(self.tasks.assign(0, p).map_err(|e| e.to_string())?.unwrap_or(0));
        }
        self.flush()?;
        Ok(resume)
    }

    fn engine(&self) -> QueryEngine {
        let owned = Arc::new(Ownership::default());
        for p in 0..self.partitions {
            owned.set(0, p, PartitionState::Active);
        }
        QueryEngine::local(Arc::clone(&self.topo), self.store.clone(), owned)
    }
}

/// The tables of `topo` in `store`, loaded with `records` (the table's topic so far).
fn open_tables(topo: &Topology, store: &Store, records: &[TableRecord]) -> Result<Arc<Tables>, String> {
    let tables = Tables::open(topo, store).map_err(|e| e.to_string())?;
    if !topo.tables.is_empty() {
        tables.set_partitions(0, 1);
        tables.apply(0, records, 0).map_err(|e| e.to_string())?;
    }
    tables.set_loaded();
    Ok(Arc::new(tables))
}

/// The model of the whole case, for a config with a table: the table's records, the joins on
/// record in the changelog's position records, then every step (a model fed as the case runs
/// cannot know the joins: they are on record only once their flush is).
fn joined_model(case: &Case, tally: &Tally) -> Model {
    let mut model = Model::new(Spec::parse(&case.toml), &[case.partitions]);
    // The table's topic as produced so far, raw: the model reads it by its own rules.
    for (offset, (key, value)) in case.table.values().flatten().take(tally.table_log.len()).enumerate() {
        model.table_record(0, 0, offset as i64, 0, key, value.as_deref());
    }
    for p in 0..case.partitions {
        let meta = tally::store::meta_key("s", p);
        let joins = tally.log.parts[p as usize]
            .iter()
            .filter(|(k, _)| *k == meta)
            .filter_map(|(k, v)| tally::store::PartitionMeta::decode(k, v.as_deref()?).ok())
            .map(|m| (m.next_offset, vec![m.joined.first().map(|j| j.next.clone()).unwrap_or_default()]))
            .collect();
        model.joins[0].insert(p, joins);
    }
    for (step, _) in &case.steps {
        model.feed(0, step);
    }
    model
}

/// A record's outcome as the model names it.
fn outcome_of(o: &Outcome) -> Option<model::Outcome> {
    match o {
        Outcome::Invalid(e) => Some(model::Outcome::Invalid(e.reason())),
        Outcome::Processed { late, partly_late, .. } => Some(model::Outcome::Counted { late: late.clone(), partly: partly_late.clone() }),
        _ => None,
    }
}

/// Positions of a partition's steps: (index into the case's steps, offset for records).
fn partition_steps(case: &Case) -> Vec<Vec<(usize, i64)>> {
    let mut out = vec![Vec::new(); case.partitions as usize];
    let mut next = vec![0i64; case.partitions as usize];
    for (i, (s, _)) in case.steps.iter().enumerate() {
        match s {
            Step::Record { partition, .. } => {
                out[*partition as usize].push((i, next[*partition as usize]));
                next[*partition as usize] += 1;
            }
            Step::Idle { partition, .. } => out[*partition as usize].push((i, next[*partition as usize])),
        }
    }
    out
}

/// What a run exercised.
#[derive(Debug, Default)]
struct Seen {
    answers: usize,
    records: usize,
    invalid: usize,
    late: usize,
    partly_late: usize,
    restarts: usize,
    lost_disks: usize,
    torn_flushes: usize,
    sealed_flushes: usize,
    idle_steps: usize,
    final_rows: usize,
    /// Cases with a table looked up, and the table records they produced.
    table_cases: usize,
    table_records: usize,
}

impl std::ops::AddAssign for Seen {
    fn add_assign(&mut self, o: Seen) {
        self.answers += o.answers;
        self.records += o.records;
        self.invalid += o.invalid;
        self.late += o.late;
        self.partly_late += o.partly_late;
        self.restarts += o.restarts;
        self.lost_disks += o.lost_disks;
        self.torn_flushes += o.torn_flushes;
        self.sealed_flushes += o.sealed_flushes;
        self.idle_steps += o.idle_steps;
        self.final_rows += o.final_rows;
        self.table_cases += o.table_cases;
        self.table_records += o.table_records;
    }
}

impl Seen {
    fn of(case: &Case, model: &Model, tally: &Tally, answers: usize) -> Seen {
        let mut s = Seen {
            answers,
            final_rows: tally.rows.iter().filter(|r| r["final"] == json!(true)).count(),
            table_cases: usize::from(!case.table.is_empty()),
            table_records: tally.table_log.len(),
            ..Seen::default()
        };
        for (_, _, o) in &model.outcomes[0] {
            s.records += 1;
            match o {
                model::Outcome::Invalid(_) => s.invalid += 1,
                model::Outcome::Counted { late, partly } => {
                    s.late += late.len();
                    s.partly_late += partly.len();
                }
            }
        }
        for (step, action) in &case.steps {
            s.idle_steps += usize::from(matches!(step, Step::Idle { .. }));
            s.restarts += usize::from(matches!(action, Action::Crash | Action::LoseDisk | Action::TornFlush));
            s.lost_disks += usize::from(*action == Action::LoseDisk);
            s.torn_flushes += usize::from(*action == Action::TornFlush);
            s.sealed_flushes += usize::from(*action == Action::Seal);
        }
        s
    }
}

/// Runs a case through tally and the model.
fn run(case: &Case) -> Result<Seen, Diffs> {
    let one = |e: String| vec![e];
    let cfg = Config::from_toml_str(&case.toml).map_err(|e| one(format!("config refused: {e:#}")))?;
    let topo = Arc::new(Topology::compile(&cfg).map_err(|e| one(e.to_string()))?);
    let joins = !topo.tables.is_empty();
    let mut model = Model::new(Spec::parse(&case.toml), &[case.partitions]);
    let mut tally = Tally::new(Arc::clone(&topo), case.partitions).map_err(one)?;
    let per = partition_steps(case);
    let mut cursor = vec![0usize; case.partitions as usize];
    let mut outcomes: BTreeMap<(i32, i64), model::Outcome> = BTreeMap::new();
    let mut diffs = Vec::new();
    let mut done = vec![false; case.steps.len()];
    for (i, (step, action)) in case.steps.iter().enumerate() {
        let p = match step {
            Step::Record { partition, .. } | Step::Idle { partition, .. } => *partition as usize,
        };
        if !done[i] {
            if let Some(updates) = case.table.get(&i) {
                tally.table(updates).map_err(one)?;
            }
        }
        if !joins {
            model.feed(0, step);
        }
        // Catch the partition up to this step (after a restart), then take it.
        let j = per[p].iter().position(|(x, _)| *x == i).unwrap();
        while cursor[p] <= j {
            let (si, offset) = per[p][cursor[p]];
            match &case.steps[si].0 {
                Step::Record { partition, kafka_ts, payload } => {
                    let got = tally.tasks.process(0, *partition, offset, *kafka_ts, payload).map_err(|e| one(e.to_string()))?;
                    if let Some(o) = outcome_of(&got) {
                        match outcomes.get(&(*partition, offset)) {
                            // A pass lost with the cache left nothing a join must agree with:
                            // with a table, the last pass's outcome is the one on record.
                            _ if joins => {
                                outcomes.insert((*partition, offset), o);
                            }
                            Some(first) if *first != o => {
                                diffs.push(format!("partition {partition} offset {offset}: replayed as {o:?}, first {first:?}"))
                            }
                            Some(_) => {}
                            None => {
                                outcomes.insert((*partition, offset), o);
                            }
                        }
                    }
                }
                Step::Idle { partition, watermark } => {
                    tally.tasks.advance_idle(0, *partition, *watermark);
                }
            }
            cursor[p] += 1;
        }
        if std::mem::replace(&mut done[i], true) {
            continue;
        }
        let restart = match action {
            Action::Nothing => None,
            Action::Flush => {
                tally.flush().map_err(one)?;
                None
            }
            Action::Crash => Some(false),
            Action::LoseDisk => Some(true),
            Action::Seal => {
                tally.seal().map_err(one)?;
                None
            }
            Action::TornFlush => {
                tally.complete().map_err(one)?;
                tally.log.tear = true;
                let torn = tally.tasks.flush(Some(&mut tally.log));
                tally.log.tear = false;
                if torn.is_ok() {
                    return Err(one("a torn flush succeeded".into()));
                }
                Some(false)
            }
        };
        if let Some(lose) = restart {
            let resume = tally.restart(lose).map_err(one)?;
            for (p, at) in resume.into_iter().enumerate() {
                cursor[p] = per[p].iter().position(|(_, o)| *o >= at).unwrap_or(per[p].len());
            }
        }
    }
    // Partitions rewound by a late restart catch up with what they had taken.
    for p in 0..case.partitions as usize {
        while cursor[p] < per[p].len() {
            let (si, offset) = per[p][cursor[p]];
            if let Step::Record { partition, kafka_ts, payload } = &case.steps[si].0 {
                let got = tally.tasks.process(0, *partition, offset, *kafka_ts, payload).map_err(|e| one(e.to_string()))?;
                if joins {
                    if let Some(o) = outcome_of(&got) {
                        outcomes.insert((*partition, offset), o);
                    }
                } else if outcome_of(&got).as_ref() != outcomes.get(&(*partition, offset)) {
                    diffs.push(format!("partition {partition} offset {offset}: replayed as {got:?}"));
                }
            } else if let Step::Idle { partition, watermark } = &case.steps[si].0 {
                tally.tasks.advance_idle(0, *partition, *watermark);
            }
            cursor[p] += 1;
        }
    }
    tally.flush().map_err(one)?;
    tally.flush().map_err(one)?;
    if joins {
        model = joined_model(case, &tally);
    }

    for (partition, offset, want) in &model.outcomes[0] {
        match outcomes.get(&(*partition, *offset)) {
            Some(got) if got == want => {}
            got => diffs.push(format!("partition {partition} offset {offset}: {got:?}, model {want:?}")),
        }
    }
    let compared = compare_answers(case, &model, &tally, &mut diffs);
    compare_results(&model, &tally, &mut diffs);
    if diffs.is_empty() {
        Ok(Seen::of(case, &model, &tally, compared))
    } else {
        Err(diffs)
    }
}

/// Every query route against the model; returns how many answers were compared.
fn compare_answers(case: &Case, model: &Model, tally: &Tally, diffs: &mut Diffs) -> usize {
    let engine = tally.engine();
    let mut r = Rng(case.seed ^ 0x5eed);
    let mut n = 0;
    let err = |e: tally::query::QueryError| e.to_string();
    for (mi, m) in model.spec.metrics.iter().enumerate() {
        let all = engine.windows(&m.name, None, Range::default(), usize::MAX, true, &Ask::default());
        match all {
            Ok(a) => diffs.extend(model.check_windows(mi, &a, MRange::default(), None)),
            Err(e) => diffs.push(format!("{}: {e}", m.name)),
        }
        let windows: Vec<(i64, i64)> = model.windows(mi, m.grace_ms).into_iter().collect();
        let latest = model.latest_event(0);
        for _ in 0..3 {
            n += 1;
            let (from, to) = match windows.get(r.below(windows.len() as u64) as usize) {
                Some(w) if m.window != WindowSpec::Global => (Some(w.0 + r.range(-MIN, MIN)), Some(w.1 + r.range(-MIN, 3 * MIN))),
                _ => (None, None),
            };
            let key: Option<Vec<String>> = if m.group_by.is_empty() || r.chance(0.5) {
                None
            } else {
                Some(m.group_by.iter().map(|g| if g == "k" { r.pick(&["a", "b", "1"]).to_string() } else { r.range(0, 3).to_string() }).collect())
            };
            let key_text = key.as_ref().map(|k| k.join("|"));
            let range = Range { from, to };
            match engine.windows(&m.name, key_text.as_deref(), range, usize::MAX, false, &Ask::default()) {
                Ok(a) => diffs.extend(model.check_windows(mi, &a, MRange { from, to }, key.as_deref())),
                Err(e) => diffs.push(format!("{} windows {range:?}: {e}", m.name)),
            }
            let span = engine.span(&m.name, key_text.as_deref(), range, None, true, &Ask::default()).map_err(err);
            diffs.extend(model.check_span(mi, span, from, to, key.as_deref()));
            if let (Some(l), Some(last)) = (latest, [MIN, HOUR, 6 * HOUR].get(r.below(3) as usize)) {
                let span = engine.span(&m.name, None, Range::default(), Some(*last), false, &Ask::default()).map_err(err);
                diffs.extend(model.check_span(mi, span, Some(l - last), None, None));
            }
            let ai = r.below(m.aggs.len() as u64) as usize;
            if !matches!(m.aggs[ai].1, Agg::Latest(_)) {
                let at = from.filter(|_| r.chance(0.7));
                let top_n = r.range(1, 4) as usize;
                let top = engine.top(&m.name, top_n, at, Some(&m.aggs[ai].0), &Ask::default()).map_err(err);
                diffs.extend(model.check_top(mi, top, top_n, at, ai));
            }
        }
        n += 4;
    }
    for (ri, ratio) in model.spec.ratios.iter().enumerate() {
        n += 1;
        match engine.windows(&ratio.name, None, Range::default(), usize::MAX, false, &Ask::default()) {
            Ok(a) => diffs.extend(model.check_ratio(ri, &a, MRange::default())),
            Err(e) => diffs.push(format!("{}: {e}", ratio.name)),
        }
    }
    n
}

/// The result rows sent, and those a view rebuilt from the whole changelog sends, against
/// the model: every final row exact, every closed window sent, nothing open sent; the
/// rebuilt view may leave out windows past their retention (compaction could have taken
/// part of them), the view built along with the changelog nothing.
fn compare_results(model: &Model, tally: &Tally, diffs: &mut Diffs) {
    diffs.extend(model.check_result_rows(&tally.rows, &|_, _| false));
    let mut rebuilt = ResultView::open(Arc::clone(&tally.topo), &tally.dir.path().join("rebuilt"), &[tally.partitions]).unwrap();
    for p in 0..tally.partitions as usize {
        for (k, v) in &tally.log.parts[p] {
            rebuilt.apply(k, v.as_deref()).unwrap();
        }
    }
    let again: Vec<Json> = rebuilt.take().unwrap().iter().map(|r| serde_json::from_slice(&r.value).unwrap()).collect();
    let highest = model.watermarks(0).1;
    let finals: Vec<Json> = again.into_iter().filter(|r| r["final"] == json!(true)).collect();
    let rebuilt_diffs = model.check_result_rows(&finals, &|o, w| model.output_expired(o, w, highest));
    // Updates are sent only for what changes after the view is built: not checked here.
    diffs.extend(rebuilt_diffs.into_iter().filter(|d| !d.contains("no update")).map(|d| format!("rebuilt view: {d}")));
}

/// Removes steps while the case still fails, to print something a person can read.
fn shrink(case: &Case) -> (Case, Diffs) {
    let mut best = case.clone();
    let mut diffs = run(&best).err().unwrap_or_default();
    let mut chunk = best.steps.len() / 2;
    let mut budget = 400;
    while chunk >= 1 && budget > 0 {
        let mut i = 0;
        while i < best.steps.len() && budget > 0 {
            budget -= 1;
            let mut trial = best.clone();
            trial.steps.drain(i..(i + chunk).min(trial.steps.len()));
            match run(&trial) {
                Err(d) => {
                    best = trial;
                    diffs = d;
                }
                Ok(_) => i += chunk,
            }
        }
        chunk /= 2;
    }
    (best, diffs)
}

fn report(case: &Case, diffs: &Diffs) -> String {
    let mut out = format!(
        "seed {} (rerun: TALLY_DIFF_SEED={} cargo test --test differential)\n--- config ---\n{}--- steps ---\n",
        case.seed, case.seed, case.toml
    );
    for (i, (s, a)) in case.steps.iter().enumerate() {
        for (key, value) in case.table.get(&i).into_iter().flatten() {
            let value = value.as_deref().map_or("null".into(), String::from_utf8_lossy);
            let _ = writeln!(out, "table tt: {} = {value}", String::from_utf8_lossy(key));
        }
        match s {
            Step::Record { partition, kafka_ts, payload } => {
                let _ = writeln!(out, "p{partition} ts={kafka_ts:?} {} {a:?}", String::from_utf8_lossy(payload));
            }
            Step::Idle { partition, watermark } => {
                let _ = writeln!(out, "p{partition} idle to {watermark} {a:?}");
            }
        }
    }
    let _ = writeln!(out, "--- differences ({}) ---", diffs.len());
    for d in diffs.iter().take(25) {
        let _ = writeln!(out, "{d}");
    }
    out
}

#[test]
fn tally_answers_as_the_reference_model_does() {
    let seeds: Vec<u64> = match std::env::var("TALLY_DIFF_SEED") {
        Ok(s) => match s.split_once("..") {
            Some((a, b)) => (a.parse().expect("TALLY_DIFF_SEED a..b")..b.parse().expect("TALLY_DIFF_SEED a..b")).collect(),
            None => vec![s.parse().expect("TALLY_DIFF_SEED is a number or a range a..b")],
        },
        Err(_) => (0..std::env::var("TALLY_DIFF_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(CASES)).collect(),
    };
    let started = Instant::now();
    let mut seen = Seen::default();
    for &seed in &seeds {
        let case = generate(seed);
        match run(&case) {
            Ok(s) => seen += s,
            Err(_) => {
                let (small, diffs) = shrink(&case);
                panic!("tally differs from the reference model\n{}", report(&small, &diffs));
            }
        }
    }
    // Straight to stderr, past the test harness's capture: CI's log shows what a run covered.
    let _ = writeln!(std::io::stderr(), "differential: {} cases in {:.1} s: {seen:?}", seeds.len(), started.elapsed().as_secs_f64());
}
