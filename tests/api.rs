//! The HTTP API's contract: errors are JSON with the right status and say what was wrong;
//! health, readiness, the OpenAPI document and the metrics list are served; the CLI checks
//! configs and names the broken key.

mod common;
mod model;

use std::process::Command;

use serde_json::Value;
use tally::gen::{generate, GenOptions, Scenario};

use common::*;

#[test]
fn errors_documents_and_probes() {
    let opts = GenOptions { count: 1_000, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let state = tempfile::tempdir().unwrap();
    let cluster = Cluster::for_example("s1-uvpv.toml", opts.partitions);
    cluster.produce("uvpv-demo", &records);
    let tally = Tally::start(example_config("s1-uvpv.toml", &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&records));

    let expect_error = |path: &str, status: u16, mentions: &str| {
        let (got, body) = http_get_raw(tally.addr, path);
        assert_eq!(got, status, "GET {path}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("GET {path}: error body is not JSON: {body}"));
        assert_eq!(v["status"], status);
        let msg = v["error"].as_str().unwrap();
        assert!(msg.contains(mentions), "GET {path}: `{msg}` should mention `{mentions}`");
    };
    expect_error("/api/v1/metrics/nope", 404, "nope");
    expect_error("/api/v1/metrics/nope/top", 404, "nope");
    expect_error("/no/such/route", 404, "openapi");
    expect_error("/api/v1/metrics/views?limit=0", 400, "limit");
    expect_error("/api/v1/metrics/views?from=yesterday", 400, "from");
    expect_error("/api/v1/metrics/views?from=2000&to=1000", 400, "to");
    expect_error("/api/v1/metrics/views?colour=red", 400, "colour");
    expect_error("/api/v1/metrics/views?sketch=raw", 400, "canonical");
    expect_error("/api/v1/metrics/uv_10m/span?last=6parsecs", 400, "last");
    expect_error("/api/v1/metrics/uv_10m/span?last=6h&from=0", 400, "last");
    expect_error("/api/v1/metrics/pv_by_product/top?n=many", 400, "n");
    expect_error("/api/v1/metrics/views/top?aggregate=nope", 400, "nope");
    // Times and spans beyond the range of event times are refused, not overflowed.
    expect_error("/api/v1/metrics/views/top?at=9223372036854775807", 400, "at");
    expect_error("/api/v1/metrics/views?from=-9223372036854775808", 400, "from");
    expect_error("/api/v1/metrics/uv_10m/span?last=9223372036854775807ms", 400, "last");

    // Time parameters: epoch ms and RFC 3339 name the same instant.
    let a = tally.get("/api/v1/metrics/views?from=1630915200000&to=1630916400000");
    let b = tally.get("/api/v1/metrics/views?from=2021-09-06T16:00:00%2B08:00&to=2021-09-06T16:20:00%2B08:00");
    assert_eq!(a["rows"], b["rows"]);
    assert!(!a["rows"].as_array().unwrap().is_empty());
    // A window overlapping the range is answered whole, even where it reaches past it.
    let whole: std::collections::HashMap<(i64, i64), Value> = tally.get("/api/v1/metrics/views")["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| ((r["window"]["start"].as_i64().unwrap(), r["window"]["end"].as_i64().unwrap()), r["values"].clone()))
        .collect();
    for r in a["rows"].as_array().unwrap() {
        let (s, e) = (r["window"]["start"].as_i64().unwrap(), r["window"]["end"].as_i64().unwrap());
        assert!(e > 1_630_915_200_000 && s < 1_630_916_400_000, "rows overlap the range");
        assert_eq!(r["values"], whole[&(s, e)], "window [{s}, {e}) answered whole");
    }
    // One key of a grouped metric.
    let one = tally.get("/api/v1/metrics/pv_by_product?key=101");
    assert!(one["rows"].as_array().unwrap().iter().all(|r| r["key"]["product_id"] == "101"));

    assert_eq!(tally.get("/health")["status"], "ok");
    assert_eq!(tally.get("/ready")["ready"], true);
    let list = tally.get("/api/v1/metrics");
    let names: Vec<&str> = list["metrics"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"pv_by_product") && names.contains(&"uv_all_time"));
    assert_eq!(list["derived"][0]["name"], "conversion_rate");

    let doc = tally.get("/openapi.json");
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/api/v1/metrics",
        "/api/v1/metrics/{name}",
        "/api/v1/metrics/{name}/span",
        "/api/v1/metrics/{name}/top",
        "/metrics",
        "/health",
        "/ready",
        "/",
        "/internal/v1/partials",
    ] {
        assert!(paths.contains_key(p), "OpenAPI document lacks {p}");
    }
    let (status, html) = http_get_raw(tally.addr, "/");
    assert_eq!(status, 200);
    // Only the SVG namespace name may look like a URL: no script, style or font is fetched.
    let urls: Vec<&str> = html
        .match_indices("http")
        .map(|(i, _)| &html[i..(i + 30).min(html.len())])
        .filter(|u| !u.starts_with("http://www.w3.org/2000/svg"))
        .collect();
    assert!(html.contains("<html") && urls.is_empty(), "the live screen ships its own assets: {urls:?}");

    let text = tally.metrics();
    for name in [
        "tally_records_consumed_total",
        "tally_records_processed_total",
        "tally_records_invalid_total",
        "tally_records_late_total",
        "tally_watermark_seconds",
        "tally_processing_latency_seconds_bucket",
        "tally_queryable_latency_seconds_bucket",
        "tally_flush_duration_seconds_bucket",
        "tally_commit_duration_seconds_bucket",
        "tally_http_requests_total",
        "tally_build_info",
        "tally_metric_value",
    ] {
        assert!(text.contains(name), "/metrics lacks {name}");
    }
    assert!(text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).all(|l| l.starts_with("tally_")), "every metric is prefixed tally_");
    tally.stop();
}

/// With every query slot taken and no room to wait, a query is refused at once with 503 and
/// `Retry-After` (not queued behind the others), counted; once the slot is free, queries are
/// answered again.
#[test]
fn queries_beyond_the_slots_and_the_queue_are_shed_and_counted() {
    let opts = GenOptions { count: 500, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let state = tempfile::tempdir().unwrap();
    let cluster = Cluster::for_example("s1-uvpv.toml", opts.partitions);
    cluster.produce("uvpv-demo", &records);
    let mut cfg = example_config("s1-uvpv.toml", &cluster.brokers, state.path());
    cfg.http.max_concurrent_queries = Some(1);
    cfg.http.max_queued_queries = Some(0);
    // The slot's holder: a query for a position no partition reaches, waiting this long.
    cfg.cluster.position_wait = Some("4s".into());
    let tally = Tally::start(cfg);
    let ends = ends(&records);
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends);

    let unreached = format!("uvpv~0-{}", ends[&0] + 1_000_000);
    let addr = tally.addr;
    let holder = std::thread::spawn(move || http_get_raw(addr, &format!("/api/v1/metrics/views?min_position={unreached}")));
    let busy = "tally_http_busy_slots{pool=\"queries\"}";
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while metric_value(&tally.metrics(), busy) < 1.0 {
        assert!(!holder.is_finished(), "the holder was answered before it was seen holding the slot: {:?}", holder.join());
        assert!(std::time::Instant::now() < deadline, "the holder never took the slot");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (status, head, body) = http_exchange(tally.addr, "GET", "/api/v1/metrics/views", &[], &[]).unwrap();
    let body = String::from_utf8_lossy(&body);
    assert!(!holder.is_finished(), "the slot was still taken when the query was asked");
    assert_eq!(status, 503, "{body}");
    assert!(head.to_ascii_lowercase().contains("\r\nretry-after: 1"), "{head}");
    assert!(body.contains("too many queries"), "{body}");
    // The probes and the scrape are no queries: never shed.
    assert_eq!(http_get_raw(tally.addr, "/ready").0, 200);
    assert_eq!(metric_value(&tally.metrics(), "tally_http_shed_total{pool=\"queries\"}"), 1.0);

    let (held, _) = holder.join().unwrap();
    assert_ne!(held, 200, "no partition reached the position asked for");
    assert_eq!(metric_value(&tally.metrics(), busy), 0.0);
    assert_eq!(http_get_raw(tally.addr, "/api/v1/metrics/views").0, 200, "the slot is free again");
    tally.stop();
}

#[test]
fn check_explains_good_configs_and_names_the_broken_key() {
    let tally = env!("CARGO_BIN_EXE_tally");
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples")).unwrap() {
        let path = entry.unwrap().path();
        let out = Command::new(tally).args(["check", "--config"]).arg(&path).output().unwrap();
        assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).contains("config OK"));
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/s5-hot-products.toml")).unwrap();
    std::fs::write(&bad, text.replace("size = \"1m\"", "size = \"1 fortnight\"")).unwrap();
    let out = Command::new(tally).args(["check", "--config"]).arg(&bad).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("metrics[0].window.size") && err.contains("fortnight") && err.contains("ms, s, m, h, d"), "{err}");
}
