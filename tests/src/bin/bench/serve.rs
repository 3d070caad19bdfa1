//! `agora-bench serve [--requests N] [--callers N]`: predict throughput and latency on loopback
//! against the MLP deployment, N callers at once (default 8), each with its own license: (a) usage licenses paying
//! with vouchers (pre-signed, so signing is not in the server's budget), (b) perpetual licenses
//! with a sign-in token, (c) the operator, whose calls skip the license check — all one run,
//! in five rounds that take (c), (b), (a) and (d) in turn, so they share the machine's moods:
//! the medians of the rounds are printed, and each share of (c) is the median of the rounds'
//! shares (a round's (a) against the (c) measured just before it). Beside each, the node's own
//! CPU time per call (user and system, all threads), which the machine's moods move less.
//! (d) is (a) with each usage license held by a contract wallet (ERC-1271), whose every voucher
//! the node asks the wallet about on-chain: what such a holder's calls cost.
//! Then, when MiniLM is present, sentence embeddings through the builtin runtime beside candle
//! running the same model in this process.

use std::time::Instant;

use super::cpu_seconds;
use agora_e2e::mlp;
use agora_node::{client::NodeClient, serve::metering};
use alloy::{primitives::U256, signers::SignerSync};
use serde_json::json;

const TOKEN: &str = "benchmark-operator-token-0123456789";

struct Outcome {
    seconds: f64,
    latencies_ms: Vec<f64>,
    /// CPU seconds the node spent meanwhile (user and system, all threads).
    node_cpu: f64,
    /// CPU seconds this process (the load generator) spent meanwhile.
    own_cpu: f64,
    /// CPU seconds the chain (anvil) spent meanwhile.
    chain_cpu: f64,
}

impl Outcome {
    fn rps(&self) -> f64 {
        self.latencies_ms.len() as f64 / self.seconds
    }
}

async fn load(
    clients: Vec<(NodeClient, Vec<Option<String>>)>,
    path: &str,
    (node, chain): (nix::unistd::Pid, nix::unistd::Pid),
) -> anyhow::Result<Outcome> {
    let (cpu, own, chain_before) =
        (cpu_seconds(node), cpu_seconds(nix::unistd::Pid::this()), cpu_seconds(chain));
    let started = Instant::now();
    let body = json!({"inputs": [[0.5, 1.0, -1.0, 2.0]]});
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(client, vouchers)| {
            let (path, body) = (path.to_owned(), body.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(vouchers.len());
                for voucher in vouchers {
                    let mut request = client.authorize(client.http.post(client.endpoint(&path))).json(&body);
                    if let Some(v) = voucher {
                        request = request.header("agora-voucher", v);
                    }
                    let t = Instant::now();
                    let response = request.send().await?;
                    anyhow::ensure!(
                        response.status().is_success(),
                        "a call failed: {}",
                        response.text().await.unwrap_or_default()
                    );
                    response.bytes().await?;
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut latencies_ms = Vec::new();
    for task in tasks {
        latencies_ms.extend(task.await??);
    }
    Ok(Outcome {
        seconds: started.elapsed().as_secs_f64(),
        latencies_ms,
        node_cpu: cpu_seconds(node) - cpu,
        own_cpu: cpu_seconds(nix::unistd::Pid::this()) - own,
        chain_cpu: cpu_seconds(chain) - chain_before,
    })
}

/// Rounds of the load: each caller's calls are split among them in order.
const ROUNDS: usize = 5;

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One class of calls over all rounds: median req/s (and the rounds' range), latency
/// percentiles over every call, and the median of the rounds' shares of `baseline`.
fn row(name: &str, rounds: &[Outcome], baseline: Option<&[Outcome]>) {
    let rps: Vec<f64> = rounds.iter().map(Outcome::rps).collect();
    let mut latencies: Vec<f64> = rounds.iter().flat_map(|o| o.latencies_ms.iter().copied()).collect();
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let (low, high) = rps.iter().fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
    let share = baseline
        .map(|b| {
            let shares = rps.iter().zip(b).map(|(r, o)| 100.0 * r / o.rps());
            format!("  ({:.0}% of (c))", median(shares.collect()))
        })
        .unwrap_or_default();
    let spread = format!("{low:.0}-{high:.0}");
    let cpu_us = 1e6 * rounds.iter().map(|o| o.node_cpu).sum::<f64>() / latencies.len() as f64;
    println!(
        "{name:<46} {:>9.0} {spread:>13} {:>9.2} {:>9.2} {cpu_us:>9.0}{share}",
        median(rps.clone()),
        at(0.5),
        at(0.99)
    );
}

/// Each caller's calls for round `round` of [`ROUNDS`].
fn round_of(
    clients: &[(NodeClient, Vec<Option<String>>)],
    round: usize,
) -> Vec<(NodeClient, Vec<Option<String>>)> {
    clients
        .iter()
        .map(|(client, calls)| {
            let per = calls.len().div_ceil(ROUNDS);
            let end = ((round + 1) * per).min(calls.len());
            (client.clone(), calls[(round * per).min(end)..end].to_vec())
        })
        .collect()
}

pub async fn run(requests: usize, callers: usize) -> anyhow::Result<()> {
    let requests = requests.max(ROUNDS);
    let (market, _data, node) = super::chain_and_node(TOKEN).await?;
    let anvil = market.anvil.pid().ok_or_else(|| anyhow::anyhow!("anvil has no process id"))?;
    let pid = (node.process.pid(), nix::unistd::Pid::from_raw(anvil as i32));
    let mut seller = NodeClient::new(&node.url)?;
    seller.sign_in(&market.signer(1)).await?;
    let version = mlp::register(&seller, "bench", true).await;
    let hash = format!("0x{}", version["file"]["blake3"].as_str().unwrap_or_default()).parse()?;
    let token = market.register_content(hash, "bench").await;
    let created = seller.post_json("/api/v1/deployments/create", &json!({"model": "bench"})).await?;
    let path =
        format!("/api/v1/deployments/{}/predict", created["deployment_id"].as_str().unwrap_or_default());

    // Each caller (accounts 2..=9, in turn) holds a usage license of its own topped up for the
    // run, and a perpetual one.
    let (chain, lm) = (market.deployment.chain_id, market.deployment.license_market);
    let mut usage = Vec::new();
    let mut perpetual = Vec::new();
    for caller in 0..callers {
        let account = 2 + caller % 8;
        let license = market.buy(token, account, 2).await;
        let top_up = U256::from(requests as u64) * U256::from(agora_e2e::market::UNIT_PRICE);
        market
            .market
            .topUp(license)
            .value(top_up)
            .from(market.address(account))
            .send()
            .await?
            .get_receipt()
            .await?;
        market.buy(token, account, 0).await;
        let mut client = NodeClient::new(&node.url)?;
        client.sign_in(&market.signer(account)).await?;
        let vouchers: Vec<Option<String>> = (1..=requests as u64)
            .map(|n| {
                let hash = metering::voucher_hash(license, U256::from(n), chain, lm);
                let signature = market.signer(account).sign_hash_sync(&hash).expect("signing works");
                Some(metering::header(license, U256::from(n), &signature.as_bytes()))
            })
            .collect();
        usage.push((client.clone(), vouchers));
        perpetual.push((client, vec![None; requests]));
    }
    // (d): each caller's account owns a contract wallet holding a usage license for the run.
    let mut wallets = Vec::new();
    for caller in 0..callers {
        let account = 2 + caller % 8;
        let wallet = market.smart_wallet(account).await;
        let address = *wallet.address();
        let (order, signature) = market.order(token, market.seller_nonce().await);
        let escrow = U256::from(requests as u64) * U256::from(agora_e2e::market::UNIT_PRICE);
        let purchase = market.market.purchase(order, signature, 2).calldata().clone();
        let receipt = market.through_wallet(&wallet, account, lm, escrow, purchase).await;
        let license = receipt
            .decoded_log::<agora_contracts::LicenseMarket::LicensePurchased>()
            .ok_or_else(|| anyhow::anyhow!("the wallet's purchase logged no license"))?
            .licenseId;
        let mut client = NodeClient::new(&node.url)?;
        client
            .sign_in_as(address, |message| {
                let hash = alloy::primitives::eip191_hash_message(message.as_bytes());
                Ok(market.wallet_signature(address, account, hash).to_vec())
            })
            .await?;
        let vouchers: Vec<Option<String>> = (1..=requests as u64)
            .map(|n| {
                let hash = metering::voucher_hash(license, U256::from(n), chain, lm);
                let signature = market.wallet_signature(address, account, hash);
                Some(metering::header(license, U256::from(n), &signature))
            })
            .collect();
        wallets.push((client, vouchers));
    }
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut operator = NodeClient::new(&node.url)?;
    operator.token = Some(TOKEN.into());
    let unchecked: Vec<_> = (0..callers).map(|_| (operator.clone(), vec![None; requests])).collect();

    // Warm the model cache and the connections.
    load(vec![(operator.clone(), vec![None; 50])], &path, pid).await?;
    let (mut c, mut b, mut a, mut d) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        c.push(load(round_of(&unchecked, round), &path, pid).await?);
        b.push(load(round_of(&perpetual, round), &path, pid).await?);
        // a usage caller's vouchers run on from the last round's count
        a.push(load(round_of(&usage, round), &path, pid).await?);
        d.push(load(round_of(&wallets, round), &path, pid).await?);
    }

    println!(
        "serve: {callers} callers x {requests} predict calls (one row, MLP 4-8-3), loopback, in {ROUNDS} rounds of (c), (b), (a), (d)"
    );
    println!("{:<46} {:>9} {:>13} {:>9} {:>9} {:>9}", "", "req/s", "rounds", "p50 ms", "p99 ms", "node µs");
    row("(c) no license check (operator; baseline)", &c, None);
    row("(b) perpetual license, sign-in token", &b, Some(&c));
    row("(a) usage license, a voucher per call", &a, Some(&c));
    row("(d) as (a), held by a contract wallet", &d, Some(&c));
    let chain_us = |rounds: &[Outcome]| {
        let calls: usize = rounds.iter().map(|o| o.latencies_ms.len()).sum();
        1e6 * rounds.iter().map(|o| o.chain_cpu).sum::<f64>() / calls as f64
    };
    println!(
        "(d) asks the wallet on-chain (eth_call) for every voucher: the chain (anvil) spent {:.0} µs of CPU a call in (d), {:.0} in (a)",
        chain_us(&d),
        chain_us(&a)
    );
    floor(&c, chain, lm);
    if let Some(dir) = agora_e2e::minilm_dir() {
        encoder(&seller, &dir, callers, pid.0).await?;
    }
    Ok(())
}

/// The most (a) could reach here. A usage call does all an unchecked one does, plus two
/// signature operations the issue asks for on every call: recovering the voucher's signer (as
/// `metering::check` does: the EIP-712 digest, then libsecp256k1's recovery) and the receipt's
/// ed25519 signature. Each is timed here on one core (best of five runs of 2,000). Over both
/// cores, with (c)'s CPU per call (node and load generator) measured in the same round and
/// nothing else added, not even the voucher's durable write, (a) can reach at most
/// cores / ((c)'s CPU per call + recovery + signature) calls a second.
fn floor(c: &[Outcome], chain: u64, market: alloy::primitives::Address) {
    use alloy::primitives::Signature;
    use ed25519_dalek::Signer;
    let domain = metering::VoucherDomain::new(chain, market);
    let wallet = alloy::signers::local::PrivateKeySigner::from_bytes(&[7u8; 32].into()).expect("a key");
    let calls = 2_000u64;
    let signatures: Vec<Vec<u8>> = (1..=calls)
        .map(|n| {
            let hash = domain.hash(U256::from(9), U256::from(n));
            wallet.sign_hash_sync(&hash).expect("signing works").as_bytes().to_vec()
        })
        .collect();
    let best = |work: &dyn Fn() -> bool| {
        (0..5)
            .map(|_| {
                let started = Instant::now();
                assert!(work(), "the floor's operations failed");
                started.elapsed().as_secs_f64() * 1e6 / calls as f64
            })
            .fold(f64::INFINITY, f64::min)
    };
    let recover_us = best(&|| {
        signatures.iter().zip(1u64..).all(|(bytes, n)| {
            let signer = Signature::try_from(bytes.as_slice()).ok().and_then(|s| {
                s.recover_address_from_prehash(&domain.hash(U256::from(9), U256::from(n))).ok()
            });
            signer == Some(wallet.address())
        })
    });
    let key = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]);
    let request = *blake3::hash(b"{\"inputs\": [[0.5, 1.0, -1.0, 2.0]]}").as_bytes();
    let sign_us = best(&|| {
        for n in 1..=calls {
            let message =
                metering::receipt_bytes(U256::from(9), U256::from(n), &request, 1_700_000_000_000 + n);
            std::hint::black_box(key.sign(&message));
        }
        true
    });
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let shares: Vec<(f64, f64, f64)> = c
        .iter()
        .map(|o| {
            let calls = o.latencies_ms.len() as f64;
            let (node, generator) = (1e6 * o.node_cpu / calls, 1e6 * o.own_cpu / calls);
            let most = cores * 1e6 / (node + generator + recover_us + sign_us);
            (100.0 * most / o.rps(), node, generator)
        })
        .collect();
    let (low, high) = shares.iter().fold((f64::MAX, 0f64), |(l, h), s| (l.min(s.0), h.max(s.0)));
    println!(
        "floor of (a): recovering a voucher's signer {recover_us:.1} µs, signing a receipt {sign_us:.1} µs (one core); \
         (c) costs {:.0} µs of node CPU and {:.0} µs of load generator a call; so over {cores:.0} cores (a) \
         reaches at most {:.0}% of (c) (rounds {low:.0}-{high:.0}%), before its voucher is stored",
        median(shares.iter().map(|s| s.1).collect()),
        median(shares.iter().map(|s| s.2).collect()),
        median(shares.iter().map(|s| s.0).collect()),
    );
}

const SENTENCES: [&str; 8] = [
    "Which license lets me call this model a thousand times?",
    "The escrow is settled once the challenge window closes.",
    "Every voucher carries the running count of units used.",
    "Rain is expected along the coast for most of the week.",
    "A node checks each gossiped order before forwarding it.",
    "The orchestra rehearsed the second movement twice.",
    "Buyers receive a fingerprinted copy of the weights.",
    "Find the cheapest GPU offer that meets the deadline.",
];

/// MiniLM behind the builtin runtime: one sentence per call from `callers` callers at once
/// (batched by the node), beside candle running the same model in this process on the same
/// sentences, one per pass and all eight in one padded pass.
async fn encoder(
    seller: &NodeClient,
    dir: &std::path::Path,
    callers: usize,
    node: nix::unistd::Pid,
) -> anyhow::Result<()> {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::bert::{BertModel, Config};
    let read = |name: &str| std::fs::read(dir.join(name));
    let form = reqwest::multipart::Form::new()
        .text("metadata", json!({"name": "bench-minilm"}).to_string())
        .part(
            "artifact",
            reqwest::multipart::Part::bytes(read("model.safetensors")?).file_name("model.safetensors"),
        )
        .part("config", reqwest::multipart::Part::bytes(read("config.json")?))
        .part("tokenizer", reqwest::multipart::Part::bytes(read("tokenizer.json")?));
    let response = seller
        .authorize(seller.http.post(seller.endpoint("/api/v1/models/register")).multipart(form))
        .send()
        .await?;
    agora_node::client::answer(response).await?;
    let created = seller.post_json("/api/v1/deployments/create", &json!({"model": "bench-minilm"})).await?;
    anyhow::ensure!(created["status"] == "ready", "the encoder did not deploy: {created}");
    let path =
        format!("/api/v1/deployments/{}/predict", created["deployment_id"].as_str().unwrap_or_default());
    let calls = 25;
    let run = |caller: usize| {
        let (seller, path) = (seller.clone(), path.clone());
        async move {
            let mut latencies = Vec::with_capacity(calls);
            for i in 0..calls {
                let body = json!({"inputs": [SENTENCES[(caller + i) % SENTENCES.len()]]});
                let t = Instant::now();
                seller.post_json(&path, &body).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, anyhow::Error>(latencies)
        }
    };
    run(0).await?;
    let started = Instant::now();
    let cpu = cpu_seconds(node);
    let mut served =
        Outcome { seconds: 0.0, latencies_ms: Vec::new(), node_cpu: 0.0, own_cpu: 0.0, chain_cpu: 0.0 };
    for latencies in futures::future::join_all((0..callers).map(run)).await {
        served.latencies_ms.extend(latencies?);
    }
    served.seconds = started.elapsed().as_secs_f64();
    served.node_cpu = cpu_seconds(node) - cpu;

    let config: Config = serde_json::from_slice(&read("config.json")?)?;
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
    let model =
        BertModel::load(candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &config)?;
    let mut tokenizer =
        tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).map_err(anyhow::Error::msg)?;
    tokenizer.with_padding(Some(tokenizers::PaddingParams::default()));
    let pass = |texts: &[&str]| -> anyhow::Result<()> {
        let encodings = tokenizer.encode_batch(texts.to_vec(), true).map_err(anyhow::Error::msg)?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let mask: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_attention_mask().to_vec()).collect();
        let ids = Tensor::new(ids, &Device::Cpu)?;
        let mask = Tensor::new(mask, &Device::Cpu)?;
        model.forward(&ids, &ids.zeros_like()?, Some(&mask))?.mean(1)?.to_vec2::<f32>()?;
        Ok(())
    };
    let rounds = (callers * calls).div_ceil(SENTENCES.len());
    let started = Instant::now();
    for _ in 0..rounds {
        for sentence in SENTENCES {
            pass(&[sentence])?;
        }
    }
    let alone = (rounds * SENTENCES.len()) as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    for _ in 0..rounds {
        pass(&SENTENCES)?;
    }
    let batched = (rounds * SENTENCES.len()) as f64 / started.elapsed().as_secs_f64();
    println!("encoder: all-MiniLM-L6-v2, {callers} callers x {calls} one-sentence calls (the model's owner)");
    println!("{:<46} {:>9} {:>13} {:>9} {:>9} {:>9}", "", "texts/s", "", "p50 ms", "p99 ms", "node µs");
    row("node, builtin runtime", std::slice::from_ref(&served), None);
    println!("{:<46} {alone:>9.0}", "candle in-process, one text per pass");
    println!("{:<46} {batched:>9.0}", "candle in-process, 8 texts per pass");
    Ok(())
}
