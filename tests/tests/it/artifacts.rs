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
