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
}

impl AuditCommand {
    pub fn run(self, config: &Config) -> anyhow::Result<()> {
        let Self::Log { from, limit, verify, json } = self;
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
