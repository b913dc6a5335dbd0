//! The source consumer: one consumer-group member per replica, polling on its own thread
//! and feeding the [`TaskSet`].
//!
//! The order of durable steps is what makes a crash safe at any point:
//!
//! 1. records are folded into the write-back cache (memory only);
//! 2. every commit interval: dead-letter/late records are flushed to Kafka, then the dirty
//!    aggregates **and** the partition positions they correspond to are written to sled in
//!    one atomic batch and fsynced;
//! 3. only then are the positions committed to the consumer group.
//!
//! A crash before 2 loses only memory: the store still holds the previous consistent cut,
//! and consumption resumes from the store's position (preferred over the group's, which can
//! only be older). A crash between 2 and 3 leaves the group's offset behind the store: the
//! store's position wins again. So no record is skipped, and none is counted twice while
//! the store survives.
//!
//! On revocation the partition is flushed and committed before it is released.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::KafkaResult;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use super::side::{Origin, SideOutputs};
use crate::config::KafkaConfig;
use crate::metrics::Metrics;
use crate::task::{Outcome, TaskSet, NO_WATERMARK};
use crate::topology::Topology;

/// Shared between the poll loop and librdkafka's callbacks (which run inside `poll`, on the
/// same thread, so the lock is never contended).
pub struct Shared {
    tasks: Mutex<TaskSet>,
    topo: Arc<Topology>,
    side: SideOutputs,
    metrics: Metrics,
    ready: Arc<AtomicBool>,
    /// Kafka timestamps of records processed since the last flush, for the
    /// produce-to-queryable histogram.
    pending: Mutex<Vec<i64>>,
}

/// The consumer's context: rebalance handling and statistics.
pub struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        let topo = &self.shared.topo;
        for (topic, t) in &stats.topics {
            let Some(src) = topo.sources.iter().find(|s| &s.topic == topic) else { continue };
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.shared.metrics.consumer_lag.with_label_values(&[&src.name, &p.to_string()]).set(part.consumer_lag);
                }
            }
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Shared {
    fn tasks(&self) -> MutexGuard<'_, TaskSet> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn source_of(&self, topic: &str) -> Option<usize> {
        self.topo.sources.iter().position(|s| s.topic == topic)
    }

    /// Flushes side outputs and state, then commits the owned positions (or `only` those).
    fn flush_and_commit(&self, consumer: &BaseConsumer<SourceContext>, only: Option<&TopicPartitionList>) -> anyhow::Result<()> {
        let started = Instant::now();
        self.side.flush(Duration::from_secs(30))?;
        let mut tasks = self.tasks();
        let stats = tasks.flush()?;
        let flushed_at = now_ms();
        self.metrics.flush_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.state_writes.inc_by(stats.puts as u64);
        self.metrics.state_deletes.inc_by(stats.deletes as u64);
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let local = self.metrics.queryable_latency.local();
            for ts in pending.drain(..) {
                local.observe((flushed_at - ts).max(0) as f64 / 1000.0);
            }
            local.flush();
        }
        let mut tpl = TopicPartitionList::new();
        for (&(source, partition), task) in tasks.tasks() {
            let topic = &self.topo.sources[source].topic;
            if only.is_some_and(|o| o.find_partition(topic, partition).is_none()) {
                continue;
            }
            if task.next_offset > 0 {
                tpl.add_partition_offset(topic, partition, Offset::Offset(task.next_offset))?;
            }
            if task.watermark != NO_WATERMARK {
                let (name, p) = (&self.topo.sources[source].name, partition.to_string());
                self.metrics.watermark.with_label_values(&[name, &p]).set(task.watermark.div_euclid(1000));
                self.metrics.watermark_lag.with_label_values(&[name, &p]).set((flushed_at - task.watermark).div_euclid(1000));
            }
        }
        drop(tasks);
        if tpl.count() > 0 {
            let started = Instant::now();
            // Synchronous on revocation: the next owner must see the position.
            let mode = if only.is_some() { CommitMode::Sync } else { CommitMode::Async };
            if let Err(e) = consumer.commit(&tpl, mode) {
                tracing::warn!(error = %e, "offset commit failed; the store's positions still hold, so nothing is lost");
            }
            self.metrics.commit_duration.observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    fn on_assign(&self, tpl: &mut TopicPartitionList) {
        let mut tasks = self.tasks();
        // The store's position is where its state ends. With no state for a partition, the
        // group's committed offset would skip records whose aggregates are gone: read from
        // the beginning instead (until changelog restore exists, that is the only way back).
        let mut resumed = Vec::new();
        for e in tpl.elements() {
            let Some(source) = self.source_of(e.topic()) else { continue };
            match tasks.assign(source, e.partition()) {
                Ok(Some(off)) => resumed.push((e.topic().to_string(), e.partition(), Offset::Offset(off))),
                Ok(None) => resumed.push((e.topic().to_string(), e.partition(), Offset::Beginning)),
                Err(err) => tracing::error!(topic = e.topic(), partition = e.partition(), error = %err, "reading the partition's stored position failed; resuming from the group's"),
            }
        }
        for (topic, p, off) in &resumed {
            let _ = tpl.set_partition_offset(topic, *p, *off);
        }
        let owned = tasks.tasks().count();
        drop(tasks);
        self.metrics.partitions_owned.set(owned as i64);
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        tracing::info!(partitions = ?tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect::<Vec<_>>(), resumed_from_store = resumed.iter().filter(|r| r.2 != Offset::Beginning).count(), "partitions assigned");
        self.ready.store(true, Ordering::Relaxed);
    }

    fn on_revoke(&self, consumer: &BaseConsumer<SourceContext>, tpl: &TopicPartitionList) {
        if consumer.assignment_lost() {
            tracing::warn!("partitions lost (session timed out): dropping them without committing");
        } else if let Err(e) = self.flush_and_commit(consumer, Some(tpl)) {
            tracing::error!(error = %e, "flush before revocation failed; the next owner replays from the last commit");
        }
        let mut tasks = self.tasks();
        for e in tpl.elements() {
            if let Some(source) = self.source_of(e.topic()) {
                tasks.revoke(source, e.partition());
            }
        }
        let owned = tasks.tasks().count();
        drop(tasks);
        self.metrics.partitions_owned.set(owned as i64);
        self.metrics.rebalances.with_label_values(&["revoke"]).inc();
        tracing::info!(partitions = ?tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect::<Vec<_>>(), "partitions revoked");
    }
}

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result: KafkaResult<()> = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.shared.on_assign(tpl);
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.on_revoke(consumer, tpl);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!(error = %e, "applying the rebalance failed");
        }
    }
}

/// A running source consumer.
pub struct SourceConsumer {
    consumer: BaseConsumer<SourceContext>,
    shared: Arc<Shared>,
}

impl SourceConsumer {
    /// Joins the consumer group and subscribes to every source topic.
    pub fn new(kafka: &KafkaConfig, tasks: TaskSet, side: SideOutputs, metrics: Metrics, ready: Arc<AtomicBool>) -> anyhow::Result<SourceConsumer> {
        let topo = Arc::clone(tasks.topology());
        let shared = Arc::new(Shared { tasks: Mutex::new(tasks), topo: Arc::clone(&topo), side, metrics, ready, pending: Mutex::new(Vec::new()) });
        let consumer: BaseConsumer<SourceContext> = super::client_config(
            kafka,
            &[
                ("group.id", &topo.application_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("statistics.interval.ms", "1000"),
                ("fetch.wait.max.ms", "100"),
                // librdkafka's default prefetch (100k messages) starves a consumer that
                // processes faster than one fetch round trip refills it: measured 133k vs
                // 490k events/s on S1 (`tally bench`).
                ("queued.min.messages", "1000000"),
                // With that much prefetched, a full queue made librdkafka pause fetching for
                // its default 1 s; records produced then waited it out (p99 to queryable
                // 0.94–1.41 s before, 0.82–0.96 s after, at 20k events/s).
                ("fetch.queue.backoff.ms", "20"),
            ],
        )
        .create_with_context(SourceContext { shared: Arc::clone(&shared) })
        .map_err(|e| anyhow::anyhow!("creating the consumer for {}: {e}", kafka.bootstrap_servers))?;
        let topics: Vec<&str> = topo.sources.iter().map(|s| s.topic.as_str()).collect();
        consumer.subscribe(&topics).map_err(|e| anyhow::anyhow!("subscribing to {topics:?}: {e}"))?;
        Ok(SourceConsumer { consumer, shared })
    }

    /// Polls and processes until `stop` is set, flushing and committing every commit
    /// interval; on stop, flushes, commits and leaves the group.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        let interval = Duration::from_millis(self.shared.topo.commit_interval_ms);
        let mut last_flush = Instant::now();
        let sources: HashMap<String, usize> = self.shared.topo.sources.iter().enumerate().map(|(i, s)| (s.topic.clone(), i)).collect();
        let mut local = Batch::new(&self.shared);
        while !stop.load(Ordering::Relaxed) {
            match self.consumer.poll(Duration::from_millis(20)) {
                None => {}
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(Ok(msg)) => {
                    if let Some(&source) = sources.get(msg.topic()) {
                        self.handle(source, &msg, &mut local)?;
                    }
                }
            }
            if last_flush.elapsed() >= interval {
                local.publish(&self.shared);
                self.shared.flush_and_commit(&self.consumer, None)?;
                last_flush = Instant::now();
            }
        }
        self.shared.ready.store(false, Ordering::Relaxed);
        local.publish(&self.shared);
        self.shared.flush_and_commit(&self.consumer, None)?;
        self.consumer.unsubscribe();
        // Serve the revocation callback so the group rebalances now, not at session timeout.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
        tracing::info!("consumer stopped: state flushed, offsets committed, group left");
        Ok(())
    }

    fn handle(&self, source: usize, msg: &BorrowedMessage<'_>, local: &mut Batch) -> anyhow::Result<()> {
        let shared = &self.shared;
        let payload = msg.payload().unwrap_or_default();
        let (partition, offset) = (msg.partition(), msg.offset());
        let kafka_ts = msg.timestamp().to_millis();
        let outcome = shared.tasks().process(source, partition, offset, kafka_ts, payload)?;
        local.consumed[source] += 1;
        let origin = || Origin { topic: msg.topic(), partition, offset, key: msg.key(), payload };
        match outcome {
            Outcome::Processed { late } => {
                local.processed[source] += 1;
                if let Some(ts) = kafka_ts {
                    local.processing.observe((now_ms() - ts).max(0) as f64 / 1000.0);
                    local.timestamps.push(ts);
                }
                if !late.is_empty() {
                    let names: Vec<&str> = late.iter().map(|&m| shared.topo.metrics[m].name.as_str()).collect();
                    for &m in &late {
                        local.late[m] += 1;
                    }
                    shared.side.late(&origin(), &names.join(","));
                }
            }
            Outcome::Invalid(e) => {
                shared.metrics.records_invalid.with_label_values(&[&shared.topo.sources[source].name, e.reason()]).inc();
                shared.side.dead_letter(&origin(), e.reason(), &e.to_string());
            }
            Outcome::AlreadyApplied => local.replayed[source] += 1,
        }
        Ok(())
    }
}

/// Per-record counts kept locally and published once per flush: atomic counter updates
/// per record would be a measurable share of the hot path.
struct Batch {
    consumed: Vec<u64>,
    processed: Vec<u64>,
    replayed: Vec<u64>,
    late: Vec<u64>,
    timestamps: Vec<i64>,
    processing: prometheus::local::LocalHistogram,
}

impl Batch {
    fn new(shared: &Shared) -> Batch {
        let (s, m) = (shared.topo.sources.len(), shared.topo.metrics.len());
        Batch {
            consumed: vec![0; s],
            processed: vec![0; s],
            replayed: vec![0; s],
            late: vec![0; m],
            timestamps: Vec::new(),
            processing: shared.metrics.processing_latency.local(),
        }
    }

    fn publish(&mut self, shared: &Shared) {
        for (i, src) in shared.topo.sources.iter().enumerate() {
            let l = [src.name.as_str()];
            shared.metrics.records_consumed.with_label_values(&l).inc_by(std::mem::take(&mut self.consumed[i]));
            shared.metrics.records_processed.with_label_values(&l).inc_by(std::mem::take(&mut self.processed[i]));
            shared.metrics.records_replayed.with_label_values(&l).inc_by(std::mem::take(&mut self.replayed[i]));
        }
        for (i, m) in shared.topo.metrics.iter().enumerate() {
            let n = std::mem::take(&mut self.late[i]);
            if n > 0 {
                shared.metrics.records_late.with_label_values(&[&m.name]).inc_by(n);
            }
        }
        self.processing.flush();
        shared.pending.lock().unwrap_or_else(|p| p.into_inner()).append(&mut self.timestamps);
    }
}
