//! `agora dev`: a local chain (anvil, state kept under the data dir), the contracts deployed
//! on it once, and a node against it. Running it again reuses the chain and the deployment.

use std::{net::TcpListener, path::Path, time::Duration};

use agora_contracts::{DeployParams, Deployment, anvil::Anvil, deploy, missing_code};
use alloy::{
    network::EthereumWallet,
    providers::{Provider, ProviderBuilder},
};
use anyhow::Context;
use clap::Args;
use metrics_exporter_prometheus::PrometheusHandle;

use super::contracts::write_deployment;
use crate::{config::Config, node};

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Port for the local chain; 8545 when free, else any free port.
    #[arg(long)]
    pub chain_port: Option<u16>,
}

pub async fn run(mut config: Config, args: DevArgs, metrics: PrometheusHandle) -> anyhow::Result<()> {
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
    let state = data_dir.join("anvil-state.json");

    let port = args.chain_port.unwrap_or_else(|| if port_is_free(8545) { 8545 } else { 0 });
    let anvil = Anvil::builder()
        .port(port)
        .arg("--state")
        .arg(state.display().to_string())
        .arg("--state-interval")
        .arg("5")
        .spawn()?;
    config.chain.rpc_url = anvil.endpoint();

    let deployment_path = config.deployment_path();
    let result = async {
        let deployment = ensure_deployment(&anvil, &deployment_path, &data_dir).await?;
        print_banner(&anvil, &config, &deployment);
        node::run(config, metrics, node::shutdown_on_signals()).await
    }
    .await;

    // SIGTERM lets anvil write its state file before it exits.
    anvil.terminate(Duration::from_secs(10));
    result
}

/// Reuses the deployment in `path` when its contracts are on this chain; deploys otherwise.
async fn ensure_deployment(anvil: &Anvil, path: &Path, data_dir: &Path) -> anyhow::Result<Deployment> {
    let signer = anvil.signer(0);
    let deployer = signer.address();
    let provider =
        ProviderBuilder::new().wallet(EthereumWallet::from(signer)).connect(&anvil.endpoint()).await?;

    if let Ok(existing) = Deployment::load(path)
        && existing.chain_id == provider.get_chain_id().await?
        && missing_code(&provider, &existing).await?.is_empty()
    {
        println!("reusing the deployment in {}", path.display());
        return Ok(existing);
    }

    let deployment = deploy(
        provider,
        DeployParams { treasury: deployer, fee_bps: 250, challenge_window: 86_400, compute_grace: 3_600 },
    )
    .await?;
    write_deployment(path, &serde_json::to_string_pretty(&deployment)?)?;
    // An index of a chain that no longer exists must not be mixed with the new one.
    let db = data_dir.join("db");
    if db.exists() {
        let stale = data_dir.join(format!("db.stale-{}", unix_secs()));
        std::fs::rename(&db, &stale).with_context(|| format!("cannot move {} aside", db.display()))?;
        println!("the chain was new: moved the old index to {}", stale.display());
    }
    println!("deployed the contracts; wrote {}", path.display());
    Ok(deployment)
}

fn print_banner(anvil: &Anvil, config: &Config, deployment: &Deployment) {
    println!();
    println!("local chain     {} (chain id {})", anvil.endpoint(), deployment.chain_id);
    println!("ModelRegistry   {}", deployment.model_registry);
    println!("LicenseMarket   {}", deployment.license_market);
    println!("node API        http://{}", config.http.addr);
    println!("data            {}", config.storage.data_dir.display());
    println!();
    println!("dev accounts (10 000 ETH each; public keys, never use them on a real chain):");
    for i in 0..agora_contracts::anvil::DEV_KEYS.len() {
        let signer = anvil.signer(i);
        println!("  ({i}) {}  {}", signer.address(), agora_contracts::anvil::DEV_KEYS[i]);
    }
    println!();
    println!(
        "Ctrl-C stops the node and the chain; the chain's state is kept in {}/anvil-state.json",
        config.storage.data_dir.display()
    );
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
