//! Crash safety: a `tally run` process is SIGKILLed again and again while events flow,
//! restarted on the same state directory (deleted once on the way), and in the end every
//! answer equals the exact recomputation — no event lost, none counted twice, sketches
//! identical to a clean pass.

mod common;

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally::gen::{generate, GenOptions, Scenario};

use common::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("starting tally")
}

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

fn counts_of(answer: &Value, agg: &str) -> BTreeMap<(i64, String), u64> {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = r["key"].as_object().unwrap().values().map(text).collect::<Vec<_>>().join("|");
            ((r["window"]["start"].as_i64().unwrap(), key), r["values"][agg].as_u64().unwrap())
        })
        .collect()
}

#[test]
fn sigkill_loses_nothing_and_counts_nothing_twice() {
    let opts = GenOptions { count: 30_000, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let topic = tally::gen::topic(Scenario::S1);
    let cluster = Cluster::for_example("s1-uvpv.toml", opts.partitions);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, &dir.path().join("state"));
    cfg.http.listen = format!("127.0.0.1:{port}");
    // Commit often so kills land between, during and after flushes; a short session
    // timeout so the group drops each killed member quickly (the broker's minimum is 6 s).
    cfg.state.commit_interval = "50ms".into();
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    let config = dir.path().join("tally.toml");
    std::fs::write(&config, toml::to_string(&cfg).unwrap()).unwrap();
    let log = dir.path().join("tally.log");
    let addr: std::net::SocketAddr = cfg.http.listen.parse().unwrap();

    // Produce in chunks; after each, start tally, let it get part-way, and kill -9 it.
    let kills = 10;
    let chunk = records.len() / kills;
    let mut produced = 0;
    for k in 0..kills {
        cluster.produce(topic, &records[produced..produced + chunk]);
        produced += chunk;
        let mut child = spawn(&config, &log);
        // Kill at varying depths into the new chunk (and sometimes right after start-up).
        let target = (produced - chunk) as i64 + (chunk as i64 * (k as i64 % 4)) / 4;
        wait_progress(addr, target);
        std::thread::sleep(Duration::from_millis(7 * (k as u64 % 5)));
        child.kill().unwrap();
        child.wait().unwrap();
        if k == kills / 2 {
            // Lose the disk once: the partitions are read again from the beginning.
            std::fs::remove_dir_all(dir.path().join("state")).unwrap();
        }
    }
    cluster.produce(topic, &records[produced..]);
    let mut child = spawn(&config, &log);
    wait_caught_up(addr, "/api/v1/metrics/views", &ends(&records));

    let want = s1::truth(&records);
    let pv = counts_of(&get(addr, "/api/v1/metrics/pv_by_product"), "pv");
    let views = counts_of(&get(addr, "/api/v1/metrics/views"), "views");
    let total = |m: &BTreeMap<(i64, String), u64>| m.values().sum::<u64>() as i64;
    println!(
        "after {kills} SIGKILLs: pv overcount {} of {} (views {} of {})",
        total(&pv) - total(&want.pv),
        total(&want.pv),
        total(&views) - total(&want.views),
        total(&want.views)
    );
    assert_eq!(pv, want.pv, "pv_by_product after crashes");
    assert_eq!(views, want.views, "views after crashes");
    assert_eq!(counts_of(&get(addr, "/api/v1/metrics/purchases"), "purchases"), want.purchases);
    let all = get(addr, "/api/v1/metrics/uv_all_time?sketch=canonical");
    assert!(all["rows"][0]["values"]["uv"]["sketch"].as_str().unwrap() == sketch_hex(&want.uv_all, 14), "uv_all_time sketch after crashes equals a clean pass");
    let uv = get(addr, "/api/v1/metrics/uv_10m?sketch=canonical");
    for r in uv["rows"].as_array().unwrap() {
        let w = r["window"]["start"].as_i64().unwrap();
        let users = &want.uv_10m[&(w, String::new())];
        assert!(r["values"]["uv"]["sketch"].as_str().unwrap() == sketch_hex(users, 14), "uv_10m sketch of window {w}");
    }
    assert_eq!(uv["rows"].as_array().unwrap().len(), want.uv_10m.len());
    child.kill().unwrap();
    child.wait().unwrap();
}
