//! Prometheus metrics. Every name starts with `tally_`; label sets are bounded (sources,
//! metrics, partitions, reasons, routes — never record values).
//!
//! Each running tally owns one [`Metrics`] with its own registry: no process-global state,
//! so several instances (tests, the demo) can live in one process.

use prometheus::{
    exponential_buckets, CounterVec, Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// The registry and every metric tally exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Records read from Kafka, by source.
    pub records_consumed: IntCounterVec,
    /// Records decoded and folded into state, by source.
    pub records_processed: IntCounterVec,
    /// Records late for a metric (its slice had closed), by metric.
    pub records_late: IntCounterVec,
    /// 1 for a metric this replica refuses (its state is of another layout, or misses records).
    pub metric_refused: IntGaugeVec,
    /// Records dropped from some windows of a metric (closed) but counted in its others.
    pub records_partly_late: IntCounterVec,
    /// 1 while a link is failing (`brokers`, `flush`; see `/ready`).
    pub fault: IntGaugeVec,
    /// Failed attempts of a link, by link.
    pub fault_attempts: IntCounterVec,
    /// Flushes that failed after the membership check, rewound to the last durable one.
    pub flush_rewinds: IntCounter,
    /// State stores found damaged at start, moved aside and rebuilt.
    pub store_rebuilds: IntCounter,
    /// Partitions handed over whose local state was deleted after `state.cleanup_delay`.
    pub partitions_cleaned: IntCounter,
    /// Bytes the write-back cache keeps after the last flush.
    pub cache_bytes: IntGauge,
    /// Owned partitions counted idle (see `idle_timeout`).
    pub partitions_idle: IntGauge,
    /// Records that could not be decoded, by source and reason.
    pub records_invalid: IntCounterVec,
    /// Records skipped because the state already held them (replays), by source.
    pub records_replayed: IntCounterVec,
    /// Records read again for metrics being rebuilt.
    pub records_rebuilt: IntCounterVec,
    /// Records written to the dead-letter or late topics, by topic kind.
    pub records_set_aside: IntCounterVec,
    /// Records that could not be set aside (producer queue full or delivery failed).
    pub set_aside_failures: IntCounter,
    /// Watermark per source partition, epoch seconds.
    pub watermark: IntGaugeVec,
    /// Wall clock minus watermark per source partition, seconds.
    pub watermark_lag: IntGaugeVec,
    /// Consumer lag per source partition, records.
    pub consumer_lag: IntGaugeVec,
    /// Source partitions owned by this replica.
    pub partitions_owned: IntGauge,
    /// Rebalance events, by kind (assign, revoke).
    pub rebalances: IntCounterVec,
    /// Kafka timestamp to processed, seconds.
    pub processing_latency: Histogram,
    /// Kafka timestamp to queryable (flushed), seconds.
    pub queryable_latency: Histogram,
    /// Duration of a state flush (write + fsync), seconds.
    pub flush_duration: Histogram,
    /// Duration of an offset commit, seconds.
    pub commit_duration: Histogram,
    /// Seconds the consumer thread spent, by activity: `poll`, `process`, `commit` and a
    /// flush's stages (`side_outputs`, `expiry`, `seal`, `changelog`, `write`, `fsync`).
    pub work_seconds: CounterVec,
    /// Records written to changelog topics (changes and positions), by source.
    pub changelog_records: IntCounterVec,
    /// Changelog records read back into the store by restores, by source.
    pub restore_records: IntCounterVec,
    /// Bytes of those records, by source.
    pub restore_bytes: IntCounterVec,
    /// Changelog records a restore skipped as not this partition's or unreadable, by source.
    pub restore_rejected: IntCounterVec,
    /// Owned partitions still being restored.
    pub partitions_restoring: IntGauge,
    /// Changelog records left to restore on this replica.
    pub restore_remaining: IntGauge,
    /// Duration of a whole restore (all partitions of one assignment), seconds.
    pub restore_duration: Histogram,
    /// Rows sent to the result topic, by metric.
    pub results_sent: IntCounterVec,
    /// Windows left out of the result topic as possibly incomplete, by metric.
    pub results_skipped: IntCounterVec,
    /// Event time up to which final rows of a source have been sent (epoch seconds).
    pub results_frontier: IntGaugeVec,
    /// Changelog records the result view has read.
    pub results_view_records: IntCounter,
    /// Aggregates written by flushes.
    pub state_writes: IntCounter,
    /// Expired aggregates deleted.
    pub state_deletes: IntCounter,
    /// Keys in the state store.
    pub state_keys: IntGauge,
    /// Bytes of the state store on disk.
    pub state_bytes: IntGauge,
    /// HTTP requests, by route and status.
    pub http_requests: IntCounterVec,
    /// Requests shed because the pool (`queries`, `partials`) and its queue were full.
    pub http_shed: IntCounterVec,
    /// Slots of the pool taken by queries running now.
    pub http_busy: IntGaugeVec,
    /// HTTP request duration, by route.
    pub http_duration: HistogramVec,
    /// Build information (value 1).
    pub build_info: IntGaugeVec,
    /// Newest window's value of each exported metric aggregate (opt-in per metric).
    pub metric_value: GaugeVec,
    /// Records whose key a lookup did not find, by source, table and what was done
    /// (`skip`, `null`, `dead_letter`).
    pub lookups_missing: IntCounterVec,
    /// Keys with a value, per global table.
    pub table_entries: IntGaugeVec,
    /// Table records applied, per table.
    pub table_records: IntCounterVec,
    /// Table records set aside (dead-lettered), per table and reason.
    pub table_invalid: IntCounterVec,
    /// How long each table's first load took, seconds (0 until done).
    pub table_load_seconds: GaugeVec,
    /// Tables whose first load is not done: the replica processes nothing until it is 0.
    pub tables_loading: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

/// 1 ms to ~30 s in steps of 1.5×: fine enough that a p99 read off the buckets is within
/// a third of the truth, not a factor of two.
fn latency_buckets() -> Vec<f64> {
    exponential_buckets(0.001, 1.5, 26).expect("valid buckets")
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| reg(&r, IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"));
        let gauge = |name: &str, help: &str, labels: &[&str]| reg(&r, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"));
        let hist =
            |name: &str, help: &str| reg(&r, Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets())).expect("valid metric"));
        let m = Metrics {
            records_consumed: counter("tally_records_consumed_total", "Records read from Kafka.", &["source"]),
            records_processed: counter("tally_records_processed_total", "Records decoded and folded into state.", &["source"]),
            metric_refused: gauge(
                "tally_metric_refused",
                "1 while a metric is refused: its stored state is of another layout than configured, or misses records (see /ready).",
                &["metric"],
            ),
            records_late: counter(
                "tally_records_late_total",
                "Records that arrived after every window holding them had closed, per metric.",
                &["metric"],
            ),
            records_partly_late: counter(
                "tally_records_partly_late_total",
                "Records counted in some windows of a metric but too late for others (already closed), per metric.",
                &["metric"],
            ),
            fault: gauge(
                "tally_fault",
                "1 while a link fails: `brokers` (unreachable), `flush` (not made durable; processing paused), `disk` (the store refused a flush).",
                &["link"],
            ),
            fault_attempts: counter("tally_fault_attempts_total", "Failed attempts, by link (`brokers`, `flush`, `disk`, `restore`).", &["link"]),
            cache_bytes: reg(
                &r,
                IntGauge::new("tally_cache_bytes", "Bytes the write-back cache keeps after the last flush (at most state.cache_max_bytes).")
                    .expect("valid metric"),
            ),
            partitions_cleaned: reg(
                &r,
                IntCounter::new(
                    "tally_state_partitions_cleaned_total",
                    "Partitions handed over to another replica whose local state was deleted after state.cleanup_delay.",
                )
                .expect("valid metric"),
            ),
            store_rebuilds: reg(
                &r,
                IntCounter::new("tally_store_rebuilds_total", "State stores found damaged at start, moved aside and rebuilt from the changelogs.")
                    .expect("valid metric"),
            ),
            flush_rewinds: reg(
                &r,
                IntCounter::new("tally_flush_rewinds_total", "Flushes that failed midway, rewound to the last durable flush and processed again.")
                    .expect("valid metric"),
            ),
            records_invalid: counter("tally_records_invalid_total", "Records that could not be decoded.", &["source", "reason"]),
            records_replayed: counter("tally_records_replayed_total", "Records skipped because the state already held them.", &["source"]),
            records_rebuilt: counter("tally_records_rebuilt_total", "Records read again for the metrics being rebuilt (see `rebuild`).", &["source"]),
            records_set_aside: counter("tally_records_set_aside_total", "Records written to the dead-letter or late-records topic.", &["topic"]),
            set_aside_failures: reg(
                &r,
                IntCounter::new("tally_set_aside_failures_total", "Records that could not be written to the dead-letter or late topic.")
                    .expect("valid metric"),
            ),
            watermark: gauge("tally_watermark_seconds", "Watermark of a source partition (epoch seconds).", &["source", "partition"]),
            watermark_lag: gauge("tally_watermark_lag_seconds", "Wall clock minus watermark of a source partition.", &["source", "partition"]),
            consumer_lag: gauge("tally_consumer_lag_records", "Records behind the partition's high watermark.", &["source", "partition"]),
            partitions_owned: reg(&r, IntGauge::new("tally_partitions_owned", "Source partitions owned by this replica.").expect("valid metric")),
            partitions_idle: reg(
                &r,
                IntGauge::new(
                    "tally_partitions_idle",
                    "Owned partitions idle past their source's idle_timeout: their watermark follows the wall clock.",
                )
                .expect("valid metric"),
            ),
            rebalances: counter("tally_rebalances_total", "Partition assignment changes.", &["kind"]),
            processing_latency: hist("tally_processing_latency_seconds", "From the record's Kafka timestamp to processed."),
            queryable_latency: hist("tally_queryable_latency_seconds", "From the record's Kafka timestamp to queryable (flushed to the store)."),
            flush_duration: hist("tally_flush_duration_seconds", "State flush: write batch and fsync."),
            commit_duration: hist("tally_commit_duration_seconds", "Offset commit to Kafka."),
            work_seconds: reg(
                &r,
                CounterVec::new(Opts::new("tally_work_seconds_total", "Seconds the consumer thread spent, by activity."), &["activity"])
                    .expect("valid metric"),
            ),
            changelog_records: counter("tally_changelog_records_total", "Records written to changelog topics (changes and positions).", &["source"]),
            restore_records: counter("tally_restore_records_total", "Changelog records restored into the state store.", &["source"]),
            restore_bytes: counter("tally_restore_bytes_total", "Bytes of changelog records restored into the state store.", &["source"]),
            restore_rejected: counter("tally_restore_rejected_total", "Changelog records skipped by a restore (foreign or unreadable).", &["source"]),
            partitions_restoring: reg(
                &r,
                IntGauge::new("tally_partitions_restoring", "Owned partitions still being restored from the changelog.").expect("valid metric"),
            ),
            restore_remaining: reg(&r, IntGauge::new("tally_restore_remaining_records", "Changelog records left to restore.").expect("valid metric")),
            restore_duration: hist("tally_restore_duration_seconds", "A restore of the partitions of one assignment, from first to last record."),
            results_sent: counter("tally_results_sent_total", "Rows sent to the result topic.", &["metric"]),
            results_skipped: counter("tally_results_skipped_total", "Window rows left out of the result topic as possibly incomplete.", &["metric"]),
            results_frontier: gauge(
                "tally_results_frontier_seconds",
                "Event time up to which final window rows have been sent (epoch seconds).",
                &["source"],
            ),
            results_view_records: reg(
                &r,
                IntCounter::new("tally_results_view_records_total", "Changelog records read into the result view.").expect("valid metric"),
            ),
            state_writes: reg(&r, IntCounter::new("tally_state_writes_total", "Aggregates written by flushes.").expect("valid metric")),
            state_deletes: reg(&r, IntCounter::new("tally_state_deletes_total", "Expired aggregates deleted.").expect("valid metric")),
            state_keys: reg(&r, IntGauge::new("tally_state_keys", "Keys in the state store.").expect("valid metric")),
            state_bytes: reg(&r, IntGauge::new("tally_state_bytes", "Bytes of the state store on disk.").expect("valid metric")),
            http_requests: counter("tally_http_requests_total", "HTTP requests.", &["route", "status"]),
            http_busy: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("tally_http_busy_slots", "Query slots of the pool taken now (see http.max_concurrent_queries)."),
                    &["pool"],
                )
                .expect("valid metric"),
            ),
            http_shed: counter("tally_http_shed_total", "Requests refused (503) because the pool's slots and queue were full.", &["pool"]),
            http_duration: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new("tally_http_request_duration_seconds", "HTTP request duration.").buckets(latency_buckets()),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            build_info: gauge("tally_build_info", "Build information.", &["version"]),
            metric_value: reg(
                &r,
                GaugeVec::new(Opts::new("tally_metric_value", "Newest window's value of an exported metric aggregate."), &["metric", "aggregate"])
                    .expect("valid metric"),
            ),
            lookups_missing: counter(
                "tally_lookups_missing_total",
                "Records whose key a table lookup did not find, by what was done with them.",
                &["source", "table", "action"],
            ),
            table_entries: gauge("tally_table_entries", "Keys with a value in a global table.", &["table"]),
            table_records: counter("tally_table_records_total", "Records of a global table's topic applied.", &["table"]),
            table_invalid: counter("tally_table_invalid_total", "Records of a global table's topic dead-lettered.", &["table", "reason"]),
            table_load_seconds: reg(
                &r,
                GaugeVec::new(Opts::new("tally_table_load_seconds", "Duration of a global table's first load (0 until done)."), &["table"])
                    .expect("valid metric"),
            ),
            tables_loading: reg(
                &r,
                IntGauge::new("tally_tables_loading", "Global tables still loading; nothing is processed until none is.").expect("valid metric"),
            ),
            registry: r,
        };
        m.build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        m
    }

    /// Creates the per-source series at zero, so that dashboards and alerts see a 0 rather
    /// than no data before the first event of each kind (a restore may never happen).
    pub fn init_sources<'a>(&self, sources: impl IntoIterator<Item = &'a str>) {
        for s in sources {
            for c in [
                &self.records_consumed,
                &self.records_processed,
                &self.records_replayed,
                &self.records_rebuilt,
                &self.changelog_records,
                &self.restore_records,
                &self.restore_bytes,
                &self.restore_rejected,
            ] {
                c.with_label_values(&[s]);
            }
        }
    }

    /// Creates the series of each table at zero (see [`Metrics::init_sources`]).
    pub fn init_tables<'a>(&self, tables: impl IntoIterator<Item = &'a str>) {
        for t in tables {
            self.table_entries.with_label_values(&[t]);
            self.table_records.with_label_values(&[t]);
            self.table_load_seconds.with_label_values(&[t]);
        }
    }

    /// Creates the late and partly-late series of each metric at zero (see
    /// [`Metrics::init_sources`]).
    pub fn init_metrics<'a>(&self, metrics: impl IntoIterator<Item = &'a str>) {
        for m in metrics {
            self.records_late.with_label_values(&[m]);
            self.records_partly_late.with_label_values(&[m]);
            self.metric_refused.with_label_values(&[m]);
        }
    }

    /// Creates the result-topic series of each emitting metric at zero (see
    /// [`Metrics::init_sources`]).
    pub fn init_results<'a>(&self, metrics: impl IntoIterator<Item = &'a str>) {
        for m in metrics {
            self.results_sent.with_label_values(&[m]);
            self.results_skipped.with_label_values(&[m]);
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
