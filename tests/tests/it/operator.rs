//! The operator wallet in full blocks: a settlement outbid by other senders goes again at the
//! same nonce with higher fees until it is mined, and one left pending by a node that died is
//! replaced by the next node's, not queued behind.

use std::time::{Duration, Instant};

use agora_e2e::{Node, market::Market};
use agora_node::serve::metering;
use alloy::{
    network::TransactionBuilder,
    primitives::{Address, U256},
    providers::{Provider, ext::AnvilApi},
    rpc::types::TransactionRequest,
    signers::{SignerSync, local::PrivateKeySigner},
};
use serde_json::{Value, json};

use super::registry::{TOKEN, start};

/// Room for one settlement and a few transfers: seven transfers fill a block.
const BLOCK_GAS: u64 = 150_000;
const FILLERS: usize = 7;

/// Blocks made by hand, filled with transfers from account 9 that tip `tip`, at a base fee
/// held where it was (so a pending transaction is starved by its tip alone, never dropped
/// for a base fee that outgrew it).
struct Congestion {
    base_fee: u128,
    nonce: u64,
}

impl Congestion {
    async fn start(market: &Market) -> Self {
        market.set_automine(false).await;
        market.provider.anvil_set_block_gas_limit(BLOCK_GAS).await.unwrap();
        let latest = market.provider.get_block_by_number(Default::default()).await.unwrap().unwrap();
        let base_fee = u128::from(latest.header.base_fee_per_gas.unwrap());
        let nonce = market.provider.get_transaction_count(market.address(9)).pending().await.unwrap();
        Self { base_fee, nonce }
    }

    /// One full block of transfers tipping `tip`.
    async fn block(&mut self, market: &Market, tip: u128) {
        for _ in 0..FILLERS {
            let transfer = TransactionRequest::default()
                .with_from(market.address(9))
                .with_to(market.address(8))
                .with_value(U256::from(1))
                .with_nonce(self.nonce)
                .with_gas_limit(21_000)
                .with_max_fee_per_gas(2 * self.base_fee + tip)
                .with_max_priority_fee_per_gas(tip);
            let _pending = market.provider.send_transaction(transfer).await.unwrap();
            self.nonce += 1;
        }
        market.provider.anvil_set_next_block_base_fee_per_gas(self.base_fee).await.unwrap();
        market.provider.evm_mine(None).await.unwrap();
    }
}

/// The tips of `who`'s transactions waiting in anvil's pool.
async fn pooled_tips(market: &Market, who: Address) -> Vec<u128> {
    let pool: Value = market.provider.raw_request("txpool_content".into(), ()).await.unwrap();
    let mut tips = Vec::new();
    for (sender, txs) in pool["pending"].as_object().into_iter().flatten() {
        if sender.parse::<Address>().ok() == Some(who) {
            for tx in txs.as_object().unwrap().values() {
                let tip = tx["maxPriorityFeePerGas"].as_str().unwrap();
                tips.push(u128::from_str_radix(tip.trim_start_matches("0x"), 16).unwrap());
            }
        }
    }
    tips
}

/// Waits until `who` has a transaction in the pool; its highest tip.
async fn pooled(market: &Market, who: Address) -> u128 {
    agora_e2e::eventually("the operator's settlement in the pool", Duration::from_secs(60), || async {
        pooled_tips(market, who).await.into_iter().max()
    })
    .await
}

/// Full blocks tipping `tip`, each once the node has indexed the one before, until the
/// license's settled units are `units`.
async fn congest_until_settled(
    market: &Market,
    congestion: &mut Congestion,
    node: &Node,
    license: U256,
    tip: u128,
    units: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        congestion.block(market, tip).await;
        let (head, hash) = market.head().await;
        node.wait_indexed(head, hash).await;
        let (_, l) = node.get(&format!("/api/v1/licenses/{license}")).await;
        if l["license"]["escrow"]["settled_units"] == units {
            return;
        }
        if Instant::now() > deadline {
            let log = node.process.output();
            let operator: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("agora::operator") || l.contains("agora::settle"))
                .collect();
            panic!("the settlement of {units} units was never mined: {l}\n{}", operator.join("\n"));
        }
    }
}

/// The operator's transactions mined since `from`: their tips.
async fn mined_tips(market: &Market, who: Address, from: u64) -> Vec<u128> {
    let head = market.provider.get_block_number().await.unwrap();
    let mut tips = Vec::new();
    for n in from..=head {
        let block = market.provider.get_block_by_number(n.into()).full().await.unwrap().unwrap();
        for tx in block.transactions.txns() {
            if tx.inner.signer() == who {
                tips.push(alloy::consensus::Transaction::max_priority_fee_per_gas(tx).unwrap());
            }
        }
    }
    tips
}

/// A tip above `tip`, by less than the eighth a replacement adds to it (and a gwei where the
/// market asks almost nothing).
fn outbid(tip: u128) -> u128 {
    tip + tip / 16 + 1_000_000_000
}

fn bumps(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("agora_operator_fee_bumps_total "))
        .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
}

#[tokio::test]
async fn an_outbid_settlement_goes_again_with_higher_fees_and_replaces_one_left_by_a_crash() {
    let operator = PrivateKeySigner::random();
    let key = alloy::hex::encode_prefixed(operator.to_bytes());
    let env = [
        ("AGORA_ADMIN_TOKEN", TOKEN),
        ("AGORA_OPERATOR_KEY", key.as_str()),
        ("AGORA_SETTLE_MIN_WEI", "1"),
        ("AGORA_OPERATOR_BUMP_SECS", "1"),
    ];
    let (market, data, node) = start(&env).await;
    let me = operator.address();
    market.provider.anvil_set_balance(me, U256::from(10u64).pow(U256::from(18))).await.unwrap();
    let (seller, token) = super::serve::publish(&market, &node, "iris", true).await;
    let (license, id, buyer) = super::serve::usage_deployment(&market, &node, &seller, token, "iris").await;
    let (chain, lm) = (market.deployment.chain_id, market.deployment.license_market);
    let pay = |cumulative: u64| {
        let hash = metering::voucher_hash(license, U256::from(cumulative), chain, lm);
        let signature = market.signer(7).sign_hash_sync(&hash).unwrap();
        buyer
            .authorize(buyer.http.post(buyer.endpoint(&format!("/api/v1/deployments/{id}/predict"))))
            .header("agora-voucher", metering::header(license, U256::from(cumulative), &signature.as_bytes()))
            .json(&json!({"inputs": [[1.0, 2.0, 3.0, 4.0]]}))
            .send()
    };

    // Three paid calls while blocks are made by hand: the node sends their settlement, and
    // every block from then on is full of transfers that tip a little more than it did.
    let mut congestion = Congestion::start(&market).await;
    let first_block = market.provider.get_block_number().await.unwrap() + 1;
    for cumulative in 1..=3 {
        assert!(pay(cumulative).await.unwrap().status().is_success());
    }
    let first_tip = pooled(&market, me).await;
    // the node shows what it waits on
    let status = agora_e2e::eventually("the waiting settlement shown", Duration::from_secs(30), || async {
        let (_, status) = node.get("/api/v1/chain/status").await;
        (status["operator"]["waiting"]["nonce"] == 0).then_some(status)
    })
    .await;
    assert_eq!(status["operator"]["address"].as_str().and_then(|a| a.parse::<Address>().ok()), Some(me));
    let waiting = &status["operator"]["waiting"];
    let tip: u128 = waiting["max_priority_fee_per_gas"].as_str().unwrap().parse().unwrap();
    assert!(tip >= first_tip && !waiting["hashes"].as_array().unwrap().is_empty(), "{status}");
    let outbidding = outbid(first_tip);
    congest_until_settled(&market, &mut congestion, &node, license, outbidding, "3").await;
    // Mined as one transaction: a copy sent again at the same nonce, tipping as much as the
    // transfers that outbid the first (a tie goes to the older in anvil's pool).
    let tips = mined_tips(&market, me, first_block).await;
    assert_eq!(tips.len(), 1, "{tips:?}");
    assert!(tips[0] >= outbidding, "mined at a tip of {}, under the {outbidding} that outbid it", tips[0]);
    assert_eq!(market.provider.get_transaction_count(me).await.unwrap(), 1);
    let metrics = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
    assert!(bumps(&metrics) >= 1, "{metrics}");

    // Two more calls; their settlement is outbid, and the node is killed with it pending.
    for cumulative in 4..=5 {
        assert!(pay(cumulative).await.unwrap().status().is_success());
    }
    pooled(&market, me).await;
    let mut node = node;
    nix::sys::signal::kill(node.process.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    node.process.wait(Duration::from_secs(10));
    let left = pooled(&market, me).await;
    let outbidding = outbid(left);
    let first_block = market.provider.get_block_number().await.unwrap() + 1;
    congestion.block(&market, outbidding).await;
    assert_eq!(market.provider.get_transaction_count(me).await.unwrap(), 1, "the left transaction is outbid");

    // The next node's settlement takes the same nonce rather than queueing behind it.
    let node = Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), &env);
    congest_until_settled(&market, &mut congestion, &node, license, outbidding, "5").await;
    let tips = mined_tips(&market, me, first_block).await;
    assert_eq!(tips.len(), 1, "{tips:?}");
    assert!(tips[0] >= outbidding, "mined at a tip of {}, under the {outbidding} that outbid it", tips[0]);
    assert_eq!(market.provider.get_transaction_count(me).await.unwrap(), 2);
    assert!(pooled_tips(&market, me).await.is_empty(), "nothing of the operator's is left waiting");
    // (the node sees its transaction mined at its next poll)
    agora_e2e::eventually("nothing shown waiting", Duration::from_secs(30), || async {
        let (_, status) = node.get("/api/v1/chain/status").await;
        status["operator"]["waiting"].is_null().then_some(())
    })
    .await;

    // The wallet's balance, less the two settlements' gas, is on the metrics.
    let balance = market.provider.get_balance(me).await.unwrap();
    assert!(balance < U256::from(10u64).pow(U256::from(18)));
    agora_e2e::eventually("the balance gauge", Duration::from_secs(30), || async {
        let metrics = reqwest::get(format!("{}/metrics", node.url)).await.ok()?.text().await.ok()?;
        let gauge = metrics.lines().find_map(|l| l.strip_prefix("agora_operator_balance_wei "))?;
        (gauge.trim().parse::<f64>().ok()? == f64::from(balance)).then_some(())
    })
    .await;
}
