//! Side outputs: records that could not be decoded go to the dead-letter topic, records
//! too late for a metric go to the late-records topic — each with headers saying why and
//! where it came from. Producing never blocks processing: a full queue is counted as a
//! failure, not waited on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;

use crate::config::KafkaConfig;
use crate::metrics::Metrics;

/// Where a set-aside record came from.
pub struct Origin<'a> {
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: i32,
    /// Source offset.
    pub offset: i64,
    /// Record key.
    pub key: Option<&'a [u8]>,
    /// Record payload.
    pub payload: &'a [u8],
}

/// Counts records whose delivery failed, so a flush can refuse to let their source offsets
/// be committed.
pub struct SideContext {
    failed: AtomicU64,
    metrics: Metrics,
}

impl ClientContext for SideContext {}

impl ProducerContext for SideContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            self.metrics.set_aside_failures.inc();
            tracing::warn!(error = %e, "a dead-letter/late record was not delivered");
        }
    }
}

/// The producer of the dead-letter and late-records topics.
pub struct SideOutputs {
    producer: ThreadedProducer<SideContext>,
    dead_letter_topic: String,
    late_topic: String,
    metrics: Metrics,
}

impl SideOutputs {
    /// A producer to the user's cluster.
    pub fn new(kafka: &KafkaConfig, dead_letter_topic: String, late_topic: String, metrics: Metrics) -> anyhow::Result<SideOutputs> {
        let producer = super::client_config(
            kafka,
            &[
                ("enable.idempotence", "true"),
                ("linger.ms", "5"),
                ("queue.buffering.max.messages", "100000"),
                // 16 MiB, not librdkafka's 1 GiB: past it a record set aside counts as failed.
                ("queue.buffering.max.kbytes", "16384"),
                super::delivery::BOUNDED_RETRIES[0],
                super::delivery::BOUNDED_RETRIES[1],
            ],
        )
        .create_with_context(SideContext { failed: AtomicU64::new(0), metrics: metrics.clone() })
        .map_err(|e| anyhow::anyhow!("creating the dead-letter producer: {e}"))?;
        Ok(SideOutputs { producer, dead_letter_topic, late_topic, metrics })
    }

    fn send(&self, topic: &str, kind: &str, origin: &Origin, extra: &[(&str, &str)]) {
        let (p, o) = (origin.partition.to_string(), origin.offset.to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: "tally.origin.topic", value: Some(origin.topic) })
            .insert(Header { key: "tally.origin.partition", value: Some(&p) })
            .insert(Header { key: "tally.origin.offset", value: Some(&o) });
        for (k, v) in extra {
            headers = headers.insert(Header { key: k, value: Some(*v) });
        }
        let mut rec = BaseRecord::<[u8], [u8]>::to(topic).payload(origin.payload).headers(headers);
        if let Some(k) = origin.key {
            rec = rec.key(k);
        }
        match self.producer.send(rec) {
            Ok(()) => self.metrics.records_set_aside.with_label_values(&[kind]).inc(),
            Err((e, _)) => {
                self.metrics.set_aside_failures.inc();
                tracing::warn!(topic, error = %e, "could not set a record aside");
            }
        }
    }

    /// Sends an undecodable record to the dead-letter topic with its reason.
    pub fn dead_letter(&self, origin: &Origin, reason: &str, detail: &str) {
        self.send(&self.dead_letter_topic, "dead_letter", origin, &[("tally.reason", reason), ("tally.error", detail)]);
    }

    /// Sends a record to the late-records topic, naming the metrics it was late for.
    pub fn late(&self, origin: &Origin, metrics: &str) {
        self.send(&self.late_topic, "late", origin, &[("tally.reason", "late"), ("tally.late.metrics", metrics)]);
    }

    /// Waits until everything sent so far is acknowledged (before offsets are committed,
    /// so a crash cannot lose a set-aside record whose source offset was committed).
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        if self.producer.in_flight_count() > 0 {
            // A zero-timeout flush sends what lingers now. rdkafka's own flush then waits in
            // 100 ms polls of a queue that the producer's background thread drains, so it
            // never returns sooner; waiting on the count returns as soon as all are acked.
            let _ = self.producer.flush(Duration::ZERO);
            let deadline = std::time::Instant::now() + timeout;
            while self.producer.in_flight_count() > 0 {
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!("dead-letter/late records not acknowledged within {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        match self.producer.context().failed.swap(0, Ordering::Relaxed) {
            0 => Ok(()),
            n => anyhow::bail!("{n} dead-letter/late records were not delivered; not committing past them"),
        }
    }
}
