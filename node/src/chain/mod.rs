//! The node's link to the chain.
//!
//! - [`connect`]: the RPC provider (http(s) or ws(s)).
//! - [`ChainMonitor`]: keeps checking that the chain answers, is the deployment's chain and has
//!   code at the contract addresses; publishes a [`ChainHealth`] for `/readyz`.
//! - [`operator::Operator`]: the node's own wallet, which sends its transactions.
//! - [`indexer::Indexer`]: builds the node's view of models, licenses and money from the
//!   contracts' events alone ([`apply`]), with reorg rollback ([`writer`]'s undo records) and a
//!   state root ([`root`]) that two indexes at the same block can compare.
//!
//! A chain that is down or wrong makes the node unready, never makes it exit.

pub mod apply;
pub mod indexer;
pub mod operator;
pub mod root;
pub mod writer;

use std::time::Duration;

use agora_contracts::{Deployment, missing_code};
use alloy::{
    primitives::{Address, B256},
    providers::{DynProvider, Provider, ProviderBuilder},
};
use serde::Serialize;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("cannot connect to the chain at {url}: {source}; check AGORA_RPC_URL")]
    Connect { url: String, source: alloy::transports::TransportError },
}

/// Connects to an http(s) or ws(s) JSON-RPC endpoint.
pub async fn connect(url: &str) -> Result<DynProvider, ChainError> {
    let provider = ProviderBuilder::new()
        .connect(url)
        .await
        .map_err(|source| ChainError::Connect { url: crate::config::mask_url(url), source })?;
    Ok(provider.erased())
}

/// What the monitor last saw.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct ChainHealth {
    /// Chain id the RPC reports.
    pub chain_id: Option<u64>,
    /// Latest block number and hash.
    pub head: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub head_hash: Option<B256>,
    /// Why the node is not ready, if it is not.
    pub problem: Option<String>,
    /// Unix time of the last check, in milliseconds.
    pub checked_at_ms: u64,
}

impl ChainHealth {
    pub fn is_ready(&self) -> bool {
        self.problem.is_none() && self.head.is_some()
    }

    fn starting() -> Self {
        Self { problem: Some("the chain has not been checked yet".into()), ..Self::default() }
    }
}

/// Polls the chain every `interval` and publishes what it sees.
pub struct ChainMonitor {
    provider: DynProvider,
    deployment: Deployment,
    interval: Duration,
    tx: watch::Sender<ChainHealth>,
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(5);

impl ChainMonitor {
    pub fn new(
        provider: DynProvider,
        deployment: Deployment,
        interval: Duration,
    ) -> (Self, watch::Receiver<ChainHealth>) {
        let (tx, rx) = watch::channel(ChainHealth::starting());
        (Self { provider, deployment, interval, tx }, rx)
    }

    /// Checks once and publishes the result.
    pub async fn check_now(&self) -> ChainHealth {
        let health = match tokio::time::timeout(CHECK_TIMEOUT, self.check()).await {
            Ok(health) => health,
            Err(_) => ChainHealth {
                problem: Some(format!("the chain RPC did not answer within {CHECK_TIMEOUT:?}")),
                ..ChainHealth::default()
            },
        };
        let health = ChainHealth { checked_at_ms: now_ms(), ..health };
        record_metrics(&health);
        let was_ready = self.tx.borrow().is_ready();
        match (&health.problem, was_ready) {
            (Some(problem), true) => tracing::warn!(target: "agora::chain", %problem, "node is not ready"),
            (None, false) => {
                tracing::info!(target: "agora::chain", head = ?health.head, "chain reachable, contracts found; node is ready")
            }
            _ => {}
        }
        self.tx.send_replace(health.clone());
        health
    }

    async fn check(&self) -> ChainHealth {
        let chain_id = match self.provider.get_chain_id().await {
            Ok(id) => id,
            Err(e) => return unready(None, format!("the chain RPC is not reachable: {e}")),
        };
        if chain_id != self.deployment.chain_id {
            return unready(
                Some(chain_id),
                format!(
                    "the RPC serves chain {chain_id}, but the deployment is on chain {}; check AGORA_RPC_URL and AGORA_DEPLOYMENT",
                    self.deployment.chain_id
                ),
            );
        }
        let block = match self.provider.get_block_by_number(alloy::eips::BlockNumberOrTag::Latest).await {
            Ok(Some(block)) => block,
            Ok(None) => return unready(Some(chain_id), "the chain RPC returned no latest block".into()),
            Err(e) => return unready(Some(chain_id), format!("the chain RPC is not reachable: {e}")),
        };
        let head = block.header.number;
        let head_hash = block.header.hash;
        let problem = match missing_code(&self.provider, &self.deployment).await {
            Ok(missing) if missing.is_empty() => None,
            Ok(missing) => Some(format!(
                "no contract code at {}; deploy with `agora contracts deploy` or fix AGORA_DEPLOYMENT",
                describe(&missing)
            )),
            Err(e) => Some(format!("the chain RPC is not reachable: {e}")),
        };
        ChainHealth {
            chain_id: Some(chain_id),
            head: Some(head),
            head_hash: Some(head_hash),
            problem,
            checked_at_ms: 0,
        }
    }

    /// Runs until `shutdown` flips to true.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => { self.check_now().await; }
                _ = shutdown.changed() => break,
            }
        }
    }
}

fn unready(chain_id: Option<u64>, problem: String) -> ChainHealth {
    ChainHealth { chain_id, problem: Some(problem), ..ChainHealth::default() }
}

fn describe(missing: &[(&str, Address)]) -> String {
    missing.iter().map(|(name, address)| format!("{name} {address}")).collect::<Vec<_>>().join(" and ")
}

fn record_metrics(health: &ChainHealth) {
    metrics::gauge!("agora_ready").set(if health.is_ready() { 1.0 } else { 0.0 });
    if let Some(head) = health.head {
        metrics::gauge!("agora_chain_head_block").set(head as f64);
    }
    if health.problem.is_some() {
        metrics::counter!("agora_chain_check_failures_total").increment(1);
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
