//! Crash safety: a `tally run` process is SIGKILLed again and again while events flow,
//! restarted on the same state directory (deleted once on the way), and in the end every
//! answer equals the exact recomputation — no event lost, none counted twice, sketches
//! identical to a clean pass.

mod common;
mod model;

use std::time::{Duration, Instant};

use serde_json::Value;
use tally::gen::{generate, GenOptions, Scenario};

use common::*;

/// Waits until tally answers and its stored positions sum to at least `at_least`.
fn wait_progress(addr: std::net::SocketAddr, at_least: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some((200, body)) = try_get_raw(addr, "/api/v1/metrics/views") {
            let v: Value = serde_json::from_str(&body).unwrap();
            let done: i64 = v["coverage"]["partitions"].as_array().unwrap().iter().map(|p| p["next_offset"].as_i64().unwrap()).sum();
            if done >= at_least {
                return done;
            }
        }
        assert!(Instant::now() < deadline, "tally made no progress to {at_least}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_loses_nothing_and_counts_nothing_twice() {
    let opts = GenOptions { count: 30_000, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let topic = tally::gen::topic(Scenario::S1);
    let cluster = Cluster::for_example("s1-uvpv.toml", opts.partitions);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, dir.path());
    // Commit often so kills land between, during and after flushes; a short session
    // timeout so the group drops each killed member quickly (the broker's minimum is 6 s).
    cfg.state.commit_interval = "50ms".into();
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    let mut tally = replica::Replica::new(dir.path(), "tally", &cfg);

    // Produce in chunks; after each, start tally, let it get part-way, and kill -9 it.
    let kills = 10;
    let chunk = records.len() / kills;
    let mut produced = 0;
    for k in 0..kills {
        cluster.produce(topic, &records[produced..produced + chunk]);
        produced += chunk;
        tally.start();
        // Kill at varying depths into the new chunk (and sometimes right after start-up).
        let target = (produced - chunk) as i64 + (chunk as i64 * (k as i64 % 4)) / 4;
        wait_progress(tally.addr, target);
        std::thread::sleep(Duration::from_millis(7 * (k as u64 % 5)));
        tally.kill();
        if k == kills / 2 {
            // Lose the disk once: the state comes back from the changelog.
            std::fs::remove_dir_all(&tally.state).unwrap();
        }
    }
    cluster.produce(topic, &records[produced..]);
    tally.start();
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&records));
    s1::assert_exact(tally.addr, &records, &format!("after {kills} SIGKILLs"));
}
