//! A client of a node's HTTP API, for the command line (and the tests): signs in with a wallet
//! and calls the endpoints the user-facing commands need. The wallet's key stays here; the node
//! only ever sees signatures.

use std::time::Duration;

use alloy::signers::{SignerSync, local::PrivateKeySigner};
use anyhow::{Context, bail};
use serde_json::{Value, json};

/// A node at `url`, optionally signed in.
#[derive(Clone, Debug)]
pub struct NodeClient {
    pub url: url::Url,
    pub http: reqwest::Client,
    pub token: Option<String>,
}

impl NodeClient {
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let url = url::Url::parse(url).with_context(|| format!("node URL {url:?} is not a URL"))?;
        Ok(Self { url, http: reqwest::Client::new(), token: None })
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{}", self.url.as_str().trim_end_matches('/'), path)
    }

    /// Signs in with `signer` (EIP-4361) and keeps the session token.
    pub async fn sign_in(&mut self, signer: &PrivateKeySigner) -> anyhow::Result<&str> {
        self.sign_in_as(signer.address(), |message| {
            Ok(signer.sign_message_sync(message.as_bytes())?.as_bytes().to_vec())
        })
        .await
    }

    /// Signs in as `address`, with `sign` making the signature of the EIP-4361 message: a
    /// contract wallet's, say (ERC-1271), which only the wallet's own scheme makes.
    pub async fn sign_in_as(
        &mut self,
        address: alloy::primitives::Address,
        sign: impl FnOnce(&str) -> anyhow::Result<Vec<u8>>,
    ) -> anyhow::Result<&str> {
        let nonce: Value = self.post_json("/api/v1/auth/nonce", &json!({})).await?;
        let (Some(nonce_text), Some(chain_id)) = (nonce["nonce"].as_str(), nonce["chain_id"].as_u64()) else {
            bail!("the node's nonce answer is not what this client understands: {nonce}");
        };
        let message =
            crate::auth::message(&self.url, address, chain_id, nonce_text, Duration::from_secs(600))
                .map_err(anyhow::Error::msg)?;
        let signature = alloy::primitives::hex::encode_prefixed(sign(&message)?);
        let session: Value = self
            .post_json("/api/v1/auth/login", &json!({"message": message, "signature": signature}))
            .await?;
        let token = session["token"].as_str().context("the login answer has no token")?.to_owned();
        Ok(self.token.insert(token))
    }

    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// POSTs JSON and returns the JSON answer, or an error carrying the node's message.
    pub async fn post_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send_json(self.http.post(self.endpoint(path)), body).await
    }

    /// PUTs JSON and returns the JSON answer, or an error carrying the node's message.
    pub async fn put_json(&self, path: &str, body: &Value) -> anyhow::Result<Value> {
        self.send_json(self.http.put(self.endpoint(path)), body).await
    }

    async fn send_json(&self, request: reqwest::RequestBuilder, body: &Value) -> anyhow::Result<Value> {
        self.send(request.json(body)).await
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(self.endpoint(path))).await
    }

    /// DELETEs and returns the JSON answer, or an error carrying the node's message.
    pub async fn delete_json(&self, path: &str) -> anyhow::Result<Value> {
        self.send(self.http.delete(self.endpoint(path))).await
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let response = self
            .authorize(request)
            .send()
            .await
            .with_context(|| format!("cannot reach the node at {}", self.url))?;
        answer(response).await
    }
}

/// The JSON of a 2xx answer; otherwise an error with the status and the node's message.
pub async fn answer(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let message = body["error"]["message"].as_str().or(body["message"].as_str()).unwrap_or("no message");
    bail!("the node answered {status}: {message}")
}
