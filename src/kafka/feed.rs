//! Feeding generated records into a topic (`tally gen`, the demo, tests and benchmarks).

use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::KafkaConfig;
use crate::gen::GenRecord;

/// A producer for generated records.
pub struct Feed {
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
}

impl Feed {
    /// A producer writing to `topic` on the cluster of `kafka`.
    pub fn new(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Feed> {
        let producer =
            super::client_config(kafka, &[("linger.ms", "5"), ("batch.num.messages", "10000"), ("queue.buffering.max.messages", "1000000")])
                .create()
                .map_err(|e| anyhow::anyhow!("creating the producer: {e}"))?;
        Ok(Feed { producer, topic: topic.to_string() })
    }

    /// Sends one record to its partition (of its own topic, if it names one), waiting while
    /// the local queue is full.
    pub fn send(&self, r: &GenRecord) -> anyhow::Result<()> {
        let topic = r.topic.unwrap_or(&self.topic);
        let mut rec = BaseRecord::to(topic).partition(r.partition).key(&r.key[..]).payload(&r.payload[..]);
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(anyhow::anyhow!("producing to {topic}: {e}")),
            }
        }
    }

    /// Sends every record, at most `rate` per second (0: as fast as possible), stopping
    /// early when `stop` returns true. Returns how many were sent.
    pub fn send_all(&self, records: impl IntoIterator<Item = GenRecord>, rate: u64, stop: impl Fn() -> bool) -> anyhow::Result<u64> {
        let start = Instant::now();
        let mut sent = 0u64;
        for r in records {
            if stop() {
                break;
            }
            if rate > 0 {
                let due = start + Duration::from_secs_f64(sent as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            self.send(&r)?;
            sent += 1;
        }
        Ok(sent)
    }

    /// Waits until every record sent is acknowledged.
    pub fn flush(&self) -> anyhow::Result<()> {
        self.producer.flush(Duration::from_secs(60)).map_err(|e| anyhow::anyhow!("flushing the producer: {e}"))
    }
}
