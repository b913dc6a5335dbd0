//! The state store: partial aggregates and partition positions in one sled tree.
//!
//! ## Layout
//!
//! | key                                                     | value                       |
//! |---------------------------------------------------------|-----------------------------|
//! | `S` · len · metric · partition u32 · slice i64 · from_end i64 · group | [`StoredAggregate`] |
//! | `P` · len · source · partition u32                      | [`PartitionMeta`]           |
//! Integers are big-endian (signed ones with the sign bit flipped) so sled's byte order is
//! numeric order: one metric-partition's slices are contiguous and sorted, so a window is a
//! range scan, expiry is a range delete, and a partition can be handed over or dropped on
//! its own.
//!
//! `from_end` says which windows holding the slice an aggregate belongs to: those ending at
//! or after it. Records that count for every window of their slice go to
//! [`EVERY_WINDOW`]; a record late for the slice's first windows but not for the later ones
//! goes to an aggregate of its own, tagged with the end of the first window it counts for,
//! so windows that have closed never change (see [`crate::window::WindowSpec::place`]).
//!
//! | `L` · len · metric                                      | its [`crate::layout::Manifest`] |
//!
//! Every value starts with a format version byte, and a state value then with its layout's
//! fingerprint: bincode decodes a mismatched layout into garbage without complaint, so every
//! state read back passes [`crate::layout::Layout::open`], and every value of an older
//! format is brought to the current one by [`crate::migrations`].
//!
//! Aggregates and the partition positions they correspond to are written in one atomic
//! batch: after a crash the store holds a consistent cut — the state of exactly the records
//! before the stored next offset.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::layout::{Manifest, MetricMark};
use crate::topology::Metric;

/// Version of the state key layout above; part of every metric's recorded layout, so a
/// store written with another layout is refused, not misread.
pub const KEY_FORMAT: u8 = 2;
/// Bytes of a state key after its metric-partition prefix and before its group key: the
/// slice start and the first window end.
pub const SLICE_KEY_BYTES: usize = 16;
/// `from_end` of an aggregate that every window holding its slice takes.
pub const EVERY_WINDOW: i64 = i64::MIN;
/// Version of a state value's encoding ([`crate::layout::Layout::seal`]): 3 carries the
/// layout's fingerprint; 2 (without) is still read. Format 1 (key format 1) is not: its
/// records are rejected and counted, never read under the new keys.
pub const STATE_FORMAT: u8 = 3;
/// Version of [`PartitionMeta`]'s encoding: 4 adds the metrics' marks; 3 (the tables' pin)
/// and 2 are still read ([`crate::migrations::upcast_meta`]).
pub const META_FORMAT: u8 = 4;

const STATE_TAG: u8 = b'S';
const META_TAG: u8 = b'P';
const LAYOUT_TAG: u8 = b'L';
/// Separates the values of a multi-field group key (ASCII unit separator).
pub const GROUP_SEPARATOR: u8 = 0x1f;
/// Escapes a separator or escape byte inside a value, so no value can forge a split.
const GROUP_ESCAPE: u8 = 0x1e;

/// Whether a group-key part needs escaping.
pub fn needs_escape(part: &[u8]) -> bool {
    part.iter().any(|b| *b == GROUP_SEPARATOR || *b == GROUP_ESCAPE)
}

/// Appends one group-key part, escaped.
pub fn push_group_part(out: &mut Vec<u8>, part: &[u8]) {
    for &b in part {
        if b == GROUP_SEPARATOR || b == GROUP_ESCAPE {
            out.push(GROUP_ESCAPE);
        }
        out.push(b);
    }
}

/// A group key from its parts.
pub fn encode_group<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in parts.into_iter().enumerate() {
        if i > 0 {
            out.push(GROUP_SEPARATOR);
        }
        push_group_part(&mut out, p);
    }
    out
}

/// The parts of a group key, unescaped.
pub fn split_group(group: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new()];
    let mut escaped = false;
    for &b in group {
        match b {
            _ if escaped => {
                parts.last_mut().expect("never empty").push(b);
                escaped = false;
            }
            GROUP_ESCAPE => escaped = true,
            GROUP_SEPARATOR => parts.push(Vec::new()),
            _ => parts.last_mut().expect("never empty").push(b),
        }
    }
    parts
}

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption).
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// A value with an unknown version or undecodable bytes.
    #[error("state store value under key {key:?} is unreadable: {why}")]
    Corrupt {
        /// Printable key.
        key: String,
        /// What failed.
        why: String,
    },
    /// A value written by a newer tally: never read, never overwritten.
    #[error("a stored {what} is of format {found}, written by a newer tally (this one reads up to {supported}): run that version or a newer one")]
    Newer {
        /// What kind of value.
        what: &'static str,
        /// Its format.
        found: u8,
        /// The newest format this tally reads.
        supported: u8,
    },
    /// States of another layout of a metric: never folded into, never answered from.
    #[error("metric `{metric}`: the state holds {stored}, but the metric is configured as `{configured}`; give the changed metric a new name (the old state stays readable under the old one), or rebuild it from the source with `rebuild = \"1\"` on the metric; see the README's \"Changing a running config\"")]
    Layout {
        /// The metric.
        metric: String,
        /// What the state is.
        stored: String,
        /// The configured layout.
        configured: String,
    },
    /// The store's version cannot be run as it is.
    #[error(transparent)]
    Version(#[from] crate::migrations::MigrationError),
    /// The filesystem is (nearly) full: nothing was written.
    #[error("the state directory's filesystem has {free} bytes free, less than state.min_free_bytes ({reserve}): flushes wait for room")]
    NoRoom {
        /// Bytes free for this process.
        free: u64,
        /// What must stay free.
        reserve: u64,
    },
}

impl StoreError {
    /// An I/O failure of the disk (full, unwritable), or no room on it: worth trying again
    /// once it is mended.
    pub fn is_io(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Io(_)) | StoreError::NoRoom { .. })
    }

    /// Whether the store refuses every write from now on: sled 0.34 keeps the first I/O error
    /// it meets and fails every later write with it until the store is reopened.
    pub fn leaves_store_unwritable(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Io(_)))
    }

    /// sled found the store damaged (a checksum, a file cut short): nothing in it can be
    /// trusted.
    pub fn is_damaged(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Corruption { .. }))
    }
}

/// The partial aggregates of one metric, partition, slice and group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAggregate {
    /// Highest source offset absorbed (-1: none). Lets a replay skip what is already in.
    pub max_offset: i64,
    /// One state per aggregate of the metric, in config order.
    pub states: Vec<crate::aggregate::AggState>,
}

/// Where a source partition's state stands.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMeta {
    /// Offset of the next record to process: all before it are in the state.
    pub next_offset: i64,
    /// Watermark at `next_offset`.
    pub watermark: i64,
    /// Highest event time seen.
    pub max_event_time: i64,
    /// Offset of this position's record in the changelog: the local store holds everything
    /// of the changelog up to it, so a restore need read only what follows. `None` in the
    /// changelog's own copy, and locally when there is no changelog.
    pub changelog_offset: Option<i64>,
    /// The global tables' position the records from `next_offset` on join with (see
    /// [`crate::table`]); empty without tables.
    pub pin: Vec<TablePin>,
    /// The position the records since the previous position record joined with (the pin of
    /// that record, or where the partition started): the join of every record is on record.
    pub joined: Vec<TablePin>,
    /// Until the partition reaches this offset, its pin stays: aggregates hold records up to
    /// just before it from a flush whose position was never written (a torn flush), and
    /// their replay must join as they did.
    pub replay_until: i64,
    /// The metrics this position's state is complete for, with their layouts and expiry
    /// horizons; `None` in a position written before marks existed (format 3 and older).
    pub marks: Option<Vec<MetricMark>>,
}

/// One table's part of a pin: its name and, per partition of its topic, the next offset
/// visible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TablePin {
    /// The table's name.
    pub table: String,
    /// Next offset visible, per partition.
    pub next: Vec<i64>,
}

fn encode<T: Serialize>(version: u8, v: &T) -> Vec<u8> {
    let mut out = vec![version];
    bincode::serde::encode_into_std_write(v, &mut out, bincode::config::standard()).expect("writing to a Vec cannot fail");
    out
}

/// The most bytes a stored, restored or upcast value is decoded into. bincode allocates what a
/// length prefix claims before it reads the bytes, so one corrupt prefix would otherwise ask
/// for exabytes and abort the process (the fuzzer's first find).
pub const MAX_STORED_BYTES: usize = 64 << 20;

/// Decodes the whole of bincode `body` within [`MAX_STORED_BYTES`]; `Err` says why not.
pub fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    let limit = bincode::config::standard().with_limit::<MAX_STORED_BYTES>();
    let (v, used) = bincode::serde::decode_from_slice(body, limit).map_err(|e| e.to_string())?;
    match used == body.len() {
        true => Ok(v),
        false => Err("trailing bytes".into()),
    }
}

fn decode<T: for<'de> Deserialize<'de>>(version: u8, key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), why };
    match bytes.first() {
        Some(v) if *v == version => {}
        other => return Err(corrupt(format!("format version {other:?}, expected {version}"))),
    }
    decode_body(&bytes[1..]).map_err(corrupt)
}

impl PartitionMeta {
    /// Versioned bytes.
    pub fn encode(&self) -> Vec<u8> {
        encode(META_FORMAT, self)
    }
    /// Reads [`PartitionMeta::encode`]'s bytes, and those of the formats before.
    pub fn decode(key: &[u8], bytes: &[u8]) -> Result<Self, StoreError> {
        let bytes = crate::migrations::upcast_meta(bytes).map_err(|e| match e {
            crate::migrations::Upcast::Newer(found) => StoreError::Newer { what: "position", found, supported: META_FORMAT },
            e => StoreError::Corrupt { key: String::from_utf8_lossy(key).into_owned(), why: e.to_string() },
        })?;
        decode(META_FORMAT, key, &bytes)
    }

    /// This position's mark of `metric`, if it has marks and one for it.
    pub fn mark(&self, metric: &str) -> Option<&MetricMark> {
        self.marks.as_ref()?.iter().find(|m| m.metric == metric)
    }
}

fn push_name(out: &mut Vec<u8>, tag: u8, name: &str) {
    out.push(tag);
    out.push(name.len().min(255) as u8);
    out.extend_from_slice(name.as_bytes());
}

fn signed_bytes(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

fn signed_from(b: &[u8]) -> Option<i64> {
    Some((u64::from_be_bytes(b.try_into().ok()?) ^ (1 << 63)) as i64)
}

/// Key prefix of one metric-partition: all its slices follow.
pub fn partition_prefix(out: &mut Vec<u8>, metric: &str, partition: i32) {
    push_name(out, STATE_TAG, metric);
    out.extend_from_slice(&(partition as u32).to_be_bytes());
}

/// Key prefix of one slice of a metric-partition: its aggregates follow.
pub fn slice_prefix(out: &mut Vec<u8>, metric: &str, partition: i32, slice: i64) {
    partition_prefix(out, metric, partition);
    out.extend_from_slice(&signed_bytes(slice));
}

/// Writes the state key of (metric, partition, slice, from_end) into `out`; the caller
/// appends the group key.
pub fn state_key_prefix(out: &mut Vec<u8>, metric: &str, partition: i32, slice: i64, from_end: i64) {
    slice_prefix(out, metric, partition, slice);
    out.extend_from_slice(&signed_bytes(from_end));
}

/// A state key's parts after the metric name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateKey<'a> {
    /// Source partition.
    pub partition: i32,
    /// Slice start.
    pub slice: i64,
    /// The first window end the aggregate counts for ([`EVERY_WINDOW`]: all).
    pub from_end: i64,
    /// Group key.
    pub group: &'a [u8],
}

/// Takes a state key apart after its metric name.
pub fn split_state_key(key: &[u8]) -> Option<StateKey<'_>> {
    let name_len = *key.get(1)? as usize;
    let rest = key.get(2 + name_len..)?;
    if rest.len() < 4 + SLICE_KEY_BYTES {
        return None;
    }
    Some(StateKey {
        partition: u32::from_be_bytes(rest[0..4].try_into().ok()?) as i32,
        slice: signed_from(&rest[4..12])?,
        from_end: signed_from(&rest[12..20])?,
        group: &rest[20..],
    })
}

/// A store key, taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRef<'a> {
    /// An aggregate of a metric.
    State {
        /// Metric name.
        metric: &'a str,
        /// Where in the metric.
        at: StateKey<'a>,
    },
    /// A source partition's position.
    Meta {
        /// Source name.
        source: &'a str,
        /// Partition.
        partition: i32,
    },
}

/// Takes a state or position key apart (`None`: neither, or malformed).
pub fn parse_key(key: &[u8]) -> Option<KeyRef<'_>> {
    let name_len = *key.get(1)? as usize;
    let name = std::str::from_utf8(key.get(2..2 + name_len)?).ok()?;
    match key[0] {
        STATE_TAG => split_state_key(key).map(|at| KeyRef::State { metric: name, at }),
        META_TAG => {
            let p: [u8; 4] = key.get(2 + name_len..)?.try_into().ok()?;
            Some(KeyRef::Meta { source: name, partition: u32::from_be_bytes(p) as i32 })
        }
        _ => None,
    }
}

/// Key of a source partition's position.
pub fn meta_key(source: &str, partition: i32) -> Vec<u8> {
    let mut k = Vec::with_capacity(source.len() + 6);
    push_name(&mut k, META_TAG, source);
    k.extend_from_slice(&(partition as u32).to_be_bytes());
    k
}

/// One aggregate read by [`Store::scan`].
#[derive(Debug, Clone, PartialEq)]
pub struct ScanEntry {
    /// Slice start.
    pub slice: i64,
    /// The first window end it counts for ([`EVERY_WINDOW`]: all).
    pub from_end: i64,
    /// Group key.
    pub group: Vec<u8>,
    /// The partial aggregate.
    pub value: StoredAggregate,
    /// The stored key's and value's bytes.
    pub stored_bytes: usize,
}

/// A stored state of `m` as [`Store::scan`] yields it.
fn scan_entry(m: &Metric, k: &[u8], v: &[u8]) -> Result<ScanEntry, StoreError> {
    let at = split_state_key(k).ok_or_else(|| corrupt_key(k))?;
    let value = m.layout.open(&m.name, k, v)?;
    Ok(ScanEntry { slice: at.slice, from_end: at.from_end, group: at.group.to_vec(), value, stored_bytes: k.len() + v.len() })
}

fn corrupt_key(k: &[u8]) -> StoreError {
    StoreError::Corrupt { key: String::from_utf8_lossy(k).into(), why: "short key".into() }
}

/// A set of writes applied atomically by [`Store::apply`].
#[derive(Default)]
pub struct WriteBatch {
    batch: sled::Batch,
    /// Number of aggregate values written.
    pub puts: usize,
    /// Number of keys removed.
    pub deletes: usize,
}

impl WriteBatch {
    /// Removes a key.
    pub fn delete(&mut self, key: &[u8]) {
        self.batch.remove(key);
        self.deletes += 1;
    }
    /// Writes bytes already encoded (by [`crate::layout::Layout::seal`], or read from the
    /// changelog).
    pub fn put_encoded(&mut self, key: &[u8], value: &[u8]) {
        self.batch.insert(key, value);
        self.puts += 1;
    }
    /// Records a partition's position.
    pub fn put_meta(&mut self, source: &str, partition: i32, meta: &PartitionMeta) {
        self.batch.insert(meta_key(source, partition), meta.encode());
    }
}

/// The on-disk store. Cloning is cheap and shares the same database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    dir: std::path::PathBuf,
}

/// sled's page cache of a store opened by [`Store::open`] (`state.store_cache_bytes`'
/// default).
pub const CACHE_BYTES: u64 = 128 << 20;

impl Store {
    /// Opens (or creates) the store in `dir`, of this version or an older one (see
    /// [`Store::open_current`]); a store of a newer version is refused before sled touches it.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(dir, CACHE_BYTES)
    }

    /// [`Store::open`] with `cache_bytes` of sled page cache.
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let version = crate::migrations::stored_version(dir)?;
        if version > crate::migrations::STORE_VERSION {
            return Err(crate::migrations::MigrationError::Newer { found: version }.into());
        }
        let db = sled::Config::new().path(dir).cache_capacity(cache_bytes).mode(sled::Mode::HighThroughput).open()?;
        let tree = db.open_tree("state")?;
        if !dir.join(crate::migrations::VERSION_FILE).exists() && version == crate::migrations::STORE_VERSION {
            crate::migrations::write_version(dir, version)?;
        }
        Ok(Store { db, tree, dir: dir.to_path_buf() })
    }

    /// Opens the store in `dir` for running `topo`: a store of an older version is migrated
    /// first (`migrate`), or refused; one of a newer version is refused before anything is
    /// written to it.
    pub fn open_current(dir: &Path, topo: &crate::topology::Topology, migrate: bool) -> Result<Store, StoreError> {
        let store = Store::open_with_cache(dir, topo.store_cache_bytes)?;
        if !store.pending()?.is_empty() && !migrate {
            return Err(crate::migrations::MigrationError::Pending { found: store.version()? }.into());
        }
        for done in store.migrate(topo)? {
            tracing::info!(step = done.name, rewritten = done.report.rewritten, seconds = done.seconds, "migrated the state store");
        }
        Ok(store)
    }

    /// Runs the pending migrations of this store (none: nothing happens).
    pub fn migrate(&self, topo: &crate::topology::Topology) -> Result<Vec<crate::migrations::Applied>, StoreError> {
        Ok(crate::migrations::migrate(&self.dir, &self.db, &self.tree, topo)?)
    }

    /// The migrations this store needs to run (an error for a store of a newer version).
    pub fn pending(&self) -> Result<Vec<&'static crate::migrations::Step>, StoreError> {
        Ok(crate::migrations::pending(&self.dir)?)
    }

    /// The store's version.
    pub fn version(&self) -> Result<u32, StoreError> {
        Ok(crate::migrations::stored_version(&self.dir)?)
    }

    /// Another tree of the same database (a global table's), made durable by the same
    /// [`Store::flush`].
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Reads one aggregate of `m`, through its layout's gate.
    pub fn get(&self, m: &Metric, key: &[u8]) -> Result<Option<StoredAggregate>, StoreError> {
        match self.tree.get(key)? {
            None => Ok(None),
            Some(v) => m.layout.open(&m.name, key, &v).map(Some),
        }
    }

    /// Writes one encoded value (`None`: removes the key), outside any batch: for restores,
    /// which need no atomicity (see [`crate::changelog::Restoration`]) and are several times
    /// faster this way than in sled batches.
    pub fn put_encoded(&self, key: &[u8], value: Option<&[u8]>) -> Result<(), StoreError> {
        match value {
            Some(v) => self.tree.insert(key, v)?,
            None => self.tree.remove(key)?,
        };
        Ok(())
    }

    /// Applies a batch atomically.
    pub fn apply(&self, batch: WriteBatch) -> Result<(), StoreError> {
        Ok(self.tree.apply_batch(batch.batch)?)
    }

    /// Makes everything applied so far durable (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Whether the store's filesystem keeps `reserve` bytes free (a filesystem that cannot
    /// say passes: the write then meets whatever the disk does).
    pub fn ensure_room(&self, reserve: u64) -> Result<(), StoreError> {
        match fs2::available_space(&self.dir) {
            Ok(free) if free < reserve => Err(StoreError::NoRoom { free, reserve }),
            _ => Ok(()),
        }
    }

    /// The stored position of a source partition, as stored (see [`PartitionMeta::decode`]).
    pub fn partition_meta_bytes(&self, source: &str, partition: i32) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.tree.get(meta_key(source, partition))?)
    }

    /// The stored position of a source partition.
    pub fn partition_meta(&self, source: &str, partition: i32) -> Result<Option<PartitionMeta>, StoreError> {
        let k = meta_key(source, partition);
        match self.tree.get(&k)? {
            None => Ok(None),
            Some(v) => PartitionMeta::decode(&k, &v).map(Some),
        }
    }

    /// Every stored partition of `source` with its position.
    pub fn partitions(&self, source: &str) -> Result<Vec<(i32, PartitionMeta)>, StoreError> {
        let mut prefix = Vec::new();
        push_name(&mut prefix, META_TAG, source);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            let p = u32::from_be_bytes(k[prefix.len()..].try_into().unwrap_or_default()) as i32;
            out.push((p, PartitionMeta::decode(&k, &v)?));
        }
        Ok(out)
    }

    /// Aggregates of metric `m`'s partition with slices in `[from, to)`, through its layout's
    /// gate.
    pub fn scan<'a>(&'a self, m: &'a Metric, partition: i32, from: i64, to: i64) -> impl Iterator<Item = Result<ScanEntry, StoreError>> + 'a {
        let mut lo = Vec::new();
        slice_prefix(&mut lo, &m.name, partition, from);
        let mut hi = Vec::new();
        slice_prefix(&mut hi, &m.name, partition, to);
        self.tree.range(lo..hi).map(move |kv| {
            let (k, v) = kv?;
            scan_entry(m, &k, &v)
        })
    }

    /// What [`Store::scan`] yields of one `group`, in the same order, without reading the
    /// other groups: keys run (slice, first window end, group), so each (slice, first window
    /// end) present is found by a seek past the last and its group's key read directly. A
    /// point query costs two tree lookups per such pair instead of a decode per state.
    pub fn scan_group<'a>(
        &'a self,
        m: &'a Metric,
        partition: i32,
        (from, to): (i64, i64),
        group: &'a [u8],
    ) -> impl Iterator<Item = Result<ScanEntry, StoreError>> + 'a {
        let mut lo = Vec::new();
        slice_prefix(&mut lo, &m.name, partition, from);
        let mut hi = Vec::new();
        slice_prefix(&mut hi, &m.name, partition, to);
        let mut done = false;
        std::iter::from_fn(move || {
            while !done {
                let (first, _) = match self.tree.range(lo.as_slice()..hi.as_slice()).next()? {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(e.into())),
                };
                let Some(at) = split_state_key(&first) else { return Some(Err(corrupt_key(&first))) };
                let mut key = Vec::new();
                state_key_prefix(&mut key, &m.name, partition, at.slice, at.from_end);
                key.extend_from_slice(group);
                // Past every group of this (slice, first window end).
                lo.clear();
                match (at.from_end.checked_add(1), at.slice.checked_add(1)) {
                    (Some(next_end), _) => state_key_prefix(&mut lo, &m.name, partition, at.slice, next_end),
                    (None, Some(next_slice)) => slice_prefix(&mut lo, &m.name, partition, next_slice),
                    (None, None) => done = true,
                }
                match self.tree.get(&key) {
                    Ok(Some(v)) => return Some(scan_entry(m, &key, &v)),
                    Ok(None) => {}
                    Err(e) => return Some(Err(e.into())),
                }
            }
            None
        })
    }

    /// The newest slice of one metric-partition that holds data.
    pub fn last_slice(&self, metric: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let mut lo = Vec::new();
        partition_prefix(&mut lo, metric, partition);
        let mut hi = lo.clone();
        hi.extend_from_slice(&[0xff; 9]);
        match self.tree.range(lo..hi).next_back() {
            None => Ok(None),
            Some(kv) => Ok(split_state_key(&kv?.0).map(|at| at.slice)),
        }
    }

    /// Keys of one metric-partition with slices before `before`.
    pub fn keys_before(&self, metric: &str, partition: i32, before: i64) -> Result<Vec<sled::IVec>, StoreError> {
        let mut lo = Vec::new();
        partition_prefix(&mut lo, metric, partition);
        let mut hi = Vec::new();
        slice_prefix(&mut hi, metric, partition, before);
        self.tree.range(lo..hi).keys().map(|k| k.map_err(StoreError::from)).collect()
    }

    /// Deletes every key of one source partition ([`Store::partition_keys`]) in one batch;
    /// returns how many there were.
    pub fn delete_partition<'a>(&self, metrics: impl IntoIterator<Item = &'a str>, source: &str, partition: i32) -> Result<usize, StoreError> {
        let keys = self.partition_keys(metrics, source, partition)?;
        let mut batch = WriteBatch::default();
        for k in &keys {
            batch.delete(k);
        }
        self.apply(batch)?;
        Ok(keys.len())
    }

    /// Every key of one source partition: the aggregates of `metrics` and the position.
    pub fn partition_keys<'a>(
        &self,
        metrics: impl IntoIterator<Item = &'a str>,
        source: &str,
        partition: i32,
    ) -> Result<Vec<sled::IVec>, StoreError> {
        let mut keys = Vec::new();
        for m in metrics {
            let mut prefix = Vec::new();
            partition_prefix(&mut prefix, m, partition);
            for k in self.tree.scan_prefix(&prefix).keys() {
                keys.push(k?);
            }
        }
        let meta = meta_key(source, partition);
        if self.tree.contains_key(&meta)? {
            keys.push(meta.into());
        }
        Ok(keys)
    }

    /// Whether `key` is stored.
    pub fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(key)?)
    }

    /// Number of stored keys (aggregates and positions).
    pub fn len(&self) -> usize {
        self.tree.len()
    }

    /// Whether the store holds nothing.
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// What the store remembers of `metric` (its layout record), if anything: a record it
    /// cannot read is reported as a manifest of that layout text.
    pub fn manifest(&self, metric: &str) -> Result<Option<Manifest>, StoreError> {
        let mut k = Vec::new();
        push_name(&mut k, LAYOUT_TAG, metric);
        Ok(self
            .tree
            .get(&k)?
            .map(|v| Manifest::decode(&v).unwrap_or_else(|| Manifest { layout: String::from_utf8_lossy(&v).into_owned(), ..Manifest::default() })))
    }

    /// Every metric the store remembers, with its manifest.
    pub fn manifests(&self) -> Result<Vec<(String, Manifest)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix([LAYOUT_TAG]) {
            let (k, _) = kv?;
            let name = String::from_utf8_lossy(k.get(2..).unwrap_or_default()).into_owned();
            if let Some(m) = self.manifest(&name)? {
                out.push((name, m));
            }
        }
        Ok(out)
    }

    /// Records what `m` is now.
    pub fn put_manifest(&self, m: &Metric) -> Result<(), StoreError> {
        self.put_manifest_of(&m.name, &Manifest::of(m))
    }

    /// Records `manifest` as what the store remembers of `metric`.
    pub fn put_manifest_of(&self, metric: &str, manifest: &Manifest) -> Result<(), StoreError> {
        let mut k = Vec::new();
        push_name(&mut k, LAYOUT_TAG, metric);
        self.tree.insert(k, manifest.encode())?;
        Ok(())
    }

    /// Reads one aggregate of `m` only if it is of exactly `m`'s layout and generation (see
    /// [`crate::config::MetricConfig::rebuild`]): one written before, or of unknown layout,
    /// reads as none.
    pub fn get_current(&self, m: &Metric, key: &[u8]) -> Result<Option<StoredAggregate>, StoreError> {
        match self.tree.get(key)? {
            Some(v) if crate::layout::is_current(m, &v) => m.layout.open(&m.name, key, &v).map(Some),
            _ => Ok(None),
        }
    }

    /// Keys of `m`'s `partition` whose states are not of `m`'s layout and generation.
    pub fn stale_states(&self, m: &Metric, partition: i32) -> Result<Vec<sled::IVec>, StoreError> {
        let mut prefix = Vec::new();
        partition_prefix(&mut prefix, &m.name, partition);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix) {
            let (k, v) = kv?;
            if !crate::layout::is_current(m, &v) {
                out.push(k);
            }
        }
        Ok(out)
    }

    /// The first stored state of `m`'s `partition`, through its layout's gate (`None`: none).
    pub fn first_state(&self, m: &Metric, partition: i32) -> Result<Option<StoredAggregate>, StoreError> {
        let mut prefix = Vec::new();
        partition_prefix(&mut prefix, &m.name, partition);
        match self.tree.scan_prefix(&prefix).next().transpose()? {
            None => Ok(None),
            Some((k, v)) => m.layout.open(&m.name, &k, &v).map(Some),
        }
    }

    /// The latest slice `metric` has any state of on `partition` (`None`: none). Keys are in
    /// slice order, so it is the last key's.
    pub fn newest_slice(&self, metric: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        let mut prefix = Vec::new();
        partition_prefix(&mut prefix, metric, partition);
        match self.tree.scan_prefix(&prefix).keys().next_back().transpose()? {
            None => Ok(None),
            Some(k) => {
                let at = split_state_key(&k).ok_or_else(|| corrupt_key(&k))?;
                Ok(Some(at.slice))
            }
        }
    }

    /// Whether some state of `m`'s `partition` holds records only from before `offset` (it
    /// stopped there: the metric was not processed since), as opposed to states a torn
    /// flush wrote ahead of their position.
    pub fn has_states_before(&self, m: &Metric, partition: i32, offset: i64) -> Result<bool, StoreError> {
        let mut prefix = Vec::new();
        partition_prefix(&mut prefix, &m.name, partition);
        for kv in self.tree.scan_prefix(&prefix) {
            let (_, v) = kv?;
            if crate::layout::max_offset_of(&v).is_none_or(|o| o < offset) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Bytes the store takes on disk.
    pub fn size_on_disk(&self) -> Result<u64, StoreError> {
        Ok(self.db.size_on_disk()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggState;

    #[test]
    fn a_length_prefix_claiming_exabytes_is_an_error_not_an_abort() {
        // The fuzzer's input, shortened: a position whose table pin claims 2^49 bytes.
        let claim = [0xfd, 0, 0, 0, 0, 0, 0, 2, 0];
        assert!(decode_body::<Vec<u8>>(&claim).is_err());
        assert!(decode_body::<String>(&claim).is_err());
        let mut meta = vec![META_FORMAT, 0, 0, 0, 0, 1];
        meta.extend_from_slice(&claim);
        assert!(PartitionMeta::decode(b"k", &meta).is_err());
    }

    fn pv() -> std::sync::Arc<crate::topology::Topology> {
        crate::topology::test_topology(
            "[[metrics]]\nname = \"pv\"\nsource = \"s\"\naggregates = [\"count\"]\nwindow = { type = \"tumbling\", size = \"1m\" }\n",
        )
    }

    #[test]
    fn keys_sort_numerically_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let topo = pv();
        let m = &topo.metrics[0];
        let mut batch = WriteBatch::default();
        for slice in [-120_000i64, -60_000, 0, 60_000, 1_630_915_200_000] {
            let mut k = Vec::new();
            state_key_prefix(&mut k, "pv", 3, slice, EVERY_WINDOW);
            k.extend_from_slice(b"101");
            batch.put_encoded(&k, &m.layout.seal(&StoredAggregate { max_offset: slice, states: vec![AggState::Count(1)] }));
        }
        batch.put_meta("src", 3, &PartitionMeta { next_offset: 9, watermark: 5, max_event_time: 6, ..PartitionMeta::default() });
        store.apply(batch).unwrap();
        let slices: Vec<i64> = store.scan(m, 3, -60_000, 60_001).map(|r| r.unwrap().slice).collect();
        assert_eq!(slices, vec![-60_000, 0, 60_000]);
        assert_eq!(store.keys_before("pv", 3, 0).unwrap().len(), 2);
        assert!(store.scan(m, 4, i64::MIN, i64::MAX).next().is_none(), "partitions are separate");
        assert!(store.has_states_before(m, 3, i64::MAX).unwrap() && !store.has_states_before(m, 4, i64::MAX).unwrap());
        assert_eq!(
            store.partitions("src").unwrap(),
            vec![(3, PartitionMeta { next_offset: 9, watermark: 5, max_event_time: 6, ..PartitionMeta::default() })]
        );
    }

    /// `scan_group` yields exactly what a whole scan filtered by group does: over slices and
    /// first window ends at the extremes, groups that prefix one another, the empty group,
    /// neighbouring partitions, and ranges that cut anywhere.
    #[test]
    fn a_group_scan_is_the_whole_scan_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let topo = pv();
        let m = &topo.metrics[0];
        let slices = [i64::MIN, -60_000, 0, 60_000, 120_000, i64::MAX];
        let ends = [EVERY_WINDOW, -1, 0, 120_000, 180_000, i64::MAX];
        let groups: [&[u8]; 6] = [b"", b"1", b"10", b"101", b"1\x1f0", b"\xff\xff"];
        let mut batch = WriteBatch::default();
        let mut n = 0u64;
        for p in [2, 3, 4] {
            for &slice in &slices {
                for &end in &ends {
                    for g in groups {
                        n += 1;
                        // About two states in three, so some pairs lack some groups.
                        if n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 62 == 0 {
                            continue;
                        }
                        let mut k = Vec::new();
                        state_key_prefix(&mut k, "pv", p, slice, end);
                        k.extend_from_slice(g);
                        batch.put_encoded(&k, &m.layout.seal(&StoredAggregate { max_offset: n as i64, states: vec![AggState::Count(n)] }));
                    }
                }
            }
        }
        store.apply(batch).unwrap();
        let seen = |e: ScanEntry| (e.slice, e.from_end, e.group, e.value.max_offset);
        let ranges = [(i64::MIN, i64::MAX), (-60_000, 120_000), (0, 1), (1, 60_000), (60_000, i64::MAX), (5, 5)];
        for (from, to) in ranges {
            for g in groups.iter().copied().chain([&b"2"[..]]) {
                let whole: Vec<_> = store.scan(m, 3, from, to).map(|e| e.unwrap()).filter(|e| e.group == g).map(seen).collect();
                let direct: Vec<_> = store.scan_group(m, 3, (from, to), g).map(|e| seen(e.unwrap())).collect();
                assert_eq!(direct, whole, "group {g:?} in [{from}, {to})");
            }
        }
        assert!(store.scan_group(m, 3, (i64::MIN, i64::MAX), b"101").count() > 10, "the test has states to find");
    }

    #[test]
    fn wrong_versions_are_errors_not_garbage() {
        let meta = PartitionMeta { next_offset: 3, ..PartitionMeta::default() }.encode();
        assert!(PartitionMeta::decode(b"k", &meta).is_ok());
        let mut bumped = meta.clone();
        bumped[0] = META_FORMAT + 1;
        assert!(matches!(PartitionMeta::decode(b"k", &bumped), Err(StoreError::Newer { .. })));
        assert!(PartitionMeta::decode(b"k", &meta[..meta.len() - 1]).is_err());
        let state = pv().metrics[0].layout.seal(&StoredAggregate { max_offset: 1, states: vec![AggState::Sum(5)] });
        assert!(PartitionMeta::decode(b"k", &state).is_err());
    }

    #[test]
    fn group_keys_cannot_be_forged() {
        let a = encode_group([&b"a\x1fb"[..], b"c"]);
        let b = encode_group([&b"a"[..], b"b\x1fc"]);
        assert_ne!(a, b);
        assert_eq!(split_group(&a), vec![b"a\x1fb".to_vec(), b"c".to_vec()]);
        assert_eq!(split_group(&encode_group([&b"\x1e\x1e"[..]])), vec![b"\x1e\x1e".to_vec()]);
    }

    #[test]
    fn a_metric_is_remembered_with_its_layout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let topo = pv();
        assert_eq!(store.manifest("pv").unwrap(), None);
        store.put_manifest(&topo.metrics[0]).unwrap();
        assert_eq!(store.manifest("pv").unwrap().unwrap().layout, topo.metrics[0].layout.text);
        assert_eq!(store.manifests().unwrap().len(), 1);
    }
}
