//! `agora watermark`: keys, embedding, owner verification and license tracing on files.

use std::{
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use agora_watermark::{Evidence, MasterKey, ModelKey, Options, Subject};
use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(clap::Subcommand, Debug)]
pub enum WatermarkCommand {
    /// Write a new master key file (32 random bytes, hex, mode 0600).
    Keygen {
        /// Where to write it; an existing file is never overwritten.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Write a marked copy of a safetensors file: the owner mark, and a license's fingerprint.
    Embed {
        input: PathBuf,
        output: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// License id whose fingerprint goes on half B.
        #[arg(long)]
        license: Option<u128>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Is FILE marked with this key's owner mark? Against the original when given (non-blind),
    /// otherwise blind (the original's blake3 is still needed to derive the model key).
    Verify {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        original: Option<PathBuf>,
        /// blake3 of the original file (hex), for blind verification without it.
        #[arg(long, conflicts_with = "original")]
        original_hash: Option<String>,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Which licenses does FILE carry the fingerprint of?
    Trace {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        original: PathBuf,
        /// Ids to test: ranges and lists (`1-5000`, `3,7,10-20`) or a file with one id per line.
        #[arg(long)]
        licenses: String,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print machine-readable JSON.
    #[arg(long)]
    json: bool,
}

impl WatermarkCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Keygen { output } => keygen(&output),
            Self::Embed { input, output, key, license, run } => {
                let master = read_key(&key)?;
                let original_hash = file_hash(&input)?;
                let model = master.model_key(&original_hash);
                let license_key = license.map(|id| model.license(id));
                let bar = progress(run.json);
                let options = Options {
                    threads: run.threads,
                    progress: Some(Box::new({
                        let bar = bar.clone();
                        move |done, total| {
                            bar.set_length(total);
                            bar.set_position(done);
                        }
                    })),
                    source_ready: None,
                };
                let report = agora_watermark::embed(&input, &output, &model, license_key.as_ref(), &options)?;
                bar.finish_and_clear();
                let commitment = agora_watermark::commitment(&master, &original_hash);
                if run.json {
                    let mut value = serde_json::to_value(&report)?;
                    value["commitment"] = hex(&commitment).into();
                    value["original_blake3"] = hex(&original_hash).into();
                    value["license"] = license.map(|id| id.to_string()).into();
                    println!("{}", serde_json::to_string_pretty(&value)?);
                } else {
                    println!(
                        "wrote {} ({} bytes, blake3 {})",
                        output.display(),
                        report.bytes,
                        report.output_blake3
                    );
                    println!(
                        "marked {} tensors: {} weights with the owner mark, {} with {}",
                        report.marked_tensors,
                        report.owner_weights,
                        report.license_weights,
                        license
                            .map_or("no fingerprint".to_owned(), |id| format!("license {id}'s fingerprint"))
                    );
                    println!("commitment {}", hex(&commitment));
                }
                Ok(())
            }
            Self::Verify { file, key, original, original_hash, run } => {
                let master = read_key(&key)?;
                let hash = match (&original, original_hash) {
                    (Some(original), _) => file_hash(original)?,
                    (None, Some(hash)) => parse_hash(&hash)?,
                    (None, None) => bail!(
                        "verify needs the original (--original FILE) or, for blind verification, its blake3 \
                         (--original-hash HEX): the model key is derived from it"
                    ),
                };
                let model = master.model_key(&hash);
                let evidence = agora_watermark::verify_owner(
                    &file,
                    original.as_deref(),
                    &model,
                    &Options::threads(run.threads),
                )?;
                if run.json {
                    println!("{}", serde_json::to_string_pretty(&evidence)?);
                } else {
                    print_evidence(&evidence);
                }
                Ok(())
            }
            Self::Trace { file, key, original, licenses, run } => {
                let master = read_key(&key)?;
                let model = model_key(&master, &original)?;
                let ids = parse_licenses(&licenses)?;
                let evidence =
                    agora_watermark::trace(&file, &original, &model, &ids, &Options::threads(run.threads))?;
                let accused: Vec<&Evidence> = evidence.iter().filter(|e| e.verdict).collect();
                if run.json {
                    let best = evidence.iter().max_by(|a, b| a.t.total_cmp(&b.t));
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&serde_json::json!({
                            "tested": ids.len(),
                            "threshold": evidence.first().map(|e| e.threshold),
                            "accused": accused,
                            "highest": best,
                        }))?
                    );
                } else if accused.is_empty() {
                    let best = evidence.iter().map(|e| e.t).fold(f64::NEG_INFINITY, f64::max);
                    println!(
                        "no license accused among {} tested (highest T {best:.2}, threshold {:.2})",
                        ids.len(),
                        evidence.first().map_or(0.0, |e| e.threshold)
                    );
                } else {
                    println!("{} of {} licenses accused:", accused.len(), ids.len());
                    for evidence in accused {
                        print_evidence(evidence);
                    }
                }
                Ok(())
            }
        }
    }
}

fn keygen(output: &Path) -> anyhow::Result<()> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("no randomness from the operating system: {e}"))?;
    let mut file =
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(output).with_context(
            || format!("cannot create {} (an existing key file is never overwritten)", output.display()),
        )?;
    writeln!(file, "{}", hex(&bytes))?;
    file.sync_all()?;
    println!("wrote a new watermark master key to {}", output.display());
    Ok(())
}

pub fn read_key(path: &Path) -> anyhow::Result<MasterKey> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    MasterKey::from_hex(&text).with_context(|| format!("{} is not a watermark key file", path.display()))
}

fn model_key(master: &MasterKey, original: &Path) -> anyhow::Result<ModelKey> {
    Ok(master.model_key(&file_hash(original)?))
}

fn file_hash(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap_rayon(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(*hasher.finalize().as_bytes())
}

fn parse_hash(text: &str) -> anyhow::Result<[u8; 32]> {
    let hash = blake3::Hash::from_hex(text.trim().trim_start_matches("0x"))
        .map_err(|_| anyhow::anyhow!("--original-hash must be 64 hex characters (a blake3 hash)"))?;
    Ok(*hash.as_bytes())
}

/// `1-5000`, `3,7,10-20`, or a file with one id (or range) per line.
pub fn parse_licenses(spec: &str) -> anyhow::Result<Vec<u128>> {
    let text = if Path::new(spec).is_file() {
        std::fs::read_to_string(spec).with_context(|| format!("cannot read {spec}"))?
    } else {
        spec.to_owned()
    };
    let mut ids = Vec::new();
    for part in text.split([',', '\n']).map(str::trim).filter(|p| !p.is_empty() && !p.starts_with('#')) {
        let parse = |s: &str| {
            s.trim().parse::<u128>().map_err(|_| anyhow::anyhow!("`{s}` in --licenses is not a license id"))
        };
        match part.split_once('-') {
            Some((from, to)) => {
                let (from, to) = (parse(from)?, parse(to)?);
                if from > to || to - from >= 10_000_000 {
                    bail!("the range `{part}` in --licenses is empty or larger than 10,000,000 ids");
                }
                ids.extend(from..=to);
            }
            None => ids.push(parse(part)?),
        }
    }
    if ids.is_empty() {
        bail!("--licenses names no license id");
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

fn print_evidence(evidence: &Evidence) {
    let who = match &evidence.subject {
        Subject::Owner => "owner mark".to_owned(),
        Subject::License(id) => format!("license {id}"),
    };
    let verdict = if evidence.verdict { "PRESENT" } else { "not found" };
    println!(
        "{who}: {verdict}  T {:.2} (threshold {:.2}), p {:.2e}, n {}, {:?}",
        evidence.t, evidence.threshold, evidence.p_value, evidence.n, evidence.mode
    );
    for statistic in &evidence.statistics {
        println!("  {:<18} z {:>10.2}  n {}", statistic.name, statistic.z, statistic.n);
    }
    if !evidence.aligned_tensors.is_empty() {
        println!("  aligned first: {}", evidence.aligned_tensors.join(", "));
    }
    if !evidence.missing_tensors.is_empty() {
        println!("  missing from the file: {}", evidence.missing_tensors.join(", "));
    }
}

fn progress(hidden: bool) -> ProgressBar {
    if hidden {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {bytes}/{total_bytes} {wide_bar} {bytes_per_sec} eta {eta}")
            .expect("a valid template"),
    );
    bar
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn license_specs() {
        assert_eq!(parse_licenses("1-3,7, 5").unwrap(), vec![1, 2, 3, 5, 7]);
        assert_eq!(parse_licenses("42").unwrap(), vec![42]);
        assert!(parse_licenses("5-1").is_err());
        assert!(parse_licenses("x").unwrap_err().to_string().contains("`x`"));
        assert!(parse_licenses("").is_err());
        assert!(parse_licenses("1-100000000").is_err());
    }
}
