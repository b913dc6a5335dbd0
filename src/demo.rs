//! `tally demo`: the whole S1 pipeline in one process, nothing to install — librdkafka's
//! in-process mock cluster, a steady stream of S1 events stamped with the wall clock, tally
//! on it, and the HTTP API on loopback.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::mocking::MockCluster;

use crate::config::Config;
use crate::gen::{self, GenOptions, Scenario};
use crate::kafka::feed::Feed;

/// The S1 config the demo runs (the shipped example; brokers, state and HTTP are overridden).
pub const S1_CONFIG: &str = include_str!("../examples/s1-uvpv.toml");

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// HTTP listen address.
    pub http: SocketAddr,
    /// Events per second.
    pub rate: u64,
    /// Partitions of the source topic.
    pub partitions: i32,
}

/// Runs the demo until Ctrl-C.
pub fn run(opts: DemoOptions) -> anyhow::Result<()> {
    let mock = MockCluster::new(1).map_err(|e| anyhow::anyhow!("starting the mock Kafka cluster: {e}"))?;
    let mut cfg = Config::from_toml_str(S1_CONFIG)?;
    let topo = crate::topology::Topology::compile(&cfg)?;
    crate::kafka::topics::create_on_mock(&mock, &topo, opts.partitions)?;
    let state = tempfile::Builder::new().prefix("tally-demo-").tempdir()?;
    cfg.kafka.bootstrap_servers = mock.bootstrap_servers();
    cfg.state.dir = state.path().to_path_buf();
    cfg.http.listen = opts.http.to_string();

    let stop = Arc::new(AtomicBool::new(false));
    let producer = {
        let (kafka, stop, rate) = (cfg.kafka.clone(), Arc::clone(&stop), opts.rate.max(1));
        let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
        let gen_opts =
            GenOptions { start_ms: now, step_ms: (1000 / rate as i64).max(1), partitions: opts.partitions, ..GenOptions::for_scenario(Scenario::S1) };
        std::thread::spawn(move || -> anyhow::Result<()> {
            let feed = Feed::new(&kafka, gen::topic(Scenario::S1))?;
            feed.send_all(gen::live(Scenario::S1, &gen_opts), rate, || stop.load(Ordering::Relaxed))?;
            Ok(())
        })
    };

    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(crate::app::run(cfg, crate::app::shutdown_signal(), |addr| {
        let base = format!("http://{addr}");
        println!("tally demo: S1 events at {} per second into an in-process Kafka ({} partitions)\n", opts.rate, opts.partitions);
        println!("  live screen   {base}/");
        println!("  metrics       {base}/metrics");
        println!("  API document  {base}/openapi.json\n");
        println!("Try:");
        println!("  curl '{base}/api/v1/metrics/uv_all_time'                  # distinct users, all time");
        println!("  curl '{base}/api/v1/metrics/pv_by_product/top?n=5'        # most viewed products, latest window");
        println!("  curl '{base}/api/v1/metrics/conversion_rate?limit=3'      # purchases / views per 10-minute window\n");
        println!("Ctrl-C stops.");
    }));
    stop.store(true, Ordering::Relaxed);
    let _ = producer.join();
    drop(mock);
    result
}
