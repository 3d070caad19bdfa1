//! Deployments over HTTP: create, list, show, remove, and predict behind the license gate.

use agora_contracts::TermKind;
use alloy::primitives::U256;
use axum::{
    Json,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};

use super::{AppState, auth, error::ApiError, registry::json};
use crate::{
    registry::Actor,
    serve::{DeploymentView, ServeError, metering},
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
            ServeError::Upstream(_) => {
                ApiError::new(StatusCode::BAD_GATEWAY, "upstream_failed", e.to_string())
            }
            ServeError::Unacceptable(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unacceptable", e.to_string())
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
    /// `builtin` (in-process) or `http` (a reverse proxy to `upstream_url`).
    #[serde(default = "builtin")]
    pub runtime: String,
    /// Units a call costs per input row (usage licenses).
    #[serde(default = "one")]
    pub unit_cost: u64,
    /// `http` runtime: where calls are POSTed, body unchanged.
    pub upstream_url: Option<String>,
    /// `http` runtime: probed with GET (2xx is healthy) [default: any answer from the
    /// upstream's origin].
    pub health_url: Option<String>,
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
            crate::serve::NewDeployment {
                model: request.model,
                version: request.version,
                alias: request.alias,
                runtime: request.runtime,
                unit_cost: request.unit_cost,
                upstream: request
                    .upstream_url
                    .map(|url| crate::store::tables::UpstreamRecord { url, health_url: request.health_url }),
            },
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
    Ok(Json(tokio::task::spawn_blocking(move || serve.get(id)).await??))
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
pub struct TrafficRequest {
    /// The versions and their whole-percent shares of the calls, summing to 100.
    pub split: Vec<crate::serve::Share>,
}

/// Shares a deployment's calls between versions of its model (its owner or an operator): a
/// canary at 10 %, an A/B test at 50/50, a promotion at 100. Every version must be anchored to
/// the token whose licenses open the deployment, and is loaded before anything changes; an
/// `http` deployment's versions each name the server that answers them (`upstream_url`).
#[utoipa::path(
    put,
    path = "/api/v1/deployments/{deployment_id}/traffic",
    tag = "deployments",
    params(("deployment_id" = String, Path)),
    request_body = TrafficRequest,
    responses((status = 200, body = DeploymentView), (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody), (status = 422, body = super::error::ErrorBody))
)]
pub async fn traffic(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<DeploymentView>, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let id = parse_id(&raw)?;
    let request: TrafficRequest = json(&body)?;
    let serve = state.serve.clone();
    Ok(Json(tokio::task::spawn_blocking(move || serve.set_traffic(&ctx, id, request.split)).await??))
}

/// Starts a deployment's input-drift reference again from its next 1,000 rows (its model's
/// owner or an operator): the inputs as they are now become the normal.
#[utoipa::path(delete, path = "/api/v1/deployments/{deployment_id}/drift", tag = "deployments", params(("deployment_id" = String, Path)), responses((status = 200, body = DeploymentView), (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn reset_drift(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let id = parse_id(&raw)?;
    let serve = state.serve.clone();
    Ok(Json(tokio::task::spawn_blocking(move || serve.reset_drift(&ctx, id)).await??))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PredictRequest {
    /// One input per example: a row of numbers (MLP) or a text (sentence encoder).
    pub inputs: Vec<crate::serve::Row>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PredictAnswer {
    pub outputs: Vec<Vec<f32>>,
    pub model: String,
    /// The version that answered (a traffic split picks one per call).
    pub version: u32,
}

/// Runs the deployed model. Holders of an active perpetual or timed license of the deployed
/// model's token pass with their sign-in token, as do the model's owner and operators; holders
/// of a usage license also send `Agora-Voucher` (base64 JSON `{license_id, cumulative_units,
/// signature}`) and get an `Agora-Receipt`.
#[utoipa::path(
    post,
    path = "/api/v1/deployments/{deployment_id}/predict",
    tag = "deployments",
    params(("deployment_id" = String, Path)),
    request_body = PredictRequest,
    responses((status = 200, body = PredictAnswer), (status = 400, body = super::error::ErrorBody), (status = 401, body = super::error::ErrorBody), (status = 402, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody))
)]
pub async fn predict(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let id = parse_id(&raw)?;
    let input: serde_json::Value = json(&body)?;
    let rows = crate::serve::rows_of(&input);
    let voucher = headers
        .get("agora-voucher")
        .map(|v| {
            v.to_str().map_err(|_| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_voucher",
                    "the Agora-Voucher header is not text",
                )
            })
        })
        .transpose()?
        .map(|v| metering::parse_header(v).map_err(meter_error))
        .transpose()?;
    // The unit price is fixed at purchase: read once from the chain's escrow, then kept.
    let unit_price = match &voucher {
        Some((license, ..)) => Some(unit_price(&state, *license).await?),
        None => None,
    };
    let request_hash = *blake3::hash(&body).as_bytes();
    let serve = state.serve.clone();
    let store = state.store.clone();
    let registry = state.registry.clone();
    let index = state.index.borrow().clone();
    let meter = state.meter.clone();
    let signers = state.signers.clone();
    // the license's turn is taken before its voucher is checked and handed on with the write
    let turn = match &voucher {
        Some((license, ..)) => Some(meter.turn(*license).await),
        None => None,
    };
    let delivery = state.delivery.clone();
    // The answer comes back on `reply`: from the blocking task, or, for a metered call, from the
    // writer thread once its voucher is durable, so the call is woken once, not twice.
    let (reply, replied) = tokio::sync::oneshot::channel::<Result<(Answer, Option<Metered>), ApiError>>();
    let writes = meter.clone();
    let work = move || -> Result<Step, ApiError> {
        let record = serve.record(id)?;
        let run = |record: &crate::store::tables::DeploymentRecord| -> Result<Answer, ApiError> {
            match record.runtime.as_str() {
                "http" => {
                    let (version, status, bytes) = serve.forward(record, &body)?;
                    Ok(Answer::Passthrough(version, status, bytes))
                }
                _ => {
                    let request = PredictRequest::deserialize(&input).map_err(|e| {
                        ApiError::new(
                            StatusCode::BAD_REQUEST,
                            "invalid_body",
                            format!("the request body is not valid: {e}"),
                        )
                    })?;
                    let (version, outputs) = serve.predict(record, request.inputs)?;
                    Ok(Answer::Outputs(PredictAnswer { outputs, model: record.model.clone(), version }))
                }
            }
        };
        let owner = registry.require_model(&record.model).ok().and_then(|m| m.owner);
        let caller = match &ctx.actor {
            Actor::Operator => None,
            Actor::Wallet(a) if owner == Some(*a) => None,
            Actor::Anonymous => {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    "predicting needs a license holder's sign-in token",
                ));
            }
            Actor::Wallet(caller) => Some(*caller),
        };
        let Some(caller) = caller else {
            return Ok(Step::Answered(run(&record)?));
        };
        let token = serve.token_of(&record)?.ok_or_else(|| {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the deployed version is not anchored on-chain, so no license opens it",
            )
        })?;
        let cost = U256::from(record.unit_cost) * U256::from(rows);
        if let (Some((license, cumulative, signature)), Some(price), Some(turn)) = (voucher, unit_price, turn)
        {
            let accepted = metering::check(
                &store,
                caller,
                token,
                license,
                cumulative,
                &signature,
                cost,
                price,
                meter.domain(),
                &signers,
            )
            .map_err(meter_error)?;
            let answer = run(&record)?;
            let time_ms = crate::registry::now_ms();
            let signature =
                delivery.sign_message(&metering::receipt_bytes(license, cumulative, &request_hash, time_ms));
            let receipt = crate::store::tables::ReceiptRecord {
                request: request_hash,
                time_ms,
                signature: signature.to_vec(),
            };
            return Ok(Step::Metered(Box::new(MeteredCall { answer, accepted, receipt, turn })));
        }
        let now = crate::market::MarketView::new(&store, index).chain_now()?;
        let mut usage = None;
        let mut ok = false;
        for item in store.scan::<HolderLicenses>(caller.as_slice(), None, false) {
            let (key, ()) = item?;
            let license_id = U256::from_be_slice(&key[20..52]);
            let Some(license) = store.get::<Licenses>(&license_id)? else { continue };
            if license.token_id != token {
                continue;
            }
            match TermKind::from_u8(license.kind) {
                Some(TermKind::Perpetual) => ok = true,
                Some(TermKind::Timed) if license.expires_at > now => ok = true,
                Some(TermKind::Usage) if !license.closed => usage = Some(license_id),
                _ => {}
            }
        }
        match (ok, usage) {
            (true, _) => Ok(Step::Answered(run(&record)?)),
            (false, Some(license)) => {
                let required = metering::last_accepted(&store, license)? + cost;
                Err(meter_error(metering::MeterError::Unpaid {
                    reason: format!(
                        "license {license} is usage-based: send an Agora-Voucher for {required} cumulative units"
                    ),
                    required: Some(required),
                }))
            }
            (false, None) => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("{caller} holds no active license of token {token}"),
            )),
        }
    };
    let task = tokio::task::spawn_blocking(move || match work() {
        Ok(Step::Metered(call)) => {
            let MeteredCall { answer, accepted, receipt, turn } = *call;
            let metered = (accepted.license_id, accepted.cumulative, receipt.clone());
            let then = move |written: Result<(), metering::MeterError>| {
                let _ = reply.send(written.map(|()| (answer, Some(metered))).map_err(meter_error));
            };
            writes.commit(accepted, receipt, turn, Box::new(then));
        }
        Ok(Step::Answered(answer)) => drop(reply.send(Ok((answer, None)))),
        Err(e) => drop(reply.send(Err(e))),
    });
    let (answer, metered) = match replied.await {
        Ok(answered) => answered?,
        Err(_) => {
            // nothing answered: the task panicked (its error says so), or the writer thread,
            // gone with a node that is shutting down, dropped the write
            task.await?;
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the node is shutting down",
            ));
        }
    };
    let mut response = match answer {
        Answer::Outputs(outputs) => Json(outputs).into_response(),
        Answer::Passthrough(version, status, bytes) => {
            let mut response =
                (StatusCode::from_u16(status).unwrap_or(StatusCode::OK), bytes).into_response();
            let headers = response.headers_mut();
            headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            // the body is the upstream's own: the version that answered travels beside it
            headers.insert("agora-version", HeaderValue::from(version));
            response
        }
    };
    if let Some((license, cumulative, receipt)) = metered {
        let header = format!(
            "license={license}; cumulative_units={cumulative}; request={}; time_ms={}; signature={}",
            crate::artifacts::hex(&receipt.request),
            receipt.time_ms,
            crate::artifacts::hex(&receipt.signature)
        );
        if let Ok(value) = HeaderValue::from_str(&header) {
            response.headers_mut().insert("agora-receipt", value);
        }
    }
    Ok(response)
}

/// A metered call's license, cumulative units and receipt, for its `Agora-Receipt`.
type Metered = (U256, U256, crate::store::tables::ReceiptRecord);

/// Where a call stands once its work is done: answered, or waiting for its voucher's write.
enum Step {
    Answered(Answer),
    Metered(Box<MeteredCall>),
}

struct MeteredCall {
    answer: Answer,
    accepted: metering::Accepted,
    receipt: crate::store::tables::ReceiptRecord,
    turn: metering::Turn,
}

/// What a call returns: the builtin runtime's outputs, or the answer of the upstream of the
/// version that took the call, as it came.
enum Answer {
    Outputs(PredictAnswer),
    Passthrough(u32, u16, Vec<u8>),
}

fn meter_error(e: metering::MeterError) -> ApiError {
    use metering::MeterError as M;
    match e {
        M::Unpaid { required, .. } => {
            let mut error = ApiError::new(StatusCode::PAYMENT_REQUIRED, "payment_required", e.to_string());
            if let Some(required) = required {
                error.message = format!("{}; required_cumulative_units={required}", error.message);
            }
            error
        }
        M::Stale { .. } => ApiError::new(StatusCode::CONFLICT, "stale_voucher", e.to_string()),
        M::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, "forbidden", e.to_string()),
        M::Invalid(_) => ApiError::new(StatusCode::BAD_REQUEST, "invalid_voucher", e.to_string()),
        M::Unavailable(why) => ApiError::chain_unavailable(why),
        M::Store(s) => s.into(),
    }
}

/// A usage license's price per unit: kept with its vouchers, else read from the chain.
async fn unit_price(state: &AppState, license: U256) -> Result<U256, ApiError> {
    if let Some(record) = state.store.get::<crate::store::tables::UsageRecords>(&license)? {
        return Ok(record.unit_price);
    }
    let market = agora_contracts::LicenseMarket::new(state.deployment.license_market, &state.provider);
    let escrow = market.escrowOf(license).call().await.map_err(|e| {
        ApiError::chain_unavailable(format!("cannot read license {license}'s escrow from the chain: {e}"))
    })?;
    Ok(U256::from(escrow.unitPrice))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct UsageAnswer {
    pub license_id: String,
    /// The last voucher's count this node accepted (the next voucher carries this plus the
    /// call's cost).
    pub cumulative_units: String,
    /// Wei per unit, when known.
    pub unit_price: Option<String>,
    /// Units the chain has settled, as the index has it.
    pub settled_units: String,
    /// Units this node accepted that the chain has not settled yet.
    pub pending_units: String,
    /// While this node's settlement of the license keeps failing: how, and when it tries again.
    pub settlement_failure: Option<crate::serve::settle::Failure>,
}

/// The last accepted voucher count of a usage license (for clients that lost count), what
/// of it is settled, and why its settlement fails when it does.
#[utoipa::path(get, path = "/api/v1/licenses/{license_id}/usage", tag = "licenses", params(("license_id" = String, Path)), responses((status = 200, body = UsageAnswer), (status = 404, body = super::error::ErrorBody)))]
pub async fn usage(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<UsageAnswer>, ApiError> {
    let license = super::params::path_id("license id", &raw)?;
    let Some(indexed) = state.store.get::<Licenses>(&license)? else {
        return Err(ApiError::not_found(format!("no license {license}")));
    };
    let record = state.store.get::<crate::store::tables::UsageRecords>(&license)?;
    let accepted = metering::last_accepted(&state.store, license)?;
    Ok(Json(UsageAnswer {
        license_id: license.to_string(),
        cumulative_units: accepted.to_string(),
        unit_price: record.map(|r| r.unit_price.to_string()),
        settled_units: indexed.settled_units.to_string(),
        pending_units: accepted.saturating_sub(indexed.settled_units).to_string(),
        settlement_failure: state.settle_failures.get(license),
    }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReceiptView {
    pub cumulative_units: String,
    /// blake3 of the request body, hex.
    pub request: String,
    pub time_ms: u64,
    /// ed25519 over "agora-receipt-v1", license id, cumulative units, request hash, time.
    pub signature: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ReceiptList {
    pub license_id: String,
    /// The node's ed25519 public key, hex.
    pub node_key: String,
    pub receipts: Vec<ReceiptView>,
}

/// The receipts of a usage license's metered calls (its holder or an operator).
#[utoipa::path(get, path = "/api/v1/licenses/{license_id}/receipts", tag = "licenses", params(("license_id" = String, Path)), responses((status = 200, body = ReceiptList), (status = 401, body = super::error::ErrorBody), (status = 403, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody)))]
pub async fn receipts(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(raw): Path<String>,
) -> Result<Json<ReceiptList>, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let license = super::params::path_id("license id", &raw)?;
    let record = state
        .store
        .get::<Licenses>(&license)?
        .ok_or_else(|| ApiError::not_found(format!("no license {license}")))?;
    match ctx.actor {
        Actor::Operator => {}
        Actor::Wallet(a) if a == record.holder => {}
        Actor::Anonymous => {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "receipts need the holder's sign-in token",
            ));
        }
        Actor::Wallet(_) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("license {license} belongs to another wallet"),
            ));
        }
    }
    let store = state.store.clone();
    let receipts = tokio::task::spawn_blocking(move || {
        store
            .scan::<crate::store::tables::UsageReceipts>(&license.to_be_bytes::<32>(), None, false)
            .map(|item| {
                let (key, r) = item?;
                Ok(ReceiptView {
                    cumulative_units: U256::from_be_slice(&key[32..64]).to_string(),
                    request: crate::artifacts::hex(&r.request),
                    time_ms: r.time_ms,
                    signature: crate::artifacts::hex(&r.signature),
                })
            })
            .collect::<Result<Vec<_>, crate::store::StoreError>>()
    })
    .await??;
    Ok(Json(ReceiptList { license_id: license.to_string(), node_key: state.delivery.public_key(), receipts }))
}
