//! Every table of the database, declared in one place: its column family name, key type,
//! value type, and whether it is part of the index's state root. Keys encode big-endian so
//! that iteration follows numeric order; values are postcard.
//!
//! Tables in the state root hold the canonical content of the chain index: what any two honest
//! indexes at the same block agree on. Secondary indexes (lookups by holder, by token, by
//! recipient) are derived from them and left out.

use std::collections::BTreeMap;

use alloy::primitives::{Address, B256, U256};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A typed column family.
pub trait Table {
    const NAME: &'static str;
    /// Its position in [`NAMES`].
    const INDEX: usize;
    /// Whether records of this table count in the index's state root.
    const IN_ROOT: bool;
    type Key;
    type Value: Serialize + DeserializeOwned;

    fn encode_key(key: &Self::Key) -> Vec<u8>;
}

macro_rules! tables {
    ($($(#[$doc:meta])* $name:ident = $cf:literal, root: $root:literal, key: $key:ty, value: $value:ty, encode: |$k:ident| $encode:expr;)*) => {
        /// The tables in [`NAMES`] order: a variant's discriminant is the table's position.
        enum Position {
            $($name),*
        }

        $(
            $(#[$doc])*
            pub struct $name;

            impl Table for $name {
                const NAME: &'static str = $cf;
                const INDEX: usize = Position::$name as usize;
                const IN_ROOT: bool = $root;
                type Key = $key;
                type Value = $value;

                fn encode_key($k: &$key) -> Vec<u8> {
                    $encode
                }
            }
        )*

        /// Column families, in creation order.
        pub const NAMES: &[&str] = &[$($cf),*];

        /// Whether the table named `name` counts in the state root.
        pub fn in_root(name: &str) -> bool {
            match name {
                $($cf => $root,)*
                _ => false,
            }
        }
    };
}

/// Serialises a `U256` field exactly as ruint does for binary formats (its 32 big-endian bytes),
/// without the `Vec` ruint allocates for them: the indexer encodes records with several such
/// fields on every write of a backfill.
fn u256_bytes<S: serde::Serializer>(value: &U256, serializer: S) -> Result<S::Ok, S::Error> {
    if serializer.is_human_readable() {
        return serde::Serialize::serialize(value, serializer);
    }
    serializer.serialize_bytes(&value.to_be_bytes::<32>())
}

fn u256_key(v: &U256) -> Vec<u8> {
    v.to_be_bytes::<32>().to_vec()
}

fn concat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

tables! {
    /// Node-wide facts: schema version, deployment, the index cursor and state root.
    Meta = "meta", root: false, key: MetaKey, value: MetaValue, encode: |k| k.as_bytes().to_vec();
    /// Recent blocks: hash, parent, timestamp and the undo record of what the block changed.
    Blocks = "blocks", root: false, key: u64, value: BlockRecord, encode: |k| k.to_be_bytes().to_vec();
    /// Models by token id.
    Models = "models", root: true, key: U256, value: ModelRecord, encode: |k| u256_key(k);
    /// Versions by (token id, version).
    Versions = "versions", root: true, key: (U256, u32), value: VersionRecord,
        encode: |k| concat(&[&k.0.to_be_bytes::<32>(), &k.1.to_be_bytes()]);
    /// Licenses by license id.
    Licenses = "licenses", root: true, key: U256, value: LicenseRecord, encode: |k| u256_key(k);
    /// Withdrawable money per account.
    Balances = "balances", root: true, key: Address, value: BalanceRecord, encode: |k| k.to_vec();
    /// What each account was credited per model (royalties and fees).
    Earnings = "earnings", root: true, key: (Address, U256), value: U256,
        encode: |k| concat(&[k.0.as_slice(), &k.1.to_be_bytes::<32>()]);
    /// Revenue booked per model, and how much of it has been distributed.
    Revenue = "revenue", root: true, key: U256, value: RevenueRecord, encode: |k| u256_key(k);
    /// Cancelled orders.
    Cancelled = "cancelled", root: true, key: B256, value: CancelRecord, encode: |k| k.to_vec();
    /// Sellers' current order nonces.
    Nonces = "nonces", root: true, key: Address, value: U256, encode: |k| k.to_vec();
    /// Lookup: licenses by holder.
    HolderLicenses = "holder_licenses", root: false, key: (Address, U256), value: (),
        encode: |k| concat(&[k.0.as_slice(), &k.1.to_be_bytes::<32>()]);
    /// Lookup: licenses by model.
    TokenLicenses = "token_licenses", root: false, key: (U256, U256), value: (),
        encode: |k| concat(&[&k.0.to_be_bytes::<32>(), &k.1.to_be_bytes::<32>()]);
    /// Lookup: models whose split pays a recipient, with the recipient's share.
    RecipientModels = "recipient_models", root: false, key: (Address, U256), value: u16,
        encode: |k| concat(&[k.0.as_slice(), &k.1.to_be_bytes::<32>()]);
    /// Artifact blobs by the blake3 of their content: size and reference count.
    Blobs = "blobs", root: false, key: [u8; 32], value: BlobRecord, encode: |k| k.to_vec();
    /// The audit log's hash chain, by sequence number.
    AuditLog = "audit_log", root: false, key: u64, value: AuditEntry, encode: |k| k.to_be_bytes().to_vec();
    /// Lookup: anchored versions by content hash.
    ContentVersions = "content_versions", root: false, key: B256, value: (U256, u32), encode: |k| k.to_vec();
    /// Registry: registered models by id.
    RegistryModels = "registry_models", root: false, key: u64, value: RegistryModel,
        encode: |k| k.to_be_bytes().to_vec();
    /// Registry: model ids by name.
    RegistryNames = "registry_names", root: false, key: String, value: u64, encode: |k| k.as_bytes().to_vec();
    /// Registry: versions by (model id, version).
    RegistryVersions = "registry_versions", root: false, key: (u64, u32), value: RegistryVersion,
        encode: |k| concat(&[&k.0.to_be_bytes(), &k.1.to_be_bytes()]);
    /// Registry: metric points by (model id, version, sequence).
    RegistryMetrics = "registry_metrics", root: false, key: (u64, u32, u64), value: MetricPoint,
        encode: |k| concat(&[&k.0.to_be_bytes(), &k.1.to_be_bytes(), &k.2.to_be_bytes()]);
    /// Signed listings by order hash (off-chain; alive while the index agrees).
    Orders = "orders", root: false, key: B256, value: OrderRecord, encode: |k| k.to_vec();
    /// Lookup: orders by token.
    TokenOrders = "token_orders", root: false, key: (U256, B256), value: (),
        encode: |k| concat(&[&k.0.to_be_bytes::<32>(), k.1.as_slice()]);
    /// Fingerprinted copies made for licenses, by (license id, original's content hash).
    LicenseCopies = "license_copies", root: false, key: (U256, B256), value: CopyRecord,
        encode: |k| concat(&[&k.0.to_be_bytes::<32>(), k.1.as_slice()]);
    /// Usage licenses: the last accepted voucher.
    UsageRecords = "usage_records", root: false, key: U256, value: UsageRecord, encode: |k| u256_key(k);
    /// Every accepted voucher's signature by (license id, cumulative units): when a license's
    /// escrow shrinks under its last voucher (a top-up undone by a reorg), the last voucher the
    /// escrow still covers is settled instead.
    UsageVouchers = "usage_vouchers", root: false, key: (U256, U256), value: Vec<u8>,
        encode: |k| concat(&[&k.0.to_be_bytes::<32>(), &k.1.to_be_bytes::<32>()]);
    /// Usage receipts by (license id, cumulative units).
    UsageReceipts = "usage_receipts", root: false, key: (U256, U256), value: ReceiptRecord,
        encode: |k| concat(&[&k.0.to_be_bytes::<32>(), &k.1.to_be_bytes::<32>()]);
    /// Deployments by id.
    Deployments = "deployments", root: false, key: u64, value: DeploymentRecord, encode: |k| k.to_be_bytes().to_vec();
    /// The artifact tree (MLflow's `mlflow-artifacts:` paths and registered files): blobs by path.
    ArtifactFiles = "artifact_files", root: false, key: String, value: FileRecord, encode: |k| k.as_bytes().to_vec();
    /// Where `http` deployments send their calls.
    DeploymentUpstreams = "deployment_upstreams", root: false, key: u64, value: UpstreamRecord, encode: |k| k.to_be_bytes().to_vec();
    /// Blobs this node serves to peers (`/agora/blob/2`), with their chunk manifests.
    SharedBlobs = "shared_blobs", root: false, key: [u8; 32], value: SharedBlob, encode: |k| k.to_vec();
    /// Compute reservations (compute futures) by id.
    Reservations = "reservations", root: true, key: U256, value: ReservationRecord, encode: |k| u256_key(k);
    /// Withdrawable money per account in ComputeMarket.
    ComputeBalances = "compute_balances", root: true, key: Address, value: ComputeBalance, encode: |k| k.to_vec();
    /// Compute offers reserved or cancelled, by offer hash.
    ClosedOffers = "closed_offers", root: true, key: B256, value: Origin, encode: |k| k.to_vec();
    /// Providers' current offer nonces.
    OfferNonces = "offer_nonces", root: true, key: Address, value: U256, encode: |k| k.to_vec();
    /// Signed compute offers this node knows (its own and gossiped), by offer hash.
    Offers = "offers", root: false, key: B256, value: OfferRecord, encode: |k| k.to_vec();
    /// Lookup: the newest offer of each provider's pool (same GPUs, kind, region and node).
    PoolOffers = "pool_offers", root: false, key: B256, value: B256, encode: |k| k.to_vec();
    /// Training jobs by id: the ones this node scheduled (buyer) and the ones it runs (provider).
    TrainingJobs = "training_jobs", root: false, key: u64, value: crate::compute::jobs::JobRecord, encode: |k| k.to_be_bytes().to_vec();
    /// Blobs served to one peer only (a job's inputs to its provider, its output to its buyer).
    PeerShares = "peer_shares", root: false, key: ([u8; 32], Vec<u8>), value: SharedBlob,
        encode: |k| concat(&[&k.0, &k.1]);
    /// Offers this node signed as a provider: which configured offer each came from and its nonce.
    OwnOffers = "own_offers", root: false, key: B256, value: OwnOffer, encode: |k| k.to_vec();
    /// How a deployment's calls are shared between versions of its model; absent, every call
    /// goes to the deployment's version.
    DeploymentTraffic = "deployment_traffic", root: false, key: u64, value: TrafficRecord, encode: |k| k.to_be_bytes().to_vec();
    /// An `http` deployment's split: the upstream of each of its versions (written with the
    /// split; absent, its one upstream answers every call).
    DeploymentSplitUpstreams = "deployment_split_upstreams", root: false, key: u64, value: Vec<(u32, UpstreamRecord)>, encode: |k| k.to_be_bytes().to_vec();
    /// The reference of a deployment's input drift: its first rows' per-feature statistics.
    DeploymentDrift = "deployment_drift", root: false, key: u64, value: crate::serve::drift::Reference, encode: |k| k.to_be_bytes().to_vec();
    /// Its bins: each feature's reference deciles and the reference rows between them (written
    /// with the reference).
    DeploymentDriftBins = "deployment_drift_bins", root: false, key: u64, value: crate::serve::drift::Bins, encode: |k| k.to_be_bytes().to_vec();
    /// The reference of an MLP deployment's output drift, and its bins (written together).
    DeploymentOutputDrift = "deployment_output_drift", root: false, key: u64, value: crate::serve::drift::Reference, encode: |k| k.to_be_bytes().to_vec();
    DeploymentOutputDriftBins = "deployment_output_drift_bins", root: false, key: u64, value: crate::serve::drift::Bins, encode: |k| k.to_be_bytes().to_vec();
    /// Registry changes on their way to webhooks, by sequence number (kept while a hook has
    /// not had them).
    WebhookOutbox = "webhook_outbox", root: false, key: u64, value: crate::registry::webhooks::OutboxEvent, encode: |k| k.to_be_bytes().to_vec();
    /// Each configured hook's next sequence number in the outbox, by the hook's key.
    WebhookCursors = "webhook_cursors", root: false, key: String, value: u64, encode: |k| k.as_bytes().to_vec();
    /// Tracking (MLflow's experiments and runs): experiments by id.
    TrackingExperiments = "tracking_experiments", root: false, key: u64, value: crate::tracking::ExperimentRecord, encode: |k| k.to_be_bytes().to_vec();
    /// Tracking: experiment ids by name (deleted experiments keep their names).
    TrackingExperimentNames = "tracking_experiment_names", root: false, key: String, value: u64, encode: |k| k.as_bytes().to_vec();
    /// Tracking: runs by id, with their params, tags and each metric's latest point.
    TrackingRuns = "tracking_runs", root: false, key: [u8; 16], value: crate::tracking::RunRecord, encode: |k| k.to_vec();
    /// Tracking lookup: runs by experiment.
    TrackingExperimentRuns = "tracking_experiment_runs", root: false, key: (u64, [u8; 16]), value: (),
        encode: |k| concat(&[&k.0.to_be_bytes(), &k.1]);
    /// Tracking: every metric point by (run, metric key, sequence); keys hold no NUL, so the
    /// NUL after the key ends one series' prefix.
    /// Tracking: logged models (MLflow 3's `log_model`) by id.
    TrackingLoggedModels = "tracking_logged_models", root: false, key: [u8; 16], value: crate::tracking::LoggedModelRecord, encode: |k| k.to_vec();
    /// Tracking lookup: logged models by experiment.
    TrackingExperimentModels = "tracking_experiment_models", root: false, key: (u64, [u8; 16]), value: (),
        encode: |k| concat(&[&k.0.to_be_bytes(), &k.1]);
    TrackingMetrics = "tracking_metrics", root: false, key: ([u8; 16], String, u64), value: crate::tracking::MetricValue,
        encode: |k| concat(&[&k.0, k.1.as_bytes(), &[0], &k.2.to_be_bytes()]);
}

/// A registered model (the registry's own record, whether or not it is on-chain).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryModel {
    pub id: u64,
    pub name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    /// Alias -> version.
    pub aliases: BTreeMap<String, u32>,
    /// The wallet that owns it, when known.
    pub owner: Option<Address>,
    /// Who created it (an address or `operator`).
    pub user_id: String,
    /// Unix milliseconds.
    pub created_ms: u64,
    pub updated_ms: u64,
    /// The highest version number ever given (numbers are never reused).
    pub last_version: u32,
}

/// One version of a registered model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryVersion {
    pub version: u32,
    pub user_id: String,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub stage: u8,
    pub description: String,
    pub source: String,
    pub run_id: String,
    pub run_link: String,
    pub tags: BTreeMap<String, String>,
    /// Where its files are in the artifact tree, when the node holds them.
    pub artifact_dir: Option<String>,
    /// Whether the node made `artifact_dir` (its files go when the version goes).
    pub owns_dir: bool,
    /// The model file, when the version was registered with one.
    pub file: Option<ModelFileSummary>,
    /// The watermark commitment, once the version is marked.
    pub commitment: Option<B256>,
}

/// What the registry read from a version's safetensors file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelFileSummary {
    pub name: String,
    pub blake3: [u8; 32],
    pub size: u64,
    pub parameters: u64,
    /// Parameters per dtype (`BF16`, `F32`, ...).
    pub dtypes: BTreeMap<String, u64>,
    pub tensors: u64,
}

/// One point of a named metric series.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    pub key: String,
    pub value: f64,
    pub step: i64,
    /// Unix milliseconds.
    pub timestamp: u64,
}

/// A signed order as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRecord {
    /// `LicenseMarket.Order`, ABI-encoded.
    pub order: Vec<u8>,
    /// 65 bytes.
    pub signature: Vec<u8>,
    pub received_ms: u64,
    /// `local`, or the peer it came from.
    pub source: String,
}

/// A fingerprinted copy kept in the artifact store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyRecord {
    pub blake3: [u8; 32],
    pub size: u64,
    pub created_ms: u64,
    pub last_used_ms: u64,
}

/// The last voucher accepted for a usage license.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRecord {
    #[serde(serialize_with = "u256_bytes")]
    pub cumulative: U256,
    /// The holder's EIP-712 signature of it (what settlement submits).
    pub signature: Vec<u8>,
    /// Wei per unit, from the chain's escrow.
    #[serde(serialize_with = "u256_bytes")]
    pub unit_price: U256,
    pub updated_ms: u64,
}

/// A usage receipt the node signed for a metered call.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceiptRecord {
    /// blake3 of the request body.
    pub request: [u8; 32],
    pub time_ms: u64,
    /// ed25519 by the node's key over the receipt bytes.
    pub signature: Vec<u8>,
}

/// A deployment of a model version.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: u64,
    pub model: String,
    pub version: u32,
    pub runtime: String,
    pub unit_cost: u64,
    /// `ready` or `failed`.
    pub status: String,
    pub reason: Option<String>,
    pub created_ms: u64,
    /// Who deployed it.
    pub actor: String,
}

/// The upstream inference server of an `http` deployment.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamRecord {
    /// Calls are POSTed here with the caller's JSON body, unchanged.
    pub url: String,
    /// Probed with GET every few seconds; 2xx is healthy. Unset: any HTTP answer from the
    /// upstream URL's origin is.
    pub health_url: Option<String>,
}

/// A deployment's traffic split: (version, whole percent) pairs, the percents summing to 100.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficRecord {
    pub split: Vec<(u32, u32)>,
}

/// A blob shared with peers: its size and the blake3 chaining values of its 1 MiB chunks
/// (32 bytes each; none for a blob of one chunk or less).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedBlob {
    pub size: u64,
    /// As bytes, not a sequence of `u8`: the same postcard encoding, read in one copy instead
    /// of byte by byte (a provider reads it for every chunk it serves).
    #[serde(with = "serde_bytes")]
    pub chaining_values: Vec<u8>,
    pub shared_ms: u64,
}

/// A file of the artifact tree.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub blake3: [u8; 32],
    pub size: u64,
    pub created_ms: u64,
}

/// One audit log entry (see the `audit` module).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub time: u64,
    pub actor: String,
    pub action: String,
    pub object: String,
    pub request_id: Option<String>,
    pub prev: [u8; 32],
    pub hash: [u8; 32],
}

/// A stored artifact blob.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRecord {
    /// Plaintext bytes.
    pub size: u64,
    /// Bytes at rest (compressed, encrypted, framed).
    pub stored: u64,
    /// How many registry entries use it; 0 means garbage.
    pub refs: u64,
    /// Unix seconds.
    pub created: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    SchemaVersion,
    Deployment,
    /// The last block applied to the index.
    Cursor,
    /// The LtHash accumulator of the state root.
    RootAccumulator,
    /// How many reorgs the index has rolled back.
    Reorgs,
    /// The registry's next model id.
    RegistryNextModel,
    /// The next deployment id.
    NextDeployment,
}

impl MetaKey {
    fn as_bytes(&self) -> &'static [u8] {
        match self {
            Self::SchemaVersion => b"schema_version",
            Self::Deployment => b"deployment",
            Self::Cursor => b"cursor",
            Self::RootAccumulator => b"root_accumulator",
            Self::Reorgs => b"reorgs",
            Self::RegistryNextModel => b"registry_next_model",
            Self::NextDeployment => b"next_deployment",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaValue {
    Version(u32),
    Text(String),
    Cursor(Cursor),
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    Count(u64),
}

/// The block the index has applied up to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub number: u64,
    pub hash: B256,
    pub timestamp: u64,
}

/// One table write to reverse when the block is unwound: the key's previous value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UndoEntry {
    /// The table's name: borrowed from the schema when written, owned when read back.
    pub table: std::borrow::Cow<'static, str>,
    // As bytes, not sequences of `u8`: postcard writes both as a length and the bytes, so the
    // stored form is the same, but a sequence goes through serde one byte at a time.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub previous: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    pub hash: B256,
    pub parent_hash: B256,
    pub timestamp: u64,
    /// In the order the writes happened; unwinding applies them backwards.
    pub undo: Vec<UndoEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    pub recipient: Address,
    pub bps: u16,
}

/// Where an on-chain fact came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub block: u64,
    pub tx: B256,
    pub log_index: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub owner: Address,
    pub metadata_uri: String,
    pub splits: Vec<Split>,
    pub version_count: u32,
    /// The `ModelRegistered` event (zero until it is seen).
    pub registered: Origin,
    /// The last change of owner.
    pub transferred: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub content_hash: B256,
    pub anchored: Origin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LicenseRecord {
    #[serde(serialize_with = "u256_bytes")]
    pub token_id: U256,
    pub holder: Address,
    pub kind: u8,
    /// Paid for perpetual and timed licenses, extensions included.
    #[serde(serialize_with = "u256_bytes")]
    pub paid: U256,
    /// Timed licenses: end of access (unix seconds); 0 otherwise.
    pub expires_at: u64,
    /// Usage licenses: escrow ever deposited.
    #[serde(serialize_with = "u256_bytes")]
    pub deposited: U256,
    #[serde(serialize_with = "u256_bytes")]
    pub settled_units: U256,
    #[serde(serialize_with = "u256_bytes")]
    pub settled_amount: U256,
    /// Usage licenses: when the close may happen, once requested.
    pub closable_at: Option<u64>,
    pub closed: bool,
    #[serde(serialize_with = "u256_bytes")]
    pub refund: U256,
    pub order_hash: B256,
    pub term_index: u8,
    pub purchased: Origin,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceRecord {
    /// From `Credited` (distributed royalties).
    #[serde(serialize_with = "u256_bytes")]
    pub royalties: U256,
    /// Platform fees (the treasury only).
    #[serde(serialize_with = "u256_bytes")]
    pub fees: U256,
    /// Unused escrow returned by `Closed`.
    #[serde(serialize_with = "u256_bytes")]
    pub refunds: U256,
    #[serde(serialize_with = "u256_bytes")]
    pub withdrawn: U256,
}

impl BalanceRecord {
    pub fn credited(&self) -> U256 {
        self.royalties + self.fees + self.refunds
    }

    pub fn withdrawable(&self) -> U256 {
        self.credited().saturating_sub(self.withdrawn)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevenueRecord {
    #[serde(serialize_with = "u256_bytes")]
    pub earned: U256,
    #[serde(serialize_with = "u256_bytes")]
    pub distributed: U256,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelRecord {
    pub seller: Address,
    pub cancelled: Origin,
}

/// Where a reservation stands, as ComputeMarket's `State`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    Reserved,
    Confirmed,
    Settled,
    Reclaimed,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReservationRecord {
    pub provider: Address,
    /// The token's holder (follows ERC-721 transfers).
    pub holder: Address,
    pub offer_hash: B256,
    pub gpu_hours: u64,
    #[serde(serialize_with = "u256_bytes")]
    pub price_per_gpu_hour: U256,
    pub start_time: u64,
    pub end_time: u64,
    #[serde(serialize_with = "u256_bytes")]
    pub escrow: U256,
    pub state: ReservationState,
    pub confirmed_at: Option<u64>,
    /// An unsigned report: hours and when it becomes final.
    pub reported: Option<(u64, u64)>,
    pub hours_used: Option<u64>,
    #[serde(serialize_with = "u256_bytes")]
    pub paid: U256,
    #[serde(serialize_with = "u256_bytes")]
    pub refund: U256,
    pub reserved: Origin,
    pub closed: Option<Origin>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeBalance {
    /// Paid to a provider for hours used.
    #[serde(serialize_with = "u256_bytes")]
    pub earned: U256,
    /// Unused escrow returned to holders.
    #[serde(serialize_with = "u256_bytes")]
    pub refunds: U256,
    #[serde(serialize_with = "u256_bytes")]
    pub withdrawn: U256,
}

impl ComputeBalance {
    pub fn withdrawable(&self) -> U256 {
        (self.earned + self.refunds).saturating_sub(self.withdrawn)
    }
}

/// A signed compute offer, as received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferRecord {
    /// ABI-encoded `ComputeMarket.Offer`.
    pub offer: Vec<u8>,
    pub signature: Vec<u8>,
    /// `local` (signed by this node's provider wallet or posted to its API) or `peer`.
    pub source: String,
    /// The peer that gossiped it.
    pub peer_id: Option<String>,
    pub received_ms: u64,
}

/// An offer this node signed from its `[[compute.offers]]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnOffer {
    /// Index of the configured offer.
    pub spec: u32,
    #[serde(serialize_with = "u256_bytes")]
    pub nonce: U256,
    pub available_from: u64,
    pub expiry: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Field(#[serde(serialize_with = "u256_bytes")] U256);

    /// The records' `U256` fields keep ruint's encoding, so stored records and the state root
    /// are the same whichever way they were written.
    #[test]
    fn u256_fields_encode_as_ruint_does() {
        for v in [U256::ZERO, U256::from(1u8), U256::from(0xdead_beef_u64) << 100, U256::MAX] {
            assert_eq!(postcard::to_stdvec(&Field(v)).unwrap(), postcard::to_stdvec(&v).unwrap());
            assert_eq!(serde_json::to_string(&Field(v)).unwrap(), serde_json::to_string(&v).unwrap());
        }
        let record =
            BalanceRecord { royalties: U256::from(7u8), withdrawn: U256::MAX, ..BalanceRecord::default() };
        let back: BalanceRecord = postcard::from_bytes(&postcard::to_stdvec(&record).unwrap()).unwrap();
        assert_eq!(
            (back.royalties, back.fees, back.withdrawn),
            (record.royalties, U256::ZERO, record.withdrawn)
        );
    }

    /// Shared blobs stored before `chaining_values` was read as bytes still read, and new ones
    /// are written the same way.
    #[test]
    fn shared_blobs_keep_their_encoding() {
        let chaining_values: Vec<u8> = (0..=255).cycle().take(32 * 300).collect();
        let before =
            postcard::to_stdvec(&(5u64 << 30, chaining_values.clone(), 1_700_000_000_000u64)).unwrap();
        let blob = SharedBlob { size: 5 << 30, chaining_values, shared_ms: 1_700_000_000_000 };
        assert_eq!(postcard::to_stdvec(&blob).unwrap(), before);
        assert_eq!(postcard::from_bytes::<SharedBlob>(&before).unwrap(), blob);
    }

    /// Block records and the root's bytes written before their byte fields were read as bytes
    /// still read, and new ones are written the same way.
    #[test]
    fn undo_records_and_meta_bytes_keep_their_encoding() {
        let key: Vec<u8> = (0..=255).collect();
        let hash = B256::repeat_byte(7);
        let entries = [("licenses", key.clone(), Some(vec![1, 2, 3])), ("balances", vec![9; 20], None)];
        let before = postcard::to_stdvec(&(hash, B256::ZERO, 12u64, entries.to_vec())).unwrap();
        let record = BlockRecord {
            hash,
            parent_hash: B256::ZERO,
            timestamp: 12,
            undo: entries
                .iter()
                .map(|(table, key, previous)| UndoEntry {
                    table: (*table).into(),
                    key: key.clone(),
                    previous: previous.clone(),
                })
                .collect(),
        };
        assert_eq!(postcard::to_stdvec(&record).unwrap(), before);
        assert_eq!(postcard::from_bytes::<BlockRecord>(&before).unwrap(), record);

        #[derive(Serialize)]
        enum Old {
            _Version(u32),
            _Text(String),
            _Cursor(Cursor),
            Bytes(Vec<u8>),
        }
        let before = postcard::to_stdvec(&Old::Bytes(key.clone())).unwrap();
        assert_eq!(postcard::to_stdvec(&MetaValue::Bytes(key.clone())).unwrap(), before);
        assert_eq!(postcard::from_bytes::<MetaValue>(&before).unwrap(), MetaValue::Bytes(key));
    }
}
