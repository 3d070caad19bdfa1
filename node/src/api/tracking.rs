//! MLflow's tracking API (`/api/2.0/mlflow/experiments/...`, `runs/...`,
//! `metrics/get-history`) over the node's [`Tracking`] store, on the same wire conventions as
//! the registry's face (`mlflow.rs`): int64 fields as numbers (strings accepted), metric values
//! as numbers or `"NaN"`, `"Infinity"`, `"-Infinity"`, enums by name, empty lists omitted.

use std::collections::BTreeMap;

use axum::{
    Json, Router,
    body::Bytes,
    extract::Path,
    extract::{RawQuery, State},
    http::HeaderMap,
    routing::{delete, get, patch, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    AppState,
    error::ApiError,
    mlflow::{
        Answer, MlflowError, Tag, body, caller, one, page_offset, page_token, query, reader, required,
        tag_list,
    },
};
use crate::{
    registry::{
        RegistryError,
        filter::{Clause, Kind},
    },
    tracking::{
        self, ExperimentRecord, LoggedModelRecord, Logs, MetricValue, ModelStatus, NewLoggedModel, NewRun,
        Order, RunRecord, RunStatus, Tracking, ViewType, parse_experiment_id,
    },
};

/// MLflow's: the most a search page holds, and its default.
const MAX_SEARCH_PAGE: usize = 50_000;
const DEFAULT_SEARCH_PAGE: usize = 1000;
const MAX_HISTORY_PAGE: usize = 100_000;

pub fn routes() -> Router<AppState> {
    let ex = "/api/2.0/mlflow/experiments";
    let runs = "/api/2.0/mlflow/runs";
    let lm = "/api/2.0/mlflow/logged-models";
    Router::new()
        .route(&format!("{ex}/create"), post(create_experiment))
        .route(&format!("{ex}/get"), get(get_experiment))
        .route(&format!("{ex}/get-by-name"), get(get_experiment_by_name))
        .route(&format!("{ex}/search"), post(search_experiments).get(search_experiments_get))
        .route(&format!("{ex}/update"), post(rename_experiment))
        .route(&format!("{ex}/delete"), post(delete_experiment))
        .route(&format!("{ex}/restore"), post(restore_experiment))
        .route(&format!("{ex}/set-experiment-tag"), post(set_experiment_tag))
        .route(&format!("{ex}/delete-experiment-tag"), post(delete_experiment_tag))
        .route(&format!("{runs}/create"), post(create_run))
        .route(&format!("{runs}/get"), get(get_run))
        .route(&format!("{runs}/update"), post(update_run))
        .route(&format!("{runs}/delete"), post(delete_run))
        .route(&format!("{runs}/restore"), post(restore_run))
        .route(&format!("{runs}/log-metric"), post(log_metric))
        .route(&format!("{runs}/log-parameter"), post(log_param))
        .route(&format!("{runs}/set-tag"), post(set_tag))
        .route(&format!("{runs}/delete-tag"), post(delete_tag))
        .route(&format!("{runs}/log-batch"), post(log_batch))
        .route(&format!("{runs}/log-model"), post(log_model))
        .route(&format!("{runs}/log-inputs"), post(log_inputs))
        .route(&format!("{runs}/search"), post(search_runs).get(search_runs_get))
        .route(&format!("{runs}/outputs"), post(log_outputs))
        .route("/api/2.0/mlflow/metrics/get-history", get(metric_history))
        .route(lm, post(create_logged_model))
        .route(&format!("{lm}/search"), post(search_logged_models))
        .route(
            &format!("{lm}/{{model_id}}"),
            get(get_logged_model).patch(finalize_logged_model).delete(delete_logged_model),
        )
        .route(&format!("{lm}/{{model_id}}/tags"), patch(set_logged_model_tags))
        .route(&format!("{lm}/{{model_id}}/tags/{{tag_key}}"), delete(delete_logged_model_tag))
        .route(&format!("{lm}/{{model_id}}/params"), post(log_logged_model_params))
}

/// Runs `f` on the blocking pool against the tracking store.
pub(super) async fn track<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Tracking) -> Result<T, RegistryError> + Send + 'static,
) -> Result<T, MlflowError> {
    let tracking = state.tracking.clone();
    tokio::task::spawn_blocking(move || f(&tracking))
        .await
        .map_err(|e| MlflowError::from(ApiError::from(e)))?
        .map_err(MlflowError::from)
}

// ----- fields as the client sends them -----

/// An int64: a JSON number, or a string of one.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum Int {
    Number(i64),
    Text(String),
}

fn int(field: Option<Int>, name: &str) -> Result<Option<i64>, MlflowError> {
    match field {
        None => Ok(None),
        Some(Int::Number(n)) => Ok(Some(n)),
        Some(Int::Text(t)) if t.trim().is_empty() => Ok(None),
        Some(Int::Text(t)) => {
            t.trim().parse().map(Some).map_err(|_| {
                MlflowError::invalid(format!("Parameter '{name}' must be an integer, got '{t}'."))
            })
        }
    }
}

/// A double: a JSON number, or protobuf JSON's `"NaN"`, `"Infinity"`, `"-Infinity"`.
#[derive(Deserialize, Clone, Debug)]
#[serde(untagged)]
enum Double {
    Number(f64),
    Text(String),
}

fn double(field: Option<Double>, key: &str) -> Result<f64, MlflowError> {
    match field {
        None => Err(MlflowError::invalid(format!(
            "Missing value for required parameter 'value' of metric '{key}'."
        ))),
        Some(Double::Number(n)) => Ok(n),
        Some(Double::Text(t)) => match t.trim() {
            "NaN" | "nan" => Ok(f64::NAN),
            "Infinity" | "inf" => Ok(f64::INFINITY),
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            other => other.parse().map_err(|_| {
                MlflowError::invalid(format!("metric '{key}' has value '{t}', which is not a number"))
            }),
        },
    }
}

fn value_json(value: f64) -> Value {
    match value {
        v if v.is_finite() => json!(v),
        v if v.is_nan() => json!("NaN"),
        v if v > 0.0 => json!("Infinity"),
        _ => json!("-Infinity"),
    }
}

fn experiment_id(value: Option<String>) -> Result<u64, MlflowError> {
    Ok(parse_experiment_id(&required(value, "experiment_id")?)?)
}

/// `run_id`, or the older `run_uuid` the client also sends.
fn run_id(run_id: Option<String>, run_uuid: Option<String>) -> Result<String, MlflowError> {
    required(run_id.filter(|r| !r.is_empty()).or(run_uuid), "run_id")
}

fn pairs(list: Vec<Tag>) -> Vec<(String, String)> {
    list.into_iter().map(|t| (t.key, t.value)).collect()
}

// ----- shapes -----

fn insert_tags(object: &mut serde_json::Map<String, Value>, tags: &BTreeMap<String, String>) {
    if !tags.is_empty() {
        object.insert("tags".into(), json!(tag_list(tags)));
    }
}

fn experiment_json(e: &ExperimentRecord) -> Value {
    let mut object = serde_json::Map::new();
    object.insert("experiment_id".into(), json!(e.id.to_string()));
    object.insert("name".into(), json!(e.name));
    object.insert("artifact_location".into(), json!(e.artifact_location));
    object.insert("lifecycle_stage".into(), json!(if e.deleted { "deleted" } else { "active" }));
    object.insert("last_update_time".into(), json!(e.updated_ms));
    object.insert("creation_time".into(), json!(e.created_ms));
    insert_tags(&mut object, &e.tags);
    Value::Object(object)
}

fn run_info_json(r: &RunRecord) -> Value {
    let id = r.run_id();
    let mut info = json!({
        "run_id": id,
        "run_uuid": id,
        "run_name": r.name,
        "experiment_id": r.experiment_id.to_string(),
        "user_id": r.user_id,
        "status": r.status.name(),
        "start_time": r.start_ms,
        "artifact_uri": r.artifact_uri,
        "lifecycle_stage": if r.deleted { "deleted" } else { "active" },
    });
    if let Some(end) = r.end_ms {
        info["end_time"] = json!(end);
    }
    info
}

fn metric_json(key: &str, m: &MetricValue) -> Value {
    json!({"key": key, "value": value_json(m.value), "timestamp": m.timestamp, "step": m.step})
}

fn run_json(r: &RunRecord) -> Value {
    let mut data = serde_json::Map::new();
    if !r.latest.is_empty() {
        data.insert("metrics".into(), r.latest.iter().map(|(k, m)| metric_json(k, m)).collect());
    }
    if !r.params.is_empty() {
        data.insert("params".into(), json!(tag_list(&r.params)));
    }
    insert_tags(&mut data, &r.tags);
    let mut run = json!({"info": run_info_json(r), "data": data});
    if !r.inputs.is_empty() {
        let inputs: Vec<Value> = r.inputs.iter().filter_map(|i| serde_json::from_str(i).ok()).collect();
        run["inputs"] = json!({"dataset_inputs": inputs});
    }
    if !r.outputs.is_empty() {
        let outputs: Vec<Value> = r
            .outputs
            .iter()
            .map(|(model, step)| json!({"model_id": format!("m-{}", crate::artifacts::hex(model)), "step": step}))
            .collect();
        run["outputs"] = json!({"model_outputs": outputs});
    }
    run
}

fn logged_model_json(m: &LoggedModelRecord) -> Value {
    let mut info = serde_json::Map::new();
    info.insert("model_id".into(), json!(m.model_id()));
    info.insert("experiment_id".into(), json!(m.experiment_id.to_string()));
    info.insert("name".into(), json!(m.name));
    info.insert("creation_timestamp_ms".into(), json!(m.created_ms));
    info.insert("last_updated_timestamp_ms".into(), json!(m.updated_ms));
    info.insert("artifact_uri".into(), json!(m.artifact_location));
    info.insert("status".into(), json!(m.status.name()));
    for (key, text) in [("model_type", &m.model_type), ("source_run_id", &m.source_run_id)] {
        if !text.is_empty() {
            info.insert(key.into(), json!(text));
        }
    }
    insert_tags(&mut info, &m.tags);
    let mut data = serde_json::Map::new();
    if !m.params.is_empty() {
        data.insert("params".into(), json!(tag_list(&m.params)));
    }
    if !m.metrics.is_empty() {
        let metrics = m.metrics.iter().map(|(key, (point, run))| {
            let mut metric = metric_json(key, point);
            metric["run_id"] = json!(run);
            metric["model_id"] = json!(m.model_id());
            metric
        });
        data.insert("metrics".into(), metrics.collect());
    }
    json!({"info": info, "data": data})
}

// ----- experiments -----

#[derive(Deserialize)]
struct CreateExperiment {
    name: Option<String>,
    artifact_location: Option<String>,
    #[serde(default)]
    tags: Vec<Tag>,
}

async fn create_experiment(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: CreateExperiment = body(&raw)?;
    let name = required(request.name, "name")?;
    let id = track(&state, move |t| {
        t.create_experiment(&ctx, &name, request.artifact_location.as_deref(), pairs(request.tags))
    })
    .await?;
    Ok(Json(json!({"experiment_id": id.to_string()})))
}

async fn get_experiment(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let id = experiment_id(one(&query(raw), "experiment_id").map(str::to_owned))?;
    let experiment = track(&state, move |t| t.experiment(id)).await?;
    Ok(Json(json!({"experiment": experiment_json(&experiment)})))
}

async fn get_experiment_by_name(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let name = required(one(&query(raw), "experiment_name").map(str::to_owned), "experiment_name")?;
    let experiment = track(&state, move |t| t.experiment_by_name(&name)).await?;
    Ok(Json(json!({"experiment": experiment_json(&experiment)})))
}

/// A search request, from a JSON body or a query string.
#[derive(Deserialize, Default)]
struct Search {
    #[serde(default)]
    experiment_ids: Vec<String>,
    filter: Option<String>,
    max_results: Option<Int>,
    #[serde(default)]
    order_by: Vec<String>,
    page_token: Option<String>,
    view_type: Option<Value>,
    run_view_type: Option<Value>,
}

impl Search {
    fn from_query(raw: Option<String>) -> Self {
        let q = query(raw);
        let all = |key: &str| q.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect::<Vec<_>>();
        let text = |key: &str| one(&q, key).map(str::to_owned);
        Self {
            experiment_ids: all("experiment_ids"),
            filter: text("filter"),
            max_results: text("max_results").map(Int::Text),
            order_by: all("order_by"),
            page_token: text("page_token"),
            view_type: text("view_type").map(Value::String),
            run_view_type: text("run_view_type").map(Value::String),
        }
    }

    fn view(view: Option<&Value>) -> Result<ViewType, MlflowError> {
        let text = view.map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_owned));
        Ok(ViewType::parse(text.as_deref())?)
    }

    /// The page's offset and size.
    fn page(&self) -> Result<(usize, usize), MlflowError> {
        let limit = match int(self.max_results.clone(), "max_results")? {
            None => DEFAULT_SEARCH_PAGE,
            Some(n) if (1..=MAX_SEARCH_PAGE as i64).contains(&n) => n as usize,
            Some(n) => {
                return Err(MlflowError::invalid(format!(
                    "Invalid value {n} for parameter 'max_results' supplied; it must be between 1 and {MAX_SEARCH_PAGE}."
                )));
            }
        };
        Ok((page_offset(self.page_token.as_deref().filter(|t| !t.is_empty()))?, limit))
    }
}

/// One page of `items` as the answer's `key` (left out when empty), with the next page's token
/// when more remain.
fn page_answer<T>(
    items: &[T],
    offset: usize,
    limit: usize,
    key: &str,
    shape: impl Fn(&T) -> Value,
) -> Answer {
    let mut answer = json!({});
    let page: Vec<Value> = items.iter().skip(offset).take(limit).map(shape).collect();
    if !page.is_empty() {
        answer[key] = Value::Array(page);
    }
    if items.len() > offset.saturating_add(limit) {
        answer["next_page_token"] = json!(page_token(offset + limit));
    }
    Ok(Json(answer))
}

/// A search's filter and `order_by` entries, parsed for `kind`.
fn criteria(
    filter: Option<&str>,
    order: &[String],
    kind: Kind,
) -> Result<(Vec<Clause>, Vec<Order>), MlflowError> {
    let clauses = crate::registry::filter::parse(filter.unwrap_or(""), kind).map_err(MlflowError::invalid)?;
    let order: Vec<&str> = order.iter().map(String::as_str).collect();
    Ok((clauses, tracking::parse_order(&order, kind)?))
}

async fn experiments(state: &AppState, headers: &HeaderMap, search: Search) -> Answer {
    reader(state, headers)?;
    let view = Search::view(search.view_type.as_ref())?;
    let (offset, limit) = search.page()?;
    let (clauses, order) = criteria(search.filter.as_deref(), &search.order_by, Kind::Experiments)?;
    let found = track(state, move |t| t.search_experiments(view, &clauses, &order)).await?;
    page_answer(&found, offset, limit, "experiments", experiment_json)
}

async fn search_experiments(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let search: Search = body(&raw)?;
    experiments(&state, &headers, search).await
}

async fn search_experiments_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    experiments(&state, &headers, Search::from_query(raw)).await
}

#[derive(Deserialize)]
struct ExperimentChange {
    experiment_id: Option<String>,
    new_name: Option<String>,
    key: Option<String>,
    value: Option<String>,
}

async fn rename_experiment(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: ExperimentChange = body(&raw)?;
    let id = experiment_id(request.experiment_id)?;
    let new_name = required(request.new_name, "new_name")?;
    track(&state, move |t| t.rename_experiment(&ctx, id, &new_name)).await?;
    Ok(Json(json!({})))
}

async fn set_deleted(state: &AppState, headers: &HeaderMap, raw: &Bytes, deleted: bool) -> Answer {
    let ctx = caller(state, headers)?;
    let request: ExperimentChange = body(raw)?;
    let id = experiment_id(request.experiment_id)?;
    track(state, move |t| t.set_experiment_deleted(&ctx, id, deleted)).await?;
    Ok(Json(json!({})))
}

async fn delete_experiment(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    set_deleted(&state, &headers, &raw, true).await
}

async fn restore_experiment(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    set_deleted(&state, &headers, &raw, false).await
}

async fn experiment_tag(state: &AppState, headers: &HeaderMap, raw: &Bytes, set: bool) -> Answer {
    let ctx = caller(state, headers)?;
    let request: ExperimentChange = body(raw)?;
    let id = experiment_id(request.experiment_id)?;
    let key = required(request.key, "key")?;
    let value = set.then(|| request.value.unwrap_or_default());
    track(state, move |t| t.set_experiment_tag(&ctx, id, &key, value.as_deref())).await?;
    Ok(Json(json!({})))
}

async fn set_experiment_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    experiment_tag(&state, &headers, &raw, true).await
}

async fn delete_experiment_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    experiment_tag(&state, &headers, &raw, false).await
}

// ----- runs -----

#[derive(Deserialize)]
struct CreateRun {
    experiment_id: Option<String>,
    run_name: Option<String>,
    start_time: Option<Int>,
    #[serde(default)]
    tags: Vec<Tag>,
    /// The client's own idea of its user; the node records who signed in instead.
    #[serde(default, rename = "user_id")]
    _user_id: Option<String>,
}

async fn create_run(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: CreateRun = body(&raw)?;
    let experiment = match request.experiment_id.filter(|e| !e.trim().is_empty()) {
        Some(id) => parse_experiment_id(&id)?,
        None => tracking::DEFAULT_EXPERIMENT,
    };
    let new = NewRun {
        name: request.run_name,
        start_ms: int(request.start_time, "start_time")?,
        tags: pairs(request.tags),
    };
    let run = track(&state, move |t| t.create_run(&ctx, experiment, new)).await?;
    Ok(Json(json!({"run": run_json(&run)})))
}

async fn get_run(State(state): State<AppState>, headers: HeaderMap, RawQuery(raw): RawQuery) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let id = run_id(one(&q, "run_id").map(str::to_owned), one(&q, "run_uuid").map(str::to_owned))?;
    let run = track(&state, move |t| t.run(&id)).await?;
    Ok(Json(json!({"run": run_json(&run)})))
}

/// The fields of the run calls that change one run.
#[derive(Deserialize, Default)]
struct RunChange {
    run_id: Option<String>,
    run_uuid: Option<String>,
    status: Option<Value>,
    end_time: Option<Int>,
    run_name: Option<String>,
    key: Option<String>,
    value: Option<Value>,
    timestamp: Option<Int>,
    step: Option<Int>,
    #[serde(default)]
    metrics: Vec<MetricIn>,
    #[serde(default)]
    params: Vec<Tag>,
    #[serde(default)]
    tags: Vec<Tag>,
    model_json: Option<String>,
    #[serde(default)]
    datasets: Vec<Value>,
    model_id: Option<String>,
}

#[derive(Deserialize)]
struct MetricIn {
    key: String,
    value: Option<Double>,
    timestamp: Option<Int>,
    step: Option<Int>,
    /// A logged model the point is also for (MLflow 3).
    model_id: Option<String>,
}

impl RunChange {
    fn id(&mut self) -> Result<String, MlflowError> {
        run_id(self.run_id.take(), self.run_uuid.take())
    }
}

fn metric(
    key: String,
    value: Option<Double>,
    timestamp: Option<Int>,
    step: Option<Int>,
) -> Result<(String, MetricValue), MlflowError> {
    let value = double(value, &key)?;
    let timestamp = int(timestamp, "timestamp")?.unwrap_or_else(|| crate::registry::now_ms() as i64);
    let step = int(step, "step")?.unwrap_or(0);
    Ok((key, MetricValue { value, step, timestamp }))
}

/// The text of a JSON value the client sent as a string (or, leniently, as a number).
fn text_of(value: Option<Value>) -> Option<String> {
    value.map(|v| match v {
        Value::String(s) => s,
        other => other.to_string(),
    })
}

async fn update_run(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let mut request: RunChange = body(&raw)?;
    let id = request.id()?;
    let status = text_of(request.status).map(|s| RunStatus::parse(&s)).transpose()?;
    let end = int(request.end_time, "end_time")?;
    let name = request.run_name;
    let run = track(&state, move |t| t.update_run(&ctx, &id, status, end, name.as_deref())).await?;
    Ok(Json(json!({"run_info": run_info_json(&run)})))
}

async fn run_deleted(state: &AppState, headers: &HeaderMap, raw: &Bytes, deleted: bool) -> Answer {
    let ctx = caller(state, headers)?;
    let mut request: RunChange = body(raw)?;
    let id = request.id()?;
    track(state, move |t| t.set_run_deleted(&ctx, &id, deleted)).await?;
    Ok(Json(json!({})))
}

async fn delete_run(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    run_deleted(&state, &headers, &raw, true).await
}

async fn restore_run(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    run_deleted(&state, &headers, &raw, false).await
}

/// Logs what `logs` makes of the request to its run.
async fn log_to_run(
    state: &AppState,
    headers: &HeaderMap,
    raw: &Bytes,
    logs: impl FnOnce(&mut RunChange) -> Result<Logs, MlflowError>,
) -> Answer {
    let ctx = caller(state, headers)?;
    let mut request: RunChange = body(raw)?;
    let id = request.id()?;
    let logs = logs(&mut request)?;
    track(state, move |t| t.log(&ctx, &id, logs)).await?;
    Ok(Json(json!({})))
}

async fn log_metric(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    log_to_run(&state, &headers, &raw, |r| {
        let key = required(r.key.take(), "key")?;
        let value = r.value.take().map(serde_json::from_value::<Double>).transpose().map_err(|e| {
            MlflowError::invalid(format!("metric '{key}' has a value that is not a number: {e}"))
        })?;
        let (key, point) = metric(key, value, r.timestamp.take(), r.step.take())?;
        let model_metrics = r.model_id.take().filter(|m| !m.is_empty()).map(|m| (m, key.clone(), point));
        Ok(Logs {
            metrics: vec![(key, point)],
            model_metrics: model_metrics.into_iter().collect(),
            ..Logs::default()
        })
    })
    .await
}

async fn log_param(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    log_to_run(&state, &headers, &raw, |r| {
        let key = required(r.key.take(), "key")?;
        let value = text_of(r.value.take()).unwrap_or_default();
        Ok(Logs { params: vec![(key, value)], ..Logs::default() })
    })
    .await
}

async fn set_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    log_to_run(&state, &headers, &raw, |r| {
        let key = required(r.key.take(), "key")?;
        let value = text_of(r.value.take()).unwrap_or_default();
        Ok(Logs { tags: vec![(key, value)], ..Logs::default() })
    })
    .await
}

async fn log_batch(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    log_to_run(&state, &headers, &raw, |r| {
        let mut metrics = Vec::new();
        let mut model_metrics = Vec::new();
        for m in std::mem::take(&mut r.metrics) {
            let (key, point) = metric(m.key, m.value, m.timestamp, m.step)?;
            if let Some(model) = m.model_id.filter(|m| !m.is_empty()) {
                model_metrics.push((model, key.clone(), point));
            }
            metrics.push((key, point));
        }
        Ok(Logs {
            metrics,
            params: pairs(std::mem::take(&mut r.params)),
            tags: pairs(std::mem::take(&mut r.tags)),
            model_metrics,
        })
    })
    .await
}

async fn delete_tag(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let mut request: RunChange = body(&raw)?;
    let id = request.id()?;
    let key = required(request.key, "key")?;
    track(&state, move |t| t.delete_run_tag(&ctx, &id, &key)).await?;
    Ok(Json(json!({})))
}

async fn log_model(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let mut request: RunChange = body(&raw)?;
    let id = request.id()?;
    let text = required(request.model_json, "model_json")?;
    let model: Value = serde_json::from_str(&text)
        .map_err(|e| MlflowError::invalid(format!("model_json is not valid JSON: {e}")))?;
    track(&state, move |t| t.log_model(&ctx, &id, model)).await?;
    Ok(Json(json!({})))
}

async fn log_inputs(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let mut request: RunChange = body(&raw)?;
    let id = request.id()?;
    let datasets: Vec<String> = request.datasets.iter().map(Value::to_string).collect();
    track(&state, move |t| t.log_inputs(&ctx, &id, datasets)).await?;
    Ok(Json(json!({})))
}

async fn runs(state: &AppState, headers: &HeaderMap, search: Search) -> Answer {
    reader(state, headers)?;
    let view = Search::view(search.run_view_type.as_ref())?;
    let (offset, limit) = search.page()?;
    let experiments =
        search.experiment_ids.iter().map(|e| parse_experiment_id(e)).collect::<Result<Vec<_>, _>>()?;
    let (clauses, order) = criteria(search.filter.as_deref(), &search.order_by, Kind::Runs)?;
    let found = track(state, move |t| t.search_runs(&experiments, view, &clauses, &order)).await?;
    page_answer(&found, offset, limit, "runs", run_json)
}

async fn search_runs(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let search: Search = body(&raw)?;
    runs(&state, &headers, search).await
}

async fn search_runs_get(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    runs(&state, &headers, Search::from_query(raw)).await
}

async fn metric_history(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let q = query(raw);
    let id = run_id(one(&q, "run_id").map(str::to_owned), one(&q, "run_uuid").map(str::to_owned))?;
    let key = required(one(&q, "metric_key").map(str::to_owned), "metric_key")?;
    let limit = match int(one(&q, "max_results").map(|m| Int::Text(m.to_owned())), "max_results")? {
        None => usize::MAX,
        Some(n) if (1..=MAX_HISTORY_PAGE as i64).contains(&n) => n as usize,
        Some(n) => {
            return Err(MlflowError::invalid(format!(
                "Invalid value {n} for parameter 'max_results' supplied; it must be between 1 and {MAX_HISTORY_PAGE}."
            )));
        }
    };
    let from = page_offset(one(&q, "page_token").filter(|t| !t.is_empty()))? as u64;
    let history_key = key.clone();
    let (points, next) = track(&state, move |t| t.metric_history(&id, &history_key, from, limit)).await?;
    let mut answer = json!({});
    if !points.is_empty() {
        answer["metrics"] = points.iter().map(|m| metric_json(&key, m)).collect();
    }
    if let Some(next) = next {
        answer["next_page_token"] = json!(page_token(next as usize));
    }
    Ok(Json(answer))
}

// ----- logged models -----

#[derive(Deserialize)]
struct CreateLoggedModel {
    experiment_id: Option<String>,
    name: Option<String>,
    #[serde(default)]
    model_type: String,
    source_run_id: Option<String>,
    #[serde(default)]
    params: Vec<Tag>,
    #[serde(default)]
    tags: Vec<Tag>,
}

async fn create_logged_model(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: CreateLoggedModel = body(&raw)?;
    let experiment = experiment_id(request.experiment_id)?;
    let new = NewLoggedModel {
        name: request.name,
        model_type: request.model_type,
        source_run_id: request.source_run_id,
        params: pairs(request.params),
        tags: pairs(request.tags),
    };
    let model = track(&state, move |t| t.create_logged_model(&ctx, experiment, new)).await?;
    Ok(Json(json!({"model": logged_model_json(&model)})))
}

async fn get_logged_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Answer {
    reader(&state, &headers)?;
    let allow_deleted = one(&query(raw), "allow_deleted").is_some_and(|a| a.eq_ignore_ascii_case("true"));
    let model = track(&state, move |t| t.logged_model(&id, allow_deleted)).await?;
    Ok(Json(json!({"model": logged_model_json(&model)})))
}

#[derive(Deserialize, Default)]
struct ModelChange {
    status: Option<Value>,
    #[serde(default)]
    params: Vec<Tag>,
    #[serde(default)]
    tags: Vec<Tag>,
}

async fn finalize_logged_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: ModelChange = body(&raw)?;
    let status = text_of(request.status)
        .ok_or_else(|| MlflowError::invalid("Missing value for required parameter 'status'."))?;
    let status = ModelStatus::parse(&status)?;
    let model = track(&state, move |t| t.finalize_logged_model(&ctx, &id, status)).await?;
    Ok(Json(json!({"model": logged_model_json(&model)})))
}

async fn delete_logged_model(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Answer {
    let ctx = caller(&state, &headers)?;
    track(&state, move |t| t.delete_logged_model(&ctx, &id)).await?;
    Ok(Json(json!({})))
}

/// Tags (PATCH `…/tags`) or params (POST `…/params`) for a logged model.
async fn model_metadata(
    state: &AppState,
    headers: &HeaderMap,
    id: String,
    raw: &Bytes,
    params: bool,
) -> Answer {
    let ctx = caller(state, headers)?;
    let request: ModelChange = body(raw)?;
    let (params, tags) =
        if params { (pairs(request.params), Vec::new()) } else { (Vec::new(), pairs(request.tags)) };
    track(state, move |t| t.change_logged_model_metadata(&ctx, &id, params, tags, None)).await?;
    Ok(Json(json!({})))
}

async fn set_logged_model_tags(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    model_metadata(&state, &headers, id, &raw, false).await
}

async fn log_logged_model_params(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    model_metadata(&state, &headers, id, &raw, true).await
}

async fn delete_logged_model_tag(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, key)): Path<(String, String)>,
) -> Answer {
    let ctx = caller(&state, &headers)?;
    track(&state, move |t| t.change_logged_model_metadata(&ctx, &id, Vec::new(), Vec::new(), Some(&key)))
        .await?;
    Ok(Json(json!({})))
}

/// `order_by` of a logged-model search: `{field_name, ascending}` objects.
#[derive(Deserialize)]
struct ModelOrder {
    field_name: String,
    #[serde(default = "ascending")]
    ascending: bool,
}

fn ascending() -> bool {
    true
}

#[derive(Deserialize)]
struct SearchModels {
    #[serde(default)]
    experiment_ids: Vec<String>,
    filter: Option<String>,
    max_results: Option<Int>,
    #[serde(default)]
    order_by: Vec<ModelOrder>,
    page_token: Option<String>,
}

async fn search_logged_models(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    reader(&state, &headers)?;
    let request: SearchModels = body(&raw)?;
    let search =
        Search { max_results: request.max_results, page_token: request.page_token, ..Search::default() };
    let (offset, limit) = search.page()?;
    let experiments =
        request.experiment_ids.iter().map(|e| parse_experiment_id(e)).collect::<Result<Vec<_>, _>>()?;
    let order: Vec<String> = request
        .order_by
        .iter()
        .map(|o| format!("{} {}", o.field_name, if o.ascending { "ASC" } else { "DESC" }))
        .collect();
    let (clauses, order) = criteria(request.filter.as_deref(), &order, Kind::LoggedModels)?;
    let found = track(&state, move |t| t.search_logged_models(&experiments, &clauses, &order)).await?;
    page_answer(&found, offset, limit, "models", logged_model_json)
}

#[derive(Deserialize)]
struct Outputs {
    run_id: Option<String>,
    #[serde(default)]
    models: Vec<ModelOutput>,
}

#[derive(Deserialize)]
struct ModelOutput {
    model_id: String,
    step: Option<Int>,
}

async fn log_outputs(State(state): State<AppState>, headers: HeaderMap, raw: Bytes) -> Answer {
    let ctx = caller(&state, &headers)?;
    let request: Outputs = body(&raw)?;
    let id = required(request.run_id, "run_id")?;
    let models = request
        .models
        .into_iter()
        .map(|m| Ok((m.model_id, int(m.step, "step")?.unwrap_or(0))))
        .collect::<Result<Vec<_>, MlflowError>>()?;
    track(&state, move |t| t.log_outputs(&ctx, &id, models)).await?;
    Ok(Json(json!({})))
}

// ----- permanent deletion -----

/// What to delete for good; a kind left out means every deleted one of it.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GcBody {
    /// Only what was deleted more than this many seconds ago.
    pub older_than_secs: Option<u64>,
    pub run_ids: Option<Vec<String>>,
    pub experiment_ids: Option<Vec<String>>,
    pub logged_model_ids: Option<Vec<String>>,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct GcAnswer {
    #[serde(flatten)]
    pub removed: tracking::GcReport,
    /// Blobs the artifact store deleted afterwards (nothing referenced them any more) and
    /// their stored bytes.
    pub blobs: u64,
    pub bytes: u64,
}

/// Deletes for good runs, logged models and experiments in the deleted lifecycle stage, with
/// their metric points and artifacts, as `mlflow gc` does; then collects the blobs nothing
/// references. An operator's call. Named ids that are not deleted (or not old enough) refuse
/// the whole call with nothing deleted.
#[utoipa::path(
    post,
    path = "/api/v1/tracking/gc",
    tag = "registry",
    request_body = GcBody,
    responses(
        (status = 200, body = GcAnswer),
        (status = 400, body = super::error::ErrorBody),
        (status = 401, body = super::error::ErrorBody),
        (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody),
    )
)]
pub async fn gc(
    State(state): State<AppState>,
    headers: HeaderMap,
    raw: Bytes,
) -> Result<Json<GcAnswer>, ApiError> {
    let ctx = super::auth::api_caller(&state, &headers)?;
    let body: GcBody = if raw.iter().all(u8::is_ascii_whitespace) {
        GcBody::default()
    } else {
        super::registry::json(&raw)?
    };
    let request = tracking::GcRequest {
        older_than_ms: body.older_than_secs.map(|s| s.saturating_mul(1000)),
        run_ids: body.run_ids,
        experiment_ids: body.experiment_ids,
        logged_model_ids: body.logged_model_ids,
    };
    let (tracking, registry) = (state.tracking.clone(), state.registry.clone());
    let (removed, collected) = tokio::task::spawn_blocking(move || {
        let removed = tracking.gc(&ctx, &request, |dir| match registry.delete_path(&ctx, dir) {
            Err(RegistryError::NotFound(_)) => Ok(0),
            other => other,
        })?;
        let collected = registry.artifacts().gc().map_err(RegistryError::Artifact)?;
        Ok::<_, RegistryError>((removed, collected))
    })
    .await??;
    Ok(Json(GcAnswer { removed, blobs: collected.blobs, bytes: collected.bytes }))
}
