//! The live screen (`GET /`) in a real browser: headless Chromium (`/usr/bin/chromium`,
//! Debian package `chromium`) loads it from a tally that has caught up with a fixed set of
//! generated events on a shipped config. Every panel must carry the config's title and
//! description, in config order, drawn as its display hint says; every pie, bar and table
//! must list the groups the API answers, labelled, with the API's numbers; tiles and trend
//! points must be the API's numbers too; the header must show the freshness. Screenshots are
//! kept under target/test-artifacts/.
//!
//! [`check_screen`] does all of that for any shipped config; a scenario's test is a few lines.

mod common;
mod model;

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tally::gen::{generate, GenOptions, GenRecord, Scenario};

use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const TIMEOUT: Duration = Duration::from_secs(60);
/// Virtual time the page gets before its DOM is dumped: several 2-second refreshes.
const BUDGET_MS: u32 = 15_000;
/// What the page lists at most (src/http/screen.html: `BAR_MAX`, `TABLE_MAX`) and its default
/// history (windows in a trend).
const BAR_MAX: usize = 40;
const TABLE_MAX: usize = 10;
const HISTORY: usize = 24;
/// The page is one self-contained file; keep it small.
const PAGE_MAX_BYTES: usize = 40 * 1024;

/// Runs headless Chromium with `args` (after the common flags) and a fresh profile; returns
/// its exit status, stdout and stderr. Killed after [`TIMEOUT`].
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
            "--hide-scrollbars",
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

/// One start tag of the dumped DOM: name, attributes (entities in values decoded) and the
/// text right after it, up to the next tag (trimmed, decoded; empty for script and style).
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
    text: String,
}

impl Tag {
    fn has_class(&self, class: &str) -> bool {
        self.attrs.get("class").is_some_and(|c| c.split_ascii_whitespace().any(|x| x == class))
    }
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.get(name).map(String::as_str)
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
        i = j.min(b.len());
        i = html[i..].find('>').map_or(html.len(), |p| i + p + 1);
        let text = if raw_text { String::new() } else { decode_entities(html[i..].split('<').next().unwrap_or("").trim()) };
        tags.push(Tag { name: name.clone(), attrs, text });
        if raw_text {
            let close = format!("</{name}");
            i = html[i..].to_ascii_lowercase().find(&close).map_or(html.len(), |p| i + p);
        }
    }
    tags
}

/// The events a screen test feeds: per source topic, the records (`partitions` each).
struct Feed {
    partitions: i32,
    topics: Vec<(&'static str, Vec<GenRecord>)>,
}

impl Feed {
    /// `count` generated events of `scenario` on its topic.
    fn generated(scenario: Scenario, count: usize) -> Feed {
        let opts = GenOptions { count, ..GenOptions::for_scenario(scenario) };
        Feed { partitions: opts.partitions, topics: vec![(tally::gen::topic(scenario), generate(scenario, &opts))] }
    }
}

/// A screen checked by [`check_screen`]: tally still running, for a test's own assertions.
struct Screen {
    tally: Tally,
    tags: Vec<Tag>,
    _cluster: Cluster,
    _state: tempfile::TempDir,
}

impl Screen {
    /// The tags of panel `metric`: its `<section>` and every tag up to the next panel.
    fn panel(&self, metric: &str) -> &[Tag] {
        panels(&self.tags)
            .into_iter()
            .find(|(_, p)| p[0].attr("data-metric") == Some(metric))
            .map(|(_, p)| p)
            .unwrap_or_else(|| panic!("no panel of {metric}"))
    }
}

/// Panels in screen order: (index of the `<section>`, its tags up to the next one).
fn panels(tags: &[Tag]) -> Vec<(usize, &[Tag])> {
    let starts: Vec<usize> = tags.iter().enumerate().filter(|(_, t)| t.name == "section" && t.has_class("panel")).map(|(i, _)| i).collect();
    starts.iter().enumerate().map(|(k, &s)| (s, &tags[s..starts.get(k + 1).copied().unwrap_or(tags.len())])).collect()
}

/// The `.item` elements of a panel, each with the tags after it up to the next item.
fn items(panel: &[Tag]) -> Vec<&[Tag]> {
    let starts: Vec<usize> = panel.iter().enumerate().filter(|(_, t)| t.has_class("item")).map(|(i, _)| i).collect();
    starts.iter().enumerate().map(|(k, &s)| &panel[s..starts.get(k + 1).copied().unwrap_or(panel.len())]).collect()
}

/// A value as the screen compares it: numbers, a distinct count's estimate; `None` for null.
fn number(v: &Value, what: &str) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::Object(o) => Some(o.get("estimate").and_then(Value::as_f64).unwrap_or_else(|| panic!("{what}: no estimate in {o:?}"))),
        Value::Null => None,
        other => panic!("{what}: not a number: {other}"),
    }
}

/// `data-value` as a number (`null` → `None`).
fn data_value(t: &Tag, what: &str) -> Option<f64> {
    let raw = t.attr("data-value").unwrap_or_else(|| panic!("{what}: no data-value in {:?}", t.attrs));
    (raw != "null").then(|| raw.parse().unwrap_or_else(|_| panic!("{what}: data-value `{raw}` is not a number")))
}

fn same(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        // serde_json reads floats to within an ulp (no `float_roundtrip`).
        (Some(a), Some(b)) => (a - b).abs() <= 1e-12 * a.abs().max(1.0),
        (a, b) => a == b,
    }
}

/// Percent-encodes a query value as JavaScript's encodeURIComponent does.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'!' | b'~' | b'*' | b'\'' | b'(' | b')' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The group key of a row: its fields' values in `group_by` order, joined by `|`.
fn key_of(row: &Value, group_by: &[String]) -> String {
    group_by.iter().map(|f| row["key"][f].as_str().map_or_else(|| row["key"][f].to_string(), str::to_string)).collect::<Vec<_>>().join("|")
}

/// The text of a number as shown, back to a number: grouping separators dropped.
fn shown_number(text: &str) -> Option<f64> {
    let plain: String = text.chars().filter(|c| c.is_ascii_digit() || *c == '.' || *c == '-').collect();
    plain.parse().ok()
}

/// Whether `s` has a fraction of 6 or more digits (a float printed raw).
fn long_fraction(s: &str) -> bool {
    let b = s.as_bytes();
    (0..b.len()).any(|i| b[i] == b'.' && i > 0 && b[i - 1].is_ascii_digit() && b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count() >= 6)
}

/// What the metric list says of one panel.
struct Def<'a> {
    def: &'a Value,
    name: &'a str,
    ratio: bool,
    group_by: Vec<String>,
    display: &'a Value,
}

impl Def<'_> {
    fn hint(&self) -> Option<&str> {
        self.display["hint"].as_str()
    }
    fn label(&self, key: &str) -> String {
        let labels = &self.display["labels"];
        if let Some(l) = labels[key].as_str() {
            return l.to_string();
        }
        if key.contains('|') {
            return key.split('|').map(|k| labels[k].as_str().unwrap_or(k)).collect::<Vec<_>>().join(" · ");
        }
        if key.is_empty() {
            "(empty)".into()
        } else {
            key.to_string()
        }
    }
}

/// Runs tally on the shipped config `config` fed with `feed` through the mock broker, loads
/// the screen in headless Chromium and checks it against the API (see the module doc); saves
/// `target/test-artifacts/<artifact>.png` (1600 wide, as tall as the page) and `<artifact>-wall.png` (the `?wall`
/// layout at 1920×1080). Returns the screen for the caller's own checks.
fn check_screen(config: &str, feed: Feed, artifact: &str) -> Screen {
    check_screen_with(config, |_| {}, feed, artifact)
}

/// [`check_screen`] on the shipped config `config` changed by `edit` first.
fn check_screen_with(config: &str, edit: impl FnOnce(&mut tally::config::Config), feed: Feed, artifact: &str) -> Screen {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = example_config(config, "", state.path());
    edit(&mut cfg);
    let cluster = Cluster::for_config(&cfg, feed.partitions);
    cfg.kafka.bootstrap_servers = cluster.brokers.clone();
    for (topic, records) in &feed.topics {
        cluster.produce(topic, records);
    }
    let sources: HashMap<String, String> = cfg.sources.iter().map(|s| (s.name.clone(), s.topic.clone())).collect();
    let tally = Tally::start(cfg);
    let list = tally.get("/api/v1/metrics");
    // Caught up: every metric's source read to the end of what was produced.
    for m in list["metrics"].as_array().unwrap() {
        let topic = &sources[m["source"].as_str().unwrap()];
        if let Some((_, records)) = feed.topics.iter().find(|(t, _)| t == topic) {
            wait_caught_up(tally.addr, &format!("/api/v1/metrics/{}?limit=1", m["name"].as_str().unwrap()), &ends(records));
        }
    }

    let (status, page) = http_get_raw(tally.addr, "/");
    assert_eq!(status, 200, "GET /");
    println!("page weight: GET / = {} bytes (one self-contained page)", page.len());
    assert!(page.len() <= PAGE_MAX_BYTES, "the screen is {} bytes, more than {PAGE_MAX_BYTES}", page.len());

    let url = format!("http://{}/", tally.addr);
    // A table joined at query time may still be arriving: poll until the screen agrees with
    // the API, within a deadline.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (tags, problems) = loop {
        let (st, dom, err) =
            chromium(&["--window-size=1600,1000".into(), format!("--virtual-time-budget={BUDGET_MS}"), "--dump-dom".into(), url.clone()]);
        assert!(st.success(), "chromium --dump-dom exited with {st}; stderr tail:\n{}", tail(&err));
        let tags = start_tags(&dom);
        let problems = screen_problems(&tally, &list, &tags);
        if problems.is_empty() || Instant::now() >= deadline {
            break (tags, problems);
        }
        println!("{} difference(s) from the API, loading the screen again; first: {}", problems.len(), problems[0]);
    };

    // Pictures for people (also of a screen that failed, to see why).
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    // As tall as the page says it is (`data-height`), so the picture holds every panel.
    let height = tags.iter().find(|t| t.name == "body").and_then(|b| b.attr("data-height")?.parse::<u32>().ok()).unwrap_or(1000).clamp(900, 4000);
    screenshot(&url, &dir.join(format!("{artifact}.png")), &format!("1600,{height}"));
    screenshot(&format!("{url}?wall"), &dir.join(format!("{artifact}-wall.png")), "1920,1080");
    assert!(problems.is_empty(), "the screen of {config} disagrees with the API:\n  {}", problems.join("\n  "));
    Screen { tally, tags, _cluster: cluster, _state: state }
}

/// A picture of the screen at `url`, for people.
fn screenshot(url: &str, png: &Path, size: &str) {
    let _ = std::fs::remove_file(png);
    let (st, _, err) = chromium(&[
        format!("--screenshot={}", png.display()),
        format!("--window-size={size}"),
        format!("--virtual-time-budget={BUDGET_MS}"),
        url.into(),
    ]);
    assert!(st.success(), "chromium --screenshot exited with {st}; stderr tail:\n{}", tail(&err));
    let bytes = std::fs::read(png).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", png.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", png.display());
    assert!(bytes.len() > 10 * 1024, "screenshot {} is only {} bytes", png.display(), bytes.len());
    println!("screenshot: {} ({} bytes)", png.display(), bytes.len());
}

/// Everything on the screen that differs from the config and the API, in words.
fn screen_problems(tally: &Tally, list: &Value, tags: &[Tag]) -> Vec<String> {
    let mut bad = Vec::new();
    let body = tags.iter().find(|t| t.name == "body").expect("no <body> in the dumped DOM");
    let updates: u64 = body.attr("data-updates").and_then(|v| v.parse().ok()).unwrap_or(0);
    if updates < 2 {
        bad.push(format!("the screen refreshed {updates} time(s) by itself in {BUDGET_MS} ms of virtual time, want ≥ 2"));
    }
    if body.attr("data-state") != Some("live") {
        bad.push(format!("header state {:?}, want live", body.attr("data-state")));
    }
    let defs: Vec<Def> = ["metrics", "derived"]
        .iter()
        .flat_map(|kind| list[*kind].as_array().unwrap().iter().map(move |d| (kind, d)))
        .map(|(kind, d)| Def {
            def: d,
            name: d["name"].as_str().unwrap(),
            ratio: *kind == "derived",
            group_by: d["group_by"].as_array().unwrap().iter().map(|g| g.as_str().unwrap().to_string()).collect(),
            display: &d["display"],
        })
        .collect();

    // Freshness: the lowest watermark of the metrics, and the moment of the last update.
    let mut lowest: Option<i64> = None;
    for d in defs.iter().filter(|d| !d.ratio) {
        if let Some(w) = tally.get(&format!("/api/v1/metrics/{}?limit=1", d.name))["coverage"]["watermark"].as_i64() {
            lowest = Some(lowest.map_or(w, |l| l.min(w)));
        }
    }
    let find = |id: &str| tags.iter().find(|t| t.attr("id") == Some(id));
    match find("watermark") {
        Some(w) if w.attr("data-value").and_then(|v| v.parse::<i64>().ok()) == lowest && !w.text.is_empty() && w.text != "—" => {}
        other => bad.push(format!("header watermark {other:?}, want data-value {lowest:?} shown as a time")),
    }
    match find("updated") {
        Some(u) if u.attr("data-value").and_then(|v| v.parse::<i64>().ok()).is_some_and(|v| v > 0) && u.text.contains(':') => {}
        other => bad.push(format!("header last update {other:?}, want a time")),
    }
    for t in tags {
        if long_fraction(&t.text) || t.attr("title").is_some_and(long_fraction) {
            bad.push(format!("a raw float on the screen: <{} {:?}> {}", t.name, t.attrs, t.text));
        }
    }

    // Panels in config order, titled and described as configured.
    let shown: Vec<&str> = panels(tags).iter().map(|(_, p)| p[0].attr("data-metric").unwrap_or("")).collect();
    let want: Vec<&str> = defs.iter().map(|d| d.name).collect();
    if shown != want {
        bad.push(format!("panels {shown:?}, want {want:?} (config order)"));
    }
    for (_, panel) in panels(tags) {
        let Some(d) = defs.iter().find(|d| Some(d.name) == panel[0].attr("data-metric")) else { continue };
        bad.extend(panel_problems(tally, d, panel).into_iter().map(|p| format!("{}: {p}", d.name)));
    }
    bad
}

/// What the screen should draw for `d` (`list`: a top_n aggregate; `groups`: as answered). A
/// pie needs few groups, none negative.
fn expected_kind(d: &Def, list: bool, groups: &[(String, Option<f64>)]) -> &'static str {
    let pie_fits = groups.iter().all(|g| g.1.is_some_and(|v| v >= 0.0));
    let hint = d.hint();
    if d.ratio {
        return match (d.group_by.is_empty(), hint) {
            (true, Some("number")) => "number",
            (true, _) => "trend",
            (false, Some("bar" | "pie")) => "bar",
            (false, _) => "table",
        };
    }
    match hint {
        Some("number") => "number",
        Some("trend") => "trend",
        Some("pie") if pie_fits => "pie",
        Some("pie") => "bar",
        Some("bar") => "bar",
        Some("table") => "table",
        _ if list => "table",
        _ if !d.group_by.is_empty() => {
            if groups.len() <= 8 && pie_fits {
                "pie"
            } else {
                "bar"
            }
        }
        _ if d.def["window"]["type"] == "global" || d.display["span"].is_string() => "number",
        _ => "trend",
    }
}

fn panel_problems(tally: &Tally, d: &Def, panel: &[Tag]) -> Vec<String> {
    let mut bad = Vec::new();
    let section = &panel[0];
    if section.has_class("stale") {
        bad.push("the panel failed to load".into());
    }
    let title = panel.iter().find(|t| t.name == "h2" && t.has_class("title")).map(|t| t.text.as_str());
    if title != d.display["title"].as_str() {
        bad.push(format!("title {title:?}, want {:?}", d.display["title"]));
    }
    let desc = panel.iter().find(|t| t.has_class("desc")).map(|t| t.text.as_str());
    if desc != d.display["description"].as_str() {
        bad.push(format!("description {desc:?}, want {:?}", d.display["description"]));
    }
    let all = tally.get(&format!("/api/v1/metrics/{}", d.name));
    assert_eq!(all["truncated"], false, "{}: answer truncated", d.name);
    let rows = all["rows"].as_array().unwrap();
    let Some(newest) = rows.first() else {
        bad.push("the API has no rows: nothing to compare".into());
        return bad;
    };
    let aggs: Vec<&str> = if d.ratio { vec!["ratio"] } else { d.def["aggregates"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect() };
    let list = aggs.iter().copied().find(|a| newest["values"][*a].is_array());
    let rank = aggs.iter().copied().find(|a| matches!(newest["values"][*a], Value::Number(_) | Value::Object(_)));
    let span = d.display["span"].as_str();

    // Groups: (key, value) in the order the screen must list them.
    let mut groups: Option<Vec<(String, Option<f64>)>> = None;
    if d.ratio && !d.group_by.is_empty() {
        let w = &newest["window"];
        let mut g: Vec<(String, Option<f64>)> =
            rows.iter().filter(|r| r["window"] == *w).map(|r| (key_of(r, &d.group_by), r["values"]["ratio"].as_f64())).collect();
        g.sort_by(|a, b| b.1.unwrap_or(f64::NEG_INFINITY).total_cmp(&a.1.unwrap_or(f64::NEG_INFINITY)).then_with(|| a.0.cmp(&b.0)));
        groups = Some(g);
    } else if !d.ratio && (list.is_some() || !d.group_by.is_empty()) {
        let agg = list.or(rank).expect("a numeric aggregate to rank by");
        if let (Some(s), None) = (span, list) {
            let sp = tally.get(&format!("/api/v1/metrics/{}/span?last={s}", d.name));
            let mut g: Vec<(String, Option<f64>)> = sp["rows"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (key_of(r, &d.group_by), number(&r["values"][agg], d.name)))
                .filter(|g| g.1.is_some())
                .collect();
            g.sort_by(|a, b| b.1.unwrap().total_cmp(&a.1.unwrap()).then_with(|| a.0.cmp(&b.0)));
            groups = Some(g);
        } else {
            let n = if list.is_some() { TABLE_MAX } else { 200 };
            let top = tally.get(&format!("/api/v1/metrics/{}/top?n={n}&aggregate={}", d.name, enc(agg)));
            let g: Vec<(String, Option<f64>)> = top["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["item"].as_str().map_or_else(|| e["item"].to_string(), str::to_string), number(&e["value"], d.name)))
                .collect();
            // Independently: a breakdown of group keys is every key of that window.
            if list.is_none() && top["window"]["start"].is_i64() {
                let w = &top["window"];
                let in_window: BTreeMap<String, Option<f64>> = rows
                    .iter()
                    .filter(|r| r["window"]["start"] == w["start"] && r["window"]["end"] == w["end"])
                    .map(|r| (key_of(r, &d.group_by), number(&r["values"][agg], d.name)))
                    .collect();
                let ranked: BTreeMap<String, Option<f64>> = g.iter().cloned().collect();
                if g.len() < 200 && ranked != in_window {
                    bad.push(format!("top answer {ranked:?} is not the window's rows {in_window:?}"));
                }
            }
            groups = Some(g);
        }
    }

    let kind = section.attr("data-kind").unwrap_or("");
    let want_kind = expected_kind(d, list.is_some(), groups.as_deref().unwrap_or(&[]));
    if kind != want_kind {
        bad.push(format!("drawn as {kind:?}, want {want_kind:?}"));
    }

    if let Some(groups) = &groups {
        let cap = match kind {
            "bar" => BAR_MAX,
            "table" => TABLE_MAX,
            _ => usize::MAX,
        };
        let want = &groups[..groups.len().min(cap)];
        let got = items(panel);
        if got.len() != want.len() {
            bad.push(format!("{} groups shown, want {} (the API has {})", got.len(), want.len(), groups.len()));
        }
        if kind == "pie" && !panel.iter().any(|t| t.name == "svg" && t.attr("role") == Some("img")) {
            bad.push("no pie drawn".into());
        }
        for (item, (key, value)) in got.iter().zip(want) {
            let t = &item[0];
            let what = format!("group {key:?}");
            if t.attr("data-key") != Some(key.as_str()) {
                bad.push(format!("{what}: shown as key {:?} (order or key differs)", t.attr("data-key")));
                continue;
            }
            let label = d.label(key);
            if t.attr("data-label") != Some(label.as_str()) {
                bad.push(format!("{what}: label {:?}, want {label:?}", t.attr("data-label")));
            }
            let shown_value = data_value(t, &what);
            if !same(shown_value, *value) {
                bad.push(format!("{what}: {shown_value:?} on the screen, {value:?} in the API"));
            }
            // The visible label and number (pie legend and bars: `.k`, `.v`; tables: cells).
            let (label_text, value_text) = if t.name == "tr" {
                let cells: Vec<&Tag> = item.iter().filter(|c| c.name == "td").collect();
                (cells.get(1).map(|c| c.text.as_str()), cells.get(2).map(|c| c.text.as_str()))
            } else {
                (item.iter().find(|c| c.has_class("k")).map(|c| c.text.as_str()), item.iter().find(|c| c.has_class("v")).map(|c| c.text.as_str()))
            };
            if label_text != Some(label.as_str()) {
                bad.push(format!("{what}: visible label {label_text:?}, want {label:?}"));
            }
            match (d.ratio, value, value_text) {
                (false, Some(v), Some(text)) => {
                    let back = shown_number(text);
                    if !back.is_some_and(|b| (b - v).abs() <= 0.5) || (v.abs() >= 1000.0 && text.chars().all(|c| c.is_ascii_digit())) {
                        bad.push(format!("{what}: visible number {text:?} for {v} (want it rounded, with thousands separators)"));
                    }
                }
                (true, v, Some(text)) => {
                    let ok = match v {
                        Some(v) => text.ends_with('%') && shown_number(text).is_some_and(|b| (b - 100.0 * v).abs() <= 0.05),
                        None => text == "—",
                    };
                    if !ok {
                        bad.push(format!("{what}: visible ratio {text:?} for {v:?} (want a percentage)"));
                    }
                }
                (_, _, None) => bad.push(format!("{what}: no visible number")),
                _ => {}
            }
        }
    }

    // Tiles: the newest window's value, or the display span's total.
    for t in panel.iter().filter(|t| t.has_class("big")) {
        let agg = t.attr("data-aggregate").unwrap_or("");
        let api = match t.attr("data-span") {
            Some(s) => {
                let sp = tally.get(&format!("/api/v1/metrics/{}/span?last={s}", d.name));
                number(&sp["rows"][0]["values"][agg], d.name)
            }
            None => number(&newest["values"][agg], d.name),
        };
        let shown = data_value(t, &format!("tile {agg}"));
        if !same(shown, api) {
            bad.push(format!("tile {agg}: {shown:?} on the screen, {api:?} in the API"));
        }
    }
    if (kind == "number" || kind == "trend") && !panel.iter().any(|t| t.has_class("big")) {
        bad.push("no number tile".into());
    }

    // Trends: each point is its window's value (summed over the keys for a breakdown).
    let mut by_window: BTreeMap<(i64, i64), Vec<&Value>> = BTreeMap::new();
    for r in rows {
        if let (Some(s), Some(e)) = (r["window"]["start"].as_i64(), r["window"]["end"].as_i64()) {
            by_window.entry((s, e)).or_default().push(r);
        }
    }
    if let Some(svg) = panel.iter().find(|t| t.name == "svg" && t.has_class("trend")) {
        let agg = svg.attr("data-aggregate").unwrap_or("");
        let pts: Vec<&Tag> = panel.iter().filter(|t| t.name == "circle" && t.has_class("pt")).collect();
        let want_min = by_window.len().min(4);
        if pts.len() < want_min || pts.len() > HISTORY {
            bad.push(format!(
                "trend of {} points; the API has {} windows, want at least {want_min} and at most {HISTORY}",
                pts.len(),
                by_window.len()
            ));
        }
        for p in pts {
            let w = (p.attr("data-start").and_then(|v| v.parse().ok()).unwrap_or(0), p.attr("data-end").and_then(|v| v.parse().ok()).unwrap_or(0));
            let want = by_window.get(&w).map(|rs| {
                if d.ratio {
                    rs[0]["values"]["ratio"].as_f64()
                } else {
                    Some(rs.iter().filter_map(|r| number(&r["values"][agg], d.name)).sum::<f64>())
                }
            });
            let shown = data_value(p, &format!("trend point {w:?}"));
            if want.is_none_or(|v| !same(shown, v)) {
                bad.push(format!("trend point {w:?}: {shown:?} on the screen, {want:?} in the API"));
            }
        }
    } else if kind == "trend" {
        bad.push("no trend chart".into());
    }
    bad
}

#[test]
fn live_screen_shows_the_api_numbers() {
    let screen = check_screen("s1-uvpv.toml", Feed::generated(Scenario::S1, 12_000), "live-screen");
    let bigs: Vec<&Tag> = screen.tags.iter().filter(|t| t.has_class("big")).collect();
    let shown: Vec<String> =
        bigs.iter().map(|t| format!("{}.{} = {}", t.attrs["data-metric"], t.attrs["data-aggregate"], t.attrs["data-value"])).collect();
    println!("big numbers on the screen: {}", shown.join(", "));
    for m in ["uv_all_time", "views", "conversion_rate"] {
        assert!(bigs.iter().any(|t| t.attrs["data-metric"] == m), "no big number for {m}: {shown:?}");
    }
    assert_eq!(screen.panel("conversion_rate")[0].attr("data-kind"), Some("trend"), "an ungrouped ratio is a percentage and its trend");
    screen.tally.stop();
}

#[test]
fn s4_screen_shows_titled_pies_and_bars() {
    let screen = check_screen("s4-user-behavior.toml", Feed::generated(Scenario::S4, 8000), "s4-screen");
    for (metric, kind, groups) in [("by_action", "pie", 4), ("by_age_range", "pie", 8), ("by_gender", "pie", 3), ("by_province", "bar", 20)] {
        let panel = screen.panel(metric);
        assert_eq!(panel[0].attr("data-kind"), Some(kind), "{metric}");
        let n = items(panel).len();
        assert!(n >= groups, "{metric}: {n} groups shown, want at least {groups}");
        // Labels from the config, not raw keys.
        if metric != "by_province" {
            assert!(items(panel).iter().all(|i| i[0].attr("data-label") != i[0].attr("data-key")), "{metric}: raw keys shown");
        }
        assert!(panel.iter().any(|t| t.has_class("trend")), "{metric}: no daily trend");
    }
    let click = items(screen.panel("by_action")).into_iter().find(|i| i[0].attr("data-key") == Some("0")).expect("clicks shown");
    assert_eq!(click[0].attr("data-label"), Some("click 点击"));
    screen.tally.stop();
}

/// Before any event every answer is empty: each panel says so under its title, none fails,
/// and the header has no watermark yet.
#[test]
fn s4_screen_before_any_event() {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = example_config("s4-user-behavior.toml", "", state.path());
    let cluster = Cluster::for_config(&cfg, 3);
    cfg.kafka.bootstrap_servers = cluster.brokers.clone();
    let tally = Tally::start(cfg);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(try_get_raw(tally.addr, "/api/v1/metrics/by_action?limit=1"), Some((200, _))) {
        assert!(Instant::now() < deadline, "tally did not answer within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, dom, err) = chromium(&[format!("--virtual-time-budget={BUDGET_MS}"), "--dump-dom".into(), format!("http://{}/", tally.addr)]);
    assert!(st.success(), "chromium --dump-dom exited with {st}; stderr tail:\n{}", tail(&err));
    let tags = start_tags(&dom);
    let body = tags.iter().find(|t| t.name == "body").unwrap();
    assert_eq!(body.attr("data-state"), Some("live"), "{:?}", body.attrs);
    let ps = panels(&tags);
    assert_eq!(ps.len(), 4, "one panel per metric");
    for (_, p) in ps {
        let name = p[0].attr("data-metric").unwrap();
        assert!(!p[0].has_class("stale"), "{name}: failed on empty answers");
        assert!(p.iter().any(|t| t.name == "h2" && t.text.contains('·')), "{name}: no title");
        assert!(p.iter().any(|t| t.has_class("empty") && t.text == "no data yet"), "{name}: does not say it has no data");
    }
    assert_eq!(tags.iter().find(|t| t.attr("id") == Some("watermark")).map(|t| t.text.as_str()), Some("—"));
    tally.stop();
}

/// Top-N lists: S5's hot products (a top_n aggregate) are a ranked table.
#[test]
fn s5_screen_ranks_hot_products() {
    let screen = check_screen("s5-hot-products.toml", Feed::generated(Scenario::S5, 10_000), "s5-screen");
    assert_eq!(screen.panel("hot_products_1h")[0].attr("data-kind"), Some("table"));
    screen.tally.stop();
}

/// Hints and spans drawn as configured: S1 with span tiles (ungrouped and grouped), a table,
/// a ratio as a bare number and a per-key ratio as bars.
#[test]
fn screen_follows_display_hints_and_spans() {
    use tally::config::DisplayHint;
    let screen = check_screen_with(
        "s1-uvpv.toml",
        |c| {
            for m in &mut c.metrics {
                match m.name.as_str() {
                    "views" | "pv_by_product" => m.display_span = Some("15m".into()),
                    "uv_10m" => (m.display_span, m.display) = (Some("15m".into()), Some(DisplayHint::Trend)),
                    "purchases_by_product" => m.display = Some(DisplayHint::Table),
                    _ => {}
                }
            }
            for d in &mut c.derived {
                d.display = Some(if d.name == "conversion_rate" { DisplayHint::Number } else { DisplayHint::Bar });
            }
        },
        Feed::generated(Scenario::S1, 12_000),
        "s1-hints",
    );
    let spans = screen.tags.iter().filter(|t| t.has_class("big") && t.attr("data-span") == Some("15m")).count();
    assert_eq!(spans, 2, "views and uv_10m show their last 15 minutes");
    for (metric, kind) in [
        ("views", "number"),
        ("uv_10m", "trend"),
        ("purchases_by_product", "table"),
        ("conversion_rate", "number"),
        ("conversion_rate_by_product", "bar"),
    ] {
        assert_eq!(screen.panel(metric)[0].attr("data-kind"), Some(kind), "{metric}");
    }
    screen.tally.stop();
}

/// With no API to answer (the page opened from a file: every fetch fails) the header says so
/// in its error state instead of showing nothing.
#[test]
fn screen_without_an_api_shows_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("screen.html");
    std::fs::write(&page, tally::http::SCREEN).unwrap();
    let (st, dom, err) = chromium(&["--virtual-time-budget=5000".into(), "--dump-dom".into(), format!("file://{}", page.display())]);
    assert!(st.success(), "chromium --dump-dom exited with {st}; stderr tail:\n{}", tail(&err));
    let tags = start_tags(&dom);
    let body = tags.iter().find(|t| t.name == "body").unwrap();
    assert_eq!(body.attr("data-state"), Some("error"), "{:?}", body.attrs);
    let state = tags.iter().find(|t| t.attr("id") == Some("state")).unwrap();
    assert!(state.has_class("error") && state.text.starts_with("cannot list metrics"), "{state:?}");
    assert!(panels(&tags).is_empty());
}

/// S3: viewers by province (bars) and grade (pie), gifts by type (pie) and by module (bars,
/// through the room table), the last six hours' gifts (a span tile) and the top givers
/// (a table), every number the API's.
#[test]
fn s3_screen_shows_the_join_the_span_and_the_top_givers() {
    use tally::gen::{S3_GIFTS, S3_ROOMS, S3_VIEWS};
    let opts = GenOptions { count: 8_000, ..GenOptions::for_scenario(Scenario::S3) };
    let all = generate(Scenario::S3, &opts);
    let of = |topic: &'static str| (topic, all.iter().filter(|r| r.topic == Some(topic)).cloned().collect::<Vec<_>>());
    let feed = Feed { partitions: opts.partitions, topics: vec![of(S3_ROOMS), of(S3_VIEWS), of(S3_GIFTS)] };
    let screen = check_screen("s3-live-streaming.toml", feed, "s3-screen");
    for (metric, kind) in
        [("viewers_by_province", "bar"), ("viewers_by_grade", "pie"), ("gifts_by_type", "pie"), ("gifts_by_module", "bar"), ("top_givers", "table")]
    {
        let panel = screen.panel(metric);
        assert_eq!(panel[0].attr("data-kind"), Some(kind), "{metric}");
        assert!(!items(panel).is_empty(), "{metric}: nothing shown");
    }
    let modules = items(screen.panel("gifts_by_module")).len();
    assert!(modules >= 6, "gifts of all six modules (and of rooms not listed yet): {modules}");
    let gift = items(screen.panel("gifts_by_type")).into_iter().find(|i| i[0].attr("data-key") == Some("3")).expect("rockets shown");
    assert_eq!(gift[0].attr("data-label"), Some("rocket 火箭"));
    assert!(screen.panel("gifts_hourly").iter().any(|t| t.text.contains("last 6 h")), "the span tile says what it spans");
    screen.tally.stop();
}
