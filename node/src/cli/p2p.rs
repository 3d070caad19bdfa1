//! `agora p2p`: a node's peers, and the blobs it shares with and fetches from them (the
//! operator, with AGORA_ADMIN_TOKEN, for share and fetch).

use anyhow::Context;
use clap::Subcommand;
use serde_json::Value;

use crate::{client::NodeClient, config::Config};

#[derive(Subcommand, Debug)]
pub enum P2pCommand {
    /// Peer id, addresses, peers connected, gossip counters, peers' index roots.
    Status(Common),
    /// Peers: id, agent, latency, gossip score.
    Peers(Common),
    /// Share a blob of the node's artifact store with peers (operator).
    Share {
        /// blake3 of the blob, hex.
        blake3: String,
        #[command(flatten)]
        common: Common,
    },
    /// Fetch a blob from peers into the node's artifact store, every chunk checked (operator).
    Fetch {
        blake3: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(clap::Args, Debug)]
pub struct Common {
    #[command(flatten)]
    pub node: super::model::NodeArgs,
    #[arg(long)]
    pub json: bool,
}

impl P2pCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        let (common, path, post) = match &self {
            Self::Status(c) => (c, "/api/v1/p2p/status".to_owned(), false),
            Self::Peers(c) => (c, "/api/v1/p2p/peers".to_owned(), false),
            Self::Share { blake3, common } => (common, format!("/api/v1/p2p/blobs/{blake3}/share"), true),
            Self::Fetch { blake3, common } => (common, format!("/api/v1/p2p/blobs/{blake3}/fetch"), true),
        };
        let mut node = NodeClient::new(&common.node.node)?;
        if post {
            node.token = Some(config.registry.admin_token.clone().context(
                "sharing and fetching blobs is the operator's: set AGORA_ADMIN_TOKEN (the node's <data-dir>/admin.token)",
            )?);
        }
        let answer = if post {
            node.post_json(&path, &serde_json::json!({})).await?
        } else {
            node.get_json(&path).await?
        };
        if common.json {
            println!("{answer}");
            return Ok(());
        }
        println!("{}", human(&self, &answer));
        Ok(())
    }
}

fn human(command: &P2pCommand, a: &Value) -> String {
    let text = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    match command {
        P2pCommand::Status(_) => {
            let mut out = format!(
                "peer {}\nlistening {}\npeers connected {}, gossip in {} out {} invalid {}, orders from peers {} rejected {} held {}",
                text(&a["peer_id"]),
                a["listening"]
                    .as_array()
                    .map(|l| l.iter().map(text).collect::<Vec<_>>().join(", "))
                    .unwrap_or_default(),
                a["peers_connected"],
                a["gossip_in"],
                a["gossip_out"],
                a["gossip_invalid"],
                a["orders_from_peers"],
                a["orders_rejected"],
                a["orders_held"],
            );
            for root in a["roots"].as_array().into_iter().flatten() {
                let verdict = match root["agrees"].as_bool() {
                    Some(true) => "agrees",
                    Some(false) => "DISAGREES",
                    None => "not compared yet",
                };
                out.push_str(&format!(
                    "\n  {} root at block {}: {verdict}",
                    text(&root["peer_id"]),
                    root["block"]
                ));
            }
            out
        }
        P2pCommand::Peers(_) => a["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                format!(
                    "{} {} {} latency {} score {}",
                    text(&p["peer_id"]),
                    if p["connected"] == true { "connected" } else { "gone" },
                    text(&p["agent"]),
                    p["latency_ms"].as_f64().map(|l| format!("{l:.1} ms")).unwrap_or_else(|| "?".into()),
                    p["score"].as_f64().map(|s| format!("{s:.1}")).unwrap_or_else(|| "?".into()),
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        P2pCommand::Share { .. } => {
            format!("sharing {} ({} bytes, {} chunks)", text(&a["blake3"]), a["size"], a["chunks"])
        }
        P2pCommand::Fetch { .. } if a["fetched"] == false => {
            format!("{} is already here", text(&a["blake3"]))
        }
        P2pCommand::Fetch { .. } => format!(
            "fetched {} ({} bytes) from {}{}",
            text(&a["blake3"]),
            a["size"],
            a["providers"]
                .as_array()
                .map(|p| p.iter().map(text).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            match a["corrupt"].as_array().filter(|c| !c.is_empty()) {
                Some(c) =>
                    format!("; corrupt chunks from {}", c.iter().map(text).collect::<Vec<_>>().join(", ")),
                None => String::new(),
            }
        ),
    }
}
