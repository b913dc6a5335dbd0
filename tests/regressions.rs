//! One case per semantic bug the reference model's issue lists, each through the real
//! processing core, store and query engine, with the expected answer worked out by hand from
//! the rules in the README's semantics section (the result view's is among its unit tests).

// The in-memory changelog alone: the rest of the harness drives brokers and the model.
#[path = "common/changelog.rs"]
mod changelog;

use std::sync::Arc;

use serde_json::{json, Value};
use tally::config::Config;
use tally::ownership::{Ownership, PartitionState};
use tally::query::{Ask, QueryEngine, Range};
use tally::store::Store;
use tally::task::{Outcome, TaskSet};
use tally::topology::Topology;

use changelog::TearingLog;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

/// A topology of one source `s` (topic `t`), with `source` extra keys for the source and
/// `rest` (metrics, derived) appended.
fn topology(source: &str, rest: &str) -> Arc<Topology> {
    let text = format!(
        "[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\napplication_id = \"t\"\n\
         [[sources]]\nname = \"s\"\ntopic = \"t\"\n{source}\n{rest}"
    );
    let cfg = Config::from_toml_str(&text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    Arc::new(Topology::compile(&cfg).unwrap())
}

const EPOCH_MS: &str = "event_time = { field = \"ts\", kind = \"epoch_millis\" }";

/// Tasks and a query engine over one store, owning `partitions` of source 0.
struct Core {
    tasks: TaskSet,
    engine: QueryEngine,
    _dir: tempfile::TempDir,
    offsets: Vec<i64>,
}

impl Core {
    fn new(topo: Arc<Topology>, partitions: i32) -> Core {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let owned = Arc::new(Ownership::default());
        let mut tasks = TaskSet::new(Arc::clone(&topo), store.clone());
        for p in 0..partitions {
            tasks.assign(0, p).unwrap();
            owned.set(0, p, PartitionState::Active);
        }
        Core { tasks, engine: QueryEngine::local(topo, store, owned), _dir: dir, offsets: vec![0; partitions as usize] }
    }

    fn send(&mut self, partition: i32, kafka_ts: Option<i64>, payload: Value) -> Outcome {
        let o = &mut self.offsets[partition as usize];
        let out = self.tasks.process(0, partition, *o, kafka_ts, payload.to_string().as_bytes()).unwrap();
        *o += 1;
        out
    }

    fn flush(&mut self) {
        self.tasks.flush(None).unwrap();
    }

    /// (window start, window end) → values, of every row.
    fn rows(&self, metric: &str) -> Vec<((i64, i64), Value)> {
        let a = self.engine.windows(metric, None, Range::default(), usize::MAX, false, &Ask::default()).unwrap();
        a["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| ((r["window"]["start"].as_i64().unwrap(), r["window"]["end"].as_i64().unwrap()), r["values"].clone()))
            .collect()
    }

    fn value(&self, metric: &str, window: (i64, i64), agg: &str) -> Option<Value> {
        self.rows(metric).into_iter().find(|(w, _)| *w == window).map(|(_, v)| v[agg].clone())
    }
}

/// A record late for the first hopping window of its slice still counts in the later
/// windows holding it, which are open (Kafka Streams and Flink both keep it there).
#[test]
fn hopping_windows_keep_a_record_their_slice_closed_on() {
    let topo = topology(
        EPOCH_MS,
        "[[metrics]]\nname = \"pv\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"hopping\", size = \"10m\", slide = \"5m\" }\n",
    );
    let mut c = Core::new(topo, 1);
    c.send(0, None, json!({ "ts": 12 * MIN }));
    // Watermark 12m: [0, 10m) has closed, [5m, 15m) and [10m, 20m) are open.
    c.send(0, None, json!({ "ts": 7 * MIN }));
    c.flush();
    assert_eq!(c.value("pv", (0, 10 * MIN), "count"), None, "the closed window does not take it");
    assert_eq!(c.value("pv", (5 * MIN, 15 * MIN), "count"), Some(json!(2)), "the open window does");
    assert_eq!(c.value("pv", (10 * MIN, 20 * MIN), "count"), Some(json!(1)));
}

/// The same for a running total: a record behind the watermark by more than a step still
/// counts for every step that has not closed.
#[test]
fn cumulative_windows_keep_a_record_for_their_open_steps() {
    let topo = topology(
        &format!("{EPOCH_MS}\nwatermark_delay = \"1m\""),
        "[[metrics]]\nname = \"day\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"cumulate\", step = \"1m\", max = \"1d\" }\n",
    );
    let mut c = Core::new(topo, 1);
    c.send(0, None, json!({ "ts": 10 * MIN }));
    // Watermark 9m: steps ending at 9m or before have closed.
    c.send(0, None, json!({ "ts": 7 * MIN + 30_000 }));
    c.flush();
    assert_eq!(c.value("day", (0, 9 * MIN), "count"), None, "a closed step does not take it (and has no data otherwise)");
    assert_eq!(c.value("day", (0, 10 * MIN), "count"), Some(json!(1)), "the open steps do");
    assert_eq!(c.value("day", (0, 11 * MIN), "count"), Some(json!(2)));
}

/// Day windows in a zone with daylight saving begin at local midnight on both sides of a
/// change, whenever tally was started; the day of the change has 25 hours.
#[test]
fn day_windows_follow_the_zones_rules() {
    let topo = topology(EPOCH_MS, "[[metrics]]\nname = \"daily\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1d\", timezone = \"America/New_York\" }\nretention = \"7d\"\n");
    let mut c = Core::new(topo, 1);
    // 2021-11-05 00:30 EDT (04:30 UTC), 2021-11-07 12:00 EST (17:00 UTC), 2021-11-08 00:30 EST.
    let nov5_0030: i64 = 1_636_086_600_000;
    let nov7_noon = 1_636_304_400_000;
    let nov8_0030 = 1_636_349_400_000;
    for t in [nov5_0030, nov7_noon, nov8_0030] {
        c.send(0, None, json!({ "ts": t }));
    }
    c.flush();
    let nov5 = 1_636_084_800_000; // 2021-11-05 00:00 EDT
    let nov7 = 1_636_257_600_000; // 2021-11-07 00:00 EDT
    let nov8 = 1_636_347_600_000; // 2021-11-08 00:00 EST
    assert_eq!(c.value("daily", (nov5, nov5 + 24 * HOUR), "count"), Some(json!(1)), "rows: {:?}", c.rows("daily"));
    assert_eq!(c.value("daily", (nov7, nov8), "count"), Some(json!(1)), "25 hours: rows {:?}", c.rows("daily"));
    assert_eq!(nov8 - nov7, 25 * HOUR);
    assert_eq!(c.value("daily", (nov8, nov8 + 24 * HOUR), "count"), Some(json!(1)));
}

/// Date parts without a year take it from the record's Kafka timestamp in the zone, not
/// from the day tally started.
#[test]
fn date_parts_take_the_year_of_the_kafka_timestamp() {
    let topo = topology(
        "event_time = { kind = \"parts\", parts = { month = \"month\", day = \"day\" }, timezone = \"Asia/Shanghai\" }",
        "[[metrics]]\nname = \"daily\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1d\", timezone = \"Asia/Shanghai\" }\n",
    );
    let mut c = Core::new(topo, 1);
    let nov11 = 1_636_560_000_000; // 2021-11-11 00:00 +08:00
    let out = c.send(0, Some(nov11 + 10 * HOUR), json!({ "month": 11, "day": 11 }));
    assert!(matches!(out, Outcome::Processed { .. }), "{out:?}");
    c.flush();
    assert_eq!(c.value("daily", (nov11, nov11 + 24 * HOUR), "count"), Some(json!(1)), "rows: {:?}", c.rows("daily"));
}

const RATIO: &str = "[[metrics]]\nname = \"buys\"\nsource = \"s\"\nfilter = \"kind = 1\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n{NUM}\n\
                     [[metrics]]\nname = \"views\"\nsource = \"s\"\nfilter = \"kind = 0\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n{DEN}\n\
                     [[derived]]\nname = \"rate\"\nratio = { numerator = \"buys\", denominator = \"views\" }\n";

/// A ratio's window is closed only when both of its metrics are done with it.
#[test]
fn a_ratio_closes_with_the_later_of_its_metrics() {
    let topo =
        topology(EPOCH_MS, &RATIO.replace("{NUM}", "grace = \"0s\"\nretention = \"1h\"").replace("{DEN}", "grace = \"10m\"\nretention = \"1h\""));
    let mut c = Core::new(topo, 1);
    c.send(0, None, json!({ "ts": 30_000, "kind": 0 }));
    c.send(0, None, json!({ "ts": 30_000, "kind": 1 }));
    c.send(0, None, json!({ "ts": 5 * MIN, "kind": 0 }));
    c.flush();
    let a = c.engine.windows("rate", None, Range { from: Some(0), to: Some(MIN) }, 10, false, &Ask::default()).unwrap();
    let row = &a["rows"][0];
    assert_eq!(row["window"]["start"], json!(0));
    assert_eq!(row["window"]["closed"], json!(false), "views still accept records for [0, 1m) until 11m: {row}");
}

/// A ratio over a window one of its metrics has expired on some partition is not answered
/// (it would be made of the other partitions' part only).
#[test]
fn a_ratio_is_not_answered_where_one_side_expired() {
    let topo = topology(EPOCH_MS, &RATIO.replace("{NUM}", "retention = \"1h\"").replace("{DEN}", "retention = \"1m\""));
    let mut c = Core::new(topo, 2);
    for p in 0..2 {
        c.send(p, None, json!({ "ts": 30_000, "kind": 0 }));
        c.send(p, None, json!({ "ts": 30_000, "kind": 1 }));
    }
    c.flush();
    c.send(0, None, json!({ "ts": 10 * MIN, "kind": 0 }));
    c.flush();
    c.flush();
    let a = c.engine.windows("rate", None, Range { from: Some(0), to: Some(MIN) }, 10, false, &Ask::default()).unwrap();
    assert_eq!(a["rows"], json!([]), "partition 0 has expired its views of [0, 1m); no ratio may be made of the rest");
}

/// Two partitions, the first far ahead: it has expired what the second still holds.
fn drifted() -> Core {
    let topo = topology(EPOCH_MS, "[[metrics]]\nname = \"pm\"\nsource = \"s\"\ngroup_by = [\"k\"]\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\nretention = \"2m\"\n");
    let mut c = Core::new(topo, 2);
    for p in 0..2 {
        c.send(p, None, json!({ "ts": 10_000, "k": "a" }));
    }
    c.flush();
    c.send(0, None, json!({ "ts": 30 * MIN, "k": "a" }));
    c.flush();
    c.flush();
    c
}

/// A span reaching into what a partition has expired is refused, not answered short.
#[test]
fn a_span_is_never_short() {
    let c = drifted();
    match c.engine.span("pm", Some("a"), Range { from: Some(0), to: Some(MIN) }, None, false, &Ask::default()) {
        Err(e) => assert!(e.to_string().contains("retention"), "{e}"),
        Ok(a) => panic!("answered from one partition of two: {a}"),
    }
}

/// The same for `top?at=` an expired time.
#[test]
fn a_top_list_is_never_short() {
    let c = drifted();
    match c.engine.top("pm", 5, Some(10_000), None, &Ask::default()) {
        Err(e) => assert!(e.to_string().contains("retention"), "{e}"),
        Ok(a) => panic!("answered from one partition of two: {a}"),
    }
}

/// A record whose declared field has the wrong type is invalid: it never moves the
/// watermark, so it cannot close the windows of the records around it.
#[test]
fn a_mistyped_record_is_invalid_and_leaves_the_watermark() {
    let topo = topology(
        &format!("{EPOCH_MS}\nwatermark_delay = \"1m\"\ntypes = {{ record_type = \"INT\", user_id = \"int not null\" }}"),
        "[[metrics]]\nname = \"views\"\nsource = \"s\"\nfilter = \"record_type = 0\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\nretention = \"1h\"\n",
    );
    let mut c = Core::new(topo, 1);
    c.send(0, None, json!({ "record_type": 0, "user_id": 1, "ts": 30_000 }));
    let bad = c.send(0, None, json!({ "record_type": "zero", "user_id": 1, "ts": 20 * MIN }));
    assert!(matches!(&bad, Outcome::Invalid(e) if e.reason() == "wrong_type"), "{bad:?}");
    let missing = c.send(0, None, json!({ "record_type": 0, "ts": 20 * MIN }));
    assert!(matches!(&missing, Outcome::Invalid(e) if e.reason() == "missing_field"), "{missing:?}");
    // Numeric text is an int (Flink's rule), and this record is on time: the watermark is
    // still 30 s - 1 m.
    c.send(0, None, json!({ "record_type": "0", "user_id": "2", "ts": 40_000 }));
    c.flush();
    assert_eq!(c.value("views", (0, MIN), "count"), Some(json!(2)));
}

/// Kafka Streams' GlobalKTable joins a replayed record with the table as it is at the
/// replay: a gift whose room moved to another module between its first pass and its replay
/// counts under both. Here it joins as of the pin stored with its partition's position, and
/// after a torn flush the pin stays until the replay has passed every record the torn
/// changes hold: each module's total is the one of the first pass.
#[test]
fn a_replayed_record_joins_with_the_table_version_of_its_first_pass() {
    use tally::table::store::{TableChange, TableRecord};
    use tally::table::Tables;
    let topo = topology(
        &format!("{EPOCH_MS}\nlookups = [{{ table = \"rooms\", key = \"room\", missing = \"null\" }}]"),
        "[[tables]]\nname = \"rooms\"\ntopic = \"rooms\"\nfields = [\"module\"]\n\
         [[metrics]]\nname = \"by_module\"\nsource = \"s\"\ngroup_by = [\"rooms.module\"]\naggregates = [\"count\"]\nwindow = { type = \"global\" }\n",
    );
    let room = |offset: i64, module: i64| TableRecord {
        partition: 0,
        offset,
        timestamp: 0,
        key: b"7".to_vec(),
        change: TableChange::Put(vec![tally::event::Value::Int(module)]),
    };
    let gift = |i: i64| json!({ "ts": i * 1000, "room": 7 }).to_string().into_bytes();
    let first = tempfile::tempdir().unwrap();
    let store = Store::open(first.path()).unwrap();
    let tables = Arc::new(Tables::open(&topo, &store).unwrap());
    tables.set_partitions(0, 1);
    tables.apply(0, &[room(0, 101)], 0).unwrap();
    let mut tasks = TaskSet::with_tables(Arc::clone(&topo), store.clone(), Arc::clone(&tables));
    tasks.assign(0, 0).unwrap();
    let mut log = TearingLog::new(1);
    for i in 0..2 {
        tasks.process(0, 0, i, None, &gift(i)).unwrap();
    }
    tasks.flush(Some(&mut log)).unwrap();
    // The room moves to module 102; gifts 2 and 3 still join as of the flush's pin (101),
    // and their flush is torn: their aggregate reaches the changelog, the position does not.
    tables.apply(0, &[room(1, 102)], 0).unwrap();
    for i in 2..4 {
        tasks.process(0, 0, i, None, &gift(i)).unwrap();
    }
    log.tear = true;
    assert!(tasks.flush(Some(&mut log)).is_err());

    // Another replica restores the partition from that changelog, its table already at 102.
    let second = tempfile::tempdir().unwrap();
    let store = Store::open(second.path()).unwrap();
    let mut restore = tally::changelog::Restoration::begin(&store, &topo, 0, 0, true).unwrap();
    for (k, v) in &log.parts[0] {
        restore.apply(k, v.as_deref()).unwrap();
    }
    let (position, _) = restore.finish(log.parts[0].len() as i64 - 1).unwrap();
    assert_eq!(position.map(|p| (p.next_offset, p.replay_until)), Some((2, 4)), "resumes at 2, holding the pin until past offset 3");
    let tables = Arc::new(Tables::open(&topo, &store).unwrap());
    tables.set_partitions(0, 1);
    tables.apply(0, &[room(0, 101), room(1, 102)], 0).unwrap();
    let mut tasks = TaskSet::with_tables(Arc::clone(&topo), store.clone(), tables);
    tasks.assign(0, 0).unwrap();
    // Replayed one at a time with a flush between: a flush must not move the pin yet.
    for i in 2..6 {
        tasks.process(0, 0, i, None, &gift(i)).unwrap();
        tasks.flush(None).unwrap();
    }
    let owned = Arc::new(Ownership::default());
    owned.set(0, 0, PartitionState::Active);
    let engine = QueryEngine::local(Arc::clone(&topo), store, owned);
    let a = engine.windows("by_module", None, Range::default(), usize::MAX, false, &Ask::default()).unwrap();
    let counts: Vec<(String, i64)> = a["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["key"]["rooms.module"].as_str().unwrap_or_default().to_string(), r["values"]["count"].as_i64().unwrap()))
        .collect();
    assert_eq!(counts, vec![("101".to_string(), 4), ("102".to_string(), 2)], "{a}");
}

/// A key the table lacks: `skip` leaves the record out of the metrics reading the table's
/// fields only, `dead_letter` makes it invalid (`lookup_missing`) and counts it nowhere, a
/// null key is missing too; a tombstone removes a key for the records after it.
#[test]
fn keys_missing_from_a_table_are_skipped_or_dead_lettered_as_configured() {
    use tally::table::store::{TableChange, TableRecord};
    use tally::table::Tables;
    let topo = topology(
        &format!(
            "{EPOCH_MS}\nlookups = [{{ table = \"rooms\", key = \"room\", missing = \"skip\" }}, {{ table = \"users\", key = \"user\", missing = \"dead_letter\" }}]"
        ),
        "[[tables]]\nname = \"rooms\"\ntopic = \"rooms\"\nfields = [\"module\"]\n\
         [[tables]]\nname = \"users\"\ntopic = \"users\"\nfields = [\"vip\"]\n\
         [[metrics]]\nname = \"by_module\"\nsource = \"s\"\ngroup_by = [\"rooms.module\"]\naggregates = [\"count\"]\nwindow = { type = \"global\" }\n\
         [[metrics]]\nname = \"all\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"global\" }\n",
    );
    let put = |offset: i64, key: &str, v: i64| TableRecord {
        partition: 0,
        offset,
        timestamp: 0,
        key: key.as_bytes().to_vec(),
        change: TableChange::Put(vec![tally::event::Value::Int(v)]),
    };
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let tables = Arc::new(Tables::open(&topo, &store).unwrap());
    tables.set_partitions(0, 1);
    tables.set_partitions(1, 1);
    tables.apply(0, &[put(0, "7", 101)], 0).unwrap();
    tables.apply(1, &[put(0, "u1", 1)], 0).unwrap();
    let mut tasks = TaskSet::with_tables(Arc::clone(&topo), store.clone(), Arc::clone(&tables));
    tasks.assign(0, 0).unwrap();
    let mut offset = 0;
    let mut send = |tasks: &mut TaskSet, v: Value| {
        offset += 1;
        tasks.process(0, 0, offset - 1, None, v.to_string().as_bytes()).unwrap()
    };
    let counted = |missing: Vec<usize>| Outcome::Processed { late: vec![], partly_late: vec![], missing };
    assert_eq!(send(&mut tasks, json!({ "ts": 1, "room": 7, "user": "u1" })), counted(vec![]));
    assert_eq!(send(&mut tasks, json!({ "ts": 2, "room": "7", "user": "u1" })), counted(vec![]), "\"7\" and 7 are one key");
    assert_eq!(send(&mut tasks, json!({ "ts": 3, "room": 8, "user": "u1" })), counted(vec![0]), "not in the table: skipped by by_module");
    assert_eq!(send(&mut tasks, json!({ "ts": 4, "user": "u1" })), counted(vec![0]), "a null key is missing");
    let dead = send(&mut tasks, json!({ "ts": 5, "room": 7, "user": "u2" }));
    assert!(matches!(&dead, Outcome::Invalid(e) if e.reason() == "lookup_missing"), "{dead:?}");
    // A tombstone: from the next flush on, room 7 is not in the table.
    tables.apply(0, &[TableRecord { partition: 0, offset: 1, timestamp: 0, key: b"7".to_vec(), change: TableChange::Delete }], 0).unwrap();
    assert_eq!(send(&mut tasks, json!({ "ts": 6, "room": 7, "user": "u1" })), counted(vec![]), "the pin holds until the flush");
    tasks.flush(None).unwrap();
    assert_eq!(send(&mut tasks, json!({ "ts": 7, "room": 7, "user": "u1" })), counted(vec![0]));
    tasks.flush(None).unwrap();
    let owned = Arc::new(Ownership::default());
    owned.set(0, 0, PartitionState::Active);
    let engine = QueryEngine::local(Arc::clone(&topo), store, owned);
    let count = |metric: &str| {
        let a = engine.windows(metric, None, Range::default(), usize::MAX, false, &Ask::default()).unwrap();
        a["rows"].as_array().unwrap().iter().map(|r| (r["key"].to_string(), r["values"]["count"].as_i64().unwrap())).collect::<Vec<_>>()
    };
    assert_eq!(count("by_module"), vec![(r#"{"rooms.module":"101"}"#.to_string(), 3)]);
    assert_eq!(count("all"), vec![("{}".to_string(), 6)], "every record but the dead-lettered one");
}
