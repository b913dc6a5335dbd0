//! One global table in sled: every key's versions, and where the table's topic has been
//! read to.
//!
//! ## Layout (one tree per table)
//!
//! | key         | value                                             |
//! |-------------|---------------------------------------------------|
//! | `K` · key   | the key's [`Version`]s, by (partition, offset)    |
//! | `M`         | [`TableMeta`]: topic, next offsets, exactness     |
//!
//! A key keeps the versions a lookup *as of an older position* may still need: a replaced
//! value is dropped only once it has been replaced for the table's `history`. The offsets
//! from which lookups are still exact are kept with the position (`exact_from`), so a
//! lookup as of a position older than the history is known to be inexact, never silently
//! wrong.

use serde::{Deserialize, Serialize};

use crate::event::Value;
use crate::store::StoreError;

/// Version of the encodings below.
pub const TABLE_FORMAT: u8 = 1;
const KEY_TAG: u8 = b'K';
const META_KEY: &[u8] = b"M";

/// One value a key had from one record of the table's topic on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    /// Topic partition of the record.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its Kafka timestamp (orders versions of a key written to several partitions).
    pub timestamp: i64,
    /// When (wall clock, ms) a later record of the same partition replaced it.
    pub replaced_at: Option<i64>,
    /// The table's fields; `None`: deleted (a tombstone).
    pub values: Option<Vec<Value>>,
}

/// Where a table stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMeta {
    /// The topic it was read from (another topic means another table: it is read afresh).
    pub topic: String,
    /// Per partition, the next offset to read: everything before it is applied.
    pub next: Vec<i64>,
    /// Per partition, the lowest position from which lookups are exact (versions replaced
    /// before it may have been dropped).
    pub exact_from: Vec<i64>,
    /// Keys that have a value now.
    pub entries: u64,
}

/// One record of a table's topic, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct TableRecord {
    /// Topic partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Kafka timestamp, ms.
    pub timestamp: i64,
    /// The table key (canonical text of the record key).
    pub key: Vec<u8>,
    /// What it does to the key.
    pub change: TableChange,
}

/// What a table record does.
#[derive(Debug, Clone, PartialEq)]
pub enum TableChange {
    /// Sets the key's fields.
    Put(Vec<Value>),
    /// Deletes the key (a tombstone).
    Delete,
    /// Nothing (a record that was set aside): only the position moves past it.
    Nothing,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![TABLE_FORMAT];
    bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard()).expect("writing to a Vec cannot fail");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), why };
    if bytes.first() != Some(&TABLE_FORMAT) {
        return Err(corrupt(format!("table format {:?}, expected {TABLE_FORMAT}", bytes.first())));
    }
    crate::store::decode_body(&bytes[1..]).map_err(corrupt)
}

/// The value of `versions` as of `pin` (per partition, the next offset visible): per
/// partition the last visible version, and of those the one with the latest timestamp
/// (then the higher partition). `None`: no value (never written, or deleted).
pub fn value_at<'a>(versions: &'a [Version], pin: &[i64]) -> Option<&'a [Value]> {
    pick(versions, |p| pin.get(usize::try_from(p).unwrap_or(usize::MAX)).copied().unwrap_or(0))
}

/// The value with every version visible.
fn latest(versions: &[Version]) -> Option<&[Value]> {
    pick(versions, |_| i64::MAX)
}

fn pick(versions: &[Version], visible: impl Fn(i32) -> i64) -> Option<&[Value]> {
    let mut best: Option<&Version> = None;
    for (i, v) in versions.iter().enumerate() {
        // The last visible version of its partition (versions are by partition, offset).
        let last_of_partition = versions.get(i + 1).is_none_or(|n| n.partition != v.partition || n.offset >= visible(v.partition));
        if v.offset < visible(v.partition) && last_of_partition && best.is_none_or(|b| (v.timestamp, v.partition) > (b.timestamp, b.partition)) {
            best = Some(v);
        }
    }
    best.and_then(|v| v.values.as_deref())
}

/// A table's tree.
#[derive(Clone)]
pub struct TableStore {
    tree: sled::Tree,
    history_ms: i64,
}

impl TableStore {
    /// Opens the table's `tree`, read from `topic`; a tree holding another topic's table is
    /// emptied. Returns the store and where it stands.
    pub fn open(tree: sled::Tree, topic: &str, history_ms: i64) -> Result<(TableStore, TableMeta), StoreError> {
        let store = TableStore { tree, history_ms };
        let meta = match store.tree.get(META_KEY)? {
            Some(b) => decode::<TableMeta>(META_KEY, &b)?,
            None => TableMeta { topic: topic.to_string(), next: vec![], exact_from: vec![], entries: 0 },
        };
        if meta.topic != topic {
            tracing::warn!(old = %meta.topic, new = %topic, "a table's topic changed: reading it afresh");
            store.tree.clear()?;
            return Ok((store, TableMeta { topic: topic.to_string(), next: vec![], exact_from: vec![], entries: 0 }));
        }
        Ok((store, meta))
    }

    /// Every version of `key` kept, by (partition, offset).
    pub fn versions(&self, key: &[u8]) -> Result<Vec<Version>, StoreError> {
        let k = entry_key(key);
        match self.tree.get(&k)? {
            Some(b) => decode(&k, &b),
            None => Ok(vec![]),
        }
    }

    /// Applies `records` (in offset order per partition) on top of `meta`, `now_ms` being the
    /// wall clock, and writes the new meta last; returns it. Records below a partition's
    /// applied offset are skipped (a re-read after a crash).
    pub fn apply(&self, meta: &TableMeta, records: &[TableRecord], now_ms: i64) -> Result<TableMeta, StoreError> {
        let mut meta = meta.clone();
        let mut touched: std::collections::HashMap<&[u8], Vec<Version>, crate::hash::KeyHash> = Default::default();
        for r in records {
            let p = usize::try_from(r.partition).unwrap_or(0);
            if meta.next.len() <= p {
                meta.next.resize(p + 1, 0);
                meta.exact_from.resize(p + 1, 0);
            }
            if r.offset < meta.next[p] {
                continue;
            }
            meta.next[p] = r.offset + 1;
            let values = match &r.change {
                TableChange::Put(v) => Some(v.clone()),
                TableChange::Delete => None,
                TableChange::Nothing => continue,
            };
            let versions = match touched.get_mut(r.key.as_slice()) {
                Some(v) => v,
                None => {
                    let loaded = self.versions(&r.key)?;
                    touched.entry(r.key.as_slice()).or_insert(loaded)
                }
            };
            let live_before = latest(versions).is_some();
            self.push(versions, r, values, now_ms, &mut meta.exact_from);
            let live_after = latest(versions).is_some();
            meta.entries = (meta.entries + u64::from(live_after)).saturating_sub(u64::from(live_before));
        }
        // Written key by key, in key order, and the position last (sled batches of many keys
        // are several times slower): a crash in between leaves keys ahead of the stored
        // position, and re-reading their records changes nothing (see `push`).
        let mut writes: Vec<(&[u8], Vec<Version>)> = touched.into_iter().collect();
        writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (key, versions) in writes {
            if versions.iter().all(|v| v.values.is_none()) {
                // Only deletions left: the same as no entry, whatever the position.
                self.tree.remove(entry_key(key))?;
            } else {
                self.tree.insert(entry_key(key), encode(&versions))?;
            }
        }
        self.tree.insert(META_KEY, encode(&meta))?;
        Ok(meta)
    }

    /// Adds `r` to a key's versions, marks the one it replaces, and drops versions replaced
    /// longer than the history ago (raising `exact_from` past the record that replaced them).
    /// A record the versions hold already (written before a crash took the position) is
    /// left out.
    fn push(&self, versions: &mut Vec<Version>, r: &TableRecord, values: Option<Vec<Value>>, now_ms: i64, exact_from: &mut [i64]) {
        if versions.iter().any(|v| v.partition == r.partition && v.offset >= r.offset) {
            return;
        }
        let at = versions.iter().position(|v| v.partition > r.partition).unwrap_or(versions.len());
        if let Some(prev) = at.checked_sub(1).map(|i| &mut versions[i]).filter(|v| v.partition == r.partition) {
            prev.replaced_at = Some(now_ms);
        }
        versions.insert(at, Version { partition: r.partition, offset: r.offset, timestamp: r.timestamp, replaced_at: None, values });
        let mut i = 0;
        while i + 1 < versions.len() {
            let expired = versions[i].replaced_at.is_some_and(|t| now_ms.saturating_sub(t) > self.history_ms);
            if expired && versions[i + 1].partition == versions[i].partition {
                let p = usize::try_from(versions[i].partition).unwrap_or(0);
                if let Some(e) = exact_from.get_mut(p) {
                    *e = (*e).max(versions[i + 1].offset + 1);
                }
                versions.remove(i);
            } else {
                i += 1;
            }
        }
    }
}

fn entry_key(key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(KEY_TAG);
    k.extend_from_slice(key);
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(partition: i32, offset: i64, timestamp: i64, key: &str, module: Option<i64>) -> TableRecord {
        let change = module.map_or(TableChange::Delete, |m| TableChange::Put(vec![Value::Int(m)]));
        TableRecord { partition, offset, timestamp, key: key.as_bytes().to_vec(), change }
    }

    fn open(history_ms: i64) -> (tempfile::TempDir, TableStore, TableMeta) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (s, m) = TableStore::open(db.open_tree("t").unwrap(), "rooms", history_ms).unwrap();
        (dir, s, m)
    }

    #[test]
    fn lookups_see_the_table_as_of_a_position() {
        let (_d, store, meta) = open(60_000);
        let meta = store.apply(&meta, &[rec(0, 0, 10, "r1", Some(1)), rec(0, 1, 11, "r2", Some(2)), rec(0, 2, 12, "r1", Some(3))], 0).unwrap();
        assert_eq!((meta.next.clone(), meta.entries), (vec![3], 2));
        let meta = store.apply(&meta, &[rec(0, 3, 13, "r2", None), rec(0, 1, 11, "r2", Some(9))], 0).unwrap();
        assert_eq!((meta.next.clone(), meta.entries), (vec![4], 1), "a re-read record is skipped; a tombstone deletes");
        let at = |key: &str, pin: i64| value_at(&store.versions(key.as_bytes()).unwrap(), &[pin]).map(|v| v[0].clone());
        assert_eq!(at("r1", 0), None);
        assert_eq!(at("r1", 1), Some(Value::Int(1)));
        assert_eq!(at("r1", 3), Some(Value::Int(3)));
        assert_eq!(at("r2", 3), Some(Value::Int(2)));
        assert_eq!(at("r2", 4), None);
        assert_eq!(at("r3", 4), None);
    }

    #[test]
    fn replaced_values_are_kept_for_the_history_then_dropped_and_marked() {
        let (_d, store, meta) = open(1_000);
        let meta = store.apply(&meta, &[rec(0, 0, 0, "r", Some(1)), rec(0, 5, 0, "r", Some(2))], 10_000).unwrap();
        let lookup = |pin: &[i64]| value_at(&store.versions(b"r").unwrap(), pin).map(<[Value]>::to_vec);
        assert_eq!(lookup(&[1]), Some(vec![Value::Int(1)]));
        // Two seconds later another update: the first value was replaced longer ago than the
        // history, so it goes, and positions up to the record that replaced it are inexact.
        let meta = store.apply(&meta, &[rec(0, 9, 0, "r", Some(3))], 12_000).unwrap();
        assert_eq!(meta.exact_from, vec![6]);
        assert_eq!(lookup(&[6]), Some(vec![Value::Int(2)]));
        assert_eq!(store.versions(b"r").unwrap().len(), 2);
    }

    #[test]
    fn a_key_in_two_partitions_takes_the_later_timestamp() {
        let (_d, store, meta) = open(60_000);
        store.apply(&meta, &[rec(0, 0, 50, "r", Some(1)), rec(1, 0, 40, "r", Some(2))], 0).unwrap();
        let versions = store.versions(b"r").unwrap();
        assert_eq!(value_at(&versions, &[1, 1]), Some(&[Value::Int(1)][..]));
        assert_eq!(value_at(&versions, &[0, 1]), Some(&[Value::Int(2)][..]));
    }

    #[test]
    fn another_topic_is_another_table() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let (s, m) = TableStore::open(db.open_tree("t").unwrap(), "a", 1).unwrap();
        s.apply(&m, &[rec(0, 0, 0, "r", Some(1))], 0).unwrap();
        let (s, m) = TableStore::open(db.open_tree("t").unwrap(), "b", 1).unwrap();
        assert_eq!((m.entries, s.versions(b"r").unwrap()), (0, vec![]));
    }
}
