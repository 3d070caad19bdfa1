//! `agora node`: opens the store, connects to the chain, starts the long-running services and
//! serves the API until a shutdown signal.
//!
//! Services each own their state in one task and stop when the shared shutdown channel flips
//! to `true` (Ctrl-C or SIGTERM): the HTTP server finishes in-flight requests, the chain
//! monitor stops polling, then the store is closed.

use std::time::{Duration, Instant};

use agora_contracts::Deployment;
use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::{api, artifacts, audit::Audit, auth, chain, config::Config, registry::Registry, store::Store};

/// Runs the node until `shutdown` flips to true.
pub async fn run(
    config: Config,
    metrics: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let deployment_path = config.deployment_path();
    let deployment = Deployment::load(&deployment_path).with_context(|| {
        format!(
            "the node needs the contracts' deployment file; create it with `agora contracts deploy --rpc-url URL --private-key KEY > {}` or point AGORA_DEPLOYMENT at it",
            deployment_path.display()
        )
    })?;

    std::fs::create_dir_all(&config.storage.data_dir)
        .with_context(|| format!("cannot create the data directory {}", config.storage.data_dir.display()))?;
    let store = tokio::task::spawn_blocking({
        let path = config.db_path();
        move || Store::open(&path)
    })
    .await??;
    store.bind_deployment(&deployment_id(&deployment))?;
    // The database's lock says no other node uses this data dir: whatever scratch a previous
    // run left (it stopped mid-copy, mid-upload, mid-job) is nobody's now.
    let scratch = config.storage.data_dir.join("tmp");
    match sweep_scratch(&scratch) {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(target: "agora::node", removed = n, dir = %scratch.display(), "removed a previous run's scratch files")
        }
        Err(e) => {
            tracing::warn!(target: "agora::node", error = %e, dir = %scratch.display(), "cannot clear the scratch dir")
        }
    }
    let key = artifacts::load_or_create_key(&config.master_key_path())?;
    let artifacts = artifacts::ArtifactStore::open_url(
        &config.artifacts_url(),
        &config.artifacts_path(),
        key,
        store.clone(),
    )?;
    let mut registry = Registry::new(store.clone(), artifacts.clone(), Audit::new(store.clone()));
    let outbox = crate::registry::webhooks::Outbox::open(store.clone())?;
    let tracking = crate::tracking::Tracking::open(store.clone(), Audit::new(store.clone()))?;
    if !config.registry.webhooks.is_empty() {
        registry = registry.with_outbox(outbox.clone());
    }
    // (without hooks it only clears what hooks that were removed left in the outbox)
    let webhooks_task = tokio::spawn(crate::registry::webhooks::run(
        config.registry.webhooks.clone(),
        outbox,
        shutdown.clone(),
    ));
    let admin_token = match &config.registry.admin_token {
        Some(token) => token.clone(),
        None => {
            let path = config.admin_token_path();
            let token = api::auth::load_or_create_token(&path).with_context(|| {
                format!("cannot read or create the operator token file {}", path.display())
            })?;
            tracing::info!(target: "agora::node", path = %path.display(), "operator token (AGORA_ADMIN_TOKEN unset)");
            token
        }
    };

    let provider = chain::connect(&config.chain.rpc_url).await?;
    let watermark_key = agora_watermark::MasterKey::from_bytes(
        crate::secrets::load_or_create_key(&config.watermark_key_path()).with_context(|| {
            format!("cannot read or create the watermark key {}", config.watermark_key_path().display())
        })?,
    );
    let session_key = crate::secrets::load_or_create_key(&config.session_key_path()).with_context(|| {
        format!("cannot read or create the session key {}", config.session_key_path().display())
    })?;
    // contract wallets sign orders and vouchers (API and gossip) as they sign in
    let wallets = crate::signers::erc1271(provider.clone());
    let signers = crate::signers::Signers::with_contracts(wallets.clone(), tokio::runtime::Handle::current());
    let sessions = auth::Sessions::new(
        session_key,
        deployment.chain_id,
        config.auth.domain.clone(),
        Duration::from_secs(config.auth.session_secs),
    )
    .with_contract_check(wallets);
    let provider_for_api = provider.clone();
    let watermark_key = std::sync::Arc::new(watermark_key);
    let node_key = crate::secrets::load_or_create_key(&config.node_key_path()).with_context(|| {
        format!("cannot read or create the node key {}", config.node_key_path().display())
    })?;
    let delivery = crate::market::delivery::Delivery::new(
        store.clone(),
        artifacts.clone(),
        watermark_key.clone(),
        node_key,
        config.storage.data_dir.join("tmp"),
        config.registry.copy_cache,
    );
    let (monitor, chain_health) = chain::ChainMonitor::new(
        provider.clone(),
        deployment.clone(),
        Duration::from_millis(config.chain.poll_ms),
    );
    let first = monitor.check_now().await;
    if let Some(problem) = &first.problem {
        tracing::warn!(target: "agora::node", %problem, "starting unready; the chain is checked again every {} ms", config.chain.poll_ms);
    }
    let monitor_task = tokio::spawn(monitor.run(shutdown.clone()));
    let (indexer, index_status) = chain::indexer::Indexer::new(
        provider,
        deployment.clone(),
        store.clone(),
        config.indexer(),
        config.rpc_is_websocket(),
    )?;
    let indexer_task = tokio::spawn(indexer.run(shutdown.clone()));
    let operator = match &config.settle.operator_key {
        Some(key) => {
            Some(chain::operator::Operator::connect(key, &config.chain.rpc_url, config.fee_policy()?).await?)
        }
        None => None,
    };
    let balance_task = operator.clone().map(|op| {
        let every = Duration::from_millis(config.chain.poll_ms.saturating_mul(20))
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        tokio::spawn(op.watch_balance(every, shutdown.clone()))
    });
    let settle_failures = crate::serve::settle::Failures::default();
    let settle_task = match &operator {
        Some(op) => {
            tracing::info!(target: "agora::node", operator = %op.signer.address(), "settling usage vouchers");
            let operator = op.clone();
            let settle = crate::serve::settle::SettleConfig {
                min_wei: config.settle.min_wei.parse().unwrap_or_default(),
                interval: Duration::from_secs(config.settle.interval_secs),
                poll: Duration::from_millis(config.chain.poll_ms),
            };
            Some(tokio::spawn(crate::serve::settle::run(
                store.clone(),
                operator,
                deployment.license_market,
                settle,
                settle_failures.clone(),
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let copies_task = config.registry.copy_ahead.then(|| {
        tokio::spawn(
            delivery
                .clone()
                .prepare_on_purchase(Duration::from_millis(config.chain.poll_ms), shutdown.clone()),
        )
    });

    let (p2p, p2p_task) = if config.p2p.enabled {
        let p2p_config =
            crate::p2p::P2pConfig { net: config.p2p_net()?, roots_every: config.p2p.roots_every };
        let (p2p, task) = crate::p2p::P2p::start(
            node_key,
            p2p_config,
            store.clone(),
            artifacts.clone(),
            deployment.clone(),
            provider_for_api.clone(),
            signers.clone(),
            index_status.clone(),
            &config.storage.data_dir,
            shutdown.clone(),
        )?;
        tracing::info!(target: "agora::node", peer_id = %p2p.net().peer_id, "joined the peer-to-peer network");
        (Some(p2p), Some(task))
    } else {
        (None, None)
    };

    let serve = crate::serve::Serve::new(
        store.clone(),
        registry.clone(),
        artifacts.clone(),
        config.storage.data_dir.join("tmp"),
        config.registry.model_cache,
    );
    let compute = crate::compute::Compute::new(
        store.clone(),
        deployment.clone(),
        index_status.clone(),
        registry.clone(),
        p2p.clone(),
        operator.clone(),
        config.compute.clone(),
    )
    .with_training(config.storage.data_dir.join("tmp"), watermark_key.clone())
    .with_serve(serve.clone())
    .with_tracking(tracking.clone());
    let (job_tx, job_rx) = tokio::sync::mpsc::channel(256);
    if let Some(p2p) = &p2p {
        p2p.set_job_handler(job_tx);
    }
    let jobs_task = tokio::spawn(compute.clone().run_jobs(job_rx, shutdown.clone()));
    if !deployment.has_compute() {
        tracing::warn!(target: "agora::node", "the deployment file names no ComputeMarket: compute brokering is off (deploy the contracts again to turn it on)");
    }
    let provider_task = tokio::spawn(compute.clone().run_provider(shutdown.clone()));

    let probe_task = tokio::spawn(serve.clone().probe_upstreams(Duration::from_secs(5), shutdown.clone()));

    let listener = api::bind(config.http.addr).await?;
    let local = listener.local_addr()?;
    let router = api::router(api::AppState::new(api::Shared {
        chain: chain_health,
        index: index_status,
        store: store.clone(),
        deployment: deployment.clone(),
        ready_max_lag: config.chain.ready_max_lag,
        metrics,
        started: Instant::now(),
        registry: registry.clone(),
        tracking,
        auth: api::auth::Auth::new(&admin_token, config.registry.private),
        sessions,
        provider: provider_for_api,
        watermark_key: watermark_key.clone(),
        delivery: delivery.clone(),
        trace_limiter: Default::default(),
        meter: crate::serve::metering::Meter::start(
            store.clone(),
            crate::serve::metering::VoucherDomain::new(deployment.chain_id, deployment.license_market),
        )?,
        signers,
        settle_failures,
        operator: operator.clone(),
        serve: serve.clone(),
        data_dir: config.storage.data_dir.clone(),
        max_upload: config.registry.max_upload,
        p2p,
        compute,
    }));
    tracing::info!(target: "agora::node", %local, chain_id = deployment.chain_id, registry = %deployment.model_registry, market = %deployment.license_market, "node started");
    // A plain line on stdout, for people and for scripts that start the node on port 0.
    println!("agora node: listening on http://{local}");

    api::serve(listener, router, shutdown).await.context("the HTTP server failed")?;
    let _ = monitor_task.await;
    let _ = indexer_task.await;
    if let Some(task) = copies_task {
        let _ = task.await;
    }
    let _ = probe_task.await;
    if let Some(task) = balance_task {
        let _ = task.await;
    }
    let _ = webhooks_task.await;
    let _ = provider_task.await;
    let _ = jobs_task.await;
    if let Some(task) = p2p_task {
        let _ = task.await;
    }
    if let Some(task) = settle_task {
        let _ = task.await;
    }
    drop(store);
    tracing::info!(target: "agora::node", "node stopped");
    Ok(())
}

/// Identifies a deployment in the store's metadata.
pub fn deployment_id(deployment: &Deployment) -> String {
    let mut id =
        format!("{}:{}:{}", deployment.chain_id, deployment.model_registry, deployment.license_market);
    if deployment.has_compute() {
        id.push_str(&format!(":{}", deployment.compute_market));
    }
    id
}

/// A channel that flips to `true` on Ctrl-C or SIGTERM.
pub fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on unix");
        tokio::select! {
            _ = ctrl_c => tracing::info!(target: "agora::node", "Ctrl-C: shutting down"),
            _ = term.recv() => tracing::info!(target: "agora::node", "SIGTERM: shutting down"),
        }
        let _ = tx.send(true);
    });
    rx
}

/// Removes everything under the node's scratch dir but `p2p/`, where interrupted blob fetches
/// resume from their checked part files. Scratch files are decrypted originals, copies being
/// made, uploads and training work dirs, all named at random and never reopened by name, so
/// a previous run's are of no use and some are plaintext the artifact store keeps encrypted.
/// Returns how many entries were removed.
fn sweep_scratch(dir: &std::path::Path) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        if entry.file_name() == "p2p" {
            continue;
        }
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_previous_runs_scratch_goes_and_resumable_fetches_stay() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("tmp");
        assert_eq!(super::sweep_scratch(&tmp).unwrap(), 0, "no scratch dir yet");
        std::fs::create_dir_all(tmp.join("p2p")).unwrap();
        std::fs::create_dir_all(tmp.join("job-1a2b/out")).unwrap();
        for name in ["copy-x1", "original-y2", "p2p/abcd.part", "job-1a2b/out/weights.safetensors"] {
            std::fs::write(tmp.join(name), b"left behind").unwrap();
        }
        assert_eq!(super::sweep_scratch(&tmp).unwrap(), 3);
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["p2p"]);
        assert_eq!(std::fs::read(tmp.join("p2p/abcd.part")).unwrap(), b"left behind");
        assert_eq!(super::sweep_scratch(&tmp).unwrap(), 0, "twice is harmless");
    }
}
