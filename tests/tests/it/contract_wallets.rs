//! Contract wallets (ERC-1271), which the contracts take wherever they take a key: a wallet signs
//! in, sells with an order only it can sign, holds a usage license and pays each call with
//! vouchers only it can sign, and the node settles them on-chain.

use std::time::Duration;

use agora_contracts::{LicenseMarket, anvil::DEV_KEYS, order_domain};
use agora_e2e::market::UNIT_PRICE;
use agora_e2e::mlp::register;
use agora_node::{client::NodeClient, serve::metering};
use alloy::{
    primitives::{B256, U256},
    signers::SignerSync,
    sol_types::SolStruct,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::registry::{TOKEN, start};

/// The node's ERC-1271 check against a real chain: a yes only from the wallet for its own
/// signature, a no from a wallet, a key's address or a contract that reverts, and an error —
/// not a no — from a chain it cannot ask.
#[tokio::test]
async fn the_wallet_check_tells_a_refusal_from_a_chain_it_cannot_ask() {
    use agora_e2e::proxy::{FaultProxy, Faults};
    use agora_node::signers::erc1271;
    use alloy::providers::{Provider, ProviderBuilder};
    let market = agora_e2e::market::Market::start().await;
    let wallet = *market.smart_wallet(1).await.address();
    let hash = B256::repeat_byte(7);
    let signed = market.wallet_signature(wallet, 1, hash);
    let plain =
        alloy::primitives::Bytes::from(market.signer(1).sign_hash_sync(&hash).unwrap().as_bytes().to_vec());
    let check = erc1271(market.provider.clone());
    assert_eq!(check(wallet, hash, signed.clone()).await, Ok(true));
    assert_eq!(check(wallet, hash, plain).await, Ok(false), "the owner's own signature");
    assert_eq!(check(market.address(2), hash, signed.clone()).await, Ok(false), "no code");
    let market_contract = market.deployment.license_market;
    assert_eq!(check(market_contract, hash, signed.clone()).await, Ok(false), "no such function: reverts");

    let proxy = FaultProxy::start(market.anvil.endpoint(), 7).await;
    let through_proxy = erc1271(ProviderBuilder::new().connect_http(proxy.url().parse().unwrap()).erased());
    assert_eq!(through_proxy(wallet, hash, signed.clone()).await, Ok(true));
    for faults in [
        Faults { rpc_error_rate: 1.0, ..Faults::default() },
        Faults { http_error_rate: 1.0, ..Faults::default() },
    ] {
        proxy.set(faults.clone());
        let answer = through_proxy(wallet, hash, signed.clone()).await;
        assert!(answer.is_err(), "{faults:?}: {answer:?}");
    }
}

#[tokio::test]
async fn contract_wallets_sign_in_sell_and_pay_per_call() {
    let (market, _data, node) = start(&[
        ("AGORA_ADMIN_TOKEN", TOKEN),
        ("AGORA_OPERATOR_KEY", DEV_KEYS[0]),
        ("AGORA_SETTLE_MIN_WEI", "1"),
    ])
    .await;
    let (chain, lm) = (market.deployment.chain_id, market.deployment.license_market);
    // Account 1 registers the MLP with the node; its wallet anchors it, owns the token and sells.
    let mut publisher = NodeClient::new(&node.url).unwrap();
    publisher.sign_in(&market.signer(1)).await.unwrap();
    let version = register(&publisher, "iris", true).await;
    let content: B256 = format!("0x{}", version["file"]["blake3"].as_str().unwrap()).parse().unwrap();
    let seller = market.smart_wallet(1).await;
    let buyer = market.smart_wallet(5).await;
    let token = market.register_through(&seller, 1, content, "iris").await;
    agora_e2e::eventually("the anchor indexed", Duration::from_secs(30), || async {
        let (_, v) = node.get("/api/v1/models/iris").await;
        (v["token_id"] == token.to_string()).then_some(())
    })
    .await;
    let created = publisher.post_json("/api/v1/deployments/create", &json!({"model": "iris"})).await.unwrap();
    let id = created["deployment_id"].as_str().unwrap().to_owned();

    // The wallet's order: its owner's own signature of it is refused, the wallet's kept as sent.
    let (mut order, _) = market.order(token, U256::ZERO);
    order.seller = *seller.address();
    let digest = order.eip712_signing_hash(&order_domain(chain, lm));
    let list = |signature: String| {
        let body = json!({"order": agora_node::market::orders::OrderJson::from_order(&order), "signature": signature});
        let request =
            reqwest::Client::new().post(format!("{}/api/v1/marketplace/list", node.url)).json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let by_key = market.signer(1).sign_hash_sync(&digest).unwrap().to_string();
    let (status, body) = list(by_key).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNAUTHORIZED, Some("bad_signature")),
        "{body}"
    );
    let by_wallet = market.wallet_signature(*seller.address(), 1, digest);
    let (status, listed) = list(by_wallet.to_string()).await;
    assert_eq!(status, StatusCode::CREATED, "{listed}");
    let (_, kept) =
        node.get(&format!("/api/v1/marketplace/orders/{}", listed["order_hash"].as_str().unwrap())).await;
    assert_eq!(kept["signature"], by_wallet.to_string(), "{kept}");

    // The other wallet buys a usage license (1,000 units) with the kept signature.
    let escrow = U256::from(1000 * UNIT_PRICE);
    let purchase = market.market.purchase(order, by_wallet, 2).calldata().clone();
    let receipt = market.through_wallet(&buyer, 5, lm, escrow, purchase).await;
    let license = receipt.decoded_log::<LicenseMarket::LicensePurchased>().expect("purchased").licenseId;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;

    // It signs in as itself; its owner's plain signature of the message does not sign it in.
    let mut as_owner = NodeClient::new(&node.url).unwrap();
    let err = as_owner
        .sign_in_as(*buyer.address(), |message| {
            Ok(market.signer(5).sign_message_sync(message.as_bytes())?.as_bytes().to_vec())
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let mut client = NodeClient::new(&node.url).unwrap();
    client
        .sign_in_as(*buyer.address(), |message| {
            let hash = alloy::primitives::eip191_hash_message(message.as_bytes());
            Ok(market.wallet_signature(*buyer.address(), 5, hash).to_vec())
        })
        .await
        .unwrap();

    // Calls paid with the wallet's vouchers pass; its owner's or a stranger's signature does not.
    let call = |rows: usize, cumulative: u64, signature: Vec<u8>| {
        let request = client
            .authorize(client.http.post(client.endpoint(&format!("/api/v1/deployments/{id}/predict"))))
            .header("agora-voucher", metering::header(license, U256::from(cumulative), &signature))
            .json(&json!({"inputs": vec![[0.5, 1.0, -1.0, 2.0]; rows]}));
        async move {
            let r = request.send().await.unwrap();
            let receipt = r.headers().get("agora-receipt").map(|v| v.to_str().unwrap().to_owned());
            (r.status(), receipt, r.json::<Value>().await.unwrap())
        }
    };
    let voucher = |cumulative: u64| metering::voucher_hash(license, U256::from(cumulative), chain, lm);
    let wallet_voucher =
        |cumulative: u64| market.wallet_signature(*buyer.address(), 5, voucher(cumulative)).to_vec();
    let (status, receipt, body) = call(1, 1, wallet_voucher(1)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(receipt.unwrap().contains("cumulative_units=1;"));
    let (status, _, body) = call(2, 3, wallet_voucher(3)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 2);
    for signer in [5, 6] {
        let plain = market.signer(signer).sign_hash_sync(&voucher(4)).unwrap().as_bytes().to_vec();
        let (status, _, body) = call(1, 4, plain).await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("not signed"), "{body}");
    }
    let (_, usage) = node.get(&format!("/api/v1/licenses/{license}/usage")).await;
    assert_eq!(usage["cumulative_units"], "3");

    // The node settles the wallet's vouchers as they came; the chain asks the wallet again.
    let settled = agora_e2e::eventually("the vouchers settled", Duration::from_secs(60), || async {
        let (_, l) = node.get(&format!("/api/v1/licenses/{license}")).await;
        (l["license"]["escrow"]["settled_units"] == "3").then_some(l)
    })
    .await;
    let paid = U256::from(3 * UNIT_PRICE);
    assert_eq!(settled["license"]["escrow"]["settled_amount"], paid.to_string());
    market.distribute(token).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let revenue = paid - paid * U256::from(250) / U256::from(10_000);
    let (_, e) = node.get(&format!("/api/v1/marketplace/earnings?address={}", market.address(3))).await;
    assert_eq!(
        e["earnings"]["royalties"],
        (revenue * U256::from(3000) / U256::from(10_000)).to_string(),
        "{e}"
    );
}
