//! The order book over HTTP: sellers list signed orders, buyers fetch them and get the
//! transaction that buys a term (signed and sent from their own wallet, or relayed here).

use agora_contracts::{LicenseMarket, TermKind};
use alloy::sol_types::SolValue as _;
use alloy::{
    consensus::{Transaction, TxEnvelope},
    eips::eip2718::Decodable2718,
    primitives::B256,
    providers::Provider,
    sol_types::SolCall,
};
use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use serde::{Deserialize, Serialize};

use super::{AppState, auth, error::ApiError, registry::json};
use crate::market::{
    MarketView, OrderView,
    orders::{self, OrderError, OrderJson},
};

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        let status = match &e {
            OrderError::Signature(_) => StatusCode::UNAUTHORIZED,
            OrderError::NotOwner(_) => StatusCode::FORBIDDEN,
            OrderError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            OrderError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::UNPROCESSABLE_ENTITY,
        };
        let code = match &e {
            OrderError::Signature(_) => "bad_signature",
            OrderError::NotOwner(_) => "not_owner",
            OrderError::Terms(_) => "invalid_terms",
            OrderError::Expired { .. } => "expired",
            OrderError::StaleNonce { .. } => "stale_nonce",
            OrderError::Cancelled => "cancelled",
            OrderError::Store(_) => "storage_error",
            OrderError::Unavailable(_) => "chain_unavailable",
        };
        ApiError::new(status, code, e.to_string())
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    pub order: OrderJson,
    /// The seller's EIP-712 signature, 0x-hex.
    pub signature: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Listed {
    #[schema(value_type = String)]
    pub order_hash: B256,
    /// False when the node already had it.
    pub new: bool,
}

/// Lists a signed order: checked against the index (signature, owner, nonce, terms, expiry)
/// and kept while the chain agrees. 201 when new, 200 for a duplicate.
#[utoipa::path(
    post,
    path = "/api/v1/marketplace/list",
    tag = "marketplace",
    request_body = ListRequest,
    responses(
        (status = 201, body = Listed),
        (status = 200, body = Listed),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody),
    )
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Listed>), ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let request: ListRequest = json(&body)?;
    let order = request.order.to_order()?;
    let signature = alloy::primitives::hex::decode(request.signature.trim()).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("`signature` is not hex: {e}"))
    })?;
    let store = state.store.clone();
    let deployment = state.deployment.clone();
    let signers = state.signers.clone();
    let index = state.index.borrow().clone();
    let gossip = (order.abi_encode(), signature.clone());
    let (hash, new) = tokio::task::spawn_blocking(move || {
        let source = orders::Source::Local(&ctx);
        orders::accept_now(&store, &signers, index, &deployment, &order, &signature, source)
    })
    .await??;
    if new && let Some(p2p) = &state.p2p {
        p2p.publish_order(gossip.0, gossip.1).await;
    }
    Ok((if new { StatusCode::CREATED } else { StatusCode::OK }, Json(Listed { order_hash: hash, new })))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct OrderAnswer {
    #[serde(flatten)]
    pub order: OrderView,
    /// `active`, or why not: `cancelled`, `not_owner`, `stale_nonce`, `expired`.
    pub status: String,
    pub reason: Option<String>,
}

fn status_of(dead: &Option<OrderError>) -> (String, Option<String>) {
    match dead {
        None => ("active".into(), None),
        Some(e) => {
            let code = match e {
                OrderError::Cancelled => "cancelled",
                OrderError::NotOwner(_) => "not_owner",
                OrderError::StaleNonce { .. } => "stale_nonce",
                OrderError::Expired { .. } => "expired",
                _ => "invalid",
            };
            (code.into(), Some(e.to_string()))
        }
    }
}

fn parse_hash(raw: &str) -> Result<B256, ApiError> {
    raw.parse::<B256>().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("order hash `{raw}` is not 32 bytes of 0x-hex"),
        )
    })
}

async fn load(state: &AppState, hash: B256) -> Result<(OrderView, Option<OrderError>), ApiError> {
    let store = state.store.clone();
    let index = state.index.borrow().clone();
    tokio::task::spawn_blocking(move || {
        let view = MarketView::new(&store, index);
        let now = view.chain_now()?;
        view.order(hash, now)
    })
    .await??
    .ok_or_else(|| ApiError::not_found(format!("no order {hash}")))
}

/// One order, alive or not (with why not).
#[utoipa::path(
    get,
    path = "/api/v1/marketplace/orders/{order_hash}",
    tag = "marketplace",
    params(("order_hash" = String, Path)),
    responses((status = 200, body = OrderAnswer), (status = 404, body = super::error::ErrorBody))
)]
pub async fn order(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<OrderAnswer>, ApiError> {
    let (order, dead) = load(&state, parse_hash(&raw)?).await?;
    let (status, reason) = status_of(&dead);
    Ok(Json(OrderAnswer { order, status, reason }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PurchaseRequest {
    #[schema(value_type = Option<String>)]
    pub order_hash: Option<B256>,
    /// `perpetual`, `timed` or `usage`: the first term of that kind.
    #[schema(value_type = Option<String>)]
    pub term: Option<TermKind>,
    /// Or the term's index in the order.
    pub term_index: Option<u8>,
    /// Usage terms: how many units to escrow (at most the term's `max_units`).
    pub units: Option<String>,
    /// The buyer, to estimate gas for.
    #[schema(value_type = Option<String>)]
    pub from: Option<alloy::primitives::Address>,
    /// A signed raw transaction (0x-hex) to relay instead, for clients without their own RPC.
    pub raw_transaction: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PurchaseAnswer {
    /// The market contract.
    pub to: String,
    /// Calldata, 0x-hex.
    pub data: String,
    /// Wei to send, decimal.
    pub value: String,
    pub chain_id: u64,
    pub term_index: u8,
    /// Suggested gas limit, when `from` was given.
    pub gas: Option<u64>,
    /// The relayed transaction's hash, when `raw_transaction` was given.
    pub tx_hash: Option<String>,
}

fn unprocessable(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
}

/// The transaction that buys a term of an order (to sign and send from the buyer's wallet),
/// or, given `raw_transaction`, relays a signed purchase to the chain.
#[utoipa::path(
    post,
    path = "/api/v1/marketplace/purchase",
    tag = "marketplace",
    request_body = PurchaseRequest,
    responses(
        (status = 200, body = PurchaseAnswer),
        (status = 400, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody),
        (status = 503, body = super::error::ErrorBody),
    )
)]
pub async fn purchase(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<PurchaseAnswer>, ApiError> {
    let request: PurchaseRequest = json(&body)?;
    let market = state.deployment.license_market;
    if let Some(raw) = &request.raw_transaction {
        let bytes = alloy::primitives::hex::decode(raw.trim()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("`raw_transaction` is not hex: {e}"),
            )
        })?;
        let tx = TxEnvelope::decode_2718(&mut bytes.as_slice()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                format!("`raw_transaction` is not a signed transaction: {e}"),
            )
        })?;
        if tx.to() != Some(market) || tx.input().get(..4) != Some(&LicenseMarket::purchaseCall::SELECTOR[..])
        {
            return Err(unprocessable(
                "not_a_purchase",
                "this node relays only purchases from the license market",
            ));
        }
        let pending =
            state.provider.send_raw_transaction(&bytes).await.map_err(|e| {
                unprocessable("relay_refused", format!("the chain refused the transaction: {e}"))
            })?;
        let data = alloy::primitives::hex::encode_prefixed(tx.input());
        return Ok(Json(PurchaseAnswer {
            to: market.to_string(),
            data,
            value: tx.value().to_string(),
            chain_id: state.deployment.chain_id,
            term_index: 0,
            gas: Some(tx.gas_limit()),
            tx_hash: Some(pending.tx_hash().to_string()),
        }));
    }
    let hash = request.order_hash.ok_or_else(|| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "give `order_hash` (or `raw_transaction`)")
    })?;
    let (view, dead) = load(&state, hash).await?;
    if let Some(reason) = dead {
        return Err(unprocessable("order_not_active", format!("order {hash} cannot be bought: {reason}")));
    }
    let order = view.order.to_order()?;
    let term_index = match (request.term_index, request.term) {
        (Some(i), _) => i,
        (None, Some(kind)) => order
            .terms
            .iter()
            .position(|t| t.kind == kind as u8)
            .map(|i| i as u8)
            .ok_or_else(|| unprocessable("no_such_term", format!("the order has no {kind:?} term")))?,
        (None, None) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                "give `term` or `term_index`",
            ));
        }
    };
    let term = order.terms.get(term_index as usize).ok_or_else(|| {
        unprocessable(
            "no_such_term",
            format!("the order has {} terms; no index {term_index}", order.terms.len()),
        )
    })?;
    let value = match TermKind::from_u8(term.kind) {
        Some(TermKind::Usage) => {
            let units = request.units.as_deref().ok_or_else(|| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "usage terms need `units` to escrow")
            })?;
            let units = super::parse_u256(units).map_err(|e| {
                ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("`units`: {e}"))
            })?;
            if units.is_zero() || units > term.maxUnits {
                return Err(unprocessable("bad_units", format!("units must be 1 to {}", term.maxUnits)));
            }
            term.unitPrice * units
        }
        _ => term.price,
    };
    let signature = alloy::primitives::hex::decode(&view.signature).unwrap_or_default();
    let data = LicenseMarket::purchaseCall { order, signature: signature.into(), termIndex: term_index }
        .abi_encode();
    let gas =
        match request.from {
            Some(from) => {
                let tx = alloy::rpc::types::TransactionRequest::default()
                    .from(from)
                    .to(market)
                    .value(value)
                    .input(data.clone().into());
                Some(
                    state.provider.estimate_gas(tx).await.map_err(|e| {
                        unprocessable("would_revert", format!("the purchase would fail: {e}"))
                    })?,
                )
            }
            None => None,
        };
    Ok(Json(PurchaseAnswer {
        to: market.to_string(),
        data: alloy::primitives::hex::encode_prefixed(&data),
        value: value.to_string(),
        chain_id: state.deployment.chain_id,
        term_index,
        gas,
        tx_hash: None,
    }))
}
