//! A rolling upgrade: three replicas of the previous release (store version 2) restarted
//! one at a time onto this build while S1 events flow — first with `state.upgrade_from = 2`
//! (the changelog stays readable by the replicas not yet restarted), then once more without
//! it. Afterwards every replica answers exactly as the recomputation over every event.
//!
//! The previous release is built once per machine by `.ci/install-test-tools` from this
//! repository's history (`TALLY_PREVIOUS` overrides where it is).

mod common;
mod model;

use std::path::PathBuf;
use std::time::Duration;

use tally::gen::{generate, GenOptions, Scenario};

use common::replica::Replica;
use common::*;

/// The commit of the previous release: the last with store version 2.
const PREVIOUS: &str = "4d0c8947c0d9b014fdf6ec79a55ed02b9eba9c9d";

fn previous_binary() -> PathBuf {
    let path = std::env::var_os("TALLY_PREVIOUS").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").expect("HOME")).join(format!(".cache/tally/tools/tally-{}/bin/tally", &PREVIOUS[..7]))
    });
    assert!(path.exists(), "the previous tally is not at {}: run `bash .ci/install-test-tools` (builds it once per machine)", path.display());
    path
}

#[test]
fn three_replicas_upgraded_one_at_a_time_answer_exactly() {
    let previous = previous_binary();
    let opts = GenOptions { count: 30_000, partitions: 6, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let topic = tally::gen::topic(Scenario::S1);
    let cluster = Cluster::for_example("s1-uvpv.toml", opts.partitions);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, dir.path());
    cfg.state.commit_interval = "100ms".into();
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(dir.path(), &format!("r{i}"), &cfg)).collect();
    for r in &mut replicas {
        r.run_binary(&previous);
        r.start();
    }
    for r in &replicas {
        r.wait_ready();
    }
    let feeder = cluster.feed_over_time(topic, &records, 40);
    std::thread::sleep(Duration::from_secs(3));

    let mut bridging = cfg.clone();
    bridging.state.upgrade_from = Some(2);
    let this = PathBuf::from(env!("CARGO_BIN_EXE_tally"));
    for (round, config) in [("upgrade_from = 2", &bridging), ("this version's formats", &cfg)] {
        for r in &mut replicas {
            r.terminate();
            r.run_binary(&this);
            r.configure(config);
            r.start();
            r.wait_ready();
            println!("{} restarted onto this build ({round})", r.name);
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    feeder.join().unwrap();
    for r in &replicas {
        wait_caught_up(r.addr, "/api/v1/metrics/views", &ends(&records));
        s1::assert_exact(r.addr, &records, &format!("{} after the rolling upgrade", r.name));
        assert!(r.log().contains("migrated the state store"), "{} did not migrate its store", r.name);
    }
}
