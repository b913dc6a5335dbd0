//! The source consumer: one consumer-group member per replica, polling on its own thread
//! and feeding the [`TaskSet`].
//!
//! The order of durable steps is what makes a crash safe at any point (the README's
//! "Durability" section gives the whole argument):
//!
//! 1. records are folded into the write-back cache (memory only);
//! 2. every commit interval: the durable positions of every owned partition are committed to
//!    the group synchronously — which also proves the group has not expelled this replica.
//!    Unless the group confirms it or says it is rebalancing (expelled: a zombie whose session
//!    expired; or no answer: the coordinator is unreachable), nothing is written: the flush is held, the partitions
//!    paused, and the next interval tries again;
//! 3. dead-letter and late records are acknowledged;
//! 4. the flush is sealed: the changed aggregates are sent to the changelog, then one
//!    position record per partition, and the cache marks them clean. Processing goes on
//!    while the acknowledgements are awaited; nothing sealed leaves the cache meanwhile;
//! 5. once every record is acknowledged, aggregates and positions (with the changelog
//!    checkpoint) are written to sled in one atomic batch and fsynced: the flush is
//!    complete, its positions durable, committable and queryable. One flush is in flight
//!    at a time: the next seal, a revocation and a stop wait for it.
//!
//! A flush that fails after that (the changelog, the side outputs or the store did not take
//! it) rewinds every partition to its last durable flush, as a restart would — records
//! processed since its seal included — holding until a flush succeeds: nothing is lost or
//! counted twice, and tally does not exit.
//!
//! Processing always resumes from the position stored with the state (restored from the
//! changelog on a new replica), never from the group's offset, which only trails it. On
//! assignment a partition is restored before it is processed; on revocation it is flushed
//! and committed before it is released.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;

use super::changelog::ChangelogProducer;
use super::results::ResultEmitter;
use super::side::{Origin, SideOutputs};
use super::state_updater::{Command, Done, StateUpdater};
use crate::changelog::ChangeSink;
use crate::config::KafkaConfig;
use crate::health::{Faults, Link};
use crate::metrics::Metrics;
use crate::ownership::{Ownership, PartitionState};
use crate::task::{Outcome, TaskSet, NO_WATERMARK};
use crate::topology::Topology;

/// How long a flush's membership commit waits for the group's answer before the flush is
/// held as unconfirmed.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared between the poll loop and librdkafka's callbacks (which run inside `poll`, on the
/// same thread, so the lock is never contended).
pub struct Shared {
    tasks: Mutex<TaskSet>,
    topo: Arc<Topology>,
    kafka: KafkaConfig,
    side: SideOutputs,
    changelog: Option<Mutex<ChangelogProducer>>,
    metrics: Metrics,
    owned: Arc<Ownership>,
    /// Links failing now (brokers, flushes): shown by `/ready`.
    faults: Arc<Faults>,
    /// The durable position of every owned partition: committed to the group by every flush.
    flushed: Mutex<HashMap<(usize, i32), i64>>,
    /// Partitions paused because flushes are held (see [`Shared::hold`]).
    held: Mutex<Vec<(usize, i32)>>,
    /// A failure inside a rebalance callback, which cannot return one: the poll loop stops
    /// with it.
    fatal: Mutex<Option<anyhow::Error>>,
    /// Kafka timestamps of records processed since the last flush, for the
    /// produce-to-queryable histogram.
    pending: Mutex<Vec<i64>>,
    /// The flush sealed and awaiting the changelog's acknowledgements, if any.
    in_flight: Mutex<Option<InFlight>>,
    /// Where the result view is kept, when results are sent.
    results_dir: Option<PathBuf>,
    /// The result emitter, while this replica owns the first source's partition 0.
    emitter: Mutex<Option<ResultEmitter>>,
    /// Per owned partition, from librdkafka's statistics: how far its fetching has got.
    fetch: Mutex<HashMap<(usize, i32), FetchState>>,
    /// Per owned partition: how long it has received nothing (for `idle_timeout`).
    quiet: Mutex<HashMap<(usize, i32), Quiet>>,
    /// Restores and standbys, on their own thread (with a changelog).
    updater: Option<StateUpdater>,
    /// Assigned partitions being restored, with the number of their assignment: paused
    /// until the updater reports that assignment's restore done.
    restoring: Mutex<BTreeMap<(usize, i32), u64>>,
    /// Numbers the assignments (a partition revoked and assigned again gets a new one).
    assignments: std::sync::atomic::AtomicU64,
    /// A partition without a stored position was taken: with tables, its pin must be flushed
    /// before its first record is processed.
    first_position_due: AtomicBool,
    /// Restored partitions whose fetch position is still to be set, with the seeks tried.
    restored: Mutex<Vec<(usize, i32, u64, u32)>>,
    /// Whether some of them failed to seek and are to be tried again.
    seek_again: AtomicBool,
}

/// A partition's fetching, as librdkafka's statistics last reported it.
#[derive(Debug, Clone, Copy)]
struct FetchState {
    /// The broker's high watermark: the offset the next record will get.
    high: i64,
    /// Where fetching stands: the next offset to fetch, or the log start if later (records
    /// deleted by retention, control records of transactions are never handed over).
    fetched: i64,
    /// Records fetched and not yet handed to the application.
    queued: i64,
}

impl FetchState {
    /// Whether a partition processed up to `next_offset` has nothing more to read.
    fn caught_up(&self, next_offset: i64) -> bool {
        self.queued == 0 && next_offset.max(self.fetched) >= self.high
    }
}

/// Since when a partition's position has not moved.
struct Quiet {
    /// Its next offset then.
    next_offset: i64,
    /// The first flush that found it there.
    since: Instant,
    /// Whether it counts as idle now.
    idle: bool,
}

/// The consumer's context: rebalance handling and statistics.
pub struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    fn stats(&self, stats: Statistics) {
        self.shared.note_brokers(&stats);
        let topo = &self.shared.topo;
        for (topic, t) in &stats.topics {
            let Some((source, src)) = topo.sources.iter().enumerate().find(|(_, s)| &s.topic == topic) else { continue };
            let mut fetch = self.shared.fetch.lock().unwrap_or_else(|p| p.into_inner());
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    self.shared.metrics.consumer_lag.with_label_values(&[&src.name, &p.to_string()]).set(part.consumer_lag);
                }
                if *p >= 0 && part.hi_offset >= 0 {
                    let fetched = part.next_offset.max(part.lo_offset);
                    fetch.insert((source, *p), FetchState { high: part.hi_offset, fetched, queued: part.fetchq_cnt });
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

    /// Whether any broker connection is up, from librdkafka's statistics: the `brokers` fault
    /// starts when none is and ends when one is again.
    fn note_brokers(&self, stats: &Statistics) {
        let real: Vec<&rdkafka::statistics::Broker> = stats.brokers.values().filter(|b| b.source != "internal" && b.source != "logical").collect();
        if real.iter().any(|b| b.state == "UP") {
            if let Some(f) = self.faults.recovered(Link::Brokers) {
                tracing::info!(down_for_ms = now_ms() - f.since_ms, "a broker connection is up again");
            }
        } else if !real.is_empty() && !self.faults.failing(Link::Brokers) {
            let states: Vec<String> = real.iter().map(|b| format!("{} {}", b.name, b.state)).collect();
            let detail = format!("no broker connection is up ({})", states.join(", "));
            tracing::warn!(%detail, "brokers unreachable: queries answer from the state of the last flush");
            self.faults.failed(Link::Brokers, detail);
        }
    }

    /// Commits the durable positions of the owned partitions (of `only`, when given)
    /// synchronously: the group's answer says whether this replica is still a member.
    fn commit_flushed(&self, consumer: &BaseConsumer<SourceContext>, only: Option<&TopicPartitionList>) -> Membership {
        let flushed = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        let mut tpl = TopicPartitionList::new();
        for (&(source, partition), &offset) in flushed.iter() {
            let topic = &self.topo.sources[source].topic;
            if only.is_none_or(|o| o.find_partition(topic, partition).is_some()) {
                if let Err(e) = tpl.add_partition_offset(topic, partition, Offset::Offset(offset)) {
                    return Membership::Unknown(e);
                }
            }
        }
        drop(flushed);
        if tpl.count() == 0 {
            // Owns nothing: nothing to write, nobody to be fenced by.
            return Membership::Confirmed;
        }
        let started = Instant::now();
        match super::commit::commit_within(consumer, &tpl, COMMIT_TIMEOUT) {
            Ok(()) => {
                let took = started.elapsed().as_secs_f64();
                self.metrics.commit_duration.observe(took);
                self.metrics.work_seconds.with_label_values(&["commit"]).inc_by(took);
                Membership::Confirmed
            }
            Err(e @ KafkaError::ConsumerCommit(code)) if fenced(code) => Membership::Expelled(e),
            // The coordinator knows this member and is rebalancing: under the cooperative
            // protocol its partitions stay its own until it revokes them itself.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::RebalanceInProgress)) => Membership::Confirmed,
            Err(e) => Membership::Unknown(e),
        }
    }

    /// One durable step, whole (see the module docs): the flush in flight completed, a new
    /// one begun and completed. With `only` (a revocation), its partitions' positions are
    /// committed afterwards.
    fn flush_and_commit(&self, consumer: &BaseConsumer<SourceContext>, only: Option<&TopicPartitionList>) -> anyhow::Result<()> {
        self.begin_flush(consumer, only)?;
        self.finish_flight(consumer)?;
        if only.is_some() {
            let _ = self.commit_flushed(consumer, only);
        }
        Ok(())
    }

    /// Begins a durable step (see the module docs), once the flush in flight is complete:
    /// commit the durable positions — proof that this replica still owns its partitions —
    /// then flush side outputs and send the changelog's records. The store takes the flush
    /// once they are acknowledged ([`Shared::advance_flight`]); processing goes on meanwhile.
    /// With `only` (a revocation), the membership check is skipped — inside the revocation
    /// callback the partitions are still this replica's: the cooperative protocol hands them
    /// to another member only after this one has given them up.
    ///
    /// A flush the group does not confirm is held (see [`Shared::hold`]); one that fails is
    /// rewound (see [`Shared::rewind`]) and held. Only an error that a retry cannot mend is
    /// returned.
    fn begin_flush(&self, consumer: &BaseConsumer<SourceContext>, only: Option<&TopicPartitionList>) -> anyhow::Result<()> {
        self.finish_flight(consumer)?;
        if only.is_none() && !self.may_flush(consumer) {
            return Ok(());
        }
        match self.seal() {
            Ok(flight) => {
                *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = Some(flight);
                Ok(())
            }
            Err(failure) => self.flush_failed(consumer, only, failure),
        }
    }

    /// Whether the group confirms this replica's membership and the store can take a
    /// flush; if not, flushes are held.
    fn may_flush(&self, consumer: &BaseConsumer<SourceContext>) -> bool {
        match self.commit_flushed(consumer, None) {
            Membership::Confirmed => {}
            Membership::Expelled(e) => {
                let why = format!("expelled from the consumer group ({e}); waiting to be told what this replica still owns");
                self.hold(consumer, Link::Flush, why);
                return false;
            }
            Membership::Unknown(e) => {
                self.hold(consumer, Link::Flush, format!("the group did not confirm this replica's membership ({e})"));
                return false;
            }
        }
        // sled takes no write until reopened: no flush is tried until the restart.
        if let Some(why) = self.faults.restart_needed() {
            self.hold(consumer, Link::Disk, why);
            return false;
        }
        // Before anything is written: the dirty cache waits whole for room.
        // Out of the `if`: a hold locks the tasks again.
        let room = self.tasks().store().ensure_room(self.topo.min_free_bytes);
        if let Err(e) = room {
            self.hold(consumer, Link::Disk, e.to_string());
            return false;
        }
        true
    }

    /// A flush that failed: rewound and held when a retry may mend it (every partition is
    /// rewound — its seal marked the cache clean); the store's failure is held until a restart.
    fn flush_failed(&self, consumer: &BaseConsumer<SourceContext>, only: Option<&TopicPartitionList>, failure: FlushFailure) -> anyhow::Result<()> {
        match failure {
            FlushFailure::Retry(link, e) => {
                self.rewind(consumer)?;
                self.hold(consumer, link, format!("{e:#}; rewound to the last durable flush"));
                Ok(())
            }
            FlushFailure::Unwritable(e) if only.is_none() => {
                // Not rewound: rewinding reads the store, which may fail now too, and no
                // flush is written until the restart, which resumes from the stored
                // positions (the changelog took this flush before the store failed).
                self.hold(consumer, Link::Disk, format!("{e:#}; held until a restart"));
                self.faults.store_unwritable("a flush", &e);
                Ok(())
            }
            FlushFailure::Unwritable(e) => {
                self.faults.store_unwritable("a flush", &e);
                Err(e)
            }
            FlushFailure::Fatal(e) => Err(e),
        }
    }

    /// Completes the flush in flight once the changelog has acknowledged it, waiting at
    /// most `wait`; `true` while it is still in flight.
    fn advance_flight(&self, consumer: &BaseConsumer<SourceContext>, wait: Duration) -> anyhow::Result<bool> {
        let Some(flight) = self.in_flight.lock().unwrap_or_else(|p| p.into_inner()).take() else { return Ok(false) };
        let waited = Instant::now();
        let acked = match &self.changelog {
            Some(c) => c.lock().unwrap_or_else(|p| p.into_inner()).acknowledged(wait),
            None => Ok(Some(Vec::new())),
        };
        // Only the wait: the store's write and fsync count as their own stages.
        self.metrics.work_seconds.with_label_values(&["changelog"]).inc_by(waited.elapsed().as_secs_f64());
        let done = match acked {
            Ok(None) => {
                *self.in_flight.lock().unwrap_or_else(|p| p.into_inner()) = Some(flight);
                return Ok(true);
            }
            Ok(Some(offsets)) => self.complete(flight, offsets),
            Err(e) => Err(FlushFailure::Retry(Link::Flush, e.into())),
        };
        match done {
            Ok(()) => self.release(consumer),
            Err(failure) => self.flush_failed(consumer, None, failure)?,
        }
        Ok(false)
    }

    /// Waits for the flush in flight to complete (or fail).
    fn finish_flight(&self, consumer: &BaseConsumer<SourceContext>) -> anyhow::Result<()> {
        while self.advance_flight(consumer, Duration::from_millis(1))? {}
        Ok(())
    }

    /// Seals a flush: side outputs acknowledged, then the changelog's records sent.
    fn seal(&self) -> Result<InFlight, FlushFailure> {
        let started = Instant::now();
        self.side.flush(Duration::from_secs(30)).map_err(|e| FlushFailure::Retry(Link::Flush, e))?;
        self.metrics.work_seconds.with_label_values(&["side_outputs"]).inc_by(started.elapsed().as_secs_f64());
        let mut tasks = self.tasks();
        self.advance_idle(&mut tasks);
        let mut producer = self.changelog.as_ref().map(|c| c.lock().unwrap_or_else(|p| p.into_inner()));
        let sealed = tasks.seal(producer.as_deref_mut().map(|p| p as &mut dyn ChangeSink)).map_err(FlushFailure::of)?;
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        Ok(InFlight { sealed, pending, started })
    }

    /// Writes an acknowledged flush to the store; its positions are durable then.
    fn complete(&self, flight: InFlight, offsets: Vec<i64>) -> Result<(), FlushFailure> {
        let InFlight { mut sealed, pending, started } = flight;
        let positions = sealed.take_positions();
        let stats = self.tasks().complete(sealed, offsets).map_err(FlushFailure::of)?;
        let flushed_at = now_ms();
        self.metrics.flush_duration.observe(started.elapsed().as_secs_f64());
        self.metrics.state_writes.inc_by(stats.puts as u64);
        self.metrics.state_deletes.inc_by(stats.deletes as u64);
        self.metrics.cache_bytes.set(stats.cache_bytes as i64);
        for (stage, took) in stats.stages.named() {
            self.metrics.work_seconds.with_label_values(&[stage]).inc_by(took.as_secs_f64());
        }
        for (source, n) in stats.changelog_records.iter().enumerate() {
            if *n > 0 {
                self.metrics.changelog_records.with_label_values(&[&self.topo.sources[source].name]).inc_by(*n as u64);
            }
        }
        let local = self.metrics.queryable_latency.local();
        for ts in pending {
            local.observe((flushed_at - ts).max(0) as f64 / 1000.0);
        }
        local.flush();
        let mut flushed = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        for p in positions {
            if p.next_offset > 0 {
                flushed.insert((p.source, p.partition), p.next_offset);
            }
            if p.watermark != NO_WATERMARK {
                let (name, partition) = (&self.topo.sources[p.source].name, p.partition.to_string());
                self.metrics.watermark.with_label_values(&[name, &partition]).set(p.watermark.div_euclid(1000));
                self.metrics.watermark_lag.with_label_values(&[name, &partition]).set((flushed_at - p.watermark).div_euclid(1000));
            }
        }
        Ok(())
    }

    /// Holds flushes: pauses every owned partition (so the cache stops growing) and records
    /// the fault; the next commit interval tries again. Logged at the 1st, 2nd, 4th, 8th…
    /// attempt of a stretch.
    fn hold(&self, consumer: &BaseConsumer<SourceContext>, link: Link, detail: String) {
        let attempts = self.faults.failed(link, detail.clone());
        if attempts.is_power_of_two() {
            tracing::warn!(attempt = attempts, error = %detail, "flush held: processing paused, queries answer from the last durable flush");
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        let mut tpl = TopicPartitionList::new();
        for (&k, _) in self.tasks().tasks() {
            if !held.contains(&k) && !restoring.contains_key(&k) {
                tpl.add_partition(&self.topo.sources[k.0].topic, k.1);
                held.push(k);
            }
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.pause(&tpl) {
                tracing::warn!(error = %e, "pausing the partitions of a held flush failed");
            }
        }
    }

    /// After a durable flush: resumes the partitions a hold paused and ends its faults.
    fn release(&self, consumer: &BaseConsumer<SourceContext>) {
        let held = std::mem::take(&mut *self.held.lock().unwrap_or_else(|p| p.into_inner()));
        if held.is_empty() && self.faults.since(&Link::HOLDING_FLUSHES).is_none() {
            return; // the usual flush: nothing was held
        }
        let mut tpl = TopicPartitionList::new();
        let tasks = self.tasks();
        let restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        for (s, p) in held {
            if tasks.tasks().any(|(k, _)| *k == (s, p)) && !restoring.contains_key(&(s, p)) {
                tpl.add_partition(&self.topo.sources[s].topic, p);
            }
        }
        drop((tasks, restoring));
        if tpl.count() > 0 {
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(error = %e, "resuming the partitions of a held flush failed");
            }
        }
        for link in Link::HOLDING_FLUSHES {
            if let Some(f) = self.faults.recovered(link) {
                tracing::info!(
                    link = link.label(),
                    attempts = f.attempts,
                    held_for_ms = now_ms() - f.since_ms,
                    "flushes are durable again; processing resumed"
                );
            }
        }
    }

    /// Puts every active partition back to its last durable flush — what a restart would
    /// do — and seeks its fetch position there: the records since are processed again, their
    /// side outputs sent again (at least once), and nothing the failed flush may have written
    /// in part is counted twice.
    fn rewind(&self, consumer: &BaseConsumer<SourceContext>) -> anyhow::Result<()> {
        let active: Vec<(usize, i32)> = {
            let restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
            self.tasks().tasks().map(|(k, _)| *k).filter(|k| !restoring.contains_key(k)).collect()
        };
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.metrics.flush_rewinds.inc();
        for (s, p) in active {
            self.tasks().revoke(s, p);
            let offset = self.start_task(s, p)?;
            let topic = &self.topo.sources[s].topic;
            if let Err(e) = consumer.seek(topic, p, offset, Duration::ZERO) {
                tracing::warn!(topic, partition = p, error = %e, "seeking a rewound partition failed");
            }
        }
        Ok(())
    }

    /// Moves the watermark of every partition that has been idle for its source's
    /// `idle_timeout` — nothing received while caught up with the broker — to the wall clock
    /// minus the watermark delay, so it stops holding windows open (Flink's source
    /// idleness). A partition with records left to fetch or fetched but not processed is
    /// never idle, however long it has not been read.
    fn advance_idle(&self, tasks: &mut TaskSet) {
        let now = Instant::now();
        let mut fetch = self.fetch.lock().unwrap_or_else(|p| p.into_inner());
        let mut quiet = self.quiet.lock().unwrap_or_else(|p| p.into_inner());
        let owned: Vec<((usize, i32), i64)> = tasks.tasks().map(|(k, t)| (*k, t.next_offset)).collect();
        quiet.retain(|k, _| owned.iter().any(|(o, _)| o == k));
        fetch.retain(|k, _| owned.iter().any(|(o, _)| o == k));
        let mut idle = 0;
        for ((source, partition), next) in owned {
            let src = &self.topo.sources[source];
            let q = quiet.entry((source, partition)).or_insert(Quiet { next_offset: next, since: now, idle: false });
            if q.next_offset != next {
                if q.idle {
                    tracing::info!(source = %src.name, partition, "idle partition receives records again");
                }
                *q = Quiet { next_offset: next, since: now, idle: false };
            }
            let Some(timeout) = src.idle_timeout_ms else { continue };
            let caught_up = fetch.get(&(source, partition)).is_some_and(|f| f.caught_up(next));
            if caught_up && now.duration_since(q.since) >= Duration::from_millis(timeout as u64) {
                if !q.idle {
                    tracing::info!(source = %src.name, partition, "partition idle: its watermark follows the wall clock until it receives records");
                }
                q.idle = true;
                idle += 1;
                tasks.advance_idle(source, partition, now_ms().saturating_sub(src.watermark_delay_ms));
            }
        }
        self.metrics.partitions_idle.set(idle);
    }

    /// Takes newly assigned partitions. With a changelog they are restored by the state
    /// updater, off this thread: the returned ones are to be paused until then (see
    /// [`Shared::resume_restored`]). Without one they resume at once from the stored position.
    fn on_assign(&self, tpl: &mut TopicPartitionList) -> TopicPartitionList {
        let parts: Vec<(usize, i32)> = tpl.elements().iter().filter_map(|e| Some((self.source_of(e.topic())?, e.partition()))).collect();
        for &(s, p) in &parts {
            self.owned.set(s, p, PartitionState::Restoring { restored: 0, total: 0 });
        }
        self.metrics.partitions_owned.set(self.owned.counts().0 as i64);
        self.metrics.rebalances.with_label_values(&["assign"]).inc();
        self.owned.mark_joined();
        self.owned.forget_lost();
        let mut pause = TopicPartitionList::new();
        if let Some(updater) = &self.updater {
            let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
            for &(s, p) in &parts {
                let n = self.assignments.fetch_add(1, Ordering::Relaxed);
                updater.send(Command::Restore(s, p, n));
                restoring.insert((s, p), n);
                let topic = &self.topo.sources[s].topic;
                pause.add_partition(topic, p);
                // An explicit start lets librdkafka start the partition's fetcher at once: left
                // to the group's committed offset, it waits for an offset lookup that waits for
                // every commit in flight, and a seek before that fails (seen: a restored
                // partition never resumed while the others committed every 50 ms).
                // (Unreadable now, the restore reports it; the seek after it sets the position.)
                let _ = tpl.set_partition_offset(topic, p, self.stored_offset(s, p).unwrap_or(Offset::Beginning));
            }
            tracing::info!(partitions = ?parts, "partitions assigned; restoring them off the consumer thread");
        } else {
            for &(s, p) in &parts {
                match self.start_task(s, p) {
                    Ok(offset) => {
                        let _ = tpl.set_partition_offset(&self.topo.sources[s].topic, p, offset);
                    }
                    Err(e) => {
                        *self.fatal.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                        return pause;
                    }
                }
            }
            tracing::info!(partitions = ?parts, "partitions assigned");
        }
        if let (Some(dir), true) = (&self.results_dir, parts.contains(&(0, 0))) {
            let mut emitter = self.emitter.lock().unwrap_or_else(|p| p.into_inner());
            if emitter.is_none() {
                *emitter = Some(ResultEmitter::start(&self.kafka, Arc::clone(&self.topo), dir.clone(), self.metrics.clone()));
            }
        }
        pause
    }

    /// Where a partition's stored state ends (before a restore: where it is fetched from if
    /// the changelog holds nothing newer), or its beginning.
    fn stored_offset(&self, source: usize, partition: i32) -> Result<Offset, crate::store::StoreError> {
        Ok(match self.tasks().store().partition_meta(&self.topo.sources[source].name, partition)? {
            Some(m) => Offset::Offset(crate::task::resume_offset(&self.topo, source, &m)),
            None => Offset::Beginning,
        })
    }

    /// Starts processing a partition at its stored position: where the (restored) state
    /// ends. With none, the state has nothing of it and it is read from the beginning — the
    /// group's offset would skip records whose aggregates do not exist here.
    fn start_task(&self, source: usize, partition: i32) -> anyhow::Result<Offset> {
        let stored = self.tasks().assign(source, partition);
        if let Ok(at) = &stored {
            // Committed by every flush from now on: the proof of membership needs one.
            self.flushed.lock().unwrap_or_else(|p| p.into_inner()).insert((source, partition), at.unwrap_or(0));
        }
        let offset = match stored {
            Ok(Some(off)) => Offset::Offset(off),
            Ok(None) => {
                self.first_position_due.store(!self.topo.tables.is_empty(), Ordering::Relaxed);
                Offset::Beginning
            }
            Err(err) => {
                let topic = &self.topo.sources[source].topic;
                return Err(anyhow::Error::new(err).context(format!("reading the stored position of {topic} partition {partition}")));
            }
        };
        self.owned.set(source, partition, PartitionState::Active);
        Ok(offset)
    }

    /// A rebuild reads the source from its start: when retention has deleted every record
    /// before the partition's position, there is nothing for it to read, and it ends now
    /// (else it would wait for a record that may never come).
    fn end_rebuilds_of_a_gone_history(&self, consumer: &BaseConsumer<SourceContext>, source: usize, partition: i32) -> anyhow::Result<()> {
        if !self.tasks().rebuilding(source, partition) {
            return Ok(());
        }
        let topic = &self.topo.sources[source].topic;
        match consumer.fetch_watermarks(topic, partition, Duration::from_secs(5)) {
            Ok((low, _)) => self.tasks().caught_up(source, partition, low)?,
            Err(e) => tracing::debug!(topic, partition, error = %e, "no low watermark: the rebuild ends with the first record at its position"),
        }
        Ok(())
    }

    /// Resumes the partitions the state updater has finished: sets each one's fetch position
    /// to its stored position while still paused (records fetched from the group's offset
    /// before the pause are discarded by the seek), then resumes it. A seek that fails is
    /// tried again on the next call; the partition stays paused meanwhile.
    fn resume_restored(&self, consumer: &BaseConsumer<SourceContext>) -> anyhow::Result<()> {
        let Some(updater) = &self.updater else { return Ok(()) };
        let news = updater.finished();
        if news.is_empty() && !self.seek_again.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut restored = self.restored.lock().unwrap_or_else(|p| p.into_inner());
        for done in news {
            match done {
                Done::Restored(s, p, n, _) => restored.push((s, p, n, 0)),
                Done::Failed(e) => return Err(e.context("restoring assigned partitions from the changelog")),
            }
        }
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        let mut again = Vec::new();
        for (s, p, n, tries) in restored.drain(..) {
            if restoring.get(&(s, p)) != Some(&n) {
                continue; // revoked meanwhile (and maybe assigned again: its own report follows)
            }
            let topic = &self.topo.sources[s].topic;
            let offset = self.stored_offset(s, p)?;
            if let Err(e) = consumer.seek(topic, p, offset, Duration::from_millis(500)) {
                // Every 500th try is about every 10 s of polls: a partition that stays paused is seen.
                if tries % 500 == 0 {
                    tracing::warn!(topic, partition = p, tries = tries + 1, error = %e, "seek after restore failed; the partition stays paused and it is tried again");
                }
                again.push((s, p, n, tries + 1));
                continue;
            }
            self.start_task(s, p)?;
            self.end_rebuilds_of_a_gone_history(consumer, s, p)?;
            let tasks = self.tasks();
            if tasks.pin(s, p).is_some_and(|pin| !tasks.tables().covers(pin)) {
                // Its pin names table records this replica has not read yet: stay paused.
                again.push((s, p, n, tries));
                continue;
            }
            drop(tasks);
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition(topic, p);
            consumer.resume(&tpl).map_err(|e| anyhow::anyhow!("resuming {topic} partition {p}: {e}"))?;
            restoring.remove(&(s, p));
            tracing::info!(topic, partition = p, resume_at = ?offset, "partition restored; processing it");
        }
        self.seek_again.store(!again.is_empty(), Ordering::Relaxed);
        *restored = again;
        Ok(())
    }

    /// Stops the result emitter, if this replica runs it.
    fn stop_emitter(&self) {
        if let Some(e) = self.emitter.lock().unwrap_or_else(|p| p.into_inner()).take() {
            e.stop();
        }
    }

    /// Gives up `tpl`: flushed first, unless `lost` (another member may own them already).
    fn on_revoke(&self, consumer: &BaseConsumer<SourceContext>, tpl: &TopicPartitionList, lost: bool) {
        // The role goes with partition 0, and stops before it can go to another replica.
        if tpl.find_partition(&self.topo.sources[0].topic, 0).is_some() {
            self.stop_emitter();
        }
        let lost = lost || consumer.assignment_lost();
        // Whatever else happens to them, the partitions' sealed flush ends first: the store
        // must hold what the changelog took before their tasks go.
        if let Err(e) = self.finish_flight(consumer) {
            tracing::error!(error = %e, "the flush in flight failed; the next owner resumes from the last flush");
        }
        if lost {
            tracing::warn!("partitions lost (session timed out, or a rebalance failed): dropping them without flushing");
        } else if let Err(e) = self.flush_and_commit(consumer, Some(tpl)) {
            tracing::error!(error = %e, "flush before revocation failed; the next owner resumes from the last flush");
        }
        let mut tasks = self.tasks();
        let mut flushed = self.flushed.lock().unwrap_or_else(|p| p.into_inner());
        let mut restoring = self.restoring.lock().unwrap_or_else(|p| p.into_inner());
        self.held.lock().unwrap_or_else(|p| p.into_inner()).retain(|(s, p)| tpl.find_partition(&self.topo.sources[*s].topic, *p).is_none());
        for e in tpl.elements() {
            if let Some(source) = self.source_of(e.topic()) {
                restoring.remove(&(source, e.partition()));
                tasks.revoke(source, e.partition());
                flushed.remove(&(source, e.partition()));
                match lost {
                    true => self.owned.lose(source, e.partition(), now_ms()),
                    false => self.owned.remove(source, e.partition()),
                }
                // Once no longer owned: stops a restore in progress, and starts the wait before
                // the partition's local state is deleted.
                if let Some(u) = &self.updater {
                    u.send(Command::Cancel(source, e.partition()));
                }
            }
        }
        drop((tasks, flushed, restoring));
        self.metrics.partitions_owned.set(self.owned.counts().0 as i64);
        self.metrics.rebalances.with_label_values(&["revoke"]).inc();
        tracing::info!(partitions = ?tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect::<Vec<_>>(), "partitions revoked");
    }
}

/// What a commit says of this replica's membership.
enum Membership {
    /// The group took the commit: the partitions are still this replica's.
    Confirmed,
    /// The group has expelled this replica (see [`fenced`]).
    Expelled(KafkaError),
    /// No answer that says (coordinator unreachable, timed out, rebalancing).
    Unknown(KafkaError),
}

/// Why a flush was not made durable.
enum FlushFailure {
    /// A broker or the disk did not take it: rewound, and tried again.
    Retry(Link, anyhow::Error),
    /// The store took an I/O error after which it takes no write until reopened: held like
    /// a disk fault, and a restart asked for.
    Unwritable(anyhow::Error),
    /// Anything else: processing stops.
    Fatal(anyhow::Error),
}

impl FlushFailure {
    /// What a retry can mend of the core's failure.
    fn of(e: crate::task::FlushError) -> FlushFailure {
        match e {
            e @ crate::task::FlushError::Changelog(_) => FlushFailure::Retry(Link::Flush, e.into()),
            crate::task::FlushError::Store(e) if e.leaves_store_unwritable() => FlushFailure::Unwritable(e.into()),
            crate::task::FlushError::Store(e) if e.is_io() => FlushFailure::Retry(Link::Disk, e.into()),
            e => FlushFailure::Fatal(e.into()),
        }
    }
}

/// A flush sealed and sent, awaiting the changelog's acknowledgements.
struct InFlight {
    sealed: crate::task::SealedFlush,
    /// Kafka timestamps of the records it makes queryable.
    pending: Vec<i64>,
    started: Instant,
}

/// Commit errors that mean the group has expelled this member (its session expired), so
/// its partitions may belong to another member already. A rebalance in progress or a newer
/// generation do not: under the cooperative protocol a partition moves only after its owner
/// has revoked it, so until then the owner may and should keep flushing it.
fn fenced(code: RDKafkaErrorCode) -> bool {
    matches!(code, RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::FencedInstanceId | RDKafkaErrorCode::AssignmentLost)
}

impl ConsumerContext for SourceContext {
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result: KafkaResult<()> = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let pause = self.shared.on_assign(tpl);
                let assigned = if cooperative { consumer.incremental_assign(tpl) } else { consumer.assign(tpl) };
                if assigned.is_ok() && pause.count() > 0 {
                    consumer.pause(&pause)
                } else {
                    assigned
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.shared.on_revoke(consumer, tpl, false);
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                // The revocation path, so no task or cached state of the dropped partitions
                // outlives them; not flushed: whether they are still this replica's is unknown.
                tracing::error!(error = ?other, "rebalance error; dropping the assignment");
                if let Ok(assigned) = consumer.assignment() {
                    self.shared.on_revoke(consumer, &assigned, true);
                }
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
    /// With `results_dir`, the replica that owns the first source's partition 0 sends
    /// window results, keeping its view there.
    pub fn new(
        kafka: &KafkaConfig,
        tasks: TaskSet,
        side: SideOutputs,
        metrics: Metrics,
        owned: Arc<Ownership>,
        faults: Arc<Faults>,
        results_dir: Option<PathBuf>,
    ) -> anyhow::Result<SourceConsumer> {
        let topo = Arc::clone(tasks.topology());
        let changelog = if topo.changelog { Some(Mutex::new(ChangelogProducer::new(kafka, &topo, Arc::clone(&faults))?)) } else { None };
        let updater = if topo.changelog {
            Some(StateUpdater::start(kafka, Arc::clone(&topo), tasks.store().clone(), Arc::clone(&owned), metrics.clone(), Arc::clone(&faults))?)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            tasks: Mutex::new(tasks),
            topo: Arc::clone(&topo),
            kafka: kafka.clone(),
            side,
            changelog,
            metrics,
            owned,
            faults,
            flushed: Mutex::new(HashMap::new()),
            held: Mutex::new(Vec::new()),
            fatal: Mutex::new(None),
            pending: Mutex::new(Vec::new()),
            in_flight: Mutex::new(None),
            results_dir,
            emitter: Mutex::new(None),
            fetch: Mutex::new(HashMap::new()),
            quiet: Mutex::new(HashMap::new()),
            updater,
            restoring: Mutex::new(BTreeMap::new()),
            assignments: std::sync::atomic::AtomicU64::new(0),
            restored: Mutex::new(Vec::new()),
            seek_again: AtomicBool::new(false),
            first_position_due: AtomicBool::new(false),
        });
        let consumer: BaseConsumer<SourceContext> = super::client_config(
            kafka,
            &[
                ("group.id", &topo.application_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("partition.assignment.strategy", "cooperative-sticky"),
                ("statistics.interval.ms", "1000"),
                // A broker answers a fetch when data arrives or after this wait, whichever is
                // first; librdkafka's mock cluster always waits it out, which put 50 ms (p50)
                // between produce and processed at 100 ms. 25 ms costs an idle replica 40
                // empty fetches a second per broker.
                ("fetch.wait.max.ms", "25"),
                // librdkafka's default prefetch (100k messages) starves a consumer that
                // processes faster than one fetch round trip refills it: measured 133k vs
                // 490k events/s on S1 (`tally bench`).
                ("queued.min.messages", "1000000"),
                // 32 MiB of prefetch (librdkafka: 64 MiB): a burst waits at the broker, not in this process.
                ("queued.max.messages.kbytes", "32768"),
                // With that much prefetched, a full queue made librdkafka pause fetching for
                // its default 1 s; records produced then waited it out (p99 to queryable
                // 0.94–1.41 s before, 0.82–0.96 s after, at 20k events/s).
                ("fetch.queue.backoff.ms", "20"),
                // A killed replica's partitions move after the session timeout; librdkafka's
                // 45 s would leave them unanswered that long. 10 s with 1 s heartbeats (which
                // also make a clean leave propagate within about a second).
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "1000"),
            ],
        )
        .create_with_context(SourceContext { shared: Arc::clone(&shared) })
        .map_err(|e| anyhow::anyhow!("creating the consumer for {}: {e}", kafka.bootstrap_servers))?;
        Ok(SourceConsumer { consumer, shared })
    }

    /// Where the standby planner sends its commands (with a changelog).
    pub fn state_updater(&self) -> Option<std::sync::mpsc::Sender<Command>> {
        self.shared.updater.as_ref().map(StateUpdater::commands)
    }

    /// Polls and processes until `stop` is set, flushing and committing every commit
    /// interval; on stop, flushes, commits and leaves the group.
    ///
    /// It joins the group (subscribes) only once the global tables are loaded: a replica
    /// takes no partition it could not join the records of.
    pub fn run(self, stop: &AtomicBool) -> anyhow::Result<()> {
        let tables = Arc::clone(self.shared.tasks().tables());
        while !tables.loaded() {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let topics: Vec<&str> = self.shared.topo.sources.iter().map(|s| s.topic.as_str()).collect();
        self.consumer.subscribe(&topics).map_err(|e| anyhow::anyhow!("subscribing to {topics:?}: {e}"))?;
        let interval = Duration::from_millis(self.shared.topo.commit_interval_ms);
        let mut next_flush = Instant::now() + interval;
        let sources: HashMap<String, usize> = self.shared.topo.sources.iter().enumerate().map(|(i, s)| (s.topic.clone(), i)).collect();
        let mut local = Batch::new(&self.shared);
        // One clock reading after each poll and one after each record: the time between
        // them is the poll's or the record's, and the flush interval is judged by them too.
        let mut mark = Instant::now();
        // While a flush awaits its acknowledgements, polls are short and it is checked
        // every millisecond: it completes soon after they arrive, with records processed
        // meanwhile.
        let mut flying = false;
        let mut next_check = mark;
        while !stop.load(Ordering::Relaxed) {
            let polled = self.consumer.poll(Duration::from_millis(if flying { 1 } else { 20 }));
            let polled_at = Instant::now();
            local.polling += polled_at - mark;
            mark = polled_at;
            // Checked after the poll, whose rebalance callbacks may have failed: a record of
            // a partition that could not be restored must not be processed.
            if let Some(e) = self.shared.fatal.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Err(e);
            }
            self.shared.resume_restored(&self.consumer)?;
            if self.shared.first_position_due.swap(false, Ordering::Relaxed) {
                self.shared.flush_and_commit(&self.consumer, None)?;
                mark = Instant::now();
            }
            match polled {
                None => {}
                Some(Err(e)) => {
                    // While the brokers are known to be down, each reconnect would log again.
                    if self.shared.faults.failing(Link::Brokers) {
                        tracing::debug!(error = %e, "consumer error");
                    } else {
                        tracing::warn!(error = %e, "consumer error");
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Some(Ok(msg)) => {
                    if let Some(&source) = sources.get(msg.topic()) {
                        self.handle(source, &msg, &mut local)?;
                        let handled = Instant::now();
                        local.processing_time += handled - mark;
                        mark = handled;
                    }
                }
            }
            if flying && mark >= next_check {
                flying = self.shared.advance_flight(&self.consumer, Duration::ZERO)?;
                mark = Instant::now();
                next_check = mark + Duration::from_millis(1);
                if !flying {
                    // A quarter interval after a flush completes is left before the next,
                    // so flushes longer than the interval are not back to back (at 200 k
                    // events/s they were, at 100 ms: p99 2.2 - 3.3 s to queryable).
                    next_flush = next_flush.max(mark + interval / 4);
                }
            }
            // The next flush waits for the one in flight without blocking processing.
            if mark >= next_flush && !flying {
                local.publish(&self.shared);
                self.shared.begin_flush(&self.consumer, None)?;
                flying = self.shared.advance_flight(&self.consumer, Duration::ZERO)?;
                let ended = Instant::now();
                next_check = ended + Duration::from_millis(1);
                // Timed from the flush's start, as Kafka Streams times its commit interval:
                // a flush's own duration does not add to how long records wait to become
                // queryable.
                next_flush = (mark + interval).max(ended + interval / 4);
                mark = ended;
            }
        }
        self.shared.owned.mark_stopping();
        self.shared.stop_emitter();
        local.publish(&self.shared);
        self.shared.flush_and_commit(&self.consumer, None)?;
        self.consumer.unsubscribe();
        // Serve the revocation callback so the group rebalances now, not at session timeout.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.consumer.assignment().map(|a| a.count() > 0).unwrap_or(false) {
            let _ = self.consumer.poll(Duration::from_millis(50));
        }
        if let Some(u) = &self.shared.updater {
            u.stop();
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
            Outcome::Processed { late, partly_late, missing } => {
                local.processed[source] += 1;
                for li in missing {
                    local.missing[source][li] += 1;
                }
                if let Some(ts) = kafka_ts {
                    local.processing.observe((now_ms() - ts).max(0) as f64 / 1000.0);
                    local.timestamps.push(ts);
                }
                for &m in &partly_late {
                    local.partly_late[m] += 1;
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
                if let crate::event::DecodeError::LookupMissing { table, .. } = &e {
                    shared.metrics.lookups_missing.with_label_values(&[&shared.topo.sources[source].name, table, "dead_letter"]).inc();
                }
                shared.metrics.records_invalid.with_label_values(&[&shared.topo.sources[source].name, e.reason()]).inc();
                shared.side.dead_letter(&origin(), e.reason(), &e.to_string());
            }
            Outcome::AlreadyApplied => local.replayed[source] += 1,
            Outcome::Rebuilt => local.rebuilt[source] += 1,
            Outcome::NotOwned => {}
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
    rebuilt: Vec<u64>,
    late: Vec<u64>,
    partly_late: Vec<u64>,
    /// Per source, per lookup: records whose key it did not find (skipped or null).
    missing: Vec<Vec<u64>>,
    timestamps: Vec<i64>,
    processing: prometheus::local::LocalHistogram,
    /// Time in `poll` (waiting for records included) and in processing them.
    polling: Duration,
    processing_time: Duration,
}

impl Batch {
    fn new(shared: &Shared) -> Batch {
        let (s, m) = (shared.topo.sources.len(), shared.topo.metrics.len());
        Batch {
            consumed: vec![0; s],
            processed: vec![0; s],
            replayed: vec![0; s],
            rebuilt: vec![0; s],
            late: vec![0; m],
            partly_late: vec![0; m],
            missing: shared.topo.sources.iter().map(|s| vec![0; s.lookups.len()]).collect(),
            timestamps: Vec::new(),
            processing: shared.metrics.processing_latency.local(),
            polling: Duration::ZERO,
            processing_time: Duration::ZERO,
        }
    }

    fn publish(&mut self, shared: &Shared) {
        for (i, src) in shared.topo.sources.iter().enumerate() {
            let l = [src.name.as_str()];
            shared.metrics.records_consumed.with_label_values(&l).inc_by(std::mem::take(&mut self.consumed[i]));
            shared.metrics.records_processed.with_label_values(&l).inc_by(std::mem::take(&mut self.processed[i]));
            shared.metrics.records_replayed.with_label_values(&l).inc_by(std::mem::take(&mut self.replayed[i]));
            shared.metrics.records_rebuilt.with_label_values(&l).inc_by(std::mem::take(&mut self.rebuilt[i]));
            for (lookup, n) in src.lookups.iter().zip(&mut self.missing[i]) {
                let n = std::mem::take(n);
                if n > 0 {
                    let action = if lookup.missing == crate::config::Missing::Null { "null" } else { "skip" };
                    let labels = [src.name.as_str(), shared.topo.tables[lookup.table].name.as_str(), action];
                    shared.metrics.lookups_missing.with_label_values(&labels).inc_by(n);
                }
            }
        }
        for (i, m) in shared.topo.metrics.iter().enumerate() {
            for (counter, n) in [(&shared.metrics.records_late, &mut self.late[i]), (&shared.metrics.records_partly_late, &mut self.partly_late[i])] {
                let n = std::mem::take(n);
                if n > 0 {
                    counter.with_label_values(&[&m.name]).inc_by(n);
                }
            }
        }
        self.processing.flush();
        for (activity, took) in [("poll", &mut self.polling), ("process", &mut self.processing_time)] {
            shared.metrics.work_seconds.with_label_values(&[activity]).inc_by(std::mem::take(took).as_secs_f64());
        }
        shared.pending.lock().unwrap_or_else(|p| p.into_inner()).append(&mut self.timestamps);
    }
}

#[cfg(test)]
mod tests {
    use super::FetchState;

    #[test]
    fn a_partition_is_caught_up_when_nothing_is_left_to_fetch_or_process() {
        // Empty since retention deleted its records: the log starts at the high watermark.
        assert!(FetchState { high: 1000, fetched: 1000, queued: 0 }.caught_up(0));
        // A transaction's commit marker holds the last offset, never handed over.
        assert!(FetchState { high: 1001, fetched: 1001, queued: 0 }.caught_up(1000));
        assert!(!FetchState { high: 1000, fetched: 1000, queued: 5 }.caught_up(995), "fetched, not processed");
        assert!(!FetchState { high: 1000, fetched: 600, queued: 0 }.caught_up(600), "more to fetch");
    }
}
