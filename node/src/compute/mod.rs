//! Compute brokering: providers' signed offers, training requirements, the broker's choice,
//! and the reservations (compute futures) the chain escrows.
//!
//! A provider node signs its configured offers (`[[compute.offers]]`) with the operator wallet,
//! keeps them fresh (a new signature before half the offer's lifetime has passed) and gossips
//! them on `agora/offers/1`. When a reservation takes one of its offers it bumps its offer
//! nonce on-chain, which withdraws every offer it has signed so far, and signs new ones for
//! the capacity that is left (the reserved pool is busy until the reservation ends).

pub mod estimate;
pub mod jobs;
pub mod offers;
pub mod policies;
pub mod train;

use std::{collections::HashMap, time::Duration};

use agora_contracts::{ComputeMarket, Deployment};
use alloy::{
    primitives::{Address, B256, U256},
    sol_types::SolValue,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use crate::chain::operator::Operator;

use self::{
    estimate::{Candidate, Constraints, Family, Infeasible, Requirements, Selection, Throughput},
    offers::{OfferError, OfferSpec, OfferView},
};
use crate::{
    chain::indexer::IndexStatus,
    market::MarketView,
    p2p::P2p,
    registry::{Registry, RegistryError},
    store::{
        Store, StoreError,
        tables::{
            ComputeBalances, OfferNonces, OwnOffer, OwnOffers, ReservationRecord, ReservationState,
            Reservations,
        },
    },
};

/// uint256 as a decimal string in JSON (compact bytes in the store).
pub(crate) mod dec {
    use alloy::primitives::U256;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &U256, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&v.to_string()) } else { v.serialize(s) }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<U256, D::Error> {
        if d.is_human_readable() {
            String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
        } else {
            U256::deserialize(d)
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error("compute brokering is off: the deployment has no ComputeMarket (redeploy the contracts)")]
    NoMarket,
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Offer(#[from] OfferError),
    #[error(transparent)]
    Infeasible(#[from] Infeasible),
    #[error("{0}")]
    Unconfirmed(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `[compute]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// Capacity this node offers as a provider (signed with the operator wallet).
    pub offers: Vec<OfferSpec>,
    /// Seconds an offer's signature stays valid; offers are re-signed at half of it.
    pub offer_ttl: u64,
    /// Assumed share of peak throughput a training run achieves.
    pub utilisation: f64,
    /// GPU models added to (or replacing entries of) the throughput table.
    pub gpus: Vec<GpuEntry>,
    /// Seconds a training job may go without a word from the other node before it fails
    /// (and, for a provider, before it reports hours nobody signed).
    pub job_timeout: u64,
    /// The external executor: a command (argv) run in the job's work dir, which holds
    /// `weights.safetensors`, `config.json`, `dataset.csv|safetensors` and
    /// `hyperparameters.json`; it writes `output.safetensors` and may print JSON lines with a
    /// `loss` (and `epoch`) as progress. Empty: only the built-in executor.
    pub external_command: Vec<String>,
    /// Retraining policies (`[[compute.policies]]`).
    pub policies: Vec<policies::Policy>,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            offers: Vec::new(),
            offer_ttl: 3600,
            utilisation: estimate::DEFAULT_UTILISATION,
            gpus: Vec::new(),
            job_timeout: 600,
            external_command: Vec::new(),
            policies: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpuEntry {
    pub name: String,
    /// Peak dense bf16 TFLOP/s.
    pub tflops: f64,
    pub memory_gb: u32,
}

impl ComputeConfig {
    pub fn throughput(&self) -> Throughput {
        let mut t = Throughput { utilisation: self.utilisation, ..Throughput::default() };
        for g in &self.gpus {
            t.set(&g.name, g.tflops, g.memory_gb);
        }
        t
    }
}

/// The time the next block will carry, as well as a node can tell: the indexed head's
/// timestamp, or the clock when that is older (a quiet chain mines no blocks to move it).
pub fn next_block_time(store: &Store, index: &IndexStatus) -> Result<u64, StoreError> {
    let head = MarketView::new(store, index.clone()).chain_now()?;
    Ok(head.max(crate::registry::now_ms() / 1000))
}

/// The compute service; cheap to clone.
#[derive(Clone)]
pub struct Compute {
    store: Store,
    deployment: Deployment,
    index: watch::Receiver<IndexStatus>,
    registry: Registry,
    p2p: Option<P2p>,
    operator: Option<Operator>,
    config: ComputeConfig,
    throughput: Throughput,
    /// Serialises read-modify-writes of training jobs.
    jobs_lock: std::sync::Arc<std::sync::Mutex<()>>,
    /// Work dirs of jobs.
    tmp: std::path::PathBuf,
    /// For the watermark commitment of trained versions.
    watermark_key: Option<std::sync::Arc<agora_watermark::MasterKey>>,
    /// When policies fire next and what their last runs did.
    runs: std::sync::Arc<std::sync::Mutex<policies::Runs>>,
    /// The deployments, whose input drift fires drift policies.
    serve: Option<crate::serve::Serve>,
    /// Where the buyer's training jobs are recorded as MLflow runs.
    tracking: Option<crate::tracking::Tracking>,
}

/// `GET /api/v1/compute/reservations` item.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservationView {
    pub id: String,
    #[schema(value_type = String)]
    pub provider: Address,
    #[schema(value_type = String)]
    pub holder: Address,
    #[schema(value_type = String)]
    pub offer_hash: B256,
    pub gpu_hours: u64,
    pub price_per_gpu_hour: String,
    pub escrow: String,
    pub start_time: u64,
    pub end_time: u64,
    /// `reserved`, `confirmed`, `settled` or `reclaimed`.
    pub state: String,
    pub confirmed_at: Option<u64>,
    pub reported_hours: Option<u64>,
    /// When an unsigned report becomes final.
    pub report_final_at: Option<u64>,
    pub hours_used: Option<u64>,
    pub paid: String,
    pub refund: String,
    pub reserved_block: u64,
    #[schema(value_type = String)]
    pub reserved_tx: B256,
}

impl ReservationView {
    pub fn new(id: U256, r: &ReservationRecord) -> Self {
        Self {
            id: id.to_string(),
            provider: r.provider,
            holder: r.holder,
            offer_hash: r.offer_hash,
            gpu_hours: r.gpu_hours,
            price_per_gpu_hour: r.price_per_gpu_hour.to_string(),
            escrow: r.escrow.to_string(),
            start_time: r.start_time,
            end_time: r.end_time,
            state: match r.state {
                ReservationState::Reserved => "reserved",
                ReservationState::Confirmed => "confirmed",
                ReservationState::Settled => "settled",
                ReservationState::Reclaimed => "reclaimed",
            }
            .into(),
            confirmed_at: r.confirmed_at,
            reported_hours: r.reported.map(|(h, _)| h),
            report_final_at: r.reported.map(|(_, at)| at),
            hours_used: r.hours_used,
            paid: r.paid.to_string(),
            refund: r.refund.to_string(),
            reserved_block: r.reserved.block,
            reserved_tx: r.reserved.tx,
        }
    }
}

/// `GET /api/v1/compute/accounts/{address}`.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AccountView {
    #[schema(value_type = String)]
    pub address: Address,
    /// The nonce the account's next offers must carry.
    pub offer_nonce: String,
    /// Wei paid to it as a provider.
    pub earned: String,
    /// Wei of unused escrow returned to it as a holder.
    pub refunds: String,
    pub withdrawn: String,
    pub withdrawable: String,
}

/// What `GET /api/v1/models/training-requirements` asks about.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RequirementsQuery {
    /// Registered model name.
    pub name: String,
    /// Version number (default: the latest).
    pub version: Option<u32>,
    /// Rows per epoch (MLP family).
    pub dataset_rows: Option<u64>,
    /// Tokens per epoch (transformer-like models).
    pub dataset_tokens: Option<u64>,
    /// Epochs (default 1).
    pub epochs: Option<u32>,
    /// Batch size: rows (MLP, default 32) or sequences (transformer, default 8).
    pub batch: Option<u64>,
    /// Tokens per sequence for the activation estimate (default 512).
    pub sequence: Option<u64>,
}

impl Compute {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: Store,
        deployment: Deployment,
        index: watch::Receiver<IndexStatus>,
        registry: Registry,
        p2p: Option<P2p>,
        operator: Option<Operator>,
        config: ComputeConfig,
    ) -> Self {
        let throughput = config.throughput();
        Self {
            store,
            deployment,
            index,
            registry,
            p2p,
            operator,
            config,
            throughput,
            jobs_lock: Default::default(),
            tmp: std::env::temp_dir(),
            watermark_key: None,
            runs: Default::default(),
            serve: None,
            tracking: None,
        }
    }

    /// Records the training jobs this node buys as runs of the experiment
    /// `agora-training/<model>`.
    pub fn with_tracking(mut self, tracking: crate::tracking::Tracking) -> Self {
        self.tracking = Some(tracking);
        self
    }

    /// The deployments whose input drift the drift policies watch.
    pub fn with_serve(mut self, serve: crate::serve::Serve) -> Self {
        self.serve = Some(serve);
        self
    }

    /// Where training jobs keep their work dirs, and the key that commits trained versions.
    pub fn with_training(
        mut self,
        tmp: std::path::PathBuf,
        watermark_key: std::sync::Arc<agora_watermark::MasterKey>,
    ) -> Self {
        self.tmp = tmp;
        self.watermark_key = Some(watermark_key);
        self
    }

    pub fn enabled(&self) -> bool {
        self.deployment.has_compute()
    }

    fn require_market(&self) -> Result<(), ComputeError> {
        if self.enabled() { Ok(()) } else { Err(ComputeError::NoMarket) }
    }

    pub fn deployment(&self) -> &Deployment {
        &self.deployment
    }

    pub fn throughput(&self) -> &Throughput {
        &self.throughput
    }

    /// [`next_block_time`] for this node.
    pub fn chain_now(&self) -> Result<u64, StoreError> {
        next_block_time(&self.store, &self.index.borrow())
    }

    /// Live offers this node knows, cheapest per GPU-hour first.
    pub fn offers(&self) -> Result<Vec<OfferView>, ComputeError> {
        self.require_market()?;
        let mut live = offers::live(&self.store, self.chain_now()?)?;
        live.sort_by(|a, b| a.offer.pricePerGpuHour.cmp(&b.offer.pricePerGpuHour).then(a.hash.cmp(&b.hash)));
        Ok(live.iter().map(OfferView::new).collect())
    }

    /// Checks, keeps and gossips an offer posted to this node.
    pub async fn post_offer(
        &self,
        offer: &ComputeMarket::Offer,
        signature: &[u8],
    ) -> Result<(B256, bool), ComputeError> {
        self.require_market()?;
        let encoded = offer.abi_encode();
        let (hash, new) = offers::accept(
            &self.store,
            &self.deployment,
            &encoded,
            signature,
            self.chain_now()?,
            "local",
            None,
        )?;
        if new && let Some(p2p) = &self.p2p {
            p2p.publish_offer(encoded, signature.to_vec()).await;
        }
        Ok((hash, new))
    }

    /// Parameter count, FLOPs, memory and GPU-hours to train a registered version.
    pub fn requirements(&self, q: &RequirementsQuery) -> Result<Requirements, ComputeError> {
        let view = self.version_or_latest(&q.name, q.version)?;
        let file = view.version.file.as_ref().ok_or_else(|| {
            ComputeError::Invalid(format!(
                "version {} of {:?} has no safetensors file on this node to count parameters in",
                view.version.version, q.name
            ))
        })?;
        let config = self.version_config(&view)?;
        let epochs = q.epochs.unwrap_or(1);
        if epochs == 0 {
            return Err(ComputeError::Invalid("epochs must be at least 1".into()));
        }
        let layers = config
            .as_ref()
            .and_then(|c| c.get("layers"))
            .and_then(|l| serde_json::from_value::<Vec<usize>>(l.clone()).ok());
        let (family, samples, batch) = match layers {
            Some(layers) => {
                let rows = q.dataset_rows.ok_or_else(|| {
                    ComputeError::Invalid("dataset_rows is required for an MLP (rows per epoch)".into())
                })?;
                (Family::Mlp { layers }, rows, q.batch.unwrap_or(32))
            }
            None => {
                let tokens = q.dataset_tokens.ok_or_else(|| {
                    ComputeError::Invalid(
                        "dataset_tokens is required for a transformer-like model (tokens per epoch)".into(),
                    )
                })?;
                let field = |names: &[&str]| {
                    config
                        .as_ref()
                        .and_then(|c| names.iter().find_map(|n| c.get(*n).and_then(|v| v.as_u64())))
                };
                let family = Family::Transformer {
                    hidden: field(&["hidden_size", "d_model", "n_embd"]),
                    layers: field(&["num_hidden_layers", "n_layer", "num_layers"]),
                    sequence: q.sequence.unwrap_or(512),
                };
                (family, tokens, q.batch.unwrap_or(8))
            }
        };
        Ok(Requirements::new(family, file.parameters, samples, epochs, batch, &self.throughput))
    }

    /// A model's version, or its latest.
    fn version_or_latest(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<crate::registry::VersionView, ComputeError> {
        Ok(match version {
            Some(v) => self.registry.version(name, v)?,
            None => self
                .registry
                .versions(name)?
                .into_iter()
                .max_by_key(|v| v.version.version)
                .ok_or_else(|| RegistryError::NotFound(format!("model {name:?} has no versions")))?,
        })
    }

    /// The version's `config.json`, when it has one.
    fn version_config(
        &self,
        view: &crate::registry::VersionView,
    ) -> Result<Option<serde_json::Value>, ComputeError> {
        let Some(dir) = &view.version.artifact_dir else { return Ok(None) };
        let Some(file) = self.registry.file(&format!("{dir}/config.json"))? else { return Ok(None) };
        let mut bytes = Vec::new();
        self.registry
            .artifacts()
            .copy_to(&file.blake3, &mut bytes)
            .map_err(|e| ComputeError::Registry(RegistryError::Artifact(e)))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ComputeError::Invalid(format!("the version's config.json is not JSON: {e}")))
    }

    /// Live offers with their providers' track record and latency.
    pub fn candidates(&self, now: u64) -> Result<Vec<Candidate>, ComputeError> {
        let live = offers::live(&self.store, now)?;
        let mut record: HashMap<Address, (u32, u32)> = HashMap::new();
        for item in self.store.iter::<Reservations>() {
            let (_, r) = item?;
            let entry = record.entry(r.provider).or_default();
            match r.state {
                ReservationState::Settled => entry.0 += 1,
                ReservationState::Reclaimed => entry.1 += 1,
                _ => {}
            }
        }
        let latency: HashMap<String, f64> = self
            .p2p
            .as_ref()
            .map(|p| {
                p.peers().into_iter().filter_map(|peer| Some((peer.peer_id, peer.latency_ms?))).collect()
            })
            .unwrap_or_default();
        Ok(live
            .into_iter()
            .map(|offer| {
                let (settled, reclaimed) = record.get(&offer.offer.provider).copied().unwrap_or_default();
                let reliability = f64::from(settled + 1) / f64::from(settled + reclaimed + 2);
                let latency_ms = latency.get(&offer.offer.node).copied();
                Candidate { offer, reliability, latency_ms }
            })
            .collect())
    }

    /// Prices every live offer for `req` and chooses one.
    pub fn estimate(&self, req: &Requirements, constraints: &Constraints) -> Result<Selection, ComputeError> {
        self.require_market()?;
        let now = self.chain_now()?;
        Ok(estimate::select(req, &self.candidates(now)?, constraints, now, &self.throughput)?)
    }

    /// An account in ComputeMarket: its offer nonce and pull balance.
    pub fn account(&self, address: Address) -> Result<AccountView, ComputeError> {
        self.require_market()?;
        let balance = self.store.get::<ComputeBalances>(&address)?.unwrap_or_default();
        Ok(AccountView {
            address,
            offer_nonce: self.store.get::<OfferNonces>(&address)?.unwrap_or_default().to_string(),
            earned: balance.earned.to_string(),
            refunds: balance.refunds.to_string(),
            withdrawn: balance.withdrawn.to_string(),
            withdrawable: balance.withdrawable().to_string(),
        })
    }

    /// Reservations in the index, newest first, optionally of one holder or provider.
    pub fn reservations(
        &self,
        holder: Option<Address>,
        provider: Option<Address>,
    ) -> Result<Vec<ReservationView>, ComputeError> {
        let mut out = Vec::new();
        for item in self.store.iter::<Reservations>() {
            let (key, r) = item?;
            if holder.is_some_and(|h| h != r.holder) || provider.is_some_and(|p| p != r.provider) {
                continue;
            }
            out.push(ReservationView::new(U256::from_be_slice(&key), &r));
        }
        out.reverse();
        Ok(out)
    }

    /// The provider's side: keeps this node's configured offers signed, fresh and gossiped,
    /// and withdraws them on-chain when a reservation takes capacity.
    pub async fn run_provider(self, mut shutdown: watch::Receiver<bool>) {
        if self.config.offers.is_empty() {
            return;
        }
        let (Some(operator), Some(p2p)) = (self.operator.clone(), self.p2p.clone()) else {
            tracing::warn!(target: "agora::compute", "compute offers are configured, but they need the operator wallet (AGORA_OPERATOR_KEY) and the peer-to-peer network; not offering");
            return;
        };
        if !self.enabled() {
            tracing::warn!(target: "agora::compute", "compute offers are configured, but the deployment has no ComputeMarket; not offering");
            return;
        }
        tracing::info!(target: "agora::compute", provider = %operator.signer.address(), pools = self.config.offers.len(), "offering compute capacity");
        let mut tick = tokio::time::interval(Duration::from_secs((self.config.offer_ttl / 8).clamp(1, 60)));
        let mut index = self.index.clone();
        // The nonce a bump sent this node to, until the index has it (no second bump meanwhile).
        let mut bumped: Option<U256> = None;
        loop {
            if let Err(e) = self.provider_round(&operator, &p2p, &mut bumped).await {
                tracing::warn!(target: "agora::compute", error = %e, "compute offers round failed; retrying");
            }
            tokio::select! {
                _ = shutdown.wait_for(|stop| *stop) => return,
                _ = index.changed() => {}
                _ = tick.tick() => {}
            }
        }
    }

    async fn provider_round(
        &self,
        operator: &Operator,
        p2p: &P2p,
        bumped: &mut Option<U256>,
    ) -> anyhow::Result<()> {
        let me = operator.signer.address();
        let now = self.chain_now()?;
        let nonce = self.store.get::<OfferNonces>(&me)?.unwrap_or_default();
        if bumped.is_some_and(|b| nonce < b) {
            return Ok(()); // the bump is not indexed yet
        }
        *bumped = None;
        // Capacity taken: busy pools, and whether an offer at the current nonce was reserved.
        let mut busy_until: HashMap<u32, u64> = HashMap::new();
        let mut taken_at_current_nonce = false;
        for item in self.store.iter::<Reservations>() {
            let (_, r) = item?;
            if r.provider != me {
                continue;
            }
            let Some(own) = self.store.get::<OwnOffers>(&r.offer_hash)? else { continue };
            if matches!(r.state, ReservationState::Reserved | ReservationState::Confirmed) {
                let until = busy_until.entry(own.spec).or_default();
                *until = (*until).max(r.end_time);
            }
            taken_at_current_nonce |= own.nonce == nonce;
        }
        if taken_at_current_nonce {
            let compute = ComputeMarket::new(self.deployment.compute_market, operator.provider.clone());
            let receipt = operator.transact(compute.bumpNonce()).await?;
            anyhow::ensure!(receipt.status(), "bumpNonce {} reverted", receipt.transaction_hash);
            *bumped = Some(nonce + U256::from(1));
            tracing::info!(target: "agora::compute", tx = %receipt.transaction_hash, "capacity taken: withdrew the offers signed so far");
            return Ok(()); // sign again once the index has the new nonce
        }
        let node = p2p.net().peer_id.to_string();
        let mut latest: HashMap<u32, OwnOffer> = HashMap::new();
        let mut stale = Vec::new();
        for item in self.store.iter::<OwnOffers>() {
            let (key, own) = item?;
            if own.expiry + 7 * 86_400 < now {
                stale.push(B256::from_slice(&key));
            }
            if own.nonce == nonce && latest.get(&own.spec).is_none_or(|l| l.expiry < own.expiry) {
                latest.insert(own.spec, own);
            }
        }
        if !stale.is_empty() {
            let mut batch = self.store.batch();
            for hash in &stale {
                batch.delete::<OwnOffers>(hash);
            }
            self.store.write(batch)?;
        }
        let ttl = self.config.offer_ttl.max(2);
        for (i, spec) in self.config.offers.iter().enumerate() {
            let i = i as u32;
            let busy = busy_until.get(&i).copied().unwrap_or(0);
            let from = now.max(busy);
            // Fresh: valid for a while yet, not before the pool is free, and not after either
            // (a reservation that settled early frees the pool at once).
            let fresh = latest.get(&i).is_some_and(|l| {
                l.expiry > now + ttl / 2 && l.available_from >= busy && l.available_from <= from
            });
            if fresh {
                continue;
            }
            let mut spec = spec.clone();
            spec.available_from = Some(spec.available_from.unwrap_or(0).max(from));
            let offer = match spec.to_offer(me, &node, nonce, now, ttl) {
                Ok(offer) => offer,
                Err(e) => {
                    tracing::warn!(target: "agora::compute", offer = i, error = %e, "configured offer skipped");
                    continue;
                }
            };
            if offer.availableFrom >= offer.availableUntil {
                continue; // the pool is busy past its window
            }
            let (chain_id, market) = (self.deployment.chain_id, self.deployment.compute_market);
            let signature = offers::sign(&offer, &operator.signer, chain_id, market);
            let encoded = offer.abi_encode();
            let hash = offers::offer_hash(&offer, chain_id, market);
            self.store.put::<OwnOffers>(
                &hash,
                &OwnOffer { spec: i, nonce, available_from: offer.availableFrom, expiry: offer.expiry },
            )?;
            offers::accept(&self.store, &self.deployment, &encoded, &signature, now, "local", None)?;
            p2p.publish_offer(encoded, signature).await;
            tracing::info!(target: "agora::compute", offer = i, %hash, gpu = %offer.gpu, expiry = offer.expiry, "offer signed and gossiped");
        }
        Ok(())
    }
}
