//! `agora dev` (what scripts/dev runs): a local chain, the contracts, a node; a second run
//! reuses the chain state and the deployment.

use std::time::Duration;

use agora_contracts::Deployment;
use agora_e2e::{AgoraProcess, eventually, get_json};

#[tokio::test]
async fn dev_brings_up_chain_and_node_and_restarts_on_the_same_state() {
    let data = tempfile::tempdir().unwrap();
    let data_str = data.path().display().to_string();
    let env =
        [("AGORA_DATA_DIR", data_str.as_str()), ("AGORA_HTTP_ADDR", "127.0.0.1:0"), ("AGORA_POLL_MS", "100")];

    let mut first = AgoraProcess::spawn(&["dev", "--chain-port", "0"], &env);
    first.wait_for_line("deployed the contracts", Duration::from_secs(60));
    let base = first.wait_for_url();
    eventually("readyz 200", Duration::from_secs(30), || async {
        get_json(&format!("{base}/readyz")).await.filter(|(s, _)| *s == 200)
    })
    .await;
    let output = first.output();
    assert!(output.contains("dev accounts"), "{output}");
    assert!(
        output.contains("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"),
        "the first dev account is listed:\n{output}"
    );
    let status = first.terminate(Duration::from_secs(20)).expect("dev exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", first.output());

    let deployment = Deployment::load(&data.path().join("deployment.json")).unwrap();
    assert!(data.path().join("anvil-state.json").is_file(), "the chain's state is kept under the data dir");
    assert!(data.path().join("db").is_dir(), "the node's database is under the data dir");

    let mut second = AgoraProcess::spawn(&["dev", "--chain-port", "0"], &env);
    second.wait_for_line("reusing the deployment", Duration::from_secs(60));
    let base = second.wait_for_url();
    eventually("readyz 200 after restart", Duration::from_secs(30), || async {
        get_json(&format!("{base}/readyz")).await.filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(Deployment::load(&data.path().join("deployment.json")).unwrap(), deployment, "same contracts");
    let status = second.terminate(Duration::from_secs(20)).expect("dev exits on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", second.output());
}
