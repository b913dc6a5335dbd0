//! The model's reading of a config file: its own, from the TOML and the README's config
//! reference, sharing nothing with tally's `config` or `topology` modules.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use toml::Value as Toml;

use super::expr::Expr;

/// What a record's event time is read from.
#[derive(Debug, Clone)]
pub enum TimeSpec {
    Text {
        field: String,
        format: String,
        tz: Tz,
    },
    Seconds {
        field: String,
    },
    Millis {
        field: String,
    },
    /// (part name, field) pairs; `year` fixed or from the Kafka timestamp.
    Parts {
        parts: Vec<(String, String)>,
        year: Option<i32>,
        tz: Tz,
    },
}

/// A declared field type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ty {
    Int,
    Float,
    Str,
    Bool,
}

#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub time: TimeSpec,
    pub delay_ms: i64,
    pub max_ahead_ms: i64,
    /// Field name → dotted JSON path.
    pub aliases: BTreeMap<String, String>,
    /// (field, type, not null).
    pub types: Vec<(String, Ty, bool)>,
    /// Lookups in tables, in order.
    pub lookups: Vec<LookupSpec>,
}

/// A global table: the fields it keeps, with their declared types.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: String,
    pub fields: Vec<String>,
    pub types: Vec<(String, Ty, bool)>,
}

/// What a lookup does with a key the table does not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Skip,
    Null,
    DeadLetter,
}

#[derive(Debug, Clone)]
pub struct LookupSpec {
    /// Index into [`Spec::tables`].
    pub table: usize,
    pub key: String,
    pub missing: Missing,
}

/// Window lengths are on the local clock of `tz` (`None`: UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowSpec {
    Tumbling { size: i64 },
    Hopping { size: i64, slide: i64 },
    Cumulate { step: i64, max: i64 },
    Global,
}

#[derive(Debug, Clone)]
pub enum Agg {
    Count,
    Sum(String),
    Distinct(String, u8),
    Latest(String),
    TopN { item: String, n: usize, by: Option<String> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emit {
    Final,
    Updates,
    None,
}

#[derive(Debug, Clone)]
pub struct Metric {
    pub name: String,
    pub source: usize,
    pub filter: Option<Expr>,
    pub group_by: Vec<String>,
    /// (name in answers, aggregate).
    pub aggs: Vec<(String, Agg)>,
    pub window: WindowSpec,
    pub tz: Option<Tz>,
    pub grace_ms: i64,
    /// `None`: never expires (global).
    pub retention_ms: Option<i64>,
    pub having: Option<Expr>,
    pub emit: Emit,
}

#[derive(Debug, Clone)]
pub struct Ratio {
    pub name: String,
    /// (metric, aggregate index).
    pub num: (usize, usize),
    pub den: (usize, usize),
    pub emit: Emit,
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub sources: Vec<Source>,
    pub tables: Vec<TableSpec>,
    pub metrics: Vec<Metric>,
    pub ratios: Vec<Ratio>,
}

/// `10m` and the like, in ms.
pub fn duration(text: &str) -> i64 {
    let t = text.trim();
    let digits: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: i64 = digits.parse().unwrap_or_else(|_| panic!("duration {text}"));
    let unit = match t[digits.len()..].trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        u => panic!("unit {u}"),
    };
    n * unit
}

fn s<'a>(v: &'a Toml, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Toml::as_str)
}

fn tz(name: Option<&str>) -> Option<Tz> {
    name.map(|n| n.parse::<Tz>().unwrap_or_else(|_| panic!("zone {n}"))).filter(|z| *z != chrono_tz::UTC)
}

fn table(v: Option<&Toml>) -> BTreeMap<String, String> {
    v.and_then(Toml::as_table).map(|t| t.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()).unwrap_or_default()
}

fn source(v: &Toml, tables: &[TableSpec]) -> Source {
    let et = &v["event_time"];
    let zone = || tz(s(et, "timezone")).unwrap_or(chrono_tz::UTC);
    let field = || s(et, "field").unwrap().to_string();
    let parts = table(et.get("parts"));
    let kind = s(et, "kind").unwrap_or(if parts.is_empty() { "string" } else { "parts" });
    let time = match kind {
        "string" => TimeSpec::Text { field: field(), format: s(et, "format").unwrap().to_string(), tz: zone() },
        "epoch_seconds" => TimeSpec::Seconds { field: field() },
        "epoch_millis" => TimeSpec::Millis { field: field() },
        "parts" => {
            TimeSpec::Parts { parts: parts.into_iter().collect(), year: et.get("year").and_then(Toml::as_integer).map(|y| y as i32), tz: zone() }
        }
        k => panic!("event time kind {k}"),
    };
    let lookups = v
        .get("lookups")
        .and_then(Toml::as_array)
        .map(|ls| {
            ls.iter()
                .map(|l| LookupSpec {
                    table: tables.iter().position(|t| Some(t.name.as_str()) == s(l, "table")).unwrap(),
                    key: s(l, "key").unwrap().to_string(),
                    missing: match s(l, "missing").unwrap_or("skip") {
                        "skip" => Missing::Skip,
                        "null" => Missing::Null,
                        "dead_letter" => Missing::DeadLetter,
                        other => panic!("missing = {other}"),
                    },
                })
                .collect()
        })
        .unwrap_or_default();
    let types = types(v);
    Source {
        name: s(v, "name").unwrap().to_string(),
        time,
        delay_ms: s(v, "watermark_delay").map_or(0, duration),
        max_ahead_ms: s(v, "max_ahead").map_or(86_400_000, duration),
        aliases: table(v.get("fields")),
        types,
        lookups,
    }
}

/// The `types` of a source or table: (field, type, not null).
fn types(v: &Toml) -> Vec<(String, Ty, bool)> {
    table(v.get("types"))
        .into_iter()
        .map(|(f, decl)| {
            let lower = decl.to_ascii_lowercase();
            let required = lower.ends_with("not null");
            let name = lower.trim_end_matches("not null").trim().to_string();
            let ty = match name.as_str() {
                "int" | "integer" | "bigint" | "smallint" | "tinyint" => Ty::Int,
                "float" | "double" | "decimal" | "real" => Ty::Float,
                "string" | "varchar" | "text" | "char" => Ty::Str,
                "bool" | "boolean" => Ty::Bool,
                other => panic!("type {other}"),
            };
            (f, ty, required)
        })
        .collect()
}

fn window(v: &Toml) -> (WindowSpec, Option<Tz>) {
    let d = |k: &str| duration(s(v, k).unwrap());
    let w = match s(v, "type").unwrap() {
        "tumbling" => WindowSpec::Tumbling { size: d("size") },
        "hopping" => WindowSpec::Hopping { size: d("size"), slide: d("slide") },
        "cumulate" => WindowSpec::Cumulate { step: d("step"), max: d("max") },
        "global" => WindowSpec::Global,
        t => panic!("window {t}"),
    };
    (w, tz(s(v, "timezone")))
}

/// Parses an aggregate as the README's table writes them.
fn aggregate(text: &str) -> (String, Agg) {
    let (expr, alias) = match text.rsplit_once(" as ") {
        Some((e, a)) => (e.trim(), Some(a.trim().to_string())),
        None => (text.trim(), None),
    };
    let (func, args) = match expr.split_once('(') {
        None => (expr, vec![]),
        Some((f, rest)) => {
            let inner = rest.strip_suffix(')').unwrap();
            // top_n's third argument holds parentheses: split on commas outside them.
            let mut args = vec![String::new()];
            let mut depth = 0;
            for c in inner.chars() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    ',' if depth == 0 => {
                        args.push(String::new());
                        continue;
                    }
                    _ => {}
                }
                args.last_mut().unwrap().push(c);
            }
            (f.trim(), args.into_iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect())
        }
    };
    let agg = match func {
        "count" => Agg::Count,
        "sum" => Agg::Sum(args[0].clone()),
        "distinct" => Agg::Distinct(args[0].clone(), args.get(1).map_or(14, |p| p.parse().unwrap())),
        "latest" => Agg::Latest(args[0].clone()),
        "top_n" => Agg::TopN {
            item: args[0].clone(),
            n: args[1].parse().unwrap(),
            by: args.get(2).map(|b| b.trim_start_matches("sum(").trim_end_matches(')').trim().to_string()),
        },
        f => panic!("aggregate {f}"),
    };
    (alias.unwrap_or_else(|| expr.to_string()), agg)
}

fn emit(v: &Toml, windowed: bool, changelog: bool) -> Emit {
    match s(v, "emit") {
        Some("final") => Emit::Final,
        Some("updates") => Emit::Updates,
        Some("none") => Emit::None,
        Some(e) => panic!("emit {e}"),
        None if windowed && changelog => Emit::Final,
        None => Emit::None,
    }
}

impl Spec {
    /// Reads a config file's text.
    pub fn parse(text: &str) -> Spec {
        let doc: Toml = toml::from_str(text).expect("TOML");
        let changelog = doc.get("state").and_then(|s| s.get("changelog")).and_then(Toml::as_bool).unwrap_or(true);
        let empty = vec![];
        let tables: Vec<TableSpec> = doc
            .get("tables")
            .and_then(Toml::as_array)
            .unwrap_or(&empty)
            .iter()
            .map(|t| TableSpec {
                name: s(t, "name").unwrap().to_string(),
                fields: t["fields"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect(),
                types: types(t),
            })
            .collect();
        let srcs: Vec<&Toml> = doc["sources"].as_array().unwrap().iter().collect();
        let sources: Vec<Source> = srcs.iter().map(|v| source(v, &tables)).collect();
        let metrics: Vec<Metric> = doc
            .get("metrics")
            .and_then(Toml::as_array)
            .unwrap_or(&empty)
            .iter()
            .map(|m| {
                let si = sources.iter().position(|x| Some(x.name.as_str()) == s(m, "source")).unwrap();
                let (window, tz) = window(&m["window"]);
                let grace_ms = s(m, "grace").or_else(|| s(srcs[si], "grace")).map_or(0, duration);
                let length = match window {
                    WindowSpec::Tumbling { size } | WindowSpec::Hopping { size, .. } => Some(size),
                    WindowSpec::Cumulate { max, .. } => Some(max),
                    WindowSpec::Global => None,
                };
                let retention_ms = length.map(|l| s(m, "retention").map_or(grace_ms + l, duration));
                let aggs = m["aggregates"].as_array().unwrap().iter().map(|a| aggregate(a.as_str().unwrap())).collect::<Vec<_>>();
                let names: Vec<String> = aggs.iter().map(|(n, _)| n.clone()).collect();
                Metric {
                    name: s(m, "name").unwrap().to_string(),
                    source: si,
                    filter: s(m, "filter").map(|f| Expr::parse(f).unwrap_or_else(|e| panic!("filter {f}: {e}"))),
                    group_by: m
                        .get("group_by")
                        .and_then(Toml::as_array)
                        .map(|g| g.iter().map(|x| x.as_str().unwrap().to_string()).collect())
                        .unwrap_or_default(),
                    aggs,
                    window,
                    tz,
                    grace_ms,
                    retention_ms,
                    having: s(m, "having").map(|h| {
                        let e = Expr::parse(h).unwrap_or_else(|e| panic!("having {h}: {e}"));
                        assert!(e.names().iter().all(|n| names.contains(n)));
                        e
                    }),
                    emit: emit(m, length.is_some(), changelog),
                }
            })
            .collect();
        let side = |text: &str| -> (usize, usize) {
            let (m, a) = text.split_once('.').map_or((text, None), |(m, a)| (m, Some(a)));
            let mi = metrics.iter().position(|x| x.name == m).unwrap();
            (mi, a.map_or(0, |a| metrics[mi].aggs.iter().position(|(n, _)| n == a).unwrap()))
        };
        let ratios = doc
            .get("derived")
            .and_then(Toml::as_array)
            .unwrap_or(&empty)
            .iter()
            .map(|d| {
                let num = side(s(&d["ratio"], "numerator").unwrap());
                let windowed = metrics[num.0].window != WindowSpec::Global;
                Ratio {
                    name: s(d, "name").unwrap().to_string(),
                    num,
                    den: side(s(&d["ratio"], "denominator").unwrap()),
                    emit: emit(d, windowed, changelog),
                }
            })
            .collect();
        Spec { sources, tables, metrics, ratios }
    }
}
