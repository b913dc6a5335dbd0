//! `tally run`: the store, the consumer thread and the HTTP server, wired together and
//! stopped together.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cluster::members::Members;
use crate::cluster::router::ClusterFetch;
use crate::config::Config;
use crate::health::{Faults, Link};
use crate::http::{self, ApiState};
use crate::kafka::consumer::SourceConsumer;
use crate::kafka::members::{Announcer, Identity, Standbys, MEMBER_TTL};
use crate::kafka::side::SideOutputs;
use crate::kafka::tables::TableLoader;
use crate::kafka::topics;
use crate::metrics::Metrics;
use crate::ownership::Ownership;
use crate::query::fetch::LocalFetch;
use crate::query::QueryEngine;
use crate::store::Store;
use crate::table::Tables;
use crate::task::TaskSet;
use crate::topology::Topology;

/// How often store-size gauges are refreshed (counting keys walks the tree).
const STATE_GAUGE_INTERVAL: Duration = Duration::from_secs(10);

/// Runs tally on `cfg` until `shutdown` resolves or processing fails. `on_listening` gets
/// the HTTP address once bound (useful with port 0).
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()> + Send + 'static, on_listening: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let topo = Arc::new(Topology::compile(&cfg)?);
    let metrics = Metrics::new();
    let store = open_store(&cfg, &topo, &metrics).with_context(|| format!("opening the state store in {}", cfg.state.dir.display()))?;
    metrics.init_sources(topo.sources.iter().map(|s| s.name.as_str()));
    metrics.init_metrics(topo.metrics.iter().map(|m| m.name.as_str()));
    metrics.init_results(topo.emitting());
    let addr: SocketAddr =
        cfg.http.listen.parse().with_context(|| format!("http.listen `{}` is not an address like 127.0.0.1:8080", cfg.http.listen))?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the HTTP server to {addr}"))?;
    let bound = listener.local_addr()?;
    // Listening before the brokers answer: `/health` is up and `/ready` says what is awaited.
    on_listening(bound);
    let faults = Arc::new(Faults::new(Some(metrics.clone())));
    let access = Arc::new(http::Access::of(&cfg.http));
    let shutdown = futures::FutureExt::shared(Box::pin(shutdown));
    let Some((partitions, listener)) = wait_for_brokers(&cfg.kafka, &topo, listener, (&metrics, &faults, &access), shutdown.clone()).await? else {
        tracing::info!("shutting down before the brokers answered");
        return Ok(());
    };
    let me = identity(&topo, bound);
    let mut kafka = cfg.kafka.clone();
    if let Some(name) = &topo.cluster.replica {
        // Static membership (KIP-345): a restart within the session timeout keeps the partitions.
        kafka.properties.entry("group.instance.id".into()).or_insert_with(|| name.clone());
    }
    let side = SideOutputs::new(&kafka, topo.dead_letter_topic(), topo.late_topic(), metrics.clone())?;
    let owned = Arc::new(Ownership::default());
    // The result view sits beside the state store (it is rebuilt whenever this replica
    // takes the role, so losing it loses nothing).
    let results_dir = topo.emits_results().then(|| beside(&cfg.state.dir, ".results"));
    let tables = Arc::new(Tables::open(&topo, &store).context("opening the global tables")?);
    metrics.init_tables(topo.tables.iter().map(|t| t.name.as_str()));
    let loader = TableLoader::start(&kafka, Arc::clone(&topo), Arc::clone(&tables), metrics.clone())?;
    let mut tasks = TaskSet::with_tables(Arc::clone(&topo), store.clone(), Arc::clone(&tables));
    remember_metrics(&topo, &store, &mut tasks)?;
    let refusals = Arc::clone(tasks.refusals());
    let consumer = SourceConsumer::new(&kafka, tasks, side, metrics.clone(), Arc::clone(&owned), Arc::clone(&faults), results_dir)?;
    let members = Arc::new(Members::new(MEMBER_TTL));
    let counts: BTreeMap<String, i32> = topo.sources.iter().zip(&partitions).map(|(s, n)| (s.name.clone(), *n)).collect();
    let standbys = match (topo.cluster.num_standby_replicas, consumer.state_updater()) {
        (copies @ 1.., Some(updater)) => Some(Standbys { copies, partitions: counts.clone(), updater }),
        _ => None,
    };
    let announcer = Announcer::start(&kafka, &topo, me.clone(), Arc::clone(&owned), Arc::clone(&members), standbys)?;

    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let consumer_thread = {
        let stop = Arc::clone(&stop);
        std::thread::Builder::new().name("tally-consumer".into()).spawn(move || {
            let r = consumer.run(&stop);
            let _ = done_tx.send(());
            r
        })?
    };

    let (http_stop_tx, http_stop_rx) = tokio::sync::oneshot::channel::<()>();
    let local = LocalFetch::new(Arc::clone(&topo), store.clone(), Arc::clone(&owned), me.replica.clone())
        .caching()
        .refusing(Arc::clone(&refusals))
        .showing_faults(Arc::clone(&faults));
    let timeout = Duration::from_millis(topo.cluster.query_timeout_ms);
    let cluster = ClusterFetch::new(local.clone(), members, counts, timeout, topo.cluster.max_standby_lag, tokio::runtime::Handle::current())
        .authenticated(cfg.http.token.clone());
    let api = ApiState {
        engine: QueryEngine::new(Arc::clone(&topo), Arc::new(cluster)).refusing(Arc::clone(&refusals)).remembering(),
        local,
        metrics: metrics.clone(),
        owned,
        tables,
        export_failing: Default::default(),
        faults: Arc::clone(&faults),
        access,
        admission: Arc::new(http::Admissions::of(&cfg.http, &metrics)),
    };
    let server = tokio::spawn(http::serve(api, listener, async {
        let _ = http_stop_rx.await;
    }));
    tracing::info!(http = %bound, replica = %me.replica, advertised = %me.url, app = %topo.application_id, "tally is running");

    let gauges = tokio::spawn(async move {
        loop {
            let s = store.clone();
            let m = metrics.clone();
            let _ = tokio::task::spawn_blocking(move || {
                m.state_keys.set(s.len() as i64);
                if let Ok(b) = s.size_on_disk() {
                    m.state_bytes.set(b as i64);
                }
            })
            .await;
            tokio::time::sleep(STATE_GAUGE_INTERVAL).await;
        }
    });

    let loader_failed = async {
        while !loader.is_finished() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    tokio::select! {
        _ = shutdown => tracing::info!("shutting down"),
        _ = done_rx => tracing::error!("the consumer stopped on its own"),
        _ = loader_failed => tracing::error!("the table loader stopped on its own"),
    }
    stop.store(true, Ordering::Relaxed);
    let result = tokio::task::spawn_blocking(move || consumer_thread.join()).await?;
    // Leave the membership once the partitions are handed over, so queries go on finding
    // this replica until its successors announce them.
    tokio::task::spawn_blocking(move || announcer.stop()).await?;
    gauges.abort();
    let _ = http_stop_tx.send(());
    let _ = server.await;
    let loaded = tokio::task::spawn_blocking(move || loader.stop()).await?;
    match result {
        Ok(r) => r.and(loaded),
        Err(_) => Err(anyhow::anyhow!("the consumer thread panicked")),
    }
}

/// The directory beside `dir` named like it with `suffix`.
fn beside(dir: &std::path::Path, suffix: &str) -> std::path::PathBuf {
    let mut name = dir.as_os_str().to_os_string();
    name.push(suffix);
    name.into()
}

/// Opens the state store for `topo`. One that sled finds damaged (checksums, a file cut
/// short) is moved aside to `<dir>.damaged` (replacing an older one) and started afresh: its
/// partitions are then restored from the changelogs, or recomputed from the source topics
/// without them, as on a lost disk. Counted in `tally_store_rebuilds_total`.
fn open_store(cfg: &Config, topo: &Topology, metrics: &Metrics) -> anyhow::Result<Store> {
    let (dir, migrate) = (&cfg.state.dir, cfg.state.migrate == crate::config::MigrateMode::Auto);
    match Store::open_current(dir, topo, migrate) {
        Err(e) if e.is_damaged() => {
            let aside = beside(dir, ".damaged");
            let from = if topo.changelog { "the changelogs" } else { "the source topics" };
            tracing::error!(error = %e, dir = %dir.display(), moved_to = %aside.display(), "the state store is damaged: moving it aside and rebuilding the state from {from}");
            if aside.exists() {
                std::fs::remove_dir_all(&aside).with_context(|| format!("removing the older damaged store {}", aside.display()))?;
            }
            std::fs::rename(dir, &aside).with_context(|| format!("moving the damaged store to {}", aside.display()))?;
            metrics.store_rebuilds.inc();
            Ok(Store::open_current(dir, topo, migrate)?)
        }
        r => Ok(r?),
    }
}

/// Backoff between attempts to reach the brokers at start: doubling from the first, capped.
const BROKER_BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// Reads the source topics' partition counts (creating missing internal topics), trying
/// again with capped backoff while the brokers cannot be reached or a source topic does not
/// exist yet, with a log line per attempt. Meanwhile the HTTP listener serves the
/// start-up routes ([`http::serve_starting`]). `None`: shut down while waiting.
async fn wait_for_brokers(
    kafka: &crate::config::KafkaConfig,
    topo: &Topology,
    listener: tokio::net::TcpListener,
    (metrics, faults, access): (&Metrics, &Arc<Faults>, &Arc<http::Access>),
    shutdown: impl Future<Output = ()> + Unpin,
) -> anyhow::Result<Option<(Vec<i32>, tokio::net::TcpListener)>> {
    let std_listener = listener.into_std()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let starting = tokio::spawn(http::serve_starting(
        metrics.clone(),
        Arc::clone(faults),
        Arc::clone(access),
        tokio::net::TcpListener::from_std(std_listener.try_clone()?)?,
        async {
            let _ = stop_rx.await;
        },
    ));
    let give_up = kafka.exit_on_broker_timeout_ms()?.map(Duration::from_millis);
    let started = std::time::Instant::now();
    let mut backoff = BROKER_BACKOFF.0;
    let mut shutdown = shutdown;
    let partitions = loop {
        // Asking the brokers can take seconds before it times out: a shutdown meanwhile
        // does not wait for it.
        let asked = tokio::select! {
            asked = topics::ensure(kafka, topo) => asked,
            _ = &mut shutdown => break None,
        };
        let why = match asked {
            Ok(counts) => match source_partitions(topo, counts) {
                Ok(p) => break Some(p),
                Err(missing) => missing,
            },
            Err(e) if e.is::<topics::NotYet>() => format!("{e:#}"),
            Err(e) => return Err(e),
        };
        let attempts = faults.failed(Link::Brokers, why.clone());
        if give_up.is_some_and(|t| started.elapsed() >= t) {
            anyhow::bail!("the brokers did not answer within --exit-on-broker-timeout ({attempts} attempts): {why}");
        }
        tracing::warn!(attempt = attempts, retry_in = ?backoff, error = %why, "waiting for the brokers; tally is up (/health) but not ready");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = &mut shutdown => break None,
        }
        backoff = (backoff * 2).min(BROKER_BACKOFF.1);
    };
    let _ = stop_tx.send(());
    let _ = starting.await;
    if let (Some(f), Some(_)) = (faults.recovered(Link::Brokers), &partitions) {
        tracing::info!(attempts = f.attempts, "the brokers answered");
    }
    Ok(partitions.map(|p| Ok::<_, std::io::Error>((p, tokio::net::TcpListener::from_std(std_listener)?))).transpose()?)
}

/// Every source's partition count; `Err` names a source topic that does not exist (every
/// answer covers every partition of its source, so their number must be known).
fn source_partitions(topo: &Topology, counts: Vec<Option<i32>>) -> Result<Vec<i32>, String> {
    topo.sources
        .iter()
        .zip(counts)
        .map(|(s, n)| n.ok_or_else(|| format!("source topic `{}` (source `{}`) does not exist; create it first", s.topic, s.name)))
        .collect()
}

/// Records what each metric is in the store, refusing one the store remembers with another
/// layout (its states are another metric's); the others go on.
fn remember_metrics(topo: &Topology, store: &Store, tasks: &mut TaskSet) -> anyhow::Result<()> {
    for (mi, m) in topo.metrics.iter().enumerate() {
        match store.manifest(&m.name)? {
            // A new rebuild token replaces whatever the store holds.
            Some(stored) if stored.layout != m.layout.text && (m.rebuild.is_none() || stored.rebuild == m.rebuild) => tasks.refuse(
                mi,
                &crate::store::StoreError::Layout {
                    metric: m.name.clone(),
                    stored: format!("layout `{}`", stored.layout),
                    configured: m.layout.text.clone(),
                },
            ),
            _ => store.put_manifest(m)?,
        }
    }
    Ok(())
}

/// Who this replica is to the others: its configured name and URL, by default named after
/// the address its HTTP server is bound to.
fn identity(topo: &Topology, bound: SocketAddr) -> Identity {
    let url = topo.cluster.advertised_url.clone().unwrap_or_else(|| format!("http://{bound}"));
    if topo.cluster.advertised_url.is_none() && bound.ip().is_unspecified() {
        tracing::warn!(%bound, "http.listen is a wildcard address: set http.advertised_url (or --advertised-url) so other replicas can reach this one");
    }
    Identity { replica: topo.cluster.replica.clone().unwrap_or_else(|| bound.to_string()), url }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("installing a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
