//! The index's state root: one value that two indexes at the same block can compare.
//!
//! It is a lattice hash (LtHash16, as used by Facebook's LtHash and Solana's accounts hash):
//! every record `(table, key, value)` of the canonical tables is expanded by blake3's XOF to
//! 1024 sixteen-bit lanes, and the accumulator is their lane-wise sum modulo 2^16. Adding a
//! record adds its lanes, removing subtracts them, so the root follows every write (and every
//! unwind) in O(1), and it does not depend on the order records were written in. Unlike a
//! 256-bit sum of hashes, which generalised-birthday attacks break, a 2048-byte lattice hash
//! keeps collisions out of reach. The published root is the blake3 of the accumulator.

use alloy::primitives::B256;
use rustc_hash::FxHashMap;

pub const LANES: usize = 1024;

#[derive(Clone, PartialEq, Eq)]
pub struct StateRoot {
    lanes: Box<[u16; LANES]>,
}

impl std::fmt::Debug for StateRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StateRoot({})", self.digest())
    }
}

impl Default for StateRoot {
    fn default() -> Self {
        Self { lanes: Box::new([0; LANES]) }
    }
}

impl StateRoot {
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != LANES * 2 {
            return None;
        }
        let mut root = Self::default();
        for (lane, chunk) in root.lanes.iter_mut().zip(bytes.chunks_exact(2)) {
            *lane = u16::from_le_bytes([chunk[0], chunk[1]]);
        }
        Some(root)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.lanes.iter().flat_map(|lane| lane.to_le_bytes()).collect()
    }

    pub fn add(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.add_lanes(&Lanes::of(table, key, value));
    }

    pub fn remove(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.remove_lanes(&Lanes::of(table, key, value));
    }

    pub fn add_lanes(&mut self, record: &Lanes) {
        for (lane, r) in self.lanes.iter_mut().zip(record.0.iter()) {
            *lane = lane.wrapping_add(*r);
        }
    }

    pub fn remove_lanes(&mut self, record: &Lanes) {
        for (lane, r) in self.lanes.iter_mut().zip(record.0.iter()) {
            *lane = lane.wrapping_sub(*r);
        }
    }

    /// The published value.
    pub fn digest(&self) -> B256 {
        B256::from(*blake3::hash(&self.to_bytes()).as_bytes())
    }
}

/// A record's lanes: its XOF's output read as little-endian sixteen-bit lanes.
pub struct Lanes([u16; LANES]);

impl Lanes {
    pub fn of(table: &str, key: &[u8], value: &[u8]) -> Box<Self> {
        let mut lanes = Box::new(Self([0; LANES]));
        lanes.fill(table, key, value);
        lanes
    }

    /// Overwrites these lanes with the record's (a cached box reused for a new value).
    pub fn fill(&mut self, table: &str, key: &[u8], value: &[u8]) {
        // the context's key is derived once, not once per record
        static RECORD: std::sync::LazyLock<blake3::Hasher> =
            std::sync::LazyLock::new(|| blake3::Hasher::new_derive_key("agora index state root v1 record"));
        let mut hasher = RECORD.clone();
        hasher.update(&(table.len() as u32).to_le_bytes());
        hasher.update(table.as_bytes());
        hasher.update(&(key.len() as u32).to_le_bytes());
        hasher.update(key);
        hasher.update(value);
        let mut bytes = [0u8; LANES * 2];
        hasher.finalize_xof().fill(&mut bytes);
        for (lane, b) in self.0.iter_mut().zip(bytes.as_chunks::<2>().0) {
            *lane = u16::from_le_bytes(*b);
        }
    }
}

/// Lanes of records that were rewritten, kept by table and key with the value they are the
/// lanes of. A record rewritten batch after batch (the treasury's balance, a busy model's
/// revenue and its recipients' earnings) is removed from the root with the value the previous
/// batch added: taking that value's lanes from here halves what the root costs it. Only the
/// lanes of records that replaced a value are kept (records written once, such as licenses,
/// would crowd the rewritten ones out), in two generations of at most [`LaneCache::GENERATION`]
/// entries each (about 2 KiB an entry): when the newer one fills, the older one is dropped.
pub struct LaneCache {
    newer: Vec<FxHashMap<Vec<u8>, Cached>>,
    older: Vec<FxHashMap<Vec<u8>, Cached>>,
    newer_len: usize,
}

struct Cached {
    value: Vec<u8>,
    lanes: Box<Lanes>,
}

impl Default for LaneCache {
    fn default() -> Self {
        Self::new()
    }
}

impl LaneCache {
    pub const GENERATION: usize = 2048;

    pub fn new() -> Self {
        Self { newer: Self::generation(), older: Self::generation(), newer_len: 0 }
    }

    /// An empty generation: one map per table.
    fn generation() -> Vec<FxHashMap<Vec<u8>, Cached>> {
        crate::store::tables::NAMES.iter().map(|_| FxHashMap::default()).collect()
    }

    /// The lanes of `value` under the `table`-th table's `key`, when kept (and no longer kept:
    /// the caller is replacing the value).
    pub fn take(&mut self, table: usize, key: &[u8], value: &[u8]) -> Option<Box<Lanes>> {
        let cached = match self.newer[table].remove(key) {
            Some(cached) => {
                self.newer_len -= 1;
                cached
            }
            None => self.older[table].remove(key)?,
        };
        (cached.value == value).then_some(cached.lanes)
    }

    pub fn keep(&mut self, table: usize, key: &[u8], value: &[u8], lanes: Box<Lanes>) {
        if self.newer_len >= Self::GENERATION {
            self.older = std::mem::replace(&mut self.newer, Self::generation());
            self.newer_len = 0;
        }
        let cached = Cached { value: value.to_vec(), lanes };
        if self.newer[table].insert(key.to_vec(), cached).is_none() {
            self.newer_len += 1;
        }
        self.older[table].remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_independent_and_reversible() {
        let mut a = StateRoot::default();
        a.add("t", b"1", b"x");
        a.add("t", b"2", b"y");
        let mut b = StateRoot::default();
        b.add("t", b"2", b"y");
        b.add("t", b"1", b"x");
        assert_eq!(a.digest(), b.digest());

        let before = a.clone();
        a.add("t", b"3", b"z");
        assert_ne!(a.digest(), before.digest());
        a.remove("t", b"3", b"z");
        assert_eq!(a, before);
        assert_eq!(StateRoot::from_bytes(&a.to_bytes()).unwrap(), a);
    }

    /// Nodes compare roots across versions: a record's lanes must never change.
    #[test]
    fn a_known_record_has_a_known_root() {
        let mut root = StateRoot::default();
        root.add("licenses", &[1, 2, 3], b"record");
        assert_eq!(
            root.digest().to_string(),
            "0xc8e699384518f0cd8e1676df84653daec040bd51e1edd0291535ba8d3df947ab"
        );
    }

    #[test]
    fn fields_are_framed() {
        let mut a = StateRoot::default();
        a.add("t", b"ab", b"c");
        let mut b = StateRoot::default();
        b.add("t", b"a", b"bc");
        assert_ne!(a.digest(), b.digest(), "key/value boundary matters");
        let mut c = StateRoot::default();
        c.add("u", b"ab", b"c");
        assert_ne!(a.digest(), c.digest(), "table matters");
    }
}
