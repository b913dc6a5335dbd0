//! The bench's query load generator: asks a replica one kind of query at a time over HTTP,
//! closed loop (clients back to back: what the replica sustains) and open loop (a fixed
//! rate: the latency at that load), cycling through each kind's URLs so that a replica's
//! read cache cannot answer them all from one entry.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Queries in flight at most in the open loop, as a load balancer's connection pool bounds
/// them (unbounded, a saturated replica would be sent one connection per late query).
const IN_FLIGHT: usize = 256;

/// Clients of the closed loop.
const CLIENTS: usize = 8;

type HttpClient = Client<HttpConnector, Empty<Bytes>>;

/// One kind of query: its name as printed and the URLs asked in turn.
pub struct QueryKind {
    /// What it asks, as printed.
    pub what: &'static str,
    /// The URLs, asked one after another, round and round.
    pub urls: Vec<String>,
}

/// Latencies (seconds, sorted) of the queries answered 200, how many were not, and the
/// rate they were done at.
struct Run {
    latencies: Vec<f64>,
    failed: usize,
    qps: f64,
}

impl Run {
    fn ms(&self, q: f64) -> f64 {
        pct(&self.latencies, q)
    }

    fn json(&self) -> serde_json::Value {
        let ms = |q| Some(self.ms(q)).filter(|v| v.is_finite());
        serde_json::json!({"qps": self.qps.round(), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0), "failed": self.failed})
    }
}

/// The `q` quantile of `sorted` (seconds) in milliseconds; NaN when it is empty.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN) * 1000.0
}

/// Asks one GET, reading the whole body: whether it was answered 200.
async fn ask(client: &HttpClient, url: &str) -> bool {
    let Ok(uri) = url.parse() else { return false };
    match client.get(uri).await {
        Ok(resp) => resp.status() == 200 && resp.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

/// Open loop at `qps` for `secs`, each query's latency measured from when it was due (so a
/// stall counts against every query it delays).
async fn open_loop(client: &HttpClient, urls: Arc<Vec<String>>, qps: u64, secs: u64) -> Run {
    let n = qps * secs;
    let start = tokio::time::Instant::now();
    let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / qps as f64);
        tokio::time::sleep_until(due).await;
        let (client, urls) = (client.clone(), Arc::clone(&urls));
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { break };
        tasks.push(tokio::spawn(async move {
            let _slot = slot;
            let ok = ask(&client, &urls[i as usize % urls.len()]).await;
            (ok, due.elapsed().as_secs_f64())
        }));
    }
    let (mut latencies, mut failed) = (Vec::new(), 0);
    for t in tasks {
        match t.await {
            Ok((true, l)) => latencies.push(l),
            _ => failed += 1,
        }
    }
    let qps = n as f64 / start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Run { latencies, failed, qps }
}

/// [`CLIENTS`] clients asking one query after another for `secs`.
async fn closed_loop(client: &HttpClient, urls: Arc<Vec<String>>, secs: u64) -> Run {
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, urls) = (client.clone(), Arc::clone(&urls));
            tokio::spawn(async move {
                let (mut latencies, mut failed) = (Vec::new(), 0);
                let mut i = c;
                while tokio::time::Instant::now() < end {
                    let t = tokio::time::Instant::now();
                    if ask(&client, &urls[i % urls.len()]).await {
                        latencies.push(t.elapsed().as_secs_f64());
                    } else {
                        failed += 1;
                    }
                    i += CLIENTS;
                }
                (latencies, failed)
            })
        })
        .collect();
    let (mut latencies, mut failed) = (Vec::new(), 0);
    for t in tasks {
        if let Ok((l, f)) = t.await {
            latencies.extend(l);
            failed += f;
        }
    }
    let qps = latencies.len() as f64 / start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Run { latencies, failed, qps }
}

/// Runs every kind closed loop, then open loop at `qps`, `secs` each; prints a line per run
/// and returns the figures by kind.
pub fn run(kinds: &[QueryKind], qps: u64, secs: u64) -> anyhow::Result<serde_json::Value> {
    let rt = tokio::runtime::Runtime::new()?;
    let client: HttpClient =
        Client::builder(TokioExecutor::new()).pool_max_idle_per_host(IN_FLIGHT).pool_idle_timeout(Duration::from_secs(5)).build(HttpConnector::new());
    let mut figures = serde_json::Map::new();
    for kind in kinds {
        anyhow::ensure!(!kind.urls.is_empty(), "no URL to ask for {}", kind.what);
        let urls = Arc::new(kind.urls.clone());
        let closed = rt.block_on(closed_loop(&client, Arc::clone(&urls), secs));
        println!(
            "query {:<34} {CLIENTS} clients back to back: {:.0} QPS, p50 {:.1} ms, p99 {:.1} ms, {} failed",
            kind.what,
            closed.qps,
            closed.ms(0.5),
            closed.ms(0.99),
            closed.failed
        );
        let open = rt.block_on(open_loop(&client, urls, qps, secs));
        println!(
            "      {:<34} {qps} QPS offered ({:.0} done): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} failed",
            "",
            open.qps,
            open.ms(0.5),
            open.ms(0.99),
            open.ms(1.0),
            open.failed
        );
        figures.insert(kind.what.to_string(), serde_json::json!({"closed_loop": closed.json(), "open_loop": open.json(), "offered_qps": qps}));
    }
    Ok(figures.into())
}
