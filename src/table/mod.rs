//! Global tables: compacted topics (key → JSON object) that every replica keeps whole in
//! its own sled trees, and that sources look their records up in.
//!
//! # Which value a record joins with
//!
//! Kafka Streams joins a record with whatever a GlobalKTable holds when the record is
//! processed, so a record processed again after a crash may find a newer value and count
//! under another group. Here every source partition joins *as of a position* of the tables
//! (its pin: per table partition, the next offset visible), and the pin is part of the
//! partition's stored position:
//!
//! * between two flushes a partition's records all join as of the same pin;
//! * a flush stores, with the partition's next offset, the pin the records after it will
//!   use — the tables' position at that flush — and the partition adopts it once the flush
//!   is durable;
//! * a replay from a stored position therefore joins as of the pin stored with it, as the
//!   first pass did; and after a torn flush (some aggregates in the changelog, no position)
//!   the pin stays put until the replay has passed every offset those aggregates hold
//!   (`replay_until`), so no replayed record can join differently from its first pass.
//!
//! A table keeps replaced values for its `history`, so lookups as of older pins stay exact
//! (see [`store`]).

pub mod store;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::event::{DecodeError, Record, Value};
use crate::store::{Store, StoreError};
use crate::topology::{Table, Topology};

use std::collections::HashMap;

use self::store::{value_at, TableChange, TableMeta, TableRecord, TableStore, Version};
use crate::hash::KeyHash;

/// Per table of the topology, per partition of its topic, the next offset visible.
pub type Positions = Vec<Vec<i64>>;

/// Why a table record was set aside.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum TableError {
    /// No Kafka key (or an empty one): a table is keyed by its records' keys.
    #[error("a table record needs a non-empty key")]
    NoKey,
    /// The key is not UTF-8 text.
    #[error("the record key is not UTF-8 text")]
    KeyNotText,
    /// The value does not decode.
    #[error(transparent)]
    Value(#[from] DecodeError),
}

impl TableError {
    /// A short label for metrics and dead-letter headers.
    pub fn reason(&self) -> &'static str {
        match self {
            TableError::NoKey => "table_no_key",
            TableError::KeyNotText => "table_key_not_text",
            TableError::Value(e) => e.reason(),
        }
    }
}

/// The canonical text of a table key: a key that is a JSON number or string is its value's
/// text (so `"101"`, `101` and a record field holding either meet), any other key its text.
pub fn key_text(key: &[u8]) -> Result<Vec<u8>, TableError> {
    let text = std::str::from_utf8(key).map_err(|_| TableError::KeyNotText)?.trim();
    let value = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::String(s)) => Value::Str(s.into()),
        Ok(serde_json::Value::Number(n)) => n.as_i64().map_or_else(|| Value::Float(n.as_f64().unwrap_or_default()), Value::Int),
        _ => Value::Str(text.into()),
    };
    let mut out = Vec::new();
    value.write_text(&mut out);
    Ok(out)
}

/// Decodes one record of `table`'s topic (`payload` `None`: a tombstone), reusing `scratch`.
pub fn decode_record(
    table: &Table,
    at: (i32, i64, i64),
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    scratch: &mut Record,
) -> Result<TableRecord, TableError> {
    let (partition, offset, timestamp) = at;
    let key = key_text(key.ok_or(TableError::NoKey)?)?;
    if key.is_empty() {
        return Err(TableError::NoKey);
    }
    let change = match payload {
        None => TableChange::Delete,
        Some(p) => {
            table.decoder.decode(p, None, scratch)?;
            TableChange::Put(std::mem::take(&mut scratch.values))
        }
    };
    Ok(TableRecord { partition, offset, timestamp, key, change })
}

struct Published {
    metas: Vec<TableMeta>,
    /// The metas' `next`, as one snapshot pins share (cheap to clone and compare).
    position: Arc<Positions>,
}

impl Published {
    fn new(metas: Vec<TableMeta>) -> Published {
        let position = Arc::new(metas.iter().map(|m| m.next.clone()).collect());
        Published { metas, position }
    }

    fn set(&mut self, table: usize, meta: TableMeta) {
        self.metas[table] = meta;
        self.position = Arc::new(self.metas.iter().map(|m| m.next.clone()).collect());
    }
}

/// The tables of one replica: their stores, where they stand, and whether the first load
/// is done. Shared by the table loader (which writes), the processing core (which looks
/// up) and the HTTP API (which reports).
pub struct Tables {
    stores: Vec<TableStore>,
    names: Vec<String>,
    published: RwLock<Published>,
    loaded: AtomicBool,
    /// Per table, decoded versions of keys looked up lately (sled and decoding are most of a
    /// lookup's cost).
    caches: Vec<RwLock<Cache>>,
}

/// Keys' versions as read from a table's store (`[]`: not in it). An entry is dropped when
/// its key is written; `generation` counts writes, so a read that raced one is not cached.
#[derive(Default)]
struct Cache {
    entries: HashMap<Vec<u8>, Arc<[Version]>, KeyHash>,
    generation: u64,
    /// Keys kept at most (the table's `cache_keys`).
    limit: usize,
}

impl Tables {
    /// Opens the tables of `topo` in `store`'s database.
    pub fn open(topo: &Topology, store: &Store) -> Result<Tables, StoreError> {
        let mut stores = Vec::new();
        let mut metas = Vec::new();
        for t in &topo.tables {
            let (s, m) = TableStore::open(store.open_tree(&format!("table/{}", t.name))?, &t.topic, t.history_ms)?;
            stores.push(s);
            metas.push(m);
        }
        Ok(Tables {
            caches: topo.tables.iter().map(|t| RwLock::new(Cache { limit: t.cache_keys, ..Cache::default() })).collect(),
            stores,
            names: topo.tables.iter().map(|t| t.name.clone()).collect(),
            published: RwLock::new(Published::new(metas)),
            loaded: AtomicBool::new(topo.tables.is_empty()),
        })
    }

    /// No tables (nothing to load or look up).
    pub fn none() -> Tables {
        Tables { stores: vec![], names: vec![], published: RwLock::new(Published::new(vec![])), loaded: AtomicBool::new(true), caches: vec![] }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Published> {
        self.published.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the tables stand now: the pin a partition adopts at a flush.
    pub fn position(&self) -> Arc<Positions> {
        Arc::clone(&self.read().position)
    }

    /// The tables' names, in topology order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Each table's meta (position, entries).
    pub fn metas(&self) -> Vec<TableMeta> {
        self.read().metas.clone()
    }

    /// Looks `key` up in table `table` as of `pin`: `found` gets its fields and the result is
    /// `true`, or it is not in the table then and the result is `false`.
    pub fn lookup(&self, table: usize, key: &[u8], pin: &[i64], found: impl FnOnce(&[Value])) -> Result<bool, StoreError> {
        let (Some(store), Some(cache)) = (self.stores.get(table), self.caches.get(table)) else { return Ok(false) };
        let (generation, full) = {
            let c = cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(versions) = c.entries.get(key) {
                return Ok(value_at(versions, pin).map(found).is_some());
            }
            (c.generation, c.entries.len() >= c.limit)
        };
        let versions = store.versions(key)?;
        let hit = value_at(&versions, pin).map(found).is_some();
        // A full cache keeps what it has (the keys looked up first, often the hot ones): a
        // table much larger than it would only be churned.
        if !full {
            let mut c = cache.write().unwrap_or_else(|e| e.into_inner());
            if c.generation == generation {
                c.entries.insert(key.to_vec(), versions.into());
            }
        }
        Ok(hit)
    }

    /// Whether every table has been read up to `pin` (lookups as of it see all they should).
    pub fn covers(&self, pin: &Positions) -> bool {
        let now = self.read();
        pin.iter().enumerate().all(|(t, p)| {
            let at = now.position.get(t).map_or(&[][..], Vec::as_slice);
            p.iter().enumerate().all(|(i, &o)| at.get(i).copied().unwrap_or(0) >= o)
        })
    }

    /// The tables' names whose kept history no longer reaches back to `pin`.
    pub fn inexact_at(&self, pin: &Positions) -> Vec<&str> {
        let now = self.read();
        let old = |t: usize| {
            let exact = now.metas.get(t).map_or(&[][..], |m| m.exact_from.as_slice());
            exact.iter().enumerate().any(|(i, &e)| pin.get(t).and_then(|p| p.get(i)).copied().unwrap_or(0) < e)
        };
        (0..self.names.len()).filter(|&t| old(t)).map(|t| self.names[t].as_str()).collect()
    }

    /// Applies `records` of table `table` and publishes its new position.
    pub fn apply(&self, table: usize, records: &[TableRecord], now_ms: i64) -> Result<(), StoreError> {
        let Some(store) = self.stores.get(table) else { return Ok(()) };
        let before = self.read().metas[table].clone();
        let meta = store.apply(&before, records, now_ms)?;
        {
            // Before the position is published: no lookup as of it may see a cached entry
            // that lacks its records.
            let mut c = self.caches[table].write().unwrap_or_else(|e| e.into_inner());
            for r in records {
                c.entries.remove(r.key.as_slice());
            }
            c.generation += 1;
        }
        self.published.write().unwrap_or_else(|e| e.into_inner()).set(table, meta);
        Ok(())
    }

    /// Records that table `table`'s topic has `partitions` partitions (so a partition that
    /// never had a record is part of every pin, at offset 0).
    pub fn set_partitions(&self, table: usize, partitions: usize) {
        let mut w = self.published.write().unwrap_or_else(|e| e.into_inner());
        let Some(mut meta) = w.metas.get(table).cloned() else { return };
        if meta.next.len() < partitions {
            meta.next.resize(partitions, 0);
            meta.exact_from.resize(partitions, 0);
        }
        w.set(table, meta);
    }

    /// Whether every table has been read to the end it had when the replica started.
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Marks the first load done.
    pub fn set_loaded(&self) {
        self.loaded.store(true, Ordering::Release);
    }
}
