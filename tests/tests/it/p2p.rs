//! Nodes as peers on loopback: orders spread by gossip and by catch-up, cancellations seen
//! everywhere, invalid gossip dropped and its sender scored down, index roots compared, blobs
//! fetched by hash with every chunk checked.

use std::time::Duration;

use agora_e2e::{Node, eventually, market::Market};
use agora_node::{
    market::orders::OrderJson,
    p2p::{
        blob,
        net::{self, NetConfig, NetEvent, Topic},
        wire::{self, BlobRequest, BlobResponse, SignedOrder},
    },
};
use alloy::{
    primitives::{B256, U256},
    signers::SignerSync,
    sol_types::{SolStruct, SolValue},
};
use serde_json::{Value, json};

const TOKEN: &str = "operator-token-for-p2p-tests-0123";
const WAIT: Duration = Duration::from_secs(60);

fn start(market: &Market, data: &std::path::Path, bootstrap: &[String]) -> Node {
    let bootstrap = bootstrap.join(",");
    Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data,
        &[("AGORA_BOOTSTRAP", &bootstrap), ("AGORA_ADMIN_TOKEN", TOKEN), ("AGORA_ROOTS_EVERY", "1")],
    )
}

/// The node's peer id and its first p2p address (with `/p2p/<id>`).
async fn address(node: &Node) -> (String, String) {
    eventually("the node's p2p address", WAIT, || async {
        let (_, status) = node.get("/api/v1/p2p/status").await;
        let address = status["listening"][0].as_str()?.to_owned();
        Some((status["peer_id"].as_str()?.to_owned(), address))
    })
    .await
}

async fn connected(node: &Node) -> usize {
    node.get("/api/v1/p2p/status").await.1["peers_connected"].as_u64().unwrap_or(0) as usize
}

async fn list(node: &Node, market: &Market, token: U256, nonce: U256) -> String {
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;
    let (order, signature) = market.order(token, nonce);
    list_signed(node, &order, &signature).await
}

/// Lists a signed order at `node` (which has indexed the seller's token); its hash.
async fn list_signed(
    node: &Node,
    order: &agora_contracts::LicenseMarket::Order,
    signature: &alloy::primitives::Bytes,
) -> String {
    let body = json!({ "order": OrderJson::from_order(order), "signature": signature.to_string() });
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/marketplace/list", node.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let listed: Value = response.json().await.unwrap();
    listed["order_hash"].as_str().unwrap().to_owned()
}

async fn order_status(node: &Node, hash: &str) -> Option<Value> {
    let (status, order) = node.get(&format!("/api/v1/marketplace/orders/{hash}")).await;
    (status == 200).then_some(order)
}

async fn until_status(node: &Node, hash: &str, want: &str) -> Value {
    eventually(&format!("order {hash} {want} at {}", node.url), WAIT, || async {
        order_status(node, hash).await.filter(|o| o["status"] == want)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_spread_to_every_node_and_late_or_restarted_nodes_catch_up() {
    let market = Market::start().await;
    let token = market.register("p2p-model-one").await;
    let dirs: Vec<_> = (0..6).map(|_| tempfile::tempdir().unwrap()).collect();

    let a = start(&market, dirs[0].path(), &[]);
    let (a_id, a_addr) = address(&a).await;
    // The peer id is the node key's, printed without starting the node.
    let data = dirs[0].path().display().to_string();
    let (status, stdout, stderr) =
        agora_e2e::agora(&["node", "--print-peer-id"], &[("AGORA_DATA_DIR", &data)]);
    assert!(status.success(), "{stderr}");
    assert_eq!(stdout.trim(), a_id);
    let mut nodes = vec![a];
    for dir in &dirs[1..5] {
        nodes.push(start(&market, dir.path(), std::slice::from_ref(&a_addr)));
    }
    for node in &nodes[1..] {
        eventually("a connection to the first node", WAIT, || async {
            (connected(node).await >= 1).then_some(())
        })
        .await;
    }

    // Listed at A: every node serves it, as an order from a peer.
    let nonce = market.seller_nonce().await;
    let first = list(&nodes[0], &market, token, nonce).await;
    for node in &nodes[1..] {
        let order = until_status(node, &first, "active").await;
        assert_eq!(order["source"], "peer", "{order}");
        assert!(order["peer_id"].is_string(), "{order}");
    }
    assert_eq!(until_status(&nodes[0], &first, "active").await["source"], "local");
    let (_, models) = nodes[3].get("/api/v1/marketplace/models").await;
    let model =
        models["models"].as_array().unwrap().iter().find(|m| m["token_id"] == token.to_string()).unwrap();
    let active = model["active_orders"].as_array().expect("the model lists its orders");
    assert!(
        active.iter().any(|o| o["order_hash"] == first && o["source"] == "peer" && o["peer_id"] == a_id),
        "{model}"
    );

    // Cancelled on-chain: gone everywhere.
    market.cancel(token, nonce).await;
    for node in &nodes {
        until_status(node, &first, "cancelled").await;
    }

    // An order listed at C reaches a sixth node that starts later, by catch-up.
    let second_token = market.register("p2p-model-two").await;
    let second = list(&nodes[2], &market, second_token, nonce).await;
    for node in &nodes {
        until_status(node, &second, "active").await;
    }
    let (_, b_addr) = address(&nodes[1]).await;
    let late = start(&market, dirs[5].path(), &[b_addr]);
    until_status(&late, &second, "active").await;

    // D killed; an order listed meanwhile reaches it when it comes back.
    let d = nodes.remove(3);
    drop(d);
    let third_token = market.register("p2p-model-three").await;
    let third = list(&nodes[3], &market, third_token, nonce).await;
    let d = start(&market, dirs[3].path(), std::slice::from_ref(&a_addr));
    until_status(&d, &third, "active").await;
    until_status(&d, &second, "active").await;
    until_status(&d, &first, "cancelled").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contract_wallets_order_spreads_as_it_was_signed() {
    let market = Market::start().await;
    let wallet = market.smart_wallet(1).await;
    let content = alloy::primitives::keccak256("p2p-wallet-model");
    let token = market.register_through(&wallet, 1, content, "ipfs://p2p-wallet-model").await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&market, da.path(), &[]);
    let (_, a_addr) = address(&a).await;
    let b = start(&market, db.path(), std::slice::from_ref(&a_addr));
    eventually("B connected", WAIT, || async { (connected(&b).await >= 1).then_some(()) }).await;
    let (head, hash) = market.head().await;
    b.wait_indexed(head, hash).await;

    // Signed by the wallet (ERC-1271): B asks the wallet on-chain, keeps the order, signature
    // as it came, which `purchase` then takes.
    let (mut order, _) = market.order(token, U256::ZERO);
    order.seller = *wallet.address();
    let domain = agora_contracts::order_domain(market.deployment.chain_id, market.deployment.license_market);
    let signature = market.wallet_signature(*wallet.address(), 1, order.eip712_signing_hash(&domain));
    a.wait_indexed(head, hash).await;
    let listed = list_signed(&a, &order, &signature).await;
    let kept = until_status(&b, &listed, "active").await;
    assert_eq!(
        (&kept["source"], &kept["signature"]),
        (&json!("peer"), &json!(signature.to_string())),
        "{kept}"
    );
    // what B kept buys
    let (price, call) = (order.terms[0].price, market.market.purchase(order, signature, 0));
    use agora_e2e::market::Mined;
    call.value(price).from(market.address(6)).send().await.unwrap().mined().await;
}

/// A bare swarm in this process: a peer the test controls completely.
async fn rogue(
    bootstrap: &[String],
    secret: [u8; 32],
) -> (net::Net, tokio::sync::mpsc::Receiver<NetEvent>, tokio::sync::watch::Sender<bool>) {
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: bootstrap.iter().map(|a| a.parse().unwrap()).collect(),
        mdns: false,
        max_connections: 16,
        max_per_peer: 2,
    };
    let (net, events, _task) = net::start(net::keypair(secret).unwrap(), config, shutdown).unwrap();
    (net, events, stop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_foreign_orders_are_dropped_and_their_sender_penalised() {
    let market = Market::start().await;
    let token = market.register("p2p-rogue-target").await;
    let (da, db) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start(&market, da.path(), &[]);
    let (_, a_addr) = address(&a).await;
    let b = start(&market, db.path(), std::slice::from_ref(&a_addr));
    eventually("B connected", WAIT, || async { (connected(&b).await >= 1).then_some(()) }).await;

    let (rogue, mut events, _stop) = rogue(std::slice::from_ref(&a_addr), [7; 32]).await;
    eventually("A's subscription seen by the rogue", WAIT, || {
        let got = match events.try_recv() {
            Ok(NetEvent::Subscribed { topic: Topic::Orders, .. }) => Some(()),
            _ => None,
        };
        async move { got }
    })
    .await;

    let nonce = market.seller_nonce().await;
    let domain = agora_contracts::order_domain(market.deployment.chain_id, market.deployment.license_market);
    // Forged: names the seller, signed by someone else.
    let (order, _) = market.order(token, nonce);
    let forged = market.signer(2).sign_hash_sync(&order.eip712_signing_hash(&domain)).unwrap();
    // Foreign: honestly signed by account 2, which does not own the token.
    let mut foreign = order.clone();
    foreign.seller = market.address(2);
    let foreign_hash = foreign.eip712_signing_hash(&domain);
    let foreign_sig = market.signer(2).sign_hash_sync(&foreign_hash).unwrap();
    for (o, sig) in [(order.clone(), forged), (foreign.clone(), foreign_sig)] {
        let message = wire::encode(&SignedOrder::new(o.abi_encode(), sig.as_bytes().to_vec()));
        rogue.publish(Topic::Orders, message).await.unwrap();
    }

    let rogue_id = rogue.peer_id.to_string();
    let score = eventually("the rogue scored down at A", WAIT, || async {
        let (_, peers) = a.get("/api/v1/p2p/peers").await;
        let me = peers["peers"].as_array()?.iter().find(|p| p["peer_id"] == rogue_id.as_str())?.clone();
        me["score"].as_f64().filter(|s| *s < 0.0)
    })
    .await;
    assert!(score < 0.0);
    let (_, status) = a.get("/api/v1/p2p/status").await;
    assert!(status["gossip_invalid"].as_u64() >= Some(2), "{status}");
    assert!(status["orders_rejected"].as_u64() >= Some(2), "{status}");

    // Kept nowhere, forwarded nowhere.
    let hashes = [
        agora_node::market::orders::order_hash(
            &order,
            market.deployment.chain_id,
            market.deployment.license_market,
        ),
        foreign_hash,
    ];
    for node in [&a, &b] {
        for hash in hashes {
            assert!(order_status(node, &hash.to_string()).await.is_none(), "{hash} kept at {}", node.url);
        }
    }
    // B, if the rogue reached it at all, judged them itself (nothing came through A).
    let (_, a_status) = a.get("/api/v1/p2p/status").await;
    assert_eq!(a_status["orders_from_peers"], 0, "{a_status}");
    let (_, b_status) = b.get("/api/v1/p2p/status").await;
    assert_eq!(b_status["orders_from_peers"], 0, "{b_status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_corrupted_index_is_seen_disagreeing() {
    let market = Market::start().await;
    market.register("p2p-roots").await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&market, dirs[0].path(), &[]);
    let (a_id, a_addr) = address(&a).await;
    let b = start(&market, dirs[1].path(), std::slice::from_ref(&a_addr));
    let mut c = start(&market, dirs[2].path(), std::slice::from_ref(&a_addr));
    let (c_id, _) = address(&c).await;
    let (b_id, _) = address(&b).await;
    eventually("A agrees with B and C", WAIT, || async {
        let status = a.status().await;
        let agreeing = status["peers_agreeing"].as_array()?.clone();
        (agreeing.contains(&json!(b_id)) && agreeing.contains(&json!(c_id))).then_some(())
    })
    .await;

    // Corrupt C's index while it is stopped: its state root no longer matches its records.
    c.process.terminate(Duration::from_secs(30)).expect("C stops on SIGTERM");
    {
        use agora_node::store::{
            Store,
            tables::{Meta, MetaKey, MetaValue},
        };
        let store = Store::open(&dirs[2].path().join("db")).unwrap();
        let Some(MetaValue::Bytes(mut bytes)) = store.get::<Meta>(&MetaKey::RootAccumulator).unwrap() else {
            panic!("C has a root accumulator");
        };
        bytes[0] ^= 0x5a;
        store.put::<Meta>(&MetaKey::RootAccumulator, &MetaValue::Bytes(bytes)).unwrap();
    }
    let c = start(&market, dirs[2].path(), std::slice::from_ref(&a_addr));
    market.register("p2p-roots-after").await;
    for node in [&a, &b] {
        let status = eventually("C seen disagreeing", WAIT, || async {
            let status = node.status().await;
            status["peers_disagreeing"].as_array()?.contains(&json!(c_id)).then_some(status)
        })
        .await;
        assert!(!status["peers_agreeing"].as_array().unwrap().contains(&json!(c_id)), "{status}");
    }
    // And C, from its side, disagrees with both.
    eventually("C disagreeing with A and B", WAIT, || async {
        let disagreeing = c.status().await["peers_disagreeing"].as_array()?.clone();
        (disagreeing.contains(&json!(a_id)) && disagreeing.contains(&json!(b_id))).then_some(())
    })
    .await;
}

/// Uploads `data` as a run artifact at `path` of `node` (as the operator).
async fn put_artifact(node: &Node, path: &str, data: &[u8]) {
    let put = reqwest::Client::new()
        .put(format!("{}/api/2.0/mlflow-artifacts/artifacts/{path}", node.url))
        .bearer_auth(TOKEN)
        .body(data.to_vec())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
}

fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_are_fetched_verified_and_a_corrupt_provider_is_passed_over() {
    let market = Market::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start(&market, dirs[0].path(), &[]);
    let (_, a_addr) = address(&a).await;
    let client = reqwest::Client::new();

    // A holds a 3.5 MiB run artifact and shares it.
    let data = random_bytes(3 * blob::CHUNK as usize + 512 * 1024, 42);
    let hash = blake3::hash(&data).to_hex().to_string();
    put_artifact(&a, "runs/r1/data.bin", &data).await;
    // The operator's blob calls: `action` (share or fetch) on blob `blob` at `node`.
    let operator = |node: &Node, blob: &str, action: &str| {
        client.post(format!("{}/api/v1/p2p/blobs/{blob}/{action}", node.url)).bearer_auth(TOKEN).send()
    };
    let share = operator(&a, &hash, "share").await.unwrap();
    assert_eq!(share.status(), 200);
    let shared: Value = share.json().await.unwrap();
    assert_eq!(shared["chunks"], 4);
    // Only the operator shares.
    let anonymous = client.post(format!("{}/api/v1/p2p/blobs/{hash}/share", a.url)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);

    // B fetches it from A.
    let b = start(&market, dirs[1].path(), std::slice::from_ref(&a_addr));
    eventually("B connected", WAIT, || async { (connected(&b).await >= 1).then_some(()) }).await;
    let fetch = |node: &Node| operator(node, &hash, "fetch");
    let response = fetch(&b).await.unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["fetched"], true, "{report}");
    assert_eq!(report["size"].as_u64(), Some(data.len() as u64));
    // The CLI says the same: already held; and the operator token is required.
    let cli = |args: Vec<String>, token: bool| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let env: &[(&str, &str)] = if token { &[("AGORA_ADMIN_TOKEN", TOKEN)] } else { &[] };
            let (status, stdout, stderr) = agora_e2e::agora(&args, env);
            (status.success(), serde_json::from_str::<Value>(stdout.trim()).unwrap_or(Value::Null), stderr)
        })
    };
    let line = |s: String| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    let (ok, again, err) =
        cli(line(format!("p2p fetch {hash} --node {} --json", b.url)), true).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(again["fetched"], false, "already held: {again}");
    let (ok, _, err) = cli(line(format!("p2p fetch {hash} --node {}", b.url)), false).await.unwrap();
    assert!(!ok && err.contains("AGORA_ADMIN_TOKEN"), "{err}");
    let (ok, status, err) = cli(line(format!("p2p status --node {} --json", b.url)), false).await.unwrap();
    assert!(ok, "{err}");
    assert_eq!(status["peers_connected"], 1, "{status}");
    // What B holds is the blob itself: B can share it on (it computes the manifest from its copy).
    let reshared = operator(&b, &hash, "share").await.unwrap();
    assert_eq!(reshared.status(), 200);

    // A rogue provider that answers the manifest truthfully and corrupts chunk 3. Its key is
    // chosen so that it sorts first and is tried first.
    let a_id: String = address(&a).await.0;
    let b_id: String = address(&b).await.0;
    // Keys are drawn from a counter until one sorts below both; when A or B happens to sort
    // very low this takes many draws, so the counter is wide and each draw is a hash.
    let (rogue, mut events, _stop) = 'found: {
        for n in 0u64.. {
            let secret = *blake3::hash(&n.to_le_bytes()).as_bytes();
            let candidate = net::keypair(secret).unwrap().public().to_peer_id().to_string();
            if candidate < a_id && candidate < b_id {
                break 'found rogue(std::slice::from_ref(&a_addr), secret).await;
            }
        }
        unreachable!("2^64 keys all sorted above a peer id")
    };
    let blob_hash = *blake3::hash(&data).as_bytes();
    let cvs = blob::chaining_values(&data[..], data.len() as u64).unwrap().concat();
    rogue.provide(blob_hash, true).await.unwrap();
    let served = data.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::BlobRequest { request, reply, .. } = event {
                let answer = match request {
                    BlobRequest::Manifest { .. } => BlobResponse::manifest(served.len() as u64, cvs.clone()),
                    BlobRequest::Range { offset, len, .. } => {
                        let end = (offset as usize + len as usize).min(served.len());
                        let mut chunk = served[offset as usize..end].to_vec();
                        if offset / blob::CHUNK == 3 {
                            chunk[1000] ^= 1;
                        }
                        BlobResponse::data(chunk)
                    }
                };
                let _ = reply.send(answer);
            }
        }
    });
    let rogue_addr = eventually("the rogue's address", WAIT, || {
        let listening = rogue.state().listening.first().cloned();
        async move { listening }
    })
    .await;
    // C was interrupted earlier: its part file holds two checked chunks and a torn write.
    let parts = dirs[2].path().join("tmp").join("p2p");
    std::fs::create_dir_all(&parts).unwrap();
    let mut part = data[..2 * blob::CHUNK as usize].to_vec();
    part.extend_from_slice(&[0xee; 1000]);
    std::fs::write(parts.join(format!("{hash}.part")), part).unwrap();
    let c = start(&market, dirs[2].path(), &[rogue_addr, a_addr.clone()]);
    eventually("C connected to both", WAIT, || async { (connected(&c).await >= 2).then_some(()) }).await;
    let response = fetch(&c).await.unwrap();
    assert_eq!(response.status(), 200);
    let report: Value = response.json().await.unwrap();
    assert_eq!(report["fetched"], true, "{report}");
    assert_eq!(report["resumed_from"].as_u64(), Some(2 * blob::CHUNK), "{report}");
    assert!(!parts.join(format!("{hash}.part")).exists(), "the part file goes once the blob is stored");
    let rogue_id = rogue.peer_id.to_string();
    assert_eq!(report["providers"][0], rogue_id.as_str(), "the rogue served the first chunks: {report}");
    assert!(report["corrupt"].as_array().unwrap().contains(&json!(rogue_id)), "{report}");
    assert_eq!(report["providers"].as_array().unwrap().len(), 2, "{report}");

    // Originals never leave: a registered model's file cannot be shared; nor can a blob the
    // node does not hold.
    let weights = super::registry::safetensors(16, 3);
    let metadata = json!({"name": "private-original"});
    let (status, _) =
        super::registry::register(&client, &a.url, Some(TOKEN), &metadata, Some(weights.clone())).await;
    assert_eq!(status, 201);
    let original = blake3::hash(&weights).to_hex().to_string();
    let refused = operator(&a, &original, "share").await.unwrap();
    assert_eq!(refused.status(), 422);
    let unknown = operator(&a, &B256::repeat_byte(1).to_string(), "share").await.unwrap();
    assert_eq!(unknown.status(), 404);
}

/// Two nodes that speak only QUIC: they connect, an order listed at one is served by the other,
/// and a blob crosses with every chunk checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_peer_over_quic() {
    let market = Market::start().await;
    let token = market.register("quic-model").await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let quic = |data: &std::path::Path, bootstrap: &str| {
        Node::start(
            &market.anvil.endpoint(),
            &market.deployment_path(),
            data,
            &[
                ("AGORA_P2P_LISTEN", "/ip4/127.0.0.1/udp/0/quic-v1"),
                ("AGORA_BOOTSTRAP", bootstrap),
                ("AGORA_ADMIN_TOKEN", TOKEN),
            ],
        )
    };
    let a = quic(dirs[0].path(), "");
    let (_, a_addr) = address(&a).await;
    assert!(a_addr.contains("/udp/") && a_addr.contains("/quic-v1/p2p/"), "{a_addr}");
    let b = quic(dirs[1].path(), &a_addr);
    eventually("B connected over QUIC", WAIT, || async { (connected(&b).await >= 1).then_some(()) }).await;

    let nonce = market.seller_nonce().await;
    let order = list(&a, &market, token, nonce).await;
    assert_eq!(until_status(&b, &order, "active").await["source"], "peer");

    let data = random_bytes(2 * blob::CHUNK as usize + 4096, 7);
    let hash = blake3::hash(&data).to_hex().to_string();
    let client = reqwest::Client::new();
    put_artifact(&a, "runs/q/data.bin", &data).await;
    let operator = |node: &Node, action: &str| {
        client.post(format!("{}/api/v1/p2p/blobs/{hash}/{action}", node.url)).bearer_auth(TOKEN).send()
    };
    assert_eq!(operator(&a, "share").await.unwrap().status(), 200);
    let fetched: Value = operator(&b, "fetch").await.unwrap().json().await.unwrap();
    assert_eq!(fetched["fetched"], true, "{fetched}");
    assert_eq!(fetched["size"].as_u64(), Some(data.len() as u64), "{fetched}");
    assert_eq!(fetched["corrupt"], json!([]), "{fetched}");
}
