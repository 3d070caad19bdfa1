//! `agora runs`: the node's experiments and runs (MLflow's tracking API) from the command line:
//! list them, show one, compare several side by side, and delete for good what was deleted.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use super::{deploy::print, model::NodeArgs};
use crate::{client::NodeClient, config::Config};

#[derive(Subcommand, Debug)]
pub enum RunsCommand {
    /// Experiments: id, name, where their runs' artifacts go.
    Experiments {
        #[command(flatten)]
        node: NodeArgs,
        /// Deleted experiments too.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// An experiment's runs, newest first: name, status, params and each metric's latest value.
    List {
        /// The experiment, by id or name [default: Default].
        #[arg(long, default_value = "0")]
        experiment: String,
        /// An MLflow search filter, e.g. "metrics.loss < 0.1 AND params.optimizer = 'adamw'".
        #[arg(long)]
        filter: Option<String>,
        /// Order, e.g. "metrics.loss ASC"; repeat for ties.
        #[arg(long = "order-by")]
        order_by: Vec<String>,
        /// At most this many runs.
        #[arg(long, default_value_t = 100)]
        max: u32,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// One run: status, params, tags, each metric's latest value; with --metric, every point of
    /// that metric.
    Show {
        run_id: String,
        #[arg(long)]
        metric: Option<String>,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Runs side by side: every param and each metric's latest value, a column per run (`-`
    /// where a run has none).
    Compare {
        #[arg(num_args = 2.., required = true)]
        run_ids: Vec<String>,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
    /// Delete for good runs, logged models and experiments in the deleted lifecycle stage, with
    /// their metrics and artifacts (as `mlflow gc`; the operator's token). Each kind not named
    /// means every deleted one of it; a registered version keeps its own copy of its files.
    Gc {
        /// Only what was deleted longer ago than this, e.g. 30d, 12h, 2d8h5m20s.
        #[arg(long = "older-than", value_parser = older_than)]
        older_than: Option<u64>,
        /// These runs (comma-separated); each must be deleted.
        #[arg(long = "run-ids", value_delimiter = ',')]
        run_ids: Option<Vec<String>>,
        /// These experiments (comma-separated), with all their runs and models.
        #[arg(long = "experiment-ids", value_delimiter = ',')]
        experiment_ids: Option<Vec<String>>,
        /// These logged models (comma-separated, `m-…`).
        #[arg(long = "logged-model-ids", value_delimiter = ',')]
        logged_model_ids: Option<Vec<String>>,
        #[command(flatten)]
        node: NodeArgs,
        #[arg(long)]
        json: bool,
    },
}

/// A `--older-than` age in seconds.
fn older_than(text: &str) -> Result<u64, String> {
    humantime::parse_duration(text)
        .map(|age| age.as_secs())
        .map_err(|e| format!("'{text}' is not an age like 30d, 12h or 2d8h5m20s: {e}"))
}

const API: &str = "/api/2.0/mlflow";

impl RunsCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        let client = |node: &NodeArgs| -> anyhow::Result<NodeClient> {
            let mut client = NodeClient::new(&node.node)?;
            // a private node's reads need a token; the operator's is the one a CLI may hold
            client.token = config.registry.admin_token.clone();
            Ok(client)
        };
        match self {
            Self::Experiments { node, all, json } => {
                let view = if all { "ALL" } else { "ACTIVE_ONLY" };
                let body =
                    json!({"view_type": view, "max_results": 50_000, "order_by": ["experiment_id ASC"]});
                let answer = client(&node)?.post_json(&format!("{API}/experiments/search"), &body).await?;
                print(json, &answer, experiments_text);
            }
            Self::List { experiment, filter, order_by, max, node, json } => {
                let client = client(&node)?;
                let experiment = experiment_id(&client, &experiment).await?;
                let body = json!({
                    "experiment_ids": [experiment],
                    "filter": filter.unwrap_or_default(),
                    "order_by": order_by,
                    "max_results": max,
                });
                let answer = client.post_json(&format!("{API}/runs/search"), &body).await?;
                print(json, &answer, |a| {
                    let runs = list(&a["runs"]);
                    if runs.is_empty() {
                        "no runs".into()
                    } else {
                        runs.iter().map(run_line).collect::<Vec<_>>().join("\n")
                    }
                });
            }
            Self::Show { run_id, metric, node, json } => {
                let client = client(&node)?;
                let run = get_run(&client, &run_id).await?;
                let history = match &metric {
                    Some(key) => Some(
                        client
                            .get_json(&format!(
                                "{API}/metrics/get-history?run_id={run_id}&metric_key={}",
                                url::form_urlencoded::byte_serialize(key.as_bytes()).collect::<String>()
                            ))
                            .await?,
                    ),
                    None => None,
                };
                let answer = match &history {
                    Some(h) => json!({"run": run, "history": h["metrics"]}),
                    None => json!({"run": run}),
                };
                print(json, &answer, |a| show_text(&a["run"], metric.as_deref(), &a["history"]));
            }
            Self::Compare { run_ids, node, json } => {
                let client = client(&node)?;
                let mut runs = Vec::new();
                for id in &run_ids {
                    runs.push(get_run(&client, id).await?);
                }
                print(json, &json!({"runs": runs}), |_| compare_text(&runs));
            }
            Self::Gc { older_than, run_ids, experiment_ids, logged_model_ids, node, json } => {
                let body = json!({
                    "older_than_secs": older_than,
                    "run_ids": run_ids,
                    "experiment_ids": experiment_ids,
                    "logged_model_ids": logged_model_ids,
                });
                let answer = client(&node)?.post_json("/api/v1/tracking/gc", &body).await?;
                print(json, &answer, gc_text);
            }
        }
        Ok(())
    }
}

fn list(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// An experiment's id: the argument when it is a number, else the id of the experiment so named.
async fn experiment_id(client: &NodeClient, experiment: &str) -> anyhow::Result<String> {
    if experiment.parse::<u64>().is_ok() {
        return Ok(experiment.to_owned());
    }
    let name = url::form_urlencoded::byte_serialize(experiment.as_bytes()).collect::<String>();
    let answer = client
        .get_json(&format!("{API}/experiments/get-by-name?experiment_name={name}"))
        .await
        .with_context(|| format!("no experiment named '{experiment}'"))?;
    Ok(answer["experiment"]["experiment_id"]
        .as_str()
        .context("the node's answer has no experiment id")?
        .to_owned())
}

async fn get_run(client: &NodeClient, id: &str) -> anyhow::Result<Value> {
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("'{id}' is not a run id (32 hex digits)");
    }
    let answer = client.get_json(&format!("{API}/runs/get?run_id={id}")).await?;
    Ok(answer["run"].clone())
}

fn gc_text(answer: &Value) -> String {
    let mut lines = Vec::new();
    for (key, kind) in [("runs", "Run"), ("logged_models", "Logged model"), ("experiments", "Experiment")] {
        for id in list(&answer[key]) {
            lines
                .push(format!("{kind} with ID {} has been permanently deleted.", id.as_str().unwrap_or("?")));
        }
    }
    lines.push(format!(
        "{} metric points and {} artifact files deleted; {} blobs ({} bytes) freed",
        answer["metric_points"], answer["artifact_files"], answer["blobs"], answer["bytes"]
    ));
    lines.join("\n")
}

fn experiments_text(answer: &Value) -> String {
    let experiments = list(&answer["experiments"]);
    if experiments.is_empty() {
        return "no experiments".into();
    }
    experiments
        .iter()
        .map(|e| {
            let deleted = if e["lifecycle_stage"] == "deleted" { " (deleted)" } else { "" };
            format!(
                "{:>4}  {}{deleted}  {}",
                e["experiment_id"].as_str().unwrap_or("?"),
                e["name"].as_str().unwrap_or("?"),
                e["artifact_location"].as_str().unwrap_or("")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `key=value` pairs of a list of `{key, value}`.
fn pairs(items: &Value) -> BTreeMap<String, String> {
    list(items)
        .iter()
        .map(|p| {
            let value = match &p["value"] {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (p["key"].as_str().unwrap_or("?").to_owned(), value)
        })
        .collect()
}

fn joined(map: &BTreeMap<String, String>) -> String {
    map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

fn time(ms: &Value) -> String {
    ms.as_i64()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

fn run_line(run: &Value) -> String {
    let info = &run["info"];
    let mut line = format!(
        "{}  {}  {}  {}",
        info["run_id"].as_str().unwrap_or("?"),
        info["run_name"].as_str().unwrap_or("?"),
        info["status"].as_str().unwrap_or("?"),
        time(&info["start_time"])
    );
    for (label, items) in [("params", &run["data"]["params"]), ("metrics", &run["data"]["metrics"])] {
        let map = pairs(items);
        if !map.is_empty() {
            line += &format!("  {label}: {}", joined(&map));
        }
    }
    line
}

fn show_text(run: &Value, metric: Option<&str>, history: &Value) -> String {
    let info = &run["info"];
    let mut out = format!(
        "run {} ({}) in experiment {}: {}{}\nstarted {}, ended {}, by {}\nartifacts {}\n",
        info["run_id"].as_str().unwrap_or("?"),
        info["run_name"].as_str().unwrap_or("?"),
        info["experiment_id"].as_str().unwrap_or("?"),
        info["status"].as_str().unwrap_or("?"),
        if info["lifecycle_stage"] == "deleted" { " (deleted)" } else { "" },
        time(&info["start_time"]),
        time(&info["end_time"]),
        info["user_id"].as_str().unwrap_or("?"),
        info["artifact_uri"].as_str().unwrap_or("?"),
    );
    for (label, items) in [
        ("params", &run["data"]["params"]),
        ("metrics", &run["data"]["metrics"]),
        ("tags", &run["data"]["tags"]),
    ] {
        let map = pairs(items);
        if !map.is_empty() {
            out += &format!("{label}:\n");
            for (k, v) in map {
                out += &format!("  {k} = {v}\n");
            }
        }
    }
    if let Some(key) = metric {
        let points = list(history);
        out += &format!("{key}: {} points\n", points.len());
        for p in points {
            out += &format!("  step {:>6}  {}  {}\n", p["step"], time(&p["timestamp"]), p["value"]);
        }
    }
    out.trim_end().to_owned()
}

/// A table: a row per param and metric, a column per run.
fn compare_text(runs: &[Value]) -> String {
    let columns: Vec<(BTreeMap<String, String>, BTreeMap<String, String>)> =
        runs.iter().map(|r| (pairs(&r["data"]["params"]), pairs(&r["data"]["metrics"]))).collect();
    let params: BTreeSet<&String> = columns.iter().flat_map(|(p, _)| p.keys()).collect();
    let metrics: BTreeSet<&String> = columns.iter().flat_map(|(_, m)| m.keys()).collect();
    let mut rows: Vec<Vec<String>> = vec![
        std::iter::once(String::new())
            .chain(runs.iter().map(|r| r["info"]["run_name"].as_str().unwrap_or("?").to_owned()))
            .collect(),
        std::iter::once("status".to_owned())
            .chain(runs.iter().map(|r| r["info"]["status"].as_str().unwrap_or("?").to_owned()))
            .collect(),
    ];
    for key in &params {
        rows.push(
            std::iter::once(format!("params.{key}"))
                .chain(columns.iter().map(|(p, _)| p.get(*key).cloned().unwrap_or_else(|| "-".into())))
                .collect(),
        );
    }
    for key in &metrics {
        rows.push(
            std::iter::once(format!("metrics.{key}"))
                .chain(columns.iter().map(|(_, m)| m.get(*key).cloned().unwrap_or_else(|| "-".into())))
                .collect(),
        );
    }
    let widths: Vec<usize> =
        (0..=runs.len()).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|row| {
            row.iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    #[test]
    fn ages_read_as_mlflow_gc_writes_them() {
        assert_eq!(super::older_than("30d"), Ok(30 * 86_400));
        assert_eq!(super::older_than("2d8h5m20s"), Ok(2 * 86_400 + 8 * 3_600 + 5 * 60 + 20));
        assert_eq!(super::older_than("90m"), Ok(5_400));
        assert!(super::older_than("soon").unwrap_err().contains("'soon' is not an age"));
    }
}
