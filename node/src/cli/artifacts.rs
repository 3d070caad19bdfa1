//! `agora artifacts`: maintenance of the artifact store, of a stopped node's data dir or through
//! a running node.

use anyhow::Context;

use crate::{
    artifacts::{ArtifactStore, GcReport, load_or_create_key},
    audit::Audit,
    client::NodeClient,
    config::Config,
    store::Store,
};

#[derive(clap::Subcommand, Debug)]
pub enum ArtifactsCommand {
    /// Delete blobs nothing references, files no record knows, and leftovers of crashed writes:
    /// in a stopped node's data dir, or with --node, in the running node (operator token).
    Gc {
        /// The running node to ask (`AGORA_ADMIN_TOKEN` is its operator token); without it,
        /// the data dir is opened directly, which needs the node stopped.
        #[arg(long)]
        node: Option<String>,
    },
}

impl ArtifactsCommand {
    pub async fn run(self, config: Config) -> anyhow::Result<()> {
        match self {
            Self::Gc { node: Some(url) } => {
                let mut client = NodeClient::new(&url)?;
                client.token = Some(config.registry.admin_token.clone().context(
                    "collecting a running node's artifacts needs its operator token: set AGORA_ADMIN_TOKEN",
                )?);
                let answer = client.post_json("/api/v1/artifacts/gc", &serde_json::json!({})).await?;
                let report: GcReport =
                    serde_json::from_value(answer).context("the node's answer is not a report")?;
                print_report(&report);
                Ok(())
            }
            Self::Gc { node: None } => tokio::task::spawn_blocking(move || offline(&config)).await?,
        }
    }
}

fn print_report(report: &GcReport) {
    println!(
        "removed {} blobs ({} bytes) and {} leftover partial files",
        report.blobs, report.bytes, report.partial_files
    );
}

/// Collects the artifact store of a stopped node's data dir.
fn offline(config: &Config) -> anyhow::Result<()> {
    let store = Store::open(&config.db_path()).with_context(|| {
        format!(
            "cannot open {} (stop the node that uses this data dir first, or pass --node URL)",
            config.db_path().display()
        )
    })?;
    let key = load_or_create_key(&config.master_key_path())?;
    let artifacts =
        ArtifactStore::open_url(&config.artifacts_url(), &config.artifacts_path(), key, store.clone())?;
    let report = artifacts.gc()?;
    let actor = format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
    let summary =
        format!("{} blobs, {} bytes, {} partial files", report.blobs, report.bytes, report.partial_files);
    Audit::new(store).record(&actor, "artifacts.gc", &summary, None)?;
    print_report(&report);
    Ok(())
}
