//! `agora-bench flows [--gib N]`: the fingerprinted download of an N GiB model (default 1)
//! through a node — time to first byte and MB/s, cold (the first request makes the license's
//! copy) and warm (cached) — beside a plain read of the original file in the same run, and the
//! same file sent over one loopback TCP connection (the ceiling of any download here).

use std::time::Instant;

use alloy::primitives::B256;

const TOKEN: &str = "benchmark-operator-token-0123456789";

/// One bf16 matrix of [rows, 4096] with weight-like values.
fn write_model(path: &std::path::Path, bytes: usize) -> anyhow::Result<usize> {
    use std::io::Write;
    let cols = 4096usize;
    let rows = (bytes / 2 / cols).max(64);
    let data = rows * cols * 2;
    let header = format!(
        r#"{{"model.layers.0.mlp.weight":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[0,{data}]}}}}"#
    );
    let mut file = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(header.as_bytes())?;
    let mut x = 0x9E37_79B9u32;
    let mut block = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < data {
        for pair in block.chunks_exact_mut(2) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let bf16 = (((x >> 31) as u16) << 15) | ((0x79 + (x % 4) as u16) << 7) | ((x >> 8) & 0x7f) as u16;
            pair.copy_from_slice(&bf16.to_le_bytes());
        }
        let n = block.len().min(data - written);
        file.write_all(&block[..n])?;
        written += n;
    }
    file.flush()?;
    Ok(8 + header.len() + data)
}

/// (seconds to the first body byte, seconds in all, bytes).
async fn timed_download(
    client: &agora_node::client::NodeClient,
    path: &str,
) -> anyhow::Result<(f64, f64, usize)> {
    let started = Instant::now();
    let mut response =
        client.authorize(client.http.get(client.endpoint(path))).send().await?.error_for_status()?;
    let mut first = None;
    let mut bytes = 0usize;
    while let Some(chunk) = response.chunk().await? {
        first.get_or_insert_with(|| started.elapsed().as_secs_f64());
        bytes += chunk.len();
    }
    Ok((first.unwrap_or_default(), started.elapsed().as_secs_f64(), bytes))
}

pub async fn run(gib: f64) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.safetensors");
    let size = write_model(&path, (gib * (1u64 << 30) as f64) as usize)?;
    let mb = |seconds: f64| size as f64 / seconds / 1e6;
    println!("flows: {:.2} GiB bf16 model, page cache warm", size as f64 / (1u64 << 30) as f64);

    let started = Instant::now();
    let mut file = std::fs::File::open(&path)?;
    let mut sink = std::io::sink();
    std::io::copy(&mut file, &mut sink)?;
    let plain = started.elapsed().as_secs_f64();
    let original = tokio::io::BufReader::with_capacity(1 << 20, tokio::fs::File::open(&path).await?);
    let (sent, tcp) = super::loopback_copy(original).await?;
    anyhow::ensure!(sent == size, "the loopback copy moved {sent} of {size} bytes");

    let (market, _data, node) = super::chain_and_node(TOKEN).await?;
    let mut operator = agora_node::client::NodeClient::new(&node.url)?;
    operator.token = Some(TOKEN.into());
    let body = tokio::fs::File::open(&path).await?;
    let form = reqwest::multipart::Form::new().text("metadata", r#"{"name": "bench"}"#).part(
        "artifact",
        reqwest::multipart::Part::stream_with_length(reqwest::Body::from(body), size as u64)
            .file_name("model.safetensors"),
    );
    let registered = agora_node::client::answer(
        operator
            .authorize(operator.http.post(operator.endpoint("/api/v1/models/register")).multipart(form))
            .send()
            .await?,
    )
    .await?;
    let hash: B256 = format!("0x{}", registered["file"]["blake3"].as_str().unwrap_or_default()).parse()?;
    let token = market.register_content(hash, "bench").await;
    let license = market.buy(token, 5, 0).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut buyer = agora_node::client::NodeClient::new(&node.url)?;
    buyer.sign_in(&market.signer(5)).await?;

    let path = format!("/api/v1/licenses/{license}/download");
    let (cold_first, cold_all, cold_bytes) = timed_download(&buyer, &path).await?;
    // The streamed download ends with the copy's last byte; the node stores the copy after it.
    // The cached row reads the stored copy, not the maker's temporary file.
    let made = |n: usize| {
        let node = &node;
        async move { (node.process.output().matches("copy ready").count() >= n).then_some(()) }
    };
    agora_e2e::eventually("the first copy stored", std::time::Duration::from_secs(600), || made(1)).await;
    let (warm_first, warm_all, warm_bytes) = timed_download(&buyer, &path).await?;
    anyhow::ensure!(cold_bytes == size && warm_bytes == size, "a download was short");
    let (_, owner_all, _) = timed_download(&operator, "/api/v1/models/bench/versions/1/artifact").await?;
    // A second buyer who downloads a while after buying: the node makes copies at purchase.
    let bought = Instant::now();
    let second = market.buy(token, 6, 0).await;
    // Wait for the node to report the second copy made (the first license's was the first).
    agora_e2e::eventually("the second copy made", std::time::Duration::from_secs(600), || made(2)).await;
    let waited = bought.elapsed().as_secs_f64();
    let mut buyer2 = agora_node::client::NodeClient::new(&node.url)?;
    buyer2.sign_in(&market.signer(6)).await?;
    let (later_first, later_all, later_bytes) =
        timed_download(&buyer2, &format!("/api/v1/licenses/{second}/download")).await?;
    anyhow::ensure!(later_bytes == size, "a download was short");

    println!("{:<58} {:>10} {:>9}", "", "first byte", "MB/s");
    println!("{:<58} {:>10} {:>9.0}", "plain read of the original (baseline)", "-", mb(plain));
    println!(
        "{:<58} {:>10} {:>9.0}",
        "the original over loopback TCP, no HTTP (ceiling; baseline)",
        "-",
        mb(tcp)
    );
    println!(
        "{:<58} {:>10} {:>9.0}",
        "owner's download of the original (decrypt; baseline)",
        "-",
        mb(owner_all)
    );
    let download = |label: &str, first: f64, all: f64| {
        println!(
            "{label:<58} {:>8.0}ms {:>9.0}  ({:.0}% of the plain read, {:.0}% of TCP)",
            first * 1e3,
            mb(all),
            100.0 * plain / all,
            100.0 * tcp / all
        )
    };
    download("first download right after the purchase (copy in the making)", cold_first, cold_all);
    download("license download, cached copy", warm_first, warm_all);
    download(&format!("first download once made ahead ({waited:.0} s after buying)"), later_first, later_all);
    // A download is one HTTP answer on one connection, and a stored copy is encrypted at rest:
    // its bytes are opened into memory and written to the socket from there, as the TCP copy
    // writes them (sendfile's path from the page cache is closed to it). That copy bounds every
    // download.
    println!(
        "ceiling: one loopback TCP connection written from memory carries {:.0}% of the plain read (target 50%)",
        100.0 * plain / tcp
    );
    Ok(())
}
