//! `tally bench --cluster`: three replica processes of this binary on the mock cluster, each
//! with a standby copy of every partition it does not own (one per partition) and a stable
//! replica name (static membership). It prints query latency and throughput through one
//! replica (its answers fan out to the other two), failover after SIGKILL with a standby,
//! produce → queryable on the replicas taking partitions over while they promote or restore,
//! and availability — the share of samples in which every partition was answered — while a
//! replica is SIGKILLed every few seconds and restarted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::mocking::MockCluster;
use rdkafka::producer::Producer;

use super::load::{self, pct, QueryKind};
use super::{bench_config, complete, create_internal, http_get, sample, scrape, sum, BenchOptions, Child};
use crate::gen::{self, GenOptions, Scenario};
use crate::kafka::feed::Feed;

/// Three replicas, named so that a restart keeps its group membership.
const REPLICAS: usize = 3;

fn wait_complete(addr: std::net::SocketAddr, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while complete(addr) != Some(true) {
        anyhow::ensure!(start.elapsed() < limit, "no complete answer from {addr} within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The replicas, their config and where they live.
struct Cluster {
    cfg: crate::config::Config,
    dir: std::path::PathBuf,
    names: Vec<String>,
    replicas: Vec<Child>,
}

impl Cluster {
    fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        self.replicas[i] = Child::start_named(&self.cfg, &self.dir, &self.names[i])?;
        Ok(())
    }
}

/// Runs the cluster phases and prints their figures.
pub fn run(opts: &BenchOptions) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).map_err(|e| anyhow::anyhow!("starting the mock cluster: {e}"))?;
    let dir = tempfile::Builder::new().prefix("tally-bench-cluster-").tempdir()?;
    let brokers = opts.failover_brokers.clone().unwrap_or_else(|| mock.bootstrap_servers());
    // A fresh application per run, so an external broker's topics from earlier runs do not count.
    let app = format!("tally-bench-cluster-{}", std::process::id());
    let mut cfg = bench_config(&brokers, &app, dir.path())?;
    cfg.cluster.num_standby_replicas = 1;
    let partitions = opts.cluster_partitions;
    let topic = format!("{app}-uvpv");
    cfg.sources[0].topic = topic.clone();
    if opts.failover_brokers.is_some() {
        // A real broker: tally creates its internal topics; the source topic is ours.
        tokio::runtime::Runtime::new()?.block_on(crate::kafka::topics::ensure_source(&cfg.kafka, &topic, partitions))?;
    } else {
        mock.create_topic(&topic, partitions, 1).map_err(|e| anyhow::anyhow!("creating the source topic: {e}"))?;
        create_internal(&mock, &cfg, partitions)?;
    }
    let feed = Feed::new(&cfg.kafka, &topic)?;
    let prefill = GenOptions { count: opts.cluster_events, partitions, ..GenOptions::for_scenario(Scenario::S1) };
    feed.send_all(gen::generate(Scenario::S1, &prefill), 0, || false)?;
    feed.flush()?;
    let names: Vec<String> = (0..REPLICAS).map(|i| format!("r{i}")).collect();
    let replicas = names.iter().map(|n| Child::start_named(&cfg, dir.path(), n)).collect::<anyhow::Result<_>>()?;
    let mut cluster = Cluster { cfg, dir: dir.path().to_path_buf(), names, replicas };
    for r in &cluster.replicas {
        wait_complete(r.addr, Duration::from_secs(300))?;
    }
    // Let the standby copies catch up.
    std::thread::sleep(Duration::from_secs(3));
    if opts.keep {
        eprintln!("replicas' configs, logs and state: {}", dir.path().display());
    }
    println!(
        "S1, {partitions} partitions, {} events, {REPLICAS} replica processes with one standby copy per partition, {}; queries to r0 fan out to the others",
        opts.cluster_events,
        opts.failover_brokers.as_deref().map_or("mock cluster".to_string(), |b| format!("broker at {b}"))
    );
    if !opts.availability_only {
        queries(&cluster, opts)?;
    }
    // Events flow from here on.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (kafka, stop, topic) = (cluster.cfg.kafka.clone(), Arc::clone(&stop), topic.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let feed = Feed::new(&kafka, &topic)?;
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
            let live = GenOptions { start_ms: now, step_ms: 1, partitions, ..GenOptions::for_scenario(Scenario::S1) };
            feed.send_all(gen::live(Scenario::S1, &live), 2_000, || stop.load(Ordering::Relaxed))?;
            feed.flush()
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    if !opts.availability_only {
        failover(&mut cluster, opts)?;
    }
    availability(&mut cluster, opts)?;
    stop.store(true, Ordering::Relaxed);
    let _ = feeder.join();
    drop(cluster);
    drop(mock);
    if opts.keep {
        let _ = dir.keep();
    }
    Ok(())
}

/// Query latency and throughput through r0, per query kind.
fn queries(cluster: &Cluster, opts: &BenchOptions) -> anyhow::Result<()> {
    let base = format!("http://{}", cluster.replicas[0].addr);
    let at = "2021-09-06T16:30:00%2B08:00";
    let kinds = [
        QueryKind {
            what: "point query (one key, one window)",
            urls: vec![format!("{base}/api/v1/metrics/pv_by_product?key=101&from={at}&to=2021-09-06T16:35:00%2B08:00")],
        },
        QueryKind { what: "UV over a 6-hour span", urls: vec![format!("{base}/api/v1/metrics/uv_10m/span?last=6h")] },
        QueryKind { what: "top-10", urls: vec![format!("{base}/api/v1/metrics/pv_by_product/top?n=10")] },
    ];
    load::run(&kinds, opts.qps, opts.query_seconds)?;
    Ok(())
}

/// The partitions `addr`'s answers say `replica` answers.
fn answered_by(addr: std::net::SocketAddr, replica: &str) -> anyhow::Result<Vec<i32>> {
    let (_, body) = http_get(addr, "/api/v1/metrics/views?limit=1&partial=true")?;
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let parts = v["coverage"]["partitions"].as_array().cloned().unwrap_or_default();
    Ok(parts.iter().filter(|p| p["replica"] == replica).filter_map(|p| p["partition"].as_i64().map(|p| p as i32)).collect())
}

/// SIGKILL r2 while events flow: how soon r0 answers completely again, and produce →
/// queryable of the partitions r0 keeps throughout while it takes r2's over.
fn failover(cluster: &mut Cluster, opts: &BenchOptions) -> anyhow::Result<()> {
    let r0 = cluster.replicas[0].addr;
    let kept = answered_by(r0, "r0")?;
    let restored_before = sum(&scrape(r0)?, "tally_restore_records_total") + sum(&scrape(cluster.replicas[1].addr)?, "tally_restore_records_total");
    let killed = Instant::now();
    cluster.replicas[2].signal("-KILL")?;
    let window = Duration::from_secs(opts.failover_window);
    let watcher = std::thread::spawn(move || {
        let (mut first_complete, mut longest, mut gap_since) = (None, Duration::ZERO, None::<Instant>);
        let mut incomplete = 0;
        while killed.elapsed() < window {
            if complete(r0) == Some(true) {
                first_complete.get_or_insert(killed.elapsed());
                if let Some(s) = gap_since.take() {
                    longest = longest.max(s.elapsed());
                }
            } else {
                incomplete += 1;
                gap_since.get_or_insert_with(Instant::now);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (first_complete, longest.max(gap_since.map_or(Duration::ZERO, |s| s.elapsed())), incomplete)
    });
    let probe = probes(&cluster.cfg.kafka, &cluster.cfg.sources[0].topic, r0, &kept, killed + window)?;
    let (first_complete, longest, incomplete) = watcher.join().map_err(|_| anyhow::anyhow!("the watcher panicked"))?;
    let restored =
        sum(&scrape(r0)?, "tally_restore_records_total") + sum(&scrape(cluster.replicas[1].addr)?, "tally_restore_records_total") - restored_before;
    println!(
        "failover             SIGKILL of r2 with standby copies: r0's first complete answer {:.2} s after it; longest stretch without one {:.2} s; {incomplete} incomplete samples of 10 ms in {} s; r0 and r1 read {restored} changelog records taking over",
        first_complete.map_or(f64::NAN, |d| d.as_secs_f64()),
        longest.as_secs_f64(),
        opts.failover_window
    );
    println!(
        "  not blocked        produce->queryable of the {} partitions r0 kept, meanwhile (probes): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({} probes)",
        kept.len(),
        pct(&probe, 0.5),
        pct(&probe, 0.99),
        pct(&probe, 1.0),
        probe.len()
    );
    cluster.restart(2)?;
    wait_complete(r0, Duration::from_secs(120))
}

/// Until `until`: a record produced to one of `parts` in turn, and the time until `addr`
/// answers with that partition past it. Sorted.
fn probes(kafka: &crate::config::KafkaConfig, topic: &str, addr: std::net::SocketAddr, parts: &[i32], until: Instant) -> anyhow::Result<Vec<f64>> {
    let producer = crate::kafka::delivery::producer(kafka, "probe", crate::kafka::delivery::Retries::Bounded, None)?;
    let mut lat = Vec::new();
    let mut i = 0;
    while Instant::now() < until && !parts.is_empty() {
        let p = parts[i % parts.len()];
        i += 1;
        let sent = Instant::now();
        let batch = producer.context().start_batch(1);
        let payload = br#"{"probe": true}"#;
        let opaque = crate::kafka::delivery::DeliveryContext::opaque(batch, 1);
        crate::kafka::delivery::send(&producer, rdkafka::producer::BaseRecord::with_opaque_to(topic, opaque).partition(p).payload(&payload[..]))?;
        crate::kafka::delivery::await_acks(&producer).map_err(|e| anyhow::anyhow!(e))?;
        let offset = producer.context().take_offsets().first().copied().unwrap_or(-1);
        loop {
            let (_, body) = http_get(addr, "/api/v1/metrics/views?limit=1&partial=true")?;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let at =
                v["coverage"]["partitions"].as_array().and_then(|ps| ps.iter().find(|q| q["partition"] == p)).and_then(|q| q["next_offset"].as_i64());
            if at.is_some_and(|n| n > offset) {
                break;
            }
            if sent.elapsed() > Duration::from_secs(60) {
                anyhow::bail!("probe on partition {p} never became queryable");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        lat.push(sent.elapsed().as_secs_f64());
        std::thread::sleep(Duration::from_millis(50));
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

/// SIGKILL a replica every few seconds and restart it a second later (same name: static
/// membership); meanwhile ask a ready replica every 50 ms, as a load balancer would.
fn availability(cluster: &mut Cluster, opts: &BenchOptions) -> anyhow::Result<()> {
    let (mut samples, mut answered) = (0u64, 0u64);
    let mut reasons: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let started = Instant::now();
    let mut next_kill = Instant::now() + Duration::from_secs(opts.kill_every);
    let mut rng = 7u64;
    let mut down: Option<(usize, Instant)> = None;
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(opts.availability_seconds) {
        if Instant::now() >= next_kill && down.is_none() {
            rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let victim = (rng >> 33) as usize % REPLICAS;
            cluster.replicas[victim].signal("-KILL")?;
            down = Some((victim, Instant::now()));
            kills += 1;
            next_kill += Duration::from_secs(opts.kill_every);
        }
        if let Some((v, at)) = down {
            if at.elapsed() >= Duration::from_secs(1) {
                cluster.restart(v)?;
                down = None;
            }
        }
        let ready: Vec<usize> = (0..REPLICAS)
            .filter(|i| down.is_none_or(|(v, _)| v != *i) && matches!(http_get(cluster.replicas[*i].addr, "/ready"), Ok((200, _))))
            .collect();
        samples += 1;
        match ready.get(samples as usize % ready.len().max(1)).and_then(|&i| sample(cluster.replicas[i].addr)) {
            Some(Ok(())) => answered += 1,
            Some(Err(why)) => why.into_iter().for_each(|r| *reasons.entry(r).or_default() += 1),
            None => *reasons.entry("no ready replica".into()).or_default() += 1,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "availability         {:.1} % of {samples} samples answered every partition, over {} s with a SIGKILL every {} s ({kills} kills, each restarted 1 s later under its name: static membership); missing partitions by reason: {reasons:?}",
        answered as f64 / samples.max(1) as f64 * 100.0,
        opts.availability_seconds,
        opts.kill_every
    );
    Ok(())
}
