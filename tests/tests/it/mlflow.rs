//! The stock MLflow client against a node: `tests/mlflow/` (pytest, mlflow-skinny pinned in
//! the virtualenv `scripts/setup` makes) run against a node this test starts.

use std::{path::PathBuf, process::Command};

use super::registry::{TOKEN, start};

fn venv_python() -> PathBuf {
    let venv = std::env::var_os("AGORA_VENV").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/agora/venv")
    });
    venv.join("bin/python")
}

#[tokio::test]
async fn the_mlflow_client_speaks_to_the_registry() {
    let python = venv_python();
    let probe = Command::new(&python).args(["-c", "import mlflow, pytest"]).output();
    assert!(
        probe.as_ref().is_ok_and(|o| o.status.success()),
        "{} cannot import mlflow and pytest; run scripts/setup (it installs them): {probe:?}",
        python.display()
    );
    let (_market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let suite = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("mlflow");
    let url = node.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"])
            .arg(&suite)
            .env("AGORA_URL", &url)
            .env("MLFLOW_TRACKING_URI", &url)
            .env("MLFLOW_TRACKING_TOKEN", TOKEN)
            .env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            .env("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
            .env("HOME", data.path())
            .output()
            .expect("pytest runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pytest failed:\n{stdout}\n{stderr}\nnode output:\n{}",
        node.process.output()
    );
    println!("{stdout}");
}

/// POSTs `body` to the node's MLflow API as the operator.
async fn mlflow_post(url: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
    let response = reqwest::Client::new()
        .post(format!("{url}/api/2.0/mlflow/{path}"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

/// GETs `path` of the node's MLflow API as the operator.
async fn mlflow_get(url: &str, path: &str) -> serde_json::Value {
    let response = reqwest::Client::new()
        .get(format!("{url}/api/2.0/mlflow/{path}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{path}: {}", response.status());
    response.json().await.unwrap()
}

#[tokio::test]
async fn agora_runs_lists_shows_and_compares_runs() {
    use serde_json::json;
    let (_market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let url = node.url.clone();
    let created = mlflow_post(&url, "experiments/create", json!({"name": "cli"})).await;
    let experiment = created["experiment_id"].as_str().unwrap().to_owned();
    let mut runs = Vec::new();
    for (name, lr, losses) in [("slow", "0.001", [0.9, 0.7]), ("fast", "0.1", [0.8, 0.3])] {
        let run =
            mlflow_post(&url, "runs/create", json!({"experiment_id": experiment, "run_name": name})).await;
        let id = run["run"]["info"]["run_id"].as_str().unwrap().to_owned();
        let metrics: Vec<_> = losses
            .iter()
            .enumerate()
            .map(|(step, loss)| json!({"key": "loss", "value": loss, "step": step, "timestamp": 1_700_000_000_000u64}))
            .collect();
        let mut params = vec![json!({"key": "lr", "value": lr})];
        if name == "fast" {
            params.push(json!({"key": "warmup", "value": "10"}));
        }
        mlflow_post(&url, "runs/log-batch", json!({"run_id": id, "metrics": metrics, "params": params}))
            .await;
        runs.push(id);
    }
    let env = [("AGORA_ADMIN_TOKEN", TOKEN)];
    let run = |args: &[&str]| {
        let mut all = vec!["runs"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--node", &url]);
        agora_e2e::agora(&all, &env)
    };

    let (status, out, err) = run(&["experiments"]);
    assert!(status.success(), "{err}");
    assert!(
        out.contains("Default")
            && out.contains(&format!("{experiment}  cli  mlflow-artifacts:/{experiment}")),
        "{out}"
    );

    let (status, out, err) =
        run(&["list", "--experiment", "cli", "--filter", "metrics.loss < 0.5", "--json"]);
    assert!(status.success(), "{err}");
    let found: serde_json::Value = serde_json::from_str(&out).unwrap();
    let names: Vec<_> =
        found["runs"].as_array().unwrap().iter().map(|r| r["info"]["run_name"].clone()).collect();
    assert_eq!(names, [json!("fast")]);
    let (status, out, err) = run(&["list", "--experiment", &experiment, "--order-by", "metrics.loss DESC"]);
    assert!(status.success(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].starts_with(&runs[0]) && lines[0].contains("slow  RUNNING") && lines[0].contains("loss=0.7"),
        "{out}"
    );
    assert!(lines[1].contains("params: lr=0.1 warmup=10  metrics: loss=0.3"), "{out}");

    let (status, out, err) = run(&["show", &runs[1], "--metric", "loss"]);
    assert!(status.success(), "{err}");
    assert!(
        out.contains("lr = 0.1") && out.contains("loss: 2 points") && out.contains("mlflow.runName = fast"),
        "{out}"
    );

    let (status, out, err) = run(&["compare", &runs[0], &runs[1]]);
    assert!(status.success(), "{err}");
    let rows: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows[0], ["slow", "fast"], "{out}");
    assert!(rows.contains(&vec!["params.lr", "0.001", "0.1"]), "{out}");
    assert!(rows.contains(&vec!["params.warmup", "-", "10"]), "{out}");
    assert!(rows.contains(&vec!["metrics.loss", "0.7", "0.3"]), "{out}");

    let (status, _, err) = run(&["show", "not-a-run"]);
    assert!(!status.success() && err.contains("is not a run id"), "{err}");
    let (status, _, err) = run(&["list", "--experiment", "nosuch"]);
    assert!(!status.success() && err.contains("no experiment named 'nosuch'"), "{err}");
    let (status, _, err) = run(&["compare", &runs[0]]);
    assert!(!status.success(), "one run is no comparison: {err}");
}

/// `agora runs gc` deletes a deleted run for good — its metrics, its artifacts and the blobs
/// only they used — while a version registered from its files keeps them.
#[tokio::test]
async fn deleted_runs_are_collected_for_good_and_registered_versions_keep_their_files() {
    use reqwest::StatusCode;
    use serde_json::json;
    let (_market, _data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let url = node.url.clone();
    let http = reqwest::Client::new();
    let experiment = mlflow_post(&url, "experiments/create", json!({"name": "gc"})).await["experiment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut runs = Vec::new();
    for name in ["doomed", "kept"] {
        let run =
            mlflow_post(&url, "runs/create", json!({"experiment_id": experiment, "run_name": name})).await;
        let id = run["run"]["info"]["run_id"].as_str().unwrap().to_owned();
        let metrics: Vec<_> = (0..30)
            .map(
                |step| json!({"key": "loss", "value": 1.0 / (step + 1) as f64, "step": step, "timestamp": 1}),
            )
            .collect();
        mlflow_post(&url, "runs/log-batch", json!({"run_id": id, "metrics": metrics})).await;
        runs.push(id);
    }
    let (doomed, kept) = (&runs[0], &runs[1]);
    let artifacts = format!("{url}/api/2.0/mlflow-artifacts/artifacts");
    let weights: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let root = format!("{experiment}/{doomed}/artifacts");
    for (path, bytes) in [
        ("model/MLmodel", b"flavors: {}\n".to_vec()),
        ("model/weights.bin", weights.clone()),
        ("plot.png", b"only the run has this".to_vec()),
    ] {
        let r = http
            .put(format!("{artifacts}/{root}/{path}"))
            .bearer_auth(TOKEN)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    mlflow_post(&url, "registered-models/create", json!({"name": "gc-kept"})).await;
    let version = mlflow_post(
        &url,
        "model-versions/create",
        json!({"name": "gc-kept", "source": format!("mlflow-artifacts:/{root}/model"), "run_id": doomed}),
    )
    .await;
    assert_eq!(version["model_version"]["version"], "1");
    mlflow_post(&url, "runs/delete", json!({"run_id": doomed})).await;

    let env = [("AGORA_ADMIN_TOKEN", TOKEN)];
    let gc = |args: &[&str]| {
        let mut all = vec!["runs", "gc"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--node", &url]);
        agora_e2e::agora(&all, &env)
    };
    // A live run named, or an age the deletion has not reached: refused or nothing, and nothing goes.
    let (status, _, err) = gc(&["--run-ids", &format!("{doomed},{kept}")]);
    assert!(
        !status.success() && err.contains(&format!("Runs [{kept}] are not in the deleted lifecycle stage")),
        "{err}"
    );
    let (status, _, err) = gc(&["--older-than", "soon"]);
    assert!(!status.success() && err.contains("is not an age like 30d"), "{err}");
    let (status, out, err) = gc(&["--older-than", "1d", "--json"]);
    assert!(status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((report["runs"].clone(), report["metric_points"].clone()), (json!([]), json!(0)), "{out}");
    let r = http.post(format!("{url}/api/v1/tracking/gc")).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = http
        .post(format!("{url}/api/v1/tracking/gc"))
        .bearer_auth(TOKEN)
        .json(&json!({"older_than_secs": "a while"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let listing = |path: String| {
        let (http, artifacts) = (http.clone(), artifacts.clone());
        async move {
            let r = http.get(format!("{artifacts}?path={path}")).bearer_auth(TOKEN).send().await.unwrap();
            r.json::<serde_json::Value>().await.unwrap()
        }
    };
    assert!(listing(root.clone()).await["files"].as_array().is_some_and(|f| f.len() == 2));

    let (status, out, err) = gc(&[]);
    assert!(status.success(), "{err}");
    assert!(out.contains(&format!("Run with ID {doomed} has been permanently deleted.")), "{out}");
    assert!(!out.contains(kept.as_str()), "{out}");
    let summary = out.lines().last().unwrap();
    assert!(summary.starts_with("30 metric points and 3 artifact files deleted; 1 blobs"), "{out}");

    let r = http
        .get(format!("{url}/api/2.0/mlflow/runs/get?run_id={doomed}"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(listing(root.clone()).await, json!({}), "the run's artifacts are gone");
    let history =
        mlflow_get(&url, &format!("metrics/get-history?run_id={kept}&metric_key=loss&max_results=100")).await;
    assert_eq!(history["metrics"].as_array().unwrap().len(), 30, "the live run keeps its points");

    // The registered version still downloads what was registered.
    let uri = mlflow_get(&url, "model-versions/get-download-uri?name=gc-kept&version=1").await;
    let dir = uri["artifact_uri"].as_str().unwrap().strip_prefix("mlflow-artifacts:/").unwrap();
    let r = http.get(format!("{artifacts}/{dir}/weights.bin")).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().await.unwrap().as_ref(), weights.as_slice());
    let (status, out, _) = gc(&["--json"]);
    assert!(status.success());
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((report["runs"].clone(), report["blobs"].clone()), (json!([]), json!(0)), "{out}");
}
