//! Replicas as real processes sharing the source partitions through the consumer group, on
//! both brokers (librdkafka's mock cluster hosted by this test process, and a nisshi broker
//! process). While S1 events flow: scale 1 → 3, SIGKILL a random replica at random moments
//! ten times and restart it (once after deleting its state directory), scale 3 → 1 with
//! SIGTERM. Then the last replica owns every partition, and every answer must equal the
//! exact recomputation: no event lost, none counted twice, sketches identical to a clean
//! pass.

mod common;
mod model;

use std::time::{Duration, Instant};

use tally::gen::{generate, GenOptions, Scenario};

use common::replica::Replica;
use common::*;

fn scale_kill_and_restore(cluster: Cluster, broker: &str) {
    let opts = GenOptions { count: 40_000, partitions: 6, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let topic = tally::gen::topic(Scenario::S1);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, dir.path());
    cfg.state.commit_interval = "100ms".into();
    // The broker's minimum session timeout, so that each killed member is replaced quickly.
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    cfg.kafka.properties.insert("fetch.wait.max.ms".into(), "50".into());
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(dir.path(), &format!("r{i}"), &cfg)).collect();

    // Events flow for the whole run: 40 chunks, one every 0.5 s.
    let feeder = cluster.feed_over_time(topic, &records, 40);

    replicas[0].start();
    replicas[0].wait_ready();
    std::thread::sleep(Duration::from_secs(2));
    // 1 → 3.
    replicas[1].start();
    replicas[2].start();
    let mut rng = Rng(7);
    let started = Instant::now();
    for k in 0..10 {
        std::thread::sleep(Duration::from_millis(300 + rng.below(2500)));
        let victim = rng.below(3) as usize;
        let r = &mut replicas[victim];
        r.kill();
        if k == 4 {
            // Lose a disk: its partitions come back from the changelog, whoever gets them.
            std::fs::remove_dir_all(&r.state).unwrap_or_default();
        }
        println!("[{broker}] kill {k}: {} at {:.1} s", r.name, started.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(rng.below(1000)));
        r.start();
    }
    feeder.join().unwrap();
    // 3 → 1: clean shutdowns hand their partitions over.
    for r in &mut replicas[1..] {
        let took = r.terminate();
        println!("[{broker}] {} stopped cleanly in {:.2} s", r.name, took.as_secs_f64());
    }
    let last = &replicas[0];
    wait_caught_up(last.addr, "/api/v1/metrics/views", &ends(&records));
    s1::assert_exact(last.addr, &records, &format!("[{broker}] after scaling 1→3→1 and 10 SIGKILLs"));
    assert_results(&cluster, last.addr, &records, &cfg, broker);
    // The run must have exercised what it claims: partitions restored from the changelog
    // (from scratch after the lost disk, and tails after moves).
    let (mut restores, mut records) = (0, 0u64);
    for r in &replicas {
        for line in r.log().lines().filter(|l| l.contains(" restored ")) {
            restores += 1;
            records += log_field(line, "records").unwrap_or(0) as u64;
        }
    }
    println!("[{broker}] {restores} partition restores read {records} changelog records in all");
    assert!(records > 0, "no partition was ever restored from the changelog");
}

/// Waits (up to a minute) for the result topic to hold a final row for every window the
/// partitions' watermarks have closed, then checks every row against the reference model.
fn assert_results(cluster: &Cluster, addr: std::net::SocketAddr, records: &[tally::gen::GenRecord], cfg: &tally::config::Config, broker: &str) {
    let partitions = get(addr, "/api/v1/metrics/views")["coverage"]["partitions"].as_array().map_or(0, Vec::len) as i32;
    let topic = cfg.results.topic.clone().expect("the S1 example names its result topic");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match s1::check_results(&cluster.read_to_end(&topic), records, partitions) {
            Ok(summary) => return println!("[{broker}] {summary}"),
            Err(e) if Instant::now() > deadline => panic!("[{broker}] result topic: {e}"),
            Err(_) => std::thread::sleep(Duration::from_secs(1)),
        }
    }
}

#[test]
fn replicas_on_the_mock_cluster() {
    scale_kill_and_restore(Cluster::for_example("s1-uvpv.toml", 6), "mock");
}

#[test]
fn replicas_on_nisshi() {
    let cfg = example_config("s1-uvpv.toml", "", std::path::Path::new("unused"));
    scale_kill_and_restore(Cluster::nisshi(&cfg, 6), "nisshi");
}
