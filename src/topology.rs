//! The topology: a validated config compiled into what the processing core runs — sources
//! with their decoders, metrics with resolved field slots, windows and lateness rules.
//!
//! Compiling is where every config mistake is caught, so [`Topology::compile`] returns a
//! [`ConfigError`] naming the key, the value and what is allowed.

use std::collections::{BTreeMap, HashSet};

use serde::Serialize;

use crate::aggregate::{AggKind, AggregateSpec};
use crate::config::{check_names, parse_duration_ms, Config, ConfigError, DisplayHint, Emit, MetricConfig, SourceConfig, WindowConfig};
use crate::event::time::{parse_tz, EventTime, PART_NAMES};
use crate::event::{Decoder, FieldType, TypedField};
use crate::filter::Filter;
use crate::window::{WindowSpec, Zone};

/// The compiled config.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Application id: consumer group and internal-topic prefix.
    pub application_id: String,
    /// Sources, in config order.
    pub sources: Vec<Source>,
    /// Global tables, in config order.
    pub tables: Vec<Table>,
    /// Metrics, in config order.
    pub metrics: Vec<Metric>,
    /// Derived metrics.
    pub derived: Vec<Derived>,
    /// Flush/commit interval, ms.
    pub commit_interval_ms: u64,
    /// Names of the metrics and derived metrics exported as `tally_metric_value`.
    pub exported: Vec<String>,
    /// Whether flushes are written to changelog topics.
    pub changelog: bool,
    /// The write-back cache's byte budget (`state.cache_max_bytes`).
    pub cache_max_bytes: usize,
    /// What the store's filesystem must keep free before a flush (`state.min_free_bytes`).
    pub min_free_bytes: u64,
    /// How long a handed-over partition's local state is kept (`state.cleanup_delay`), ms.
    pub cleanup_delay_ms: u64,
    /// sled's page cache of the state store (`state.store_cache_bytes`).
    pub store_cache_bytes: u64,
    /// The topic window results go to.
    pub results_topic: String,
    /// How replicas of this application find and ask each other.
    pub cluster: Cluster,
    /// `state.upgrade_from`: the older store version whose formats the changelog is written in.
    pub upgrade_from: Option<u32>,
}

/// The compiled `[cluster]` section and `http.advertised_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The stable replica name (`group.instance.id`), when configured.
    pub replica: Option<String>,
    /// The URL other replicas reach this one at, when configured.
    pub advertised_url: Option<String>,
    /// How long a query waits for another replica's partials, ms.
    pub query_timeout_ms: u64,
    /// How long a query with `min_position` waits for the state to reach it, ms.
    pub position_wait_ms: u64,
    /// Standby copies kept of each partition.
    pub num_standby_replicas: usize,
    /// How far a standby may lag and still answer, changelog records.
    pub max_standby_lag: u64,
}

impl Cluster {
    fn compile(cfg: &Config) -> Result<Cluster, ConfigError> {
        let c = &cfg.cluster;
        if let Some(r) = &c.replica {
            // Kafka's limit for group.instance.id, and characters safe in logs and URLs.
            if r.is_empty() || r.len() > 249 || !r.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err(ConfigError::new("cluster.replica", format!("`{r}` must be 1 to 249 letters, digits, `.`, `_`, `-`")));
            }
        }
        if let Some(u) = &cfg.http.advertised_url {
            let rest = u.strip_prefix("http://").unwrap_or_default();
            if rest.is_empty() || rest.contains(char::is_whitespace) {
                return Err(ConfigError::new(
                    "http.advertised_url",
                    format!("`{u}` must be an http:// URL other replicas can reach, like http://tally-0.tally:8080"),
                ));
            }
        }
        let wait = |key: &str, v: &Option<String>| -> Result<u64, ConfigError> {
            let ms = match v {
                None => 2_000,
                Some(text) => duration(format!("cluster.{key}"), text)?,
            };
            if !(1..=600_000).contains(&ms) {
                return Err(ConfigError::new(format!("cluster.{key}"), "must be between 1ms and 10m"));
            }
            Ok(ms as u64)
        };
        if c.num_standby_replicas > 8 {
            return Err(ConfigError::new("cluster.num_standby_replicas", format!("`{}`: at most 8 standby copies", c.num_standby_replicas)));
        }
        if c.num_standby_replicas > 0 && !cfg.state.changelog {
            return Err(ConfigError::new("cluster.num_standby_replicas", "standbys follow the changelog: they need `state.changelog = true`"));
        }
        Ok(Cluster {
            num_standby_replicas: c.num_standby_replicas as usize,
            max_standby_lag: c.max_standby_lag.unwrap_or(10_000),
            replica: c.replica.clone(),
            advertised_url: cfg.http.advertised_url.as_ref().map(|u| u.trim_end_matches('/').to_string()),
            query_timeout_ms: wait("query_timeout", &c.query_timeout)?,
            position_wait_ms: wait("position_wait", &c.position_wait)?,
        })
    }
}

/// A topic tally writes to and creates itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InternalTopic {
    /// Topic name.
    pub name: String,
    /// What it holds, which fixes its shape.
    pub kind: TopicKind,
}

/// What an internal topic holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Dead letters or late records: one partition, deleted after a week.
    SideOutput,
    /// A source's changelog: exactly the source's partitions, compacted, kept forever.
    Changelog {
        /// The source.
        source: usize,
    },
    /// Window results: as many partitions as the first source, compacted (a sink wants each
    /// key's latest row) and deleted after a week.
    Results,
    /// The replicas' membership records: one partition, compacted (each replica's latest).
    Members,
    /// A global table's topic (the user's; `tally gen` creates one): compacted.
    Table,
}

impl TopicKind {
    /// The source whose topic's partition count this topic takes (`None`: one partition).
    pub fn partitions_like(self) -> Option<usize> {
        match self {
            TopicKind::SideOutput | TopicKind::Members | TopicKind::Table => None,
            TopicKind::Changelog { source } => Some(source),
            TopicKind::Results => Some(0),
        }
    }
}

/// A compiled source.
#[derive(Debug, Clone)]
pub struct Source {
    /// Name.
    pub name: String,
    /// Kafka topic.
    pub topic: String,
    /// Decoder filling the slots the source's metrics read.
    pub decoder: Decoder,
    /// Field name of each slot (as written in the config).
    pub slot_names: Vec<String>,
    /// Watermark delay, ms.
    pub watermark_delay_ms: i64,
    /// How far event time may lead the Kafka timestamp, ms.
    pub max_ahead_ms: i64,
    /// After how long without records (wall clock) a caught-up partition counts as idle, ms.
    pub idle_timeout_ms: Option<i64>,
    /// Indices of the metrics reading this source.
    pub metrics: Vec<usize>,
    /// Lookups in global tables, in config order: done after decoding, before anything else.
    pub lookups: Vec<Lookup>,
}

/// A compiled global table.
#[derive(Debug, Clone)]
pub struct Table {
    /// Name.
    pub name: String,
    /// Kafka topic.
    pub topic: String,
    /// The fields kept, as written.
    pub fields: Vec<String>,
    /// Decoder of a value into one slot per field.
    pub decoder: Decoder,
    /// How long a replaced value is kept, ms.
    pub history_ms: i64,
    /// Keys kept decoded in memory for lookups.
    pub cache_keys: usize,
}

/// A compiled lookup of a source's records in a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lookup {
    /// Index of the table.
    pub table: usize,
    /// The record's slot holding the key.
    pub key_slot: usize,
    /// (field index in the table, the record's slot it fills), for the fields metrics read.
    pub slots: Vec<(usize, usize)>,
    /// What a missing key does.
    pub missing: crate::config::Missing,
}

/// A compiled metric.
#[derive(Debug, Clone, Serialize)]
pub struct Metric {
    /// Name.
    pub name: String,
    /// Index of its source.
    #[serde(skip)]
    pub source: usize,
    /// The filter as written.
    pub filter_text: Option<String>,
    /// Parsed filter over the source's slots.
    #[serde(skip)]
    pub filter: Option<Filter>,
    /// Group-by field names.
    pub group_by: Vec<String>,
    /// Slots of the group-by fields.
    #[serde(skip)]
    pub group_slots: Vec<usize>,
    /// Indices (in its source's lookups) of the lookups whose fields it reads: a record whose
    /// key one of them misses (`missing = "skip"`) is left out of this metric.
    #[serde(skip)]
    pub lookups: Vec<usize>,
    /// Aggregates, in order.
    #[serde(serialize_with = "aggregate_names")]
    pub aggregates: Vec<AggregateSpec>,
    /// The window.
    pub window: WindowSpec,
    /// Grace after a window's end during which it still accepts records, ms.
    pub grace_ms: i64,
    /// How long windows stay stored after they end, ms.
    pub retention_ms: i64,
    /// The `having` condition as written.
    pub having_text: Option<String>,
    /// `having` over aggregate positions.
    #[serde(skip)]
    pub having: Option<Filter>,
    /// What goes to the result topic.
    pub emit: Emit,
    /// How people see it.
    pub display: Display,
    /// What its stored states are.
    pub layout: crate::layout::Layout,
    /// Its rebuild token (see [`crate::config::MetricConfig::rebuild`]).
    pub rebuild: Option<String>,
}

/// What the live screen shows of a metric or ratio: its title, description, how to draw
/// it and names for its group keys.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Display {
    /// Heading (default: the name).
    pub title: String,
    /// What it counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// How to draw it; `None`: the screen picks from its shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<DisplayHint>,
    /// Group key → label.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Show the total over this last stretch (`/span?last=`), as written, e.g. `6h`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub span: Option<String>,
}

/// The display fields as written under one metric or ratio.
struct DisplayText<'a> {
    name: &'a str,
    title: &'a Option<String>,
    description: &'a Option<String>,
    hint: Option<DisplayHint>,
    labels: &'a BTreeMap<String, String>,
}

impl Display {
    /// Checks the display fields of `key` (`metrics[i]`); `grouped` says whether it has
    /// group keys or a top-N list, which a pie, a bar or a table needs and a number or a
    /// trend cannot show.
    fn compile(key: &str, d: DisplayText, grouped: bool) -> Result<Display, ConfigError> {
        let text = |k: &str, v: &Option<String>, max: usize| -> Result<(), ConfigError> {
            match v {
                Some(t) if t.trim().is_empty() || t.chars().count() > max => {
                    Err(ConfigError::new(format!("{key}.{k}"), format!("must be 1 to {max} characters")))
                }
                _ => Ok(()),
            }
        };
        text("title", d.title, 200)?;
        text("description", d.description, 2000)?;
        if d.labels.len() > 1000 || d.labels.iter().any(|(k, v)| k.len() > 200 || v.is_empty() || v.chars().count() > 200) {
            return Err(ConfigError::new(format!("{key}.labels"), "at most 1000 labels, each key and label 1 to 200 characters"));
        }
        match d.hint {
            Some(h @ (DisplayHint::Pie | DisplayHint::Bar | DisplayHint::Table)) if !grouped => Err(ConfigError::new(
                format!("{key}.display"),
                format!("`{}` draws group keys or a top-N list; this one has neither (use `number` or `trend`)", hint_name(h)),
            )),
            Some(h @ (DisplayHint::Number | DisplayHint::Trend)) if grouped => Err(ConfigError::new(
                format!("{key}.display"),
                format!("`{}` draws one number per window; this one has group keys or a top-N list (use `pie`, `bar` or `table`)", hint_name(h)),
            )),
            hint => Ok(Display {
                title: d.title.clone().unwrap_or_else(|| d.name.to_string()),
                description: d.description.clone(),
                hint,
                labels: d.labels.clone(),
                span: None,
            }),
        }
    }
}

fn hint_name(h: DisplayHint) -> String {
    serde_json::to_value(h).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn aggregate_names<S: serde::Serializer>(a: &[AggregateSpec], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(a.iter().map(|a| &a.name))
}

/// A ratio of two metrics' aggregates, computed per key and window when asked.
#[derive(Debug, Clone, Serialize)]
pub struct Derived {
    /// Name.
    pub name: String,
    /// Metric index and aggregate index on top.
    pub numerator: (usize, usize),
    /// Metric index and aggregate index below.
    pub denominator: (usize, usize),
    /// The later of its metrics' graces: a ratio's window is closed once both are.
    pub grace_ms: i64,
    /// What goes to the result topic.
    pub emit: Emit,
    /// How people see it.
    pub display: Display,
}

fn duration(key: String, text: &str) -> Result<i64, ConfigError> {
    let ms = parse_duration_ms(text).map_err(|e| ConfigError::new(&key, e))?;
    if ms < 0 {
        return Err(ConfigError::new(key, format!("`{text}` must not be negative")));
    }
    Ok(ms)
}

/// Slots of one source: field name → slot, with the JSON path of each. A name
/// `table.field` of a table the source looks up is a looked-up field: its slot is filled
/// by the lookup, not read from the record.
struct SlotTable<'a> {
    source: &'a SourceConfig,
    names: Vec<String>,
    /// Per lookup: the table's name and fields.
    lookups: Vec<(&'a str, &'a [String])>,
    /// Per slot: the (lookup, field) filling it.
    looked_up: Vec<Option<(usize, usize)>>,
    /// Lookups whose fields were asked for since [`SlotTable::take_touched`].
    touched: Vec<usize>,
}

impl<'a> SlotTable<'a> {
    fn new(source: &'a SourceConfig, tables: &'a [crate::config::TableConfig]) -> SlotTable<'a> {
        let lookups = source
            .lookups
            .iter()
            .map(|l| tables.iter().find(|t| t.name == l.table).map_or((l.table.as_str(), &[][..]), |t| (t.name.as_str(), &t.fields[..])))
            .collect();
        SlotTable { source, names: vec![], lookups, looked_up: vec![], touched: vec![] }
    }

    /// The (lookup, field) a name refers to, if it is a looked-up field.
    fn lookup_of(&self, name: &str) -> Option<(usize, usize)> {
        let (table, field) = name.split_once('.')?;
        let li = self.lookups.iter().position(|(t, _)| *t == table)?;
        let fi = self.lookups[li].1.iter().position(|f| f == field)?;
        Some((li, fi))
    }

    fn slot(&mut self, name: &str) -> usize {
        let looked_up = self.lookup_of(name);
        if let Some((li, _)) = looked_up {
            if !self.touched.contains(&li) {
                self.touched.push(li);
            }
        }
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return i;
        }
        self.names.push(name.to_string());
        self.looked_up.push(looked_up);
        self.names.len() - 1
    }

    /// The lookups touched since the last call.
    fn take_touched(&mut self) -> Vec<usize> {
        let mut t = std::mem::take(&mut self.touched);
        t.sort_unstable();
        t
    }

    fn paths(&self) -> Vec<Vec<String>> {
        self.names
            .iter()
            .zip(&self.looked_up)
            .map(|(n, looked_up)| match looked_up {
                Some(_) => vec![],
                None => self.source.fields.get(n).map_or(n.as_str(), String::as_str).split('.').map(str::to_string).collect(),
            })
            .collect()
    }
}

impl Topology {
    /// Compiles and validates `cfg`.
    pub fn compile(cfg: &Config) -> Result<Topology, ConfigError> {
        if cfg.kafka.application_id.is_empty() || !cfg.kafka.application_id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(ConfigError::new(
                "kafka.application_id",
                format!("`{}` must be non-empty letters, digits, `.`, `_`, `-` (it prefixes topic names)", cfg.kafka.application_id),
            ));
        }
        if cfg.sources.is_empty() {
            return Err(ConfigError::new("sources", "at least one [[sources]] entry is required"));
        }
        let mut taken = HashSet::new();
        check_names("sources", cfg.sources.iter().map(|s| s.name.as_str()), &mut taken)?;
        let mut taken = HashSet::new();
        check_names("metrics", cfg.metrics.iter().map(|m| m.name.as_str()), &mut taken)?;
        check_names("derived", cfg.derived.iter().map(|d| d.name.as_str()), &mut taken)?;
        let mut topics = HashSet::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            if !topics.insert(&s.topic) {
                return Err(ConfigError::new(format!("sources[{i}].topic"), format!("topic `{}` is read by two sources", s.topic)));
            }
        }
        cfg.kafka.exit_on_broker_timeout_ms()?;
        cfg.http.validate()?;
        let commit_interval_ms = duration("state.commit_interval".into(), &cfg.state.commit_interval)?;
        if commit_interval_ms == 0 {
            return Err(ConfigError::new("state.commit_interval", "must be positive, e.g. `100ms`"));
        }
        let cleanup_delay_ms = duration("state.cleanup_delay".into(), &cfg.state.cleanup_delay)?;

        let global = compile_tables(cfg)?;
        let mut tables: Vec<SlotTable> = cfg.sources.iter().map(|s| SlotTable::new(s, &cfg.tables)).collect();
        let mut keys = Vec::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            keys.push(lookup_keys(i, s, &global, &mut tables[i])?);
        }
        let mut times = Vec::new();
        let mut types = Vec::new();
        for (i, s) in cfg.sources.iter().enumerate() {
            times.push(event_time(i, s, &mut tables[i])?);
            types.push(field_types(i, s, &mut tables[i])?);
        }

        let mut metrics = Vec::new();
        for (i, m) in cfg.metrics.iter().enumerate() {
            let src = cfg.sources.iter().position(|s| s.name == m.source).ok_or_else(|| {
                let names: Vec<&str> = cfg.sources.iter().map(|s| s.name.as_str()).collect();
                ConfigError::new(format!("metrics[{i}].source"), format!("`{}` is not a source; sources are {names:?}", m.source))
            })?;
            tables[src].take_touched();
            let mut compiled = metric(i, m, src, &cfg.sources[src], &mut tables[src])?;
            compiled.lookups = tables[src].take_touched();
            compiled.emit = emit(format!("metrics[{i}].emit"), m.emit, &compiled, cfg.state.changelog)?;
            metrics.push(compiled);
        }

        let mut sources = Vec::new();
        for (i, (((s, time), types), keys)) in cfg.sources.iter().zip(times).zip(types).zip(keys).enumerate() {
            let table = &tables[i];
            let lookups = s
                .lookups
                .iter()
                .zip(keys)
                .enumerate()
                .map(|(li, (l, (ti, key_slot)))| Lookup {
                    table: ti,
                    key_slot,
                    slots: table.looked_up.iter().enumerate().filter_map(|(slot, lf)| lf.filter(|(x, _)| *x == li).map(|(_, f)| (f, slot))).collect(),
                    missing: l.missing,
                })
                .collect();
            let idle_timeout_ms = s.idle_timeout.as_deref().map(|t| duration(format!("sources[{i}].idle_timeout"), t)).transpose()?;
            if idle_timeout_ms == Some(0) {
                return Err(ConfigError::new(
                    format!("sources[{i}].idle_timeout"),
                    "must be positive, e.g. `1m` (leave it out to never count a partition idle)",
                ));
            }
            sources.push(Source {
                name: s.name.clone(),
                topic: s.topic.clone(),
                decoder: Decoder::new(table.paths(), time, types),
                slot_names: table.names.clone(),
                watermark_delay_ms: duration(format!("sources[{i}].watermark_delay"), &s.watermark_delay)?,
                max_ahead_ms: duration(format!("sources[{i}].max_ahead"), &s.max_ahead)?,
                idle_timeout_ms,
                metrics: metrics.iter().enumerate().filter(|(_, m)| m.source == i).map(|(j, _)| j).collect(),
                lookups,
            });
        }

        let mut derived = Vec::new();
        for (i, d) in cfg.derived.iter().enumerate() {
            let side = |key: &str, text: &str| -> Result<(usize, usize), ConfigError> {
                let key = format!("derived[{i}].ratio.{key}");
                let (mname, agg) = match text.split_once('.') {
                    Some((m, a)) => (m, Some(a)),
                    None => (text, None),
                };
                let mi = metrics.iter().position(|m| m.name == mname).ok_or_else(|| ConfigError::new(&key, format!("`{mname}` is not a metric")))?;
                let m = &metrics[mi];
                let ai = match agg {
                    None => 0,
                    Some(a) => m.aggregates.iter().position(|x| x.name == a).ok_or_else(|| {
                        let names: Vec<&str> = m.aggregates.iter().map(|a| a.name.as_str()).collect();
                        ConfigError::new(&key, format!("metric `{mname}` has no aggregate `{a}`; it has {names:?}"))
                    })?,
                };
                if matches!(m.aggregates[ai].kind, AggKind::TopN { .. }) {
                    return Err(ConfigError::new(&key, format!("`{text}` is a top_n list, not a number")));
                }
                Ok((mi, ai))
            };
            let num = side("numerator", &d.ratio.numerator)?;
            let den = side("denominator", &d.ratio.denominator)?;
            let (a, b) = (&metrics[num.0], &metrics[den.0]);
            if a.window != b.window || a.group_by != b.group_by || a.source != b.source {
                return Err(ConfigError::new(
                    format!("derived[{i}].ratio"),
                    format!(
                        "`{}` and `{}` must read the same source with the same window and group_by to be divided per key and window",
                        a.name, b.name
                    ),
                ));
            }
            let emit = emit(format!("derived[{i}].emit"), d.emit, a, cfg.state.changelog)?;
            let text = DisplayText { name: &d.name, title: &d.title, description: &d.description, hint: d.display, labels: &d.labels };
            let display = Display::compile(&format!("derived[{i}]"), text, !a.group_by.is_empty())?;
            derived.push(Derived { name: d.name.clone(), numerator: num, denominator: den, grace_ms: a.grace_ms.max(b.grace_ms), emit, display });
        }

        let mut exported = Vec::new();
        let grouped = |key: String, name: &str, m: &Metric| -> Result<(), ConfigError> {
            if m.group_by.is_empty() {
                Ok(())
            } else {
                Err(ConfigError::new(
                    key,
                    format!(
                        "`{name}` groups by {:?}: exporting it would turn keys into Prometheus labels; only metrics without group_by can be exported",
                        m.group_by
                    ),
                ))
            }
        };
        for (i, m) in cfg.metrics.iter().enumerate().filter(|(_, m)| m.export) {
            grouped(format!("metrics[{i}].export"), &m.name, &metrics[i])?;
            exported.push(m.name.clone());
        }
        for (i, d) in cfg.derived.iter().enumerate().filter(|(_, d)| d.export) {
            grouped(format!("derived[{i}].export"), &d.name, &metrics[derived[i].numerator.0])?;
            exported.push(d.name.clone());
        }

        let upgrade_from = match cfg.state.upgrade_from {
            Some(v) if v == crate::migrations::STORE_VERSION => None,
            Some(2) => Some(2),
            Some(v) => {
                return Err(ConfigError::new(
                    "state.upgrade_from",
                    format!("`{v}`: this tally upgrades from store version 2 only (or give {}, its own)", crate::migrations::STORE_VERSION),
                ))
            }
            None => None,
        };
        for (i, m) in metrics.iter_mut().enumerate() {
            m.layout.legacy = upgrade_from.is_some();
            if upgrade_from.is_some() && m.rebuild.is_some() {
                return Err(ConfigError::new(
                    format!("metrics[{i}].rebuild"),
                    "a rebuild needs positions that record it, which version 2 does not read: finish the rolling upgrade (drop state.upgrade_from) first",
                ));
            }
        }
        Ok(Topology {
            upgrade_from,
            application_id: cfg.kafka.application_id.clone(),
            sources,
            tables: global,
            metrics,
            derived,
            commit_interval_ms: commit_interval_ms as u64,
            exported,
            changelog: cfg.state.changelog,
            cache_max_bytes: usize::try_from(cfg.state.cache_max_bytes).unwrap_or(usize::MAX),
            min_free_bytes: cfg.state.min_free_bytes,
            cleanup_delay_ms: cleanup_delay_ms as u64,
            store_cache_bytes: cfg.state.store_cache_bytes,
            results_topic: cfg.results.topic.clone().unwrap_or_else(|| format!("{}-results", cfg.kafka.application_id)),
            cluster: Cluster::compile(cfg)?,
        })
    }

    /// Names of the metrics and derived metrics that send rows to the result topic.
    pub fn emitting(&self) -> Vec<&str> {
        let metrics = self.metrics.iter().map(|m| (m.name.as_str(), m.emit));
        metrics.chain(self.derived.iter().map(|d| (d.name.as_str(), d.emit))).filter(|(_, e)| *e != Emit::None).map(|(n, _)| n).collect()
    }

    /// Whether any metric or derived metric sends rows to the result topic.
    pub fn emits_results(&self) -> bool {
        !self.emitting().is_empty()
    }

    /// The metric called `name`.
    pub fn metric(&self, name: &str) -> Option<(usize, &Metric)> {
        self.metrics.iter().enumerate().find(|(_, m)| m.name == name)
    }

    /// The topic dead letters go to.
    pub fn dead_letter_topic(&self) -> String {
        format!("{}-dead-letters", self.application_id)
    }

    /// The topic late records go to.
    pub fn late_topic(&self) -> String {
        format!("{}-late-records", self.application_id)
    }

    /// The changelog of a source's state: every flushed aggregate and position of the
    /// source's partitions, partition for partition. One store per source, because a source
    /// partition is the unit that is flushed atomically, restored and moved between replicas.
    pub fn changelog_topic(&self, source: usize) -> String {
        format!("{}-{}-changelog", self.application_id, self.sources[source].name)
    }

    /// The topic every replica announces itself on: its URL and the partitions it owns.
    pub fn members_topic(&self) -> String {
        format!("{}-members", self.application_id)
    }

    /// Every topic tally writes: side outputs, membership, changelogs unless turned off,
    /// and the result topic when anything is emitted.
    pub fn internal_topics(&self) -> Vec<InternalTopic> {
        let mut out = vec![
            InternalTopic { name: self.dead_letter_topic(), kind: TopicKind::SideOutput },
            InternalTopic { name: self.late_topic(), kind: TopicKind::SideOutput },
            InternalTopic { name: self.members_topic(), kind: TopicKind::Members },
        ];
        if self.changelog {
            out.extend((0..self.sources.len()).map(|s| InternalTopic { name: self.changelog_topic(s), kind: TopicKind::Changelog { source: s } }));
        }
        if self.emits_results() {
            out.push(InternalTopic { name: self.results_topic.clone(), kind: TopicKind::Results });
        }
        out
    }

    /// A human-readable account of what the config does (`tally check`).
    pub fn explain(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "application `{}` (consumer group; internal topics `{}`, `{}`)",
            self.application_id,
            self.dead_letter_topic(),
            self.late_topic()
        );
        let _ = writeln!(out, "flush + commit every {} ms", self.commit_interval_ms);
        for t in &self.tables {
            let _ = writeln!(
                out,
                "table `{}` reads compacted topic `{}` whole (key → {:?}), keeping replaced values {} ms",
                t.name, t.topic, t.fields, t.history_ms
            );
        }
        for s in &self.sources {
            let _ = writeln!(
                out,
                "source `{}` reads topic `{}`, watermark = max event time - {} ms, fields {:?}",
                s.name, s.topic, s.watermark_delay_ms, s.slot_names
            );
            for l in &s.lookups {
                let t = &self.tables[l.table];
                let _ = writeln!(
                    out,
                    "  looks up field {:?} in table `{}` (fields {:?}); a key not in it: {:?}",
                    s.slot_names[l.key_slot], t.name, t.fields, l.missing
                );
            }
            for &mi in &s.metrics {
                let m = &self.metrics[mi];
                let aggs: Vec<&str> = m.aggregates.iter().map(|a| a.name.as_str()).collect();
                let _ = writeln!(
                    out,
                    "  metric `{}`: {:?} per {} over {:?}{}; grace {} ms, kept {} ms after windows end{}",
                    m.name,
                    aggs,
                    if m.group_by.is_empty() { "everything".to_string() } else { format!("{:?}", m.group_by) },
                    m.window.kind,
                    m.filter_text.as_ref().map_or(String::new(), |f| format!(" where {f}")),
                    m.grace_ms,
                    m.retention_ms,
                    m.having_text.as_ref().map_or(String::new(), |h| format!("; answers keep groups with {h}")),
                );
            }
        }
        for d in &self.derived {
            let (n, d2) = (&self.metrics[d.numerator.0], &self.metrics[d.denominator.0]);
            let _ = writeln!(
                out,
                "derived `{}` = {}.{} / {}.{} per key and window",
                d.name, n.name, n.aggregates[d.numerator.1].name, d2.name, d2.aggregates[d.denominator.1].name
            );
        }
        if self.emits_results() {
            let rows = |emit: Emit| -> Vec<&str> {
                let metrics = self.metrics.iter().filter(|m| m.emit == emit).map(|m| m.name.as_str());
                metrics.chain(self.derived.iter().filter(|d| d.emit == emit).map(|d| d.name.as_str())).collect()
            };
            let _ = writeln!(
                out,
                "results to topic `{}`: final rows of {:?}, every update of {:?}",
                self.results_topic,
                rows(Emit::Final),
                rows(Emit::Updates)
            );
        }
        out
    }
}

/// Compiles `[[tables]]`: names, topics (no source's), fields and their types.
fn compile_tables(cfg: &Config) -> Result<Vec<Table>, ConfigError> {
    let mut taken: HashSet<String> = cfg.sources.iter().map(|s| s.name.clone()).collect();
    check_names("tables", cfg.tables.iter().map(|t| t.name.as_str()), &mut taken)?;
    let mut out = Vec::new();
    for (i, t) in cfg.tables.iter().enumerate() {
        let key = |k: &str| format!("tables[{i}].{k}");
        if cfg.sources.iter().any(|s| s.topic == t.topic) || cfg.tables[..i].iter().any(|o| o.topic == t.topic) {
            return Err(ConfigError::new(key("topic"), format!("topic `{}` is read by a source or another table", t.topic)));
        }
        if t.fields.is_empty() || t.fields.len() > 64 {
            return Err(ConfigError::new(key("fields"), "list 1 to 64 fields of the table's values, e.g. [\"module_id\"]"));
        }
        let mut paths: Vec<Vec<String>> = Vec::new();
        for (j, f) in t.fields.iter().enumerate() {
            if f.is_empty() || f.split('.').any(str::is_empty) || t.fields[..j].contains(f) {
                return Err(ConfigError::new(format!("tables[{i}].fields[{j}]"), format!("`{f}` is empty, malformed or listed twice")));
            }
            paths.push(f.split('.').map(str::to_string).collect());
        }
        let mut types = Vec::new();
        for (field, decl) in &t.types {
            let slot = t.fields.iter().position(|f| f == field).ok_or_else(|| {
                ConfigError::new(format!("tables[{i}].types.{field}"), format!("`{field}` is not one of the table's fields {:?}", t.fields))
            })?;
            let (ty, required) = field_type(format!("tables[{i}].types.{field}"), decl)?;
            types.push(TypedField { slot, ty, required });
        }
        let history_ms = duration(key("history"), t.history.as_deref().unwrap_or("1d"))?;
        let cache_keys = t.cache_keys.unwrap_or(250_000);
        if cache_keys > 100_000_000 {
            return Err(ConfigError::new(key("cache_keys"), format!("`{cache_keys}`: at most 100000000 (0 turns the cache off)")));
        }
        out.push(Table {
            name: t.name.clone(),
            topic: t.topic.clone(),
            fields: t.fields.clone(),
            decoder: Decoder::without_time(paths, types),
            history_ms,
            cache_keys,
        });
    }
    Ok(out)
}

/// The (table, key slot) of each lookup of source `i`.
fn lookup_keys(i: usize, s: &SourceConfig, tables: &[Table], slots: &mut SlotTable) -> Result<Vec<(usize, usize)>, ConfigError> {
    let mut out = Vec::new();
    for (j, l) in s.lookups.iter().enumerate() {
        let key = |k: &str| format!("sources[{i}].lookups[{j}].{k}");
        let ti = tables.iter().position(|t| t.name == l.table).ok_or_else(|| {
            let names: Vec<&str> = tables.iter().map(|t| t.name.as_str()).collect();
            ConfigError::new(key("table"), format!("`{}` is not a table; tables are {names:?}", l.table))
        })?;
        if s.lookups[..j].iter().any(|o| o.table == l.table) {
            return Err(ConfigError::new(key("table"), format!("table `{}` is looked up twice by this source", l.table)));
        }
        if slots.lookup_of(&l.key).is_some() {
            return Err(ConfigError::new(key("key"), format!("`{}` is a looked-up field; a key must be a field of the record", l.key)));
        }
        out.push((ti, slots.slot(&l.key)));
    }
    Ok(out)
}

fn event_time(i: usize, s: &SourceConfig, table: &mut SlotTable) -> Result<EventTime, ConfigError> {
    let t = &s.event_time;
    let key = |k: &str| format!("sources[{i}].event_time.{k}");
    let tz = match &t.timezone {
        Some(name) => parse_tz(name).map_err(|e| ConfigError::new(key("timezone"), e))?,
        None => chrono_tz::UTC,
    };
    let kind = t.kind.clone().unwrap_or_else(|| if t.parts.is_empty() { "string".into() } else { "parts".into() });
    let field = |table: &mut SlotTable| -> Result<usize, ConfigError> {
        let f = t.field.as_ref().ok_or_else(|| ConfigError::new(key("field"), format!("kind `{kind}` needs the field holding the time")))?;
        Ok(table.slot(f))
    };
    match kind.as_str() {
        "string" => {
            let format = t
                .format
                .as_ref()
                .ok_or_else(|| ConfigError::new(key("format"), "a strftime format is required for text times, e.g. `%Y-%m-%d %H:%M:%S`"))?;
            if chrono::format::StrftimeItems::new(format).any(|it| matches!(it, chrono::format::Item::Error)) {
                return Err(ConfigError::new(key("format"), format!("`{format}` is not a valid strftime format")));
            }
            Ok(EventTime::Text { slot: field(table)?, format: format.clone(), tz })
        }
        "epoch_seconds" => Ok(EventTime::EpochSeconds { slot: field(table)? }),
        "epoch_millis" => Ok(EventTime::EpochMillis { slot: field(table)? }),
        "parts" => {
            if t.parts.is_empty() {
                return Err(ConfigError::new(key("parts"), "list the parts, e.g. `{ month = \"month\", day = \"day\" }`"));
            }
            let mut slots = [None; 6];
            for (part, f) in &t.parts {
                let pos = PART_NAMES
                    .iter()
                    .position(|p| p == part)
                    .ok_or_else(|| ConfigError::new(key("parts"), format!("unknown part `{part}`; allowed: {PART_NAMES:?}")))?;
                slots[pos] = Some(table.slot(f));
            }
            Ok(EventTime::Parts { slots, year: t.year, tz })
        }
        other => Err(ConfigError::new(key("kind"), format!("`{other}` is not a kind; allowed: string, epoch_seconds, epoch_millis, parts"))),
    }
}

/// The declared field types of a source, each field given a slot (checked even if no
/// metric reads it: a record is typed as a whole, as a row of Flink's is).
fn field_types(i: usize, s: &SourceConfig, table: &mut SlotTable) -> Result<Vec<TypedField>, ConfigError> {
    let mut out = Vec::new();
    for (field, decl) in &s.types {
        let (ty, required) = field_type(format!("sources[{i}].types.{field}"), decl)?;
        out.push(TypedField { slot: table.slot(field), ty, required });
    }
    Ok(out)
}

/// A declared type: `int`, `BIGINT not null`, …
fn field_type(key: String, decl: &str) -> Result<(FieldType, bool), ConfigError> {
    let lower = decl.trim().to_ascii_lowercase();
    let (name, required) = match lower.strip_suffix("not null") {
        Some(rest) => (rest.trim_end(), true),
        None => (lower.as_str(), false),
    };
    let ty = FieldType::parse(name).ok_or_else(|| {
        ConfigError::new(key, format!("`{decl}` is not a type; allowed: int, float, string, bool (or BIGINT, DOUBLE, VARCHAR, BOOLEAN, …), optionally followed by `not null`"))
    })?;
    Ok((ty, required))
}

fn window(key: String, w: &WindowConfig) -> Result<WindowSpec, ConfigError> {
    let need = |k: &str, v: &Option<String>| -> Result<i64, ConfigError> {
        let text = v.as_ref().ok_or_else(|| ConfigError::new(format!("{key}.{k}"), format!("a `{}` window needs `{k}`", w.kind)))?;
        duration(format!("{key}.{k}"), text)
    };
    let zone = match &w.timezone {
        None => Zone::Utc,
        Some(name) => match parse_tz(name).map_err(|e| ConfigError::new(format!("{key}.timezone"), e))? {
            chrono_tz::UTC => Zone::Utc,
            tz => Zone::Named(tz),
        },
    };
    let spec = match w.kind.as_str() {
        "tumbling" => WindowSpec::tumbling(need("size", &w.size)?, zone),
        "hopping" => WindowSpec::hopping(need("size", &w.size)?, need("slide", &w.slide)?, zone),
        "cumulate" => WindowSpec::cumulate(need("step", &w.step)?, need("max", &w.max)?, zone),
        "global" => Ok(WindowSpec::global()),
        other => {
            return Err(ConfigError::new(
                format!("{key}.type"),
                format!("`{other}` is not a window type; allowed: tumbling, hopping, cumulate, global"),
            ))
        }
    };
    spec.map_err(|e| ConfigError::new(key, e))
}

fn metric(i: usize, m: &MetricConfig, src: usize, s: &SourceConfig, table: &mut SlotTable) -> Result<Metric, ConfigError> {
    let key = |k: &str| format!("metrics[{i}].{k}");
    if m.aggregates.is_empty() {
        return Err(ConfigError::new(key("aggregates"), "list at least one aggregate, e.g. [\"count\"]"));
    }
    let filter = match &m.filter {
        None => None,
        Some(text) => {
            Some(Filter::parse(text, |name| Some(table.slot(name))).map_err(|e| ConfigError::new(key("filter"), format!("`{text}`: {e}")))?)
        }
    };
    let group_slots = m.group_by.iter().map(|g| table.slot(g)).collect();
    let mut aggregates = Vec::new();
    let mut names = BTreeMap::new();
    for (j, text) in m.aggregates.iter().enumerate() {
        let a = AggregateSpec::parse(text, |f| table.slot(f)).map_err(|e| ConfigError::new(format!("metrics[{i}].aggregates[{j}]"), e))?;
        if names.insert(a.name.clone(), j).is_some() {
            return Err(ConfigError::new(format!("metrics[{i}].aggregates[{j}]"), format!("two aggregates are named `{}`; add `as alias`", a.name)));
        }
        aggregates.push(a);
    }
    let window = window(key("window"), &m.window)?;
    let mut layout = crate::layout::Layout::describe(&aggregates, &m.group_by, &window, |slot| table.names.get(slot).cloned().unwrap_or_default());
    if let Some(token) = &m.rebuild {
        // States of a rebuild are another generation: nothing built before it reads as one.
        layout.fingerprint = crate::layout::fingerprint(&format!("{}\u{0}rebuild {token}", layout.text));
    }
    let grace_ms = duration(key("grace"), m.grace.as_deref().unwrap_or(&s.grace))?;
    let retention_ms = match &m.retention {
        Some(r) => duration(key("retention"), r)?,
        None => grace_ms.saturating_add(window.span_ms().min(i64::MAX / 4)),
    };
    if retention_ms < grace_ms {
        return Err(ConfigError::new(
            key("retention"),
            format!("{retention_ms} ms is shorter than the grace ({grace_ms} ms): records still accepted would land in deleted windows"),
        ));
    }
    let having = match &m.having {
        None => None,
        Some(text) => {
            let f = Filter::parse(text, |n| names.get(n).copied()).map_err(|e| {
                let known: Vec<&String> = names.keys().collect();
                ConfigError::new(key("having"), format!("`{text}`: {e}; aggregates are {known:?}"))
            })?;
            Some(f)
        }
    };
    let mut display = Display::compile(
        &format!("metrics[{i}]"),
        DisplayText { name: &m.name, title: &m.title, description: &m.description, hint: m.display, labels: &m.labels },
        !m.group_by.is_empty() || aggregates.iter().any(|a| matches!(a.kind, AggKind::TopN { .. })),
    )?;
    if let Some(text) = &m.display_span {
        let ms = duration(key("display_span"), text)?;
        if ms == 0 || ms > retention_ms {
            return Err(ConfigError::new(key("display_span"), format!("`{text}` must be positive and within the retention ({retention_ms} ms)")));
        }
        display.span = Some(text.clone());
    }
    Ok(Metric {
        name: m.name.clone(),
        source: src,
        filter_text: m.filter.clone(),
        filter,
        group_by: m.group_by.clone(),
        group_slots,
        lookups: vec![],
        aggregates,
        window,
        grace_ms,
        retention_ms,
        having_text: m.having.clone(),
        having,
        emit: Emit::None,
        display,
        layout,
        rebuild: m.rebuild.clone(),
    })
}

/// A metric's (or ratio's, over metric `m`) result rows: `final` by default for windows
/// that close, nothing for a global window. Results are built from the changelog, so asking
/// for them without one is an error.
fn emit(key: String, asked: Option<Emit>, m: &Metric, changelog: bool) -> Result<Emit, ConfigError> {
    let global = m.window.kind == crate::window::WindowKind::Global;
    match asked {
        None if changelog && !global => Ok(Emit::Final),
        None => Ok(Emit::None),
        Some(Emit::Final) if global => Err(ConfigError::new(key, "a global window never closes, so it has no final row; use `updates` or `none`")),
        Some(e) if e != Emit::None && !changelog => {
            Err(ConfigError::new(key, "results are built from the changelog topics; set `state.changelog = true` or `emit = \"none\"`"))
        }
        Some(e) => Ok(e),
    }
}

/// A topology for unit tests: one source `s` (topic `t`, event time `ts` in epoch seconds,
/// watermark delay 10 s) and the `metrics` (TOML `[[metrics]]`/`[[derived]]` tables) given.
#[cfg(test)]
pub(crate) fn test_topology(metrics: &str) -> std::sync::Arc<Topology> {
    let cfg = Config::from_toml_str(&format!(
        "[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\napplication_id = \"t\"\n\
         [[sources]]\nname = \"s\"\ntopic = \"t\"\nevent_time = {{ field = \"ts\", kind = \"epoch_seconds\" }}\nwatermark_delay = \"10s\"\n{metrics}"
    ))
    .expect("a valid test config");
    std::sync::Arc::new(Topology::compile(&cfg).expect("a valid test topology"))
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
        [kafka]
        bootstrap_servers = "127.0.0.1:9092"
        application_id = "t"
        [[sources]]
        name = "s"
        topic = "t"
        event_time = { field = "ts", kind = "epoch_millis" }
    "#;

    fn err(extra: &str) -> String {
        Config::from_toml_str(&format!("{BASE}{extra}")).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_key_value_and_what_is_allowed() {
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"avg(x)\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n");
        assert!(e.contains("metrics[0].aggregates[0]") && e.contains("avg") && e.contains("allowed"), "{e}");
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"sliding\", size = \"1m\" }\n");
        assert!(e.contains("metrics[0].window.type") && e.contains("sliding") && e.contains("tumbling, hopping"), "{e}");
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"5 parsecs\" }\n");
        assert!(e.contains("metrics[0].window.size") && e.contains("parsecs"), "{e}");
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"nope\"\naggregates = [\"count\"]\nwindow = { type = \"global\" }\n");
        assert!(e.contains("metrics[0].source") && e.contains("nope"), "{e}");
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nhaving = \"total > 0\"\nwindow = { type = \"global\" }\n");
        assert!(e.contains("metrics[0].having") && e.contains("total"), "{e}");
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nfilter = \"a = \"\nwindow = { type = \"global\" }\n");
        assert!(e.contains("metrics[0].filter"), "{e}");
        let e = err("[[metrics]]\nname = \"m\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"global\" }\nbogus = 1\n");
        assert!(e.contains("bogus"), "{e}");
    }

    #[test]
    fn ratios_need_matching_metrics() {
        let two = "[[metrics]]\nname = \"a\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n\
                   [[metrics]]\nname = \"b\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"2m\" }\n";
        let e = err(&format!("{two}[[derived]]\nname = \"r\"\nratio = {{ numerator = \"a\", denominator = \"b\" }}\n"));
        assert!(e.contains("derived[0].ratio") && e.contains("same"), "{e}");
        let e = err(&format!("{two}[[derived]]\nname = \"r\"\nratio = {{ numerator = \"a.nope\", denominator = \"a\" }}\n"));
        assert!(e.contains("derived[0].ratio.numerator") && e.contains("nope"), "{e}");
    }
}
