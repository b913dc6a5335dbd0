//! Admission of queries: a bounded number run at once, a bounded number wait for them, and
//! the rest are shed at once (503 with `Retry-After`) and counted.
//!
//! Without a bound every request took a blocking thread (tokio's default: up to 512), so an
//! offered load above what the store can answer queued without end: measured at 5,000 QPS
//! offered for top-10 lists that ran at about 600 QPS, answers came minutes late and the
//! process grew to 5 GiB. A bounded queue keeps the latency of the answers that are given
//! at about `queue / throughput`, and tells the others to come back, as a load balancer or
//! client retry expects.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus::{IntCounter, IntGauge};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::HttpConfig;
use crate::metrics::Metrics;

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("too many queries at once ({running} running, {waiting} waiting); try again shortly")]
pub struct Shed {
    /// The queries allowed to run at once.
    pub running: usize,
    /// The queries allowed to wait.
    pub waiting: usize,
}

/// One pool of query slots (see the module docs).
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    running: usize,
    waiting: AtomicUsize,
    max_waiting: usize,
    shed: IntCounter,
    busy: IntGauge,
}

/// A query's slot in its pool, given back when dropped.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    busy: IntGauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.busy.dec();
    }
}

/// Decrements the waiting count when a waiter stops waiting, admitted or gone (a client
/// that hangs up drops its request's future).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Admission {
    /// `running` queries at once (at least 1), `waiting` more queued; `shed` counts the rest,
    /// `busy` shows the slots taken.
    pub fn new(running: usize, waiting: usize, shed: IntCounter, busy: IntGauge) -> Admission {
        let running = running.max(1);
        Admission { slots: Arc::new(Semaphore::new(running)), running, waiting: AtomicUsize::new(0), max_waiting: waiting, shed, busy }
    }

    fn slot(&self, permit: OwnedSemaphorePermit) -> Slot {
        self.busy.inc();
        Slot { _permit: permit, busy: self.busy.clone() }
    }

    /// A slot: at once if one is free, after the queries ahead if the queue has room, else
    /// [`Shed`].
    pub fn admit(&self) -> impl Future<Output = Result<Slot, Shed>> + '_ {
        let now = Arc::clone(&self.slots).try_acquire_owned().ok();
        async move {
            if let Some(permit) = now {
                return Ok(self.slot(permit));
            }
            if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_waiting {
                self.waiting.fetch_sub(1, Ordering::Relaxed);
                self.shed.inc();
                return Err(Shed { running: self.running, waiting: self.max_waiting });
            }
            let _waiting = Waiting(&self.waiting);
            // The semaphore is never closed: acquiring only waits.
            let permit = Arc::clone(&self.slots).acquire_owned().await.map_err(|_| Shed { running: self.running, waiting: self.max_waiting })?;
            Ok(self.slot(permit))
        }
    }
}

/// The two pools: queries asked of this replica, and partials other replicas ask of it
/// while answering theirs. Apart, a query waiting for a peer's partials never holds a slot
/// the peer's own fan-out needs here.
#[derive(Debug)]
pub struct Admissions {
    /// `/api/v1/metrics/...` queries.
    pub queries: Admission,
    /// `/internal/v1/partials`.
    pub partials: Admission,
}

impl Admissions {
    /// Sized by [`HttpConfig::query_slots`] and [`HttpConfig::query_queue`], each pool.
    pub fn of(http: &HttpConfig, metrics: &Metrics) -> Admissions {
        let pool = |name: &str| {
            let shed = metrics.http_shed.with_label_values(&[name]);
            Admission::new(http.query_slots(), http.query_queue(), shed, metrics.http_busy.with_label_values(&[name]))
        };
        Admissions { queries: pool("queries"), partials: pool("partials") }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(running: usize, waiting: usize) -> Admission {
        Admission::new(running, waiting, IntCounter::new("shed", "shed").unwrap(), IntGauge::new("busy", "busy").unwrap())
    }

    #[tokio::test]
    async fn admits_the_slots_queues_the_room_and_sheds_the_rest() {
        let a = pool(2, 1);
        let p1 = a.admit().await.unwrap();
        let _p2 = a.admit().await.unwrap();
        assert_eq!(a.busy.get(), 2);
        let mut waiter = Box::pin(a.admit());
        assert!(futures::poll!(&mut waiter).is_pending(), "no slot free: the first over waits");
        assert_eq!(a.admit().await.unwrap_err(), Shed { running: 2, waiting: 1 }, "the queue is full: shed at once");
        assert_eq!(a.shed.get(), 1);
        drop(p1);
        let p3 = waiter.await.expect("a freed slot goes to the waiter");
        assert_eq!(a.busy.get(), 2);
        drop(p3);
        assert_eq!(a.busy.get(), 1);
        assert_eq!(a.waiting.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_leaves_the_queue() {
        let a = pool(1, 1);
        let _held = a.admit().await.unwrap();
        let mut gone = Box::pin(a.admit());
        assert!(futures::poll!(&mut gone).is_pending());
        drop(gone);
        let mut next = Box::pin(a.admit());
        assert!(futures::poll!(&mut next).is_pending(), "the room a departed waiter left is free again");
        assert_eq!(a.shed.get(), 0);
    }
}
