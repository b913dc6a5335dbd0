//! A copy of the state the changelogs hold, read into a scratch store: what `tally check
//! --against cluster` plans against when no state directory is at hand.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::changelog::Restoration;
use crate::config::KafkaConfig;
use crate::layout::Manifest;
use crate::store::Store;
use crate::topology::Topology;

/// Reading a changelog that gives nothing for this long fails instead of hanging.
const STALL: Duration = Duration::from_secs(30);

/// Reads every changelog of `topo` into `store` (empty), as a restore from scratch would, and
/// records each metric the positions' marks name with its layout and rebuild token (the
/// changelog does not carry grace or retention). Returns the records read.
pub fn copy_changelogs(kafka: &KafkaConfig, topo: &Topology, store: &Store) -> anyhow::Result<u64> {
    let consumer: BaseConsumer = super::client_config(kafka, &[("group.id", "tally-check"), ("enable.auto.commit", "false")]).create()?;
    let mut tpl = TopicPartitionList::new();
    let mut open: HashMap<(String, i32), (usize, Restoration, i64, i64)> = HashMap::new();
    for s in 0..topo.sources.len() {
        let topic = topo.changelog_topic(s);
        let meta = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
        for p in meta.topics().iter().flat_map(|t| t.partitions()).map(|p| p.id()) {
            let (low, high) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(10))?;
            if high > low {
                tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
                open.insert((topic.clone(), p), (s, Restoration::begin(store, topo, s, p, true)?, high, -1));
            }
        }
    }
    consumer.assign(&tpl)?;
    let mut records = 0;
    let mut done = Vec::new();
    let mut last_read = Instant::now();
    while !open.is_empty() {
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            anyhow::ensure!(last_read.elapsed() < STALL, "the changelogs gave nothing for {} s", STALL.as_secs());
            continue;
        };
        let msg = msg?;
        last_read = Instant::now();
        let key = (msg.topic().to_string(), msg.partition());
        let Some((_, r, high, last)) = open.get_mut(&key) else { continue };
        r.apply(msg.key().unwrap_or_default(), msg.payload())?;
        *last = msg.offset();
        records += 1;
        if msg.offset() + 1 >= *high {
            done.push(open.remove(&key).map(|(s, r, _, last)| (s, r, last)));
        }
    }
    for (_, r, last) in done.into_iter().flatten() {
        r.finish(last)?;
    }
    for m in &topo.metrics {
        let marks = store.partitions(&topo.sources[m.source].name)?;
        if let Some(mark) = marks.iter().find_map(|(_, meta)| meta.mark(&m.name)) {
            store.put_manifest_of(&m.name, &Manifest { layout: mark.layout.clone(), rebuild: mark.rebuild.clone(), ..Manifest::default() })?;
        }
    }
    Ok(records)
}
