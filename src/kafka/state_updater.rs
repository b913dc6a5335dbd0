//! The state updater (Kafka Streams' name for it): one thread that reads changelogs into the
//! store, off the consumer thread. It restores the partitions this replica is assigned —
//! so a long restore of one partition no longer stops the others, and rebalance callbacks
//! return at once — and follows the changelogs of the partitions it keeps as standbys.
//!
//! Each partition it reads is in one of three states:
//!
//! | state        | reads                          | then                                        |
//! |--------------|--------------------------------|---------------------------------------------|
//! | `Restoring`  | up to the end it saw at start  | finished, fsynced, reported to the consumer |
//! | `CatchingUp` | a standby, up to that end      | `Following`                                 |
//! | `Following`  | a standby, every new flush     | each flush written atomically with its position |
//!
//! A standby that becomes active continues where it is: only its lag is read. Where a
//! restore starts (the local checkpoint's tail, or everything) is [`crate::changelog::plan`].
//!
//! A restore that fails for a reason that may pass — the changelog's leader does not
//! answer, the disk refuses a write — is begun again after a backoff, and shown meanwhile
//! as the `restore` fault; one that stops receiving records is shown so and goes on
//! reading (the client reconnects by itself). Only what cannot pass stops the replica: a
//! record of a newer tally, a damaged store.
//!
//! It also deletes the local state of partitions this replica neither owns nor keeps a copy
//! of, `state.cleanup_delay` after it let them go (Kafka Streams' state cleaner): until
//! then a partition that comes back restores only the changelog's tail.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::changelog::{self, Plan, Restoration, RestoreStats};
use crate::config::KafkaConfig;
use crate::health::{Faults, Link};
use crate::metrics::Metrics;
use crate::ownership::{Ownership, Standby};
use crate::store::{Store, StoreError};
use crate::topology::Topology;

/// A restore behind its end that reads nothing for this long is shown as stalled.
const RESTORE_STALL: Duration = Duration::from_secs(15);
/// How long a changelog partition's offsets may take to arrive before the attempt fails.
const OFFSETS_TIMEOUT: Duration = Duration::from_secs(5);
/// The wait before a failed restore begins again, doubled per failure up to `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// The bytes all restores together buffer before writing (shared evenly, at least
/// `RESTORE_BUFFER_FLOOR` each): many partitions restoring at once stay within it.
const RESTORE_BUDGET: usize = 32 << 20;
const RESTORE_BUFFER_FLOOR: usize = 256 << 10;
/// How often progress goes to the log, the metrics and the ownership map.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// What the updater is asked to do, per (source, partition).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The partition was assigned (the number tells this assignment from an earlier one of
    /// the same partition): bring it up to date with its changelog.
    Restore(usize, i32, u64),
    /// Keep a standby copy (ignored for a partition this replica owns).
    Follow(usize, i32),
    /// Stop keeping the standby copy (a restore in progress goes on).
    Unfollow(usize, i32),
    /// The partition was revoked: stop whatever is read of it (its local state is deleted
    /// after `state.cleanup_delay` unless it comes back).
    Cancel(usize, i32),
}

/// What the updater reports to the consumer thread.
#[derive(Debug)]
pub enum Done {
    /// The partition's store is up to date with its changelog and fsynced, for the
    /// assignment numbered so: process it.
    Restored(usize, i32, u64, RestoreStats),
    /// Reading the changelogs failed; processing a partition now would answer short.
    Failed(anyhow::Error),
}

enum Mode {
    Restoring { end: i64, total: u64, started: Instant, assignment: u64 },
    CatchingUp { end: i64 },
    Following { committed: bool },
}

/// One changelog partition being read.
struct Reading {
    restoration: Restoration,
    mode: Mode,
    /// The next changelog offset to read.
    next: i64,
    /// What of `restoration.stats` the counters already hold.
    reported: RestoreStats,
    last_read: Instant,
    /// Whether what is read so far ends a flush: the last record was a position record (or,
    /// before any, the local state was up to date with the changelog).
    whole: bool,
    /// Shown as stalled (nothing read for `RESTORE_STALL`) since the last record.
    stalled: bool,
}

/// A restore waiting to begin again after a failure that may pass.
struct Retry {
    assignment: u64,
    due: Instant,
    delay: Duration,
}

/// Whether a failed read may succeed when tried again: the brokers' errors and the disk's
/// may pass; a record of a newer tally or a damaged store will not.
fn may_pass(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StoreError>().is_none_or(StoreError::is_io)
}

impl Reading {
    /// Applies the record at `offset`; `true` when that reached the end being read to.
    fn record(&mut self, offset: i64, k: &[u8], v: Option<&[u8]>) -> anyhow::Result<bool> {
        if offset < self.next {
            return Ok(false);
        }
        let position = self.restoration.apply(k, v)?;
        self.next = offset + 1;
        self.last_read = Instant::now();
        self.stalled = false;
        self.whole = position;
        // Following (a standby, or one being promoted), each flush goes in with its position.
        if position {
            self.restoration.commit(offset)?;
        }
        Ok(match self.mode {
            Mode::Following { .. } => {
                if position {
                    self.mode = Mode::Following { committed: true };
                }
                false
            }
            Mode::Restoring { end, .. } | Mode::CatchingUp { end } => self.next >= end,
        })
    }

    /// The assignment it restores for (`None`: a standby copy).
    fn assignment(&self) -> Option<u64> {
        match self.mode {
            Mode::Restoring { assignment, .. } => Some(assignment),
            _ => None,
        }
    }
}

/// The running updater.
pub struct StateUpdater {
    commands: Sender<Command>,
    done: Mutex<Receiver<Done>>,
    /// Set with every report: the consumer thread looks at `done` only then (it asks once
    /// per record polled).
    news: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl StateUpdater {
    /// Starts the thread, reading `topo`'s changelogs into `store`; progress goes to `owned`
    /// and `metrics`, faults to `faults`.
    pub fn start(
        kafka: &KafkaConfig,
        topo: Arc<Topology>,
        store: Store,
        owned: Arc<Ownership>,
        metrics: Metrics,
        faults: Arc<Faults>,
    ) -> anyhow::Result<StateUpdater> {
        let consumer: BaseConsumer = super::client_config(
            kafka,
            // librdkafka wants a group id even for manually assigned partitions; this consumer
            // never joins it nor commits.
            &[
                ("group.id", &format!("{}-restore", topo.application_id)),
                ("enable.auto.commit", "false"),
                ("queued.min.messages", "1000000"),
                // 32 MiB of prefetch (librdkafka: 64 MiB).
                ("queued.max.messages.kbytes", "32768"),
                ("fetch.queue.backoff.ms", "20"),
                ("fetch.max.bytes", "52428800"),
                ("max.partition.fetch.bytes", "10485760"),
                ("fetch.wait.max.ms", "50"),
            ],
        )
        .create()
        .map_err(|e| anyhow::anyhow!("creating the changelog reader: {e}"))?;
        let (commands, inbox) = channel();
        let (report, done) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let news = Arc::new(AtomicBool::new(false));
        let topics = (0..topo.sources.len()).map(|s| topo.changelog_topic(s)).collect();
        let report = Report { tx: report, news: Arc::clone(&news) };
        let worker = Worker {
            topo,
            store,
            owned,
            metrics,
            faults,
            consumer,
            topics,
            inbox,
            report,
            reading: HashMap::new(),
            waiting: HashMap::new(),
            let_go: HashMap::new(),
            finished: Vec::new(),
            stop: Arc::clone(&stop),
        };
        let thread = std::thread::Builder::new().name("tally-state-updater".into()).spawn(move || worker.run())?;
        Ok(StateUpdater { commands, done: Mutex::new(done), news, stop, thread: Mutex::new(Some(thread)) })
    }

    /// A handle to send commands with (the standby planner keeps one).
    pub fn commands(&self) -> Sender<Command> {
        self.commands.clone()
    }

    /// Sends a command.
    pub fn send(&self, c: Command) {
        let _ = self.commands.send(c);
    }

    /// What finished since the last call.
    pub fn finished(&self) -> Vec<Done> {
        if !self.news.swap(false, Ordering::AcqRel) {
            return Vec::new();
        }
        self.done.lock().unwrap_or_else(|p| p.into_inner()).try_iter().collect()
    }

    /// Stops the thread (a restore in progress is picked up by the next owner).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = t.join();
        }
    }
}

/// Restores `parts` into `store` and waits until every one is done (`tally bench`).
pub fn restore_all(kafka: &KafkaConfig, topo: Arc<Topology>, store: Store, parts: &[(usize, i32)], metrics: Metrics) -> anyhow::Result<RestoreStats> {
    let owned = Arc::new(Ownership::default());
    let updater = StateUpdater::start(kafka, topo, store, Arc::clone(&owned), metrics, Arc::new(Faults::new(None)))?;
    for &(s, p) in parts {
        owned.set(s, p, crate::ownership::PartitionState::Restoring { restored: 0, total: 0 });
        updater.send(Command::Restore(s, p, 0));
    }
    let (mut left, mut total) = (parts.len(), RestoreStats::default());
    while left > 0 {
        for d in updater.finished() {
            match d {
                Done::Restored(_, _, _, stats) => {
                    total += stats;
                    left -= 1;
                }
                Done::Failed(e) => return Err(e),
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    updater.stop();
    Ok(total)
}

impl Drop for StateUpdater {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the worker reports, flagging each report.
struct Report {
    tx: Sender<Done>,
    news: Arc<AtomicBool>,
}

impl Report {
    fn send(&self, d: Done) {
        let _ = self.tx.send(d);
        self.news.store(true, Ordering::Release);
    }
}

struct Worker {
    topo: Arc<Topology>,
    store: Store,
    owned: Arc<Ownership>,
    metrics: Metrics,
    faults: Arc<Faults>,
    consumer: BaseConsumer,
    topics: Vec<String>,
    inbox: Receiver<Command>,
    report: Report,
    reading: HashMap<(usize, i32), Reading>,
    waiting: HashMap<(usize, i32), Retry>,
    /// Partitions let go (revoked, or a copy no longer kept), since when: their local state
    /// is deleted after `state.cleanup_delay`.
    let_go: HashMap<(usize, i32), Instant>,
    /// Restores finished in this step: reported once fsynced, together.
    finished: Vec<(usize, i32, u64, RestoreStats)>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    fn run(mut self) {
        let mut last_report = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if let Err(e) = self.step() {
                self.report.send(Done::Failed(e));
                return;
            }
            if last_report.elapsed() >= REPORT_EVERY {
                last_report = Instant::now();
                self.progress();
            }
        }
    }

    /// Takes in commands, then reads what the changelogs have.
    fn step(&mut self) -> anyhow::Result<()> {
        let wait = if self.reading.is_empty() { Duration::from_millis(100) } else { Duration::ZERO };
        if let Ok(c) = self.inbox.recv_timeout(wait) {
            self.command(c)?;
            while let Ok(c) = self.inbox.try_recv() {
                self.command(c)?;
            }
        }
        self.begin_due()?;
        if self.reading.is_empty() {
            return self.report_finished();
        }
        let mut ended = Vec::new();
        for _ in 0..10_000 {
            match self.consumer.poll(Duration::from_millis(20)) {
                None => {
                    self.at_end()?;
                    break;
                }
                Some(Err(e)) => tracing::warn!(error = %e, "changelog read error; retrying"),
                Some(Ok(m)) => {
                    let key = (self.topics.iter().position(|t| t == m.topic()).unwrap_or(usize::MAX), m.partition());
                    if let Some(r) = self.reading.get_mut(&key) {
                        let assignment = r.assignment();
                        match r.record(m.offset(), m.key().unwrap_or_default(), m.payload()) {
                            Ok(true) => ended.push(key),
                            Ok(false) => {}
                            Err(e) => self.failed(key, assignment, e)?,
                        }
                    }
                }
            }
            for key in ended.drain(..) {
                self.end_reached(key)?;
            }
        }
        self.report_finished()
    }

    /// One fsync for every restore finished in this step, then their reports.
    fn report_finished(&mut self) -> anyhow::Result<()> {
        if self.finished.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.flush() {
            // Kept: reported once an fsync succeeds (the next step tries again).
            let e = anyhow::Error::from(e);
            if !may_pass(&e) {
                return Err(e);
            }
            self.note_store_error(&e);
            if self.faults.failed(Link::Restore, format!("the store did not fsync restored partitions: {e:#}")) == 1 {
                tracing::warn!(error = %format!("{e:#}"), "the store did not fsync restored partitions; trying again");
            }
            return Ok(());
        }
        for (s, p, assignment, stats) in self.finished.drain(..) {
            self.report.send(Done::Restored(s, p, assignment, stats));
        }
        Ok(())
    }

    fn command(&mut self, c: Command) -> anyhow::Result<()> {
        match c {
            Command::Restore(s, p, assignment) => {
                self.waiting.remove(&(s, p));
                let result = match self.reading.contains_key(&(s, p)) {
                    true => self.promote(s, p, assignment),
                    false => self.begin(s, p, Some(assignment)),
                };
                if let Err(e) = result {
                    self.failed((s, p), Some(assignment), e)?;
                }
            }
            Command::Follow(s, p) => {
                if !self.owned.owns(s, p) && !self.reading.contains_key(&(s, p)) && !self.waiting.contains_key(&(s, p)) {
                    // A copy that cannot be started is not worth stopping the replica for.
                    if let Err(e) = self.begin(s, p, None) {
                        tracing::warn!(topic = self.topics[s], partition = p, error = %e, "could not start a standby copy; the next placement tries again");
                        self.drop_reading(s, p);
                    }
                }
            }
            Command::Unfollow(s, p) => {
                if self.reading.get(&(s, p)).is_some_and(|r| !matches!(r.mode, Mode::Restoring { .. })) {
                    self.drop_reading(s, p);
                }
            }
            Command::Cancel(s, p) => {
                self.waiting.remove(&(s, p));
                self.drop_reading(s, p);
            }
        }
        Ok(())
    }

    /// A standby promoted (or a restore re-assigned): reads its lag only.
    fn promote(&mut self, s: usize, p: i32, assignment: u64) -> anyhow::Result<()> {
        let (_, end) = self.offsets(s, p)?;
        let Some(r) = self.reading.get_mut(&(s, p)) else { return Ok(()) };
        let total = (end - r.next).max(0) as u64;
        tracing::info!(topic = self.topics[s], partition = p, from = r.next, to = end, records = total, "promoting the standby");
        // The copy goes on answering queries until the promotion is done.
        r.mode = Mode::Restoring { end, total, started: Instant::now(), assignment };
        if r.next >= end {
            self.finish(s, p)?;
        }
        Ok(())
    }

    /// The changelog partition's low and high watermarks.
    fn offsets(&self, s: usize, p: i32) -> anyhow::Result<(i64, i64)> {
        let topic = &self.topics[s];
        self.consumer
            .fetch_watermarks(topic, p, OFFSETS_TIMEOUT)
            .or_else(|_| {
                // librdkafka answers from its metadata cache, which keeps a partition it found
                // leaderless until the topic's metadata is read again.
                self.consumer.fetch_metadata(Some(topic), OFFSETS_TIMEOUT)?;
                self.consumer.fetch_watermarks(topic, p, OFFSETS_TIMEOUT)
            })
            .map_err(|e| anyhow::anyhow!("reading the offsets of {topic} partition {p}: {e}"))
    }

    /// A read of `key` failed. What may pass is tried again: a restore begins again after a
    /// backoff (from the local checkpoint, when one is left); a standby copy is dropped, for
    /// the next placement to start again. What cannot pass is returned, and stops the replica.
    fn failed(&mut self, key: (usize, i32), assignment: Option<u64>, e: anyhow::Error) -> anyhow::Result<()> {
        if !may_pass(&e) {
            return Err(e);
        }
        self.note_store_error(&e);
        let ((s, p), error) = (key, format!("{e:#}"));
        self.drop_reading(s, p);
        let Some(assignment) = assignment else {
            tracing::warn!(topic = self.topics[s], partition = p, error, "a standby copy failed; the next placement starts it again");
            return Ok(());
        };
        let delay = self.waiting.get(&key).map_or(RETRY_FIRST, |w| (w.delay * 2).min(RETRY_MAX));
        tracing::warn!(topic = self.topics[s], partition = p, error, retry_in_ms = delay.as_millis() as u64, "restore failed; trying again");
        self.faults.failed(Link::Restore, format!("restoring {} partition {p}: {error}", self.topics[s]));
        self.waiting.insert(key, Retry { assignment, due: Instant::now() + delay, delay });
        Ok(())
    }

    /// A store error that leaves sled unwritable asks for a restart (see [`Faults::store_unwritable`]).
    fn note_store_error(&self, e: &anyhow::Error) {
        if e.downcast_ref::<StoreError>().is_some_and(StoreError::leaves_store_unwritable) {
            self.faults.store_unwritable("a restore's write", e);
        }
    }

    /// Begins again the failed restores whose wait is over.
    fn begin_due(&mut self) -> anyhow::Result<()> {
        let now = Instant::now();
        let due: Vec<((usize, i32), u64)> = self.waiting.iter().filter(|(_, w)| w.due <= now).map(|(&k, w)| (k, w.assignment)).collect();
        for (key, assignment) in due {
            match self.begin(key.0, key.1, Some(assignment)) {
                Ok(()) => {
                    self.waiting.remove(&key);
                }
                Err(e) => self.failed(key, Some(assignment), e)?,
            }
        }
        Ok(())
    }

    /// Starts reading a partition: to restore it for the assignment numbered `active`, or
    /// (`None`) to keep a standby copy.
    fn begin(&mut self, s: usize, p: i32, active: Option<u64>) -> anyhow::Result<()> {
        if active.is_some() && !self.owned.owns(s, p) {
            return Ok(()); // revoked before its restore began
        }
        self.let_go.remove(&(s, p));
        // A restore writes much; sled must not meet a full disk (see `state.min_free_bytes`).
        self.store.ensure_room(self.topo.min_free_bytes)?;
        let topic = self.topics[s].clone();
        let (low, high) = self.offsets(s, p)?;
        let local = self.store.partition_meta(&self.topo.sources[s].name, p)?;
        let plan = changelog::plan(local, low, high);
        let (from, scratch) = match plan {
            Plan::UpToDate => (high, false),
            Plan::Tail(from) => (from, false),
            Plan::Scratch => (low, true),
        };
        let restoration = Restoration::begin(&self.store, &self.topo, s, p, scratch)?;
        let total = (high - from) as u64;
        let mode = if let Some(assignment) = active {
            tracing::info!(topic, partition = p, from, to = high, records = total, from_checkpoint = !scratch, "restoring");
            self.owned.restoring(s, p, 0, total);
            Mode::Restoring { end: high, total, started: Instant::now(), assignment }
        } else {
            tracing::info!(topic, partition = p, from, to = high, records = total, "keeping a standby");
            self.owned.set_standby(s, p, Standby { lag: total, queryable: false });
            Mode::CatchingUp { end: high }
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, p, Offset::Offset(from))?;
        self.consumer.incremental_assign(&tpl).map_err(|e| anyhow::anyhow!("reading {topic} partition {p}: {e}"))?;
        let whole = plan == Plan::UpToDate;
        let reading = Reading { restoration, mode, next: from, reported: RestoreStats::default(), last_read: Instant::now(), whole, stalled: false };
        self.reading.insert((s, p), reading);
        self.readings_changed();
        if from >= high {
            self.reached_end(s, p)?;
        }
        Ok(())
    }

    /// With nothing left to read, a partition whose fetch position has passed the end being
    /// read to is there, even if the last offsets never arrive as records (compacted away,
    /// a transaction's markers).
    fn at_end(&mut self) -> anyhow::Result<()> {
        let Ok(positions) = self.consumer.position() else { return Ok(()) };
        let keys: Vec<(usize, i32)> = self.reading.keys().copied().collect();
        for key in keys {
            let at = positions.find_partition(&self.topics[key.0], key.1).and_then(|e| e.offset().to_raw());
            let Some(r) = self.reading.get_mut(&key) else { continue };
            let end = match r.mode {
                Mode::Restoring { end, .. } | Mode::CatchingUp { end } => end,
                Mode::Following { .. } => continue,
            };
            if at.is_some_and(|o| o >= end) {
                r.next = r.next.max(end);
                self.end_reached(key)?;
            }
        }
        Ok(())
    }

    /// [`Worker::reached_end`], with a failure handled by [`Worker::failed`].
    fn end_reached(&mut self, key: (usize, i32)) -> anyhow::Result<()> {
        let assignment = self.reading.get(&key).and_then(Reading::assignment);
        match self.reached_end(key.0, key.1) {
            Ok(()) => Ok(()),
            Err(e) => self.failed(key, assignment, e),
        }
    }

    fn reached_end(&mut self, s: usize, p: i32) -> anyhow::Result<()> {
        let Some(r) = self.reading.get_mut(&(s, p)) else { return Ok(()) };
        match r.mode {
            Mode::Restoring { .. } => self.finish(s, p),
            Mode::CatchingUp { .. } => {
                // From here on, whole flushes only. Queryable at once if what was read ends
                // with a flush (a quiet partition's changelog does), else after the next one.
                r.restoration.follow()?;
                if r.whole {
                    r.restoration.commit(r.next - 1)?;
                }
                r.mode = Mode::Following { committed: r.whole };
                Ok(())
            }
            Mode::Following { .. } => Ok(()),
        }
    }

    /// Ends a restore: writes the last position read with its checkpoint; it is reported
    /// once fsynced ([`Worker::report_finished`]).
    fn finish(&mut self, s: usize, p: i32) -> anyhow::Result<()> {
        let Some(mut r) = self.reading.remove(&(s, p)) else { return Ok(()) };
        self.unassign(s, p);
        self.publish(s, &mut r);
        let (started, assignment) = match r.mode {
            Mode::Restoring { started, assignment, .. } => (started, assignment),
            _ => (Instant::now(), 0),
        };
        // A promoted copy may be answering queries: its last flushes go in atomically.
        r.restoration.commit(r.next - 1)?;
        let (position, stats) = r.restoration.finish(r.next - 1)?;
        self.owned.remove_standby(s, p);
        tracing::info!(
            topic = self.topics[s],
            partition = p,
            records = stats.records,
            keys = stats.keys_written,
            bytes = stats.bytes,
            rejected = stats.rejected,
            resume_at = position.map(|m| m.next_offset),
            "restored"
        );
        self.metrics.restore_duration.observe(started.elapsed().as_secs_f64());
        self.readings_changed();
        self.finished.push((s, p, assignment, stats));
        Ok(())
    }

    fn drop_reading(&mut self, s: usize, p: i32) {
        if self.reading.remove(&(s, p)).is_some() {
            self.unassign(s, p);
        }
        if !self.owned.owns(s, p) {
            self.let_go.insert((s, p), Instant::now());
        }
        self.owned.remove_standby(s, p);
        self.readings_changed();
    }

    fn unassign(&self, s: usize, p: i32) {
        let mut t = TopicPartitionList::new();
        t.add_partition(&self.topics[s], p);
        let _ = self.consumer.incremental_unassign(&t);
    }

    /// Deletes the local state of the partitions let go `state.cleanup_delay` ago that are
    /// neither owned nor read again since (nor answered as lost, until the group says who
    /// owns them). A failed delete is tried again at the next report.
    fn clean_let_go(&mut self) {
        let delay = Duration::from_millis(self.topo.cleanup_delay_ms);
        let due: Vec<(usize, i32)> = self.let_go.iter().filter(|(_, at)| at.elapsed() >= delay).map(|(&k, _)| k).collect();
        for (s, p) in due {
            if self.owned.owns(s, p) || self.reading.contains_key(&(s, p)) || self.waiting.contains_key(&(s, p)) {
                self.let_go.remove(&(s, p));
                continue;
            }
            if self.owned.lost(s, p).is_some() {
                continue;
            }
            let src = &self.topo.sources[s];
            let names = src.metrics.iter().map(|&m| self.topo.metrics[m].name.as_str());
            match self.store.delete_partition(names, &src.name, p) {
                Ok(keys) => {
                    self.let_go.remove(&(s, p));
                    self.metrics.partitions_cleaned.inc();
                    tracing::info!(
                        source = src.name,
                        partition = p,
                        keys,
                        after_ms = delay.as_millis() as u64,
                        "deleted the local state of a partition let go"
                    );
                }
                Err(e) => {
                    tracing::warn!(source = src.name, partition = p, error = %e, "deleting the local state of a partition let go failed; trying again")
                }
            }
        }
    }

    /// Adds to the restore counters what `r` read since the last call.
    fn publish(&self, s: usize, r: &mut Reading) {
        let (now, l) = (r.restoration.stats, [self.topo.sources[s].name.as_str()]);
        self.metrics.restore_records.with_label_values(&l).inc_by(now.records - r.reported.records);
        self.metrics.restore_bytes.with_label_values(&l).inc_by(now.bytes - r.reported.bytes);
        self.metrics.restore_rejected.with_label_values(&l).inc_by(now.rejected - r.reported.rejected);
        r.reported = now;
    }

    /// After readings began or ended (and every second): the restore budget shared anew,
    /// the gauges set.
    fn readings_changed(&mut self) {
        let buffering = self.reading.values().filter(|r| !matches!(r.mode, Mode::Following { .. })).count();
        let share = (RESTORE_BUDGET / buffering.max(1)).max(RESTORE_BUFFER_FLOOR);
        for r in self.reading.values_mut() {
            r.restoration.limit_buffer(share);
        }
        let restoring = self.reading.values().filter(|r| matches!(r.mode, Mode::Restoring { .. })).count();
        self.metrics.partitions_restoring.set(restoring as i64);
        self.metrics.restore_remaining.set(self.remaining() as i64);
    }

    fn remaining(&self) -> u64 {
        self.reading
            .values()
            .map(|r| match r.mode {
                Mode::Restoring { end, .. } => (end - r.next).max(0) as u64,
                _ => 0,
            })
            .sum()
    }

    /// Every second: progress to the ownership map, the metrics and the log; standby lags;
    /// stalled restores shown, and the `restore` fault ended once nothing fails.
    fn progress(&mut self) {
        let keys: Vec<(usize, i32)> = self.reading.keys().copied().collect();
        for (s, p) in keys {
            let Some(mut r) = self.reading.remove(&(s, p)) else { continue };
            let standby = !matches!(r.mode, Mode::Restoring { .. });
            let high = standby.then(|| self.consumer.fetch_watermarks(&self.topics[s], p, Duration::from_secs(1)).map(|w| w.1).ok()).flatten();
            self.publish(s, &mut r);
            match r.mode {
                Mode::Restoring { end, total, .. } => {
                    let restored = total.saturating_sub((end - r.next).max(0) as u64);
                    self.owned.restoring(s, p, restored, total);
                    if !r.stalled && r.last_read.elapsed() > RESTORE_STALL && r.next < end {
                        r.stalled = true;
                        let detail = format!(
                            "restoring {} partition {p}: nothing read for {} s, {} records before its end",
                            self.topics[s],
                            RESTORE_STALL.as_secs(),
                            end - r.next
                        );
                        tracing::warn!(%detail, "restore stalled; still reading");
                        self.faults.failed(Link::Restore, detail);
                    }
                }
                Mode::CatchingUp { end } => {
                    self.owned.set_standby(s, p, Standby { lag: (high.unwrap_or(end) - r.next).max(0) as u64, queryable: false })
                }
                Mode::Following { committed } => {
                    if let Some(high) = high {
                        self.owned.set_standby(s, p, Standby { lag: (high - r.next).max(0) as u64, queryable: committed });
                    }
                }
            }
            self.reading.insert((s, p), r);
        }
        self.readings_changed();
        let restoring = self.reading.values().filter(|r| matches!(r.mode, Mode::Restoring { .. })).count();
        if restoring > 0 {
            tracing::info!(partitions = restoring, remaining = self.remaining(), "restore in progress");
        }
        self.clean_let_go();
        let failing = !self.waiting.is_empty() || !self.finished.is_empty() || self.reading.values().any(|r| r.stalled);
        if !failing {
            if let Some(f) = self.faults.recovered(Link::Restore) {
                tracing::info!(attempts = f.attempts, "restores are going on again");
            }
        }
    }
}
