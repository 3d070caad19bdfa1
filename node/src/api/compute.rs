//! Compute brokering: offers, training requirements, cost estimates, reservations.

use axum::{
    Json,
    extract::{Query, State},
    http::StatusCode,
};
use serde::{Deserialize, Serialize};

use super::{
    AppState,
    error::ApiError,
    params::{self, Params},
    registry::json,
};
use crate::compute::{
    AccountView, ComputeError, RequirementsQuery, ReservationView,
    estimate::{Constraints, Requirements, Selection},
    jobs::{JobRecord, TriggerRequest},
    offers::{OfferError, OfferJson, OfferView},
};

impl From<ComputeError> for ApiError {
    fn from(e: ComputeError) -> Self {
        match e {
            ComputeError::NoMarket => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "compute_disabled", e.to_string())
            }
            ComputeError::Invalid(m) => Self::new(StatusCode::BAD_REQUEST, "invalid_parameter", m),
            ComputeError::Infeasible(i) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "infeasible", i.to_string())
            }
            ComputeError::Unconfirmed(m) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "not_confirmed", m),
            ComputeError::Offer(OfferError::Store(e)) | ComputeError::Store(e) => e.into(),
            ComputeError::Offer(OfferError::NoMarket) => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "compute_disabled", e.to_string())
            }
            ComputeError::Offer(o) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_offer", o.to_string())
            }
            ComputeError::Registry(r) => r.into(),
        }
    }
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct OfferList {
    pub offers: Vec<OfferView>,
}

/// Compute offers this node knows (its own and its peers'), cheapest per GPU-hour first.
#[utoipa::path(get, path = "/api/v1/compute/offers", tag = "compute", responses((status = 200, body = OfferList), (status = 503, body = super::error::ErrorBody)))]
pub async fn offers(State(state): State<AppState>) -> Result<Json<OfferList>, ApiError> {
    let compute = state.compute.clone();
    let offers = tokio::task::spawn_blocking(move || compute.offers()).await??;
    Ok(Json(OfferList { offers }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PostOffer {
    pub offer: OfferJson,
    /// The provider's EIP-712 signature (0x-hex, 65 bytes).
    pub signature: String,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct OfferPosted {
    pub hash: String,
    /// False when the node already had it.
    pub new: bool,
}

/// Posts a provider-signed offer: checked like a gossiped one, kept, and gossiped to peers.
#[utoipa::path(post, path = "/api/v1/compute/offers", tag = "compute", request_body = PostOffer, responses((status = 201, body = OfferPosted), (status = 200, body = OfferPosted), (status = 400, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn post_offer(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<OfferPosted>), ApiError> {
    let request: PostOffer = json(&body)?;
    let offer = request.offer.to_offer().map_err(ComputeError::from)?;
    let signature = alloy::hex::decode(request.signature.trim()).map_err(|e| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", format!("`signature` is not hex: {e}"))
    })?;
    let (hash, new) = state.compute.post_offer(&offer, &signature).await?;
    let status = if new { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(OfferPosted { hash: hash.to_string(), new })))
}

fn requirements_query(params: &Params) -> Result<RequirementsQuery, ApiError> {
    let u32_param = |name: &str| -> Result<Option<u32>, ApiError> {
        params::u64(params, name)?
            .map(|v| {
                u32::try_from(v).map_err(|_| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_parameter",
                        format!("parameter `{name}`: too large"),
                    )
                })
            })
            .transpose()
    };
    Ok(RequirementsQuery {
        name: params::required(params.get("name").cloned(), "name")?,
        version: u32_param("version")?,
        dataset_rows: params::u64(params, "dataset_rows")?,
        dataset_tokens: params::u64(params, "dataset_tokens")?,
        epochs: u32_param("epochs")?,
        batch: params::u64(params, "batch")?,
        sequence: params::u64(params, "sequence")?,
    })
}

/// What training a registered version takes: parameters (from its safetensors header), FLOPs,
/// memory, and GPU-hours per GPU model. The formulas are in the README.
#[utoipa::path(get, path = "/api/v1/models/training-requirements", tag = "compute", params(RequirementsQuery), responses((status = 200, body = Requirements), (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn training_requirements(
    State(state): State<AppState>,
    Query(params): Query<Params>,
) -> Result<Json<Requirements>, ApiError> {
    params::only(
        &params,
        &["name", "version", "dataset_rows", "dataset_tokens", "epochs", "batch", "sequence"],
    )?;
    let query = requirements_query(&params)?;
    let compute = state.compute.clone();
    Ok(Json(tokio::task::spawn_blocking(move || compute.requirements(&query)).await??))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EstimateRequest {
    /// Requirements as `training-requirements` answers them; or name the model below.
    #[serde(default)]
    pub requirements: Option<Requirements>,
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub version: Option<u32>,
    #[serde(default)]
    pub dataset_rows: Option<u64>,
    #[serde(default)]
    pub dataset_tokens: Option<u64>,
    #[serde(default)]
    pub epochs: Option<u32>,
    #[serde(default)]
    pub batch: Option<u64>,
    #[serde(default)]
    pub constraints: Constraints,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct Estimate {
    pub requirements: Requirements,
    #[serde(flatten)]
    pub selection: Selection,
}

/// Prices every live offer for a training run and chooses one: the cheapest that meets the
/// deadline (ties: more reliable provider, then lower latency). 422 names the constraint no
/// offer meets.
#[utoipa::path(post, path = "/api/v1/models/estimate-cost", tag = "compute", request_body = EstimateRequest, responses((status = 200, body = Estimate), (status = 400, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn estimate_cost(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<Estimate>, ApiError> {
    let request: EstimateRequest = json(&body)?;
    let compute = state.compute.clone();
    let estimate = tokio::task::spawn_blocking(move || -> Result<Estimate, ApiError> {
        let requirements = match (request.requirements, request.model) {
            (Some(r), None) => r,
            (None, Some(name)) => compute.requirements(&RequirementsQuery {
                name,
                version: request.version,
                dataset_rows: request.dataset_rows,
                dataset_tokens: request.dataset_tokens,
                epochs: request.epochs,
                batch: request.batch,
                sequence: None,
            })?,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_body",
                    "give either `requirements` or `model` (with the dataset size), not both",
                ));
            }
        };
        let selection = compute.estimate(&requirements, &request.constraints)?;
        Ok(Estimate { requirements, selection })
    })
    .await??;
    Ok(Json(estimate))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ReservationList {
    pub reservations: Vec<ReservationView>,
}

/// Compute reservations (compute futures) in the index, newest first; `holder` and `provider`
/// filter by address.
#[utoipa::path(get, path = "/api/v1/compute/reservations", tag = "compute", params(("holder" = Option<String>, Query), ("provider" = Option<String>, Query)), responses((status = 200, body = ReservationList), (status = 400, body = super::error::ErrorBody)))]
pub async fn reservations(
    State(state): State<AppState>,
    Query(params): Query<Params>,
) -> Result<Json<ReservationList>, ApiError> {
    params::only(&params, &["holder", "provider"])?;
    let holder = params::address(&params, "holder")?;
    let provider = params::address(&params, "provider")?;
    let compute = state.compute.clone();
    let reservations = tokio::task::spawn_blocking(move || compute.reservations(holder, provider)).await??;
    Ok(Json(ReservationList { reservations }))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuTable {
    pub utilisation: f64,
    pub gpus: Vec<GpuRow>,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct GpuRow {
    pub gpu: String,
    /// Peak dense bf16 TFLOP/s.
    pub tflops: f64,
    pub memory_gb: u32,
}

/// The throughput table estimates use (built in, extended by `[[compute.gpus]]`).
#[utoipa::path(get, path = "/api/v1/compute/gpus", tag = "compute", responses((status = 200, body = GpuTable)))]
pub async fn gpus(State(state): State<AppState>) -> Json<GpuTable> {
    let t = state.compute.throughput();
    Json(GpuTable {
        utilisation: t.utilisation,
        gpus: t
            .gpus
            .iter()
            .map(|(gpu, tflops, memory_gb)| GpuRow {
                gpu: gpu.clone(),
                tflops: *tflops,
                memory_gb: *memory_gb,
            })
            .collect(),
    })
}

/// An account in ComputeMarket: the nonce its next offers carry, what it earned as a provider,
/// what came back to it as a holder, and what it can withdraw.
#[utoipa::path(get, path = "/api/v1/compute/accounts/{address}", tag = "compute", params(("address" = String, Path)), responses((status = 200, body = AccountView), (status = 400, body = super::error::ErrorBody)))]
pub async fn account(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    let address: alloy::primitives::Address = raw.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", format!("`{raw}` is not an address"))
    })?;
    let compute = state.compute.clone();
    Ok(Json(tokio::task::spawn_blocking(move || compute.account(address)).await??))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobList {
    pub jobs: Vec<JobRecord>,
}

/// Schedules a training run of a registered MLP on reserved compute: estimates it, picks the
/// cheapest feasible offer, reserves it from the operator wallet and sends the job at the
/// start time. The model's owner or the operator.
#[utoipa::path(post, path = "/api/v1/retraining/trigger", tag = "compute", request_body = TriggerRequest, responses((status = 201, body = JobRecord), (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn trigger(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    let ctx = super::auth::api_caller(&state, &headers)?;
    let request: TriggerRequest = json(&body)?;
    let job = state.compute.trigger(&ctx, request).await?;
    Ok((StatusCode::CREATED, Json(job)))
}

/// Training jobs: the ones this node scheduled (`role: buyer`: reservation, provider, start,
/// status, cost, losses, the version it produced) and the ones it runs as a provider.
#[utoipa::path(get, path = "/api/v1/training/scheduled", tag = "compute", responses((status = 200, body = JobList)))]
pub async fn scheduled(State(state): State<AppState>) -> Result<Json<JobList>, ApiError> {
    let compute = state.compute.clone();
    Ok(Json(JobList { jobs: tokio::task::spawn_blocking(move || compute.jobs()).await?? }))
}

/// One training job.
#[utoipa::path(get, path = "/api/v1/training/jobs/{id}", tag = "compute", params(("id" = u64, Path)), responses((status = 200, body = JobRecord), (status = 404, body = super::error::ErrorBody)))]
pub async fn job(
    State(state): State<AppState>,
    axum::extract::Path(raw): axum::extract::Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    let id: u64 = raw.parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", format!("job id `{raw}` is not a number"))
    })?;
    let compute = state.compute.clone();
    Ok(Json(tokio::task::spawn_blocking(move || compute.job(id)).await??))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationConfirmed {
    pub reservation_id: String,
    /// The provider's `confirmStart` transaction.
    pub tx: String,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfirmationChecked {
    pub reservation_id: String,
    pub confirmed_at: u64,
    /// The job this node runs on the reservation, now `running`.
    pub job: Option<u64>,
}

/// A provider tells the buyer's node that a reservation is confirmed, naming its
/// `confirmStart` transaction; the node checks the transaction on the chain (a successful
/// `Confirmed` event of this deployment's ComputeMarket for that reservation) before it
/// believes it. 422 when the chain does not show it.
#[utoipa::path(post, path = "/api/v1/compute/reservation-confirmed", tag = "compute", request_body = ReservationConfirmed, responses((status = 200, body = ConfirmationChecked), (status = 400, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn reservation_confirmed(
    State(state): State<AppState>,
    body: axum::body::Bytes,
) -> Result<Json<ConfirmationChecked>, ApiError> {
    let request: ReservationConfirmed = json(&body)?;
    let id = params::path_id("reservation id", &request.reservation_id)?;
    let tx: alloy::primitives::B256 = request.tx.trim().parse().map_err(|_| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", "`tx` is not a 32-byte transaction hash")
    })?;
    let (confirmed_at, job) = state.compute.check_confirmation(&state.provider, id, tx).await?;
    Ok(Json(ConfirmationChecked { reservation_id: id.to_string(), confirmed_at, job }))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyList {
    pub policies: Vec<crate::compute::policies::PolicyView>,
}

/// Retraining policies: each a schedule (cron) or manual, with its next and last run.
#[utoipa::path(get, path = "/api/v1/retraining/policies", tag = "compute", responses((status = 200, body = PolicyList)))]
pub async fn policies(State(state): State<AppState>) -> Json<PolicyList> {
    Json(PolicyList { policies: state.compute.policies() })
}

/// Runs a retraining policy now (the operator).
#[utoipa::path(post, path = "/api/v1/retraining/policies/{name}/run", tag = "compute", params(("name" = String, Path)), responses((status = 201, body = JobRecord), (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody)))]
pub async fn run_policy(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    let ctx = super::auth::api_caller(&state, &headers)?;
    if !matches!(ctx.actor, crate::registry::Actor::Operator) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "only the node's operator runs retraining policies",
        ));
    }
    let job = state.compute.run_policy(&name).await?;
    Ok((StatusCode::CREATED, Json(job)))
}
