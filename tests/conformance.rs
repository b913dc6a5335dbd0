//! The HTTP API against its OpenAPI document (`/openapi.json`), by schemathesis (PyPI;
//! `.ci/install-test-tools` puts it in a virtualenv): generated requests to every operation,
//! and every response checked — no 5xx, status codes, content types, headers and bodies as
//! documented, 405 for undeclared methods — against a tally with S1 data on the mock cluster.
//!
//! Left out: schemathesis' `positive_data_acceptance`, which expects every schema-valid
//! request to succeed; the API has rules a schema cannot state (a `key` with as many parts as
//! the metric groups by, `last` or `from`/`to` but not both, an `aggregate` the metric has,
//! the replicas' binary wire format, windows past retention) and answers them with 400s and
//! 410s that name the rule.

mod common;
mod model;

use std::path::PathBuf;
use std::process::Command;

use tally::gen::{generate, GenOptions, Scenario};

use common::*;

fn schemathesis() -> PathBuf {
    let path = std::env::var_os("TALLY_SCHEMATHESIS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/tally/tools/schemathesis/bin/st"));
    assert!(path.exists(), "schemathesis is not at {}: run `bash .ci/install-test-tools` or set TALLY_SCHEMATHESIS", path.display());
    path
}

#[test]
fn the_http_api_matches_its_openapi_document() {
    let st = schemathesis();
    let cluster = Cluster::for_example("s1-uvpv.toml", 2);
    let records = generate(Scenario::S1, &GenOptions { count: 4_000, partitions: 2, ..GenOptions::for_scenario(Scenario::S1) });
    cluster.produce(tally::gen::topic(Scenario::S1), &records);
    let dir = tempfile::tempdir().unwrap();
    let tally = Tally::start(example_config("s1-uvpv.toml", &cluster.brokers, dir.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/views", &ends(&records));
    let out = Command::new(&st)
        .args(["run", &format!("http://{}/openapi.json", tally.addr), "--checks", "all", "--exclude-checks", "positive_data_acceptance"])
        .args(["--max-examples", "100", "--generation-deterministic", "--no-color"])
        .env("SCHEMATHESIS_TELEMETRY", "false")
        // It keeps reports and caches in the working directory: not the clone's.
        .current_dir(dir.path())
        .output()
        .expect("running schemathesis");
    let text = String::from_utf8_lossy(&out.stdout);
    let cases = text.lines().find(|l| l.contains(" generated, ")).unwrap_or("").trim().to_string();
    println!("schemathesis: {cases}");
    assert!(
        out.status.success(),
        "schemathesis found responses that do not match the OpenAPI document:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tally.stop();
}
