//! The registry's own face, `/api/v1/models/...`: register a model file (multipart, streamed),
//! list versions, move stages, log and read metrics, download a version's file.

use std::collections::BTreeMap;

use alloy::primitives::B256;
use axum::{
    Json,
    extract::{Multipart, Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::Response,
};
use serde::{Deserialize, Serialize};

use super::{
    AppState, auth,
    error::ApiError,
    params::{self, Params},
    transfer,
};
use crate::{
    registry::{
        self, Actor, Anchor, Context, NewVersion, Registry, RegistryError, Stage, VersionView, now_ms,
    },
    store::tables::MetricPoint,
};

/// A model version as the node's API shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct VersionJson {
    pub name: String,
    pub version: u32,
    /// None, Staging, Production or Archived.
    pub stage: String,
    pub aliases: Vec<String>,
    pub description: String,
    pub source: String,
    pub run_id: String,
    pub tags: BTreeMap<String, String>,
    pub status: String,
    pub user_id: String,
    /// Unix milliseconds.
    pub created_at: u64,
    pub updated_at: u64,
    /// The model file, when the version was registered with one.
    pub file: Option<FileJson>,
    /// The watermark commitment, once marked.
    pub commitment: Option<String>,
    /// Where the file's hash is anchored on-chain, per the index.
    pub anchored: Option<Anchor>,
    /// Where MLflow clients download the version's files.
    pub artifact_uri: String,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct FileJson {
    pub name: String,
    /// blake3 of the file, hex.
    pub blake3: String,
    pub size: u64,
    pub parameters: u64,
    pub tensors: u64,
    /// Parameters per dtype.
    pub dtypes: BTreeMap<String, u64>,
}

pub fn version_json(view: &VersionView) -> VersionJson {
    let v = &view.version;
    VersionJson {
        name: view.model.name.clone(),
        version: v.version,
        stage: view.stage.name().to_owned(),
        aliases: view.aliases.clone(),
        description: v.description.clone(),
        source: v.source.clone(),
        run_id: v.run_id.clone(),
        tags: v.tags.clone(),
        status: "READY".into(),
        user_id: v.user_id.clone(),
        created_at: v.created_ms,
        updated_at: v.updated_ms,
        file: v.file.as_ref().map(|f| FileJson {
            name: f.name.clone(),
            blake3: registry::blake3_hex(&f.blake3),
            size: f.size,
            parameters: f.parameters,
            tensors: f.tensors,
            dtypes: f.dtypes.clone(),
        }),
        commitment: v.commitment.map(|c| c.to_string()),
        anchored: view.anchored.clone(),
        artifact_uri: download_uri(view),
    }
}

/// `mlflow-artifacts:/<dir>` for versions whose files the node holds, else the source.
pub fn download_uri(view: &VersionView) -> String {
    match &view.version.artifact_dir {
        Some(dir) => format!("mlflow-artifacts:/{dir}"),
        None => view.version.source.clone(),
    }
}

/// The caller, refused when the registry is private and the caller anonymous.
pub fn reader(state: &AppState, headers: &HeaderMap) -> Result<Context, ApiError> {
    let ctx = auth::api_caller(state, headers)?;
    if state.auth.private && ctx.actor == Actor::Anonymous {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the registry is private: send a bearer token",
        ));
    }
    Ok(ctx)
}

/// Runs a registry call off the async workers.
pub async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Registry) -> Result<T, registry::RegistryError> + Send + 'static,
) -> Result<T, ApiError> {
    let registry = state.registry.clone();
    Ok(tokio::task::spawn_blocking(move || f(&registry)).await??)
}

/// Metric points in either form: `[{key, value, step?, timestamp?}]` or `{key: value}`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum MetricsInput {
    Points(Vec<PointInput>),
    Values(BTreeMap<String, f64>),
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PointInput {
    pub key: String,
    pub value: f64,
    #[serde(default)]
    pub step: i64,
    /// Unix milliseconds; now when absent.
    pub timestamp: Option<u64>,
}

impl MetricsInput {
    fn points(self) -> Vec<MetricPoint> {
        let now = now_ms();
        match self {
            Self::Points(points) => points
                .into_iter()
                .map(|p| MetricPoint {
                    key: p.key,
                    value: p.value,
                    step: p.step,
                    timestamp: p.timestamp.unwrap_or(now),
                })
                .collect(),
            Self::Values(values) => values
                .into_iter()
                .map(|(key, value)| MetricPoint { key, value, step: 0, timestamp: now })
                .collect(),
        }
    }
}

/// The `metadata` part of a registration.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterMetadata {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub metrics: Option<MetricsInput>,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub run_id: String,
}

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, code, message)
}

/// Registers a model file: creates the model when it is new and its next version. Multipart
/// with a `metadata` JSON part and an `artifact` file part (a safetensors file, streamed into
/// the store and checked as it arrives). Nothing is kept when any part is wrong.
#[utoipa::path(
    post,
    path = "/api/v1/models/register",
    tag = "registry",
    request_body(content_type = "multipart/form-data", description = "parts `metadata` (JSON: name, description, tags, metrics, source, run_id), `artifact` (the .safetensors file) and optionally `config` (the model's config.json) and `tokenizer` (a text model's tokenizer.json), kept next to it"),
    responses(
        (status = 201, body = VersionJson),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 413, body = super::error::ErrorBody),
    )
)]
pub async fn register(
    State(state): State<AppState>,
    headers: HeaderMap,
    mut multipart: Multipart,
) -> Result<(StatusCode, Json<VersionJson>), ApiError> {
    let ctx = match auth::api_caller(&state, &headers) {
        Ok(ctx) if ctx.actor != Actor::Anonymous => ctx,
        refused => {
            drain_multipart(&mut multipart).await;
            return Err(refused.err().unwrap_or_else(|| {
                ApiError::new(StatusCode::UNAUTHORIZED, "unauthenticated", "registering needs a bearer token")
            }));
        }
    };
    transfer::check_length(&headers, state.max_upload, 1 << 20)?;
    let mut metadata: Option<RegisterMetadata> = None;
    let mut file = None;
    let mut config: Option<axum::body::Bytes> = None;
    let mut tokenizer: Option<axum::body::Bytes> = None;
    let outcome = async {
        while let Some(field) = multipart
            .next_field()
            .await
            .map_err(|e| bad_request("invalid_multipart", format!("the multipart body is malformed: {e}")))?
        {
            match field.name() {
                Some("metadata") => {
                    let bytes = field.bytes().await.map_err(|e| {
                        bad_request("invalid_multipart", format!("the metadata part failed: {e}"))
                    })?;
                    let parsed: RegisterMetadata = serde_json::from_slice(&bytes).map_err(|e| {
                        bad_request("invalid_metadata", format!("the metadata part is not valid: {e}"))
                    })?;
                    registry::check_name(&parsed.name)?;
                    metadata = Some(parsed);
                }
                Some("config") => config = Some(json_part(field, "config", CONFIG_LIMIT).await?),
                Some("tokenizer") => tokenizer = Some(json_part(field, "tokenizer", TOKENIZER_LIMIT).await?),
                Some("artifact") => {
                    if file.is_some() {
                        return Err(bad_request("invalid_multipart", "more than one artifact part"));
                    }
                    let name = field.file_name().map(file_name).unwrap_or_else(|| "model.safetensors".into());
                    let (blob, header) =
                        transfer::ingest(state.registry.artifacts().clone(), field, state.max_upload, true)
                            .await?;
                    let header = header.unwrap_or_default();
                    file = Some(registry::file_summary(&name, &blob, header)?);
                }
                other => {
                    return Err(bad_request(
                        "invalid_multipart",
                        format!("unexpected part {:?}; send `metadata` and `artifact`", other.unwrap_or("")),
                    ));
                }
            }
        }
        Ok::<_, ApiError>(())
    }
    .await;
    let release = |file: &Option<crate::store::tables::ModelFileSummary>| {
        if let Some(f) = file {
            let _ = state.registry.artifacts().release(&f.blake3);
        }
    };
    if let Err(e) = outcome {
        release(&file);
        drain_multipart(&mut multipart).await;
        return Err(e);
    }
    let (Some(metadata), Some(file)) = (metadata, file.clone()) else {
        release(&file);
        return Err(bad_request(
            "missing_part",
            "the request needs a `metadata` JSON part and an `artifact` file part",
        ));
    };
    let watermark_key = state.watermark_key.clone();
    let view = blocking(&state, move |r| {
        let points = metadata.metrics.map(MetricsInput::points).unwrap_or_default();
        let result = (|| {
            if r.model(&metadata.name)?.is_none() {
                r.create_model(&ctx, &metadata.name, &metadata.description, metadata.tags.clone())?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            r.artifacts().release(&file.blake3)?;
            return Err(e);
        }
        // Recorded before the first sale: binds this node's watermark key to the original.
        let commitment = B256::from(agora_watermark::commitment(&watermark_key, &file.blake3));
        let new = NewVersion {
            source: metadata.source,
            run_id: metadata.run_id,
            description: metadata.description,
            tags: metadata.tags,
            file: Some(file),
            commitment: Some(commitment),
            ..Default::default()
        };
        let view = r.create_version(&ctx, &metadata.name, new)?;
        // The model's config.json (an MLP's layers, a BERT config) and a text model's
        // tokenizer.json sit next to its weights.
        if let Some(dir) = &view.version.artifact_dir {
            for (bytes, name, limit) in
                [(&config, "config.json", CONFIG_LIMIT), (&tokenizer, "tokenizer.json", TOKENIZER_LIMIT)]
            {
                if let Some(bytes) = bytes {
                    let blob = r.artifacts().put(&bytes[..], limit as u64)?;
                    let node = Context { actor: Actor::Operator, request_id: ctx.request_id.clone() };
                    r.put_file(&node, &format!("{dir}/{name}"), &blob)?;
                }
            }
        }
        if !points.is_empty() {
            r.log_metrics(&ctx, &metadata.name, view.version.version, points)?;
        }
        Ok(view)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(version_json(&view))))
}

const CONFIG_LIMIT: usize = 1 << 20;
const TOKENIZER_LIMIT: usize = 32 << 20;

/// A small JSON part of a multipart body, read whole (at most `limit` bytes) and checked.
async fn json_part(
    mut field: axum::extract::multipart::Field<'_>,
    part: &str,
    limit: usize,
) -> Result<axum::body::Bytes, ApiError> {
    let code = if part == "config" { "invalid_config" } else { "invalid_tokenizer" };
    let mut bytes = Vec::new();
    while let Some(chunk) = field
        .chunk()
        .await
        .map_err(|e| bad_request("invalid_multipart", format!("the {part} part failed: {e}")))?
    {
        if bytes.len() + chunk.len() > limit {
            return Err(bad_request(code, format!("the {part} part is over {} MiB", limit >> 20)));
        }
        bytes.extend_from_slice(&chunk);
    }
    serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
        .map_err(|e| bad_request(code, format!("the {part} part is not JSON: {e}")))?;
    Ok(bytes.into())
}

/// Reads and drops the rest of a refused multipart body (for at most [`transfer::DRAIN`]), so
/// the client gets the answer rather than a reset connection.
async fn drain_multipart(multipart: &mut Multipart) {
    let _ = tokio::time::timeout(transfer::DRAIN, async {
        while let Ok(Some(mut field)) = multipart.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
    })
    .await;
}

/// The last path component, without anything that could make it a path.
fn file_name(raw: &str) -> String {
    let base = raw.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base.chars().filter(|c| !c.is_control()).collect();
    if clean.is_empty() || clean == "." || clean == ".." { "model.safetensors".into() } else { clean }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VersionPage {
    pub versions: Vec<VersionJson>,
    /// `page_token` of the next page; absent on the last.
    pub next_page_token: Option<String>,
}

/// A model's versions, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/models/{model_name}/versions",
    tag = "registry",
    params(
        ("model_name" = String, Path),
        ("limit" = Option<usize>, Query, description = "1 to 1000, default 100"),
        ("page_token" = Option<String>, Query, description = "next_page_token of the previous page"),
    ),
    responses((status = 200, body = VersionPage), (status = 404, body = super::error::ErrorBody))
)]
pub async fn versions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model_name): Path<String>,
    Query(q): Query<Params>,
) -> Result<Json<VersionPage>, ApiError> {
    reader(&state, &headers)?;
    params::only(&q, &["limit", "page_token"])?;
    let limit = params::limit(&q, 100, 1000)?;
    let offset = match q.get("page_token") {
        None => 0,
        Some(t) => t.parse::<usize>().map_err(|_| {
            bad_request("invalid_parameter", "parameter `page_token`: not a token this node gave")
        })?,
    };
    let all = blocking(&state, move |r| r.versions(&model_name)).await?;
    let next = (all.len() > offset + limit).then(|| (offset + limit).to_string());
    Ok(Json(VersionPage {
        versions: all.iter().skip(offset).take(limit).map(version_json).collect(),
        next_page_token: next,
    }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StageRequest {
    pub version: u32,
    /// None, Staging, Production or Archived (any case).
    pub stage: String,
    /// Move the model's other versions in that stage to Archived.
    #[serde(default)]
    pub archive_existing: bool,
}

/// Moves a version to a stage.
#[utoipa::path(
    post,
    path = "/api/v1/models/{model_name}/stage",
    tag = "registry",
    params(("model_name" = String, Path)),
    request_body = StageRequest,
    responses((status = 200, body = VersionJson), (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody))
)]
pub async fn stage(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model_name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<VersionJson>, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let request: StageRequest = json(&body)?;
    let stage = Stage::parse(&request.stage)?;
    let view = blocking(&state, move |r| {
        r.transition_stage(&ctx, &model_name, request.version, stage, request.archive_existing)
    })
    .await?;
    Ok(Json(version_json(&view)))
}

/// Parses a JSON body with an error that says what is wrong.
pub fn json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| bad_request("invalid_body", format!("the request body is not valid: {e}")))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct MetricsAnswer {
    pub name: String,
    pub version: u32,
    /// Series by metric name, each in the order logged.
    pub metrics: BTreeMap<String, Vec<PointJson>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct PointJson {
    pub value: f64,
    pub step: i64,
    pub timestamp: u64,
}

/// A version's metrics.
#[utoipa::path(
    get,
    path = "/api/v1/models/metrics",
    tag = "registry",
    params(("name" = String, Query), ("version" = u32, Query)),
    responses((status = 200, body = MetricsAnswer), (status = 404, body = super::error::ErrorBody))
)]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(q): Query<Params>,
) -> Result<Json<MetricsAnswer>, ApiError> {
    reader(&state, &headers)?;
    params::only(&q, &["name", "version"])?;
    let name = params::required(q.get("name").cloned(), "name")?;
    let version = params::required(params::u64(&q, "version")?, "version")?;
    let version = u32::try_from(version)
        .map_err(|_| bad_request("invalid_parameter", "parameter `version`: too large"))?;
    let series = blocking(&state, {
        let name = name.clone();
        move |r| r.metrics(&name, version)
    })
    .await?;
    let metrics = series
        .into_iter()
        .map(|(k, points)| {
            (
                k,
                points
                    .into_iter()
                    .map(|p| PointJson { value: p.value, step: p.step, timestamp: p.timestamp })
                    .collect(),
            )
        })
        .collect();
    Ok(Json(MetricsAnswer { name, version, metrics }))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MetricsRequest {
    pub metrics: MetricsInput,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Logged {
    pub logged: usize,
}

/// Appends metric points to a version.
#[utoipa::path(
    post,
    path = "/api/v1/models/{model_name}/versions/{version}/metrics",
    tag = "registry",
    params(("model_name" = String, Path), ("version" = u32, Path)),
    request_body = MetricsRequest,
    responses((status = 201, body = Logged), (status = 400, body = super::error::ErrorBody), (status = 404, body = super::error::ErrorBody))
)]
pub async fn log_metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((model_name, version)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Logged>), ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let version = parse_version(&version)?;
    let request: MetricsRequest = json(&body)?;
    let points = request.metrics.points();
    let logged = blocking(&state, move |r| r.log_metrics(&ctx, &model_name, version, points)).await?;
    Ok((StatusCode::CREATED, Json(Logged { logged })))
}

fn parse_version(raw: &str) -> Result<u32, ApiError> {
    raw.parse::<u32>()
        .ok()
        .filter(|v| *v > 0)
        .ok_or_else(|| bad_request("invalid_parameter", format!("version `{raw}` is not a positive integer")))
}

/// Downloads a version's model file, for the model's owner or an operator; `Range` supported.
#[utoipa::path(
    get,
    path = "/api/v1/models/{model_name}/versions/{version}/artifact",
    tag = "registry",
    params(("model_name" = String, Path), ("version" = u32, Path)),
    responses(
        (status = 200, content_type = "application/octet-stream"),
        (status = 206, content_type = "application/octet-stream"),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
        (status = 416, body = super::error::ErrorBody),
    )
)]
pub async fn artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((model_name, version)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let ctx = auth::api_caller(&state, &headers)?;
    let version = parse_version(&version)?;
    let view = blocking(&state, move |r| r.version(&model_name, version)).await?;
    state.registry.authorize(&ctx.actor, &view.model)?;
    let file = view.version.file.ok_or_else(|| {
        ApiError::not_found(format!("version {version} of '{}' has no file in this node", view.model.name))
    })?;
    transfer::serve_blob(state.registry.artifacts(), file.blake3, file.size, &headers, Some(&file.name))
}

/// A registered model as the node's API shows it.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ModelJson {
    pub name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    /// Alias -> version.
    pub aliases: BTreeMap<String, u32>,
    /// The wallet that created it, when a wallet did.
    #[schema(value_type = Option<String>)]
    pub owner: Option<alloy::primitives::Address>,
    pub user_id: String,
    /// The on-chain token its newest anchored version belongs to, per the index.
    pub token_id: Option<String>,
    pub latest_version: Option<u32>,
    /// Unix milliseconds.
    pub created_at: u64,
    pub updated_at: u64,
}

/// One registered model: description, tags, aliases, owner, and its on-chain token once a
/// version is anchored.
#[utoipa::path(
    get,
    path = "/api/v1/models/{model_name}",
    tag = "registry",
    params(("model_name" = String, Path)),
    responses((status = 200, body = ModelJson), (status = 404, body = super::error::ErrorBody))
)]
pub async fn model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(model_name): Path<String>,
) -> Result<Json<ModelJson>, ApiError> {
    reader(&state, &headers)?;
    let (model, versions) =
        blocking(&state, move |r| Ok((r.require_model(&model_name)?, r.versions(&model_name)?))).await?;
    let token_id = versions.iter().find_map(|v| v.anchored.as_ref().map(|a| a.token_id.clone()));
    Ok(Json(ModelJson {
        name: model.name,
        description: model.description,
        tags: model.tags,
        aliases: model.aliases,
        owner: model.owner,
        user_id: model.user_id,
        token_id,
        latest_version: versions.first().map(|v| v.version.version),
        created_at: model.created_ms,
        updated_at: model.updated_ms,
    }))
}

/// The registry's webhooks (the operator): each configured hook's place in the outbox, how many
/// changes it has yet to get, what it was last sent and how that went, and a delivery being
/// tried again with its last error. Secrets are not shown.
#[utoipa::path(
    get,
    path = "/api/v1/registry/webhooks",
    tag = "registry",
    responses(
        (status = 200, body = registry::webhooks::WebhooksView),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    )
)]
pub async fn webhooks(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<registry::webhooks::WebhooksView>, ApiError> {
    auth::operator_only(&state, &headers, "sees the webhooks")?;
    Ok(Json(state.registry.webhooks()))
}

/// Collects the artifact store while the node runs: deletes blobs nothing references, objects
/// no record knows and leftovers of writes that crashed over an hour ago (uploads in progress
/// are never touched). An operator's call; audited as `artifacts.gc`.
#[utoipa::path(
    post,
    path = "/api/v1/artifacts/gc",
    tag = "registry",
    responses(
        (status = 200, body = crate::artifacts::GcReport),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
    )
)]
pub async fn artifacts_gc(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<crate::artifacts::GcReport>, ApiError> {
    let request_id = auth::operator_only(&state, &headers, "collects the artifact store")?.request_id;
    let (artifacts, store) = (state.registry.artifacts().clone(), state.store.clone());
    let report = tokio::task::spawn_blocking(move || {
        let report = artifacts.gc()?;
        let summary =
            format!("{} blobs, {} bytes, {} partial files", report.blobs, report.bytes, report.partial_files);
        crate::audit::Audit::new(store).record(
            "operator",
            "artifacts.gc",
            &summary,
            request_id.as_deref(),
        )?;
        Ok::<_, RegistryError>(report)
    })
    .await??;
    Ok(Json(report))
}
