//! Experiment tracking: MLflow's experiments and runs, with their params, tags and metric
//! series, so a team's training scripts (`mlflow.start_run()`, `log_param`, `log_metric`,
//! `log_artifact`) point at the node instead of a separate MLflow server, and a version in the
//! registry can name the run that made it.
//!
//! - Experiments have numeric ids (`0` is `Default`, made at first open); names are unique,
//!   deleted ones included, as MLflow's. An experiment's artifacts live in the node's artifact
//!   tree under `<experiment id>/` (`mlflow-artifacts:/<id>`), a run's under
//!   `<experiment id>/<run id>/artifacts`.
//! - Who may change what: an experiment belongs to the wallet that created it (one the operator
//!   created, `Default` among them, to nobody). Its runs are made by its owner or an operator,
//!   or by any signed-in caller when it belongs to nobody; a run is changed by the wallet that
//!   made it or an operator.
//! - Params are write-once (the same value again is accepted), tags overwrite, metrics append:
//!   each point is kept (`tracking_metrics`) and the run keeps each metric's latest point (the
//!   highest step, then timestamp, then value, as MLflow's).
//! - Every change is one synced batch under one writer lock; making, renaming, deleting and
//!   restoring experiments and runs, and logging and deleting logged models, also go into the
//!   audit log with it. Params, tags and
//!   metrics do not: a training loop logs them thousands of times.
//!
//! Calls block on RocksDB: async callers run them on `spawn_blocking`.

mod gc;
#[cfg(test)]
mod tests;

pub use gc::{GcReport, GcRequest};

use std::{
    cmp::Ordering,
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use crate::{
    artifacts::hex,
    audit::{self, Audit},
    registry::{
        Actor, Context, RegistryError,
        filter::{self, Clause, Field, Fields, Kind},
        now_ms,
    },
    store::{
        Batch, Store, StoreError, Table,
        tables::{
            TrackingExperimentModels, TrackingExperimentNames, TrackingExperimentRuns, TrackingExperiments,
            TrackingLoggedModels, TrackingMetrics, TrackingRuns,
        },
    },
};

/// The experiment runs go to when none is named.
pub const DEFAULT_EXPERIMENT: u64 = 0;
/// MLflow's limits.
const MAX_KEY: usize = 250;
const MAX_PARAM_VALUE: usize = 6000;
const MAX_TAG_VALUE: usize = 8000;
const MAX_NAME: usize = 500;
const MAX_LOCATION: usize = 2048;
pub const MAX_BATCH_METRICS: usize = 1000;
pub const MAX_BATCH_PARAMS: usize = 100;
pub const MAX_BATCH_TAGS: usize = 100;
const MAX_BATCH_TOTAL: usize = 1000;
/// A run's dataset inputs, all together (their JSON as the client sent it).
const MAX_INPUTS_BYTES: usize = 1 << 20;
/// The tag `runs/log-model` appends to, as MLflow's server does; it may outgrow other tags.
pub const LOGGED_MODELS_TAG: &str = "mlflow.log-model.history";
const MAX_LOGGED_MODELS: usize = 1 << 20;
/// The tag that mirrors a run's name.
const RUN_NAME_TAG: &str = "mlflow.runName";

fn invalid(message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(message.into())
}

/// A run's status, as MLflow names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    Running,
    Scheduled,
    Finished,
    Failed,
    Killed,
}

impl RunStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Running => "RUNNING",
            Self::Scheduled => "SCHEDULED",
            Self::Finished => "FINISHED",
            Self::Failed => "FAILED",
            Self::Killed => "KILLED",
        }
    }

    /// By name (any case) or by the protocol's number (1 to 5).
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let all = [Self::Running, Self::Scheduled, Self::Finished, Self::Failed, Self::Killed];
        let by_number = text.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).and_then(|i| all.get(i));
        by_number
            .or_else(|| all.iter().find(|s| s.name().eq_ignore_ascii_case(text.trim())))
            .copied()
            .ok_or_else(|| {
                invalid(format!(
                    "'{text}' is not a run status; expected RUNNING, SCHEDULED, FINISHED, FAILED or KILLED"
                ))
            })
    }
}

/// Which lifecycle stages a search returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewType {
    ActiveOnly,
    DeletedOnly,
    All,
}

impl ViewType {
    /// By name or number, as the protocol sends it; absent means active only.
    pub fn parse(text: Option<&str>) -> Result<Self, RegistryError> {
        match text.map(str::trim).map(str::to_ascii_uppercase).as_deref() {
            None | Some("" | "1" | "ACTIVE_ONLY") => Ok(Self::ActiveOnly),
            Some("2" | "DELETED_ONLY") => Ok(Self::DeletedOnly),
            Some("3" | "ALL") => Ok(Self::All),
            Some(other) => Err(invalid(format!(
                "'{other}' is not a view type; expected ACTIVE_ONLY, DELETED_ONLY or ALL"
            ))),
        }
    }

    fn shows(self, deleted: bool) -> bool {
        match self {
            Self::ActiveOnly => !deleted,
            Self::DeletedOnly => deleted,
            Self::All => true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub id: u64,
    pub name: String,
    pub artifact_location: String,
    pub deleted: bool,
    /// The wallet that created it; `None` for the operator's (and `Default`).
    pub owner: Option<Address>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub tags: BTreeMap<String, String>,
}

/// One point of a run's metric.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricValue {
    pub value: f64,
    pub step: i64,
    /// Unix milliseconds, as the client sent it.
    pub timestamp: i64,
}

impl MetricValue {
    /// MLflow's "latest": the highest step, then timestamp, then value.
    fn later(&self, other: &Self) -> Ordering {
        (self.step, self.timestamp)
            .cmp(&(other.step, other.timestamp))
            .then_with(|| self.value.total_cmp(&other.value))
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: [u8; 16],
    pub experiment_id: u64,
    pub name: String,
    /// Who made it: a wallet's checksummed address or `operator`.
    pub user_id: String,
    pub owner: Option<Address>,
    pub status: RunStatus,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub deleted: bool,
    /// When it was deleted (Unix milliseconds), while it is.
    pub deleted_ms: Option<u64>,
    pub artifact_uri: String,
    pub params: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    /// Each metric's latest point.
    pub latest: BTreeMap<String, MetricValue>,
    /// Points logged so far (the next point's sequence number).
    pub points: u64,
    /// Dataset inputs, each the JSON the client sent.
    pub inputs: Vec<String>,
    /// Logged models the run produced: (model id, step).
    pub outputs: Vec<([u8; 16], i64)>,
}

impl RunRecord {
    pub fn run_id(&self) -> String {
        hex(&self.id)
    }
}

/// A logged model's status, as MLflow names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelStatus {
    Pending,
    Ready,
    UploadFailed,
}

impl ModelStatus {
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "LOGGED_MODEL_PENDING",
            Self::Ready => "LOGGED_MODEL_READY",
            Self::UploadFailed => "LOGGED_MODEL_UPLOAD_FAILED",
        }
    }

    /// By name or by the protocol's number (1 to 3).
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        let all = [Self::Pending, Self::Ready, Self::UploadFailed];
        let by_number = text.parse::<usize>().ok().and_then(|n| n.checked_sub(1)).and_then(|i| all.get(i));
        by_number.or_else(|| all.iter().find(|s| s.name().eq_ignore_ascii_case(text.trim()))).copied().ok_or_else(|| {
            invalid(format!(
                "'{text}' is not a logged model status; expected LOGGED_MODEL_PENDING, LOGGED_MODEL_READY or LOGGED_MODEL_UPLOAD_FAILED"
            ))
        })
    }
}

/// A logged model (MLflow 3's `log_model`): a model's files and metadata, made by a run or on
/// its own, that the registry can register by `models:/<model id>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoggedModelRecord {
    pub id: [u8; 16],
    pub experiment_id: u64,
    pub name: String,
    pub artifact_location: String,
    pub owner: Option<Address>,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub status: ModelStatus,
    pub model_type: String,
    /// The run that made it, when one did.
    pub source_run_id: String,
    pub deleted: bool,
    pub params: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
    /// Each metric logged for it (with its `model_id`): the latest point, and the run that
    /// logged it.
    pub metrics: BTreeMap<String, (MetricValue, String)>,
}

impl LoggedModelRecord {
    pub fn model_id(&self) -> String {
        format!("m-{}", hex(&self.id))
    }
}

/// Parses a logged model id: `m-` and 32 hex digits.
pub fn parse_model_id(text: &str) -> Result<[u8; 16], RegistryError> {
    text.trim()
        .strip_prefix("m-")
        .and_then(|hex| parse_run_id(hex).ok())
        .ok_or_else(|| RegistryError::NotFound(format!("Logged model with ID '{text}' not found")))
}

/// What a new logged model starts with.
#[derive(Default)]
pub struct NewLoggedModel {
    pub name: Option<String>,
    pub model_type: String,
    pub source_run_id: Option<String>,
    pub params: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
}

struct ModelFields<'a>(&'a LoggedModelRecord);

impl Fields for ModelFields<'_> {
    fn text(&self, field: &Field) -> Option<&str> {
        match field {
            Field::Name => Some(&self.0.name),
            Field::RunId => Some(&self.0.source_run_id).filter(|r| !r.is_empty()).map(String::as_str),
            Field::Param(key) => self.0.params.get(key).map(String::as_str),
            Field::Tag(key) => self.0.tags.get(key).map(String::as_str),
            _ => None,
        }
    }

    fn number(&self, field: &Field) -> Option<f64> {
        match field {
            Field::CreationTime => Some(self.0.created_ms as f64),
            Field::LastUpdateTime => Some(self.0.updated_ms as f64),
            Field::Metric(key) => self.0.metrics.get(key).map(|(m, _)| m.value),
            _ => None,
        }
    }
}

/// A run as a search's filter sees it.
struct RunFields<'a>(&'a RunRecord, String);

impl Fields for RunFields<'_> {
    fn text(&self, field: &Field) -> Option<&str> {
        let run = self.0;
        match field {
            Field::RunId => Some(&self.1),
            Field::RunName => Some(&run.name),
            Field::Status => Some(run.status.name()),
            Field::UserId => Some(&run.user_id),
            Field::ArtifactUri => Some(&run.artifact_uri),
            Field::Param(key) => run.params.get(key).map(String::as_str),
            Field::Tag(key) => run.tags.get(key).map(String::as_str),
            _ => None,
        }
    }

    fn number(&self, field: &Field) -> Option<f64> {
        run_number(self.0, field)
    }
}

/// A run's numeric field: a metric's latest value, its start or end.
fn run_number(run: &RunRecord, field: &Field) -> Option<f64> {
    match field {
        Field::Metric(key) => run.latest.get(key).map(|m| m.value),
        Field::StartTime => Some(run.start_ms as f64),
        Field::EndTime => run.end_ms.map(|t| t as f64),
        _ => None,
    }
}

struct ExperimentFields<'a>(&'a ExperimentRecord);

impl Fields for ExperimentFields<'_> {
    fn text(&self, field: &Field) -> Option<&str> {
        match field {
            Field::Name => Some(&self.0.name),
            Field::Tag(key) => self.0.tags.get(key).map(String::as_str),
            _ => None,
        }
    }

    fn number(&self, field: &Field) -> Option<f64> {
        match field {
            Field::CreationTime => Some(self.0.created_ms as f64),
            Field::LastUpdateTime => Some(self.0.updated_ms as f64),
            _ => None,
        }
    }
}

/// An `order_by` entry: the field and whether ascending. `experiment_id` orders experiments.
#[derive(Clone, Debug, PartialEq)]
pub struct Order {
    pub field: Option<Field>,
    pub ascending: bool,
}

/// Parses `order_by` entries (`metrics.loss ASC`, `start_time DESC`, `name`).
pub fn parse_order(entries: &[&str], kind: Kind) -> Result<Vec<Order>, RegistryError> {
    entries
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|entry| {
            let entry = entry.trim();
            let (name, ascending) = match entry.rsplit_once(char::is_whitespace) {
                Some((name, dir)) if dir.eq_ignore_ascii_case("asc") => (name.trim(), true),
                Some((name, dir)) if dir.eq_ignore_ascii_case("desc") => (name.trim(), false),
                _ => (entry, true),
            };
            let lower = name.to_ascii_lowercase();
            if kind == Kind::Experiments && (lower == "experiment_id" || lower == "attributes.experiment_id")
            {
                return Ok(Order { field: None, ascending });
            }
            let field =
                filter::field(name, kind).map_err(|e| invalid(format!("invalid order_by '{entry}': {e}")))?;
            Ok(Order { field: Some(field), ascending })
        })
        .collect()
}

/// A sort key: missing values go last whichever the direction.
#[derive(PartialEq, PartialOrd)]
enum SortValue<'a> {
    Number(f64),
    Text(&'a str),
    Bytes(&'a [u8]),
}

/// Sorts by `order`, then by `then` (the search's default order and its tie-break).
fn sorted<T>(
    items: &mut [T],
    order: &[Order],
    then: [Order; 2],
    value: impl for<'a> Fn(&'a T, &Order) -> Option<SortValue<'a>>,
) {
    items.sort_by(|a, b| {
        for o in order.iter().chain(&then) {
            let ordering = match (value(a, o), value(b, o)) {
                (None, None) => Ordering::Equal,
                (None, Some(_)) => Ordering::Greater,
                (Some(_), None) => Ordering::Less,
                (Some(x), Some(y)) => {
                    let ordering = x.partial_cmp(&y).unwrap_or(Ordering::Equal);
                    if o.ascending { ordering } else { ordering.reverse() }
                }
            };
            if ordering != Ordering::Equal {
                return ordering;
            }
        }
        Ordering::Equal
    });
}

fn check_key(kind: &str, key: &str) -> Result<(), RegistryError> {
    if key.is_empty() {
        return Err(invalid(format!("a {kind} needs a key")));
    }
    if key.chars().count() > MAX_KEY {
        return Err(invalid(format!("{kind} key '{key}' is longer than {MAX_KEY} characters")));
    }
    // MLflow's: alphanumerics, underscores, dashes, periods, spaces, slashes and colons
    if let Some(bad) = key.chars().find(|c| !(c.is_alphanumeric() || "_-. /:".contains(*c))) {
        return Err(invalid(format!(
            "{kind} key '{key}' has '{bad}'; keys take letters, digits, underscores, dashes, periods, spaces, slashes and colons"
        )));
    }
    if key.split('/').any(|part| part == "..") || key.starts_with('/') {
        return Err(invalid(format!("{kind} key '{key}' is not a relative path without '..'")));
    }
    Ok(())
}

fn check_value(kind: &str, key: &str, value: &str, max: usize) -> Result<(), RegistryError> {
    if value.chars().count() > max {
        return Err(invalid(format!("the value of {kind} '{key}' is longer than {max} characters")));
    }
    Ok(())
}

/// Whether `actor` may change what `owner` made (`what`, for the refusal): the owner or an
/// operator.
fn may_change(actor: &Actor, owner: Option<Address>, what: &str) -> Result<(), RegistryError> {
    match actor {
        Actor::Operator => Ok(()),
        Actor::Anonymous => Err(RegistryError::Unauthenticated("this needs a bearer token".into())),
        Actor::Wallet(a) if owner == Some(*a) => Ok(()),
        Actor::Wallet(_) => {
            Err(RegistryError::Forbidden(format!("only the creator of {what} or an operator may change it")))
        }
    }
}

/// The records of table `T` an experiment's lookup table `L` lists, in the lookup's order.
fn members<L, T>(store: &Store, experiment: u64) -> Result<Vec<T::Value>, StoreError>
where
    L: Table<Key = (u64, [u8; 16])>,
    T: Table<Key = [u8; 16]>,
{
    let mut found = Vec::new();
    for item in store.scan::<L>(&experiment.to_be_bytes(), None, false) {
        let (raw, _) = item?;
        let Ok(key) = <[u8; 16]>::try_from(&raw[8..]) else { continue };
        found.extend(store.get::<T>(&key)?);
    }
    Ok(found)
}

/// Who a new record belongs to: the signed-in wallet, or nobody for the operator.
fn creator(actor: &Actor, needs: &str) -> Result<Option<Address>, RegistryError> {
    match actor {
        Actor::Anonymous => Err(RegistryError::Unauthenticated(needs.to_owned())),
        Actor::Operator => Ok(None),
        Actor::Wallet(a) => Ok(Some(*a)),
    }
}

fn check_params(params: &[(String, String)]) -> Result<(), RegistryError> {
    params.iter().try_for_each(|(key, value)| {
        check_key("param", key)?;
        check_value("param", key, value, MAX_PARAM_VALUE)
    })
}

fn check_tags(tags: &[(String, String)]) -> Result<(), RegistryError> {
    tags.iter().try_for_each(|(key, value)| {
        check_key("tag", key)?;
        check_value("tag", key, value, MAX_TAG_VALUE)
    })
}

fn check_experiment_name(name: &str) -> Result<(), RegistryError> {
    if name.trim().is_empty() {
        return Err(invalid("an experiment needs a name"));
    }
    if name.chars().count() > MAX_NAME {
        return Err(invalid(format!("experiment name is longer than {MAX_NAME} characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("experiment name must not contain control characters"));
    }
    Ok(())
}

/// Parses a run id: 32 hex digits.
pub fn parse_run_id(text: &str) -> Result<[u8; 16], RegistryError> {
    let text = text.trim();
    let mut id = [0u8; 16];
    let ok = text.len() == 32
        && text.is_ascii()
        && id
            .iter_mut()
            .enumerate()
            .all(|(i, byte)| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map(|b| *byte = b).is_ok());
    if !ok {
        return Err(RegistryError::NotFound(format!("Run with id={text} not found")));
    }
    Ok(id)
}

/// Parses an experiment id: a non-negative integer.
pub fn parse_experiment_id(text: &str) -> Result<u64, RegistryError> {
    text.trim()
        .parse::<u64>()
        .map_err(|_| invalid(format!("experiment id '{text}' is not a non-negative integer")))
}

/// What a new run starts with.
#[derive(Default)]
pub struct NewRun {
    pub name: Option<String>,
    pub start_ms: Option<i64>,
    pub tags: Vec<(String, String)>,
}

/// What one logging call adds to a run; checked whole before anything is written.
#[derive(Default)]
pub struct Logs {
    pub metrics: Vec<(String, MetricValue)>,
    pub params: Vec<(String, String)>,
    pub tags: Vec<(String, String)>,
    /// Metrics (of `metrics`) also logged for a logged model: (model id, key, point).
    pub model_metrics: Vec<(String, String, MetricValue)>,
}

#[derive(Clone)]
pub struct Tracking {
    store: Store,
    audit: Audit,
    write: Arc<Mutex<()>>,
}

impl Tracking {
    /// Opens the tracking store, making the `Default` experiment when it is missing.
    pub fn open(store: Store, audit: Audit) -> Result<Self, RegistryError> {
        let tracking = Self { store, audit, write: Arc::new(Mutex::new(())) };
        if tracking.store.get::<TrackingExperiments>(&DEFAULT_EXPERIMENT)?.is_none() {
            let now = now_ms();
            let default = ExperimentRecord {
                id: DEFAULT_EXPERIMENT,
                name: "Default".into(),
                artifact_location: format!("mlflow-artifacts:/{DEFAULT_EXPERIMENT}"),
                deleted: false,
                owner: None,
                created_ms: now,
                updated_ms: now,
                tags: BTreeMap::new(),
            };
            let mut batch = tracking.store.batch();
            batch.put::<TrackingExperiments>(&DEFAULT_EXPERIMENT, &default)?;
            batch.put::<TrackingExperimentNames>(&default.name, &DEFAULT_EXPERIMENT)?;
            tracking.store.write(batch)?;
        }
        Ok(tracking)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes `batch`, with an audit entry when `audited` names the change.
    fn commit(
        &self,
        ctx: &Context,
        batch: Batch<'_>,
        audited: Option<(String, String)>,
    ) -> Result<(), RegistryError> {
        match audited {
            Some((action, object)) => {
                let actor = ctx.actor.id();
                self.audit.commit(
                    batch,
                    audit::Entry {
                        actor: &actor,
                        action: &action,
                        object: &object,
                        request_id: ctx.request_id.as_deref(),
                    },
                )?;
            }
            None => self.store.write(batch)?,
        }
        Ok(())
    }

    // ----- experiments -----

    pub fn experiment(&self, id: u64) -> Result<ExperimentRecord, RegistryError> {
        self.store
            .get::<TrackingExperiments>(&id)?
            .ok_or_else(|| RegistryError::NotFound(format!("No Experiment with id={id} exists")))
    }

    pub fn experiment_by_name(&self, name: &str) -> Result<ExperimentRecord, RegistryError> {
        let id = self.store.get::<TrackingExperimentNames>(&name.to_owned())?.ok_or_else(|| {
            RegistryError::NotFound(format!("Could not find experiment with name '{name}'"))
        })?;
        self.experiment(id)
    }

    fn may_change_experiment(actor: &Actor, experiment: &ExperimentRecord) -> Result<(), RegistryError> {
        may_change(actor, experiment.owner, &format!("experiment '{}'", experiment.name))
    }

    pub fn create_experiment(
        &self,
        ctx: &Context,
        name: &str,
        artifact_location: Option<&str>,
        tags: Vec<(String, String)>,
    ) -> Result<u64, RegistryError> {
        let owner = creator(&ctx.actor, "creating an experiment needs a bearer token")?;
        check_experiment_name(name)?;
        check_tags(&tags)?;
        let location = artifact_location.map(str::trim).filter(|l| !l.is_empty());
        if let Some(location) = location
            && (location.len() > MAX_LOCATION || location.chars().any(char::is_control))
        {
            return Err(invalid(format!(
                "artifact_location must be at most {MAX_LOCATION} bytes without control characters"
            )));
        }
        let _guard = self.lock();
        if let Some(existing) = self.store.get::<TrackingExperimentNames>(&name.to_owned())? {
            let deleted = self.experiment(existing)?.deleted;
            return Err(RegistryError::AlreadyExists(if deleted {
                format!(
                    "Experiment '{name}' already exists in deleted state; restore it or pick another name"
                )
            } else {
                format!("Experiment '{name}' already exists.")
            }));
        }
        let id = match self.store.scan::<TrackingExperiments>(&[], None, true).next().transpose()? {
            Some((_, last)) => last.id + 1,
            None => DEFAULT_EXPERIMENT + 1,
        };
        let now = now_ms();
        let record = ExperimentRecord {
            id,
            name: name.to_owned(),
            artifact_location: location.map_or_else(|| format!("mlflow-artifacts:/{id}"), str::to_owned),
            deleted: false,
            owner,
            created_ms: now,
            updated_ms: now,
            tags: tags.into_iter().collect(),
        };
        let mut batch = self.store.batch();
        batch.put::<TrackingExperiments>(&id, &record)?;
        batch.put::<TrackingExperimentNames>(&record.name, &id)?;
        self.commit(
            ctx,
            batch,
            Some((format!("tracking.experiment_created {name}"), format!("experiment:{id}"))),
        )?;
        Ok(id)
    }

    /// The experiment, when it takes new `what` (runs, models) from `ctx`: it is active, and
    /// `ctx` owns it, is an operator, or it belongs to nobody.
    fn accepting(
        &self,
        ctx: &Context,
        experiment_id: u64,
        what: &str,
    ) -> Result<ExperimentRecord, RegistryError> {
        let experiment = self.experiment(experiment_id)?;
        if experiment.deleted {
            return Err(invalid(format!(
                "experiment {experiment_id} is deleted; {what} go only to active experiments"
            )));
        }
        if experiment.owner.is_some() {
            Self::may_change_experiment(&ctx.actor, &experiment).map_err(|_| {
                RegistryError::Forbidden(format!(
                    "only the creator of experiment '{}' or an operator may add {what} to it",
                    experiment.name
                ))
            })?;
        }
        Ok(experiment)
    }

    /// Changes an experiment its owner or an operator may change.
    fn change_experiment(
        &self,
        ctx: &Context,
        id: u64,
        audited: Option<&str>,
        change: impl FnOnce(&mut ExperimentRecord, &mut Batch<'_>) -> Result<(), RegistryError>,
    ) -> Result<(), RegistryError> {
        let _guard = self.lock();
        let mut record = self.experiment(id)?;
        Self::may_change_experiment(&ctx.actor, &record)?;
        let mut batch = self.store.batch();
        change(&mut record, &mut batch)?;
        record.updated_ms = now_ms();
        batch.put::<TrackingExperiments>(&id, &record)?;
        let audited =
            audited.map(|what| (format!("tracking.{what} {}", record.name), format!("experiment:{id}")));
        self.commit(ctx, batch, audited)
    }

    pub fn rename_experiment(&self, ctx: &Context, id: u64, new_name: &str) -> Result<(), RegistryError> {
        check_experiment_name(new_name)?;
        if id == DEFAULT_EXPERIMENT {
            return Err(invalid("the Default experiment keeps its name"));
        }
        let store = self.store.clone();
        self.change_experiment(ctx, id, Some("experiment_renamed"), |record, batch| {
            if record.name == new_name {
                return Ok(());
            }
            if store.get::<TrackingExperimentNames>(&new_name.to_owned())?.is_some() {
                return Err(RegistryError::AlreadyExists(format!("Experiment '{new_name}' already exists.")));
            }
            batch.delete::<TrackingExperimentNames>(&record.name);
            batch.put::<TrackingExperimentNames>(&new_name.to_owned(), &id)?;
            record.name = new_name.to_owned();
            Ok(())
        })
    }

    /// Marks an experiment deleted, and its runs with it (a restore brings them all back, as
    /// MLflow's does); the `Default` one stays.
    pub fn set_experiment_deleted(&self, ctx: &Context, id: u64, deleted: bool) -> Result<(), RegistryError> {
        if id == DEFAULT_EXPERIMENT && deleted {
            return Err(invalid("the Default experiment cannot be deleted"));
        }
        let what = if deleted { "experiment_deleted" } else { "experiment_restored" };
        let store = self.store.clone();
        self.change_experiment(ctx, id, Some(what), |record, batch| {
            if record.deleted == deleted {
                return Err(invalid(format!(
                    "experiment {id} is already {}",
                    if deleted { "deleted" } else { "active" }
                )));
            }
            record.deleted = deleted;
            // its runs go and come back with it, as MLflow's own store does
            for mut run in members::<TrackingExperimentRuns, TrackingRuns>(&store, id)? {
                if run.deleted != deleted {
                    run.deleted = deleted;
                    run.deleted_ms = deleted.then(now_ms);
                    batch.put::<TrackingRuns>(&run.id, &run)?;
                }
            }
            Ok(())
        })
    }

    pub fn set_experiment_tag(
        &self,
        ctx: &Context,
        id: u64,
        key: &str,
        value: Option<&str>,
    ) -> Result<(), RegistryError> {
        check_key("tag", key)?;
        if let Some(value) = value {
            check_value("tag", key, value, MAX_TAG_VALUE)?;
        }
        self.change_experiment(ctx, id, None, |record, _| {
            if record.deleted {
                return Err(invalid(format!("experiment {id} is deleted; restore it first")));
            }
            match value {
                Some(value) => {
                    record.tags.insert(key.to_owned(), value.to_owned());
                }
                None => {
                    record.tags.remove(key).ok_or_else(|| {
                        RegistryError::NotFound(format!("No tag with name: {key} in experiment {id}"))
                    })?;
                }
            }
            Ok(())
        })
    }

    /// The experiments a search returns, in `order` (by default the newest first).
    pub fn search_experiments(
        &self,
        view: ViewType,
        clauses: &[Clause],
        order: &[Order],
    ) -> Result<Vec<ExperimentRecord>, RegistryError> {
        let mut found = Vec::new();
        for item in self.store.scan::<TrackingExperiments>(&[], None, false) {
            let (_, record) = item?;
            if view.shows(record.deleted) && filter::matches(clauses, &ExperimentFields(&record)) {
                found.push(record);
            }
        }
        let then = [
            Order { field: Some(Field::CreationTime), ascending: false },
            Order { field: None, ascending: false },
        ];
        sorted(&mut found, order, then, |e, o| match &o.field {
            None => Some(SortValue::Number(e.id as f64)),
            Some(Field::Name) => Some(SortValue::Text(&e.name)),
            Some(Field::Tag(key)) => e.tags.get(key).map(|v| SortValue::Text(v)),
            Some(field) => ExperimentFields(e).number(field).map(SortValue::Number),
        });
        Ok(found)
    }

    // ----- runs -----

    pub fn run(&self, id: &str) -> Result<RunRecord, RegistryError> {
        let key = parse_run_id(id)?;
        self.store
            .get::<TrackingRuns>(&key)?
            .ok_or_else(|| RegistryError::NotFound(format!("Run with id={id} not found")))
    }

    fn may_change_run(actor: &Actor, run: &RunRecord) -> Result<(), RegistryError> {
        may_change(actor, run.owner, &format!("run {}", run.run_id()))
    }

    pub fn create_run(
        &self,
        ctx: &Context,
        experiment_id: u64,
        new: NewRun,
    ) -> Result<RunRecord, RegistryError> {
        let owner = creator(&ctx.actor, "creating a run needs a bearer token")?;
        check_tags(&new.tags)?;
        let mut tags: BTreeMap<String, String> = new.tags.into_iter().collect();
        let name = new
            .name
            .filter(|n| !n.is_empty())
            .or_else(|| tags.get(RUN_NAME_TAG).cloned())
            .filter(|n| !n.is_empty());
        if let Some(name) = &name {
            check_value("run", "name", name, MAX_NAME)?;
        }
        let experiment = self.accepting(ctx, experiment_id, "runs")?;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| invalid(format!("no random run id: {e}")))?;
        let run_id = hex(&id);
        let name = name.unwrap_or_else(|| format!("run-{}", &run_id[..8]));
        tags.insert(RUN_NAME_TAG.into(), name.clone());
        let record = RunRecord {
            id,
            experiment_id,
            name,
            user_id: ctx.actor.id(),
            owner,
            status: RunStatus::Running,
            start_ms: new.start_ms.unwrap_or_else(|| now_ms() as i64),
            end_ms: None,
            deleted: false,
            deleted_ms: None,
            artifact_uri: format!(
                "{}/{run_id}/artifacts",
                experiment.artifact_location.trim_end_matches('/')
            ),
            params: BTreeMap::new(),
            tags,
            latest: BTreeMap::new(),
            points: 0,
            inputs: Vec::new(),
            outputs: Vec::new(),
        };
        let _guard = self.lock();
        let mut batch = self.store.batch();
        batch.put::<TrackingRuns>(&id, &record)?;
        batch.put::<TrackingExperimentRuns>(&(experiment_id, id), &())?;
        self.commit(
            ctx,
            batch,
            Some((
                format!("tracking.run_created {} in {experiment_id}", record.name),
                format!("run:{run_id}"),
            )),
        )?;
        Ok(record)
    }

    /// Changes a run its creator or an operator may change; a deleted run takes no change but
    /// its restore.
    fn change_run<T>(
        &self,
        ctx: &Context,
        id: &str,
        audited: Option<&str>,
        change: impl FnOnce(&mut RunRecord, &mut Batch<'_>) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let _guard = self.lock();
        let mut record = self.run(id)?;
        Self::may_change_run(&ctx.actor, &record)?;
        let mut batch = self.store.batch();
        let out = change(&mut record, &mut batch)?;
        batch.put::<TrackingRuns>(&record.id, &record)?;
        let audited = audited
            .map(|what| (format!("tracking.{what} {}", record.name), format!("run:{}", record.run_id())));
        self.commit(ctx, batch, audited)?;
        Ok(out)
    }

    fn active(run: &RunRecord) -> Result<(), RegistryError> {
        if run.deleted {
            return Err(invalid(format!(
                "The run {} must be in the 'active' state. Current state is deleted.",
                run.run_id()
            )));
        }
        Ok(())
    }

    pub fn update_run(
        &self,
        ctx: &Context,
        id: &str,
        status: Option<RunStatus>,
        end_ms: Option<i64>,
        name: Option<&str>,
    ) -> Result<RunRecord, RegistryError> {
        if let Some(name) = name {
            check_value("run", "name", name, MAX_NAME)?;
        }
        self.change_run(ctx, id, None, |run, _| {
            Self::active(run)?;
            if let Some(status) = status {
                run.status = status;
            }
            if end_ms.is_some() {
                run.end_ms = end_ms;
            }
            if let Some(name) = name.filter(|n| !n.is_empty()) {
                run.name = name.to_owned();
                run.tags.insert(RUN_NAME_TAG.into(), name.to_owned());
            }
            Ok(run.clone())
        })
    }

    pub fn set_run_deleted(&self, ctx: &Context, id: &str, deleted: bool) -> Result<(), RegistryError> {
        let what = if deleted { "run_deleted" } else { "run_restored" };
        self.change_run(ctx, id, Some(what), |run, _| {
            if deleted && run.deleted {
                return Err(invalid(format!("run {id} is already deleted")));
            }
            run.deleted = deleted;
            run.deleted_ms = deleted.then(now_ms);
            Ok(())
        })
    }

    /// Logs metrics, params and tags to a run, all or none: every key and value is checked,
    /// and no param changes value, before anything is written.
    pub fn log(&self, ctx: &Context, id: &str, logs: Logs) -> Result<(), RegistryError> {
        let Logs { metrics, params, tags, model_metrics } = logs;
        if metrics.len() > MAX_BATCH_METRICS || params.len() > MAX_BATCH_PARAMS || tags.len() > MAX_BATCH_TAGS
        {
            return Err(invalid(format!(
                "a batch takes at most {MAX_BATCH_METRICS} metrics, {MAX_BATCH_PARAMS} params and {MAX_BATCH_TAGS} tags; \
                 this one has {}, {} and {}",
                metrics.len(),
                params.len(),
                tags.len()
            )));
        }
        if metrics.len() + params.len() + tags.len() > MAX_BATCH_TOTAL {
            return Err(invalid(format!("a batch takes at most {MAX_BATCH_TOTAL} entries in all")));
        }
        for (key, _) in &metrics {
            check_key("metric", key)?;
        }
        check_params(&params)?;
        check_tags(&tags)?;
        self.change_run(ctx, id, None, |run, batch| {
            Self::active(run)?;
            let mut new_params = BTreeMap::new();
            for (key, value) in params {
                let before = run.params.get(&key).or_else(|| new_params.get(&key));
                match before {
                    Some(old) if *old != value => {
                        return Err(invalid(format!(
                            "Changing param values is not allowed. Param with key='{key}' was already logged \
                             with value='{old}' for run ID='{id}'. Attempted logging new value '{value}'."
                        )));
                    }
                    _ => {
                        new_params.insert(key, value);
                    }
                }
            }
            // the models' metrics go in the same batch, each model changed by whom it allows
            let mut models: BTreeMap<[u8; 16], LoggedModelRecord> = BTreeMap::new();
            for (model_id, key, point) in model_metrics {
                let key_of = parse_model_id(&model_id)?;
                let model = match models.entry(key_of) {
                    std::collections::btree_map::Entry::Occupied(found) => found.into_mut(),
                    std::collections::btree_map::Entry::Vacant(slot) => {
                        let model = self.logged_model(&model_id, false)?;
                        may_change(&ctx.actor, model.owner, &format!("logged model {model_id}"))?;
                        slot.insert(model)
                    }
                };
                let newer = model.metrics.get(&key).is_none_or(|(m, _)| point.later(m) != Ordering::Less);
                if newer {
                    model.metrics.insert(key, (point, run.run_id()));
                }
            }
            for model in models.values_mut() {
                model.updated_ms = now_ms();
                batch.put::<TrackingLoggedModels>(&model.id, model)?;
            }
            run.params.extend(new_params);
            for (key, value) in tags {
                if key == RUN_NAME_TAG && !value.is_empty() {
                    run.name = value.clone();
                }
                run.tags.insert(key, value);
            }
            for (key, point) in metrics {
                batch.put::<TrackingMetrics>(&(run.id, key.clone(), run.points), &point)?;
                run.points += 1;
                match run.latest.get_mut(&key) {
                    Some(latest) if latest.later(&point) == Ordering::Greater => {}
                    Some(latest) => *latest = point,
                    None => {
                        run.latest.insert(key, point);
                    }
                }
            }
            Ok(())
        })
    }

    pub fn delete_run_tag(&self, ctx: &Context, id: &str, key: &str) -> Result<(), RegistryError> {
        self.change_run(ctx, id, None, |run, _| {
            Self::active(run)?;
            run.tags.remove(key).map(drop).ok_or_else(|| {
                RegistryError::NotFound(format!("No tag with name: {key} in run with id {id}"))
            })
        })
    }

    /// Adds dataset inputs (their JSON as sent); one already there is not added twice.
    pub fn log_inputs(&self, ctx: &Context, id: &str, datasets: Vec<String>) -> Result<(), RegistryError> {
        self.change_run(ctx, id, None, |run, _| {
            Self::active(run)?;
            for dataset in datasets {
                if !run.inputs.contains(&dataset) {
                    run.inputs.push(dataset);
                }
            }
            let size: usize = run.inputs.iter().map(String::len).sum();
            if size > MAX_INPUTS_BYTES {
                return Err(invalid(format!("a run's inputs take at most {MAX_INPUTS_BYTES} bytes")));
            }
            Ok(())
        })
    }

    /// Appends a logged model's description to the run's `mlflow.log-model.history` tag.
    pub fn log_model(&self, ctx: &Context, id: &str, model: serde_json::Value) -> Result<(), RegistryError> {
        self.change_run(ctx, id, None, |run, _| {
            Self::active(run)?;
            let mut history: Vec<serde_json::Value> = run
                .tags
                .get(LOGGED_MODELS_TAG)
                .and_then(|h| serde_json::from_str(h).ok())
                .unwrap_or_default();
            history.push(model);
            let text = serde_json::Value::from(history).to_string();
            if text.len() > MAX_LOGGED_MODELS {
                return Err(invalid(format!("a run's logged models take at most {MAX_LOGGED_MODELS} bytes")));
            }
            run.tags.insert(LOGGED_MODELS_TAG.into(), text);
            Ok(())
        })
    }

    /// A metric's points in the order logged, from sequence number `from`, at most `limit`;
    /// with the next page's start when more remain.
    pub fn metric_history(
        &self,
        id: &str,
        key: &str,
        from: u64,
        limit: usize,
    ) -> Result<(Vec<MetricValue>, Option<u64>), RegistryError> {
        let run = self.run(id)?;
        if key.contains('\0') {
            return Ok((Vec::new(), None));
        }
        let mut prefix = run.id.to_vec();
        prefix.extend_from_slice(key.as_bytes());
        prefix.push(0);
        let mut start = prefix.clone();
        start.extend_from_slice(&from.to_be_bytes());
        let mut points = Vec::new();
        for item in self.store.scan::<TrackingMetrics>(&prefix, Some(&start), false) {
            let (raw, point) = item?;
            if points.len() == limit {
                let seq = raw[raw.len() - 8..].try_into().map(u64::from_be_bytes).unwrap_or(u64::MAX);
                return Ok((points, Some(seq)));
            }
            points.push(point);
        }
        Ok((points, None))
    }

    /// The runs of `experiments` a search returns, in `order` (by default the latest started
    /// first).
    pub fn search_runs(
        &self,
        experiments: &[u64],
        view: ViewType,
        clauses: &[Clause],
        order: &[Order],
    ) -> Result<Vec<RunRecord>, RegistryError> {
        let mut found = Vec::new();
        for &experiment in experiments {
            self.experiment(experiment)?;
            let runs = members::<TrackingExperimentRuns, TrackingRuns>(&self.store, experiment)?;
            found.extend(runs.into_iter().filter(|run| {
                view.shows(run.deleted) && filter::matches(clauses, &RunFields(run, run.run_id()))
            }));
        }
        let then = [
            Order { field: Some(Field::StartTime), ascending: false },
            Order { field: None, ascending: true },
        ];
        sorted(&mut found, order, then, |run, o| match &o.field {
            None | Some(Field::RunId) => Some(SortValue::Bytes(&run.id)),
            Some(field) if field.numeric() => run_number(run, field).map(SortValue::Number),
            Some(Field::RunName) => Some(SortValue::Text(&run.name)),
            Some(Field::Status) => Some(SortValue::Text(run.status.name())),
            Some(Field::UserId) => Some(SortValue::Text(&run.user_id)),
            Some(Field::ArtifactUri) => Some(SortValue::Text(&run.artifact_uri)),
            Some(Field::Param(key)) => run.params.get(key).map(|v| SortValue::Text(v)),
            Some(Field::Tag(key)) => run.tags.get(key).map(|v| SortValue::Text(v)),
            Some(_) => None,
        });
        Ok(found)
    }

    /// Whether `ctx` may write `path` of the artifact tree: a run's artifacts
    /// (`<experiment id>/<run id>/...`) and a logged model's (`<experiment id>/models/<model
    /// id>/...`) are written by their creator or an operator, and not while deleted (a deleted
    /// run takes no logging, files included, until it is restored); other paths are the
    /// registry's concern.
    pub fn check_artifact_write(&self, ctx: &Context, path: &str) -> Result<(), RegistryError> {
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(4, '/').collect();
        let Some(Ok(experiment)) = parts.first().map(|e| e.parse::<u64>()) else { return Ok(()) };
        if let [_, "models", model, ..] = parts.as_slice() {
            let Ok(key) = parse_model_id(model) else { return Ok(()) };
            return match self.store.get::<TrackingLoggedModels>(&key)? {
                Some(model) if model.experiment_id == experiment => {
                    may_change(&ctx.actor, model.owner, &model.model_id())?;
                    if model.deleted {
                        return Err(invalid(format!("logged model {} is deleted", model.model_id())));
                    }
                    Ok(())
                }
                _ => Ok(()),
            };
        }
        let Some(Ok(key)) = parts.get(1).map(|r| parse_run_id(r)) else { return Ok(()) };
        match self.store.get::<TrackingRuns>(&key)? {
            Some(run) if run.experiment_id == experiment => {
                Self::may_change_run(&ctx.actor, &run)?;
                Self::active(&run)
            }
            _ => Ok(()),
        }
    }

    // ----- logged models -----

    /// The model, unless deleted (or with `allow_deleted`).
    pub fn logged_model(&self, id: &str, allow_deleted: bool) -> Result<LoggedModelRecord, RegistryError> {
        let key = parse_model_id(id)?;
        self.store
            .get::<TrackingLoggedModels>(&key)?
            .filter(|m| allow_deleted || !m.deleted)
            .ok_or_else(|| RegistryError::NotFound(format!("Logged model with ID '{id}' not found")))
    }

    pub fn create_logged_model(
        &self,
        ctx: &Context,
        experiment_id: u64,
        new: NewLoggedModel,
    ) -> Result<LoggedModelRecord, RegistryError> {
        let owner = creator(&ctx.actor, "logging a model needs a bearer token")?;
        check_params(&new.params)?;
        check_tags(&new.tags)?;
        if let Some(name) = &new.name {
            check_value("model", "name", name, MAX_NAME)?;
        }
        check_value("model", "model_type", &new.model_type, MAX_NAME)?;
        let source_run_id = match new.source_run_id.filter(|r| !r.is_empty()) {
            Some(run) => self.run(&run)?.run_id(),
            None => String::new(),
        };
        let experiment = self.accepting(ctx, experiment_id, "models")?;
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| invalid(format!("no random model id: {e}")))?;
        let now = now_ms();
        let mut record = LoggedModelRecord {
            id,
            experiment_id,
            name: String::new(),
            artifact_location: String::new(),
            owner,
            created_ms: now,
            updated_ms: now,
            status: ModelStatus::Pending,
            model_type: new.model_type,
            source_run_id,
            deleted: false,
            params: new.params.into_iter().collect(),
            tags: new.tags.into_iter().collect(),
            metrics: BTreeMap::new(),
        };
        let model_id = record.model_id();
        record.name =
            new.name.filter(|n| !n.is_empty()).unwrap_or_else(|| format!("model-{}", &model_id[2..10]));
        record.artifact_location =
            format!("{}/models/{model_id}/artifacts", experiment.artifact_location.trim_end_matches('/'));
        let _guard = self.lock();
        let mut batch = self.store.batch();
        batch.put::<TrackingLoggedModels>(&id, &record)?;
        batch.put::<TrackingExperimentModels>(&(experiment_id, id), &())?;
        let audited = (
            format!("tracking.model_logged {} in {experiment_id}", record.name),
            format!("logged_model:{model_id}"),
        );
        self.commit(ctx, batch, Some(audited))?;
        Ok(record)
    }

    /// Changes a logged model its creator or an operator may change.
    fn change_model<T>(
        &self,
        ctx: &Context,
        id: &str,
        audited: Option<&str>,
        change: impl FnOnce(&mut LoggedModelRecord) -> Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        let _guard = self.lock();
        let mut record = self.logged_model(id, false)?;
        may_change(&ctx.actor, record.owner, &format!("logged model {id}"))?;
        let out = change(&mut record)?;
        record.updated_ms = now_ms();
        let mut batch = self.store.batch();
        batch.put::<TrackingLoggedModels>(&record.id, &record)?;
        let audited =
            audited.map(|what| (format!("tracking.{what} {}", record.name), format!("logged_model:{id}")));
        self.commit(ctx, batch, audited)?;
        Ok(out)
    }

    pub fn finalize_logged_model(
        &self,
        ctx: &Context,
        id: &str,
        status: ModelStatus,
    ) -> Result<LoggedModelRecord, RegistryError> {
        self.change_model(ctx, id, None, |model| {
            model.status = status;
            Ok(model.clone())
        })
    }

    /// Marks a logged model deleted: it is no longer found, and its files stay where they are.
    pub fn delete_logged_model(&self, ctx: &Context, id: &str) -> Result<(), RegistryError> {
        self.change_model(ctx, id, Some("model_deleted"), |model| {
            model.deleted = true;
            Ok(())
        })
    }

    /// Sets tags (`value` given) or deletes one; params are written once, as a run's.
    pub fn change_logged_model_metadata(
        &self,
        ctx: &Context,
        id: &str,
        params: Vec<(String, String)>,
        tags: Vec<(String, String)>,
        delete_tag: Option<&str>,
    ) -> Result<(), RegistryError> {
        if params.len() > MAX_BATCH_PARAMS || tags.len() > MAX_BATCH_TAGS {
            return Err(invalid(format!(
                "a call takes at most {MAX_BATCH_PARAMS} params and {MAX_BATCH_TAGS} tags"
            )));
        }
        check_params(&params)?;
        check_tags(&tags)?;
        self.change_model(ctx, id, None, |model| {
            for (key, value) in &params {
                if let Some(old) = model.params.get(key).filter(|old| *old != value) {
                    return Err(invalid(format!(
                        "Changing param values is not allowed. Param with key='{key}' was already logged with value='{old}' for model '{id}'."
                    )));
                }
            }
            model.params.extend(params);
            model.tags.extend(tags);
            if let Some(key) = delete_tag {
                model.tags.remove(key).ok_or_else(|| {
                    RegistryError::NotFound(format!("No tag with key '{key}' on logged model '{id}'"))
                })?;
            }
            Ok(())
        })
    }

    /// The logged models of `experiments` a search returns (deleted ones never), in `order` (by
    /// default the newest first).
    pub fn search_logged_models(
        &self,
        experiments: &[u64],
        clauses: &[Clause],
        order: &[Order],
    ) -> Result<Vec<LoggedModelRecord>, RegistryError> {
        let mut found = Vec::new();
        for &experiment in experiments {
            self.experiment(experiment)?;
            let models = members::<TrackingExperimentModels, TrackingLoggedModels>(&self.store, experiment)?;
            found.extend(
                models
                    .into_iter()
                    .filter(|model| !model.deleted && filter::matches(clauses, &ModelFields(model))),
            );
        }
        let then = [
            Order { field: Some(Field::CreationTime), ascending: false },
            Order { field: None, ascending: true },
        ];
        sorted(&mut found, order, then, |m, o| match &o.field {
            None => Some(SortValue::Bytes(&m.id)),
            Some(Field::Name) => Some(SortValue::Text(&m.name)),
            Some(field) if field.numeric() => ModelFields(m).number(field).map(SortValue::Number),
            Some(Field::RunId) => Some(SortValue::Text(&m.source_run_id)),
            Some(Field::Param(key)) => m.params.get(key).map(|v| SortValue::Text(v)),
            Some(Field::Tag(key)) => m.tags.get(key).map(|v| SortValue::Text(v)),
            Some(_) => None,
        });
        Ok(found)
    }

    /// Records logged models as a run's outputs (each model once; a later step replaces it).
    pub fn log_outputs(
        &self,
        ctx: &Context,
        run_id: &str,
        models: Vec<(String, i64)>,
    ) -> Result<(), RegistryError> {
        let mut outputs = Vec::with_capacity(models.len());
        for (model, step) in models {
            outputs.push((self.logged_model(&model, false)?.id, step));
        }
        self.change_run(ctx, run_id, None, |run, _| {
            Self::active(run)?;
            for (model, step) in outputs {
                run.outputs.retain(|(m, _)| *m != model);
                run.outputs.push((model, step));
            }
            Ok(())
        })
    }
}
