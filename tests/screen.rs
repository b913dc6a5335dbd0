//! The live screen (`GET /`) in a real browser: headless Chromium (`/usr/bin/chromium`,
//! Debian package `chromium`) loads it from a tally that has caught up with a fixed set of
//! S1 events; the big numbers it renders must be the API's answers, it must have refreshed by
//! itself, and a screenshot is kept under target/test-artifacts/.

mod common;
mod model;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally::gen::{generate, GenOptions, Scenario};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs headless Chromium with `args` (after the common flags) and a fresh profile; returns
/// its exit status and stdout. Killed after [`TIMEOUT`].
fn chromium(args: &[String]) -> (ExitStatus, String, String) {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: run `.ci/install-test-tools` (installs the Debian package `chromium`)");
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {CHROMIUM}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let err = err.join().unwrap_or_default();
            panic!("chromium {args:?} did not finish in {TIMEOUT:?}; killed. stderr tail:\n{}", tail(&err));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status, out.join().unwrap_or_default(), err.join().unwrap_or_default())
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// One start tag of the dumped DOM: name and attributes (entities in values decoded).
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
}

impl Tag {
    fn has_class(&self, class: &str) -> bool {
        self.attrs.get("class").is_some_and(|c| c.split_ascii_whitespace().any(|x| x == class))
    }
}

fn decode_entities(s: &str) -> String {
    s.replace("&quot;", "\"").replace("&lt;", "<").replace("&gt;", ">").replace("&#39;", "'").replace("&nbsp;", "\u{a0}").replace("&amp;", "&")
}

/// The start tags of serialized HTML (as Chromium's `--dump-dom` writes it: attribute values
/// double-quoted); the contents of `<script>` and `<style>` are skipped.
fn start_tags(html: &str) -> Vec<Tag> {
    let b = html.as_bytes();
    let mut tags = Vec::new();
    let mut i = 0;
    while let Some(off) = html[i..].find('<') {
        i += off + 1;
        let name_end = i + html[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).unwrap_or(html.len() - i);
        if name_end == i {
            continue; // `</x>`, `<!doctype>`, `<!-- -->` or text
        }
        let name = html[i..name_end].to_ascii_lowercase();
        let mut attrs = BTreeMap::new();
        let mut j = name_end;
        loop {
            while j < b.len() && (b[j] as char).is_ascii_whitespace() {
                j += 1;
            }
            if j >= b.len() || b[j] == b'>' || b[j] == b'/' {
                break;
            }
            let a_end = j + html[j..].find(|c: char| c.is_ascii_whitespace() || c == '=' || c == '>' || c == '/').unwrap_or(html.len() - j);
            let attr = html[j..a_end].to_ascii_lowercase();
            j = a_end;
            let mut value = String::new();
            if j < b.len() && b[j] == b'=' {
                j += 1;
                if j < b.len() && (b[j] == b'"' || b[j] == b'\'') {
                    let q = b[j] as char;
                    let v_end = j + 1 + html[j + 1..].find(q).unwrap_or(html.len() - j - 1);
                    value = decode_entities(&html[j + 1..v_end]);
                    j = (v_end + 1).min(b.len());
                } else {
                    let v_end = j + html[j..].find(|c: char| c.is_ascii_whitespace() || c == '>').unwrap_or(html.len() - j);
                    value = decode_entities(&html[j..v_end]);
                    j = v_end;
                }
            }
            if attr.is_empty() {
                j += 1;
            } else {
                attrs.insert(attr, value);
            }
        }
        let raw_text = name == "script" || name == "style";
        tags.push(Tag { name: name.clone(), attrs });
        i = j.min(b.len());
        if raw_text {
            let close = format!("</{name}");
            i = html[i..].to_ascii_lowercase().find(&close).map_or(html.len(), |p| i + p);
        }
    }
    tags
}

/// The number the API gives for `aggregate` in the newest row of `metric`: numbers as they
/// are, a distinct count's `estimate`; `None` for a null (a ratio over no views).
fn api_number(tally: &Tally, metric: &str, aggregate: &str) -> Option<f64> {
    let answer = tally.get(&format!("/api/v1/metrics/{metric}"));
    let newest = &answer["rows"][0];
    assert!(newest.is_object(), "/api/v1/metrics/{metric} has no rows: {answer}");
    match &newest["values"][aggregate] {
        Value::Number(n) => n.as_f64(),
        Value::Object(o) => Some(o.get("estimate").and_then(Value::as_f64).unwrap_or_else(|| panic!("{metric}.{aggregate}: no estimate in {o:?}"))),
        Value::Null => None,
        other => panic!("{metric}.{aggregate}: unexpected value {other}"),
    }
}

#[test]
fn live_screen_shows_the_api_numbers() {
    assert!(Path::new(CHROMIUM).exists(), "{CHROMIUM} is missing: run `.ci/install-test-tools` (installs the Debian package `chromium`)");
    let opts = GenOptions { count: 3000, ..GenOptions::for_scenario(Scenario::S1) };
    let records = generate(Scenario::S1, &opts);
    let topic = tally::gen::topic(Scenario::S1);
    let cluster = Cluster::for_example("s1-uvpv.toml", opts.partitions);
    cluster.produce(topic, &records);
    let state = tempfile::tempdir().unwrap();
    let tally = Tally::start(example_config("s1-uvpv.toml", &cluster.brokers, state.path()));
    wait_caught_up(tally.addr, "/api/v1/metrics/uv_all_time", &ends(&records));

    let (status, page) = http_get_raw(tally.addr, "/");
    assert_eq!(status, 200, "GET /");
    println!("page weight: GET / = {} bytes (one self-contained page)", page.len());

    let url = format!("http://{}/", tally.addr);
    let (st, dom, err) = chromium(&["--virtual-time-budget=15000".into(), "--dump-dom".into(), url.clone()]);
    assert!(st.success(), "chromium --dump-dom exited with {st}; stderr tail:\n{}", tail(&err));
    let tags = start_tags(&dom);
    let body = tags.iter().find(|t| t.name == "body").unwrap_or_else(|| panic!("no <body> in the dumped DOM:\n{dom}"));
    let updates: u64 = body.attrs.get("data-updates").and_then(|v| v.parse().ok()).unwrap_or(0);
    assert!(updates >= 2, "the screen refreshed {updates} time(s) by itself in 15 s of virtual time, want ≥ 2; body {:?}", body.attrs);

    let failed: Vec<&Tag> = tags.iter().filter(|t| t.has_class("panel") && t.has_class("stale")).collect();
    assert!(failed.is_empty(), "panels failed to load: {:?}", failed.iter().map(|t| t.attrs.get("id")).collect::<Vec<_>>());

    let bigs: Vec<&Tag> =
        tags.iter().filter(|t| t.has_class("big") && t.attrs.contains_key("data-metric") && t.attrs.contains_key("data-value")).collect();
    let mut mismatches = Vec::new();
    let mut shown = Vec::new();
    for t in &bigs {
        let metric = &t.attrs["data-metric"];
        let aggregate = t.attrs.get("data-aggregate").unwrap_or_else(|| panic!("big number of {metric} has no data-aggregate: {:?}", t.attrs));
        let raw = &t.attrs["data-value"];
        let on_screen: Option<f64> = if raw == "null" {
            None
        } else {
            Some(raw.parse().unwrap_or_else(|_| panic!("{metric}.{aggregate}: data-value `{raw}` is not a number")))
        };
        let api = api_number(&tally, metric, aggregate);
        shown.push(format!("{metric}.{aggregate} = {raw}"));
        // serde_json reads floats to within an ulp (no `float_roundtrip`): equal to 1e-15.
        let same = match (on_screen, api) {
            (Some(a), Some(b)) => (a - b).abs() <= 1e-15 * a.abs().max(1.0),
            (a, b) => a == b,
        };
        if !same {
            mismatches.push(format!("{metric}.{aggregate}: screen {raw}, API {api:?}"));
        }
    }
    println!("big numbers on the screen: {}", shown.join(", "));
    assert!(mismatches.is_empty(), "the screen disagrees with the API:\n  {}", mismatches.join("\n  "));
    assert!(bigs.len() >= 3, "want at least 3 big numbers on the screen, found {}: {shown:?}", bigs.len());
    for m in ["uv_all_time", "views", "conversion_rate"] {
        assert!(bigs.iter().any(|t| t.attrs["data-metric"] == m), "no big number for {m}: {shown:?}");
    }

    // A picture of it, for people.
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    let png = dir.join("live-screen.png");
    let _ = std::fs::remove_file(&png);
    let (st, _, err) =
        chromium(&[format!("--screenshot={}", png.display()), "--window-size=1400,1000".into(), "--virtual-time-budget=15000".into(), url]);
    assert!(st.success(), "chromium --screenshot exited with {st}; stderr tail:\n{}", tail(&err));
    let size = std::fs::metadata(&png).map(|m| m.len()).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    let head = std::fs::read(&png).unwrap();
    assert!(head.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", png.display());
    assert!(size > 10 * 1024, "screenshot {} is only {size} bytes", png.display());
    println!("screenshot: {} ({size} bytes)", png.display());

    tally.stop();
}
