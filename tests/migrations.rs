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
    many_events(3_000)
}

/// `n` events as [`events`] makes them (the first 3,000 are the fixture's).
fn many_events(n: usize) -> Vec<GenRecord> {
    let mut rng = Rng(2021);
    let mut out = Vec::new();
    let mut t: i64 = 1_630_886_400_000;
    for _ in 0..n {
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

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex")).collect()
}

fn lines(version: &str, file: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join(version).join(file)).expect("fixture file");
    text.lines().map(|l| serde_json::from_str(l).expect("fixture line")).collect()
}

/// The fixture's events, as they were produced (partition by partition in the same order,
/// so each lands at the offset it had).
fn fixture_events(version: &str) -> Vec<GenRecord> {
    lines(version, "events.jsonl")
        .into_iter()
        .map(|l| GenRecord {
            partition: l["partition"].as_i64().unwrap() as i32,
            key: l["key"].as_str().unwrap().as_bytes().to_vec(),
            payload: l["value"].as_str().unwrap().as_bytes().to_vec(),
            topic: None,
            kind: RecordKind::InOrder,
        })
        .collect()
}

/// The model of the fixture's config over its events: the answers recomputed from the
/// definitions, independent of any stored byte.
fn fixture_model(version: &str, events: &[GenRecord]) -> model::Model {
    let text = std::fs::read_to_string(Path::new(FIXTURES).join(version).join("config.toml")).unwrap();
    let mut m = model::Model::new(model::spec::Spec::parse(&text), &[PARTITIONS]);
    for r in events {
        m.feed(0, &model::Step::Record { partition: r.partition, kafka_ts: None, payload: r.payload.clone() });
    }
    m
}

/// Every metric's answer equals what the old tally answered and what the model recomputes.
fn assert_answers_as_before(version: &str, addr: std::net::SocketAddr, events: &[GenRecord]) {
    let before: Value = serde_json::from_str(&std::fs::read_to_string(Path::new(FIXTURES).join(version).join("answers.json")).unwrap()).unwrap();
    for (metric, rows) in before.as_object().unwrap() {
        let now = get(addr, &format!("/api/v1/metrics/{metric}?sketch=canonical"));
        assert_eq!(&now["rows"], rows, "{metric}: answered otherwise than before the upgrade");
    }
    assert_no_diffs(&check_answers(addr, &fixture_model(version, events)), "after the upgrade");
}

/// Loads the fixture's store into `dir` as a sled store, byte for byte.
fn load_store(version: &str, dir: &Path) {
    let db = sled::open(dir).unwrap();
    let tree = db.open_tree("state").unwrap();
    for l in lines(version, "store.jsonl") {
        tree.insert(unhex(l["key"].as_str().unwrap()), unhex(l["value"].as_str().unwrap())).unwrap();
    }
    db.flush().unwrap();
}

/// Produces the fixture's changelog records (tombstones included) to `topic`, in order.
fn load_changelog(cluster: &Cluster, version: &str, topic: &str) -> usize {
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let p: BaseProducer = rdkafka::ClientConfig::new().set("bootstrap.servers", &cluster.brokers).set("enable.idempotence", "true").create().unwrap();
    let records = lines(version, "changelog.jsonl");
    for l in &records {
        let key = unhex(l["key"].as_str().unwrap());
        let value = l["value"].as_str().map(unhex);
        let mut rec = BaseRecord::<[u8], [u8]>::to(topic).partition(l["partition"].as_i64().unwrap() as i32).key(&key[..]);
        if let Some(v) = &value {
            rec = rec.payload(&v[..]);
        }
        p.send(rec).map_err(|(e, _)| e).unwrap();
        p.poll(std::time::Duration::ZERO);
    }
    p.flush(std::time::Duration::from_secs(30)).unwrap();
    records.len()
}

fn processed(t: &Tally) -> f64 {
    metric_sum(&t.metrics(), "tally_records_processed_total")
}

/// The fixture sets, oldest first: every one is tested against the current build.
const VERSIONS: [(&str, u32); 2] = [("v2", 2), ("v3", 3)];

/// A store written by each earlier format, migrated (`state.migrate = "refuse"` refuses to
/// run it before), answers exactly as that version did, without recomputing anything.
#[test]
fn a_migrated_store_answers_as_before() {
    for (version, store_version) in VERSIONS {
        upgrade_store(version, store_version);
    }
}

fn upgrade_store(version: &str, store_version: u32) {
    let state = tempfile::tempdir().unwrap();
    load_store(version, state.path());
    let cfg = fixture_config(version, "", state.path());
    let cluster = Cluster::for_config(&cfg, PARTITIONS);
    let mut cfg = fixture_config(version, &cluster.brokers, state.path());
    cfg.state.changelog = false;
    let events = fixture_events(version);
    cluster.produce(&cfg.sources[0].topic, &events);

    let topo = tally::topology::Topology::compile(&cfg).unwrap();
    if store_version < tally::migrations::STORE_VERSION {
        let mut refusing = cfg.clone();
        refusing.state.migrate = tally::config::MigrateMode::Refuse;
        let rt = tokio::runtime::Runtime::new().unwrap();
        let err = rt.block_on(tally::app::run(refusing, async {}, |_| {})).unwrap_err();
        assert!(format!("{err:#}").contains("tally migrate"), "{err:#}");
        let store = tally::store::Store::open(state.path()).unwrap();
        assert_eq!(store.version().unwrap(), store_version);
        let applied = store.migrate(&topo).unwrap();
        let rewritten: u64 = applied.iter().map(|a| a.report.rewritten).sum();
        assert_eq!(rewritten as usize, lines(version, "store.jsonl").len(), "{version}: every stored value rewritten");
    } else {
        // The current format's fixture carries no version file (it is a dump of the tree).
        tally::migrations::write_version(state.path(), store_version).unwrap();
    }
    let store = tally::store::Store::open(state.path()).unwrap();
    assert_eq!(store.version().unwrap(), tally::migrations::STORE_VERSION);
    assert!(store.migrate(&topo).unwrap().is_empty(), "a second run has nothing to do");
    drop(store);

    let tally = Tally::start(cfg);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_answers_as_before(version, tally.addr, &events);
    assert_eq!(processed(&tally), 0.0, "the answers came from the migrated store, not from recomputing the source");
    tally.stop();
}

/// A wiped disk restored from a changelog each earlier format wrote answers as that version
/// did: its records are read through the current gate, not recomputed.
#[test]
fn a_changelog_of_an_earlier_format_restores_exactly() {
    for (version, _) in VERSIONS {
        restore_changelog(version);
    }
}

fn restore_changelog(version: &str) {
    let state = tempfile::tempdir().unwrap();
    let cfg = fixture_config(version, "", state.path());
    let cluster = Cluster::for_config(&cfg, PARTITIONS);
    let cfg = fixture_config(version, &cluster.brokers, state.path());
    let topo = tally::topology::Topology::compile(&cfg).unwrap();
    let events = fixture_events(version);
    cluster.produce(&cfg.sources[0].topic, &events);
    let written = load_changelog(&cluster, version, &topo.changelog_topic(0));

    let tally = Tally::start(cfg);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_answers_as_before(version, tally.addr, &events);
    assert_eq!(metric_sum(&tally.metrics(), "tally_restore_records_total") as usize, written);
    assert_eq!(processed(&tally), 0.0, "restored, not recomputed");
    tally.stop();
}

/// Every file of a directory, with its bytes.
fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p);
            } else {
                out.insert(p.clone(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// A store written by a newer tally is refused by `run`, `migrate` and `check --against`
/// alike, and not a byte of it changes.
#[test]
fn a_store_of_a_newer_version_is_refused_and_left_as_it_was() {
    let state = tempfile::tempdir().unwrap();
    load_store("v2", state.path());
    tally::migrations::write_version(state.path(), tally::migrations::STORE_VERSION + 1).unwrap();
    let before = snapshot(state.path());
    let cfg = fixture_config("v2", "127.0.0.1:1", state.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = format!("{:#}", rt.block_on(tally::app::run(cfg.clone(), async {}, |_| {})).unwrap_err());
    assert!(err.contains("newer tally") && err.contains("nothing was changed"), "{err}");
    let cfg_file = state.path().with_extension("toml");
    std::fs::write(&cfg_file, toml::to_string(&cfg).unwrap()).unwrap();
    for args in [vec!["migrate", "--config"], vec!["check", "--against", state.path().to_str().unwrap(), "--config"]] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally")).args(&args).arg(&cfg_file).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("newer tally"), "tally {args:?}: {stderr}");
    }
    assert!(snapshot(state.path()) == before, "the newer store changed on disk");
}

const SPEND_BEFORE: &str = r#"aggregates = ["count as orders", "sum(amount) as amount"]"#;
const SPEND_AFTER: &str = r#"aggregates = ["count as orders", "count as amount"]"#;

fn config_text(version: &str) -> String {
    std::fs::read_to_string(Path::new(FIXTURES).join(version).join("config.toml")).unwrap()
}

fn config_of(text: &str, brokers: &str, state: &Path) -> Config {
    let mut cfg = Config::from_toml_str(text).unwrap();
    cfg.kafka.bootstrap_servers = brokers.to_string();
    cfg.state.dir = state.to_path_buf();
    cfg
}

/// The answers of every metric but `except`, against the model of `text` over `events`.
fn assert_others_exact(addr: std::net::SocketAddr, text: &str, events: &[GenRecord], except: &str, what: &str) {
    let mut model = model::Model::new(model::spec::Spec::parse(text), &[PARTITIONS]);
    for r in events {
        model.feed(0, &model::Step::Record { partition: r.partition, kafka_ts: None, payload: r.payload.clone() });
    }
    let mut diffs = Vec::new();
    for (mi, m) in model.spec.metrics.iter().enumerate().filter(|(_, m)| m.name != except) {
        diffs.extend(model.check_windows(mi, &get(addr, &format!("/api/v1/metrics/{}?sketch=canonical", m.name)), Default::default(), None));
    }
    assert_no_diffs(&diffs, what);
}

/// Asserts `spend` is refused with a message naming it and both layouts.
fn assert_spend_refused(t: &Tally, stored: &str) {
    let (status, body) = http_get_raw(t.addr, "/api/v1/metrics/spend");
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("metric `spend`") && body.contains(stored) && body.contains("count, count | by product"), "{body}");
    assert!(t.get("/ready")["refused"]["spend"].is_string(), "/ready names the refused metric");
    assert_eq!(metric_value(&t.metrics(), "tally_metric_refused{metric=\"spend\"}"), 1.0);
    assert_eq!(metric_value(&t.metrics(), "tally_metric_refused{metric=\"views\"}"), 0.0);
}

/// A metric changed from `sum` to `count`, the state directory deleted, tally restarted with
/// the changelog: the changed metric is refused with a message naming both layouts (never a
/// panic, never the old states read as counts), the others restore and keep running,
/// exactly. Reverting the config afterwards refuses it too: records were not counted for it
/// meanwhile.
fn changed_metric_on_a_wiped_disk(cluster: impl Fn(&Config) -> Cluster) {
    let before = config_text("v3");
    let after = before.replace(SPEND_BEFORE, SPEND_AFTER);
    assert_ne!(before, after);
    let state = tempfile::tempdir().unwrap();
    let cluster = cluster(&config_of(&before, "", state.path()));
    let events = events();
    let (first, second) = events.split_at(events.len() / 2);
    let topic = "shop-events";
    cluster.produce(topic, first);
    let tally = Tally::start(config_of(&before, &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(first));
    tally.stop();

    // The plan against the cluster's changelogs (no state directory needed).
    let file = state.path().with_extension("toml");
    std::fs::write(&file, toml::to_string(&config_of(&after, &cluster.brokers, state.path())).unwrap()).unwrap();
    let out =
        std::process::Command::new(env!("CARGO_BIN_EXE_tally")).args(["check", "--against", "cluster", "--config"]).arg(&file).output().unwrap();
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{plan}{}", String::from_utf8_lossy(&out.stderr));
    let line = |m: &str| plan.lines().find(|l| l.trim_start().starts_with(m)).unwrap_or_default().to_string();
    println!("{plan}");
    assert!(plan.contains("against the changelogs on") && line("spend").contains("incompatible") && line("views").contains("unchanged"), "{plan}");

    std::fs::remove_dir_all(state.path()).unwrap();
    let tally = Tally::start(config_of(&after, &cluster.brokers, state.path()));
    cluster.produce(topic, second);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_spend_refused(&tally, "count, sum(amount) | by product");
    assert_others_exact(tally.addr, &after, &events, "spend", "the other metrics after the change");
    tally.stop();

    let tally = Tally::start(config_of(&before, &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    let (status, body) = http_get_raw(tally.addr, "/api/v1/metrics/spend");
    assert_eq!(status, 409, "reverted: the state misses what was processed meanwhile: {body}");
    assert_others_exact(tally.addr, &before, &events, "spend", "the other metrics after the revert");
    tally.stop();
}

/// The same change on a wiped disk, restored from the v2 changelog (written before states
/// carried their layout): the changed metric is still refused, the others answer as before.
#[test]
fn a_changed_metric_restored_from_a_v2_changelog_is_refused() {
    let state = tempfile::tempdir().unwrap();
    let after = config_text("v2").replace(SPEND_BEFORE, SPEND_AFTER);
    let cluster = Cluster::for_config(&config_of(&after, "", state.path()), PARTITIONS);
    let cfg = config_of(&after, &cluster.brokers, state.path());
    let events = fixture_events("v2");
    cluster.produce("shop-events", &events);
    load_changelog(&cluster, "v2", &tally::topology::Topology::compile(&cfg).unwrap().changelog_topic(0));
    let tally = Tally::start(cfg);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_spend_refused(&tally, "sum");
    assert_others_exact(tally.addr, &after, &events, "spend", "the other metrics restored from v2");
    tally.stop();
}

#[test]
fn a_changed_metric_on_a_wiped_disk_is_refused_and_the_others_run_on_the_mock() {
    changed_metric_on_a_wiped_disk(|cfg| Cluster::for_config(cfg, PARTITIONS));
}

#[test]
fn a_changed_metric_on_a_wiped_disk_is_refused_and_the_others_run_on_nisshi() {
    changed_metric_on_a_wiped_disk(|cfg| Cluster::nisshi(cfg, PARTITIONS));
}

fn topology(grace: &str, retention: &str) -> std::sync::Arc<tally::topology::Topology> {
    let text = format!(
        "[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\napplication_id = \"t\"\n[[sources]]\nname = \"s\"\ntopic = \"t\"\n\
         event_time = {{ field = \"ts\", kind = \"epoch_seconds\" }}\n\
         [[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = {{ type = \"tumbling\", size = \"1m\" }}\ngrace = \"{grace}\"\nretention = \"{retention}\"\n"
    );
    std::sync::Arc::new(tally::topology::Topology::compile(&Config::from_toml_str(&text).unwrap()).unwrap())
}

/// Windows `[start, end)` in seconds with their counts, as the engine answers them.
fn counts(store: &tally::store::Store, topo: &std::sync::Arc<tally::topology::Topology>) -> Vec<(i64, u64)> {
    let owned = std::sync::Arc::new(tally::ownership::Ownership::default());
    owned.set(0, 0, tally::ownership::PartitionState::Active);
    let engine = tally::query::QueryEngine::local(std::sync::Arc::clone(topo), store.clone(), owned);
    let a = engine.windows("m", None, Default::default(), usize::MAX, false, &Default::default()).unwrap();
    let mut rows: Vec<(i64, u64)> = a["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["window"]["start"].as_i64().unwrap() / 1000, r["values"]["count"].as_u64().unwrap()))
        .collect();
    rows.sort_unstable();
    rows
}

/// Raising grace and retention on a running metric: slices expiry already deleted stay
/// deleted — a record for one is late, and its windows are not answered — while the slices
/// still stored take records for as long as the new grace says.
#[test]
fn raising_grace_and_retention_never_answers_a_revived_slice_short() {
    let dir = tempfile::tempdir().unwrap();
    let store = tally::store::Store::open(dir.path()).unwrap();
    let rec = |ts: i64| format!(r#"{{"ts":{ts}}}"#).into_bytes();
    let short = topology("0s", "2m");
    let mut tasks = tally::task::TaskSet::new(std::sync::Arc::clone(&short), store.clone());
    tasks.assign(0, 0).unwrap();
    for (offset, ts) in [10, 70, 75, 300, 400].into_iter().enumerate() {
        tasks.process(0, 0, offset as i64, None, &rec(ts)).unwrap();
    }
    // Expiry acts on the previous flush's watermark (400 s): slices ending 2 min before it go.
    tasks.flush(None).unwrap();
    tasks.flush(None).unwrap();
    assert_eq!(counts(&store, &short), vec![(300, 1), (360, 1)], "[0,60) and [60,120) expired");

    let long = topology("10m", "20m");
    let mut tasks = tally::task::TaskSet::new(std::sync::Arc::clone(&long), store.clone());
    tasks.assign(0, 0).unwrap();
    // Within the new grace: one for a deleted slice (late: it would revive [60,120) with a
    // count of 1 where there were 3), one for a slice still stored (counted).
    let late = tasks.process(0, 0, 5, None, &rec(80)).unwrap();
    assert!(matches!(&late, tally::task::Outcome::Processed { late, .. } if late == &vec![0]), "{late:?}");
    let kept = tasks.process(0, 0, 6, None, &rec(310)).unwrap();
    assert!(matches!(&kept, tally::task::Outcome::Processed { late, .. } if late.is_empty()), "{kept:?}");
    tasks.flush(None).unwrap();
    assert_eq!(counts(&store, &long), vec![(300, 2), (360, 1)]);
    // Asked for directly, the deleted window is not answered, and a span over it is refused.
    let owned = std::sync::Arc::new(tally::ownership::Ownership::default());
    owned.set(0, 0, tally::ownership::PartitionState::Active);
    let engine = tally::query::QueryEngine::local(long, store, owned);
    let range = tally::query::Range { from: Some(60_000), to: Some(120_000) };
    let rows = engine.windows("m", None, range, usize::MAX, false, &Default::default()).unwrap();
    assert_eq!(rows["rows"], json!([]), "{rows}");
    let err = engine.span("m", None, range, None, false, &Default::default()).unwrap_err();
    assert!(matches!(err, tally::query::QueryError::Expired { .. }), "{err}");
}

/// Waits until `metric` answers (a rebuild answers 503 `rebuilding` until it is done).
fn wait_answered(addr: std::net::SocketAddr, metric: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        match http_get_raw(addr, &format!("/api/v1/metrics/{metric}")) {
            (200, _) => return seen,
            (503, body) => {
                let v: Value = serde_json::from_str(&body).unwrap();
                seen.extend(v["missing"].as_array().into_iter().flatten().filter_map(|m| m["reason"].as_str().map(str::to_string)));
            }
            (status, body) => panic!("{metric}: {status} {body}"),
        }
        assert!(std::time::Instant::now() < deadline, "{metric} never answered");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until `metric`'s rebuild has got past offset `past` on some partition, by the 503
/// answers' details; `None` if it answered 200 first (the rebuild was done).
fn wait_rebuilt_past(addr: std::net::SocketAddr, metric: &str, past: i64) -> Option<i64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while std::time::Instant::now() < deadline {
        match try_get_raw(addr, &format!("/api/v1/metrics/{metric}")) {
            Some((200, _)) => return None,
            Some((503, body)) => {
                let v: Value = serde_json::from_str(&body).unwrap();
                let at = v["missing"].as_array().into_iter().flatten().filter(|m| m["reason"] == "rebuilding").filter_map(|m| {
                    let detail = m["detail"].as_str()?;
                    detail.split("at offset ").nth(1)?.split(' ').next()?.parse::<i64>().ok()
                });
                if let Some(at) = at.max().filter(|a| *a > past) {
                    return Some(at);
                }
            }
            _ => {}
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("{metric}: the rebuild never got past offset {past}");
}

/// The other safe route: the changed metric given a rebuild token is dropped and recomputed
/// from the source topic's records while the others run on — after which it answers exactly
/// as the model of the new config over every event, on this replica, after a restart (no
/// second rebuild) and on an empty disk restored from the changelog.
#[test]
fn a_changed_metric_given_a_rebuild_token_is_recomputed_from_the_source() {
    let before = config_text("v3");
    let after = before.replace(SPEND_BEFORE, &format!("{SPEND_AFTER}\nrebuild = \"2026-12-01\""));
    let state = tempfile::tempdir().unwrap();
    let cluster = Cluster::for_config(&config_of(&before, "", state.path()), PARTITIONS);
    let events = events();
    let (first, second) = events.split_at(events.len() / 2);
    cluster.produce("shop-events", first);
    let tally = Tally::start(config_of(&before, &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(first));
    tally.stop();

    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["check", "--against"])
        .arg(state.path())
        .arg("--config")
        .arg({
            let f = state.path().with_extension("toml");
            std::fs::write(&f, &after).unwrap();
            f
        })
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.contains("spend") && plan.contains("rebuilds"), "{plan}");

    let tally = Tally::start(config_of(&after, &cluster.brokers, state.path()));
    cluster.produce("shop-events", second);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    let seen = wait_answered(tally.addr, "spend");
    println!("while rebuilding, spend answered 503 with {seen:?}");
    assert!(seen.iter().all(|r| r == "rebuilding"), "{seen:?}");
    assert_others_exact(tally.addr, &after, &events, "", "every metric, the rebuilt one too");
    let rebuilt = metric_sum(&tally.metrics(), "tally_records_rebuilt_total");
    assert!(rebuilt as usize >= first.len(), "the rebuild read the first half again: {rebuilt}");
    tally.stop();

    let tally = Tally::start(config_of(&after, &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_others_exact(tally.addr, &after, &events, "", "after a restart");
    assert_eq!(metric_sum(&tally.metrics(), "tally_records_rebuilt_total"), 0.0, "no second rebuild");
    tally.stop();

    std::fs::remove_dir_all(state.path()).unwrap();
    let tally = Tally::start(config_of(&after, &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_others_exact(tally.addr, &after, &events, "", "restored onto an empty disk");
    assert_eq!(metric_sum(&tally.metrics(), "tally_records_rebuilt_total"), 0.0, "the changelog says it is rebuilt");
    tally.stop();
}

/// An internal topic with the wrong settings (a changelog created by hand with
/// `cleanup.policy=delete`, which would lose state once its retention passed) is altered at
/// start, its other settings kept. On nisshi, which has the config APIs.
#[test]
fn a_changelog_created_without_compaction_is_migrated_at_start() {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
    let state = tempfile::tempdir().unwrap();
    let text = config_text("v3");
    let cluster = Cluster::nisshi(&config_of(&text, "", state.path()), PARTITIONS);
    let cfg = config_of(&text, &cluster.brokers, state.path());
    let changelog = tally::topology::Topology::compile(&cfg).unwrap().changelog_topic(0);
    let admin: AdminClient<_> = rdkafka::ClientConfig::new().set("bootstrap.servers", &cluster.brokers).create().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let opts = AdminOptions::new().request_timeout(Some(std::time::Duration::from_secs(10)));
    let topic = NewTopic::new(&changelog, PARTITIONS, TopicReplication::Fixed(1)).set("cleanup.policy", "delete").set("retention.ms", "86400000");
    rt.block_on(admin.create_topics(&[topic], &opts)).unwrap().into_iter().for_each(|r| {
        r.unwrap();
    });
    let settings = |key: &str| -> Option<String> {
        let described = rt.block_on(admin.describe_configs(&[ResourceSpecifier::Topic(&changelog)], &opts)).unwrap();
        let resource = described.into_iter().next().unwrap().unwrap();
        let value = resource.entry_map().get(key).and_then(|e| e.value.clone());
        value
    };
    assert_eq!(settings("cleanup.policy").as_deref(), Some("delete"));

    let events = events();
    cluster.produce("shop-events", &events);
    let tally = Tally::start(cfg);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&events));
    assert_eq!(settings("cleanup.policy").as_deref(), Some("compact"), "the changelog is compacted now");
    assert_eq!(settings("retention.ms").as_deref(), Some("86400000"), "and keeps its other settings");
    tally.stop();
}

/// A rebuild SIGKILLed again and again resumes from the progress its positions record, and
/// ends exactly as the model of the new config says: a record read twice by a rebuild is
/// not counted twice.
#[test]
fn a_rebuild_killed_midway_resumes_and_ends_exact() {
    let before = config_text("v3");
    let after = before.replace(SPEND_BEFORE, &format!("{SPEND_AFTER}\nrebuild = \"after-kills\""));
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::for_config(&config_of(&before, "", dir.path()), PARTITIONS);
    let events = many_events(60_000);
    cluster.produce("shop-events", &events);
    let fast = |text: &str| {
        let mut cfg = config_of(text, &cluster.brokers, dir.path());
        cfg.state.commit_interval = "50ms".into();
        // The broker's minimum session timeout: a killed member is replaced quickly.
        cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
        cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
        cfg
    };
    let mut replica = common::replica::Replica::new(dir.path(), "r", &fast(&before));
    replica.start();
    replica.wait_ready();
    wait_caught_up(replica.addr, "/api/v1/metrics/views", &ends(&events));
    replica.terminate();

    replica.configure(&fast(&after));
    let mut rng = Rng(12);
    let mut killed_at = Vec::new();
    for _ in 0..3 {
        replica.start();
        // Kill it once the rebuild has got somewhere, at a random moment after.
        let at = wait_rebuilt_past(replica.addr, "spend", 1);
        std::thread::sleep(std::time::Duration::from_millis(rng.below(300)));
        replica.kill();
        killed_at.push(at);
    }
    println!("killed with the rebuild at offsets {killed_at:?}");
    assert!(killed_at.iter().all(|a| a.is_some()), "every kill came while the rebuild ran: {killed_at:?}");
    replica.start();
    replica.wait_ready();
    wait_caught_up(replica.addr, "/api/v1/metrics/views", &ends(&events));
    wait_answered(replica.addr, "spend");
    assert_others_exact(replica.addr, &after, &events, "", "after a rebuild killed four times");
    let log = replica.log();
    let resumed = log.lines().filter(|l| l.contains("rebuilt from the source")).count();
    println!("{resumed} partition rebuilds finished over the runs");
    assert!(resumed >= PARTITIONS as usize, "every partition's rebuild finished");
}
