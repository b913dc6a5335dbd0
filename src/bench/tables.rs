//! `tally bench --tables`: S3's global table and the lookup in it.
//!
//! 1. **Load**: a table topic of `--table-entries` distinct keys (default one million) is
//!    pre-filled, then tally starts on the S3 config; the load time is tally's own
//!    `tally_table_load_seconds` (from the loader's start to the table read to its end), read
//!    over HTTP as an operator would, and the rate is entries over that time.
//! 2. **Lookup cost**: S3 gift events through the processing core (tasks and sled, no Kafka)
//!    with S3's gift metrics, with the lookup and without it (`gifts_by_module` grouped by the
//!    record's six-valued `gift_type` instead of the looked-up module: the same work but the
//!    lookup): with
//!    S3's few dozen rooms, and with every gift in another room of the million-entry table
//!    (no key looked up twice: every lookup a first one, which no cache can serve).

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};

use super::{peak_rss_kib, scrape, sum, wait_for, BenchOptions, InProcess};
use crate::config::Config;
use crate::gen::{self, GenOptions, Scenario};
use crate::table::store::{TableChange, TableRecord};
use crate::table::Tables;
use crate::topology::Topology;

/// Table partitions on the mock (it keeps ~5 MiB per partition; an entry is ~80 bytes).
const TABLE_PARTITIONS: i32 = 32;

fn s3_config(brokers: &str, state: &std::path::Path) -> anyhow::Result<Config> {
    let mut cfg = Config::from_toml_str(include_str!("../../examples/s3-live-streaming.toml"))?;
    cfg.kafka.bootstrap_servers = brokers.to_string();
    cfg.state.dir = state.to_path_buf();
    cfg.http.listen = "127.0.0.1:0".into();
    Ok(cfg)
}

/// The S3 config without the lookup: `gifts_by_module` grouped by the record's `gift_type`
/// (six values, as many as the modules) instead of the room's module, so only the lookup
/// differs.
fn without_lookup(mut cfg: Config) -> anyhow::Result<Config> {
    for m in cfg.metrics.iter_mut().filter(|m| m.name == "gifts_by_module") {
        m.group_by = vec!["gift_type".into()];
    }
    cfg.sources.iter_mut().for_each(|s| s.lookups.clear());
    cfg.validate()?;
    Ok(cfg)
}

fn room_value(room: u64) -> String {
    format!(r#"{{"module_id":{},"room_name":"room {room}"}}"#, 101 + room % 6)
}

/// Times tally's load of an `entries`-key table from the mock.
fn load(entries: u64) -> anyhow::Result<(f64, u64)> {
    let mock = MockCluster::new(1).map_err(|e| anyhow::anyhow!("starting the mock cluster: {e}"))?;
    let state = tempfile::Builder::new().prefix("tally-bench-table-").tempdir()?;
    let cfg = s3_config(&mock.bootstrap_servers(), state.path())?;
    let topo = Topology::compile(&cfg)?;
    crate::kafka::topics::create_on_mock(&mock, &topo, TABLE_PARTITIONS)?;
    let table = &topo.tables[0].topic;
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        crate::kafka::client_config(&cfg.kafka, &[("linger.ms", "20"), ("queue.buffering.max.messages", "2000000")]).create()?;
    let started = Instant::now();
    for room in 0..entries {
        let (key, value) = ((20_210_800 + room).to_string(), room_value(room));
        let p = (room % TABLE_PARTITIONS as u64) as i32;
        while producer.send(BaseRecord::to(table).partition(p).key(&key).payload(&value)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(300))?;
    eprintln!("pre-filled {entries} table entries in {:.1} s", started.elapsed().as_secs_f64());
    let tally = InProcess::start(cfg)?;
    let (text, _) = wait_for(tally.addr, "tally_table_entries", entries as f64, Duration::from_secs(600))?;
    let mut secs = sum(&text, "tally_table_load_seconds");
    while secs == 0.0 {
        std::thread::sleep(Duration::from_millis(50));
        secs = sum(&scrape(tally.addr)?, "tally_table_load_seconds");
    }
    tally.stop()?;
    Ok((secs, peak_rss_kib("self").unwrap_or(0) / 1024))
}

/// Gift payloads of S3, their rooms spread over `rooms` table entries when given.
fn gifts(count: usize, rooms: Option<u64>) -> Vec<(i32, Vec<u8>)> {
    let opts = GenOptions { count, step_ms: 1, ..GenOptions::for_scenario(Scenario::S3) };
    let mut spread = 0u64;
    gen::generate(Scenario::S3, &opts)
        .into_iter()
        .filter(|r| r.topic == Some(gen::S3_GIFTS))
        .map(|r| {
            let payload = match rooms {
                None => r.payload,
                Some(n) => {
                    spread = (spread + 7_919) % n;
                    let mut v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap_or_default();
                    if v.is_object() {
                        v["room_id"] = (20_210_800 + spread).into();
                    }
                    v.to_string().into_bytes()
                }
            };
            (r.partition, payload)
        })
        .collect()
}

/// Gift events per second through the core with `cfg`'s topology, the table holding
/// `entries` rooms.
fn core(cfg: &Config, entries: u64, payloads: &[(i32, Vec<u8>)]) -> anyhow::Result<f64> {
    let dir = tempfile::Builder::new().prefix("tally-bench-lookup-").tempdir()?;
    let topo = Arc::new(Topology::compile(cfg)?);
    let store = crate::store::Store::open(dir.path())?;
    let tables = Arc::new(Tables::open(&topo, &store)?);
    if !topo.tables.is_empty() {
        tables.set_partitions(0, 1);
        let batch: Vec<TableRecord> = (0..entries)
            .map(|room| TableRecord {
                partition: 0,
                offset: room as i64,
                timestamp: 0,
                key: (20_210_800 + room).to_string().into_bytes(),
                change: TableChange::Put(vec![
                    crate::event::Value::Int(101 + (room % 6) as i64),
                    crate::event::Value::Str(format!("room {room}").into()),
                ]),
            })
            .collect();
        for chunk in batch.chunks(50_000) {
            tables.apply(0, chunk, 0)?;
        }
    }
    let tasks = crate::task::TaskSet::with_tables(Arc::clone(&topo), store, tables);
    let gifts = topo.sources.iter().position(|s| s.name == "gifts").ok_or_else(|| anyhow::anyhow!("no gifts source"))?;
    Ok(super::core_run(tasks, gifts, payloads)?.0)
}

/// Runs both phases and prints their figures.
pub fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    let (secs, rss) = load(opts.table_entries)?;
    let entries = opts.table_entries;
    let state = tempfile::tempdir()?;
    let with = s3_config("127.0.0.1:1", state.path())?;
    let without = without_lookup(with.clone())?;
    // S3's generated rooms (2,000 users, a room per 40).
    let rooms = 50;
    let few = gifts(opts.events, None);
    let spread = gifts(opts.events, Some(entries));
    let a = core(&without, rooms, &few)?;
    let b = core(&with, rooms, &few)?;
    let c = core(&without, entries, &spread)?;
    let d = core(&with, entries, &spread)?;

    println!("S3 global table and lookup, one tally process, librdkafka mock cluster");
    println!(
        "table load           {entries} entries in {secs:.2} s: {:.0} entries/s ({TABLE_PARTITIONS} partitions; peak RSS {rss} MiB, whole process)",
        entries as f64 / secs
    );
    println!("lookup cost (core: tasks and sled, no Kafka; {} gift events, S3's gift metrics)", few.len());
    println!("  S3's {rooms} rooms      {a:.0} events/s without the lookup, {b:.0} with it ({:.0} % less)", (1.0 - b / a) * 100.0);
    println!("  {entries} rooms  {c:.0} events/s without the lookup, {d:.0} with it ({:.0} % less; no room looked up twice)", (1.0 - d / c) * 100.0);
    Ok(())
}
