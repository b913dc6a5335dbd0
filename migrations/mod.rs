//! Migrations: every format tally has persisted, and the ordered steps from each to the next.
//!
//! These files live under `migrations/` (built as the `tally::migrations` module) so that
//! what changes a format on disk sits apart from the code that reads the current one: a
//! step keeps frozen copies of the formats it reads, and tally's own types are always the
//! newest. They are modules rather than a separate crate because a step writes tally's
//! current types, which a crate below tally could not see.
//!
//! # What is versioned
//!
//! * The **store** as a whole: [`STORE_VERSION`], in the file [`VERSION_FILE`] of the state
//!   directory, read before sled opens the store (opening it writes). A store without it is
//!   version 2 (the last one before the file existed). A store of a newer version is refused
//!   before anything is written.
//! * Each **value**: a leading format byte (state, position, layout record). Values read
//!   back from the changelog are brought to the current format one by one by
//!   [`upcast_state`] and [`upcast_meta`] — a changelog is never rewritten, and compaction
//!   keeps records of every format tally ever wrote.
//!
//! # Steps
//!
//! | step | from → to | what |
//! |------|-----------|------|
//! | [`store_v2_to_v3`] | 2 → 3 | states carry their layout's fingerprint, positions their metrics' marks, layout records the metric's settings |
//!
//! The internal topics' settings that matter are in [`topics`], checked (and altered) at
//! every start.
//!
//! `tally migrate --config FILE` runs the pending steps ([`migrate`]); `tally run` does the
//! same at start, or refuses with `state.migrate = "refuse"`. Each step is idempotent and
//! writes the new version last, so a step interrupted halfway runs again whole.

pub mod store_v2_to_v3;
pub mod topics;

use std::borrow::Cow;
use std::path::Path;
use std::time::Instant;

use crate::topology::Topology;

/// The store version this tally writes.
pub const STORE_VERSION: u32 = 3;
/// The oldest store version a step starts from.
pub const OLDEST_STORE_VERSION: u32 = 2;
/// The file in the state directory that holds the store's version.
pub const VERSION_FILE: &str = "tally-store-version";

/// A migration failure. Nothing is half-applied: see [`migrate`].
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// Written by a newer tally: refused, nothing changed.
    #[error("the state store was written by a newer tally (store version {found}; this tally reads up to {STORE_VERSION}): run that version, or a newer one; nothing was changed on disk")]
    Newer {
        /// The version found.
        found: u32,
    },
    /// Written by a tally older than any step starts from.
    #[error("the state store is version {found}, older than the oldest this tally migrates ({OLDEST_STORE_VERSION}): delete the state directory (with a changelog, the state is restored from it; without, recomputed from the source topics)")]
    TooOld {
        /// The version found.
        found: u32,
    },
    /// The store holds the version the config forbids migrating at start.
    #[error("the state store is version {found} and this tally writes {STORE_VERSION}; state.migrate = \"refuse\": run `tally migrate --config FILE` first")]
    Pending {
        /// The version found.
        found: u32,
    },
    /// A value the step cannot read.
    #[error("migrating {step}: the value under key {key} is unreadable: {why}")]
    Unreadable {
        /// The step.
        step: &'static str,
        /// Printable key.
        key: String,
        /// What failed.
        why: String,
    },
    /// sled failed.
    #[error("state store: {0}")]
    Sled(#[from] sled::Error),
    /// The version file could not be read or written.
    #[error("state store version file: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a value could not be brought to the current format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Upcast {
    /// Written by a newer tally.
    #[error("format {0}, written by a newer tally")]
    Newer(u8),
    /// A format no step reads (older than any supported, or not a value of this kind).
    #[error("format {0:?}, which this tally does not read")]
    Unknown(Option<u8>),
}

/// One ordered migration step of the store.
pub struct Step {
    /// Its name, as `tally migrate` reports it.
    pub name: &'static str,
    /// The store version it starts from.
    pub from: u32,
    /// The version it leaves.
    pub to: u32,
    /// Rewrites `tree` for `topo`'s config (a metric whose stored layout is another is left
    /// as it is, and refused when tally runs).
    pub run: fn(&sled::Tree, &Topology) -> Result<StepReport, MigrationError>,
}

/// What a step did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Values rewritten.
    pub rewritten: u64,
    /// Values already in the new format (a step run again after an interruption).
    pub unchanged: u64,
}

/// Every step, in order.
pub const STEPS: &[Step] = &[Step { name: "store_v2_to_v3", from: 2, to: 3, run: store_v2_to_v3::run }];

/// The version of the store in `dir`, read before sled opens it (opening writes to its
/// files): a missing directory or one without a store is a new store (the current version);
/// a store without a version file is version 2, the last one before the file existed.
pub fn stored_version(dir: &Path) -> Result<u32, MigrationError> {
    match std::fs::read_to_string(dir.join(VERSION_FILE)) {
        Ok(text) => text.trim().parse().map_err(|_| MigrationError::Unreadable {
            step: "version",
            key: VERSION_FILE.into(),
            why: format!("{:?} is not a version number", text.chars().take(20).collect::<String>()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(if dir.join("conf").exists() { OLDEST_STORE_VERSION } else { STORE_VERSION }),
        Err(e) => Err(MigrationError::Io(e)),
    }
}

/// Records `version` as the store's in `dir`, atomically (a new file renamed over the old).
pub fn write_version(dir: &Path, version: u32) -> Result<(), MigrationError> {
    let tmp = dir.join(format!("{VERSION_FILE}.new"));
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, format!("{version}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(VERSION_FILE))?;
    Ok(())
}

/// The steps the store in `dir` still needs, in order; a store of a newer or unsupported
/// version is an error.
pub fn pending(dir: &Path) -> Result<Vec<&'static Step>, MigrationError> {
    let found = stored_version(dir)?;
    if found > STORE_VERSION {
        return Err(MigrationError::Newer { found });
    }
    if found < OLDEST_STORE_VERSION {
        return Err(MigrationError::TooOld { found });
    }
    Ok(STEPS.iter().filter(|s| s.from >= found).collect())
}

/// One applied step, for `tally migrate` and the log.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The step's name.
    pub name: &'static str,
    /// What it did.
    pub report: StepReport,
    /// How long it took.
    pub seconds: f64,
}

/// Runs every pending step on the store in `dir` (opened as `db`, its state tree `tree`), in
/// order: each step's writes are fsynced, then its version recorded. Idempotent: a store
/// already current is left untouched.
pub fn migrate(dir: &Path, db: &sled::Db, tree: &sled::Tree, topo: &Topology) -> Result<Vec<Applied>, MigrationError> {
    let mut applied = Vec::new();
    for step in pending(dir)? {
        let start = Instant::now();
        let report = (step.run)(tree, topo)?;
        db.flush()?;
        write_version(dir, step.to)?;
        applied.push(Applied { name: step.name, report, seconds: start.elapsed().as_secs_f64() });
    }
    Ok(applied)
}

/// A state value (`S` key) of any format this tally reads, in the current one.
pub fn upcast_state(bytes: &[u8]) -> Result<Cow<'_, [u8]>, Upcast> {
    match bytes.first() {
        Some(&crate::store::STATE_FORMAT) => Ok(Cow::Borrowed(bytes)),
        Some(2) => Ok(Cow::Owned(store_v2_to_v3::state(bytes, crate::layout::UNKNOWN))),
        Some(&v) if v > crate::store::STATE_FORMAT => Err(Upcast::Newer(v)),
        other => Err(Upcast::Unknown(other.copied())),
    }
}

/// A position value (`P` key) of any format this tally reads, in the current one.
pub fn upcast_meta(bytes: &[u8]) -> Result<Cow<'_, [u8]>, Upcast> {
    match bytes.first() {
        Some(&crate::store::META_FORMAT) => Ok(Cow::Borrowed(bytes)),
        Some(2 | 3) => store_v2_to_v3::meta(bytes).map(Cow::Owned).ok_or(Upcast::Unknown(bytes.first().copied())),
        Some(&v) if v > crate::store::META_FORMAT => Err(Upcast::Newer(v)),
        other => Err(Upcast::Unknown(other.copied())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_chain_from_the_oldest_version_to_the_current_one() {
        let mut at = OLDEST_STORE_VERSION;
        for s in STEPS {
            assert_eq!(s.from, at, "{} starts where the previous step ended", s.name);
            assert!(s.to > s.from);
            at = s.to;
        }
        assert_eq!(at, STORE_VERSION);
    }

    #[test]
    fn versions_are_read_and_a_newer_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(stored_version(dir.path()).unwrap(), STORE_VERSION, "an empty directory is a new store");
        std::fs::write(dir.path().join("conf"), "").unwrap();
        assert_eq!(stored_version(dir.path()).unwrap(), 2, "a store without its version is the last one before the file");
        write_version(dir.path(), STORE_VERSION + 1).unwrap();
        assert!(matches!(pending(dir.path()), Err(MigrationError::Newer { .. })));
        write_version(dir.path(), 1).unwrap();
        assert!(matches!(pending(dir.path()), Err(MigrationError::TooOld { found: 1 })));
        std::fs::write(dir.path().join(VERSION_FILE), "x").unwrap();
        assert!(pending(dir.path()).is_err());
    }

    #[test]
    fn values_of_a_newer_format_are_refused_not_misread() {
        assert_eq!(upcast_state(&[crate::store::STATE_FORMAT + 1, 0]), Err(Upcast::Newer(crate::store::STATE_FORMAT + 1)));
        assert_eq!(upcast_meta(&[crate::store::META_FORMAT + 1]), Err(Upcast::Newer(crate::store::META_FORMAT + 1)));
        assert_eq!(upcast_state(&[1, 0]), Err(Upcast::Unknown(Some(1))));
        assert_eq!(upcast_state(&[]), Err(Upcast::Unknown(None)));
    }
}
