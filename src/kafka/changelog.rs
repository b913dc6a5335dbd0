//! Changelog topics on Kafka: the producer every flush writes through, and the reader that
//! restores a partition's store when this replica takes the partition over. The record
//! format and the restore plan are in [`crate::changelog`].

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::delivery::{self, DeliveryContext};

use crate::changelog::{self, Change, ChangeSink, ChangelogError, Plan, Restoration, RestoreStats};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::ownership::{Ownership, PartitionState};
use crate::store::Store;
use crate::topology::Topology;

/// A restore that reads nothing for this long fails instead of hanging.
const RESTORE_STALL: Duration = Duration::from_secs(60);

/// Writes flushes to the changelog topics (one per source, see
/// [`Topology::changelog_topic`]). Idempotent, so a retried batch is not duplicated and
/// records of a partition land in the order sent.
pub struct ChangelogProducer {
    producer: BaseProducer<DeliveryContext>,
    topics: Vec<String>,
}

impl ChangelogProducer {
    /// A producer to the changelog topics of `topo`.
    pub fn new(kafka: &KafkaConfig, topo: &Topology) -> anyhow::Result<ChangelogProducer> {
        Ok(ChangelogProducer {
            producer: delivery::producer(kafka, "changelog")?,
            topics: (0..topo.sources.len()).map(|s| topo.changelog_topic(s)).collect(),
        })
    }

    fn send(&self, c: &Change, slot: usize) -> Result<(), ChangelogError> {
        let mut rec = BaseRecord::with_opaque_to(&self.topics[c.source], slot).partition(c.partition).key(&c.key[..]);
        if let Some(v) = &c.value {
            rec = rec.payload(&v[..]);
        }
        delivery::send(&self.producer, rec).map_err(|e| ChangelogError(format!("producing to {}: {e}", self.topics[c.source])))
    }

    fn await_acks(&self) -> Result<(), ChangelogError> {
        delivery::await_acks(&self.producer).map_err(ChangelogError)
    }
}

impl ChangeSink for ChangelogProducer {
    fn write(&mut self, changes: &[Change], positions: &[Change]) -> Result<Vec<i64>, ChangelogError> {
        // Changes first, acknowledged, then positions: a position record in the log means
        // every change before it is there too.
        for c in changes {
            self.send(c, 0)?;
        }
        self.await_acks()?;
        *self.producer.context().offsets.lock().unwrap_or_else(|p| p.into_inner()) = vec![-1; positions.len()];
        for (i, c) in positions.iter().enumerate() {
            self.send(c, i + 1)?;
        }
        self.await_acks()?;
        let offsets = std::mem::take(&mut *self.producer.context().offsets.lock().unwrap_or_else(|p| p.into_inner()));
        if offsets.contains(&-1) {
            return Err(ChangelogError("a position record was acknowledged without an offset".into()));
        }
        Ok(offsets)
    }
}

/// One partition being restored.
struct Pending {
    source: usize,
    partition: i32,
    /// Offset of the last record to read (the high watermark at the start, minus one).
    last: i64,
    /// Records to read at most.
    total: u64,
    restoration: Restoration,
    /// What of `restoration.stats` the counters already hold.
    reported: RestoreStats,
}

impl Pending {
    /// Adds to the restore counters what was read since the last call.
    fn publish(&mut self, metrics: &Metrics, topo: &Topology) {
        let (now, l) = (self.restoration.stats, [topo.sources[self.source].name.as_str()]);
        metrics.restore_records.with_label_values(&l).inc_by(now.records - self.reported.records);
        metrics.restore_bytes.with_label_values(&l).inc_by(now.bytes - self.reported.bytes);
        metrics.restore_rejected.with_label_values(&l).inc_by(now.rejected - self.reported.rejected);
        self.reported = now;
    }
}

/// Brings the local store of each `(source, partition)` up to date with its changelog,
/// reading only the tail after a valid local checkpoint. Progress is published to `owned`
/// (each partition is `Restoring` until done), to the metrics and to the log. Returns what
/// was read, summed over the partitions.
pub fn restore(
    kafka: &KafkaConfig,
    topo: &Topology,
    store: &Store,
    parts: &[(usize, i32)],
    owned: &Ownership,
    metrics: &Metrics,
) -> anyhow::Result<RestoreStats> {
    let mut total = RestoreStats::default();
    if parts.is_empty() {
        return Ok(total);
    }
    let started = Instant::now();
    let consumer: BaseConsumer = super::client_config(
        kafka,
        // librdkafka wants a group id even for manually assigned partitions; this consumer
        // never joins it nor commits.
        &[
            ("group.id", &format!("{}-restore", topo.application_id)),
            ("enable.auto.commit", "false"),
            ("queued.min.messages", "1000000"),
            ("fetch.queue.backoff.ms", "20"),
            ("enable.partition.eof", "true"),
            ("fetch.max.bytes", "52428800"),
            ("max.partition.fetch.bytes", "10485760"),
            ("fetch.wait.max.ms", "50"),
        ],
    )
    .create()
    .map_err(|e| anyhow::anyhow!("creating the restore consumer: {e}"))?;
    let topics: Vec<String> = (0..topo.sources.len()).map(|s| topo.changelog_topic(s)).collect();
    let mut pending: HashMap<(usize, i32), Pending> = HashMap::new();
    let mut finished = Vec::new();
    let mut tpl = TopicPartitionList::new();
    for &(source, partition) in parts {
        let topic = &topics[source];
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("reading the offsets of {topic} partition {partition}: {e}"))?;
        let local = store.partition_meta(&topo.sources[source].name, partition)?;
        let (from, scratch) = match changelog::plan(local, low, high) {
            Plan::UpToDate => {
                tracing::info!(topic, partition, checkpoint = high - 1, "local state is up to date with the changelog");
                owned.set(source, partition, PartitionState::Active);
                continue;
            }
            Plan::Tail(from) => (from, false),
            Plan::Scratch => (low, true),
        };
        let restoration = Restoration::begin(store, topo, source, partition, scratch)?;
        if from >= high {
            // An empty changelog: nothing to read, but the wipe above stands.
            restoration.finish(high - 1)?;
            finished.push((source, partition));
            continue;
        }
        let total = (high - from) as u64;
        tracing::info!(topic, partition, from, to = high, records = total, from_checkpoint = from != low, "restoring");
        owned.set(source, partition, PartitionState::Restoring { restored: 0, total });
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
        pending.insert((source, partition), Pending { source, partition, last: high - 1, total, restoration, reported: RestoreStats::default() });
    }
    let remaining = |pending: &HashMap<(usize, i32), Pending>| {
        pending.values().map(|p| p.total.saturating_sub(p.restoration.stats.records + p.restoration.stats.rejected)).sum::<u64>()
    };
    metrics.partitions_restoring.set(pending.len() as i64);
    metrics.restore_remaining.set(remaining(&pending) as i64);
    if !pending.is_empty() {
        consumer.assign(&tpl).map_err(|e| anyhow::anyhow!("assigning the changelog partitions: {e}"))?;
    }
    let (mut last_read, mut last_log) = (Instant::now(), Instant::now());
    let mut done = Vec::new();
    while !pending.is_empty() {
        match consumer.poll(Duration::from_millis(100)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // EOF is where the log ended when fetched, which is at or past `last`. It
                // does not name the topic: check every source's partition `p`.
                let positions = consumer.position().ok();
                for (&key, pend) in pending.iter().filter(|((_, q), _)| *q == p) {
                    let position = positions.as_ref().and_then(|tp| tp.find_partition(&topics[key.0], p)).and_then(|e| e.offset().to_raw());
                    if position.is_some_and(|o| o > pend.last) {
                        done.push(key);
                    }
                }
            }
            Some(Err(e)) => tracing::warn!(error = %e, "changelog read error; retrying"),
            Some(Ok(m)) => {
                last_read = Instant::now();
                let key = (topics.iter().position(|t| t == m.topic()).unwrap_or(usize::MAX), m.partition());
                if let Some(p) = pending.get_mut(&key) {
                    if m.offset() <= p.last {
                        p.restoration.apply(m.key().unwrap_or_default(), m.payload())?;
                    }
                    if m.offset() >= p.last {
                        done.push(key);
                    }
                }
            }
        }
        for key in done.drain(..) {
            let Some(mut p) = pending.remove(&key) else { continue };
            p.publish(metrics, topo);
            let (position, stats) = p.restoration.finish(p.last)?;
            total += stats;
            tracing::info!(
                topic = topics[key.0],
                partition = p.partition,
                records = stats.records,
                keys = stats.keys_written,
                bytes = stats.bytes,
                rejected = stats.rejected,
                resume_at = position.map(|m| m.next_offset),
                "restored"
            );
            finished.push((p.source, p.partition));
            let _ = consumer.incremental_unassign(&{
                let mut t = TopicPartitionList::new();
                t.add_partition(&topics[key.0], key.1);
                t
            });
        }
        if last_log.elapsed() >= Duration::from_secs(1) {
            last_log = Instant::now();
            for p in pending.values_mut() {
                owned.set(p.source, p.partition, PartitionState::Restoring { restored: p.restoration.stats.records, total: p.total });
                p.publish(metrics, topo);
            }
            metrics.partitions_restoring.set(pending.len() as i64);
            metrics.restore_remaining.set(remaining(&pending) as i64);
            tracing::info!(partitions = pending.len(), remaining = remaining(&pending), "restore in progress");
        }
        if !pending.is_empty() && last_read.elapsed() > RESTORE_STALL {
            anyhow::bail!("restore stalled: nothing read from the changelog for {RESTORE_STALL:?}, {} records still missing", remaining(&pending));
        }
    }
    if finished.is_empty() {
        return Ok(total);
    }
    // One fsync for all: the partitions are processed only after this returns.
    store.flush()?;
    for (source, partition) in finished {
        owned.set(source, partition, PartitionState::Active);
    }
    metrics.partitions_restoring.set(0);
    metrics.restore_remaining.set(0);
    metrics.restore_duration.observe(started.elapsed().as_secs_f64());
    Ok(total)
}
