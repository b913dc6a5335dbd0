//! Restore: a replica with an empty disk rebuilds a partition from a long changelog, and
//! one with a valid local checkpoint reads only the changelog's tail — counted exactly
//! against the changelog's offsets — and both answer exactly. On the nisshi broker (the
//! mock cluster silently drops a partition's data beyond ~5 MiB, too little for a long
//! changelog of sketches).

mod common;
mod model;

use tally::gen::{generate, GenOptions, Scenario};

use common::*;

const CHANGELOG: &str = "tally-s1-uvpv-changelog";

fn restored(t: &Tally) -> i64 {
    metric_sum(&t.metrics(), "tally_restore_records_total") as i64
}

#[test]
fn empty_disk_restores_everything_and_a_checkpoint_only_the_tail() {
    let opts = GenOptions { count: 40_000, partitions: 2, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let (first, second) = records.split_at(records.len() / 2);
    let topic = tally::gen::topic(Scenario::S1);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let cluster = Cluster::nisshi(&example_config("s1-uvpv.toml", "", dirs[0].path()), opts.partitions);
    let config = |dir: &std::path::Path| {
        let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, dir);
        // Flush very often: a long changelog.
        cfg.state.commit_interval = "5ms".into();
        cfg.kafka.properties.insert("fetch.wait.max.ms".into(), "50".into());
        cfg
    };

    // A processes the first half, then stops.
    cluster.produce(topic, first);
    let a = Tally::start(config(dirs[0].path()));
    wait_caught_up(a.addr, "/api/v1/metrics/views", &ends(first));
    assert_eq!(restored(&a), 0, "a first start on an empty changelog reads nothing");
    a.stop();
    let after_a: i64 = cluster.high_watermarks(CHANGELOG).iter().sum();

    // B starts on an empty disk: everything comes back from the changelog.
    let b = Tally::start(config(dirs[1].path()));
    wait_caught_up(b.addr, "/api/v1/metrics/views", &ends(first));
    println!("restored {after_a} changelog records onto an empty disk");
    assert_eq!(restored(&b), after_a, "an empty disk restores the whole changelog");
    s1::assert_exact(b.addr, first, "after a restore from an empty disk");
    // B goes on with the second half, then stops.
    cluster.produce(topic, second);
    wait_caught_up(b.addr, "/api/v1/metrics/views", &ends(&records));
    b.stop();
    let after_b: i64 = cluster.high_watermarks(CHANGELOG).iter().sum();

    // A comes back: its disk is valid up to its checkpoint, so it reads only B's records.
    let a = Tally::start(config(dirs[0].path()));
    wait_caught_up(a.addr, "/api/v1/metrics/views", &ends(&records));
    println!("restored the tail of {} records after a checkpoint, of {after_b} in the changelog", after_b - after_a);
    assert_eq!(restored(&a), after_b - after_a, "a valid checkpoint restores only the tail");
    s1::assert_exact(a.addr, &records, "after a restore of the tail");
    a.stop();
}
