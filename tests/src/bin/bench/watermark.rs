//! `agora-bench watermark [--gib N]`: embed and verify on N GiB (default 1) of bf16 weights, on
//! one thread and on all cores, beside memcpy and a streaming read of the same bytes measured in
//! the same run; then a trace of 1,000 licenses over 100 M weights.

use std::{path::Path, time::Instant};

use agora_watermark::{
    MasterKey, ModelFile, Options, embed, embed_tensor,
    stream::{CHUNK, TensorStream, WORDS},
    trace, verify_owner,
};
use rayon::prelude::*;

const ROWS: usize = 8192;
const COLS: usize = 1024;

pub fn run(gib: f64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let tensors = ((gib * (1u64 << 30) as f64) / (ROWS * COLS * 2) as f64).ceil() as usize;
    let original = dir.path().join("original.safetensors");
    let bytes = write_model(&original, tensors)?;
    let cores = rayon::current_num_threads();
    println!(
        "watermark: {tensors} bf16 tensors of {ROWS}x{COLS}, {:.2} GiB, {cores} cores",
        bytes as f64 / (1u64 << 30) as f64
    );
    let key = MasterKey::from_bytes([5; 32]).model_key(&[1; 32]);
    let license = key.license(7);

    let file = ModelFile::open(&original)?;
    let data = &file.map[file.header_len..];
    let mut out = vec![0u8; data.len()];
    out.copy_from_slice(data); // fault the pages in
    let gbps = |seconds: f64, bytes: usize| bytes as f64 / seconds / 1e9;

    println!("\n{:<44} {:>10} {:>10}", "in memory (GB/s of weights)", "1 thread", format!("{cores} threads"));
    let memcpy = both(|| {
        time(|| {
            out.par_chunks_mut(1 << 22).zip(data.par_chunks(1 << 22)).for_each(|(d, s)| d.copy_from_slice(s))
        })
    });
    let read = both(|| {
        time(|| {
            let sum: u64 = data.par_chunks(1 << 22).map(sum_words).reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum);
        })
    });
    let embed_memory = both(|| {
        time(|| {
            for (t, (s, d)) in
                file.tensors.iter().zip(data.chunks(ROWS * COLS * 2).zip(out.chunks_mut(ROWS * COLS * 2)))
            {
                embed_tensor(&key, Some(&license), t, s, d);
            }
        })
    });
    // The keystreams the scheme fixes for every weight, made alone: partition, owner and
    // license bits and one coin byte (1.375 bytes a weight), as the mark makes them, chunk by
    // chunk. An embed makes all of them whatever else it does.
    let keystreams = both(|| {
        time(|| {
            for tensor in &file.tensors {
                let kind = tensor.kind.expect("bf16 tensors");
                let stream = |key: &[u8; 32]| TensorStream::new(key, &tensor.name, kind, &tensor.shape);
                let bits = [
                    stream(key.partition().expose()),
                    stream(key.owner().expose()),
                    stream(license.expose()),
                ];
                let coin = stream(key.coin().expose());
                (0..tensor.elements().div_ceil(CHUNK)).into_par_iter().for_each_init(
                    || (vec![0u64; WORDS], vec![0u8; CHUNK]),
                    |(words, coins), chunk| {
                        for bits in &bits {
                            bits.fill(chunk * CHUNK, words);
                        }
                        coin.fill_bytes(chunk * CHUNK, coins);
                        std::hint::black_box((&words, &coins));
                    },
                );
            }
        })
    });
    row("memcpy (baseline)", memcpy, data.len(), gbps);
    row("streaming read (baseline)", read, data.len(), gbps);
    row("embed, owner + fingerprint", embed_memory, data.len(), gbps);
    ratio("embed / memcpy", embed_memory, memcpy);
    row("its keystreams alone (1.375 bytes a weight)", keystreams, data.len(), gbps);
    ratio("keystreams / memcpy", keystreams, memcpy);

    println!(
        "\n{:<44} {:>10} {:>10}",
        "files, page cache warm (GB/s of file)",
        "1 thread",
        format!("{cores} threads")
    );
    let marked = dir.path().join("marked.safetensors");
    let embed_file = (
        timed(|| embed(&original, &marked, &key, Some(&license), &Options::threads(1)).map(drop))?,
        timed(|| embed(&original, &marked, &key, Some(&license), &Options::default()).map(drop))?,
    );
    row("embed file to file, blake3 in the same pass", embed_file, bytes, gbps);
    ratio("embed file / memcpy", embed_file, memcpy);
    let suspect = ModelFile::open(&marked)?;
    let read_both = both(|| {
        time(|| {
            let sum = |d: &[u8]| d.par_chunks(1 << 22).map(sum_words).reduce(|| 0, u64::wrapping_add);
            std::hint::black_box(sum(&file.map) ^ sum(&suspect.map));
        })
    });
    let verify = (
        timed(|| verify_owner(&marked, Some(&original), &key, &Options::threads(1)).map(drop))?,
        timed(|| verify_owner(&marked, Some(&original), &key, &Options::default()).map(drop))?,
    );
    let blind = (
        timed(|| verify_owner(&marked, None, &key, &Options::threads(1)).map(drop))?,
        timed(|| verify_owner(&marked, None, &key, &Options::default()).map(drop))?,
    );
    row("streaming read of original + suspect", read_both, 2 * bytes, gbps);
    row("verify non-blind (reads both)", verify, 2 * bytes, gbps);
    ratio("verify / streaming read", verify, read_both);
    row("streaming read of the suspect", read, bytes, gbps);
    row("verify blind (reads the suspect)", blind, bytes, gbps);
    ratio("blind verify / streaming read", blind, read);

    // trace: 1,000 licenses over 100 M weights
    let small = dir.path().join("trace-original.safetensors");
    let weights = write_model(&small, 12)? / 2;
    let small_marked = dir.path().join("trace-marked.safetensors");
    embed(&small, &small_marked, &key, Some(&key.license(500)), &Options::default())?;
    let ids: Vec<u128> = (1..=1000).collect();
    let started = Instant::now();
    let evidence = trace(&small_marked, &small, &key, &ids, &Options::default())?;
    let seconds = started.elapsed().as_secs_f64();
    let accused: Vec<String> =
        evidence.iter().filter(|e| e.verdict).map(|e| format!("{:?}", e.subject)).collect();
    let pairs = ids.len() as f64 * evidence[0].n as f64;
    println!(
        "\ntrace: 1,000 licenses over {:.0} M weights ({:.0} M in half B): {seconds:.2} s on {cores} cores, \
         {:.2e} license-weight pairs/s; accused {accused:?}",
        weights as f64 / 1e6,
        evidence[0].n as f64 / 1e6,
        pairs / seconds
    );

    // the owner claim on a file without the mark: the four statistics fall short, so the fifth
    // (each residual without its low-rank part) runs too; what a fine-tuned copy costs
    let started = Instant::now();
    let evidence = verify_owner(&small, Some(&small), &key, &Options::default())?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "verify without the mark (low_rank_removed runs): {:.0} M weights in {seconds:.2} s on {cores} cores \
         ({:.0} M weights/s); verdict {}",
        weights as f64 / 1e6,
        weights as f64 / 1e6 / seconds,
        evidence.verdict
    );
    Ok(())
}

/// Reads every byte of `bytes` (their sum as words): the streaming-read baseline. It reads whole
/// words in a loop with nothing else in it, so even unoptimised it runs at the memory's pace.
fn sum_words(bytes: &[u8]) -> u64 {
    // SAFETY: any 8 bytes are a valid u64; align_to only reinterprets the aligned middle part.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    let edges = head.iter().chain(tail).map(|&b| u64::from(b)).fold(0, u64::wrapping_add);
    words.iter().fold(edges, |sum, &word| sum.wrapping_add(word))
}

/// Runs `work` on one thread and on all cores, best of three each.
fn both(mut work: impl FnMut() -> f64 + Send) -> (f64, f64) {
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a pool");
    let single = one.install(|| (0..3).map(|_| work()).fold(f64::INFINITY, f64::min));
    let all = (0..3).map(|_| work()).fold(f64::INFINITY, f64::min);
    (single, all)
}

/// Best of three runs of `work` (which picks its own threads).
fn timed(mut work: impl FnMut() -> Result<(), agora_watermark::WatermarkError>) -> anyhow::Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        work()?;
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn time(work: impl FnOnce()) -> f64 {
    let started = Instant::now();
    work();
    started.elapsed().as_secs_f64()
}

fn row(what: &str, (single, all): (f64, f64), bytes: usize, gbps: impl Fn(f64, usize) -> f64) {
    println!("{what:<44} {:>10.2} {:>10.2}", gbps(single, bytes), gbps(all, bytes));
}

fn ratio(what: &str, (a1, an): (f64, f64), (b1, bn): (f64, f64)) {
    println!("{:<44} {:>10.2} {:>10.2}", format!("  {what}"), b1 / a1, bn / an);
}

/// Writes `tensors` bf16 matrices of varied weights (σ ≈ 0.02) and returns the data bytes.
fn write_model(path: &Path, tensors: usize) -> anyhow::Result<usize> {
    use std::io::Write;
    let size = ROWS * COLS * 2;
    let header: Vec<String> = (0..tensors)
        .map(|t| {
            format!(
                r#""layers.{t}.weight":{{"dtype":"BF16","shape":[{ROWS},{COLS}],"data_offsets":[{},{}]}}"#,
                t * size,
                (t + 1) * size
            )
        })
        .collect();
    let mut header = format!("{{{}}}", header.join(",")).into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    let mut buffer = vec![0u8; size];
    for t in 0..tensors {
        buffer.par_chunks_mut(1 << 16).enumerate().for_each(|(c, chunk)| {
            let mut state = (t as u64 + 1) << 32 | c as u64 | 1;
            for pair in chunk.chunks_exact_mut(2) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                // sum of two uniforms: a triangular bell, σ ≈ 0.02
                let (a, b) = ((state >> 40) as f32, ((state >> 16) & 0xFF_FFFF) as f32);
                let value = (a + b) / (1u64 << 24) as f32 * 0.049 - 0.049;
                pair.copy_from_slice(&((value.to_bits() >> 16) as u16).to_le_bytes());
            }
        });
        file.write_all(&buffer)?;
    }
    file.flush()?;
    Ok(tensors * size)
}
