//! Liveness, readiness, metrics and the API description.

use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
};
use serde::Serialize;

use super::{AppState, error::ApiError};
use crate::chain::ChainHealth;

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
}

/// Ready when the chain answers, is the deployment's chain, and has the contracts.
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
    match &chain.problem {
        None if chain.is_ready() => Ok(Json(Readiness { status: "ready", chain })),
        Some(problem) => Err(ApiError::chain_unavailable(problem.clone())),
        None => Err(ApiError::chain_unavailable("the chain has not been checked yet")),
    }
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "node", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}
