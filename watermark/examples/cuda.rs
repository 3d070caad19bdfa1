//! The CUDA path's benchmark, for a machine with an NVIDIA GPU (scripts/build-cuda builds it on
//! one without):
//! - marking a device-resident 1 GiB bf16 tensor, beside a device-to-device copy of it in the same
//!   run, and checked byte for byte against the CPU's marking of the same tensor;
//! - tracing 10,000 licenses over 1 B weights (files in the page cache), checked against the
//!   CPU's trace of the first licenses, whose time is the CPU baseline.
//!
//! `watermark-cuda [--weights N] [--licenses L]` (`--licenses 0`: the embed only)

use std::{error::Error, fs::File, io::Write, path::Path, time::Instant};

use agora_watermark::{MasterKey, Options, cuda, embed, trace};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

type Result<T> = std::result::Result<T, Box<dyn Error>>;

const COLS: usize = 4096;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let weights = flag("--weights", 1 << 30);
    let licenses = flag("--licenses", 10_000);
    let device = cuda::device(0)?;
    println!("CUDA device 0, {} CPU threads", rayon::current_num_threads());
    resident_embed(&device)?;
    if licenses > 0 {
        trace_many(&device, weights, licenses)?;
    }
    Ok(())
}

/// Best of five runs after one warm-up, each waited for on the device.
fn best<T>(device: &Device, mut work: impl FnMut() -> Result<T>) -> Result<f64> {
    work()?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let started = Instant::now();
        work()?;
        device.synchronize()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn resident_embed(device: &Device) -> Result<()> {
    let rows = (1usize << 29) / COLS; // 512 Mi bf16 weights: 1 GiB
    let bytes = (rows * COLS * 2) as f64;
    let weights = Tensor::randn(0f32, 0.02, (rows, COLS), device)?.to_dtype(DType::BF16)?;
    let model = MasterKey::from_bytes([5; 32]).model_key(&[1; 32]);
    let license = model.license(7);
    let name = "model.layers.0.mlp.up_proj.weight";
    let mark = cuda::Mark::new(&model, Some(&license), name, DType::BF16, &[rows, COLS])?;

    let dev = device.as_cuda_device()?;
    let (storage, _) = weights.storage_and_layout();
    let candle_core::Storage::Cuda(storage) = &*storage else { return Err("not on the device".into()) };
    let source = storage.as_cuda_slice::<half::bf16>()?;
    // SAFETY: written by the copies below before anything reads it (nothing does).
    let mut target = unsafe { dev.alloc::<half::bf16>(rows * COLS)? };
    let memcpy = best(device, || Ok(dev.memcpy_dtod(source, &mut target)?))?;
    let copy = best(device, || Ok(weights.copy()?))?;
    let histogram_time = best(device, || Ok(cuda::histogram(&weights)?))?;
    let marked_time = best(device, || Ok(weights.apply_op1_no_bwd(&mark)?))?;
    let histogram = cuda::histogram(&weights)?;
    let known = cuda::Mark::new(&model, Some(&license), name, DType::BF16, &[rows, COLS])?
        .with_histogram(&histogram)?;
    let per_license = best(device, || Ok(weights.apply_op1_no_bwd(&known)?))?;
    let tbps = |seconds: f64, moved: f64| moved / seconds / 1e12;
    let line = |what: &str, seconds: f64, moved: f64| {
        println!("  {what:<52} {:>8.3} ms {:>7.2} TB/s", seconds * 1e3, tbps(seconds, moved));
    };
    println!("\nresident embed, 1 GiB of bf16 on the device (TB/s counting bytes read + written)");
    line("memcpy device to device, preallocated (baseline)", memcpy, 2.0 * bytes);
    line("candle copy (allocates its output)", copy, 2.0 * bytes);
    line("code histogram (reads once)", histogram_time, bytes);
    line("embed, first copy: histogram + table + mark", marked_time, 2.0 * bytes);
    line("embed, each further license (histogram known)", per_license, 2.0 * bytes);
    println!(
        "  embed / memcpy: first copy {:.2}, each further license {:.2}",
        memcpy / marked_time,
        memcpy / per_license
    );

    // the same marks as the CPU's, bit for bit
    let on_gpu =
        weights.apply_op1_no_bwd(&mark)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<half::bf16>()?;
    let gpu_changed = mark.changed()?;
    let on_gpu_known =
        weights.apply_op1_no_bwd(&known)?.flatten_all()?.to_device(&Device::Cpu)?.to_vec1::<half::bf16>()?;
    let host = weights.to_device(&Device::Cpu)?;
    let started = Instant::now();
    let on_cpu = host.apply_op1_no_bwd(&mark)?.flatten_all()?.to_vec1::<half::bf16>()?;
    let cpu_seconds = started.elapsed().as_secs_f64();
    let differ =
        |gpu: &[half::bf16]| on_cpu.iter().zip(gpu).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let differing = differ(&on_gpu) + differ(&on_gpu_known);
    println!(
        "  CPU marking of the same tensor: {:.0} ms ({:.2} GB/s); {differing} of {} weights differ (both CUDA runs); changed {:?} (CUDA {:?})",
        cpu_seconds * 1e3,
        bytes / cpu_seconds / 1e9,
        on_cpu.len(),
        mark.changed()?,
        gpu_changed
    );
    if differing != 0 || mark.changed()? != gpu_changed {
        return Err("the CUDA marks differ from the CPU's".into());
    }
    Ok(())
}

/// `tensors` bf16 matrices of 4096 columns, Student-t-like values (a sum of uniforms, scaled).
fn write_model(path: &Path, weights: usize) -> Result<usize> {
    let per_tensor = 4096 * COLS;
    let tensors = weights.div_ceil(per_tensor);
    let mut header = serde_json::Map::new();
    for t in 0..tensors {
        let offsets = [t * per_tensor * 2, (t + 1) * per_tensor * 2];
        header.insert(
            format!("model.layers.{t}.mlp.up_proj.weight"),
            serde_json::json!({"dtype": "BF16", "shape": [4096, COLS], "data_offsets": offsets}),
        );
    }
    let mut header = serde_json::to_vec(&header)?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let mut file = File::create(path)?;
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    for t in 0..tensors {
        let mut body = vec![0u8; per_tensor * 2];
        body.par_chunks_mut(2 * 4096).enumerate().for_each(|(row, out)| {
            let mut state = (t * 4096 + row) as u64 * 0x9E37_79B9_7F4A_7C15 + 1;
            for pair in out.chunks_exact_mut(2) {
                let mut sum = 0f32;
                for _ in 0..4 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    sum += (state >> 40) as f32 / (1u64 << 24) as f32;
                }
                let value = half::bf16::from_f32((sum - 2.0) * 0.035);
                pair.copy_from_slice(&value.to_bits().to_le_bytes());
            }
        });
        file.write_all(&body)?;
    }
    Ok(tensors * per_tensor)
}

fn trace_many(device: &Device, weights: usize, licenses: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let original = dir.path().join("original.safetensors");
    let weights = write_model(&original, weights)?;
    let key = MasterKey::from_bytes([5; 32]).model_key(&[2; 32]);
    let marked = dir.path().join("marked.safetensors");
    let guilty = (licenses as u128 * 2 / 3).max(1);
    embed(&original, &marked, &key, Some(&key.license(guilty)), &Options::default())?;
    let ids: Vec<u128> = (1..=licenses as u128).collect();
    println!(
        "\ntrace: {licenses} licenses over {:.2} B weights, files in the page cache",
        weights as f64 / 1e9
    );
    let mut runs = Vec::new();
    let mut evidence = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        evidence = cuda::trace(device, &marked, &original, &key, &ids, &Options::default())?;
        runs.push(started.elapsed().as_secs_f64());
    }
    let accused: Vec<String> =
        evidence.iter().filter(|e| e.verdict).map(|e| format!("{:?}", e.subject)).collect();
    let pairs = licenses as f64 * weights as f64;
    let seconds = runs.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "  CUDA: {seconds:.2} s (first run {:.2} s, NVRTC compile included), {:.2e} license-weight pairs/s; \
         accused {accused:?} (marked for License(\"{guilty}\"))",
        runs[0],
        pairs / seconds
    );
    let sample = &ids[..16.min(ids.len())];
    let started = Instant::now();
    let cpu = trace(&marked, &original, &key, sample, &Options::default())?;
    let cpu_seconds = started.elapsed().as_secs_f64();
    // the sums behind each verdict (the thresholds differ: 16 hypotheses here, not 10,000)
    let sums = |e: &[agora_watermark::Evidence]| -> Result<String> {
        Ok(serde_json::to_string(&e.iter().map(|e| (e.n, e.erased, &e.statistics)).collect::<Vec<_>>())?)
    };
    let same = sums(&cpu)? == sums(&evidence[..sample.len()])?;
    println!(
        "  CPU baseline, {} licenses on {} threads: {cpu_seconds:.2} s, {:.2e} pairs/s; evidence identical to CUDA's: {same}",
        sample.len(),
        rayon::current_num_threads(),
        sample.len() as f64 * weights as f64 / cpu_seconds
    );
    if !same {
        return Err("the CUDA trace differs from the CPU's".into());
    }
    Ok(())
}
