//! Deployments over HTTP: create, list, show, remove, and predict behind the license gate.

use agora_contracts::TermKind;
use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
};
use serde::{Deserialize, Serialize};

use super::{AppState, auth, error::ApiError, registry::json};
use crate::{
    registry::Actor,
    serve::{DeploymentView, ServeError},
    store::tables::{HolderLicenses, Licenses},
};

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        match e {
            ServeError::NotFound(_) => ApiError::not_found(e.to_string()),
            ServeError::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", e.to_string()),
            ServeError::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
            ServeError::NotReady { .. } => ApiError::new(StatusCode::CONFLICT, "not_ready", e.to_string()),
            ServeError::Model(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "model_error", e.to_string())
            }
            ServeError::Registry(r) => r.into(),
            ServeError::Store(s) => s.into(),
        }
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// Registered model name.
    pub model: String,
    /// A version number, or an `alias`; the newest version when neither is given.
    pub version: Option<u32>,
    pub alias: Option<String>,
    /// `builtin` (in-process).
    #[serde(default = "builtin")]
    pub runtime: String,
    /// Units a call costs per input row (usage licenses).
    #[serde(default = "one")]
    pub unit_cost: u64,
}

fn builtin() -> String {
    "builtin".into()
}

fn one() -> u64 {
    1
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Created {
    pub deployment_id: String,
    #[serde(flatten)]
    pub deployment: DeploymentView,
}

fn parse_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("deployment id `{raw}` is not a number"),
        )
    })
}

/// Deploys a model version (its owner or an operator). 201 with the deployment; `status`
/// is `failed` with the reason when the model cannot run.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/create",
    tag = "deployments",
    request_body = CreateRequest,
    responses((status = 201, body = Created), (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody))
)]
pub async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Created>), ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let request: CreateRequest = json(&body)?;
    let serve = state.serve.clone();
    let view = tokio::task::spawn_blocking(move || {
        serve.create(
            &ctx,
            &request.model,
            request.version,
            request.alias.as_deref(),
            &request.runtime,
            request.unit_cost,
        )
    })
    .await??;
    Ok((StatusCode::CREATED, Json(Created { deployment_id: view.deployment_id.clone(), deployment: view })))
}

/// One deployment: status, model, version, requests, errors, latency.
#[utoipa::path(get, path = "/api/v1/deployments/{deployment_id}", tag = "deployments", params(("deployment_id" = String, Path)), responses((status = 200, body = DeploymentView), (status = 404, body = super::error::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    let id = parse_id(&raw)?;
    let serve = state.serve.clone();
    Ok(Json(tokio::task::spawn_blocking(move || serve.get(id)).await??.1))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DeploymentList {
    pub deployments: Vec<DeploymentView>,
}

/// Every deployment.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments", responses((status = 200, body = DeploymentList)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<DeploymentList>, ApiError> {
    let serve = state.serve.clone();
    Ok(Json(DeploymentList { deployments: tokio::task::spawn_blocking(move || serve.list()).await?? }))
}

/// Removes a deployment (the model's owner or an operator).
#[utoipa::path(delete, path = "/api/v1/deployments/{deployment_id}", tag = "deployments", params(("deployment_id" = String, Path)), responses((status = 204), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<StatusCode, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let id = parse_id(&raw)?;
    let serve = state.serve.clone();
    tokio::task::spawn_blocking(move || serve.delete(&ctx, id)).await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// Rows of numbers, one per example.
    pub inputs: Vec<Vec<f32>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PredictAnswer {
    pub outputs: Vec<Vec<f32>>,
    pub model: String,
    pub version: u32,
}

/// Runs the deployed model. Holders of an active perpetual or timed license of the deployed
/// model's token pass with their sign-in token, as do the model's owner and operators.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/predict",
    tag = "deployments",
    params(("deployment_id" = String, Path)),
    request_body = PredictRequest,
    responses((status = 200, body = PredictAnswer), (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody), (status = 402, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody))
)]
pub async fn predict(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<PredictAnswer>, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let id = parse_id(&raw)?;
    let request: PredictRequest = json(&body)?;
    let serve = state.serve.clone();
    let store = state.store.clone();
    let registry = state.registry.clone();
    let index = state.index.borrow().clone();
    let answer = tokio::task::spawn_blocking(move || {
        let (record, _) = serve.get(id)?;
        let owner = registry.require_model(&record.model).ok().and_then(|m| m.owner);
        let allowed = match &ctx.actor {
            Actor::Operator => Ok(()),
            Actor::Wallet(a) if owner == Some(*a) => Ok(()),
            Actor::Anonymous => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "predicting needs a license holder's sign-in token",
            )),
            Actor::Wallet(caller) => {
                let token = serve.token_of(&record)?.ok_or_else(|| {
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        "the deployed version is not anchored on-chain, so no license opens it",
                    )
                })?;
                let now = crate::market::MarketView::new(&store, index).chain_now()?;
                let mut usage_only = false;
                let mut ok = false;
                for item in store.scan::<HolderLicenses>(caller.as_slice(), None, false) {
                    let (key, ()) = item?;
                    let license_id = alloy::primitives::U256::from_be_slice(&key[20..52]);
                    let Some(license) = store.get::<Licenses>(&license_id)? else { continue };
                    if license.token_id != token {
                        continue;
                    }
                    match TermKind::from_u8(license.kind) {
                        Some(TermKind::Perpetual) => ok = true,
                        Some(TermKind::Timed) if license.expires_at > now => ok = true,
                        Some(TermKind::Usage) if !license.closed => usage_only = true,
                        _ => {}
                    }
                }
                match (ok, usage_only) {
                    (true, _) => Ok(()),
                    (false, true) => Err(ApiError::new(
                        StatusCode::PAYMENT_REQUIRED,
                        "usage_not_metered",
                        "your license is usage-based; calls paid by vouchers are not served by this node yet",
                    )),
                    (false, false) => Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!("{caller} holds no active license of token {token}"),
                    )),
                }
            }
        };
        allowed?;
        let outputs = serve.predict(&record, &request.inputs)?;
        Ok::<_, ApiError>(PredictAnswer { outputs, model: record.model, version: record.version })
    })
    .await??;
    Ok(Json(answer))
}
