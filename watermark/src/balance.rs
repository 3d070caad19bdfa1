//! Steps that keep the histogram of bit patterns: Metropolis acceptance per code.
//!
//! A ±1 step on every weight smooths the histogram of the weights' codes: mass moves from
//! fuller codes to emptier neighbours. That shows wherever neighbouring codes are unequally
//! filled: across every binade edge (the codes above an edge are twice as wide, and a binade's
//! first code 1.5 times when the weights were rounded from higher precision) and wherever
//! rounding left a pattern (ties to even make even mantissas commoner). An attacker with a
//! histogram of the low bits would see the mark there.
//!
//! So a step from code `s` to code `t` is taken with probability `min(1, h(t) / h(s))`, where
//! `h` counts the codes of the original tensor, drawn on a keyed byte per weight. That is the
//! Metropolis rule for the symmetric ±1 proposal: the flows between every pair of neighbouring
//! codes balance, so the expected histogram of the marked tensor is exactly the original's.
//! Steps not taken leave their weight unchanged (it carries no mark); for smooth weights that
//! is under 1% of them.

use rayon::prelude::*;

use crate::{format::FloatKind, mark};

pub(crate) const PSEUDO_COUNT: u64 = 48;

/// Entries of the largest table (2 × 2¹⁶ codes). Every table is held at this size, so a lookup
/// masked to it needs no bounds check and the step loop can use vector gathers.
pub(crate) const TABLE: usize = 2 << 16;

/// Acceptances out of 256 for each code and direction of one tensor.
pub(crate) struct Acceptance {
    shift: u32,
    mask: u32,
    /// At `2 * code + up`, zeros past the last code; 32-bit entries so the lookups can be
    /// vector gathers.
    table: Box<[u32; TABLE]>,
}

impl Acceptance {
    /// Counts the codes of the original tensor (`bytes`, elements of `kind`).
    pub fn of(kind: FloatKind, bytes: &[u8]) -> Self {
        // the code is the bit pattern at bf16-equivalent precision
        let shift = Self::code_shift(kind);
        let codes = Self::codes(kind);
        let size = kind.size();
        // Four interleaved counters per code: weights cluster in a few codes, and one counter
        // would make each increment wait for the previous one to the same code.
        let counters = bytes
            .par_chunks(size * (1 << 16))
            .fold(
                || vec![0u32; 4 * codes],
                |mut counts, chunk| {
                    match size {
                        2 => count_codes::<2>(chunk, shift, codes, &mut counts),
                        _ => count_codes::<4>(chunk, shift, codes, &mut counts),
                    }
                    counts
                },
            )
            .reduce(
                || vec![0u32; 4 * codes],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        let histogram: Vec<u32> =
            (0..codes).map(|code| (0..4).map(|lane| counters[lane * codes + code]).sum()).collect();
        Self::from_histogram(kind, &histogram)
    }

    /// The code of an element is its bit pattern shifted right by this.
    pub fn code_shift(kind: FloatKind) -> u32 {
        match kind {
            FloatKind::Bf16 => 0,
            FloatKind::F16 => 3,
            FloatKind::F32 => 16,
        }
    }

    /// The table for a tensor whose codes were counted elsewhere (on a device).
    pub fn from_histogram(kind: FloatKind, histogram: &[u32]) -> Self {
        let shift = Self::code_shift(kind);
        let codes = histogram.len();
        let target = |code: u32, up: bool| -> u32 {
            let bits = code << shift;
            let moved = match kind {
                FloatKind::Bf16 => u32::from(mark::step_bf16(bits as u16, up).moved),
                FloatKind::F16 => u32::from(mark::step_f16(bits as u16, up).moved),
                FloatKind::F32 => mark::step_f32(bits, up).moved,
            };
            (moved >> shift) & (codes as u32 - 1)
        };
        // a pseudo-count keeps sampling noise in sparse codes from rejecting steps; dense codes,
        // the only ones whose counts an attacker could tell apart, keep their exact ratios
        let count = |code: u32| u64::from(histogram[code as usize]) + PSEUDO_COUNT;
        let mut table: Vec<u32> = (0..codes as u32)
            .flat_map(|code| {
                let source = count(code);
                [false, true]
                    .map(|up| ((256 * count(target(code, up)) + source / 2) / source).min(256) as u32)
            })
            .collect();
        table.resize(TABLE, 0);
        let table = table.into_boxed_slice().try_into().expect("TABLE entries");
        Self { shift, mask: codes as u32 - 1, table }
    }

    /// Distinct codes of `kind`.
    pub fn codes(kind: FloatKind) -> usize {
        match kind {
            FloatKind::F16 => 1 << 13,
            FloatKind::Bf16 | FloatKind::F32 => 1 << 16,
        }
    }

    /// The table, at `2 * code + up`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn table(&self) -> &[u32] {
        &self.table[..2 * (self.mask as usize + 1)]
    }

    /// The whole table when its index is `2 * bits + up` (bf16: every bit pattern is a code),
    /// for the vector gathers of the bf16 step loop.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub fn bf16_table(&self) -> Option<&[u32; TABLE]> {
        (self.shift == 0 && self.mask == 0xFFFF).then_some(&*self.table)
    }

    /// The acceptance (of 256) of stepping the element with bit pattern `bits` up or down.
    #[inline(always)]
    pub fn get(&self, bits: u32, up: bool) -> u32 {
        self.table[((bits >> self.shift & self.mask) << 1 | u32::from(up)) as usize & (TABLE - 1)]
    }
}

/// Adds the codes of `chunk` (elements of `SIZE` bytes) to four interleaved counter arrays of
/// `codes` entries each: element i to array i mod 4.
#[inline(always)]
fn count_codes<const SIZE: usize>(chunk: &[u8], shift: u32, codes: usize, counts: &mut [u32]) {
    let code = |element: &[u8]| -> usize {
        let bits = match SIZE {
            2 => u32::from(u16::from_le_bytes([element[0], element[1]])),
            _ => u32::from_le_bytes([element[0], element[1], element[2], element[3]]),
        };
        (bits >> shift) as usize
    };
    let (a, rest) = counts.split_at_mut(codes);
    let (b, rest) = rest.split_at_mut(codes);
    let (c, d) = rest.split_at_mut(codes);
    let groups = chunk.chunks_exact(4 * SIZE);
    let tail = groups.remainder();
    for group in groups {
        a[code(&group[..SIZE])] += 1;
        b[code(&group[SIZE..2 * SIZE])] += 1;
        c[code(&group[2 * SIZE..3 * SIZE])] += 1;
        d[code(&group[3 * SIZE..])] += 1;
    }
    for element in tail.chunks_exact(SIZE) {
        a[code(element)] += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(v: f32) -> u32 {
        u32::from(half::bf16::from_f32(v).to_bits())
    }

    #[test]
    fn steps_into_emptier_codes_are_thinned_by_the_fill_ratio() {
        // 1,000 weights at 1.0, 500 one code above, 2,000 one code below
        let one = bf16(1.0);
        let mut bytes = Vec::new();
        for (code, n) in [(one, 1000), (one + 1, 500), (one - 1, 2000)] {
            for _ in 0..n {
                bytes.extend_from_slice(&(code as u16).to_le_bytes());
            }
        }
        let acceptance = Acceptance::of(FloatKind::Bf16, &bytes);
        let ratio = |to: u64, from: u64| {
            ((256 * (to + PSEUDO_COUNT) + (from + PSEUDO_COUNT) / 2) / (from + PSEUDO_COUNT)) as u32
        };
        assert_eq!(acceptance.get(one, true), ratio(500, 1000));
        assert_eq!(acceptance.get(one, false), 256, "into a fuller code: always");
        assert_eq!(acceptance.get(one + 1, false), 256);
        assert_eq!(acceptance.get(one - 1, true), ratio(1000, 2000));
        // an empty code next to an empty code: always
        assert_eq!(acceptance.get(bf16(3.0), true), 256);
        // negative values step up in value by shrinking in magnitude
        let minus = bf16(-1.0);
        assert_eq!(acceptance.get(minus, false), ratio(0, 0));
    }
}
