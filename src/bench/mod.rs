//! `tally bench`: S1 events through librdkafka's mock cluster into tally, reporting
//! throughput (with and without the changelog and the result topic), produce-to-queryable latency, restore
//! speed, failover time, peak RSS and state size.
//!
//! Phases:
//! 1. **Throughput**: the topic is pre-filled, then tally drains it three times: without the
//!    changelog, with it but no result topic, with both (separate consumer groups); events/s
//!    is counted from the first
//!    consumed record to the last. The mock keeps at most ~5 MiB per partition and silently
//!    drops older data, so the event count is capped per partition.
//! 2. **Latency**: events are produced at a fixed rate, stamped with the wall clock, while
//!    tally consumes; p50/p99 come from tally's own `tally_queryable_latency_seconds`
//!    histogram (the observations of this phase only).
//! 3. **Queries** (`bench/queries.rs`): point, span and top queries asked of that replica,
//!    closed and open loop, while events flow in at the latency phase's rate.
//! 4. **Restore**: a changelog of synthetic count aggregates is read into an empty store.
//! 5. **Failover**: two replica processes; one is SIGKILLed (then, again, SIGTERMed) and
//!    the time until the other answers for every partition is measured.
//!
//! Every figure is read from tally's `/metrics` over HTTP, as an operator would.
//! `--cluster` runs the cluster phases of `bench/cluster.rs` instead: queries through one
//! replica of three, failover with a standby, availability under repeated SIGKILLs;
//! `--tables` the table phases of `bench/tables.rs`: S3's table loaded, its lookup's cost.

mod cluster;
mod external;
mod load;
mod migrate;
mod queries;
mod tables;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::mocking::MockCluster;

use crate::config::Config;
use crate::gen::{self, GenOptions, Scenario};
use crate::kafka::feed::Feed;

/// Records per partition the mock cluster keeps safely (~130-byte S1 records, 5 MiB).
const MOCK_RECORDS_PER_PARTITION: usize = 30_000;

/// Benchmark settings.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Events for the throughput phase (capped by what the mock retains).
    #[arg(long, default_value_t = 1_000_000)]
    pub events: usize,
    /// Source partitions.
    #[arg(long, default_value_t = 40)]
    pub partitions: i32,
    /// Events per second in the latency phase.
    #[arg(long, default_value_t = 20_000)]
    pub latency_rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    pub latency_seconds: u64,
    /// Event-time milliseconds between consecutive events of the throughput phase.
    #[arg(long, default_value_t = 1)]
    pub step_ms: i64,
    /// Distinct users of the generated S1 events (products and the rest scale with it).
    #[arg(long, default_value_t = 5_000)]
    pub users: u64,
    /// Changelog records in the restore phase.
    #[arg(long, default_value_t = 1_000_000)]
    pub restore_records: usize,
    /// Run the drain, latency and restore phases against this broker (loopback) instead of
    /// the mock cluster, with tally as a child process: its peak RSS is then tally's alone.
    #[arg(long)]
    pub brokers: Option<String>,
    /// Run the failover phase against this broker (loopback) instead of the mock cluster,
    /// whose group coordinator waits session timeout − 1 s before every rebalance.
    #[arg(long)]
    pub failover_brokers: Option<String>,
    /// Run the cluster phases instead: queries through one replica of three, failover with a
    /// standby, availability under repeated SIGKILLs.
    #[arg(long)]
    pub cluster: bool,
    /// Cluster phases: source partitions.
    #[arg(long, default_value_t = 12)]
    pub cluster_partitions: i32,
    /// Cluster phases: events produced before the replicas start.
    #[arg(long, default_value_t = 100_000)]
    pub cluster_events: usize,
    /// Query phases (one replica; the cluster's): queries per second offered, per query kind.
    #[arg(long, default_value_t = 5_000)]
    pub qps: u64,
    /// Query phases: seconds per query kind and loop.
    #[arg(long, default_value_t = 5)]
    pub query_seconds: u64,
    /// Cluster phases: seconds watched after the SIGKILL of the failover phase.
    #[arg(long, default_value_t = 30)]
    pub failover_window: u64,
    /// Cluster phases: seconds of the availability phase.
    #[arg(long, default_value_t = 60)]
    pub availability_seconds: u64,
    /// Cluster phases: a replica is SIGKILLed this often (seconds) in the availability phase.
    #[arg(long, default_value_t = 5)]
    pub kill_every: u64,
    /// Cluster phases: only the availability phase.
    #[arg(long)]
    pub availability_only: bool,
    /// `state.commit_interval` of the drain, latency and core phases (default: tally's),
    /// e.g. `100ms`: how often the state is flushed and answers become queryable.
    #[arg(long)]
    pub commit_interval: Option<String>,
    /// Cluster phases: keep the replicas' configs, logs and state (the directory is printed).
    #[arg(long)]
    pub keep: bool,
    /// Run the table phases instead: S3's global table loaded, and the cost of its lookup.
    #[arg(long)]
    pub tables: bool,
    /// Table phases: entries of the table loaded (its lookup cost is measured on a table
    /// this big too; `--events` gift events).
    #[arg(long, default_value_t = 1_000_000)]
    pub table_entries: u64,
    /// Run the migration phase instead: a store of the previous version with this many
    /// state keys (S1's metrics), migrated to the current one.
    #[arg(long)]
    pub migrate: Option<u64>,
    /// A short run (about a minute): 200 k events, a 5 s latency phase, 2 s per query loop,
    /// 200 k synthetic restore records and no failover phase. Its figures are noisier than a full run's.
    #[arg(long)]
    pub quick: bool,
    /// Only the processing core (tasks and sled, no Kafka) on `--events` events: the phase
    /// to profile (perf, callgrind).
    #[arg(long)]
    pub core_only: bool,
    /// Only the synthetic restore phase (`--restore-records` records through the mock).
    #[arg(long)]
    pub restore_only: bool,
    /// Each run's figures are appended here as one JSON line (with the time, the version
    /// and the git commit when run in a checkout), to compare runs across commits.
    #[arg(long, default_value = "bench-results.jsonl")]
    pub results: std::path::PathBuf,
}

impl BenchOptions {
    /// The options a `--quick` run uses in place of the defaults.
    fn quickened(mut self) -> BenchOptions {
        if self.quick {
            self.events = self.events.min(200_000);
            self.latency_seconds = self.latency_seconds.min(5);
            self.restore_records = self.restore_records.min(200_000);
            self.query_seconds = self.query_seconds.min(2);
        }
        self
    }
}

/// GET over loopback: (status, body).
fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("GET {path}: no HTTP response"))?;
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow::anyhow!("GET {path}: bad status line"))?;
    Ok((status, body.to_string()))
}

/// Whether `addr` answers `views` for every partition (`Some(false)`: it answers, not fully).
fn complete(addr: SocketAddr) -> Option<bool> {
    sample(addr).map(|r| r.is_ok())
}

/// One answer of `views` from `addr`: `Ok` when complete, else the reasons partitions were
/// missing (`None`: no answer at all).
fn sample(addr: SocketAddr) -> Option<Result<(), Vec<String>>> {
    let (status, body) = http_get(addr, "/api/v1/metrics/views?limit=1").ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    if status == 200 && v["coverage"]["complete"] == true {
        return Some(Ok(()));
    }
    let reasons = v["missing"].as_array().map(|m| m.iter().filter_map(|x| x["reason"].as_str().map(String::from)).collect()).unwrap_or_default();
    Some(Err(reasons))
}

fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    Ok(http_get(addr, "/metrics")?.1)
}

/// Sum of a metric's samples whose line starts with `prefix` (name plus optional labels).
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with([' ', '{', ',']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Cumulative buckets `le → count` of a histogram.
fn buckets(text: &str, name: &str) -> BTreeMap<u64, f64> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, tail) = rest.split_once('"')?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some(((le * 1e6).min(u64::MAX as f64) as u64, tail.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile (seconds) of the difference between two histogram snapshots,
/// interpolated linearly inside the bucket (Prometheus' `histogram_quantile`).
fn quantile(before: &BTreeMap<u64, f64>, after: &BTreeMap<u64, f64>, q: f64) -> Option<f64> {
    let diff: Vec<(f64, f64)> = after.iter().map(|(le, c)| (*le as f64 / 1e6, c - before.get(le).copied().unwrap_or(0.0))).collect();
    let total = diff.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in &diff {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let frac = if c > prev.1 { (rank - prev.1) / (c - prev.1) } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    None
}

/// Seconds the consumer thread spent by activity between two scrapes, with each one's
/// share of `wall` seconds: the breakdown of a drain, from `tally_work_seconds_total`.
fn breakdown(before: &str, after: &str, wall: f64) -> Vec<(String, f64)> {
    let prefix = "tally_work_seconds_total{activity=\"";
    let mut out: Vec<(String, f64)> = after
        .lines()
        .filter_map(|l| {
            let (activity, _) = l.strip_prefix(prefix)?.split_once('"')?;
            let label = format!("{prefix}{activity}\"}}");
            Some((activity.to_string(), (sum(after, &label) - sum(before, &label)) / wall.max(1e-9)))
        })
        .collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1));
    out
}

/// A breakdown as one line: `activity share %`, largest first.
fn shares(parts: &[(String, f64)]) -> String {
    parts.iter().map(|(a, f)| format!("{a} {:.0} %", f * 100.0)).collect::<Vec<_>>().join(", ")
}

/// A quantile in milliseconds, as printed.
fn ms(q: Option<f64>) -> String {
    q.map_or("n/a".to_string(), |s| format!("{:.0} ms", s * 1000.0))
}

/// A quantile in milliseconds, as recorded (to the microsecond).
fn ms_of(q: Option<f64>) -> Option<f64> {
    q.map(|s| (s * 1e6).round() / 1e3)
}

/// The flushes of a drain and where its time went.
struct DrainReport {
    flushes: BTreeMap<u64, f64>,
    count: f64,
    share: f64,
    parts: Vec<(String, f64)>,
}

impl DrainReport {
    fn of(d: &Drain) -> DrainReport {
        DrainReport {
            flushes: buckets(&d.text, "tally_flush_duration_seconds"),
            count: sum(&d.text, "tally_flush_duration_seconds_count"),
            share: sum(&d.text, "tally_flush_duration_seconds_sum") / d.secs,
            parts: breakdown(&d.first_text, &d.text, d.secs),
        }
    }

    fn print(&self) {
        println!(
            "flushes              {} taking {:.0} % of the drain; p50 {} p99 {} (commit, side outputs, changelog acked, state written and fsynced)",
            self.count,
            self.share * 100.0,
            ms(quantile(&BTreeMap::new(), &self.flushes, 0.5)),
            ms(quantile(&BTreeMap::new(), &self.flushes, 0.99))
        );
        println!("  where the time went {} (consumer thread, share of the drain)", shares(&self.parts));
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "flush_ms": {"p50": ms_of(quantile(&BTreeMap::new(), &self.flushes, 0.5)), "p99": ms_of(quantile(&BTreeMap::new(), &self.flushes, 0.99))},
            "breakdown": self.parts.iter().cloned().collect::<BTreeMap<_, _>>(),
        })
    }
}

/// The latency phase: events produced at a fixed rate with wall-clock times while tally at
/// `addr` consumes; its figures are the differences of tally's histograms over the phase.
struct Latency {
    before: String,
    after: String,
    secs: f64,
    rate: u64,
    seconds: u64,
}

impl Latency {
    fn measure(addr: SocketAddr, feed: &Feed, opts: &BenchOptions) -> anyhow::Result<Latency> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
        let live_opts = GenOptions { start_ms: now, step_ms: 1, partitions: opts.partitions, ..gen_options(opts) };
        let mut live = gen::live(Scenario::S1, &live_opts);
        let consumed_start = sum(&scrape(addr)?, "tally_records_consumed_total");
        // Two seconds not counted: the first flush with wall-clock times expires every window
        // of the drain before (tens of thousands of deletions and tombstones), a one-off that
        // is not the steady state this phase measures.
        let warm_up = feed.send_all(live.by_ref().take(2 * opts.latency_rate as usize), opts.latency_rate, || false)?;
        feed.flush()?;
        wait_for(addr, "tally_records_consumed_total", consumed_start + warm_up as f64, Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_millis(500));
        let before = scrape(addr)?;
        let consumed_before = sum(&before, "tally_records_consumed_total");
        let n = opts.latency_rate * opts.latency_seconds;
        let start = Instant::now();
        let sent = feed.send_all(live.take(n as usize), opts.latency_rate, || false)?;
        feed.flush()?;
        wait_for(addr, "tally_records_consumed_total", consumed_before + sent as f64, Duration::from_secs(120))?;
        std::thread::sleep(Duration::from_millis(500));
        let after = scrape(addr)?;
        Ok(Latency { before, after, secs: start.elapsed().as_secs_f64(), rate: opts.latency_rate, seconds: opts.latency_seconds })
    }

    /// The `q` quantile of histogram `name` over the phase, seconds.
    fn q(&self, name: &str, q: f64) -> Option<f64> {
        quantile(&buckets(&self.before, name), &buckets(&self.after, name), q)
    }

    fn print(&self) {
        let (queryable, processed) = ("tally_queryable_latency_seconds", "tally_processing_latency_seconds");
        println!(
            "produce->queryable   p50 {}  p99 {}  (at {} events/s for {} s)",
            ms(self.q(queryable, 0.5)),
            ms(self.q(queryable, 0.99)),
            self.rate,
            self.seconds
        );
        println!(
            "  of which           produce->processed p50 {} p99 {} (the rest waits for the next flush to be durable)",
            ms(self.q(processed, 0.5)),
            ms(self.q(processed, 0.99))
        );
        println!(
            "  meanwhile          flushes p50 {} p99 {}; commits p50 {} p99 {}",
            ms(self.q("tally_flush_duration_seconds", 0.5)),
            ms(self.q("tally_flush_duration_seconds", 0.99)),
            ms(self.q("tally_commit_duration_seconds", 0.5)),
            ms(self.q("tally_commit_duration_seconds", 0.99))
        );
        println!("  where the time went {} (consumer thread, share of the phase)", shares(&breakdown(&self.before, &self.after, self.secs)));
    }

    fn json(&self) -> serde_json::Value {
        let pair = |name: &str| serde_json::json!({"p50": ms_of(self.q(name, 0.5)), "p99": ms_of(self.q(name, 0.99))});
        serde_json::json!({
            "rate": self.rate,
            "produce_to_queryable_ms": pair("tally_queryable_latency_seconds"),
            "produce_to_processed_ms": pair("tally_processing_latency_seconds"),
            "flush_ms": pair("tally_flush_duration_seconds"),
            "breakdown": breakdown(&self.before, &self.after, self.secs).into_iter().collect::<BTreeMap<_, _>>(),
        })
    }
}

/// The generator's S1 options for the bench: `--users` distinct users.
fn gen_options(opts: &BenchOptions) -> GenOptions {
    GenOptions { cardinality: opts.users, ..GenOptions::for_scenario(Scenario::S1) }
}

fn dir_bytes(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The peak resident set (`VmHWM`, KiB) of process `pid` (`self`: this one).
fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

fn wait_for(addr: SocketAddr, what: &str, target: f64, limit: Duration) -> anyhow::Result<(String, Instant)> {
    let start = Instant::now();
    loop {
        // A connection the starting server accepted as it handed over to the full one is
        // closed unanswered: a probe then asks again.
        let text = match scrape(addr) {
            Ok(text) => text,
            Err(_) if start.elapsed() < limit => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            Err(e) => return Err(e),
        };
        if sum(&text, what) >= target {
            return Ok((text, Instant::now()));
        }
        if start.elapsed() > limit {
            anyhow::bail!("{what} did not reach {target} within {limit:?} (at {})", sum(&text, what));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The processing core alone: the same events through a [`TaskSet`] on sled, no Kafka.
fn core_only(records: &[crate::gen::GenRecord], cfg: &Config) -> anyhow::Result<(f64, usize, Duration)> {
    let dir = tempfile::Builder::new().prefix("tally-bench-core-").tempdir()?;
    let topo = std::sync::Arc::new(crate::topology::Topology::compile(cfg)?);
    let tasks = crate::task::TaskSet::new(topo, crate::store::Store::open(dir.path())?);
    let payloads: Vec<(i32, Vec<u8>)> = records.iter().map(|r| (r.partition, r.payload.clone())).collect();
    core_run(tasks, 0, &payloads)
}

/// `payloads` (partition, bytes) of `source` through `tasks`, flushing every commit interval:
/// (events/s, aggregate writes, time in flushes).
fn core_run(mut tasks: crate::task::TaskSet, source: usize, payloads: &[(i32, Vec<u8>)]) -> anyhow::Result<(f64, usize, Duration)> {
    let topo = std::sync::Arc::clone(tasks.topology());
    for p in 0..payloads.iter().map(|r| r.0 + 1).max().unwrap_or(0) {
        tasks.assign(source, p)?;
    }
    let mut offsets = vec![0i64; 1024];
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let (mut puts, mut flushing, mut cache, mut let_go) = (0, Duration::ZERO, 0, 0);
    let mut flush = |tasks: &mut crate::task::TaskSet| -> anyhow::Result<()> {
        let t = Instant::now();
        let stats = tasks.flush(None)?;
        puts += stats.puts;
        cache = cache.max(stats.cache_bytes);
        let_go += usize::from(stats.cache_bytes == 0 && stats.puts > 0);
        flushing += t.elapsed();
        Ok(())
    };
    for (partition, payload) in payloads {
        let o = &mut offsets[*partition as usize];
        tasks.process(source, *partition, *o, None, payload)?;
        *o += 1;
        if last_flush.elapsed() >= Duration::from_millis(topo.commit_interval_ms) {
            flush(&mut tasks)?;
            last_flush = Instant::now();
        }
    }
    flush(&mut tasks)?;
    println!(
        "  the core's cache    up to {:.1} MiB after a flush; let go {let_go} times (budget {} MiB)",
        cache as f64 / 1048576.0,
        topo.cache_max_bytes >> 20
    );
    Ok((payloads.len() as f64 / start.elapsed().as_secs_f64(), puts, flushing))
}

/// The Kafka side alone: a bare librdkafka consumer reading the pre-filled topic with
/// tally's consumer settings, doing nothing with the records. The ceiling the mock broker
/// and client put on any consumer here.
fn consume_only(cfg: &Config, topic: &str, partitions: i32, events: usize) -> anyhow::Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer =
        crate::kafka::client_config(&cfg.kafka, &[("group.id", "tally-bench-raw"), ("enable.auto.commit", "false"), ("fetch.wait.max.ms", "100")])
            .create()?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)?;
    }
    c.assign(&tpl)?;
    let (mut n, mut start) = (0usize, None);
    let deadline = Instant::now() + Duration::from_secs(300);
    while n < events && Instant::now() < deadline {
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            start.get_or_insert_with(Instant::now);
            n += 1;
        }
    }
    Ok(n as f64 / start.map_or(1.0, |s| s.elapsed().as_secs_f64()))
}

/// tally running in this process on its own runtime.
struct InProcess {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    fn start(cfg: Config) -> anyhow::Result<InProcess> {
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(crate::app::run(
                cfg,
                async {
                    let _ = stop_rx.await;
                },
                move |a| {
                    let _ = addr_tx.send(a);
                },
            ))
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(30))?;
        Ok(InProcess { addr, stop, thread })
    }

    fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.thread.join().map_err(|_| anyhow::anyhow!("tally panicked"))?
    }
}

/// What draining the pre-filled topic measured.
struct Drain {
    events_per_s: f64,
    secs: f64,
    /// Metrics when its first record was consumed, and when its last was.
    first_text: String,
    text: String,
}

/// Waits until tally at `addr` has consumed `events`, timing from its first record.
fn drain(addr: SocketAddr, events: usize) -> anyhow::Result<Drain> {
    let (first_text, first) = wait_for(addr, "tally_records_consumed_total", 1.0, Duration::from_secs(60))?;
    let (text, last) = wait_for(addr, "tally_records_consumed_total", events as f64, Duration::from_secs(600))?;
    // Counters are published per flush: the drain ends within one commit interval of `last`.
    let secs = last.duration_since(first).as_secs_f64().max(1e-3);
    Ok(Drain { events_per_s: events as f64 / secs, secs, first_text, text })
}

/// Creates the internal topics of `cfg` on the mock (its source topic exists already).
fn create_internal(mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>, cfg: &Config, partitions: i32) -> anyhow::Result<()> {
    for t in crate::topology::Topology::compile(cfg)?.internal_topics() {
        let parts = if t.kind.partitions_like().is_some() { partitions } else { 1 };
        mock.create_topic(&t.name, parts, 1).map_err(|e| anyhow::anyhow!("creating {}: {e}", t.name))?;
    }
    Ok(())
}

/// A config of the bench's S1 app on `brokers`, as application `app`.
fn bench_config(brokers: &str, app: &str, state: &Path) -> anyhow::Result<Config> {
    let mut cfg = Config::from_toml_str(crate::demo::S1_CONFIG)?;
    cfg.kafka.bootstrap_servers = brokers.to_string();
    cfg.kafka.application_id = app.to_string();
    cfg.state.dir = state.to_path_buf();
    cfg.http.listen = "127.0.0.1:0".into();
    cfg.results.topic = None;
    Ok(cfg)
}

impl BenchOptions {
    /// `cfg` with the settings these options override.
    fn tune(&self, mut cfg: Config) -> Config {
        if let Some(interval) = &self.commit_interval {
            cfg.state.commit_interval = interval.clone();
        }
        cfg
    }
}

/// `cfg` with nothing sent to the result topic.
fn without_results(mut cfg: Config) -> Config {
    let none = Some(crate::config::Emit::None);
    cfg.metrics.iter_mut().for_each(|m| m.emit = none);
    cfg.derived.iter_mut().for_each(|d| d.emit = none);
    cfg
}

/// Reads the whole changelog of `cfg`'s application into an empty store through the restore
/// path replicas use, and times it.
fn time_restore(cfg: &Config, partitions: i32) -> anyhow::Result<Restored> {
    let dir = tempfile::Builder::new().prefix("tally-bench-restore-").tempdir()?;
    let topo = crate::topology::Topology::compile(cfg)?;
    let store = crate::store::Store::open(dir.path())?;
    let parts: Vec<(usize, i32)> = (0..partitions).map(|p| (0, p)).collect();
    let started = Instant::now();
    let stats = crate::kafka::state_updater::restore_all(&cfg.kafka, std::sync::Arc::new(topo), store, &parts, crate::metrics::Metrics::new())?;
    Ok(Restored { secs: started.elapsed().as_secs_f64(), stats })
}

/// What a timed restore read.
struct Restored {
    secs: f64,
    stats: crate::changelog::RestoreStats,
}

impl std::fmt::Display for Restored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = &self.stats;
        write!(
            f,
            "{:.0} changelog records/s, {:.1} MB/s ({} records, {} distinct keys, {:.1} MB in {:.2} s)",
            s.records as f64 / self.secs,
            s.bytes as f64 / self.secs / 1e6,
            s.records,
            s.keys_written,
            s.bytes as f64 / 1e6,
            self.secs
        )
    }
}

/// A synthetic changelog for the restore phase: `n` records of count aggregates, five
/// versions of each key as five flushes would write them, spread over the partitions.
fn synthetic_changelog(mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>, n: usize, partitions: i32) -> anyhow::Result<Config> {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let cfg = bench_config(&mock.bootstrap_servers(), "tally-bench-restore", Path::new("unused"))?;
    let topo = crate::topology::Topology::compile(&cfg)?;
    let topic = topo.changelog_topic(0);
    create_internal(mock, &cfg, partitions)?;
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        crate::kafka::client_config(&cfg.kafka, &[("linger.ms", "20"), ("queue.buffering.max.messages", "2000000"), ("compression.type", "lz4")])
            .create()?;
    let metric = &topo.metrics[topo.sources[0].metrics[0]];
    let keys = (n / 5).max(1);
    for i in 0..n {
        let k = i % keys;
        let p = (k % partitions as usize) as i32;
        let mut key = Vec::new();
        crate::store::state_key_prefix(&mut key, &metric.name, p, (k / partitions as usize) as i64 * 60_000, crate::store::EVERY_WINDOW);
        key.extend_from_slice(format!("product-{}", k % 1000).as_bytes());
        let states = metric.aggregates.iter().map(|a| crate::aggregate::AggState::new(&a.kind)).collect();
        let value = metric.layout.seal(&crate::store::StoredAggregate { max_offset: i as i64, states });
        while producer.send(BaseRecord::to(&topic).partition(p).key(&key).payload(&value)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(cfg)
}

/// A `tally run` child process of this binary.
struct Child {
    process: std::process::Child,
    addr: SocketAddr,
}

impl Child {
    fn start(cfg: &Config, dir: &Path, name: &str) -> anyhow::Result<Child> {
        let mut cfg = cfg.clone();
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        cfg.http.listen = format!("127.0.0.1:{port}");
        Self::spawn(cfg, dir, name)
    }

    /// A replica named `name` (static membership), on the same port and state across restarts.
    fn start_named(cfg: &Config, dir: &Path, name: &str) -> anyhow::Result<Child> {
        let mut cfg = cfg.clone();
        let port_file = dir.join(format!("{name}.port"));
        let port = match std::fs::read_to_string(&port_file).ok().and_then(|p| p.trim().parse::<u16>().ok()) {
            Some(p) => p,
            None => {
                let p = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
                std::fs::write(&port_file, p.to_string())?;
                p
            }
        };
        cfg.http.listen = format!("127.0.0.1:{port}");
        cfg.cluster.replica = Some(name.to_string());
        Self::spawn(cfg, dir, name)
    }

    fn spawn(mut cfg: Config, dir: &Path, name: &str) -> anyhow::Result<Child> {
        cfg.state.dir = dir.join(name);
        let file = dir.join(format!("{name}.toml"));
        std::fs::write(&file, toml::to_string(&cfg)?)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join(format!("{name}.log")))?;
        let process = std::process::Command::new(std::env::current_exe()?)
            .args(["run", "--config"])
            .arg(&file)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()?;
        Ok(Child { process, addr: cfg.http.listen.parse()? })
    }

    /// Waits until it answers HTTP at all (`/health`).
    fn wait_listening(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        while http_get(self.addr, "/health").is_err() {
            anyhow::ensure!(start.elapsed() < limit, "tally did not answer HTTP at {} within {limit:?}", self.addr);
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Partitions this replica owns right now (`None`: no answer).
    fn owned(&self) -> Option<usize> {
        let (_, body) = http_get(self.addr, "/ready").ok()?;
        serde_json::from_str::<serde_json::Value>(&body).ok()?["partitions"].as_u64().map(|n| n as usize)
    }

    /// Whether it answers for every partition (itself, or asking the others).
    fn complete(&self) -> bool {
        complete(self.addr) == Some(true)
    }

    fn signal(&mut self, sig: &str) -> anyhow::Result<()> {
        std::process::Command::new("kill").args([sig, &self.process.id().to_string()]).status()?;
        self.process.wait()?;
        Ok(())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// Waits until `replica` owns all `partitions` and answers for them; returns when it did.
fn wait_answering(replica: &Child, partitions: usize, limit: Duration) -> anyhow::Result<Instant> {
    let start = Instant::now();
    loop {
        if replica.owned() == Some(partitions) && replica.complete() {
            return Ok(Instant::now());
        }
        if start.elapsed() > limit {
            anyhow::bail!("the surviving replica did not answer for all {partitions} partitions within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Failover: two replicas as processes of this binary on the mock cluster (tally's default
/// session timeout and heartbeats); one is stopped, and the time until the other answers
/// queries for every partition is measured. Returns (after SIGKILL, after SIGTERM).
fn failover(
    mock: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
    external: Option<&str>,
    partitions: i32,
) -> anyhow::Result<(Duration, Duration)> {
    let dir = tempfile::Builder::new().prefix("tally-bench-failover-").tempdir()?;
    let dir = dir.path();
    let cfg = match external {
        None => {
            let cfg = bench_config(&mock.bootstrap_servers(), "tally-bench-failover", dir)?;
            create_internal(mock, &cfg, partitions)?;
            cfg
        }
        Some(brokers) => {
            // A real broker: tally creates its internal topics; the source topic is ours.
            let cfg = bench_config(brokers, "tally-bench-failover", dir)?;
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(crate::kafka::topics::ensure_source(&cfg.kafka, gen::topic(Scenario::S1), partitions))?;
            cfg
        }
    };
    let a = Child::start(&cfg, dir, "a")?;
    wait_answering(&a, partitions as usize, Duration::from_secs(300))?;
    let mut times = Vec::new();
    for sig in ["-KILL", "-TERM"] {
        let mut b = Child::start(&cfg, dir, "b")?;
        // Until the rebalance has given b its share.
        let start = Instant::now();
        while !(b.owned().is_some_and(|n| n > 0) && a.owned().is_some_and(|n| n < partitions as usize)) {
            anyhow::ensure!(start.elapsed() < Duration::from_secs(120), "the second replica never got partitions");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(2));
        let stopped = Instant::now();
        b.signal(sig)?;
        let answering = wait_answering(&a, partitions as usize, Duration::from_secs(120))?;
        times.push(answering.duration_since(stopped));
    }
    Ok((times[0], times[1]))
}

/// Runs the benchmark and prints its figures.
pub fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let opts = opts.quickened();
    if opts.cluster {
        return cluster::run(&opts);
    }
    if opts.tables {
        return tables::run(&opts);
    }
    if let Some(keys) = opts.migrate {
        return migrate::run(keys, opts.partitions);
    }
    if let Some(brokers) = &opts.brokers {
        return external::run(&opts, brokers);
    }
    let mock = MockCluster::new(1).map_err(|e| anyhow::anyhow!("starting the mock cluster: {e}"))?;
    if opts.restore_only {
        let synthetic = time_restore(&synthetic_changelog(&mock, opts.restore_records, opts.partitions)?, opts.partitions)?;
        println!("restore synthetic    {synthetic} into an empty store: count aggregates, 5 versions per key");
        return Ok(());
    }
    let topic = gen::topic(Scenario::S1);
    let brokers = mock.bootstrap_servers();
    let state = tempfile::Builder::new().prefix("tally-bench-").tempdir()?;
    let cfg = opts.tune(bench_config(&brokers, "tally-bench", &state.path().join("on"))?);
    let cfg_no_results = without_results(opts.tune(bench_config(&brokers, "tally-bench-noresults", &state.path().join("noresults"))?));
    let mut cfg_off = without_results(opts.tune(bench_config(&brokers, "tally-bench-nolog", &state.path().join("off"))?));
    cfg_off.state.changelog = false;
    crate::kafka::topics::create_on_mock(&mock, &crate::topology::Topology::compile(&cfg)?, opts.partitions)?;
    create_internal(&mock, &cfg_off, opts.partitions)?;
    create_internal(&mock, &cfg_no_results, opts.partitions)?;

    let events = opts.events.min(MOCK_RECORDS_PER_PARTITION * opts.partitions.max(1) as usize);
    if events < opts.events {
        eprintln!("capping the throughput phase at {events} events: the mock keeps ~{MOCK_RECORDS_PER_PARTITION} S1 records per partition");
    }
    // Event time advances 1 ms per event (1,000 events per second of event time), denser
    // than the tests' 100 ms: at production rates an event-time second holds far more.
    let gen_opts = GenOptions { count: events, partitions: opts.partitions, step_ms: opts.step_ms, ..gen_options(&opts) };
    let records = gen::generate(Scenario::S1, &gen_opts);
    let (core, core_puts, core_flushing) = core_only(&records, &cfg)?;
    if opts.core_only {
        println!(
            "core alone           {core:.0} events/s ({events} S1 events, {core_puts} aggregate writes, {:.2} s in flushes)",
            core_flushing.as_secs_f64()
        );
        return Ok(());
    }
    let feed = Feed::new(&cfg.kafka, topic)?;
    let produce_start = Instant::now();
    feed.send_all(records, 0, || false)?;
    feed.flush()?;
    eprintln!("pre-filled {events} events in {:.1} s", produce_start.elapsed().as_secs_f64());
    let raw = consume_only(&cfg, topic, opts.partitions, events)?;

    // Phase 1: throughput without the changelog, with it but no results, with both (each
    // its own consumer group).
    let off = InProcess::start(cfg_off)?;
    let without = drain(off.addr, events)?;
    off.stop()?;
    let no_results = InProcess::start(cfg_no_results)?;
    let without_rows = drain(no_results.addr, events)?;
    no_results.stop()?;
    let tally = InProcess::start(cfg)?;
    let with = drain(tally.addr, events)?;
    let text = &with.text;
    let invalid = sum(text, "tally_records_invalid_total");
    let late = sum(text, "tally_records_late_total");
    let changelog_records = sum(text, "tally_changelog_records_total");
    let rows_sent = sum(text, "tally_results_sent_total");
    std::thread::sleep(Duration::from_millis(500));
    let state_bytes = dir_bytes(&state.path().join("on"));

    // Phase 2: latency at a fixed rate, wall-clock event times.
    let latency = Latency::measure(tally.addr, &feed, &opts)?;
    latency.print();
    let queried = queries::measure(tally.addr, &feed, &opts)?;
    tally.stop()?;
    let rss = peak_rss_kib("self").unwrap_or(0) / 1024;

    // Phase 3: restore speed; phase 4: failover between two replica processes.
    let real = time_restore(&bench_config(&brokers, "tally-bench", Path::new("unused"))?, opts.partitions)?;
    let synthetic = time_restore(&synthetic_changelog(&mock, opts.restore_records, opts.partitions)?, opts.partitions)?;
    let failed_over = if opts.quick { None } else { Some(failover(&mock, opts.failover_brokers.as_deref(), opts.partitions)?) };

    println!(
        "S1, all S1 metrics on, {} partitions, events {} ms apart in event time, one tally process, librdkafka mock cluster",
        opts.partitions, opts.step_ms
    );
    println!(
        "throughput           {:.0} events/s with the changelog ({events} events in {:.2} s; {invalid} invalid, {late} late-for-a-metric; {changelog_records} changelog records; {rows_sent} result rows sent by the end of the drain)",
        with.events_per_s, with.secs
    );
    println!(
        "  without results    {:.0} events/s ({:.2} s); the result topic costs {:.0} %",
        without_rows.events_per_s,
        without_rows.secs,
        (1.0 - with.events_per_s / without_rows.events_per_s) * 100.0
    );
    println!(
        "  without changelog  {:.0} events/s ({:.2} s); changelog and results cost {:.0} %",
        without.events_per_s,
        without.secs,
        (1.0 - with.events_per_s / without.events_per_s) * 100.0
    );
    let drain_report = DrainReport::of(&with);
    drain_report.print();
    println!("bare consumer        {raw:.0} records/s (librdkafka reading the same topic from the mock, no processing)");
    println!(
        "core alone           {core:.0} events/s (same events through the tasks and sled, no Kafka; {core_puts} aggregate writes, {:.1} µs each, {:.0} % of the time in flushes)",
        core_flushing.as_secs_f64() * 1e6 / core_puts.max(1) as f64,
        core_flushing.as_secs_f64() * core / events as f64 * 100.0
    );
    println!("peak RSS             {rss} MiB (whole process: mock broker and producer included)");
    println!(
        "state on disk        {:.1} MiB per million events ({} bytes after {events} events)",
        state_bytes as f64 / (events as f64 / 1e6) / (1 << 20) as f64,
        state_bytes
    );
    println!("restore              {real} into an empty store: the changelog of the run above");
    println!("  synthetic          {synthetic}: count aggregates, 5 versions per key");
    if let Some((after_kill, after_term)) = failed_over {
        println!(
            "failover             {:.1} s after SIGKILL, {:.1} s after SIGTERM (until the other replica answers for every partition; default session timeout; {})",
            after_kill.as_secs_f64(),
            after_term.as_secs_f64(),
            opts.failover_brokers.as_deref().map_or("mock cluster, which delays every rebalance by session timeout − 1 s".to_string(), |b| format!("broker at {b}"))
        );
    }
    let per_s = |r: &Restored| (r.stats.records as f64 / r.secs).round();
    let figures = serde_json::json!({
        "events": events,
        "partitions": opts.partitions,
        "quick": opts.quick,
        "throughput_events_per_s": with.events_per_s.round(),
        "without_results_events_per_s": without_rows.events_per_s.round(),
        "without_changelog_events_per_s": without.events_per_s.round(),
        "drain": drain_report.json(),
        "bare_consumer_records_per_s": raw.round(),
        "core_events_per_s": core.round(),
        "latency": latency.json(),
        "queries": queried,
        "peak_rss_mib_whole_process": rss,
        "state_bytes": state_bytes,
        "restore_records_per_s": per_s(&real),
        "restore_synthetic_records_per_s": per_s(&synthetic),
        "failover_s": failed_over.map(|(k, t)| serde_json::json!({"sigkill": k.as_secs_f64(), "sigterm": t.as_secs_f64()})),
    });
    append_results(&opts, figures)?;
    drop(mock);
    Ok(())
}

/// Appends one run's `figures` to `path` as a JSON line, stamped with the time, the version
/// and the git commit of the working directory (when there is one).
fn append_results(opts: &BenchOptions, mut figures: serde_json::Value) -> anyhow::Result<()> {
    use std::io::Write;
    let path = &opts.results;
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|c| c.trim().to_string());
    figures["unix_time"] = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs().into();
    figures["version"] = env!("CARGO_PKG_VERSION").into();
    figures["commit"] = commit.into();
    figures["commit_interval"] = opts.commit_interval.clone().into();
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| anyhow::anyhow!("opening {}: {e}", path.display()))?;
    writeln!(f, "{figures}")?;
    println!("figures appended to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_prometheus() {
        let before = BTreeMap::new();
        let after: BTreeMap<u64, f64> = [(100_000, 50.0), (200_000, 100.0), (u64::MAX, 100.0)].into_iter().collect();
        assert_eq!(quantile(&before, &after, 0.5), Some(0.1));
        assert!((quantile(&before, &after, 0.75).unwrap() - 0.15).abs() < 1e-9);
        let text = "tally_x_total{a=\"1\"} 2\ntally_x_total{a=\"2\"} 3\ntally_x_totalish 9\n";
        assert_eq!(sum(text, "tally_x_total"), 5.0);
    }
}
