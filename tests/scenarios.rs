//! Scenarios S1, S2a, S2b, S4, S5 end to end: generated events (out-of-order, late and
//! malformed ones included) go through a real Kafka protocol broker into tally; every HTTP
//! answer is compared with an exact recomputation in plain Rust over the same events.

mod common;

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;
use tally::gen::{generate, GenOptions, GenRecord, Scenario};

use common::*;

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;
const DAY: i64 = 24 * HOUR;
const SHANGHAI: i64 = 8 * HOUR;

/// Generates a scenario's events, runs them through tally, and returns what is needed to
/// check the answers. Tally is left running for queries.
struct Run {
    records: Vec<GenRecord>,
    tally: Tally,
    cluster: Cluster,
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
    cluster.produce(topic, &records);
    let tally = Tally::start(cfg);
    wait_caught_up(tally.addr, probe, &ends(&records));
    Run { records, tally, cluster, _state: state }
}

/// The late and invalid counters tally exports, against the recomputed ones.
fn check_counters<S: AsRef<str>>(run: &Run, late: impl IntoIterator<Item = (S, u64)>, invalid: u64) {
    let text = run.tally.metrics();
    for (metric, n) in late {
        let metric = metric.as_ref();
        let got = metric_value(&text, &format!("tally_records_late_total{{metric=\"{metric}\"}}"));
        assert_eq!(got as u64, n, "late records of {metric}");
    }
    assert_eq!(metric_sum(&text, "tally_records_invalid_total") as u64, invalid, "invalid records");
    let dead = metric_value(&text, "tally_records_set_aside_total{topic=\"dead_letter\"}");
    assert_eq!(dead as u64, invalid, "records sent to the dead-letter topic");
}

/// Rows of a windowed answer as (window start, key text) → values.
fn rows(answer: &Value) -> BTreeMap<(i64, String), Value> {
    answer["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let start = r["window"]["start"].as_i64().unwrap_or(0);
            let key = r["key"].as_object().unwrap().values().map(text).collect::<Vec<_>>().join("|");
            ((start, key), r["values"].clone())
        })
        .collect()
}

fn counts_of(answer: &Value, agg: &str) -> BTreeMap<(i64, String), u64> {
    rows(answer).into_iter().map(|(k, v)| (k, v[agg].as_u64().unwrap_or_else(|| panic!("{agg} in {v}")))).collect()
}

#[test]
fn s1_uv_pv_conversion() {
    let r = run(Scenario::S1, "s1-uvpv.toml", "/api/v1/metrics/uv_all_time", 12_000);
    let s1::S1 { uv_all, uv_10m, pv, views, purchases, purchases_by_product, span_users, late, invalid } = s1::truth(&r.records);
    let evs = replay(&r.records, |o| local_ms(o.get("create_time"), 8), 10 * MIN);
    assert!(invalid > 0 && late.values().sum::<u64>() > 0, "the workload must exercise late and invalid records");

    assert_eq!(counts_of(&r.tally.get("/api/v1/metrics/pv_by_product"), "pv"), pv);
    assert_eq!(counts_of(&r.tally.get("/api/v1/metrics/views"), "views"), views);
    assert_eq!(counts_of(&r.tally.get("/api/v1/metrics/purchases"), "purchases"), purchases);
    assert_eq!(counts_of(&r.tally.get("/api/v1/metrics/purchases_by_product"), "purchases"), purchases_by_product);

    // UV: estimates within 3 standard errors, sketches identical to a clean single pass.
    let all = r.tally.get("/api/v1/metrics/uv_all_time?sketch=canonical");
    let uv = &all["rows"][0]["values"]["uv"];
    assert_hll(uv, uv_all.len(), "uv_all_time");
    assert!(uv["sketch"].as_str().unwrap() == sketch_hex(&uv_all, 14), "uv_all_time sketch");
    let windows = rows(&r.tally.get("/api/v1/metrics/uv_10m?sketch=canonical"));
    assert_eq!(windows.keys().collect::<Vec<_>>(), uv_10m.keys().collect::<Vec<_>>());
    for (k, users) in &uv_10m {
        assert_hll(&windows[k]["uv"], users.len(), "uv_10m");
        assert!(windows[k]["uv"]["sketch"].as_str().unwrap() == sketch_hex(users, 14), "uv_10m sketch of window {k:?}");
    }
    let span = r.tally.get("/api/v1/metrics/uv_10m/span?last=1d&sketch=canonical");
    assert!(span["rows"][0]["values"]["uv"]["sketch"].as_str().unwrap() == sketch_hex(&span_users, 14), "UV over a span merges slice sketches");

    // Conversion: purchases / views per window, overall and per product.
    for (name, num, den) in [("conversion_rate", &purchases, &views), ("conversion_rate_by_product", &purchases_by_product, &pv)] {
        let got = rows(&r.tally.get(&format!("/api/v1/metrics/{name}")));
        assert_eq!(got.keys().collect::<Vec<_>>(), den.keys().collect::<Vec<_>>(), "{name} windows");
        for (k, d) in den {
            let n = num.get(k).copied().unwrap_or(0);
            assert_eq!(got[k]["numerator"].as_u64(), Some(n), "{name} {k:?}");
            assert_eq!(got[k]["denominator"].as_u64(), Some(*d), "{name} {k:?}");
            assert!((got[k]["ratio"].as_f64().unwrap() - n as f64 / *d as f64).abs() < 1e-12);
        }
    }

    // Top-N of the current window (the one ending first that holds the newest data: for a
    // 10-minute window sliding by 5, the one that started a slide before the newest) = the
    // recomputed ranking.
    let newest = pv.keys().map(|(w, _)| *w).max().unwrap() - 5 * MIN;
    let mut ranking: Vec<(u64, &String)> = pv.iter().filter(|((w, _), _)| *w == newest).map(|((_, p), c)| (*c, p)).collect();
    ranking.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
    let top = r.tally.get("/api/v1/metrics/pv_by_product/top?n=5");
    assert_eq!(top["window"]["start"].as_i64(), Some(newest));
    let got: Vec<(u64, String)> = top["top"].as_array().unwrap().iter().map(|e| (e["value"].as_f64().unwrap() as u64, e["item"].as_str().unwrap().to_string())).collect();
    let want: Vec<(u64, String)> = ranking.iter().take(5).map(|(c, p)| (*c, (*p).clone())).collect();
    assert_eq!(got, want);

    check_counters(&r, late, invalid);

    // Dead letters carry their reason and origin.
    let bad: Vec<&Ev> = evs.iter().filter(|e| e.event.is_none()).collect();
    let dead = r.cluster.read_all("tally-s1-dead-letters", bad.len());
    assert_eq!(dead.len(), bad.len());
    let origins: std::collections::BTreeSet<(String, String)> = dead.iter().map(|(h, _)| (h["tally.origin.partition"].clone(), h["tally.origin.offset"].clone())).collect();
    let want: std::collections::BTreeSet<(String, String)> = bad.iter().map(|e| (e.partition.to_string(), e.offset.to_string())).collect();
    assert_eq!(origins, want);
    assert!(dead.iter().all(|(h, _)| !h["tally.reason"].is_empty() && h["tally.origin.topic"] == "uvpv-demo"));
    r.tally.stop();
}

#[test]
fn s2a_daily_spend_with_latest_fields() {
    let r = run(Scenario::S2a, "s2a-game-spend.toml", "/api/v1/metrics/spend_per_day", 8_000);
    let evs = replay(&r.records, |o| local_ms(o.get("servertime"), 8), 5 * MIN);
    // (day, appkey) → (total in micro-units, latest (t, partition, offset) → fields)
    type Latest = ((i64, i32, i64), [Value; 3]);
    let mut groups: BTreeMap<(i64, String), (i128, Option<Latest>)> = BTreeMap::new();
    let Split { accepted, late, invalid } = split(&evs, |t| floor(t, DAY, SHANGHAI) + DAY);
    for (o, t, ev) in accepted {
        let g = groups.entry((floor(t, DAY, SHANGHAI), text(&o["appkey"]))).or_default();
        g.0 += (o["consumenum"].as_f64().unwrap() * 1e6).round() as i128;
        let order = (t, ev.partition, ev.offset);
        if g.1.as_ref().is_none_or(|(o2, _)| order > *o2) {
            g.1 = Some((order, [o["serverid"].clone(), o["roleid"].clone(), o["servertime"].clone()]));
        }
    }
    let got = rows(&r.tally.get("/api/v1/metrics/spend_per_day"));
    let kept: BTreeMap<_, _> = groups.iter().filter(|(_, (total, _))| *total > 0).collect();
    assert!(kept.len() < groups.len(), "the workload must have groups whose sum is not positive");
    assert_eq!(got.keys().collect::<Vec<_>>(), kept.keys().copied().collect::<Vec<_>>(), "having total > 0 keeps exactly the positive groups");
    for (k, (total, latest)) in kept {
        let v = &got[k];
        assert_eq!((v["total"].as_f64().unwrap() * 1e6).round() as i128, *total, "{k:?}");
        let fields = &latest.as_ref().unwrap().1;
        assert_eq!(v["latest(serverid)"], fields[0], "{k:?}");
        assert_eq!(v["latest(roleid)"], fields[1], "{k:?}");
        assert_eq!(v["latest(servertime)"], fields[2], "{k:?}");
    }
    check_counters(&r, [("spend_per_day", late)], invalid);
    r.tally.stop();
}

#[test]
fn s2b_running_daily_pv_uv() {
    let r = run(Scenario::S2b, "s2b-pv-uv.toml", "/api/v1/metrics/pv_uv_today", 6_000);
    let evs = replay(&r.records, |o| local_ms(o.get("c_time"), 8), MIN);
    // Per minute slice: pv and ips; a cumulative window = all slices of its day up to its end.
    let mut slices: BTreeMap<i64, (u64, Distinct)> = BTreeMap::new();
    let Split { accepted, late, invalid } = split(&evs, |t| floor(t, MIN, SHANGHAI) + MIN);
    for (o, t, _) in accepted {
        let e = slices.entry(floor(t, MIN, SHANGHAI)).or_default();
        e.0 += 1;
        e.1.insert(text(&o["client_ip"]));
    }
    let got = r.tally.get("/api/v1/metrics/pv_uv_today?sketch=canonical");
    let got: BTreeMap<(i64, i64), Value> = got["rows"].as_array().unwrap().iter().map(|r| ((r["window"]["start"].as_i64().unwrap(), r["window"]["end"].as_i64().unwrap()), r["values"].clone())).collect();
    // Expected: for each day with data, a window per minute from its first minute with data
    // (earlier ones are empty, and empty windows are not reported, as in Flink) to its last.
    let mut want = 0;
    let days: std::collections::BTreeSet<i64> = slices.keys().map(|s| floor(*s, DAY, SHANGHAI)).collect();
    for day in days {
        let first = *slices.range(day..day + DAY).next().unwrap().0;
        let last = *slices.range(day..day + DAY).next_back().unwrap().0;
        let (mut pv, mut ips) = (0u64, Distinct::new());
        let mut end = first + MIN;
        while end <= last + MIN {
            if let Some((p, i)) = slices.get(&(end - MIN)) {
                pv += p;
                ips.extend(i.iter().cloned());
            }
            let v = got.get(&(day, end)).unwrap_or_else(|| panic!("missing cumulative window ({day}, {end})"));
            assert_eq!(v["pv"].as_u64(), Some(pv), "pv up to {end}");
            assert_hll(&v["uv"], ips.len(), "uv");
            assert!(v["uv"]["sketch"].as_str().unwrap() == sketch_hex(&ips, 14), "uv sketch up to {end}");
            want += 1;
            end += MIN;
        }
    }
    assert_eq!(got.len(), want, "no other windows");
    check_counters(&r, [("pv_uv_today", late)], invalid);
    r.tally.stop();
}

#[test]
fn s4_behaviour_breakdowns() {
    let r = run(Scenario::S4, "s4-user-behavior.toml", "/api/v1/metrics/by_action", 8_000);
    let time_of = |o: &serde_json::Map<String, Value>| {
        let (m, d) = (o.get("month")?.as_i64()?, o.get("day")?.as_i64()?);
        let date = chrono::NaiveDate::from_ymd_opt(2021, m as u32, d as u32)?;
        Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp_millis() - SHANGHAI)
    };
    let evs = replay(&r.records, time_of, 5 * MIN);
    let dims = ["action", "age_range", "gender", "province"];
    let mut want: Vec<BTreeMap<(i64, String), u64>> = vec![BTreeMap::new(); 4];
    let Split { accepted, late, invalid } = split(&evs, |t| floor(t, DAY, SHANGHAI) + DAY);
    for (o, t, _) in accepted {
        for (i, d) in dims.iter().enumerate() {
            *want[i].entry((floor(t, DAY, SHANGHAI), text(&o[*d]))).or_default() += 1;
        }
    }
    for (i, d) in dims.iter().enumerate() {
        let got = counts_of(&r.tally.get(&format!("/api/v1/metrics/by_{d}")), "count");
        assert_eq!(got, want[i], "by_{d}");
    }
    check_counters(&r, dims.iter().map(|d| (format!("by_{d}"), late)), invalid);
    r.tally.stop();
}

#[test]
fn s5_hot_products() {
    let r = run(Scenario::S5, "s5-hot-products.toml", "/api/v1/metrics/clicks_running_total", 10_000);
    let evs = replay(&r.records, |o| o.get("event_time")?.as_i64(), 5_000);
    let mut per_min: BTreeMap<(i64, String), u64> = BTreeMap::new();
    let mut five: BTreeMap<i64, HashMap<String, u64>> = BTreeMap::new();
    let mut running: BTreeMap<(i64, String), u64> = BTreeMap::new();
    let mut late: BTreeMap<&str, u64> = BTreeMap::new();
    let mut invalid = 0;
    for ev in &evs {
        let Some((o, t)) = &ev.event else {
            invalid += 1;
            continue;
        };
        if o["action"] != "click" {
            continue;
        }
        let p = text(&o["product_id"]);
        *running.entry((0, p.clone())).or_default() += 1;
        let m = floor(*t, MIN, 0);
        if m + MIN <= ev.wm_before {
            *late.entry("clicks_per_product_1m").or_default() += 1;
        } else {
            *per_min.entry((m, p.clone())).or_default() += 1;
        }
        let s = floor(*t, 5 * MIN, 0);
        if s + 5 * MIN <= ev.wm_before {
            *late.entry("hot_products_1h").or_default() += 1;
        } else {
            *five.entry(s).or_default().entry(p).or_default() += 1;
        }
    }
    assert_eq!(counts_of(&r.tally.get("/api/v1/metrics/clicks_per_product_1m"), "clicks"), per_min);
    // Every minute row carries its window end.
    let answer = r.tally.get("/api/v1/metrics/clicks_per_product_1m?limit=1");
    let w = &answer["rows"][0]["window"];
    assert_eq!(w["end"].as_i64().unwrap() - w["start"].as_i64().unwrap(), MIN);
    assert_eq!(counts_of(&r.tally.get("/api/v1/metrics/clicks_running_total"), "clicks"), running);

    // Top 10 of every hourly window (sliding 5 minutes) = ranking of merged 5-minute totals.
    let got = rows(&r.tally.get("/api/v1/metrics/hot_products_1h"));
    let starts: std::collections::BTreeSet<i64> = five.keys().flat_map(|s| (0..12).map(move |i| s - i * 5 * MIN)).collect();
    assert_eq!(got.len(), starts.len());
    for w in starts {
        let mut totals: HashMap<&String, u64> = HashMap::new();
        for (_, m) in five.range(w..w + HOUR) {
            for (p, c) in m {
                *totals.entry(p).or_default() += c;
            }
        }
        let mut ranked: Vec<(u64, &String)> = totals.into_iter().map(|(p, c)| (c, p)).collect();
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let want: Vec<Value> = ranked.iter().take(10).map(|(c, p)| serde_json::json!({ "item": p, "value": c })).collect();
        assert_eq!(got[&(w, String::new())]["top_products"], Value::Array(want), "window {w}");
    }
    check_counters(&r, late, invalid);
    r.tally.stop();
}
