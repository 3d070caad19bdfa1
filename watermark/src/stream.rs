//! Keyed, seekable bit streams: one bit per tensor element.
//!
//! Each purpose key (owner, partition, license) and tensor (`name`, dtype, shape) give a ChaCha8
//! key through `blake3::derive_key`; bit `i` of the keystream belongs to element `i`. ChaCha is
//! counter based, so any 512-element block is produced on its own: chunks are independent, a
//! CPU thread or a GPU block can make any of them, and every producer gives the same bits.

use chacha20::{
    ChaCha8,
    cipher::{KeyIvInit, StreamCipher, StreamCipherSeek},
};

use crate::format::FloatKind;

const CONTEXT_TENSOR: &str = "agora watermark v1 tensor stream";

/// Elements per processing chunk: a multiple of 512 (one ChaCha block is 512 bits) and of 64 (one
/// `u64` word of bits). Chunk boundaries depend only on element indices, never on thread count.
pub const CHUNK: usize = 1 << 16;
pub const WORDS: usize = CHUNK / 64;

/// The key of one tensor's stream for one purpose key.
#[derive(Clone)]
pub struct TensorStream {
    key: [u8; 32],
}

impl TensorStream {
    pub fn new(purpose: &[u8; 32], name: &str, kind: FloatKind, shape: &[usize]) -> Self {
        let mut material = Vec::with_capacity(64 + name.len() + 8 * shape.len());
        material.extend_from_slice(purpose);
        material.extend_from_slice(&(name.len() as u64).to_le_bytes());
        material.extend_from_slice(name.as_bytes());
        material.extend_from_slice(kind.tag().as_bytes());
        material.extend_from_slice(&(shape.len() as u64).to_le_bytes());
        for dim in shape {
            material.extend_from_slice(&(*dim as u64).to_le_bytes());
        }
        Self { key: blake3::derive_key(CONTEXT_TENSOR, &material) }
    }

    /// The ChaCha8 key as eight little-endian words, for a device that makes the same stream.
    pub fn key_words(&self) -> [u32; 8] {
        let mut words = [0u32; 8];
        for (word, bytes) in words.iter_mut().zip(self.key.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        words
    }

    /// Fills `words` with the bits of elements `first..first + 64 * words.len()`;
    /// `first` must be a multiple of 512.
    pub fn fill(&self, first: usize, words: &mut [u64]) {
        debug_assert_eq!(first % 512, 0);
        let mut cipher = ChaCha8::new(&self.key.into(), &[0u8; 12].into());
        cipher.seek((first / 8) as u64);
        words.fill(0);
        let bytes: &mut [u8] = bytemuck_words(words);
        cipher.apply_keystream(bytes);
        // Bit i of the stream is bit (i % 8) of byte i / 8: little-endian words keep that order.
        for word in words.iter_mut() {
            *word = u64::from_le(*word);
        }
    }
}

impl TensorStream {
    /// Fills `bytes` with one keystream byte per element, from element `first` on (any
    /// position: the stream seeks to byte `first`).
    pub fn fill_bytes(&self, first: usize, bytes: &mut [u8]) {
        let mut cipher = ChaCha8::new(&self.key.into(), &[0u8; 12].into());
        cipher.seek(first as u64);
        bytes.fill(0);
        cipher.apply_keystream(bytes);
    }
}

fn bytemuck_words(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: u64 has no padding and every byte pattern is a valid u64; the slice covers exactly
    // the words' memory and borrows them mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_independent_and_seekable() {
        let stream = TensorStream::new(&[3; 32], "w", FloatKind::Bf16, &[512, 512]);
        let mut whole = vec![0u64; 3 * WORDS];
        stream.fill(0, &mut whole);
        let mut middle = vec![0u64; WORDS];
        stream.fill(CHUNK, &mut middle);
        assert_eq!(middle, whole[WORDS..2 * WORDS]);
        let mut small = vec![0u64; 8];
        stream.fill(512 * 7, &mut small);
        assert_eq!(small, whole[56..64]);
        let ones: u32 = whole.iter().map(|w| w.count_ones()).sum();
        let bits = (whole.len() * 64) as f64;
        assert!((f64::from(ones) / bits - 0.5).abs() < 0.01, "balanced bits");
    }

    #[test]
    fn tensor_identity_changes_the_stream() {
        let a = TensorStream::new(&[3; 32], "w", FloatKind::Bf16, &[512, 512]);
        let others = [
            TensorStream::new(&[4; 32], "w", FloatKind::Bf16, &[512, 512]),
            TensorStream::new(&[3; 32], "v", FloatKind::Bf16, &[512, 512]),
            TensorStream::new(&[3; 32], "w", FloatKind::F32, &[512, 512]),
            TensorStream::new(&[3; 32], "w", FloatKind::Bf16, &[256, 1024]),
        ];
        let mut first = [0u64; 8];
        a.fill(0, &mut first);
        for other in others {
            let mut words = [0u64; 8];
            other.fill(0, &mut words);
            assert_ne!(words, first);
        }
    }
}
