//! The chain indexer against a real anvil: reorgs, crashes, RPC faults, confirmations, and the
//! failure cases public indexer reliability suites check.

use std::time::Duration;

use agora_e2e::{
    Node, eventually,
    market::Market,
    proxy::{FaultProxy, Faults},
    rebuild,
};
use alloy::primitives::U256;

/// Waits for the node to index the head, then checks its root against a rebuild from scratch.
async fn assert_matches_rebuild(market: &Market, node: &Node) -> serde_json::Value {
    let (head, hash) = market.head().await;
    let status = node.wait_indexed(head, hash).await;
    let rebuilt = rebuild(&market.anvil.endpoint(), &market.deployment_path(), head);
    assert_eq!(rebuilt["block"].as_u64(), Some(head));
    assert_eq!(rebuilt["hash"].as_str(), Some(hash.to_string().as_str()));
    assert_eq!(
        status["state_root"], rebuilt["state_root"],
        "running index and rebuild differ at block {head}"
    );
    status
}

/// Some activity of every kind, varied by `seed`.
async fn activity(market: &Market, token: U256, seed: u64) {
    let buyer = 5 + (seed % 5) as usize;
    let license = market.buy(token, buyer, (seed % 3) as u8).await;
    if seed % 3 == 2 {
        market.settle(license, buyer, 1 + seed % 50).await;
    }
    if seed.is_multiple_of(2) {
        market.distribute(token).await;
        market.withdraw(2 + (seed % 3) as usize).await;
    }
    if seed % 4 == 1 {
        market.cancel(token, U256::from(1_000 + seed)).await; // an order nobody buys here
    }
    if seed % 5 == 3 {
        market.bump_nonce().await;
    }
}

#[tokio::test]
async fn index_follows_the_chain_and_matches_a_rebuild_after_reorgs() {
    let market = Market::start().await;
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), &[]);
    let token = market.register("reorgs").await;
    for seed in 0..3 {
        activity(&market, token, seed).await;
    }
    assert_matches_rebuild(&market, &node).await;

    let mut reorgs = 0u64;
    for seed in [0x9E37_79B9_7F4A_7C15u64, 0xD1B5_4A32_D192_ED03, 0x8CB9_2BA7_2F3D_8DD7] {
        let mut rng = seed;
        for round in 0..6u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let depth = 1 + rng % 20;
            let snapshot = market.snapshot().await;
            // branch A: different licenses, withdrawals, cancellations, nonce bumps
            for step in 0..depth.div_ceil(4) {
                activity(&market, token, rng % 97 + round * 7 + step).await;
            }
            market.mine(depth / 2).await;
            let (head_a, hash_a) = market.head().await;
            node.wait_indexed(head_a, hash_a).await;
            // branch B replaces A and is longer
            market.revert(snapshot).await;
            for step in 0..2 {
                activity(&market, token, rng % 89 + round * 11 + step + 100).await;
            }
            let (now, _) = market.head().await;
            if now <= head_a {
                market.mine(head_a - now + 1).await;
            }
            let status = assert_matches_rebuild(&market, &node).await;
            reorgs += 1;
            assert!(status["reorgs"].as_u64().unwrap() >= reorgs, "reorg {reorgs} was seen: {status}");
        }
    }
    // anvil_reorg: the last blocks replaced by empty ones (events removed, not changed)
    let before = market.buy(token, 6, 0).await;
    market.mine(2).await;
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;
    assert_eq!(node.get(&format!("/api/v1/licenses/{before}")).await.0, 200);
    market.reorg(4).await;
    assert_matches_rebuild(&market, &node).await;
    assert_eq!(
        node.get(&format!("/api/v1/licenses/{before}")).await.0,
        404,
        "the reorg removed the purchase"
    );
}

#[tokio::test]
async fn crash_during_backfill_loses_and_duplicates_nothing() {
    let market = Market::start().await;
    let token = market.register("crash").await;
    // thousands of events: many purchases per block
    market.set_automine(false).await;
    let mut nonces = [0u64; 10];
    for (i, nonce) in nonces.iter_mut().enumerate().skip(5) {
        *nonce = market.nonce_of(i).await;
    }
    let mut purchases = 0u64;
    for block in 0..60 {
        for i in 0..40u64 {
            let buyer = 5 + ((block + i) % 5) as usize;
            market.send_buy(token, buyer, (i % 2) as u8, nonces[buyer]).await;
            nonces[buyer] += 1;
            purchases += 1;
        }
        market.mine(1).await;
    }
    market.set_automine(true).await;
    market.distribute(token).await;

    let data = tempfile::tempdir().unwrap();
    let deployment = market.deployment_path();
    let env = [("AGORA_MAX_BLOCK_RANGE", "2")];
    let mut rng = 12345u64;
    for _ in 0..4 {
        let node = Node::start(&market.anvil.endpoint(), &deployment, data.path(), &env);
        let start = node.status().await["indexed_block"].as_u64().unwrap_or(0);
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let (head, _) = market.head().await;
        let target = (start + 3 + (rng >> 33) % 12).min(head);
        eventually("some progress before the crash", Duration::from_secs(60), || async {
            (node.status().await["indexed_block"].as_u64().unwrap_or(0) >= target).then_some(())
        })
        .await;
        // SIGKILL mid-backfill
        drop(node);
    }
    let node = Node::start(&market.anvil.endpoint(), &deployment, data.path(), &[]);
    let status = assert_matches_rebuild(&market, &node).await;
    assert!(status["events_applied"].as_u64().is_some());
    let (_, model) = node.get(&format!("/api/v1/marketplace/models/{token}")).await;
    let counts = &model["model"]["license_counts"];
    let indexed = counts["perpetual"].as_u64().unwrap() + counts["timed"].as_u64().unwrap();
    let on_chain: u64 = market.market.licenseCount().call().await.unwrap();
    assert_eq!(indexed, on_chain, "every license indexed once: {model}");
    // timed re-purchases by the same buyer extend one license; every perpetual one is its own
    assert_eq!(counts["perpetual"].as_u64().unwrap(), purchases / 2);
}

#[tokio::test]
async fn rpc_faults_never_skip_a_range() {
    let market = Market::start().await;
    let token = market.register("faults").await;
    for seed in 0..12 {
        activity(&market, token, seed).await;
        market.mine(3).await;
    }
    let proxy = FaultProxy::start(market.anvil.endpoint(), 7).await;
    proxy.set(Faults {
        http_error_rate: 0.03,
        rpc_error_rate: 0.03,
        drop_rate: 0.03,
        hang_rate: 0.02,
        hang: Duration::from_secs(3),
        lag_blocks: 0,
        duplicate_logs: true,
        refuse_batches: false,
    });
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(
        &proxy.url(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_RPC_TIMEOUT_MS", "500"), ("AGORA_MAX_BLOCK_RANGE", "8")],
    );
    for seed in 12..18 {
        activity(&market, token, seed).await;
    }
    assert_matches_rebuild(&market, &node).await;
    let (requests, faulted) = proxy.counts();
    assert!(faulted > 5, "the proxy misbehaved ({faulted} of {requests} requests)");
    let metrics = reqwest::get(format!("{}/metrics", node.url)).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("agora_index_rpc_errors_total"), "RPC errors are counted");
}

/// Block headers go out in JSON-RPC batches; an RPC that refuses batches is asked one call
/// at a time and the index comes out the same.
#[tokio::test]
async fn an_rpc_that_refuses_batches_is_asked_call_by_call() {
    let market = Market::start().await;
    let token = market.register("no batches").await;
    for seed in 0..4 {
        activity(&market, token, seed).await;
    }
    let proxy = FaultProxy::start(market.anvil.endpoint(), 3).await;
    proxy.set(Faults { refuse_batches: true, ..Faults::default() });
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(&proxy.url(), &market.deployment_path(), data.path(), &[]);
    activity(&market, token, 4).await;
    assert_matches_rebuild(&market, &node).await;
    let (_, refused) = proxy.counts();
    assert!(refused > 0, "the node sent no batch to refuse");
}

#[tokio::test]
async fn a_lagging_replica_is_waited_for_not_unwound() {
    let market = Market::start().await;
    let token = market.register("lag").await;
    let proxy = FaultProxy::start(market.anvil.endpoint(), 1).await;
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(&proxy.url(), &market.deployment_path(), data.path(), &[]);
    market.buy(token, 5, 0).await;
    market.mine(5).await;
    let before = assert_matches_rebuild(&market, &node).await;
    // the replica behind the proxy falls 4 blocks behind what the node has indexed
    proxy.set(Faults { lag_blocks: 4, ..Faults::default() });
    let head_seen = eventually("the node sees the lower head", Duration::from_secs(30), || async {
        let s = node.status().await;
        (s["head"].as_u64()? + 4 == before["indexed_block"].as_u64()?).then_some(s)
    })
    .await;
    assert_eq!(head_seen["indexed_block"], before["indexed_block"], "no unwind");
    assert_eq!(head_seen["reorgs"], before["reorgs"], "not counted as a reorg");
    assert_eq!(head_seen["state_root"], before["state_root"]);
    proxy.set(Faults::default());
    market.buy(token, 6, 1).await;
    let after = assert_matches_rebuild(&market, &node).await;
    assert_eq!(after["reorgs"], before["reorgs"]);
}

#[tokio::test]
async fn confirmations_make_a_license_final_five_blocks_later() {
    let market = Market::start().await;
    let token = market.register("finality").await;
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(
        &market.anvil.endpoint(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_CONFIRMATIONS", "5")],
    );
    let license = market.buy(token, 5, 0).await;
    let (purchase_block, _) = market.head().await;
    for extra in 0..=5u64 {
        let (head, hash) = market.head().await;
        node.wait_indexed(head, hash).await;
        let (status, body) = node.get(&format!("/api/v1/licenses/{license}")).await;
        assert_eq!(status, 200);
        let want = if extra < 5 { "latest" } else { "final" };
        assert_eq!(body["license"]["finality"], want, "{extra} blocks after the purchase: {body}");
        assert_eq!(body["as_of"]["block"].as_u64(), Some(purchase_block + extra));
        market.mine(1).await;
    }
}

#[tokio::test]
async fn a_reorg_deeper_than_the_window_stops_the_indexer_loudly() {
    let market = Market::start().await;
    let token = market.register("deep").await;
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), &[]);
    let snapshot = market.snapshot().await;
    market.buy(token, 5, 0).await;
    market.mine(140).await;
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;
    market.revert(snapshot).await;
    market.buy(token, 6, 1).await;
    market.mine(150).await;
    let (status, body) = eventually("readyz 503 index_stopped", Duration::from_secs(60), || async {
        let (s, b) = node.get("/readyz").await;
        (s == 503 && b["error"]["code"] == "index_stopped").then_some((s, b))
    })
    .await;
    assert_eq!(status, 503);
    assert!(body["error"]["message"].as_str().unwrap().contains("deeper than the 128 blocks"), "{body}");
    let chain = node.status().await;
    assert_eq!(chain["indexed_block"].as_u64(), Some(head), "the index stays where it was right");
    assert!(chain["fatal"].is_string());
}

#[tokio::test]
async fn a_reorg_while_the_node_was_down_is_found_at_start_up() {
    let market = Market::start().await;
    let token = market.register("down").await;
    let data = tempfile::tempdir().unwrap();
    let deployment = market.deployment_path();
    let snapshot = market.snapshot().await;
    market.buy(token, 5, 0).await;
    market.buy(token, 6, 2).await;
    {
        let mut node = Node::start(&market.anvil.endpoint(), &deployment, data.path(), &[]);
        let (head, hash) = market.head().await;
        node.wait_indexed(head, hash).await;
        let status = node.process.terminate(Duration::from_secs(15)).expect("exits on SIGTERM");
        assert!(status.success());
    }
    // same height, other blocks
    market.revert(snapshot).await;
    market.buy(token, 7, 1).await;
    market.buy(token, 8, 1).await;
    let node = Node::start(&market.anvil.endpoint(), &deployment, data.path(), &[]);
    let status = assert_matches_rebuild(&market, &node).await;
    assert_eq!(status["reorgs"].as_u64(), Some(1), "{status}");
}

#[tokio::test]
async fn empty_blocks_advance_and_sigterm_keeps_the_checkpoint() {
    let market = Market::start().await;
    let token = market.register("empty").await;
    market.buy(token, 5, 0).await;
    market.mine(3000).await;
    let data = tempfile::tempdir().unwrap();
    let deployment = market.deployment_path();
    let mut node =
        Node::start(&market.anvil.endpoint(), &deployment, data.path(), &[("AGORA_MAX_BLOCK_RANGE", "10")]);
    eventually("backfill under way", Duration::from_secs(60), || async {
        (node.status().await["indexed_block"].as_u64().unwrap_or(0) > 200).then_some(())
    })
    .await;
    let (status, body) = node.get("/readyz").await;
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("index_behind")), "{body}");
    let status = node.process.terminate(Duration::from_secs(15)).expect("SIGTERM exits within 15 s");
    assert!(status.success(), "{}", node.process.output());

    // the checkpoint is a consistent block boundary: a rebuild to it gives the same root
    let (ok, stdout, stderr) =
        agora_e2e::agora(&["index", "root", "--data-dir", &data.path().display().to_string()], &[]);
    assert!(ok.success(), "{stderr}");
    let stopped: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let at = stopped["block"].as_u64().unwrap();
    assert_eq!(rebuild(&market.anvil.endpoint(), &deployment, at)["state_root"], stopped["state_root"]);

    let node = Node::start(&market.anvil.endpoint(), &deployment, data.path(), &[]);
    assert_matches_rebuild(&market, &node).await;
}

#[tokio::test]
async fn follows_new_heads_over_a_websocket() {
    let market = Market::start().await;
    let token = market.register("ws").await;
    let data = tempfile::tempdir().unwrap();
    // a long poll interval: only the subscription can make the node this quick
    let node = Node::start(
        &market.anvil.ws_endpoint(),
        &market.deployment_path(),
        data.path(),
        &[("AGORA_POLL_MS", "60000")],
    );
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;
    market.buy(token, 5, 0).await;
    assert_matches_rebuild(&market, &node).await;
    let (status, _) = node.get("/readyz").await;
    assert_eq!(status, 200);
}
