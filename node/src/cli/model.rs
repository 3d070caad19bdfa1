//! `agora model publish`: a seller's model from a file to an on-chain token in one command.
//!
//! 1. Signs in to the node with the seller's wallet (EIP-4361).
//! 2. Streams the file to `POST /api/v1/models/register` with a progress bar; the node keeps the
//!    original and records the watermark commitment.
//! 3. Sends `ModelRegistry.register(contentHash, metadataURI, splits)` — or `anchorVersion` for
//!    a new version of an existing token — from the seller's wallet, waits for the receipt,
//!    then for the node to index it.
//! 4. Prints the token id, the transaction, the version and the commitment.

use std::path::PathBuf;

use agora_contracts::ModelRegistry;
use alloy::primitives::{Address, B256, U256};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use crate::{client::NodeClient, config::Config};

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Upload a safetensors file to the node and register (or anchor a new version) on-chain.
    Publish(Box<PublishArgs>),
    /// Where each registry webhook stands: changes behind, deliveries, the last one and any
    /// being retried (operator: AGORA_ADMIN_TOKEN).
    Webhooks {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The node's API.
    #[arg(long = "node", env = "AGORA_NODE_URL", default_value = "http://127.0.0.1:8080")]
    pub node: String,
}

#[derive(Args, Debug)]
pub struct PublishArgs {
    /// The model file (.safetensors).
    pub file: PathBuf,
    /// Registry name [default: the file name without extension].
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value = "")]
    pub description: String,
    /// A royalty recipient and its share in basis points; repeat to split (shares sum to 10000)
    /// [default: all to the seller].
    #[arg(long = "split", value_name = "ADDR:BPS")]
    pub splits: Vec<String>,
    /// The token's metadata URI [default: the node's versions URL of the model].
    #[arg(long)]
    pub metadata_uri: Option<String>,
    /// Anchor a new version of this token instead of registering a new model.
    #[arg(long = "model", value_name = "TOKEN_ID")]
    pub token_id: Option<U256>,
    /// The model's config.json, kept next to the weights (what the builtin runtime reads to run
    /// it: an MLP's layers, or a BERT encoder's Hugging Face config); `--config` is the node's
    /// own TOML.
    #[arg(long = "model-config", value_name = "FILE")]
    pub model_config: Option<PathBuf>,
    /// The tokenizer.json of a text model, kept next to the weights.
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    #[command(flatten)]
    pub pay: super::market::PayArgs,
}

/// `ADDR:BPS`.
fn parse_split(text: &str) -> anyhow::Result<ModelRegistry::Split> {
    let (address, bps) =
        text.split_once(':').with_context(|| format!("--split {text:?}: expected ADDR:BPS"))?;
    let recipient: Address =
        address.parse().with_context(|| format!("--split {text:?}: {address:?} is not an address"))?;
    let bps: u16 =
        bps.parse().with_context(|| format!("--split {text:?}: {bps:?} is not a share in basis points"))?;
    if bps == 0 || bps > 10_000 {
        bail!("--split {text:?}: the share must be 1 to 10000 basis points");
    }
    Ok(ModelRegistry::Split { recipient, bps })
}

impl ModelCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::Publish(args) => publish(*args, config).await,
            Self::Webhooks { node, json } => {
                let mut client = NodeClient::new(&node.node)?;
                client.token = Some(config.registry.admin_token.clone().context(
                    "webhook status is the operator's: set AGORA_ADMIN_TOKEN (the node's <data-dir>/admin.token)",
                )?);
                let answer = client.get_json("/api/v1/registry/webhooks").await?;
                if json {
                    println!("{answer}")
                } else {
                    print!("{}", webhooks_text(&answer))
                }
                Ok(())
            }
        }
    }
}

/// A hook a paragraph: its URL and events, where it stands, its last delivery and any retry.
fn webhooks_text(view: &serde_json::Value) -> String {
    let hooks = view["hooks"].as_array().map(Vec::as_slice).unwrap_or_default();
    if hooks.is_empty() {
        return "no webhooks configured ([[registry.webhooks]])\n".into();
    }
    let attempt = |a: &serde_json::Value| {
        format!(
            "seq {} {} {} after {} attempt(s){}",
            a["seq"],
            a["kind"].as_str().unwrap_or("?"),
            a["outcome"].as_str().unwrap_or("?"),
            a["attempts"],
            a["error"].as_str().map(|e| format!(": {e}")).unwrap_or_default()
        )
    };
    let mut out = format!("outbox at seq {}\n", view["last_seq"]);
    for hook in hooks {
        let events = match hook["events"].as_array() {
            Some(e) if !e.is_empty() => e.iter().filter_map(|k| k.as_str()).collect::<Vec<_>>().join(", "),
            _ => "all events".into(),
        };
        out += &format!(
            "{} ({events}{})\n  next seq {}, {} behind; {} delivered, {} failed since start\n",
            hook["url"].as_str().unwrap_or("?"),
            if hook["signed"] == true { ", signed" } else { "" },
            hook["next_seq"],
            hook["behind"],
            hook["delivered"],
            hook["failed"],
        );
        if !hook["last"].is_null() {
            out += &format!("  last: {}\n", attempt(&hook["last"]));
        }
        if !hook["retrying"].is_null() {
            out += &format!("  retrying: {}\n", attempt(&hook["retrying"]));
        }
    }
    out
}

async fn publish(args: PublishArgs, config: &Config) -> anyhow::Result<()> {
    let size =
        std::fs::metadata(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?.len();
    let name = match &args.name {
        Some(name) => name.clone(),
        None => args.file.file_stem().map(|s| s.to_string_lossy().into_owned()).context("give --name")?,
    };
    let c = super::market::Connected::open(&args.pay.node, &args.pay.wallet, config, true)
        .await?
        .signed_in()
        .await?;
    let seller = c.signer.address();
    let splits = if args.splits.is_empty() {
        vec![ModelRegistry::Split { recipient: seller, bps: 10_000 }]
    } else {
        args.splits.iter().map(|s| parse_split(s)).collect::<anyhow::Result<Vec<_>>>()?
    };
    let total: u32 = splits.iter().map(|s| u32::from(s.bps)).sum();
    if total != 10_000 {
        bail!("the --split shares sum to {total} basis points; they must sum to 10000");
    }
    let mut beside = Vec::new();
    for (part, path) in [("config", &args.model_config), ("tokenizer", &args.tokenizer)] {
        if let Some(path) = path {
            beside.push((
                part,
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
            ));
        }
    }
    let (node, provider, registry_address) = (&c.node, &c.provider, c.registry);
    let version = upload(node, &args.file, size, &name, &args.description, beside, args.pay.json).await?;
    let blake3_hex = version["file"]["blake3"].as_str().context("the node's answer has no file hash")?;
    let content_hash: B256 = format!("0x{blake3_hex}").parse()?;
    let number = version["version"].as_u64().unwrap_or_default();

    let registry = ModelRegistry::new(registry_address, provider);
    let (token_id, receipt) = match args.token_id {
        Some(token_id) => {
            let receipt = registry
                .anchorVersion(token_id, content_hash)
                .send()
                .await
                .map_err(|e| super::market::refused("anchorVersion", e))?
                .get_receipt()
                .await?;
            (token_id, receipt)
        }
        None => {
            let uri = args
                .metadata_uri
                .clone()
                .unwrap_or_else(|| node.endpoint(&format!("/api/v1/models/{name}/versions")));
            let receipt = registry
                .register(content_hash, uri, splits)
                .send()
                .await
                .map_err(|e| super::market::refused("register", e))?
                .get_receipt()
                .await?;
            let token_id = receipt
                .decoded_log::<ModelRegistry::ModelRegistered>()
                .context("the receipt has no ModelRegistered event")?
                .tokenId;
            (token_id, receipt)
        }
    };
    if !receipt.status() {
        bail!("the transaction {} reverted", receipt.transaction_hash);
    }
    let anchored = receipt
        .decoded_log::<ModelRegistry::VersionAnchored>()
        .context("the receipt has no VersionAnchored event")?;

    // The node has it once its index has the block.
    c.wait_indexed(receipt.block_number).await?;
    let page = node.get_json(&format!("/api/v1/models/{name}/versions?limit=1000")).await?;
    let indexed = page["versions"]
        .as_array()
        .and_then(|vs| vs.iter().find(|v| v["version"].as_u64() == Some(number)))
        .cloned()
        .unwrap_or_default();
    let out = json!({
        "name": name,
        "token_id": token_id.to_string(),
        "tx": receipt.transaction_hash,
        "block": receipt.block_number,
        "chain_version": anchored.version,
        "registry_version": number,
        "blake3": blake3_hex,
        "commitment": version["commitment"],
        "anchored": indexed["anchored"],
    });
    if args.pay.json {
        println!("{out}");
    } else {
        println!("published {name} v{number}");
        println!("  token id     {token_id}");
        println!(
            "  on-chain     version {} in tx {} (block {})",
            anchored.version,
            receipt.transaction_hash,
            receipt.block_number.unwrap_or_default()
        );
        println!("  blake3       {blake3_hex}");
        println!("  commitment   {}", version["commitment"].as_str().unwrap_or("-"));
    }
    Ok(())
}

/// Streams the file to the node's register endpoint with a progress bar on stderr.
async fn upload(
    node: &NodeClient,
    file: &std::path::Path,
    size: u64,
    name: &str,
    description: &str,
    beside: Vec<(&'static str, Vec<u8>)>,
    quiet: bool,
) -> anyhow::Result<Value> {
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(size) };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "uploading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let reader =
        tokio::fs::File::open(file).await.with_context(|| format!("cannot open {}", file.display()))?;
    let progress = bar.clone();
    let chunks = futures::stream::unfold(reader, move |mut reader| {
        let progress = progress.clone();
        async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            match reader.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    progress.inc(n as u64);
                    Some((Ok::<_, std::io::Error>(buf), reader))
                }
                Err(e) => Some((Err(e), reader)),
            }
        }
    });
    let file_name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model.safetensors".into());
    let part = reqwest::multipart::Part::stream_with_length(reqwest::Body::wrap_stream(chunks), size)
        .file_name(file_name);
    let mut form = reqwest::multipart::Form::new()
        .text("metadata", json!({"name": name, "description": description}).to_string())
        .part("artifact", part);
    for (name, bytes) in beside {
        form = form.part(name, reqwest::multipart::Part::bytes(bytes));
    }
    let response = node
        .authorize(node.http.post(node.endpoint("/api/v1/models/register")).multipart(form))
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {}", node.url))?;
    bar.finish_and_clear();
    crate::client::answer(response).await.context("the node refused the upload")
}
