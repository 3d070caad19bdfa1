//! Deployments: the node serves registered models and is the gate in front of them.
//!
//! A deployment names a model version and a runtime. The `builtin` runtime runs the project's
//! model families in-process on candle, told apart by the `config.json` next to the weights:
//! - MLP classifiers and regressors (`{"layers": [in, hidden…, out], "activation":
//!   "relu"|"tanh"|"gelu"|"sigmoid", "output": "identity"|"softmax"|"sigmoid"}`, tensors
//!   `layers.{i}.weight` `[out, in]` and `layers.{i}.bias` `[out]`): rows of numbers in;
//! - BERT-style sentence encoders (a Hugging Face BERT config with a `tokenizer.json` beside
//!   it, see [`encoder`]): texts in, embeddings out.
//!
//! Loaded models are shared by blake3 in a cache bounded by bytes (least recently used go
//! first).
//!
//! The `http` runtime puts the gate in front of any serving stack: calls are POSTed with the
//! caller's JSON body unchanged (KServe v2, OpenAI-style, or anything else) to the deployment's
//! upstream URL, and the upstream's answer comes back as it is. A background task probes each
//! upstream's health.
//!
//! Deployments are records in RocksDB (they survive restarts); counters, latencies and health
//! are kept in memory per process.

pub mod drift;
pub mod encoder;
pub mod metering;
pub mod settle;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Instant,
};

use alloy::primitives::U256;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{
    artifacts::ArtifactStore,
    registry::{Context, Registry, RegistryError, now_ms},
    store::{
        Store, StoreError,
        tables::{
            DeploymentDrift, DeploymentDriftBins, DeploymentOutputDrift, DeploymentOutputDriftBins,
            DeploymentRecord, DeploymentSplitUpstreams, DeploymentTraffic, DeploymentUpstreams, Deployments,
            Meta, MetaKey, MetaValue, TrafficRecord, UpstreamRecord,
        },
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("no deployment {0}")]
    NotFound(u64),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("deployment {id} is not ready: {reason}")]
    NotReady { id: u64, reason: String },
    #[error("the model cannot run: {0}")]
    Model(String),
    #[error("the upstream inference server failed: {0}")]
    Upstream(String),
    /// Well-formed but not acceptable (a traffic split across versions of different tokens).
    #[error("{0}")]
    Unacceptable(String),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(message: impl Into<String>) -> ServeError {
    ServeError::Invalid(message.into())
}

/// The MLP's `config.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpConfig {
    pub layers: Vec<usize>,
    #[serde(default = "relu")]
    pub activation: String,
    #[serde(default = "identity")]
    pub output: String,
}

fn relu() -> String {
    "relu".into()
}

fn identity() -> String {
    "identity".into()
}

/// A loaded MLP.
pub struct Mlp {
    config: MlpConfig,
    layers: Vec<(Tensor, Tensor)>,
    pub bytes: u64,
}

fn model_error(e: candle_core::Error) -> ServeError {
    ServeError::Model(e.to_string())
}

impl Mlp {
    /// Builds the network from its config and the tensors of its safetensors file.
    pub fn new(config: MlpConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self, ServeError> {
        if config.layers.len() < 2 || config.layers.contains(&0) {
            return Err(ServeError::Model(
                "config.json: `layers` needs at least an input and an output size, none zero".into(),
            ));
        }
        if !["relu", "tanh", "gelu", "sigmoid"].contains(&config.activation.as_str()) {
            return Err(ServeError::Model(format!(
                "config.json: unknown activation {:?}",
                config.activation
            )));
        }
        if !["identity", "softmax", "sigmoid"].contains(&config.output.as_str()) {
            return Err(ServeError::Model(format!("config.json: unknown output {:?}", config.output)));
        }
        let mut layers = Vec::new();
        let mut bytes = 0u64;
        for (i, pair) in config.layers.windows(2).enumerate() {
            let (inputs, outputs) = (pair[0], pair[1]);
            let mut take = |name: String, shape: &[usize]| -> Result<Tensor, ServeError> {
                let t = tensors
                    .remove(&name)
                    .ok_or_else(|| ServeError::Model(format!("the weights have no tensor {name}")))?;
                if t.dims() != shape {
                    return Err(ServeError::Model(format!(
                        "{name} has shape {:?}, config.json says {shape:?}",
                        t.dims()
                    )));
                }
                bytes += (t.elem_count() * 4) as u64;
                t.to_dtype(DType::F32).map_err(model_error)
            };
            let w = take(format!("layers.{i}.weight"), &[outputs, inputs])?;
            let b = take(format!("layers.{i}.bias"), &[outputs])?;
            layers.push((w.t().map_err(model_error)?.contiguous().map_err(model_error)?, b));
        }
        Ok(Self { config, layers, bytes })
    }

    pub fn inputs(&self) -> usize {
        self.config.layers[0]
    }

    /// One batch forward: rows of `inputs()` numbers in, rows of outputs out.
    pub fn forward<R: AsRef<[f32]>>(&self, rows: &[R]) -> Result<Vec<Vec<f32>>, ServeError> {
        let width = self.inputs();
        if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.as_ref().len() != width) {
            return Err(invalid(format!(
                "input row {i} has {} numbers; the model takes {width}",
                row.as_ref().len()
            )));
        }
        let flat: Vec<f32> = rows.iter().flat_map(|r| r.as_ref().iter().copied()).collect();
        if flat.iter().any(|x| !x.is_finite()) {
            return Err(invalid("inputs must be finite numbers"));
        }
        let mut x = Tensor::from_vec(flat, (rows.len(), width), &Device::Cpu).map_err(model_error)?;
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            x = x.matmul(w).and_then(|y| y.broadcast_add(b)).map_err(model_error)?;
            if i < last {
                x = match self.config.activation.as_str() {
                    "relu" => x.relu(),
                    "tanh" => x.tanh(),
                    "gelu" => x.gelu_erf(),
                    _ => candle_core::Tensor::ones_like(&x)
                        .and_then(|one| one.broadcast_div(&(x.neg()?.exp()? + 1.0)?)),
                }
                .map_err(model_error)?;
            }
        }
        x = match self.config.output.as_str() {
            "softmax" => {
                let max = x.max_keepdim(1).map_err(model_error)?;
                let e = x.broadcast_sub(&max).and_then(|d| d.exp()).map_err(model_error)?;
                let sum = e.sum_keepdim(1).map_err(model_error)?;
                e.broadcast_div(&sum).map_err(model_error)?
            }
            "sigmoid" => (x.neg().and_then(|n| n.exp()).and_then(|e| e + 1.0))
                .and_then(|d| d.recip())
                .map_err(model_error)?,
            _ => x,
        };
        x.to_vec2::<f32>().map_err(model_error)
    }
}

/// What to deploy.
#[derive(Clone, Debug)]
pub struct NewDeployment {
    pub model: String,
    /// A version number, or an alias; the newest version when neither is given.
    pub version: Option<u32>,
    pub alias: Option<String>,
    /// `builtin` or `http`.
    pub runtime: String,
    /// Units a call costs per input row.
    pub unit_cost: u64,
    /// `http` only.
    pub upstream: Option<UpstreamRecord>,
}

/// What a deployment shows.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct DeploymentView {
    pub deployment_id: String,
    pub model: String,
    pub version: u32,
    pub runtime: String,
    /// The on-chain token whose licenses give access, when the version is anchored.
    pub token_id: Option<String>,
    /// `ready`, or `failed` with `reason`.
    pub status: String,
    pub reason: Option<String>,
    pub unit_cost: u64,
    pub requests: u64,
    pub errors: u64,
    /// Milliseconds, over this process's requests.
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub created_at: u64,
    /// `http` runtime: where calls go.
    pub upstream_url: Option<String>,
    /// `http` runtime: `healthy`, `unhealthy: <why>`, or absent until the first probe.
    pub health: Option<String>,
    /// Units this node metered on the usage licenses of the deployed token (the last accepted
    /// voucher of each, summed; deployments of one token share them), what the chain has
    /// settled of them, and the difference.
    pub units_metered: String,
    pub units_settled: String,
    pub units_pending: String,
    /// How calls are shared between versions, with each version's calls in this process: the
    /// split's versions, then any that served calls before the split changed (at 0 %).
    pub traffic: Vec<TrafficView>,
    /// Builtin deployments: how far the rows served lately (an MLP's inputs, an encoder's
    /// embeddings) have moved from the first rows served.
    pub drift: Option<drift::DriftView>,
    /// MLP deployments: how far their outputs lately have moved from their first outputs.
    pub output_drift: Option<drift::DriftView>,
}

/// One version's share of a deployment's calls and how its calls went (this process).
#[derive(Clone, Debug, PartialEq, Serialize, utoipa::ToSchema)]
pub struct TrafficView {
    pub version: u32,
    /// Whole percent of the calls it gets now.
    pub percent: u32,
    pub requests: u64,
    pub errors: u64,
    pub latency_p50_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// `http` deployments: the server that answers this version's calls, and how its last
    /// probe went (`healthy` or `unhealthy: why`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<String>,
    /// Builtin deployments whose calls went to more than one version: this version's recent
    /// rows (since the second version's first call) against the deployment's reference, so a
    /// canary whose inputs or answers differ from the others' shows it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drift: Option<drift::DriftView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_drift: Option<drift::DriftView>,
}

/// One version's share of a deployment's calls, as asked for: a version number or an alias.
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Share {
    /// A version number, or an `alias`.
    pub version: Option<u32>,
    pub alias: Option<String>,
    pub percent: u32,
    /// `http` deployments: the server that answers this version's calls; absent, the one that
    /// answers it now (the deployment's, or this version's in the split in force).
    #[serde(default)]
    pub upstream_url: Option<String>,
    /// `http` deployments: where that server is probed (GET, 2xx is healthy); absent, any
    /// answer from the upstream's origin is.
    #[serde(default)]
    pub health_url: Option<String>,
}

/// The most versions one deployment splits its calls between.
pub const MAX_SHARES: usize = 10;

/// Shares calls between versions in proportion to their percents, spread evenly (smooth
/// weighted round robin, as nginx balances its upstreams): over every 100 calls each version
/// serves exactly its percent, and a 10 % version serves every tenth call, not ten in a row.
#[derive(Clone, Debug)]
pub struct Router {
    /// (version, weight, running credit).
    versions: Vec<(u32, i64, i64)>,
}

impl Router {
    pub fn new(split: &[(u32, u32)]) -> Self {
        Self { versions: split.iter().map(|&(version, percent)| (version, i64::from(percent), 0)).collect() }
    }

    /// The version the next call goes to (none for an empty split).
    pub fn pick(&mut self) -> Option<u32> {
        let total: i64 = self.versions.iter().map(|v| v.1).sum();
        let mut best: Option<usize> = None;
        for i in 0..self.versions.len() {
            self.versions[i].2 += self.versions[i].1;
            if best.is_none_or(|b| self.versions[i].2 > self.versions[b].2) {
                best = Some(i);
            }
        }
        let best = &mut self.versions[best?];
        best.2 -= total;
        Some(best.0)
    }
}

/// Calls and their latencies (the last 10,000, in milliseconds).
#[derive(Default)]
struct Calls {
    requests: u64,
    errors: u64,
    latencies: std::collections::VecDeque<f64>,
}

impl Calls {
    fn record(&mut self, ms: f64, ok: bool) {
        self.requests += 1;
        if !ok {
            self.errors += 1;
        }
        self.latencies.push_back(ms);
        if self.latencies.len() > 10_000 {
            self.latencies.pop_front();
        }
    }

    /// The median and 99th percentile latency.
    fn percentiles(&self) -> (Option<f64>, Option<f64>) {
        let mut sorted: Vec<f64> = self.latencies.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        let at = |q: f64| sorted.get(((sorted.len() as f64 - 1.0) * q).round() as usize).copied();
        (at(0.5), at(0.99))
    }
}

#[derive(Default)]
struct Stats {
    all: Calls,
    versions: BTreeMap<u32, Calls>,
    /// `http` deployments: the last probe of the deployment's upstreams (all healthy, or the
    /// first that is not) and of each version's.
    health: Option<String>,
    version_health: BTreeMap<u32, String>,
    /// Builtin deployments, from their first call in this process on: what comes in (an MLP's
    /// inputs, an encoder's embeddings) and an MLP's outputs.
    drift: Option<drift::Drift>,
    output_drift: Option<drift::Drift>,
    /// Once calls go to more than one version: each version's recent rows against the
    /// deployment's reference.
    version_drift: BTreeMap<(u32, Watched), drift::Drift>,
}

impl Stats {
    fn tracker(&mut self, watched: Watched) -> &mut Option<drift::Drift> {
        match watched {
            Watched::Inputs => &mut self.drift,
            Watched::Outputs => &mut self.output_drift,
        }
    }
}

/// Which rows of a deployment a drift tracker follows, and where its reference is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Watched {
    Inputs,
    Outputs,
}

impl Watched {
    fn load(
        self,
        store: &Store,
        id: u64,
    ) -> Result<(Option<drift::Reference>, Option<drift::Bins>), StoreError> {
        Ok(match self {
            Self::Inputs => (store.get::<DeploymentDrift>(&id)?, store.get::<DeploymentDriftBins>(&id)?),
            Self::Outputs => {
                (store.get::<DeploymentOutputDrift>(&id)?, store.get::<DeploymentOutputDriftBins>(&id)?)
            }
        })
    }

    fn save(self, batch: &mut crate::store::Batch<'_>, id: u64, d: &drift::Drift) -> Result<(), StoreError> {
        match self {
            Self::Inputs => batch.put::<DeploymentDrift>(&id, d.reference())?,
            Self::Outputs => batch.put::<DeploymentOutputDrift>(&id, d.reference())?,
        }
        match (self, d.bins()) {
            (Self::Inputs, Some(bins)) => batch.put::<DeploymentDriftBins>(&id, bins),
            (Self::Outputs, Some(bins)) => batch.put::<DeploymentOutputDriftBins>(&id, bins),
            (_, None) => Ok(()),
        }
    }

    /// Deletes what either tracker keeps of deployment `id`.
    fn forget_all(batch: &mut crate::store::Batch<'_>, id: u64) {
        batch.delete::<DeploymentDrift>(&id);
        batch.delete::<DeploymentDriftBins>(&id);
        batch.delete::<DeploymentOutputDrift>(&id);
        batch.delete::<DeploymentOutputDriftBins>(&id);
    }

    /// The gauges of its score and PSI.
    fn gauges(self) -> (&'static str, &'static str) {
        match self {
            Self::Inputs => ("agora_deployment_input_drift", "agora_deployment_input_psi"),
            Self::Outputs => ("agora_deployment_output_drift", "agora_deployment_output_psi"),
        }
    }

    /// The gauges of one version's score and PSI.
    fn version_gauges(self) -> (&'static str, &'static str) {
        match self {
            Self::Inputs => ("agora_deployment_version_input_drift", "agora_deployment_version_input_psi"),
            Self::Outputs => ("agora_deployment_version_output_drift", "agora_deployment_version_output_psi"),
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Inputs => "input",
            Self::Outputs => "output",
        }
    }
}

/// Loaded models and when each was last used.
type ModelCache = HashMap<[u8; 32], (Arc<Loaded>, Instant)>;

/// A model in the cache with the batcher of its calls (they leave the cache together).
struct Loaded {
    network: Network,
    batcher: Batcher,
}

/// What the builtin runtime runs.
pub enum Network {
    Mlp(Mlp),
    Encoder(Box<encoder::Encoder>),
}

/// One input of a call: a row of numbers (MLP) or a text (encoder).
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum Row {
    Numbers(Vec<f32>),
    Text(String),
}

impl Row {
    fn numbers(&self) -> Option<&[f32]> {
        match self {
            Row::Numbers(r) => Some(r),
            Row::Text(_) => None,
        }
    }

    fn text(&self) -> Option<&str> {
        match self {
            Row::Text(t) => Some(t),
            Row::Numbers(_) => None,
        }
    }
}

impl Network {
    fn bytes(&self) -> u64 {
        match self {
            Network::Mlp(m) => m.bytes,
            Network::Encoder(e) => e.bytes,
        }
    }

    /// Whether a row is of the kind the network takes (a malformed row's call runs alone).
    fn takes(&self, row: &Row) -> bool {
        match (self, row) {
            (Network::Mlp(m), Row::Numbers(r)) => r.len() == m.inputs(),
            (Network::Encoder(_), Row::Text(_)) => true,
            _ => false,
        }
    }

    pub fn forward(&self, rows: &[Row]) -> Outputs {
        match self {
            Network::Mlp(mlp) => {
                let numbers = rows_as(rows, Row::numbers, |i| {
                    format!("input row {i} is a text; the model takes rows of {} numbers", mlp.inputs())
                })?;
                mlp.forward(&numbers)
            }
            Network::Encoder(encoder) => {
                let texts = rows_as(rows, Row::text, |i| {
                    format!("input {i} is a row of numbers; the model takes texts")
                })?;
                encoder.forward(&texts)
            }
        }
    }
}

/// The rows as the kind a network takes, borrowed; the first of another kind is a bad request.
fn rows_as<'a, T>(
    rows: &'a [Row],
    pick: impl Fn(&'a Row) -> Option<T>,
    wrong: impl Fn(usize) -> String,
) -> Result<Vec<T>, ServeError> {
    rows.iter().enumerate().map(|(i, row)| pick(row).ok_or_else(|| invalid(wrong(i)))).collect()
}

/// Calls on one model that arrive together run as one forward pass. Each caller queues its
/// rows and waits its turn to run; the caller whose turn comes runs everything queued by then
/// (its own rows and those of every caller that arrived while the previous pass ran) and hands
/// each caller its rows' outputs. Nobody waits on a timer: a lone call runs at once.
#[derive(Default)]
pub struct Batcher {
    queue: Mutex<Vec<Job>>,
    turn: Mutex<()>,
    /// Passes run and calls served (calls / passes is the mean batch).
    pub passes: std::sync::atomic::AtomicU64,
    pub calls: std::sync::atomic::AtomicU64,
}

type Outputs = Result<Vec<Vec<f32>>, ServeError>;

struct Job {
    rows: Vec<Row>,
    reply: std::sync::mpsc::Sender<Outputs>,
}

impl Batcher {
    pub fn run(&self, network: &Network, rows: Vec<Row>) -> Outputs {
        let (reply, answer) = std::sync::mpsc::channel();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).push(Job { rows, reply });
        let turn = self.turn.lock().unwrap_or_else(|p| p.into_inner());
        if let Ok(outputs) = answer.try_recv() {
            // The previous pass took these rows along.
            return outputs;
        }
        let jobs = std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()));
        // A call with malformed rows runs alone, so its error is its own.
        let (mut good, bad): (Vec<Job>, Vec<Job>) =
            jobs.into_iter().partition(|j| !j.rows.is_empty() && j.rows.iter().all(|r| network.takes(r)));
        for job in bad {
            let _ = job.reply.send(network.forward(&job.rows));
        }
        if !good.is_empty() {
            // The rows move into one batch; each caller's outputs are cut back out by count.
            let counts: Vec<usize> = good.iter().map(|j| j.rows.len()).collect();
            let all: Vec<Row> = good.iter_mut().flat_map(|j| std::mem::take(&mut j.rows)).collect();
            self.passes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.calls.fetch_add(good.len() as u64, std::sync::atomic::Ordering::Relaxed);
            metrics::histogram!("agora_serve_batch_calls").record(good.len() as f64);
            match network.forward(&all) {
                Ok(mut outputs) => {
                    for (job, count) in good.into_iter().zip(counts).rev() {
                        let mine = outputs.split_off(outputs.len() - count);
                        let _ = job.reply.send(Ok(mine));
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for job in good {
                        let _ = job.reply.send(Err(ServeError::Model(message.clone())));
                    }
                }
            }
        }
        drop(turn);
        answer.recv().unwrap_or_else(|_| Err(ServeError::Model("the batch runner stopped".into())))
    }
}

#[derive(Clone)]
pub struct Serve {
    store: Store,
    registry: Registry,
    artifacts: ArtifactStore,
    tmp: std::path::PathBuf,
    cache_limit: u64,
    /// Loaded models by blake3 of (weights', config's and tokenizer's hashes), with when they
    /// were last used.
    models: Arc<Mutex<ModelCache>>,
    stats: Arc<Mutex<HashMap<u64, Stats>>>,
    /// Traffic splits by deployment, read from the store at a deployment's first call (none:
    /// every call goes to its version).
    routes: Arc<Mutex<HashMap<u64, Option<Router>>>>,
    write: Arc<Mutex<()>>,
    /// For `http` deployments: the client, and the runtime that blocking threads run it on.
    http: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl Serve {
    pub fn new(
        store: Store,
        registry: Registry,
        artifacts: ArtifactStore,
        tmp: std::path::PathBuf,
        cache_limit: u64,
    ) -> Self {
        Self {
            store,
            registry,
            artifacts,
            tmp,
            cache_limit,
            models: Arc::default(),
            stats: Arc::default(),
            routes: Arc::default(),
            write: Arc::default(),
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(60))
                .build()
                .unwrap_or_default(),
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Deploys a version (the model's owner or an operator): loads it to check it runs.
    pub fn create(&self, ctx: &Context, spec: NewDeployment) -> Result<DeploymentView, ServeError> {
        let NewDeployment { model, version, alias, runtime, unit_cost, upstream } = spec;
        let (model, runtime) = (model.as_str(), runtime.as_str());
        match (runtime, &upstream) {
            ("builtin", None) => {}
            ("builtin", Some(_)) => return Err(invalid("the builtin runtime takes no upstream_url")),
            ("http", Some(u)) => {
                check_url("upstream_url", &u.url)?;
                if let Some(h) = &u.health_url {
                    check_url("health_url", h)?;
                }
            }
            ("http", None) => return Err(invalid("the http runtime needs an upstream_url")),
            _ => {
                return Err(invalid(format!(
                    "runtime {runtime:?} is not available on this node; use \"builtin\" or \"http\""
                )));
            }
        }
        let view = match (version, alias) {
            (Some(v), _) => self.registry.version(model, v)?,
            (None, Some(a)) => self.registry.by_alias(model, &a)?,
            (None, None) => self
                .registry
                .versions(model)?
                .into_iter()
                .next()
                .ok_or_else(|| invalid(format!("'{model}' has no versions")))?,
        };
        self.registry.authorize(&ctx.actor, &view.model)?;
        // An http deployment runs elsewhere: its health is probed, not its weights loaded.
        let loaded = if upstream.is_some() { Ok(()) } else { self.load(&view).map(|_| ()) };
        let (status, reason) = match loaded {
            Ok(()) => ("ready".to_owned(), None),
            Err(e) => ("failed".to_owned(), Some(e.to_string())),
        };
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let id = match self.store.get::<Meta>(&MetaKey::NextDeployment)? {
            Some(MetaValue::Count(n)) => n,
            _ => 1,
        };
        let record = DeploymentRecord {
            id,
            model: model.to_owned(),
            version: view.version.version,
            runtime: runtime.to_owned(),
            unit_cost,
            status,
            reason,
            created_ms: now_ms(),
            actor: ctx.actor.id(),
        };
        let mut batch = self.store.batch();
        batch.put::<Meta>(&MetaKey::NextDeployment, &MetaValue::Count(id + 1))?;
        batch.put::<Deployments>(&id, &record)?;
        if let Some(upstream) = &upstream {
            batch.put::<DeploymentUpstreams>(&id, upstream)?;
        }
        let object = format!("deployment:{id} model:{model}/{}", record.version);
        self.audited(ctx, batch, "deployment.create", &object)?;
        self.view(&record)
    }

    fn view(&self, r: &DeploymentRecord) -> Result<DeploymentView, ServeError> {
        let token = self.token_of(r)?;
        let usage = match token {
            Some(token) => settle::UsageTotals::of_token(&self.store, token)?,
            None => settle::UsageTotals::default(),
        };
        let split = match self.store.get::<DeploymentTraffic>(&r.id)? {
            Some(traffic) => traffic.split,
            None => vec![(r.version, 100)],
        };
        let upstreams = if r.runtime == "http" { self.upstreams(r)? } else { Vec::new() };
        // the deployment's own upstream is its version's
        let upstream_url = upstreams.iter().find(|(v, _)| *v == r.version).map(|(_, u)| u.url.clone());
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let none = Stats::default();
        let s = stats.get(&r.id).unwrap_or(&none);
        let (p50, p99) = s.all.percentiles();
        let former = s.versions.keys().filter(|v| !split.iter().any(|(w, _)| w == *v)).map(|v| (*v, 0));
        let traffic = split
            .iter()
            .copied()
            .chain(former)
            .map(|(version, percent)| {
                let calls = s.versions.get(&version).unwrap_or(&none.all);
                let (latency_p50_ms, latency_p99_ms) = calls.percentiles();
                let upstream = upstreams.iter().find(|(v, _)| *v == version);
                TrafficView {
                    version,
                    percent,
                    requests: calls.requests,
                    errors: calls.errors,
                    latency_p50_ms,
                    latency_p99_ms,
                    upstream_url: upstream.map(|(_, u)| u.url.clone()),
                    health: upstream.and_then(|_| s.version_health.get(&version).cloned()),
                    drift: s.version_drift.get(&(version, Watched::Inputs)).map(drift::Drift::view),
                    output_drift: s.version_drift.get(&(version, Watched::Outputs)).map(drift::Drift::view),
                }
            })
            .collect();
        let (requests, errors, health) = (s.all.requests, s.all.errors, s.health.clone());
        let drift_of = |tracker: &Option<drift::Drift>, watched: Watched| match tracker {
            Some(d) => Ok(Some(d.view())),
            // not called yet in this process: the stored reference, if any
            None => watched.load(&self.store, r.id).map(|(reference, bins)| {
                reference
                    .map(|reference| drift::Drift::new(reference.means.len(), Some(reference), bins).view())
            }),
        };
        let drift = drift_of(&s.drift, Watched::Inputs)?;
        let output_drift = drift_of(&s.output_drift, Watched::Outputs)?;
        drop(stats);
        Ok(DeploymentView {
            deployment_id: r.id.to_string(),
            model: r.model.clone(),
            version: r.version,
            runtime: r.runtime.clone(),
            token_id: token.map(|t| t.to_string()),
            status: r.status.clone(),
            reason: r.reason.clone(),
            unit_cost: r.unit_cost,
            requests,
            errors,
            latency_p50_ms: p50,
            latency_p99_ms: p99,
            created_at: r.created_ms,
            upstream_url,
            health,
            units_metered: usage.metered.to_string(),
            units_settled: usage.settled.to_string(),
            units_pending: usage.pending().to_string(),
            traffic,
            drift,
            output_drift,
        })
    }

    /// The token whose licenses open a deployment: where its version's file is anchored.
    pub fn token_of(&self, r: &DeploymentRecord) -> Result<Option<U256>, ServeError> {
        let view = match self.registry.version(&r.model, r.version) {
            Ok(view) => view,
            Err(RegistryError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(view.anchored.and_then(|a| a.token_id.parse().ok()))
    }

    /// The stored deployment (what a call needs; no statistics).
    pub fn record(&self, id: u64) -> Result<DeploymentRecord, ServeError> {
        self.store.get::<Deployments>(&id)?.ok_or(ServeError::NotFound(id))
    }

    /// The deployment as shown, with its statistics.
    pub fn get(&self, id: u64) -> Result<DeploymentView, ServeError> {
        self.view(&self.record(id)?)
    }

    pub fn list(&self) -> Result<Vec<DeploymentView>, ServeError> {
        self.store.iter::<Deployments>().map(|item| self.view(&item?.1)).collect()
    }

    /// Whether `ctx` may change a deployment: its model's owner or an operator.
    fn authorize_change(
        &self,
        ctx: &Context,
        record: &DeploymentRecord,
        what: &str,
    ) -> Result<(), ServeError> {
        let model = self.registry.require_model(&record.model).ok();
        let allowed = match &ctx.actor {
            crate::registry::Actor::Operator => true,
            crate::registry::Actor::Wallet(a) => model.is_some_and(|m| m.owner == Some(*a)),
            crate::registry::Actor::Anonymous => false,
        };
        if !allowed {
            return Err(ServeError::Forbidden(format!(
                "only the owner of '{}' or an operator {what}",
                record.model
            )));
        }
        Ok(())
    }

    pub fn delete(&self, ctx: &Context, id: u64) -> Result<(), ServeError> {
        let record = self.record(id)?;
        self.authorize_change(ctx, &record, "removes its deployments")?;
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = self.store.batch();
        batch.delete::<Deployments>(&id);
        batch.delete::<DeploymentUpstreams>(&id);
        batch.delete::<DeploymentTraffic>(&id);
        batch.delete::<DeploymentSplitUpstreams>(&id);
        Watched::forget_all(&mut batch, id);
        self.audited(ctx, batch, "deployment.delete", &format!("deployment:{id}"))?;
        routes.remove(&id);
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        Ok(())
    }

    /// Loads (or finds in the cache) the MLP of a version.
    fn load(&self, view: &crate::registry::VersionView) -> Result<Arc<Loaded>, ServeError> {
        let file = view
            .version
            .file
            .as_ref()
            .ok_or_else(|| ServeError::Model("the version has no model file on this node".into()))?;
        let dir = view
            .version
            .artifact_dir
            .clone()
            .ok_or_else(|| ServeError::Model("the version has no files on this node".into()))?;
        let config_file = self.registry.file(&format!("{dir}/config.json"))?.ok_or_else(|| {
            ServeError::Model("the version has no config.json saying which model family it is".into())
        })?;
        let tokenizer_file = self.registry.file(&format!("{dir}/tokenizer.json"))?;
        // The same weights under another config are another model; all are content-addressed,
        // so their hashes name the loaded network without reading any.
        let mut key = blake3::Hasher::new();
        key.update(&file.blake3).update(&config_file.blake3);
        if let Some(t) = &tokenizer_file {
            key.update(&t.blake3);
        }
        let key = *key.finalize().as_bytes();
        if let Some((loaded, used)) = self.models.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&key) {
            *used = Instant::now();
            return Ok(loaded.clone());
        }
        let read = |blake3: &[u8; 32]| -> Result<Vec<u8>, ServeError> {
            let mut bytes = Vec::new();
            self.artifacts.copy_to(blake3, &mut bytes).map_err(|e| ServeError::Model(e.to_string()))?;
            Ok(bytes)
        };
        let config_bytes = read(&config_file.blake3)?;
        let config: serde_json::Value = serde_json::from_slice(&config_bytes)
            .map_err(|e| ServeError::Model(format!("config.json: {e}")))?;
        std::fs::create_dir_all(&self.tmp).map_err(|e| ServeError::Model(e.to_string()))?;
        let weights = tempfile::Builder::new()
            .prefix("serve-")
            .tempfile_in(&self.tmp)
            .map_err(|e| ServeError::Model(e.to_string()))?;
        self.artifacts
            .copy_to(&file.blake3, weights.as_file())
            .map_err(|e| ServeError::Model(e.to_string()))?;
        let tensors = candle_core::safetensors::load(weights.path(), &Device::Cpu).map_err(model_error)?;
        let network = if encoder::is_bert(&config) {
            let tokenizer = tokenizer_file.ok_or_else(|| {
                ServeError::Model(
                    "config.json describes a BERT encoder, but no tokenizer.json sits next to the weights"
                        .into(),
                )
            })?;
            Network::Encoder(Box::new(encoder::Encoder::new(
                &config_bytes,
                &read(&tokenizer.blake3)?,
                tensors,
            )?))
        } else if config.get("layers").is_some() {
            let config: MlpConfig =
                serde_json::from_value(config).map_err(|e| ServeError::Model(format!("config.json: {e}")))?;
            Network::Mlp(Mlp::new(config, tensors)?)
        } else {
            return Err(ServeError::Model(
                "config.json describes neither an MLP (`layers`) nor a BERT encoder (`model_type: \"bert\"`)"
                    .into(),
            ));
        };
        let loaded = Arc::new(Loaded { network, batcher: Batcher::default() });
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.insert(key, (loaded.clone(), Instant::now()));
        let mut total: u64 = models.values().map(|(m, _)| m.network.bytes()).sum();
        while total > self.cache_limit && models.len() > 1 {
            let Some(oldest) = models.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| *k) else {
                break;
            };
            if let Some((m, _)) = models.remove(&oldest) {
                total -= m.network.bytes();
            }
        }
        Ok(loaded)
    }

    /// Shares a deployment's calls between versions of its model (the model's owner or an
    /// operator): whole percents summing to 100, every version anchored to the token the
    /// deployment's licenses are of (or all not anchored), and every version loaded to check it
    /// runs before anything changes. The version with the largest share becomes the
    /// deployment's `version`; a split of one version at 100 % moves the deployment to it.
    pub fn set_traffic(
        &self,
        ctx: &Context,
        id: u64,
        shares: Vec<Share>,
    ) -> Result<DeploymentView, ServeError> {
        let record = self.record(id)?;
        self.authorize_change(ctx, &record, "splits its deployments' traffic")?;
        let http = record.runtime == "http";
        let serving = if http { self.upstreams(&record)? } else { Vec::new() };
        if shares.is_empty() || shares.len() > MAX_SHARES {
            return Err(invalid(format!("`split` takes 1 to {MAX_SHARES} versions, not {}", shares.len())));
        }
        let token = self.token_of(&record)?;
        let mut split: Vec<(u32, u32)> = Vec::with_capacity(shares.len());
        let mut views = Vec::with_capacity(shares.len());
        let mut upstreams: Vec<(u32, UpstreamRecord)> = Vec::new();
        for share in shares {
            let view = match (share.version, &share.alias) {
                (Some(v), None) => self.registry.version(&record.model, v)?,
                (None, Some(alias)) => self.registry.by_alias(&record.model, alias)?,
                _ => {
                    return Err(invalid(
                        "each share of `split` names a `version` or an `alias`, one of them",
                    ));
                }
            };
            let version = view.version.version;
            if !(1..=100).contains(&share.percent) {
                return Err(invalid(format!(
                    "version {version} is given {} percent; a share is 1 to 100",
                    share.percent
                )));
            }
            if split.iter().any(|(v, _)| *v == version) {
                return Err(invalid(format!("version {version} appears twice in `split`")));
            }
            let anchored: Option<U256> = view.anchored.as_ref().and_then(|a| a.token_id.parse().ok());
            if anchored != token {
                let of = |t: Option<U256>| {
                    t.map_or("not anchored on-chain".to_owned(), |t| format!("of token {t}"))
                };
                return Err(ServeError::Unacceptable(format!(
                    "version {version} is {}, while the deployment's licenses are {}: one license must open \
                     every version a call may reach, so deploy it on its own",
                    of(anchored),
                    of(token)
                )));
            }
            if http {
                let upstream = match (share.upstream_url, share.health_url) {
                    (Some(url), health_url) => {
                        check_url("upstream_url", &url)?;
                        if let Some(h) = &health_url {
                            check_url("health_url", h)?;
                        }
                        UpstreamRecord { url, health_url }
                    }
                    (None, None) => serving.iter().find(|(v, _)| *v == version).map(|(_, u)| u.clone()).ok_or_else(
                        || {
                            invalid(format!(
                                "version {version} needs an upstream_url: an http deployment sends each version's \
                                 calls to its own server, and none answers version {version} yet"
                            ))
                        },
                    )?,
                    (None, Some(_)) => {
                        return Err(invalid(format!("version {version} has a health_url without an upstream_url")));
                    }
                };
                upstreams.push((version, upstream));
            } else if share.upstream_url.is_some() || share.health_url.is_some() {
                return Err(invalid(format!(
                    "deployment {id} runs its versions itself (builtin): a share takes no upstream_url or health_url"
                )));
            }
            split.push((version, share.percent));
            views.push(view);
        }
        let total: u32 = split.iter().map(|(_, p)| p).sum();
        if total != 100 {
            return Err(invalid(format!("the shares of `split` sum to {total} percent, not 100")));
        }
        // an http deployment's versions run elsewhere: their servers are probed, not loaded
        for view in views.iter().filter(|_| !http) {
            self.load(view).map_err(|e| match e {
                ServeError::Model(why) => {
                    ServeError::Model(format!("version {}: {why}", view.version.version))
                }
                e => e,
            })?;
        }
        // the largest share; the first listed among equal ones (max_by_key keeps the last)
        let primary = split.iter().rev().max_by_key(|(_, percent)| *percent).copied().unwrap_or(split[0]);
        let record = {
            let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let mut record = self.record(id)?;
            record.version = primary.0;
            record.status = "ready".into();
            record.reason = None;
            let mut batch = self.store.batch();
            batch.put::<Deployments>(&id, &record)?;
            if split.len() == 1 {
                batch.delete::<DeploymentTraffic>(&id);
                batch.delete::<DeploymentSplitUpstreams>(&id);
            } else {
                batch.put::<DeploymentTraffic>(&id, &TrafficRecord { split: split.clone() })?;
                if http {
                    batch.put::<DeploymentSplitUpstreams>(&id, &upstreams)?;
                }
            }
            // the deployment's own upstream is its main version's
            if let Some((_, main)) = upstreams.iter().find(|(v, _)| *v == primary.0) {
                batch.put::<DeploymentUpstreams>(&id, main)?;
            }
            let shown: Vec<String> = split.iter().map(|(v, p)| format!("{v}={p}")).collect();
            let object = format!("deployment:{id} model:{} split:{}", record.model, shown.join(","));
            self.audited(ctx, batch, "deployment.traffic", &object)?;
            routes.insert(id, (split.len() > 1).then(|| Router::new(&split)));
            record
        };
        self.view(&record)
    }

    /// The version a deployment's next call goes to.
    fn route(&self, record: &DeploymentRecord) -> Result<u32, ServeError> {
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let route = match routes.entry(record.id) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(self.store.get::<DeploymentTraffic>(&record.id)?.map(|t| Router::new(&t.split)))
            }
        };
        Ok(route.as_mut().and_then(Router::pick).unwrap_or(record.version))
    }

    /// Runs a batch on a ready deployment (on the version its traffic split picks) and records
    /// its latency; answers with the version that ran it.
    pub fn predict(
        &self,
        record: &DeploymentRecord,
        rows: Vec<Row>,
    ) -> Result<(u32, Vec<Vec<f32>>), ServeError> {
        if record.status != "ready" {
            return Err(ServeError::NotReady {
                id: record.id,
                reason: record.reason.clone().unwrap_or_default(),
            });
        }
        if rows.is_empty() {
            return Err(invalid("`inputs` holds no rows"));
        }
        let started = Instant::now();
        let mut version = self.route(record)?;
        let mut found = self.registry.version(&record.model, version);
        if matches!(found, Err(RegistryError::NotFound(_))) && version != record.version {
            // a version of the split deleted from the registry: its share goes to the main one
            version = record.version;
            found = self.registry.version(&record.model, version);
        }
        let result = found.map_err(ServeError::from).and_then(|view| self.load(&view)).and_then(|loaded| {
            match &loaded.network {
                Network::Mlp(mlp) => {
                    let at = (record.id, version);
                    self.observe(at, Watched::Inputs, mlp.inputs(), rows.iter().filter_map(Row::numbers));
                    let outputs = loaded.batcher.run(&loaded.network, rows)?;
                    let width = outputs.first().map_or(0, Vec::len);
                    self.observe(at, Watched::Outputs, width, outputs.iter().map(Vec::as_slice));
                    Ok(outputs)
                }
                // texts drift where the model puts them: in their embeddings
                Network::Encoder(_) => {
                    let embeddings = loaded.batcher.run(&loaded.network, rows)?;
                    let width = embeddings.first().map_or(0, Vec::len);
                    self.observe(
                        (record.id, version),
                        Watched::Inputs,
                        width,
                        embeddings.iter().map(Vec::as_slice),
                    );
                    Ok(embeddings)
                }
            }
        });
        self.count(record.id, version, started, result.is_ok());
        result.map(|outputs| (version, outputs))
    }

    /// Follows the drift of a deployment's rows: its inputs (an MLP's numbers, an encoder's
    /// embeddings) or an MLP's outputs; and, once its calls have gone to more than one version,
    /// the rows of the version that served them against the deployment's reference.
    fn observe<'r>(
        &self,
        (id, version): (u64, u32),
        watched: Watched,
        width: usize,
        rows: impl Iterator<Item = &'r [f32]>,
    ) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = stats.entry(id).or_default();
        let split = s.versions.keys().any(|v| *v != version);
        let rows: Vec<&[f32]> = rows.collect();
        let version_view =
            if split { Self::observe_version(s, version, watched, width, &rows) } else { None };
        let tracker = s.tracker(watched);
        if tracker.as_ref().is_none_or(|d| d.width() != width.min(drift::MAX_FEATURES)) {
            let (reference, bins) = watched.load(&self.store, id).unwrap_or_else(|e| {
                tracing::warn!(target: "agora::serve", deployment = id, error = %e, "cannot read the {} drift reference; starting a new one", watched.what());
                (None, None)
            });
            *tracker = Some(drift::Drift::new(width, reference, bins));
        }
        let Some(d) = tracker.as_mut() else { return };
        let before = d.observed();
        let mut completed = false;
        for row in rows {
            completed |= d.observe(row);
        }
        if completed {
            // versions' windows follow the reference in force
            s.version_drift.retain(|(_, w), _| *w != watched);
        }
        let Some(d) = s.tracker(watched).as_mut() else { return };
        // stored under the lock, so a rebaseline cannot come between; the reference and its
        // bins together
        if completed {
            let mut batch = self.store.batch();
            let written = watched.save(&mut batch, id, d).and_then(|()| self.store.write(batch));
            if let Err(e) = written {
                tracing::warn!(target: "agora::serve", deployment = id, error = %e, "cannot store the {} drift reference; it is kept in memory", watched.what());
            }
        }
        // the gauges move every 100 rows, not on every call
        let view = (d.observed() / 100 != before / 100).then(|| d.view());
        drop(stats);
        if let Some(view) = version_view {
            let (drift_gauge, psi_gauge) = watched.version_gauges();
            let labels = [("deployment", id.to_string()), ("version", version.to_string())];
            if let Some(score) = view.score {
                metrics::gauge!(drift_gauge, &labels).set(score);
            }
            if let Some(psi) = view.psi {
                metrics::gauge!(psi_gauge, &labels).set(psi);
            }
        }
        if let Some(view) = view {
            let (id, (drift_gauge, psi_gauge)) = (id.to_string(), watched.gauges());
            if let Some(score) = view.score {
                metrics::gauge!(drift_gauge, "deployment" => id.clone()).set(score);
            }
            if let Some(psi) = view.psi {
                metrics::gauge!(psi_gauge, "deployment" => id).set(psi);
            }
        }
    }

    /// Takes `rows` into `version`'s window of `watched`, made from the deployment's reference
    /// once that is complete; its view when the gauges are due (every 100 rows).
    fn observe_version(
        s: &mut Stats,
        version: u32,
        watched: Watched,
        width: usize,
        rows: &[&[f32]],
    ) -> Option<drift::DriftView> {
        let width = width.min(drift::MAX_FEATURES);
        // the fields, not `tracker`, so the windows can be borrowed beside the reference
        let reference = match watched {
            Watched::Inputs => s.drift.as_ref(),
            Watched::Outputs => s.output_drift.as_ref(),
        };
        let reference =
            reference.filter(|d| d.reference().complete() && d.bins().is_some() && d.width() == width)?;
        let window = s.version_drift.entry((version, watched)).or_insert_with(|| {
            drift::Drift::new(width, Some(reference.reference().clone()), reference.bins().cloned())
        });
        if window.width() != width {
            return None;
        }
        let before = window.observed();
        for row in rows {
            window.observe(row);
        }
        (window.observed() / 100 != before / 100).then(|| window.view())
    }

    /// A deployment's drift now, of its inputs and of its outputs (none until its first call in
    /// this process).
    pub fn drift(&self, id: u64) -> (Option<drift::DriftView>, Option<drift::DriftView>) {
        let stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = stats.get(&id) else { return (None, None) };
        (s.drift.as_ref().map(drift::Drift::view), s.output_drift.as_ref().map(drift::Drift::view))
    }

    /// Starts a deployment's drift references (inputs and outputs) again from its next rows
    /// (after a retraining, or when the owner accepts the inputs as they are now).
    pub fn rebaseline(&self, id: u64) -> Result<(), ServeError> {
        self.forget_drift(id, None)
    }

    /// Forgets a deployment's drift references, with an audit entry when `by` asked for it.
    fn forget_drift(&self, id: u64, by: Option<&Context>) -> Result<(), ServeError> {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let mut batch = self.store.batch();
        Watched::forget_all(&mut batch, id);
        match by {
            Some(ctx) => self.audited(ctx, batch, "deployment.drift_reset", &format!("deployment:{id}"))?,
            None => self.store.write(batch)?,
        }
        if let Some(s) = stats.get_mut(&id) {
            (s.drift, s.output_drift) = (None, None);
            s.version_drift.clear();
        }
        Ok(())
    }

    /// [`Self::rebaseline`] as asked over the API (the model's owner or an operator).
    pub fn reset_drift(&self, ctx: &Context, id: u64) -> Result<DeploymentView, ServeError> {
        let record = self.record(id)?;
        self.authorize_change(ctx, &record, "resets its deployments' drift")?;
        self.forget_drift(id, Some(ctx))?;
        self.view(&record)
    }

    /// Writes `batch` with its audit entry: the change and the entry are stored together.
    fn audited(
        &self,
        ctx: &Context,
        batch: crate::store::Batch<'_>,
        action: &str,
        object: &str,
    ) -> Result<(), ServeError> {
        let entry = crate::audit::Entry {
            actor: &ctx.actor.id(),
            action,
            object,
            request_id: ctx.request_id.as_deref(),
        };
        crate::audit::Audit::new(self.store.clone()).commit(batch, entry)?;
        Ok(())
    }

    /// Counts a call of a deployment's version, here and in the metrics.
    fn count(&self, id: u64, version: u32, started: Instant, ok: bool) {
        let elapsed = started.elapsed().as_secs_f64();
        let labels = [("deployment", id.to_string()), ("version", version.to_string())];
        metrics::histogram!("agora_deployment_call_duration_seconds", &labels).record(elapsed);
        if !ok {
            metrics::counter!("agora_deployment_call_errors_total", &labels).increment(1);
        }
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        let s = stats.entry(id).or_default();
        s.all.record(elapsed * 1e3, ok);
        s.versions.entry(version).or_default().record(elapsed * 1e3, ok);
    }

    /// An `http` deployment's upstreams by version: each version's of its split, or its own
    /// for its version (none for a builtin deployment).
    fn upstreams(&self, record: &DeploymentRecord) -> Result<Vec<(u32, UpstreamRecord)>, ServeError> {
        if let Some(split) = self.store.get::<DeploymentSplitUpstreams>(&record.id)? {
            return Ok(split);
        }
        Ok(self
            .store
            .get::<DeploymentUpstreams>(&record.id)?
            .map(|u| (record.version, u))
            .into_iter()
            .collect())
    }

    /// Sends a call to the upstream of the version an `http` deployment's split picks (from a
    /// blocking thread) and returns that version, the status and the body. Only a 2xx answer
    /// counts as served.
    pub fn forward(&self, record: &DeploymentRecord, body: &[u8]) -> Result<(u32, u16, Vec<u8>), ServeError> {
        let started = Instant::now();
        let mut version = self.route(record)?;
        let mut upstreams = self.upstreams(record)?;
        let upstream = match upstreams.iter().position(|(v, _)| *v == version) {
            Some(at) => upstreams.swap_remove(at).1,
            // the split changed since the route was read: the deployment's own upstream
            None => {
                version = record.version;
                self.store.get::<DeploymentUpstreams>(&record.id)?.ok_or_else(|| {
                    ServeError::Upstream(format!("deployment {} has no upstream", record.id))
                })?
            }
        };
        let call =
            self.http.post(&upstream.url).header("content-type", "application/json").body(body.to_vec());
        let result = self.runtime.block_on(async move {
            let response = call.send().await.map_err(|e| ServeError::Upstream(e.to_string()))?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(|e| ServeError::Upstream(e.to_string()))?;
            if !status.is_success() {
                return Err(ServeError::Upstream(format!(
                    "it answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(500)])
                )));
            }
            Ok((status.as_u16(), bytes.to_vec()))
        });
        self.count(record.id, version, started, result.is_ok());
        result.map(|(status, bytes)| (version, status, bytes))
    }

    /// Probes every `http` deployment's upstream until `shutdown`.
    pub async fn probe_upstreams(
        self,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.changed() => if *shutdown.borrow() { return },
                _ = tick.tick() => {}
            }
            let deployments: Vec<DeploymentRecord> = self
                .store
                .iter::<Deployments>()
                .filter_map(|item| item.ok())
                .map(|(_, record)| record)
                .filter(|record| record.runtime == "http")
                .collect();
            // every server at once: one that does not answer holds no other's probe up
            let servers: Vec<(u64, u32, UpstreamRecord)> = deployments
                .iter()
                .filter_map(|record| Some((record.id, self.upstreams(record).ok()?)))
                .flat_map(|(id, upstreams)| upstreams.into_iter().map(move |(v, u)| (id, v, u)))
                .collect();
            let healths =
                futures::future::join_all(servers.iter().map(|(_, _, upstream)| self.probe(upstream))).await;
            let mut by_deployment: BTreeMap<u64, BTreeMap<u32, String>> = BTreeMap::new();
            for ((id, version, _), health) in servers.into_iter().zip(healths) {
                by_deployment.entry(id).or_default().insert(version, health);
            }
            for (id, probed) in by_deployment {
                // healthy when every version's server is; else the first that is not
                let health = probed.iter().find(|(_, h)| *h != "healthy").map_or_else(
                    || "healthy".to_owned(),
                    |(v, h)| match probed.len() {
                        1 => h.clone(),
                        _ => format!("{h} (version {v})"),
                    },
                );
                let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
                let s = stats.entry(id).or_default();
                if s.health.as_deref() != Some(health.as_str()) {
                    tracing::info!(target: "agora::serve", deployment = id, %health, "upstream health");
                }
                s.health = Some(health);
                s.version_health = probed;
            }
        }
    }

    async fn probe(&self, upstream: &UpstreamRecord) -> String {
        let (url, any_answer) = match &upstream.health_url {
            Some(h) => (h.clone(), false),
            None => match url::Url::parse(&upstream.url) {
                Ok(u) => (u.origin().ascii_serialization(), true),
                Err(e) => return format!("unhealthy: {e}"),
            },
        };
        match self.http.get(&url).timeout(std::time::Duration::from_secs(5)).send().await {
            Ok(r) if any_answer || r.status().is_success() => "healthy".into(),
            Ok(r) => format!("unhealthy: {url} answered {}", r.status()),
            Err(e) => format!("unhealthy: {e}"),
        }
    }
}

/// Rows in a call, for metering: our `{"inputs": [[…], …]}`, KServe v2's first input tensor's
/// batch dimension (`inputs[0].shape[0]`), or an OpenAI-style `input` list; 1 otherwise.
pub fn rows_of(body: &serde_json::Value) -> u64 {
    let rows = match body.get("inputs").and_then(|v| v.as_array()) {
        Some(inputs) => match inputs.first() {
            Some(first) if first.is_object() => first["shape"].get(0).and_then(|d| d.as_u64()).unwrap_or(1),
            _ => inputs.len() as u64,
        },
        None => body.get("input").and_then(|v| v.as_array()).map_or(1, |a| a.len() as u64),
    };
    rows.max(1)
}

fn check_url(what: &str, url: &str) -> Result<(), ServeError> {
    match url::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(()),
        Ok(_) => Err(invalid(format!("{what} {url:?} must be an http or https URL"))),
        Err(e) => Err(invalid(format!("{what} {url:?} is not a URL: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn picks(split: &[(u32, u32)], n: usize) -> Vec<u32> {
        let mut router = Router::new(split);
        (0..n).map(|_| router.pick().unwrap()).collect()
    }

    #[test]
    fn a_split_gives_each_version_exactly_its_percent_spread_out() {
        for split in [
            vec![(1, 90), (2, 10)],
            vec![(1, 50), (2, 30), (3, 20)],
            vec![(4, 1), (5, 99)],
            vec![(7, 33), (8, 33), (9, 34)],
        ] {
            let got = picks(&split, 300);
            for (version, percent) in &split {
                // every run of 100 calls holds exactly the share
                for window in got.chunks(100) {
                    let n = window.iter().filter(|v| *v == version).count();
                    assert_eq!(n, *percent as usize, "{split:?}: version {version}");
                }
            }
        }
        // a 10 % canary is spread out, never two calls in a row; an even split alternates
        let canary = picks(&[(1, 90), (2, 10)], 100);
        assert!(canary.windows(2).all(|w| w != [2, 2]), "{canary:?}");
        assert_eq!(picks(&[(1, 50), (2, 50)], 6), [1, 2, 1, 2, 1, 2]);
        // the first listed wins ties; one version always; none for nothing
        assert_eq!(picks(&[(3, 100)], 3), [3, 3, 3]);
        assert_eq!(Router::new(&[]).pick(), None);
    }

    fn tensors(layers: &[usize]) -> HashMap<String, Tensor> {
        let mut map = HashMap::new();
        for (i, pair) in layers.windows(2).enumerate() {
            let (n_in, n_out) = (pair[0], pair[1]);
            let w: Vec<f32> = (0..n_in * n_out).map(|k| ((k * 7 + i) % 11) as f32 / 10.0 - 0.5).collect();
            let b: Vec<f32> = (0..n_out).map(|k| k as f32 / 10.0).collect();
            map.insert(
                format!("layers.{i}.weight"),
                Tensor::from_vec(w, (n_out, n_in), &Device::Cpu).unwrap(),
            );
            map.insert(format!("layers.{i}.bias"), Tensor::from_vec(b, n_out, &Device::Cpu).unwrap());
        }
        map
    }

    /// The same network by hand, as the reference.
    fn reference(layers: &[usize], x: &[f32]) -> Vec<f32> {
        let t = tensors(layers);
        let mut v = x.to_vec();
        for i in 0..layers.len() - 1 {
            let w = t[&format!("layers.{i}.weight")].to_vec2::<f32>().unwrap();
            let b = t[&format!("layers.{i}.bias")].to_vec1::<f32>().unwrap();
            v = w
                .iter()
                .zip(&b)
                .map(|(row, bias)| row.iter().zip(&v).map(|(a, x)| a * x).sum::<f32>() + bias)
                .collect();
            if i < layers.len() - 2 {
                v.iter_mut().for_each(|x| *x = x.max(0.0));
            }
        }
        v
    }

    #[test]
    fn the_mlp_matches_a_hand_written_forward_pass() {
        let layers = [4, 8, 3];
        let config =
            MlpConfig { layers: layers.to_vec(), activation: "relu".into(), output: "identity".into() };
        let mlp = Mlp::new(config, tensors(&layers)).unwrap();
        let rows = vec![vec![0.1, -0.2, 0.3, 0.4], vec![1.0, 2.0, -3.0, 0.5]];
        let out = mlp.forward(&rows).unwrap();
        for (row, got) in rows.iter().zip(&out) {
            for (a, b) in reference(&layers, row).iter().zip(got) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
        let softmax = Mlp::new(
            MlpConfig { layers: layers.to_vec(), activation: "relu".into(), output: "softmax".into() },
            tensors(&layers),
        )
        .unwrap();
        let p = softmax.forward(&rows).unwrap();
        assert!(p.iter().all(|r| (r.iter().sum::<f32>() - 1.0).abs() < 1e-5));
        assert!(matches!(mlp.forward(&[vec![1.0; 3]]), Err(ServeError::Invalid(_))));
        assert!(matches!(mlp.forward(&[vec![f32::NAN; 4]]), Err(ServeError::Invalid(_))));
    }

    #[test]
    fn calls_that_arrive_together_share_a_pass_and_get_their_own_rows() {
        let layers = [4, 8, 3];
        let network = Network::Mlp(
            Mlp::new(
                MlpConfig { layers: layers.to_vec(), activation: "relu".into(), output: "softmax".into() },
                tensors(&layers),
            )
            .unwrap(),
        );
        let batcher = Batcher::default();
        let barrier = std::sync::Barrier::new(16);
        std::thread::scope(|scope| {
            for t in 0..16 {
                let (network, batcher, barrier) = (&network, &batcher, &barrier);
                scope.spawn(move || {
                    let rows: Vec<Row> = (0..=t % 3)
                        .map(|r| Row::Numbers(vec![t as f32 * 0.1, r as f32, -1.0, 0.5]))
                        .collect();
                    barrier.wait();
                    let got = batcher.run(network, rows.clone()).unwrap();
                    let alone = network.forward(&rows).unwrap();
                    assert_eq!(got.len(), alone.len(), "caller {t}");
                    for (a, b) in got.iter().flatten().zip(alone.iter().flatten()) {
                        assert!((a - b).abs() < 1e-5, "caller {t}: {a} vs {b}");
                    }
                    if t == 7 {
                        let bad = batcher.run(network, vec![Row::Numbers(vec![1.0; 3])]).unwrap_err();
                        assert!(bad.to_string().contains("takes 4"), "{bad}");
                        let text = batcher.run(network, vec![Row::Text("words".into())]).unwrap_err();
                        assert!(text.to_string().contains("is a text"), "{text}");
                    }
                });
            }
        });
        let calls = batcher.calls.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(calls, 16, "every well-formed call served once");
        assert!(batcher.passes.load(std::sync::atomic::Ordering::Relaxed) <= calls);
    }

    #[test]
    fn rows_are_counted_in_every_body_shape() {
        use serde_json::json;
        assert_eq!(rows_of(&json!({"inputs": [[1, 2], [3, 4], [5, 6]]})), 3);
        assert_eq!(rows_of(&json!({"inputs": [{"name": "x", "shape": [7, 4], "data": []}]})), 7);
        assert_eq!(rows_of(&json!({"input": ["a", "b"]})), 2);
        assert_eq!(rows_of(&json!({"input": "one text"})), 1);
        assert_eq!(rows_of(&json!({"inputs": []})), 1);
        assert_eq!(rows_of(&json!({"messages": []})), 1);
    }

    #[test]
    fn bad_configs_and_weights_are_named() {
        let bad = |config: MlpConfig, t| Mlp::new(config, t).err().map(|e| e.to_string()).unwrap_or_default();
        let cfg = |layers: Vec<usize>, act: &str| MlpConfig {
            layers,
            activation: act.into(),
            output: "identity".into(),
        };
        assert!(bad(cfg(vec![4], "relu"), tensors(&[4, 2])).contains("at least"));
        assert!(bad(cfg(vec![4, 2], "swish"), tensors(&[4, 2])).contains("unknown activation"));
        assert!(bad(cfg(vec![4, 3], "relu"), tensors(&[4, 2])).contains("shape"));
        assert!(bad(cfg(vec![4, 2, 2], "relu"), tensors(&[4, 2])).contains("no tensor"));
    }
}
