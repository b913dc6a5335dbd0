//! HyperLogLog++ distinct-count sketches with a fixed hash and a canonical encoding.
//!
//! Two things the `hyperloglogplus` crate leaves to its user matter here:
//!
//! * **The hash.** Sketches built on different partitions, replicas or runs are merged, so
//!   every sketch must hash a value the same way. The crate's usual `RandomState` seeds each
//!   process differently and merged answers go silently wrong; [`SketchHasher`] is XXH3 with
//!   a fixed seed over the value's canonical text.
//! * **The encoding.** The crate's serde form holds a `HashSet` buffer whose order is not
//!   stable. [`Sketch::to_canonical`] drains that buffer into the sorted sparse list first,
//!   so two sketches of the same set of values encode to the same bytes, whatever order the
//!   values came in and whichever path (live, restore, merge) built them.
//!
//! ```
//! use tally::aggregate::sketch::Sketch;
//! let mut a = Sketch::new(14).unwrap();
//! let mut b = Sketch::new(14).unwrap();
//! for i in 0..1000 { a.insert(format!("user{i}").as_bytes()); }
//! for i in (0..1000).rev() { b.insert(format!("user{i}").as_bytes()); }
//! assert_eq!(a.to_canonical(), b.to_canonical());
//! assert!((a.estimate() - 1000.0).abs() < 30.0);
//! ```

use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};

use hyperloglogplus::{HyperLogLog, HyperLogLogPlus};
use serde::{Deserialize, Serialize};

/// Version of the canonical encoding; bump when the layout changes.
pub const SKETCH_FORMAT: u8 = 1;

/// Seed of the sketch hash. Changing it makes every stored sketch unmergeable with new ones.
const HASH_SEED: u64 = 0x7461_6c6c_795f_686c; // "tally_hl"

/// Builds [`FixedHasher`]s: the same hash in every process.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct SketchHasher;

/// XXH3 of the bytes written, with a fixed seed.
#[derive(Debug, Default)]
pub struct FixedHasher(u64);

impl Hasher for FixedHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, HASH_SEED ^ self.0);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl BuildHasher for SketchHasher {
    type Hasher = FixedHasher;
    fn build_hasher(&self) -> FixedHasher {
        FixedHasher(0)
    }
}

/// Hashes as exactly its bytes: `[u8]`'s own `Hash` prefixes a platform-sized length.
struct Raw<'a>(&'a [u8]);

impl Hash for Raw<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0)
    }
}

/// Why a sketch could not be made, merged or decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SketchError {
    /// Precision outside 4..=18.
    #[error("HLL precision {0} is outside 4..=18")]
    Precision(u8),
    /// Merging sketches of different precision.
    #[error("cannot merge a precision-{0} sketch into a precision-{1} one")]
    Mismatch(u8, u8),
    /// Stored bytes that are not a sketch of a known format.
    #[error("stored sketch is unreadable: {0}")]
    Corrupt(String),
}

/// A HyperLogLog++ sketch of distinct values.
#[derive(Clone)]
pub struct Sketch {
    hll: HyperLogLogPlus<Vec<u8>, SketchHasher>,
    precision: u8,
}

impl Sketch {
    /// An empty sketch with `2^precision` registers (standard error `1.04 / 2^(p/2)`).
    pub fn new(precision: u8) -> Result<Sketch, SketchError> {
        let hll = HyperLogLogPlus::new(precision, SketchHasher).map_err(|_| SketchError::Precision(precision))?;
        Ok(Sketch { hll, precision })
    }

    /// The precision.
    pub fn precision(&self) -> u8 {
        self.precision
    }

    /// Relative standard error of the estimate at this precision (dense representation;
    /// the sparse one used for small counts is more accurate).
    pub fn standard_error(&self) -> f64 {
        1.04 / ((1u64 << self.precision) as f64).sqrt()
    }

    /// Adds a value, given as its canonical bytes.
    pub fn insert(&mut self, value: &[u8]) {
        self.hll.insert_any(&Raw(value));
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Sketch) -> Result<(), SketchError> {
        if other.precision != self.precision {
            return Err(SketchError::Mismatch(other.precision, self.precision));
        }
        self.hll.merge(&other.hll).map_err(|_| SketchError::Mismatch(other.precision, self.precision))
    }

    /// The estimated number of distinct values.
    pub fn estimate(&mut self) -> f64 {
        self.hll.count()
    }

    /// The canonical encoding: a format byte, then the crate's serde form (bincode) taken
    /// after the unordered buffer has been drained.
    pub fn to_canonical(&self) -> Vec<u8> {
        let mut settled = self.hll.clone();
        // Counting merges the HashSet buffer into the sorted sparse list, or converts to
        // dense when the list is past its threshold: afterwards the state is a function of
        // the set of values alone.
        settled.count();
        let mut out = vec![SKETCH_FORMAT];
        bincode::serde::encode_into_std_write(&settled, &mut out, bincode::config::standard()).expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes [`Sketch::to_canonical`]'s output.
    pub fn from_canonical(bytes: &[u8]) -> Result<Sketch, SketchError> {
        match bytes.first() {
            Some(&SKETCH_FORMAT) => {}
            other => return Err(SketchError::Corrupt(format!("unknown sketch format {other:?}"))),
        }
        let hll: HyperLogLogPlus<Vec<u8>, SketchHasher> = crate::store::decode_body(&bytes[1..]).map_err(SketchError::Corrupt)?;
        // The crate keeps its precision private; its serde form starts with the unit
        // builder (no bytes) and then the precision byte.
        let precision = bytes[1];
        Sketch::new(precision)?;
        Ok(Sketch { hll, precision })
    }
}

impl PartialEq for Sketch {
    fn eq(&self, other: &Sketch) -> bool {
        self.to_canonical() == other.to_canonical()
    }
}

impl fmt::Debug for Sketch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sketch(p={}, {} bytes)", self.precision, self.to_canonical().len())
    }
}

impl Serialize for Sketch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.to_canonical())
    }
}

impl<'de> Deserialize<'de> for Sketch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Sketch, D::Error> {
        struct BytesVisitor;
        impl<'de> serde::de::Visitor<'de> for BytesVisitor {
            type Value = Sketch;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("canonical sketch bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Sketch, E> {
                Sketch::from_canonical(v).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Sketch, A::Error> {
                let mut v = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Sketch::from_canonical(&v).map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_bytes(BytesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sketch_of(p: u8, values: impl Iterator<Item = u64>) -> Sketch {
        let mut s = Sketch::new(p).unwrap();
        for v in values {
            s.insert(v.to_string().as_bytes());
        }
        s
    }

    #[test]
    fn estimates_within_three_standard_errors() {
        for n in [10u64, 1_000, 20_000, 200_000] {
            let mut s = sketch_of(14, 0..n);
            let est = s.estimate();
            let bound = 3.0 * s.standard_error() * n as f64 + 1.0;
            assert!((est - n as f64).abs() <= bound, "n={n} est={est}");
        }
    }

    #[test]
    fn every_build_path_gives_the_same_bytes() {
        // Around the sparse→dense threshold too, where insertion order could matter.
        for n in [0u64, 1, 500, 3_000, 12_000, 40_000] {
            let straight = sketch_of(12, 0..n);
            let reversed = sketch_of(12, (0..n).rev());
            let mut merged = sketch_of(12, (0..n).filter(|v| v % 3 == 0));
            merged.merge(&sketch_of(12, (0..n).filter(|v| v % 3 != 0))).unwrap();
            let mut overlapping = sketch_of(12, 0..(n / 2 + 7).min(n));
            overlapping.merge(&sketch_of(12, (n / 3..n).rev())).unwrap();
            let canon = straight.to_canonical();
            assert_eq!(canon, reversed.to_canonical(), "n={n}");
            assert_eq!(canon, merged.to_canonical(), "n={n}");
            assert_eq!(canon, overlapping.to_canonical(), "n={n}");
            let round = Sketch::from_canonical(&canon).unwrap();
            assert_eq!(round.to_canonical(), canon);
        }
    }

    #[test]
    fn merging_needs_equal_precision_and_garbage_is_rejected() {
        let mut a = Sketch::new(12).unwrap();
        assert_eq!(a.merge(&Sketch::new(14).unwrap()), Err(SketchError::Mismatch(14, 12)));
        assert!(Sketch::new(3).is_err());
        assert!(Sketch::from_canonical(&[]).is_err());
        assert!(Sketch::from_canonical(&[9, 1, 2]).is_err());
        assert!(Sketch::from_canonical(&[SKETCH_FORMAT, 14, 0xff]).is_err());
    }
}
