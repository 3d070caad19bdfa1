//! Alignment: undo row or column permutations and per-row rescaling before non-blind detection.
//!
//! Permuting the neurons of an FFN (rows of the first matrix, columns of the second) or the
//! heads of attention, and rescaling rows, keeps a model's function but moves every weight away
//! from the residual the detector expects. With the original at hand both are undone: each
//! suspect row is matched to the original row of highest cosine (a matrix product on candle
//! tensors), then scaled by the least-squares factor when that explains most of its residual.
//! A quick check on sampled rows keeps untouched tensors off this path.

use candle_core::{Device, Tensor};

use crate::{detect::read_values, format::FloatKind};

/// Rows a suspect row must resemble to be matched (random rows of width C have cosine ≈ 1/√C).
const MIN_COSINE: f32 = 0.3;
/// Share of rows that must be matched for an orientation to count as aligned.
const MIN_MATCHED: f64 = 0.75;
/// Permutation search is quadratic in the rows; larger tensors are left as they are.
const MAX_PERMUTED_ROWS: usize = 16_384;
const SAMPLE_ROWS: usize = 64;

pub(crate) enum Alignment {
    Identity,
    /// The suspect's values in the original's layout (unmatched weights are zero, which the
    /// erasure-aware statistics leave out).
    Aligned(Vec<f32>),
    /// The shapes differ and no alignment explains it.
    Unmatched,
}

/// Decides whether the suspect tensor needs aligning to the original and does it.
pub(crate) fn check(
    original_kind: FloatKind,
    original: &[u8],
    suspect_kind: FloatKind,
    suspect: &[u8],
    suspect_shape: &[usize],
    shape: &[usize],
) -> Alignment {
    let [rows, cols] = [shape[0], shape[1]];
    if suspect_shape != shape {
        let mut w = vec![0f32; suspect_shape.iter().product()];
        let mut w0 = vec![0f32; rows * cols];
        read_values(suspect_kind, suspect, 0, &mut w);
        read_values(original_kind, original, 0, &mut w0);
        let reduced = align_reduced(&w, [suspect_shape[0], suspect_shape[1]], &w0, [rows, cols]);
        return reduced.map_or(Alignment::Unmatched, Alignment::Aligned);
    }
    let row = |kind, bytes, i: usize| {
        let mut out = vec![0f32; cols];
        read_values(kind, bytes, i * cols, &mut out);
        out
    };
    let sampled = (0..SAMPLE_ROWS.min(rows)).map(|k| k * rows / SAMPLE_ROWS.min(rows));
    let (mut similar, mut rescaled, mut total) = (0usize, 0usize, 0usize);
    for i in sampled {
        let (a, b) = (row(suspect_kind, suspect, i), row(original_kind, original, i));
        total += 1;
        similar += usize::from(cosine(&a, &b) >= MIN_COSINE);
        rescaled += usize::from(scale_explains(&a, &b).is_some());
    }
    if similar as f64 >= MIN_MATCHED * total as f64 && rescaled * 4 < total {
        return Alignment::Identity;
    }
    let mut w = vec![0f32; rows * cols];
    let mut w0 = vec![0f32; rows * cols];
    read_values(suspect_kind, suspect, 0, &mut w);
    read_values(original_kind, original, 0, &mut w0);
    align(&w, &w0, rows, cols).map_or(Alignment::Identity, Alignment::Aligned)
}

/// Full alignment of `w` to `w0` (both `rows × cols`, row-major). `None` when no orientation
/// matches.
pub fn align(w: &[f32], w0: &[f32], rows: usize, cols: usize) -> Option<Vec<f32>> {
    if matched_share(w, w0, rows, cols) >= MIN_MATCHED {
        return Some(rescale_rows(w.to_vec(), w0, rows, cols));
    }
    if let Some(aligned) = permute_rows(w, rows, w0, rows, cols) {
        return Some(rescale_rows(aligned, w0, rows, cols));
    }
    let (wt, w0t) = (transpose(w, rows, cols), transpose(w0, rows, cols));
    let aligned = permute_rows(&wt, cols, &w0t, cols, rows)?;
    Some(transpose(&rescale_rows(aligned, &w0t, cols, rows), cols, rows))
}

/// Aligns a suspect tensor that lost rows or columns (pruned neurons, removed heads) to the
/// original's shape; what was removed reads as zero (erased).
pub fn align_reduced(
    w: &[f32],
    suspect_shape: [usize; 2],
    w0: &[f32],
    shape: [usize; 2],
) -> Option<Vec<f32>> {
    let ([sr, sc], [rows, cols]) = (suspect_shape, shape);
    if sc == cols && sr < rows {
        let aligned = permute_rows(w, sr, w0, rows, cols)?;
        Some(rescale_rows(aligned, w0, rows, cols))
    } else if sr == rows && sc < cols {
        let (wt, w0t) = (transpose(w, sr, sc), transpose(w0, rows, cols));
        let aligned = permute_rows(&wt, sc, &w0t, cols, rows)?;
        Some(transpose(&rescale_rows(aligned, &w0t, cols, rows), cols, rows))
    } else {
        None
    }
}

fn matched_share(w: &[f32], w0: &[f32], rows: usize, cols: usize) -> f64 {
    let matched =
        (0..rows).filter(|&i| cosine(&w[i * cols..][..cols], &w0[i * cols..][..cols]) >= MIN_COSINE).count();
    matched as f64 / rows as f64
}

/// Matches every row of `w` (`suspect_rows × cols`) to its most similar row of `w0`
/// (`rows × cols`); `None` when too few match.
fn permute_rows(w: &[f32], suspect_rows: usize, w0: &[f32], rows: usize, cols: usize) -> Option<Vec<f32>> {
    if rows > MAX_PERMUTED_ROWS || suspect_rows > rows {
        return None;
    }
    let normalized = |m: &[f32]| -> Vec<f32> {
        m.chunks(cols)
            .flat_map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
                r.iter().map(move |x| x / norm)
            })
            .collect()
    };
    let device = Device::Cpu;
    let a = Tensor::from_vec(normalized(w), (suspect_rows, cols), &device).ok()?;
    let b = Tensor::from_vec(normalized(w0), (rows, cols), &device).ok()?.t().ok()?.contiguous().ok()?;
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(suspect_rows);
    for start in (0..suspect_rows).step_by(2048) {
        let len = 2048.min(suspect_rows - start);
        let similarity = a.narrow(0, start, len).ok()?.matmul(&b).ok()?;
        let index: Vec<u32> = similarity.argmax(1).ok()?.to_vec1().ok()?;
        let value: Vec<f32> = similarity.max(1).ok()?.to_vec1().ok()?;
        best.extend(value.into_iter().zip(index.into_iter().map(|i| i as usize)));
    }
    let matched = best.iter().filter(|(cos, _)| *cos >= MIN_COSINE).count();
    if (matched as f64) < MIN_MATCHED * suspect_rows as f64 {
        return None;
    }
    // each original row takes the suspect row that resembles it most
    let mut owner: Vec<Option<(f32, usize)>> = vec![None; rows];
    for (i, &(cos, j)) in best.iter().enumerate() {
        if cos >= MIN_COSINE && owner[j].is_none_or(|(c, _)| cos > c) {
            owner[j] = Some((cos, i));
        }
    }
    let mut aligned = vec![0f32; rows * cols];
    for (j, found) in owner.iter().enumerate() {
        if let Some((_, i)) = found {
            aligned[j * cols..][..cols].copy_from_slice(&w[i * cols..][..cols]);
        }
    }
    Some(aligned)
}

/// Divides each row by its least-squares scale against the original where that scale explains
/// most of the row's residual (a rescaled row), and leaves noisy rows alone.
fn rescale_rows(mut w: Vec<f32>, w0: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    for i in 0..rows {
        let row = &mut w[i * cols..][..cols];
        if let Some(scale) = scale_explains(row, &w0[i * cols..][..cols]) {
            row.iter_mut().for_each(|x| *x /= scale);
        }
    }
    w
}

/// The row's scale against the original when dividing by it removes at least 90% of the
/// residual energy.
fn scale_explains(w: &[f32], w0: &[f32]) -> Option<f32> {
    let (mut dot, mut norm0, mut residual) = (0f64, 0f64, 0f64);
    for (&x, &y) in w.iter().zip(w0) {
        dot += f64::from(x) * f64::from(y);
        norm0 += f64::from(y) * f64::from(y);
        residual += f64::from(x - y).powi(2);
    }
    if norm0 == 0.0 || dot <= 0.0 {
        return None;
    }
    let scale = dot / norm0;
    let scaled: f64 = w.iter().zip(w0).map(|(&x, &y)| (f64::from(x) / scale - f64::from(y)).powi(2)).sum();
    (scaled < 0.1 * residual && (scale - 1.0).abs() > 1e-3).then_some(scale as f32)
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        dot += f64::from(x) * f64::from(y);
        na += f64::from(x) * f64::from(x);
        nb += f64::from(y) * f64::from(y);
    }
    if na == 0.0 || nb == 0.0 { 0.0 } else { (dot / (na * nb).sqrt()) as f32 }
}

fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = m[i * cols + j];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn recovers_permuted_and_rescaled_rows_and_columns() {
        let (rows, cols) = (96, 64);
        let w0 = random(rows * cols, 7);
        let perm: Vec<usize> = (0..rows).map(|i| (i * 37 + 11) % rows).collect();
        let mut w = vec![0f32; rows * cols];
        for i in 0..rows {
            let scale = 0.5 + (i % 7) as f32 * 0.25;
            for j in 0..cols {
                w[perm[i] * cols + j] = w0[i * cols + j] * scale;
            }
        }
        let aligned = align(&w, &w0, rows, cols).expect("rows align");
        for (a, b) in aligned.iter().zip(&w0) {
            assert!((a - b).abs() < 1e-5);
        }
        let cols_perm: Vec<usize> = (0..cols).map(|j| (j * 23 + 5) % cols).collect();
        let mut w = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                w[i * cols + cols_perm[j]] = w0[i * cols + j] * 2.0;
            }
        }
        let aligned = align(&w, &w0, rows, cols).expect("columns align");
        for (a, b) in aligned.iter().zip(&w0) {
            assert!((a - b).abs() < 1e-5);
        }
        assert!(align(&random(rows * cols, 9), &w0, rows, cols).is_none(), "unrelated weights do not align");
    }
}
