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
