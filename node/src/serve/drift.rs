//! Input drift of a deployment: how far the rows it serves now have moved from the rows it
//! served first. The first [`REFERENCE_ROWS`] rows are the reference (each feature's mean and
//! standard deviation, kept in the store once complete); the last [`RECENT_ROWS`] rows after
//! them are the recent window. A feature's drift is the distance of its recent mean from its
//! reference mean in reference standard deviations; the deployment's score is the largest.
//! A mean says nothing of a feature that spreads out, narrows or splits in two around the same
//! centre, so each feature's shape is followed too: the reference's deciles cut its values into
//! bins, and the population stability index (PSI) of the recent rows over those bins says how far
//! their distribution moved, whichever way; the deployment's PSI is the largest.
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
/// Bins a feature's values are counted in: cut at the reference's deciles.
pub const BINS: usize = 10;

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

/// Each feature's bins, cut at its reference minimum and deciles, with one more bin for values
/// above its reference maximum, and how many reference rows fell in each. Values outside what
/// the reference saw have bins of their own, so a feature constant in the reference that moves
/// either way leaves its bin. Stored beside the [`Reference`] when it completes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Bins {
    /// Per feature, its minimum and deciles, distinct and ascending: a value up to the maximum
    /// falls in the bin after the last edge at or below it (the first bin when it is below
    /// them all).
    pub edges: Vec<Vec<f32>>,
    /// Per feature, its reference maximum: a value above it falls in the last bin.
    pub tops: Vec<f32>,
    /// Per feature, the reference rows in each bin (two bins more than edges).
    pub counts: Vec<Vec<u32>>,
}

impl Bins {
    /// The bins of `rows` (flat, `width` numbers each).
    fn of(rows: &[f32], width: usize) -> Self {
        let n = rows.len() / width.max(1);
        let mut bins = Self { edges: Vec::new(), tops: Vec::new(), counts: Vec::new() };
        if n == 0 {
            return bins;
        }
        for j in 0..width {
            let mut values: Vec<f32> = rows.iter().skip(j).step_by(width).copied().collect();
            values.sort_by(f32::total_cmp);
            let mut cuts: Vec<f32> = (0..BINS).map(|k| values[k * n / BINS]).collect();
            cuts.dedup();
            bins.counts.push(vec![0u32; cuts.len() + 2]);
            bins.edges.push(cuts);
            bins.tops.push(values[n - 1]);
            for x in &values {
                let bin = bins.bin(j, *x);
                bins.counts[j][bin] += 1;
            }
        }
        bins
    }

    /// Counts of zero in every bin: where the recent window's counts start.
    fn empty(&self) -> Vec<Vec<u32>> {
        self.counts.iter().map(|c| vec![0; c.len()]).collect()
    }

    fn bin(&self, feature: usize, x: f32) -> usize {
        let edges = &self.edges[feature];
        if x > self.tops[feature] { edges.len() + 1 } else { edges.partition_point(|e| *e <= x) }
    }

    /// Whether these bins are for rows of `width` numbers.
    fn fits(&self, width: usize) -> bool {
        self.edges.len() == width
            && self.tops.len() == width
            && self.counts.len() == width
            && self.edges.iter().zip(&self.counts).all(|(e, c)| !e.is_empty() && c.len() == e.len() + 2)
    }
}

/// The population stability index of `recent` counts against `reference` counts over the same
/// bins: `Σ (r − q) ln(r / q)` over the bins' shares, each count given half a row so an empty bin
/// is finite. Under 0.1 the two are alike; over 0.25 the distribution moved. With 1,000 rows on
/// each side and a feature's 12 bins, the same distribution gives about 0.02 from sampling alone.
pub fn psi(reference: &[u32], recent: &[u32]) -> f64 {
    let bins = reference.len() as f64;
    let total = |c: &[u32]| c.iter().map(|&n| f64::from(n)).sum::<f64>() + 0.5 * bins;
    let (q_total, r_total) = (total(reference), total(recent));
    reference
        .iter()
        .zip(recent)
        .map(|(&q, &r)| {
            let (q, r) = ((f64::from(q) + 0.5) / q_total, (f64::from(r) + 0.5) / r_total);
            (r - q) * (r / q).ln()
        })
        .sum()
}

/// What a deployment shows of its input drift.
#[derive(Clone, Debug, Default, PartialEq, Serialize, utoipa::ToSchema)]
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
    /// The largest population stability index of a feature's recent values over its reference
    /// deciles: under 0.1 alike, over 0.25 moved (in spread or shape as well as centre). Given
    /// with `score`, once the reference has its bins (a reference kept by a node before bins
    /// were followed has none until it is reset).
    pub psi: Option<f64>,
    /// The feature (0-based) whose distribution moved most.
    pub psi_feature: Option<usize>,
}

/// The drift of one deployment's inputs.
#[derive(Clone, Debug)]
pub struct Drift {
    reference: Reference,
    /// The reference's rows, flat, kept until it completes and its bins are cut.
    first: Vec<f32>,
    bins: Option<Bins>,
    /// The recent rows, flat (`width` numbers each), each feature's sum over them and, with
    /// bins, each feature's count per bin.
    recent: VecDeque<f32>,
    sums: Vec<f64>,
    recent_counts: Vec<Vec<u32>>,
    /// Rows taken in since this tracker began.
    observed: u64,
}

impl Drift {
    /// Follows rows of `width` numbers (at most [`MAX_FEATURES`] of them), from a stored
    /// reference (and its bins) when there is one of that width.
    pub fn new(width: usize, stored: Option<Reference>, bins: Option<Bins>) -> Self {
        let width = width.min(MAX_FEATURES);
        let reference = stored.filter(|r| r.means.len() == width && r.complete());
        let bins = bins.filter(|b| reference.is_some() && b.fits(width));
        let recent_counts = bins.as_ref().map(Bins::empty);
        Self {
            reference: reference.unwrap_or_else(|| Reference::new(width)),
            first: Vec::new(),
            bins,
            recent: VecDeque::new(),
            sums: vec![0.0; width],
            recent_counts: recent_counts.unwrap_or_default(),
            observed: 0,
        }
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
            self.first.extend_from_slice(row);
            if !self.reference.complete() {
                return false;
            }
            let bins = Bins::of(&std::mem::take(&mut self.first), width);
            self.recent_counts = bins.empty();
            self.bins = Some(bins);
            return true;
        }
        if self.recent.len() >= RECENT_ROWS * width {
            for j in 0..width {
                let x = self.recent.pop_front().unwrap_or(0.0);
                self.sums[j] -= f64::from(x);
                if let Some(bins) = &self.bins {
                    self.recent_counts[j][bins.bin(j, x)] -= 1;
                }
            }
        }
        for (j, x) in row.iter().enumerate() {
            self.recent.push_back(*x);
            self.sums[j] += f64::from(*x);
            if let Some(bins) = &self.bins {
                self.recent_counts[j][bins.bin(j, *x)] += 1;
            }
        }
        false
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The reference's bins, once it is complete.
    pub fn bins(&self) -> Option<&Bins> {
        self.bins.as_ref()
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
            largest((0..self.width()).map(|j| {
                let shift = (self.sums[j] / recent as f64 - self.reference.means[j]).abs();
                // a feature constant in the reference that moves has moved a great deal
                let std = self.reference.std(j).max(1e-9);
                (j, (shift / std).min(1e9))
            }))
        } else {
            (None, None)
        };
        let (psi_feature, psi) = match &self.bins {
            Some(bins) if scored => {
                largest(bins.counts.iter().zip(&self.recent_counts).map(|(q, r)| psi(q, r)).enumerate())
            }
            _ => (None, None),
        };
        DriftView {
            reference_rows: self.reference.rows,
            recent_rows: recent as u64,
            score,
            feature,
            psi,
            psi_feature,
        }
    }
}

/// The feature with the largest value, and that value.
fn largest(values: impl Iterator<Item = (usize, f64)>) -> (Option<usize>, Option<f64>) {
    values.fold(
        (None, None),
        |(bj, bs), (j, s)| if bs.is_none_or(|b| s > b) { (Some(j), Some(s)) } else { (bj, bs) },
    )
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
        let mut drift = Drift::new(3, None, None);
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
        assert!(same.psi.unwrap() < 0.06, "{same:?}");

        // the second feature moves by two standard deviations; the window slides onto it
        for row in rows(1_000, [0.0, 7.0, -2.0], 1.0, 4) {
            drift.observe(&row);
        }
        let moved = drift.view();
        assert_eq!(moved.recent_rows, 1_000, "the window keeps the last 1,000 rows");
        assert_eq!(moved.feature, Some(1), "{moved:?}");
        assert!((moved.score.unwrap() - 2.0).abs() < 0.15, "{moved:?}");
        assert_eq!(moved.psi_feature, Some(1), "{moved:?}");
        assert!(moved.psi.unwrap() > 1.0, "{moved:?}");
    }

    #[test]
    fn a_feature_that_spreads_out_around_the_same_mean_moves_the_psi_not_the_score() {
        let mut drift = Drift::new(3, None, None);
        for row in rows(1_000, [0.0, 5.0, -2.0], 1.0, 11) {
            drift.observe(&row);
        }
        let bins = drift.bins().unwrap();
        assert!(bins.edges.iter().all(|e| e.len() == BINS), "{bins:?}");
        for counts in &bins.counts {
            assert_eq!(counts[0], 0, "nothing below the minimum: {bins:?}");
            assert_eq!(counts[counts.len() - 1], 0, "nothing above the maximum: {bins:?}");
            assert!(counts[1..=BINS].iter().all(|n| *n == 100), "deciles cut 100 rows a bin: {bins:?}");
        }
        // the third feature's spread triples; every mean stays where it was
        let mut rng_rows = rows(1_000, [0.0, 5.0, -2.0], 1.0, 12);
        for (row, wide) in rng_rows.iter_mut().zip(rows(1_000, [0.0, 0.0, 0.0], 3.0, 13)) {
            row[2] = -2.0 + wide[2];
        }
        for row in &rng_rows {
            drift.observe(row);
        }
        let view = drift.view();
        assert!(view.score.unwrap() < 0.3, "the means barely move: {view:?}");
        assert_eq!(view.psi_feature, Some(2), "{view:?}");
        assert!(view.psi.unwrap() > 0.5, "{view:?}");
    }

    #[test]
    fn the_psi_of_alike_counts_is_zero_and_grows_as_they_part() {
        assert_eq!(psi(&[100; 10], &[50; 10]), 0.0);
        let skewed = [10, 10, 10, 10, 10, 10, 10, 10, 10, 910];
        assert!(psi(&[100; 10], &skewed) > psi(&[100; 10], &[80, 80, 80, 80, 80, 120, 120, 120, 120, 120]));
        // an empty bin on either side stays finite
        assert!(psi(&[0, 1_000], &[1_000, 0]).is_finite());
    }

    #[test]
    fn short_or_non_finite_rows_are_left_out_and_a_stored_reference_is_kept() {
        let mut drift = Drift::new(2, None, None);
        assert!(!drift.observe(&[1.0]));
        assert!(!drift.observe(&[f32::NAN, 1.0]));
        assert_eq!(drift.view().reference_rows, 0);
        for _ in 0..1_000 {
            drift.observe(&[1.0, 2.0, 99.0]); // only the first two numbers are followed
        }
        let stored = drift.reference().clone();
        assert_eq!(stored.means, [1.0, 2.0]);
        let bins = drift.bins().cloned().unwrap();
        assert_eq!(bins.edges, [vec![1.0], vec![2.0]], "a constant feature has one edge");
        assert_eq!(bins.counts, [vec![0, 1_000, 0], vec![0, 1_000, 0]], "below, at, above");
        // A constant feature that moves scores high, finitely.
        let mut again = Drift::new(2, Some(stored.clone()), Some(bins.clone()));
        for _ in 0..100 {
            again.observe(&[1.0, 3.0]);
        }
        let view = again.view();
        assert_eq!(view.feature, Some(1));
        assert!(view.score.unwrap().is_finite() && view.score.unwrap() > 1e6, "{view:?}");
        assert_eq!(view.psi_feature, Some(1));
        assert!(view.psi.unwrap().is_finite() && view.psi.unwrap() > 3.0, "{view:?}");
        // A reference kept without bins scores its means only; bins of another width are not used.
        let mut unbinned = Drift::new(2, Some(stored.clone()), None);
        for _ in 0..100 {
            unbinned.observe(&[1.0, 3.0]);
        }
        assert_eq!((unbinned.view().feature, unbinned.view().psi), (Some(1), None));
        let narrower = Bins { edges: vec![vec![1.0]], tops: vec![1.0], counts: vec![vec![0, 1_000, 0]] };
        assert!(Drift::new(2, Some(stored.clone()), Some(narrower)).bins().is_none());
        // A reference of another width is not used.
        assert_eq!(Drift::new(3, Some(stored), Some(bins)).view().reference_rows, 0);
    }
}
