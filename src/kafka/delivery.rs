//! Producing that waits for acknowledgements: the changelog and the result topic both send
//! a batch and must know it is durable (or failed) before going on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::DefaultClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::ClientContext;

use crate::config::KafkaConfig;
use crate::health::{Faults, Link};

/// How long a batch waits for its acknowledgements before failing.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// librdkafka gives up on a record 20 s after it was sent (its default is 300 s), and on a
/// request to a broker after 10 s (default 30 s). Both end before [`ACK_TIMEOUT`]: once a
/// batch has failed, none of its records is still being retried, so none can land later —
/// after the records of whoever flushes the partition next.
pub const BOUNDED_RETRIES: [(&str, &str); 2] = [("message.timeout.ms", "20000"), ("request.timeout.ms", "10000")];

/// Tags a record with its batch (high half) and slot (low half).
fn opaque_of(batch: usize, slot: usize) -> usize {
    (batch << 32) | (slot & 0xffff_ffff)
}

/// Collects delivery results: the offsets of the current batch's records sent with a slot,
/// and the first failure.
pub struct DeliveryContext {
    /// Offset per slot (`-1` until acknowledged).
    offsets: Mutex<Vec<i64>>,
    /// The current batch: a late report of an earlier, failed batch names another, and its
    /// offset is not taken for this batch's.
    batch: AtomicUsize,
    failure: Mutex<Option<String>>,
    /// Told when every broker connection of this producer is down: a flush waiting for the
    /// changelog's acknowledgements keeps the consumer thread, which reads the brokers'
    /// state from its statistics, from seeing it until the flush fails.
    faults: Option<Arc<Faults>>,
}

impl DeliveryContext {
    /// Starts a batch with `slots` records whose offsets are wanted; returns its tag, for
    /// [`DeliveryContext::opaque`].
    pub fn start_batch(&self, slots: usize) -> usize {
        let mut offsets = self.offsets.lock().unwrap_or_else(|p| p.into_inner());
        *offsets = vec![-1; slots];
        self.batch.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The opaque of a record of `batch`: slot 0 wants no offset, `i + 1` fills `offsets[i]`.
    pub fn opaque(batch: usize, slot: usize) -> usize {
        opaque_of(batch, slot)
    }

    /// The current batch's offsets, per slot.
    pub fn take_offsets(&self) -> Vec<i64> {
        std::mem::take(&mut *self.offsets.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl ClientContext for DeliveryContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        // librdkafka warns that the gapless guarantee is experimental each time a producer
        // is made with it; tally sets it on purpose (see [`Retries::Gapless`]).
        if fac == "CONFWARN" && log_message.contains("enable.gapless.guarantee") {
            return;
        }
        DefaultClientContext.log(level, fac, log_message)
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if let (Some(faults), KafkaError::Global(RDKafkaErrorCode::AllBrokersDown)) = (&self.faults, &error) {
            if !faults.failing(Link::Brokers) {
                faults.failed(Link::Brokers, format!("no broker connection of the changelog's producer is up ({reason})"));
            }
        }
        DefaultClientContext.error(error, reason)
    }
}

impl ProducerContext for DeliveryContext {
    /// Batch and slot (see [`DeliveryContext::opaque`]).
    type DeliveryOpaque = usize;
    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let (batch, slot) = (opaque >> 32, opaque & 0xffff_ffff);
        match result {
            Ok(m) if slot > 0 && batch == self.batch.load(Ordering::Relaxed) => {
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

/// How a producer's records may fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// librdkafka gives up on a record after a while ([`BOUNDED_RETRIES`]).
    Bounded,
    /// librdkafka never gives up on a record, and any failure that could leave a gap in a
    /// partition's records is fatal (`enable.gapless.guarantee`; a record's timeout is the
    /// one failure that guarantee does not cover, hence none): a record acknowledged means
    /// every record sent before it to its partition is in the log. A producer whose batch
    /// failed or timed out must be dropped — which purges what it still holds, so that none
    /// of it lands after the records of whoever writes those partitions next.
    Gapless,
}

/// librdkafka never gives up on a record (its user does, after [`ACK_TIMEOUT`], and drops
/// the producer) and never leaves a gap (see [`Retries::Gapless`]); idempotent with
/// `acks=all`, which the guarantee needs.
const GAPLESS: [(&str, &str); 4] =
    [("message.timeout.ms", "0"), ("enable.gapless.guarantee", "true"), ("enable.idempotence", "true"), ("acks", "all")];

/// An idempotent producer with `acks=all`: a retried batch is not duplicated, and records
/// of a partition land in the order sent.
/// `faults`, when given, hears of every broker connection going down.
pub fn producer(kafka: &KafkaConfig, what: &str, retries: Retries, faults: Option<Arc<Faults>>) -> anyhow::Result<BaseProducer<DeliveryContext>> {
    producer_config(kafka, retries)
        .create_with_context(DeliveryContext { offsets: Mutex::new(Vec::new()), batch: AtomicUsize::new(0), failure: Mutex::new(None), faults })
        .map_err(|e| anyhow::anyhow!("creating the {what} producer: {e}"))
}

fn producer_config(kafka: &KafkaConfig, retries: Retries) -> rdkafka::ClientConfig {
    let mut config = super::client_config(
        kafka,
        &[
            ("enable.idempotence", "true"),
            ("acks", "all"),
            // No linger: its users (a flush, the result view) send a batch and then wait for its
            // acknowledgements, so a linger only delays them (flushes p50 26 against 35 ms at 20 k events/s).
            ("linger.ms", "0"),
            ("batch.size", "1000000"),
            ("queue.buffering.max.messages", "1000000"),
            // 32 MiB, not librdkafka's 1 GiB: past it `send` waits for acknowledgements, so a
            // slow broker slows the flush instead of growing the process.
            ("queue.buffering.max.kbytes", "32768"),
            ("compression.type", "lz4"),
            BOUNDED_RETRIES[0],
            BOUNDED_RETRIES[1],
        ],
    );
    if retries == Retries::Gapless {
        // Over the user's properties too: the durability argument rests on them. The
        // aliases would be applied in no set order with their properties.
        config.remove("delivery.timeout.ms").remove("request.required.acks");
        for (k, v) in GAPLESS {
            config.set(k, v);
        }
    }
    config
}

/// Sends `rec`, waiting while the local queue is full — at most [`ACK_TIMEOUT`]: a queue
/// that does not drain has a broker behind it that does not answer.
pub fn send(producer: &BaseProducer<DeliveryContext>, mut rec: BaseRecord<'_, [u8], [u8], usize>) -> Result<(), KafkaError> {
    let mut deadline = None;
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((e @ KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                if *deadline.get_or_insert_with(|| Instant::now() + ACK_TIMEOUT) <= Instant::now() {
                    return Err(e);
                }
                rec = back;
                producer.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until everything sent is acknowledged; `Err` says why not.
pub fn await_acks(producer: &BaseProducer<DeliveryContext>) -> Result<(), String> {
    send_now(producer);
    acknowledged(producer, Instant::now(), ACK_TIMEOUT).map(|_| ())
}

/// Sends what the producer holds without waiting for its linger.
pub fn send_now(producer: &BaseProducer<DeliveryContext>) {
    let _ = producer.flush(Duration::ZERO);
}

/// Serves every delivery report ready now. rdkafka's `poll` serves one event per call when
/// it does not wait, and a flush to 40 partitions gets about 40 (one per produce response):
/// served one per check, every millisecond, they held a flush 50 ms longer (measured).
fn serve_reports(producer: &BaseProducer<DeliveryContext>) {
    let mut left = producer.in_flight_count();
    while left > 0 {
        producer.poll(Duration::ZERO);
        let now = producer.in_flight_count();
        if now == left {
            return; // nothing ready (or an event that was not a report)
        }
        left = now;
    }
}

/// Whether everything sent is acknowledged, waiting at most `wait`; `Err` once a record
/// failed, or [`ACK_TIMEOUT`] after `sent` with records still in flight.
pub fn acknowledged(producer: &BaseProducer<DeliveryContext>, sent: Instant, wait: Duration) -> Result<bool, String> {
    // rdkafka's flush() polls in 100 ms steps that do not end when the last
    // acknowledgement arrives: two of them per flush cost 200 ms (measured). Polling in
    // 1 ms steps until nothing is in flight returns as soon as everything is acked.
    let until = Instant::now() + wait;
    serve_reports(producer);
    while producer.in_flight_count() > 0 {
        if sent.elapsed() >= ACK_TIMEOUT {
            return Err(format!("records not acknowledged within {ACK_TIMEOUT:?}"));
        }
        if Instant::now() >= until {
            return Ok(false);
        }
        producer.poll(Duration::from_millis(1));
    }
    match producer.context().failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
        None => Ok(true),
        Some(e) => Err(format!("a record was not delivered: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gapless_producer_stays_gapless_whatever_the_users_properties() {
        let properties = [
            ("message.timeout.ms", "5000"),
            ("delivery.timeout.ms", "5000"),
            ("enable.gapless.guarantee", "false"),
            ("enable.idempotence", "false"),
            ("request.required.acks", "1"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()));
        let kafka = KafkaConfig {
            bootstrap_servers: "127.0.0.1:9".into(),
            application_id: "t".into(),
            properties: properties.into_iter().collect(),
            exit_on_broker_timeout: None,
        };
        let gapless = producer_config(&kafka, Retries::Gapless);
        assert_eq!(gapless.get("message.timeout.ms"), Some("0"));
        assert_eq!(gapless.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!(gapless.get("enable.idempotence"), Some("true"));
        assert_eq!(gapless.get("acks"), Some("all"));
        for alias in ["delivery.timeout.ms", "request.required.acks"] {
            assert_eq!(gapless.get(alias), None, "an alias is not left to override its property");
        }
        let bounded = producer_config(&kafka, Retries::Bounded);
        assert_eq!(bounded.get("message.timeout.ms"), Some("5000"), "elsewhere the user's properties win");
    }
}
