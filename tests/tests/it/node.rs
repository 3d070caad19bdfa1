//! `agora contracts deploy` and `agora node` as processes against a real anvil.

use std::time::Duration;

use agora_contracts::{Deployment, anvil::Anvil, anvil::DEV_KEYS};
use agora_e2e::{AgoraProcess, agora, eventually, get_json};
use alloy::primitives::Address;

fn deploy(anvil: &Anvil, out: &std::path::Path) -> Deployment {
    let endpoint = anvil.endpoint();
    let out_str = out.display().to_string();
    let (status, stdout, stderr) = agora(
        &["contracts", "deploy", "--rpc-url", &endpoint, "--fee-bps", "300", "--output", &out_str],
        &[("AGORA_PRIVATE_KEY", DEV_KEYS[0])],
    );
    assert!(status.success(), "deploy failed: {stderr}");
    let printed: Deployment = serde_json::from_str(&stdout).expect("deploy prints the deployment JSON");
    assert_eq!(printed, Deployment::load(out).unwrap(), "the file holds what was printed");
    assert_eq!(printed.fee_bps, 300);
    assert_eq!(printed.treasury, anvil.signer(0).address(), "the deployer is the default treasury");
    printed
}

fn node_env<'a>(anvil_url: &'a str, data: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("AGORA_RPC_URL", anvil_url),
        ("AGORA_DATA_DIR", data),
        ("AGORA_HTTP_ADDR", "127.0.0.1:0"),
        ("AGORA_POLL_MS", "100"),
        ("AGORA_LOG", "info"),
    ]
}

#[tokio::test]
async fn node_serves_health_readiness_metrics_openapi_and_stops_on_sigterm() {
    let anvil = Anvil::spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    let deployment = deploy(&anvil, &data.path().join("deployment.json"));
    let endpoint = anvil.endpoint();
    let data_str = data.path().display().to_string();
    let mut node = AgoraProcess::spawn(&["node"], &node_env(&endpoint, &data_str));
    let base = node.wait_for_url();

    let (status, health) = get_json(&format!("{base}/healthz")).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");

    let ready = eventually("readyz 200", Duration::from_secs(30), || async {
        get_json(&format!("{base}/readyz")).await.filter(|(s, _)| *s == 200).map(|(_, b)| b)
    })
    .await;
    assert_eq!(ready["chain"]["chain_id"], deployment.chain_id);
    assert!(ready["chain"]["head"].as_u64().is_some());

    let metrics = reqwest::get(format!("{base}/metrics")).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("agora_ready 1"), "{metrics}");
    assert!(metrics.contains("agora_chain_head_block"), "{metrics}");
    assert!(metrics.contains("agora_http_requests_total"), "{metrics}");

    let (status, openapi) = get_json(&format!("{base}/openapi.json")).await.unwrap();
    assert_eq!(status, 200);
    for path in [
        "/healthz",
        "/readyz",
        "/metrics",
        "/api/v1/audit/log",
        "/api/v1/deployments/{deployment_id}/traffic",
        "/api/v1/deployments/{deployment_id}/drift",
    ] {
        assert!(openapi["paths"][path].is_object(), "{path} missing from {openapi}");
    }

    // a fresh node's audit log is empty; bad paging is a 400 naming the parameter
    let (status, body) = get_json(&format!("{base}/api/v1/audit/log")).await.unwrap();
    assert_eq!((status, body["entries"].as_array().map(Vec::len)), (200, Some(0)), "{body}");
    let (status, body) = get_json(&format!("{base}/api/v1/audit/log?from=x")).await.unwrap();
    assert_eq!(status, 400);
    assert!(body["error"]["message"].as_str().unwrap().contains("`from`"), "{body}");

    let (status, body) = get_json(&format!("{base}/no/such/thing")).await.unwrap();
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");

    // the chain goes away: the node stays up but is not ready, and says why
    drop(anvil);
    let body = eventually("readyz 503", Duration::from_secs(30), || async {
        get_json(&format!("{base}/readyz")).await.filter(|(s, _)| *s == 503).map(|(_, b)| b)
    })
    .await;
    assert_eq!(body["error"]["code"], "chain_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("not reachable"), "{body}");
    assert_eq!(get_json(&format!("{base}/healthz")).await.unwrap().0, 200);

    let status = node.terminate(Duration::from_secs(15)).expect("the node exits within 15 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}; output:\n{}", node.output());
}

#[tokio::test]
async fn a_node_with_an_operator_wallet_starts_while_the_chain_is_down() {
    // a loopback port nothing listens on
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let data = tempfile::tempdir().unwrap();
    let deployment = Deployment {
        chain_id: 31337,
        model_registry: "0x00000000000000000000000000000000000000aa".parse().unwrap(),
        license_market: "0x00000000000000000000000000000000000000bb".parse().unwrap(),
        deployment_block: 0,
        treasury: Address::ZERO,
        fee_bps: 250,
        challenge_window: 60,
        compute_market: Address::ZERO,
        compute_grace: 0,
    };
    std::fs::write(data.path().join("deployment.json"), serde_json::to_string(&deployment).unwrap()).unwrap();
    let data_str = data.path().display().to_string();
    let mut env = node_env(&endpoint, &data_str);
    env.push(("AGORA_OPERATOR_KEY", DEV_KEYS[3]));
    let mut node = AgoraProcess::spawn(&["node"], &env);
    let base = node.wait_for_url();
    assert_eq!(get_json(&format!("{base}/healthz")).await.unwrap().0, 200);
    let (status, body) = get_json(&format!("{base}/readyz")).await.unwrap();
    assert_eq!((status, body["error"]["code"].as_str()), (503, Some("chain_unavailable")), "{body}");
    let status = node.terminate(Duration::from_secs(15)).expect("the node exits within 15 s of SIGTERM");
    assert!(status.success(), "exit status {status:?}; output:\n{}", node.output());
}

#[tokio::test]
async fn node_without_contract_code_is_not_ready() {
    let anvil = Anvil::spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    let bogus = Deployment {
        chain_id: anvil.chain_id(),
        model_registry: "0x00000000000000000000000000000000000000aa".parse().unwrap(),
        license_market: "0x00000000000000000000000000000000000000bb".parse().unwrap(),
        deployment_block: 0,
        treasury: anvil.signer(0).address(),
        fee_bps: 250,
        challenge_window: 60,
        compute_market: Address::ZERO,
        compute_grace: 0,
    };
    std::fs::write(data.path().join("deployment.json"), serde_json::to_string(&bogus).unwrap()).unwrap();
    let endpoint = anvil.endpoint();
    let data_str = data.path().display().to_string();
    let node = AgoraProcess::spawn(&["node"], &node_env(&endpoint, &data_str));
    let base = node.wait_for_url();
    let body = eventually("readyz 503 naming the missing code", Duration::from_secs(30), || async {
        get_json(&format!("{base}/readyz"))
            .await
            .filter(|(s, b)| {
                *s == 503 && b["error"]["message"].as_str().is_some_and(|m| m.contains("no contract code"))
            })
            .map(|(_, b)| b)
    })
    .await;
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("ModelRegistry") && message.contains("LicenseMarket"), "{message}");
}

#[tokio::test]
async fn node_on_the_wrong_chain_is_not_ready() {
    let anvil = Anvil::builder().arg("--chain-id").arg("777").spawn().unwrap();
    let other = Anvil::spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    deploy(&other, &data.path().join("deployment.json"));
    let endpoint = anvil.endpoint();
    let data_str = data.path().display().to_string();
    let node = AgoraProcess::spawn(&["node"], &node_env(&endpoint, &data_str));
    let base = node.wait_for_url();
    eventually("readyz 503 naming the chain", Duration::from_secs(30), || async {
        get_json(&format!("{base}/readyz")).await.filter(|(s, b)| {
            *s == 503 && b["error"]["message"].as_str().is_some_and(|m| m.contains("chain 777"))
        })
    })
    .await;
}

#[test]
fn bad_setups_fail_with_clear_errors() {
    let data = tempfile::tempdir().unwrap();
    let data_str = data.path().display().to_string();

    // no deployment file
    let (status, _, stderr) =
        agora(&["node"], &[("AGORA_DATA_DIR", &data_str), ("AGORA_HTTP_ADDR", "127.0.0.1:0")]);
    assert!(!status.success());
    assert!(stderr.contains("deployment.json") && stderr.contains("agora contracts deploy"), "{stderr}");

    // a config file with a typo
    let config = data.path().join("agora.toml");
    std::fs::write(&config, "[http]\nadress = \"127.0.0.1:1\"\n").unwrap();
    let config_str = config.display().to_string();
    let (status, _, stderr) = agora(&["--config", &config_str, "node", "--print-config"], &[]);
    assert!(!status.success());
    assert!(stderr.contains("adress"), "{stderr}");

    // a malformed address in the environment
    let (status, _, stderr) = agora(&["node", "--print-config"], &[("AGORA_HTTP_ADDR", "localhost")]);
    assert!(!status.success());
    assert!(stderr.contains("http-addr") || stderr.contains("HTTP_ADDR"), "{stderr}");

    // a bad private key
    let (status, _, stderr) = agora(
        &["contracts", "deploy", "--rpc-url", "http://127.0.0.1:9"],
        &[("AGORA_PRIVATE_KEY", "0xnothex")],
    );
    assert!(!status.success());
    assert!(stderr.contains("private key"), "{stderr}");
}

#[test]
fn print_config_applies_precedence_and_masks_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agora.toml");
    std::fs::write(
        &config,
        "[chain]\nrpc_url = \"https://user:pw@rpc.example/?apikey=s3cret\"\npoll_ms = 500\n[http]\naddr = \"127.0.0.1:9001\"\n",
    )
    .unwrap();
    let config_str = config.display().to_string();
    let (status, stdout, stderr) = agora(
        &["--config", &config_str, "node", "--print-config", "--http-addr", "127.0.0.1:9003"],
        &[("AGORA_HTTP_ADDR", "127.0.0.1:9002"), ("AGORA_POLL_MS", "250")],
    );
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("addr = \"127.0.0.1:9003\""), "flag beats env and file:\n{stdout}");
    assert!(stdout.contains("poll_ms = 250"), "env beats file:\n{stdout}");
    assert!(!stdout.contains("s3cret") && !stdout.contains(":pw@"), "secrets masked:\n{stdout}");
    assert!(stdout.contains("apikey=***"), "{stdout}");
}

#[tokio::test]
async fn busy_port_is_a_clear_error() {
    let anvil = Anvil::spawn().unwrap();
    let data = tempfile::tempdir().unwrap();
    deploy(&anvil, &data.path().join("deployment.json"));
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let endpoint = anvil.endpoint();
    let data_str = data.path().display().to_string();
    let (status, _, stderr) = agora(
        &["node"],
        &[("AGORA_RPC_URL", &endpoint), ("AGORA_DATA_DIR", &data_str), ("AGORA_HTTP_ADDR", &addr)],
    );
    assert!(!status.success());
    assert!(stderr.contains(&addr) && stderr.contains("AGORA_HTTP_ADDR"), "{stderr}");
}
