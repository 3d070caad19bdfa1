//! The `agora` command line, grouped by who uses it. Every command reads the same
//! configuration (flags > `AGORA_*` environment > `--config` TOML > defaults).

mod artifacts;
mod audit;
mod compute;
mod contracts;
mod deploy;
mod dev;
pub mod index;
mod market;
mod model;
mod p2p;
mod runs;
mod wallet;
mod watermark;

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ConfigArgs},
    node, telemetry,
};

#[derive(Parser, Debug)]
#[command(
    name = "agora",
    version,
    about = "Agora: a marketplace node for machine-learning models on an EVM chain"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a node: index the chain, serve the API.
    Node(NodeArgs),
    /// Run a local chain with the contracts deployed and a node on it (what scripts/dev runs).
    Dev(dev::DevArgs),
    /// Deploy and inspect the contracts.
    #[command(subcommand)]
    Contracts(contracts::ContractsCommand),
    /// Inspect and rebuild the chain index.
    #[command(subcommand)]
    Index(index::IndexCommand),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Maintain the artifact store (the node must be stopped).
    #[command(subcommand)]
    Artifacts(artifacts::ArtifactsCommand),
    /// Sell and browse: list signed orders, cancel them, earnings, withdrawals.
    #[command(subcommand)]
    Market(market::MarketCommand),
    /// Buy licenses and see yours.
    #[command(subcommand)]
    License(market::LicenseCommand),
    /// Deployments: create, status, predict (signing usage vouchers).
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Publish models: upload to the node, register on-chain.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Wallets: encrypted keystore files (Web3 Secret Storage).
    #[command(subcommand)]
    Wallet(wallet::WalletCommand),
    /// The node's peers, and blobs shared with and fetched from them.
    #[command(subcommand)]
    P2p(p2p::P2pCommand),
    /// Experiments and runs (MLflow's tracking): list, show, compare.
    #[command(subcommand)]
    Runs(runs::RunsCommand),
    /// Compute offers: list what the node knows, offer GPU capacity as a provider.
    #[command(subcommand)]
    Compute(compute::ComputeCommand),
    /// Mark model files and check marks: keys, embed, verify, trace.
    #[command(subcommand)]
    Watermark(watermark::WatermarkCommand),
}

#[derive(clap::Args, Debug)]
pub struct NodeArgs {
    /// Print the effective configuration (secrets masked) and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Print the node's libp2p peer id (from its node key, created if missing) and exit.
    #[arg(long)]
    pub print_peer_id: bool,
}

impl Cli {
    pub async fn run(self) -> anyhow::Result<()> {
        let config = Config::load(&self.config)?;
        match self.command {
            Command::Node(args) => {
                if args.print_config {
                    print!("{}", config.to_masked_toml());
                    return Ok(());
                }
                if args.print_peer_id {
                    std::fs::create_dir_all(&config.storage.data_dir)?;
                    let key = crate::secrets::load_or_create_key(&config.node_key_path())?;
                    println!("{}", crate::p2p::net::keypair(key)?.public().to_peer_id());
                    return Ok(());
                }
                telemetry::init_tracing(&config.log)?;
                let metrics = telemetry::init_metrics()?;
                node::run(config, metrics, node::shutdown_on_signals()).await
            }
            Command::Dev(args) => {
                telemetry::init_tracing(&config.log)?;
                let metrics = telemetry::init_metrics()?;
                dev::run(config, args, metrics).await
            }
            Command::Contracts(command) => command.run(&config).await,
            Command::Audit(audit::AuditCommand::File(args)) => audit::file(args, &config).await,
            Command::Audit(command) => tokio::task::spawn_blocking(move || command.run(&config)).await?,
            Command::Artifacts(command) => command.run(config).await,
            Command::Watermark(command) => tokio::task::spawn_blocking(move || command.run()).await?,
            Command::Model(command) => command.run(&config).await,
            Command::Deploy(command) => command.run(&config).await,
            Command::P2p(command) => command.run(&config).await,
            Command::Compute(command) => command.run().await,
            Command::Runs(command) => command.run(&config).await,
            Command::Market(command) => command.run(&config).await,
            Command::License(command) => command.run(&config).await,
            Command::Wallet(command) => tokio::task::spawn_blocking(move || command.run()).await?,
            Command::Index(command) => {
                telemetry::init_tracing(&crate::config::LogConfig {
                    filter: "warn".into(),
                    ..config.log.clone()
                })?;
                command.run(&config, self.config.data_dir.is_some()).await
            }
        }
    }
}
