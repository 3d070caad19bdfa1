//! The registry's own API against a running node: register real safetensors files (streamed,
//! chunked), list and page versions, stages, metrics, the owner's download with ranges, the
//! on-chain anchor read from the index, and bad input that stores nothing.

use std::{path::Path, time::Duration};

use agora_e2e::{Node, eventually, market::Market};
use alloy::primitives::B256;
use reqwest::{Client, StatusCode, multipart};
use serde_json::{Value, json};

pub const TOKEN: &str = "operator-token-for-tests-0123456789";

/// A safetensors file: a bf16 matrix and an f32 bias, bytes from `seed`.
pub fn safetensors(rows: usize, seed: u8) -> Vec<u8> {
    let w = rows * 64 * 2;
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},"layer.weight":{{"dtype":"BF16","shape":[{rows},64],"data_offsets":[0,{w}]}},"layer.bias":{{"dtype":"F32","shape":[{rows}],"data_offsets":[{w},{}]}}}}"#,
        w + rows * 4
    );
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    bytes.extend((0..w + rows * 4).map(|_| {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x as u8
    }));
    bytes
}

/// The artifact part as a chunked stream (no length), so the node cannot buffer by size.
fn streamed(bytes: Vec<u8>, filename: &str) -> multipart::Part {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = bytes.chunks(1000).map(|c| Ok(c.to_vec())).collect();
    multipart::Part::stream(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .file_name(filename.to_owned())
}

pub async fn register(
    client: &Client,
    url: &str,
    token: Option<&str>,
    metadata: &Value,
    file: Option<Vec<u8>>,
) -> (StatusCode, Value) {
    let mut form = multipart::Form::new().text("metadata", metadata.to_string());
    if let Some(file) = file {
        form = form.part("artifact", streamed(file, "weights.safetensors"));
    }
    let mut request = client.post(format!("{url}/api/v1/models/register")).multipart(form);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("register {metadata}: {e:?}"));
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn objects(data: &Path) -> usize {
    fn count(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries.flatten().map(|e| if e.path().is_dir() { count(&e.path()) } else { 1 }).sum()
            })
            .unwrap_or(0)
    }
    count(&data.join("artifacts/objects"))
}

/// A chain, and a node on it with a fresh data dir and `env` on top of the defaults.
pub async fn start(env: &[(&str, &str)]) -> (Market, tempfile::TempDir, Node) {
    let market = Market::start().await;
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), env);
    (market, data, node)
}

#[tokio::test]
async fn register_list_stage_metrics_download_and_anchor() {
    let (market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_MAX_UPLOAD", "100000")]).await;
    let client = Client::new();
    let url = node.url.clone();

    let v1_bytes = safetensors(32, 1);
    let metadata = json!({"name": "fraud", "description": "detects fraud", "tags": {"team": "risk"}, "metrics": {"auc": 0.91}});
    let (status, v1) = register(&client, &url, Some(TOKEN), &metadata, Some(v1_bytes.clone())).await;
    assert_eq!(status, StatusCode::CREATED, "{v1}");
    assert_eq!(v1["name"], "fraud");
    assert_eq!(v1["version"], 1);
    assert_eq!(v1["stage"], "None");
    assert_eq!(v1["file"]["name"], "weights.safetensors");
    assert_eq!(v1["file"]["blake3"], blake3::hash(&v1_bytes).to_hex().as_str());
    assert_eq!(v1["file"]["size"], v1_bytes.len());
    assert_eq!(v1["file"]["parameters"], 32 * 64 + 32);
    assert_eq!(v1["file"]["dtypes"]["BF16"], 32 * 64);
    assert_eq!(v1["anchored"], Value::Null);
    assert!(v1["artifact_uri"].as_str().unwrap().starts_with("mlflow-artifacts:/registry/"));
    let stored = objects(data.path());
    assert_eq!(stored, 1);

    // Bad input: a clear reason, and nothing stored.
    type Case<'a> = (Option<&'a str>, Value, Option<Vec<u8>>, StatusCode, &'a str);
    let cases: Vec<Case> = vec![
        (None, metadata.clone(), Some(safetensors(8, 2)), StatusCode::UNAUTHORIZED, "unauthenticated"),
        (
            Some("wrong-token-wrong-token"),
            metadata.clone(),
            Some(safetensors(8, 2)),
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
        ),
        (Some(TOKEN), metadata.clone(), None, StatusCode::BAD_REQUEST, "missing_part"),
        (
            Some(TOKEN),
            json!({"description": "no name"}),
            Some(safetensors(8, 3)),
            StatusCode::BAD_REQUEST,
            "invalid_metadata",
        ),
        (
            Some(TOKEN),
            metadata.clone(),
            Some(b"definitely not safetensors".to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_artifact",
        ),
        (
            Some(TOKEN),
            metadata.clone(),
            Some(safetensors(8, 4)[..500].to_vec()),
            StatusCode::BAD_REQUEST,
            "invalid_artifact",
        ),
        (
            Some(TOKEN),
            metadata.clone(),
            Some(safetensors(1000, 5)),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            Some(TOKEN),
            json!({"name": ""}),
            Some(safetensors(8, 6)),
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
        ),
    ];
    for (token, metadata, file, want, code) in cases {
        let (status, body) = register(&client, &url, token, &metadata, file).await;
        assert_eq!((status, body["error"]["code"].as_str()), (want, Some(code)), "{metadata}: {body}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    let (_, page) = node.get("/api/v1/models/fraud/versions").await;
    assert_eq!(page["versions"].as_array().unwrap().len(), 1, "{page}");

    // Two more versions; newest first, paged.
    for seed in [7, 8] {
        let (status, body) =
            register(&client, &url, Some(TOKEN), &json!({"name": "fraud"}), Some(safetensors(16, seed)))
                .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
    }
    let (_, first) = node.get("/api/v1/models/fraud/versions?limit=2").await;
    let numbers: Vec<_> =
        first["versions"].as_array().unwrap().iter().map(|v| v["version"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [3, 2]);
    let token = first["next_page_token"].as_str().unwrap();
    let (_, second) = node.get(&format!("/api/v1/models/fraud/versions?limit=2&page_token={token}")).await;
    assert_eq!(second["versions"][0]["version"], 1);
    assert_eq!(second["next_page_token"], Value::Null);
    let (status, body) = node.get("/api/v1/models/nope/versions").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));

    // Stages, with archive_existing.
    let stage = |body: Value| {
        let client = client.clone();
        let url = url.clone();
        async move {
            let r = client
                .post(format!("{url}/api/v1/models/fraud/stage"))
                .bearer_auth(TOKEN)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) = stage(json!({"version": 1, "stage": "production"})).await;
    assert_eq!((status, v["stage"].as_str()), (StatusCode::OK, Some("Production")));
    let (_, v) = stage(json!({"version": 2, "stage": "Production", "archive_existing": true})).await;
    assert_eq!(v["stage"], "Production");
    let (status, body) = stage(json!({"version": 2, "stage": "Live"})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalid_parameter"))
    );
    let (status, _) = stage(json!({"version": 9, "stage": "Staging"})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (_, all) = node.get("/api/v1/models/fraud/versions").await;
    let stages: Vec<_> =
        all["versions"].as_array().unwrap().iter().map(|v| v["stage"].as_str().unwrap().to_owned()).collect();
    assert_eq!(stages, ["None", "Production", "Archived"]);

    // Metrics: logged at registration and afterwards.
    let r = client
        .post(format!("{url}/api/v1/models/fraud/versions/1/metrics"))
        .bearer_auth(TOKEN)
        .json(&json!({"metrics": [{"key": "loss", "value": 0.5, "step": 1}, {"key": "loss", "value": 0.25, "step": 2}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let (status, metrics) = node.get("/api/v1/models/metrics?name=fraud&version=1").await;
    assert_eq!(status, 200, "{metrics}");
    assert_eq!(metrics["metrics"]["auc"][0]["value"], 0.91);
    let losses: Vec<_> =
        metrics["metrics"]["loss"].as_array().unwrap().iter().map(|p| p["value"].as_f64().unwrap()).collect();
    assert_eq!(losses, [0.5, 0.25]);
    let r = client
        .post(format!("{url}/api/v1/models/fraud/versions/1/metrics"))
        .bearer_auth(TOKEN)
        .json(&json!({"metrics": [{"key": "loss", "value": "high"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let (status, _) = node.get("/api/v1/models/metrics?name=fraud").await;
    assert_eq!(status, 400);

    // The original, for the owner (here the operator), whole and by range.
    let artifact = format!("{url}/api/v1/models/fraud/versions/1/artifact");
    assert_eq!(client.get(&artifact).send().await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let whole = client.get(&artifact).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap().as_ref(), v1_bytes.as_slice());
    let part =
        client.get(&artifact).bearer_auth(TOKEN).header("range", "bytes=100-1099").send().await.unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], format!("bytes 100-1099/{}", v1_bytes.len()));
    assert_eq!(part.bytes().await.unwrap().as_ref(), &v1_bytes[100..1100]);
    let tail = client.get(&artifact).bearer_auth(TOKEN).header("range", "bytes=-10").send().await.unwrap();
    assert_eq!(tail.bytes().await.unwrap().as_ref(), &v1_bytes[v1_bytes.len() - 10..]);
    let beyond =
        client.get(&artifact).bearer_auth(TOKEN).header("range", "bytes=999999-").send().await.unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);

    // The same bytes elsewhere in the tree (a run's artifacts, an upload) are anyone's to read
    // until they are anchored on-chain.
    let copy = format!("{url}/api/2.0/mlflow-artifacts/artifacts/uploads/copy/weights.safetensors");
    let r = client.put(&copy).bearer_auth(TOKEN).body(v1_bytes.clone()).send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    assert_eq!(client.get(&copy).send().await.unwrap().status(), StatusCode::OK);

    // Anchoring version 1's hash on-chain shows up once the index has the block.
    let hash = B256::from(*blake3::hash(&v1_bytes).as_bytes());
    let token_id = market.register_content(hash, "ipfs://fraud").await;
    let anchored = eventually("the anchor in the registry", Duration::from_secs(30), || async {
        let (_, page) = node.get("/api/v1/models/fraud/versions").await;
        let v1 = page["versions"].as_array()?.iter().find(|v| v["version"] == 1)?.clone();
        (!v1["anchored"].is_null()).then_some(v1["anchored"].clone())
    })
    .await;
    assert_eq!(anchored["token_id"], token_id.to_string());
    assert_eq!(anchored["version"], 1);
    assert!(anchored["block"].as_u64().unwrap() > 0);

    // Anchored, the content is for sale: its copy in the tree is read by the token's owner or
    // an operator, and refused to anyone else with the reason.
    let read = |token: Option<String>| {
        let (client, copy) = (client.clone(), copy.clone());
        async move {
            let request = client.get(&copy);
            let request = match token {
                Some(token) => request.bearer_auth(token),
                None => request,
            };
            let r = request.send().await.unwrap();
            (r.status(), r.bytes().await.unwrap())
        }
    };
    let (status, body) = read(None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(String::from_utf8_lossy(&body).contains(&format!("content of model token {token_id}")));
    let mut owner = agora_node::client::NodeClient::new(&url).unwrap();
    let owner_token = owner.sign_in(&market.signer(1)).await.unwrap().to_owned();
    let mut other = agora_node::client::NodeClient::new(&url).unwrap();
    let other_token = other.sign_in(&market.signer(2)).await.unwrap().to_owned();
    let (status, body) = read(Some(other_token)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(String::from_utf8_lossy(&body).contains("buyers download their own copy"));
    for token in [owner_token, TOKEN.to_owned()] {
        let (status, body) = read(Some(token)).await;
        assert_eq!((status, body.as_ref()), (StatusCode::OK, v1_bytes.as_slice()));
    }

    // Every change is in the audit log.
    let (_, log) = node.get("/api/v1/audit/log?limit=1000").await;
    let actions: Vec<_> =
        log["entries"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap().to_owned()).collect();
    assert!(actions.iter().any(|a| a == "registry.model_created"), "{actions:?}");
    assert_eq!(actions.iter().filter(|a| *a == "registry.version_created").count(), 3);
    assert!(actions.iter().any(|a| a == "registry.stage_changed Production -> Archived"), "{actions:?}");
    assert!(log["entries"].as_array().unwrap().iter().all(|e| e["actor"] == "operator"));
    assert_eq!(objects(data.path()), 3, "one object per good upload, none for the refused ones");
}

#[tokio::test]
async fn a_private_registry_needs_a_token_to_read() {
    let (_market, _data, node) =
        start(&[("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_REGISTRY_PRIVATE", "1")]).await;
    let client = Client::new();
    let (status, _) =
        register(&client, &node.url, Some(TOKEN), &json!({"name": "m"}), Some(safetensors(4, 1))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body) = node.get("/api/v1/models/m/versions").await;
    assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthenticated")));
    let (status, body) = node.get("/api/2.0/mlflow/registered-models/get?name=m").await;
    assert_eq!((status, body["error_code"].as_str()), (401, Some("UNAUTHENTICATED")));
    let r =
        client.get(format!("{}/api/v1/models/m/versions", node.url)).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

#[tokio::test]
async fn the_node_creates_an_operator_token_when_none_is_configured() {
    let (_market, data, node) = start(&[]).await;
    let path = data.path().join("admin.token");
    let token = std::fs::read_to_string(&path).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let client = Client::new();
    let (status, _) =
        register(&client, &node.url, Some(token.trim()), &json!({"name": "m"}), Some(safetensors(4, 1)))
            .await;
    assert_eq!(status, StatusCode::CREATED);
}

/// `GET /api/v1/registry/webhooks` with `token`: the status and the body as text.
async fn webhooks(client: &Client, url: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut request = client.get(format!("{url}/api/v1/registry/webhooks"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status(), response.text().await.unwrap())
}

/// Waits until the operator's view of the one hook satisfies `check`.
async fn hook_status(client: &Client, url: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
    agora_e2e::eventually(what, Duration::from_secs(30), || async {
        let (_, body) = webhooks(client, url, Some(TOKEN)).await;
        let view: Value = serde_json::from_str(&body).ok()?;
        check(&view["hooks"][0]).then_some(view)
    })
    .await
}

#[tokio::test]
async fn registry_changes_reach_webhooks_signed_in_order_retried_and_after_a_crash() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    };
    // A hook that refuses its first delivery, and everything while `down`, and records every
    // request.
    let (tx, mut received) = tokio::sync::mpsc::unbounded_channel::<(String, Vec<u8>)>();
    let calls = AtomicU32::new(0);
    let down = Arc::new(AtomicBool::new(false));
    let is_down = down.clone();
    let (base, _server) = agora_e2e::http_server(move |head, body| {
        let _ = tx.send((head.to_owned(), body.to_vec()));
        let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
        (if first || is_down.load(Ordering::SeqCst) { 500 } else { 200 }, "{}".to_owned())
    })
    .await;
    let market = Market::start().await;
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("agora.toml");
    std::fs::write(
        &config,
        format!(
            "[[registry.webhooks]]\nurl = \"{base}/hook\"\nevents = [\"version_created\", \"stage_changed\"]\nsecret = \"hook-secret\"\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let node = Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_CONFIG", &config)],
    );
    let client = Client::new();
    let (status, _) =
        register(&client, &node.url, Some(TOKEN), &json!({"name": "hooked"}), Some(safetensors(8, 1))).await;
    assert_eq!(status, StatusCode::CREATED);
    // a kind the hook did not ask for
    let response = client
        .post(format!("{}/api/2.0/mlflow/registered-models/set-tag", node.url))
        .bearer_auth(TOKEN)
        .json(&json!({"name": "hooked", "key": "team", "value": "risk"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let (status, _) =
        register(&client, &node.url, Some(TOKEN), &json!({"name": "hooked"}), Some(safetensors(8, 2))).await;
    assert_eq!(status, StatusCode::CREATED);

    let mut next =
        async || tokio::time::timeout(Duration::from_secs(30), received.recv()).await.unwrap().unwrap();
    let (refused, first_body) = next().await;
    // the operator sees the refusal, and the delivery being tried again
    let seq = |body: &[u8]| serde_json::from_slice::<Value>(body).unwrap()["seq"].as_u64().unwrap();
    let first_seq = seq(&first_body);
    hook_status(&client, &node.url, "the refusal shown", |h| {
        h["retrying"]["seq"] == first_seq
            && h["retrying"]["error"].as_str().is_some_and(|e| e.contains("500"))
            || h["last"]["seq"] == first_seq
    })
    .await;
    let (head, body) = next().await;
    assert_eq!(body, first_body, "the refused delivery is tried again with the same body");
    let (head2, body2) = next().await;
    for (head, body, version) in [(&refused, &first_body, 1), (&head, &body, 1), (&head2, &body2, 2)] {
        assert!(head.starts_with("POST /hook "), "{head}");
        let event: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(event["kind"], "version_created", "{event}");
        assert_eq!(
            (event["model"].as_str(), event["version"].as_u64()),
            (Some("hooked"), Some(version)),
            "{event}"
        );
        assert_eq!(event["actor"], "operator");
        assert!(event["time_ms"].as_u64().is_some(), "{event}");
        let header = |name: &str| {
            head.lines().find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_owned())
            })
        };
        assert_eq!(header("agora-event").as_deref(), Some("version_created"));
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"hook-secret");
        let expected = format!("sha256={}", alloy::hex::encode(ring::hmac::sign(&key, body).as_ref()));
        assert_eq!(header("agora-signature"), Some(expected), "the body is signed with the hook's secret");
    }
    assert!(seq(&body2) > seq(&body), "sequence numbers follow the changes");
    // what the hook had and how: the first change on its second attempt, the second at once,
    // the tag change between them passed over, nothing left behind
    let view =
        hook_status(&client, &node.url, "both deliveries shown", |h| h["last"]["seq"] == seq(&body2)).await;
    let hook = &view["hooks"][0];
    assert_eq!((hook["delivered"].as_u64(), hook["failed"].as_u64()), (Some(2), Some(0)), "{view}");
    assert_eq!((hook["behind"].as_u64(), &hook["retrying"]), (Some(0), &Value::Null), "{view}");
    assert_eq!(
        (hook["last"]["outcome"].as_str(), hook["last"]["attempts"].as_u64()),
        (Some("delivered"), Some(1))
    );
    assert_eq!(
        (hook["signed"].as_bool(), hook["url"].as_str()),
        (Some(true), Some(&*format!("{base}/hook")))
    );
    assert_eq!(view["last_seq"].as_u64(), Some(seq(&body2)), "{view}");
    let (status, text) = webhooks(&client, &node.url, Some(TOKEN)).await;
    assert!(status == StatusCode::OK && !text.contains("hook-secret"), "{text}");
    assert_eq!(webhooks(&client, &node.url, None).await.0, StatusCode::UNAUTHORIZED);
    // The same from the command line, for the operator only.
    let operator = [("AGORA_ADMIN_TOKEN", TOKEN)];
    let (status, out, err) =
        agora_e2e::agora(&["model", "webhooks", "--node", &node.url, "--json"], &operator);
    assert!(status.success(), "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (shown["hooks"][0]["delivered"].as_u64(), shown["last_seq"].as_u64()),
        (Some(2), Some(seq(&body2)))
    );
    let (status, text, err) = agora_e2e::agora(&["model", "webhooks", "--node", &node.url], &operator);
    assert!(status.success(), "{err}");
    assert!(
        text.contains(&format!("{base}/hook ("))
            && text.contains("0 behind; 2 delivered, 0 failed")
            && text.contains("delivered after 1 attempt(s)")
            && !text.contains("retrying"),
        "{text}"
    );
    let (status, _, err) = agora_e2e::agora(&["model", "webhooks", "--node", &node.url], &[]);
    assert!(!status.success() && err.contains("AGORA_ADMIN_TOKEN"), "{err}");

    // A change the hook refuses, then the node dies while it waits to try again: the next
    // node delivers it, with the same body, and nothing delivered before.
    down.store(true, Ordering::SeqCst);
    let (status, _) =
        register(&client, &node.url, Some(TOKEN), &json!({"name": "hooked"}), Some(safetensors(8, 3))).await;
    assert_eq!(status, StatusCode::CREATED);
    let (_, refused) = next().await;
    let view = hook_status(&client, &node.url, "the change waiting shown", |h| {
        h["retrying"]["seq"] == seq(&refused) && h["behind"] == 1
    })
    .await;
    assert!(view["hooks"][0]["retrying"]["error"].as_str().unwrap().contains("500"), "{view}");
    let mut node = node;
    nix::sys::signal::kill(node.process.pid(), nix::sys::signal::Signal::SIGKILL).unwrap();
    node.process.wait(Duration::from_secs(10));
    down.store(false, Ordering::SeqCst);
    let node = Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_CONFIG", &config)],
    );
    let event: Value = serde_json::from_slice(&refused).unwrap();
    assert_eq!((event["kind"].as_str(), event["version"].as_u64()), (Some("version_created"), Some(3)));
    assert_eq!(seq(&refused), seq(&body2) + 1, "{event}");
    let (_, again) = next().await;
    assert_eq!(again, refused, "the change is delivered as it was first sent, and nothing before it");
    let (status, _) =
        register(&client, &node.url, Some(TOKEN), &json!({"name": "hooked"}), Some(safetensors(8, 4))).await;
    assert_eq!(status, StatusCode::CREATED);
    let fourth = loop {
        let (_, body) = next().await;
        if body != refused {
            break body;
        }
    };
    let event: Value = serde_json::from_slice(&fourth).unwrap();
    assert_eq!((event["version"].as_u64(), seq(&fourth)), (Some(4), seq(&refused) + 1), "{event}");
}
