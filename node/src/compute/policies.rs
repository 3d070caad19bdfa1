//! Retraining policies: a training run to trigger on a schedule (cron, seconds resolution:
//! `sec min hour day-of-month month day-of-week [year]`, UTC), when a deployment's inputs drift
//! (its drift score above a threshold), or on demand.

use std::{collections::HashMap, str::FromStr};

use serde::{Deserialize, Serialize};

use super::{estimate::Constraints, jobs::TriggerRequest};
use crate::serve::drift::DriftView;

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

/// `drift = { deployment = 1, above = 0.5, psi_above = 0.25, every = 3600 }`: fire when the
/// deployment's input drift score (see `serve::drift`) is above `above`, or its PSI above
/// `psi_above`, or (an MLP's) its outputs' score above `output_above` or PSI above
/// `output_psi_above` (one threshold at least), at most once every `every` seconds (default an
/// hour); a run that schedules a job starts the deployment's drift references again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DriftTrigger {
    pub deployment: u64,
    /// Standard deviations a feature's mean moved.
    #[serde(default)]
    pub above: Option<f64>,
    /// Population stability index of a feature's distribution.
    #[serde(default)]
    pub psi_above: Option<f64>,
    /// The same two of an MLP's outputs.
    #[serde(default)]
    pub output_above: Option<f64>,
    #[serde(default)]
    pub output_psi_above: Option<f64>,
    #[serde(default = "hour")]
    pub every: u64,
}

impl DriftTrigger {
    /// Whether the drift of a deployment's inputs or outputs passes a threshold.
    pub fn fires(&self, inputs: Option<&DriftView>, outputs: Option<&DriftView>) -> bool {
        let past = |value: Option<f64>, threshold: Option<f64>| matches!((value, threshold), (Some(v), Some(t)) if v > t);
        let of = |view: Option<&DriftView>| view.map_or((None, None), |v| (v.score, v.psi));
        let ((score, psi), (output_score, output_psi)) = (of(inputs), of(outputs));
        past(score, self.above)
            || past(psi, self.psi_above)
            || past(output_score, self.output_above)
            || past(output_psi, self.output_psi_above)
    }

    fn thresholds(&self) -> [(&'static str, Option<f64>, &'static str); 4] {
        const STD: &str = "a number of standard deviations";
        const PSI: &str = "a population stability index";
        [
            ("above", self.above, STD),
            ("psi_above", self.psi_above, PSI),
            ("output_above", self.output_above, STD),
            ("output_psi_above", self.output_psi_above, PSI),
        ]
    }
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
        if let Some(drift) = &self.drift {
            if drift.thresholds().iter().all(|(_, threshold, _)| threshold.is_none()) {
                return Err(format!(
                    "policy {:?}: drift needs a threshold: above or output_above (standard deviations), \
                     psi_above or output_psi_above (PSI)",
                    self.name
                ));
            }
            for (name, threshold, what) in drift.thresholds() {
                if let Some(t) = threshold
                    && !(t.is_finite() && t > 0.0)
                {
                    return Err(format!("policy {:?}: drift.{name} is {t}; it is {what} above 0", self.name));
                }
            }
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
        let trigger = DriftTrigger {
            deployment: 3,
            above: Some(0.5),
            psi_above: None,
            output_above: None,
            output_psi_above: None,
            every: 3600,
        };
        assert_eq!(p.drift, Some(trigger.clone()));
        p.check().unwrap();
        assert_eq!(p.trigger(), "drift");
        p.drift = Some(DriftTrigger { above: Some(-1.0), ..trigger.clone() });
        assert!(p.check().unwrap_err().contains("drift.above"));
        p.drift = Some(DriftTrigger { above: None, psi_above: Some(f64::NAN), ..trigger.clone() });
        assert!(p.check().unwrap_err().contains("drift.psi_above"));
        p.drift = Some(DriftTrigger { above: None, output_psi_above: Some(0.0), ..trigger.clone() });
        assert!(p.check().unwrap_err().contains("drift.output_psi_above"));
        p.drift = Some(DriftTrigger { above: None, output_above: Some(2.0), ..trigger });
        p.check().unwrap();
        let none: Policy =
            toml::from_str("name = \"x\"\nmodel = \"m\"\ndataset = \"d\"\ndrift = { deployment = 3 }\n")
                .unwrap();
        assert!(none.check().unwrap_err().contains("needs a threshold"), "{:?}", none.check());
        assert!(
            toml::from_str::<Policy>(
                "name = \"x\"\nmodel = \"m\"\ndataset = \"d\"\ndrift = { deployment = 3, psi = 0.2 }\n"
            )
            .is_err(),
            "an unknown key is refused"
        );
    }

    #[test]
    fn a_drift_trigger_fires_on_either_threshold_it_has() {
        let view = |score, psi| DriftView {
            reference_rows: 1_000,
            recent_rows: 1_000,
            score,
            feature: Some(0),
            psi,
            psi_feature: Some(0),
        };
        let both = DriftTrigger {
            deployment: 1,
            above: Some(1.0),
            psi_above: Some(0.25),
            output_above: None,
            output_psi_above: None,
            every: 60,
        };
        let fires = |t: &DriftTrigger, inputs: DriftView| t.fires(Some(&inputs), None);
        assert!(!fires(&both, view(Some(0.5), Some(0.1))));
        assert!(fires(&both, view(Some(1.5), Some(0.1))));
        assert!(fires(&both, view(Some(0.5), Some(0.3))));
        assert!(!fires(&both, view(None, None)), "no score yet");
        assert!(!both.fires(None, None), "no drift followed yet");
        let psi_only = DriftTrigger { above: None, ..both.clone() };
        assert!(!fires(&psi_only, view(Some(9.0), Some(0.1))), "a mean it does not watch");
        assert!(fires(&psi_only, view(Some(0.0), Some(0.3))));
        // outputs are watched only by their own thresholds
        let outputs = DriftTrigger { above: None, psi_above: None, output_psi_above: Some(0.25), ..both };
        assert!(!outputs.fires(Some(&view(Some(9.0), Some(9.0))), Some(&view(Some(9.0), Some(0.1)))));
        assert!(outputs.fires(None, Some(&view(Some(0.0), Some(0.3)))));
    }
}
