//! Signed listings (the order book). A seller signs a `LicenseMarket.Order` (EIP-712) off-chain;
//! the node checks it against the index before keeping it, and a kept order is alive only
//! while the chain agrees: its signer still owns the token, its nonce is the seller's current
//! one, it is not cancelled, not expired. Liveness is decided at read time from the same
//! snapshot as the rest of an answer, so a transfer, a cancel or a nonce bump (or their undoing
//! by a reorg) shows at once.

use agora_contracts::{LicenseMarket, TermKind, order_domain};
use alloy::{
    primitives::{Address, B256, U256},
    sol_types::{SolStruct, SolValue},
};
use serde::{Deserialize, Serialize};

use crate::signers::{SignerError, Signers};
use crate::store::{
    Store, StoreError, View,
    tables::{Cancelled, Models, Nonces, OrderRecord, Orders, TokenOrders},
};

/// Most terms one order may carry.
pub const MAX_TERMS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("the signature is not the seller's: {0}")]
    Signature(String),
    #[error("{0}")]
    NotOwner(String),
    #[error("{0}")]
    Terms(String),
    #[error("the order expired at {expiry} (chain time {now})")]
    Expired { expiry: u64, now: u64 },
    #[error("the order's nonce {order} is not the seller's current nonce {current}")]
    StaleNonce { order: U256, current: U256 },
    #[error("the order was cancelled on-chain")]
    Cancelled,
    /// The seller may be a contract wallet, and the chain cannot be asked now.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A term as the API shows and takes it (amounts in wei, decimal strings).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TermJson {
    #[schema(value_type = String)]
    pub kind: TermKind,
    #[serde(default)]
    pub price: String,
    /// Seconds (timed terms).
    #[serde(default)]
    pub duration: u64,
    #[serde(default)]
    pub unit_price: String,
    #[serde(default)]
    pub max_units: String,
}

/// An order as the API shows and takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OrderJson {
    #[schema(value_type = String)]
    pub seller: Address,
    pub token_id: String,
    pub terms: Vec<TermJson>,
    pub nonce: String,
    /// Unix seconds.
    pub expiry: u64,
}

fn amount(text: &str, what: &str) -> Result<U256, OrderError> {
    if text.is_empty() {
        return Ok(U256::ZERO);
    }
    crate::api::parse_u256(text).map_err(|e| OrderError::Terms(format!("{what}: {e}")))
}

impl OrderJson {
    pub fn to_order(&self) -> Result<LicenseMarket::Order, OrderError> {
        let terms = self
            .terms
            .iter()
            .enumerate()
            .map(|(i, t)| {
                Ok(LicenseMarket::Term {
                    kind: t.kind as u8,
                    price: amount(&t.price, &format!("term {i} price"))?,
                    duration: t.duration,
                    unitPrice: amount(&t.unit_price, &format!("term {i} unit_price"))?,
                    maxUnits: amount(&t.max_units, &format!("term {i} max_units"))?,
                })
            })
            .collect::<Result<Vec<_>, OrderError>>()?;
        Ok(LicenseMarket::Order {
            seller: self.seller,
            tokenId: amount(&self.token_id, "token_id")?,
            terms,
            nonce: amount(&self.nonce, "nonce")?,
            expiry: self.expiry,
        })
    }

    pub fn from_order(order: &LicenseMarket::Order) -> Self {
        Self {
            seller: order.seller,
            token_id: order.tokenId.to_string(),
            terms: order
                .terms
                .iter()
                .map(|t| TermJson {
                    kind: TermKind::from_u8(t.kind).unwrap_or(TermKind::Perpetual),
                    price: t.price.to_string(),
                    duration: t.duration,
                    unit_price: t.unitPrice.to_string(),
                    max_units: t.maxUnits.to_string(),
                })
                .collect(),
            nonce: order.nonce.to_string(),
            expiry: order.expiry,
        }
    }
}

/// The hash the seller signs and the contract records (EIP-712 under the market's domain).
pub fn order_hash(order: &LicenseMarket::Order, chain_id: u64, market: Address) -> B256 {
    order.eip712_signing_hash(&order_domain(chain_id, market))
}

/// Terms the contract would refuse at purchase, refused up front.
pub fn check_terms(order: &LicenseMarket::Order) -> Result<(), OrderError> {
    if order.terms.is_empty() {
        return Err(OrderError::Terms("the order has no terms".into()));
    }
    if order.terms.len() > MAX_TERMS {
        return Err(OrderError::Terms(format!(
            "the order has {} terms; at most {MAX_TERMS}",
            order.terms.len()
        )));
    }
    for (i, t) in order.terms.iter().enumerate() {
        let bad = |why: &str| Err(OrderError::Terms(format!("term {i}: {why}")));
        match TermKind::from_u8(t.kind) {
            Some(TermKind::Perpetual) if t.price.is_zero() => {
                return bad("a perpetual license needs a price");
            }
            Some(TermKind::Timed) if t.price.is_zero() => return bad("a timed license needs a price"),
            Some(TermKind::Timed) if t.duration == 0 => return bad("a timed license needs a duration"),
            Some(TermKind::Usage) if !t.price.is_zero() => {
                return bad("usage terms take escrow, not a price");
            }
            Some(TermKind::Usage) if t.unitPrice.is_zero() || t.maxUnits.is_zero() => {
                return bad("usage terms need a unit price and a number of units");
            }
            Some(TermKind::Usage) if t.unitPrice.checked_mul(t.maxUnits).is_none() => {
                return bad("unit price times units overflows");
            }
            None => return bad("unknown kind"),
            _ => {}
        }
    }
    Ok(())
}

/// Why a kept order is not alive now, per one snapshot of the index; `None` when it is.
pub fn dead_reason(
    view: &View<'_>,
    order: &LicenseMarket::Order,
    hash: B256,
    now: u64,
) -> Result<Option<OrderError>, StoreError> {
    if view.get::<Cancelled>(&hash)?.is_some() {
        return Ok(Some(OrderError::Cancelled));
    }
    match view.get::<Models>(&order.tokenId)? {
        Some(model) if model.owner == order.seller => {}
        Some(model) => {
            return Ok(Some(OrderError::NotOwner(format!(
                "the seller {} does not own token {} (its owner is {})",
                order.seller, order.tokenId, model.owner
            ))));
        }
        None => {
            return Ok(Some(OrderError::NotOwner(format!("token {} is not in the index", order.tokenId))));
        }
    }
    let current = view.get::<Nonces>(&order.seller)?.unwrap_or_default();
    if current != order.nonce {
        return Ok(Some(OrderError::StaleNonce { order: order.nonce, current }));
    }
    if now > order.expiry {
        return Ok(Some(OrderError::Expired { expiry: order.expiry, now }));
    }
    Ok(None)
}

/// Where an order came from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// Listed on this node by this caller: kept with its audit entry (`market.list`, the
    /// order's hash and its seller, who signed it).
    Local(&'a crate::registry::Context),
    /// Gossiped by this peer.
    Peer(&'a str),
}

/// Checks a signed order against the index and keeps it. Returns its hash and whether it was
/// new (a duplicate changes nothing).
#[allow(clippy::too_many_arguments)]
pub fn accept(
    store: &Store,
    signers: &Signers,
    order: &LicenseMarket::Order,
    signature: &[u8],
    chain_id: u64,
    market: Address,
    now: u64,
    source: Source<'_>,
) -> Result<(B256, bool), OrderError> {
    let hash = order_hash(order, chain_id, market);
    // kept in the form `purchase` takes, whatever form it came in
    let signature = signers.signed_by(order.seller, &hash, signature).map_err(|e| match e {
        SignerError::NotSigner(why) => OrderError::Signature(why),
        SignerError::Unavailable(why) => OrderError::Unavailable(why),
    })?;
    check_terms(order)?;
    if let Some(reason) = dead_reason(&store.view(), order, hash, now)? {
        return Err(reason);
    }
    if store.get::<Orders>(&hash)?.is_some() {
        return Ok((hash, false));
    }
    let record = OrderRecord {
        order: order.abi_encode(),
        signature,
        received_ms: crate::registry::now_ms(),
        source: match source {
            Source::Local(_) => "local".to_owned(),
            Source::Peer(peer) => peer.to_owned(),
        },
    };
    let mut batch = store.batch();
    batch.put::<Orders>(&hash, &record)?;
    batch.put::<TokenOrders>(&(order.tokenId, hash), &())?;
    match source {
        Source::Local(ctx) => {
            let entry = crate::audit::Entry {
                actor: &ctx.actor.id(),
                action: "market.list",
                object: &format!("order:{hash} seller:{}", order.seller),
                request_id: ctx.request_id.as_deref(),
            };
            crate::audit::Audit::new(store.clone()).commit(batch, entry)?;
        }
        Source::Peer(_) => store.write(batch)?,
    }
    Ok((hash, true))
}

/// [`accept`] at the index's chain time, for the deployment's market.
pub fn accept_now(
    store: &Store,
    signers: &Signers,
    status: crate::chain::indexer::IndexStatus,
    deployment: &agora_contracts::Deployment,
    order: &LicenseMarket::Order,
    signature: &[u8],
    source: Source<'_>,
) -> Result<(B256, bool), OrderError> {
    let now = super::MarketView::new(store, status).chain_now()?;
    accept(store, signers, order, signature, deployment.chain_id, deployment.license_market, now, source)
}

/// A kept order, decoded.
pub fn decode(record: &OrderRecord) -> Option<LicenseMarket::Order> {
    LicenseMarket::Order::abi_decode(&record.order).ok()
}
