//! Permanent deletion of what was deleted (MLflow's `mlflow gc`): runs with their params, tags,
//! metric points and artifacts; logged models with their artifacts; experiments with all of
//! their runs and models, which frees their names.
//!
//! - Only what is in the deleted lifecycle stage goes, and, with an age, only what was deleted
//!   (an experiment or logged model: last changed) longer ago than that. Named ids that are not
//!   deleted, or not old enough, refuse the whole call before anything goes, as MLflow's does.
//! - Each kind left unnamed means every deleted one of that kind (old enough), as MLflow's.
//! - A record goes last, after its artifacts and its metric points: a node stopped half way
//!   still lists the run as deleted, and the next collection finishes it.
//! - A registered version keeps its own copy of the files it was registered from, so its run's
//!   collection leaves it whole.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{LoggedModelRecord, RunRecord, Tracking, invalid, members, parse_experiment_id};
use crate::{
    registry::{Actor, Context, RegistryError, now_ms},
    store::{
        Table,
        tables::{
            TrackingExperimentModels, TrackingExperimentNames, TrackingExperimentRuns, TrackingExperiments,
            TrackingLoggedModels, TrackingMetrics, TrackingRuns,
        },
    },
};

/// Metric points deleted per batch.
const POINTS_PER_BATCH: usize = 10_000;

/// What to collect: each kind named, or every deleted one of it when `None`.
#[derive(Clone, Debug, Default)]
pub struct GcRequest {
    /// Only what was deleted longer ago than this.
    pub older_than_ms: Option<u64>,
    pub run_ids: Option<Vec<String>>,
    pub experiment_ids: Option<Vec<String>>,
    pub logged_model_ids: Option<Vec<String>>,
}

/// What a collection removed for good.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct GcReport {
    pub runs: Vec<String>,
    pub logged_models: Vec<String>,
    pub experiments: Vec<String>,
    pub metric_points: u64,
    /// Files of the artifact tree deleted (their blobs are released to the artifact store's
    /// collection).
    pub artifact_files: u64,
}

impl Tracking {
    /// Deletes for good what `request` selects; `delete_dir` deletes one directory of the
    /// artifact tree and says how many files it held (none is 0). An operator's call.
    pub fn gc(
        &self,
        ctx: &Context,
        request: &GcRequest,
        mut delete_dir: impl FnMut(&str) -> Result<u64, RegistryError>,
    ) -> Result<GcReport, RegistryError> {
        ctx.actor.require_signed_in()?;
        if ctx.actor != Actor::Operator {
            return Err(RegistryError::Forbidden(
                "permanent deletion of runs, models and experiments is an operator's".into(),
            ));
        }
        let _guard = self.lock();
        let threshold = request.older_than_ms.map(|age| now_ms().saturating_sub(age));
        let old_enough = |at: Option<u64>| threshold.is_none_or(|t| at.is_some_and(|at| at < t));
        let age = humantime::format_duration(std::time::Duration::from_millis(
            request.older_than_ms.unwrap_or_default(),
        ))
        .to_string();

        let limit = (&old_enough, age.as_str());
        let experiments = self.doomed::<TrackingExperiments>(
            request.experiment_ids.as_deref(),
            ("Experiments", |id| self.experiment(parse_experiment_id(id)?)),
            |e| e.deleted.then_some(Some(e.updated_ms)),
            |e| e.id.to_string(),
            limit,
        )?;
        let runs = self.doomed::<TrackingRuns>(
            request.run_ids.as_deref(),
            ("Runs", |id| self.run(id)),
            |r| r.deleted.then_some(r.deleted_ms),
            RunRecord::run_id,
            limit,
        )?;
        let models = self.doomed::<TrackingLoggedModels>(
            request.logged_model_ids.as_deref(),
            ("Logged models", |id| self.logged_model(id, true)),
            |m| m.deleted.then_some(Some(m.updated_ms)),
            LoggedModelRecord::model_id,
            limit,
        )?;
        let mut runs: BTreeMap<_, _> = runs.into_iter().map(|r| (r.id, r)).collect();
        let mut models: BTreeMap<_, _> = models.into_iter().map(|m| (m.id, m)).collect();
        for experiment in &experiments {
            for run in members::<TrackingExperimentRuns, TrackingRuns>(&self.store, experiment.id)? {
                runs.insert(run.id, run);
            }
            for model in
                members::<TrackingExperimentModels, TrackingLoggedModels>(&self.store, experiment.id)?
            {
                models.insert(model.id, model);
            }
        }

        let mut report = GcReport::default();
        for run in runs.values() {
            report.artifact_files += artifacts(&run.artifact_uri, &mut delete_dir)?;
            report.metric_points += self.delete_points(&run.id)?;
            let mut batch = self.store.batch();
            batch.delete::<TrackingRuns>(&run.id);
            batch.delete::<TrackingExperimentRuns>(&(run.experiment_id, run.id));
            let audited = (format!("tracking.run_purged {}", run.name), format!("run:{}", run.run_id()));
            self.commit(ctx, batch, Some(audited))?;
            report.runs.push(run.run_id());
        }
        for model in models.values() {
            report.artifact_files += artifacts(&model.artifact_location, &mut delete_dir)?;
            let mut batch = self.store.batch();
            batch.delete::<TrackingLoggedModels>(&model.id);
            batch.delete::<TrackingExperimentModels>(&(model.experiment_id, model.id));
            let audited = (
                format!("tracking.model_purged {}", model.name),
                format!("logged_model:{}", model.model_id()),
            );
            self.commit(ctx, batch, Some(audited))?;
            report.logged_models.push(model.model_id());
        }
        for experiment in &experiments {
            let mut batch = self.store.batch();
            batch.delete::<TrackingExperiments>(&experiment.id);
            if self.store.get::<TrackingExperimentNames>(&experiment.name)? == Some(experiment.id) {
                batch.delete::<TrackingExperimentNames>(&experiment.name);
            }
            let audited = (
                format!("tracking.experiment_purged {}", experiment.name),
                format!("experiment:{}", experiment.id),
            );
            self.commit(ctx, batch, Some(audited))?;
            report.experiments.push(experiment.id.to_string());
        }
        Ok(report)
    }

    /// What a collection takes of one kind, table `T`: the records `named` (each must be
    /// deleted and old enough, or the call is refused), else every deleted one old enough.
    /// `deleted_at` is when a record was deleted (`Some(None)` when unknown), `None` while it
    /// is not.
    fn doomed<T: Table>(
        &self,
        named: Option<&[String]>,
        (kind, fetch): (&str, impl Fn(&str) -> Result<T::Value, RegistryError>),
        deleted_at: impl Fn(&T::Value) -> Option<Option<u64>>,
        id: impl Fn(&T::Value) -> String,
        (old_enough, age): (&impl Fn(Option<u64>) -> bool, &str),
    ) -> Result<Vec<T::Value>, RegistryError> {
        let Some(named) = named else {
            let mut found = Vec::new();
            for item in self.store.iter::<T>() {
                let (_, record) = item?;
                if deleted_at(&record).is_some_and(old_enough) {
                    found.push(record);
                }
            }
            return Ok(found);
        };
        let found = named.iter().map(|n| fetch(n)).collect::<Result<Vec<_>, _>>()?;
        refuse(&found, |r| deleted_at(r).is_none(), &id, kind, "are not in the deleted lifecycle stage")?;
        let too_young = format!("were deleted less than {age} ago");
        refuse(&found, |r| deleted_at(r).is_some_and(|at| !old_enough(at)), &id, kind, &too_young)?;
        Ok(found)
    }

    /// Deletes a run's metric points, a batch at a time; returns how many there were.
    fn delete_points(&self, run: &[u8; 16]) -> Result<u64, RegistryError> {
        let mut deleted = 0;
        loop {
            let keys: Vec<Vec<u8>> = self
                .store
                .scan::<TrackingMetrics>(run, None, false)
                .take(POINTS_PER_BATCH)
                .map(|item| item.map(|(key, _)| key))
                .collect::<Result<_, _>>()?;
            if keys.is_empty() {
                return Ok(deleted);
            }
            let mut batch = self.store.batch();
            for key in &keys {
                batch.delete_raw(TrackingMetrics::NAME, key);
            }
            self.store.write(batch)?;
            deleted += keys.len() as u64;
        }
    }
}

/// Deletes the directory of the artifact tree an `mlflow-artifacts:` URI names; files elsewhere
/// (another store's URI) are not the node's to delete.
fn artifacts(
    uri: &str,
    delete_dir: &mut impl FnMut(&str) -> Result<u64, RegistryError>,
) -> Result<u64, RegistryError> {
    match uri.strip_prefix("mlflow-artifacts:").map(|p| p.trim_matches('/')) {
        Some(dir) if !dir.is_empty() => delete_dir(dir),
        _ => Ok(0),
    }
}

/// Refuses the call, naming every record `bad` picks out, when there is one.
fn refuse<T>(
    records: &[T],
    bad: impl Fn(&T) -> bool,
    id: &impl Fn(&T) -> String,
    kind: &str,
    why: &str,
) -> Result<(), RegistryError> {
    let named: Vec<String> = records.iter().filter(|r| bad(r)).map(id).collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(invalid(format!("{kind} [{}] {why}; nothing was deleted", named.join(", "))))
}
