//! Sign-in with Ethereum against a node process, and what a wallet session may do in the
//! registry: its own models, nothing of anyone else's.

use std::time::Duration;

use agora_node::client::NodeClient;
use alloy::signers::Signer;
use reqwest::StatusCode;
use serde_json::{Value, json};

use super::registry::{TOKEN, register, safetensors, start};

async fn login(node: &NodeClient, message: &str, signature: &str) -> (StatusCode, Value) {
    let r = node
        .http
        .post(node.endpoint("/api/v1/auth/login"))
        .json(&json!({"message": message, "signature": signature}))
        .send()
        .await
        .unwrap();
    (r.status(), r.json().await.unwrap())
}

#[tokio::test]
async fn wallets_sign_in_and_write_only_their_own_models() {
    let (market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let mut seller = NodeClient::new(&node.url).unwrap();
    let seller_token = seller.sign_in(&market.signer(1)).await.unwrap().to_owned();
    let mut other = NodeClient::new(&node.url).unwrap();
    let other_token = other.sign_in(&market.signer(2)).await.unwrap().to_owned();

    // The seller's model is the seller's.
    let (status, v1) = register(
        &seller.http,
        &node.url,
        Some(&seller_token),
        &json!({"name": "mine"}),
        Some(safetensors(8, 1)),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    assert_eq!(v1["user_id"], market.address(1).to_checksum(None));
    let (status, body) = register(
        &other.http,
        &node.url,
        Some(&other_token),
        &json!({"name": "mine"}),
        Some(safetensors(8, 2)),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::FORBIDDEN, Some("forbidden")),
        "{body}"
    );
    let download = |token: String| {
        let http = seller.http.clone();
        let url = node.url.clone();
        async move {
            http.get(format!("{url}/api/v1/models/mine/versions/1/artifact"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(download(seller_token.clone()).await, StatusCode::OK);
    assert_eq!(download(other_token.clone()).await, StatusCode::FORBIDDEN);
    assert_eq!(download(TOKEN.to_owned()).await, StatusCode::OK);
    // The version's files through MLflow's artifact routes: the same rule, not a way around it.
    let dir = v1["artifact_uri"].as_str().unwrap().strip_prefix("mlflow-artifacts:/").unwrap().to_owned();
    let tree = |what: String, token: Option<String>| {
        let http = seller.http.clone();
        let url = node.url.clone();
        async move {
            let request = http.get(format!("{url}/api/2.0/mlflow-artifacts/artifacts{what}"));
            let request = match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            let r = request.send().await.unwrap();
            (r.status(), r.bytes().await.unwrap())
        }
    };
    let file = format!("/{dir}/weights.safetensors");
    let listing = format!("?path={dir}");
    let (status, bytes) = tree(file.clone(), Some(seller_token.clone())).await;
    assert_eq!((status, bytes.as_ref()), (StatusCode::OK, safetensors(8, 1).as_slice()));
    assert_eq!(tree(file.clone(), Some(TOKEN.to_owned())).await.0, StatusCode::OK);
    assert_eq!(tree(listing.clone(), Some(seller_token.clone())).await.0, StatusCode::OK);
    for what in [file.clone(), listing.clone()] {
        let (status, body) = tree(what.clone(), Some(other_token.clone())).await;
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (status, body["error_code"].as_str()),
            (StatusCode::FORBIDDEN, Some("PERMISSION_DENIED")),
            "{what}"
        );
        assert!(body["message"].as_str().unwrap().contains("buyers download their own copy"), "{body}");
        assert_eq!(tree(what.clone(), None).await.0, StatusCode::UNAUTHORIZED, "{what}");
    }
    // The MLflow face says the same in MLflow's words.
    let r = other
        .http
        .post(other.endpoint("/api/2.0/mlflow/registered-models/set-tag"))
        .bearer_auth(&other_token)
        .json(&json!({"name": "mine", "key": "k", "value": "v"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(r.json::<Value>().await.unwrap()["error_code"], "PERMISSION_DENIED");

    // A tampered session token is refused.
    let mut tampered = seller_token.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    let (status, body) =
        register(&seller.http, &node.url, Some(&tampered), &json!({"name": "mine"}), Some(safetensors(8, 3)))
            .await;
    assert_eq!((status, body["error"]["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthenticated")));

    // Replayed, wrong-chain, wrong-domain, expired and forged messages are refused with the reason.
    let signer = market.signer(3);
    let nonce = || async {
        seller.post_json("/api/v1/auth/nonce", &json!({})).await.unwrap()["nonce"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let sign = |text: String| {
        let signer = signer.clone();
        async move { signer.sign_message(text.as_bytes()).await.unwrap().to_string() }
    };
    let url = seller.url.clone();
    let text =
        agora_node::auth::message(&url, signer.address(), 31337, &nonce().await, Duration::from_secs(60))
            .unwrap();
    let signature = sign(text.clone()).await;
    assert_eq!(login(&seller, &text, &signature).await.0, StatusCode::OK);
    let (status, body) = login(&seller, &text, &signature).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("already used nonce"), "{body}");

    let text = agora_node::auth::message(&url, signer.address(), 1, &nonce().await, Duration::from_secs(60))
        .unwrap();
    let (status, body) = login(&seller, &text, &sign(text.clone()).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("chain 1"), "{body}");

    let elsewhere = url::Url::parse("http://evil.example:8080").unwrap();
    let text = agora_node::auth::message(
        &elsewhere,
        signer.address(),
        31337,
        &nonce().await,
        Duration::from_secs(60),
    )
    .unwrap();
    let (status, body) = login(&seller, &text, &sign(text.clone()).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("domain"), "{body}");

    let text =
        agora_node::auth::message(&url, signer.address(), 31337, &nonce().await, Duration::ZERO).unwrap();
    let (status, body) = login(&seller, &text, &sign(text.clone()).await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("not valid now"), "{body}");

    let text =
        agora_node::auth::message(&url, signer.address(), 31337, &nonce().await, Duration::from_secs(60))
            .unwrap();
    let forged = market.signer(4).sign_message(text.as_bytes()).await.unwrap().to_string();
    let (status, body) = login(&seller, &text, &forged).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"]["message"].as_str().unwrap().contains("signature"), "{body}");

    let (status, _) = login(&seller, "not a sign-in message", &signature).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}
