//! `agora contracts …`: deploy the registry and the market.

use agora_contracts::{DeployParams, deploy};
use alloy::{
    network::EthereumWallet,
    primitives::Address,
    providers::{Provider, ProviderBuilder},
    signers::local::PrivateKeySigner,
};
use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::Config;

#[derive(Subcommand, Debug)]
pub enum ContractsCommand {
    /// Deploy ModelRegistry and LicenseMarket; prints the deployment JSON (the file nodes read).
    Deploy(DeployArgs),
}

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Deployer's private key (hex). Pays the gas.
    #[arg(long, env = "AGORA_PRIVATE_KEY", hide_env_values = true)]
    pub private_key: String,
    /// Receives the platform fee [default: the deployer].
    #[arg(long)]
    pub treasury: Option<Address>,
    /// Platform fee in basis points (at most 1000 = 10%).
    #[arg(long, default_value_t = 250)]
    pub fee_bps: u16,
    /// Seconds a usage license's close waits for late settlements.
    #[arg(long, default_value_t = 86_400)]
    pub challenge_window: u64,
    /// Seconds a compute provider has to confirm a reservation after its start and to claim
    /// after its end (also how long an unsigned report waits before it is final).
    #[arg(long, default_value_t = 3_600)]
    pub compute_grace: u64,
    /// Also write the deployment JSON to this file.
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
}

impl ContractsCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::Deploy(args) => {
                let signer: PrivateKeySigner = args
                    .private_key
                    .trim()
                    .parse()
                    .context("--private-key is not a valid hex private key")?;
                let deployer = signer.address();
                let provider = ProviderBuilder::new()
                    .wallet(EthereumWallet::from(signer))
                    .connect(&config.chain.rpc_url)
                    .await
                    .with_context(|| {
                        format!(
                            "cannot connect to the chain at {}",
                            crate::config::mask_url(&config.chain.rpc_url)
                        )
                    })?;
                let balance =
                    provider.get_balance(deployer).await.context("the chain RPC is not reachable")?;
                if balance.is_zero() {
                    anyhow::bail!("the deployer {deployer} has no funds on this chain to pay for gas");
                }
                let params = DeployParams {
                    treasury: args.treasury.unwrap_or(deployer),
                    fee_bps: args.fee_bps,
                    challenge_window: args.challenge_window,
                    compute_grace: args.compute_grace,
                };
                let deployment = deploy(provider, params).await?;
                let json = serde_json::to_string_pretty(&deployment)?;
                if let Some(path) = &args.output {
                    write_deployment(path, &json)?;
                }
                println!("{json}");
                Ok(())
            }
        }
    }
}

/// Writes the deployment file atomically (temp file, then rename).
pub fn write_deployment(path: &std::path::Path, json: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, format!("{json}\n")).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
