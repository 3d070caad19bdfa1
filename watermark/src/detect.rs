//! Detection: owner verification (with or without the original) and license tracing.
//!
//! Non-blind detection works on the residual `r = (w' - w0) / ulp(w0)` of each weight of the
//! relevant half, in bf16-equivalent ULPs. Four statistics are computed in one pass, each of the
//! form `z = Σ s·x / sqrt(Σ x²)` for per-weight values `x` that do not depend on the key:
//! - `correlation`: x = r in quarter ULPs, clipped to ±127 (±31.75 ULP);
//! - `ulp_matched`: x = r rounded to a whole ULP, clipped to ±1;
//! - `erasure_aware`: `correlation` without the weights an attacker set to zero;
//! - `sign_test`: x = sign(r), zeroed weights left out.
//!
//! For a key independent of the file, the `s` are independent fair signs whatever the `x` are,
//! so by Hoeffding `P(z ≥ t) ≤ exp(-t²/2)` for any weight distribution; the combined
//! `T = max z` has `p ≤ 5·exp(-T²/2)` (Bonferroni over the four and a fifth,
//! `low_rank_removed`: `erasure_aware` on the residual without a fine-tune's low-rank update,
//! [`crate::lowrank`], computed only when the four fall short). The owner claim needs
//! `p ≤ 1e-9` (`T ≥ 6.68`); a license accusation among `L` licenses needs `p ≤ 1e-9 / L`.
//!
//! The `x` are small integers, kept as bit planes, so one key costs a few popcounts per 64
//! weights and every sum is an exact integer: results never depend on the thread count.
//! Blind detection (no original) uses `T = Σ s·w' / sqrt(Σ w'²)` on half A, summed in 16-lane
//! f32 groups per chunk and in f64 across chunks in chunk order.

use std::path::Path;

use rayon::prelude::*;
use serde::Serialize;

use crate::{
    ModelKey, Options, WatermarkError,
    align::{self, Alignment},
    format::{FloatKind, ModelFile, TensorEntry},
    mark::TensorKeys,
    stream::{CHUNK, TensorStream, WORDS},
};

/// The false-positive rate of every verdict.
pub const ALPHA: f64 = 1e-9;
/// Four in one pass, and `low_rank_removed` (see [`crate::lowrank`]) when they fall short.
const NON_BLIND_STATISTICS: usize = 5;
const PLANES: usize = 7;

/// Who a piece of evidence is about.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Subject {
    Owner,
    License(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Against the original: residuals.
    NonBlind,
    /// Without the original: correlation with the weights themselves.
    Blind,
}

#[derive(Clone, Debug, Serialize)]
pub struct Statistic {
    pub name: &'static str,
    /// Weights that contribute to this statistic.
    pub n: u64,
    pub z: f64,
}

/// Everything a verdict rests on, so that anyone holding the same inputs can check it.
#[derive(Clone, Debug, Serialize)]
pub struct Evidence {
    pub subject: Subject,
    pub mode: Mode,
    /// Weights of the half that were compared.
    pub n: u64,
    /// Of those, weights the suspect has as zero or NaN (pruned or erased).
    pub erased: u64,
    pub statistics: Vec<Statistic>,
    /// The largest z.
    pub t: f64,
    /// Bonferroni bound over the statistics: `min(1, k·exp(-T²/2))`.
    pub p_value: f64,
    /// `T` must reach this for the verdict; from `alpha` and the number of hypotheses tested.
    pub threshold: f64,
    pub alpha: f64,
    /// Hypotheses this verdict was corrected for (1 for the owner, L for a trace).
    pub hypotheses: u64,
    pub verdict: bool,
    /// Eligible tensors of the original that the suspect lacks (or has in another shape).
    pub missing_tensors: Vec<String>,
    /// Tensors whose rows or columns were permuted or rescaled and were aligned first.
    pub aligned_tensors: Vec<String>,
}

/// The threshold on `T` for `statistics` one-sided tests and `hypotheses` hypotheses.
pub fn threshold(statistics: usize, hypotheses: u64) -> f64 {
    (2.0 * (statistics as f64 * hypotheses as f64 / ALPHA).ln()).sqrt()
}

fn p_value(statistics: usize, t: f64) -> f64 {
    (statistics as f64 * (-t * t / 2.0).exp()).min(1.0)
}

/// Is `suspect` marked with `model`'s owner mark? With the original, non-blind (aligned first
/// where needed); without it, blind.
pub fn verify_owner(
    suspect: &Path,
    original: Option<&Path>,
    model: &ModelKey,
    options: &Options,
) -> Result<Evidence, WatermarkError> {
    let suspect_file = ModelFile::open(suspect)?;
    options.run(|| match original {
        Some(original) => {
            let original_file = ModelFile::open(original)?;
            let pairs = pair_up(&original_file, &suspect_file)?;
            let keys = [*model.owner().expose()];
            let first = scan(&original_file, &pairs, model, Half::A, &keys);
            let evidence = first.evidence(0, Subject::Owner, 1, &pairs);
            if evidence.verdict {
                return Ok(evidence);
            }
            // The four fall short: try the residual without its low-rank part (a fine-tune's
            // update). It costs a few passes over every tensor, so only when needed; the verdict
            // is corrected for it either way.
            let second = without_low_rank(&original_file, &pairs, keys.len(), |original, pairs| {
                Ok(scan(original, pairs, model, Half::A, &keys))
            })?;
            Ok(with_low_rank_removed(evidence, &second, 0, &pairs))
        }
        None => Ok(blind(&suspect_file, model)),
    })?
}

/// Which of `license_ids` does `suspect` carry the fingerprint of? One evidence per license, in
/// the order given; `verdict` is corrected for the number of licenses tested.
pub fn trace(
    suspect: &Path,
    original: &Path,
    model: &ModelKey,
    license_ids: &[u128],
    options: &Options,
) -> Result<Vec<Evidence>, WatermarkError> {
    trace_with(suspect, original, model, license_ids, options, |original, pairs, keys| {
        Ok(scan(original, pairs, model, Half::B, keys))
    })
}

/// [`trace`] with the matching sums computed by `scan` (the CPU's, or a device's).
pub(crate) fn trace_with(
    suspect: &Path,
    original: &Path,
    model: &ModelKey,
    license_ids: &[u128],
    options: &Options,
    scan: impl Fn(&ModelFile, &[Pair<'_>], &[[u8; 32]]) -> Result<Scan, WatermarkError> + Send,
) -> Result<Vec<Evidence>, WatermarkError> {
    if license_ids.is_empty() {
        return Ok(Vec::new());
    }
    let suspect_file = ModelFile::open(suspect)?;
    let original_file = ModelFile::open(original)?;
    // `move`: the run owns `scan`, which it calls twice
    options.run(move || {
        let pairs = pair_up(&original_file, &suspect_file)?;
        let keys: Vec<[u8; 32]> = license_ids.iter().map(|id| *model.license(*id).expose()).collect();
        let first = scan(&original_file, &pairs, &keys)?;
        let hypotheses = license_ids.len() as u64;
        let evidence: Vec<Evidence> = license_ids
            .iter()
            .enumerate()
            .map(|(i, id)| first.evidence(i, Subject::License(id.to_string()), hypotheses, &pairs))
            .collect();
        if evidence.iter().any(|e| e.verdict) {
            return Ok(evidence);
        }
        // nobody accused: a fine-tune may hide the leaker (see `verify_owner`)
        let second = without_low_rank(&original_file, &pairs, keys.len(), |original, pairs| {
            scan(original, pairs, &keys)
        })?;
        Ok(evidence
            .into_iter()
            .enumerate()
            .map(|(i, e)| with_low_rank_removed(e, &second, i, &pairs))
            .collect())
    })?
}

/// An eligible tensor of the original and where its suspect values come from.
pub(crate) struct Pair<'a> {
    pub original: &'a TensorEntry,
    pub kind: FloatKind,
    pub suspect: Option<Suspect<'a>>,
}

pub(crate) enum Suspect<'a> {
    Raw { kind: FloatKind, bytes: &'a [u8] },
    Aligned(Vec<f32>),
}

impl Suspect<'_> {
    fn read(&self, first: usize, out: &mut [f32]) {
        match self {
            Self::Raw { kind, bytes } => read_values(*kind, bytes, first, out),
            Self::Aligned(values) => out.copy_from_slice(&values[first..first + out.len()]),
        }
    }
}

/// Decodes elements `first..first + out.len()` of a tensor's bytes to f32.
pub fn read_values(kind: FloatKind, bytes: &[u8], first: usize, out: &mut [f32]) {
    let size = kind.size();
    let bytes = &bytes[first * size..(first + out.len()) * size];
    match kind {
        FloatKind::Bf16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        FloatKind::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        FloatKind::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

/// Matches each eligible tensor of the original to the suspect's tensor of the same name (or
/// the one name that ends with it, for files saved with a prefix) and shape, and aligns it when
/// its rows or columns were permuted or rescaled.
fn pair_up<'a>(
    original: &'a ModelFile,
    suspect_file: &'a ModelFile,
) -> Result<Vec<Pair<'a>>, WatermarkError> {
    original
        .tensors
        .iter()
        .filter_map(|t| t.kind.map(|kind| (t, kind)))
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|(tensor, kind)| {
            let found = suspect_file.tensor(&tensor.name).or_else(|| {
                let mut candidates = suspect_file.tensors.iter().filter(|s| {
                    s.name.ends_with(&format!(".{}", tensor.name))
                        || tensor.name.ends_with(&format!(".{}", s.name))
                });
                match (candidates.next(), candidates.next()) {
                    (Some(only), None) => Some(only),
                    _ => None,
                }
            });
            let suspect = found.and_then(|s| {
                let suspect_kind = crate::format::eligible("w", s.dtype, &s.shape)?;
                let bytes = suspect_file.bytes(s);
                match align::check(kind, original.bytes(tensor), suspect_kind, bytes, &s.shape, &tensor.shape)
                {
                    Alignment::Identity => Some(Suspect::Raw { kind: suspect_kind, bytes }),
                    Alignment::Aligned(values) => Some(Suspect::Aligned(values)),
                    Alignment::Unmatched => None,
                }
            });
            Ok(Pair { original: tensor, kind, suspect })
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Half {
    /// Partition bit set: the owner mark.
    A,
    /// Partition bit clear: the fingerprints.
    B,
}

/// Per-key sums of matching weights, and the key-independent totals.
#[derive(Clone, Default)]
pub(crate) struct Totals {
    pub n: u64,
    pub erased: u64,
    pub corr_abs: u64,
    pub corr_sq: u64,
    pub kept_n: u64,
    pub kept_abs: u64,
    pub kept_sq: u64,
    pub ulp: u64,
    pub sign: u64,
}

impl Totals {
    fn add(&mut self, other: &Self) {
        self.n += other.n;
        self.erased += other.erased;
        self.corr_abs += other.corr_abs;
        self.corr_sq += other.corr_sq;
        self.kept_n += other.kept_n;
        self.kept_abs += other.kept_abs;
        self.kept_sq += other.kept_sq;
        self.ulp += other.ulp;
        self.sign += other.sign;
    }
}

pub(crate) struct Scan {
    pub totals: Totals,
    /// Per key: matching sums for correlation, erasure-aware, ulp-matched, sign.
    pub matches: Vec<[u64; 4]>,
}

/// Scans each tensor again, its residual without the low-rank part ([`crate::lowrank`]): the
/// suspect becomes `w0 + (r − projection)`, erased weights staying zero, and goes through the same
/// `scan` (the CPU's or a device's) one tensor at a time, so memory holds one tensor in f32.
fn without_low_rank(
    original: &ModelFile,
    pairs: &[Pair<'_>],
    keys: usize,
    scan: impl Fn(&ModelFile, &[Pair<'_>]) -> Result<Scan, WatermarkError>,
) -> Result<Scan, WatermarkError> {
    let mut sum = Scan::empty(keys);
    for pair in pairs {
        let Some(suspect) = &pair.suspect else { continue };
        let (rows, cols) = (pair.original.shape[0], pair.original.shape[1]);
        let len = rows * cols;
        let (low, high) = markable_exponents(pair.kind);
        let mut w0 = vec![0f32; len];
        read_values(pair.kind, original.bytes(pair.original), 0, &mut w0);
        let mut values = vec![0f32; len];
        suspect.read(0, &mut values);
        // zeroed, NaN or infinite: left out (one infinity would spread over the whole projection)
        let erased = |w1: f32| w1 == 0.0 || !w1.is_finite();
        let mut residual: Vec<f32> = values
            .par_iter()
            .zip(&w0)
            .map(|(&w1, &w0)| {
                let exponent = (w0.to_bits() >> 23) & 0xFF;
                if erased(w1) || exponent.wrapping_sub(low) > high - low { 0.0 } else { w1 - w0 }
            })
            .collect();
        crate::lowrank::remove(&mut residual, rows, cols, &pair.original.name);
        values.par_iter_mut().zip(&w0).zip(&residual).for_each(|((w1, &w0), &r)| {
            *w1 = if erased(*w1) { 0.0 } else { w0 + r };
        });
        drop(residual);
        let adjusted =
            Pair { original: pair.original, kind: pair.kind, suspect: Some(Suspect::Aligned(values)) };
        sum.add(&scan(original, std::slice::from_ref(&adjusted))?);
    }
    Ok(sum)
}

/// `evidence` with the fifth statistic from `second` (key `key`): the erasure-aware correlation
/// of the residual without its low-rank part.
fn with_low_rank_removed(evidence: Evidence, second: &Scan, key: usize, pairs: &[Pair<'_>]) -> Evidence {
    let t = &second.totals;
    let z = z(second.matches[key][1], t.kept_abs, t.kept_sq);
    let mut statistics = evidence.statistics;
    statistics.push(Statistic { name: "low_rank_removed", n: t.kept_n, z });
    finish(
        evidence.subject,
        Mode::NonBlind,
        evidence.n,
        evidence.erased,
        statistics,
        NON_BLIND_STATISTICS,
        evidence.hypotheses,
        pairs,
    )
}

/// `Σ s·x / √Σ x²` from the sum of |x| where the key agrees, the sum of |x| and the sum of x².
fn z(matched: u64, abs: u64, sq: u64) -> f64 {
    if sq == 0 { 0.0 } else { (2.0 * matched as f64 - abs as f64) / (sq as f64).sqrt() }
}

impl Scan {
    fn empty(keys: usize) -> Self {
        Self { totals: Totals::default(), matches: vec![[0; 4]; keys] }
    }

    fn add(&mut self, other: &Self) {
        self.totals.add(&other.totals);
        for (a, b) in self.matches.iter_mut().zip(&other.matches) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
    }

    /// The evidence for key `key` from the four statistics, corrected for all five and for
    /// `hypotheses` keys.
    fn evidence(&self, key: usize, subject: Subject, hypotheses: u64, pairs: &[Pair<'_>]) -> Evidence {
        let t = &self.totals;
        let m = &self.matches[key];
        let statistics = vec![
            Statistic { name: "correlation", n: t.n, z: z(m[0], t.corr_abs, t.corr_sq) },
            Statistic { name: "ulp_matched", n: t.ulp, z: z(m[2], t.ulp, t.ulp) },
            Statistic { name: "erasure_aware", n: t.kept_n, z: z(m[1], t.kept_abs, t.kept_sq) },
            Statistic { name: "sign_test", n: t.sign, z: z(m[3], t.sign, t.sign) },
        ];
        finish(subject, Mode::NonBlind, t.n, t.erased, statistics, NON_BLIND_STATISTICS, hypotheses, pairs)
    }
}

#[allow(clippy::too_many_arguments)]
fn finish(
    subject: Subject,
    mode: Mode,
    n: u64,
    erased: u64,
    statistics: Vec<Statistic>,
    k: usize,
    hypotheses: u64,
    pairs: &[Pair<'_>],
) -> Evidence {
    let t = statistics.iter().map(|s| s.z).fold(f64::NEG_INFINITY, f64::max);
    let threshold = threshold(k, hypotheses);
    Evidence {
        subject,
        mode,
        n,
        erased,
        statistics,
        t,
        p_value: p_value(k, t),
        threshold,
        alpha: ALPHA,
        hypotheses,
        verdict: t >= threshold,
        missing_tensors: pairs
            .iter()
            .filter(|p| p.suspect.is_none())
            .map(|p| p.original.name.clone())
            .collect(),
        aligned_tensors: pairs
            .iter()
            .filter(|p| matches!(p.suspect, Some(Suspect::Aligned(_))))
            .map(|p| p.original.name.clone())
            .collect(),
    }
}

/// Features of one 64-weight word: bit planes of the per-weight values.
#[derive(Clone, Copy, Default)]
struct Word {
    /// r > 0
    positive: u64,
    /// |correlation value|, one plane per bit
    corr: [u64; PLANES],
    /// the same without erased weights
    kept: [u64; PLANES],
    /// |r| rounds to at least one ULP
    ulp: u64,
    /// r ≠ 0 and not erased
    sign: u64,
}

fn scan(original: &ModelFile, pairs: &[Pair<'_>], model: &ModelKey, half: Half, keys: &[[u8; 32]]) -> Scan {
    let partition = model.partition();
    // per pair: the partition stream and one stream per key
    let streams: Vec<(TensorStream, Vec<TensorStream>)> = pairs
        .par_iter()
        .map(|p| {
            let stream = |key: &[u8; 32]| TensorStream::new(key, &p.original.name, p.kind, &p.original.shape);
            (stream(partition.expose()), keys.iter().map(stream).collect())
        })
        .collect();
    let work: Vec<(usize, usize)> = pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.suspect.is_some())
        .flat_map(|(i, p)| (0..p.original.elements().div_ceil(CHUNK)).map(move |c| (i, c)))
        .collect();
    work.par_iter()
        .fold(
            || (Scan::empty(keys.len()), Buffers::new()),
            |(mut sums, mut buffers), &(i, chunk)| {
                let pair = &pairs[i];
                let suspect = pair.suspect.as_ref().expect("filtered above");
                let first = chunk * CHUNK;
                let len = (pair.original.elements() - first).min(CHUNK);
                let words = len.div_ceil(64);
                read_values(pair.kind, original.bytes(pair.original), first, &mut buffers.original[..len]);
                suspect.read(first, &mut buffers.suspect[..len]);
                streams[i].0.fill(first, &mut buffers.partition[..words]);
                let chunk_totals = features(pair.kind, &mut buffers, len, half);
                sums.totals.add(&chunk_totals);
                for (k, stream) in streams[i].1.iter().enumerate() {
                    stream.fill(first, &mut buffers.key[..words]);
                    let counts = count_matches(&buffers.words[..words], &buffers.key[..words]);
                    for (total, count) in sums.matches[k].iter_mut().zip(counts) {
                        *total += count;
                    }
                }
                (sums, buffers)
            },
        )
        .map(|(sums, _)| sums)
        .reduce(
            || Scan::empty(keys.len()),
            |mut a, b| {
                a.add(&b);
                a
            },
        )
}

struct Buffers {
    original: Vec<f32>,
    suspect: Vec<f32>,
    partition: Vec<u64>,
    key: Vec<u64>,
    words: Vec<Word>,
}

impl Buffers {
    fn new() -> Self {
        Self {
            original: vec![0.0; CHUNK],
            suspect: vec![0.0; CHUNK],
            partition: vec![0; WORDS],
            key: vec![0; WORDS],
            words: vec![Word::default(); WORDS],
        }
    }
}

dispatch! {
    /// Computes the bit-plane features of a chunk's weights of `half`, and their totals.
    fn features(kind: FloatKind, buffers: &mut Buffers, len: usize, half: Half) -> Totals => features_body
}

#[inline(always)]
fn features_body(kind: FloatKind, buffers: &mut Buffers, len: usize, half: Half) -> Totals {
    let (low, high) = markable_exponents(kind);
    let mut totals = Totals::default();
    for (w, word) in buffers.words[..len.div_ceil(64)].iter_mut().enumerate() {
        let part = buffers.partition[w];
        let in_half = if half == Half::A { part } else { !part };
        let start = w * 64;
        let n = (len - start).min(64);
        let (mut original, mut suspect) = ([0f32; 64], [0f32; 64]);
        original[..n].copy_from_slice(&buffers.original[start..start + n]);
        suspect[..n].copy_from_slice(&buffers.suspect[start..start + n]);
        // per lane, without branches: the value x = |r| in quarter ULPs (clipped), and flags
        let mut corr = [0u8; 64];
        let mut kept = [0u8; 64];
        let mut flags = [[0u8; 64]; 4]; // positive, erased, ulp, sign
        let mut sums = [0u32; 6]; // n, erased, corr_abs, corr_sq, kept_abs, kept_sq
        for j in 0..64 {
            let w0 = original[j];
            let w1 = if suspect[j].is_nan() { 0.0 } else { suspect[j] };
            let exponent = (w0.to_bits() >> 23) & 0xFF;
            let valid = (in_half >> j & 1 == 1) & (exponent.wrapping_sub(low) <= high - low) & (j < n);
            // r in bf16 ULPs of w0: scale by 2^(7 - e), a power of two (saturating for the
            // tiniest values, which no real weight has)
            let scale = f32::from_bits(261u32.saturating_sub(exponent).clamp(1, 254) << 23);
            let r = (w1 - w0) * scale;
            let erased = valid & (w1 == 0.0);
            let x = if valid { (r.abs() * 4.0 + 0.5).floor().min(127.0) as u8 } else { 0 };
            let k = if erased { 0 } else { x };
            corr[j] = x;
            kept[j] = k;
            flags[0][j] = u8::from(valid & (r > 0.0));
            flags[1][j] = u8::from(erased);
            flags[2][j] = u8::from(valid & !erased & (r.abs() >= 0.5));
            flags[3][j] = u8::from(valid & !erased & (r != 0.0));
            sums[0] += u32::from(valid);
            sums[1] += u32::from(erased);
            sums[2] += u32::from(x);
            sums[3] += u32::from(x) * u32::from(x);
            sums[4] += u32::from(k);
            sums[5] += u32::from(k) * u32::from(k);
        }
        *word = Word {
            positive: pack(&flags[0], 0),
            corr: std::array::from_fn(|plane| pack(&corr, plane)),
            kept: std::array::from_fn(|plane| pack(&kept, plane)),
            ulp: pack(&flags[2], 0),
            sign: pack(&flags[3], 0),
        };
        let ulp = u64::from(pack(&flags[2], 0).count_ones());
        let sign = u64::from(pack(&flags[3], 0).count_ones());
        totals.add(&Totals {
            n: sums[0].into(),
            erased: sums[1].into(),
            corr_abs: sums[2].into(),
            corr_sq: sums[3].into(),
            kept_n: u64::from(sums[0] - sums[1]),
            kept_abs: sums[4].into(),
            kept_sq: sums[5].into(),
            ulp,
            sign,
        });
    }
    totals
}

/// Bit `plane` of each of 64 lane bytes, as a 64-bit mask (lane j → bit j): eight lanes at a
/// time with the multiply that gathers one bit per byte.
#[inline(always)]
fn pack(lanes: &[u8; 64], plane: usize) -> u64 {
    let mut mask = 0u64;
    for (group, bytes) in lanes.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(bytes.try_into().expect("8 bytes")) >> plane & 0x0101_0101_0101_0101;
        mask |= (word.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * group);
    }
    mask
}

dispatch! {
    /// Σ over weights whose key direction agrees with the sign of x of |x|, per statistic.
    fn count_matches(words: &[Word], key: &[u64]) -> [u64; 4] => count_matches_body
}

#[inline(always)]
fn count_matches_body(words: &[Word], key: &[u64]) -> [u64; 4] {
    let mut counts = [0u64; 4];
    for (word, &bits) in words.iter().zip(key) {
        let agree = !(bits ^ word.positive);
        let mut corr = 0u64;
        let mut kept = 0u64;
        for plane in 0..PLANES {
            corr += u64::from((agree & word.corr[plane]).count_ones()) << plane;
            kept += u64::from((agree & word.kept[plane]).count_ones()) << plane;
        }
        counts[0] += corr;
        counts[1] += kept;
        counts[2] += u64::from((agree & word.ulp).count_ones());
        counts[3] += u64::from((agree & word.sign).count_ones());
    }
    counts
}

/// Blind owner detection: `T = Σ s·w' / sqrt(Σ w'²)` over half A.
fn blind(suspect: &ModelFile, model: &ModelKey) -> Evidence {
    // the streams of each tensor, derived once
    let tensors: Vec<(&TensorEntry, FloatKind, TensorKeys)> = suspect
        .tensors
        .iter()
        .filter_map(|t| t.kind.map(|kind| (t, kind, TensorKeys::new(model, None, t, kind))))
        .collect();
    let work: Vec<(usize, usize)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(i, (t, _, _))| (0..t.elements().div_ceil(CHUNK)).map(move |c| (i, c)))
        .collect();
    let sums: Vec<(f64, f64, u64)> = work
        .par_iter()
        .map_init(
            || (vec![0f32; CHUNK], vec![0u64; WORDS], vec![0u64; WORDS]),
            |(values, partition, owner), &(i, chunk)| {
                let (tensor, kind, keys) = &tensors[i];
                let first = chunk * CHUNK;
                let len = (tensor.elements() - first).min(CHUNK);
                let words = len.div_ceil(64);
                read_values(*kind, suspect.bytes(tensor), first, &mut values[..len]);
                keys.partition.fill(first, &mut partition[..words]);
                keys.owner.fill(first, &mut owner[..words]);
                blind_chunk(*kind, &values[..len], &partition[..words], &owner[..words])
            },
        )
        .collect();
    // in chunk order, so the sum does not depend on the thread count
    let (signed, squares, n) =
        sums.iter().fold((0.0, 0.0, 0), |acc, s| (acc.0 + s.0, acc.1 + s.1, acc.2 + s.2));
    let z = if squares > 0.0 { signed / squares.sqrt() } else { 0.0 };
    finish(Subject::Owner, Mode::Blind, n, 0, vec![Statistic { name: "blind_correlation", n, z }], 1, 1, &[])
}

const LANES: usize = 16;

dispatch! {
    /// One chunk of the blind statistic with 16 independent f32 lanes (they vectorise), reduced
    /// in f64 at the end of the chunk.
    fn blind_chunk(kind: FloatKind, values: &[f32], partition: &[u64], owner: &[u64]) -> (f64, f64, u64) => blind_chunk_body
}

#[inline(always)]
fn blind_chunk_body(kind: FloatKind, values: &[f32], partition: &[u64], owner: &[u64]) -> (f64, f64, u64) {
    let (low, high) = markable_exponents(kind);
    let mut signed = [0f32; LANES];
    let mut squares = [0f32; LANES];
    let mut counts = [0u32; LANES];
    let mut take = [0u32; 64];
    let mut flip = [0u32; 64];
    for (group, (&part, &dir)) in values.chunks(64).zip(partition.iter().zip(owner)) {
        for j in 0..64 {
            take[j] = 0u32.wrapping_sub((part >> j & 1) as u32);
            flip[j] = ((!dir >> j & 1) as u32) << 31;
        }
        let mut padded = [0f32; 64];
        padded[..group.len()].copy_from_slice(group);
        for block in 0..64 / LANES {
            for lane in 0..LANES {
                let j = block * LANES + lane;
                let bits = padded[j].to_bits();
                let exponent = (bits >> 23) & 0xFF;
                let markable = 0u32.wrapping_sub(u32::from(exponent.wrapping_sub(low) <= high - low));
                let mask = take[j] & markable;
                let value = f32::from_bits(bits & mask);
                signed[lane] += f32::from_bits((bits ^ flip[j]) & mask);
                squares[lane] += value * value;
                counts[lane] += mask & 1;
            }
        }
    }
    let total = |lanes: [f32; LANES]| lanes.iter().map(|&x| f64::from(x)).sum::<f64>();
    (total(signed), total(squares), counts.iter().map(|&c| u64::from(c)).sum())
}

/// The f32 exponent field range of values the embedding marks in `kind`.
fn markable_exponents(kind: FloatKind) -> (u32, u32) {
    match kind {
        FloatKind::Bf16 => (1, 254),
        FloatKind::F32 => (8, 253),
        // f16 normals: 2^-14 ..= 65504
        FloatKind::F16 => (113, 142),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_match_the_scheme() {
        assert!((threshold(4, 1) - 6.65).abs() < 0.01, "{}", threshold(4, 1));
        let l = 1000u64;
        let expected = (2.0 * (4.0 * l as f64 * 1e9).ln()).sqrt();
        assert!((threshold(4, l) - expected).abs() < 1e-12);
        assert!(p_value(4, threshold(4, 1)) <= 1e-9 * 1.0001);
        assert_eq!(p_value(4, 0.0), 1.0);
    }

    #[test]
    fn bit_plane_counts_equal_direct_sums() {
        // a random word of values, checked against Σ s·x computed directly
        let mut state = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut buffers = Buffers::new();
        let len = 1000;
        for i in 0..len {
            buffers.original[i] = 0.01 + (next() % 1000) as f32 * 1e-4;
            let ulps = (next() % 41) as f32 - 20.0;
            buffers.suspect[i] = buffers.original[i] + ulps * 0.25 * 2f32.powi(-7 - 7);
        }
        buffers.partition[..16].fill(u64::MAX);
        let totals = features(FloatKind::F32, &mut buffers, len, Half::A);
        let key: Vec<u64> = (0..16).map(|_| next()).collect();
        let counts = count_matches(&buffers.words[..16], &key);
        let mut direct = 0i64;
        for i in 0..len {
            let w0 = buffers.original[i];
            let e = ((w0.to_bits() >> 23) & 0xFF) as i32 - 127;
            let r = f64::from(buffers.suspect[i] - w0) * 2f64.powi(7 - e);
            let x = ((r * 4.0).round() as i64).clamp(-127, 127);
            let s = if key[i / 64] >> (i % 64) & 1 == 1 { 1 } else { -1 };
            direct += s * x;
        }
        assert_eq!(2 * counts[0] as i64 - totals.corr_abs as i64, direct);
    }
}
