//! One typed configuration for the node.
//!
//! Precedence, highest first: command-line flags, `AGORA_*` environment variables (clap reads
//! both, so a flag beats its variable), the TOML file given by `--config`/`AGORA_CONFIG`, and
//! the defaults below. [`Config::masked`] is what `agora node --print-config` prints: secrets
//! replaced by `***`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Args;
use serde::{Deserialize, Serialize};

/// The whole configuration of a node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub chain: ChainConfig,
    pub storage: StorageConfig,
    pub http: HttpConfig,
    pub registry: RegistryConfig,
    pub auth: AuthConfig,
    pub settle: SettleConfig,
    pub p2p: P2pSection,
    pub compute: crate::compute::ComputeConfig,
    pub log: LogConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct P2pSection {
    /// Join the peer-to-peer network.
    pub enabled: bool,
    /// Multiaddrs to listen on.
    pub listen: Vec<String>,
    /// Peers to dial at start: multiaddrs ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<String>,
    /// Find peers on the LAN with mDNS.
    pub mdns: bool,
    /// Most open connections, and most per peer.
    pub max_connections: u32,
    pub max_per_peer: u32,
    /// Announce the index root at least every this many blocks.
    pub roots_every: u64,
}

impl Default for P2pSection {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: vec!["/ip4/0.0.0.0/tcp/4001".into(), "/ip4/0.0.0.0/udp/4001/quic-v1".into()],
            bootstrap: Vec::new(),
            mdns: false,
            max_connections: 128,
            max_per_peer: 2,
            roots_every: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettleConfig {
    /// The key that sends `settleUsage` (pays gas only); unset: no settlement from this node.
    pub operator_key: Option<String>,
    /// Settle a license once its unsettled value reaches this many wei (decimal).
    pub min_wei: String,
    /// Settle anything pending after it has waited this many seconds.
    pub interval_secs: u64,
    /// Send an operator transaction again with higher fees after it waited this many
    /// seconds unmined.
    pub bump_secs: u64,
    /// The most the operator wallet offers per gas, in gwei (decimal).
    pub max_fee_gwei: String,
}

impl Default for SettleConfig {
    fn default() -> Self {
        Self {
            operator_key: None,
            min_wei: "10000000000000000".into(),
            interval_secs: 300,
            bump_secs: 30,
            max_fee_gwei: "1000".into(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// The domain sign-in messages must name (`host[:port]`); unset: the Host the request
    /// came to.
    pub domain: Option<String>,
    /// Longest session, in seconds (a message that expires sooner ends it sooner).
    pub session_secs: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self { domain: None, session_secs: 3600 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// Reads need a bearer token too (writes always do).
    pub private: bool,
    /// Largest upload, in bytes.
    pub max_upload: u64,
    /// Bytes of fingerprinted copies kept for license holders (least recently used go first);
    /// copies are stored uncompressed, so this is about the disk they take.
    pub copy_cache: u64,
    /// Make each perpetual or timed license's copy as soon as the index shows the purchase
    /// (otherwise on the first download, which streams it while it is made).
    pub copy_ahead: bool,
    /// Bytes of loaded models kept in memory by deployments (least recently used go first).
    pub model_cache: u64,
    /// The operator's bearer token; when unset the node creates one in
    /// `<data_dir>/admin.token` (mode 0600).
    pub admin_token: Option<String>,
    /// `[[registry.webhooks]]`: where registry changes are POSTed.
    pub webhooks: Vec<crate::registry::webhooks::Webhook>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            private: false,
            max_upload: 20 << 30,
            copy_cache: 20 << 30,
            copy_ahead: true,
            model_cache: 4 << 30,
            admin_token: None,
            webhooks: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChainConfig {
    /// JSON-RPC endpoint of the EVM chain (http, https, ws or wss).
    pub rpc_url: String,
    /// The deployment file (addresses and deployment block); defaults to
    /// `<data_dir>/deployment.json`.
    pub deployment: Option<PathBuf>,
    /// How often the chain is polled, in milliseconds.
    pub poll_ms: u64,
    /// Depth at which a block counts as final (0 allowed).
    pub confirmations: u64,
    /// Largest `eth_getLogs` block range.
    pub max_block_range: u64,
    /// Client-side timeout of one RPC call, in milliseconds.
    pub rpc_timeout_ms: u64,
    /// The node reports itself not ready while the index is more blocks than this behind.
    pub ready_max_lag: u64,
}

impl Default for ChainConfig {
    fn default() -> Self {
        Self {
            rpc_url: "http://127.0.0.1:8545".into(),
            deployment: None,
            poll_ms: 1_000,
            confirmations: 12,
            max_block_range: 10_000,
            rpc_timeout_ms: 10_000,
            ready_max_lag: 32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Where the node keeps its database and files.
    pub data_dir: PathBuf,
    /// The artifact store's master key (created with mode 0600 when missing); defaults to
    /// `<data_dir>/artifacts.key`. Every stored blob needs it: back it up.
    pub master_key_file: Option<PathBuf>,
    /// Where artifact blobs live: `file:///path` or `s3://bucket/prefix` (credentials and
    /// endpoint from the `AWS_*` environment); defaults to `file://<data_dir>/artifacts`.
    pub artifacts: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self { data_dir: PathBuf::from("data"), master_key_file: None, artifacts: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address the HTTP API listens on.
    pub addr: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { addr: SocketAddr::from(([127, 0, 0, 1], 8080)) }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter such as `info` or `agora=debug,tower_http=info`.
    pub filter: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { filter: "info".into(), format: LogFormat::Pretty }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Pretty,
    Json,
}

/// Where the configuration comes from: the TOML file and the overrides from flags and
/// environment. Shared by every command that runs or talks to a node.
#[derive(Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "AGORA_CONFIG", global = true)]
    pub config: Option<PathBuf>,

    /// JSON-RPC endpoint of the chain.
    #[arg(long, env = "AGORA_RPC_URL", global = true, help_heading = "Chain")]
    pub rpc_url: Option<String>,

    /// Deployment file written by `agora contracts deploy` [default: <data-dir>/deployment.json].
    #[arg(long, env = "AGORA_DEPLOYMENT", global = true, help_heading = "Chain")]
    pub deployment: Option<PathBuf>,

    /// Chain polling interval in milliseconds [default: 1000].
    #[arg(long, env = "AGORA_POLL_MS", global = true, help_heading = "Chain")]
    pub poll_ms: Option<u64>,

    /// Confirmations before a block counts as final [default: 12].
    #[arg(long, env = "AGORA_CONFIRMATIONS", global = true, help_heading = "Chain")]
    pub confirmations: Option<u64>,

    /// Largest eth_getLogs block range [default: 10000].
    #[arg(long, env = "AGORA_MAX_BLOCK_RANGE", global = true, help_heading = "Chain")]
    pub max_block_range: Option<u64>,

    /// Timeout of one RPC call in milliseconds [default: 10000].
    #[arg(long, env = "AGORA_RPC_TIMEOUT_MS", global = true, help_heading = "Chain")]
    pub rpc_timeout_ms: Option<u64>,

    /// Not ready while the index lags the head by more blocks than this [default: 32].
    #[arg(long, env = "AGORA_READY_MAX_LAG", global = true, help_heading = "Chain")]
    pub ready_max_lag: Option<u64>,

    /// Data directory [default: ./data].
    #[arg(long, env = "AGORA_DATA_DIR", global = true, help_heading = "Storage")]
    pub data_dir: Option<PathBuf>,

    /// Artifact master key file [default: <data-dir>/artifacts.key].
    #[arg(long, env = "AGORA_MASTER_KEY_FILE", global = true, help_heading = "Storage")]
    pub master_key_file: Option<PathBuf>,

    /// Artifact blob store: file:///path or s3://bucket/prefix [default: file://<data-dir>/artifacts].
    #[arg(long, env = "AGORA_ARTIFACTS", global = true, help_heading = "Storage")]
    pub artifacts: Option<String>,

    /// HTTP listen address [default: 127.0.0.1:8080].
    #[arg(long, env = "AGORA_HTTP_ADDR", global = true, help_heading = "HTTP")]
    pub http_addr: Option<SocketAddr>,

    /// Registry reads need a bearer token too [default: false].
    #[arg(long, env = "AGORA_REGISTRY_PRIVATE", global = true, help_heading = "Registry", value_parser = clap::builder::BoolishValueParser::new())]
    pub registry_private: Option<bool>,

    /// Largest upload in bytes [default: 21474836480, 20 GiB].
    #[arg(long, env = "AGORA_MAX_UPLOAD", global = true, help_heading = "Registry")]
    pub max_upload: Option<u64>,

    /// Bytes of fingerprinted copies kept for license holders, stored uncompressed [default:
    /// 21474836480, 20 GiB].
    #[arg(long, env = "AGORA_COPY_CACHE", global = true, help_heading = "Registry")]
    pub copy_cache: Option<u64>,

    /// Make a license's copy as soon as the purchase is indexed [default: true].
    #[arg(long, env = "AGORA_COPY_AHEAD", global = true, help_heading = "Registry", value_parser = clap::builder::BoolishValueParser::new())]
    pub copy_ahead: Option<bool>,

    /// Bytes of loaded models deployments keep in memory [default: 4294967296, 4 GiB].
    #[arg(long, env = "AGORA_MODEL_CACHE", global = true, help_heading = "Registry")]
    pub model_cache: Option<u64>,

    /// The operator's bearer token [default: created in <data-dir>/admin.token].
    #[arg(long, env = "AGORA_ADMIN_TOKEN", global = true, help_heading = "Registry", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// The domain sign-in messages must name [default: the Host each request came to].
    #[arg(long, env = "AGORA_SIWE_DOMAIN", global = true, help_heading = "Sign-in")]
    pub siwe_domain: Option<String>,

    /// Longest wallet session in seconds [default: 3600].
    #[arg(long, env = "AGORA_SESSION_SECS", global = true, help_heading = "Sign-in")]
    pub session_secs: Option<u64>,

    /// Key that sends usage settlements (gas only) [default: none, no settlement].
    #[arg(
        long,
        env = "AGORA_OPERATOR_KEY",
        global = true,
        help_heading = "Settlement",
        hide_env_values = true
    )]
    pub operator_key: Option<String>,

    /// Settle a usage license once its unsettled value reaches this many wei [default: 10^16].
    #[arg(long, env = "AGORA_SETTLE_MIN_WEI", global = true, help_heading = "Settlement")]
    pub settle_min_wei: Option<String>,

    /// Settle anything pending after this many seconds [default: 300].
    #[arg(long, env = "AGORA_SETTLE_INTERVAL", global = true, help_heading = "Settlement")]
    pub settle_interval: Option<u64>,

    /// Send an operator transaction again with higher fees after this many seconds unmined [default: 30].
    #[arg(long, env = "AGORA_OPERATOR_BUMP_SECS", global = true, help_heading = "Settlement")]
    pub operator_bump_secs: Option<u64>,

    /// The most the operator wallet offers per gas, in gwei [default: 1000].
    #[arg(long, env = "AGORA_OPERATOR_MAX_FEE_GWEI", global = true, help_heading = "Settlement")]
    pub operator_max_fee_gwei: Option<String>,

    /// Join the peer-to-peer network [default: true].
    #[arg(long, env = "AGORA_P2P", global = true, help_heading = "Peer-to-peer", value_parser = clap::builder::BoolishValueParser::new())]
    pub p2p: Option<bool>,

    /// Multiaddrs to listen on, comma-separated [default: /ip4/0.0.0.0/tcp/4001,/ip4/0.0.0.0/udp/4001/quic-v1].
    #[arg(
        long,
        env = "AGORA_P2P_LISTEN",
        global = true,
        help_heading = "Peer-to-peer",
        value_delimiter = ','
    )]
    pub p2p_listen: Option<Vec<String>>,

    /// Peers to dial at start, comma-separated multiaddrs ending in /p2p/<peer id>.
    #[arg(
        long,
        env = "AGORA_BOOTSTRAP",
        global = true,
        help_heading = "Peer-to-peer",
        value_delimiter = ','
    )]
    pub bootstrap: Option<Vec<String>>,

    /// Find peers on the LAN with mDNS [default: false].
    #[arg(long, env = "AGORA_MDNS", global = true, help_heading = "Peer-to-peer", value_parser = clap::builder::BoolishValueParser::new())]
    pub mdns: Option<bool>,

    /// Most open peer connections [default: 128].
    #[arg(long, env = "AGORA_P2P_MAX_CONNECTIONS", global = true, help_heading = "Peer-to-peer")]
    pub p2p_max_connections: Option<u32>,

    /// Announce the index root at least every this many blocks [default: 10].
    #[arg(long, env = "AGORA_ROOTS_EVERY", global = true, help_heading = "Peer-to-peer")]
    pub roots_every: Option<u64>,

    /// Seconds a compute offer's signature stays valid (re-signed at half) [default: 3600].
    #[arg(long, env = "AGORA_OFFER_TTL", global = true, help_heading = "Compute")]
    pub offer_ttl: Option<u64>,

    /// Seconds a training job may go without a word from the other node [default: 600].
    #[arg(long, env = "AGORA_JOB_TIMEOUT", global = true, help_heading = "Compute")]
    pub job_timeout: Option<u64>,

    /// Assumed share of a GPU's peak throughput that training achieves [default: 0.4].
    #[arg(long, env = "AGORA_COMPUTE_UTILISATION", global = true, help_heading = "Compute")]
    pub compute_utilisation: Option<f64>,

    /// Log filter, e.g. `info` or `agora_node=debug` (RUST_LOG is read when this is unset) [default: info].
    #[arg(long = "log", env = "AGORA_LOG", global = true, help_heading = "Logging")]
    pub log_filter: Option<String>,

    /// Log format.
    #[arg(long, env = "AGORA_LOG_FORMAT", global = true, help_heading = "Logging")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {source}")]
    Parse { path: PathBuf, source: Box<toml::de::Error> },
    #[error("chain.poll_ms must be at least 1")]
    ZeroPoll,
    #[error("chain.max_block_range and chain.rpc_timeout_ms must be at least 1")]
    ZeroLimit,
    #[error("chain.rpc_url {0:?} is not a URL: {1}")]
    RpcUrl(String, url::ParseError),
    #[error("chain.rpc_url {0:?} must use http, https, ws or wss")]
    RpcScheme(String),
    #[error("storage.artifacts {0:?} must be file:///absolute/path or s3://bucket/prefix")]
    Artifacts(String),
    #[error("registry.admin_token must be at least 16 characters")]
    ShortToken,
    #[error("registry.max_upload must be at least 1")]
    ZeroUpload,
    #[error("registry.webhooks: {0}")]
    Webhook(String),
    #[error("auth.session_secs must be at least 60")]
    ShortSession,
    #[error("settle.min_wei {0:?} is not a decimal number of wei")]
    SettleMin(String),
    #[error("settle.operator_key (AGORA_OPERATOR_KEY) is not 32 bytes of hex")]
    OperatorKey,
    #[error(
        "settle.max_fee_gwei (AGORA_OPERATOR_MAX_FEE_GWEI) {0:?} is not a positive decimal number of gwei"
    )]
    MaxFee(String),
    #[error("settle.bump_secs (AGORA_OPERATOR_BUMP_SECS) must be at least 1")]
    ZeroBump,
    #[error("p2p.{field} {value:?} is not a multiaddr: {reason}")]
    Multiaddr { field: &'static str, value: String, reason: String },
    #[error("p2p.bootstrap {0:?} does not end in /p2p/<peer id>")]
    BootstrapPeer(String),
    #[error("p2p.max_connections, p2p.max_per_peer and p2p.roots_every must be at least 1")]
    ZeroP2p,
    #[error("compute.{0}")]
    Compute(String),
}

impl Config {
    /// Defaults, then the TOML file, then flags and environment.
    pub fn load(args: &ConfigArgs) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(args);
        if config.log.filter.is_empty() {
            config.log.filter = "info".into();
        }
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text)
            .map_err(|source| ConfigError::Parse { path: path.to_path_buf(), source: Box::new(source) })
    }

    fn apply(&mut self, args: &ConfigArgs) {
        if let Some(v) = &args.rpc_url {
            self.chain.rpc_url = v.clone();
        }
        if let Some(v) = &args.deployment {
            self.chain.deployment = Some(v.clone());
        }
        if let Some(v) = args.poll_ms {
            self.chain.poll_ms = v;
        }
        if let Some(v) = args.confirmations {
            self.chain.confirmations = v;
        }
        if let Some(v) = args.max_block_range {
            self.chain.max_block_range = v;
        }
        if let Some(v) = args.rpc_timeout_ms {
            self.chain.rpc_timeout_ms = v;
        }
        if let Some(v) = args.ready_max_lag {
            self.chain.ready_max_lag = v;
        }
        if let Some(v) = &args.data_dir {
            self.storage.data_dir = v.clone();
        }
        if let Some(v) = &args.artifacts {
            self.storage.artifacts = Some(v.clone());
        }
        if let Some(v) = &args.master_key_file {
            self.storage.master_key_file = Some(v.clone());
        }
        if let Some(v) = args.http_addr {
            self.http.addr = v;
        }
        if let Some(v) = args.registry_private {
            self.registry.private = v;
        }
        if let Some(v) = args.max_upload {
            self.registry.max_upload = v;
        }
        if let Some(v) = args.copy_cache {
            self.registry.copy_cache = v;
        }
        if let Some(v) = args.copy_ahead {
            self.registry.copy_ahead = v;
        }
        if let Some(v) = args.model_cache {
            self.registry.model_cache = v;
        }
        if let Some(v) = &args.admin_token {
            self.registry.admin_token = Some(v.clone());
        }
        if let Some(v) = args.operator_key.as_ref().filter(|k| !k.trim().is_empty()) {
            self.settle.operator_key = Some(v.clone());
        }
        if let Some(v) = &args.settle_min_wei {
            self.settle.min_wei = v.clone();
        }
        if let Some(v) = args.settle_interval {
            self.settle.interval_secs = v;
        }
        if let Some(v) = args.operator_bump_secs {
            self.settle.bump_secs = v;
        }
        if let Some(v) = &args.operator_max_fee_gwei {
            self.settle.max_fee_gwei = v.clone();
        }
        if let Some(v) = &args.siwe_domain {
            self.auth.domain = Some(v.clone());
        }
        if let Some(v) = args.session_secs {
            self.auth.session_secs = v;
        }
        if let Some(v) = args.p2p {
            self.p2p.enabled = v;
        }
        if let Some(v) = &args.p2p_listen {
            self.p2p.listen = v.iter().map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect();
        }
        if let Some(v) = &args.bootstrap {
            self.p2p.bootstrap = v.iter().map(|a| a.trim().to_owned()).filter(|a| !a.is_empty()).collect();
        }
        if let Some(v) = args.mdns {
            self.p2p.mdns = v;
        }
        if let Some(v) = args.p2p_max_connections {
            self.p2p.max_connections = v;
        }
        if let Some(v) = args.roots_every {
            self.p2p.roots_every = v;
        }
        if let Some(v) = args.offer_ttl {
            self.compute.offer_ttl = v;
        }
        if let Some(v) = args.compute_utilisation {
            self.compute.utilisation = v;
        }
        if let Some(v) = args.job_timeout {
            self.compute.job_timeout = v;
        }
        // RUST_LOG is an environment variable too: it beats the file, AGORA_LOG beats it.
        match (&args.log_filter, std::env::var("RUST_LOG")) {
            (Some(v), _) => self.log.filter = v.clone(),
            (None, Ok(v)) if !v.is_empty() => self.log.filter = v,
            _ => {}
        }
        if let Some(v) = args.log_format {
            self.log.format = v;
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.chain.poll_ms == 0 {
            return Err(ConfigError::ZeroPoll);
        }
        if self.chain.max_block_range == 0 || self.chain.rpc_timeout_ms == 0 {
            return Err(ConfigError::ZeroLimit);
        }
        let url = url::Url::parse(&self.chain.rpc_url)
            .map_err(|e| ConfigError::RpcUrl(self.chain.rpc_url.clone(), e))?;
        if !matches!(url.scheme(), "http" | "https" | "ws" | "wss") {
            return Err(ConfigError::RpcScheme(self.chain.rpc_url.clone()));
        }
        if let Some(artifacts) = &self.storage.artifacts
            && !(artifacts.starts_with("file:///") || artifacts.starts_with("s3://"))
        {
            return Err(ConfigError::Artifacts(artifacts.clone()));
        }
        if self.registry.admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::ShortToken);
        }
        if self.registry.max_upload == 0 {
            return Err(ConfigError::ZeroUpload);
        }
        for hook in &self.registry.webhooks {
            hook.check().map_err(ConfigError::Webhook)?;
        }
        if self.auth.session_secs < 60 {
            return Err(ConfigError::ShortSession);
        }
        if self.settle.min_wei.parse::<alloy::primitives::U256>().is_err() {
            return Err(ConfigError::SettleMin(self.settle.min_wei.clone()));
        }
        if self
            .settle
            .operator_key
            .as_ref()
            .is_some_and(|k| k.trim().parse::<alloy::signers::local::PrivateKeySigner>().is_err())
        {
            return Err(ConfigError::OperatorKey);
        }
        self.fee_policy()?;
        self.p2p_net()?;
        if self.p2p.max_connections == 0 || self.p2p.max_per_peer == 0 || self.p2p.roots_every == 0 {
            return Err(ConfigError::ZeroP2p);
        }
        self.validate_compute()
    }

    fn validate_compute(&self) -> Result<(), ConfigError> {
        let c = &self.compute;
        if !(c.utilisation > 0.0 && c.utilisation <= 1.0) {
            return Err(ConfigError::Compute(format!(
                "utilisation {} must be above 0 and at most 1 (AGORA_COMPUTE_UTILISATION)",
                c.utilisation
            )));
        }
        if c.job_timeout == 0 {
            return Err(ConfigError::Compute(
                "job_timeout must be at least 1 second (AGORA_JOB_TIMEOUT)".into(),
            ));
        }
        if c.external_command.first().is_some_and(|program| program.trim().is_empty()) {
            return Err(ConfigError::Compute("external_command starts with an empty program".into()));
        }
        let mut names = std::collections::HashSet::new();
        for policy in &c.policies {
            policy.check().map_err(|e| ConfigError::Compute(format!("policies: {e}")))?;
            if !names.insert(policy.name.as_str()) {
                return Err(ConfigError::Compute(format!(
                    "policies: the name {:?} is used twice",
                    policy.name
                )));
            }
        }
        if c.offer_ttl < 2 {
            return Err(ConfigError::Compute(
                "offer_ttl must be at least 2 seconds (AGORA_OFFER_TTL)".into(),
            ));
        }
        for (i, g) in c.gpus.iter().enumerate() {
            if g.tflops.is_nan() || g.tflops <= 0.0 || g.memory_gb == 0 || g.name.trim().is_empty() {
                return Err(ConfigError::Compute(format!(
                    "gpus[{i}] needs a name, tflops above 0 and memory_gb above 0"
                )));
            }
        }
        let throughput = c.throughput();
        for (i, spec) in c.offers.iter().enumerate() {
            spec.to_offer(
                alloy::primitives::Address::ZERO,
                "node",
                alloy::primitives::U256::ZERO,
                0,
                c.offer_ttl,
            )
            .map_err(|e| ConfigError::Compute(format!("offers[{i}]: {e}")))?;
            if throughput.tflops(&spec.gpu).is_none() {
                return Err(ConfigError::Compute(format!(
                    "offers[{i}]: GPU model {:?} is not in the throughput table; add it under [[compute.gpus]]",
                    spec.gpu
                )));
            }
        }
        Ok(())
    }

    /// The swarm's settings, with every address parsed.
    pub fn p2p_net(&self) -> Result<crate::p2p::net::NetConfig, ConfigError> {
        let parse = |field: &'static str, value: &String| {
            value.parse::<libp2p::Multiaddr>().map_err(|e| ConfigError::Multiaddr {
                field,
                value: value.clone(),
                reason: e.to_string(),
            })
        };
        let listen = self.p2p.listen.iter().map(|a| parse("listen", a)).collect::<Result<Vec<_>, _>>()?;
        let bootstrap = self
            .p2p
            .bootstrap
            .iter()
            .map(|a| {
                let address = parse("bootstrap", a)?;
                crate::p2p::net::peer_of(&address).ok_or_else(|| ConfigError::BootstrapPeer(a.clone()))?;
                Ok(address)
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(crate::p2p::net::NetConfig {
            listen,
            bootstrap,
            mdns: self.p2p.mdns,
            max_connections: self.p2p.max_connections,
            max_per_peer: self.p2p.max_per_peer,
        })
    }

    /// The deployment file this node reads.
    pub fn deployment_path(&self) -> PathBuf {
        self.chain.deployment.clone().unwrap_or_else(|| self.storage.data_dir.join("deployment.json"))
    }

    /// The indexer's settings.
    /// How the operator wallet outbids its own pending transactions.
    pub fn fee_policy(&self) -> Result<crate::chain::operator::FeePolicy, ConfigError> {
        let s = &self.settle;
        if s.bump_secs == 0 {
            return Err(ConfigError::ZeroBump);
        }
        let wei = alloy::primitives::utils::parse_units(s.max_fee_gwei.trim(), "gwei")
            .ok()
            .filter(|units| !units.is_negative())
            .map(|units| units.get_absolute())
            .filter(|wei| !wei.is_zero() && *wei <= alloy::primitives::U256::from(u128::MAX))
            .ok_or_else(|| ConfigError::MaxFee(s.max_fee_gwei.clone()))?;
        Ok(crate::chain::operator::FeePolicy {
            bump_after: std::time::Duration::from_secs(s.bump_secs),
            max_fee_per_gas: wei.to(),
        })
    }

    pub fn indexer(&self) -> crate::chain::indexer::IndexerConfig {
        crate::chain::indexer::IndexerConfig {
            poll: std::time::Duration::from_millis(self.chain.poll_ms),
            confirmations: self.chain.confirmations,
            max_range: self.chain.max_block_range,
            rpc_timeout: std::time::Duration::from_millis(self.chain.rpc_timeout_ms),
            to_block: None,
        }
    }

    /// Whether the RPC endpoint can push new heads.
    pub fn rpc_is_websocket(&self) -> bool {
        self.chain.rpc_url.starts_with("ws://") || self.chain.rpc_url.starts_with("wss://")
    }

    /// The RocksDB directory.
    pub fn db_path(&self) -> PathBuf {
        self.storage.data_dir.join("db")
    }

    /// The artifact store's local directory (partial writes, and blobs by default).
    pub fn artifacts_path(&self) -> PathBuf {
        self.storage.data_dir.join("artifacts")
    }

    /// Where blobs live.
    pub fn artifacts_url(&self) -> String {
        self.storage
            .artifacts
            .clone()
            .unwrap_or_else(|| format!("file://{}", self.artifacts_path().display()))
    }

    /// The node's watermark master key (`K_master`; never leaves the node).
    pub fn watermark_key_path(&self) -> PathBuf {
        self.storage.data_dir.join("watermark.key")
    }

    /// The node's ed25519 identity key (signs deliveries; the peer key too).
    pub fn node_key_path(&self) -> PathBuf {
        self.storage.data_dir.join("node.key")
    }

    /// The key that signs wallet session tokens.
    pub fn session_key_path(&self) -> PathBuf {
        self.storage.data_dir.join("session.key")
    }

    /// The operator token file, used when no token is configured.
    pub fn admin_token_path(&self) -> PathBuf {
        self.storage.data_dir.join("admin.token")
    }

    /// The artifact master key file.
    pub fn master_key_path(&self) -> PathBuf {
        self.storage.master_key_file.clone().unwrap_or_else(|| self.storage.data_dir.join("artifacts.key"))
    }

    /// The configuration with secrets masked, for printing.
    pub fn masked(&self) -> Self {
        let mut masked = self.clone();
        masked.chain.rpc_url = mask_url(&self.chain.rpc_url);
        if masked.settle.operator_key.is_some() {
            masked.settle.operator_key = Some("***".into());
        }
        if masked.registry.admin_token.is_some() {
            masked.registry.admin_token = Some("***".into());
        }
        masked
    }

    /// The configuration as TOML, secrets masked.
    pub fn to_masked_toml(&self) -> String {
        toml::to_string_pretty(&self.masked()).expect("the config always serialises")
    }
}

/// Hides credentials an RPC URL may carry: the password, query values (API keys are often
/// passed as `?key=`), and path segments that look like keys (`/v3/<key>`).
pub fn mask_url(raw: &str) -> String {
    let Ok(mut url) = url::Url::parse(raw) else { return "***".into() };
    if url.password().is_some() {
        let _ = url.set_password(Some("***"));
    }
    if url.query().is_some() {
        let pairs: Vec<(String, String)> =
            url.query_pairs().map(|(k, _)| (k.into_owned(), "***".to_owned())).collect();
        url.query_pairs_mut().clear().extend_pairs(pairs);
    }
    let segments: Option<Vec<String>> = url.path_segments().map(|segments| {
        segments
            .map(|s| {
                if s.len() >= 20 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                    "***".into()
                } else {
                    s.to_owned()
                }
            })
            .collect()
    });
    if let Some(segments) = segments {
        url.set_path(&segments.join("/"));
    }
    url.to_string().replace("%2A%2A%2A", "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ConfigArgs {
        ConfigArgs::default()
    }

    #[test]
    fn defaults() {
        let config = Config::load(&args()).unwrap();
        assert_eq!(config.http.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.chain.rpc_url, "http://127.0.0.1:8545");
        assert_eq!(config.deployment_path(), PathBuf::from("data/deployment.json"));
        assert_eq!(config.db_path(), PathBuf::from("data/db"));
        assert_eq!(config.master_key_path(), PathBuf::from("data/artifacts.key"));
        assert_eq!(config.artifacts_url(), "file://data/artifacts");
    }

    #[test]
    fn file_then_overrides() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agora.toml");
        std::fs::write(
            &path,
            "[chain]\nrpc_url = \"http://10.0.0.1:8545\"\npoll_ms = 250\n[http]\naddr = \"127.0.0.1:9000\"\n[storage]\ndata_dir = \"/var/lib/agora\"\n",
        )
        .unwrap();
        let from_file = Config::load(&ConfigArgs { config: Some(path.clone()), ..args() }).unwrap();
        assert_eq!(from_file.chain.rpc_url, "http://10.0.0.1:8545");
        assert_eq!(from_file.chain.poll_ms, 250);
        assert_eq!(from_file.http.addr.to_string(), "127.0.0.1:9000");
        assert_eq!(from_file.deployment_path(), PathBuf::from("/var/lib/agora/deployment.json"));

        let overridden = Config::load(&ConfigArgs {
            config: Some(path),
            http_addr: Some("127.0.0.1:9100".parse().unwrap()),
            deployment: Some("/tmp/d.json".into()),
            ..args()
        })
        .unwrap();
        assert_eq!(overridden.http.addr.to_string(), "127.0.0.1:9100");
        assert_eq!(overridden.chain.rpc_url, "http://10.0.0.1:8545", "file value kept");
        assert_eq!(overridden.deployment_path(), PathBuf::from("/tmp/d.json"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agora.toml");
        std::fs::write(&path, "[chain]\nrpc_urll = \"x\"\n").unwrap();
        let err = Config::load(&ConfigArgs { config: Some(path.clone()), ..args() }).unwrap_err();
        assert!(err.to_string().contains("rpc_urll"), "{err}");

        std::fs::write(&path, "[chain]\npoll_ms = 0\n").unwrap();
        let err = Config::load(&ConfigArgs { config: Some(path.clone()), ..args() }).unwrap_err();
        assert!(matches!(err, ConfigError::ZeroPoll), "{err}");

        // webhooks and drift policies are checked when the file is read
        std::fs::write(&path, "[[registry.webhooks]]\nurl = \"file:///etc/passwd\"\n").unwrap();
        let err = Config::load(&ConfigArgs { config: Some(path.clone()), ..args() }).unwrap_err();
        assert!(
            err.to_string().contains("registry.webhooks") && err.to_string().contains("http or https"),
            "{err}"
        );
        std::fs::write(
            &path,
            "[[compute.policies]]\nname = \"p\"\nmodel = \"m\"\ndataset = \"d\"\ndrift = { deployment = 1, above = 0 }\n",
        )
        .unwrap();
        let err = Config::load(&ConfigArgs { config: Some(path.clone()), ..args() }).unwrap_err();
        assert!(err.to_string().contains("drift.above"), "{err}");
        std::fs::write(
            &path,
            "[[registry.webhooks]]\nurl = \"https://ci.example/hook\"\nevents = [\"version_created\"]\n",
        )
        .unwrap();
        let ok = Config::load(&ConfigArgs { config: Some(path), ..args() }).unwrap();
        assert_eq!(ok.registry.webhooks[0].events, ["version_created"]);

        let err = Config::load(&ConfigArgs { rpc_url: Some("ftp://x".into()), ..args() }).unwrap_err();
        assert!(matches!(err, ConfigError::RpcScheme(_)), "{err}");

        // the operator's fee cap: a positive number of gwei, fractions allowed
        for bad in ["", "-1", "0", "ten", "1e400"] {
            let err =
                Config::load(&ConfigArgs { operator_max_fee_gwei: Some(bad.into()), ..args() }).unwrap_err();
            assert!(
                matches!(err, ConfigError::MaxFee(_))
                    && err.to_string().contains("AGORA_OPERATOR_MAX_FEE_GWEI"),
                "{bad}: {err}"
            );
        }
        let err = Config::load(&ConfigArgs { operator_bump_secs: Some(0), ..args() }).unwrap_err();
        assert!(matches!(err, ConfigError::ZeroBump), "{err}");
        let fees = Config::load(&ConfigArgs {
            operator_max_fee_gwei: Some("2.5".into()),
            operator_bump_secs: Some(12),
            ..args()
        })
        .unwrap()
        .fee_policy()
        .unwrap();
        assert_eq!((fees.max_fee_per_gas, fees.bump_after.as_secs()), (2_500_000_000, 12));
        let defaults = Config::load(&args()).unwrap().fee_policy().unwrap();
        assert_eq!((defaults.max_fee_per_gas, defaults.bump_after.as_secs()), (1_000_000_000_000, 30));

        let err = Config::load(&ConfigArgs { artifacts: Some("gs://bucket".into()), ..args() }).unwrap_err();
        assert!(matches!(err, ConfigError::Artifacts(_)), "{err}");
        let ok =
            Config::load(&ConfigArgs { artifacts: Some("s3://bucket/models".into()), ..args() }).unwrap();
        assert_eq!(ok.artifacts_url(), "s3://bucket/models");

        let err = Config::load(&ConfigArgs { config: Some("/nonexistent/agora.toml".into()), ..args() })
            .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agora.toml"), "{err}");
    }

    #[test]
    fn secrets_are_masked() {
        assert_eq!(
            mask_url("https://user:hunter2@rpc.example/v3/0123456789abcdef0123456789abcdef?apikey=s3cret"),
            "https://user:***@rpc.example/v3/***?apikey=***"
        );
        assert_eq!(mask_url("http://127.0.0.1:8545"), "http://127.0.0.1:8545/");
        let config = Config {
            chain: ChainConfig { rpc_url: "https://rpc.example/?key=abc".into(), ..Default::default() },
            ..Default::default()
        };
        let printed = config.to_masked_toml();
        assert!(!printed.contains("abc"), "{printed}");
        assert!(printed.contains("key=***"), "{printed}");
    }
}
