//! Idle partitions (`idle_timeout`, Flink's `source.idle-timeout`), through a real broker:
//! a partition that receives nothing holds every window open and every final row back,
//! unless it is idle past the timeout — then its watermark follows the wall clock, and so
//! does that of a partition with nothing more to read: windows close and their final rows go
//! out, exactly as the reference model has them.

mod common;
mod model;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tally::config::Config;
use tally::gen::{GenRecord, RecordKind};

use common::*;
use model::check::Range;
use model::spec::Spec;
use model::{Model, Step};

fn config(app: &str, brokers: &str, state: &std::path::Path, idle: &str) -> String {
    format!(
        r#"
[kafka]
bootstrap_servers = "{brokers}"
application_id = "{app}"
[state]
dir = "{}"
commit_interval = "100ms"
[http]
listen = "127.0.0.1:0"
[[sources]]
name = "clicks"
topic = "clicks"
event_time = {{ field = "ts", kind = "epoch_millis" }}
{idle}
[[metrics]]
name = "per_second"
source = "clicks"
group_by = ["k"]
aggregates = ["count as n"]
window = {{ type = "tumbling", size = "1s" }}
retention = "1h"
"#,
        state.display()
    )
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

#[test]
fn an_idle_partition_stops_holding_windows_open() {
    // Two partitions; records (a minute old, 10 ms apart) only ever reach partition 0.
    let start = now_ms() - 60_000;
    let records: Vec<GenRecord> = (0..500)
        .map(|i| {
            let payload = format!(r#"{{"ts":{},"k":"k{}"}}"#, start + i * 10, i % 3).into_bytes();
            GenRecord { partition: 0, key: b"k".to_vec(), payload, kind: RecordKind::InOrder, topic: None }
        })
        .collect();
    let states = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let idle = Config::from_toml_str(&config("idle", "", states[0].path(), "idle_timeout = \"500ms\"")).unwrap();
    let cluster = Cluster::for_config(&idle, 2);
    let held = Config::from_toml_str(&config("held", &cluster.brokers, states[1].path(), "")).unwrap();
    for t in tally::topology::Topology::compile(&held).unwrap().internal_topics() {
        let partitions = if t.kind.partitions_like().is_some() { 2 } else { 1 };
        cluster.mock.as_ref().unwrap().create_topic(&t.name, partitions, 1).unwrap();
    }
    cluster.produce("clicks", &records);
    let mut idle_cfg = idle.clone();
    idle_cfg.kafka.bootstrap_servers = cluster.brokers.clone();
    let (with, without) = (Tally::start(idle_cfg), Tally::start(held));
    for t in [&with, &without] {
        wait_caught_up(t.addr, "/api/v1/metrics/per_second", &ends(&records));
    }
    // Partition 1 never receives anything; partition 0 nothing more once it is read.
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_value(&with.metrics(), "tally_partitions_idle") < 2.0 {
        assert!(Instant::now() < deadline, "the partitions never counted idle");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));

    // The model: both partitions idle, their watermarks at the wall clock.
    let text = config("idle", &cluster.brokers, states[0].path(), "idle_timeout = \"500ms\"");
    let mut model = Model::new(Spec::parse(&text), &[2]);
    for (partition, kafka_ts, payload) in cluster.records_of("clicks") {
        model.feed(0, &Step::Record { partition, kafka_ts, payload });
    }
    for partition in 0..2 {
        model.feed(0, &Step::Idle { partition, watermark: now_ms() });
    }
    let answer = with.get("/api/v1/metrics/per_second");
    assert_no_diffs(&model.check_windows(0, &answer, Range::default(), None), "windows with an idle partition");
    let closed = answer["rows"].as_array().unwrap().iter().filter(|r| r["window"]["closed"] == Value::Bool(true)).count();
    assert_eq!(closed, answer["rows"].as_array().unwrap().len(), "every window closed: {answer}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let rows: Vec<Value> = cluster.read_to_end("idle-results").iter().map(|(_, v)| serde_json::from_slice(v).unwrap()).collect();
        let diffs = model.check_result_rows(&rows, &|_, _| false);
        if diffs.is_empty() {
            println!("{} final rows with both partitions idle, {closed} windows closed", rows.len());
            break;
        }
        assert!(Instant::now() < deadline, "result rows: {diffs:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Without idle_timeout the empty partition holds everything.
    let held = without.get("/api/v1/metrics/per_second");
    assert_eq!(held["coverage"]["watermark"], Value::Null, "no watermark while a partition has none");
    assert!(held["rows"].as_array().unwrap().iter().all(|r| r["window"]["closed"] == Value::Bool(false)));
    assert!(cluster.read_to_end("held-results").is_empty(), "no final row while a partition holds them back");
    with.stop();
    without.stop();
}
