//! Embedding: a ±1 ULP step on every eligible weight, written file to file in one pass.
//!
//! bf16 weights step their bit pattern by exactly one unit in the last place, up or down in
//! value as the key bit says (down instead of up at the largest finite value, up instead of
//! down at the smallest normal one). f16 and f32 weights move by one bf16-equivalent ULP
//! (`2^(e-7)`), rounded to nearest. Zeros, subnormals, NaN and infinities never change. The
//! output is the input with some byte ranges rewritten: header and ineligible bytes identical,
//! offsets unchanged, hashed with blake3 while it is written.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

use half::f16;
use rayon::prelude::*;

use crate::{
    LicenseKey, ModelKey, Options, WatermarkError,
    balance::Acceptance,
    format::{FloatKind, ModelFile, TensorEntry},
    stream::{CHUNK, TensorStream, WORDS},
};

/// A model needs this many eligible weights: the owner mark keeps T ≈ 0.026·√(n/2) after 4-bit
/// quantisation (measured), which at this size is 9.5, with room above the owner threshold of
/// 6.65 for the steps the histogram balance holds back.
pub const MIN_ELIGIBLE_WEIGHTS: usize = 262_144;

/// Chunks per write: 64 chunks = 4 Mi elements, at most 16 MiB of output buffered.
const BLOCK_CHUNKS: usize = 64;

/// What an embedding did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EmbedReport {
    /// blake3 of the written file, hex.
    pub output_blake3: String,
    pub bytes: u64,
    pub marked_tensors: usize,
    pub eligible_weights: u64,
    /// Weights changed by one step (half A with the owner mark, half B with the fingerprint).
    pub owner_weights: u64,
    pub license_weights: u64,
}

/// The bits that drive one chunk: which half each weight is in, and its direction.
pub(crate) struct ChunkBits {
    pub partition: Vec<u64>,
    pub owner: Vec<u64>,
    pub license: Vec<u64>,
    /// One uniform byte per element.
    pub coin: Vec<u8>,
}

impl ChunkBits {
    pub fn new() -> Self {
        Self {
            partition: vec![0; WORDS],
            owner: vec![0; WORDS],
            license: vec![0; WORDS],
            coin: vec![0; CHUNK],
        }
    }
}

/// The streams of one tensor.
pub(crate) struct TensorKeys {
    pub partition: TensorStream,
    pub owner: TensorStream,
    pub license: Option<TensorStream>,
    pub coin: TensorStream,
}

impl TensorKeys {
    pub fn new(
        model: &ModelKey,
        license: Option<&LicenseKey>,
        tensor: &TensorEntry,
        kind: FloatKind,
    ) -> Self {
        Self::named(model, license, &tensor.name, kind, &tensor.shape)
    }

    /// The streams of the tensor called `name` with `shape`.
    pub fn named(
        model: &ModelKey,
        license: Option<&LicenseKey>,
        name: &str,
        kind: FloatKind,
        shape: &[usize],
    ) -> Self {
        let stream = |key: &[u8; 32]| TensorStream::new(key, name, kind, shape);
        Self {
            partition: stream(model.partition().expose()),
            owner: stream(model.owner().expose()),
            license: license.map(|key| stream(key.expose())),
            coin: stream(model.coin().expose()),
        }
    }
}

/// Writes a marked copy of `original` to `out`: the owner mark on half A and, with a license
/// key, that license's fingerprint on half B. Always embed from the original: marking a marked
/// copy doubles the step. Nothing is written on error (the output appears by rename).
pub fn embed(
    original: &Path,
    out: &Path,
    model: &ModelKey,
    license: Option<&LicenseKey>,
    options: &Options,
) -> Result<EmbedReport, WatermarkError> {
    let partial = partial_path(out);
    let result =
        File::create(&partial).map_err(|source| WatermarkError::io(&partial, source)).and_then(|mut file| {
            let report = embed_to(original, &mut file, &partial, model, license, options)?;
            file.sync_all().map_err(|source| WatermarkError::io(&partial, source))?;
            Ok(report)
        });
    match result {
        Ok(report) => {
            std::fs::rename(&partial, out).map_err(|source| WatermarkError::io(out, source))?;
            Ok(report)
        }
        Err(error) => {
            let _ = std::fs::remove_file(&partial);
            Err(error)
        }
    }
}

/// [`embed`] into any writer, in file order (header first), so the copy can be sent or stored
/// while it is made. On error part of the copy may have been written: the caller discards it.
pub fn embed_into(
    original: &Path,
    out: &mut (dyn Write + Send),
    model: &ModelKey,
    license: Option<&LicenseKey>,
    options: &Options,
) -> Result<EmbedReport, WatermarkError> {
    embed_to(original, out, Path::new("the marked copy"), model, license, options)
}

fn embed_to(
    original: &Path,
    out: &mut (dyn Write + Send),
    name: &Path,
    model: &ModelKey,
    license: Option<&LicenseKey>,
    options: &Options,
) -> Result<EmbedReport, WatermarkError> {
    let file = ModelFile::open(original)?;
    let eligible = file.eligible_elements();
    if eligible < MIN_ELIGIBLE_WEIGHTS {
        return Err(WatermarkError::TooFewWeights {
            path: original.to_owned(),
            eligible,
            needed: MIN_ELIGIBLE_WEIGHTS,
        });
    }
    options.run(|| write_marked(&file, original, out, name, model, license, options)).and_then(|r| r)
}

/// Marks one tensor held in memory, `src` into `dst` (same length), exactly as [`embed`] marks
/// it in a file; for tensors already resident (serving) and for benchmarks. Returns the weights
/// changed in half A and half B.
pub fn embed_tensor(
    model: &ModelKey,
    license: Option<&LicenseKey>,
    tensor: &TensorEntry,
    src: &[u8],
    dst: &mut [u8],
) -> (u64, u64) {
    let Some(kind) = tensor.kind else {
        dst.copy_from_slice(src);
        return (0, 0);
    };
    let keys = TensorKeys::new(model, license, tensor, kind);
    mark_range(kind, &keys, &Acceptance::of(kind, src), 0, src, dst)
}

/// Marks the elements from `first` on, chunk by chunk in parallel.
pub(crate) fn mark_range(
    kind: FloatKind,
    keys: &TensorKeys,
    acceptance: &Acceptance,
    first: usize,
    src: &[u8],
    dst: &mut [u8],
) -> (u64, u64) {
    src.par_chunks(CHUNK * kind.size())
        .zip(dst.par_chunks_mut(CHUNK * kind.size()))
        .enumerate()
        .map_init(ChunkBits::new, |bits, (i, (src, dst))| {
            mark_chunk(kind, keys, acceptance, first + i * CHUNK, src, dst, bits)
        })
        .reduce(|| (0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn partial_path(out: &Path) -> PathBuf {
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn write_marked(
    file: &ModelFile,
    original: &Path,
    output: &mut (dyn Write + Send),
    path: &Path,
    model: &ModelKey,
    license: Option<&LicenseKey>,
    options: &Options,
) -> Result<EmbedReport, WatermarkError> {
    let ready = |tensor: &TensorEntry| match &options.source_ready {
        Some(wait) => wait(tensor.end as u64).map_err(|source| WatermarkError::io(original, source)),
        None => Ok(()),
    };
    let mut hasher = blake3::Hasher::new();
    let total = file.map.len() as u64;
    let mut done = 0u64;
    let mut write = |bytes: &[u8], hasher: &mut blake3::Hasher| -> Result<(), WatermarkError> {
        output.write_all(bytes).map_err(|source| WatermarkError::io(path, source))?;
        if rayon::current_num_threads() > 1 && bytes.len() >= 1 << 20 {
            hasher.update_rayon(bytes);
        } else {
            hasher.update(bytes);
        }
        done += bytes.len() as u64;
        if let Some(progress) = &options.progress {
            progress(done, total);
        }
        Ok(())
    };
    let mut report = EmbedReport {
        output_blake3: String::new(),
        bytes: total,
        marked_tensors: 0,
        eligible_weights: 0,
        owner_weights: 0,
        license_weights: 0,
    };
    write(&file.map[..file.header_len], &mut hasher)?;
    let mut buffer = Vec::new();
    for tensor in &file.tensors {
        ready(tensor)?;
        let source = file.bytes(tensor);
        let Some(kind) = tensor.kind else {
            for piece in source.chunks(BLOCK_CHUNKS * CHUNK * 4) {
                write(piece, &mut hasher)?;
            }
            continue;
        };
        report.marked_tensors += 1;
        report.eligible_weights += tensor.elements() as u64;
        let keys = TensorKeys::new(model, license, tensor, kind);
        let acceptance = Acceptance::of(kind, source);
        let block_bytes = BLOCK_CHUNKS * CHUNK * kind.size();
        for (block, input) in source.chunks(block_bytes).enumerate() {
            buffer.resize(input.len(), 0);
            let counts =
                mark_range(kind, &keys, &acceptance, block * BLOCK_CHUNKS * CHUNK, input, &mut buffer);
            report.owner_weights += counts.0;
            report.license_weights += counts.1;
            write(&buffer, &mut hasher)?;
        }
    }
    output.flush().map_err(|source| WatermarkError::io(path, source))?;
    report.output_blake3 = hasher.finalize().to_hex().to_string();
    Ok(report)
}

dispatch! {
    /// Marks one chunk (`first` is its first element); returns the weights changed in half A and B.
    fn mark_chunk(
        kind: FloatKind,
        keys: &TensorKeys,
        acceptance: &Acceptance,
        first: usize,
        src: &[u8],
        dst: &mut [u8],
        bits: &mut ChunkBits,
    ) -> (u64, u64) => mark_chunk_body
}

#[inline(always)]
fn mark_chunk_body(
    kind: FloatKind,
    keys: &TensorKeys,
    acceptance: &Acceptance,
    first: usize,
    src: &[u8],
    dst: &mut [u8],
    bits: &mut ChunkBits,
) -> (u64, u64) {
    let elements = src.len() / kind.size();
    let words = elements.div_ceil(64);
    keys.partition.fill(first, &mut bits.partition[..words]);
    keys.owner.fill(first, &mut bits.owner[..words]);
    keys.coin.fill_bytes(first, &mut bits.coin[..elements]);
    let with_license = match &keys.license {
        Some(stream) => {
            stream.fill(first, &mut bits.license[..words]);
            true
        }
        None => false,
    };
    #[cfg(target_arch = "x86_64")]
    let bf16_table = acceptance.bf16_table().filter(|_| std::arch::is_x86_feature_detected!("avx2"));
    let mut changed = (0u64, 0u64);
    for w in 0..words {
        let part = bits.partition[w];
        let direction = (part & bits.owner[w]) | (!part & bits.license[w]);
        let selected = if with_license { u64::MAX } else { part };
        let size = kind.size();
        let range = w * 64 * size..(w * 64 + (elements - w * 64).min(64)) * size;
        let (src, dst) = (&src[range.clone()], &mut dst[range]);
        let coins = &bits.coin[w * 64..(w * 64 + 64).min(elements)];
        let lanes = Lanes { direction, selected, part, coins, acceptance };
        let (a, b) = match kind {
            #[cfg(target_arch = "x86_64")]
            FloatKind::Bf16 if bf16_table.is_some() && src.len() == 128 => {
                // SAFETY: the CPU has AVX2 (checked above).
                unsafe { step_word_bf16_avx2(src, dst, lanes, bf16_table.expect("checked")) }
            }
            FloatKind::Bf16 => step_words(src, dst, lanes, step_bf16),
            FloatKind::F16 => step_words(src, dst, lanes, step_f16),
            FloatKind::F32 => step_words(src, dst, lanes, step_f32),
        };
        changed.0 += a;
        changed.1 += b;
    }
    changed
}

/// An element's bit pattern (little-endian in the file).
trait Bits: Copy + Default {
    fn decoded(self) -> Self;
    fn encoded(self) -> Self;
}

macro_rules! little_endian_bits {
    ($($int:ty),*) => {$(
        impl Bits for $int {
            #[inline(always)]
            fn decoded(self) -> Self {
                <$int>::from_le(self)
            }
            #[inline(always)]
            fn encoded(self) -> Self {
                self.to_le()
            }
        }
    )*};
}

little_endian_bits!(u16, u32);

/// The bits of 64 elements; bit j is element j's.
#[derive(Clone, Copy)]
struct Lanes<'a> {
    /// 1 = step up in value.
    direction: u64,
    /// Whether the element is marked at all (half A only, without a license).
    selected: u64,
    /// 1 = half A.
    part: u64,
    /// One uniform byte per element: a step is taken when its byte is below the step's
    /// acceptance (of 256).
    coins: &'a [u8],
    acceptance: &'a Acceptance,
}

/// Steps up to 64 elements, each taken with its Metropolis acceptance (see [`crate::balance`])
/// so the marked codes keep the original's histogram. The elements are copied into an aligned
/// array and the bits spread to lanes, so the loop over 64 lanes has no branches. Returns the
/// elements changed in half A and B.
#[inline(always)]
fn step_words<B: Bits + Into<u32>>(
    src: &[u8],
    dst: &mut [u8],
    lanes: Lanes<'_>,
    step: impl Fn(B, bool) -> Step<B>,
) -> (u64, u64) {
    let size = std::mem::size_of::<B>();
    let n = (src.len() / size).min(64);
    let mut values = [B::default(); 64];
    let mut coins = [0u8; 64];
    coins[..n].copy_from_slice(&lanes.coins[..n]);
    // SAFETY: `values` holds 64 plain integers and n ≤ 64 of them are overwritten with n * size
    // bytes of `src` (which has at least that many); any bytes are a valid integer.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), values.as_mut_ptr().cast::<u8>(), n * size) };
    let (mut a, mut b) = (0u32, 0u32);
    for (j, value) in values.iter_mut().enumerate() {
        let bits = value.decoded();
        let up = lanes.direction >> j & 1 == 1;
        let step = step(bits, up);
        let accepted = u32::from(coins[j]) < lanes.acceptance.get(bits.into(), up);
        let take = step.markable & accepted & (lanes.selected >> j & 1 == 1);
        let in_a = lanes.part >> j & 1 == 1;
        a += u32::from(take & in_a);
        b += u32::from(take & !in_a);
        *value = (if take { step.moved } else { bits }).encoded();
    }
    // SAFETY: as above, in the other direction; `dst` has the same length as `src`.
    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr().cast::<u8>(), dst.as_mut_ptr(), n * size) };
    // lanes past n held zeros, which are never marked
    (a.into(), b.into())
}

/// [`step_words`] with [`step_bf16`] on a whole word of 64 bf16 elements, eight lanes at a time,
/// the acceptances fetched with vector gathers: the same bits out, as a test checks.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn step_word_bf16_avx2(
    src: &[u8],
    dst: &mut [u8],
    lanes: Lanes<'_>,
    table: &[u32; crate::balance::TABLE],
) -> (u64, u64) {
    use std::arch::x86_64::*;
    assert!(src.len() == 128 && dst.len() == 128 && lanes.coins.len() == 64);
    let powers = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    // the low 8 bits of `mask` as eight all-ones or all-zeros lanes
    let spread = |mask: u64| {
        let lanes = _mm256_and_si256(_mm256_set1_epi32((mask & 0xFF) as i32), powers);
        _mm256_cmpeq_epi32(lanes, powers)
    };
    let one = _mm256_set1_epi32(1);
    let (mut a, mut b) = (0u32, 0u32);
    for g in 0..8 {
        // SAFETY: `src` holds 128 bytes and `coins` 64; these 16 and 8 are inside.
        let (raw, coins) = unsafe {
            (
                _mm_loadu_si128(src.as_ptr().add(16 * g).cast()),
                _mm_loadl_epi64(lanes.coins.as_ptr().add(8 * g).cast()),
            )
        };
        let bits = _mm256_cvtepu16_epi32(raw);
        let coins = _mm256_cvtepu8_epi32(coins);
        let up = _mm256_and_si256(spread(lanes.direction >> (8 * g)), one);
        let selected = spread(lanes.selected >> (8 * g));
        let in_a = spread(lanes.part >> (8 * g));
        // step_bf16, lane-wise
        let magnitude = _mm256_and_si256(bits, _mm256_set1_epi32(0x7FFF));
        let exponent = _mm256_srli_epi32::<7>(magnitude);
        let unmarkable = _mm256_or_si256(
            _mm256_cmpeq_epi32(exponent, _mm256_setzero_si256()),
            _mm256_cmpeq_epi32(exponent, _mm256_set1_epi32(0xFF)),
        );
        let grow = _mm256_xor_si256(up, _mm256_srli_epi32::<15>(bits));
        let largest = _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x7F7F));
        let smallest = _mm256_cmpeq_epi32(magnitude, _mm256_set1_epi32(0x0080));
        let grow = _mm256_or_si256(
            _mm256_andnot_si256(_mm256_or_si256(largest, smallest), grow),
            _mm256_and_si256(smallest, one),
        );
        let stepped = _mm256_sub_epi32(_mm256_add_epi32(magnitude, _mm256_slli_epi32::<1>(grow)), one);
        let moved = _mm256_and_si256(
            _mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x8000)), stepped),
            _mm256_set1_epi32(0xFFFF),
        );
        // SAFETY: the indices are 2 * bits + up < 2 * 2^16 = the table's length.
        let acceptance = unsafe {
            _mm256_i32gather_epi32::<4>(
                table.as_ptr().cast(),
                _mm256_or_si256(_mm256_slli_epi32::<1>(bits), up),
            )
        };
        let take = _mm256_andnot_si256(
            unmarkable,
            _mm256_and_si256(_mm256_cmpgt_epi32(acceptance, coins), selected),
        );
        let out = _mm256_blendv_epi8(bits, moved, take);
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(out, out));
        // SAFETY: `dst` holds 128 bytes; these 16 are inside.
        unsafe { _mm_storeu_si128(dst.as_mut_ptr().add(16 * g).cast(), _mm256_castsi256_si128(packed)) };
        let take = _mm256_movemask_ps(_mm256_castsi256_ps(take)) as u32;
        let in_a = _mm256_movemask_ps(_mm256_castsi256_ps(in_a)) as u32;
        a += (take & in_a).count_ones();
        b += (take & !in_a).count_ones();
    }
    (a.into(), b.into())
}

/// One element's step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Step<B> {
    pub moved: B,
    /// Zero, subnormal, NaN and infinite values are never marked.
    pub markable: bool,
}

/// One bf16 step: the bit pattern moves by one code.
#[inline(always)]
pub(crate) fn step_bf16(bits: u16, up: bool) -> Step<u16> {
    let magnitude = bits & 0x7FFF;
    let exponent = magnitude >> 7;
    let markable = (exponent != 0) & (exponent != 0xFF);
    let negative = bits >> 15;
    let grow = u16::from(up) ^ negative;
    // never to infinity from the largest finite value, never to a subnormal from the smallest
    // normal one: step the other way there
    let grow = if magnitude == 0x7F7F {
        0
    } else if magnitude == 0x0080 {
        1
    } else {
        grow
    };
    let moved = (bits & 0x8000) | magnitude.wrapping_add(grow << 1).wrapping_sub(1);
    Step { moved, markable }
}

/// f16 and f32 move by a bf16-equivalent ULP; their finer codes make no binade edge.
pub(crate) fn step_f16(bits: u16, up: bool) -> Step<u16> {
    let exponent = (bits >> 10) & 0x1F;
    if exponent == 0 || exponent == 0x1F {
        return Step { moved: bits, markable: false };
    }
    let value = f16::from_bits(bits).to_f32();
    let ulp = bf16_ulp(value);
    let moved = f16::from_f32(if up { value + ulp } else { value - ulp });
    let moved =
        if moved.is_infinite() { f16::from_f32(if up { value - ulp } else { value + ulp }) } else { moved };
    Step { moved: moved.to_bits(), markable: true }
}

#[inline(always)]
pub(crate) fn step_f32(bits: u32, up: bool) -> Step<u32> {
    let exponent = (bits >> 23) & 0xFF;
    let markable = (8..=253).contains(&exponent);
    let value = f32::from_bits(bits);
    let ulp = f32::from_bits(exponent.wrapping_sub(7) << 23);
    let moved = if up { value + ulp } else { value - ulp };
    Step { moved: moved.to_bits(), markable }
}

/// One bf16 unit in the last place at `value`'s binade: `2^(e - 7)`.
fn bf16_ulp(value: f32) -> f32 {
    let exponent = (value.to_bits() >> 23) & 0xFF;
    f32::from_bits(exponent.saturating_sub(7).max(1) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16(v: f32) -> u16 {
        half::bf16::from_f32(v).to_bits()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_vector_bf16_step_matches_the_scalar_one_bit_for_bit() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            return;
        }
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // weights around a few binades, plus every edge the step has
        let edges = [
            0x0000, 0x8000, 0x0001, 0x807F, 0x0080, 0x8080, 0x0081, 0x7F7F, 0xFF7F, 0x7F80, 0xFF80, 0x7FC0,
            0xFFFF,
        ];
        let mut weights = Vec::new();
        for i in 0..64 * 400 {
            let r = next();
            let w = if i % 7 == 0 {
                edges[(r % edges.len() as u64) as usize]
            } else {
                bf16(((r % 2001) as f32 - 1000.0) / 997.0)
            };
            weights.push(w);
        }
        let bytes: Vec<u8> = weights.iter().flat_map(|w| w.to_le_bytes()).collect();
        let acceptance = Acceptance::of(FloatKind::Bf16, &bytes);
        let table = acceptance.bf16_table().unwrap();
        let coins: Vec<u8> = (0..weights.len()).map(|_| next() as u8).collect();
        let mut taken = 0;
        for (w, (src, coins)) in bytes.chunks(128).zip(coins.chunks(64)).enumerate() {
            let lanes = Lanes {
                direction: next(),
                selected: if w % 3 == 0 { u64::MAX } else { next() },
                part: next(),
                coins,
                acceptance: &acceptance,
            };
            let (mut scalar, mut vector) = ([0u8; 128], [0u8; 128]);
            let expected = step_words(src, &mut scalar, lanes, step_bf16);
            // SAFETY: the CPU has AVX2 (checked above).
            let got = unsafe { step_word_bf16_avx2(src, &mut vector, lanes, table) };
            assert_eq!((got, vector), (expected, scalar), "word {w}");
            taken += expected.0 + expected.1;
        }
        assert!(taken > 64 * 400 / 4, "the test must step many weights, stepped {taken}");
    }

    #[test]
    fn bf16_steps_are_one_ulp_in_value() {
        let step = |moved| Step { moved, markable: true };
        let one = bf16(1.0);
        assert_eq!(step_bf16(one, true), step(one + 1));
        assert_eq!(step_bf16(one, false), step(one - 1));
        let minus = bf16(-1.0);
        // up in value is down in magnitude for negatives
        assert_eq!(step_bf16(minus, true), step(minus - 1));
        assert_eq!(step_bf16(minus, false), step(minus + 1));
        assert_eq!(step_bf16(0x7F7F, true), step(0x7F7E), "never to infinity");
        assert_eq!(step_bf16(0x0080, false), step(0x0081), "never to a subnormal");
        for never in [0x0000, 0x8000, 0x0001, 0x7F80, 0xFF80, 0x7FC0] {
            assert!(!step_bf16(never, true).markable);
            assert!(!step_bf16(never, false).markable);
        }
    }

    #[test]
    fn wider_floats_step_by_a_bf16_ulp() {
        let up = f32::from_bits(step_f32(1.0f32.to_bits(), true).moved);
        assert_eq!(up, 1.0 + 1.0 / 128.0);
        let down = f32::from_bits(step_f32((-3.0f32).to_bits(), true).moved);
        assert_eq!(down, -3.0 + 2.0 / 128.0);
        assert!(!step_f32(0, true).markable);
        assert!(!step_f32(f32::INFINITY.to_bits(), true).markable);
        let h = f16::from_f32(0.5).to_bits();
        assert_eq!(f16::from_bits(step_f16(h, false).moved).to_f32(), 0.5 - 0.5 / 128.0);
        let max = f16::MAX.to_bits();
        assert!(f16::from_bits(step_f16(max, true).moved).to_f32() < f16::MAX.to_f32(), "never to infinity");
    }
}
