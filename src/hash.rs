//! Hashing for the in-memory maps keyed by short byte strings (the write-back cache, the
//! decoder's field table, the restore buffer).
//!
//! `xxh3::Xxh3Builder`'s hasher streams: every `write` is copied into a buffer first, which
//! on keys of 20–60 bytes cost more than the hash itself (callgrind on S1: a third of the
//! hashing instructions were `memcpy`). [`KeyHasher`] hashes each `write` in one shot with
//! XXH3 and chains the results, which is all a `HashMap` needs: the same bytes written the
//! same way hash the same. Not for anything that outlives the process.
//!
//! ```
//! use std::collections::HashMap;
//! let mut m: HashMap<Vec<u8>, u32, tally::hash::KeyHash> = HashMap::default();
//! m.insert(b"pv/3/101".to_vec(), 1);
//! assert_eq!(m.get(&b"pv/3/101"[..]), Some(&1));
//! ```

use std::hash::{BuildHasherDefault, Hasher};

/// One-shot XXH3 per write, chained through the seed.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = xxhash_rust::xxh3::xxh3_64_with_seed(bytes, self.0);
    }

    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }

    fn write_u64(&mut self, n: u64) {
        // A multiply-rotate mix: lengths and terminators need no more.
        self.0 = (self.0 ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
    }
}

/// The `BuildHasher` of maps keyed by short byte strings.
pub type KeyHash = BuildHasherDefault<KeyHasher>;
