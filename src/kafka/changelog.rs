//! The changelog producer every flush writes through. Reading changelogs back (restores,
//! standbys) is [`super::state_updater`]; the record format and the restore plan are in
//! [`crate::changelog`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use super::delivery::{self, DeliveryContext, Retries};

use crate::changelog::{Change, ChangeSink, ChangelogError};
use crate::config::KafkaConfig;
use crate::health::Faults;
use crate::topology::Topology;

/// Writes flushes to the changelog topics (one per source, see
/// [`Topology::changelog_topic`]). Idempotent and gapless ([`Retries::Gapless`]), so a
/// retried batch is not duplicated, records of a partition land in the order sent, and one
/// acknowledged means all before it landed.
pub struct ChangelogProducer {
    producer: BaseProducer<DeliveryContext>,
    kafka: KafkaConfig,
    faults: Arc<Faults>,
    topics: Vec<String>,
    /// When the flush awaiting its acknowledgements was sent.
    sent: Instant,
}

impl ChangelogProducer {
    /// A producer to the changelog topics of `topo`; `faults` hears of its broker
    /// connections all going down.
    pub fn new(kafka: &KafkaConfig, topo: &Topology, faults: Arc<Faults>) -> anyhow::Result<ChangelogProducer> {
        Ok(ChangelogProducer {
            producer: delivery::producer(kafka, "changelog", Retries::Gapless, Some(Arc::clone(&faults)))?,
            kafka: kafka.clone(),
            faults,
            topics: (0..topo.sources.len()).map(|s| topo.changelog_topic(s)).collect(),
            sent: Instant::now(),
        })
    }

    fn send_one(&self, c: &Change, opaque: usize) -> Result<(), ChangelogError> {
        let mut rec = BaseRecord::with_opaque_to(&self.topics[c.source], opaque).partition(c.partition).key(&c.key[..]);
        if let Some(v) = &c.value {
            rec = rec.payload(&v[..]);
        }
        delivery::send(&self.producer, rec).map_err(|e| ChangelogError(format!("producing to {}: {e}", self.topics[c.source])))
    }

    /// Changes and positions in one round: each position record goes to its partition
    /// after that partition's changes, and the producer is gapless, so a position record in
    /// the log means every change before it is there too.
    fn send_all(&mut self, changes: &[Change], positions: &[Change]) -> Result<(), ChangelogError> {
        let batch = self.producer.context().start_batch(positions.len());
        for c in changes {
            self.send_one(c, DeliveryContext::opaque(batch, 0))?;
        }
        for (i, c) in positions.iter().enumerate() {
            self.send_one(c, DeliveryContext::opaque(batch, i + 1))?;
        }
        delivery::send_now(&self.producer);
        self.sent = Instant::now();
        Ok(())
    }

    fn offsets(&mut self, wait: Duration) -> Result<Option<Vec<i64>>, ChangelogError> {
        if !delivery::acknowledged(&self.producer, self.sent, wait).map_err(ChangelogError)? {
            return Ok(None);
        }
        let offsets = self.producer.context().take_offsets();
        if offsets.contains(&-1) {
            return Err(ChangelogError("a position record was acknowledged without an offset".into()));
        }
        Ok(Some(offsets))
    }

    /// `result`, the producer replaced first when it is an error (see
    /// [`ChangelogProducer::replace_producer`]).
    fn replaced_if_failed<T>(&mut self, result: Result<T, ChangelogError>) -> Result<T, ChangelogError> {
        if result.is_err() {
            self.replace_producer()?;
        }
        result
    }

    /// After a failed flush: what the failed producer still holds must never land. It is
    /// purged as it is dropped, and the next flush gets a producer of its own (librdkafka
    /// retries a gapless producer's records until they are acknowledged).
    fn replace_producer(&mut self) -> Result<(), ChangelogError> {
        let fresh = delivery::producer(&self.kafka, "changelog", Retries::Gapless, Some(Arc::clone(&self.faults)))
            .map_err(|e| ChangelogError(format!("{e:#}")))?;
        let failed = std::mem::replace(&mut self.producer, fresh);
        // Dropping it purges at once, then waits up to half a second for the purged
        // records' reports and for its threads to end: not on the consumer thread, which
        // has a fault to raise.
        std::thread::spawn(move || drop(failed));
        Ok(())
    }
}

impl ChangeSink for ChangelogProducer {
    fn send(&mut self, changes: &[Change], positions: &[Change]) -> Result<(), ChangelogError> {
        let sent = self.send_all(changes, positions);
        self.replaced_if_failed(sent)
    }

    fn acknowledged(&mut self, wait: Duration) -> Result<Option<Vec<i64>>, ChangelogError> {
        let acked = self.offsets(wait);
        self.replaced_if_failed(acked)
    }
}
