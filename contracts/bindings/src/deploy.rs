use std::path::Path;

use alloy::{
    network::{Network, ReceiptResponse},
    primitives::Address,
    providers::Provider,
};
use serde::{Deserialize, Serialize};

use crate::{ComputeMarket, LicenseMarket, ModelRegistry};

/// Deployment parameters fixed for the market's lifetime.
#[derive(Clone, Debug)]
pub struct DeployParams {
    /// Receives the platform fee.
    pub treasury: Address,
    /// Platform fee in basis points, at most 1 000 (10 %).
    pub fee_bps: u16,
    /// Seconds between a usage license's close request and its close.
    pub challenge_window: u64,
    /// ComputeMarket's grace: how long a provider has to confirm after a reservation's
    /// start and to claim after its end, and how long a report waits before it is final.
    pub compute_grace: u64,
}

impl Default for DeployParams {
    fn default() -> Self {
        Self { treasury: Address::ZERO, fee_bps: 250, challenge_window: 86_400, compute_grace: 3_600 }
    }
}

/// Where the contracts live: the file `agora contracts deploy` prints and nodes read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub chain_id: u64,
    pub model_registry: Address,
    pub license_market: Address,
    /// The block of the first deployment transaction: indexers start here.
    pub deployment_block: u64,
    pub treasury: Address,
    pub fee_bps: u16,
    pub challenge_window: u64,
    /// ComputeMarket (zero in deployment files written before it existed: compute brokering
    /// is then off).
    #[serde(default)]
    pub compute_market: Address,
    #[serde(default)]
    pub compute_grace: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error("fee of {0} bps is above the market's maximum of 1000 (10%)")]
    FeeTooHigh(u16),
    #[error("the treasury address must not be zero")]
    ZeroTreasury,
    #[error("chain RPC failed: {0}")]
    Rpc(#[from] alloy::transports::TransportError),
    #[error("contract call failed: {0}")]
    Contract(#[from] alloy::contract::Error),
    #[error("transaction failed: {0}")]
    Pending(#[from] alloy::providers::PendingTransactionError),
    #[error("the {0} deployment transaction reverted")]
    Reverted(&'static str),
    #[error("cannot read deployment file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("deployment file {path} is not valid: {source}")]
    Parse { path: String, source: serde_json::Error },
}

impl Deployment {
    /// Whether the deployment includes ComputeMarket.
    pub fn has_compute(&self) -> bool {
        !self.compute_market.is_zero()
    }

    pub fn load(path: &Path) -> Result<Self, DeployError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| DeployError::Read { path: path.display().to_string(), source })?;
        serde_json::from_str(&text)
            .map_err(|source| DeployError::Parse { path: path.display().to_string(), source })
    }
}

/// Deploys ModelRegistry, LicenseMarket and ComputeMarket from the provider's default sender,
/// and binds the market to the registry. Waits for each receipt.
pub async fn deploy<P, N>(provider: P, params: DeployParams) -> Result<Deployment, DeployError>
where
    P: Provider<N> + Clone,
    N: Network,
{
    if params.fee_bps > 1_000 {
        return Err(DeployError::FeeTooHigh(params.fee_bps));
    }
    if params.treasury.is_zero() {
        return Err(DeployError::ZeroTreasury);
    }
    let chain_id = provider.get_chain_id().await?;

    let receipt = ModelRegistry::deploy_builder(provider.clone()).send().await?.get_receipt().await?;
    let registry = receipt.contract_address().ok_or(DeployError::Reverted("ModelRegistry"))?;
    let deployment_block = receipt.block_number().ok_or(DeployError::Reverted("ModelRegistry"))?;

    let receipt = LicenseMarket::deploy_builder(
        provider.clone(),
        registry,
        params.treasury,
        params.fee_bps,
        params.challenge_window,
    )
    .send()
    .await?
    .get_receipt()
    .await?;
    let market = receipt.contract_address().ok_or(DeployError::Reverted("LicenseMarket"))?;

    let receipt =
        ModelRegistry::new(registry, provider.clone()).bindMarket(market).send().await?.get_receipt().await?;
    if !receipt.status() {
        return Err(DeployError::Reverted("bindMarket"));
    }

    let receipt = ComputeMarket::deploy_builder(provider.clone(), params.compute_grace)
        .send()
        .await?
        .get_receipt()
        .await?;
    let compute = receipt.contract_address().ok_or(DeployError::Reverted("ComputeMarket"))?;

    Ok(Deployment {
        chain_id,
        model_registry: registry,
        license_market: market,
        deployment_block,
        treasury: params.treasury,
        fee_bps: params.fee_bps,
        challenge_window: params.challenge_window,
        compute_market: compute,
        compute_grace: params.compute_grace,
    })
}

/// The contracts of `deployment` that have no code on the chain (empty when all are there).
pub async fn missing_code<P, N>(
    provider: &P,
    deployment: &Deployment,
) -> Result<Vec<(&'static str, Address)>, DeployError>
where
    P: Provider<N>,
    N: Network,
{
    let mut missing = Vec::new();
    let mut contracts =
        vec![("ModelRegistry", deployment.model_registry), ("LicenseMarket", deployment.license_market)];
    if deployment.has_compute() {
        contracts.push(("ComputeMarket", deployment.compute_market));
    }
    for (name, address) in contracts {
        if provider.get_code_at(address).await?.is_empty() {
            missing.push((name, address));
        }
    }
    Ok(missing)
}
