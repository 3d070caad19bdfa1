//! `agora artifacts gc` on a data dir: creates the master key once, private, collects, and
//! leaves its runs in the audit log that `agora audit log` reads and verifies.

use std::os::unix::fs::PermissionsExt;

use agora_e2e::agora;

#[test]
fn gc_runs_on_a_data_dir_and_keeps_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_string_lossy().into_owned();
    let (status, stdout, stderr) = agora(&["artifacts", "gc", "--data-dir", &data], &[]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("removed 0 blobs"), "{stdout}");
    let key = dir.path().join("artifacts.key");
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    let first = std::fs::read(&key).unwrap();
    // a leftover of a crashed write that is recent stays; the key is never replaced
    let (status, _, _) = agora(&["artifacts", "gc", "--data-dir", &data], &[]);
    assert!(status.success());
    assert_eq!(std::fs::read(&key).unwrap(), first);
    // both runs are in the audit log, whose chain holds
    let (status, stdout, _) = agora(&["audit", "log", "--data-dir", &data, "--json"], &[]);
    assert!(status.success());
    let entries: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let actions: Vec<&str> =
        entries.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["artifacts.gc", "artifacts.gc"]);
    assert_eq!(entries[1]["prev"], entries[0]["hash"]);
    let (status, stdout, _) = agora(&["audit", "log", "--data-dir", &data, "--verify"], &[]);
    assert!(status.success() && stdout.contains("intact: 2 entries"), "{stdout}");

    std::fs::write(&key, "garbage").unwrap();
    let (status, _, stderr) = agora(&["artifacts", "gc", "--data-dir", &data], &[]);
    assert!(!status.success() && stderr.contains("is not 64 hex characters"), "{stderr}");
}

/// With `--node`, the running node collects its own store: what a deleted upload left goes
/// without stopping the node, and the data dir itself stays closed to a second opener.
#[tokio::test]
async fn gc_runs_in_a_running_node() {
    use super::registry::{TOKEN, start};
    let (_market, data, node) = start(&[("AGORA_ADMIN_TOKEN", TOKEN)]).await;
    let http = reqwest::Client::new();
    let file = format!("{}/api/2.0/mlflow-artifacts/artifacts/uploads/scratch.bin", node.url);
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    assert!(http.put(&file).bearer_auth(TOKEN).body(bytes).send().await.unwrap().status().is_success());
    assert!(http.delete(&file).bearer_auth(TOKEN).send().await.unwrap().status().is_success());

    let url = node.url.clone();
    let data_dir = data.path().to_string_lossy().into_owned();
    let (status, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let (status, _, stderr) = agora(&["artifacts", "gc", "--data-dir", &data_dir], &[]);
        assert!(!status.success() && stderr.contains("or pass --node URL"), "{stderr}");
        let (status, _, stderr) = agora(&["artifacts", "gc", "--node", &url], &[]);
        assert!(!status.success() && stderr.contains("set AGORA_ADMIN_TOKEN"), "{stderr}");
        agora(&["artifacts", "gc", "--node", &url], &[("AGORA_ADMIN_TOKEN", TOKEN)])
    })
    .await
    .unwrap();
    assert!(status.success(), "{stderr}");
    assert!(stdout.starts_with("removed 1 blobs ("), "{stdout}");
    let r = http.post(format!("{}/api/v1/artifacts/gc", node.url)).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let (_, log) = node.get("/api/v1/audit/log?limit=1000").await;
    let entries = log["entries"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "artifacts.gc" && e["object"].as_str().unwrap().starts_with("1 blobs")),
        "{log}"
    );
}
