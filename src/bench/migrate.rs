//! `tally bench --migrate N`: how long the pending migrations take on a store of the
//! previous version holding N state keys of S1's metrics.

use std::time::Instant;

use crate::aggregate::AggState;
use crate::store::{self, StoredAggregate};
use crate::topology::Topology;

/// Writes a version 2 store of `keys` state keys spread over `partitions`, migrates it, and
/// prints keys per second, the time and the peak RSS.
pub fn run(keys: u64, partitions: i32) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new().prefix("tally-bench-migrate-").tempdir()?;
    let cfg = super::bench_config("127.0.0.1:1", "tally-bench-migrate", dir.path())?;
    let topo = Topology::compile(&cfg)?;
    let bytes = write_v2(dir.path(), &topo, keys, partitions)?;
    println!("migrate: a version 2 store of {keys} state keys ({:.1} MiB of values) over {partitions} partitions", bytes as f64 / (1 << 20) as f64);
    let store = store::Store::open(dir.path())?;
    let start = Instant::now();
    let applied = store.migrate(&topo)?;
    let secs = start.elapsed().as_secs_f64();
    let rewritten: u64 = applied.iter().map(|a| a.report.rewritten).sum();
    println!("migrate: {rewritten} values rewritten in {secs:.2} s ({:.0} keys/s), store version {}", rewritten as f64 / secs, store.version()?);
    if let Some(kib) = super::peak_rss_kib("self") {
        println!("migrate: peak RSS {} MiB", kib / 1024);
    }
    Ok(())
}

/// A store as version 2 left it: format 2 states, format 3 positions, text layout records.
fn write_v2(dir: &std::path::Path, topo: &Topology, keys: u64, partitions: i32) -> anyhow::Result<u64> {
    let db = sled::Config::new().path(dir).cache_capacity(256 << 20).mode(sled::Mode::HighThroughput).open()?;
    let tree = db.open_tree("state")?;
    let mut bytes = 0;
    for m in &topo.metrics {
        let mut k = vec![b'L', m.name.len() as u8];
        k.extend_from_slice(m.name.as_bytes());
        tree.insert(k, crate::migrations::store_v2_to_v3::layout_v2(m).as_bytes())?;
    }
    for i in 0..keys {
        let m = &topo.metrics[(i % topo.metrics.len() as u64) as usize];
        let p = (i % partitions as u64) as i32;
        let mut key = Vec::new();
        store::state_key_prefix(&mut key, &m.name, p, (i / 1000) as i64 * 60_000, store::EVERY_WINDOW);
        key.extend_from_slice(format!("product-{}", i % 1000).as_bytes());
        let states = m.aggregates.iter().map(|a| AggState::new(&a.kind)).collect();
        let mut value = vec![2];
        bincode::serde::encode_into_std_write(StoredAggregate { max_offset: i as i64, states }, &mut value, bincode::config::standard())?;
        bytes += value.len() as u64;
        tree.insert(key, value)?;
    }
    for p in 0..partitions {
        let meta = crate::store::PartitionMeta { next_offset: keys as i64, ..Default::default() };
        tree.insert(store::meta_key(&topo.sources[0].name, p), crate::migrations::store_v2_to_v3::meta_v3(&meta))?;
    }
    db.flush()?;
    Ok(bytes)
}
