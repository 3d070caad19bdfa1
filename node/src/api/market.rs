//! The read API of the index: chain status, models, licenses, earnings. Every answer carries
//! `as_of: {block, hash, finality}`.

use axum::{
    Json,
    extract::{Path, Query, State},
};
use serde::Serialize;

use super::{
    AppState,
    error::ApiError,
    params::{self, Params},
};
use crate::{
    chain::indexer::IndexStatus,
    market::{
        AsOf, Earnings, LicenseFilter, LicenseView, MarketView, ModelDetail, ModelFilter, ModelSummary,
    },
};

#[derive(Serialize, utoipa::ToSchema)]
pub struct ChainStatus {
    pub chain_id: u64,
    /// The contracts this node indexes.
    #[schema(value_type = String)]
    pub model_registry: alloy::primitives::Address,
    #[schema(value_type = String)]
    pub license_market: alloy::primitives::Address,
    /// Absent when the deployment predates ComputeMarket (compute brokering off).
    #[schema(value_type = Option<String>)]
    pub compute_market: Option<alloy::primitives::Address>,
    #[serde(flatten)]
    pub index: IndexStatus,
    /// Peers whose index root equals this node's at the same block (peer ids).
    pub peers_agreeing: Vec<String>,
    /// Peers whose index root differs from this node's at the same block: one of the two
    /// indexes is wrong (`agora index verify` rebuilds this node's from the chain to tell).
    pub peers_disagreeing: Vec<String>,
    /// The node's own wallet, when it has one: its address and the transaction it is waiting
    /// on (sent again with higher fees while it waits).
    pub operator: Option<OperatorStatus>,
    pub as_of: AsOf,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct OperatorStatus {
    #[schema(value_type = String)]
    pub address: alloy::primitives::Address,
    pub waiting: Option<crate::chain::operator::Waiting>,
}

fn view(state: &AppState) -> MarketView<'_> {
    MarketView::new(&state.store, state.index.borrow().clone())
}

/// Chain head, indexed and final blocks, lag, state root, reorgs, RPC health.
#[utoipa::path(get, path = "/api/v1/chain/status", tag = "chain", responses((status = 200, body = ChainStatus)))]
pub async fn chain_status(State(state): State<AppState>) -> Result<Json<ChainStatus>, ApiError> {
    let view = view(&state);
    let (peers_agreeing, peers_disagreeing) =
        state.p2p.as_ref().map(|p| p.root_agreement()).unwrap_or_default();
    Ok(Json(ChainStatus {
        chain_id: state.deployment.chain_id,
        model_registry: state.deployment.model_registry,
        license_market: state.deployment.license_market,
        compute_market: state.deployment.has_compute().then_some(state.deployment.compute_market),
        index: state.index.borrow().clone(),
        peers_agreeing,
        peers_disagreeing,
        operator: state
            .operator
            .as_ref()
            .map(|op| OperatorStatus { address: op.signer.address(), waiting: op.waiting() }),
        as_of: view.as_of()?,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelList {
    pub models: Vec<ModelSummary>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    pub as_of: AsOf,
}

/// Models, with filters and cursor pagination (stable order by token id).
#[utoipa::path(
    get,
    path = "/api/v1/marketplace/models",
    tag = "marketplace",
    params(
        ("owner" = Option<String>, Query, description = "owner address"),
        ("q" = Option<String>, Query, description = "text in the metadata URI"),
        ("sort" = Option<String>, Query, description = "recent (default) or oldest"),
        ("limit" = Option<usize>, Query, description = "1 to 100, default 20"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses((status = 200, body = ModelList), (status = 400, body = super::error::ErrorBody))
)]
pub async fn models(
    State(state): State<AppState>,
    Query(q): Query<Params>,
) -> Result<Json<ModelList>, ApiError> {
    params::only(&q, &["owner", "q", "sort", "limit", "cursor"])?;
    let filter = ModelFilter {
        owner: params::address(&q, "owner")?,
        text: q.get("q").cloned(),
        newest_first: params::one_of(&q, "sort", &["recent", "oldest"], "recent")? == "recent",
        limit: params::limit(&q, 20, 100)?,
        after: params::u256(&q, "cursor")?,
    };
    let view = view(&state);
    let page = view.models(&filter)?;
    Ok(Json(ModelList {
        models: page.items,
        next_cursor: page.next.map(|n| n.to_string()),
        as_of: view.as_of()?,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelAnswer {
    pub model: ModelDetail,
    pub as_of: AsOf,
}

/// One model: owner, versions with content hashes, splits, license counts by kind.
#[utoipa::path(
    get,
    path = "/api/v1/marketplace/models/{token_id}",
    tag = "marketplace",
    params(("token_id" = String, Path, description = "decimal or 0x-hex token id")),
    responses((status = 200, body = ModelAnswer), (status = 404, body = super::error::ErrorBody))
)]
pub async fn model(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<ModelAnswer>, ApiError> {
    let id = params::path_id("token id", &raw)?;
    let view = view(&state);
    let model = view.model(id)?.ok_or_else(|| ApiError::not_found(format!("no model with token id {id}")))?;
    Ok(Json(ModelAnswer { model, as_of: view.as_of()? }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct EarningsAnswer {
    pub earnings: Earnings,
    pub as_of: AsOf,
}

/// Credited, withdrawn and withdrawable wei of an address, per model.
#[utoipa::path(
    get,
    path = "/api/v1/marketplace/earnings",
    tag = "marketplace",
    params(("address" = String, Query, description = "the recipient")),
    responses((status = 200, body = EarningsAnswer), (status = 400, body = super::error::ErrorBody))
)]
pub async fn earnings(
    State(state): State<AppState>,
    Query(q): Query<Params>,
) -> Result<Json<EarningsAnswer>, ApiError> {
    params::only(&q, &["address"])?;
    let address = params::required(params::address(&q, "address")?, "address")?;
    let view = view(&state);
    Ok(Json(EarningsAnswer { earnings: view.earnings(address)?, as_of: view.as_of()? }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LicenseList {
    pub licenses: Vec<LicenseView>,
    pub next_cursor: Option<String>,
    pub as_of: AsOf,
}

/// Licenses by holder and/or model.
#[utoipa::path(
    get,
    path = "/api/v1/licenses",
    tag = "licenses",
    params(
        ("holder" = Option<String>, Query, description = "holder address"),
        ("token_id" = Option<String>, Query, description = "model token id"),
        ("limit" = Option<usize>, Query, description = "1 to 500, default 100"),
        ("cursor" = Option<String>, Query, description = "next_cursor of the previous page"),
    ),
    responses((status = 200, body = LicenseList), (status = 400, body = super::error::ErrorBody))
)]
pub async fn licenses(
    State(state): State<AppState>,
    Query(q): Query<Params>,
) -> Result<Json<LicenseList>, ApiError> {
    params::only(&q, &["holder", "token_id", "limit", "cursor"])?;
    let filter = LicenseFilter {
        holder: params::address(&q, "holder")?,
        token_id: params::u256(&q, "token_id")?,
        limit: params::limit(&q, 100, 500)?,
        after: params::u256(&q, "cursor")?,
    };
    let view = view(&state);
    let page = view.licenses(&filter)?;
    Ok(Json(LicenseList {
        licenses: page.items,
        next_cursor: page.next.map(|n| n.to_string()),
        as_of: view.as_of()?,
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LicenseAnswer {
    pub license: LicenseView,
    pub as_of: AsOf,
}

/// One license: kind, holder, expiry, whether active now, escrow, purchase tx and block.
#[utoipa::path(
    get,
    path = "/api/v1/licenses/{license_id}",
    tag = "licenses",
    params(("license_id" = String, Path, description = "decimal or 0x-hex license id")),
    responses((status = 200, body = LicenseAnswer), (status = 404, body = super::error::ErrorBody))
)]
pub async fn license(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<LicenseAnswer>, ApiError> {
    let id = params::path_id("license id", &raw)?;
    let view = view(&state);
    let license = view.license(id)?.ok_or_else(|| ApiError::not_found(format!("no license with id {id}")))?;
    Ok(Json(LicenseAnswer { license, as_of: view.as_of()? }))
}
