//! The table loader: one thread reading every global table's topic, all partitions, outside
//! any consumer group (Kafka Streams' global stream thread). It first reads each table to the
//! end its topic had at start — the replica processes nothing until then — and then keeps
//! following it. Each batch is applied to the table's store atomically with its new position,
//! and only then published, so a pin never names a position the store has not reached.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::side::{Origin, SideOutputs};
use crate::config::KafkaConfig;
use crate::event::Record;
use crate::metrics::Metrics;
use crate::table::store::{TableChange, TableRecord};
use crate::table::{decode_record, Tables};
use crate::topology::Topology;

/// Records gathered before a batch is applied (while loading; following, a batch ends when
/// nothing more is waiting).
const BATCH: usize = 20_000;
const TIMEOUT: Duration = Duration::from_secs(10);

/// The running loader.
pub struct TableLoader {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
}

/// What the loader thread works with.
struct Loader {
    topo: Arc<Topology>,
    tables: Arc<Tables>,
    consumer: BaseConsumer,
    side: SideOutputs,
    metrics: Metrics,
    /// Per table, per partition: the end offset to reach before the first load is done.
    targets: Vec<Vec<i64>>,
    started: Instant,
    done: Vec<bool>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl TableLoader {
    /// Starts loading `topo`'s tables into `tables` (nothing to do without tables). Fails
    /// when a table's topic does not exist.
    pub fn start(kafka: &KafkaConfig, topo: Arc<Topology>, tables: Arc<Tables>, metrics: Metrics) -> anyhow::Result<TableLoader> {
        let stop = Arc::new(AtomicBool::new(false));
        if topo.tables.is_empty() {
            return Ok(TableLoader { stop, handle: None });
        }
        let consumer: BaseConsumer = super::client_config(
            kafka,
            &[
                // Never joins the group: partitions are assigned by hand and offsets kept in
                // the table's store, not committed.
                ("group.id", &format!("{}-tables", topo.application_id)),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("fetch.wait.max.ms", "100"),
            ],
        )
        .create()
        .map_err(|e| anyhow::anyhow!("creating the table consumer for {}: {e}", kafka.bootstrap_servers))?;
        let side = SideOutputs::new(kafka, topo.dead_letter_topic(), topo.late_topic(), metrics.clone())?;
        let mut loader = Loader { topo, tables, consumer, side, metrics, targets: vec![], started: Instant::now(), done: vec![] };
        loader.assign()?;
        let handle = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new().name("tally-tables".into()).spawn(move || loader.run(&stop))?
        };
        Ok(TableLoader { stop, handle: Some(handle) })
    }

    /// Whether the loader thread has stopped (it only does on a failure).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_some_and(JoinHandle::is_finished)
    }

    /// Stops the thread; returns its failure, if it had one.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(anyhow::anyhow!("the table loader panicked")),
        }
    }
}

impl Loader {
    /// Assigns every partition of every table's topic at the offset its store has reached,
    /// and notes the ends to reach.
    fn assign(&mut self) -> anyhow::Result<()> {
        let mut tpl = TopicPartitionList::new();
        let metas = self.tables.metas();
        for (t, table) in self.topo.tables.iter().enumerate() {
            let md = self
                .consumer
                .fetch_metadata(Some(&table.topic), TIMEOUT)
                .map_err(|e| anyhow::anyhow!("reading metadata of table topic `{}`: {e}", table.topic))?;
            let partitions = md.topics().first().filter(|t| t.error().is_none()).map_or(0, |t| t.partitions().len());
            if partitions == 0 {
                anyhow::bail!("table topic `{}` (table `{}`) does not exist; create it first", table.topic, table.name);
            }
            self.tables.set_partitions(t, partitions);
            let mut ends = Vec::new();
            for p in 0..partitions as i32 {
                let (_, high) = self
                    .consumer
                    .fetch_watermarks(&table.topic, p, TIMEOUT)
                    .map_err(|e| anyhow::anyhow!("reading the end of `{}` partition {p}: {e}", table.topic))?;
                ends.push(high);
                let from = metas[t].next.get(p as usize).copied().unwrap_or(0);
                tpl.add_partition_offset(&table.topic, p, if from > 0 { Offset::Offset(from) } else { Offset::Beginning })?;
            }
            self.targets.push(ends);
        }
        for (t, meta) in metas.iter().enumerate() {
            self.metrics.table_entries.with_label_values(&[&self.topo.tables[t].name]).set(meta.entries as i64);
        }
        self.done = vec![false; self.topo.tables.len()];
        self.metrics.tables_loading.set(self.topo.tables.len() as i64);
        self.consumer.assign(&tpl).map_err(|e| anyhow::anyhow!("assigning the table topics: {e}"))?;
        self.check_loaded();
        Ok(())
    }

    fn run(mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        let mut batches: Vec<Vec<TableRecord>> = vec![Vec::new(); self.topo.tables.len()];
        let mut scratch = Record::default();
        while !stop.load(Ordering::Relaxed) {
            let mut n = 0;
            let mut wait = Duration::from_millis(50);
            while n < BATCH {
                match self.consumer.poll(wait) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "table consumer error");
                        break;
                    }
                    Some(Ok(msg)) => {
                        if let Some(r) = self.decode(&msg, &mut scratch) {
                            batches[r.0].push(r.1);
                        }
                        n += 1;
                    }
                }
                wait = Duration::ZERO;
            }
            for (t, batch) in batches.iter_mut().enumerate().filter(|(_, b)| !b.is_empty()) {
                self.tables.apply(t, batch, now_ms())?;
                self.metrics.table_records.with_label_values(&[&self.topo.tables[t].name]).inc_by(batch.len() as u64);
                batch.clear();
            }
            if n > 0 {
                for (t, meta) in self.tables.metas().iter().enumerate() {
                    self.metrics.table_entries.with_label_values(&[&self.topo.tables[t].name]).set(meta.entries as i64);
                }
                if let Err(e) = self.side.flush(TIMEOUT) {
                    tracing::warn!(error = %e, "dead letters of table records not acknowledged");
                }
            }
            self.check_loaded();
        }
        Ok(())
    }

    /// Decodes a message into (table, record); a bad one is dead-lettered and counted.
    fn decode(&self, msg: &BorrowedMessage<'_>, scratch: &mut Record) -> Option<(usize, TableRecord)> {
        let t = self.topo.tables.iter().position(|t| t.topic == msg.topic())?;
        let table = &self.topo.tables[t];
        let at = (msg.partition(), msg.offset(), msg.timestamp().to_millis().unwrap_or(0));
        match decode_record(table, at, msg.key(), msg.payload(), scratch) {
            Ok(r) => Some((t, r)),
            Err(e) => {
                self.metrics.table_invalid.with_label_values(&[&table.name, e.reason()]).inc();
                let origin = Origin { topic: msg.topic(), partition: at.0, offset: at.1, key: msg.key(), payload: msg.payload().unwrap_or_default() };
                self.side.dead_letter(&origin, e.reason(), &e.to_string());
                // The position still moves past it: the table is as it was.
                Some((t, TableRecord { partition: at.0, offset: at.1, timestamp: at.2, key: Vec::new(), change: TableChange::Nothing }))
            }
        }
    }

    /// Marks each table whose position has reached its start-time end as loaded.
    fn check_loaded(&mut self) {
        let position = self.tables.position();
        for (t, ends) in self.targets.iter().enumerate() {
            if self.done[t] {
                continue;
            }
            let at = &position[t];
            let reached = ends.iter().enumerate().all(|(p, &end)| at.get(p).copied().unwrap_or(0) >= end);
            if reached {
                self.done[t] = true;
                let secs = self.started.elapsed().as_secs_f64();
                let name = &self.topo.tables[t].name;
                let entries = self.tables.metas()[t].entries;
                let records: i64 = ends.iter().sum();
                self.metrics.table_load_seconds.with_label_values(&[name]).set(secs.max(1e-3));
                self.metrics.tables_loading.dec();
                tracing::info!(table = %name, entries, records, seconds = secs, rate = (records as f64 / secs.max(1e-3)) as u64, "table loaded");
            }
        }
        if self.done.iter().all(|d| *d) && !self.tables.loaded() {
            self.tables.set_loaded();
        }
    }
}
