//! `tally bench`'s query phase: one replica asked point, span and top queries while S1
//! events flow into it at the latency phase's rate, stamped with the wall clock. Positions
//! move at every flush, so the replica's read cache answers a repeated query only until the
//! next one, as it would under a live dashboard; the point queries cycle through every
//! product, so most of them read the store.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::load::{self, QueryKind};
use super::{gen_options, BenchOptions};
use crate::gen::{self, GenOptions, Scenario};
use crate::kafka::feed::Feed;

/// Events flow this long before the first query: every partition has flushed windows of
/// the phase's own event times by then.
const WARM_UP: Duration = Duration::from_secs(2);

/// The query kinds asked of `addr`: the events' windows start at `start_ms`.
fn kinds(addr: SocketAddr, start_ms: i64, opts: &BenchOptions) -> Vec<QueryKind> {
    let base = format!("http://{addr}/api/v1/metrics");
    // The windows of the phase: the ten-minute ones holding its start, and after.
    let from = start_ms - 10 * 60_000;
    let point = gen::s1_products(opts.users).map(|p| format!("{base}/pv_by_product?key={p}&from={from}")).collect();
    vec![
        QueryKind { what: "point query (one key, its windows)", urls: point },
        QueryKind { what: "UV over a 6-hour span", urls: vec![format!("{base}/uv_10m/span?last=6h")] },
        QueryKind { what: "top-10", urls: vec![format!("{base}/pv_by_product/top?n=10")] },
    ]
}

/// Runs the phase against the replica at `addr`, `feed` sending it events meanwhile;
/// prints a line per query kind and loop, and returns the figures.
pub fn measure(addr: SocketAddr, feed: &Feed, opts: &BenchOptions) -> anyhow::Result<serde_json::Value> {
    let start_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    let live = GenOptions { start_ms, step_ms: 1, partitions: opts.partitions, seed: start_ms as u64, ..gen_options(opts) };
    let stop = AtomicBool::new(false);
    println!(
        "queries on this one replica while {} events/s flow in ({} products; {} s per loop and kind):",
        opts.latency_rate,
        gen::s1_products(opts.users).count(),
        opts.query_seconds
    );
    std::thread::scope(|s| {
        let feeder = s.spawn(|| feed.send_all(gen::live(Scenario::S1, &live), opts.latency_rate, || stop.load(Ordering::Relaxed)));
        std::thread::sleep(WARM_UP);
        let figures = load::run(&kinds(addr, start_ms, opts), opts.qps, opts.query_seconds);
        stop.store(true, Ordering::Relaxed);
        let sent = feeder.join().map_err(|_| anyhow::anyhow!("the feeder thread panicked"))?;
        sent?;
        feed.flush()?;
        figures
    })
}
