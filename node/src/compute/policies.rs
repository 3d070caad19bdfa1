//! Retraining policies: a training run to trigger on a schedule (cron, seconds resolution:
//! `sec min hour day-of-month month day-of-week [year]`, UTC), when a deployment's inputs drift
//! (its drift score above a threshold), or on demand.

use std::{collections::HashMap, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{estimate::Constraints, jobs::TriggerRequest};

/// `[[compute.policies]]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// Cron schedule; absent: the policy runs only when asked (`POST .../run`).
    #[serde(default)]
    pub schedule: Option<String>,
    pub model: String,
    /// Blake3 or artifact path of the dataset (a path picks up new data at every run).
    pub dataset: String,
    #[serde(default)]
    pub dataset_format: Option<String>,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: Option<serde_json::Value>,
    #[serde(default)]
    pub constraints: Constraints,
    #[serde(default)]
    pub executor: Option<String>,
    /// Fire when a deployment's input drift goes above a threshold.
    #[serde(default)]
    pub drift: Option<DriftTrigger>,
}

/// `drift = { deployment = 1, above = 0.5, every = 3600 }`: fire when the deployment's drift
/// score (see `serve::drift`) is above `above`, at most once every `every` seconds (default an
/// hour); a run that schedules a job starts the deployment's drift reference again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DriftTrigger {
    pub deployment: u64,
    pub above: f64,
    #[serde(default = "hour")]
    pub every: u64,
}

fn hour() -> u64 {
    3600
}

impl Policy {
    pub fn check(&self) -> Result<(), String> {
        if self.name.trim().is_empty() {
            return Err("a policy needs a name".into());
        }
        if let Some(schedule) = &self.schedule {
            cron::Schedule::from_str(schedule).map_err(|e| {
                format!("policy {:?}: schedule {schedule:?} is not a cron expression: {e}", self.name)
            })?;
        }
        if let Some(drift) = &self.drift
            && !(drift.above.is_finite() && drift.above > 0.0)
        {
            return Err(format!(
                "policy {:?}: drift.above is {}; it is a number of standard deviations above 0",
                self.name, drift.above
            ));
        }
        Ok(())
    }

    /// What fires it: `schedule`, `drift`, both (`schedule, drift`), or `manual`.
    pub fn trigger(&self) -> String {
        match (&self.schedule, &self.drift) {
            (Some(_), Some(_)) => "schedule, drift",
            (Some(_), None) => "schedule",
            (None, Some(_)) => "drift",
            (None, None) => "manual",
        }
        .into()
    }

    /// The next time the schedule fires after `after` (unix seconds).
    pub fn next_after(&self, after: u64) -> Option<u64> {
        let schedule = cron::Schedule::from_str(self.schedule.as_deref()?).ok()?;
        let after = chrono::DateTime::from_timestamp(i64::try_from(after).ok()?, 0)?;
        schedule.after(&after).next().and_then(|t| u64::try_from(t.timestamp()).ok())
    }

    pub fn request(&self) -> TriggerRequest {
        TriggerRequest {
            model: self.model.clone(),
            version: None,
            dataset: self.dataset.clone(),
            dataset_format: self.dataset_format.clone(),
            hyperparameters: self.hyperparameters.clone(),
            constraints: self.constraints.clone(),
            executor: self.executor.clone(),
            policy: Some(self.name.clone()),
            gpu_hours: None,
        }
    }
}

/// A policy as `GET /api/v1/retraining/policies` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct PolicyView {
    #[serde(flatten)]
    pub policy: Policy,
    /// `schedule`, `drift`, `schedule, drift` or `manual`.
    pub trigger: String,
    pub next_run: Option<u64>,
    pub last_run: Option<u64>,
    /// The job its last run scheduled, or why it could not.
    pub last_job: Option<u64>,
    pub last_error: Option<String>,
}

/// When each scheduled policy fires next, and what its last run did (in memory: a restart
/// schedules from the next firing on).
#[derive(Debug, Default)]
pub struct Runs {
    pub next: HashMap<String, u64>,
    pub last: HashMap<String, (u64, Result<u64, String>)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_fire() {
        let mut p = Policy {
            name: "nightly".into(),
            schedule: Some("0 0 3 * * *".into()),
            model: "m".into(),
            dataset: "datasets/train.csv".into(),
            dataset_format: None,
            hyperparameters: None,
            constraints: Constraints::default(),
            executor: None,
            drift: None,
        };
        p.check().unwrap();
        assert_eq!(p.trigger(), "schedule");
        let next = p.next_after(1_800_000_000).unwrap();
        assert!(next > 1_800_000_000 && next - 1_800_000_000 <= 86_400);
        assert_eq!(next % 86_400, 3 * 3600, "03:00 UTC");
        p.schedule = Some("every day".into());
        assert!(p.check().unwrap_err().contains("nightly"));
        p.schedule = None;
        assert_eq!(p.next_after(0), None, "manual policies never fire by themselves");
        assert_eq!(p.trigger(), "manual");
    }

    #[test]
    fn drift_triggers_parse_with_an_hour_between_runs_and_need_a_positive_threshold() {
        let mut p: Policy = toml::from_str(
            "name = \"on-drift\"\nmodel = \"m\"\ndataset = \"d.csv\"\ndrift = { deployment = 3, above = 0.5 }\n",
        )
        .unwrap();
        assert_eq!(p.drift, Some(DriftTrigger { deployment: 3, above: 0.5, every: 3600 }));
        p.check().unwrap();
        assert_eq!(p.trigger(), "drift");
        p.drift = Some(DriftTrigger { deployment: 3, above: -1.0, every: 60 });
        assert!(p.check().unwrap_err().contains("drift.above"));
        assert!(
            toml::from_str::<Policy>(
                "name = \"x\"\nmodel = \"m\"\ndataset = \"d\"\ndrift = { deployment = 3 }\n"
            )
            .is_err()
        );
    }
}
