//! `agora compute`: the compute offers a node knows, and offering capacity as a provider (the
//! offer is signed here, with the provider's wallet; the key never leaves the CLI).

use anyhow::Context;
use clap::Subcommand;
use serde_json::{Value, json};

use super::{model::NodeArgs, wallet::WalletArgs};
use crate::{
    client::NodeClient,
    compute::offers::{self, OfferJson, OfferKind, OfferSpec},
};

#[derive(Subcommand, Debug)]
pub enum ComputeCommand {
    /// Compute offers the node knows (its own and its peers'), cheapest per GPU-hour first.
    Offers {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Offer GPU capacity: sign an offer with the provider's wallet and post it to the node,
    /// which checks it and gossips it. Jobs for it go to that node.
    Offer {
        /// GPU model, as in the node's throughput table (`GET /api/v1/compute/gpus`).
        #[arg(long)]
        gpu: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Memory per GPU, GiB.
        #[arg(long)]
        memory_gb: u32,
        /// Wei per GPU-hour.
        #[arg(long)]
        price_wei: String,
        #[arg(long, value_enum, default_value_t = OfferKind::Owned)]
        kind: OfferKind,
        #[arg(long, default_value = "")]
        region: String,
        /// Hours the capacity is available, from now.
        #[arg(long, default_value_t = 168)]
        hours: u64,
        /// Seconds the signature stays valid.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        #[command(flatten)]
        wallet: WalletArgs,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
}

impl ComputeCommand {
    pub async fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Offers { node, json } => {
                let answer = NodeClient::new(&node.node)?.get_json("/api/v1/compute/offers").await?;
                if json {
                    println!("{answer}");
                } else {
                    println!("{}", table(&answer));
                }
                Ok(())
            }
            Self::Offer {
                gpu,
                count,
                memory_gb,
                price_wei,
                kind,
                region,
                hours,
                ttl,
                wallet,
                node,
                json,
            } => {
                let signer = wallet.signer()?;
                let client = NodeClient::new(&node.node)?;
                let status = client.get_json("/api/v1/chain/status").await?;
                let compute_market = status["compute_market"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .context("the node's deployment has no ComputeMarket: compute brokering is off there")?;
                let chain_id = status["chain_id"].as_u64().context("the node did not say its chain id")?;
                let p2p = client.get_json("/api/v1/p2p/status").await?;
                let peer =
                    p2p["peer_id"].as_str().context("the node runs without the peer-to-peer network")?;
                let spec = OfferSpec {
                    gpu,
                    gpu_count: count,
                    memory_gb,
                    price_per_gpu_hour: price_wei,
                    kind,
                    region,
                    available_from: None,
                    available_until: None,
                    available_hours: Some(hours),
                };
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
                let account =
                    client.get_json(&format!("/api/v1/compute/accounts/{}", signer.address())).await?;
                let current_nonce = account["offer_nonce"]
                    .as_str()
                    .and_then(|n| n.parse().ok())
                    .context("the node did not say the provider's offer nonce")?;
                let offer = spec.to_offer(signer.address(), peer, current_nonce, now, ttl)?;
                let signature = offers::sign(&offer, &signer, chain_id, compute_market);
                let answer = client
                    .post_json(
                        "/api/v1/compute/offers",
                        &json!({
                            "offer": OfferJson::from_offer(&offer),
                            "signature": alloy::hex::encode_prefixed(&signature),
                        }),
                    )
                    .await?;
                if json {
                    println!("{answer}");
                } else {
                    println!(
                        "offered {} × {} at {} wei per GPU-hour until {}: offer {}",
                        offer.gpuCount,
                        offer.gpu,
                        offer.pricePerGpuHour,
                        offer.availableUntil,
                        answer["hash"]
                    );
                }
                Ok(())
            }
        }
    }
}

fn table(answer: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let mut rows = vec![format!(
        "{:<14} {:>5} {:>6} {:>22} {:<8} {:<10} {:<12} {}",
        "GPU", "COUNT", "MEM GB", "WEI/GPU-HOUR", "KIND", "REGION", "UNTIL", "PROVIDER (SOURCE)"
    )];
    for o in answer["offers"].as_array().into_iter().flatten() {
        let offer = &o["offer"];
        rows.push(format!(
            "{:<14} {:>5} {:>6} {:>22} {:<8} {:<10} {:<12} {} ({})",
            text(&offer["gpu"]),
            offer["gpu_count"],
            offer["memory_gb"],
            text(&offer["price_per_gpu_hour"]),
            text(&offer["kind"]),
            text(&offer["region"]),
            offer["available_until"],
            text(&offer["provider"]),
            text(&o["source"]),
        ));
    }
    if rows.len() == 1 {
        return "no live compute offers".into();
    }
    rows.join("\n")
}
