//! `agora wallet …`: keys in encrypted keystore files (Web3 Secret Storage, the format geth and
//! MetaMask export) under `~/.agora/keystore` (or `AGORA_KEYSTORE`). The password comes from
//! `AGORA_WALLET_PASSWORD` or a prompt; the private key never leaves this process.
//!
//! [`WalletArgs`] is how every command that signs picks its key: `--private-key` /
//! `AGORA_PRIVATE_KEY` (scripts, dev), else `--wallet NAME|ADDRESS` / `AGORA_WALLET`, else the
//! only keystore there is.

use std::path::{Path, PathBuf};

use alloy::{primitives::Address, signers::local::PrivateKeySigner};
use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum WalletCommand {
    /// Create a new key in an encrypted keystore file.
    New {
        /// File name in the keystore directory [default: geth's UTC--<time>--<address>].
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        keystore: KeystoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// Import a raw private key (`--private-key` / AGORA_PRIVATE_KEY) or an existing keystore file.
    Import {
        /// A keystore file (geth, MetaMask, ...) to copy in; its password must open it.
        #[arg(long)]
        file: Option<PathBuf>,
        /// A raw hex key to encrypt into a new keystore file.
        #[arg(long, env = "AGORA_PRIVATE_KEY", hide_env_values = true)]
        private_key: Option<String>,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        keystore: KeystoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// The keystore files and their addresses.
    List {
        #[command(flatten)]
        keystore: KeystoreArgs,
        #[arg(long)]
        json: bool,
    },
    /// The address of the wallet the other commands would use.
    Address {
        #[command(flatten)]
        wallet: WalletArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug, Clone, Default)]
pub struct KeystoreArgs {
    /// Keystore directory [default: ~/.agora/keystore].
    #[arg(long, env = "AGORA_KEYSTORE")]
    pub keystore: Option<PathBuf>,
}

impl KeystoreArgs {
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        match &self.keystore {
            Some(dir) => Ok(dir.clone()),
            None => {
                let home =
                    std::env::var_os("HOME").context("HOME is not set; give --keystore or AGORA_KEYSTORE")?;
                Ok(PathBuf::from(home).join(".agora/keystore"))
            }
        }
    }
}

/// Which key signs.
#[derive(Args, Debug, Clone, Default)]
pub struct WalletArgs {
    /// Raw hex private key (scripts and dev); beats --wallet.
    #[arg(long, env = "AGORA_PRIVATE_KEY", hide_env_values = true)]
    pub private_key: Option<String>,
    /// Keystore file name or address [default: the only keystore file].
    #[arg(long, env = "AGORA_WALLET")]
    pub wallet: Option<String>,
    #[command(flatten)]
    pub keystore: KeystoreArgs,
}

impl WalletArgs {
    /// The signer, decrypting its keystore (password from AGORA_WALLET_PASSWORD or a prompt).
    fn raw_key(&self) -> Option<&str> {
        self.private_key.as_deref().filter(|k| !k.trim().is_empty())
    }

    pub fn signer(&self) -> anyhow::Result<PrivateKeySigner> {
        if let Some(key) = self.raw_key() {
            return parse_key(key);
        }
        let (path, _) = self.keystore_file()?;
        let password = password(&format!("password for {}: ", path.display()))?;
        PrivateKeySigner::decrypt_keystore(&path, password)
            .map_err(|e| anyhow::anyhow!("cannot open {} (wrong password?): {e}", path.display()))
    }

    /// The address, without decrypting anything when it can.
    pub fn address(&self) -> anyhow::Result<Address> {
        if let Some(key) = self.raw_key() {
            return Ok(parse_key(key)?.address());
        }
        let (path, address) = self.keystore_file()?;
        match address {
            Some(address) => Ok(address),
            None => Ok(self
                .signer()
                .with_context(|| format!("{} does not say its address", path.display()))?
                .address()),
        }
    }

    fn keystore_file(&self) -> anyhow::Result<(PathBuf, Option<Address>)> {
        let dir = self.keystore.dir()?;
        let files = list(&dir)?;
        let chosen = match &self.wallet {
            Some(wanted) => {
                let by_address = wanted.parse::<Address>().ok();
                files.into_iter().find(|(path, address)| {
                    path.file_name().is_some_and(|n| n.to_string_lossy() == *wanted)
                        || (by_address.is_some() && *address == by_address)
                })
            }
            None if files.len() == 1 => files.into_iter().next(),
            None if files.is_empty() => {
                bail!(
                    "no wallet in {}; create one with `agora wallet new`, import one, or pass --private-key",
                    dir.display()
                )
            }
            None => bail!(
                "{} holds {} wallets; choose one with --wallet NAME|ADDRESS (see `agora wallet list`)",
                dir.display(),
                files.len()
            ),
        };
        chosen.ok_or_else(|| {
            anyhow::anyhow!("no wallet {:?} in {}", self.wallet.as_deref().unwrap_or(""), dir.display())
        })
    }
}

fn parse_key(key: &str) -> anyhow::Result<PrivateKeySigner> {
    key.trim()
        .parse::<PrivateKeySigner>()
        .map_err(|_| anyhow::anyhow!("the private key is not 32 bytes of hex"))
}

/// AGORA_WALLET_PASSWORD, or a prompt on the terminal.
fn password(prompt: &str) -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("AGORA_WALLET_PASSWORD") {
        return Ok(password);
    }
    rpassword::prompt_password(prompt)
        .context("cannot read a password (no terminal?); set AGORA_WALLET_PASSWORD")
}

fn new_password() -> anyhow::Result<String> {
    if let Ok(password) = std::env::var("AGORA_WALLET_PASSWORD") {
        return Ok(password);
    }
    let first = password("new wallet password: ")?;
    let again = password("again: ")?;
    if first != again {
        bail!("the passwords differ");
    }
    Ok(first)
}

/// Keystore files in `dir` with the address each says it holds.
fn list(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Option<Address>)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if !path.is_file() {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else { continue };
        let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        if json.get("crypto").or(json.get("Crypto")).is_none() {
            continue;
        }
        let address =
            json["address"].as_str().and_then(|a| format!("0x{}", a.trim_start_matches("0x")).parse().ok());
        files.push((path, address));
    }
    files.sort();
    Ok(files)
}

fn default_name(address: Address) -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "UTC--{:04}-{:02}-{:02}T{:02}-{:02}-{:02}.{:09}Z--{}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.nanosecond(),
        alloy::primitives::hex::encode(address)
    )
}

fn create_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

fn report(json_out: bool, address: Address, file: &Path, verb: &str) {
    if json_out {
        println!("{}", json!({"address": address.to_checksum(None), "file": file}));
    } else {
        println!("{verb} wallet {} in {}", address.to_checksum(None), file.display());
    }
}

/// Writes `key` encrypted under a new password as `name` in `dir` (never over an existing file).
fn store(dir: &Path, key: &[u8], name: Option<String>) -> anyhow::Result<(Address, PathBuf)> {
    create_dir(dir)?;
    let address = PrivateKeySigner::from_slice(key).context("not a valid secp256k1 key")?.address();
    let name = name.unwrap_or_else(|| default_name(address));
    let path = dir.join(&name);
    if path.exists() {
        bail!("{} exists; choose another --name", path.display());
    }
    let password = new_password()?;
    PrivateKeySigner::encrypt_keystore(
        dir,
        &mut alloy::signers::k256::elliptic_curve::rand_core::OsRng,
        key,
        password,
        Some(&name),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    restrict(&path)?;
    Ok((address, path))
}

fn restrict(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

impl WalletCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::New { name, keystore, json } => {
                let dir = keystore.dir()?;
                let key = PrivateKeySigner::random().to_bytes();
                let (address, path) = store(&dir, key.as_slice(), name)?;
                report(json, address, &path, "created");
            }
            Self::Import { file, private_key, name, keystore, json } => {
                let dir = keystore.dir()?;
                let private_key = private_key.filter(|k| !k.trim().is_empty());
                if file.is_some() && private_key.is_some() {
                    bail!(
                        "give --file or --private-key, not both (AGORA_PRIVATE_KEY counts as --private-key)"
                    );
                }
                match (file, private_key) {
                    (Some(file), _) => {
                        let password = password(&format!("password of {}: ", file.display()))?;
                        let signer = PrivateKeySigner::decrypt_keystore(&file, &password).map_err(|e| {
                            anyhow::anyhow!("cannot open {} with that password: {e}", file.display())
                        })?;
                        create_dir(&dir)?;
                        let name = name
                            .or_else(|| file.file_name().map(|n| n.to_string_lossy().into_owned()))
                            .unwrap_or_else(|| default_name(signer.address()));
                        let target = dir.join(name);
                        if target.exists() {
                            bail!("{} exists; choose another --name", target.display());
                        }
                        std::fs::copy(&file, &target)
                            .with_context(|| format!("cannot copy to {}", target.display()))?;
                        restrict(&target)?;
                        report(json, signer.address(), &target, "imported");
                    }
                    (None, Some(key)) => {
                        let signer = parse_key(&key)?;
                        let (address, path) = store(&dir, signer.to_bytes().as_slice(), name)?;
                        report(json, address, &path, "imported");
                    }
                    (None, None) => bail!("give --file KEYSTORE or --private-key KEY (or AGORA_PRIVATE_KEY)"),
                }
            }
            Self::List { keystore, json } => {
                let dir = keystore.dir()?;
                let files = list(&dir)?;
                if json {
                    let rows: Vec<_> = files
                        .iter()
                        .map(|(path, address)| json!({"file": path, "address": address.map(|a| a.to_checksum(None))}))
                        .collect();
                    println!("{}", serde_json::Value::Array(rows));
                } else if files.is_empty() {
                    println!("no wallets in {}", dir.display());
                } else {
                    for (path, address) in files {
                        let address = address
                            .map(|a| a.to_checksum(None))
                            .unwrap_or_else(|| "(address not recorded)".into());
                        println!("{address}  {}", path.file_name().unwrap_or_default().to_string_lossy());
                    }
                }
            }
            Self::Address { wallet, json } => {
                let address = wallet.address()?;
                if json {
                    println!("{}", json!({"address": address.to_checksum(None)}));
                } else {
                    println!("{}", address.to_checksum(None));
                }
            }
        }
        Ok(())
    }
}
