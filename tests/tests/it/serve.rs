//! Deployments against a node and a chain: an MLP registered with its config.json, deployed by
//! its owner, answering license holders with the same numbers as a forward pass written here.

use std::time::Duration;

use agora_node::client::NodeClient;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::registry::{TOKEN, start};

use agora_e2e::mlp::{forward as reference, forward_shifted, register, register_shifted};

/// The seller (account 1) signed in, having registered an MLP as `name` and anchored it on-chain.
pub(super) async fn publish(
    market: &agora_e2e::market::Market,
    node: &agora_e2e::Node,
    name: &str,
    with_config: bool,
) -> (NodeClient, alloy::primitives::U256) {
    let mut seller = NodeClient::new(&node.url).unwrap();
    seller.sign_in(&market.signer(1)).await.unwrap();
    let version = register(&seller, name, with_config).await;
    let hash = format!("0x{}", version["file"]["blake3"].as_str().unwrap()).parse().unwrap();
    let token = market.register_content(hash, name).await;
    agora_e2e::eventually("the anchor indexed", Duration::from_secs(30), || async {
        let (_, v) = node.get(&format!("/api/v1/models/{name}")).await;
        (v["token_id"] == token.to_string()).then_some(())
    })
    .await;
    (seller, token)
}

/// Runs `agora LINE` (split on spaces) as buyer 7 against the node: (success, stdout JSON, stderr).
async fn cli(
    market: &agora_e2e::market::Market,
    node: &agora_e2e::Node,
    state: &std::path::Path,
    line: String,
) -> (bool, Value, String) {
    cli_as(7, market, node, state, line).await
}

/// Runs `agora LINE` as anvil account `who`.
async fn cli_as(
    who: usize,
    market: &agora_e2e::market::Market,
    node: &agora_e2e::Node,
    state: &std::path::Path,
    line: String,
) -> (bool, Value, String) {
    let env = [
        ("AGORA_NODE_URL".to_owned(), node.url.clone()),
        ("AGORA_RPC_URL".to_owned(), market.anvil.endpoint()),
        ("AGORA_PRIVATE_KEY".to_owned(), agora_contracts::anvil::DEV_KEYS[who].to_owned()),
        ("AGORA_STATE_DIR".to_owned(), state.display().to_string()),
    ];
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = line.split_whitespace().collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (status, stdout, stderr) = agora_e2e::agora(&args, &env);
        (status.success(), serde_json::from_str::<Value>(stdout.trim()).unwrap_or(Value::Null), stderr)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn license_holders_get_the_models_answers() {
    let (market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let (seller, token) = publish(&market, &node, "iris", true).await;

    // Only the owner (or an operator) deploys.
    let mut stranger = NodeClient::new(&node.url).unwrap();
    stranger.sign_in(&market.signer(6)).await.unwrap();
    let err = stranger.post_json("/api/v1/deployments/create", &json!({"model": "iris"})).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let created = seller
        .post_json("/api/v1/deployments/create", &json!({"model": "iris", "runtime": "builtin"}))
        .await
        .unwrap();
    assert_eq!(created["status"], "ready", "{created}");
    assert_eq!(created["token_id"], token.to_string());
    let id = created["deployment_id"].as_str().unwrap().to_owned();

    // A perpetual license holder gets the network's answers.
    market.buy(token, 5, 0).await;
    market.buy(token, 7, 2).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut buyer = NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();
    let rows = vec![vec![0.5, -1.0, 2.0, 0.25], vec![1.0, 1.0, 1.0, 1.0], vec![-3.0, 0.0, 0.5, 4.0]];
    let answer = buyer
        .post_json(&format!("/api/v1/deployments/{id}/predict"), &json!({"inputs": rows}))
        .await
        .unwrap();
    let outputs = answer["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 3);
    for (row, got) in rows.iter().zip(outputs) {
        let got: Vec<f32> = got.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        for (a, b) in reference(row).iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    // Everyone else: no license 403, nobody 401, bad input 400.
    let path = format!("/api/v1/deployments/{id}/predict");
    let err = stranger.post_json(&path, &json!({"inputs": [[1, 2, 3, 4]]})).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let err = NodeClient::new(&node.url)
        .unwrap()
        .post_json(&path, &json!({"inputs": [[1, 2, 3, 4]]}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    let err = buyer.post_json(&path, &json!({"inputs": [[1, 2, 3]]})).await.unwrap_err();
    assert!(err.to_string().contains("400") && err.to_string().contains("takes 4"), "{err}");

    let (_, status) = node.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(status["requests"], 2, "{status}");
    assert_eq!(status["errors"], 1);

    metered_calls(&market, &node, &id).await;
    assert!(status["latency_p50_ms"].as_f64().is_some());

    // A version without config.json deploys as failed, with the reason.
    register(&seller, "no-config", false).await;
    let failed =
        seller.post_json("/api/v1/deployments/create", &json!({"model": "no-config"})).await.unwrap();
    assert_eq!(failed["status"], "failed");
    assert!(failed["reason"].as_str().unwrap().contains("config.json"), "{failed}");
    let (_, all) = node.get("/api/v1/deployments").await;
    assert_eq!(all["deployments"].as_array().unwrap().len(), 2);
    // listed and removed from the command line: by the owner, not by a stranger
    let failed_id = failed["deployment_id"].as_str().unwrap();
    let state = tempfile::tempdir().unwrap();
    let (ok, listed, err) = cli_as(6, &market, &node, state.path(), "deploy list --json".into()).await;
    assert!(ok, "{err}");
    assert_eq!(listed, all);
    let (ok, _, err) = cli_as(6, &market, &node, state.path(), format!("deploy delete {failed_id}")).await;
    assert!(!ok && err.contains("403"), "{err}");
    let (ok, deleted, err) =
        cli_as(1, &market, &node, state.path(), format!("deploy delete {failed_id} --json")).await;
    assert!(ok, "{err}");
    assert_eq!(deleted, json!({"deployment_id": failed_id, "deleted": true}));
    let (_, all) = node.get("/api/v1/deployments").await;
    assert_eq!(all["deployments"].as_array().unwrap().len(), 1, "{all}");
    assert_eq!(node.get(&format!("/api/v1/deployments/{failed_id}")).await.0, 404);
    // each change of a deployment is in the audit log, and the chain holds
    let (_, log) = node.get("/api/v1/audit/log?limit=1000").await;
    let logged =
        |action: &str, object: &str| {
            log["entries"].as_array().unwrap().iter().any(|e| {
                e["action"] == action && e["object"].as_str().unwrap_or_default().starts_with(object)
            })
        };
    assert!(logged("deployment.create", &format!("deployment:{failed_id} model:no-config/")), "{log}");
    assert!(logged("deployment.delete", &format!("deployment:{failed_id}")), "{log}");
    let entries = log["entries"].as_array().unwrap();
    for (n, pair) in entries.windows(2).enumerate() {
        assert_eq!((pair[0]["seq"].as_u64(), &pair[1]["prev"]), (Some(n as u64), &pair[0]["hash"]), "{log}");
    }
}

/// A usage license holder pays each call with a voucher; the node counts every unit once.
async fn metered_calls(market: &agora_e2e::market::Market, node: &agora_e2e::Node, id: &str) {
    use agora_node::serve::metering;
    use alloy::{primitives::U256, signers::SignerSync};
    let mut usage = NodeClient::new(&node.url).unwrap();
    usage.sign_in(&market.signer(7)).await.unwrap();
    let (_, licenses) = node.get(&format!("/api/v1/licenses?holder={}", market.address(7))).await;
    let license: U256 = licenses["licenses"][0]["license_id"].as_str().unwrap().parse().unwrap();
    let (chain, lm) = (market.deployment.chain_id, market.deployment.license_market);
    let voucher = |signer: usize, cumulative: u64| {
        let hash = metering::voucher_hash(license, U256::from(cumulative), chain, lm);
        let signature = market.signer(signer).sign_hash_sync(&hash).unwrap();
        metering::header(license, U256::from(cumulative), &signature.as_bytes())
    };
    let path = format!("/api/v1/deployments/{id}/predict");
    let call = |rows: usize, header: Option<String>| {
        let mut request = usage
            .authorize(usage.http.post(usage.endpoint(&path)))
            .json(&json!({"inputs": vec![vec![0.5, 1.0, -1.0, 2.0]; rows]}));
        if let Some(h) = header {
            request = request.header("agora-voucher", h);
        }
        async move {
            let r = request.send().await.unwrap();
            let status = r.status();
            let receipt = r.headers().get("agora-receipt").map(|v| v.to_str().unwrap().to_owned());
            (status, receipt, r.json::<Value>().await.unwrap())
        }
    };

    // Without a voucher: 402 naming the count to sign.
    let (status, _, body) = call(1, None).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("required_cumulative_units=1"), "{body}");
    // Paid calls, one row then two: receipts signed by the node.
    let (status, receipt, body) = call(1, Some(voucher(7, 1))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(receipt.unwrap().contains("cumulative_units=1;"));
    let (status, _, body) = call(2, Some(voucher(7, 3))).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["outputs"].as_array().unwrap().len(), 2);
    // Skipped, replayed, forged: refused, nothing counted.
    let (status, _, body) = call(1, Some(voucher(7, 5))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert!(body["error"]["message"].as_str().unwrap().contains("required_cumulative_units=4"), "{body}");
    let (status, _, _) = call(2, Some(voucher(7, 3))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _, body) = call(1, Some(voucher(8, 4))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
    assert!(body["error"]["message"].as_str().unwrap().contains("not signed"), "{body}");
    let (_, usage_now) = node.get(&format!("/api/v1/licenses/{license}/usage")).await;
    assert_eq!(usage_now["cumulative_units"], "3");

    // Fifty concurrent callers with counts 4..=53 in no order: each accepted call moved the
    // count by exactly one, so the final count is 3 plus the accepted calls.
    let calls: Vec<_> = (4..54u64).rev().map(|c| call(1, Some(voucher(7, c)))).collect();
    let results = futures::future::join_all(calls).await;
    let accepted = results.iter().filter(|(s, _, _)| *s == StatusCode::OK).count() as u64;
    assert!(accepted >= 1);
    let (_, usage_now) = node.get(&format!("/api/v1/licenses/{license}/usage")).await;
    assert_eq!(usage_now["cumulative_units"], (3 + accepted).to_string());
    let mut counted: Vec<String> = results.iter().filter_map(|(_, r, _)| r.clone()).collect();
    counted.sort();
    counted.dedup();
    assert_eq!(counted.len() as u64, accepted, "every accepted call has its own receipt");

    // The CLI signs its own vouchers, keeps the count in a state file, and recovers it from
    // the node when the file is gone.
    let state = tempfile::tempdir().unwrap();
    let cli = |line: String| cli(market, node, state.path(), line);
    let before: u64 = node.get(&format!("/api/v1/licenses/{license}/usage")).await.1["cumulative_units"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for round in 0..3 {
        if round == 2 {
            for entry in std::fs::read_dir(state.path()).unwrap() {
                std::fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        let (ok, out, err) =
            cli(format!("deploy predict {id} --input [[1,2,3,4],[0,0,0,1]] --license {license} --json"))
                .await;
        assert!(ok, "{err}");
        assert_eq!(out["outputs"].as_array().unwrap().len(), 2);
        assert!(
            out["receipt"]
                .as_str()
                .unwrap()
                .contains(&format!("cumulative_units={};", before + 2 * (round + 1)))
        );
    }
    // Every metered call left a signed receipt; the CLI checks them all.
    let (ok, listed, err) = cli(format!("license receipts {license} --json")).await;
    assert!(ok, "{err}");
    assert_eq!(listed["invalid"], 0);
    assert_eq!(listed["receipts"].as_array().unwrap().len() as u64, 2 + accepted + 3);
    let (ok, status, err) = cli(format!("deploy status {id} --json")).await;
    assert!(ok, "{err}");
    assert!(status["requests"].as_u64().unwrap() > 3);
    let last = 3 + accepted + 6;
    assert_eq!((&status["units_metered"], &status["units_settled"]), (&json!(last.to_string()), &json!("0")));

    // The escrow covers 1,000 units: a call beyond it asks for a top-up.
    let (status, _, body) = call(998, Some(voucher(7, last + 998))).await;
    assert_eq!(status, StatusCode::PAYMENT_REQUIRED, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("top up"), "{body}");
}

/// The node's `agora_usage_*` gauges: licenses, units metered, settled, pending.
async fn usage_gauges(url: &str) -> [u64; 4] {
    let text = reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap();
    ["licenses", "units_metered", "units_settled", "units_pending"].map(|name| {
        let name = format!("agora_usage_{name} ");
        let line =
            text.lines().find(|l| l.starts_with(&name)).unwrap_or_else(|| panic!("no {name}in {text}"));
        line[name.len()..].trim().parse::<f64>().unwrap() as u64
    })
}

/// A deployment's units metered, settled and pending.
async fn deployment_units(node: &agora_e2e::Node, id: &str) -> [String; 3] {
    let (_, d) = node.get(&format!("/api/v1/deployments/{id}")).await;
    ["units_metered", "units_settled", "units_pending"]
        .map(|k| d[k].as_str().unwrap_or_else(|| panic!("{k}: {d}")).to_owned())
}

/// Buyer 7's usage license of `token`, indexed, and `seller`'s deployment of `model`:
/// (license, deployment id, buyer 7 signed in).
pub(super) async fn usage_deployment(
    market: &agora_e2e::market::Market,
    node: &agora_e2e::Node,
    seller: &NodeClient,
    token: alloy::primitives::U256,
    model: &str,
) -> (alloy::primitives::U256, String, NodeClient) {
    let license = market.buy(token, 7, 2).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let created = seller.post_json("/api/v1/deployments/create", &json!({"model": model})).await.unwrap();
    let id = created["deployment_id"].as_str().unwrap().to_owned();
    let mut buyer = NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(7)).await.unwrap();
    (license, id, buyer)
}

#[tokio::test]
async fn accepted_vouchers_are_settled_on_chain_even_after_a_crash() {
    use agora_node::serve::metering;
    use alloy::{primitives::U256, signers::SignerSync};
    // A node that meters but does not settle (no operator key).
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let mut seller = NodeClient::new(&node.url).unwrap();
    seller.sign_in(&market.signer(1)).await.unwrap();
    let version = register(&seller, "iris", true).await;
    let hash = format!("0x{}", version["file"]["blake3"].as_str().unwrap()).parse().unwrap();
    let token = market.register_content(hash, "iris").await;
    let (license, id, buyer) = usage_deployment(&market, &node, &seller, token, "iris").await;
    let (chain, lm) = (market.deployment.chain_id, market.deployment.license_market);
    for cumulative in 1..=5u64 {
        let hash = metering::voucher_hash(license, U256::from(cumulative), chain, lm);
        let signature = market.signer(7).sign_hash_sync(&hash).unwrap();
        // Vouchers in every form a wallet may sign them, among them two the market refuses as
        // they are (`s` in the upper half, `v` as 0/1) and the one settled (the last): the node
        // keeps each in the form `settleUsage` takes.
        let mirrored = agora_e2e::market::mirrored(&signature);
        let sent = match cumulative {
            2 => signature.as_rsy(),
            3 => mirrored.as_bytes(),
            5 => mirrored.as_rsy(),
            _ => signature.as_bytes(),
        };
        let r = buyer
            .authorize(buyer.http.post(buyer.endpoint(&format!("/api/v1/deployments/{id}/predict"))))
            .header("agora-voucher", metering::header(license, U256::from(cumulative), &sent))
            .json(&json!({"inputs": [[1.0, 2.0, 3.0, 4.0]]}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }

    // A top-up, a call its escrow pays for (998 units, past the 1,000 bought), then a reorg
    // that undoes the top-up: that voucher is beyond what the chain holds, so the node settles
    // the last one the escrow covers (5 units) instead of none.
    let snapshot = market.snapshot().await;
    let top_up = U256::from(1000u64) * U256::from(agora_e2e::market::UNIT_PRICE);
    use agora_e2e::market::Mined;
    market.market.topUp(license).value(top_up).from(market.address(7)).send().await.unwrap().mined().await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let hash = metering::voucher_hash(license, U256::from(1003u64), chain, lm);
    let signature = market.signer(7).sign_hash_sync(&hash).unwrap();
    let r = buyer
        .authorize(buyer.http.post(buyer.endpoint(&format!("/api/v1/deployments/{id}/predict"))))
        .header("agora-voucher", metering::header(license, U256::from(1003u64), &signature.as_bytes()))
        .json(&json!({"inputs": vec![[1.0, 2.0, 3.0, 4.0]; 998]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    market.revert(snapshot).await;
    market.mine(3).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let (_, l) = node.get(&format!("/api/v1/licenses/{license}")).await;
    let bought = U256::from(1000u64) * U256::from(agora_e2e::market::UNIT_PRICE);
    assert_eq!(l["license"]["escrow"]["deposited"], bought.to_string(), "the top-up is undone: {l}");

    // Accepted, not settled: this node has no operator wallet, so nothing fails either.
    let usage_path = format!("/api/v1/licenses/{license}/usage");
    let (_, usage) = node.get(&usage_path).await;
    assert_eq!(
        (&usage["cumulative_units"], &usage["settled_units"]),
        (&json!("1003"), &json!("0")),
        "{usage}"
    );
    assert_eq!(
        (&usage["pending_units"], &usage["settlement_failure"]),
        (&json!("1003"), &Value::Null),
        "{usage}"
    );
    assert_eq!(usage_gauges(&node.url).await, [1, 1003, 0, 1003]);
    assert_eq!(deployment_units(&node, &id).await, ["1003", "0", "1003"]);

    // Killed before settling; restarted with an operator wallet that has no ether, whose
    // settlements fail (shown with the license), then funded: it settles what it accepted.
    let mut node = node;
    nix::sys::signal::kill(node.process.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    node.process.wait(Duration::from_secs(10));
    let operator = alloy::signers::local::PrivateKeySigner::random();
    let operator_key = alloy::hex::encode_prefixed(operator.to_bytes());
    let node = agora_e2e::Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_OPERATOR_KEY", &operator_key), ("AGORA_SETTLE_MIN_WEI", "1")],
    );
    let failing = agora_e2e::eventually("a failed settlement shown", Duration::from_secs(60), || async {
        let (_, usage) = node.get(&usage_path).await;
        usage["settlement_failure"]["attempts"].as_u64().is_some_and(|n| n >= 1).then_some(usage)
    })
    .await;
    let failure = &failing["settlement_failure"];
    assert!(failure["error"].as_str().is_some_and(|e| e.to_lowercase().contains("funds")), "{failing}");
    assert!(failure["retry_ms"].as_u64() > failure["failed_ms"].as_u64(), "{failing}");
    assert_eq!(failing["settled_units"], "0");
    // the CLI shows it too
    let env = [("AGORA_NODE_URL", node.url.as_str())];
    let (status, out, err) = agora_e2e::agora(&["license", "usage", &license.to_string()], &env);
    assert!(status.success(), "{err}");
    assert!(out.contains("1003 units accepted, 0 settled on-chain, 1003 pending"), "{out}");
    assert!(out.contains("settlement failing") && out.to_lowercase().contains("funds"), "{out}");
    use alloy::providers::ext::AnvilApi;
    market
        .provider
        .anvil_set_balance(operator.address(), U256::from(10u64).pow(U256::from(18)))
        .await
        .unwrap();
    let settled = agora_e2e::eventually("the vouchers settled", Duration::from_secs(60), || async {
        let (_, l) = node.get(&format!("/api/v1/licenses/{license}")).await;
        (l["license"]["escrow"]["settled_units"] == "5").then_some(l)
    })
    .await;
    let usage = agora_e2e::eventually("the failure cleared", Duration::from_secs(60), || async {
        let (_, usage) = node.get(&usage_path).await;
        usage["settlement_failure"].is_null().then_some(usage)
    })
    .await;
    // the rest is beyond the escrow the chain holds (the top-up undone): accepted, not payable
    assert_eq!((&usage["settled_units"], &usage["pending_units"]), (&json!("5"), &json!("998")), "{usage}");
    assert_eq!(usage_gauges(&node.url).await, [1, 1003, 5, 998]);
    assert_eq!(deployment_units(&node, &id).await, ["1003", "5", "998"]);
    let (status, out, err) = agora_e2e::agora(&["license", "usage", &license.to_string(), "--json"], &env);
    assert!(status.success(), "{err}");
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), usage);
    let (status, _, err) = agora_e2e::agora(&["license", "usage", "999"], &env);
    assert!(!status.success() && err.contains("404") && err.contains("no license 999"), "{err}");
    let unit = U256::from(agora_e2e::market::UNIT_PRICE);
    assert_eq!(settled["license"]["escrow"]["settled_amount"], (unit * U256::from(5)).to_string());
    // Revenue booked less the 2.5% fee; distributed 50/30/20 to the wei.
    market.distribute(token).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let paid = unit * U256::from(5);
    let revenue = paid - paid * U256::from(250) / U256::from(10_000);
    for (account, bps) in [(3usize, 3000u64), (4, 2000)] {
        let (_, e) =
            node.get(&format!("/api/v1/marketplace/earnings?address={}", market.address(account))).await;
        assert_eq!(
            e["earnings"]["royalties"],
            (revenue * U256::from(bps) / U256::from(10_000)).to_string(),
            "{e}"
        );
    }
    let (_, e) = node.get(&format!("/api/v1/marketplace/earnings?address={}", market.address(2))).await;
    let others =
        revenue * U256::from(3000) / U256::from(10_000) + revenue * U256::from(2000) / U256::from(10_000);
    assert_eq!(
        e["earnings"]["royalties"],
        (revenue - others).to_string(),
        "the first recipient takes the rounding dust"
    );

    // Closing: requested, refused while the challenge window is open, then the unused escrow
    // (1,000 units paid, 5 settled) comes back to the buyer exactly.
    let state = tempfile::tempdir().unwrap();
    let cli = |line: String| cli(&market, &node, state.path(), line);
    let (ok, requested, err) = cli(format!("license close {license} --json")).await;
    assert!(ok, "{err}");
    assert_eq!(requested["requested"], true);
    let (ok, _, err) = cli(format!("license close {license}")).await;
    assert!(!ok);
    assert!(err.contains("ChallengeWindowOpen"), "{err}");
    market.provider.anvil_increase_time(3_601).await.unwrap();
    market.mine(1).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let (ok, closed, err) = cli(format!("license close {license} --json")).await;
    assert!(ok, "{err}");
    assert_eq!(closed["refund"], (unit * U256::from(1000 - 5)).to_string());
    let (ok, withdrawn, err) = cli("market withdraw --json".into()).await;
    assert!(ok, "{err}");
    assert_eq!(withdrawn["amount"], (unit * U256::from(1000 - 5)).to_string());
}

/// A stand-in KServe v2 inference server on loopback: POSTs get a fixed answer echoing the body,
/// anything else `{"ready": true}`.
async fn upstream() -> (String, tokio::task::JoinHandle<()>) {
    agora_e2e::http_server(|head, body| {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let answer = if head.starts_with("POST") {
            json!({"model_name": "m", "outputs": [{"name": "y", "shape": [1], "data": [42.0]}], "echo": body})
        } else {
            json!({"ready": true})
        };
        (200, answer.to_string())
    })
    .await
}

#[tokio::test]
async fn an_http_deployment_puts_the_gate_in_front_of_any_server() {
    use agora_node::serve::metering;
    use alloy::{primitives::U256, signers::SignerSync};
    let (market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let (seller, token) = publish(&market, &node, "proxied", false).await;

    // Bad requests name what is wrong.
    for (body, needle) in [
        (json!({"model": "proxied", "runtime": "http"}), "needs an upstream_url"),
        (json!({"model": "proxied", "runtime": "http", "upstream_url": "ftp://x"}), "http or https"),
        (
            json!({"model": "proxied", "runtime": "builtin", "upstream_url": "http://127.0.0.1:1"}),
            "takes no upstream_url",
        ),
        (json!({"model": "proxied", "runtime": "gpu"}), "not available"),
    ] {
        let err = seller.post_json("/api/v1/deployments/create", &body).await.unwrap_err();
        assert!(err.to_string().contains("400") && err.to_string().contains(needle), "{err}");
    }

    let (base, server) = upstream().await;
    let created = seller
        .post_json(
            "/api/v1/deployments/create",
            &json!({"model": "proxied", "runtime": "http", "upstream_url": format!("{base}/v2/models/m/infer"), "unit_cost": 2}),
        )
        .await
        .unwrap();
    assert_eq!(created["status"], "ready", "{created}");
    let id = created["deployment_id"].as_str().unwrap().to_owned();
    agora_e2e::eventually("the upstream seen healthy", Duration::from_secs(30), || async {
        let (_, d) = node.get(&format!("/api/v1/deployments/{id}")).await;
        (d["health"] == "healthy").then_some(())
    })
    .await;

    market.buy(token, 5, 0).await;
    market.buy(token, 7, 2).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let path = format!("/api/v1/deployments/{id}/predict");
    let kserve =
        json!({"inputs": [{"name": "x", "shape": [3, 4], "datatype": "FP32", "data": vec![0.5; 12]}]});

    // A perpetual holder's call goes through unchanged and the answer comes back as it was.
    let mut holder = NodeClient::new(&node.url).unwrap();
    holder.sign_in(&market.signer(5)).await.unwrap();
    let answer = holder.post_json(&path, &kserve).await.unwrap();
    assert_eq!(answer["echo"], kserve, "{answer}");
    assert_eq!(answer["outputs"][0]["data"][0], 42.0);

    // A usage holder pays unit_cost × the batch dimension (3 rows × 2).
    let mut usage = NodeClient::new(&node.url).unwrap();
    usage.sign_in(&market.signer(7)).await.unwrap();
    let (_, licenses) = node.get(&format!("/api/v1/licenses?holder={}", market.address(7))).await;
    let license: U256 = licenses["licenses"][0]["license_id"].as_str().unwrap().parse().unwrap();
    let (chain, lm) = (market.deployment.chain_id, market.deployment.license_market);
    let paid = |cumulative: u64| {
        let hash = metering::voucher_hash(license, U256::from(cumulative), chain, lm);
        let signature = market.signer(7).sign_hash_sync(&hash).unwrap();
        let request = usage
            .authorize(usage.http.post(usage.endpoint(&path)))
            .header("agora-voucher", metering::header(license, U256::from(cumulative), &signature.as_bytes()))
            .json(&kserve);
        async move { request.send().await.unwrap() }
    };
    let response = paid(6).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        response.headers().get("agora-receipt").unwrap().to_str().unwrap().contains("cumulative_units=6;")
    );
    assert_eq!(response.json::<Value>().await.unwrap()["echo"], kserve);
    let err = NodeClient::new(&node.url).unwrap().post_json(&path, &kserve).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");

    // The CLI sends a whole JSON body as it is and counts its rows the same way.
    let state = tempfile::tempdir().unwrap();
    let line = format!("deploy predict {id} --input {kserve} --license {license} --json");
    let (ok, out, err) = cli(&market, &node, state.path(), line).await;
    assert!(ok, "{err}");
    assert_eq!(out["outputs"]["echo"], kserve, "{out}");
    assert!(out["receipt"].as_str().unwrap().contains("cumulative_units=12;"), "{out}");

    // The upstream goes away: the probe says so, a call is 502 and costs nothing.
    server.abort();
    let _ = server.await;
    agora_e2e::eventually("the upstream seen unhealthy", Duration::from_secs(30), || async {
        let (_, d) = node.get(&format!("/api/v1/deployments/{id}")).await;
        d["health"].as_str().is_some_and(|h| h.starts_with("unhealthy")).then_some(())
    })
    .await;
    let response = paid(18).await;
    assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
    let (_, usage_now) = node.get(&format!("/api/v1/licenses/{license}/usage")).await;
    assert_eq!(usage_now["cumulative_units"], "12", "a failed call is not metered");
}

/// An upstream that answers every call with its own name.
async fn named_upstream(name: &'static str) -> (String, tokio::task::JoinHandle<()>) {
    agora_e2e::http_server(move |_, _| (200, json!({"server": name}).to_string())).await
}

#[tokio::test]
async fn an_http_deployment_splits_calls_between_servers() {
    use agora_e2e::market::Mined;
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let (seller, token) = publish(&market, &node, "proxied", false).await;
    let v2 = register_shifted(&seller, "proxied", false, 0.5).await;
    let hash = format!("0x{}", v2["file"]["blake3"].as_str().unwrap()).parse().unwrap();
    market.registry.anchorVersion(token, hash).from(market.address(1)).send().await.unwrap().mined().await;
    anchored(&node, "proxied", 2).await;
    let ((a, _a), (b, b_server)) = (named_upstream("a").await, named_upstream("b").await);
    let created = seller
        .post_json(
            "/api/v1/deployments/create",
            &json!({"model": "proxied", "version": 1, "runtime": "http", "upstream_url": format!("{a}/infer")}),
        )
        .await
        .unwrap();
    let id = created["deployment_id"].as_str().unwrap().to_owned();
    market.buy(token, 5, 0).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut buyer = NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();
    // (status, the version that answered, the server that answered) of `n` calls
    let calls = |buyer: &NodeClient, n: usize| {
        let path = format!("/api/v1/deployments/{id}/predict");
        let requests: Vec<_> = (0..n)
            .map(|_| {
                buyer.authorize(buyer.http.post(buyer.endpoint(&path))).json(&json!({"inputs": [[1.0]]}))
            })
            .collect();
        async move {
            let mut answers = Vec::new();
            for request in requests {
                let response = request.send().await.unwrap();
                let status = response.status().as_u16();
                let version = response.headers().get("agora-version").map(|v| v.to_str().unwrap().to_owned());
                let body: Value = response.json().await.unwrap();
                answers.push((status, version, body["server"].as_str().map(str::to_owned)));
            }
            answers
        }
    };
    let served = |answers: &[(u16, Option<String>, Option<String>)], version: &str, server: &str| {
        answers
            .iter()
            .filter(|(s, v, b)| *s == 200 && v.as_deref() == Some(version) && b.as_deref() == Some(server))
            .count()
    };

    // Bad splits name what is wrong and change nothing.
    let path = format!("/api/v1/deployments/{id}/traffic");
    for (second, needle) in [
        (json!({"version": 2, "percent": 20}), "needs an upstream_url"),
        (json!({"version": 2, "percent": 20, "upstream_url": "ftp://x"}), "http or https"),
        (json!({"version": 2, "percent": 20, "health_url": format!("{b}/ready")}), "without an upstream_url"),
    ] {
        let body = json!({"split": [{"version": 1, "percent": 80}, second]});
        let err = seller.put_json(&path, &body).await.unwrap_err().to_string();
        assert!(err.contains("400") && err.contains(needle), "{body}: {err}");
    }
    assert_eq!(served(&calls(&buyer, 2).await, "1", "a"), 2, "every call still goes to a");

    // A canary on its own server: 8 of every 10 calls reach a, 2 reach b, each answer saying
    // which version it is; version 1 keeps the server it had.
    let set = seller
        .put_json(
            &path,
            &json!({"split": [{"version": 1, "percent": 80}, {"version": 2, "percent": 20, "upstream_url": format!("{b}/infer")}]}),
        )
        .await
        .unwrap();
    assert_eq!(set["traffic"][0]["upstream_url"], format!("{a}/infer"), "{set}");
    assert_eq!(set["traffic"][1]["upstream_url"], format!("{b}/infer"), "{set}");
    let answers = calls(&buyer, 10).await;
    assert_eq!((served(&answers, "1", "a"), served(&answers, "2", "b")), (8, 2), "{answers:?}");
    agora_e2e::eventually("both servers seen healthy", Duration::from_secs(30), || async {
        let (_, d) = node.get(&format!("/api/v1/deployments/{id}")).await;
        (d["health"] == "healthy"
            && d["traffic"][0]["health"] == "healthy"
            && d["traffic"][1]["health"] == "healthy")
            .then_some(())
    })
    .await;

    // The split survives a restart.
    let (node, buyer) = restart_for_buyer(&market, data.path(), node).await;
    let answers = calls(&buyer, 10).await;
    assert_eq!((served(&answers, "1", "a"), served(&answers, "2", "b")), (8, 2), "{answers:?}");

    // The canary's server goes away: the probe names it, its calls fail (502) and are counted
    // against it, version 1's still pass.
    b_server.abort();
    let _ = b_server.await;
    agora_e2e::eventually("the canary seen unhealthy", Duration::from_secs(30), || async {
        let (_, d) = node.get(&format!("/api/v1/deployments/{id}")).await;
        let health = d["health"].as_str()?;
        (health.starts_with("unhealthy") && health.ends_with("(version 2)")).then_some(())
    })
    .await;
    let answers = calls(&buyer, 10).await;
    assert_eq!(served(&answers, "1", "a"), 8, "{answers:?}");
    assert_eq!(answers.iter().filter(|(s, ..)| *s == 502).count(), 2, "{answers:?}");
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    // this process: two served before the server went, two failed after
    assert_eq!(
        (view["traffic"][1]["requests"].as_u64(), view["traffic"][1]["errors"].as_u64()),
        (Some(4), Some(2)),
        "{view}"
    );
    assert!(view["traffic"][1]["health"].as_str().unwrap().starts_with("unhealthy"), "{view}");

    // Rolled back from the command line: version 1 alone, on the server it has.
    let state = tempfile::tempdir().unwrap();
    let (ok, out, err) =
        cli_as(1, &market, &node, state.path(), format!("deploy traffic {id} --split 1=100 --json")).await;
    assert!(ok, "{err}");
    assert_eq!(out["traffic"][0]["percent"], 100, "{out}");
    assert_eq!(out["upstream_url"], format!("{a}/infer"), "{out}");
    assert_eq!(served(&calls(&buyer, 4).await, "1", "a"), 4);
}

/// Sentence embeddings the way sentence-transformers computes them, one text at a time with no
/// padding: candle's BERT, mean over the tokens, unit length.
fn reference_embeddings(dir: &std::path::Path, texts: &[&str]) -> Vec<Vec<f32>> {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::bert::{BertModel, Config};
    let config: Config = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let model =
        BertModel::load(candle_nn::VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu), &config)
            .unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    texts
        .iter()
        .map(|text| {
            let mut encoding = tokenizer.encode(*text, true).unwrap();
            // The file pads every text to a fixed length; the reference runs the text alone.
            let real = encoding.get_attention_mask().iter().filter(|m| **m == 1).count();
            encoding.truncate(real, 0, tokenizers::TruncationDirection::Right);
            let ids = Tensor::new(encoding.get_ids(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
            let hidden = model.forward(&ids, &ids.zeros_like().unwrap(), None).unwrap();
            let mean = hidden.mean(1).unwrap().squeeze(0).unwrap();
            let norm = mean.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
            mean.broadcast_div(&norm).unwrap().to_vec1::<f32>().unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_sentence_encoder_deployment_embeds_texts() {
    let Some(dir) = agora_e2e::minilm_dir() else { return };
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let texts = [
        "A seller publishes a model and sells licenses to it.",
        "Auditors check every claim against the chain.",
        "She played the violin at the concert last night.",
        "How many GPUs does this training job need?",
        "",
        "Royalties are split between the recipients of a model, and every payment is recorded on-chain.",
    ];
    // More texts than one forward pass takes (they run in passes of 32).
    let many: Vec<String> =
        (0..40)
            .map(|i| {
                if i < texts.len() {
                    texts[i].to_owned()
                } else {
                    format!("{} ({i})", texts[i % texts.len()])
                }
            })
            .collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let expected = reference_embeddings(&dir, &many);

    // The seller publishes the weights with their config and tokenizer from the command line.
    let line = format!(
        "model publish {} --name minilm --model-config {} --tokenizer {} --json",
        dir.join("model.safetensors").display(),
        dir.join("config.json").display(),
        dir.join("tokenizer.json").display()
    );
    let publish = {
        let env = [
            ("AGORA_NODE_URL".to_owned(), node.url.clone()),
            ("AGORA_RPC_URL".to_owned(), market.anvil.endpoint()),
            ("AGORA_PRIVATE_KEY".to_owned(), agora_contracts::anvil::DEV_KEYS[1].to_owned()),
            ("AGORA_STATE_DIR".to_owned(), data.path().join("state").display().to_string()),
        ];
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = line.split_whitespace().collect();
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let (status, stdout, stderr) = agora_e2e::agora(&args, &env);
            assert!(status.success(), "{stderr}");
            serde_json::from_str::<Value>(stdout.trim()).unwrap()
        })
    };
    let published = publish.await.unwrap();
    let token: alloy::primitives::U256 = published["token_id"].as_str().unwrap().parse().unwrap();
    let mut seller = NodeClient::new(&node.url).unwrap();
    seller.sign_in(&market.signer(1)).await.unwrap();
    let created = seller.post_json("/api/v1/deployments/create", &json!({"model": "minilm"})).await.unwrap();
    assert_eq!(created["status"], "ready", "{created}");
    let path = format!("/api/v1/deployments/{}/predict", created["deployment_id"].as_str().unwrap());

    // A perpetual license holder's texts come back as the reference embeddings: several in one
    // call, and calls sent together (batched into one padded pass) each get their own.
    market.buy(token, 5, 0).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut buyer = NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();
    let close = |got: &Value, want: &[f32], what: &str| {
        let got: Vec<f32> = got.as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got.len(), 384, "{what}");
        let worst = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{what}: off by {worst}");
    };
    let answer = buyer.post_json(&path, &json!({"inputs": many})).await.unwrap();
    let outputs = answer["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), many.len());
    for (i, (got, want)) in outputs.iter().zip(&expected).enumerate() {
        close(got, want, &format!("text {i} in one call"));
    }
    let together = futures::future::join_all(many[..texts.len()].iter().map(|text| {
        let (buyer, path) = (buyer.clone(), path.clone());
        async move { buyer.post_json(&path, &json!({"inputs": [text]})).await.unwrap() }
    }))
    .await;
    for (i, (answer, want)) in together.iter().zip(&expected).enumerate() {
        close(&answer["outputs"][0], want, &format!("text {i} sent alone, together with the others"));
    }

    // Numbers where texts belong: 400 naming it, nothing counted as served.
    let err = buyer.post_json(&path, &json!({"inputs": ["fine", [1, 2]]})).await.unwrap_err();
    assert!(err.to_string().contains("400") && err.to_string().contains("takes texts"), "{err}");

    // Drift of texts, measured on their embeddings: a reference of 1,000 texts about the
    // marketplace, then 200 more of the same kind score low, then 300 texts about something
    // else entirely score high.
    let id = created["deployment_id"].as_str().unwrap();
    let reset = seller
        .authorize(seller.http.delete(seller.endpoint(&format!("/api/v1/deployments/{id}/drift"))))
        .send()
        .await
        .unwrap();
    assert!(reset.status().is_success());
    // drawn at random (a hash of the index), numbers of the same range all along: larger
    // numbers would be a drift of their own
    let calm = |i: usize| {
        let h = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        let (n, who) =
            (h / 4 % 100, ["seller", "buyer", "auditor", "operator", "provider"][(h / 400 % 5) as usize]);
        match h % 4 {
            0 => format!("A {who} publishes model number {n} and sells licenses to it."),
            1 => format!("The {who} pays for usage license {n} with a signed voucher."),
            2 => format!("The royalties of sale {n} are split between the {who}'s recipients."),
            _ => format!("The {who} checks license {n} against the chain."),
        }
    };
    let drifted = |i: usize| {
        format!("Le chat numéro {} dort au soleil sur le toit de la vieille maison.", i * 37 % 100)
    };
    let send = |texts: Vec<String>| {
        let (buyer, path) = (buyer.clone(), path.clone());
        async move {
            for chunk in texts.chunks(50) {
                buyer.post_json(&path, &json!({"inputs": chunk})).await.unwrap();
            }
        }
    };
    send((0..1_200).map(calm).collect()).await;
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    let drift = &view["drift"];
    assert_eq!(
        (drift["reference_rows"].as_u64(), drift["recent_rows"].as_u64()),
        (Some(1000), Some(200)),
        "{view}"
    );
    let calm_score = drift["score"].as_f64().unwrap();
    assert!(calm_score < 0.5, "{view}");
    send((0..300).map(drifted).collect()).await;
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    let score = view["drift"]["score"].as_f64().unwrap();
    eprintln!("drift of texts' embeddings: calm {calm_score:.3}, drifted {score:.3}");
    assert!(score > 2.0, "calm {calm_score}, drifted {score}: {view}");
    assert!(view["drift"]["feature"].as_u64().is_some_and(|f| f < 256), "{view}");

    // A BERT config without its tokenizer deploys as failed, saying what is missing.
    let form = reqwest::multipart::Form::new()
        .text("metadata", json!({"name": "no-tokenizer"}).to_string())
        .part(
            "artifact",
            reqwest::multipart::Part::bytes(std::fs::read(dir.join("model.safetensors")).unwrap()),
        )
        .part("config", reqwest::multipart::Part::bytes(std::fs::read(dir.join("config.json")).unwrap()));
    let response = seller
        .authorize(seller.http.post(seller.endpoint("/api/v1/models/register")).multipart(form))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let failed =
        seller.post_json("/api/v1/deployments/create", &json!({"model": "no-tokenizer"})).await.unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(failed["reason"].as_str().unwrap().contains("tokenizer.json"), "{failed}");
}

/// The versions each call reached, and a check that each answer is that version's network.
async fn calls(buyer: &NodeClient, id: &str, n: usize) -> Vec<u64> {
    let row = [0.5f32, -1.0, 2.0, 0.25];
    let mut served = Vec::with_capacity(n);
    for _ in 0..n {
        let answer = buyer
            .post_json(&format!("/api/v1/deployments/{id}/predict"), &json!({"inputs": [row]}))
            .await
            .unwrap();
        let version = answer["version"].as_u64().unwrap();
        // version v of the model was registered with its biases shifted by (v - 1) / 2
        let expected = forward_shifted(&row, (version - 1) as f32 / 2.0);
        let got: Vec<f32> =
            answer["outputs"][0].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        for (a, b) in expected.iter().zip(&got) {
            assert!((a - b).abs() < 1e-5, "version {version}: {a} vs {b}");
        }
        served.push(version);
    }
    served
}

/// Stops `node` (SIGTERM) and starts it again on its data, with buyer 5 signed in to it.
async fn restart_for_buyer(
    market: &agora_e2e::market::Market,
    data: &std::path::Path,
    mut node: agora_e2e::Node,
) -> (agora_e2e::Node, NodeClient) {
    node.process.terminate(Duration::from_secs(15));
    let node = agora_e2e::Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data,
        &[("AGORA_ADMIN_TOKEN", TOKEN)],
    );
    let mut buyer = NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();
    (node, buyer)
}

/// (version, percent, requests) of each row of a deployment's `traffic`.
fn traffic(view: &Value) -> Vec<(u64, u64, u64)> {
    view["traffic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (t["version"].as_u64().unwrap(), t["percent"].as_u64().unwrap(), t["requests"].as_u64().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn a_traffic_split_shares_calls_between_versions() {
    use agora_e2e::market::Mined;
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let (seller, token) = publish(&market, &node, "iris", true).await;
    // Version 2 anchored to the model's token, version 3 to a token of its own, version 4 not
    // at all; each with other biases.
    let hash_of = |v: &Value| -> alloy::primitives::B256 {
        format!("0x{}", v["file"]["blake3"].as_str().unwrap()).parse().unwrap()
    };
    let v2 = register_shifted(&seller, "iris", true, 0.5).await;
    market
        .registry
        .anchorVersion(token, hash_of(&v2))
        .from(market.address(1))
        .send()
        .await
        .unwrap()
        .mined()
        .await;
    let v3 = register_shifted(&seller, "iris", true, 1.0).await;
    let other = market.register_content(hash_of(&v3), "iris-3").await;
    register_shifted(&seller, "iris", true, 1.5).await;
    assert_eq!(anchored(&node, "iris", 2).await, token.to_string());
    assert_eq!(anchored(&node, "iris", 3).await, other.to_string());
    let created = seller
        .post_json("/api/v1/deployments/create", &json!({"model": "iris", "version": 1}))
        .await
        .unwrap();
    let id = created["deployment_id"].as_str().unwrap().to_owned();
    assert_eq!(traffic(&created), [(1, 100, 0)]);
    market.buy(token, 5, 0).await;
    let (head, head_hash) = market.head().await;
    node.wait_indexed(head, head_hash).await;
    let mut buyer = NodeClient::new(&node.url).unwrap();
    buyer.sign_in(&market.signer(5)).await.unwrap();

    // A 70/30 split: every ten calls, seven reach version 1 and three version 2.
    let path = format!("/api/v1/deployments/{id}/traffic");
    let split = |a: Value, b: Value| json!({"split": [a, b]});
    let set = seller
        .put_json(&path, &split(json!({"version": 1, "percent": 70}), json!({"version": 2, "percent": 30})))
        .await
        .unwrap();
    assert_eq!(set["version"], 1, "the largest share is the deployment's version: {set}");
    assert_eq!(traffic(&set), [(1, 70, 0), (2, 30, 0)]);
    let served = calls(&buyer, &id, 20).await;
    assert_eq!(served.iter().filter(|v| **v == 1).count(), 14, "{served:?}");
    assert_eq!(served.iter().filter(|v| **v == 2).count(), 6, "{served:?}");
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(traffic(&view), [(1, 70, 14), (2, 30, 6)]);
    assert_eq!(view["requests"], 20);
    assert!(view["traffic"][1]["latency_p99_ms"].as_f64().is_some(), "{view}");
    let metrics = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
    let count = metrics
        .lines()
        .find(|l| {
            l.starts_with("agora_deployment_call_duration_seconds_count")
                && l.contains(&format!("deployment=\"{id}\""))
                && l.contains("version=\"2\"")
        })
        .unwrap_or_else(|| panic!("no count for version 2 in\n{metrics}"));
    assert!(count.ends_with(" 6"), "{count}");

    // Bad splits are refused, naming what is wrong, and change nothing.
    let mut stranger = NodeClient::new(&node.url).unwrap();
    stranger.sign_in(&market.signer(6)).await.unwrap();
    let even = split(json!({"version": 1, "percent": 50}), json!({"version": 2, "percent": 50}));
    for (client, body, expected) in [
        (&stranger, even.clone(), "403"),
        (
            &seller,
            split(json!({"version": 1, "percent": 50}), json!({"version": 2, "percent": 40})),
            "sum to 90",
        ),
        (&seller, split(json!({"version": 1, "percent": 50}), json!({"version": 1, "percent": 50})), "twice"),
        (
            &seller,
            split(json!({"version": 1, "percent": 100}), json!({"version": 2, "percent": 0})),
            "1 to 100",
        ),
        (&seller, split(json!({"version": 1, "percent": 50}), json!({"version": 9, "percent": 50})), "404"),
        (&seller, split(json!({"version": 1, "percent": 50}), json!({"version": 3, "percent": 50})), "422"),
        (
            &seller,
            split(json!({"version": 1, "percent": 50}), json!({"version": 4, "percent": 50})),
            "not anchored",
        ),
        (
            &seller,
            split(json!({"version": 1, "percent": 50}), json!({"version": 2, "alias": "x", "percent": 50})),
            "400",
        ),
        (&seller, json!({"split": []}), "1 to 10"),
        (
            &seller,
            split(
                json!({"version": 1, "percent": 50}),
                json!({"version": 2, "percent": 50, "upstream_url": "http://127.0.0.1:1/x"}),
            ),
            "takes no upstream_url",
        ),
    ] {
        let err = client.put_json(&path, &body).await.unwrap_err().to_string();
        assert!(err.contains(expected), "{body}: {err}");
    }
    let err = seller
        .put_json(&path, &split(json!({"version": 1, "percent": 50}), json!({"version": 3, "percent": 50})))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("of token {other}")), "{err}");
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(traffic(&view), [(1, 70, 14), (2, 30, 6)]);

    // An alias names a version; an even split alternates, and survives a restart.
    seller
        .post_json(
            "/api/2.0/mlflow/registered-models/alias",
            &json!({"name": "iris", "alias": "challenger", "version": "2"}),
        )
        .await
        .unwrap();
    let set = seller
        .put_json(
            &path,
            &split(json!({"version": 1, "percent": 50}), json!({"alias": "challenger", "percent": 50})),
        )
        .await
        .unwrap();
    assert_eq!(traffic(&set), [(1, 50, 14), (2, 50, 6)]);
    assert_eq!(calls(&buyer, &id, 4).await, [1, 2, 1, 2]);
    let (node, buyer) = restart_for_buyer(&market, data.path(), node).await;
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(traffic(&view), [(1, 50, 0), (2, 50, 0)]);
    assert_eq!(calls(&buyer, &id, 2).await, [1, 2]);

    // Promotion from the command line: version 2 takes every call; version 1 stays listed at 0 %.
    let line = format!("deploy traffic {id} --split 2=100 --json");
    let state = tempfile::tempdir().unwrap();
    let (ok, out, err) = cli_as(1, &market, &node, state.path(), line).await;
    assert!(ok, "{err}");
    assert_eq!(out["version"], 2, "{out}");
    assert_eq!(traffic(&out), [(2, 100, 1), (1, 0, 1)]);
    assert_eq!(calls(&buyer, &id, 3).await, [2, 2, 2]);

    // A version deleted from the registry while in a split: its share goes to the main version.
    let mut seller = NodeClient::new(&node.url).unwrap();
    seller.sign_in(&market.signer(1)).await.unwrap();
    let set = seller
        .put_json(&path, &split(json!({"version": 2, "percent": 50}), json!({"version": 1, "percent": 50})))
        .await
        .unwrap();
    assert_eq!(set["version"], 2, "the first listed of equal shares is the main one: {set}");
    let response = seller
        .authorize(
            seller
                .http
                .delete(seller.endpoint("/api/2.0/mlflow/model-versions/delete"))
                .json(&json!({"name": "iris", "version": "1"})),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(calls(&buyer, &id, 4).await, [2, 2, 2, 2]);
}

/// `n` rows of 4 standard normal numbers (seeded), the third moved by `shift`.
fn spread(n: usize, seed: u64, shift: f32) -> Vec<Vec<f32>> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::StandardNormal;
    (0..n)
        .map(|_| (0..4).map(|j| rng.sample::<f32, _>(normal) + if j == 2 { shift } else { 0.0 }).collect())
        .collect()
}

#[tokio::test]
async fn input_drift_is_measured_and_fires_a_retraining_policy() {
    let market = agora_e2e::market::Market::start().await;
    let data = tempfile::tempdir().unwrap();
    // Four drift policies on deployment 1: one that fires on any score, one above 1 standard
    // deviation, one above a PSI of 1, one above an output PSI of 0.8. Their dataset does not
    // exist, so a run is recorded with its error.
    let config = data.path().join("agora.toml");
    std::fs::write(
        &config,
        "[[compute.policies]]\nname = \"any\"\nmodel = \"iris\"\ndataset = \"datasets/missing.csv\"\ndrift = { deployment = 1, above = 0.000001 }\n\n\
         [[compute.policies]]\nname = \"on-drift\"\nmodel = \"iris\"\ndataset = \"datasets/missing.csv\"\ndrift = { deployment = 1, above = 1.0 }\n\n\
         [[compute.policies]]\nname = \"on-shape\"\nmodel = \"iris\"\ndataset = \"datasets/missing.csv\"\ndrift = { deployment = 1, psi_above = 1.0 }\n\n\
         [[compute.policies]]\nname = \"on-answers\"\nmodel = \"iris\"\ndataset = \"datasets/missing.csv\"\ndrift = { deployment = 1, output_psi_above = 0.8 }\n",
    )
    .unwrap();
    let config = config.display().to_string();
    let env = [
        ("AGORA_ADMIN_TOKEN", TOKEN),
        ("AGORA_OPERATOR_KEY", agora_contracts::anvil::DEV_KEYS[5]),
        ("AGORA_CONFIG", config.as_str()),
    ];
    let node = agora_e2e::Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), &env);
    let (seller, _) = publish(&market, &node, "iris", true).await;
    let created = seller.post_json("/api/v1/deployments/create", &json!({"model": "iris"})).await.unwrap();
    assert_eq!(created["deployment_id"], "1");
    assert_eq!(created["drift"], Value::Null, "no rows yet");
    let predict = |rows: Vec<Vec<f32>>| {
        let seller = &seller;
        async move { seller.post_json("/api/v1/deployments/1/predict", &json!({"inputs": rows})).await.unwrap() }
    };
    let policy = |name: &'static str| {
        let node = &node;
        async move {
            let (_, policies) = node.get("/api/v1/retraining/policies").await;
            policies["policies"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone()
        }
    };
    assert_eq!(policy("on-drift").await["trigger"], "drift");

    // The first 1,000 rows are the reference; 200 more like them score low.
    for seed in 0..12 {
        predict(spread(100, seed, 0.0)).await;
    }
    let (_, view) = node.get("/api/v1/deployments/1").await;
    let drift = &view["drift"];
    assert_eq!(
        (drift["reference_rows"].as_u64(), drift["recent_rows"].as_u64()),
        (Some(1000), Some(200)),
        "{view}"
    );
    assert!(drift["score"].as_f64().unwrap() < 0.3, "{view}");
    assert!(drift["psi"].as_f64().unwrap() < 0.3, "{view}");
    // its outputs are followed alike: three class scores a row
    let outputs = &view["output_drift"];
    assert_eq!(
        (outputs["reference_rows"].as_u64(), outputs["recent_rows"].as_u64()),
        (Some(1000), Some(200)),
        "{view}"
    );
    assert!(outputs["score"].as_f64().unwrap() < 0.3 && outputs["psi"].as_f64().unwrap() < 0.3, "{view}");
    // When the policy that fires on any score has run, the same check left the others alone.
    let any = agora_e2e::eventually("the any-score policy fired", Duration::from_secs(30), || async {
        let p = policy("any").await;
        p["last_run"].as_u64().map(|_| p)
    })
    .await;
    assert!(any["last_error"].as_str().is_some_and(|e| e.contains("missing.csv")), "{any}");
    assert_eq!(policy("on-drift").await["last_run"], Value::Null, "below its threshold");
    assert_eq!(policy("on-shape").await["last_run"], Value::Null, "below its threshold");
    assert_eq!(policy("on-answers").await["last_run"], Value::Null, "below its threshold");

    // The third feature moves by 3 standard deviations: the score passes 1, the policy fires.
    for seed in 100..105 {
        predict(spread(100, seed, 3.0)).await;
    }
    let (_, view) = node.get("/api/v1/deployments/1").await;
    assert_eq!(view["drift"]["feature"], 2, "{view}");
    assert!(view["drift"]["score"].as_f64().unwrap() > 1.5, "{view}");
    assert_eq!(view["drift"]["psi_feature"], 2, "{view}");
    assert!(view["drift"]["psi"].as_f64().unwrap() > 1.0, "{view}");
    // moved inputs move what the model answers
    let outputs = &view["output_drift"];
    assert!(outputs["score"].as_f64().unwrap() > 0.5 && outputs["psi"].as_f64().unwrap() > 0.5, "{view}");
    for name in ["on-drift", "on-shape", "on-answers"] {
        agora_e2e::eventually(name, Duration::from_secs(30), || async {
            policy(name).await["last_run"].as_u64()
        })
        .await;
    }
    let metrics = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
    for gauge in ["agora_deployment_input_drift", "agora_deployment_input_psi"] {
        assert!(metrics.lines().any(|l| l.starts_with(&format!("{gauge}{{deployment=\"1\"}}"))), "{metrics}");
    }

    // The reference is kept across a restart; a reset (owner or operator) starts it again.
    let mut node = node;
    node.process.terminate(Duration::from_secs(15));
    let node = agora_e2e::Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), &env);
    let (_, view) = node.get("/api/v1/deployments/1").await;
    assert_eq!(view["drift"]["reference_rows"], 1000, "{view}");
    assert_eq!(view["output_drift"]["reference_rows"], 1000, "{view}");
    // ... with its bins: calm rows after the restart have a low PSI again
    let mut seller = NodeClient::new(&node.url).unwrap();
    seller.sign_in(&market.signer(1)).await.unwrap();
    for seed in 200..202 {
        seller
            .post_json("/api/v1/deployments/1/predict", &json!({"inputs": spread(100, seed, 0.0)}))
            .await
            .unwrap();
    }
    let (_, view) = node.get("/api/v1/deployments/1").await;
    assert_eq!(view["drift"]["recent_rows"], 200, "{view}");
    assert!(view["drift"]["psi"].as_f64().unwrap() < 0.3, "{view}");
    let mut stranger = NodeClient::new(&node.url).unwrap();
    stranger.sign_in(&market.signer(6)).await.unwrap();
    let reset = |client: &NodeClient| {
        client.authorize(client.http.delete(client.endpoint("/api/v1/deployments/1/drift"))).send()
    };
    assert_eq!(reset(&stranger).await.unwrap().status(), StatusCode::FORBIDDEN);
    // the owner resets it from the command line
    let state = tempfile::tempdir().unwrap();
    let (ok, view, err) = cli_as(1, &market, &node, state.path(), "deploy reset-drift 1 --json".into()).await;
    assert!(ok, "{err}");
    assert_eq!(view["drift"], Value::Null, "{view}");
    assert_eq!(view["output_drift"], Value::Null, "{view}");
    assert_eq!(view["deployment_id"], "1", "{view}");
    seller.post_json("/api/v1/deployments/1/predict", &json!({"inputs": spread(10, 7, 0.0)})).await.unwrap();
    let (_, view) = node.get("/api/v1/deployments/1").await;
    assert_eq!(view["drift"]["reference_rows"], 10, "{view}");
}

#[tokio::test]
async fn a_canary_whose_answers_differ_shows_it_in_its_own_drift() {
    let (market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    use agora_e2e::market::Mined;
    let (seller, token) = publish(&market, &node, "iris", true).await;
    let v2 = register_shifted(&seller, "iris", true, 1.5).await;
    let hash: alloy::primitives::B256 =
        format!("0x{}", v2["file"]["blake3"].as_str().unwrap()).parse().unwrap();
    market.registry.anchorVersion(token, hash).from(market.address(1)).send().await.unwrap().mined().await;
    anchored(&node, "iris", 2).await;
    let created = seller
        .post_json("/api/v1/deployments/create", &json!({"model": "iris", "version": 1}))
        .await
        .unwrap();
    let id = created["deployment_id"].as_str().unwrap().to_owned();
    let predict = |rows: Vec<Vec<f32>>| {
        let (seller, id) = (&seller, &id);
        async move {
            seller
                .post_json(&format!("/api/v1/deployments/{id}/predict"), &json!({"inputs": rows}))
                .await
                .unwrap()
        }
    };
    // The reference: 1,000 rows on version 1, then 200 more; no split, so no version's own drift.
    for seed in 0..12 {
        predict(spread(100, seed, 0.0)).await;
    }
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    assert_eq!(view["output_drift"]["recent_rows"], 200, "{view}");
    assert_eq!(view["traffic"][0]["drift"], Value::Null, "{view}");

    // A 50/50 canary of version 2, whose other biases answer the same rows otherwise.
    let split = json!({"split": [{"version": 1, "percent": 50}, {"version": 2, "percent": 50}]});
    seller.put_json(&format!("/api/v1/deployments/{id}/traffic"), &split).await.unwrap();
    // (the windows start with version 2's first call: version 1's call before it is in the
    // deployment's window only)
    for seed in 20..26 {
        let answer = predict(spread(100, seed, 0.0)).await;
        assert!(answer["version"] == 1 || answer["version"] == 2, "{answer}");
    }
    let (_, view) = node.get(&format!("/api/v1/deployments/{id}")).await;
    let of = |version: u64, watched: &str| -> Value {
        let entry = view["traffic"].as_array().unwrap().iter().find(|t| t["version"] == version).unwrap();
        entry[watched].clone()
    };
    for version in [1, 2] {
        let inputs = of(version, "drift");
        assert_eq!(inputs["reference_rows"], 1000, "{view}");
        assert!(inputs["recent_rows"].as_u64().unwrap() >= 200, "{view}");
        assert!(inputs["psi"].as_f64().unwrap() < 0.3, "the same inputs reach both: {view}");
    }
    let (stable, canary) = (of(1, "output_drift"), of(2, "output_drift"));
    assert!(stable["psi"].as_f64().unwrap() < 0.3, "{view}");
    assert!(canary["psi"].as_f64().unwrap() > 1.0, "the canary answers otherwise: {view}");
    assert!(canary["score"].as_f64().unwrap() > stable["score"].as_f64().unwrap() * 3.0, "{view}");
    let metrics = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("agora_deployment_version_output_psi")
            && l.contains(&format!("deployment=\"{id}\""))
            && l.contains("version=\"2\"")),
        "{metrics}"
    );

    // A reset starts the reference again, and the versions' windows with it.
    let view = seller.delete_json(&format!("/api/v1/deployments/{id}/drift")).await.unwrap();
    assert_eq!(view["traffic"][1]["output_drift"], Value::Null, "{view}");
}

/// Waits until the node shows version `n` of `model` anchored on-chain; its token id.
async fn anchored(node: &agora_e2e::Node, model: &str, n: u64) -> String {
    agora_e2e::eventually(&format!("version {n} of {model} anchored"), Duration::from_secs(30), || async {
        let (_, v) = node.get(&format!("/api/v1/models/{model}/versions")).await;
        v["versions"].as_array()?.iter().find(|x| x["version"] == n)?["anchored"]["token_id"]
            .as_str()
            .map(str::to_owned)
    })
    .await
}
