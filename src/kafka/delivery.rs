//! Producing that waits for acknowledgements: the changelog and the result topic both send
//! a batch and must know it is durable (or failed) before going on.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::config::KafkaConfig;

/// How long a batch waits for its acknowledgements before failing.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Collects delivery results: the offsets of records sent with a slot, and the first failure.
pub struct DeliveryContext {
    /// Offset per slot (`-1` until acknowledged).
    pub offsets: Mutex<Vec<i64>>,
    failure: Mutex<Option<String>>,
}

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    /// 0: no slot; `i + 1`: the offset goes to `offsets[i]`.
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, slot: usize) {
        match result {
            Ok(m) if slot > 0 => {
                if let Some(o) = self.offsets.lock().unwrap_or_else(|p| p.into_inner()).get_mut(slot - 1) {
                    *o = m.offset();
                }
            }
            Ok(_) => {}
            Err((e, _)) => {
                self.failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert_with(|| e.to_string());
            }
        }
    }
}

/// An idempotent producer with `acks=all`: a retried batch is not duplicated, and records
/// of a partition land in the order sent.
pub fn producer(kafka: &KafkaConfig, what: &str) -> anyhow::Result<BaseProducer<DeliveryContext>> {
    super::client_config(
        kafka,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "2"),
            ("batch.size", "1000000"),
            ("queue.buffering.max.messages", "1000000"),
            ("compression.type", "lz4"),
        ],
    )
    .create_with_context(DeliveryContext { offsets: Mutex::new(Vec::new()), failure: Mutex::new(None) })
    .map_err(|e| anyhow::anyhow!("creating the {what} producer: {e}"))
}

/// Sends `rec`, waiting while the local queue is full.
pub fn send(producer: &BaseProducer<DeliveryContext>, mut rec: BaseRecord<'_, [u8], [u8], usize>) -> Result<(), KafkaError> {
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until everything sent is acknowledged; `Err` says why not.
pub fn await_acks(producer: &BaseProducer<DeliveryContext>) -> Result<(), String> {
    // rdkafka's flush() polls in 100 ms steps that do not end when the last
    // acknowledgement arrives: two of them per flush cost 200 ms (measured). Polling in
    // 1 ms steps until nothing is in flight returns as soon as everything is acked.
    let _ = producer.flush(Duration::ZERO);
    let deadline = Instant::now() + ACK_TIMEOUT;
    while producer.in_flight_count() > 0 {
        if Instant::now() >= deadline {
            return Err(format!("records not acknowledged within {ACK_TIMEOUT:?}"));
        }
        producer.poll(Duration::from_millis(1));
    }
    match producer.context().failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        None => Ok(()),
        Some(e) => Err(format!("a record was not delivered: {e}")),
    }
}
