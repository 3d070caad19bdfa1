//! `agora model publish` as a process: upload to a node, register on-chain from the seller's
//! wallet, wait for the index; new versions anchor on the same token; bad input touches nothing.

use agora_contracts::anvil::DEV_KEYS;
use agora_e2e::agora;
use alloy::providers::Provider;
use serde_json::Value;

use super::registry::{TOKEN, safetensors, start};

/// Runs `agora ARGS` (split on spaces; the temp paths have none).
async fn publish(args: String, env: Vec<(String, String)>) -> (bool, Value, String) {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.split_whitespace().collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (status, stdout, stderr) = agora(&args, &env);
        (status.success(), serde_json::from_str(stdout.trim()).unwrap_or(Value::Null), stderr)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_seller_publishes_and_anchors_new_versions() {
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let dir = data.path();
    let v1 = dir.join("fraud.safetensors");
    std::fs::write(&v1, safetensors(64, 1)).unwrap();
    let v2 = dir.join("fraud-v2.safetensors");
    std::fs::write(&v2, safetensors(64, 2)).unwrap();
    let env = |key: &str| {
        vec![
            ("AGORA_RPC_URL".to_owned(), market.anvil.endpoint()),
            ("AGORA_PRIVATE_KEY".to_owned(), key.to_owned()),
            ("AGORA_NODE_URL".to_owned(), node.url.clone()),
        ]
    };
    let (v1, v2) = (v1.display(), v2.display());
    let split2 = format!("{}:7000", market.address(2));
    let split3 = format!("{}:3000", market.address(3));

    let (ok, out, err) = publish(
        format!("model publish {v1} --name fraud --split {split2} --split {split3} --json"),
        env(DEV_KEYS[1]),
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out["registry_version"], 1);
    assert_eq!(out["chain_version"], 1);
    assert_eq!(out["blake3"], blake3::hash(&safetensors(64, 1)).to_hex().as_str());
    assert!(out["commitment"].as_str().unwrap().starts_with("0x"));
    let token_id = out["token_id"].as_str().unwrap().to_owned();
    assert_eq!(out["anchored"]["token_id"], token_id.as_str());

    // The index has the model, its owner and its split.
    let (_, model) = node.get(&format!("/api/v1/marketplace/models/{token_id}")).await;
    assert_eq!(
        model["model"]["owner"].as_str().unwrap().to_lowercase(),
        market.address(1).to_string().to_lowercase(),
        "{model}"
    );
    assert_eq!(model["model"]["splits"].as_array().unwrap().len(), 2);
    // The registry says who owns it (the seller's wallet) and which token it is.
    let (_, registered) = node.get("/api/v1/models/fraud").await;
    assert_eq!(
        registered["owner"].as_str().unwrap().to_lowercase(),
        market.address(1).to_string().to_lowercase()
    );
    assert_eq!(registered["token_id"], token_id.as_str());
    assert_eq!(registered["latest_version"], 1);
    let (_, versions) = node.get("/api/v1/models/fraud/versions").await;
    assert_eq!(versions["versions"][0]["user_id"], market.address(1).to_checksum(None));

    // A new version anchors on the same token.
    let (ok, out, err) =
        publish(format!("model publish {v2} --name fraud --model {token_id} --json"), env(DEV_KEYS[1])).await;
    assert!(ok, "{err}");
    assert_eq!((out["registry_version"].as_u64(), out["chain_version"].as_u64()), (Some(2), Some(2)));
    assert_eq!(out["token_id"], token_id.as_str());

    // Someone else cannot add versions to the seller's model, and nothing reaches the chain.
    let nonce_before = market.provider.get_transaction_count(market.address(2)).await.unwrap();
    let (ok, _, err) =
        publish(format!("model publish {v2} --name fraud --model {token_id}"), env(DEV_KEYS[2])).await;
    assert!(!ok);
    assert!(err.contains("only the owner"), "{err}");
    // Not a safetensors file; shares that do not sum to 10000: refused before any transaction.
    let junk = dir.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a model").unwrap();
    let junk = junk.display();
    let (ok, _, err) = publish(format!("model publish {junk} --name junk"), env(DEV_KEYS[2])).await;
    assert!(!ok);
    assert!(err.contains("not a safetensors file") || err.contains("safetensors"), "{err}");
    let (ok, _, err) =
        publish(format!("model publish {v1} --name x --split {split2}"), env(DEV_KEYS[2])).await;
    assert!(!ok);
    assert!(err.contains("sum to 7000"), "{err}");
    assert_eq!(market.provider.get_transaction_count(market.address(2)).await.unwrap(), nonce_before);
    let (status, body) = node.get("/api/v1/models/junk/versions").await;
    assert_eq!(status, 404, "{body}");

    // A wallet with no funds is told so before anything is uploaded.
    let empty = alloy::signers::local::PrivateKeySigner::random();
    let key = alloy::primitives::hex::encode(empty.to_bytes());
    let (ok, _, err) = publish(format!("model publish {v1} --name poor"), env(&key)).await;
    assert!(!ok);
    assert!(err.contains("no funds"), "{err}");
    let (status, _) = node.get("/api/v1/models/poor/versions").await;
    assert_eq!(status, 404);
}
