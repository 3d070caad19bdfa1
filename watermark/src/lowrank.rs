//! The owner mark under fine-tuning: a low-rank update taken out of the residual before it is
//! correlated with the key.
//!
//! Fine-tuning with adapters (LoRA and its kin) adds `ΔW = U·Vᵀ` of small rank to a matrix. Such
//! an update can be as large as the weights themselves, and every one of its entries is noise to
//! the residual statistics: a rank-8 update with ‖ΔW‖ = ‖W‖ leaves MiniLM's owner mark at T ≈ 13.
//! But it lives in a few directions, and the mark, a ±1 ULP step with a keyed sign on every
//! weight, is spread evenly over all of them. So the residual `R = W' − W0` of each tensor (in
//! weight units, erased weights zero) loses its projection on the column space a randomised
//! range finder sees (Halko, Martinsson, Tropp: [`DIRECTIONS`] probes, two power steps, probes
//! drawn from the tensor's name alone), and what is left is scanned again like any residual
//! (`low_rank_removed` in [`crate::detect`]).
//!
//! Nothing here depends on the key tested, so for a wrong key the signs are still independent
//! fair coins given the values and the p-value bound of [`crate::detect`] holds. Every sum runs
//! in a fixed order per output element, whatever the threads: results never depend on them.

use rayon::prelude::*;

/// Directions removed from each residual (at most an eighth of the smaller side).
pub const DIRECTIONS: usize = 24;
const POWER_STEPS: usize = 2;
const CONTEXT_PROBES: &str = "agora watermark v1 low-rank probes";

/// Removes from `r` (rows × cols, row-major) its projection on the approximate span of its top
/// singular vectors. Returns how many directions were removed (0 for a matrix too thin to spare
/// any).
pub(crate) fn remove(r: &mut [f32], rows: usize, cols: usize, name: &str) -> usize {
    let k = DIRECTIONS.min(rows.min(cols) / 8);
    if k == 0 {
        return 0;
    }
    // probes: ±1 entries from the tensor's name, cols × k
    let mut probes = vec![0u8; cols * k];
    let mut seed = blake3::Hasher::new_derive_key(CONTEXT_PROBES);
    seed.update(name.as_bytes());
    seed.finalize_xof().fill(&mut probes);
    let omega: Vec<f32> = probes.iter().map(|b| if b & 1 == 1 { 1.0 } else { -1.0 }).collect();

    let mut q = times(r, rows, cols, &omega, k);
    orthonormalise(&mut q, rows, k);
    for _ in 0..POWER_STEPS {
        let mut z = transposed_times(r, rows, cols, &q, k);
        orthonormalise(&mut z, cols, k);
        q = times(r, rows, cols, &z, k);
        orthonormalise(&mut q, rows, k);
    }
    // R -= Q·(Qᵀ·R)
    let b = transposed_times(r, rows, cols, &q, k); // cols × k: row j is (Qᵀ R)[:, j]
    r.par_chunks_mut(cols).zip(q.par_chunks(k)).for_each(|(row, qi)| {
        for (value, bj) in row.iter_mut().zip(b.chunks_exact(k)) {
            *value -= dot(qi, bj);
        }
    });
    k
}

/// `R · M` for `m` of cols × k: rows × k.
fn times(r: &[f32], rows: usize, cols: usize, m: &[f32], k: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * k];
    out.par_chunks_mut(k).zip(r.par_chunks(cols)).for_each(|(out, row)| {
        for (&value, mj) in row.iter().zip(m.chunks_exact(k)) {
            if value != 0.0 {
                axpy(out, value, mj);
            }
        }
    });
    out
}

/// `Rᵀ · M` for `m` of rows × k: cols × k. Each thread owns a band of columns and goes through
/// the rows in order.
fn transposed_times(r: &[f32], rows: usize, cols: usize, m: &[f32], k: usize) -> Vec<f32> {
    const BAND: usize = 64;
    let mut out = vec![0f32; cols * k];
    out.par_chunks_mut(BAND * k).enumerate().for_each(|(band, out)| {
        let first = band * BAND;
        let width = out.len() / k;
        for i in 0..rows {
            let mi = &m[i * k..(i + 1) * k];
            let row = &r[i * cols + first..i * cols + first + width];
            for (&value, o) in row.iter().zip(out.chunks_exact_mut(k)) {
                if value != 0.0 {
                    axpy(o, value, mi);
                }
            }
        }
    });
    out
}

#[inline(always)]
fn axpy(out: &mut [f32], a: f32, x: &[f32]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o += a * v;
    }
}

#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Gram–Schmidt, twice, on the k columns of `m` (n × k, row-major), in f64. A column with
/// nothing left is zeroed (it then removes nothing).
fn orthonormalise(m: &mut [f32], n: usize, k: usize) {
    let mut columns: Vec<Vec<f64>> =
        (0..k).map(|c| (0..n).map(|i| f64::from(m[i * k + c])).collect()).collect();
    for c in 0..k {
        for _ in 0..2 {
            for p in 0..c {
                let projection: f64 = columns[c].iter().zip(&columns[p]).map(|(a, b)| a * b).sum();
                let (done, rest) = columns.split_at_mut(c);
                for (x, y) in rest[0].iter_mut().zip(&done[p]) {
                    *x -= projection * y;
                }
            }
        }
        let norm = columns[c].iter().map(|x| x * x).sum::<f64>().sqrt();
        let scale = if norm > 1e-30 { 1.0 / norm } else { 0.0 };
        columns[c].iter_mut().for_each(|x| *x *= scale);
    }
    for (c, column) in columns.iter().enumerate() {
        for (i, &x) in column.iter().enumerate() {
            m[i * k + c] = x as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generator(mut state: u64) -> impl FnMut() -> f32 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    #[test]
    fn a_low_rank_update_is_taken_out_and_spread_noise_stays() {
        let (rows, cols, rank) = (384, 256, 6);
        let mut next = generator(0x9E37_79B9_7F4A_7C15);
        let u: Vec<f32> = (0..rows * rank).map(|_| next()).collect();
        let v: Vec<f32> = (0..cols * rank).map(|_| next()).collect();
        let noise: Vec<f32> = (0..rows * cols).map(|_| 0.01 * next()).collect();
        let mut r = noise.clone();
        for i in 0..rows {
            for j in 0..cols {
                r[i * cols + j] += (0..rank).map(|l| u[i * rank + l] * v[j * rank + l]).sum::<f32>();
            }
        }
        let norm = |m: &[f32]| m.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        assert!(norm(&r) > 30.0 * norm(&noise), "the update dominates");
        let removed = remove(&mut r, rows, cols, "w");
        assert_eq!(removed, DIRECTIONS);
        // what is left is the noise less 24 of its 256 directions (√(232/256) = 0.95 of it)
        let ratio = norm(&r) / norm(&noise);
        assert!((0.85..1.0).contains(&ratio), "the update is gone: {ratio} of the noise's norm left");
        let kept: f64 = r.iter().zip(&noise).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
            / (norm(&r) * norm(&noise));
        assert!(kept > 0.85, "what is left is the noise: cosine {kept}");
    }

    #[test]
    fn thread_counts_give_the_same_bits() {
        let (rows, cols) = (300, 200);
        let mut next = generator(7);
        let r: Vec<f32> = (0..rows * cols).map(|_| next()).collect();
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let mut m = r.clone();
                remove(&mut m, rows, cols, "layer");
                m
            })
        };
        let one = run(1);
        assert!(one.iter().zip(&r).any(|(a, b)| a != b));
        assert_eq!(one, run(3));
    }

    #[test]
    fn thin_matrices_are_left_alone() {
        let mut r = vec![1.0f32; 7 * 20_000];
        assert_eq!(remove(&mut r, 7, 20_000, "thin"), 0);
        assert!(r.iter().all(|&x| x == 1.0));
    }
}
