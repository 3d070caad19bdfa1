//! MLflow's face of the registry: the Model Registry REST API (`/api/2.0/mlflow/...`, all 21
//! endpoints) and the artifact routes (`/api/2.0/mlflow-artifacts/artifacts/...`), as the stock
//! MLflow client speaks them: snake_case JSON, versions as strings, errors as
//! `{"error_code", "message"}` with MLflow's codes and statuses, GET parameters in the query
//! string (repeated keys for lists), DELETE with a JSON body.
//!
//! Every call goes to the same [`Registry`] as the node's own API.

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Path, RawQuery, State},
    http::{HeaderMap, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, auth, error::ApiError, registry::download_uri, transfer};
use crate::registry::{
    self, Actor, Context, NewVersion, Registry, RegistryError, Stage, VersionView,
    filter::{self, Kind, Subject},
};

const MAX_MODELS_PAGE: usize = 1000;
const MAX_VERSIONS_PAGE: usize = 200_000;

/// An MLflow error answer.
#[derive(Debug)]
pub struct MlflowError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl MlflowError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
    }
}

impl IntoResponse for MlflowError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error_code": self.code, "message": self.message}))).into_response()
    }
}

impl From<RegistryError> for MlflowError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::NotFound(m) => Self::new(StatusCode::NOT_FOUND, "RESOURCE_DOES_NOT_EXIST", m),
            RegistryError::AlreadyExists(m) => {
                Self::new(StatusCode::BAD_REQUEST, "RESOURCE_ALREADY_EXISTS", m)
            }
            RegistryError::Invalid(m) => Self::invalid(m),
            RegistryError::Unauthenticated(m) => Self::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", m),
            RegistryError::Forbidden(m) => Self::new(StatusCode::FORBIDDEN, "PERMISSION_DENIED", m),
            other => ApiError::from(other).into(),
        }
    }
}

impl From<ApiError> for MlflowError {
    fn from(e: ApiError) -> Self {
        let code = match e.status {
            StatusCode::NOT_FOUND => "RESOURCE_DOES_NOT_EXIST",
            StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
            StatusCode::FORBIDDEN => "PERMISSION_DENIED",
            s if s.is_client_error() => "INVALID_PARAMETER_VALUE",
            _ => "INTERNAL_ERROR",
        };
        Self::new(e.status, code, e.message)
    }
}

pub(super) type Answer = Result<Json<Value>, MlflowError>;

/// The MLflow routes.
pub fn routes() -> Router<AppState> {
    let rm = "/api/2.0/mlflow/registered-models";
    let mv = "/api/2.0/mlflow/model-versions";
    Router::new()
        .route(&format!("{rm}/create"), post(create_model))
        .route(&format!("{rm}/rename"), post(rename_model))
        .route(&format!("{rm}/update"), axum::routing::patch(update_model))
        .route(&format!("{rm}/delete"), axum::routing::delete(delete_model))
        .route(&format!("{rm}/get"), get(get_model))
        .route(&format!("{rm}/search"), get(search_models))
        .route(&format!("{rm}/get-latest-versions"), post(latest_versions).get(latest_versions_get))
        .route(&format!("{rm}/set-tag"), post(set_model_tag))
        .route(&format!("{rm}/delete-tag"), axum::routing::delete(delete_model_tag))
        .route(&format!("{rm}/alias"), post(set_alias).delete(delete_alias).get(get_alias))
        .route(&format!("{mv}/create"), post(create_version))
        .route(&format!("{mv}/update"), axum::routing::patch(update_version))
        .route(&format!("{mv}/transition-stage"), post(transition_stage))
        .route(&format!("{mv}/delete"), axum::routing::delete(delete_version))
        .route(&format!("{mv}/get"), get(get_version))
        .route(&format!("{mv}/search"), get(search_versions))
        .route(&format!("{mv}/get-download-uri"), get(download_uri_of))
        .route(&format!("{mv}/set-tag"), post(set_version_tag))
        .route(&format!("{mv}/delete-tag"), axum::routing::delete(delete_version_tag))
        .merge(super::tracking::routes())
        .route("/api/2.0/mlflow/{*rest}", any(no_endpoint))
        .route("/api/3.0/mlflow/{*rest}", any(no_endpoint))
        .route("/api/2.0/mlflow-artifacts/artifacts", get(list_artifacts))
        .route(
            "/api/2.0/mlflow-artifacts/artifacts/{*path}",
            get(download_artifact)
                .put(upload_artifact)
                .delete(delete_artifact)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
}

async fn no_endpoint(method: Method, Path(rest): Path<String>) -> MlflowError {
    MlflowError::new(
        StatusCode::NOT_FOUND,
        "ENDPOINT_NOT_FOUND",
        format!("{method} {rest} is not served by this node"),
    )
}

// ----- request plumbing -----

pub(super) fn caller(state: &AppState, headers: &HeaderMap) -> Result<Context, MlflowError> {
    auth::caller(state, headers)
        .map_err(|r| MlflowError::new(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", r.message()))
}

/// The caller, refused when the registry is private and the caller anonymous.
pub(super) fn reader(state: &AppState, headers: &HeaderMap) -> Result<Context, MlflowError> {
    let ctx = caller(state, headers)?;
    if state.auth.private && ctx.actor == Actor::Anonymous {
        return Err(MlflowError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "the registry is private: send a bearer token",
        ));
    }
    Ok(ctx)
}

async fn run<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Registry) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, MlflowError> {
    let registry = state.registry.clone();
    tokio::task::spawn_blocking(move || f(&registry))
        .await
        .map_err(|e| MlflowError::from(ApiError::from(e)))?
        .map_err(MlflowError::from)
}

pub(super) fn body<T: serde::de::DeserializeOwned>(bytes: &Bytes) -> Result<T, MlflowError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) { b"{}" } else { bytes };
    serde_json::from_slice(bytes).map_err(|e| {
        MlflowError::new(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            format!("the request body is not valid: {e}"),
        )
    })
}

/// Query parameters in order, repeated keys kept.
pub(super) fn query(raw: Option<String>) -> Vec<(String, String)> {
    url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()).into_owned().collect()
}

pub(super) fn one<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn all<'a>(q: &'a [(String, String)], key: &str) -> Vec<&'a str> {
    q.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect()
}

pub(super) fn required(value: Option<String>, name: &str) -> Result<String, MlflowError> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| MlflowError::invalid(format!("Missing value for required parameter '{name}'.")))
}

/// A version number sent as a string ("2") or a number.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum VersionField {
    Text(String),
    Number(u64),
}

fn version(field: Option<VersionField>) -> Result<u32, MlflowError> {
    let text = match field {
        None => return Err(MlflowError::invalid("Missing value for required parameter 'version'.")),
        Some(VersionField::Text(t)) => t,
        Some(VersionField::Number(n)) => n.to_string(),
    };
    parse_version(&text)
}

fn parse_version(text: &str) -> Result<u32, MlflowError> {
    text.trim().parse::<u32>().ok().filter(|v| *v > 0).ok_or_else(|| {
        MlflowError::invalid(format!("Parameter 'version' must be a positive integer, got '{text}'."))
    })
}

#[derive(Deserialize, Default)]
pub(super) struct Tag {
    pub(super) key: String,
    #[serde(default)]
    pub(super) value: String,
}

fn tags(list: Vec<Tag>) -> BTreeMap<String, String> {
    list.into_iter().map(|t| (t.key, t.value)).collect()
}

// ----- shapes -----

pub(super) fn tag_list(tags: &BTreeMap<String, String>) -> Vec<Value> {
    tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect()
}

fn insert_text(object: &mut serde_json::Map<String, Value>, key: &str, text: &str) {
    if !text.is_empty() {
        object.insert(key.into(), Value::String(text.into()));
    }
}

fn version_json(view: &VersionView) -> Value {
    let v = &view.version;
    let mut object = serde_json::Map::new();
    object.insert("name".into(), json!(view.model.name));
    object.insert("version".into(), json!(v.version.to_string()));
    object.insert("creation_timestamp".into(), json!(v.created_ms));
    object.insert("last_updated_timestamp".into(), json!(v.updated_ms));
    insert_text(&mut object, "user_id", &v.user_id);
    object.insert("current_stage".into(), json!(view.stage.name()));
    insert_text(&mut object, "description", &v.description);
    insert_text(&mut object, "source", &v.source);
    insert_text(&mut object, "run_id", &v.run_id);
    object.insert("status".into(), json!("READY"));
    if !v.tags.is_empty() {
        object.insert("tags".into(), json!(tag_list(&v.tags)));
    }
    insert_text(&mut object, "run_link", &v.run_link);
    if !view.aliases.is_empty() {
        object.insert("aliases".into(), json!(view.aliases));
    }
    Value::Object(object)
}

fn model_json(
    registry: &Registry,
    model: &crate::store::tables::RegistryModel,
) -> Result<Value, RegistryError> {
    let latest = registry.latest_versions(&model.name, &[])?;
    let mut object = serde_json::Map::new();
    object.insert("name".into(), json!(model.name));
    object.insert("creation_timestamp".into(), json!(model.created_ms));
    object.insert("last_updated_timestamp".into(), json!(model.updated_ms));
    insert_text(&mut object, "user_id", &model.user_id);
    insert_text(&mut object, "description", &model.description);
    if !latest.is_empty() {
        object.insert("latest_versions".into(), Value::Array(latest.iter().map(version_json).collect()));
    }
    if !model.tags.is_empty() {
        object.insert("tags".into(), json!(tag_list(&model.tags)));
    }
    if !model.aliases.is_empty() {
        let aliases: Vec<Value> =
            model.aliases.iter().map(|(a, v)| json!({"alias": a, "version": v.to_string()})).collect();
        object.insert("aliases".into(), Value::Array(aliases));
    }
    Ok(Value::Object(object))
}

fn registered_model(registry: &Registry, name: &str) -> Result<Value, RegistryError> {
    let model = registry.require_model(name)?;
    Ok(json!({"registered_model": model_json(registry, &model)?}))
}

// ----- registered models -----

#[derive(Deserialize)]
struct CreateModel {
    name: Option<String>,
    #[serde(default)]
    tags: Vec<Tag>,
    #[serde(default)]
    description: String,
}

async fn create_model(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: CreateModel = body(&raw)?;
    let name = required(request.name, "name")?;
    Ok(Json(
        run(&state, move |r| {
            r.create_model(&ctx, &name, &request.description, tags(request.tags))?;
            registered_model(r, &name)
        })
        .await?,
    ))
}

#[derive(Deserialize)]
struct Rename {
    name: Option<String>,
    new_name: Option<String>,
}

async fn rename_model(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Rename = body(&raw)?;
    let name = required(request.name, "name")?;
    let new_name = required(request.new_name, "new_name")?;
    Ok(Json(
        run(&state, move |r| {
            r.rename_model(&ctx, &name, &new_name)?;
            registered_model(r, &new_name)
        })
        .await?,
    ))
}

#[derive(Deserialize)]
struct Update {
    name: Option<String>,
    version: Option<VersionField>,
    #[serde(default)]
    description: String,
}

async fn update_model(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Update = body(&raw)?;
    let name = required(request.name, "name")?;
    Ok(Json(
        run(&state, move |r| {
            r.update_model(&ctx, &name, &request.description)?;
            registered_model(r, &name)
        })
        .await?,
    ))
}

#[derive(Deserialize)]
struct Named {
    name: Option<String>,
    version: Option<VersionField>,
    key: Option<String>,
    alias: Option<String>,
}

async fn delete_model(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Named = body(&raw)?;
    let name = required(request.name, "name")?;
    run(&state, move |r| r.delete_model(&ctx, &name)).await?;
    Ok(Json(json!({})))
}

async fn get_model(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let name = required(one(&q, "name").map(str::to_owned), "name")?;
    Ok(Json(run(&state, move |r| registered_model(r, &name)).await?))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum OrderKey {
    Name,
    Version,
    Created,
    Updated,
}

/// `order_by` clauses: `name`, `version_number` (versions), `creation_timestamp`,
/// `last_updated_timestamp`, each with an optional ASC or DESC.
fn order_by(clauses: &[&str], kind: Kind) -> Result<Vec<(OrderKey, bool)>, MlflowError> {
    clauses
        .iter()
        .map(|clause| {
            let mut words = clause.split_whitespace();
            let field = words.next().unwrap_or("").trim_matches('`');
            let key = match (field, kind) {
                ("name", _) => OrderKey::Name,
                ("version_number", Kind::Versions) => OrderKey::Version,
                ("creation_timestamp" | "timestamp", _) => OrderKey::Created,
                ("last_updated_timestamp", _) => OrderKey::Updated,
                _ => {
                    return Err(MlflowError::invalid(format!(
                        "Invalid order_by clause '{clause}': unknown field '{field}'."
                    )));
                }
            };
            let ascending = match words.next().map(str::to_ascii_uppercase).as_deref() {
                None | Some("ASC") => true,
                Some("DESC") => false,
                Some(other) => {
                    return Err(MlflowError::invalid(format!(
                        "Invalid order_by clause '{clause}': '{other}' is not ASC or DESC."
                    )));
                }
            };
            if words.next().is_some() {
                return Err(MlflowError::invalid(format!("Invalid order_by clause '{clause}'.")));
            }
            Ok((key, ascending))
        })
        .collect()
}

/// Page tokens: the offset of the next page, hex-encoded so clients treat it as opaque.
pub(super) fn page_offset(token: Option<&str>) -> Result<usize, MlflowError> {
    let Some(token) = token.filter(|t| !t.is_empty()) else { return Ok(0) };
    let bad = || MlflowError::invalid(format!("Invalid page token '{token}'."));
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| token.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    String::from_utf8(bytes).ok().and_then(|t| t.strip_prefix("offset:")?.parse().ok()).ok_or_else(bad)
}

pub(super) fn page_token(offset: usize) -> String {
    crate::artifacts::hex(format!("offset:{offset}").as_bytes())
}

fn max_results(q: &[(String, String)], default: usize, max: usize) -> Result<usize, MlflowError> {
    match one(q, "max_results") {
        None | Some("") => Ok(default),
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=max).contains(&n) => Ok(n),
            _ => Err(MlflowError::invalid(format!(
                "Invalid value {text} for parameter 'max_results' supplied; it must be at most {max}."
            ))),
        },
    }
}

/// One page of `items` sorted by `order` (stable, so ties keep the default order).
fn page<T>(
    mut items: Vec<T>,
    order: &[(OrderKey, bool)],
    sort_key: impl Fn(&T, OrderKey) -> (String, u64),
    offset: usize,
    limit: usize,
) -> (Vec<T>, Option<String>) {
    for &(key, ascending) in order.iter().rev() {
        items.sort_by(|a, b| {
            let ordering = sort_key(a, key).cmp(&sort_key(b, key));
            if ascending { ordering } else { ordering.reverse() }
        });
    }
    let next = (items.len() > offset + limit).then(|| page_token(offset + limit));
    (items.into_iter().skip(offset).take(limit).collect(), next)
}

async fn search_models(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let clauses =
        filter::parse(one(&q, "filter").unwrap_or(""), Kind::Models).map_err(MlflowError::invalid)?;
    let limit = max_results(&q, 100, MAX_MODELS_PAGE)?;
    let order = order_by(&all(&q, "order_by"), Kind::Models)?;
    let offset = page_offset(one(&q, "page_token"))?;
    let answer = run(&state, move |r| {
        let models: Vec<_> = r
            .models()?
            .into_iter()
            .filter(|m| {
                filter::matches(
                    &clauses,
                    &Subject { name: &m.name, version: None, run_id: "", source: "", tags: &m.tags },
                )
            })
            .collect();
        let (models, next) = page(
            models,
            &order,
            |m, key| match key {
                OrderKey::Name | OrderKey::Version => (m.name.clone(), 0),
                OrderKey::Created => (String::new(), m.created_ms),
                OrderKey::Updated => (String::new(), m.updated_ms),
            },
            offset,
            limit,
        );
        let models = models.iter().map(|m| model_json(r, m)).collect::<Result<Vec<_>, _>>()?;
        let mut answer = json!({"registered_models": models});
        if let Some(next) = next {
            answer["next_page_token"] = json!(next);
        }
        Ok(answer)
    })
    .await?;
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct Latest {
    name: Option<String>,
    #[serde(default)]
    stages: Vec<String>,
}

async fn latest(state: &AppState, request: Latest) -> Answer {
    let name = required(request.name, "name")?;
    let stages = request.stages.iter().map(|s| Stage::parse(s)).collect::<Result<Vec<_>, _>>()?;
    let versions = run(state, move |r| r.latest_versions(&name, &stages)).await?;
    Ok(Json(json!({"model_versions": versions.iter().map(version_json).collect::<Vec<_>>()})))
}

async fn latest_versions(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    reader(&state, &headers)?;
    latest(&state, body(&raw)?).await
}

async fn latest_versions_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let request = Latest {
        name: one(&q, "name").map(str::to_owned),
        stages: all(&q, "stages").into_iter().map(str::to_owned).collect(),
    };
    latest(&state, request).await
}

#[derive(Deserialize)]
struct SetTag {
    name: Option<String>,
    version: Option<VersionField>,
    key: Option<String>,
    #[serde(default)]
    value: String,
}

async fn set_model_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: SetTag = body(&raw)?;
    let name = required(request.name, "name")?;
    let key = required(request.key, "key")?;
    run(&state, move |r| r.set_model_tag(&ctx, &name, &key, &request.value)).await?;
    Ok(Json(json!({})))
}

async fn delete_model_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Named = body(&raw)?;
    let name = required(request.name, "name")?;
    let key = required(request.key, "key")?;
    run(&state, move |r| r.delete_model_tag(&ctx, &name, &key)).await?;
    Ok(Json(json!({})))
}

async fn set_alias(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Named = body(&raw)?;
    let name = required(request.name, "name")?;
    let alias = required(request.alias, "alias")?;
    let number = version(request.version)?;
    run(&state, move |r| r.set_alias(&ctx, &name, &alias, number)).await?;
    Ok(Json(json!({})))
}

async fn delete_alias(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Named = body(&raw)?;
    let name = required(request.name, "name")?;
    let alias = required(request.alias, "alias")?;
    run(&state, move |r| r.delete_alias(&ctx, &name, &alias)).await?;
    Ok(Json(json!({})))
}

async fn get_alias(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let name = required(one(&q, "name").map(str::to_owned), "name")?;
    let alias = required(one(&q, "alias").map(str::to_owned), "alias")?;
    let view = run(&state, move |r| r.by_alias(&name, &alias)).await?;
    Ok(Json(json!({"model_version": version_json(&view)})))
}

// ----- model versions -----

#[derive(Deserialize)]
struct CreateVersion {
    name: Option<String>,
    #[serde(default)]
    source: String,
    #[serde(default)]
    run_id: String,
    #[serde(default)]
    tags: Vec<Tag>,
    #[serde(default)]
    run_link: String,
    #[serde(default)]
    description: String,
    /// A logged model's id (`register_model("models:/<id>")`).
    model_id: Option<String>,
}

async fn create_version(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: CreateVersion = body(&raw)?;
    let name = required(request.name, "name")?;
    // A logged model's version: its files are where the model's are, and its run made it.
    let logged = request.model_id.filter(|m| !m.is_empty()).or_else(|| {
        request.source.strip_prefix("models:/").filter(|m| m.starts_with("m-")).map(str::to_owned)
    });
    let (location, run_id) = match logged {
        Some(id) => {
            let model = super::tracking::track(&state, move |t| t.logged_model(&id, false)).await?;
            let run_id = if request.run_id.is_empty() { model.source_run_id } else { request.run_id };
            (Some(model.artifact_location), run_id)
        }
        // Another version (`copy_model_version` sends `models:/<name>/<version>`): its files.
        None => match request.source.strip_prefix("models:/").map(str::to_owned) {
            Some(uri) => {
                let view = run(&state, move |r| registered(r, &uri)).await?;
                (Some(download_uri(&view)), request.run_id)
            }
            None => (None, request.run_id),
        },
    };
    let new = NewVersion {
        source: request.source,
        run_id,
        run_link: request.run_link,
        description: request.description,
        tags: tags(request.tags),
        file: None,
        commitment: None,
        location,
    };
    let view = run(&state, move |r| r.create_version(&ctx, &name, new)).await?;
    Ok(Json(json!({"model_version": version_json(&view)})))
}

/// The version a model URI names, as MLflow reads them: `models:/<name>/<version>`,
/// `models:/<name>@<alias>`, `models:/<name>/latest` (the newest version) or
/// `models:/<name>/<stage>` (the newest in that stage).
fn registered(registry: &Registry, uri: &str) -> Result<VersionView, RegistryError> {
    let uri = uri.trim_end_matches('/');
    if let Some((name, alias)) = uri.split_once('@') {
        return registry.by_alias(name, alias);
    }
    let Some((name, which)) = uri.rsplit_once('/') else {
        return Err(RegistryError::Invalid(format!(
            "source 'models:/{uri}' is not models:/<name>/<version> or models:/<name>@<alias>"
        )));
    };
    if let Ok(number) = which.parse::<u32>() {
        return registry.version(name, number);
    }
    let stages = match which {
        "latest" => Vec::new(),
        stage => vec![Stage::parse(stage).map_err(|_| {
            RegistryError::Invalid(format!(
                "source 'models:/{uri}' names '{which}', which is neither a version number, 'latest' nor a stage"
            ))
        })?],
    };
    registry.latest_versions(name, &stages)?.into_iter().max_by_key(|v| v.version.version).ok_or_else(|| {
        RegistryError::NotFound(format!("model '{name}' has no version that 'models:/{uri}' names"))
    })
}

async fn update_version(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Update = body(&raw)?;
    let name = required(request.name, "name")?;
    let number = version(request.version)?;
    let view = run(&state, move |r| r.update_version(&ctx, &name, number, &request.description)).await?;
    Ok(Json(json!({"model_version": version_json(&view)})))
}

#[derive(Deserialize)]
struct Transition {
    name: Option<String>,
    version: Option<VersionField>,
    stage: Option<String>,
    #[serde(default)]
    archive_existing_versions: bool,
}

async fn transition_stage(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Transition = body(&raw)?;
    let name = required(request.name, "name")?;
    let number = version(request.version)?;
    let stage = Stage::parse(&required(request.stage, "stage")?)?;
    let archive = request.archive_existing_versions;
    let view = run(&state, move |r| r.transition_stage(&ctx, &name, number, stage, archive)).await?;
    Ok(Json(json!({"model_version": version_json(&view)})))
}

async fn delete_version(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Named = body(&raw)?;
    let name = required(request.name, "name")?;
    let number = version(request.version)?;
    run(&state, move |r| r.delete_version(&ctx, &name, number)).await?;
    Ok(Json(json!({})))
}

fn name_and_version(raw: Option<String>) -> Result<(String, u32), MlflowError> {
    let q = query(raw);
    let name = required(one(&q, "name").map(str::to_owned), "name")?;
    let number = parse_version(&required(one(&q, "version").map(str::to_owned), "version")?)?;
    Ok((name, number))
}

async fn get_version(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Answer {
    reader(&state, &headers)?;
    let (name, number) = name_and_version(raw)?;
    let view = run(&state, move |r| r.version(&name, number)).await?;
    Ok(Json(json!({"model_version": version_json(&view)})))
}

async fn download_uri_of(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let (name, number) = name_and_version(raw)?;
    let view = run(&state, move |r| r.version(&name, number)).await?;
    Ok(Json(json!({"artifact_uri": download_uri(&view)})))
}

async fn search_versions(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let clauses =
        filter::parse(one(&q, "filter").unwrap_or(""), Kind::Versions).map_err(MlflowError::invalid)?;
    let limit = max_results(&q, 10_000, MAX_VERSIONS_PAGE)?;
    let mut order = order_by(&all(&q, "order_by"), Kind::Versions)?;
    if order.is_empty() {
        order = vec![(OrderKey::Name, true), (OrderKey::Version, false)];
    }
    let offset = page_offset(one(&q, "page_token"))?;
    let answer = run(&state, move |r| {
        let versions: Vec<_> = r
            .all_versions()?
            .into_iter()
            .filter(|v| {
                filter::matches(
                    &clauses,
                    &Subject {
                        name: &v.model.name,
                        version: Some(v.version.version),
                        run_id: &v.version.run_id,
                        source: &v.version.source,
                        tags: &v.version.tags,
                    },
                )
            })
            .collect();
        let (versions, next) = page(
            versions,
            &order,
            |v, key| match key {
                OrderKey::Name => (v.model.name.clone(), 0),
                OrderKey::Version => (String::new(), u64::from(v.version.version)),
                OrderKey::Created => (String::new(), v.version.created_ms),
                OrderKey::Updated => (String::new(), v.version.updated_ms),
            },
            offset,
            limit,
        );
        let mut answer = json!({"model_versions": versions.iter().map(version_json).collect::<Vec<_>>()});
        if let Some(next) = next {
            answer["next_page_token"] = json!(next);
        }
        Ok(answer)
    })
    .await?;
    Ok(Json(answer))
}

async fn set_version_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: SetTag = body(&raw)?;
    let name = required(request.name, "name")?;
    let number = version(request.version)?;
    let key = required(request.key, "key")?;
    run(&state, move |r| r.set_version_tag(&ctx, &name, number, &key, &request.value)).await?;
    Ok(Json(json!({})))
}

async fn delete_version_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Named = body(&raw)?;
    let name = required(request.name, "name")?;
    let number = version(request.version)?;
    let key = required(request.key, "key")?;
    run(&state, move |r| r.delete_version_tag(&ctx, &name, number, &key)).await?;
    Ok(Json(json!({})))
}

// ----- artifacts -----

/// The direct children of `?path=` (the root without it), named relative to it.
async fn list_artifacts(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    let ctx = reader(&state, &headers)?;
    let q = query(raw);
    let dir = one(&q, "path").unwrap_or("").to_owned();
    let entries = run(&state, move |r| {
        r.check_tree_read(&ctx.actor, &dir)?;
        r.list(&dir)
    })
    .await?;
    let files: Vec<Value> = entries
        .into_iter()
        .map(|e| {
            let name = e.path.rsplit('/').next().unwrap_or(&e.path).to_owned();
            match e.file_size {
                Some(size) => json!({"path": name, "is_dir": e.is_dir, "file_size": size}),
                None => json!({"path": name, "is_dir": e.is_dir}),
            }
        })
        .collect();
    Ok(Json(if files.is_empty() { json!({}) } else { json!({"files": files}) }))
}

async fn download_artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Result<Response, MlflowError> {
    let ctx = reader(&state, &headers)?;
    let lookup = path.clone();
    let record = run(&state, move |r| {
        r.check_tree_read(&ctx.actor, &lookup)?;
        let record = r.file(&lookup)?;
        if let Some(record) = &record {
            r.check_content_read(&ctx.actor, &record.blake3)?;
        }
        Ok(record)
    })
    .await?
    .ok_or_else(|| {
        MlflowError::new(StatusCode::NOT_FOUND, "RESOURCE_DOES_NOT_EXIST", format!("no artifact at '{path}'"))
    })?;
    let name = path.rsplit('/').next().map(str::to_owned);
    Ok(transfer::serve_blob(
        state.registry.artifacts(),
        record.blake3,
        record.size,
        &headers,
        name.as_deref(),
    )?)
}

/// Stores the request body (streamed) at the path, replacing what was there.
async fn upload_artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(path): Path<String>,
    request: Body,
) -> Answer {
    let ctx = caller(&state, &headers)?;
    if ctx.actor == Actor::Anonymous {
        return Err(MlflowError::new(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "uploading needs a bearer token",
        ));
    }
    registry::check_path(&path)?;
    transfer::check_length(&headers, state.max_upload, 0)?;
    let (who, what) = (ctx.clone(), path.clone());
    super::tracking::track(&state, move |t| t.check_artifact_write(&who, &what)).await?;
    let (blob, _) = transfer::ingest(
        state.registry.artifacts().clone(),
        request.into_data_stream(),
        state.max_upload,
        false,
    )
    .await?;
    run(&state, move |r| r.put_file(&ctx, &path, &blob)).await?;
    Ok(Json(json!({})))
}

async fn delete_artifact(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(path): Path<String>,
) -> Answer {
    let ctx = caller(&state, &headers)?;
    let (who, what) = (ctx.clone(), path.clone());
    super::tracking::track(&state, move |t| t.check_artifact_write(&who, &what)).await?;
    run(&state, move |r| r.delete_path(&ctx, &path)).await?;
    Ok(Json(json!({})))
}
