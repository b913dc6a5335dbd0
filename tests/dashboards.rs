//! The shipped Grafana dashboards against a real Prometheus scraping a real tally.
//!
//! * `dashboards_match_grafana_provisioning_layout` (no processes): every dashboard file is
//!   well-formed, selects its datasource through the `datasource` variable, the provisioning
//!   files agree with grafana/README.md, and every metric an expression names is one tally
//!   registers.
//! * `every_dashboard_panel_returns_data`: tally runs S1 with events flowing live, a real
//!   Prometheus (`/usr/bin/prometheus`, Debian package `prometheus`) scrapes it every second,
//!   and every target expression of every panel must return data from Prometheus' query API.

mod common;
mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tally::config::KafkaConfig;
use tally::gen::{live, GenOptions, Scenario};
use tally::kafka::feed::Feed;

use common::*;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROVIDER_YAML: &str = "grafana/provisioning/dashboards/tally.yaml";
const DATASOURCE_YAML: &str = "grafana/provisioning/datasources/tally.yaml";
const PROVISIONED_UID: &str = "tally-prometheus";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---- dashboards -------------------------------------------------------------------------------

/// One shipped dashboard file.
struct Dashboard {
    file: String,
    json: Value,
}

fn dashboards() -> Vec<Dashboard> {
    let dir = root().join("grafana/dashboards");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no dashboards in {}", dir.display());
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", p.display()));
            Dashboard { file: p.file_name().unwrap().to_string_lossy().into_owned(), json }
        })
        .collect()
}

/// Every panel, rows' nested panels included.
fn panels(d: &Value) -> Vec<&Value> {
    fn walk<'a>(ps: &'a Value, out: &mut Vec<&'a Value>) {
        for p in ps.as_array().into_iter().flatten() {
            out.push(p);
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&d["panels"], &mut out);
    out
}

/// (dashboard file, panel title, expr) of every panel target with an expression.
fn exprs(ds: &[Dashboard]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for d in ds {
        for p in panels(&d.json) {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((d.file.clone(), p["title"].as_str().unwrap_or("?").to_string(), e.to_string()));
                }
            }
        }
    }
    out
}

/// Metric names (`tally_[a-z_]+`) in a PromQL text, histogram series suffixes stripped.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let b = expr.as_bytes();
    let mut out = BTreeSet::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("tally_") {
        let start = i + off;
        let boundary = start == 0 || !(b[start - 1].is_ascii_alphanumeric() || b[start - 1] == b'_');
        let mut end = start + "tally_".len();
        while end < b.len() && (b[end].is_ascii_lowercase() || b[end] == b'_') {
            end += 1;
        }
        if boundary && end > start + "tally_".len() {
            let mut name = &expr[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(s) = name.strip_suffix(suffix) {
                    name = s;
                    break;
                }
            }
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

/// Every metric name the dashboards use: panel targets and template variable queries.
fn all_metric_names(ds: &[Dashboard]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (_, _, e) in exprs(ds) {
        names.extend(metric_names(&e));
    }
    for d in ds {
        for v in d.json["templating"]["list"].as_array().into_iter().flatten() {
            for f in ["query", "definition"] {
                match &v[f] {
                    Value::String(q) => names.extend(metric_names(q)),
                    Value::Object(o) => {
                        if let Some(q) = o.get("query").and_then(Value::as_str) {
                            names.extend(metric_names(q));
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    names
}

fn datasource_ok(v: &Value) -> bool {
    v["type"] == "prometheus" && (v["uid"] == "${datasource}" || v["uid"] == PROVISIONED_UID)
}

/// The value of the first `key: value` line of a YAML text (comments dropped, quotes trimmed).
fn yaml_value(text: &str, key: &str) -> Option<String> {
    text.lines().map(|l| l.split('#').next().unwrap().trim()).find_map(|l| {
        let l = l.strip_prefix("- ").unwrap_or(l);
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.trim().trim_matches(|c| c == '"' || c == '\'').to_string())
    })
}

#[test]
fn dashboards_match_grafana_provisioning_layout() {
    let ds = dashboards();
    let mut problems = Vec::new();
    let mut uids = BTreeMap::new();
    for d in &ds {
        let j = &d.json;
        let f = &d.file;
        for field in ["uid", "title"] {
            if j[field].as_str().is_none_or(str::is_empty) {
                problems.push(format!("{f}: no `{field}`"));
            }
        }
        if !j["schemaVersion"].is_u64() {
            problems.push(format!("{f}: no numeric `schemaVersion`"));
        }
        if let Some(uid) = j["uid"].as_str() {
            if let Some(other) = uids.insert(uid.to_string(), f.clone()) {
                problems.push(format!("{f}: uid `{uid}` is also the uid of {other}"));
            }
        }

        let vars = j["templating"]["list"].as_array().cloned().unwrap_or_default();
        let var = |name: &str| vars.iter().find(|v| v["name"] == name);
        match var("datasource") {
            Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
            Some(v) => problems.push(format!("{f}: variable `datasource` is not a prometheus datasource variable: {v}")),
            None => problems.push(format!("{f}: no `datasource` variable")),
        }
        match var("instance") {
            Some(v) if v["type"] == "query" && datasource_ok(&v["datasource"]) => {}
            Some(v) => problems.push(format!("{f}: variable `instance` is not a query on ${{datasource}}: {v}")),
            None => problems.push(format!("{f}: no `instance` variable")),
        }
        for v in &vars {
            if v["type"] == "query" && !datasource_ok(&v["datasource"]) {
                problems.push(format!("{f}: variable `{}` has datasource {}", v["name"], v["datasource"]));
            }
        }

        let ps = panels(j);
        if ps.is_empty() {
            problems.push(format!("{f}: no panels"));
        }
        for p in ps {
            let title = p["title"].as_str().unwrap_or("?");
            let is_row = p["type"] == "row";
            let has_targets = p["targets"].as_array().is_some_and(|t| !t.is_empty());
            if (!is_row || !p["datasource"].is_null()) && !datasource_ok(&p["datasource"]) {
                problems.push(format!("{f}: panel `{title}` has datasource {}", p["datasource"]));
            }
            if !is_row && !has_targets {
                problems.push(format!("{f}: panel `{title}` has no targets"));
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                if !datasource_ok(&t["datasource"]) {
                    problems.push(format!("{f}: a target of panel `{title}` has datasource {}", t["datasource"]));
                }
                if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                    problems.push(format!("{f}: a target of panel `{title}` has no expr"));
                }
            }
        }
    }

    // Provisioning: the datasource the variables default to, the provider path the README tells.
    let ds_yaml = std::fs::read_to_string(root().join(DATASOURCE_YAML)).unwrap_or_else(|e| panic!("{DATASOURCE_YAML}: {e}"));
    let prov_yaml = std::fs::read_to_string(root().join(PROVIDER_YAML)).unwrap_or_else(|e| panic!("{PROVIDER_YAML}: {e}"));
    let readme = std::fs::read_to_string(root().join("grafana/README.md")).expect("grafana/README.md");
    if yaml_value(&ds_yaml, "uid").as_deref() != Some(PROVISIONED_UID) {
        problems.push(format!("{DATASOURCE_YAML}: datasource uid is {:?}, want `{PROVISIONED_UID}`", yaml_value(&ds_yaml, "uid")));
    }
    if yaml_value(&ds_yaml, "type").as_deref() != Some("prometheus") {
        problems.push(format!("{DATASOURCE_YAML}: datasource type is {:?}, want `prometheus`", yaml_value(&ds_yaml, "type")));
    }
    for d in &ds {
        let def =
            d.json["templating"]["list"].as_array().into_iter().flatten().find(|v| v["name"] == "datasource").map(|v| v["current"]["value"].clone());
        if def.as_ref().is_some_and(|v| v != PROVISIONED_UID) {
            problems.push(format!("{}: the `datasource` variable defaults to {}, not the provisioned `{PROVISIONED_UID}`", d.file, def.unwrap()));
        }
    }
    match yaml_value(&prov_yaml, "path") {
        Some(path) if !path.is_empty() => {
            if !readme.contains(&path) {
                problems.push(format!("grafana/README.md does not mention the dashboards provider path `{path}` of {PROVIDER_YAML}"));
            }
        }
        _ => problems.push(format!("{PROVIDER_YAML}: no `path`")),
    }
    if yaml_value(&prov_yaml, "type").as_deref() != Some("file") {
        problems.push(format!("{PROVIDER_YAML}: provider type is {:?}, want `file`", yaml_value(&prov_yaml, "type")));
    }
    for d in &ds {
        if !readme.contains(&d.file) {
            problems.push(format!("grafana/README.md does not mention {}", d.file));
        }
    }

    // Metric names: every one must be registered in src/metrics.rs.
    let src = std::fs::read_to_string(root().join("src/metrics.rs")).expect("src/metrics.rs");
    for name in all_metric_names(&ds) {
        if !src.contains(&format!("\"{name}\"")) {
            problems.push(format!("metric `{name}` is used by a dashboard but not registered in src/metrics.rs"));
        }
    }

    assert!(problems.is_empty(), "{} problem(s):\n  {}", problems.len(), problems.join("\n  "));
}

// ---- processes and HTTP ----------------------------------------------------------------------

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    common::http_request(addr, "GET", path, &[], &[])
}

/// A Prometheus server scraping `targets`; killed (and reaped) when dropped, panics included.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        assert!(Path::new(PROMETHEUS).exists(), "{PROMETHEUS} is missing: run `.ci/install-test-tools` (installs the Debian package `prometheus`)");
        assert!(target.ip().is_loopback(), "Prometheus only scrapes loopback here, not {target}");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: tally\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {PROMETHEUS}: {e}"));
        let mut p = Prometheus { child, addr, dir };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}) before it was ready:\n{}", p.log_tail());
            }
            if matches!(http_get(addr, "/-/ready"), Ok((200, _))) {
                return p;
            }
            assert!(Instant::now() < deadline, "prometheus not ready after 60 s:\n{}", p.log_tail());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// An instant query: `Ok(result array)` or `Err(why)`; `Err` with `permanent` for a
    /// query Prometheus rejects (it will never return data).
    fn query(&self, expr: &str) -> Result<Vec<Value>, (bool, String)> {
        let (status, body) = http_get(self.addr, &format!("/api/v1/query?query={}", urlencode(expr))).map_err(|e| (false, e.to_string()))?;
        let v: Value =
            serde_json::from_slice(&body).map_err(|e| (false, format!("HTTP {status}, not JSON ({e}): {}", String::from_utf8_lossy(&body))))?;
        if status != 200 || v["status"] != "success" {
            return Err((status == 400 || v["errorType"] == "bad_data", format!("HTTP {status}: {v}")));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets the flag when dropped, so the producer stops on a panic too.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A few queries on tally's API routes, so the HTTP panels have routes besides `prometheus`.
fn exercise_api(addr: SocketAddr) {
    for path in [
        "/api/v1/metrics",
        "/api/v1/metrics/uv_all_time",
        "/api/v1/metrics/views?limit=5",
        "/api/v1/metrics/conversion_rate?limit=5",
        "/api/v1/metrics/pv_by_product/top?n=5",
        "/api/v1/metrics/uv_10m/span?last=1h",
        "/api/v1/metrics/no_such_metric",
        "/health",
        "/ready",
    ] {
        let _ = http_get(addr, path);
    }
}

fn median_ms(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[test]
fn every_dashboard_panel_returns_data() {
    assert!(Path::new(PROMETHEUS).exists(), "{PROMETHEUS} is missing: run `.ci/install-test-tools` (installs the Debian package `prometheus`)");
    let ds = dashboards();

    let topic = tally::gen::topic(Scenario::S1);
    let cluster = Cluster::for_example("s1-uvpv.toml", 3);
    let state = tempfile::tempdir().unwrap();
    let tally = Tally::start(example_config("s1-uvpv.toml", &cluster.brokers, state.path()));
    assert!(tally.addr.ip().is_loopback(), "tally must listen on loopback: {}", tally.addr);

    // Events follow the wall clock: 200 per second, 5 ms of event time each.
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let producer = {
        let stop = Arc::clone(&stop);
        let kafka = KafkaConfig {
            bootstrap_servers: cluster.brokers.clone(),
            application_id: "test".into(),
            properties: [("enable.idempotence".to_string(), "true".to_string())].into(),
            exit_on_broker_timeout: None,
        };
        std::thread::spawn(move || {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64;
            let opts = GenOptions { start_ms: now, step_ms: 5, partitions: 3, ..GenOptions::for_scenario(Scenario::S1) };
            let feed = Feed::new(&kafka, topic).expect("producer");
            let sent = feed.send_all(live(Scenario::S1, &opts), 200, || stop.load(Ordering::Relaxed)).expect("produce");
            feed.flush().expect("flush");
            sent
        })
    };

    let prom = Prometheus::start(tally.addr);

    // Every target expression, dashboard variables set to "All".
    let mut pending: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (file, panel, expr) in exprs(&ds) {
        let q = all_selected(&expr);
        assert!(!q.contains('$'), "{file}: panel `{panel}` uses a variable this test does not set: {expr}");
        pending.entry(q).or_default().push(format!("{file}: {panel}"));
    }
    let total = pending.len();
    let mut last: BTreeMap<String, String> = BTreeMap::new();
    let mut rejected: BTreeMap<String, String> = BTreeMap::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(90);
    while !pending.is_empty() && Instant::now() < deadline {
        exercise_api(tally.addr);
        let exprs: Vec<String> = pending.keys().cloned().collect();
        for q in exprs {
            match prom.query(&q) {
                Ok(result) if !result.is_empty() => {
                    pending.remove(&q);
                    last.remove(&q);
                }
                Ok(_) => {
                    last.insert(q, "empty result".into());
                }
                Err((true, why)) => {
                    pending.remove(&q);
                    rejected.insert(q, why);
                }
                Err((false, why)) => {
                    last.insert(q, why);
                }
            }
        }
        if !pending.is_empty() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    println!(
        "{} of {total} distinct panel queries returned data after {:.1} s",
        total - pending.len() - rejected.len(),
        started.elapsed().as_secs_f64()
    );

    // Metric names the dashboards use, against the families a real tally exports.
    let text = tally.metrics();
    let families: BTreeSet<String> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).map(str::to_string).collect();
    let unknown: Vec<String> = all_metric_names(&ds).into_iter().filter(|n| !families.contains(n)).collect();

    // What a scrape costs.
    let mut times = Vec::new();
    let mut bytes = 0;
    for _ in 0..7 {
        let t = Instant::now();
        let (status, body) = http_get(tally.addr, "/metrics").expect("GET /metrics");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(status, 200);
        bytes = body.len();
    }
    println!(
        "scrape cost: GET /metrics median {:.2} ms over {} scrapes, {bytes} bytes, {} lines, {} families",
        median_ms(times.clone()),
        times.len(),
        text.lines().count(),
        families.len()
    );

    stop.store(true, Ordering::Relaxed);
    let sent = producer.join().expect("producer thread");
    println!("events produced: {sent}");
    let prom_log = prom.log_tail();
    drop(prom);

    let mut failures: Vec<String> = Vec::new();
    for (q, why) in &rejected {
        failures.push(format!("rejected by Prometheus: {q}\n      used by {:?}\n      {why}", pending_users(&ds, q)));
    }
    for (q, panels) in &pending {
        failures.push(format!("no data: {q}\n      used by {panels:?}\n      last answer: {}", last.get(q).map_or("-", String::as_str)));
    }
    for n in &unknown {
        failures.push(format!("metric `{n}` is used by a dashboard but not in tally's /metrics"));
    }
    assert!(
        failures.is_empty(),
        "{} of {total} panel queries failed, {} unknown metric(s):\n  {}\n\nprometheus log tail:\n{prom_log}",
        pending.len() + rejected.len(),
        unknown.len(),
        failures.join("\n  ")
    );
    tally.stop();
}

/// `expr` with the dashboard variables at "All" (their `allValue`, `.*`).
fn all_selected(expr: &str) -> String {
    expr.replace("${instance}", ".*").replace("$instance", ".*").replace("${metric}", ".*").replace("$metric", ".*")
}

/// The panels using a (substituted) query, for failure messages.
fn pending_users(ds: &[Dashboard], q: &str) -> Vec<String> {
    exprs(ds).into_iter().filter(|(_, _, e)| all_selected(e) == q).map(|(f, p, _)| format!("{f}: {p}")).collect()
}
