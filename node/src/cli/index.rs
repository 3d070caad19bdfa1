//! `agora index …`: the index's identity (block, hash, state root), and rebuilding it from
//! the chain, for auditors and tests.

use std::path::PathBuf;

use agora_contracts::Deployment;
use alloy::primitives::B256;
use anyhow::Context;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::{
    chain::{self, indexer::Indexer, writer},
    config::Config,
    node::deployment_id,
    store::Store,
};

#[derive(Subcommand, Debug)]
pub enum IndexCommand {
    /// Print {block, hash, state_root} of a node's index (its data dir, or its API with --node).
    Root(RootArgs),
    /// Build a fresh index from the chain and print {block, hash, state_root}.
    Rebuild(RebuildArgs),
}

#[derive(Args, Debug)]
pub struct RootArgs {
    /// Ask a running node's API instead of reading the data dir.
    #[arg(long)]
    pub node: Option<String>,
}

#[derive(Args, Debug)]
pub struct RebuildArgs {
    /// Stop at this block [default: the chain's head].
    #[arg(long)]
    pub to_block: Option<u64>,
}

/// What both commands print.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRoot {
    pub block: Option<u64>,
    pub hash: Option<B256>,
    pub state_root: B256,
}

impl IndexCommand {
    pub async fn run(self, config: &Config, data_dir_given: bool) -> anyhow::Result<()> {
        let root = match self {
            Self::Root(args) => match args.node {
                Some(url) => root_from_api(&url).await?,
                None => root_from_dir(config)?,
            },
            Self::Rebuild(args) => rebuild(config, data_dir_given, args.to_block).await?,
        };
        println!("{}", serde_json::to_string(&root)?);
        Ok(())
    }
}

async fn root_from_api(url: &str) -> anyhow::Result<IndexRoot> {
    let status: serde_json::Value =
        reqwest::get(format!("{}/api/v1/chain/status", url.trim_end_matches('/')))
            .await
            .with_context(|| format!("cannot reach the node at {url}"))?
            .error_for_status()?
            .json()
            .await?;
    Ok(IndexRoot {
        block: status["as_of"]["block"].as_u64(),
        hash: status["as_of"]["hash"].as_str().map(str::parse).transpose()?,
        state_root: status["state_root"].as_str().context("the node's answer has no state_root")?.parse()?,
    })
}

fn root_from_dir(config: &Config) -> anyhow::Result<IndexRoot> {
    let path = config.db_path();
    if !path.exists() {
        anyhow::bail!("no index at {}; start a node with this --data-dir, or use --node URL", path.display());
    }
    let store = Store::open_read_only(&path)?;
    let cursor = writer::load_cursor(&store)?;
    Ok(IndexRoot {
        block: cursor.map(|c| c.number),
        hash: cursor.map(|c| c.hash),
        state_root: writer::load_root(&store)?.digest(),
    })
}

async fn rebuild(config: &Config, data_dir_given: bool, to_block: Option<u64>) -> anyhow::Result<IndexRoot> {
    let deployment_path = config.deployment_path();
    let deployment = Deployment::load(&deployment_path)?;
    let (dir, _temp): (PathBuf, Option<tempfile::TempDir>) = if data_dir_given {
        let path = config.db_path();
        if path.exists() {
            anyhow::bail!("{} already holds an index; rebuild into an empty --data-dir", path.display());
        }
        (path, None)
    } else {
        let temp = tempfile::tempdir().context("cannot create a temporary directory")?;
        (temp.path().join("db"), Some(temp))
    };
    let store = Store::open(&dir)?;
    store.bind_deployment(&deployment_id(&deployment))?;
    let provider = chain::connect(&config.chain.rpc_url).await?;
    let mut indexer_config = config.indexer();
    indexer_config.to_block = Some(match to_block {
        Some(n) => n,
        None => alloy::providers::Provider::get_block_number(&provider)
            .await
            .context("the chain RPC is not reachable")?,
    });
    let (mut indexer, _status) = Indexer::new(provider, deployment, store.clone(), indexer_config, false)?;
    let cursor = indexer.sync().await?;
    Ok(IndexRoot {
        block: cursor.map(|c| c.number),
        hash: cursor.map(|c| c.hash),
        state_root: writer::load_root(&store)?.digest(),
    })
}
