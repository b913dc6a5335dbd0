//! Fan-out: a [`Fetch`] over the whole cluster. This replica reads the partitions it owns
//! itself and asks the owners of the others, in parallel, for theirs; a partition whose
//! owner cannot answer (down, slow, restoring, moved) is tried at the next replica that
//! announces it, and otherwise reported missing — never silently left out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::client::PeerClient;
use super::members::{Candidate, Members};
use crate::query::fetch::{Answered, Fetch, FetchRequest, Fetched, LocalFetch, PartitionReply, Unavailable};
use crate::query::QueryError;

/// How many replicas are asked for one partition at most: its owner, another claiming it,
/// a standby copy.
const CANDIDATES: usize = 3;

/// Reads every partition of a source across the cluster.
pub struct ClusterFetch {
    local: LocalFetch,
    members: Arc<Members>,
    client: PeerClient,
    /// Partitions per source name, as the topics had them at start.
    partitions: BTreeMap<String, i32>,
    timeout: Duration,
    max_standby_lag: u64,
    runtime: tokio::runtime::Handle,
}

impl ClusterFetch {
    /// A fetch reading `local` for this replica's partitions and asking the `members` for
    /// the rest of the `partitions` of each source, each call within `timeout`; standby
    /// copies at most `max_standby_lag` behind answer for partitions whose owner cannot.
    /// Calls run on `runtime`; [`Fetch::fetch`] blocks, so call it off the runtime's threads.
    pub fn new(
        local: LocalFetch,
        members: Arc<Members>,
        partitions: BTreeMap<String, i32>,
        timeout: Duration,
        max_standby_lag: u64,
        runtime: tokio::runtime::Handle,
    ) -> ClusterFetch {
        ClusterFetch { local, members, client: PeerClient::default(), partitions, timeout, max_standby_lag, runtime }
    }

    /// The same, sending `token` to the other replicas (`http.token`).
    pub fn authenticated(self, token: Option<crate::secret::Secret>) -> ClusterFetch {
        ClusterFetch { client: self.client.authenticated(token), ..self }
    }

    /// Asks each candidate for its share of `wanted`, in parallel: owners for their
    /// partitions, standbys for their copies.
    async fn ask(&self, req: &FetchRequest, wanted: &BTreeMap<i32, Candidate>) -> Vec<(i32, Result<Answered, Unavailable>)> {
        let mut by_member: BTreeMap<(&str, bool), (&Candidate, Vec<i32>)> = BTreeMap::new();
        for (p, c) in wanted {
            by_member.entry((c.member.replica.as_str(), c.standby_lag.is_some())).or_insert((c, Vec::new())).1.push(*p);
        }
        // Waiting for a position takes up to the wait on the other side.
        let timeout = self.timeout + Duration::from_millis(req.wait_ms);
        let calls = by_member.into_values().map(|(c, parts)| async move {
            let max_standby_lag = c.standby_lag.map(|_| self.max_standby_lag);
            let sub = FetchRequest { partitions: Some(parts.clone()), max_standby_lag, ..req.clone() };
            let replies = self.client.partials(&c.member.url, &sub, timeout).await;
            (&c.member, parts, replies)
        });
        let mut out = Vec::new();
        for (m, parts, replies) in futures::future::join_all(calls).await {
            match replies {
                Err(e) => out.extend(parts.iter().map(|p| (*p, Err(Unavailable::Unreachable(format!("{} ({}): {e}", m.replica, m.url)))))),
                Ok(replies) => {
                    let mut replies: BTreeMap<i32, PartitionReply> = replies.into_iter().map(|r| (reply_partition(&r), r)).collect();
                    for p in parts {
                        out.push((
                            p,
                            match replies.remove(&p) {
                                Some(PartitionReply::Partials(partials)) => {
                                    self.local.check(req, &partials).map(|()| Answered { replica: m.replica.clone(), partials })
                                }
                                Some(PartitionReply::Unavailable { why, .. }) => Err(why),
                                None => Err(Unavailable::Unreachable(format!("{} sent no reply for it", m.replica))),
                            },
                        ));
                    }
                }
            }
        }
        out
    }
}

fn reply_partition(r: &PartitionReply) -> i32 {
    match r {
        PartitionReply::Partials(p) => p.partition,
        PartitionReply::Unavailable { partition, .. } => *partition,
    }
}

impl Fetch for ClusterFetch {
    fn fetch(&self, req: &FetchRequest) -> Result<Fetched, QueryError> {
        let count = self.partitions.get(&req.source).copied().unwrap_or(0);
        let all: Vec<i32> = match &req.partitions {
            Some(list) => list.clone(),
            None => (0..count).collect(),
        };
        // Ours first, read here; the others from whoever announces them.
        let mine = self.local.fetch(&FetchRequest { partitions: None, ..req.clone() })?;
        let mut done: BTreeMap<i32, Result<Answered, Unavailable>> = BTreeMap::new();
        for a in mine.parts {
            done.insert(a.partials.partition, Ok(a));
        }
        for (p, why) in mine.missing {
            done.insert(p, Err(why));
        }
        // Whom to ask for each partition not answered here, best first, from one look at
        // the map (a map changing between rounds must not skip or repeat a replica).
        let me = &self.local.replica;
        let mut candidates: BTreeMap<i32, std::vec::IntoIter<Candidate>> = BTreeMap::new();
        for &p in &all {
            if matches!(done.get(&p), Some(Ok(_))) {
                continue;
            }
            let list = self.members.candidates(&req.source, p, me, self.max_standby_lag);
            if list.is_empty() {
                done.entry(p).or_insert(Err(Unavailable::NoOwner));
            }
            candidates.insert(p, list.into_iter());
        }
        for _ in 0..CANDIDATES {
            let mut wanted = BTreeMap::new();
            for (p, list) in &mut candidates {
                if !matches!(done.get(p), Some(Ok(_))) {
                    if let Some(c) = list.next() {
                        wanted.insert(*p, c);
                    }
                }
            }
            if wanted.is_empty() {
                break;
            }
            for (p, r) in self.runtime.block_on(self.ask(req, &wanted)) {
                // A better reason (restoring, behind) is kept over a later "not owned".
                if r.is_ok() || !matches!(done.get(&p), Some(Err(w)) if !matches!(w, Unavailable::NotOwned | Unavailable::NoOwner)) {
                    done.insert(p, r);
                }
            }
        }
        // What no other replica could answer, from a standby copy kept here.
        let left: Vec<i32> = all.iter().copied().filter(|p| !matches!(done.get(p), Some(Ok(_)))).collect();
        if !left.is_empty() {
            let copies = self.local.fetch(&FetchRequest { partitions: Some(left), max_standby_lag: Some(self.max_standby_lag), ..req.clone() })?;
            for a in copies.parts {
                done.insert(a.partials.partition, Ok(a));
            }
        }
        let mut fetched = Fetched::default();
        for (p, r) in done {
            if !all.contains(&p) {
                continue;
            }
            match r {
                Ok(a) => fetched.parts.push(a),
                Err(why) => fetched.missing.push((p, why)),
            }
        }
        Ok(fetched)
    }
}
