//! The HTTP API: axum routers per area, one error mapping ([`error`]), and an OpenAPI
//! description generated from the handlers (served at `/openapi.json`).
//!
//! Handlers are thin: they parse, call a domain service, and map its answer. Every request is
//! counted and timed per route in `/metrics`.

mod audit;
pub mod auth;
mod compute;
mod delivery;
mod deploy;
pub mod error;
mod health;
mod market;
mod mlflow;
mod orders;
mod p2p;
mod params;
mod tracking;
pub use params::parse_u256;
mod registry;
mod signin;
mod transfer;

use std::{net::SocketAddr, sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{MatchedPath, Request},
    middleware::{self, Next},
    response::Response,
    routing::get,
};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::{
    chain::{ChainHealth, indexer::IndexStatus},
    store::Store,
};

/// What handlers share: one allocation behind an `Arc`, so the clone axum makes for every
/// request is one reference count, not one per field (a few dozen atomics and a path).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The node's parts, as the handlers see them.
pub struct Shared {
    pub chain: watch::Receiver<ChainHealth>,
    pub index: watch::Receiver<IndexStatus>,
    pub store: Store,
    pub deployment: agora_contracts::Deployment,
    /// Not ready while the index lags the head by more blocks than this.
    pub ready_max_lag: u64,
    pub metrics: PrometheusHandle,
    pub started: Instant,
    pub registry: crate::registry::Registry,
    /// Experiments and runs (MLflow's tracking API).
    pub tracking: crate::tracking::Tracking,
    pub auth: auth::Auth,
    pub sessions: crate::auth::Sessions,
    /// The chain, for relaying and gas estimates.
    pub provider: alloy::providers::DynProvider,
    /// The node's watermark master key (commitments now, marked copies with the flows).
    pub watermark_key: Arc<agora_watermark::MasterKey>,
    /// Fingerprinted copies for license holders.
    pub delivery: crate::market::delivery::Delivery,
    /// Deployments.
    pub serve: crate::serve::Serve,
    /// Serialises metered calls per license and writes their vouchers in synced groups.
    pub meter: crate::serve::metering::Meter,
    /// Checks signed orders and vouchers: keys, and contract wallets (ERC-1271).
    pub signers: crate::signers::Signers,
    /// Usage licenses whose settlement keeps failing (empty when the node does not settle).
    pub settle_failures: crate::serve::settle::Failures,
    /// The node's own wallet (absent without `AGORA_OPERATOR_KEY`).
    pub operator: Option<crate::chain::operator::Operator>,
    /// Rate limit of `POST /api/v1/audit/trace`.
    pub trace_limiter: audit::TraceLimiter,
    /// For private temporary files (uploads being checked).
    pub data_dir: std::path::PathBuf,
    /// Largest upload, in bytes.
    pub max_upload: u64,
    /// The peer-to-peer network (absent when the node runs without it).
    pub p2p: Option<crate::p2p::P2p>,
    /// Compute offers, estimates and reservations.
    pub compute: crate::compute::Compute,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Agora node API", description = "Marketplace, registry and MLOps node for machine-learning models anchored on an EVM chain."),
    tags(
        (name = "node", description = "Health, readiness, metrics"),
        (name = "chain", description = "The chain index"),
        (name = "marketplace", description = "Models, listings, earnings"),
        (name = "licenses", description = "Licenses"),
        (name = "audit", description = "The hash-chained audit log"),
        (name = "auth", description = "Sign-in with Ethereum (EIP-4361) and session tokens"),
        (name = "p2p", description = "Peers, gossip, index roots compared between nodes, blobs exchanged by hash"),
        (name = "compute", description = "Compute offers, training requirements, cost estimates, reservations (compute futures)"),
        (name = "deployments", description = "Models served by the node behind the license gate"),
        (name = "registry", description = "Registered models, versions, stages, metrics, files (MLflow's registry API is served too, under /api/2.0/mlflow)"),
    )
)]
struct ApiDoc;

/// The routes and their OpenAPI description.
pub fn router(state: AppState) -> Router {
    let (router, api) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(health::healthz))
        .routes(routes!(health::readyz))
        .routes(routes!(health::metrics))
        .routes(routes!(market::chain_status))
        .routes(routes!(market::models))
        .routes(routes!(market::model))
        .routes(routes!(market::earnings))
        .routes(routes!(market::licenses))
        .routes(routes!(market::license))
        .routes(routes!(audit::log))
        .routes(routes!(audit::trace))
        .routes(routes!(delivery::download))
        .routes(routes!(delivery::receipt))
        .routes(routes!(deploy::create))
        .routes(routes!(deploy::list))
        .routes(routes!(deploy::get, deploy::delete))
        .routes(routes!(deploy::predict))
        .routes(routes!(deploy::traffic))
        .routes(routes!(deploy::reset_drift))
        .routes(routes!(deploy::usage))
        .routes(routes!(deploy::receipts))
        .routes(routes!(p2p::status))
        .routes(routes!(p2p::peers))
        .routes(routes!(p2p::blobs))
        .routes(routes!(p2p::share))
        .routes(routes!(p2p::unshare))
        .routes(routes!(p2p::fetch))
        .routes(routes!(compute::offers, compute::post_offer))
        .routes(routes!(compute::training_requirements))
        .routes(routes!(compute::estimate_cost))
        .routes(routes!(compute::reservations))
        .routes(routes!(compute::gpus))
        .routes(routes!(compute::account))
        .routes(routes!(compute::trigger))
        .routes(routes!(compute::scheduled))
        .routes(routes!(compute::job))
        .routes(routes!(compute::reservation_confirmed))
        .routes(routes!(compute::policies))
        .routes(routes!(compute::run_policy))
        .routes(routes!(orders::list))
        .routes(routes!(orders::order))
        .routes(routes!(orders::purchase))
        .routes(routes!(signin::nonce))
        .routes(routes!(signin::login))
        .routes(routes!(registry::model))
        .routes(routes!(registry::versions))
        .routes(routes!(registry::stage))
        .routes(routes!(registry::metrics))
        .routes(routes!(registry::log_metrics))
        .routes(routes!(registry::artifact))
        .routes(routes!(registry::webhooks))
        .routes(routes!(tracking::gc))
        .routes(routes!(registry::artifacts_gc))
        .split_for_parts();
    // Uploads are bounded by AGORA_MAX_UPLOAD as they stream, not by axum's buffered-body limit.
    let register = OpenApiRouter::new()
        .routes(routes!(registry::register))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .split_for_parts();
    let mut api = api;
    api.merge(register.1);
    let api = Arc::new(api);
    router
        .merge(register.0)
        .merge(mlflow::routes())
        .route("/openapi.json", get(move || async move { Json(api.as_ref().clone()) }))
        .fallback(|| async { error::ApiError::not_found("no such endpoint") })
        .layer(middleware::from_fn(track))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

async fn track(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().to_string();
    let response = next.run(request).await;
    let labels = [("method", method), ("route", route), ("status", response.status().as_u16().to_string())];
    metrics::counter!("agora_http_requests_total", &labels).increment(1);
    metrics::histogram!("agora_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}; choose another address with --http-addr or AGORA_HTTP_ADDR")]
pub struct BindError {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds the listener (separately from serving, so a busy port is reported at once).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
    tokio::net::TcpListener::bind(addr).await.map_err(|source| BindError { addr, source })
}

/// Serves until `shutdown` flips to true, then finishes in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}
