//! The read API of the index: models, licenses and earnings, exact to the wei.

use agora_e2e::{Node, market::Market};
use alloy::{primitives::U256, providers::ext::AnvilApi};

fn wei(v: &serde_json::Value) -> U256 {
    v.as_str().expect("amounts are decimal strings").parse().unwrap()
}

#[tokio::test]
async fn models_licenses_and_earnings() {
    let market = Market::start().await;
    let data = tempfile::tempdir().unwrap();
    let node = Node::start(&market.anvil.endpoint(), &market.deployment_path(), data.path(), &[]);

    let first = market.register("alpha-model").await;
    let second = market.register("beta-model").await;
    let perpetual = market.buy(first, 5, 0).await;
    let timed = market.buy(first, 6, 1).await;
    let usage = market.buy(first, 7, 2).await;
    market.settle(usage, 7, 250).await;
    market.distribute(first).await;
    market.withdraw(2).await;
    market.buy(second, 5, 0).await; // booked, not distributed
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;

    // models: newest first, paginated, filtered
    let (status, page) = node.get("/api/v1/marketplace/models?limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["models"][0]["token_id"], second.to_string());
    assert_eq!(page["as_of"]["block"].as_u64(), Some(head));
    let cursor = page["next_cursor"].as_str().expect("a second page").to_owned();
    let (_, next) = node.get(&format!("/api/v1/marketplace/models?limit=1&cursor={cursor}")).await;
    assert_eq!(next["models"][0]["token_id"], first.to_string());
    assert!(next["next_cursor"].is_null(), "last page");
    let (_, oldest) = node.get("/api/v1/marketplace/models?sort=oldest").await;
    assert_eq!(oldest["models"][0]["token_id"], first.to_string());
    let (_, found) = node.get("/api/v1/marketplace/models?q=BETA").await;
    assert_eq!(found["models"].as_array().unwrap().len(), 1);
    let seller = market.address(1);
    let (_, owned) = node.get(&format!("/api/v1/marketplace/models?owner={seller}")).await;
    assert_eq!(owned["models"].as_array().unwrap().len(), 2);
    let (_, none) = node.get(&format!("/api/v1/marketplace/models?owner={}", market.address(9))).await;
    assert!(none["models"].as_array().unwrap().is_empty());

    // one model
    let (status, detail) = node.get(&format!("/api/v1/marketplace/models/{first}")).await;
    assert_eq!(status, 200);
    let model = &detail["model"];
    assert_eq!(model["owner"], seller.to_string().to_lowercase());
    assert_eq!(model["versions"][0]["version"], 1);
    assert_eq!(model["splits"].as_array().unwrap().len(), 3);
    assert_eq!(model["license_counts"]["perpetual"], 1);
    assert_eq!(model["license_counts"]["timed"], 1);
    assert_eq!(model["license_counts"]["usage"], 1);

    // licenses
    let (_, by_holder) = node.get(&format!("/api/v1/licenses?holder={}", market.address(5))).await;
    assert_eq!(by_holder["licenses"].as_array().unwrap().len(), 2);
    let (_, by_token) = node.get(&format!("/api/v1/licenses?token_id={first}&limit=2")).await;
    assert_eq!(by_token["licenses"].as_array().unwrap().len(), 2);
    assert!(by_token["next_cursor"].is_string());
    let (_, l) = node.get(&format!("/api/v1/licenses/{usage}")).await;
    assert_eq!(l["license"]["kind"], "usage");
    assert_eq!(l["license"]["escrow"]["settled_units"], "250");
    assert_eq!(l["license"]["active"], true);
    let (_, p) = node.get(&format!("/api/v1/licenses/{perpetual}")).await;
    assert_eq!(p["license"]["purchase"]["tx"].as_str().unwrap().len(), 66);

    // earnings, to the wei: 0.1 + 0.01 ETH + 250 units, fee 2.5% each, split 50/30/20
    let paid = [
        U256::from(10u64).pow(U256::from(17)),
        U256::from(10u64).pow(U256::from(16)),
        U256::from(250u64 * 1_000_000_000),
    ];
    let fee = |a: U256| a * U256::from(250) / U256::from(10_000);
    let net: U256 = paid.iter().map(|&a| a - fee(a)).sum();
    let bob = net * U256::from(3000) / U256::from(10_000);
    let carol = net * U256::from(2000) / U256::from(10_000);
    let alice = net - bob - carol;
    let (_, e) = node.get(&format!("/api/v1/marketplace/earnings?address={}", market.address(2))).await;
    assert_eq!(wei(&e["earnings"]["credited"]), alice);
    assert_eq!(wei(&e["earnings"]["withdrawn"]), alice, "account 2 withdrew");
    assert_eq!(wei(&e["earnings"]["withdrawable"]), U256::ZERO);
    let second_net = paid[0] - fee(paid[0]);
    assert_eq!(wei(&e["earnings"]["pending"]), second_net * U256::from(5000) / U256::from(10_000));
    let (_, e) = node.get(&format!("/api/v1/marketplace/earnings?address={}", market.address(3))).await;
    assert_eq!(wei(&e["earnings"]["withdrawable"]), bob);
    let on_chain = market.market.withdrawable(market.address(3)).call().await.unwrap();
    assert_eq!(wei(&e["earnings"]["withdrawable"]), on_chain, "index and contract agree");
    let (_, t) = node.get(&format!("/api/v1/marketplace/earnings?address={}", market.address(0))).await;
    let fees = paid.iter().map(|&a| fee(a)).sum::<U256>() + fee(paid[0]);
    assert_eq!(wei(&t["earnings"]["fees"]), fees);
    assert_eq!(
        wei(&t["earnings"]["withdrawable"]),
        market.market.withdrawable(market.address(0)).call().await.unwrap()
    );

    // a timed license expires by chain time
    market.provider.anvil_increase_time(31 * 86_400).await.unwrap();
    market.mine(1).await;
    let (head, hash) = market.head().await;
    node.wait_indexed(head, hash).await;
    let (_, t) = node.get(&format!("/api/v1/licenses/{timed}")).await;
    assert_eq!(t["license"]["active"], false, "{t}");

    // bad input: named, 4xx
    for (path, want, needle) in [
        ("/api/v1/licenses/999", 404, "999"),
        ("/api/v1/marketplace/models/77", 404, "77"),
        ("/api/v1/licenses/notanumber", 400, "license id"),
        ("/api/v1/marketplace/earnings?address=0x12", 400, "address"),
        ("/api/v1/marketplace/earnings", 400, "address"),
        ("/api/v1/marketplace/models?limit=0", 400, "limit"),
        ("/api/v1/marketplace/models?sort=price", 400, "sort"),
        ("/api/v1/marketplace/models?ownr=0x00", 400, "ownr"),
        ("/api/v1/licenses?holder=zz", 400, "holder"),
    ] {
        let (status, body) = node.get(path).await;
        assert_eq!(status, want, "{path}: {body}");
        assert!(body["error"]["message"].as_str().unwrap().contains(needle), "{path}: {body}");
    }
    // ids as large as uint256 are parsed, not truncated
    let max = U256::MAX;
    let (status, body) = node.get(&format!("/api/v1/licenses/{max}")).await;
    assert_eq!(status, 404);
    assert!(body["error"]["message"].as_str().unwrap().contains(&max.to_string()));
}
