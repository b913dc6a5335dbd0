//! Scenarios S1, S2a, S2b, S4, S5 end to end: generated events (out-of-order, late,
//! mistyped and malformed ones included) go through a real Kafka protocol broker into tally
//! running its shipped config; every HTTP answer — every window of every metric and ratio,
//! spans, top lists — and every counter is compared with the reference model
//! (`tests/model`) fed with the records as the broker holds them, Kafka timestamps included.

mod common;
mod model;

use std::collections::BTreeMap;

use serde_json::Value;
use tally::gen::{generate, GenOptions, Scenario};

use common::*;
use model::Model;

const MIN: i64 = 60_000;

/// A scenario run: tally left running on the broker, and the model of the same records.
struct Run {
    tally: Tally,
    cluster: Cluster,
    model: Model,
    /// Source topic and the dead-letter topic of the config.
    topics: (String, String),
    _state: tempfile::TempDir,
}

fn run(scenario: Scenario, config: &str, probe: &str, count: usize) -> Run {
    let opts = GenOptions { count, ..GenOptions::for_scenario(scenario) };
    let records = generate(scenario, &opts);
    let topic = tally::gen::topic(scenario);
    let state = tempfile::tempdir().unwrap();
    let mut cfg = example_config(config, "", state.path());
    let cluster = Cluster::for_config(&cfg, opts.partitions);
    cfg.kafka.bootstrap_servers = cluster.brokers.clone();
    let dead = format!("{}-dead-letters", cfg.kafka.application_id);
    cluster.produce(topic, &records);
    let tally = Tally::start(cfg);
    wait_caught_up(tally.addr, probe, &ends(&records));
    let model = model_of(config, opts.partitions, cluster.records_of(topic));
    Run { tally, cluster, model, topics: (topic.to_string(), dead), _state: state }
}

/// Every answer and counter of the run against the model; returns how many records were
/// late, partly late and invalid, for the callers to check the workload exercised them.
fn check(r: &Run) -> (u64, u64, u64) {
    assert_no_diffs(&check_answers(r.tally.addr, &r.model), "windows and ratios");
    let text = r.tally.metrics();
    let (mut late, mut partly): (BTreeMap<usize, u64>, BTreeMap<usize, u64>) = Default::default();
    let mut invalid: BTreeMap<&str, u64> = BTreeMap::new();
    for (_, _, o) in &r.model.outcomes[0] {
        match o {
            model::Outcome::Invalid(reason) => *invalid.entry(reason).or_default() += 1,
            model::Outcome::Counted { late: l, partly: p } => {
                l.iter().for_each(|m| *late.entry(*m).or_default() += 1);
                p.iter().for_each(|m| *partly.entry(*m).or_default() += 1);
            }
        }
    }
    for (mi, m) in r.model.spec.metrics.iter().enumerate() {
        let got = |name: &str| metric_value(&text, &format!("{name}{{metric=\"{}\"}}", m.name)) as u64;
        assert_eq!(got("tally_records_late_total"), late.get(&mi).copied().unwrap_or(0), "late records of {}", m.name);
        assert_eq!(got("tally_records_partly_late_total"), partly.get(&mi).copied().unwrap_or(0), "partly late records of {}", m.name);
    }
    let source = &r.model.spec.sources[0].name;
    for (reason, n) in &invalid {
        let got = metric_value(&text, &format!("tally_records_invalid_total{{reason=\"{reason}\",source=\"{source}\"}}"));
        assert_eq!(got as u64, *n, "invalid records ({reason})");
    }
    let bad: u64 = invalid.values().sum();
    assert_eq!(metric_sum(&text, "tally_records_invalid_total") as u64, bad, "invalid records");
    assert_eq!(metric_value(&text, "tally_records_set_aside_total{topic=\"dead_letter\"}") as u64, bad, "records sent to the dead-letter topic");
    (late.values().sum(), partly.values().sum(), bad)
}

/// `GET path`: the JSON on a 200, else the error text.
fn answer(r: &Run, path: &str) -> Result<Value, String> {
    match http_get_raw(r.tally.addr, path) {
        (200, body) => Ok(serde_json::from_str(&body).unwrap()),
        (status, body) => Err(format!("{status}: {body}")),
    }
}

fn metric(r: &Run, name: &str) -> usize {
    r.model.spec.metrics.iter().position(|m| m.name == name).unwrap()
}

#[test]
fn s1_uv_pv_conversion() {
    let r = run(Scenario::S1, "s1-uvpv.toml", "/api/v1/metrics/uv_all_time", 12_000);
    let (late, _, invalid) = check(&r);
    assert!(invalid > 0 && late > 0, "the workload must exercise late and invalid records");
    let wrong_type = r.model.outcomes[0].iter().filter(|o| o.2 == model::Outcome::Invalid("wrong_type")).count();
    assert!(wrong_type > 0, "a record_type that is not an INT is a bad record");

    // UV over the last day: the span merges slice sketches.
    let uv = metric(&r, "uv_10m");
    let latest = r.model.latest_event(0).unwrap();
    let span = answer(&r, "/api/v1/metrics/uv_10m/span?last=1d&sketch=canonical");
    assert_no_diffs(&r.model.check_span(uv, span, Some(latest - 24 * 60 * MIN), None, None), "uv_10m span");
    // Top-N of the current window (the one ending first that holds the newest data).
    let pv = metric(&r, "pv_by_product");
    assert_no_diffs(&r.model.check_top(pv, answer(&r, "/api/v1/metrics/pv_by_product/top?n=5"), 5, None, 0), "top products");

    // Dead letters carry their reason and origin.
    let bad: Vec<(i32, i64)> = r.model.outcomes[0].iter().filter(|o| matches!(o.2, model::Outcome::Invalid(_))).map(|o| (o.0, o.1)).collect();
    let dead = r.cluster.read_all(&r.topics.1, bad.len());
    assert_eq!(dead.len(), bad.len());
    let origins: std::collections::BTreeSet<(String, String)> =
        dead.iter().map(|(h, _)| (h["tally.origin.partition"].clone(), h["tally.origin.offset"].clone())).collect();
    let want: std::collections::BTreeSet<(String, String)> = bad.iter().map(|(p, o)| (p.to_string(), o.to_string())).collect();
    assert_eq!(origins, want);
    assert!(dead.iter().all(|(h, _)| !h["tally.reason"].is_empty() && h["tally.origin.topic"] == r.topics.0));
    r.tally.stop();
}

#[test]
fn s2a_daily_spend_with_latest_fields() {
    let r = run(Scenario::S2a, "s2a-game-spend.toml", "/api/v1/metrics/spend_per_day", 8_000);
    check(&r);
    let m = metric(&r, "spend_per_day");
    let rows = r.model.rows(m, Default::default(), None);
    let all: usize = r.model.windows(m, 0).iter().map(|w| r.model.fold(m, *w).len()).sum();
    assert!(rows.len() < all, "the workload must have groups whose sum is not positive (having total > 0 drops them)");
    r.tally.stop();
}

#[test]
fn s2b_running_daily_pv_uv() {
    let r = run(Scenario::S2b, "s2b-pv-uv.toml", "/api/v1/metrics/pv_uv_today", 6_000);
    check(&r);
    let m = metric(&r, "pv_uv_today");
    let starts: std::collections::BTreeSet<i64> = r.model.windows(m, 0).iter().map(|w| w.0).collect();
    assert!(starts.len() >= 2, "the stream crosses local midnight: two running totals");
    r.tally.stop();
}

#[test]
fn s4_behaviour_breakdowns() {
    let r = run(Scenario::S4, "s4-user-behavior.toml", "/api/v1/metrics/by_action", 8_000);
    let (late, _, _) = check(&r);
    assert!(late > 0, "records days late are late for their day");
    r.tally.stop();
}

#[test]
fn s5_hot_products() {
    let r = run(Scenario::S5, "s5-hot-products.toml", "/api/v1/metrics/clicks_running_total", 10_000);
    let (_, partly, _) = check(&r);
    assert!(partly > 0, "records minutes late are late for their minute but not for the hour around it");
    // Every minute row carries its window end.
    let w = &answer(&r, "/api/v1/metrics/clicks_per_product_1m?limit=1").unwrap()["rows"][0]["window"];
    assert_eq!(w["end"].as_i64().unwrap() - w["start"].as_i64().unwrap(), MIN);
    let hot = metric(&r, "hot_products_1h");
    assert_no_diffs(&r.model.check_top(hot, answer(&r, "/api/v1/metrics/hot_products_1h/top?n=10"), 10, None, 0), "hot products now");
    r.tally.stop();
}
