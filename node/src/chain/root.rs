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
        let record = record_bytes(table, key, value);
        for (lane, r) in self.lanes.iter_mut().zip(record.as_chunks::<2>().0) {
            *lane = lane.wrapping_add(u16::from_le_bytes(*r));
        }
    }

    pub fn remove(&mut self, table: &str, key: &[u8], value: &[u8]) {
        let record = record_bytes(table, key, value);
        for (lane, r) in self.lanes.iter_mut().zip(record.as_chunks::<2>().0) {
            *lane = lane.wrapping_sub(u16::from_le_bytes(*r));
        }
    }

    /// The published value.
    pub fn digest(&self) -> B256 {
        B256::from(*blake3::hash(&self.to_bytes()).as_bytes())
    }
}

/// A record's lanes, as the little-endian bytes the XOF gives (added in one pass, no copy).
fn record_bytes(table: &str, key: &[u8], value: &[u8]) -> [u8; LANES * 2] {
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
    bytes
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
