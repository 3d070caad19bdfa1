//! `agora-bench p2p [--nodes N] [--orders N] [--mib N]`: N nodes (default 10) on loopback
//! sharing one anvil chain. Order propagation: the time from `POST /api/v1/marketplace/list` at
//! one node until every other node serves the order, p50 and p99 over 100 orders. Blob
//! transfer: MB/s of `POST /api/v1/p2p/blobs/{hash}/fetch` between two nodes (manifest, chunks
//! verified, stored in the fetcher's artifact store) over TCP, and again by a node that reaches
//! the provider over QUIC only, beside a plain loopback TCP copy of the same bytes in the same
//! run, and the floor of any fetch over noise: the plain copy's CPU and, on one core, the cipher
//! and hash every byte needs, spread over all cores.

use std::time::{Duration, Instant};

use agora_e2e::{Node, eventually, market::Market};
use agora_node::market::orders::OrderJson;
use alloy::{signers::SignerSync, sol_types::SolStruct};
use futures::future::join_all;
use serde_json::{Value, json};

const TOKEN: &str = "benchmark-operator-token-0123456789";

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn p2p_address(node: &Node) -> String {
    eventually("a p2p address", Duration::from_secs(60), || async {
        node.get("/api/v1/p2p/status").await.1["listening"][0].as_str().map(str::to_owned)
    })
    .await
}

async fn serves(client: &reqwest::Client, node: &Node, hash: &str) -> bool {
    client
        .get(format!("{}/api/v1/marketplace/orders/{hash}", node.url))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
}

pub async fn run(nodes: usize, orders: usize, mib: usize) -> anyhow::Result<()> {
    let market = Market::start().await;
    let token = market.register("bench-p2p").await;
    let dirs: Vec<_> = (0..=nodes).map(|_| tempfile::tempdir()).collect::<Result<_, _>>()?;
    let start_on = |dir: &tempfile::TempDir, bootstrap: &str, listen: &str| {
        Node::start(
            &market.anvil.endpoint(),
            &market.deployment_path(),
            dir.path(),
            &[
                ("AGORA_BOOTSTRAP", bootstrap),
                ("AGORA_ADMIN_TOKEN", TOKEN),
                ("AGORA_LOG", "warn"),
                ("AGORA_P2P_LISTEN", listen),
            ],
        )
    };
    let start = |dir: &tempfile::TempDir, bootstrap: &str| start_on(dir, bootstrap, "/ip4/127.0.0.1/tcp/0");
    // The first node also listens on QUIC, for the blob fetch over QUIC below.
    let first = start_on(&dirs[0], "", "/ip4/127.0.0.1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1");
    let first_address = p2p_address(&first).await;
    let mut all = vec![first];
    for dir in &dirs[1..nodes] {
        all.push(start(dir, &first_address));
    }
    let (head, hash) = market.head().await;
    for node in &all {
        node.wait_indexed(head, hash).await;
    }
    println!("p2p: {nodes} nodes on loopback, one anvil chain; {orders} orders, each listed at one node");

    let client = reqwest::Client::new();
    let domain = agora_contracts::order_domain(market.deployment.chain_id, market.deployment.license_market);
    let nonce = market.seller_nonce().await;
    let mut latencies = Vec::with_capacity(orders);
    // One warm-up order lets the gossip meshes form before anything is timed.
    for i in 0..=orders {
        let (mut order, _) = market.order(token, nonce);
        order.expiry = u64::MAX - i as u64;
        let signature = market.signer(1).sign_hash_sync(&order.eip712_signing_hash(&domain))?;
        let at = i % nodes;
        let body = json!({ "order": OrderJson::from_order(&order), "signature": signature.to_string() });
        let started = Instant::now();
        let listed: Value = client
            .post(format!("{}/api/v1/marketplace/list", all[at].url))
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let order_hash = listed["order_hash"].as_str().unwrap_or_default().to_owned();
        // Each other node is asked again as soon as it answers "not yet": the answers pace the
        // polling, and the whole wait is bounded.
        let served_everywhere = join_all((0..nodes).filter(|n| *n != at).map(|n| {
            let (client, node, hash) = (&client, &all[n], &order_hash);
            async move { while !serves(client, node, hash).await {} }
        }));
        tokio::time::timeout(Duration::from_secs(30), served_everywhere)
            .await
            .map_err(|_| anyhow::anyhow!("order {i} did not reach every node within 30 s"))?;
        if i > 0 {
            latencies.push(started.elapsed().as_secs_f64() * 1e3);
        }
    }
    latencies.sort_by(f64::total_cmp);
    println!(
        "  list → served by all {} others: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms   (target p99 < 1000 ms)",
        nodes - 1,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );

    // Blob transfer between two nodes, beside a plain TCP copy of the same bytes.
    let size = mib << 20;
    let mut data = vec![0u8; size];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for b in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes());
    }
    let blob = blake3::hash(&data).to_hex().to_string();
    client
        .put(format!("{}/api/2.0/mlflow-artifacts/artifacts/bench/blob.bin", all[0].url))
        .bearer_auth(TOKEN)
        .body(data.clone())
        .send()
        .await?
        .error_for_status()?;
    client
        .post(format!("{}/api/v1/p2p/blobs/{blob}/share", all[0].url))
        .bearer_auth(TOKEN)
        .send()
        .await?
        .error_for_status()?;
    // `node` fetches the blob from its peers: the report and the seconds it took.
    let fetch = |node: &Node| {
        let url = format!("{}/api/v1/p2p/blobs/{blob}/fetch", node.url);
        let client = client.clone();
        async move {
            let started = Instant::now();
            let report: Value =
                client.post(url).bearer_auth(TOKEN).send().await?.error_for_status()?.json().await?;
            anyhow::ensure!(report["fetched"] == true, "the fetch did not happen: {report}");
            Ok::<_, anyhow::Error>((report, started.elapsed().as_secs_f64()))
        }
    };
    let (report, fetch_secs) = fetch(&all[1]).await?;

    // The same fetch by a node that reaches the first one over QUIC only.
    let quic_address = eventually("the first node's QUIC address", Duration::from_secs(60), || async {
        let (_, status) = all[0].get("/api/v1/p2p/status").await;
        status["listening"]
            .as_array()?
            .iter()
            .filter_map(|a| a.as_str())
            .find(|a| a.contains("/quic-v1"))
            .map(str::to_owned)
    })
    .await;
    let over_quic = start_on(&dirs[nodes], &quic_address, "/ip4/127.0.0.1/udp/0/quic-v1");
    eventually("the QUIC node connected", Duration::from_secs(60), || async {
        let (_, status) = over_quic.get("/api/v1/p2p/status").await;
        (status["peers_connected"].as_u64()? >= 1).then_some(())
    })
    .await;
    let (quic_report, quic_secs) = fetch(&over_quic).await?;

    // The plain copy, four times: its rate from the four together, and the CPU it takes (this
    // process holds both ends, so the kernel's work for the sockets is counted here too).
    let data: std::sync::Arc<[u8]> = data.into();
    let me = nix::unistd::Pid::this();
    let cpu_before = super::cpu_seconds(me);
    let mut tcp_secs = 0.0;
    for _ in 0..COPIES {
        let (received, secs) = super::loopback_copy(std::io::Cursor::new(data.clone())).await?;
        anyhow::ensure!(received == size, "the plain copy moved {received} of {size} bytes");
        tcp_secs += secs;
    }
    tcp_secs /= COPIES as f64;
    let tcp_cpu = (super::cpu_seconds(me) - cpu_before) / COPIES as f64;
    let crypto_cpu = mandated_crypto(&data)?;

    let mb = size as f64 / 1e6;
    let fetch = mb / fetch_secs;
    let tcp = mb / tcp_secs;
    let transfer = mb / report["transfer_secs"].as_f64().unwrap_or(f64::NAN);
    let store = mb / report["store_secs"].as_f64().unwrap_or(f64::NAN);
    println!("  blob of {mib} MiB, node → node, whole fetch:        {fetch:.0} MB/s");
    println!("    of which chunks received and checked:          {transfer:.0} MB/s");
    println!("    of which stored (compressed, encrypted, fsync): {store:.0} MB/s");
    let quic = mb / quic_secs;
    let quic_transfer = mb / quic_report["transfer_secs"].as_f64().unwrap_or(f64::NAN);
    println!("  the same over QUIC, whole fetch:                    {quic:.0} MB/s");
    println!("    of which chunks received and checked:          {quic_transfer:.0} MB/s");
    println!("  plain loopback TCP copy of the same bytes:          {tcp:.0} MB/s");
    println!(
        "  ratio {:.1}% whole fetch, {:.1}% transfer alone; QUIC {:.1}% and {:.1}%   (target ≥ 50%)",
        fetch / tcp * 100.0,
        transfer / tcp * 100.0,
        quic / tcp * 100.0,
        quic_transfer / tcp * 100.0
    );
    // The floor: any fetch over noise moves the bytes through loopback TCP as the plain copy
    // does and, on top, seals, opens and checks them. With every core busy all the time and
    // nothing else to do, it cannot take less than that CPU spread over the cores.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let floor_secs = (tcp_cpu + crypto_cpu) / cores;
    println!(
        "  floor: plain copy {tcp_cpu:.3} CPU s + noise seal, open and blake3 on one core {crypto_cpu:.3} s ({:.0} MB/s),",
        mb / crypto_cpu
    );
    println!(
        "    over {cores:.0} cores ≥ {floor_secs:.3} s: at best {:.0} MB/s, {:.1}% of the plain copy",
        mb / floor_secs,
        tcp_secs / floor_secs * 100.0
    );
    Ok(())
}

/// How often the plain copy runs (its rate and CPU are the mean).
const COPIES: usize = 4;

/// CPU seconds, on one thread, of the work a fetch cannot leave out for any byte, however it is
/// built: noise's ChaCha20-Poly1305 sealing at the provider and opening at the fetcher, in
/// messages of the most a noise message carries (65,535 bytes with the 16-byte tag), through
/// ring as libp2p's noise uses it; and blake3 over each 1 MiB chunk at the fetcher, which checks
/// it. The best of three passes.
fn mandated_crypto(data: &[u8]) -> anyhow::Result<f64> {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    const FRAME: usize = 65_535 - 16;
    let key = |byte| {
        UnboundKey::new(&CHACHA20_POLY1305, &[byte; 32])
            .map(LessSafeKey::new)
            .map_err(|_| anyhow::anyhow!("a ChaCha20-Poly1305 key"))
    };
    let (sealer, opener) = (key(7)?, key(7)?);
    let nonce = |n: u64| {
        let mut bytes = [0u8; 12];
        bytes[4..].copy_from_slice(&n.to_le_bytes());
        Nonce::assume_unique_for_key(bytes)
    };
    let mut frame = Vec::with_capacity(FRAME + 16);
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let started = Instant::now();
        for (n, plain) in data.chunks(FRAME).enumerate() {
            frame.clear();
            frame.extend_from_slice(plain);
            sealer
                .seal_in_place_append_tag(nonce(n as u64), Aad::empty(), &mut frame)
                .map_err(|_| anyhow::anyhow!("sealing frame {n}"))?;
            opener
                .open_in_place(nonce(n as u64), Aad::empty(), &mut frame)
                .map_err(|_| anyhow::anyhow!("opening frame {n}"))?;
        }
        for chunk in data.chunks(1 << 20) {
            std::hint::black_box(blake3::hash(chunk));
        }
        best = best.min(started.elapsed().as_secs_f64());
    }
    Ok(best)
}
