//! `agora market …` (sellers and browsers) and `agora license …` (buyers): orders signed and
//! transactions sent from the user's own wallet; the node checks, stores, indexes and serves.

use std::time::Duration;

use agora_contracts::{LicenseMarket, TermKind, order_domain};
use alloy::{
    network::EthereumWallet,
    primitives::{Address, B256, U256, utils::format_ether},
    providers::{DynProvider, Provider, ProviderBuilder},
    signers::{Signer, local::PrivateKeySigner},
    sol_types::SolStruct,
};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{model::NodeArgs, wallet::WalletArgs};
use crate::{
    client::NodeClient,
    config::Config,
    market::orders::{OrderJson, TermJson},
};

/// A wallet, the node it talks to and the chain both are on.
pub struct Connected {
    pub node: NodeClient,
    pub signer: PrivateKeySigner,
    pub provider: DynProvider,
    pub chain_id: u64,
    pub registry: Address,
    pub market: Address,
}

impl Connected {
    /// Checks that the RPC and the node agree on the chain, and that the wallet can pay gas
    /// when `paying`.
    pub async fn open(
        node: &NodeArgs,
        wallet: &WalletArgs,
        config: &Config,
        paying: bool,
    ) -> anyhow::Result<Self> {
        let signer = wallet.signer()?;
        let node = NodeClient::new(&node.node)?;
        let status = node.get_json("/api/v1/chain/status").await?;
        let address = |key: &str| -> anyhow::Result<Address> {
            status[key]
                .as_str()
                .and_then(|a| a.parse().ok())
                .with_context(|| format!("the node did not say its {key}"))
        };
        let (registry, market) = (address("model_registry")?, address("license_market")?);
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(signer.clone()))
            .connect(&config.chain.rpc_url)
            .await
            .with_context(|| {
                format!("cannot connect to the chain at {}", crate::config::mask_url(&config.chain.rpc_url))
            })?
            .erased();
        let chain_id =
            provider.get_chain_id().await.context("the chain RPC is not reachable (AGORA_RPC_URL)")?;
        if Some(chain_id) != status["chain_id"].as_u64() {
            bail!("the RPC serves chain {chain_id} but the node indexes chain {}", status["chain_id"]);
        }
        if paying && provider.get_balance(signer.address()).await?.is_zero() {
            bail!("the wallet {} has no funds on chain {chain_id} to pay for gas", signer.address());
        }
        Ok(Self { node, signer, provider, chain_id, registry, market })
    }

    /// Waits until the node has indexed `block` (so what the user does next sees the change).
    pub async fn wait_indexed(&self, block: Option<u64>) -> anyhow::Result<()> {
        let Some(block) = block else { return Ok(()) };
        let indexed = async {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tick.tick().await;
                let status = self.node.get_json("/api/v1/chain/status").await?;
                if status["indexed_block"].as_u64().is_some_and(|b| b >= block) {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(120), indexed).await {
            Ok(result) => result,
            Err(_) => bail!(
                "the transaction is in block {block} but the node has not indexed it after 120 s; check `GET /api/v1/chain/status`"
            ),
        }
    }

    pub async fn signed_in(mut self) -> anyhow::Result<Self> {
        self.node.sign_in(&self.signer).await.context("signing in to the node failed")?;
        Ok(self)
    }
}

/// A contract call the chain refused, with the contract's error decoded when it is one of ours.
pub fn refused(what: &str, e: alloy::contract::Error) -> anyhow::Error {
    if let Some(decoded) = e.as_decoded_interface_error::<LicenseMarket::LicenseMarketErrors>() {
        return anyhow::anyhow!("{what} was refused by the market contract: {decoded:?}");
    }
    if let Some(decoded) =
        e.as_decoded_interface_error::<agora_contracts::ModelRegistry::ModelRegistryErrors>()
    {
        return anyhow::anyhow!("{what} was refused by the registry contract: {decoded:?}");
    }
    anyhow::anyhow!("{what} was refused: {e}")
}

/// `0.5eth`, `20gwei`, `1000wei` or plain wei.
pub fn parse_amount(text: &str) -> anyhow::Result<U256> {
    let lower = text.trim().to_ascii_lowercase();
    let (number, unit) = ["ether", "eth", "gwei", "wei"]
        .iter()
        .find_map(|unit| lower.strip_suffix(unit).map(|n| (n.trim().to_owned(), *unit)))
        .unwrap_or((lower.clone(), "wei"));
    let unit = if unit == "eth" { "ether" } else { unit };
    alloy::primitives::utils::parse_units(&number, unit)
        .map(Into::into)
        .map_err(|e| anyhow::anyhow!("{text:?} is not an amount like 0.5eth, 20gwei or 1000wei: {e}"))
}

/// `30d`, `12h`, `90m`, `3600s` or plain seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (number, scale) = match t.chars().last() {
        Some('d') => (&t[..t.len() - 1], 86_400),
        Some('h') => (&t[..t.len() - 1], 3_600),
        Some('m') => (&t[..t.len() - 1], 60),
        Some('s') => (&t[..t.len() - 1], 1),
        _ => (t, 1),
    };
    let n: u64 =
        number.parse().map_err(|_| anyhow::anyhow!("{text:?} is not a duration like 30d, 12h or 3600s"))?;
    n.checked_mul(scale)
        .filter(|s| *s > 0)
        .ok_or_else(|| anyhow::anyhow!("{text:?} is not a positive duration"))
}

fn eth(wei: &str) -> String {
    wei.parse::<U256>().map(|w| format!("{} ETH", format_ether(w))).unwrap_or_else(|_| wei.to_owned())
}

#[derive(Subcommand, Debug)]
pub enum MarketCommand {
    /// Sign an order for a token you own and list it on the node.
    List(ListArgs),
    /// Listings on the node, as a table (or JSON).
    Browse(BrowseArgs),
    /// Cancel one order on-chain, or all of yours (`--all` bumps your order nonce).
    Cancel(CancelArgs),
    /// What an address has earned, withdrawn and can withdraw.
    Earnings(EarningsArgs),
    /// Distribute what your models earned and withdraw your balance.
    Withdraw(PayArgs),
}

#[derive(Args, Debug)]
pub struct PayArgs {
    #[command(flatten)]
    pub wallet: WalletArgs,
    #[command(flatten)]
    pub node: NodeArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    pub token_id: U256,
    /// A perpetual license at PRICE (e.g. 0.5eth).
    #[arg(long, value_name = "PRICE")]
    pub perpetual: Option<String>,
    /// A timed license: DURATION:PRICE (e.g. 30d:0.05eth); repeatable.
    #[arg(long, value_name = "DURATION:PRICE")]
    pub timed: Vec<String>,
    /// A usage license: UNIT_PRICE:MAX_UNITS (e.g. 0.0001eth:100000); repeatable.
    #[arg(long, value_name = "UNIT_PRICE:UNITS")]
    pub usage: Vec<String>,
    /// How long the order stays valid.
    #[arg(long, default_value = "90d")]
    pub expires: String,
    #[command(flatten)]
    pub pay: PayArgs,
}

#[derive(Args, Debug)]
pub struct BrowseArgs {
    /// Text in the model's metadata URI.
    #[arg(long)]
    pub query: Option<String>,
    /// Only terms at or below this price (per unit for usage terms).
    #[arg(long)]
    pub max_price: Option<String>,
    #[arg(long, value_parser = ["perpetual", "timed", "usage"])]
    pub kind: Option<String>,
    #[command(flatten)]
    pub node: NodeArgs,
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CancelArgs {
    pub order_hash: Option<B256>,
    #[arg(long, conflicts_with = "order_hash")]
    pub all: bool,
    #[command(flatten)]
    pub pay: PayArgs,
}

#[derive(Args, Debug)]
pub struct EarningsArgs {
    /// [default: your wallet's address]
    #[arg(long)]
    pub address: Option<Address>,
    #[command(flatten)]
    pub pay: PayArgs,
}

impl MarketCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::List(args) => list(args, config).await,
            Self::Browse(args) => browse(args).await,
            Self::Cancel(args) => cancel(args, config).await,
            Self::Earnings(args) => earnings(args).await,
            Self::Withdraw(args) => withdraw(args, config).await,
        }
    }
}

fn terms(args: &ListArgs) -> anyhow::Result<Vec<TermJson>> {
    let mut terms = Vec::new();
    if let Some(price) = &args.perpetual {
        terms.push(TermJson {
            kind: TermKind::Perpetual,
            price: parse_amount(price)?.to_string(),
            duration: 0,
            unit_price: String::new(),
            max_units: String::new(),
        });
    }
    for timed in &args.timed {
        let (duration, price) =
            timed.split_once(':').with_context(|| format!("--timed {timed:?}: expected DURATION:PRICE"))?;
        terms.push(TermJson {
            kind: TermKind::Timed,
            price: parse_amount(price)?.to_string(),
            duration: parse_duration(duration)?,
            unit_price: String::new(),
            max_units: String::new(),
        });
    }
    for usage in &args.usage {
        let (unit, units) =
            usage.split_once(':').with_context(|| format!("--usage {usage:?}: expected UNIT_PRICE:UNITS"))?;
        let units: U256 = units
            .parse()
            .with_context(|| format!("--usage {usage:?}: {units:?} is not a number of units"))?;
        terms.push(TermJson {
            kind: TermKind::Usage,
            price: String::new(),
            duration: 0,
            unit_price: parse_amount(unit)?.to_string(),
            max_units: units.to_string(),
        });
    }
    if terms.is_empty() {
        bail!("give at least one of --perpetual, --timed, --usage");
    }
    Ok(terms)
}

async fn list(args: ListArgs, config: &Config) -> anyhow::Result<()> {
    let terms = terms(&args)?;
    let expires_in = parse_duration(&args.expires)?;
    let c = Connected::open(&args.pay.node, &args.pay.wallet, config, false).await?;
    let market = LicenseMarket::new(c.market, &c.provider);
    let nonce = market
        .nonces(c.signer.address())
        .call()
        .await
        .context("cannot read your order nonce from the chain")?;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let json_order = OrderJson {
        seller: c.signer.address(),
        token_id: args.token_id.to_string(),
        terms,
        nonce: nonce.to_string(),
        expiry: now + expires_in,
    };
    let order = json_order.to_order()?;
    let hash = order.eip712_signing_hash(&order_domain(c.chain_id, c.market));
    let signature = c.signer.sign_hash(&hash).await?;
    let answer = c
        .node
        .post_json(
            "/api/v1/marketplace/list",
            &json!({"order": json_order, "signature": signature.to_string()}),
        )
        .await
        .context("the node refused the order")?;
    if args.pay.json {
        println!("{answer}");
    } else {
        println!("listed token {} as order {}", args.token_id, answer["order_hash"].as_str().unwrap_or("?"));
    }
    Ok(())
}

async fn browse(args: BrowseArgs) -> anyhow::Result<()> {
    let node = NodeClient::new(&args.node.node)?;
    let max = args.max_price.as_deref().map(parse_amount).transpose()?;
    let mut rows = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = "/api/v1/marketplace/models?limit=100".to_owned();
        if let Some(q) = &args.query {
            path.push_str(&format!(
                "&q={}",
                url::form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
            ));
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = node.get_json(&path).await?;
        for model in page["models"].as_array().cloned().unwrap_or_default() {
            for order in model["active_orders"].as_array().cloned().unwrap_or_default() {
                for (index, term) in
                    order["order"]["terms"].as_array().cloned().unwrap_or_default().into_iter().enumerate()
                {
                    let kind = term["kind"].as_str().unwrap_or("?").to_owned();
                    if args.kind.as_ref().is_some_and(|k| *k != kind) {
                        continue;
                    }
                    let price_field = if kind == "usage" { "unit_price" } else { "price" };
                    let price: U256 =
                        term[price_field].as_str().and_then(|p| p.parse().ok()).unwrap_or_default();
                    if max.is_some_and(|m| price > m) {
                        continue;
                    }
                    rows.push(json!({
                        "token_id": model["token_id"],
                        "seller": order["order"]["seller"],
                        "versions": model["version_count"],
                        "order_hash": order["order_hash"],
                        "term_index": index,
                        "kind": kind,
                        "price_wei": price.to_string(),
                        "duration": term["duration"],
                        "max_units": term["max_units"],
                        "metadata_uri": model["metadata_uri"],
                    }));
                }
            }
        }
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    if args.json {
        println!("{}", Value::Array(rows));
        return Ok(());
    }
    if rows.is_empty() {
        println!("no listings match");
        return Ok(());
    }
    println!(
        "{:<6} {:<10} {:>18}  {:<10} {:<4} {:<44} seller",
        "token", "kind", "price", "term", "v", "order"
    );
    for r in rows {
        let term = match r["kind"].as_str() {
            Some("timed") => format!("{}d", r["duration"].as_u64().unwrap_or(0) / 86_400),
            Some("usage") => format!("≤{} units", r["max_units"].as_str().unwrap_or("?")),
            _ => "forever".into(),
        };
        let price = eth(r["price_wei"].as_str().unwrap_or("0"));
        let price = if r["kind"] == "usage" { format!("{price}/unit") } else { price };
        println!(
            "{:<6} {:<10} {:>18}  {:<10} {:<4} {} {}",
            r["token_id"].as_str().unwrap_or("?"),
            r["kind"].as_str().unwrap_or("?"),
            price,
            term,
            r["versions"],
            r["order_hash"].as_str().unwrap_or("?"),
            r["seller"].as_str().unwrap_or("?"),
        );
    }
    Ok(())
}

async fn cancel(args: CancelArgs, config: &Config) -> anyhow::Result<()> {
    let c = Connected::open(&args.pay.node, &args.pay.wallet, config, true).await?;
    let market = LicenseMarket::new(c.market, &c.provider);
    let receipt = if args.all {
        market.bumpNonce().send().await.map_err(|e| refused("bumpNonce", e))?.get_receipt().await?
    } else {
        let hash = args.order_hash.context("give ORDER_HASH or --all")?;
        let order = c.node.get_json(&format!("/api/v1/marketplace/orders/{hash}")).await?;
        let order: OrderJson =
            serde_json::from_value(order["order"].clone()).context("the node's order is not readable")?;
        market.cancel(order.to_order()?).send().await.map_err(|e| refused("cancel", e))?.get_receipt().await?
    };
    if !receipt.status() {
        bail!("the transaction {} reverted", receipt.transaction_hash);
    }
    c.wait_indexed(receipt.block_number).await?;
    let out = json!({"tx": receipt.transaction_hash, "block": receipt.block_number, "all": args.all});
    if args.pay.json {
        println!("{out}");
    } else if args.all {
        println!("every order of {} is void (tx {})", c.signer.address(), receipt.transaction_hash);
    } else {
        println!("cancelled (tx {})", receipt.transaction_hash);
    }
    Ok(())
}

async fn earnings(args: EarningsArgs) -> anyhow::Result<()> {
    let address = match args.address {
        Some(a) => a,
        None => args.pay.wallet.address()?,
    };
    let node = NodeClient::new(&args.pay.node.node)?;
    let answer = node.get_json(&format!("/api/v1/marketplace/earnings?address={address}")).await?;
    if args.pay.json {
        println!("{answer}");
        return Ok(());
    }
    let e = &answer["earnings"];
    let field = |k: &str| eth(e[k].as_str().unwrap_or("0"));
    println!("earnings of {address} (as of block {})", answer["as_of"]["block"]);
    for key in ["royalties", "fees", "refunds", "credited", "withdrawn", "withdrawable", "pending"] {
        println!("  {key:<13} {}", field(key));
    }
    for m in e["per_model"].as_array().cloned().unwrap_or_default() {
        println!(
            "  token {:<6} credited {}  pending {}  share {} bps",
            m["token_id"].as_str().unwrap_or("?"),
            eth(m["credited"].as_str().unwrap_or("0")),
            eth(m["pending"].as_str().unwrap_or("0")),
            m["bps"]
        );
    }
    Ok(())
}

async fn withdraw(args: PayArgs, config: &Config) -> anyhow::Result<()> {
    let c = Connected::open(&args.node, &args.wallet, config, true).await?;
    let address = c.signer.address();
    let answer = c.node.get_json(&format!("/api/v1/marketplace/earnings?address={address}")).await?;
    let e = &answer["earnings"];
    let pending: Vec<U256> = e["per_model"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|m| m["pending"].as_str().is_some_and(|p| p != "0"))
        .filter_map(|m| m["token_id"].as_str().and_then(|t| t.parse().ok()))
        .collect();
    let withdrawable: U256 = e["withdrawable"].as_str().and_then(|w| w.parse().ok()).unwrap_or_default();
    if pending.is_empty() && withdrawable.is_zero() {
        bail!("{address} has nothing to withdraw (as of block {})", answer["as_of"]["block"]);
    }
    let market = LicenseMarket::new(c.market, &c.provider);
    let before = c.provider.get_balance(address).await?;
    let receipt = market
        .distributeAndWithdraw(pending.clone())
        .send()
        .await
        .map_err(|e| refused("the withdrawal", e))?
        .get_receipt()
        .await?;
    if !receipt.status() {
        bail!("the transaction {} reverted", receipt.transaction_hash);
    }
    c.wait_indexed(receipt.block_number).await?;
    let amount = receipt.decoded_log::<LicenseMarket::Withdrawn>().map(|w| w.amount).unwrap_or_default();
    let out = json!({"tx": receipt.transaction_hash, "amount": amount.to_string(), "distributed_models": pending.iter().map(U256::to_string).collect::<Vec<_>>(), "balance_before": before.to_string()});
    if args.json {
        println!("{out}");
    } else {
        println!("withdrew {} to {address} (tx {})", eth(&amount.to_string()), receipt.transaction_hash);
    }
    Ok(())
}

#[derive(Subcommand, Debug)]
pub enum LicenseCommand {
    /// Buy a term of an order from your wallet; waits for the node to index the license.
    Buy(BuyArgs),
    /// Your licenses.
    List(PayArgs),
    /// Download your fingerprinted copy (resumes a partial file; checks hash and the node's signature).
    Download(DownloadArgs),
    /// Close a usage license: the first run requests it, a run after the challenge window
    /// closes it and credits the unused escrow (collect it with `agora market withdraw`).
    Close {
        license_id: U256,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// The node's signed receipts of your usage license's calls, each signature checked.
    Receipts {
        license_id: U256,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// A usage license's metering at the node: units accepted, settled on-chain and pending,
    /// and why the node's settlement of it fails, while it does.
    Usage {
        license_id: U256,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
pub struct DownloadArgs {
    pub license_id: U256,
    /// Where to write the copy (a partial file there is resumed).
    #[arg(long, short)]
    pub output: std::path::PathBuf,
    #[command(flatten)]
    pub pay: PayArgs,
}

#[derive(Args, Debug)]
pub struct BuyArgs {
    pub order_hash: B256,
    #[arg(long, value_parser = ["perpetual", "timed", "usage"])]
    pub term: String,
    /// Usage terms: units to escrow.
    #[arg(long)]
    pub units: Option<String>,
    #[command(flatten)]
    pub pay: PayArgs,
}

impl LicenseCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::Buy(args) => buy(args, config).await,
            Self::List(args) => licenses(args).await,
            Self::Download(args) => download(args, config).await,
            Self::Receipts { license_id, pay } => receipts(license_id, pay, config).await,
            Self::Close { license_id, pay } => close(license_id, pay, config).await,
            Self::Usage { license_id, node, json } => usage(license_id, &node, json).await,
        }
    }
}

async fn buy(args: BuyArgs, config: &Config) -> anyhow::Result<()> {
    let c = Connected::open(&args.pay.node, &args.pay.wallet, config, true).await?;
    let buyer = c.signer.address();
    let mut request = json!({"order_hash": args.order_hash, "term": args.term, "from": buyer});
    if let Some(units) = &args.units {
        request["units"] = json!(units);
    }
    let tx = c
        .node
        .post_json("/api/v1/marketplace/purchase", &request)
        .await
        .context("the node cannot prepare this purchase")?;
    let to: Address =
        tx["to"].as_str().and_then(|t| t.parse().ok()).context("the node's transaction has no `to`")?;
    if to != c.market {
        bail!("the node asked to send to {to}, not the market {}", c.market);
    }
    let data = alloy::primitives::hex::decode(tx["data"].as_str().unwrap_or_default())?;
    let value: U256 = tx["value"].as_str().and_then(|v| v.parse().ok()).unwrap_or_default();
    if c.provider.get_balance(buyer).await? < value {
        bail!("the wallet {buyer} holds less than the {} this license costs", eth(&value.to_string()));
    }
    let mut request = alloy::rpc::types::TransactionRequest::default().to(to).value(value).input(data.into());
    if let Some(gas) = tx["gas"].as_u64() {
        request = request.gas_limit(gas + gas / 5);
    }
    let receipt = c
        .provider
        .send_transaction(request)
        .await
        .map_err(|e| refused("the purchase", alloy::contract::Error::TransportError(e)))?
        .get_receipt()
        .await?;
    if !receipt.status() {
        bail!("the purchase {} reverted", receipt.transaction_hash);
    }
    let license_id = match receipt.decoded_log::<LicenseMarket::LicensePurchased>() {
        Some(p) => p.licenseId,
        None => {
            receipt
                .decoded_log::<LicenseMarket::LicenseExtended>()
                .context("the receipt has no license event")?
                .licenseId
        }
    };
    c.wait_indexed(receipt.block_number).await?;
    let license = c.node.get_json(&format!("/api/v1/licenses/{license_id}")).await?;
    let out = json!({"license_id": license_id.to_string(), "tx": receipt.transaction_hash, "block": receipt.block_number, "license": license["license"]});
    if args.pay.json {
        println!("{out}");
    } else {
        println!(
            "license {license_id} ({}) for token {} (tx {})",
            args.term,
            license["license"]["token_id"].as_str().unwrap_or("?"),
            receipt.transaction_hash
        );
    }
    Ok(())
}

async fn licenses(args: PayArgs) -> anyhow::Result<()> {
    let address = args.wallet.address()?;
    let node = NodeClient::new(&args.node.node)?;
    let answer = node.get_json(&format!("/api/v1/licenses?holder={address}&limit=500")).await?;
    if args.json {
        println!("{answer}");
        return Ok(());
    }
    let list = answer["licenses"].as_array().cloned().unwrap_or_default();
    if list.is_empty() {
        println!("{address} holds no licenses");
    }
    for l in list {
        println!(
            "license {:<6} token {:<6} {:<10} active {}  expires {}",
            l["license_id"].as_str().unwrap_or("?"),
            l["token_id"].as_str().unwrap_or("?"),
            l["kind"].as_str().unwrap_or("?"),
            l["active"],
            l["expires_at"]
        );
    }
    Ok(())
}

async fn download(args: DownloadArgs, config: &Config) -> anyhow::Result<()> {
    use std::io::Write;
    let c = Connected::open(&args.pay.node, &args.pay.wallet, config, false).await?.signed_in().await?;
    let have = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    let mut request = c.node.authorize(
        c.node.http.get(c.node.endpoint(&format!("/api/v1/licenses/{}/download", args.license_id))),
    );
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let mut response =
        request.send().await.with_context(|| format!("cannot reach the node at {}", c.node.url))?;
    let status = response.status();
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
        // The file is already whole (or longer than the copy): the checks below decide.
    } else if !status.is_success() {
        return Err(crate::client::answer(response).await.unwrap_err());
    }
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut expected = header("agora-content-blake3");
    let mut signature = header("agora-delivery-signature");
    let mut node_key = header("agora-node-key");
    let (mut token_id, mut version) = (header("agora-token-id"), header("agora-version"));
    if status.is_success() {
        let append = status == reqwest::StatusCode::PARTIAL_CONTENT;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(&args.output)
            .with_context(|| format!("cannot write {}", args.output.display()))?;
        let total = response.content_length().map(|n| n + if append { have } else { 0 });
        let bar = if args.pay.json {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total.unwrap_or(0))
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "downloading {bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(if append { have } else { 0 });
        while let Some(chunk) =
            response.chunk().await.context("the download broke off; run the same command again to resume")?
        {
            file.write_all(&chunk)?;
            bar.inc(chunk.len() as u64);
        }
        file.sync_all()?;
        bar.finish_and_clear();
    }
    if expected.is_none() {
        // A copy streamed while it was made: its signed receipt is ready once it is whole.
        let receipt = delivery_receipt(&c.node, args.license_id).await?;
        let field = |name: &str| {
            receipt[name]
                .as_str()
                .map(str::to_owned)
                .or_else(|| receipt[name].as_u64().map(|n| n.to_string()))
        };
        (expected, signature, node_key) = (field("blake3"), field("signature"), field("node_key"));
        (token_id, version) = (field("token_id"), field("version"));
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(&args.output)?;
    let got = hasher.finalize().to_hex().to_string();
    let (Some(expected), Some(signature), Some(node_key), Some(token_id), Some(version)) =
        (expected, signature, node_key, token_id, version)
    else {
        bail!("the node's answer lacks the delivery headers");
    };
    if got != expected {
        bail!(
            "{} has blake3 {got}, the node served {expected}; delete it and download again",
            args.output.display()
        );
    }
    let verified = (|| {
        let key: [u8; 32] = alloy::primitives::hex::decode(&node_key).ok()?.try_into().ok()?;
        let sig: [u8; 64] = alloy::primitives::hex::decode(&signature).ok()?.try_into().ok()?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&key).ok()?;
        let hash: [u8; 32] = alloy::primitives::hex::decode(&expected).ok()?.try_into().ok()?;
        let message = crate::market::delivery::signed_bytes(
            args.license_id,
            token_id.parse().ok()?,
            version.parse().ok()?,
            &hash,
        );
        key.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&sig)).ok()
    })()
    .is_some();
    if !verified {
        bail!("the node's delivery signature does not verify");
    }
    let out = json!({"license_id": args.license_id.to_string(), "token_id": token_id, "version": version, "file": args.output, "blake3": got, "node_key": node_key, "signature": signature});
    if args.pay.json {
        println!("{out}");
    } else {
        println!(
            "{} ← license {} (token {token_id} v{version}), blake3 {got}, signed by node key {node_key}",
            args.output.display(),
            args.license_id
        );
    }
    Ok(())
}

/// The node's signed receipt for a license's copy, asking again while the copy is being made.
async fn delivery_receipt(node: &NodeClient, license_id: U256) -> anyhow::Result<serde_json::Value> {
    let path = format!("/api/v1/licenses/{license_id}/receipt");
    loop {
        let response = node
            .authorize(node.http.get(node.endpoint(&path)))
            .send()
            .await
            .with_context(|| format!("cannot reach the node at {}", node.url))?;
        if response.status() != reqwest::StatusCode::CONFLICT {
            return crate::client::answer(response).await;
        }
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if body["error"]["code"] != "copy_not_ready" {
            let message = body["error"]["message"].as_str().unwrap_or("no message");
            bail!("the node answered 409 Conflict: {message}");
        }
    }
}

async fn usage(license_id: U256, node: &NodeArgs, json_out: bool) -> anyhow::Result<()> {
    let client = crate::client::NodeClient::new(&node.node)?;
    let answer = client.get_json(&format!("/api/v1/licenses/{license_id}/usage")).await?;
    if json_out {
        println!("{answer}");
        return Ok(());
    }
    let units = |key: &str| answer[key].as_str().unwrap_or("?").to_owned();
    println!(
        "license {license_id}: {} units accepted, {} settled on-chain, {} pending",
        units("cumulative_units"),
        units("settled_units"),
        units("pending_units")
    );
    let failure = &answer["settlement_failure"];
    if !failure.is_null() {
        let next_in =
            failure["retry_ms"].as_u64().unwrap_or_default().saturating_sub(crate::registry::now_ms());
        println!(
            "settlement failing: {} attempts in a row, the last: {}; next attempt in {} s",
            failure["attempts"],
            failure["error"].as_str().unwrap_or("?"),
            next_in.div_ceil(1000)
        );
    }
    Ok(())
}

async fn receipts(license_id: U256, pay: PayArgs, config: &Config) -> anyhow::Result<()> {
    let c = Connected::open(&pay.node, &pay.wallet, config, false).await?.signed_in().await?;
    let answer = c.node.get_json(&format!("/api/v1/licenses/{license_id}/receipts")).await?;
    let key: [u8; 32] = alloy::primitives::hex::decode(answer["node_key"].as_str().unwrap_or_default())
        .ok()
        .and_then(|k| k.try_into().ok())
        .context("the node's key is not 32 bytes of hex")?;
    let key =
        ed25519_dalek::VerifyingKey::from_bytes(&key).context("the node's key is not an ed25519 key")?;
    let mut rows = Vec::new();
    for r in answer["receipts"].as_array().cloned().unwrap_or_default() {
        let cumulative: U256 = r["cumulative_units"]
            .as_str()
            .and_then(|v| v.parse().ok())
            .context("a receipt without a count")?;
        let request: [u8; 32] = alloy::primitives::hex::decode(r["request"].as_str().unwrap_or_default())
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("a receipt without a request hash")?;
        let time_ms = r["time_ms"].as_u64().unwrap_or_default();
        let signature: [u8; 64] = alloy::primitives::hex::decode(r["signature"].as_str().unwrap_or_default())
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("a receipt without a signature")?;
        let message = crate::serve::metering::receipt_bytes(license_id, cumulative, &request, time_ms);
        let valid = key.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&signature)).is_ok();
        rows.push(json!({"cumulative_units": cumulative.to_string(), "request": r["request"], "time_ms": time_ms, "signature": r["signature"], "valid": valid}));
    }
    let invalid = rows.iter().filter(|r| r["valid"] != true).count();
    if pay.json {
        println!(
            "{}",
            json!({"license_id": license_id.to_string(), "node_key": answer["node_key"], "receipts": rows, "invalid": invalid})
        );
    } else {
        println!(
            "{} receipts for license {license_id}, signed by node key {}",
            rows.len(),
            answer["node_key"].as_str().unwrap_or("?")
        );
        for r in &rows {
            println!(
                "  {:>10} units  {}  request {}  {}",
                r["cumulative_units"].as_str().unwrap_or("?"),
                r["time_ms"],
                r["request"].as_str().unwrap_or("?"),
                if r["valid"] == true { "valid" } else { "INVALID" }
            );
        }
    }
    if invalid > 0 {
        bail!("{invalid} receipts do not verify against the node's key");
    }
    Ok(())
}

async fn close(license_id: U256, pay: PayArgs, config: &Config) -> anyhow::Result<()> {
    let c = Connected::open(&pay.node, &pay.wallet, config, true).await?;
    let answer = c.node.get_json(&format!("/api/v1/licenses/{license_id}")).await?;
    let escrow = &answer["license"]["escrow"];
    if escrow.is_null() {
        bail!("license {license_id} is not a usage license: nothing to close");
    }
    if escrow["closed"] == true {
        bail!("license {license_id} is already closed");
    }
    let market = LicenseMarket::new(c.market, &c.provider);
    match escrow["closable_at"].as_u64() {
        None => {
            let receipt = market
                .requestClose(license_id)
                .send()
                .await
                .map_err(|e| refused("requestClose", e))?
                .get_receipt()
                .await?;
            c.wait_indexed(receipt.block_number).await?;
            let at = receipt
                .decoded_log::<LicenseMarket::CloseRequested>()
                .map(|e| e.closableAt)
                .unwrap_or_default();
            let out = json!({"license_id": license_id.to_string(), "requested": true, "closable_at": at, "tx": receipt.transaction_hash});
            if pay.json {
                println!("{out}");
            } else {
                println!(
                    "close of license {license_id} requested; run this again after {at} (unix seconds, chain time) to close it"
                );
            }
        }
        Some(at) => {
            let receipt =
                market.close(license_id).send().await.map_err(|e| refused("close", e))?.get_receipt().await?;
            c.wait_indexed(receipt.block_number).await?;
            let refund = receipt.decoded_log::<LicenseMarket::Closed>().map(|e| e.refund).unwrap_or_default();
            let out = json!({"license_id": license_id.to_string(), "closed": true, "refund": refund.to_string(), "closable_at": at, "tx": receipt.transaction_hash});
            if pay.json {
                println!("{out}");
            } else {
                println!(
                    "closed license {license_id}: {} of unused escrow credited; collect it with `agora market withdraw`",
                    eth(&refund.to_string())
                );
            }
        }
    }
    Ok(())
}
