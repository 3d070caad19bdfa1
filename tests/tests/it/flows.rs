//! The seller's and the buyer's journey through the CLI against a node and a real chain:
//! publish with a three-way split, list a signed order, browse, buy (perpetual and timed),
//! earnings and withdrawal to the wei, cancel and nonce bump, a transfer that voids the order,
//! and listings the node must refuse.

use agora_contracts::{LicenseMarket, ModelRegistry, anvil::DEV_KEYS, order_domain};
use agora_e2e::agora;
use alloy::{
    eips::eip2718::Encodable2718,
    network::TransactionBuilder,
    primitives::{U256, utils::parse_ether},
    providers::Provider,
    providers::ext::AnvilApi,
    signers::SignerSync,
    sol_types::SolStruct,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::registry::{TOKEN, safetensors, start};

/// Someone at a terminal, with a chain RPC and a node.
struct User {
    rpc: String,
    node: String,
}

impl User {
    /// Runs `agora LINE` (split on spaces) with the wallet of `key`.
    fn run(
        &self,
        line: String,
        key: &str,
    ) -> impl std::future::Future<Output = (bool, Value, String)> + use<> {
        cli(line, self.rpc.clone(), self.node.clone(), key.to_owned())
    }
}

async fn cli(line: String, rpc: String, node: String, key: String) -> (bool, Value, String) {
    let env: Vec<(String, String)> = vec![
        ("AGORA_RPC_URL".into(), rpc),
        ("AGORA_NODE_URL".into(), node),
        ("AGORA_PRIVATE_KEY".into(), key),
    ];
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = line.split_whitespace().collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (status, stdout, stderr) = agora(&args, &env);
        (status.success(), serde_json::from_str(stdout.trim()).unwrap_or(Value::Null), stderr)
    })
    .await
    .unwrap()
}

async fn until_order_status(node: &agora_e2e::Node, hash: &str, status: &str) {
    agora_e2e::eventually(&format!("order {hash} {status}"), std::time::Duration::from_secs(30), || async {
        let (_, order) = node.get(&format!("/api/v1/marketplace/orders/{hash}")).await;
        (order["status"] == status).then_some(())
    })
    .await
}

async fn until_indexed_model(node: &agora_e2e::Node, token_id: U256) {
    agora_e2e::eventually(
        &format!("token {token_id} indexed"),
        std::time::Duration::from_secs(30),
        || async {
            let (status, _) = node.get(&format!("/api/v1/marketplace/models/{token_id}")).await;
            (status == 200).then_some(())
        },
    )
    .await
}

fn wei(v: &Value) -> U256 {
    v.as_str().unwrap_or_else(|| panic!("{v} is not a decimal string")).parse().unwrap()
}

#[tokio::test]
async fn sell_list_browse_buy_earn_withdraw_cancel() {
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let user = User { rpc: market.anvil.endpoint(), node: node.url.clone() };
    let run = |line: String, key: &'static str| user.run(line, key);
    let file = data.path().join("encoder.safetensors");
    std::fs::write(&file, safetensors(64, 9)).unwrap();
    let (a2, a3, a4) = (market.address(2), market.address(3), market.address(4));

    let (ok, published, err) = run(
        format!(
            "model publish {} --name encoder --split {a2}:5000 --split {a3}:3000 --split {a4}:2000 --json",
            file.display()
        ),
        DEV_KEYS[1],
    )
    .await;
    assert!(ok, "{err}");
    let token = published["token_id"].as_str().unwrap().to_owned();

    let (ok, listed, err) = run(
        format!("market list {token} --perpetual 0.5eth --timed 30d:0.05eth --usage 0.0001eth:100000 --expires 90d --json"),
        DEV_KEYS[1],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(listed["new"], true);
    let order_hash = listed["order_hash"].as_str().unwrap().to_owned();
    // the listing is in the audit log with its seller, once
    let (_, log) = node.get("/api/v1/audit/log?limit=1000").await;
    let seller: alloy::signers::local::PrivateKeySigner = DEV_KEYS[1].parse().unwrap();
    let object = format!("order:{order_hash} seller:{}", seller.address());
    let listings = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "market.list" && e["object"] == object.as_str())
        .count();
    assert_eq!(listings, 1, "{log}");

    // Browse: every term, and the filters.
    let (ok, rows, err) = run("market browse --json".into(), DEV_KEYS[9]).await;
    assert!(ok, "{err}");
    let kinds: Vec<_> =
        rows.as_array().unwrap().iter().map(|r| r["kind"].as_str().unwrap().to_owned()).collect();
    assert_eq!(kinds, ["perpetual", "timed", "usage"]);
    assert!(rows.as_array().unwrap().iter().all(|r| r["order_hash"] == order_hash.as_str()));
    let (_, timed, _) = run("market browse --kind timed --json".into(), DEV_KEYS[9]).await;
    assert_eq!(timed.as_array().unwrap().len(), 1);
    assert_eq!(timed[0]["price_wei"], parse_ether("0.05").unwrap().to_string());
    let (_, cheap, _) = run("market browse --max-price 0.1eth --json".into(), DEV_KEYS[9]).await;
    assert_eq!(cheap.as_array().unwrap().len(), 2);

    // Two buyers.
    let (ok, bought, err) =
        run(format!("license buy {order_hash} --term perpetual --json"), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    assert_eq!(bought["license"]["kind"], "perpetual");
    assert_eq!(
        bought["license"]["holder"].as_str().unwrap().to_lowercase(),
        market.address(5).to_string().to_lowercase()
    );
    let (ok, timed_license, err) =
        run(format!("license buy {order_hash} --term timed --json"), DEV_KEYS[6]).await;
    assert!(ok, "{err}");
    assert!(timed_license["license"]["expires_at"].as_u64().unwrap() > 0);
    // This model is too small to carry a fingerprint: the download says so (409), not a 500.
    let small = data.path().join("small-copy.safetensors");
    let license = bought["license_id"].as_str().unwrap();
    let (ok, _, err) = run(format!("license download {license} -o {}", small.display()), DEV_KEYS[5]).await;
    assert!(!ok);
    assert!(err.contains("409") && err.contains("eligible"), "{err}");
    let (ok, mine, err) = run("license list --json".into(), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    assert_eq!(mine["licenses"].as_array().unwrap().len(), 1);
    let (status, body) = node.get(&format!("/api/v1/marketplace/models/{token}")).await;
    assert_eq!(status, 200);
    assert_eq!(body["model"]["license_counts"], json!({"perpetual": 1, "timed": 1, "usage": 0}));

    // Money, to the wei: 0.55 ETH paid, 2.5% fee per booking, the rest split 50/30/20.
    let revenue =
        parse_ether("0.55").unwrap() - parse_ether("0.55").unwrap() * U256::from(250) / U256::from(10_000);
    let (ok, e3, err) = run(format!("market earnings --address {a3} --json"), DEV_KEYS[9]).await;
    assert!(ok, "{err}");
    assert_eq!(wei(&e3["earnings"]["pending"]), revenue * U256::from(3000) / U256::from(10_000));
    let before = market.provider.get_balance(a2).await.unwrap();
    let (ok, withdrawn, err) = run("market withdraw --json".into(), DEV_KEYS[2]).await;
    assert!(ok, "{err}");
    let expected = revenue * U256::from(5000) / U256::from(10_000);
    assert_eq!(wei(&withdrawn["amount"]), expected);
    let receipt = market
        .provider
        .get_transaction_receipt(withdrawn["tx"].as_str().unwrap().parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    let gas = U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price);
    assert_eq!(market.provider.get_balance(a2).await.unwrap(), before + expected - gas);
    // Once the index has the withdrawal, there is nothing left; before, the contract says so.
    let (ok, _, err) = run("market withdraw".into(), DEV_KEYS[2]).await;
    assert!(!ok);
    assert!(err.contains("nothing to withdraw") || err.contains("NothingToWithdraw"), "{err}");

    // Cancelling voids the order: gone from browse, and the node will not prepare a purchase.
    let (ok, _, err) = run(format!("market cancel {order_hash}"), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    let (_, rows, _) = run("market browse --json".into(), DEV_KEYS[9]).await;
    assert_eq!(rows, json!([]));
    let (_, order) = node.get(&format!("/api/v1/marketplace/orders/{order_hash}")).await;
    assert_eq!(order["status"], "cancelled");
    let (ok, _, err) = run(format!("license buy {order_hash} --term perpetual"), DEV_KEYS[7]).await;
    assert!(!ok);
    assert!(err.contains("cancelled"), "{err}");

    // A nonce bump voids every order of the seller.
    let (ok, second, err) = run(format!("market list {token} --perpetual 1eth --json"), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run("market cancel --all".into(), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    let (_, order) =
        node.get(&format!("/api/v1/marketplace/orders/{}", second["order_hash"].as_str().unwrap())).await;
    assert_eq!(order["status"], "stale_nonce");

    // After a transfer the old owner's order is dead, and buying with it reverts on-chain.
    let (ok, third, err) = run(format!("market list {token} --perpetual 1eth --json"), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    let third_hash = third["order_hash"].as_str().unwrap().to_owned();
    let (_, answer) = node.get(&format!("/api/v1/marketplace/orders/{third_hash}")).await;
    let order: agora_node::market::orders::OrderJson =
        serde_json::from_value(answer["order"].clone()).unwrap();
    let signature = alloy::primitives::hex::decode(answer["signature"].as_str().unwrap()).unwrap();
    let token_id: U256 = token.parse().unwrap();
    let registry = ModelRegistry::new(market.deployment.model_registry, &market.provider);
    registry
        .transferFrom(market.address(1), market.address(8), token_id)
        .from(market.address(1))
        .send()
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    until_order_status(&node, &third_hash, "not_owner").await;
    let lm = LicenseMarket::new(market.deployment.license_market, &market.provider);
    let attempt = lm
        .purchase(order.to_order().unwrap(), signature.into(), 0)
        .value(parse_ether("1").unwrap())
        .from(market.address(7))
        .send()
        .await;
    assert!(attempt.is_err(), "buying with a transferred token's order must revert");
}

#[tokio::test]
async fn listings_the_node_refuses() {
    let (market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let token_id = market.register("refusals").await;
    let http = reqwest::Client::new();
    let domain = order_domain(market.deployment.chain_id, market.deployment.license_market);
    let signed = |order: &LicenseMarket::Order, signer: usize| {
        market.signer(signer).sign_hash_sync(&order.eip712_signing_hash(&domain)).unwrap()
    };
    let post_with = |order: LicenseMarket::Order, signature: String| {
        let body = json!({"order": agora_node::market::orders::OrderJson::from_order(&order), "signature": signature});
        let http = http.clone();
        let url = format!("{}/api/v1/marketplace/list", node.url);
        async move {
            let r = http.post(url).json(&body).send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let post = |order: LicenseMarket::Order, signer: usize| {
        let signature = signed(&order, signer).to_string();
        post_with(order, signature)
    };
    until_indexed_model(&node, token_id).await;
    let (good, _) = market.order(token_id, U256::ZERO);
    // Signed with `s` in the upper half and `v` as 0/1, a form the market's `purchase` refuses
    // as it is: the node keeps the form it takes (the relayed purchase below uses it).
    let mirrored = agora_e2e::market::mirrored(&signed(&good, 1)).as_rsy();
    let (status, first) = post_with(good.clone(), alloy::primitives::hex::encode_prefixed(mirrored)).await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    let (_, kept) =
        node.get(&format!("/api/v1/marketplace/orders/{}", first["order_hash"].as_str().unwrap())).await;
    assert_eq!(kept["signature"], signed(&good, 1).to_string(), "{kept}");
    let (status, again) = post(good.clone(), 1).await;
    assert_eq!((status, &again["order_hash"]), (StatusCode::OK, &first["order_hash"]));

    // Signed by someone else than the seller it names.
    let (status, body) = post(good.clone(), 2).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("bad_signature")));
    // A seller who does not own the token.
    let mut theirs = good.clone();
    theirs.seller = market.address(2);
    let (status, body) = post(theirs, 2).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::FORBIDDEN, Some("not_owner")));
    // Terms the contract would refuse.
    let mut free = good.clone();
    free.terms[0].price = U256::ZERO;
    let (status, body) = post(free, 1).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_terms")),
        "{body}"
    );
    let mut endless = good.clone();
    endless.terms[1].duration = 0;
    let (status, _) = post(endless, 1).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    // Expired, and a stale nonce.
    let mut old = good.clone();
    old.expiry = 1;
    let (status, body) = post(old, 1).await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("expired")));
    let mut stale = good.clone();
    stale.nonce = U256::from(5);
    let (status, body) = post(stale, 1).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, Some("stale_nonce"))
    );
    // A client without its own RPC: the node prepares the purchase, the wallet signs it
    // locally, the node relays the signed bytes (and relays nothing but purchases).
    let buyer = market.address(5);
    let purchase = |body: Value| {
        let request = http.post(format!("{}/api/v1/marketplace/purchase", node.url)).json(&body);
        async move {
            let r = request.send().await.unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (_, prepared) =
        purchase(json!({"order_hash": first["order_hash"], "term": "perpetual", "from": buyer})).await;
    let fees = market.provider.estimate_eip1559_fees().await.unwrap();
    let nonce = market.provider.get_transaction_count(buyer).await.unwrap();
    let sign = |to: alloy::primitives::Address, data: alloy::primitives::Bytes, value: U256| {
        let wallet = alloy::network::EthereumWallet::from(market.signer(5));
        let request = alloy::rpc::types::TransactionRequest::default()
            .with_from(buyer)
            .with_to(to)
            .with_value(value)
            .with_input(data)
            .with_nonce(nonce)
            .with_chain_id(market.deployment.chain_id)
            .with_gas_limit(prepared["gas"].as_u64().unwrap() * 2)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        async move {
            alloy::primitives::hex::encode_prefixed(
                <alloy::rpc::types::TransactionRequest as alloy::network::NetworkTransactionBuilder<
                    alloy::network::Ethereum,
                >>::build(request, &wallet)
                .await
                .unwrap()
                .encoded_2718(),
            )
        }
    };
    let data: alloy::primitives::Bytes = prepared["data"].as_str().unwrap().parse().unwrap();
    let value: U256 = prepared["value"].as_str().unwrap().parse().unwrap();
    let elsewhere = sign(market.address(3), data.clone(), value).await;
    let (status, _) = purchase(json!({"raw_transaction": elsewhere})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let raw = sign(prepared["to"].as_str().unwrap().parse().unwrap(), data, value).await;
    let (_, relayed) = purchase(json!({"raw_transaction": raw})).await;
    let tx: alloy::primitives::B256 =
        relayed["tx_hash"].as_str().unwrap_or_else(|| panic!("{relayed}")).parse().unwrap();
    let receipt =
        agora_e2e::eventually("the relayed purchase mined", std::time::Duration::from_secs(30), || async {
            market.provider.get_transaction_receipt(tx).await.ok().flatten()
        })
        .await;
    assert!(receipt.status());
    let purchased = receipt.decoded_log::<LicenseMarket::LicensePurchased>().unwrap();
    assert_eq!(purchased.holder, buyer);

    // Traces are limited per caller: ten a minute, then 429.
    for i in 0..11 {
        let r = http
            .post(format!("{}/api/v1/audit/trace", node.url))
            .bearer_auth(TOKEN)
            .body(b"not a model".to_vec())
            .send()
            .await
            .unwrap();
        let want = if i < 10 { StatusCode::BAD_REQUEST } else { StatusCode::TOO_MANY_REQUESTS };
        assert_eq!(r.status(), want, "trace {i}");
    }

    // Malformed JSON.
    let r = http
        .post(format!("{}/api/v1/marketplace/list", node.url))
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

/// A safetensors file the watermark can mark: one bf16 [1024, 512] matrix (524,288 weights).
fn markable(seed: u32) -> Vec<u8> {
    markable_sized(seed, 1024, 512)
}

/// A bf16 matrix of `rows` × `cols` under an eligible name.
fn markable_sized(seed: u32, rows: usize, cols: usize) -> Vec<u8> {
    let data = rows * cols * 2;
    let header = format!(
        r#"{{"encoder.layer.0.weight":{{"dtype":"BF16","shape":[{rows},{cols}],"data_offsets":[0,{data}]}}}}"#
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let mut x = seed.wrapping_mul(2_654_435_761) | 1;
    for _ in 0..rows * cols {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Normal-ish weights around ±0.05: a bf16 with exponent near 2^-5 and a random mantissa.
        let sign = (x >> 31) as u16;
        let exponent = 0x79 + (x % 4) as u16;
        let mantissa = ((x >> 8) & 0x7f) as u16;
        let bf16 = (sign << 15) | (exponent << 7) | mantissa;
        bytes.extend_from_slice(&bf16.to_le_bytes());
    }
    bytes
}

/// A node that makes copies only when asked, and a perpetual license to `model` bought by the
/// fifth dev account from the second.
struct OnDemand {
    market: agora_e2e::market::Market,
    data: tempfile::TempDir,
    node: agora_e2e::Node,
    user: User,
    token: String,
    license: String,
}

impl OnDemand {
    async fn sold(model: Vec<u8>, name: &str) -> Self {
        let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_COPY_AHEAD", "0")]).await;
        let user = User { rpc: market.anvil.endpoint(), node: node.url.clone() };
        let original = data.path().join("original.safetensors");
        std::fs::write(&original, model).unwrap();
        let (ok, published, err) =
            user.run(format!("model publish {} --name {name} --json", original.display()), DEV_KEYS[1]).await;
        assert!(ok, "{err}");
        let token = published["token_id"].as_str().unwrap().to_owned();
        let (ok, listed, err) =
            user.run(format!("market list {token} --perpetual 0.1eth --json"), DEV_KEYS[1]).await;
        assert!(ok, "{err}");
        let order = listed["order_hash"].as_str().unwrap().to_owned();
        let (ok, bought, err) =
            user.run(format!("license buy {order} --term perpetual --json"), DEV_KEYS[5]).await;
        assert!(ok, "{err}");
        let license = bought["license_id"].as_str().unwrap().to_owned();
        Self { market, data, node, user, token, license }
    }
}

/// With copies made on demand, the first download streams the copy while it is made: the
/// bytes it gets are the copy the node then stores, and the receipt signs their hash.
#[tokio::test]
async fn a_first_download_streams_the_copy_while_it_is_made() {
    let OnDemand { market, data, node, user, token, license } = OnDemand::sold(markable(4), "streamed").await;
    let run = |line: String, key: &'static str| user.run(line, key);
    assert_eq!(node.process.output().matches("copy ready").count(), 0, "no copy is made ahead");

    let mut buyer = agora_node::client::NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();
    let response = buyer
        .authorize(buyer.http.get(buyer.endpoint(&format!("/api/v1/licenses/{license}/download"))))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
    let (making, served_hash) = (header("agora-delivery"), header("agora-content-blake3"));
    // A copy whole before the answer was built carries its hash; otherwise the answer says so.
    assert!(
        making.as_deref() == Some("making") && served_hash.is_none()
            || making.is_none() && served_hash.is_some(),
        "{making:?} {served_hash:?}"
    );
    assert_eq!(response.content_length(), Some(markable(4).len() as u64));
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len(), markable(4).len());
    assert_ne!(&bytes[..], &markable(4)[..]);
    let hash = blake3::hash(&bytes).to_hex().to_string();

    let receipt = buyer.get_json(&format!("/api/v1/licenses/{license}/receipt")).await.unwrap();
    assert_eq!(receipt["blake3"], hash.as_str(), "{receipt}");
    assert_eq!(receipt["size"], bytes.len() as u64);
    assert_eq!(receipt["token_id"], token.as_str());
    // Someone else gets no receipt.
    let mut other = agora_node::client::NodeClient::new(&node.url).unwrap();
    other.sign_in(&market.signer(6)).await.unwrap();
    assert!(
        other
            .get_json(&format!("/api/v1/licenses/{license}/receipt"))
            .await
            .unwrap_err()
            .to_string()
            .contains("403")
    );

    // The CLI's download now finds the stored copy: the same bytes, signature checked.
    let copy = data.path().join("copy.safetensors");
    let (ok, got, err) =
        run(format!("license download {license} -o {} --json", copy.display()), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    assert_eq!(got["blake3"], hash.as_str());
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);
    agora_e2e::eventually("the copy stored", std::time::Duration::from_secs(30), || async {
        (node.process.output().matches("copy ready").count() == 1).then_some(())
    })
    .await;
    // Both deliveries are in the audit log with the file's hash (the streamed one once whole).
    agora_e2e::eventually("both deliveries logged", std::time::Duration::from_secs(30), || async {
        let (_, log) = node.get("/api/v1/audit/log?limit=1000").await;
        let action = format!("license.download {hash}");
        let logged = log["entries"].as_array()?.iter().filter(|e| e["action"] == action.as_str()).count();
        (logged == 2).then_some(())
    })
    .await;
}

/// The CLI's first download of a copy made on demand streams it while it is made (32 MiB: the
/// node answers after the first 8 MiB block), then takes the signed hash from the receipt
/// and checks both.
#[tokio::test]
async fn the_cli_checks_a_streamed_copy_against_its_receipt() {
    let model = markable_sized(9, 4096, 4096);
    let size = model.len();
    let OnDemand { market, data, node, user, token, license } = OnDemand::sold(model, "streamed-cli").await;
    let run = |line: String, key: &'static str| user.run(line, key);

    let copy = data.path().join("copy.safetensors");
    let (ok, got, err) =
        run(format!("license download {license} -o {} --json", copy.display()), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(bytes.len(), size);
    assert_eq!(got["blake3"], blake3::hash(&bytes).to_hex().as_str(), "{got}");
    assert_eq!(got["token_id"], token.as_str());
    // What the CLI checked is what the node signs for the copy it stored.
    let mut buyer = agora_node::client::NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();
    let receipt = buyer.get_json(&format!("/api/v1/licenses/{license}/receipt")).await.unwrap();
    assert_eq!(receipt["blake3"], got["blake3"]);
    assert_eq!(receipt["signature"], got["signature"]);
}

#[tokio::test]
async fn licensed_downloads_are_fingerprinted_gated_resumable_and_traceable() {
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let user = User { rpc: market.anvil.endpoint(), node: node.url.clone() };
    let run = |line: String, key: &'static str| user.run(line, key);
    let original = data.path().join("original.safetensors");
    std::fs::write(&original, markable(3)).unwrap();
    let (ok, published, err) =
        run(format!("model publish {} --name leaky --json", original.display()), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    let token = published["token_id"].as_str().unwrap().to_owned();
    let (ok, listed, err) =
        run(format!("market list {token} --perpetual 0.1eth --timed 1d:0.01eth --json"), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    let order = listed["order_hash"].as_str().unwrap().to_owned();
    let (ok, perpetual, err) = run(format!("license buy {order} --term perpetual --json"), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    let (ok, timed, err) = run(format!("license buy {order} --term timed --json"), DEV_KEYS[6]).await;
    assert!(ok, "{err}");
    let (l1, l2) = (
        perpetual["license_id"].as_str().unwrap().to_owned(),
        timed["license_id"].as_str().unwrap().to_owned(),
    );

    // The node makes the copies as soon as it indexes the purchases, before anyone asks.
    agora_e2e::eventually("copies made ahead", std::time::Duration::from_secs(60), || async {
        let log = node.process.output();
        (log.matches("copy ready").count() >= 2).then_some(())
    })
    .await;

    // The holder's copy: hash and node signature checked by the CLI, different from the original.
    let copy = data.path().join("copy.safetensors");
    let (ok, got, err) =
        run(format!("license download {l1} -o {} --json", copy.display()), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    let bytes = std::fs::read(&copy).unwrap();
    assert_eq!(got["blake3"], blake3::hash(&bytes).to_hex().as_str());
    assert_eq!(bytes.len(), markable(3).len());
    assert_ne!(bytes, markable(3));

    // A partial file resumes with a range request and ends up identical.
    std::fs::write(&copy, &bytes[..bytes.len() / 3]).unwrap();
    let (ok, again, err) =
        run(format!("license download {l1} -o {} --json", copy.display()), DEV_KEYS[5]).await;
    assert!(ok, "{err}");
    assert_eq!(again["blake3"], got["blake3"]);
    assert_eq!(std::fs::read(&copy).unwrap(), bytes);

    // The "leaked" copy is traced to the downloader's license with the node's key.
    let key = data.path().join("watermark.key");
    let (status, stdout, stderr) = tokio::task::spawn_blocking({
        let (copy, key, original) =
            (copy.display().to_string(), key.display().to_string(), original.display().to_string());
        move || {
            agora(
                &[
                    "watermark",
                    "trace",
                    &copy,
                    "--key",
                    &key,
                    "--original",
                    &original,
                    "--licenses",
                    "1-20",
                    "--json",
                ],
                &[],
            )
        }
    })
    .await
    .unwrap();
    assert!(status.success(), "{stderr}");
    let trace: Value = serde_json::from_str(&stdout).unwrap();
    let accused: Vec<_> = trace["accused"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"]["license"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(accused, std::slice::from_ref(&l1), "{trace}");

    // The node does the same for the model's owner: model, owner, license, holder, purchase.
    let (ok, report, err) = run(format!("audit file {} --json", copy.display()), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    assert_eq!(report["identified"], true, "{report}");
    assert_eq!(report["token_id"], token.as_str());
    assert_eq!(report["accused"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["accused"][0]["license_id"], l1.as_str());
    assert_eq!(
        report["accused"][0]["holder"].as_str().unwrap().to_lowercase(),
        market.address(5).to_string().to_lowercase()
    );
    assert_eq!(report["accused"][0]["purchase_tx"], perpetual["tx"]);
    // Not a public oracle: a buyer may not run it; the original itself accuses nobody.
    let (ok, _, err) = run(format!("audit file {} --json", copy.display()), DEV_KEYS[6]).await;
    assert!(!ok);
    assert!(err.contains("403"), "{err}");
    let (ok, clean, err) = run(format!("audit file {} --json", original.display()), DEV_KEYS[1]).await;
    assert!(ok, "{err}");
    assert_eq!(clean["identified"], false, "the unmarked original carries no owner mark: {clean}");

    // Only the holder, only while the license is active.
    let other = data.path().join("other.safetensors");
    let (ok, _, err) = run(format!("license download {l1} -o {}", other.display()), DEV_KEYS[6]).await;
    assert!(!ok);
    assert!(err.contains("another wallet"), "{err}");
    let (ok, _, err) = run(format!("license download {l2} -o {}", other.display()), DEV_KEYS[6]).await;
    assert!(ok, "{err}");
    let (ok, _, err) = run(format!("license download 999 -o {}", other.display()), DEV_KEYS[6]).await;
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let plain = reqwest::get(format!("{}/api/v1/licenses/{l1}/download", node.url)).await.unwrap();
    assert_eq!(plain.status(), StatusCode::UNAUTHORIZED);

    market.provider.anvil_increase_time(2 * 86_400).await.unwrap();
    market.mine(1).await;
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;
    std::fs::remove_file(&other).unwrap();
    let (ok, _, err) = run(format!("license download {l2} -o {}", other.display()), DEV_KEYS[6]).await;
    assert!(!ok);
    assert!(err.contains("expired at"), "{err}");
    // Renewed, it works again.
    let (ok, renewed, err) = run(format!("license buy {order} --term timed --json"), DEV_KEYS[6]).await;
    assert!(ok, "{err}");
    let l3 = renewed["license_id"].as_str().unwrap();
    let (ok, _, err) = run(format!("license download {l3} -o {}", other.display()), DEV_KEYS[6]).await;
    assert!(ok, "{err}");

    let (_, log) = node.get("/api/v1/audit/log?limit=1000").await;
    let downloads = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("license.download"))
        .count();
    assert!(downloads >= 4, "{log}");
}
