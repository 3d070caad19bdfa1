//! `agora-bench artifacts [--gib N]`: ingest and read-back of an N GiB safetensors file
//! (default 1), beside blake3 hashing of the same file (one thread, as the store hashes, and
//! all cores, as `b3sum` does) in the same run:
//! - through a node: `POST /api/v1/models/register` (multipart, streamed from disk) and the
//!   owner's download, with the node process's peak RSS;
//! - at the store level (no HTTP), with this process's peak RSS;
//! - and the floor of any durable ingest: the disk's copy-and-fsync over the least share of the
//!   bytes a coder can store them in.

use std::{io::Read, time::Instant};

use agora_node::{
    artifacts::{ArtifactStore, MasterKey},
    store::Store,
};

pub async fn run(gib: f64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("weights.safetensors");
    let bytes = write_weights(&path, (gib * (1u64 << 30) as f64) as usize)?;
    let mb = |seconds: f64| bytes as f64 / seconds / 1e6;
    println!("artifacts: {:.2} GiB safetensors file, page cache warm", bytes as f64 / (1u64 << 30) as f64);

    // The store alone first: the all-cores hash below maps the whole file, which would count
    // in this process's peak RSS.
    let path_for_store = path.clone();
    let store_level = tokio::task::spawn_blocking(move || store_level(&path_for_store, bytes)).await??;
    let (ingest, read_back, hash_one, disk, stored, peak, rss_before) = store_level;
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(&path)?;
    let expected = hasher.finalize();
    let hash_all = started.elapsed().as_secs_f64();
    let (upload, download, node_peak) = through_node(&path, bytes, expected).await?;

    println!("{:<50} {:>9}", "", "MB/s");
    println!("{:<50} {:>9.0}", "blake3, one thread (baseline)", mb(hash_one));
    println!("{:<50} {:>9.0}", "blake3, all cores (b3sum; baseline)", mb(hash_all));
    println!("{:<50} {:>9.0}", "copy to a new file + fsync (disk ceiling; baseline)", mb(disk));
    println!(
        "{:<50} {:>9.0}  ({:.0}% of b3sum, {:.0}% of the disk ceiling)",
        "POST /api/v1/models/register (HTTP, streamed)",
        mb(upload),
        100.0 * hash_all / upload,
        100.0 * disk / upload
    );
    println!("{:<50} {:>9.0}", "GET .../versions/1/artifact (HTTP)", mb(download));
    println!(
        "{:<50} {:>9.0}  ({:.0}% of b3sum, {:.0}% of the disk ceiling)",
        "store ingest (hash, zstd, encrypt, fsync)",
        mb(ingest),
        100.0 * hash_all / ingest,
        100.0 * disk / ingest
    );
    println!("{:<50} {:>9.0}", "store read back (decrypt, decompress)", mb(read_back));
    // The floor of a durable ingest: it writes what it stores and syncs it, so it cannot be
    // faster than the disk ceiling over the smallest share of the bytes it could store.
    let least = least_stored_share(&path)?;
    println!(
        "floor: these bytes store in no less than {:.1}% (entropy of their byte planes), so a durable \
         ingest runs at most {:.0} MB/s, {:.0}% of b3sum",
        100.0 * least,
        mb(disk) / least,
        100.0 * hash_all / (disk * least)
    );
    println!(
        "stored {:.1}% of the plaintext; node peak RSS {} MiB through upload and download; \
         store-level peak RSS {} MiB (before {} MiB)",
        100.0 * stored as f64 / bytes as f64,
        node_peak / 1024,
        peak / 1024,
        rss_before / 1024
    );
    Ok(())
}

/// Uploads through a node on a local chain and downloads it back: (upload s, download s, the
/// node's peak RSS in KiB).
async fn through_node(
    path: &std::path::Path,
    bytes: usize,
    expected: blake3::Hash,
) -> anyhow::Result<(f64, f64, u64)> {
    const TOKEN: &str = "benchmark-operator-token-0123456789";
    let (_market, _data, node) = super::chain_and_node(TOKEN).await?;
    let client = reqwest::Client::new();
    let file = tokio::fs::File::open(path).await?;
    let chunks = futures::stream::unfold(file, |mut file| async move {
        use tokio::io::AsyncReadExt;
        let mut buf = vec![0u8; 1 << 20];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    });
    let form = reqwest::multipart::Form::new().text("metadata", r#"{"name": "bench"}"#).part(
        "artifact",
        reqwest::multipart::Part::stream(reqwest::Body::wrap_stream(chunks)).file_name("weights.safetensors"),
    );
    let started = Instant::now();
    let response = client
        .post(format!("{}/api/v1/models/register", node.url))
        .bearer_auth(TOKEN)
        .multipart(form)
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    let upload = started.elapsed().as_secs_f64();
    anyhow::ensure!(status.as_u16() == 201, "register answered {status}: {body}");
    anyhow::ensure!(
        body["file"]["blake3"] == expected.to_hex().as_str(),
        "the node hashed the file differently: {body}"
    );

    let started = Instant::now();
    let mut response = client
        .get(format!("{}/api/v1/models/bench/versions/1/artifact", node.url))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .error_for_status()?;
    let mut hasher = blake3::Hasher::new();
    let mut received = 0usize;
    while let Some(chunk) = response.chunk().await? {
        received += chunk.len();
        hasher.update(&chunk);
    }
    let download = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        received == bytes && hasher.finalize() == expected,
        "the download differs from the upload"
    );
    let peak = peak_rss_kib(&format!("/proc/{}/status", node.process.pid()));
    Ok((upload, download, peak))
}

type StoreLevel = (f64, f64, f64, f64, u64, u64, u64);

/// The store alone: (ingest s, read-back s, one-thread hashing s, copy-and-fsync s, stored
/// bytes, peak RSS KiB, RSS before KiB).
fn store_level(path: &std::path::Path, bytes: usize) -> anyhow::Result<StoreLevel> {
    let dir = tempfile::tempdir()?;

    let store = Store::open(&dir.path().join("db"))?;
    let artifacts =
        ArtifactStore::open(&dir.path().join("artifacts"), MasterKey::from_bytes([3; 32]), store)?;
    let rss_before = peak_rss_kib("/proc/self/status");
    let started = Instant::now();
    let info = artifacts.put(std::fs::File::open(path)?, u64::MAX)?;
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
    let peak = peak_rss_kib("/proc/self/status");
    let started = Instant::now();
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    let hash_one = started.elapsed().as_secs_f64();
    // The disk's ceiling: the same bytes copied to a new file and fsynced, as the store's write
    // ends with an fsync.
    let started = Instant::now();
    let copy = dir.path().join("copy.bin");
    {
        let mut out = std::fs::File::create(&copy)?;
        std::io::copy(&mut std::fs::File::open(path)?, &mut out)?;
        out.sync_all()?;
    }
    let disk = started.elapsed().as_secs_f64();
    std::fs::remove_file(&copy)?;
    Ok((ingest, read_back, hash_one, disk, info.stored, peak, rss_before))
}

/// A safetensors file of about `bytes` bytes holding one bf16 matrix of bf16-like bytes (a
/// smooth high byte and a noisy low byte, as real weights compress). Returns the file's size.
fn write_weights(path: &std::path::Path, bytes: usize) -> anyhow::Result<usize> {
    use std::io::Write;
    let rows = (bytes / 2 / 1024).max(1);
    let data = rows * 1024 * 2;
    let header = format!(r#"{{"w":{{"dtype":"BF16","shape":[{rows},1024],"data_offsets":[0,{data}]}}}}"#);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(header.as_bytes())?;
    let bytes = data;
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
    Ok(8 + header.len() + data)
}

/// The smallest share of `path`'s size that a coder of independent bytes can store it in: the
/// order-0 entropy of its byte planes (every byte, every 2nd, every 4th, as the store splits
/// them), the best of the three. The bench's bytes are made independent, so no coder does
/// better on them.
fn least_stored_share(path: &std::path::Path) -> anyhow::Result<f64> {
    let mut counts = [[0u64; 256]; 4];
    let mut file = std::fs::File::open(path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            break;
        }
        // a byte's lane is its offset in the file modulo 4, however the reads fall
        let phase = (total % 4) as usize;
        for (i, &b) in block[..n].iter().enumerate() {
            counts[(phase + i) % 4][b as usize] += 1;
        }
        total += n as u64;
    }
    let entropy_bits = |hist: &[u64; 256]| {
        let sum: u64 = hist.iter().sum();
        hist.iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = c as f64 / sum as f64;
                -(c as f64) * p.log2()
            })
            .sum::<f64>()
    };
    let merged = |stride: usize| -> f64 {
        (0..stride)
            .map(|plane| {
                let mut hist = [0u64; 256];
                for (lane, counts) in counts.iter().enumerate() {
                    if lane % stride == plane {
                        for (h, c) in hist.iter_mut().zip(counts) {
                            *h += c;
                        }
                    }
                }
                entropy_bits(&hist)
            })
            .sum()
    };
    let best = [1, 2, 4].into_iter().map(merged).fold(f64::INFINITY, f64::min);
    Ok(best / 8.0 / total.max(1) as f64)
}

fn peak_rss_kib(status: &str) -> u64 {
    std::fs::read_to_string(status)
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_owned))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}
