//! Any replica answers any query. Three `tally run` processes share six partitions while S1
//! events flow and partitions move (a replica added, one stopped with SIGTERM, one
//! SIGKILLed); a client sends queries round-robin to all three, each with the position
//! token of the newest answer it has seen. Every answer must be either complete — every
//! partition, and equal to the reference model fed exactly the records before the positions
//! it reports — or an explicit 503 naming the missing partitions; no count may go backwards.
//! Afterwards every replica answers everything exactly. A paused replica (SIGSTOP) makes the
//! others answer 503 / incomplete within the query timeout, never hang.

mod common;
mod model;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tally::gen::{generate, GenOptions, GenRecord, Scenario};

use common::replica::Replica;
use common::*;

const PARTITIONS: i32 = 6;

/// One answer the client got: which metric, and the JSON.
struct Seen {
    metric: &'static str,
    answer: Value,
}

/// Per partition, the next offset an answer reports.
fn positions(answer: &Value) -> HashMap<i32, i64> {
    answer["coverage"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["partition"].as_i64().unwrap() as i32, p["next_offset"].as_i64().unwrap()))
        .collect()
}

fn views_total(answer: &Value) -> u64 {
    answer["rows"].as_array().unwrap().iter().map(|r| r["values"]["views"].as_u64().unwrap_or(0)).sum()
}

/// The client: round-robin over `addrs`, passing the newest token. Returns every complete
/// answer and the number of 503s; panics on anything else or on a count going backwards.
fn client(addrs: Vec<std::net::SocketAddr>, stop: Arc<AtomicBool>) -> (Vec<Seen>, usize, usize) {
    let (mut seen, mut refused, mut down) = (Vec::new(), 0, 0);
    let mut token: Option<String> = None;
    let mut newest: HashMap<i32, i64> = HashMap::new();
    let mut views = 0u64;
    for k in 0.. {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let metric = if k % 2 == 0 { "views" } else { "uv_all_time" };
        let min = token.as_ref().map(|t| format!("&min_position={t}")).unwrap_or_default();
        let path = format!("/api/v1/metrics/{metric}?sketch=canonical{min}");
        match try_get_raw(addrs[k % addrs.len()], &path) {
            None => down += 1,
            Some((200, body)) => {
                let a: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(a["coverage"]["complete"], Value::Bool(true), "an answer without partial=true must be complete: {body}");
                let pos = positions(&a);
                assert_eq!(pos.len(), PARTITIONS as usize, "a complete answer covers every partition: {body}");
                for (p, o) in &newest {
                    assert!(pos[p] >= *o, "partition {p} went back from {o} to {} despite min_position", pos[p]);
                }
                if metric == "views" {
                    let v = views_total(&a);
                    assert!(v >= views, "views went back from {views} to {v}");
                    views = v;
                }
                newest = pos;
                token = a["coverage"]["position"].as_str().map(String::from);
                seen.push(Seen { metric, answer: a });
            }
            Some((503, body)) => {
                let e: Value = serde_json::from_str(&body).unwrap();
                // A replica starting up has not met the brokers yet: it cannot know the partitions.
                let starting = e["starting"] == Value::Bool(true);
                assert!(starting || !e["missing"].as_array().unwrap().is_empty(), "a 503 names the missing partitions: {body}");
                refused += 1;
            }
            Some((status, body)) => panic!("GET {path}: {status} {body}"),
        }
        std::thread::sleep(Duration::from_millis(15));
    }
    (seen, refused, down)
}

/// Checks `answer` against the model fed, of each partition, the records before the offset
/// the answer reports for it.
fn check_prefix(seen: &Seen, by_partition: &HashMap<i32, Vec<&GenRecord>>) -> Vec<String> {
    let pos = positions(&seen.answer);
    let prefix = by_partition.iter().flat_map(|(p, recs)| recs[..pos[p] as usize].iter().map(|r| (r.partition, None, r.payload.clone())));
    let model = model_of("s1-uvpv.toml", PARTITIONS, prefix);
    let mi = model.spec.metrics.iter().position(|m| m.name == seen.metric).unwrap();
    model.check_windows(mi, &seen.answer, model::check::Range::default(), None)
}

fn config(cluster: &Cluster, dir: &std::path::Path) -> tally::config::Config {
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, dir);
    cfg.state.commit_interval = "100ms".into();
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    cfg.kafka.properties.insert("fetch.wait.max.ms".into(), "50".into());
    cfg
}

fn any_replica_answers_while_partitions_move(cluster: Cluster, broker: &str) {
    let opts = GenOptions { count: 30_000, partitions: PARTITIONS, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let topic = tally::gen::topic(Scenario::S1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path());
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(dir.path(), &format!("r{i}"), &cfg)).collect();
    let feeder = cluster.feed_over_time(topic, &records, 30);
    replicas[0].start();
    replicas[0].wait_ready();
    let stop = Arc::new(AtomicBool::new(false));
    let querying = {
        let (addrs, stop) = (replicas.iter().map(|r| r.addr).collect(), Arc::clone(&stop));
        std::thread::spawn(move || client(addrs, stop))
    };
    std::thread::sleep(Duration::from_secs(2));
    // Added: 1 → 3.
    replicas[1].start();
    replicas[2].start();
    std::thread::sleep(Duration::from_secs(4));
    println!("[{broker}] SIGTERM r1");
    replicas[1].terminate();
    std::thread::sleep(Duration::from_secs(2));
    replicas[1].start();
    std::thread::sleep(Duration::from_secs(3));
    println!("[{broker}] SIGKILL r2");
    replicas[2].kill();
    std::thread::sleep(Duration::from_secs(1));
    replicas[2].start();
    feeder.join().unwrap();
    for r in &replicas {
        wait_caught_up(r.addr, "/api/v1/metrics/views", &ends(&records));
    }
    stop.store(true, Ordering::Relaxed);
    let (seen, refused, down) = querying.join().unwrap();
    println!("[{broker}] {} complete answers, {refused} refused (503), {down} to a stopped replica", seen.len());
    assert!(seen.len() > 50, "too few complete answers to say anything");

    // A sample of the answers, spread over the run, each against the model of its positions.
    let mut by_partition: HashMap<i32, Vec<&GenRecord>> = HashMap::new();
    for r in &records {
        by_partition.entry(r.partition).or_default().push(r);
    }
    let step = (seen.len() / 24).max(1);
    let mut replicas_seen = std::collections::BTreeSet::new();
    for s in seen.iter().step_by(step).chain(seen.last()) {
        for p in s.answer["coverage"]["partitions"].as_array().unwrap() {
            replicas_seen.insert(p["replica"].as_str().unwrap().to_string());
        }
        assert_no_diffs(&check_prefix(s, &by_partition), &format!("[{broker}] an answer during the moves ({})", s.metric));
    }
    assert!(replicas_seen.len() >= 2, "answers merged partials of several replicas: {replicas_seen:?}");
    // Every replica now answers every metric exactly, whichever partitions it owns.
    for r in &replicas {
        s1::assert_exact(r.addr, &records, &format!("[{broker}] {} after the moves", r.name));
    }
}

#[test]
fn any_replica_answers_on_the_mock_cluster() {
    any_replica_answers_while_partitions_move(Cluster::for_example("s1-uvpv.toml", PARTITIONS), "mock");
}

#[test]
fn any_replica_answers_on_nisshi() {
    let cfg = example_config("s1-uvpv.toml", "", std::path::Path::new("unused"));
    any_replica_answers_while_partitions_move(Cluster::nisshi(&cfg, PARTITIONS), "nisshi");
}

/// A paused replica holds its partitions (the group has not noticed yet) but answers
/// nothing: the others refuse within the query timeout, naming its partitions, or answer
/// the rest marked incomplete; once it resumes, answers are complete again.
#[test]
fn a_paused_replica_does_not_hang_the_others() {
    let cluster = Cluster::for_example("s1-uvpv.toml", PARTITIONS);
    let opts = GenOptions { count: 6_000, partitions: PARTITIONS, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    cluster.produce(tally::gen::topic(Scenario::S1), &records);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&cluster, dir.path());
    cfg.cluster.query_timeout = Some("300ms".into());
    // Long enough that the group keeps the paused replica's partitions with it meanwhile.
    cfg.kafka.properties.insert("session.timeout.ms".into(), "30000".into());
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(dir.path(), &format!("p{i}"), &cfg)).collect();
    for r in &mut replicas {
        r.start();
    }
    for r in &replicas {
        wait_caught_up(r.addr, "/api/v1/metrics/views", &ends(&records));
    }
    let owned_by = |addr, name: &str| -> Vec<i64> {
        let a = get(addr, "/api/v1/metrics/views");
        a["coverage"]["partitions"].as_array().unwrap().iter().filter(|p| p["replica"] == name).map(|p| p["partition"].as_i64().unwrap()).collect()
    };
    let paused_name = replicas[2].addr.to_string();
    let paused_parts = owned_by(replicas[0].addr, &paused_name);
    assert!(!paused_parts.is_empty(), "the replica to pause owns partitions");
    replicas[2].pause();
    for r in &replicas[..2] {
        let (status, body) = http_get_raw(r.addr, "/api/v1/metrics/views");
        assert_eq!(status, 503, "{body}");
        let e: Value = serde_json::from_str(&body).unwrap();
        let missing: Vec<i64> = e["missing"].as_array().unwrap().iter().map(|m| m["partition"].as_i64().unwrap()).collect();
        assert_eq!(missing, paused_parts, "the paused replica's partitions are named: {body}");
        assert!(e["missing"].as_array().unwrap().iter().all(|m| m["reason"] == "unreachable" || m["reason"] == "no_owner"), "{body}");
        let partial = get(r.addr, "/api/v1/metrics/views?partial=true");
        assert_eq!(partial["coverage"]["complete"], Value::Bool(false));
        assert_eq!(partial["coverage"]["partitions"].as_array().unwrap().len() + paused_parts.len(), PARTITIONS as usize);
    }
    replicas[2].resume();
    s1::assert_exact(replicas[0].addr, &records, "after the paused replica resumed");
}

/// With one standby copy per partition, two replicas each follow the other's changelogs.
/// SIGKILL one: the survivor answers every partition at once — the dead one's from its
/// copies, marked with their lag — and once the group hands it the partitions it is
/// promoted reading only its lag, far less than the changelog a restore would read; its
/// answers equal the model throughout.
#[test]
fn a_standby_answers_for_a_killed_owner_and_is_promoted_reading_only_its_lag() {
    let cluster = Cluster::for_example("s1-uvpv.toml", 4);
    let opts = GenOptions { count: 16_000, partitions: 4, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let (first, second) = records.split_at(records.len() / 2);
    let topic = tally::gen::topic(Scenario::S1);
    cluster.produce(topic, first);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&cluster, dir.path());
    cfg.cluster.num_standby_replicas = 1;
    let mut replicas: Vec<Replica> = (0..2).map(|i| Replica::new(dir.path(), &format!("s{i}"), &cfg)).collect();
    for r in &mut replicas {
        r.start();
    }
    for r in &replicas {
        wait_caught_up(r.addr, "/api/v1/metrics/views", &ends(first));
    }
    // More records, so the copies follow flushes made after they caught up.
    cluster.produce(topic, second);
    for r in &replicas {
        wait_caught_up(r.addr, "/api/v1/metrics/views", &ends(&records));
    }
    let owners = get(replicas[0].addr, "/api/v1/metrics/views");
    let of = |name: String| -> Vec<i64> {
        owners["coverage"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["replica"] == *name)
            .map(|p| p["partition"].as_i64().unwrap())
            .collect()
    };
    let victim = of(replicas[0].addr.to_string());
    assert!(!victim.is_empty() && victim.len() < 4, "both replicas own partitions: {owners}");
    // Every partition of the victim has a queryable copy on the survivor, caught up with
    // the changelog (the copies answer as of what they applied: a copy still behind by the
    // last flush would answer short, rightly, within the allowed lag).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let caught_up = |r: &Value| r["standbys_queryable"].as_u64() == Some(victim.len() as u64) && r["standby_lag_max"].as_u64() == Some(0);
    while !caught_up(&get_ready(replicas[1].addr)) {
        assert!(std::time::Instant::now() < deadline, "the survivor never held queryable copies: {}", get_ready(replicas[1].addr));
        std::thread::sleep(Duration::from_millis(100));
    }
    let full: i64 = victim.iter().map(|&p| cluster.high_watermarks("tally-s1-uvpv-changelog")[p as usize]).sum();

    replicas[0].kill();
    let killed = std::time::Instant::now();
    // Before the group notices, the copies answer.
    let (mut from_copies, mut first_complete) = (None, None);
    while from_copies.is_none() || first_complete.is_none() {
        assert!(killed.elapsed() < Duration::from_secs(120), "no complete answer after the kill");
        if let Some((200, body)) = try_get_raw(replicas[1].addr, "/api/v1/metrics/views?sketch=canonical") {
            let a: Value = serde_json::from_str(&body).unwrap();
            first_complete.get_or_insert(killed.elapsed());
            let copies = a["coverage"]["partitions"].as_array().unwrap().iter().filter(|p| p["standby_lag"].is_u64()).count();
            if copies == victim.len() && from_copies.is_none() {
                from_copies = Some(a);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("complete answers {:.2} s after SIGKILL", first_complete.unwrap().as_secs_f64());
    let model = s1::model(&records, 4);
    let mi = model.spec.metrics.iter().position(|m| m.name == "views").unwrap();
    assert_no_diffs(&model.check_windows(mi, &from_copies.unwrap(), model::check::Range::default(), None), "an answer from standby copies");

    // Promotion: the survivor takes the partitions, reading only the copies' lag.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let (mut answered, mut refused) = (0, 0);
    loop {
        match try_get_raw(replicas[1].addr, "/api/v1/metrics/views") {
            Some((200, body)) => {
                answered += 1;
                let a: Value = serde_json::from_str(&body).unwrap();
                let parts = a["coverage"]["partitions"].as_array().unwrap();
                if parts.iter().all(|p| p["replica"] == replicas[1].addr.to_string() && !p["standby_lag"].is_u64()) {
                    break;
                }
            }
            // Between a copy's promotion and the partition's first processing.
            other => {
                refused += 1;
                assert!(matches!(other, Some((503, _))), "{other:?}");
            }
        }
        assert!(std::time::Instant::now() < deadline, "the survivor was never given the partitions");
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("until promoted: {answered} complete answers, {refused} refused");
    let promoted: Vec<i64> =
        replicas[1].log().lines().filter(|l| l.contains("promoting the standby")).filter_map(|l| log_field(l, "records")).collect();
    println!("promoted {} copies reading {} changelog records; a full restore reads {full}", promoted.len(), promoted.iter().sum::<i64>());
    assert_eq!(promoted.len(), victim.len(), "each of the victim's partitions was promoted from its copy");
    assert!(promoted.iter().sum::<i64>() < full / 4, "promotion read the lag, not the changelog: {promoted:?} of {full}");
    s1::assert_exact(replicas[1].addr, &records, "after the promotion");
}

fn get_ready(addr: std::net::SocketAddr) -> Value {
    serde_json::from_str(&http_get_raw(addr, "/ready").1).unwrap()
}

/// A partition handed over to another replica keeps its local state as a warm start for
/// `state.cleanup_delay`, then it is deleted; the partition kept stays whole, and both
/// replicas answer everything exactly.
#[test]
fn handed_over_state_is_deleted_after_the_cleanup_delay() {
    let cluster = Cluster::for_example("s1-uvpv.toml", 2);
    let dir = tempfile::tempdir().unwrap();
    let records = generate(Scenario::S1, &GenOptions { count: 4_000, partitions: 2, ..GenOptions::for_scenario(Scenario::S1) });
    cluster.produce(tally::gen::topic(Scenario::S1), &records);
    let mut cfg = config(&cluster, dir.path());
    cfg.state.cleanup_delay = "2s".into();
    let probe = "/api/v1/metrics/views";
    let mut first = Replica::new(dir.path(), "c0", &cfg);
    first.start();
    wait_caught_up(first.addr, probe, &ends(&records));
    let mut second = Replica::new(dir.path(), "c1", &cfg);
    second.start();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while metric_value(&http_get_raw(first.addr, "/metrics").1, "tally_state_partitions_cleaned_total") < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no partition's state was deleted: {}", first.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    for r in [&first, &second] {
        wait_caught_up(r.addr, probe, &ends(&records));
        s1::assert_exact(r.addr, &records, "after a partition was handed over and its old state deleted");
    }
    first.terminate();
    second.terminate();

    let topo = tally::topology::Topology::compile(&cfg).unwrap();
    let store = tally::store::Store::open(&first.state).unwrap();
    let src = &topo.sources[0];
    let names = || src.metrics.iter().map(|&m| topo.metrics[m].name.as_str());
    let kept: Vec<usize> = (0..2).map(|p| store.partition_keys(names(), &src.name, p).unwrap().len()).collect();
    println!("keys left in the first replica's store, by partition: {kept:?}");
    assert!(kept.contains(&0) && kept.iter().any(|&k| k > 0), "one partition deleted, the other kept whole: {kept:?}");
}
