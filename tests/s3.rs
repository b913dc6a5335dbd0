//! S3, the live-streaming screen, end to end: viewer and gift events and the room → module
//! table flow through a real broker into tally running its shipped config, table updates
//! interleaved with the events (and rooms listed only after gifts were sent in them), and
//! every answer equals the reference model's. The model applies the documented join rule
//! itself: a record joins with the table as of the position named by its partition's
//! position records in the changelog (`joined` of the first one past the record), looked up
//! in the model's own copy of the table's records — so a record counted under the module of
//! another table version than the one on record, or under two, is a difference.
//!
//! The crash test SIGKILLs tally ten times while table updates and events flow (on the mock
//! and on nisshi): every per-module total still equals the model's.

mod common;
mod model;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally::config::Config;
use tally::gen::{generate, GenOptions, GenRecord, Scenario, S3_GIFTS, S3_ROOMS, S3_VIEWS};
use tally::store::{meta_key, PartitionMeta};
use tally::topology::Topology;

use common::*;
use model::Model;

const CONFIG: &str = "s3-live-streaming.toml";

fn records(count: usize) -> (GenOptions, Vec<GenRecord>) {
    let opts = GenOptions { count, ..GenOptions::for_scenario(Scenario::S3) };
    (opts.clone(), generate(Scenario::S3, &opts))
}

/// Sends `records` (each to its own topic) in `chunks` chunks, `pause` apart, on a thread.
fn feed(cluster: &Cluster, records: &[GenRecord], chunks: usize, pause: Duration) -> std::thread::JoinHandle<()> {
    let (kafka, records) = (cluster.kafka(), records.to_vec());
    std::thread::spawn(move || {
        let feed = tally::kafka::feed::Feed::new(&kafka, S3_GIFTS).unwrap();
        for chunk in records.chunks(records.len() / chunks + 1) {
            feed.send_all(chunk.iter().cloned(), 0, || false).unwrap();
            feed.flush().unwrap();
            std::thread::sleep(pause);
        }
    })
}

/// Every position record of `source`'s changelog: (partition, position), partition by
/// partition in changelog order.
fn positions(cluster: &Cluster, topo: &Topology, source: usize) -> Vec<(i32, PartitionMeta)> {
    let name = &topo.sources[source].name;
    let records = cluster.drain(&topo.changelog_topic(source));
    let metas = records.into_iter().filter(|r| r.key == meta_key(name, r.partition));
    metas.map(|r| (r.partition, PartitionMeta::decode(&r.key, &r.payload).expect("a position record"))).collect()
}

/// Per partition, in changelog order: (next offset, the pin the records before it joined as
/// of, per table of the topology) — the joins on record.
fn joins(positions: &[(i32, PartitionMeta)], topo: &Topology) -> model::Joins {
    let mut out = model::Joins::new();
    for (p, meta) in positions {
        let pin = topo.tables.iter().map(|t| meta.joined.iter().find(|j| j.table == t.name).map(|j| j.next.clone()).unwrap_or_default()).collect();
        out.entry(*p).or_default().push((meta.next_offset, pin));
    }
    out
}

/// The model of everything the broker holds: the table's records, the joins on record in
/// the changelogs, then both sources' records.
fn model_of_run(cluster: &Cluster, cfg: &Config, partitions: i32) -> Model {
    let topo = Topology::compile(cfg).unwrap();
    let text = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples").join(CONFIG)).unwrap();
    let mut m = Model::new(model::spec::Spec::parse(&text), &[partitions, partitions]);
    for r in cluster.drain(S3_ROOMS) {
        m.table_record(0, r.partition, r.offset, r.timestamp.unwrap_or(0), &r.key, (!r.null).then_some(&r.payload[..]));
    }
    for s in 0..topo.sources.len() {
        m.joins[s] = joins(&positions(cluster, &topo, s), &topo);
    }
    for (s, topic) in [S3_VIEWS, S3_GIFTS].into_iter().enumerate() {
        for (partition, kafka_ts, payload) in cluster.records_of(topic) {
            m.feed(s, &model::Step::Record { partition, kafka_ts, payload });
        }
    }
    m
}

/// Waits until tally's state holds every record the broker has of both sources.
fn wait_all_in(addr: std::net::SocketAddr, cluster: &Cluster) {
    for (topic, probe) in [(S3_VIEWS, "/api/v1/metrics/viewers_by_grade"), (S3_GIFTS, "/api/v1/metrics/gifts_by_type")] {
        let ends: HashMap<i32, i64> = cluster.high_watermarks(topic).into_iter().enumerate().map(|(p, e)| (p as i32, e)).collect();
        wait_caught_up(addr, probe, &ends);
    }
}

/// Every window of every metric, the 6-hour span, the top givers and (for a process that
/// saw every record: counters restart with it) the lookup counter against the model; returns
/// tally's per-module totals of the newest day.
fn check(addr: std::net::SocketAddr, m: &Model, what: &str, counters: bool) -> BTreeMap<String, Value> {
    assert_no_diffs(&check_answers(addr, m), &format!("{what}: windows"));
    let metric = |name: &str| m.spec.metrics.iter().position(|x| x.name == name).unwrap();
    let answer = |path: &str| match http_get_raw(addr, path) {
        (200, body) => Ok(serde_json::from_str::<Value>(&body).unwrap()),
        (status, body) => Err(format!("{status}: {body}")),
    };
    let latest = m.latest_event(1).unwrap();
    let span = answer("/api/v1/metrics/gifts_hourly/span?last=6h");
    assert_no_diffs(&m.check_span(metric("gifts_hourly"), span, Some(latest - 6 * 3_600_000), None, None), &format!("{what}: 6-hour span"));
    let top = answer("/api/v1/metrics/top_givers/top?n=10");
    assert_no_diffs(&m.check_top(metric("top_givers"), top, 10, None, 0), &format!("{what}: top givers"));
    if counters {
        let text = http_get_raw(addr, "/metrics").1;
        let missing = metric_value(&text, "tally_lookups_missing_total{action=\"null\",source=\"gifts\",table=\"rooms\"}") as u64;
        assert_eq!(missing, m.missing[1][0], "{what}: gifts whose room the table did not list");
    }
    let answer = get(addr, "/api/v1/metrics/gifts_by_module");
    let newest = answer["rows"].as_array().unwrap().iter().map(|r| r["window"]["start"].as_i64().unwrap()).max().unwrap();
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["window"]["start"].as_i64() == Some(newest))
        .map(|r| (r["key"]["rooms.module_id"].as_str().unwrap_or_default().to_string(), r["values"]["amount"].clone()))
        .collect()
}

/// The pins on record must only move forward, and every partition's last position must have
/// adopted the whole table.
fn check_pins(cluster: &Cluster, cfg: &Config) -> usize {
    let topo = Topology::compile(cfg).unwrap();
    let end = cluster.high_watermarks(S3_ROOMS);
    let gifts = positions(cluster, &topo, 1);
    let mut distinct = 0;
    for (p, entries) in joins(&gifts, &topo) {
        for w in entries.windows(2) {
            let (a, b) = (&w[0].1[0], &w[1].1[0]);
            assert!(a.iter().zip(b).all(|(x, y)| x <= y), "gifts partition {p}: a join position went back, {a:?} then {b:?}");
        }
        distinct = distinct.max(entries.iter().map(|e| &e.1).collect::<std::collections::BTreeSet<_>>().len());
    }
    let mut last: BTreeMap<i32, &PartitionMeta> = BTreeMap::new();
    for (p, meta) in &gifts {
        assert!(meta.pin[0].next.iter().zip(&end).all(|(x, y)| x <= y), "a pin beyond the table's end");
        last.insert(*p, meta);
    }
    assert_eq!(last.len(), cluster.high_watermarks(S3_GIFTS).len());
    for (p, meta) in last {
        assert_eq!(meta.pin[0].next, end, "gifts partition {p}: its last position has not adopted the whole table");
    }
    distinct
}

#[test]
fn s3_end_to_end_with_table_updates_between_the_events() {
    let (opts, records) = records(12_000);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = example_config(CONFIG, "", state.path());
    let cluster = Cluster::for_config(&cfg, opts.partitions);
    cfg.kafka.bootstrap_servers = cluster.brokers.clone();
    // The table's first records (the listed rooms) exist before tally starts; it loads them
    // before it takes any partition.
    let listed = records.iter().take_while(|r| r.topic == Some(S3_ROOMS)).count();
    cluster.produce(S3_ROOMS, &records[..listed]);
    let tally = Tally::start(cfg.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    let ready = loop {
        let ready: Value = serde_json::from_str(&http_get_raw(tally.addr, "/ready").1).unwrap();
        if ready["tables_loaded"] == true {
            break ready;
        }
        assert!(Instant::now() < deadline && ready["ready"] == false, "{ready}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(ready["tables"][0]["entries"].as_u64(), Some(listed as u64), "{ready}");
    let (first, rest) = records[listed..].split_at((records.len() - listed) / 2);
    feed(&cluster, first, 15, Duration::from_millis(150)).join().unwrap();
    // A room leaves the table (a tombstone): its later gifts find no module.
    let gone = &records[0];
    cluster.tombstone(S3_ROOMS, gone.partition, &gone.key);
    feed(&cluster, rest, 15, Duration::from_millis(150)).join().unwrap();
    wait_all_in(tally.addr, &cluster);
    // The last table updates reach every partition's pin at its next flush.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::panic::catch_unwind(|| check_pins(&cluster, &cfg)).is_err() {
        assert!(Instant::now() < deadline, "the pins never caught up with the table");
        std::thread::sleep(Duration::from_millis(200));
    }
    let distinct = check_pins(&cluster, &cfg);
    assert!(distinct >= 3, "the table moved while gifts flowed: {distinct} join positions on record");

    let m = model_of_run(&cluster, &cfg, opts.partitions);
    let modules = check(tally.addr, &m, "S3", true);
    assert!(m.missing[1][0] > 0, "gifts in rooms the table listed only later count under module null");
    assert!(modules.contains_key("null") && modules.len() >= 6, "{modules:?}");
    let invalid = m.outcomes.iter().flatten().filter(|o| matches!(o.2, model::Outcome::Invalid(_))).count() as u64;
    assert_eq!(metric_sum(&tally.metrics(), "tally_records_invalid_total") as u64, invalid, "invalid records");
    assert!(invalid > 0);
    tally.stop();
}

/// Ten SIGKILLs of a `tally run` process while gifts, viewers and room moves flow, one with
/// the state directory lost; afterwards every answer, per-module totals included, equals
/// the model's under the join rule, and the modules' totals add up to the total per gift
/// type (no gift under two modules, none under none).
fn sigkills_keep_every_module_total_exact(cluster: Cluster, mut cfg: Config, partitions: i32) {
    let (_, records) = records(40_000);
    let dir = tempfile::tempdir().unwrap();
    cfg.kafka.bootstrap_servers = cluster.brokers.clone();
    cfg.state.commit_interval = "50ms".into();
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    let mut tally = replica::Replica::new(dir.path(), "tally", &cfg);
    let listed = records.iter().take_while(|r| r.topic == Some(S3_ROOMS)).count();
    cluster.produce(S3_ROOMS, &records[..listed]);
    tally.start();
    let flowing = feed(&cluster, &records[listed..], 80, Duration::from_millis(250));
    let mut rng = Rng(7);
    for k in 0..10 {
        tally.wait_ready();
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        tally.kill();
        if k == 5 {
            std::fs::remove_dir_all(&tally.state).unwrap();
        }
        tally.start();
    }
    flowing.join().unwrap();
    tally.wait_ready();
    wait_all_in(tally.addr, &cluster);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::panic::catch_unwind(|| check_pins(&cluster, &cfg)).is_err() {
        assert!(Instant::now() < deadline, "the pins never caught up with the table");
        std::thread::sleep(Duration::from_millis(200));
    }
    let m = model_of_run(&cluster, &cfg, partitions);
    let modules = check(tally.addr, &m, "after 10 SIGKILLs", false);
    let by_type = get(tally.addr, "/api/v1/metrics/gifts_by_type");
    let newest = by_type["rows"].as_array().unwrap().iter().map(|r| r["window"]["start"].as_i64().unwrap()).max().unwrap();
    let rows = by_type["rows"].as_array().unwrap().iter().filter(|r| r["window"]["start"].as_i64() == Some(newest));
    let typed: f64 = rows.map(|r| r["values"]["amount"].as_f64().unwrap()).sum();
    let moduled: f64 = modules.values().map(|v| v.as_f64().unwrap()).sum();
    assert_eq!(moduled, typed, "every gift under exactly one module");
    assert!(tally.log().matches("table loaded").count() >= 11, "each start loaded the table first");
    let topo = Topology::compile(&cfg).unwrap();
    let held = positions(&cluster, &topo, 1).iter().filter(|(_, m)| m.replay_until > m.next_offset).count();
    eprintln!("positions that held their pin through a torn flush's replay: {held}");
}

#[test]
fn s3_sigkills_keep_every_module_total_exact_on_the_mock() {
    let cfg = example_config(CONFIG, "", std::path::Path::new("unused"));
    let cluster = Cluster::for_config(&cfg, 3);
    sigkills_keep_every_module_total_exact(cluster, cfg, 3);
}

#[test]
fn s3_sigkills_keep_every_module_total_exact_on_nisshi() {
    let cfg = example_config(CONFIG, "", std::path::Path::new("unused"));
    let cluster = Cluster::nisshi(&cfg, 3);
    // The test reads every position record back, so the changelogs are created without
    // compaction (tally accepts an existing changelog of the right partition count).
    let topo = Topology::compile(&cfg).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for s in 0..topo.sources.len() {
        rt.block_on(tally::kafka::topics::ensure_source(&cluster.kafka(), &topo.changelog_topic(s), 3)).unwrap();
    }
    sigkills_keep_every_module_total_exact(cluster, cfg, 3);
}
