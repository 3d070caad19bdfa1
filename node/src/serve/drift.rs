//! Input drift of a deployment: how far the rows it serves now have moved from the rows it
//! served first. The first [`REFERENCE_ROWS`] rows are the reference (each feature's mean and
//! standard deviation, kept in the store once complete); the last [`RECENT_ROWS`] rows after
//! them are the recent window. A feature's drift is the distance of its recent mean from its
//! reference mean in reference standard deviations; the deployment's score is the largest.
//! The rows are an MLP deployment's input numbers, and an encoder deployment's embeddings
//! of its input texts (where the model itself places them), the first [`MAX_FEATURES`] of
//! each; a retraining policy can fire on the score, and a rebaseline starts a new reference.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

/// Rows that make the reference.
pub const REFERENCE_ROWS: u64 = 1_000;
/// Rows in the recent window.
pub const RECENT_ROWS: usize = 1_000;
/// Recent rows needed before a score is given (the mean of 100 rows is within about 0.1
/// standard deviations of the truth).
pub const MIN_RECENT_ROWS: usize = 100;
/// Features followed: the first this many of a row.
pub const MAX_FEATURES: usize = 256;

/// A deployment's reference: per feature, the mean and sum of squared deviations of its first
/// rows (Welford's running form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reference {
    pub rows: u64,
    pub means: Vec<f64>,
    pub m2: Vec<f64>,
}

impl Reference {
    fn new(width: usize) -> Self {
        Self { rows: 0, means: vec![0.0; width], m2: vec![0.0; width] }
    }

    pub fn complete(&self) -> bool {
        self.rows >= REFERENCE_ROWS
    }

    fn add(&mut self, row: &[f32]) {
        self.rows += 1;
        let n = self.rows as f64;
        for ((x, mean), m2) in row.iter().zip(&mut self.means).zip(&mut self.m2) {
            let x = f64::from(*x);
            let d = x - *mean;
            *mean += d / n;
            *m2 += d * (x - *mean);
        }
    }

    fn std(&self, feature: usize) -> f64 {
        (self.m2[feature] / (self.rows.max(2) - 1) as f64).sqrt()
    }
}

/// What a deployment shows of its input drift.
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DriftView {
    /// Rows in the reference (complete at 1,000) and in the recent window (the last 1,000
    /// after it).
    pub reference_rows: u64,
    pub recent_rows: u64,
    /// The largest distance of a feature's recent mean from its reference mean, in reference
    /// standard deviations; absent until the reference is complete and 100 rows came after.
    pub score: Option<f64>,
    /// The feature (0-based) that moved most.
    pub feature: Option<usize>,
}

/// The drift of one deployment's inputs.
#[derive(Clone, Debug)]
pub struct Drift {
    reference: Reference,
    /// The recent rows, flat (`width` numbers each), and each feature's sum over them.
    recent: VecDeque<f32>,
    sums: Vec<f64>,
    /// Rows taken in since this tracker began.
    observed: u64,
}

impl Drift {
    /// Follows rows of `width` numbers (at most [`MAX_FEATURES`] of them), from a stored
    /// reference when there is one of that width.
    pub fn new(width: usize, stored: Option<Reference>) -> Self {
        let width = width.min(MAX_FEATURES);
        let reference = stored.filter(|r| r.means.len() == width).unwrap_or_else(|| Reference::new(width));
        Self { reference, recent: VecDeque::new(), sums: vec![0.0; width], observed: 0 }
    }

    pub fn width(&self) -> usize {
        self.sums.len()
    }

    /// Takes a row in; true when it completed the reference (to be stored). Rows too short
    /// or with a number that is not finite are left out.
    pub fn observe(&mut self, row: &[f32]) -> bool {
        let width = self.width();
        if width == 0 || row.len() < width || !row[..width].iter().all(|x| x.is_finite()) {
            return false;
        }
        let row = &row[..width];
        self.observed += 1;
        if !self.reference.complete() {
            self.reference.add(row);
            return self.reference.complete();
        }
        if self.recent.len() >= RECENT_ROWS * width {
            for sum in &mut self.sums {
                *sum -= f64::from(self.recent.pop_front().unwrap_or(0.0));
            }
        }
        for (sum, x) in self.sums.iter_mut().zip(row) {
            self.recent.push_back(*x);
            *sum += f64::from(*x);
        }
        false
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// Rows taken in since this tracker began.
    pub fn observed(&self) -> u64 {
        self.observed
    }

    pub fn recent_rows(&self) -> usize {
        self.recent.len() / self.width().max(1)
    }

    pub fn view(&self) -> DriftView {
        let recent = self.recent_rows();
        let scored = self.reference.complete() && recent >= MIN_RECENT_ROWS;
        let (feature, score) = if scored {
            (0..self.width())
                .map(|j| {
                    let shift = (self.sums[j] / recent as f64 - self.reference.means[j]).abs();
                    // a feature constant in the reference that moves has moved a great deal
                    let std = self.reference.std(j).max(1e-9);
                    (j, (shift / std).min(1e9))
                })
                .fold(
                    (None, None),
                    |(bj, bs): (Option<usize>, Option<f64>), (j, s)| {
                        if bs.is_none_or(|b| s > b) { (Some(j), Some(s)) } else { (bj, bs) }
                    },
                )
        } else {
            (None, None)
        };
        DriftView { reference_rows: self.reference.rows, recent_rows: recent as u64, score, feature }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` rows drawn from normal distributions around `mean` (seeded, so the same each run).
    fn rows(n: usize, mean: [f32; 3], std: f32, seed: u64) -> Vec<Vec<f32>> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let normal = rand_distr::Normal::new(0.0, std).expect("a positive std");
        (0..n).map(|_| mean.iter().map(|m| m + rng.sample(normal)).collect()).collect()
    }

    #[test]
    fn the_same_inputs_score_low_and_moved_inputs_name_the_feature() {
        let mut drift = Drift::new(3, None);
        for (i, row) in rows(1_000, [0.0, 5.0, -2.0], 1.0, 1).iter().enumerate() {
            assert_eq!(drift.observe(row), i == 999, "the reference completes on its 1,000th row");
        }
        assert_eq!(drift.view().score, None, "no recent rows yet");
        for row in rows(99, [0.0, 5.0, -2.0], 1.0, 2) {
            drift.observe(&row);
        }
        assert_eq!(drift.view().score, None, "99 recent rows are too few");
        for row in rows(901, [0.0, 5.0, -2.0], 1.0, 3) {
            drift.observe(&row);
        }
        let same = drift.view();
        assert_eq!((same.reference_rows, same.recent_rows), (1_000, 1_000));
        assert!(same.score.unwrap() < 0.15, "{same:?}");

        // the second feature moves by two standard deviations; the window slides onto it
        for row in rows(1_000, [0.0, 7.0, -2.0], 1.0, 4) {
            drift.observe(&row);
        }
        let moved = drift.view();
        assert_eq!(moved.recent_rows, 1_000, "the window keeps the last 1,000 rows");
        assert_eq!(moved.feature, Some(1), "{moved:?}");
        assert!((moved.score.unwrap() - 2.0).abs() < 0.15, "{moved:?}");
    }

    #[test]
    fn short_or_non_finite_rows_are_left_out_and_a_stored_reference_is_kept() {
        let mut drift = Drift::new(2, None);
        assert!(!drift.observe(&[1.0]));
        assert!(!drift.observe(&[f32::NAN, 1.0]));
        assert_eq!(drift.view().reference_rows, 0);
        for _ in 0..1_000 {
            drift.observe(&[1.0, 2.0, 99.0]); // only the first two numbers are followed
        }
        let stored = drift.reference().clone();
        assert_eq!(stored.means, [1.0, 2.0]);
        // A constant feature that moves scores high, finitely.
        let mut again = Drift::new(2, Some(stored.clone()));
        for _ in 0..100 {
            again.observe(&[1.0, 3.0]);
        }
        let view = again.view();
        assert_eq!(view.feature, Some(1));
        assert!(view.score.unwrap().is_finite() && view.score.unwrap() > 1e6, "{view:?}");
        // A reference of another width is not used.
        assert_eq!(Drift::new(3, Some(stored)).view().reference_rows, 0);
    }
}
