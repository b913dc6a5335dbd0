//! A changelog kept in memory, per partition, as a broker keeps it before compaction: it
//! acknowledges at once, and can tear a flush — its changes are written, its positions are
//! not (a crash between the two).

use tally::changelog::{Change, ChangeSink, ChangelogError};

/// A changelog record: store key, value (`None`: a tombstone).
pub type Record = (Vec<u8>, Option<Vec<u8>>);

/// The changelog's partitions.
#[derive(Default)]
pub struct TearingLog {
    pub parts: Vec<Vec<Record>>,
    /// Tear the next flushes: their changes land, their positions do not.
    pub tear: bool,
    /// The offsets of the last flush's position records; `None` when it was torn.
    acked: Option<Vec<i64>>,
}

impl TearingLog {
    /// An empty changelog of `partitions` partitions.
    pub fn new(partitions: usize) -> TearingLog {
        TearingLog { parts: vec![Vec::new(); partitions], ..TearingLog::default() }
    }
}

impl ChangeSink for TearingLog {
    fn send(&mut self, changes: &[Change], positions: &[Change]) -> Result<(), ChangelogError> {
        for c in changes {
            self.parts[c.partition as usize].push((c.key.clone(), c.value.clone()));
        }
        if self.tear {
            self.acked = None;
            return Ok(());
        }
        let mut offsets = Vec::new();
        for c in positions {
            let log = &mut self.parts[c.partition as usize];
            log.push((c.key.clone(), c.value.clone()));
            offsets.push(log.len() as i64 - 1);
        }
        self.acked = Some(offsets);
        Ok(())
    }

    fn acknowledged(&mut self, _: std::time::Duration) -> Result<Option<Vec<i64>>, ChangelogError> {
        match self.acked.take() {
            Some(offsets) => Ok(Some(offsets)),
            None => Err(ChangelogError("torn on purpose".into())),
        }
    }
}
