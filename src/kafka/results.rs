//! The result topic on Kafka: one replica — the owner of the first source's partition 0,
//! so exactly one while the group is stable, and it moves with that partition — reads every
//! changelog partition into a [`ResultView`] and sends the view's rows.
//!
//! The view is rebuilt from the changelogs whenever a replica takes the role: nothing is
//! kept across owners, so there is nothing to hand over. Rows are sent only once the view
//! has read each changelog up to where it ended when the role was taken, so a window is
//! never judged on a half-read log. Sends are acknowledged before the view drops what they
//! covered; after a crash the next owner sends some rows again, with the same values.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::BaseRecord;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::delivery;
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::results::ResultView;
use crate::topology::Topology;

/// How long a failed emitter waits before building its view again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The running result emitter of this replica.
pub struct ResultEmitter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ResultEmitter {
    /// Starts emitting on its own thread, with its view in `dir`.
    pub fn start(kafka: &KafkaConfig, topo: Arc<Topology>, dir: PathBuf, metrics: Metrics) -> ResultEmitter {
        let stop = Arc::new(AtomicBool::new(false));
        let (kafka, flag) = (kafka.clone(), Arc::clone(&stop));
        let spawned = std::thread::Builder::new().name("tally-results".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match emit(&kafka, &topo, &dir, &metrics, &flag) {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "result emitter failed; rebuilding its view");
                        std::thread::sleep(RETRY_AFTER);
                    }
                }
            }
        });
        let thread = match spawned {
            Ok(t) => {
                tracing::info!("result emitter started");
                Some(t)
            }
            Err(e) => {
                tracing::error!(error = %e, "could not start the result emitter; no rows are sent");
                None
            }
        };
        ResultEmitter { stop, thread }
    }

    /// Stops it and waits until it has: no row is sent after this returns.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        tracing::info!("result emitter stopped");
    }
}

/// Builds the view and sends its rows until `stop` is set.
fn emit(kafka: &KafkaConfig, topo: &Arc<Topology>, dir: &std::path::Path, metrics: &Metrics, stop: &AtomicBool) -> anyhow::Result<()> {
    let consumer: BaseConsumer = super::client_config(
        kafka,
        // A group id librdkafka insists on; the view is rebuilt from the beginning by every
        // new owner, so nothing is committed.
        &[
            ("group.id", &format!("{}-results", topo.application_id)),
            ("enable.auto.commit", "false"),
            ("queued.min.messages", "1000000"),
            // 16 MiB of prefetch (librdkafka: 64 MiB).
            ("queued.max.messages.kbytes", "16384"),
            ("fetch.queue.backoff.ms", "20"),
            ("fetch.wait.max.ms", "50"),
        ],
    )
    .create()
    .context("creating the result view's consumer")?;
    let topics: Vec<String> = (0..topo.sources.len()).map(|s| topo.changelog_topic(s)).collect();
    let source_of: HashMap<&str, usize> = topics.iter().enumerate().map(|(s, t)| (t.as_str(), s)).collect();
    let meta = consumer.fetch_metadata(None, Duration::from_secs(10)).context("reading the changelogs' metadata")?;
    let mut partitions = vec![0; topics.len()];
    let mut tpl = TopicPartitionList::new();
    // Offset of the last record each changelog partition held when the role was taken.
    let mut catching_up: HashMap<(usize, i32), i64> = HashMap::new();
    for (s, topic) in topics.iter().enumerate() {
        let t = meta
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .with_context(|| format!("changelog topic `{topic}` is missing"))?;
        partitions[s] = t.partitions().len() as i32;
        for p in 0..partitions[s] {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(30))
                .with_context(|| format!("reading the offsets of {topic} partition {p}"))?;
            if high > low {
                catching_up.insert((s, p), high - 1);
            }
        }
    }
    consumer.assign(&tpl)?;
    let producer = delivery::producer(kafka, "result", delivery::Retries::Bounded, None)?;
    let mut view = ResultView::open(Arc::clone(topo), dir, &partitions)?;
    let interval = Duration::from_millis(topo.commit_interval_ms);
    let started = Instant::now();
    let mut caught_up = catching_up.is_empty();
    let mut last_send = Instant::now();
    let mut reported = (0u64, vec![0u64; view.skipped.len()]);
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(20)) {
            None => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "result view consumer error");
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(Ok(msg)) => {
                let Some(&s) = source_of.get(msg.topic()) else { continue };
                view.apply(msg.key().unwrap_or_default(), msg.payload())?;
                if catching_up.get(&(s, msg.partition())).is_some_and(|last| msg.offset() >= *last) {
                    catching_up.remove(&(s, msg.partition()));
                }
            }
        }
        if !caught_up && catching_up.is_empty() {
            caught_up = true;
            view.caught_up()?;
            tracing::info!(
                records = view.stats.applied + view.stats.ignored,
                seconds = started.elapsed().as_secs_f64(),
                "result view built from the changelogs"
            );
        }
        if !caught_up || last_send.elapsed() < interval {
            continue;
        }
        last_send = Instant::now();
        let rows = view.take()?;
        for r in &rows {
            delivery::send(&producer, BaseRecord::with_opaque_to(&topo.results_topic, 0).key(&r.key[..]).payload(&r.value[..]))
                .with_context(|| format!("producing to {}", topo.results_topic))?;
        }
        delivery::await_acks(&producer).map_err(|e| anyhow::anyhow!("result topic {}: {e}", topo.results_topic))?;
        view.commit()?;
        for r in &rows {
            metrics.results_sent.with_label_values(&[view.output_name(r.metric)]).inc();
        }
        let read = view.stats.applied + view.stats.ignored;
        metrics.results_view_records.inc_by(read - reported.0);
        reported.0 = read;
        for (i, &n) in view.skipped.iter().enumerate() {
            if n > reported.1[i] {
                metrics.results_skipped.with_label_values(&[view.output_name(i)]).inc_by(n - reported.1[i]);
                tracing::warn!(
                    metric = view.output_name(i),
                    windows = n - reported.1[i],
                    "windows left out of the result topic: a partition may have expired them before the view read them"
                );
                reported.1[i] = n;
            }
        }
        for (s, src) in topo.sources.iter().enumerate() {
            if let Some(f) = view.sent_frontier(s) {
                metrics.results_frontier.with_label_values(&[&src.name]).set(f.div_euclid(1000));
            }
        }
    }
    Ok(())
}
