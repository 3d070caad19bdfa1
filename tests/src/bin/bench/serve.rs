//! `agora-bench serve [--requests N] [--callers N]`: predict throughput and latency on loopback
//! against the MLP deployment, N callers at once (default 8), each with its own license: (a) usage licenses paying
//! with vouchers (pre-signed, so signing is not in the server's budget), (b) perpetual licenses
//! with a sign-in token, (c) the operator, whose calls skip the license check — all one run.

use std::time::Instant;

use agora_e2e::mlp;
use agora_node::{client::NodeClient, serve::metering};
use alloy::{primitives::U256, signers::SignerSync};
use serde_json::json;

const TOKEN: &str = "benchmark-operator-token-0123456789";

struct Outcome {
    seconds: f64,
    latencies_ms: Vec<f64>,
}

async fn load(clients: Vec<(NodeClient, Vec<Option<String>>)>, path: &str) -> anyhow::Result<Outcome> {
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
    Ok(Outcome { seconds: started.elapsed().as_secs_f64(), latencies_ms })
}

fn row(name: &str, o: &mut Outcome, baseline: Option<f64>) -> f64 {
    o.latencies_ms.sort_by(f64::total_cmp);
    let at = |q: f64| o.latencies_ms[((o.latencies_ms.len() - 1) as f64 * q).round() as usize];
    let rps = o.latencies_ms.len() as f64 / o.seconds;
    let share = baseline.map(|b| format!("  ({:.0}% of (c))", 100.0 * rps / b)).unwrap_or_default();
    println!("{name:<46} {rps:>9.0} {:>9.2} {:>9.2}{share}", at(0.5), at(0.99));
    rps
}

pub async fn run(requests: usize, callers: usize) -> anyhow::Result<()> {
    let (market, _data, node) = super::chain_and_node(TOKEN).await?;
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
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut operator = NodeClient::new(&node.url)?;
    operator.token = Some(TOKEN.into());
    let unchecked: Vec<_> = (0..callers).map(|_| (operator.clone(), vec![None; requests])).collect();

    // Warm the model cache and the connections.
    load(vec![(operator.clone(), vec![None; 50])], &path).await?;
    let mut c = load(unchecked, &path).await?;
    let mut b = load(perpetual, &path).await?;
    let mut a = load(usage, &path).await?;

    println!("serve: {callers} callers x {requests} predict calls (one row, MLP 4-8-3), loopback, one run");
    println!("{:<46} {:>9} {:>9} {:>9}", "", "req/s", "p50 ms", "p99 ms");
    let baseline = row("(c) no license check (operator; baseline)", &mut c, None);
    row("(b) perpetual license, sign-in token", &mut b, Some(baseline));
    row("(a) usage license, a voucher per call", &mut a, Some(baseline));
    Ok(())
}
