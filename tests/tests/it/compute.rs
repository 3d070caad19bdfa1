//! Compute brokering between nodes on loopback: providers' signed offers spread by gossip, the
//! broker prices them and chooses, a reservation (a compute future) is escrowed, withdrawn
//! from the book, transferred, and reclaimed, every step as the index sees it.

use std::time::Duration;

use agora_contracts::{ComputeMarket, anvil::DEV_KEYS};
use agora_e2e::{
    Node, eventually,
    market::{Market, Mined},
};
use agora_node::{client::NodeClient, compute::offers::OfferJson};
use alloy::{
    primitives::{Bytes, U256},
    providers::ext::AnvilApi,
};
use serde_json::{Value, json};

const TOKEN: &str = "operator-token-for-compute-tests";
const WAIT: Duration = Duration::from_secs(60);
const GWEI: u64 = 1_000_000_000;

fn start(market: &Market, data: &std::path::Path, extra: &[(&str, &str)]) -> Node {
    let mut env = vec![("AGORA_ADMIN_TOKEN", TOKEN)];
    env.extend_from_slice(extra);
    Node::start(&market.anvil.endpoint(), &market.deployment_path(), data, &env)
}

async fn p2p_address(node: &Node) -> String {
    eventually("the node's p2p address", WAIT, || async {
        let (_, status) = node.get("/api/v1/p2p/status").await;
        Some(status["listening"][0].as_str()?.to_owned())
    })
    .await
}

/// A provider node offering one pool of GPUs from `[[compute.offers]]`, signing with dev key `key`.
fn provider(
    market: &Market,
    data: &std::path::Path,
    key: usize,
    bootstrap: &str,
    pool: (&str, u32, u64, &str, &str),
) -> Node {
    provider_with(market, data, key, bootstrap, pool, "")
}

/// [`provider`], with more TOML before the offer (a `[compute]` table).
fn provider_with(
    market: &Market,
    data: &std::path::Path,
    key: usize,
    bootstrap: &str,
    (gpu, count, gwei, kind, region): (&str, u32, u64, &str, &str),
    extra: &str,
) -> Node {
    let config = data.join("agora.toml");
    std::fs::write(
        &config,
        format!(
            "{extra}[[compute.offers]]\ngpu = \"{gpu}\"\ngpu_count = {count}\nmemory_gb = 80\nprice_per_gpu_hour = \"{}\"\nkind = \"{kind}\"\nregion = \"{region}\"\n",
            u128::from(gwei) * u128::from(GWEI)
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    start(
        market,
        data,
        &[("AGORA_CONFIG", &config), ("AGORA_OPERATOR_KEY", DEV_KEYS[key]), ("AGORA_BOOTSTRAP", bootstrap)],
    )
}

async fn offers(node: &Node) -> Vec<Value> {
    node.get("/api/v1/compute/offers").await.1["offers"].as_array().cloned().unwrap_or_default()
}

/// POSTs `body` as the operator (public endpoints ignore the token).
async fn post(node: &Node, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", node.url))
        .bearer_auth(TOKEN)
        .json(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// Addresses as the API writes them.
fn lower(address: alloy::primitives::Address) -> String {
    address.to_string().to_lowercase()
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_spread_the_broker_chooses_and_futures_are_escrowed_moved_and_reclaimed() {
    let market = Market::start().await;
    let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
    let buyer = start(&market, dirs[0].path(), &[]);
    let bootstrap = p2p_address(&buyer).await;
    let pools = [
        ("A100-80GB", 1, 1000, "spot", "us-east"),
        ("H100-80GB", 1, 3000, "owned", "eu-west"),
        ("H100-80GB", 4, 2500, "partner", "eu-north"),
    ];
    let providers: Vec<Node> = pools
        .iter()
        .enumerate()
        .map(|(i, pool)| provider(&market, dirs[i + 1].path(), i + 1, &bootstrap, *pool))
        .collect();

    // Every provider's offer reaches the buyer's node by gossip, signed by its wallet.
    let book = eventually("three offers at the buyer's node", WAIT, || async {
        let book = offers(&buyer).await;
        (book.len() == 3).then_some(book)
    })
    .await;
    for (i, offer) in book.iter().enumerate() {
        assert_eq!(offer["source"], "peer", "{offer}");
        assert!(offer["peer_id"].is_string(), "{offer}");
        if i > 0 {
            let price =
                |o: &Value| o["offer"]["price_per_gpu_hour"].as_str().unwrap().parse::<u128>().unwrap();
            assert!(price(&book[i - 1]) <= price(offer), "cheapest first");
        }
    }
    let own = eventually("a provider sees its own offer and its peers'", WAIT, || async {
        let book = offers(&providers[2]).await;
        (book.len() == 3).then_some(book)
    })
    .await;
    assert!(own.iter().any(|o| o["source"] == "local" && o["offer"]["provider"] == lower(market.address(3))));

    // Requirements of a registered MLP: parameters from its header, the stated formulas.
    let mut operator = NodeClient::new(&buyer.url).unwrap();
    operator.token = Some(TOKEN.into());
    agora_e2e::mlp::register(&operator, "trainable", true).await;
    let (status, req) =
        buyer.get("/api/v1/models/training-requirements?name=trainable&dataset_rows=1000&epochs=10").await;
    assert_eq!(status, 200, "{req}");
    assert_eq!(req["family"], "mlp");
    assert_eq!(req["parameters"], 4 * 8 + 8 + 8 * 3 + 3);
    assert_eq!(req["flops"].as_f64().unwrap(), 6.0 * 67.0 * 1000.0 * 10.0);
    assert_eq!(req["memory"]["weights"], 4 * 67);
    let (status, err) = buyer.get("/api/v1/models/training-requirements?name=trainable").await;
    assert_eq!(status, 400, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("dataset_rows"), "{err}");
    assert_eq!(buyer.get("/api/v1/models/training-requirements?name=nothing&dataset_rows=1").await.0, 404);

    // The cheapest feasible offer wins; kind and deadline constraints change the choice.
    let (status, estimate) = post(
        &buyer,
        "/api/v1/models/estimate-cost",
        &json!({"model": "trainable", "dataset_rows": 1000, "epochs": 10}),
    )
    .await;
    assert_eq!(status, 200, "{estimate}");
    assert_eq!(estimate["chosen"]["gpu"], "A100-80GB", "{estimate}");
    assert_eq!(estimate["chosen"]["gpu_hours"], 1);
    assert_eq!(estimate["chosen"]["cost"], (1000 * GWEI).to_string());
    assert_eq!(estimate["feasible"].as_array().unwrap().len(), 3);

    let constrained = |constraints: Value, flops: Option<f64>| {
        let mut requirements = req.clone();
        if let Some(flops) = flops {
            requirements["flops"] = json!(flops);
        }
        json!({"requirements": requirements, "constraints": constraints})
    };
    let (_, no_spot) = post(
        &buyer,
        "/api/v1/models/estimate-cost",
        &constrained(json!({"kinds": ["owned", "partner"]}), None),
    )
    .await;
    assert_eq!(no_spot["chosen"]["kind"], "partner", "{no_spot}");
    assert_eq!(no_spot["chosen"]["gpu_count"], 4);
    // 6e17 FLOPs: 0.42 H100-hours (1 517 s on one, 380 s on four), 1.34 A100-hours
    let (status, soon) = post(
        &buyer,
        "/api/v1/models/estimate-cost",
        &constrained(json!({"deadline": now() + 1_000}), Some(6e17)),
    )
    .await;
    assert_eq!(status, 200, "{soon}");
    assert_eq!(soon["chosen"]["gpu_count"], 4, "{soon}");
    assert_eq!(soon["feasible"].as_array().unwrap().len(), 1, "{soon}");
    for (constraints, named) in [
        (json!({"min_gpu_memory_gb": 100}), "min_gpu_memory_gb"),
        (json!({"max_cost": "1"}), "max_cost"),
        (json!({"region": "ap-*"}), "region"),
        (json!({"deadline": now() + 60}), "deadline"),
    ] {
        let (status, err) =
            post(&buyer, "/api/v1/models/estimate-cost", &constrained(constraints, Some(6e17))).await;
        assert_eq!(status, 422, "{err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(named), "{named}: {err}");
    }

    // A forged offer is refused.
    let chosen = &no_spot["chosen"];
    let entry = book.iter().find(|o| o["hash"] == chosen["offer_hash"]).unwrap().clone();
    let mut forged = entry["offer"].clone();
    forged["price_per_gpu_hour"] = json!("1");
    let (status, err) =
        post(&buyer, "/api/v1/compute/offers", &json!({"offer": forged, "signature": entry["signature"]}))
            .await;
    assert_eq!(status, 422, "{err}");

    // Reserve the chosen offer on-chain, to start in ten minutes: the node's EIP-712 hash is
    // the contract's, the escrow is indexed, and the provider withdraws its signed offers.
    let offer: OfferJson = serde_json::from_value(entry["offer"].clone()).unwrap();
    let offer = offer.to_offer().unwrap();
    let signature: Bytes = entry["signature"].as_str().unwrap().parse().unwrap();
    let compute = ComputeMarket::new(market.deployment.compute_market, market.provider.clone());
    let escrow = U256::from(2) * offer.pricePerGpuHour;
    let start_time = now() + 600;
    compute
        .reserve(offer.clone(), signature, 2, start_time)
        .from(market.address(5))
        .value(escrow)
        .send()
        .await
        .unwrap()
        .mined()
        .await;
    let holder5 = lower(market.address(5));
    let reservation = eventually("the reservation indexed", WAIT, || async {
        let (_, list) = buyer.get(&format!("/api/v1/compute/reservations?holder={holder5}")).await;
        list["reservations"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(reservation["state"], "reserved");
    assert_eq!(reservation["escrow"], escrow.to_string());
    assert_eq!(reservation["provider"], lower(market.address(3)));
    assert_eq!(reservation["offer_hash"], entry["hash"]);
    // two GPU-hours on four GPUs: one wall-clock hour
    assert_eq!(reservation["end_time"].as_u64().unwrap(), start_time + 3600);
    let id: U256 = reservation["id"].as_str().unwrap().parse().unwrap();

    let provider3 = lower(market.address(3));
    let fresh = eventually("the provider's offers withdrawn and re-signed", WAIT, || async {
        let (_, account) = buyer.get(&format!("/api/v1/compute/accounts/{provider3}")).await;
        if account["offer_nonce"] != "1" {
            return None;
        }
        offers(&buyer).await.into_iter().find(|o| o["offer"]["provider"] == provider3)
    })
    .await;
    assert_eq!(fresh["offer"]["nonce"], "1", "{fresh}");
    assert!(
        fresh["offer"]["available_from"].as_u64().unwrap() >= start_time + 3600,
        "the pool is busy until the reservation ends: {fresh}"
    );
    assert!(
        offers(&buyer).await.iter().all(|o| o["hash"] != entry["hash"]),
        "the reserved offer left the book"
    );

    // The future changes hands before its start; the new holder gets the refund.
    compute
        .transferFrom(market.address(5), market.address(6), id)
        .from(market.address(5))
        .send()
        .await
        .unwrap()
        .mined()
        .await;
    let holder6 = lower(market.address(6));
    eventually("the transfer indexed", WAIT, || async {
        let (_, list) = buyer.get(&format!("/api/v1/compute/reservations?holder={holder6}")).await;
        (list["reservations"].as_array()?.len() == 1).then_some(())
    })
    .await;

    // Never confirmed: after start + grace the holder reclaims everything.
    market.provider.anvil_increase_time(600 + 3_600 + 1).await.unwrap();
    compute.reclaim(id).from(market.address(7)).send().await.unwrap().mined().await;
    let reclaimed = eventually("the reclaim indexed", WAIT, || async {
        let (_, list) = buyer.get(&format!("/api/v1/compute/reservations?holder={holder6}")).await;
        list["reservations"].as_array()?.first().filter(|r| r["state"] == "reclaimed").cloned()
    })
    .await;
    assert_eq!(reclaimed["refund"], escrow.to_string());
    let (_, account) = buyer.get(&format!("/api/v1/compute/accounts/{holder6}")).await;
    assert_eq!(account["withdrawable"], escrow.to_string(), "{account}");
    assert_eq!(
        compute.withdrawable(market.address(6)).call().await.unwrap(),
        escrow,
        "the index agrees with the chain"
    );
    drop(providers);
}

/// A buyer's node (operator wallet: dev account 5) and one provider offering `pool`, connected.
async fn pair(
    market: &Market,
    dirs: &[tempfile::TempDir],
    pool: (&str, u32, u64, &str, &str),
    extra: &str,
) -> (Node, Node) {
    let buyer = buyer(market, dirs[0].path());
    let bootstrap = p2p_address(&buyer).await;
    let provider = provider_with(market, dirs[1].path(), 3, &bootstrap, pool, extra);
    eventually("the provider's offer at the buyer's node", WAIT, || async {
        (offers(&buyer).await.len() == 1).then_some(())
    })
    .await;
    (buyer, provider)
}

/// A buyer's node: operator wallet dev account 5, two retraining policies of `trainable`.
fn buyer(market: &Market, data: &std::path::Path) -> Node {
    // Two retraining policies: one nightly, one run on demand.
    let config = data.join("agora.toml");
    std::fs::write(
        &config,
        "[[compute.policies]]\nname = \"nightly\"\nschedule = \"0 0 3 * * *\"\nmodel = \"trainable\"\ndataset = \"datasets/train.csv\"\n\n\
         [[compute.policies]]\nname = \"on-demand\"\nmodel = \"trainable\"\ndataset = \"datasets/train.csv\"\nhyperparameters = { epochs = 5 }\n",
    )
    .unwrap();
    let config = config.display().to_string();
    start(
        market,
        data,
        &[("AGORA_OPERATOR_KEY", DEV_KEYS[5]), ("AGORA_JOB_TIMEOUT", "5"), ("AGORA_CONFIG", &config)],
    )
}

/// Registers the MLP fixture and uploads a CSV dataset for it: 4 features, 3 targets that are
/// a linear function of them.
async fn trainable(buyer: &Node) {
    let mut operator = NodeClient::new(&buyer.url).unwrap();
    operator.token = Some(TOKEN.into());
    agora_e2e::mlp::register(&operator, "trainable", true).await;
    let mut csv = String::from("a,b,c,d,y0,y1,y2\n");
    for r in 0..256 {
        let x: Vec<f32> = (0..4).map(|k| ((r * (k + 3) + k) % 19) as f32 / 19.0 - 0.5).collect();
        let y = [x[0] - x[1], 0.5 * x[2] + x[3], 0.25 - x[0] * 0.5];
        let row: Vec<String> = x.iter().chain(y.iter()).map(|v| v.to_string()).collect();
        csv.push_str(&row.join(","));
        csv.push('\n');
    }
    let response = reqwest::Client::new()
        .put(format!("{}/api/2.0/mlflow-artifacts/artifacts/datasets/train.csv", buyer.url))
        .bearer_auth(TOKEN)
        .body(csv)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{:?}", response.text().await);
}

async fn trigger(buyer: &Node, body: Value) -> Value {
    let (status, job) = post(buyer, "/api/v1/retraining/trigger", &body).await;
    assert_eq!(status, 201, "{job}");
    job
}

async fn job(buyer: &Node, id: &Value) -> Value {
    buyer.get(&format!("/api/v1/training/jobs/{id}")).await.1
}

/// Waits for the buyer's job `id` to succeed with a new version; fails at once, with the
/// provider's output, if it fails.
async fn succeeded(buyer: &Node, id: &Value, provider: &Node) -> Value {
    eventually("the training job to succeed", WAIT, || async {
        let j = job(buyer, id).await;
        assert_ne!(j["status"], "failed", "{j}\nprovider:\n{}", provider.process.output());
        (j["status"] == "succeeded" && j["new_version"].is_u64()).then_some(j)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_training_runs_on_the_provider_and_settles_to_the_wei() {
    let market = Market::start().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (buyer, provider) = pair(&market, &dirs, ("H100-80GB", 2, 2000, "owned", "eu-west"), "").await;
    trainable(&buyer).await;

    // Bad inputs are refused before anything is reserved.
    let mut bad =
        json!({"model": "trainable", "dataset": "datasets/train.csv", "hyperparameters": {"epochs": 0}});
    assert_eq!(post(&buyer, "/api/v1/retraining/trigger", &bad).await.0, 400);
    bad["hyperparameters"] = json!({});
    bad["dataset"] = json!("datasets/missing.csv");
    assert_eq!(post(&buyer, "/api/v1/retraining/trigger", &bad).await.0, 400);
    assert!(buyer.get("/api/v1/compute/reservations").await.1["reservations"].as_array().unwrap().is_empty());

    let scheduled = trigger(
        &buyer,
        json!({"model": "trainable", "dataset": "datasets/train.csv", "hyperparameters": {"epochs": 40, "learning_rate": 0.02}, "gpu_hours": 3}),
    )
    .await;
    assert_eq!(scheduled["role"], "buyer");
    assert_eq!(scheduled["gpu"], "H100-80GB");
    let done = succeeded(&buyer, &scheduled["id"], &provider).await;
    let losses: Vec<f64> = done["losses"].as_array().unwrap().iter().map(|l| l.as_f64().unwrap()).collect();
    assert_eq!(losses.len(), 40, "{done}");
    assert!(losses[39] < losses[0] / 2.0, "the loss decreases: {losses:?}");

    // The new version: in Staging, with the losses as metrics, runnable.
    let version = done["new_version"].as_u64().unwrap();
    let (_, versions) = buyer.get("/api/v1/models/trainable/versions").await;
    let v =
        versions["versions"].as_array().unwrap().iter().find(|v| v["version"] == version).unwrap().clone();
    assert_eq!(v["stage"], "Staging", "{v}");
    let (_, metrics) = buyer.get(&format!("/api/v1/models/metrics?name=trainable&version={version}")).await;
    assert_eq!(metrics["metrics"]["loss"].as_array().map(|l| l.len()), Some(40), "{metrics}");

    // The job is an MLflow run the version names: its params, every epoch's loss, finished.
    let run_id = v["run_id"].as_str().unwrap();
    assert_eq!(run_id.len(), 32, "{v}");
    let (status, run) = buyer.get(&format!("/api/2.0/mlflow/runs/get?run_id={run_id}")).await;
    assert_eq!(status, 200, "{run}");
    let info = &run["run"]["info"];
    assert_eq!(
        (info["status"].as_str(), info["run_name"].as_str()),
        (Some("FINISHED"), Some("job-1")),
        "{run}"
    );
    let (_, experiment) = buyer
        .get(&format!(
            "/api/2.0/mlflow/experiments/get?experiment_id={}",
            info["experiment_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(experiment["experiment"]["name"], "agora-training/trainable", "{experiment}");
    let params: std::collections::BTreeMap<&str, &str> = run["run"]["data"]["params"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["key"].as_str().unwrap(), p["value"].as_str().unwrap()))
        .collect();
    assert_eq!(
        (params["epochs"], params["learning_rate"], params["gpu_hours"]),
        ("40", "0.02", "3"),
        "{run}"
    );
    let (_, history) =
        buyer.get(&format!("/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key=loss")).await;
    let logged: Vec<f64> =
        history["metrics"].as_array().unwrap().iter().map(|m| m["value"].as_f64().unwrap()).collect();
    assert_eq!(logged, losses, "every epoch's loss, exactly");

    // The provider is paid for the hours used, the rest refunded, to the wei.
    let id = done["reservation"].as_str().unwrap().to_owned();
    let settled = eventually("the reservation settled", WAIT, || async {
        let (_, list) = buyer.get("/api/v1/compute/reservations").await;
        list["reservations"].as_array()?.iter().find(|r| r["id"] == id && r["state"] == "settled").cloned()
    })
    .await;
    let price = U256::from(2000u64) * U256::from(GWEI);
    let hours = settled["hours_used"].as_u64().unwrap();
    assert_eq!(Some(hours), done["hours_used"].as_u64());
    let reserved = settled["gpu_hours"].as_u64().unwrap();
    assert_eq!(reserved, 3, "the headroom asked for");
    assert_eq!(hours, 1, "seconds on two GPUs bill one GPU-hour");
    assert_eq!(settled["paid"], (U256::from(hours) * price).to_string());
    assert_eq!(settled["refund"], (U256::from(reserved - hours) * price).to_string());
    let compute = ComputeMarket::new(market.deployment.compute_market, market.provider.clone());
    assert_eq!(compute.withdrawable(market.address(3)).call().await.unwrap(), U256::from(hours) * price);
    assert_eq!(
        compute.withdrawable(market.address(5)).call().await.unwrap(),
        U256::from(reserved - hours) * price
    );
    // The provider's own record turns settled when its indexer sees the claim, which may come
    // after the buyer's view above.
    eventually("the provider's job settled", WAIT, || async {
        let (_, provider_job) = provider.get("/api/v1/training/scheduled").await;
        assert_eq!(provider_job["jobs"][0]["role"], "provider", "{provider_job}");
        (provider_job["jobs"][0]["settled"] == true).then_some(())
    })
    .await;

    // Settled early, the pool is offered again from now; a manual policy trains on it.
    eventually("the provider's pool offered again from now", WAIT, || async {
        let book = offers(&buyer).await;
        (book.len() == 1 && book[0]["offer"]["available_from"].as_u64()? <= now()).then_some(())
    })
    .await;
    let (_, policies) = buyer.get("/api/v1/retraining/policies").await;
    let policies = policies["policies"].as_array().unwrap().clone();
    assert_eq!(policies.len(), 2, "{policies:?}");
    assert_eq!(policies[0]["trigger"], "schedule");
    assert_eq!(policies[0]["next_run"].as_u64().unwrap() % 86_400, 3 * 3600, "{policies:?}");
    assert_eq!(policies[1]["trigger"], "manual");
    let (status, second) = post(&buyer, "/api/v1/retraining/policies/on-demand/run", &json!({})).await;
    assert_eq!(status, 201, "{second}");
    assert_eq!(second["policy"], "on-demand");
    let second = succeeded(&buyer, &second["id"], &provider).await;
    assert_eq!(second["losses"].as_array().unwrap().len(), 5);
    assert_eq!(second["new_version"].as_u64(), Some(version + 1));
    let (_, policies) = buyer.get("/api/v1/retraining/policies").await;
    assert_eq!(policies["policies"][1]["last_job"], second["id"], "{policies}");
}

/// The buyer's node never dialled the provider: the provider bootstrapped from a third node,
/// its offer came by gossip through that node, and the job (with the dataset it fetches and
/// the weights it sends back) reaches it at an address found in the DHT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_known_only_through_another_node_trains_for_the_buyer() {
    let market = Market::start().await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let buyer = buyer(&market, dirs[0].path());
    let relay = start(&market, dirs[1].path(), &[("AGORA_BOOTSTRAP", &p2p_address(&buyer).await)]);
    let provider = provider(
        &market,
        dirs[2].path(),
        3,
        &p2p_address(&relay).await,
        ("A100-80GB", 1, 900, "owned", "eu-west"),
    );
    let (_, status) = provider.get("/api/v1/p2p/status").await;
    let provider_id = status["peer_id"].as_str().unwrap().to_owned();
    eventually("the provider's offer at the buyer's node, through the relay", WAIT, || async {
        (offers(&buyer).await.len() == 1).then_some(())
    })
    .await;
    let connected_to_provider = |peers: Value| {
        peers["peers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["peer_id"] == provider_id.as_str() && p["connected"] == true)
    };
    assert!(!connected_to_provider(buyer.get("/api/v1/p2p/peers").await.1), "the buyer dialled the provider");
    trainable(&buyer).await;

    let scheduled = trigger(
        &buyer,
        json!({"model": "trainable", "dataset": "datasets/train.csv", "hyperparameters": {"epochs": 5}, "gpu_hours": 1}),
    )
    .await;
    assert_eq!(scheduled["gpu"], "A100-80GB");
    let done = succeeded(&buyer, &scheduled["id"], &provider).await;
    assert_eq!(done["losses"].as_array().map(Vec::len), Some(5), "{done}");
    assert!(connected_to_provider(buyer.get("/api/v1/p2p/peers").await.1));
    let id = done["reservation"].as_str().unwrap().to_owned();
    eventually("the reservation settled", WAIT, || async {
        let (_, list) = buyer.get("/api/v1/compute/reservations").await;
        list["reservations"].as_array()?.iter().find(|r| r["id"] == id && r["state"] == "settled").map(|_| ())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_killed_mid_job_leaves_the_holder_its_escrow() {
    let market = Market::start().await;
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    // An external executor that reports one epoch, then hangs.
    let extra = "[compute]\nexternal_command = [\"sh\", \"-c\", \"echo '{\\\"epoch\\\": 1, \\\"loss\\\": 0.9}'; sleep 600\"]\n";
    let (buyer, provider) = pair(&market, &dirs, ("A100-80GB", 1, 1500, "spot", "us-east"), extra).await;
    trainable(&buyer).await;
    let scheduled = trigger(
        &buyer,
        json!({"model": "trainable", "dataset": "datasets/train.csv", "executor": "external"}),
    )
    .await;
    eventually("the job running on the provider", WAIT, || async {
        let j = job(&buyer, &scheduled["id"]).await;
        (j["status"] == "running" && j["losses"].as_array()?.len() == 1).then_some(())
    })
    .await;
    let id = scheduled["reservation"].as_str().unwrap().to_owned();
    let reservation = eventually("the start confirmed on-chain", WAIT, || async {
        let (_, list) = buyer.get("/api/v1/compute/reservations").await;
        list["reservations"].as_array()?.iter().find(|r| r["id"] == id && r["state"] == "confirmed").cloned()
    })
    .await;
    drop(provider);

    let failed = eventually("the job failed on silence", WAIT, || async {
        let j = job(&buyer, &scheduled["id"]).await;
        (j["status"] == "failed").then_some(j)
    })
    .await;
    assert!(failed["error"].as_str().unwrap().contains("silent"), "{failed}");
    // Past the reservation's end and the grace, the buyer's node reclaims the whole escrow.
    let end = reservation["end_time"].as_u64().unwrap();
    market.provider.anvil_increase_time(end + 3_600 + 5 - now()).await.unwrap();
    market.mine(1).await;
    let reclaimed = eventually("the escrow reclaimed", WAIT, || async {
        let (_, list) = buyer.get("/api/v1/compute/reservations").await;
        list["reservations"].as_array()?.iter().find(|r| r["id"] == id && r["state"] == "reclaimed").cloned()
    })
    .await;
    assert_eq!(reclaimed["refund"], reservation["escrow"]);
    let compute = ComputeMarket::new(market.deployment.compute_market, market.provider.clone());
    assert_eq!(
        compute.withdrawable(market.address(5)).call().await.unwrap().to_string(),
        reservation["escrow"].as_str().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_whose_output_does_not_match_its_hash_is_rejected() {
    use agora_node::p2p::{
        blob,
        net::{self, NetConfig, NetEvent, Topic},
        wire::{self, BlobRequest, BlobResponse, JobMessage, JobReply, SignedOffer},
    };
    use alloy::sol_types::SolValue;

    let market = Market::start().await;
    let dir = tempfile::tempdir().unwrap();
    let buyer =
        start(&market, dir.path(), &[("AGORA_OPERATOR_KEY", DEV_KEYS[5]), ("AGORA_JOB_TIMEOUT", "30")]);
    trainable(&buyer).await;
    let bootstrap = p2p_address(&buyer).await;

    // A provider the test plays by hand: its offer is genuine, its output is not.
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let net_config = NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: vec![bootstrap.parse().unwrap()],
        mdns: false,
        max_connections: 16,
        max_per_peer: 2,
    };
    let (net, mut events, _task) = net::start(net::keypair([9; 32]).unwrap(), net_config, shutdown).unwrap();
    let signer = market.signer(4);
    let spec = agora_node::compute::offers::OfferSpec {
        gpu: "A100-80GB".into(),
        gpu_count: 1,
        memory_gb: 80,
        price_per_gpu_hour: (1000 * GWEI).to_string(),
        kind: agora_node::compute::offers::OfferKind::Spot,
        region: "us-east".into(),
        available_from: None,
        available_until: None,
        available_hours: Some(24),
    };
    let offer = spec.to_offer(signer.address(), &net.peer_id.to_string(), U256::ZERO, now(), 3600).unwrap();
    let (chain_id, compute_market) = (market.deployment.chain_id, market.deployment.compute_market);
    let signature = agora_node::compute::offers::sign(&offer, &signer, chain_id, compute_market);
    let gossip = wire::encode(&SignedOffer::new(offer.abi_encode(), signature));
    // Published once the buyer's node listens on the offers topic.
    while !matches!(events.recv().await, Some(NetEvent::Subscribed { topic: Topic::Offers, .. }) | None) {}
    net.publish(Topic::Offers, gossip).await.unwrap();
    eventually("the rogue's offer at the buyer's node", WAIT, || async {
        (offers(&buyer).await.len() == 1).then_some(())
    })
    .await;

    let scheduled = trigger(&buyer, json!({"model": "trainable", "dataset": "datasets/train.csv"})).await;
    let reservation: U256 = scheduled["reservation"].as_str().unwrap().parse().unwrap();
    let compute = ComputeMarket::new(compute_market, market.provider.clone());
    let fake = vec![7u8; 3000];
    let claimed = *blake3::hash(b"the weights it claims to have made").as_bytes();
    let buyer_peer = loop {
        match events.recv().await.expect("the rogue's swarm runs") {
            NetEvent::JobMessage { peer, message: JobMessage::Start(_), reply } => {
                let _ = reply.send(JobReply::Accepted);
                break peer;
            }
            NetEvent::JobMessage { reply, .. } => {
                let _ = reply.send(JobReply::Ack);
            }
            _ => {}
        }
    };
    let confirmed =
        compute.confirmStart(reservation).from(market.address(4)).send().await.unwrap().mined().await;
    // The provider's word is checked against the chain: the confirming transaction counts, the
    // reserving one (no `Confirmed` in it) does not.
    let (status, checked) = post(
        &buyer,
        "/api/v1/compute/reservation-confirmed",
        &json!({"reservation_id": reservation.to_string(), "tx": confirmed.transaction_hash.to_string()}),
    )
    .await;
    assert_eq!(status, 200, "{checked}");
    assert_eq!(checked["job"], scheduled["id"]);
    let reserve_tx = eventually("the reservation indexed", WAIT, || async {
        let (_, list) = buyer.get("/api/v1/compute/reservations").await;
        list["reservations"].as_array()?.first().map(|r| r["reserved_tx"].clone())
    })
    .await;
    let (status, refused) = post(
        &buyer,
        "/api/v1/compute/reservation-confirmed",
        &json!({"reservation_id": reservation.to_string(), "tx": reserve_tx}),
    )
    .await;
    assert_eq!(status, 422, "{refused}");
    assert_eq!(job(&buyer, &scheduled["id"]).await["status"], "running");
    let done = JobMessage::Done {
        reservation: reservation.to_be_bytes(),
        output: claimed,
        losses: vec![0.5],
        seconds: 1.0,
        hours_used: 1,
    };
    // Asked for the output, it serves the manifest of other bytes.
    let serving = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                NetEvent::BlobRequest { request: BlobRequest::Manifest { .. }, reply, .. } => {
                    let cvs = blob::chaining_values(&fake[..], fake.len() as u64).unwrap();
                    let _ = reply.send(BlobResponse::manifest(fake.len() as u64, cvs.concat()));
                }
                NetEvent::BlobRequest { reply, .. } => {
                    let _ = reply.send(BlobResponse::Refused("no".into()));
                }
                NetEvent::JobMessage { reply, .. } => {
                    let _ = reply.send(JobReply::Ack);
                }
                _ => {}
            }
        }
    });
    assert!(matches!(net.send_job(buyer_peer, done).await.unwrap(), JobReply::Ack));
    let failed = eventually("the output rejected", WAIT, || async {
        let j = job(&buyer, &scheduled["id"]).await;
        (j["status"] == "failed").then_some(j)
    })
    .await;
    assert!(failed["error"].as_str().unwrap().contains("rejected"), "{failed}");
    assert!(failed["new_version"].is_null());
    let (_, versions) = buyer.get("/api/v1/models/trainable/versions").await;
    assert_eq!(versions["versions"].as_array().unwrap().len(), 1, "nothing registered");
    // the run records the failure and why
    let (_, experiment) =
        buyer.get("/api/2.0/mlflow/experiments/get-by-name?experiment_name=agora-training/trainable").await;
    let experiment_id = &experiment["experiment"]["experiment_id"];
    let (_, runs) =
        post(&buyer, "/api/2.0/mlflow/runs/search", &json!({"experiment_ids": [experiment_id]})).await;
    let runs = runs["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0]["info"]["status"], "FAILED");
    let tags = runs[0]["data"]["tags"].as_array().unwrap();
    let error = tags.iter().find(|t| t["key"] == "agora.error").unwrap();
    assert!(error["value"].as_str().unwrap().contains("rejected"), "{tags:?}");
    let _ = stop.send(true);
    serving.abort();
}
