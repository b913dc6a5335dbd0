//! `tally bench --brokers`: the S1 drain and latency phases against a broker in another
//! process, with tally as a `tally run` child — so its peak RSS is tally's alone, and the
//! broker's work is not on tally's threads' clock.
//!
//! Each run uses topics and a consumer group of its own (named by the time), so runs on one
//! broker do not meet. The source topic is created here; tally creates its internal topics.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{append_results, bench_config, drain, gen_options, time_restore, BenchOptions, Child, DrainReport, Latency};
use crate::gen::{self, GenOptions, Scenario};
use crate::kafka::feed::Feed;

/// Runs the external-broker phases on `brokers` (loopback) and prints their figures.
pub fn run(opts: &BenchOptions, brokers: &str) -> anyhow::Result<()> {
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let dir = tempfile::Builder::new().prefix("tally-bench-external-").tempdir()?;
    let mut cfg = opts.tune(bench_config(brokers, &format!("tally-bench-{stamp}"), &dir.path().join("tally"))?);
    let topic = format!("{}-{stamp}", gen::topic(Scenario::S1));
    cfg.sources[0].topic = topic.clone();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(crate::kafka::topics::ensure_source(&cfg.kafka, &topic, opts.partitions))?;

    let gen_opts = GenOptions { count: opts.events, partitions: opts.partitions, step_ms: opts.step_ms, ..gen_options(opts) };
    let feed = Feed::new(&cfg.kafka, &topic)?;
    let produce_start = Instant::now();
    feed.send_all(gen::generate(Scenario::S1, &gen_opts), 0, || false)?;
    feed.flush()?;
    eprintln!("pre-filled {} events in {:.1} s", opts.events, produce_start.elapsed().as_secs_f64());

    let mut tally = Child::start(&cfg, dir.path(), "tally")?;
    tally.wait_listening(Duration::from_secs(60))?;
    let with = drain(tally.addr, opts.events)?;
    let report = DrainReport::of(&with);
    let latency = Latency::measure(tally.addr, &feed, opts)?;
    let rss = super::peak_rss_kib(&tally.process.id().to_string()).map(|k| k / 1024);
    tally.signal("-TERM")?;
    let restored = time_restore(&cfg, opts.partitions)?;

    println!(
        "S1, all S1 metrics on, {} partitions, {} users, events {} ms apart in event time; tally in its own process, broker at {brokers}",
        opts.partitions, opts.users, opts.step_ms
    );
    println!("throughput           {:.0} events/s with the changelog and results ({} events in {:.2} s)", with.events_per_s, opts.events, with.secs);
    report.print();
    latency.print();
    println!("peak RSS             {} MiB (tally alone)", rss.map_or("n/a".to_string(), |m| m.to_string()));
    println!("restore              {restored} into an empty store: the changelog of the run above");
    let figures = serde_json::json!({
        "brokers": "external",
        "events": opts.events,
        "partitions": opts.partitions,
        "users": opts.users,
        "throughput_events_per_s": with.events_per_s.round(),
        "drain": report.json(),
        "latency": latency.json(),
        "peak_rss_mib_tally": rss,
        "restore_records_per_s": (restored.stats.records as f64 / restored.secs).round(),
    });
    append_results(opts, figures)
}
