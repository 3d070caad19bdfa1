//! `agora-bench compute [--offers N] [--rows N]`: the broker's decision over N offers (µs per
//! decision) beside a bare scan for the cheapest price over the same offers, and built-in MLP
//! training throughput (samples/s) beside a plain candle loop on the same model and batches.

use std::{collections::HashMap, time::Instant};

use agora_contracts::ComputeMarket;
use agora_node::{
    compute::{
        estimate::{Candidate, Constraints, Family, Requirements, Throughput, select},
        offers::{KnownOffer, OfferKind},
        train::{Dataset, Hyperparameters, Targets, Trainer},
    },
    serve::MlpConfig,
};
use alloy::primitives::{Address, B256, U256};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Module, Optimizer, VarBuilder, VarMap};

/// splitmix64: the same offers and data in every run.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn offers(n: usize) -> Vec<Candidate> {
    let gpus = ["H100-80GB", "A100-80GB", "A100-40GB", "L40S-48GB", "RTX4090-24GB", "T4-16GB"];
    let regions = ["eu-west", "eu-north", "us-east", "us-west", "ap-south"];
    let mut rng = 42;
    (0..n)
        .map(|i| {
            let offer = ComputeMarket::Offer {
                provider: Address::from_word(B256::from(U256::from(i % 500))),
                gpu: gpus[next(&mut rng) as usize % gpus.len()].into(),
                gpuCount: 1 + (next(&mut rng) % 8) as u32,
                memoryGb: 80,
                pricePerGpuHour: U256::from(500 + next(&mut rng) % 5_000) * U256::from(1_000_000_000u64),
                kind: (next(&mut rng) % 3) as u8,
                availableFrom: next(&mut rng) % 7_200,
                availableUntil: 30 * 86_400,
                region: regions[next(&mut rng) as usize % regions.len()].into(),
                node: "12D3KooWbench".into(),
                nonce: U256::ZERO,
                expiry: 30 * 86_400,
            };
            Candidate {
                offer: KnownOffer {
                    hash: B256::from(U256::from(i)),
                    offer,
                    signature: Vec::new(),
                    source: "peer".into(),
                    peer_id: None,
                },
                reliability: (next(&mut rng) % 100) as f64 / 100.0,
                latency_ms: Some((next(&mut rng) % 200) as f64),
            }
        })
        .collect()
}

fn bench_broker(n: usize) {
    let candidates = offers(n);
    let throughput = Throughput::default();
    // 1e9 parameters, 1e9 tokens: 6e18 FLOPs
    let req = Requirements::new(
        Family::Transformer { hidden: None, layers: None, sequence: 512 },
        1_000_000_000,
        1_000_000_000,
        1,
        8,
        &throughput,
    );
    let constraints = Constraints {
        deadline: Some(12 * 3600),
        kinds: Some(vec![OfferKind::Owned, OfferKind::Partner]),
        region: Some("eu-*".into()),
        ..Default::default()
    };
    let rounds = 50;
    let started = Instant::now();
    let mut chosen = None;
    for _ in 0..rounds {
        chosen = Some(select(&req, &candidates, &constraints, 0, &throughput).map(|s| s.chosen.offer_hash));
    }
    let broker_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    // The floor of any decision: one pass over the offers keeping the lowest price.
    let started = Instant::now();
    let mut cheapest = U256::MAX;
    for _ in 0..rounds {
        cheapest = candidates.iter().map(|c| c.offer.offer.pricePerGpuHour).min().unwrap_or(U256::MAX);
        std::hint::black_box(cheapest);
    }
    let scan_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!("broker: {n} offers, deadline + kinds + region constraints");
    println!("  decision           {broker_us:>10.1} µs   ({:.3} µs per offer)", broker_us / n as f64);
    println!("  bare cheapest scan {scan_us:>10.1} µs   (baseline, same offers)");
    println!("  chosen: {:?}; lowest price in the book {cheapest}", chosen.and_then(|c| c.ok()));
}

/// A classifier 64 → 256 → 256 → 10 and `rows` samples of a fixed random problem.
fn model_and_data(rows: usize) -> (MlpConfig, HashMap<String, Tensor>, Dataset) {
    let config =
        MlpConfig { layers: vec![64, 256, 256, 10], activation: "relu".into(), output: "softmax".into() };
    let mut rng = 7;
    let mut tensors = HashMap::new();
    for (i, pair) in config.layers.windows(2).enumerate() {
        let scale = (2.0 / pair[0] as f32).sqrt();
        let w: Vec<f32> =
            (0..pair[0] * pair[1]).map(|_| ((next(&mut rng) % 2001) as f32 / 1000.0 - 1.0) * scale).collect();
        tensors.insert(
            format!("layers.{i}.weight"),
            Tensor::from_vec(w, (pair[1], pair[0]), &Device::Cpu).unwrap(),
        );
        tensors.insert(format!("layers.{i}.bias"), Tensor::zeros(pair[1], DType::F32, &Device::Cpu).unwrap());
    }
    let x: Vec<f32> = (0..rows * 64).map(|_| (next(&mut rng) % 2001) as f32 / 1000.0 - 1.0).collect();
    let y: Vec<u32> = (0..rows)
        .map(|r| (x[r * 64..r * 64 + 8].iter().sum::<f32>() * 4.0).rem_euclid(10.0) as u32)
        .collect();
    (config, tensors, Dataset { rows, x, y: Targets::Classes(y) })
}

fn bench_training(rows: usize) -> anyhow::Result<()> {
    let (config, tensors, data) = model_and_data(rows);
    let hp = Hyperparameters { epochs: 3, batch_size: 256, learning_rate: 1e-3, ..Default::default() };
    let mut trainer = Trainer::new(config.clone(), tensors.clone())?;
    let started = Instant::now();
    let report = trainer.train(&data, &hp, |_, _| true)?;
    let ours = report.samples as f64 / started.elapsed().as_secs_f64();

    // The plain loop: candle_nn::Linear layers, AdamW, the same batches in order.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layers: Vec<candle_nn::Linear> = config
        .layers
        .windows(2)
        .enumerate()
        .map(|(i, p)| candle_nn::linear(p[0], p[1], vb.pp(format!("l{i}"))))
        .collect::<Result<_, _>>()?;
    let mut opt = candle_nn::AdamW::new(
        varmap.all_vars(),
        candle_nn::ParamsAdamW { lr: 1e-3, weight_decay: 0.0, ..Default::default() },
    )?;
    let Targets::Classes(y) = &data.y else { unreachable!("classes") };
    let started = Instant::now();
    let mut samples = 0u64;
    for _ in 0..hp.epochs {
        for start in (0..rows).step_by(hp.batch_size) {
            let n = hp.batch_size.min(rows - start);
            let x = Tensor::from_slice(&data.x[start * 64..(start + n) * 64], (n, 64), &Device::Cpu)?;
            let t = Tensor::from_slice(&y[start..start + n], n, &Device::Cpu)?;
            let mut h = x;
            for (i, layer) in layers.iter().enumerate() {
                h = layer.forward(&h)?;
                if i + 1 < layers.len() {
                    h = h.relu()?;
                }
            }
            let loss = candle_nn::loss::cross_entropy(&h, &t)?;
            opt.backward_step(&loss)?;
            samples += n as u64;
        }
    }
    let plain = samples as f64 / started.elapsed().as_secs_f64();
    println!("training: MLP 64→256→256→10 (softmax), {rows} rows × 3 epochs, batch 256, AdamW");
    println!(
        "  built-in executor  {ours:>10.0} samples/s   (losses {:.3} → {:.3})",
        report.losses[0], report.losses[2]
    );
    println!(
        "  plain candle loop  {plain:>10.0} samples/s   (baseline: same model and batches, no shuffle or progress)"
    );
    println!("  ratio {:.2}", ours / plain);
    Ok(())
}

pub fn run(offers: usize, rows: usize) -> anyhow::Result<()> {
    bench_broker(offers);
    bench_training(rows)
}
