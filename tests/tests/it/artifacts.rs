//! `agora artifacts gc` on a data dir: creates the master key once, private, and collects.

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
    std::fs::write(&key, "garbage").unwrap();
    let (status, _, stderr) = agora(&["artifacts", "gc", "--data-dir", &data], &[]);
    assert!(!status.success() && stderr.contains("is not 64 hex characters"), "{stderr}");
}
