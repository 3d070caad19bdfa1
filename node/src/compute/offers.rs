//! Compute offers: a provider's GPUs for a window of time at a price per GPU-hour, signed by
//! the provider's wallet under ComputeMarket's EIP-712 domain and gossiped on
//! `agora/offers/1`. An offer also names the provider node's peer id, where buyers send jobs.
//!
//! A node keeps an offer only while the index says it could still be reserved: signature by
//! the named provider, fields the contract accepts, not reserved or cancelled, the provider's
//! current nonce (or the next one, which this node's index may not have seen yet), not
//! expired, availability not over. Of the offers a provider re-signs for one pool of GPUs only
//! the newest is kept. Offers are checked the same way whether
//! they arrive by gossip or by the API.

use agora_contracts::{ComputeMarket, Deployment, compute_domain};
use alloy::{
    primitives::{Address, B256, U256},
    signers::{SignerSync, local::PrivateKeySigner},
    sol_types::{SolStruct, SolValue},
};
use serde::{Deserialize, Serialize};

use crate::store::{
    Store, StoreError,
    tables::{ClosedOffers, OfferNonces, OfferRecord, Offers, PoolOffers},
};

/// Longest GPU name, region and node id an offer may carry.
const MAX_TEXT: usize = 128;

/// Who stands behind the capacity: the platform's own GPUs, a partner's sold wholesale, or
/// spot capacity that is cheap but may be taken back.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum OfferKind {
    Owned = 0,
    Partner = 1,
    Spot = 2,
}

impl OfferKind {
    pub fn from_u8(kind: u8) -> Option<Self> {
        match kind {
            0 => Some(Self::Owned),
            1 => Some(Self::Partner),
            2 => Some(Self::Spot),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Owned => "owned",
            Self::Partner => "partner",
            Self::Spot => "spot",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OfferError {
    #[error("compute brokering is off: the deployment has no ComputeMarket")]
    NoMarket,
    #[error("the offer is not a valid ABI encoding: {0}")]
    Decode(String),
    #[error("bad offer signature: {0}")]
    Signature(String),
    #[error("invalid offer: {0}")]
    Invalid(String),
    #[error("the offer expired at {expiry} (chain time {now})")]
    Expired { expiry: u64, now: u64 },
    #[error("the offer's availability ended at {until} (chain time {now})")]
    Over { until: u64, now: u64 },
    #[error("the offer was already reserved or cancelled")]
    Closed,
    #[error("the offer's nonce {offer} is not the provider's current nonce {current} (or the next)")]
    StaleNonce { offer: U256, current: U256 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a provider offers, before it is signed (config `[[compute.offers]]`, the CLI, the API).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OfferSpec {
    /// GPU model, as in the throughput table (e.g. `H100-80GB`).
    pub gpu: String,
    pub gpu_count: u32,
    /// Memory per GPU, GiB.
    pub memory_gb: u32,
    /// Wei per GPU-hour (decimal).
    pub price_per_gpu_hour: String,
    pub kind: OfferKind,
    #[serde(default)]
    pub region: String,
    /// Unix seconds; default: now.
    #[serde(default)]
    pub available_from: Option<u64>,
    /// Unix seconds; default: `available_hours` after the start.
    #[serde(default)]
    pub available_until: Option<u64>,
    /// Length of the window when `available_until` is not given (default one week).
    #[serde(default)]
    pub available_hours: Option<u64>,
}

impl OfferSpec {
    /// The offer this spec makes at chain time `now`, valid for `ttl` seconds.
    pub fn to_offer(
        &self,
        provider: Address,
        node: &str,
        nonce: U256,
        now: u64,
        ttl: u64,
    ) -> Result<ComputeMarket::Offer, OfferError> {
        let price: U256 = self.price_per_gpu_hour.trim().parse().map_err(|_| {
            OfferError::Invalid(format!(
                "price_per_gpu_hour {:?} is not a decimal number of wei",
                self.price_per_gpu_hour
            ))
        })?;
        let from = self.available_from.unwrap_or(now).max(now);
        let until = self.available_until.unwrap_or_else(|| {
            from.saturating_add(self.available_hours.unwrap_or(7 * 24).saturating_mul(3600))
        });
        let offer = ComputeMarket::Offer {
            provider,
            gpu: self.gpu.clone(),
            gpuCount: self.gpu_count,
            memoryGb: self.memory_gb,
            pricePerGpuHour: price,
            kind: self.kind as u8,
            availableFrom: from,
            availableUntil: until,
            region: self.region.clone(),
            node: node.to_owned(),
            nonce,
            expiry: now.saturating_add(ttl).min(until),
        };
        check_fields(&offer)?;
        Ok(offer)
    }
}

/// The hash the provider signs and the contract records, for the ComputeMarket at `market`.
pub fn offer_hash(offer: &ComputeMarket::Offer, chain_id: u64, market: Address) -> B256 {
    offer.eip712_signing_hash(&compute_domain(chain_id, market))
}

/// The provider's signature of `offer` (65 bytes).
pub fn sign(
    offer: &ComputeMarket::Offer,
    signer: &PrivateKeySigner,
    chain_id: u64,
    market: Address,
) -> Vec<u8> {
    let hash = offer_hash(offer, chain_id, market);
    signer.sign_hash_sync(&hash).map(|s| s.as_bytes().to_vec()).unwrap_or_default()
}

/// Fields the contract would refuse at reservation, refused up front.
pub fn check_fields(offer: &ComputeMarket::Offer) -> Result<(), OfferError> {
    let bad = |why: String| Err(OfferError::Invalid(why));
    if offer.gpu.trim().is_empty() {
        return bad("the GPU model is empty".into());
    }
    for (name, text) in [("gpu", &offer.gpu), ("region", &offer.region), ("node", &offer.node)] {
        if text.len() > MAX_TEXT {
            return bad(format!("{name} is longer than {MAX_TEXT} bytes"));
        }
    }
    if offer.node.is_empty() {
        return bad("the offer names no node to send jobs to".into());
    }
    if offer.gpuCount == 0 {
        return bad("zero GPUs".into());
    }
    if offer.pricePerGpuHour.is_zero() {
        return bad("zero price".into());
    }
    if offer.pricePerGpuHour >= U256::from(1u128 << 127) {
        return bad("the price does not fit the contract's 128-bit field".into());
    }
    if OfferKind::from_u8(offer.kind).is_none() {
        return bad(format!("unknown kind {}", offer.kind));
    }
    if offer.availableUntil <= offer.availableFrom {
        return bad("the availability window is empty".into());
    }
    Ok(())
}

/// Why a kept offer could not be reserved now, per the index; `None` when it could.
pub fn dead_reason(
    store: &Store,
    offer: &ComputeMarket::Offer,
    hash: B256,
    now: u64,
) -> Result<Option<OfferError>, StoreError> {
    if store.get::<ClosedOffers>(&hash)?.is_some() {
        return Ok(Some(OfferError::Closed));
    }
    // One ahead is allowed: a provider re-signs right after its own index sees its nonce
    // bump, which may reach this node's index a block later.
    let current = store.get::<OfferNonces>(&offer.provider)?.unwrap_or_default();
    if offer.nonce < current || offer.nonce > current + U256::from(1) {
        return Ok(Some(OfferError::StaleNonce { offer: offer.nonce, current }));
    }
    if now > offer.expiry {
        return Ok(Some(OfferError::Expired { expiry: offer.expiry, now }));
    }
    if now >= offer.availableUntil {
        return Ok(Some(OfferError::Over { until: offer.availableUntil, now }));
    }
    Ok(None)
}

/// Checks a signed offer and keeps it. Returns its hash and whether it was new.
pub fn accept(
    store: &Store,
    deployment: &Deployment,
    encoded: &[u8],
    signature: &[u8],
    now: u64,
    source: &str,
    peer_id: Option<String>,
) -> Result<(B256, bool), OfferError> {
    if !deployment.has_compute() {
        return Err(OfferError::NoMarket);
    }
    let offer = ComputeMarket::Offer::abi_decode(encoded).map_err(|e| OfferError::Decode(e.to_string()))?;
    let hash = offer_hash(&offer, deployment.chain_id, deployment.compute_market);
    // kept in the form `reserve` takes, whatever form it came in; providers sign with keys
    // (node operator wallets), so no chain is asked
    let signature = crate::signers::Signers::keys_only()
        .signed_by(offer.provider, &hash, signature)
        .map_err(|e| OfferError::Signature(e.to_string()))?;
    check_fields(&offer)?;
    if let Some(reason) = dead_reason(store, &offer, hash, now)? {
        return Err(reason);
    }
    if store.get::<Offers>(&hash)?.is_some() {
        return Ok((hash, false));
    }
    // A provider re-signs its offers before they expire: the newest of a pool replaces the rest.
    let pool = pool_of(&offer);
    let mut batch = store.batch();
    if let Some(previous) = store.get::<PoolOffers>(&pool)?
        && let Some(record) = store.get::<Offers>(&previous)?
        && let Ok(kept) = ComputeMarket::Offer::abi_decode(&record.offer)
    {
        if (kept.nonce, kept.expiry) > (offer.nonce, offer.expiry) {
            return Ok((hash, false)); // an older signature of a pool we have newer news of
        }
        batch.delete::<Offers>(&previous);
    }
    let record = OfferRecord {
        offer: encoded.to_vec(),
        signature,
        source: source.to_owned(),
        peer_id,
        received_ms: crate::registry::now_ms(),
    };
    batch.put::<Offers>(&hash, &record)?;
    batch.put::<PoolOffers>(&pool, &hash)?;
    store.write(batch)?;
    Ok((hash, true))
}

/// Identifies a provider's pool of GPUs across re-signed offers.
fn pool_of(offer: &ComputeMarket::Offer) -> B256 {
    let mut h = blake3::Hasher::new_derive_key("agora compute offer pool v1");
    h.update(offer.provider.as_slice());
    for text in [&offer.gpu, &offer.region, &offer.node] {
        h.update(&(text.len() as u32).to_le_bytes());
        h.update(text.as_bytes());
    }
    h.update(&offer.gpuCount.to_le_bytes());
    h.update(&offer.memoryGb.to_le_bytes());
    h.update(&[offer.kind]);
    B256::from(*h.finalize().as_bytes())
}

/// An offer this node keeps, decoded.
#[derive(Clone, Debug)]
pub struct KnownOffer {
    pub hash: B256,
    pub offer: ComputeMarket::Offer,
    pub signature: Vec<u8>,
    pub source: String,
    pub peer_id: Option<String>,
}

/// The offers that could be reserved at chain time `now`; dead ones are dropped from the store.
pub fn live(store: &Store, now: u64) -> Result<Vec<KnownOffer>, StoreError> {
    let mut alive = Vec::new();
    let mut dead = Vec::new();
    for item in store.iter::<Offers>() {
        let (key, record) = item?;
        let hash = B256::from_slice(&key);
        let Ok(offer) = ComputeMarket::Offer::abi_decode(&record.offer) else {
            dead.push(hash);
            continue;
        };
        if dead_reason(store, &offer, hash, now)?.is_some() {
            dead.push(hash);
            continue;
        }
        alive.push(KnownOffer {
            hash,
            offer,
            signature: record.signature,
            source: record.source,
            peer_id: record.peer_id,
        });
    }
    if !dead.is_empty() {
        let mut batch = store.batch();
        for hash in &dead {
            batch.delete::<Offers>(hash);
        }
        store.write(batch)?;
    }
    Ok(alive)
}

/// An offer as the API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OfferJson {
    #[schema(value_type = String)]
    pub provider: Address,
    pub gpu: String,
    pub gpu_count: u32,
    pub memory_gb: u32,
    /// Wei per GPU-hour (decimal).
    pub price_per_gpu_hour: String,
    pub kind: OfferKind,
    pub available_from: u64,
    pub available_until: u64,
    pub region: String,
    /// The provider node's peer id.
    pub node: String,
    pub nonce: String,
    pub expiry: u64,
}

impl OfferJson {
    pub fn from_offer(offer: &ComputeMarket::Offer) -> Self {
        Self {
            provider: offer.provider,
            gpu: offer.gpu.clone(),
            gpu_count: offer.gpuCount,
            memory_gb: offer.memoryGb,
            price_per_gpu_hour: offer.pricePerGpuHour.to_string(),
            kind: OfferKind::from_u8(offer.kind).unwrap_or(OfferKind::Spot),
            available_from: offer.availableFrom,
            available_until: offer.availableUntil,
            region: offer.region.clone(),
            node: offer.node.clone(),
            nonce: offer.nonce.to_string(),
            expiry: offer.expiry,
        }
    }

    pub fn to_offer(&self) -> Result<ComputeMarket::Offer, OfferError> {
        let number = |name: &str, text: &str| -> Result<U256, OfferError> {
            text.trim()
                .parse()
                .map_err(|_| OfferError::Invalid(format!("{name} {text:?} is not a decimal number")))
        };
        Ok(ComputeMarket::Offer {
            provider: self.provider,
            gpu: self.gpu.clone(),
            gpuCount: self.gpu_count,
            memoryGb: self.memory_gb,
            pricePerGpuHour: number("price_per_gpu_hour", &self.price_per_gpu_hour)?,
            kind: self.kind as u8,
            availableFrom: self.available_from,
            availableUntil: self.available_until,
            region: self.region.clone(),
            node: self.node.clone(),
            nonce: number("nonce", &self.nonce)?,
            expiry: self.expiry,
        })
    }
}

/// `GET /api/v1/compute/offers` item.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OfferView {
    #[schema(value_type = String)]
    pub hash: B256,
    pub offer: OfferJson,
    /// 0x-hex, 65 bytes.
    pub signature: String,
    /// `local` or `peer`.
    pub source: String,
    pub peer_id: Option<String>,
}

impl OfferView {
    pub fn new(known: &KnownOffer) -> Self {
        Self {
            hash: known.hash,
            offer: OfferJson::from_offer(&known.offer),
            signature: alloy::hex::encode_prefixed(&known.signature),
            source: known.source.clone(),
            peer_id: known.peer_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        Deployment {
            chain_id: 31337,
            model_registry: Address::repeat_byte(1),
            license_market: Address::repeat_byte(2),
            deployment_block: 0,
            treasury: Address::repeat_byte(3),
            fee_bps: 250,
            challenge_window: 60,
            compute_market: Address::repeat_byte(4),
            compute_grace: 60,
        }
    }

    fn spec() -> OfferSpec {
        OfferSpec {
            gpu: "H100-80GB".into(),
            gpu_count: 8,
            memory_gb: 80,
            price_per_gpu_hour: "2000000000000000".into(),
            kind: OfferKind::Partner,
            region: "eu-west".into(),
            available_from: None,
            available_until: None,
            available_hours: Some(24),
        }
    }

    #[test]
    fn signed_offers_are_kept_once_and_forgeries_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = deployment();
        let signer = PrivateKeySigner::random();
        let offer = spec().to_offer(signer.address(), "12D3KooWnode", U256::ZERO, 1_000, 600).unwrap();
        assert_eq!((offer.availableFrom, offer.availableUntil, offer.expiry), (1_000, 1_000 + 86_400, 1_600));
        let sig = sign(&offer, &signer, d.chain_id, d.compute_market);
        let encoded = offer.abi_encode();
        let (hash, new) = accept(&store, &d, &encoded, &sig, 1_000, "peer", None).unwrap();
        assert!(new);
        assert_eq!(hash, offer_hash(&offer, d.chain_id, d.compute_market));
        assert!(!accept(&store, &d, &encoded, &sig, 1_000, "peer", None).unwrap().1, "a duplicate");

        let mut forged = offer.clone();
        forged.pricePerGpuHour = U256::from(1);
        let err = accept(&store, &d, &forged.abi_encode(), &sig, 1_000, "peer", None).unwrap_err();
        assert!(matches!(err, OfferError::Signature(_)), "{err}");

        let err = accept(&store, &d, &encoded, &sig, 1_601, "peer", None).unwrap_err();
        assert!(matches!(err, OfferError::Expired { .. }), "{err}");
        assert_eq!(live(&store, 1_000).unwrap().len(), 1);
        assert!(live(&store, 1_601).unwrap().is_empty(), "expired offers are dropped");

        // re-signed later: the newer offer replaces the older one of the same pool
        let newer = spec().to_offer(signer.address(), "12D3KooWnode", U256::ZERO, 1_100, 600).unwrap();
        let newer_sig = sign(&newer, &signer, d.chain_id, d.compute_market);
        assert!(accept(&store, &d, &newer.abi_encode(), &newer_sig, 1_100, "peer", None).unwrap().1);
        assert!(!accept(&store, &d, &encoded, &sig, 1_100, "peer", None).unwrap().1, "the older stays out");
        assert_eq!(live(&store, 1_100).unwrap()[0].offer.expiry, 1_700);
    }

    #[test]
    fn specs_with_bad_fields_are_refused() {
        let signer = Address::repeat_byte(9);
        let mut s = spec();
        s.price_per_gpu_hour = "2 ether".into();
        assert!(matches!(s.to_offer(signer, "n", U256::ZERO, 0, 60), Err(OfferError::Invalid(_))));
        let mut s = spec();
        s.gpu_count = 0;
        assert!(matches!(s.to_offer(signer, "n", U256::ZERO, 0, 60), Err(OfferError::Invalid(_))));
        let mut s = spec();
        s.available_until = Some(10);
        assert!(matches!(s.to_offer(signer, "n", U256::ZERO, 100, 60), Err(OfferError::Invalid(_))));
        assert!(matches!(spec().to_offer(signer, "", U256::ZERO, 0, 60), Err(OfferError::Invalid(_))));
    }
}
