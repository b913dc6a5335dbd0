//! `tally bench`: S1 events through librdkafka's mock cluster into one tally, reporting
//! throughput, produce-to-queryable latency, peak RSS and state size.
//!
//! Two phases:
//! 1. **Throughput**: the topic is pre-filled, then tally starts and drains it; events/s is
//!    counted from the first consumed record to the last. The mock keeps at most ~5 MiB per
//!    partition and silently drops older data, so the event count is capped per partition.
//! 2. **Latency**: events are produced at a fixed rate, stamped with the wall clock, while
//!    tally consumes; p50/p99 come from tally's own `tally_queryable_latency_seconds`
//!    histogram (the observations of this phase only).
//!
//! Every figure is read from tally's `/metrics` over HTTP, as an operator would.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
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
}

fn scrape(addr: SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
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

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
}

fn wait_for(addr: SocketAddr, what: &str, target: f64, limit: Duration) -> anyhow::Result<(String, Instant)> {
    let start = Instant::now();
    loop {
        let text = scrape(addr)?;
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
    let mut tasks = crate::task::TaskSet::new(topo.clone(), crate::store::Store::open(dir.path())?);
    let mut offsets = vec![0i64; 1024];
    let start = Instant::now();
    let mut last_flush = Instant::now();
    let (mut puts, mut flushing) = (0, Duration::ZERO);
    let mut flush = |tasks: &mut crate::task::TaskSet| -> anyhow::Result<()> {
        let t = Instant::now();
        puts += tasks.flush(None)?.puts;
        flushing += t.elapsed();
        Ok(())
    };
    for r in records {
        let o = &mut offsets[r.partition as usize];
        tasks.process(0, r.partition, *o, None, &r.payload)?;
        *o += 1;
        if last_flush.elapsed() >= Duration::from_millis(topo.commit_interval_ms) {
            flush(&mut tasks)?;
            last_flush = Instant::now();
        }
    }
    flush(&mut tasks)?;
    Ok((records.len() as f64 / start.elapsed().as_secs_f64(), puts, flushing))
}

/// The Kafka side alone: a bare librdkafka consumer reading the pre-filled topic with
/// tally's consumer settings, doing nothing with the records. The ceiling the mock broker
/// and client put on any consumer here.
fn consume_only(cfg: &Config, topic: &str, partitions: i32, events: usize) -> anyhow::Result<f64> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = crate::kafka::client_config(&cfg.kafka, &[("group.id", "tally-bench-raw"), ("enable.auto.commit", "false"), ("fetch.wait.max.ms", "100")]).create()?;
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

/// Runs the benchmark and prints its figures.
pub fn run(opts: BenchOptions) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).map_err(|e| anyhow::anyhow!("starting the mock cluster: {e}"))?;
    let topic = gen::topic(Scenario::S1);
    let mut cfg = Config::from_toml_str(crate::demo::S1_CONFIG)?;
    let app = &cfg.kafka.application_id;
    for (t, parts) in [(topic.to_string(), opts.partitions), (format!("{app}-dead-letters"), 1), (format!("{app}-late-records"), 1)] {
        mock.create_topic(&t, parts, 1).map_err(|e| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let state = tempfile::Builder::new().prefix("tally-bench-").tempdir()?;
    cfg.kafka.bootstrap_servers = mock.bootstrap_servers();
    cfg.state.dir = state.path().to_path_buf();
    cfg.http.listen = "127.0.0.1:0".into();

    let events = opts.events.min(MOCK_RECORDS_PER_PARTITION * opts.partitions.max(1) as usize);
    if events < opts.events {
        eprintln!("capping the throughput phase at {events} events: the mock keeps ~{MOCK_RECORDS_PER_PARTITION} S1 records per partition");
    }
    // Event time advances 1 ms per event (1,000 events per second of event time), denser
    // than the tests' 100 ms: at production rates an event-time second holds far more.
    let gen_opts = GenOptions { count: events, partitions: opts.partitions, step_ms: opts.step_ms, ..GenOptions::for_scenario(Scenario::S1) };
    let records = gen::generate(Scenario::S1, &gen_opts);
    let (core, core_puts, core_flushing) = core_only(&records, &cfg)?;
    let feed = Feed::new(&cfg.kafka, topic)?;
    let produce_start = Instant::now();
    feed.send_all(records, 0, || false)?;
    feed.flush()?;
    eprintln!("pre-filled {events} events in {:.1} s", produce_start.elapsed().as_secs_f64());
    let raw = consume_only(&cfg, topic, opts.partitions, events)?;

    let (addr_tx, addr_rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let tally = std::thread::spawn(move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Runtime::new()?;
        rt.block_on(crate::app::run(cfg, async { let _ = stop_rx.await; }, move |a| {
            let _ = addr_tx.send(a);
        }))
    });
    let addr = addr_rx.recv_timeout(Duration::from_secs(30))?;

    // Phase 1: throughput.
    let (_, first) = wait_for(addr, "tally_records_consumed_total", 1.0, Duration::from_secs(60))?;
    let (text, last) = wait_for(addr, "tally_records_consumed_total", events as f64, Duration::from_secs(600))?;
    // Counters are published per flush: the drain ends within one commit interval of `last`.
    let secs = last.duration_since(first).as_secs_f64().max(1e-3);
    let flushes = buckets(&text, "tally_flush_duration_seconds");
    let flush_count = sum(&text, "tally_flush_duration_seconds_count");
    let flush_secs = sum(&text, "tally_flush_duration_seconds_sum");
    let invalid = sum(&text, "tally_records_invalid_total");
    let late = sum(&text, "tally_records_late_total");
    std::thread::sleep(Duration::from_millis(500));
    let state_bytes = dir_bytes(state.path());

    // Phase 2: latency at a fixed rate, wall-clock event times.
    let before = buckets(&scrape(addr)?, "tally_queryable_latency_seconds");
    let consumed_before = sum(&scrape(addr)?, "tally_records_consumed_total");
    let stop = Arc::new(AtomicBool::new(false));
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let live_opts = GenOptions { start_ms: now, step_ms: 1, partitions: opts.partitions, ..GenOptions::for_scenario(Scenario::S1) };
    let n = opts.latency_rate * opts.latency_seconds;
    let sent = feed.send_all(gen::live(Scenario::S1, &live_opts).take(n as usize), opts.latency_rate, || stop.load(Ordering::Relaxed))?;
    feed.flush()?;
    let (text, _) = wait_for(addr, "tally_records_consumed_total", consumed_before + sent as f64, Duration::from_secs(120))?;
    std::thread::sleep(Duration::from_millis(500));
    let after = buckets(&scrape(addr)?, "tally_queryable_latency_seconds");
    let _ = text;
    stop.store(true, Ordering::Relaxed);
    let _ = stop_tx.send(());
    tally.join().map_err(|_| anyhow::anyhow!("tally panicked"))??;

    let ms = |q: Option<f64>| q.map_or("n/a".to_string(), |s| format!("{:.0} ms", s * 1000.0));
    println!("S1, all S1 metrics on, {} partitions, events {} ms apart in event time, one tally process, librdkafka mock cluster", opts.partitions, opts.step_ms);
    println!("throughput           {:.0} events/s ({events} events in {secs:.2} s; {invalid} invalid, {late} late-for-a-metric)", events as f64 / secs);
    println!(
        "flushes              {flush_count} taking {:.0} % of the drain; p50 {} p99 {} (side outputs acked, state written and fsynced)",
        flush_secs / secs * 100.0,
        ms(quantile(&BTreeMap::new(), &flushes, 0.5)),
        ms(quantile(&BTreeMap::new(), &flushes, 0.99))
    );
    println!("bare consumer        {raw:.0} records/s (librdkafka reading the same topic from the mock, no processing)");
    println!(
        "core alone           {core:.0} events/s (same events through the tasks and sled, no Kafka; {core_puts} aggregate writes, {:.1} µs each, {:.0} % of the time in flushes)",
        core_flushing.as_secs_f64() * 1e6 / core_puts.max(1) as f64,
        core_flushing.as_secs_f64() * core / events as f64 * 100.0
    );
    println!("produce->queryable   p50 {}  p99 {}  (at {} events/s for {} s)", ms(quantile(&before, &after, 0.5)), ms(quantile(&before, &after, 0.99)), opts.latency_rate, opts.latency_seconds);
    println!("peak RSS             {} MiB (whole process: mock broker and producer included)", peak_rss_kib().unwrap_or(0) / 1024);
    println!("state on disk        {:.1} MiB per million events ({} bytes after {events} events)", state_bytes as f64 / (events as f64 / 1e6) / (1 << 20) as f64, state_bytes);
    drop(mock);
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
