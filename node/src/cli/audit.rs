//! `agora audit log`: read and verify the audit log of a data dir (alongside a running node).

use anyhow::Context;

use crate::{audit, config::Config, store::Store};

#[derive(clap::Subcommand, Debug)]
pub enum AuditCommand {
    /// Print entries, or with --verify recompute the hash chain and report the first broken link.
    Log {
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        verify: bool,
        #[arg(long)]
        json: bool,
    },
    /// Ask a node which model a suspect file is and which license's copy it came from (the
    /// model's owner, signed in with the wallet, or the operator with AGORA_ADMIN_TOKEN).
    File(FileArgs),
}

#[derive(clap::Args, Debug)]
pub struct FileArgs {
    pub suspect: std::path::PathBuf,
    #[command(flatten)]
    pub wallet: super::wallet::WalletArgs,
    #[command(flatten)]
    pub node: super::model::NodeArgs,
    #[arg(long)]
    pub json: bool,
}

/// `agora audit file`.
pub async fn file(args: FileArgs, config: &Config) -> anyhow::Result<()> {
    let mut node = crate::client::NodeClient::new(&args.node.node)?;
    match &config.registry.admin_token {
        Some(token) => node.token = Some(token.clone()),
        None => {
            node.sign_in(&args.wallet.signer()?).await.context("signing in to the node failed")?;
        }
    }
    let body = tokio::fs::File::open(&args.suspect)
        .await
        .with_context(|| format!("cannot open {}", args.suspect.display()))?;
    let response = node
        .authorize(node.http.post(node.endpoint("/api/v1/audit/trace")))
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::from(body))
        .send()
        .await
        .with_context(|| format!("cannot reach the node at {}", node.url))?;
    let report = crate::client::answer(response).await?;
    if args.json {
        println!("{report}");
        return Ok(());
    }
    if report["identified"] != true {
        println!(
            "no model of this node carries this file's owner mark ({} candidates with its layout tested)",
            report["candidates"]
        );
        return Ok(());
    }
    let evidence = &report["owner_evidence"];
    println!(
        "model: token {} version {} owned by {} (owner mark T {:.1}, p {:.2e}; commitment {})",
        report["token_id"].as_str().unwrap_or("?"),
        report["version"],
        report["owner"].as_str().unwrap_or("?"),
        evidence["t"].as_f64().unwrap_or(0.0),
        evidence["p_value"].as_f64().unwrap_or(1.0),
        report["commitment"].as_str().unwrap_or("?"),
    );
    let accused = report["accused"].as_array().cloned().unwrap_or_default();
    if accused.is_empty() {
        println!("no license of the {} tested is accused", report["licenses_tested"]);
    }
    for a in accused {
        println!(
            "accused: license {} ({}) held by {}, bought in tx {} (block {}); T {:.1} > threshold {:.1}, p {:.2e}",
            a["license_id"].as_str().unwrap_or("?"),
            a["kind"].as_str().unwrap_or("?"),
            a["holder"].as_str().unwrap_or("?"),
            a["purchase_tx"].as_str().unwrap_or("?"),
            a["purchase_block"],
            a["evidence"]["t"].as_f64().unwrap_or(0.0),
            a["evidence"]["threshold"].as_f64().unwrap_or(0.0),
            a["evidence"]["p_value"].as_f64().unwrap_or(1.0),
        );
    }
    Ok(())
}

impl AuditCommand {
    pub fn run(self, config: &Config) -> anyhow::Result<()> {
        let Self::Log { from, limit, verify, json } = self else {
            anyhow::bail!("`agora audit file` runs through `audit::file`");
        };
        let store = Store::open_read_only(&config.db_path())
            .with_context(|| format!("cannot read the database at {}", config.db_path().display()))?;
        if verify {
            let report = audit::verify(&store)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else if let Some(broken) = &report.first_broken {
                println!("audit log BROKEN at entry {}: {}", broken.seq, broken.reason);
            } else {
                println!("audit log intact: {} entries", report.entries);
            }
            if report.first_broken.is_some() {
                std::process::exit(1);
            }
            return Ok(());
        }
        let entries = audit::list(&store, from, limit)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&entries)?);
        } else {
            for e in entries {
                println!(
                    "{:>6} {} {:<20} {:<24} {} {}",
                    e.seq,
                    e.time,
                    e.actor,
                    e.action,
                    e.object,
                    &e.hash[..16]
                );
            }
        }
        Ok(())
    }
}
