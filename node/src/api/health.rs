//! Liveness, readiness, metrics and the API description.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use serde::Serialize;

use super::{AppState, error::ApiError};
use crate::chain::{ChainHealth, indexer::IndexStatus};

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
    pub uptime_secs: u64,
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "node", responses((status = 200, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
        uptime_secs: state.started.elapsed().as_secs(),
    })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    pub status: &'static str,
    pub chain: ChainHealth,
    pub index: IndexStatus,
}

/// Ready when the chain answers, is the deployment's chain and has the contracts, and the index
/// is running and within `AGORA_READY_MAX_LAG` blocks of the head.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "node",
    responses(
        (status = 200, description = "ready", body = Readiness),
        (status = 503, description = "not ready, with the reason", body = super::error::ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Readiness>, ApiError> {
    let chain = state.chain.borrow().clone();
    let index = state.index.borrow().clone();
    if let Some(problem) = &chain.problem {
        return Err(ApiError::chain_unavailable(problem.clone()));
    }
    if !chain.is_ready() {
        return Err(ApiError::chain_unavailable("the chain has not been checked yet"));
    }
    if let Some(fatal) = &index.fatal {
        return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "index_stopped", fatal.clone()));
    }
    if let Some(error) = index.rpc_error.as_ref().filter(|_| !index.rpc_healthy) {
        return Err(ApiError::chain_unavailable(format!("the indexer cannot reach the chain: {error}")));
    }
    match index.lag {
        None => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "index_behind",
            "the index has not caught up with the chain yet",
        )),
        Some(lag) if lag > state.ready_max_lag => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "index_behind",
            format!("the index is {lag} blocks behind the head (ready at {} or fewer)", state.ready_max_lag),
        )),
        Some(_) => Ok(Json(Readiness { status: "ready", chain, index })),
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "node", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    // usage totals are read from the store when asked for, so every node has them (settling
    // or not) and they are never stale; a read per usage license, off the async workers
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || crate::serve::settle::UsageTotals::read(&store)).await {
        Ok(Ok(totals)) => totals.publish(),
        Ok(Err(e)) => tracing::warn!(target: "agora::api", error = %e, "cannot read the usage totals"),
        Err(e) => tracing::warn!(target: "agora::api", error = %e, "cannot read the usage totals"),
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
