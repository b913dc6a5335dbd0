//! Who is in the cluster: every live replica's advertised URL and the partitions it owns,
//! as the replicas announce them on the compacted `<app>-members` topic
//! ([`crate::kafka::members`]).
//!
//! The map is advisory: a query asks the replica the map names, and that replica answers
//! only for partitions its own consumer owns right now (anything else it refuses), so a
//! stale map costs a retry or a 503, never a wrong or doubled number. Staleness is still
//! recognisable: the topic has one partition, so a replica's latest record is the one read
//! last (each also carries the replica's incarnation and an epoch bumped on every change,
//! for people reading the topic), and a replica whose record has not been refreshed within
//! the time to live by this replica's own clock (a killed or paused one) is left out. No
//! replica's clock is compared with another's.
//!
//! ```
//! use tally::cluster::members::{Member, Members, Owned};
//! let members = Members::new(std::time::Duration::from_secs(5));
//! let m = Member {
//!     replica: "r1".into(), url: "http://127.0.0.1:8081".into(), incarnation: 1, epoch: 3, at_ms: members.now_ms(),
//!     owned: vec![Owned { source: "clicks".into(), partition: 0, since_ms: 0, restoring: false }], standby: vec![],
//! };
//! members.apply("r1", Some(m.clone()));
//! assert_eq!(members.owners("clicks", 0, "me"), vec![m.clone()]);
//! // The latest record in topic order wins.
//! members.apply("r1", Some(Member { epoch: 4, owned: vec![], ..m.clone() }));
//! assert!(members.owners("clicks", 0, "me").is_empty());
//! // A URL other than http://host:port is not called.
//! members.apply("r1", Some(Member { url: "http://evil/steal?x".into(), ..m.clone() }));
//! assert!(members.live("me").is_empty());
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One source partition a replica owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owned {
    /// Source name.
    pub source: String,
    /// Partition.
    pub partition: i32,
    /// Since when (the replica's clock, ms): of two replicas claiming a partition (one has
    /// not noticed it lost it yet), the later claim is asked first.
    pub since_ms: i64,
    /// Still being restored: it would answer 503.
    pub restoring: bool,
}

/// A standby copy a replica keeps of a partition another owns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Copy {
    /// Source name.
    pub source: String,
    /// Partition.
    pub partition: i32,
    /// Changelog records it is behind.
    pub lag: u64,
    /// Whether it may be read (it holds a whole flush).
    pub queryable: bool,
}

/// Whom to ask for a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The replica.
    pub member: Member,
    /// `Some(lag)`: it keeps a standby copy, this far behind.
    pub standby_lag: Option<u64>,
}

/// One replica's announcement (the value of its record on the members topic, JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Its name (the record key).
    pub replica: String,
    /// Where other replicas reach its HTTP API.
    pub url: String,
    /// When the process started, ms: a restarted replica's records supersede the old ones.
    pub incarnation: i64,
    /// Bumped whenever what it owns changes.
    pub epoch: u64,
    /// When the record was written (its clock), ms.
    pub at_ms: i64,
    /// The partitions it owns.
    pub owned: Vec<Owned>,
    /// The standby copies it keeps.
    #[serde(default)]
    pub standby: Vec<Copy>,
}

impl Member {
    /// Whether its URL is one this replica will call: `http://host:port`, nothing else.
    fn url_ok(&self) -> bool {
        let Some(rest) = self.url.strip_prefix("http://") else { return false };
        match rest.rsplit_once(':') {
            Some((host, port)) => !host.is_empty() && port.parse::<u16>().is_ok() && !host.contains(['/', '@', '?', '#', ' ']),
            None => false,
        }
    }
}

/// The live members, as read from the members topic, each with when its record arrived.
#[derive(Debug)]
pub struct Members {
    map: RwLock<BTreeMap<String, (Member, Instant)>>,
    ttl: Duration,
}

impl Members {
    /// An empty map whose records count as live for `ttl` after they were written.
    pub fn new(ttl: Duration) -> Members {
        Members { map: RwLock::new(BTreeMap::new()), ttl }
    }

    /// The wall clock, ms (records are dated by it).
    pub fn now_ms(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
    }

    /// Takes in one record of the members topic, in topic order (`None`: a tombstone, the
    /// replica left). A record whose key and body disagree, or whose URL is not a plain
    /// `http://host:port`, is not trusted.
    pub fn apply(&self, key: &str, member: Option<Member>) {
        let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
        match member {
            Some(m) if m.replica == key && m.url_ok() => {
                map.insert(key.to_string(), (m, Instant::now()));
            }
            _ => {
                map.remove(key);
            }
        }
    }

    /// The live members other than `me`, by name.
    pub fn live(&self, me: &str) -> Vec<Member> {
        let map = self.map.read().unwrap_or_else(|p| p.into_inner());
        map.values().filter(|(m, seen)| m.replica != me && seen.elapsed() <= self.ttl).map(|(m, _)| m.clone()).collect()
    }

    /// The live members other than `me` announcing `source`'s `partition`, the best to ask
    /// first: restored before restoring, then the latest claim.
    pub fn owners(&self, source: &str, partition: i32, me: &str) -> Vec<Member> {
        let mut found: Vec<(bool, i64, Member)> = self
            .live(me)
            .into_iter()
            .filter_map(|m| {
                let o = m.owned.iter().find(|o| o.source == source && o.partition == partition)?;
                Some((o.restoring, -o.since_ms, m.clone()))
            })
            .collect();
        found.sort_by_key(|f| (f.0, f.1));
        found.into_iter().map(|(_, _, m)| m).collect()
    }

    /// Whom to ask for `source`'s `partition`, best first: its owners (see
    /// [`Members::owners`]), then the replicas keeping a queryable standby copy at most
    /// `max_lag` behind, least lag first.
    pub fn candidates(&self, source: &str, partition: i32, me: &str, max_lag: u64) -> Vec<Candidate> {
        let mut out: Vec<Candidate> = self.owners(source, partition, me).into_iter().map(|member| Candidate { member, standby_lag: None }).collect();
        let mut copies: Vec<Candidate> = self
            .live(me)
            .into_iter()
            .filter_map(|m| {
                let c = m.standby.iter().find(|c| c.source == source && c.partition == partition && c.queryable && c.lag <= max_lag)?;
                Some(Candidate { standby_lag: Some(c.lag), member: m.clone() })
            })
            .collect();
        copies.sort_by_key(|c| c.standby_lag);
        out.extend(copies);
        out
    }

    /// The standby copies `me` is to keep, `n` per partition: of each partition with a known
    /// owner (`mine` are this replica's, the others' as announced), the copies go to the
    /// `n` live replicas after the owner in name order. Every replica computes the same
    /// placement from the same map, so no one needs to hand it out. A partition without a
    /// live owner (its owner died, the group has not moved it yet) keeps the copies it has
    /// (`kept`): that is when they are needed.
    pub fn standby_duties(
        &self,
        me: &str,
        mine: &[(String, i32)],
        kept: &BTreeSet<(String, i32)>,
        partitions: &BTreeMap<String, i32>,
        n: usize,
    ) -> BTreeSet<(String, i32)> {
        let live = self.live(me);
        let mut ring: Vec<&str> = live.iter().map(|m| m.replica.as_str()).chain([me]).collect();
        ring.sort_unstable();
        let mut duties = BTreeSet::new();
        for (source, &count) in partitions {
            for p in 0..count {
                if mine.iter().any(|(s, q)| s == source && *q == p) {
                    continue;
                }
                let Some(owner) = self.owners(source, p, me).into_iter().next() else {
                    if kept.contains(&(source.clone(), p)) {
                        duties.insert((source.clone(), p));
                    }
                    continue;
                };
                let Some(at) = ring.iter().position(|r| *r == owner.replica) else { continue };
                let after = (1..ring.len()).map(|i| ring[(at + i) % ring.len()]).take(n);
                if after.into_iter().any(|r| r == me) {
                    duties.insert((source.clone(), p));
                }
            }
        }
        duties
    }
}
