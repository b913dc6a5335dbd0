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

/// Latencies (seconds, sorted) of the queries answered 200, how many were turned away
/// (503: shed by the replica's admission bound), how many failed otherwise, and the rate
/// they were done at.
struct Run {
    latencies: Vec<f64>,
    shed: usize,
    failed: usize,
    qps: f64,
}

/// How one query went.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Shed,
    Failed,
}

impl Run {
    fn ms(&self, q: f64) -> f64 {
        pct(&self.latencies, q)
    }

    fn json(&self) -> serde_json::Value {
        let ms = |q| Some(self.ms(q)).filter(|v| v.is_finite());
        serde_json::json!({"qps": self.qps.round(), "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": ms(1.0), "shed": self.shed, "failed": self.failed})
    }

    /// Takes one query's outcome.
    fn count(&mut self, answer: Answer, latency: f64) {
        match answer {
            Answer::Ok => self.latencies.push(latency),
            Answer::Shed => self.shed += 1,
            Answer::Failed => self.failed += 1,
        }
    }

    fn new() -> Run {
        Run { latencies: Vec::new(), shed: 0, failed: 0, qps: 0.0 }
    }
}

/// The `q` quantile of `sorted` (seconds) in milliseconds; NaN when it is empty.
pub fn pct(sorted: &[f64], q: f64) -> f64 {
    sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(f64::NAN) * 1000.0
}

/// Asks one GET, reading the whole body.
async fn ask(client: &HttpClient, url: &str) -> Answer {
    let Ok(uri) = url.parse() else { return Answer::Failed };
    let Ok(resp) = client.get(uri).await else { return Answer::Failed };
    let status = resp.status();
    match (status.as_u16(), resp.into_body().collect().await.is_ok()) {
        (200, true) => Answer::Ok,
        (503, true) => Answer::Shed,
        _ => Answer::Failed,
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
            let answer = ask(&client, &urls[i as usize % urls.len()]).await;
            (answer, due.elapsed().as_secs_f64())
        }));
    }
    let mut run = Run::new();
    for t in tasks {
        let (answer, latency) = t.await.unwrap_or((Answer::Failed, 0.0));
        run.count(answer, latency);
    }
    run.qps = n as f64 / start.elapsed().as_secs_f64();
    run.latencies.sort_by(f64::total_cmp);
    run
}

/// [`CLIENTS`] clients asking one query after another for `secs`.
async fn closed_loop(client: &HttpClient, urls: Arc<Vec<String>>, secs: u64) -> Run {
    let start = tokio::time::Instant::now();
    let end = start + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, urls) = (client.clone(), Arc::clone(&urls));
            tokio::spawn(async move {
                let mut run = Run::new();
                let mut i = c;
                while tokio::time::Instant::now() < end {
                    let t = tokio::time::Instant::now();
                    let answer = ask(&client, &urls[i % urls.len()]).await;
                    run.count(answer, t.elapsed().as_secs_f64());
                    i += CLIENTS;
                }
                run
            })
        })
        .collect();
    let mut run = Run::new();
    for t in tasks {
        match t.await {
            Ok(client) => {
                run.latencies.extend(client.latencies);
                run.shed += client.shed;
                run.failed += client.failed;
            }
            Err(_) => run.failed += 1,
        }
    }
    run.qps = run.latencies.len() as f64 / start.elapsed().as_secs_f64();
    run.latencies.sort_by(f64::total_cmp);
    run
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
            "query {:<34} {CLIENTS} clients back to back: {:.0} QPS, p50 {:.1} ms, p99 {:.1} ms, {} shed, {} failed",
            kind.what,
            closed.qps,
            closed.ms(0.5),
            closed.ms(0.99),
            closed.shed,
            closed.failed
        );
        let open = rt.block_on(open_loop(&client, urls, qps, secs));
        println!(
            "      {:<34} {qps} QPS offered ({:.0} done, {:.0} answered): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, {} shed (503), {} failed",
            "",
            open.qps,
            open.latencies.len() as f64 / secs.max(1) as f64,
            open.ms(0.5),
            open.ms(0.99),
            open.ms(1.0),
            open.shed,
            open.failed
        );
        figures.insert(kind.what.to_string(), serde_json::json!({"closed_loop": closed.json(), "open_loop": open.json(), "offered_qps": qps}));
    }
    Ok(figures.into())
}
