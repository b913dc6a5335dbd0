//! Upgrades against real old bytes: the fixtures under `migrations/fixtures/` are a store
//! and a changelog written by an earlier tally, with the events they hold and the answers
//! that tally gave. `write_fixtures` (ignored) writes the current format's set; run it once
//! whenever a format changes, and commit what it writes.

mod common;
mod model;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tally::config::Config;
use tally::gen::{GenRecord, RecordKind};

use common::*;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/fixtures");
const PARTITIONS: i32 = 2;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The fixture's events: views and orders of 200 users over 10 products for about two
/// hours of 2021-09-06, some out of order and some later than watermark and grace.
fn events() -> Vec<GenRecord> {
    let mut rng = Rng(2021);
    let mut out = Vec::new();
    let mut t: i64 = 1_630_886_400_000;
    for _ in 0..3_000 {
        t += rng.range(500, 4_000);
        let ts = if rng.chance(0.05) { t - rng.range(3 * 60_000, 9 * 60_000) } else { t - rng.range(0, 30_000) };
        let user = format!("u{}", rng.below(200));
        let event = json!({ "ts": ts, "kind": rng.below(2), "user": user, "product": format!("p{}", rng.below(10)), "amount": rng.range(1, 500) });
        out.push(GenRecord {
            partition: rng.below(PARTITIONS as u64) as i32,
            key: user.into_bytes(),
            payload: event.to_string().into_bytes(),
            topic: None,
            kind: RecordKind::InOrder,
        });
    }
    out
}

fn fixture_config(version: &str, brokers: &str, state: &Path) -> Config {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join(version).join("config.toml")).expect("fixture config");
    let mut cfg = Config::from_toml_str(&text).expect("fixture config parses");
    cfg.kafka.bootstrap_servers = brokers.to_string();
    cfg.state.dir = state.to_path_buf();
    cfg
}

fn write_lines(path: PathBuf, lines: impl IntoIterator<Item = Value>) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).expect("fixture file"));
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// Writes this build's fixtures: run with `cargo test --test migrations -- --ignored`
/// after a format change (the version is the state format's), on a build of that format.
#[test]
#[ignore = "writes migrations/fixtures/v<STATE_FORMAT>; run once per format version"]
fn write_fixtures() {
    let version = format!("v{}", tally::store::STATE_FORMAT);
    let out = Path::new(FIXTURES).join(&version);
    let state = tempfile::tempdir().unwrap();
    let cfg = fixture_config(&version, "", state.path());
    let cluster = Cluster::for_config(&cfg, PARTITIONS);
    let cfg = fixture_config(&version, &cluster.brokers, state.path());
    let topo = tally::topology::Topology::compile(&cfg).unwrap();
    let records = events();
    cluster.produce(&cfg.sources[0].topic, &records);
    let tally = Tally::start(cfg.clone());
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&records));
    let answers: serde_json::Map<String, Value> =
        topo.metrics.iter().map(|m| (m.name.clone(), tally.get(&format!("/api/v1/metrics/{}?sketch=canonical", m.name))["rows"].clone())).collect();
    tally.stop();

    write_lines(
        out.join("events.jsonl"),
        records
            .iter()
            .map(|r| json!({ "partition": r.partition, "key": String::from_utf8_lossy(&r.key), "value": String::from_utf8_lossy(&r.payload) })),
    );
    std::fs::write(out.join("answers.json"), serde_json::to_string_pretty(&Value::Object(answers)).unwrap()).unwrap();
    let db = sled::open(state.path()).unwrap();
    let tree = db.open_tree("state").unwrap();
    write_lines(
        out.join("store.jsonl"),
        tree.iter().map(|kv| {
            let (k, v) = kv.unwrap();
            json!({ "key": hex(&k), "value": hex(&v) })
        }),
    );
    write_lines(
        out.join("changelog.jsonl"),
        cluster
            .drain(&topo.changelog_topic(0))
            .into_iter()
            .map(|r| json!({ "partition": r.partition, "offset": r.offset, "key": hex(&r.key), "value": (!r.null).then(|| hex(&r.payload)) })),
    );
}
