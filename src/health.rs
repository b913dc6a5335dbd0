//! What keeps a replica from doing its work right now: the brokers it cannot reach, the
//! flushes it cannot make durable. Set by the parts that meet the fault, shown by `/ready`
//! and the metrics, cleared by the first success after it.
//!
//! ```
//! use tally::health::{Faults, Link};
//! let faults = Faults::new(None);
//! faults.failed(Link::Brokers, "connection refused");
//! assert!(!faults.clear());
//! assert_eq!(faults.current()[0].attempts, 1);
//! faults.recovered(Link::Brokers);
//! assert!(faults.clear());
//! ```

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::metrics::Metrics;

/// What a fault is a fault of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Link {
    /// The brokers: metadata, topics, the group coordinator (at start, or since).
    Brokers,
    /// The flush: the group did not confirm the membership, or the changelog or the side
    /// outputs did not take it. Processing is paused and the state stays at the last durable
    /// flush until one succeeds.
    Flush,
    /// The state store's disk did not take a flush (full, unwritable): held like `Flush`,
    /// and the replica is not ready.
    Disk,
    /// A restore cannot go on: its changelog's leader does not answer, nothing arrives, or
    /// the store refuses the restored state. The partition stays restoring (not answered,
    /// not processed) and is tried again; the others carry on.
    Restore,
}

/// One fault, as `/ready` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    /// What failed.
    pub link: Link,
    /// The last error, in words.
    pub detail: String,
    /// Since when (wall clock, ms since the epoch): the first failure of this stretch.
    pub since_ms: i64,
    /// Failed attempts in this stretch.
    pub attempts: u64,
}

impl Link {
    /// Every link, each with its metrics from the start.
    pub const ALL: [Link; 4] = [Link::Brokers, Link::Flush, Link::Disk, Link::Restore];

    /// The links whose faults hold flushes (answers are then stale).
    pub const HOLDING_FLUSHES: [Link; 2] = [Link::Flush, Link::Disk];

    /// The label of the link's metrics.
    pub fn label(self) -> &'static str {
        match self {
            Link::Brokers => "brokers",
            Link::Flush => "flush",
            Link::Disk => "disk",
            Link::Restore => "restore",
        }
    }
}

/// The replica's current faults (shared between the consumer thread, start-up and HTTP),
/// mirrored in `tally_fault{link}` and `tally_fault_attempts_total{link}`.
pub struct Faults {
    faults: Mutex<BTreeMap<Link, Fault>>,
    /// Why only a restart mends this replica (`/health` then answers 503).
    restart: Mutex<Option<String>>,
    metrics: Option<Metrics>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

impl Faults {
    /// No faults yet; reported in `metrics`, when given.
    pub fn new(metrics: Option<Metrics>) -> Faults {
        if let Some(m) = &metrics {
            for link in Link::ALL {
                m.fault.with_label_values(&[link.label()]).set(0);
                m.fault_attempts.with_label_values(&[link.label()]);
            }
        }
        Faults { faults: Mutex::new(BTreeMap::new()), restart: Mutex::new(None), metrics }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Link, Fault>> {
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a failed attempt; returns the fault's attempts so far (1: a new stretch).
    pub fn failed(&self, link: Link, detail: impl Into<String>) -> u64 {
        let mut faults = self.lock();
        let f = faults.entry(link).or_insert_with(|| Fault { link, detail: String::new(), since_ms: now_ms(), attempts: 0 });
        f.detail = detail.into();
        f.attempts += 1;
        if let Some(m) = &self.metrics {
            m.fault.with_label_values(&[link.label()]).set(1);
            m.fault_attempts.with_label_values(&[link.label()]).inc();
        }
        f.attempts
    }

    /// Ends a fault's stretch; returns it, if there was one. A store that takes no write
    /// stays a `disk` fault until the restart, whatever flush (one with nothing to write)
    /// passed since.
    pub fn recovered(&self, link: Link) -> Option<Fault> {
        if link == Link::Disk && self.restart_needed().is_some() {
            return None;
        }
        let ended = self.lock().remove(&link);
        if let (Some(m), Some(_)) = (&self.metrics, &ended) {
            m.fault.with_label_values(&[link.label()]).set(0);
        }
        ended
    }

    /// Whether `link` is failing now.
    pub fn failing(&self, link: Link) -> bool {
        self.lock().contains_key(&link)
    }

    /// Since when the first of `links` to fail now has been failing (wall clock, ms).
    pub fn since(&self, links: &[Link]) -> Option<i64> {
        let faults = self.lock();
        links.iter().filter_map(|l| faults.get(l).map(|f| f.since_ms)).min()
    }

    /// Every current fault.
    pub fn current(&self) -> Vec<Fault> {
        self.lock().values().cloned().collect()
    }

    /// No fault now.
    pub fn clear(&self) -> bool {
        self.lock().is_empty()
    }

    /// Records that a state store write (`what`: a flush, a restore's write) failed so that
    /// sled takes no write until the store is reopened: a `disk` fault (unless one is
    /// raised already) that lasts until the restart, then `/health` 503 with the reason (the
    /// first is kept) — in that order, so a probe that sees the one sees the other.
    pub fn store_unwritable(&self, what: &str, e: &dyn std::fmt::Display) {
        let why = format!("the state store failed {what} ({e:#}) and takes no write until it is reopened");
        if !self.failing(Link::Disk) {
            self.failed(Link::Disk, why.clone());
        }
        let mut restart = self.restart.lock().unwrap_or_else(|p| p.into_inner());
        if restart.is_none() {
            tracing::error!(%why, "only a restart mends this replica: /health answers 503 from now on");
            *restart = Some(why);
        }
    }

    /// Why only a restart mends the replica, if it has come to that.
    pub fn restart_needed(&self) -> Option<String> {
        self.restart.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
