//! `agora deploy …`: deployments from the command line. `predict` on a usage license signs each
//! call's voucher here (the key never leaves), keeping the license's running count under
//! `~/.agora/state` (or `AGORA_STATE_DIR`) and recovering it from the node when it is missing.

use std::path::PathBuf;

use alloy::{primitives::U256, signers::Signer};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::market::{Connected, PayArgs};
use crate::{config::Config, serve::metering};

#[derive(Subcommand, Debug)]
pub enum DeployCommand {
    /// Deploy a model version you own: in-process (builtin) or in front of an inference
    /// server (http).
    Create {
        #[arg(long)]
        model: String,
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, conflicts_with = "version")]
        alias: Option<String>,
        /// Units a call costs per input row.
        #[arg(long, default_value_t = 1)]
        unit_cost: u64,
        /// `builtin` or `http`.
        #[arg(long, default_value = "builtin")]
        runtime: String,
        /// http runtime: where calls are POSTed, body unchanged.
        #[arg(long)]
        upstream_url: Option<String>,
        /// http runtime: GET here must answer 2xx [default: any answer from the upstream's origin].
        #[arg(long)]
        health_url: Option<String>,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// Share a deployment's calls between versions of its model you own, e.g. a canary:
    /// `--split 1=90 --split 2=10` (a version number or an alias, then its whole percent; the
    /// percents sum to 100). One version at 100 moves the deployment to it. An http
    /// deployment's version names the server that answers it: `--split 2=10@http://host/infer`
    /// (a version that already has one may leave it out).
    Traffic {
        id: u64,
        #[arg(long = "split", required = true, value_parser = parse_share)]
        split: Vec<ShareArg>,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// Accept a deployment's inputs as they are now: its drift reference starts again from
    /// its next 1,000 rows (the model's owner or an operator).
    ResetDrift {
        id: u64,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// A deployment's status, requests, errors and latency.
    Status {
        id: u64,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// Every deployment on the node, a line each as `status` prints it.
    List {
        #[command(flatten)]
        pay: PayArgs,
    },
    /// Remove a deployment (the model's owner or an operator); the model and its versions stay.
    Delete {
        id: u64,
        #[command(flatten)]
        pay: PayArgs,
    },
    /// Run the deployed model on inputs (JSON: rows of numbers, or texts for an encoder).
    Predict(PredictArgs),
}

#[derive(Args, Debug)]
pub struct PredictArgs {
    pub id: u64,
    /// The rows, e.g. '[[0.1, 0.2, 0.3, 0.4]]' (an MLP) or '["a text", "another"]' (an
    /// encoder), or a whole JSON object sent as it is (an http deployment's KServe v2 or
    /// OpenAI-style body).
    #[arg(long, conflicts_with = "input_file")]
    pub input: Option<String>,
    #[arg(long)]
    pub input_file: Option<PathBuf>,
    /// Pay with this usage license (signs a voucher per call).
    #[arg(long)]
    pub license: Option<U256>,
    /// Where running voucher counts are kept [default: ~/.agora/state].
    #[arg(long, env = "AGORA_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub pay: PayArgs,
}

impl DeployCommand {
    pub async fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::Create { model, version, alias, unit_cost, runtime, upstream_url, health_url, pay } => {
                let c = Connected::open(&pay.node, &pay.wallet, config, false).await?.signed_in().await?;
                let answer = c
                    .node
                    .post_json(
                        "/api/v1/deployments/create",
                        &json!({"model": model, "version": version, "alias": alias, "unit_cost": unit_cost,
                            "runtime": runtime, "upstream_url": upstream_url, "health_url": health_url}),
                    )
                    .await?;
                print(pay.json, &answer, |a| {
                    format!(
                        "deployment {} of {} v{}: {}{}",
                        a["deployment_id"].as_str().unwrap_or("?"),
                        a["model"].as_str().unwrap_or("?"),
                        a["version"],
                        a["status"].as_str().unwrap_or("?"),
                        a["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default()
                    )
                });
                Ok(())
            }
            Self::Traffic { id, split, pay } => {
                let c = Connected::open(&pay.node, &pay.wallet, config, false).await?.signed_in().await?;
                let answer = c
                    .node
                    .put_json(&format!("/api/v1/deployments/{id}/traffic"), &traffic_body(&split))
                    .await?;
                print(pay.json, &answer, |a| {
                    format!("deployment {id} of {}: {}", a["model"].as_str().unwrap_or("?"), traffic_line(a))
                });
                Ok(())
            }
            Self::ResetDrift { id, pay } => {
                let c = Connected::open(&pay.node, &pay.wallet, config, false).await?.signed_in().await?;
                let answer = c.node.delete_json(&format!("/api/v1/deployments/{id}/drift")).await?;
                print(pay.json, &answer, |a| {
                    format!("deployment {id}: input drift {}", drift_line(&a["drift"]))
                });
                Ok(())
            }
            Self::Status { id, pay } => {
                let node = crate::client::NodeClient::new(&pay.node.node)?;
                let answer = node.get_json(&format!("/api/v1/deployments/{id}")).await?;
                print(pay.json, &answer, status_line);
                Ok(())
            }
            Self::List { pay } => {
                let node = crate::client::NodeClient::new(&pay.node.node)?;
                let answer = node.get_json("/api/v1/deployments").await?;
                print(pay.json, &answer, |a| {
                    let lines: Vec<String> = a["deployments"]
                        .as_array()
                        .map(|d| d.iter().map(status_line).collect())
                        .unwrap_or_default();
                    if lines.is_empty() { "no deployments".into() } else { lines.join("\n") }
                });
                Ok(())
            }
            Self::Delete { id, pay } => {
                let c = Connected::open(&pay.node, &pay.wallet, config, false).await?.signed_in().await?;
                c.node.delete_json(&format!("/api/v1/deployments/{id}")).await?;
                print(pay.json, &json!({"deployment_id": id.to_string(), "deleted": true}), |_| {
                    format!("deployment {id} removed")
                });
                Ok(())
            }
            Self::Predict(args) => predict(args, config).await,
        }
    }
}

/// `deployment 1: iris v2 ready; 12 requests, …; traffic …; input drift …`.
fn status_line(a: &Value) -> String {
    format!(
        "deployment {}: {} v{} {}; {} requests, {} errors, p50 {} ms, p99 {} ms; units metered {}, settled {}, pending {}; traffic {}; input drift {}{}",
        a["deployment_id"].as_str().unwrap_or("?"),
        a["model"].as_str().unwrap_or("?"),
        a["version"],
        a["status"].as_str().unwrap_or("?"),
        a["requests"],
        a["errors"],
        a["latency_p50_ms"],
        a["latency_p99_ms"],
        a["units_metered"].as_str().unwrap_or("?"),
        a["units_settled"].as_str().unwrap_or("?"),
        a["units_pending"].as_str().unwrap_or("?"),
        traffic_line(a),
        drift_line(&a["drift"]),
        match &a["output_drift"] {
            Value::Null => String::new(),
            outputs => format!("; output drift {}", drift_line(outputs)),
        }
    )
}

/// One `--split`: a version number or an alias, its whole percent, and (http deployments) the
/// server that answers it.
#[derive(Clone, Debug, PartialEq)]
pub struct ShareArg {
    version: String,
    percent: u32,
    upstream: Option<String>,
}

/// `V=P` or `V=P@URL`.
fn parse_share(raw: &str) -> Result<ShareArg, String> {
    let (version, rest) =
        raw.split_once('=').ok_or_else(|| format!("`{raw}` is not VERSION=PERCENT (e.g. 2=10)"))?;
    let (percent, upstream) = match rest.split_once('@') {
        Some((percent, url)) if url.trim().is_empty() => {
            return Err(format!("`{raw}` names no upstream after `{percent}@`"));
        }
        Some((percent, url)) => (percent, Some(url.trim().to_owned())),
        None => (rest, None),
    };
    let percent =
        percent.trim().parse().map_err(|_| format!("`{percent}` in `{raw}` is not a whole percent"))?;
    let version = version.trim();
    if version.is_empty() {
        return Err(format!("`{raw}` names no version or alias before `=`"));
    }
    Ok(ShareArg { version: version.to_owned(), percent, upstream })
}

/// The traffic request: numbers are versions, anything else an alias.
fn traffic_body(split: &[ShareArg]) -> Value {
    let shares: Vec<Value> = split
        .iter()
        .map(|share| {
            let mut body = match share.version.parse::<u32>() {
                Ok(version) => json!({"version": version, "percent": share.percent}),
                Err(_) => json!({"alias": share.version, "percent": share.percent}),
            };
            if let Some(url) = &share.upstream {
                body["upstream_url"] = json!(url);
            }
            body
        })
        .collect();
    json!({ "split": shares })
}

/// `v1 90% (12 requests, 0 errors, p99 1.2 ms), v2 10% (…)`.
fn traffic_line(a: &Value) -> String {
    let shares: Vec<String> = a["traffic"]
        .as_array()
        .map(|t| t.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|t| {
            let upstream = match (t["upstream_url"].as_str(), t["health"].as_str()) {
                (Some(url), Some(health)) => format!(", {url} {health}"),
                (Some(url), None) => format!(", {url}"),
                _ => String::new(),
            };
            format!(
                "v{} {}% ({} requests, {} errors, p99 {} ms{upstream})",
                t["version"], t["percent"], t["requests"], t["errors"], t["latency_p99_ms"]
            )
        })
        .collect();
    shares.join(", ")
}

/// `1.84 (feature 2), PSI 0.31 (feature 2; 1000 reference rows, 500 recent)`, or why there is
/// no score yet.
fn drift_line(d: &Value) -> String {
    if d.is_null() {
        return "not followed (an MLP deployment's rows are, from its first call)".into();
    }
    let rows = format!("{} reference rows, {} recent", d["reference_rows"], d["recent_rows"]);
    let psi = match d["psi"].as_f64() {
        Some(psi) => format!("PSI {psi:.2} (feature {})", d["psi_feature"]),
        None => "no PSI (a reference kept before bins were followed: reset it)".into(),
    };
    match d["score"].as_f64() {
        Some(score) => format!("{score:.2} (feature {}), {psi}; {rows}", d["feature"]),
        None => format!("no score yet ({rows}; a score needs 1000 and 100)"),
    }
}

pub(super) fn print(json_out: bool, value: &Value, human: impl Fn(&Value) -> String) {
    if json_out { println!("{value}") } else { println!("{}", human(value)) }
}

async fn predict(args: PredictArgs, config: &Config) -> anyhow::Result<()> {
    let text = match (&args.input, &args.input_file) {
        (Some(text), _) => text.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        (None, None) => bail!("give --input '[[…]]' or --input-file FILE"),
    };
    let input: Value =
        serde_json::from_str(&text).context("the input is not JSON: rows like [[0.1, 0.2]] or an object")?;
    let body = match input {
        Value::Array(_) => json!({"inputs": input}),
        Value::Object(_) => input,
        _ => bail!("the input must be rows like [[0.1, 0.2]] or a JSON object"),
    };
    let c = Connected::open(&args.pay.node, &args.pay.wallet, config, false).await?.signed_in().await?;
    let path = format!("/api/v1/deployments/{}/predict", args.id);
    let mut request = c.node.authorize(c.node.http.post(c.node.endpoint(&path))).json(&body);
    let mut counted = None;
    if let Some(license) = args.license {
        let deployment = c.node.get_json(&format!("/api/v1/deployments/{}", args.id)).await?;
        let cost = U256::from(deployment["unit_cost"].as_u64().unwrap_or(1))
            * U256::from(crate::serve::rows_of(&body));
        let state = state_file(&args.state_dir, c.chain_id, license)?;
        let last = match std::fs::read_to_string(&state).ok().and_then(|t| t.trim().parse::<U256>().ok()) {
            Some(last) => last,
            None => {
                let usage = c.node.get_json(&format!("/api/v1/licenses/{license}/usage")).await?;
                usage["cumulative_units"]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .context("the node did not say the license's count")?
            }
        };
        let cumulative = last + cost;
        let signature =
            c.signer.sign_hash(&metering::voucher_hash(license, cumulative, c.chain_id, c.market)).await?;
        request =
            request.header("agora-voucher", metering::header(license, cumulative, &signature.as_bytes()));
        counted = Some((state, cumulative));
    }
    let response =
        request.send().await.with_context(|| format!("cannot reach the node at {}", c.node.url))?;
    let receipt = response.headers().get("agora-receipt").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let answer = match crate::client::answer(response).await {
        Ok(answer) => answer,
        Err(e) => {
            // The count here may be behind the node's (an answer lost on the way): the next
            // call asks the node again.
            if let Some((state, _)) = &counted {
                let _ = std::fs::remove_file(state);
            }
            return Err(e);
        }
    };
    if let Some((state, cumulative)) = counted {
        write_state(&state, cumulative)?;
    }
    // The builtin runtime answers {outputs}; an upstream answers in its own shape.
    let outputs = if answer.get("model").is_some() && answer.get("outputs").is_some() {
        answer["outputs"].clone()
    } else {
        answer
    };
    let out = json!({"outputs": outputs, "receipt": receipt});
    print(args.pay.json, &out, |o| o["outputs"].to_string());
    Ok(())
}

fn state_file(dir: &Option<PathBuf>, chain_id: u64, license: U256) -> anyhow::Result<PathBuf> {
    let dir = match dir {
        Some(d) => d.clone(),
        None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set; give --state-dir")?)
            .join(".agora/state"),
    };
    Ok(dir.join(format!("usage-{chain_id}-{license}")))
}

/// Writes the count atomically (temp file, rename).
fn write_state(path: &std::path::Path, cumulative: U256) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, cumulative.to_string())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_as_version_or_alias_and_percent() {
        let share = |version: &str, percent, upstream: Option<&str>| ShareArg {
            version: version.into(),
            percent,
            upstream: upstream.map(Into::into),
        };
        assert_eq!(parse_share("2=10"), Ok(share("2", 10, None)));
        assert_eq!(parse_share("champion = 90"), Ok(share("champion", 90, None)));
        assert_eq!(
            parse_share("2=10@http://u:p@127.0.0.1:9/infer?a=b"),
            Ok(share("2", 10, Some("http://u:p@127.0.0.1:9/infer?a=b")))
        );
        assert!(parse_share("2:10").unwrap_err().contains("VERSION=PERCENT"));
        assert!(parse_share("2=ten").unwrap_err().contains("whole percent"));
        assert!(parse_share("=10").unwrap_err().contains("no version"));
        assert!(parse_share("2=10@ ").unwrap_err().contains("no upstream"));
        let body =
            traffic_body(&[share("1", 90, None), share("challenger", 10, Some("http://127.0.0.1:9/x"))]);
        assert_eq!(
            body,
            json!({"split": [{"version": 1, "percent": 90}, {"alias": "challenger", "percent": 10, "upstream_url": "http://127.0.0.1:9/x"}]})
        );
    }
}
