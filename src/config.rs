//! The config file: what to read, how to decode it, what to compute.
//!
//! A config is TOML. It is parsed into the `*Config` structs below (plain serde), then
//! [`Config::validate`] checks every cross-reference and expression so that a wrong config
//! fails at start with an error naming the key, the value and what is allowed — never later
//! in the middle of a stream.
//!
//! ```
//! let cfg = tally::config::Config::from_toml_str(r#"
//!     [kafka]
//!     bootstrap_servers = "127.0.0.1:9092"
//!     application_id = "shop"
//!
//!     [[sources]]
//!     name = "clicks"
//!     topic = "clicks"
//!     event_time = { field = "ts", kind = "epoch_millis" }
//!
//!     [[metrics]]
//!     name = "clicks_per_minute"
//!     source = "clicks"
//!     aggregates = ["count"]
//!     window = { type = "tumbling", size = "1m" }
//! "#).unwrap();
//! assert_eq!(cfg.metrics[0].name, "clicks_per_minute");
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::secret::{is_secret_key, Secret, REDACTED};

/// A config error: which key, which value, and what would have been accepted.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("config key `{key}`: {problem}")]
pub struct ConfigError {
    /// Dotted path of the offending key, e.g. `metrics[2].window.size`.
    pub key: String,
    /// What is wrong and what is allowed.
    pub problem: String,
}

impl ConfigError {
    /// Builds an error for `key`.
    pub fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError { key: key.into(), problem: problem.into() }
    }
}

/// The whole config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Connection to the Kafka cluster.
    pub kafka: KafkaConfig,
    /// Where and how state is kept.
    #[serde(default)]
    pub state: StateConfig,
    /// The HTTP query API.
    #[serde(default)]
    pub http: HttpConfig,
    /// Topics read, and how their records are decoded.
    pub sources: Vec<SourceConfig>,
    /// Global tables: compacted topics every replica keeps whole, for lookups.
    #[serde(default)]
    pub tables: Vec<TableConfig>,
    /// Aggregations kept per key and window.
    #[serde(default)]
    pub metrics: Vec<MetricConfig>,
    /// Metrics computed at query time from other metrics (e.g. conversion rates).
    #[serde(default)]
    pub derived: Vec<DerivedConfig>,
    /// Where window results are sent.
    #[serde(default)]
    pub results: ResultsConfig,
    /// How replicas find and ask each other.
    #[serde(default)]
    pub cluster: ClusterConfig,
}

/// Replicas of one application: each answers any query by asking the owners of the
/// partitions it does not own.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// A stable name for this replica (a pod name): it becomes the consumer's
    /// `group.instance.id` (static membership: a replica restarted within the session
    /// timeout gets its partitions back without a rebalance). Default: none (dynamic
    /// membership), and the replica is named after its advertised URL.
    #[serde(default)]
    pub replica: Option<String>,
    /// How long a query waits for another replica's partials before counting its partitions
    /// as missing (default `2s`).
    #[serde(default)]
    pub query_timeout: Option<String>,
    /// How long a query with `min_position` waits for the state to reach it (default `2s`).
    #[serde(default)]
    pub position_wait: Option<String>,
    /// Warm copies kept of each partition on other replicas, by following its changelog
    /// (default 0): a failover then reads only their lag, and queries are answered from a
    /// copy while the partition has no active owner.
    #[serde(default)]
    pub num_standby_replicas: u32,
    /// How far (changelog records) a standby may lag its partition's changelog and still
    /// answer queries for it (default 10000).
    #[serde(default)]
    pub max_standby_lag: Option<u64>,
}

/// The result topic: window results as JSON, keyed by (metric, key, window), for a
/// downstream sink to upsert.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ResultsConfig {
    /// Topic name (default `<application_id>-results`).
    #[serde(default)]
    pub topic: Option<String>,
}

/// Kafka connection settings. `Debug` shows the values of secret properties (passwords,
/// keys) as `[redacted]`.
#[derive(Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub bootstrap_servers: String,
    /// Consumer group id, and the prefix of every internal topic (dead letters, late records).
    pub application_id: String,
    /// Any librdkafka property, passed through untouched (e.g. `security.protocol = "SASL_SSL"`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// How long `tally run` waits for the brokers at start before it exits (e.g. `"2m"`;
    /// also `--exit-on-broker-timeout`). Unset (the default): it waits as long as it takes,
    /// up but not ready, for supervisors that would rather restart it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_on_broker_timeout: Option<String>,
}

impl std::fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let properties: BTreeMap<&str, &str> =
            self.properties.iter().map(|(k, v)| (k.as_str(), if is_secret_key(k) { REDACTED } else { v.as_str() })).collect();
        f.debug_struct("KafkaConfig")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("application_id", &self.application_id)
            .field("properties", &properties)
            .field("exit_on_broker_timeout", &self.exit_on_broker_timeout)
            .finish()
    }
}

impl KafkaConfig {
    /// `exit_on_broker_timeout` in milliseconds.
    pub fn exit_on_broker_timeout_ms(&self) -> Result<Option<u64>, ConfigError> {
        self.exit_on_broker_timeout
            .as_deref()
            .map(|v| parse_duration_ms(v).map(|ms| ms.max(0) as u64).map_err(|why| ConfigError::new("kafka.exit_on_broker_timeout", why)))
            .transpose()
    }
}

/// State store settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Directory of the sled store.
    #[serde(default = "StateConfig::default_dir")]
    pub dir: PathBuf,
    /// How often the write-back cache is flushed to disk and offsets are committed
    /// (default 100 ms, Kafka Streams' under exactly-once: answers are queryable p99 within
    /// 250 ms at 20 k events/s).
    #[serde(default = "StateConfig::default_commit_interval")]
    pub commit_interval: String,
    /// Whether every flush is also written to the compacted changelog topics, so that any
    /// replica can restore a partition it takes over (default `true`). Without it, a
    /// partition with no local state is recomputed from the source topic's beginning.
    #[serde(default = "StateConfig::default_changelog")]
    pub changelog: bool,
    /// The most bytes the write-back cache keeps (Kafka Streams' `statestore.cache.max.bytes`;
    /// default 128 MiB): past it after a flush, the cache lets its clean entries go, and they
    /// are read from the store again when next needed.
    #[serde(default = "StateConfig::default_cache_max_bytes", skip_serializing_if = "StateConfig::is_default_cache")]
    pub cache_max_bytes: u64,
    /// The free space the state directory's filesystem must keep (default 128 MiB, one full
    /// cache's flush): below it flushes wait, processing pauses and `/ready` is 503 (the
    /// `disk` fault) until there is room again, before sled ever meets a full disk — an I/O
    /// error leaves sled unable to write until it is reopened. `0` turns the check off.
    #[serde(default = "StateConfig::default_min_free_bytes", skip_serializing_if = "StateConfig::is_default_min_free")]
    pub min_free_bytes: u64,
    /// sled's page cache of the state store (default 128 MiB): the state read most stays in
    /// memory up to it.
    #[serde(default = "StateConfig::default_store_cache_bytes", skip_serializing_if = "StateConfig::is_default_store_cache")]
    pub store_cache_bytes: u64,
    /// How long the local state of a partition handed over to another replica is kept as a
    /// warm start (Kafka Streams' `state.cleanup.delay.ms`, default `10m`), then deleted.
    /// With changelogs off it is never deleted: it is the only copy.
    #[serde(default = "StateConfig::default_cleanup_delay", skip_serializing_if = "StateConfig::is_default_cleanup_delay")]
    pub cleanup_delay: String,
    /// What `tally run` does with a store written by an older tally: `auto` (default) runs
    /// the pending migrations at start; `refuse` stops with a message, for
    /// `tally migrate --config FILE` to run them.
    #[serde(default, skip_serializing_if = "MigrateMode::is_auto")]
    pub migrate: MigrateMode,
    /// During a rolling upgrade from an older tally, the store version that tally writes
    /// (only `2` is known): the changelog is written in the formats it reads, so a partition
    /// that moves back to an old replica restores whole. Remove it, and restart the replicas
    /// one at a time again, once every replica runs this version (Kafka Streams'
    /// `upgrade.from`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade_from: Option<u32>,
}

impl MigrateMode {
    fn is_auto(&self) -> bool {
        *self == MigrateMode::Auto
    }
}

/// See [`StateConfig::migrate`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrateMode {
    /// Migrate at start.
    #[default]
    Auto,
    /// Refuse to start until `tally migrate` has run.
    Refuse,
}

impl StateConfig {
    fn default_dir() -> PathBuf {
        PathBuf::from("tally-state")
    }
    fn default_commit_interval() -> String {
        "100ms".into()
    }
    fn default_changelog() -> bool {
        true
    }

    fn default_cache_max_bytes() -> u64 {
        128 << 20
    }

    /// Left out of a written config, which an older tally may read.
    fn is_default_cache(bytes: &u64) -> bool {
        *bytes == Self::default_cache_max_bytes()
    }

    fn default_min_free_bytes() -> u64 {
        128 << 20
    }

    fn is_default_min_free(bytes: &u64) -> bool {
        *bytes == Self::default_min_free_bytes()
    }

    fn default_store_cache_bytes() -> u64 {
        crate::store::CACHE_BYTES
    }

    fn is_default_store_cache(bytes: &u64) -> bool {
        *bytes == Self::default_store_cache_bytes()
    }

    fn default_cleanup_delay() -> String {
        "10m".into()
    }

    fn is_default_cleanup_delay(delay: &String) -> bool {
        *delay == Self::default_cleanup_delay()
    }
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig {
            dir: Self::default_dir(),
            commit_interval: Self::default_commit_interval(),
            changelog: Self::default_changelog(),
            cache_max_bytes: Self::default_cache_max_bytes(),
            min_free_bytes: Self::default_min_free_bytes(),
            cleanup_delay: Self::default_cleanup_delay(),
            store_cache_bytes: Self::default_store_cache_bytes(),
            migrate: MigrateMode::Auto,
            upgrade_from: None,
        }
    }
}

/// HTTP API settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Listen address; tally only ever binds where it is told (default loopback).
    #[serde(default = "HttpConfig::default_listen")]
    pub listen: String,
    /// The URL other replicas reach this one at (default `http://` and the bound listen
    /// address).
    #[serde(default)]
    pub advertised_url: Option<String>,
    /// A bearer token every request must carry (`Authorization: Bearer TOKEN`), but those to
    /// the `open` routes; replicas send it to each other too. Also `TALLY_HTTP_TOKEN`.
    /// Unset (the default): no authentication.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// Routes that need no token: any of `/health`, `/ready`, `/metrics`, `/openapi.json`
    /// and `/` (the live screen's page; its queries carry the token). Default: the probes.
    #[serde(default = "HttpConfig::default_open", skip_serializing_if = "HttpConfig::is_default_open")]
    pub open: Vec<String>,
    /// Queries answered at once (default four per core, at least 16); as many again for the
    /// partials other replicas ask for, a pool of their own so that replicas asking each
    /// other can never wait on each other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_queries: Option<usize>,
    /// Queries that may wait for a slot (default four times the slots); beyond them a query
    /// is refused at once with 503 and `Retry-After: 1`, and counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_queued_queries: Option<usize>,
}

/// The routes [`HttpConfig::open`] may name.
pub const OPENABLE: [&str; 5] = ["/health", "/ready", "/metrics", "/openapi.json", "/"];

/// The shortest bearer token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl HttpConfig {
    fn default_listen() -> String {
        "127.0.0.1:8080".into()
    }

    fn default_open() -> Vec<String> {
        vec!["/health".into(), "/ready".into()]
    }

    /// Left out of a written config, which an older tally may read (it has no `open`).
    fn is_default_open(open: &Vec<String>) -> bool {
        *open == Self::default_open()
    }

    /// Checks the token and the open routes (the token is never part of the message).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self
            .token
            .as_ref()
            .is_some_and(|t| t.expose().chars().count() < MIN_TOKEN_LEN || t.expose().chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(ConfigError::new("http.token", format!("must be at least {MIN_TOKEN_LEN} characters, without spaces or control characters")));
        }
        if let Some(r) = self.open.iter().find(|r| !OPENABLE.contains(&r.as_str())) {
            return Err(ConfigError::new("http.open", format!("`{r}` is not a route that can be left open; choose from {OPENABLE:?}")));
        }
        match (self.max_concurrent_queries, self.max_queued_queries) {
            (Some(n), _) if !(1..=MAX_QUERY_SLOTS).contains(&n) => {
                Err(ConfigError::new("http.max_concurrent_queries", format!("`{n}`: from 1 to {MAX_QUERY_SLOTS}")))
            }
            (_, Some(n)) if n > MAX_QUERY_SLOTS * 16 => {
                Err(ConfigError::new("http.max_queued_queries", format!("`{n}`: at most {}", MAX_QUERY_SLOTS * 16)))
            }
            _ => Ok(()),
        }
    }

    /// The query slots: [`HttpConfig::max_concurrent_queries`] or its default.
    pub fn query_slots(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.max_concurrent_queries.unwrap_or((4 * cores).max(16))
    }

    /// The queue for them: [`HttpConfig::max_queued_queries`] or its default.
    pub fn query_queue(&self) -> usize {
        self.max_queued_queries.unwrap_or(4 * self.query_slots())
    }
}

/// The most query slots: tokio's blocking pool holds 512 threads, and the partials pool
/// takes as many again.
pub const MAX_QUERY_SLOTS: usize = 256;

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: Self::default_listen(),
            advertised_url: None,
            token: None,
            open: Self::default_open(),
            max_concurrent_queries: None,
            max_queued_queries: None,
        }
    }
}

/// One source topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Name metrics refer to.
    pub name: String,
    /// Kafka topic.
    pub topic: String,
    /// Field aliases: `alias = "path.in.json"`. Fields not listed are read by their own name;
    /// a dotted name reads a nested field.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Where each record's event time comes from.
    pub event_time: EventTimeConfig,
    /// Watermark = highest event time seen on the partition minus this delay.
    #[serde(default = "zero_duration")]
    pub watermark_delay: String,
    /// Default grace for this source's metrics: how long after a window's end it still
    /// accepts records.
    #[serde(default = "zero_duration")]
    pub grace: String,
    /// How far a record's event time may be ahead of its Kafka timestamp; records further
    /// ahead are dead-lettered (`event_time_too_far_ahead`). Default `1d`.
    #[serde(default = "default_max_ahead")]
    pub max_ahead: String,
    /// Declared field types: `field = "int"` (`float`, `string`, `bool`, or an SQL name such
    /// as `BIGINT`, `VARCHAR`), optionally `"int not null"`. A record whose declared field
    /// holds another type, or lacks a `not null` one, is dead-lettered (`wrong_type`,
    /// `missing_field`) and never moves the watermark.
    #[serde(default)]
    pub types: BTreeMap<String, String>,
    /// A partition that has received nothing for this long (wall clock) while caught up
    /// stops holding windows open: its watermark follows the wall clock minus the watermark
    /// delay (Flink's `source.idle-timeout`). Default: never.
    #[serde(default)]
    pub idle_timeout: Option<String>,
    /// Global tables this source's records are looked up in.
    #[serde(default)]
    pub lookups: Vec<LookupConfig>,
}

fn default_max_ahead() -> String {
    "1d".into()
}

fn zero_duration() -> String {
    "0s".into()
}

/// A global table: a compacted topic (key → JSON object) that every replica materializes
/// whole, and that sources look records up in (Kafka Streams' GlobalKTable).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Name lookups and looked-up fields (`name.field`) refer to.
    pub name: String,
    /// Kafka topic; the record key is the table key, a null value deletes it.
    pub topic: String,
    /// The fields of the value kept (dotted names read nested fields), e.g. `["module_id"]`.
    pub fields: Vec<String>,
    /// Declared types of those fields, as for a source; a table record that breaks them is
    /// dead-lettered and leaves the table as it was.
    #[serde(default)]
    pub types: BTreeMap<String, String>,
    /// How long a replaced value is kept (so a record replayed after a crash joins with the
    /// value it joined with the first time); default `1d`.
    #[serde(default)]
    pub history: Option<String>,
    /// Keys whose decoded values are kept in memory for lookups (default 250000): a table
    /// looked up evenly and larger than this reads the rest from sled.
    #[serde(default)]
    pub cache_keys: Option<usize>,
}

/// A lookup of a source's records in a global table: the key is a field of the record, the
/// table's fields become `table.field` of the record.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LookupConfig {
    /// The table's name.
    pub table: String,
    /// The record's field holding the table key.
    pub key: String,
    /// A record whose key is not in the table: `skip` (metrics reading the table's fields
    /// do not count it; the others do), `null` (the fields are null) or `dead_letter` (the
    /// record goes to the dead-letter topic and counts nowhere). Default `skip`.
    #[serde(default)]
    pub missing: Missing,
}

/// What a lookup does with a record whose key is not in the table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// Metrics reading the table's fields leave the record out (an inner join).
    #[default]
    Skip,
    /// The table's fields are null (a left join).
    Null,
    /// The record is dead-lettered (`lookup_missing`).
    DeadLetter,
}

/// How the event time of a record is found.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// Field holding the time (for `string`, `epoch_seconds`, `epoch_millis`).
    #[serde(default)]
    pub field: Option<String>,
    /// `string` (default when `format` is set), `epoch_seconds`, `epoch_millis`, or `parts`.
    #[serde(default)]
    pub kind: Option<String>,
    /// strftime format for `string`, e.g. `%Y-%m-%d %H:%M:%S`.
    #[serde(default)]
    pub format: Option<String>,
    /// IANA zone of times that carry none (e.g. `Asia/Shanghai`); default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
    /// For `parts`: date/time part → field, keys among year, month, day, hour, minute, second.
    #[serde(default)]
    pub parts: BTreeMap<String, String>,
    /// For `parts` without a year field: the year to use (default: the year that puts the
    /// time closest to the record's Kafka timestamp).
    #[serde(default)]
    pub year: Option<i32>,
}

/// One metric: a filter, group-by fields, aggregates and a window.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricConfig {
    /// Name used in queries and state keys.
    pub name: String,
    /// Source name.
    pub source: String,
    /// Which records count, e.g. `record_type = 1 and product_id in (101, 102)`.
    #[serde(default)]
    pub filter: Option<String>,
    /// Group-by fields; empty means one group for everything.
    #[serde(default)]
    pub group_by: Vec<String>,
    /// Aggregates: `count`, `sum(f)`, `distinct(f)`, `distinct(f, 14)`, `latest(f)`,
    /// `top_n(f, n)`, `top_n(f, n, sum(g))`, each optionally `... as alias`.
    pub aggregates: Vec<String>,
    /// The window.
    pub window: WindowConfig,
    /// How long windows stay queryable after they end (default: grace + one window).
    #[serde(default)]
    pub retention: Option<String>,
    /// Overrides the source's grace.
    #[serde(default)]
    pub grace: Option<String>,
    /// Keep only groups for which this holds when answering, e.g. `total > 0`.
    #[serde(default)]
    pub having: Option<String>,
    /// Export the newest window's values as `tally_metric_value{metric, aggregate}` for
    /// dashboards. Only for metrics without `group_by`: keys never become labels.
    #[serde(default)]
    pub export: bool,
    /// What goes to the result topic (default: `final` for windowed metrics, `none` for a
    /// global window, which never closes).
    #[serde(default)]
    pub emit: Option<Emit>,
    /// A title for people (the live screen's panel heading; default: the name).
    #[serde(default)]
    pub title: Option<String>,
    /// A sentence saying what it counts, shown under the title.
    #[serde(default)]
    pub description: Option<String>,
    /// How the live screen draws it: `number`, `trend`, `pie`, `bar` or `table` (default:
    /// chosen from its shape).
    #[serde(default)]
    pub display: Option<DisplayHint>,
    /// Names for group keys on the screen, e.g. `{ "0" = "click", "2" = "buy" }`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The screen shows the total over this last stretch of event time (a span query, e.g.
    /// `6h`) instead of the newest window.
    #[serde(default)]
    pub display_span: Option<String>,
    /// A rebuild token: when it differs from the one the stored state was built under (none,
    /// at first), the metric's state is dropped and recomputed from the source topic's
    /// retained records, partition by partition, while the other metrics run on. Change it
    /// (e.g. to a date) to rebuild again; a metric refused for its layout is rebuilt too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<String>,
}

/// Which rows of a metric go to the result topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Emit {
    /// One row per key and window, once the window has closed (end + grace passed on every
    /// partition): its final value.
    Final,
    /// A row per key and window every time a flush changes it (windows still open too).
    Updates,
    /// Nothing.
    None,
}

/// How the live screen draws a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DisplayHint {
    /// One large number: the newest window's value.
    Number,
    /// A line over the windows kept (the screen chooses how many).
    Trend,
    /// Shares of a breakdown with few keys.
    Pie,
    /// Bars of a breakdown, largest first.
    Bar,
    /// A ranked table (top-N lists, many keys).
    Table,
}

/// A window definition as written in the config.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WindowConfig {
    /// `tumbling`, `hopping`, `cumulate` or `global`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Window length (tumbling, hopping).
    #[serde(default)]
    pub size: Option<String>,
    /// Hop (hopping).
    #[serde(default)]
    pub slide: Option<String>,
    /// Step (cumulate).
    #[serde(default)]
    pub step: Option<String>,
    /// Maximum length (cumulate).
    #[serde(default)]
    pub max: Option<String>,
    /// Zone whose midnight windows align to (matters for day-sized windows); default UTC.
    #[serde(default)]
    pub timezone: Option<String>,
}

/// A metric computed at query time from two stored ones.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DerivedConfig {
    /// Name used in queries.
    pub name: String,
    /// `numerator / denominator`, each a metric name, optionally `metric.aggregate`.
    pub ratio: RatioConfig,
    /// Export the newest window's ratio as `tally_metric_value{metric, aggregate="ratio"}`
    /// (only when the metrics divided have no `group_by`).
    #[serde(default)]
    pub export: bool,
    /// What goes to the result topic, as for a metric.
    #[serde(default)]
    pub emit: Option<Emit>,
    /// A title for people (the live screen's panel heading; default: the name).
    #[serde(default)]
    pub title: Option<String>,
    /// A sentence saying what it counts, shown under the title.
    #[serde(default)]
    pub description: Option<String>,
    /// How the live screen draws it: `number`, `trend`, `pie`, `bar` or `table` (default:
    /// chosen from its shape).
    #[serde(default)]
    pub display: Option<DisplayHint>,
    /// Names for group keys on the screen, e.g. `{ "0" = "click", "2" = "buy" }`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// The two sides of a ratio.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RatioConfig {
    /// Metric (optionally `metric.aggregate`) on top.
    pub numerator: String,
    /// Metric (optionally `metric.aggregate`) below.
    pub denominator: String,
}

/// Parses a duration such as `250ms`, `10s`, `5m`, `6h`, `1d` into milliseconds.
///
/// ```
/// assert_eq!(tally::config::parse_duration_ms("5m"), Ok(300_000));
/// assert!(tally::config::parse_duration_ms("5 parsecs").is_err());
/// ```
pub fn parse_duration_ms(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: i64 = num.parse().map_err(|_| format!("`{text}` is not a duration; write a whole number and a unit: ms, s, m, h, d (e.g. `10m`)"))?;
    let mult = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        other => return Err(format!("`{text}`: unknown unit `{other}`; allowed units: ms, s, m, h, d")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{text}` is too long"))
}

/// A duration in the largest unit that divides it (`90000` → `90s`), as a config writes it.
pub fn format_duration_ms(ms: i64) -> String {
    let units = [("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)];
    if ms == 0 {
        return "0s".into();
    }
    match units.iter().find(|(_, n)| ms % n == 0) {
        Some((u, n)) => format!("{}{u}", ms / n),
        None => format!("{ms}ms"),
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading config file {}", path.display()))?;
        Self::from_toml_str(&text).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses and validates config text. Secret values are registered before parsing (see
    /// [`crate::secret`]), and a parse error names the line and column without quoting it.
    pub fn from_toml_str(text: &str) -> anyhow::Result<Config> {
        crate::secret::register_from_config_text(text);
        let cfg: Config = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        for (k, v) in &cfg.kafka.properties {
            if is_secret_key(k) {
                crate::secret::register(v);
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything a running tally would trip over, returning the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        crate::topology::Topology::compile(self).map(|_| ())
    }
}

/// A TOML error as line, column and message — not the quoted line, which may hold a secret
/// (and the message is scrubbed of the registered ones).
fn parse_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let at = e.span().map(|span| {
        let end = (0..=span.start.min(text.len())).rev().find(|i| text.is_char_boundary(*i)).unwrap_or(0);
        let before = &text[..end];
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        format!("line {line}, column {column}: ")
    });
    anyhow::anyhow!("TOML: {}{}", at.unwrap_or_default(), crate::secret::scrub(e.message()))
}

/// Checks that names are unique, non-empty and safe to use in topic names and URLs.
pub(crate) fn check_names<'a>(section: &str, names: impl Iterator<Item = &'a str>, taken: &mut HashSet<String>) -> Result<(), ConfigError> {
    for (i, name) in names.enumerate() {
        let key = format!("{section}[{i}].name");
        if name.is_empty() || name.len() > 200 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
            return Err(ConfigError::new(key, format!("`{name}` is not a valid name; use 1 to 200 letters, digits, `_` and `-`")));
        }
        if !taken.insert(name.to_string()) {
            return Err(ConfigError::new(key, format!("`{name}` is used twice; names must be unique")));
        }
    }
    Ok(())
}
