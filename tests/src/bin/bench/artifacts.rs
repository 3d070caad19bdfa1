//! `agora-bench artifacts [--gib N]`: the artifact store's ingest and read-back of an N GiB
//! safetensors-like file (default 1), beside blake3 hashing of the same file (one thread, as
//! the store hashes, and all cores, as `b3sum` does) in the same run, and the peak RSS.
//! Store level: the HTTP upload path (`POST /api/v1/models/register`) comes with the registry.

use std::{io::Read, time::Instant};

use agora_node::{
    artifacts::{ArtifactStore, MasterKey},
    store::Store,
};

pub fn run(gib: f64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("weights.bin");
    let bytes = (gib * (1u64 << 30) as f64) as usize;
    write_weights(&path, bytes)?;
    let mb = |seconds: f64| bytes as f64 / seconds / 1e6;
    println!("artifacts: {:.2} GiB file, page cache warm", bytes as f64 / (1u64 << 30) as f64);

    let store = Store::open(&dir.path().join("db"))?;
    let artifacts =
        ArtifactStore::open(&dir.path().join("artifacts"), MasterKey::from_bytes([3; 32]), store)?;
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let info = artifacts.put(std::fs::File::open(&path)?, u64::MAX)?;
    let ingest = started.elapsed().as_secs_f64();
    let hash: [u8; 32] = *blake3::Hash::from_hex(&info.blake3)?.as_bytes();
    let started = Instant::now();
    let mut reader = artifacts.read_range(&hash, 0, u64::MAX)?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut read = 0usize;
    loop {
        let n = reader.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        read += n;
    }
    let read_back = started.elapsed().as_secs_f64();
    assert_eq!(read, bytes);
    let peak = peak_rss_kib();
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(&path)?, &mut hasher)?;
    let hash_one = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(&path)?;
    let hash_all = started.elapsed().as_secs_f64();

    println!("{:<46} {:>9}", "", "MB/s");
    println!("{:<46} {:>9.0}", "blake3, one thread (baseline)", mb(hash_one));
    println!("{:<46} {:>9.0}", "blake3, all cores (b3sum; baseline)", mb(hash_all));
    println!(
        "{:<46} {:>9.0}  ({:.0}% of one-thread hashing)",
        "ingest (hash, zstd, encrypt, fsync)",
        mb(ingest),
        100.0 * hash_one / ingest
    );
    println!("{:<46} {:>9.0}", "read back (decrypt, decompress)", mb(read_back));
    println!(
        "stored {:.1}% of the plaintext; peak RSS {} MiB through ingest and read-back (before them {} MiB)",
        100.0 * info.stored as f64 / bytes as f64,
        peak / 1024,
        rss_before / 1024
    );
    Ok(())
}

/// bf16-like bytes: a smooth high byte and noisy low byte, as real weights compress.
fn write_weights(path: &std::path::Path, bytes: usize) -> anyhow::Result<()> {
    use std::io::Write;
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < bytes {
        for pair in block.chunks_exact_mut(2) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            pair[0] = state as u8;
            pair[1] = 0x3C + ((state >> 32) % 3) as u8;
        }
        let n = block.len().min(bytes - written);
        file.write_all(&block[..n])?;
        written += n;
    }
    file.flush()?;
    Ok(())
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
