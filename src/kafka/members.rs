//! Membership on Kafka: each replica announces itself — name, advertised URL, the partitions
//! it owns — on the compacted `<app>-members` topic every second and whenever what it owns
//! changes, and reads everyone's announcements into [`Members`]. No coordinator service:
//! the topic is the directory. A replica that stops writes a tombstone; a killed one's
//! record stops being refreshed and ages out of the map.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use std::collections::BTreeSet;
use std::sync::mpsc::Sender;

use super::state_updater::Command;
use crate::cluster::members::{Copy, Member, Members, Owned};
use crate::config::KafkaConfig;
use crate::ownership::{Ownership, PartitionState};
use crate::topology::Topology;

/// How often a replica refreshes its record when nothing changed.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// How long a record counts as live: a few missed refreshes.
pub const MEMBER_TTL: Duration = Duration::from_secs(5);

/// Who this replica is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Its name (the record key).
    pub replica: String,
    /// Its advertised URL.
    pub url: String,
}

/// Standby placement: how many copies per partition, of which partitions, and where to ask
/// for them to be kept.
pub struct Standbys {
    /// Copies per partition.
    pub copies: usize,
    /// Partitions per source name.
    pub partitions: BTreeMap<String, i32>,
    /// The state updater's commands.
    pub updater: Sender<Command>,
}

/// The announcing and reading thread.
pub struct Announcer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Announcer {
    /// Starts announcing `me` with what `owned` holds, reading the topic into `members`, and
    /// (with `standbys`) keeping the standby copies the map assigns this replica.
    pub fn start(
        kafka: &KafkaConfig,
        topo: &Topology,
        me: Identity,
        owned: Arc<Ownership>,
        members: Arc<Members>,
        standbys: Option<Standbys>,
    ) -> anyhow::Result<Announcer> {
        let topic = topo.members_topic();
        let producer: ThreadedProducer<DefaultProducerContext> = super::client_config(kafka, &[("linger.ms", "0"), ("acks", "1")])
            .create()
            .map_err(|e| anyhow::anyhow!("creating the membership producer: {e}"))?;
        let consumer: BaseConsumer = super::client_config(
            kafka,
            // Never joins the group nor commits: it reads the whole (compacted) topic.
            &[("group.id", &format!("{}-members", topo.application_id)), ("enable.auto.commit", "false"), ("fetch.wait.max.ms", "100")],
        )
        .create()
        .map_err(|e| anyhow::anyhow!("creating the membership reader: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl).map_err(|e| anyhow::anyhow!("reading {topic}: {e}"))?;
        let sources: Vec<String> = topo.sources.iter().map(|s| s.name.clone()).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Loop { topic, me, owned, members, sources, producer, consumer, standbys, following: BTreeSet::new(), stop: Arc::clone(&stop) };
        let thread = std::thread::Builder::new().name("tally-members".into()).spawn(move || state.run())?;
        Ok(Announcer { stop, thread: Some(thread) })
    }

    /// Leaves: writes the tombstone and stops.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Loop {
    topic: String,
    me: Identity,
    owned: Arc<Ownership>,
    members: Arc<Members>,
    sources: Vec<String>,
    producer: ThreadedProducer<DefaultProducerContext>,
    consumer: BaseConsumer,
    standbys: Option<Standbys>,
    /// The copies asked of the state updater.
    following: BTreeSet<(String, i32)>,
    stop: Arc<AtomicBool>,
}

impl Loop {
    fn run(mut self) {
        let incarnation = self.members.now_ms();
        let mut epoch = 0u64;
        let mut since: BTreeMap<(usize, i32), i64> = BTreeMap::new();
        let mut announced: Option<Vec<Owned>> = None;
        let mut last = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            let now = self.members.now_ms();
            let current = self.owned.snapshot();
            since.retain(|k, _| current.iter().any(|(c, _)| c == k));
            let owned: Vec<Owned> = current
                .iter()
                .map(|&((s, p), state)| Owned {
                    source: self.sources.get(s).cloned().unwrap_or_default(),
                    partition: p,
                    since_ms: *since.entry((s, p)).or_insert(now),
                    restoring: matches!(state, PartitionState::Restoring { .. }),
                })
                .collect();
            if announced.as_ref() != Some(&owned) || last.elapsed() >= ANNOUNCE_EVERY {
                if announced.as_ref() != Some(&owned) {
                    epoch += 1;
                }
                let standby = self.copies();
                let m = Member {
                    replica: self.me.replica.clone(),
                    url: self.me.url.clone(),
                    incarnation,
                    epoch,
                    at_ms: now,
                    owned: owned.clone(),
                    standby,
                };
                self.announce(Some(&m));
                announced = Some(owned);
                last = Instant::now();
            }
            self.read(Duration::from_millis(100));
            self.place_standbys();
        }
        self.announce(None);
        let _ = self.producer.flush(Duration::from_secs(2));
    }

    /// The standby copies this replica keeps, as announced.
    fn copies(&self) -> Vec<Copy> {
        self.owned
            .standbys()
            .into_iter()
            .map(|((s, p), st)| Copy { source: self.sources.get(s).cloned().unwrap_or_default(), partition: p, lag: st.lag, queryable: st.queryable })
            .collect()
    }

    /// Asks the state updater to follow the partitions the map now assigns this replica as
    /// standbys, and to stop following the others.
    fn place_standbys(&mut self) {
        let Some(st) = &self.standbys else { return };
        let mine: Vec<(String, i32)> =
            self.owned.snapshot().into_iter().map(|((s, p), _)| (self.sources.get(s).cloned().unwrap_or_default(), p)).collect();
        let duties = self.members.standby_duties(&self.me.replica, &mine, &self.following, &st.partitions, st.copies);
        let index = |name: &str| self.sources.iter().position(|s| s == name);
        for (source, p) in duties.difference(&self.following) {
            if let Some(s) = index(source) {
                let _ = st.updater.send(Command::Follow(s, *p));
            }
        }
        for (source, p) in self.following.difference(&duties) {
            if let Some(s) = index(source) {
                let _ = st.updater.send(Command::Unfollow(s, *p));
            }
        }
        self.following = duties;
    }

    fn announce(&self, m: Option<&Member>) {
        let body = m.map(|m| serde_json::to_vec(m).unwrap_or_default());
        let mut rec = BaseRecord::<str, [u8]>::to(&self.topic).key(self.me.replica.as_str());
        if let Some(b) = &body {
            rec = rec.payload(b);
        }
        if let Err((e, _)) = self.producer.send(rec) {
            tracing::warn!(error = %e, "could not announce membership; other replicas may not ask this one until the next try");
        }
    }

    /// Reads what arrived within `wait` into the map. Records that do not decode are
    /// skipped: the topic is shared by every replica, maybe of other versions.
    fn read(&self, wait: Duration) {
        let mut wait = wait;
        while let Some(r) = self.consumer.poll(wait) {
            wait = Duration::ZERO;
            let Ok(msg) = r else { continue };
            let Some(key) = msg.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
            match msg.payload() {
                None => self.members.apply(key, None),
                Some(bytes) => {
                    if let Ok(m) = serde_json::from_slice::<Member>(bytes) {
                        self.members.apply(key, Some(m));
                    }
                }
            }
        }
    }
}
