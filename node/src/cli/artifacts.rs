//! `agora artifacts`: maintenance of the artifact store of a stopped node's data dir.

use anyhow::Context;

use crate::{
    artifacts::{ArtifactStore, load_or_create_key},
    audit::Audit,
    config::Config,
    store::Store,
};

#[derive(clap::Subcommand, Debug)]
pub enum ArtifactsCommand {
    /// Delete blobs nothing references, files no record knows, and leftovers of crashed writes.
    Gc,
}

impl ArtifactsCommand {
    pub fn run(self, config: &Config) -> anyhow::Result<()> {
        match self {
            Self::Gc => {
                let store = Store::open(&config.db_path()).with_context(|| {
                    format!(
                        "cannot open {} (stop the node that uses this data dir first)",
                        config.db_path().display()
                    )
                })?;
                let key = load_or_create_key(&config.master_key_path())?;
                let artifacts = ArtifactStore::open_url(
                    &config.artifacts_url(),
                    &config.artifacts_path(),
                    key,
                    store.clone(),
                )?;
                let report = artifacts.gc()?;
                let actor = format!("cli:{}", std::env::var("USER").unwrap_or_else(|_| "unknown".into()));
                let summary = format!(
                    "{} blobs, {} bytes, {} partial files",
                    report.blobs, report.bytes, report.partial_files
                );
                Audit::new(store).record(&actor, "artifacts.gc", &summary, None)?;
                println!(
                    "removed {} blobs ({} bytes) and {} leftover partial files",
                    report.blobs, report.bytes, report.partial_files
                );
                Ok(())
            }
        }
    }
}
