//! A commit that gives up. librdkafka's synchronous commit waits for its answer however long
//! the coordinator takes — a request in flight when the broker went away waits out the whole
//! outage, and the consumer thread with it (no flush held, no fault shown) — and the rdkafka
//! crate's asynchronous one reports on the consumer's own queue, which only a poll for records
//! serves. This commits on a queue of its own and waits at most a bound (librdkafka's C API
//! directly, like [`super::alter_configs`]).

use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::TopicPartitionList;

/// Commits `offsets`, waiting at most `timeout` for the group's answer: a broker's refusal
/// is its error code, no answer in time is `OperationTimedOut`.
pub fn commit_within<C: ConsumerContext>(consumer: &BaseConsumer<C>, offsets: &TopicPartitionList, timeout: Duration) -> Result<(), KafkaError> {
    let rk = consumer.client().native_ptr();
    let timeout_ms = timeout.as_millis().min(i32::MAX as u128) as i32;
    let failed = |code: rd::rd_kafka_resp_err_t| Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::from(code)));
    // SAFETY: the queue is created here, polled while alive and destroyed once (librdkafka
    // keeps it alive for a late answer); the offsets list and the client handle outlive the
    // calls that read them; the event is destroyed after it is read.
    unsafe {
        let queue = rd::rd_kafka_queue_new(rk);
        let err = rd::rd_kafka_commit_queue(rk, offsets.ptr(), queue, None, std::ptr::null_mut());
        let result = if err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            failed(err)
        } else {
            let event = rd::rd_kafka_queue_poll(queue, timeout_ms);
            if event.is_null() {
                failed(rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR__TIMED_OUT)
            } else {
                let code = rd::rd_kafka_event_error(event);
                rd::rd_kafka_event_destroy(event);
                match code {
                    rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
                    code => failed(code),
                }
            }
        };
        rd::rd_kafka_queue_destroy(queue);
        result
    }
}
