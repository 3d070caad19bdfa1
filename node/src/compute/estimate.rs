//! Training requirements and the broker's choice among offers.
//!
//! Requirements (the README states the same formulas):
//! - FLOPs = 6 · P · S · E, with P parameters, S samples per epoch and E epochs. For
//!   transformer-like models a sample is a token (forward ≈ 2·P FLOPs per token, backward ≈ 4·P);
//!   the MLP family does the same work per row: one multiply-add per weight forward (2·P),
//!   two backward (input and weight gradients, 4·P). Biases and activations are left out.
//! - Memory: MLPs train in f32 with Adam: weights 4·P, gradients 4·P, optimizer state 8·P
//!   bytes, activations 2 · batch · Σ layer widths · 4 bytes (values and their gradients).
//!   Transformers train in bf16 with f32 master weights and Adam: weights 2·P, gradients 2·P,
//!   optimizer state 12·P bytes; activations 34 · s · b · h · L bytes (sequence s, batch b,
//!   hidden size h, L layers; flash attention, no recomputation) when `config.json` gives h
//!   and L, otherwise twice the weights.
//! - GPU-hours on a GPU model = FLOPs / (peak dense bf16 FLOP/s · utilisation) / 3600.
//!
//! The broker quotes every offer that meets the constraints: GPU-hours reserved = the
//! estimate rounded up to whole hours (the contract's unit), cost = GPU-hours × price,
//! duration = estimate / GPU count (data-parallel scaling assumed linear), start = the
//! later of now and the offer's availability. It chooses the cheapest that meets the
//! deadline; ties go to the more reliable provider (settled ÷ closed reservations in the
//! index, with a prior of one each), then to the lower peer latency.

use std::{cmp::Ordering, collections::HashMap};

use alloy::primitives::{Address, B256, U256};
use serde::{Deserialize, Serialize};

use super::offers::{KnownOffer, OfferKind};

/// Peak dense bf16 throughput (TFLOP/s) and memory (GiB) of the GPU models offers may name,
/// from the vendors' data sheets (SXM parts where there are several).
pub const GPU_TABLE: &[(&str, f64, u32)] = &[
    ("H200-141GB", 989.0, 141),
    ("H100-80GB", 989.0, 80),
    ("A100-80GB", 312.0, 80),
    ("A100-40GB", 312.0, 40),
    ("L40S-48GB", 362.0, 48),
    ("L4-24GB", 121.0, 24),
    ("A10-24GB", 125.0, 24),
    ("RTX4090-24GB", 165.0, 24),
    ("T4-16GB", 65.0, 16),
];

/// The assumed share of peak throughput a training run achieves (model FLOPs utilisation).
pub const DEFAULT_UTILISATION: f64 = 0.4;

/// Throughput figures: the table, extended or overridden by configuration.
#[derive(Clone, Debug)]
pub struct Throughput {
    /// (name, TFLOP/s, GiB)
    pub gpus: Vec<(String, f64, u32)>,
    pub utilisation: f64,
}

impl Default for Throughput {
    fn default() -> Self {
        Self {
            gpus: GPU_TABLE.iter().map(|(n, t, m)| ((*n).to_owned(), *t, *m)).collect(),
            utilisation: DEFAULT_UTILISATION,
        }
    }
}

impl Throughput {
    /// Peak TFLOP/s of a GPU model, by name (case-insensitive).
    pub fn tflops(&self, gpu: &str) -> Option<f64> {
        self.gpus.iter().find(|(n, _, _)| n.eq_ignore_ascii_case(gpu)).map(|(_, t, _)| *t)
    }

    /// Adds or replaces one GPU model.
    pub fn set(&mut self, name: &str, tflops: f64, memory_gb: u32) {
        self.gpus.retain(|(n, _, _)| !n.eq_ignore_ascii_case(name));
        self.gpus.push((name.to_owned(), tflops, memory_gb));
    }
}

/// How a model trains, which decides the formulas.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "family", rename_all = "snake_case")]
pub enum Family {
    /// Layer widths from its `config.json`.
    Mlp { layers: Vec<usize> },
    /// Hidden size and layer count when its `config.json` gives them.
    Transformer { hidden: Option<u64>, layers: Option<u64>, sequence: u64 },
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Memory {
    pub weights: u64,
    pub gradients: u64,
    pub optimizer: u64,
    pub activations: u64,
    pub total: u64,
}

/// `GET /api/v1/models/training-requirements`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Requirements {
    #[serde(flatten)]
    pub family: Family,
    pub parameters: u64,
    /// Rows (MLP) or tokens (transformer) per epoch.
    pub samples: u64,
    pub epochs: u32,
    pub batch: u64,
    pub flops: f64,
    pub formula: String,
    /// Bytes.
    pub memory: Memory,
    pub utilisation: f64,
    /// GPU-hours per GPU model of the throughput table.
    pub gpu_hours: Vec<GpuHours>,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuHours {
    pub gpu: String,
    pub tflops: f64,
    pub memory_gb: u32,
    pub gpu_hours: f64,
}

impl Requirements {
    pub fn new(
        family: Family,
        parameters: u64,
        samples: u64,
        epochs: u32,
        batch: u64,
        throughput: &Throughput,
    ) -> Self {
        let p = parameters;
        let flops = 6.0 * p as f64 * samples as f64 * f64::from(epochs);
        let (memory, formula) = match &family {
            Family::Mlp { layers } => {
                let widths: u64 = layers.iter().map(|w| *w as u64).sum();
                let activations = 2 * batch * widths * 4;
                (memory(4 * p, 4 * p, 8 * p, activations), "6 · parameters · rows · epochs".to_owned())
            }
            Family::Transformer { hidden, layers, sequence } => {
                let activations = match (hidden, layers) {
                    (Some(h), Some(l)) => 34 * sequence * batch * h * l,
                    _ => 4 * p,
                };
                (memory(2 * p, 2 * p, 12 * p, activations), "6 · parameters · tokens · epochs".to_owned())
            }
        };
        let gpu_hours = throughput
            .gpus
            .iter()
            .map(|(gpu, tflops, memory_gb)| GpuHours {
                gpu: gpu.clone(),
                tflops: *tflops,
                memory_gb: *memory_gb,
                gpu_hours: hours(flops, *tflops, throughput.utilisation),
            })
            .collect();
        Self {
            family,
            parameters,
            samples,
            epochs,
            batch,
            flops,
            formula,
            memory,
            utilisation: throughput.utilisation,
            gpu_hours,
        }
    }
}

fn memory(weights: u64, gradients: u64, optimizer: u64, activations: u64) -> Memory {
    Memory {
        weights,
        gradients,
        optimizer,
        activations,
        total: weights + gradients + optimizer + activations,
    }
}

fn hours(flops: f64, tflops: f64, utilisation: f64) -> f64 {
    flops / (tflops * 1e12 * utilisation) / 3600.0
}

/// What the buyer will accept (`POST /api/v1/models/estimate-cost`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Constraints {
    /// Wei (decimal).
    #[serde(default)]
    pub max_cost: Option<String>,
    /// Unix seconds by which training must finish.
    #[serde(default)]
    pub deadline: Option<u64>,
    #[serde(default)]
    pub kinds: Option<Vec<OfferKind>>,
    #[serde(default)]
    pub min_gpu_memory_gb: Option<u32>,
    /// Exact region, or a prefix ending in `*` (`eu-*`).
    #[serde(default)]
    pub region: Option<String>,
}

/// An offer the broker can weigh, with what the node knows of its provider.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub offer: KnownOffer,
    pub reliability: f64,
    pub latency_ms: Option<f64>,
}

/// One feasible offer, priced.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Quote {
    #[schema(value_type = String)]
    pub offer_hash: B256,
    #[schema(value_type = String)]
    pub provider: Address,
    pub node: String,
    pub gpu: String,
    pub gpu_count: u32,
    pub kind: OfferKind,
    pub region: String,
    /// Whole GPU-hours to reserve.
    pub gpu_hours: u64,
    /// The estimate before rounding.
    pub estimated_gpu_hours: f64,
    /// Wei (decimal in JSON).
    #[serde(with = "super::dec")]
    #[schema(value_type = String)]
    pub cost: U256,
    #[serde(with = "super::dec")]
    #[schema(value_type = String)]
    pub price_per_gpu_hour: U256,
    pub earliest_start: u64,
    /// Seconds the training is expected to take on the offer's GPUs.
    pub duration_secs: u64,
    pub finish: u64,
    /// When the reservation ends (the contract's end: start + whole hours).
    pub reservation_end: u64,
    pub reliability: f64,
    pub latency_ms: Option<f64>,
}

/// No offer meets a constraint.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("no offer meets the `{constraint}` constraint: {detail}")]
pub struct Infeasible {
    pub constraint: &'static str,
    pub detail: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Selection {
    pub chosen: Quote,
    /// Every feasible offer, cheapest first.
    pub feasible: Vec<Quote>,
}

/// Why one offer fails the constraints (the first it fails), or its quote.
fn quote(
    c: &Candidate,
    req: &Requirements,
    constraints: &Constraints,
    max_cost: Option<U256>,
    now: u64,
    throughput: &Throughput,
) -> Result<Quote, &'static str> {
    let o = &c.offer.offer;
    let tflops = throughput.tflops(&o.gpu).ok_or("gpu")?;
    let memory_total = u64::from(o.memoryGb).saturating_mul(u64::from(o.gpuCount)).saturating_mul(1 << 30);
    if req.memory.total > memory_total {
        return Err("memory");
    }
    if constraints.min_gpu_memory_gb.is_some_and(|min| o.memoryGb < min) {
        return Err("min_gpu_memory_gb");
    }
    let kind = OfferKind::from_u8(o.kind).ok_or("kinds")?;
    if constraints.kinds.as_ref().is_some_and(|kinds| !kinds.contains(&kind)) {
        return Err("kinds");
    }
    if let Some(region) = &constraints.region {
        let ok = match region.strip_suffix('*') {
            Some(prefix) => o.region.starts_with(prefix),
            None => o.region == *region,
        };
        if !ok {
            return Err("region");
        }
    }
    let estimated = hours(req.flops, tflops, throughput.utilisation);
    let gpu_hours = (estimated.ceil() as u64).max(1);
    let count = u64::from(o.gpuCount);
    let start = now.max(o.availableFrom);
    let reservation_end = start + gpu_hours.div_ceil(count) * 3600;
    if reservation_end > o.availableUntil || now > o.expiry {
        return Err("availability");
    }
    let duration_secs = (estimated / count as f64 * 3600.0).ceil() as u64;
    let finish = start + duration_secs;
    if constraints.deadline.is_some_and(|deadline| finish > deadline) {
        return Err("deadline");
    }
    let cost = U256::from(gpu_hours) * o.pricePerGpuHour;
    if max_cost.is_some_and(|max| cost > max) {
        return Err("max_cost");
    }
    Ok(Quote {
        offer_hash: c.offer.hash,
        provider: o.provider,
        node: o.node.clone(),
        gpu: o.gpu.clone(),
        gpu_count: o.gpuCount,
        kind,
        region: o.region.clone(),
        gpu_hours,
        estimated_gpu_hours: estimated,
        cost,
        price_per_gpu_hour: o.pricePerGpuHour,
        earliest_start: start,
        duration_secs,
        finish,
        reservation_end,
        reliability: c.reliability,
        latency_ms: c.latency_ms,
    })
}

/// The order constraints are reported in when nothing is feasible: the first one that no
/// remaining offer meets is named.
const CONSTRAINTS: [&str; 8] =
    ["gpu", "memory", "min_gpu_memory_gb", "kinds", "region", "availability", "deadline", "max_cost"];

fn better(a: &Quote, b: &Quote) -> Ordering {
    a.cost
        .cmp(&b.cost)
        .then_with(|| b.reliability.total_cmp(&a.reliability))
        .then_with(|| a.latency_ms.unwrap_or(f64::INFINITY).total_cmp(&b.latency_ms.unwrap_or(f64::INFINITY)))
        .then_with(|| a.offer_hash.cmp(&b.offer_hash))
}

/// Quotes every candidate and chooses one, or names the constraint nothing meets.
pub fn select(
    req: &Requirements,
    candidates: &[Candidate],
    constraints: &Constraints,
    now: u64,
    throughput: &Throughput,
) -> Result<Selection, Infeasible> {
    let max_cost = match &constraints.max_cost {
        Some(text) => Some(text.trim().parse::<U256>().map_err(|_| Infeasible {
            constraint: "max_cost",
            detail: format!("{text:?} is not a decimal number of wei"),
        })?),
        None => None,
    };
    if candidates.is_empty() {
        return Err(Infeasible {
            constraint: "offers",
            detail: "this node knows no live compute offers".into(),
        });
    }
    let mut feasible = Vec::new();
    let mut failed: HashMap<&'static str, usize> = HashMap::new();
    for c in candidates {
        match quote(c, req, constraints, max_cost, now, throughput) {
            Ok(q) => feasible.push(q),
            Err(why) => *failed.entry(why).or_default() += 1,
        }
    }
    if feasible.is_empty() {
        let constraint = CONSTRAINTS.iter().copied().find(|c| failed.contains_key(c)).unwrap_or("offers");
        let detail = detail(constraint, req, candidates, constraints, now, throughput);
        return Err(Infeasible { constraint, detail });
    }
    feasible.sort_by(better);
    Ok(Selection { chosen: feasible[0].clone(), feasible })
}

fn detail(
    constraint: &str,
    req: &Requirements,
    candidates: &[Candidate],
    constraints: &Constraints,
    now: u64,
    throughput: &Throughput,
) -> String {
    let n = candidates.len();
    match constraint {
        "gpu" => format!("none of the {n} offers names a GPU model with a known throughput"),
        "memory" => format!("training needs {} bytes; no offer's GPUs hold that much", req.memory.total),
        "min_gpu_memory_gb" => {
            format!("no offer has {} GiB per GPU", constraints.min_gpu_memory_gb.unwrap_or_default())
        }
        "kinds" => format!("no offer is of kind {:?}", constraints.kinds.clone().unwrap_or_default()),
        "region" => format!("no offer is in region {:?}", constraints.region.clone().unwrap_or_default()),
        "availability" => "no offer is available long enough for the reserved hours".into(),
        "deadline" => {
            let earliest = candidates
                .iter()
                .filter_map(|c| {
                    let relaxed = Constraints { deadline: None, max_cost: None, ..constraints.clone() };
                    quote(c, req, &relaxed, None, now, throughput).ok().map(|q| q.finish)
                })
                .min();
            match earliest {
                Some(t) => format!(
                    "the earliest finish is {t}, after the deadline {}",
                    constraints.deadline.unwrap_or_default()
                ),
                None => "no offer finishes in time".into(),
            }
        }
        "max_cost" => {
            format!("every offer costs more than {} wei", constraints.max_cost.clone().unwrap_or_default())
        }
        _ => format!("none of the {n} offers is feasible"),
    }
}

#[cfg(test)]
mod tests {
    use agora_contracts::ComputeMarket;

    use super::*;

    fn candidate(gpu: &str, count: u32, price_gwei: u64, kind: OfferKind, region: &str) -> Candidate {
        let offer = ComputeMarket::Offer {
            provider: Address::repeat_byte(count as u8),
            gpu: gpu.into(),
            gpuCount: count,
            memoryGb: 80,
            pricePerGpuHour: U256::from(price_gwei) * U256::from(1_000_000_000u64),
            kind: kind as u8,
            availableFrom: 0,
            availableUntil: 1_000_000,
            region: region.into(),
            node: "n".into(),
            nonce: U256::ZERO,
            expiry: 1_000_000,
        };
        let hash = B256::from(U256::from(price_gwei) + U256::from(count));
        Candidate {
            offer: KnownOffer { hash, offer, signature: vec![], source: "peer".into(), peer_id: None },
            reliability: 0.5,
            latency_ms: None,
        }
    }

    fn requirements() -> Requirements {
        // 1e9 parameters × 1e8 tokens × 6 = 6e17 FLOPs: 0.42 H100-hours, 1.34 A100-hours at 40 %
        Requirements::new(
            Family::Transformer { hidden: None, layers: None, sequence: 512 },
            1_000_000_000,
            100_000_000,
            1,
            8,
            &Throughput::default(),
        )
    }

    #[test]
    fn formulas() {
        let r = requirements();
        assert_eq!(r.flops, 6e17);
        let h100 = r.gpu_hours.iter().find(|g| g.gpu == "H100-80GB").unwrap();
        assert!((h100.gpu_hours - 6e17 / (989e12 * 0.4) / 3600.0).abs() < 1e-9);
        assert_eq!(r.memory.total, 16_000_000_000 + 4_000_000_000);
        let mlp = Requirements::new(
            Family::Mlp { layers: vec![4, 8, 2] },
            58,
            1000,
            10,
            32,
            &Throughput::default(),
        );
        assert_eq!(mlp.flops, 6.0 * 58.0 * 1000.0 * 10.0);
        assert_eq!(mlp.memory.total, 16 * 58 + 2 * 32 * 14 * 4);
    }

    #[test]
    fn cheapest_feasible_wins_and_constraints_change_the_choice() {
        let r = requirements();
        let offers = vec![
            candidate("H100-80GB", 1, 3000, OfferKind::Owned, "eu-west"),
            candidate("A100-80GB", 1, 1000, OfferKind::Spot, "us-east"),
            candidate("H100-80GB", 4, 2500, OfferKind::Partner, "eu-north"),
        ];
        let none = Constraints::default();
        let s = select(&r, &offers, &none, 0, &Throughput::default()).unwrap();
        // A100: 6e17 / (312e12·0.4) / 3600 = 1.34 → 2 GPU-hours at 1000 gwei = the cheapest
        assert_eq!(s.chosen.gpu, "A100-80GB");
        assert_eq!(s.chosen.gpu_hours, 2);
        assert_eq!(s.feasible.len(), 3);

        let no_spot = Constraints { kinds: Some(vec![OfferKind::Owned, OfferKind::Partner]), ..none.clone() };
        let s = select(&r, &offers, &no_spot, 0, &Throughput::default()).unwrap();
        assert_eq!((s.chosen.gpu.as_str(), s.chosen.gpu_count), ("H100-80GB", 4));

        // on four H100s it takes 380 s, on one 1 517 s, on the A100 4 808 s
        let soon = Constraints { deadline: Some(1_300), ..none.clone() };
        let s = select(&r, &offers, &soon, 0, &Throughput::default()).unwrap();
        assert_eq!(s.chosen.gpu_count, 4);
        assert_eq!(s.feasible.len(), 1);

        let eu = Constraints { region: Some("eu-*".into()), ..none.clone() };
        assert!(
            select(&r, &offers, &eu, 0, &Throughput::default())
                .unwrap()
                .feasible
                .iter()
                .all(|q| q.region.starts_with("eu-"))
        );

        let err = select(
            &r,
            &offers,
            &Constraints { deadline: Some(10), ..none.clone() },
            0,
            &Throughput::default(),
        )
        .unwrap_err();
        assert_eq!(err.constraint, "deadline");
        let err = select(
            &r,
            &offers,
            &Constraints { max_cost: Some("1".into()), ..none.clone() },
            0,
            &Throughput::default(),
        )
        .unwrap_err();
        assert_eq!(err.constraint, "max_cost");
        let err = select(
            &r,
            &offers,
            &Constraints { min_gpu_memory_gb: Some(200), ..none },
            0,
            &Throughput::default(),
        )
        .unwrap_err();
        assert_eq!(err.constraint, "min_gpu_memory_gb");
        assert_eq!(
            select(&r, &[], &Constraints::default(), 0, &Throughput::default()).unwrap_err().constraint,
            "offers"
        );
    }

    #[test]
    fn ties_go_to_reliability_then_latency() {
        let r = requirements();
        let mut a = candidate("H100-80GB", 2, 2000, OfferKind::Owned, "x");
        let mut b = candidate("H100-80GB", 2, 2000, OfferKind::Owned, "x");
        b.offer.hash = B256::repeat_byte(0xff);
        a.reliability = 0.6;
        b.reliability = 0.9;
        let s =
            select(&r, &[a.clone(), b.clone()], &Constraints::default(), 0, &Throughput::default()).unwrap();
        assert_eq!(s.chosen.offer_hash, b.offer.hash);
        a.reliability = 0.9;
        a.latency_ms = Some(40.0);
        b.latency_ms = Some(3.0);
        let s = select(&r, &[a, b.clone()], &Constraints::default(), 0, &Throughput::default()).unwrap();
        assert_eq!(s.chosen.offer_hash, b.offer.hash);
    }
}
