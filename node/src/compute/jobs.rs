//! Training jobs on reserved compute, between the buyer's node and the provider's.
//!
//! Buyer: `trigger` estimates the run, chooses an offer, reserves it from the operator wallet
//! (the escrow goes to ComputeMarket), shares the inputs with the provider's node only, and at
//! the start time sends the job, signed by the reservation's holder, over `/agora/jobs/1`.
//! Provider: checks the reservation in its index (its own, signed by the holder), fetches the
//! inputs by hash (every chunk verified), checks them, confirms the start on-chain, trains
//! (built-in candle MLP training, or an external command), streams the loss per epoch,
//! shares the output with the buyer and announces it by hash. Buyer: fetches the output
//! (verified against the announced hash), checks it is the model's weights, registers it as a
//! new version in Staging with the losses as metrics, and signs a usage statement for the
//! GPU-hours it saw; the provider claims with it, and ComputeMarket refunds the rest.
//!
//! Failures: bad inputs → the provider refuses before confirming (the holder reclaims after
//! the start's grace); a provider that goes silent → the job fails after `job_timeout` and the
//! buyer's node reclaims once the contract allows; an output that does not match its hash or
//! is not the model's weights → rejected, no statement. A provider whose holder never signs
//! reports its hours on-chain after `job_timeout` and finalizes the report after the grace.

use std::{collections::BTreeMap, time::Duration};

use agora_contracts::{ComputeMarket, compute_domain};
use alloy::{
    primitives::{Address, B256, Signature, U256},
    signers::SignerSync,
    sol,
    sol_types::{SolEvent, SolStruct},
};
use libp2p::PeerId;
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;
use tokio::sync::{mpsc, oneshot, watch};

use super::{Compute, ComputeError, Operator, RequirementsQuery, estimate::Constraints, train};
use crate::{
    p2p::{
        P2p,
        wire::{JobMessage, JobReply, JobStart},
    },
    registry::{
        Actor, Context, NewVersion, RegistryError, Stage,
        filter::{self, Field},
        now_ms,
    },
    serve::MlpConfig,
    store::tables::{MetricPoint, ModelFileSummary, ReservationState, Reservations, TrainingJobs},
    tracking::{self, Logs, MetricValue, NewRun, RunStatus, ViewType},
};

sol! {
    /// What the holder signs for the provider's claim (ComputeMarket's `STATEMENT_TYPEHASH`).
    struct UsageStatement {
        uint256 reservationId;
        uint64 hoursUsed;
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobRole {
    #[default]
    Buyer,
    Provider,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Reserved; waiting for the start time.
    #[default]
    Scheduled,
    /// Sent to the provider, which accepted it.
    Sent,
    /// The provider confirmed the start on-chain.
    Running,
    Succeeded,
    Failed,
}

/// A training job as stored (and, on the API, shown).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRecord {
    pub id: u64,
    pub role: JobRole,
    #[serde(with = "super::dec")]
    #[schema(value_type = String)]
    pub reservation: U256,
    /// The other node: the provider's (buyer side) or the buyer's (provider side).
    pub peer: String,
    #[schema(value_type = String)]
    pub provider: Address,
    #[schema(value_type = String)]
    pub holder: Address,
    pub model: String,
    pub base_version: u32,
    #[serde(with = "hex32")]
    #[schema(value_type = String)]
    pub base: [u8; 32],
    #[serde(with = "hex32")]
    #[schema(value_type = String)]
    pub config: [u8; 32],
    #[serde(with = "hex32")]
    #[schema(value_type = String)]
    pub dataset: [u8; 32],
    pub dataset_format: String,
    pub hyperparameters: String,
    pub executor: String,
    pub gpu: String,
    pub gpu_count: u32,
    pub gpu_hours: u64,
    /// Wei escrowed.
    #[serde(with = "super::dec")]
    #[schema(value_type = String)]
    pub cost: U256,
    pub start_time: u64,
    pub status: JobStatus,
    pub losses: Vec<f64>,
    #[serde(with = "hex32_opt")]
    #[schema(value_type = Option<String>)]
    pub output: Option<[u8; 32]>,
    pub new_version: Option<u32>,
    pub hours_used: Option<u64>,
    pub error: Option<String>,
    pub policy: Option<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    /// Last word from the other node (progress, acceptance).
    pub heard_ms: u64,
    pub sent_ms: Option<u64>,
    /// Provider: claimed (or reported) on-chain. Buyer: reclaimed after a failure.
    pub settled: bool,
}

impl JobRecord {
    /// The defaults of a job just opened: scheduled, nothing heard or done yet, stamped now.
    fn opened() -> Self {
        let now = now_ms();
        Self { created_ms: now, updated_ms: now, heard_ms: now, ..Default::default() }
    }
}

mod hex32 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&alloy::hex::encode(v)) } else { s.serialize_bytes(v) }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        if d.is_human_readable() {
            let text = String::deserialize(d)?;
            let bytes = alloy::hex::decode(text).map_err(serde::de::Error::custom)?;
            bytes.try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
        } else {
            let bytes = serde_bytes::ByteBuf::deserialize(d)?;
            bytes.into_vec().try_into().map_err(|_| serde::de::Error::custom("expected 32 bytes"))
        }
    }
}

mod hex32_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
        #[derive(serde::Serialize)]
        struct W<'a>(#[serde(with = "super::hex32")] &'a [u8; 32]);
        match v {
            Some(v) => s.serialize_some(&W(v)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 32]>, D::Error> {
        #[derive(serde::Deserialize)]
        struct W(#[serde(with = "super::hex32")] [u8; 32]);
        Ok(Option::<W>::deserialize(d)?.map(|w| w.0))
    }
}

/// `POST /api/v1/retraining/trigger`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TriggerRequest {
    pub model: String,
    /// Base version (default: the latest).
    #[serde(default)]
    pub version: Option<u32>,
    /// The dataset: blake3 (hex) of a blob in the artifact store, or a path of the artifact tree.
    pub dataset: String,
    /// `csv` or `safetensors` (default: from the path, else from the content).
    #[serde(default)]
    pub dataset_format: Option<String>,
    /// For the built-in executor: epochs, batch_size, learning_rate, optimizer, weight_decay,
    /// seed. Passed as JSON to an external one.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub hyperparameters: Option<serde_json::Value>,
    #[serde(default)]
    pub constraints: Constraints,
    /// `builtin` (default) or `external`.
    #[serde(default)]
    pub executor: Option<String>,
    /// The policy that fired, when a schedule triggered it.
    #[serde(default)]
    pub policy: Option<String>,
    /// GPU-hours to reserve when more than the estimate (headroom; unused hours are refunded).
    #[serde(default)]
    pub gpu_hours: Option<u64>,
}

fn invalid(message: impl Into<String>) -> ComputeError {
    ComputeError::Invalid(message.into())
}

fn hex(hash: &[u8; 32]) -> String {
    alloy::hex::encode(hash)
}

/// GPU-hours billed for `millis` of wall time on `gpus` GPUs: whole hours, at least one, at
/// most what was reserved.
pub fn billed_hours(millis: u64, gpus: u32, reserved: u64) -> u64 {
    let gpu_ms = u128::from(millis) * u128::from(gpus);
    let hours = gpu_ms.div_ceil(3_600_000) as u64;
    hours.clamp(1, reserved.max(1))
}

impl Compute {
    fn ready_parts(&self) -> Result<(Operator, P2p), ComputeError> {
        self.require_market()?;
        let operator = self.operator.clone().ok_or_else(|| {
            invalid("training on reserved compute needs the operator wallet (AGORA_OPERATOR_KEY) to pay the escrow")
        })?;
        let p2p = self
            .p2p
            .clone()
            .ok_or_else(|| invalid("training on reserved compute needs the peer-to-peer network"))?;
        Ok((operator, p2p))
    }

    fn next_job_id(&self) -> Result<u64, ComputeError> {
        let last = self.store.scan::<TrainingJobs>(&[], None, true).next().transpose()?;
        Ok(last.map_or(0, |(_, job)| job.id) + 1)
    }

    /// Applies `change` to a stored job (one writer at a time).
    fn update_job(
        &self,
        id: u64,
        change: impl FnOnce(&mut JobRecord),
    ) -> Result<Option<JobRecord>, ComputeError> {
        let _guard = self.jobs_lock.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut job) = self.store.get::<TrainingJobs>(&id)? else { return Ok(None) };
        change(&mut job);
        job.updated_ms = now_ms();
        self.store.put::<TrainingJobs>(&id, &job)?;
        Ok(Some(job))
    }

    fn fail_job(&self, id: u64, reason: &str) {
        tracing::warn!(target: "agora::compute", job = id, %reason, "training job failed");
        let mut failed = false;
        let job = self.update_job(id, |j| {
            if !matches!(j.status, JobStatus::Succeeded | JobStatus::Failed) {
                j.status = JobStatus::Failed;
                j.error = Some(reason.to_owned());
                failed = true;
            }
        });
        if let (true, Ok(Some(job))) = (failed, job)
            && job.role == JobRole::Buyer
        {
            self.record_run(&job, RunStatus::Failed);
        }
    }

    /// Buyer: records a training job as a run of the experiment `agora-training/<model>` (made
    /// when missing): the hyperparameters and inputs as params, the loss of each epoch as the
    /// `loss` metric, the reservation, provider and GPUs as tags, and `status` with its end. A
    /// job already recorded (an earlier attempt) gets only the new status. The run is the
    /// lineage the registered version names; failing to record it fails nothing else.
    fn record_run(&self, job: &JobRecord, status: RunStatus) -> Option<String> {
        let tracking = self.tracking.as_ref()?;
        let recorded = (|| -> Result<String, RegistryError> {
            let ctx = Context::operator();
            let name = format!("agora-training/{}", job.model);
            let experiment = match tracking.experiment_by_name(&name) {
                Ok(found) => found.id,
                Err(RegistryError::NotFound(_)) => {
                    let tags = vec![("agora.model".to_owned(), job.model.clone())];
                    tracking.create_experiment(&ctx, &name, None, tags)?
                }
                Err(e) => return Err(e),
            };
            let job_id = job.id.to_string();
            let tag = Field::Tag("agora.job".into());
            let clause =
                filter::Clause { field: tag, op: filter::Op::Eq, value: filter::Value::Text(job_id.clone()) };
            let earlier = tracking.search_runs(&[experiment], ViewType::All, &[clause], &[])?;
            if let Some(run) = earlier.first() {
                let id = run.run_id();
                tracking.update_run(&ctx, &id, Some(status), Some(now_ms() as i64), None)?;
                return Ok(id);
            }
            let mut tags = vec![
                ("agora.job".to_owned(), job_id),
                ("agora.reservation".to_owned(), job.reservation.to_string()),
                ("agora.provider".to_owned(), job.provider.to_string()),
                ("agora.gpu".to_owned(), format!("{} × {}", job.gpu_count, job.gpu)),
                ("agora.executor".to_owned(), job.executor.clone()),
            ];
            if let Some(policy) = &job.policy {
                tags.push(("agora.policy".to_owned(), policy.clone()));
            }
            if let Some(error) = &job.error {
                tags.push(("agora.error".to_owned(), error.chars().take(4000).collect()));
            }
            let new =
                NewRun { name: Some(format!("job-{}", job.id)), start_ms: Some(job.created_ms as i64), tags };
            let run = tracking.create_run(&ctx, experiment, new)?;
            let id = run.run_id();
            let mut params = vec![
                ("base_version".to_owned(), job.base_version.to_string()),
                ("dataset".to_owned(), crate::artifacts::hex(&job.dataset)),
                ("dataset_format".to_owned(), job.dataset_format.clone()),
                ("gpu_hours".to_owned(), job.gpu_hours.to_string()),
            ];
            if let Ok(serde_json::Value::Object(hp)) = serde_json::from_str(&job.hyperparameters) {
                let room = tracking::MAX_BATCH_PARAMS - params.len();
                params.extend(hp.into_iter().take(room).map(|(k, v)| {
                    let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                    (k, text)
                }));
            }
            let now = now_ms() as i64;
            let losses: Vec<(String, MetricValue)> = job
                .losses
                .iter()
                .enumerate()
                .map(|(i, loss)| {
                    ("loss".to_owned(), MetricValue { value: *loss, step: i as i64 + 1, timestamp: now })
                })
                .collect();
            // hyperparameter names the client chose may not be valid keys: they are left out
            // rather than losing the run
            if tracking.log(&ctx, &id, Logs { params: params.clone(), ..Logs::default() }).is_err() {
                tracking.log(&ctx, &id, Logs { params: params[..4].to_vec(), ..Logs::default() })?;
            }
            for chunk in losses.chunks(tracking::MAX_BATCH_METRICS) {
                tracking.log(&ctx, &id, Logs { metrics: chunk.to_vec(), ..Logs::default() })?;
            }
            tracking.update_run(&ctx, &id, Some(status), Some(now), None)?;
            Ok(id)
        })();
        recorded
            .inspect_err(|e| {
                tracing::warn!(target: "agora::compute", job = job.id, error = %e, "cannot record the training job as a run")
            })
            .ok()
    }

    /// Jobs, newest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, ComputeError> {
        let mut jobs = Vec::new();
        for item in self.store.iter::<TrainingJobs>() {
            jobs.push(item?.1);
        }
        jobs.reverse();
        Ok(jobs)
    }

    pub fn job(&self, id: u64) -> Result<JobRecord, ComputeError> {
        self.store
            .get::<TrainingJobs>(&id)?
            .ok_or_else(|| ComputeError::Registry(RegistryError::NotFound(format!("no training job {id}"))))
    }

    fn job_of(&self, reservation: U256, role: JobRole) -> Result<Option<JobRecord>, ComputeError> {
        for item in self.store.iter::<TrainingJobs>() {
            let (_, job) = item?;
            if job.reservation == reservation && job.role == role {
                return Ok(Some(job));
            }
        }
        Ok(None)
    }

    fn read_blob(&self, hash: &[u8; 32], limit: u64) -> Result<Vec<u8>, ComputeError> {
        let info = self
            .registry
            .artifacts()
            .info(hash)
            .map_err(|e| ComputeError::Registry(RegistryError::Artifact(e)))?
            .ok_or_else(|| invalid(format!("blob {} is not in the artifact store", hex(hash))))?;
        if info.size > limit {
            return Err(invalid(format!(
                "blob {} is {} bytes, over the {limit} this reads",
                hex(hash),
                info.size
            )));
        }
        let mut bytes = Vec::with_capacity(info.size as usize);
        self.registry
            .artifacts()
            .copy_to(hash, &mut bytes)
            .map_err(|e| ComputeError::Registry(RegistryError::Artifact(e)))?;
        Ok(bytes)
    }

    /// Estimates, chooses, reserves and schedules a training run of a registered MLP.
    pub async fn trigger(&self, ctx: &Context, request: TriggerRequest) -> Result<JobRecord, ComputeError> {
        let (operator, p2p) = self.ready_parts()?;
        let this = self.clone();
        let ctx2 = ctx.clone();
        let request2 = request.clone();
        let plan = tokio::task::spawn_blocking(move || this.plan(&ctx2, &request2))
            .await
            .map_err(|e| invalid(format!("planning failed: {e}")))??;
        let Plan { view_version, base, config, dataset, format, hyperparameters, executor, selection, offer } =
            plan;
        let mut chosen = selection.chosen;
        if let Some(hours) = request.gpu_hours.filter(|h| *h > chosen.gpu_hours) {
            chosen.gpu_hours = hours;
            chosen.cost = U256::from(hours) * offer.offer.pricePerGpuHour;
            let max_cost =
                request.constraints.max_cost.as_deref().and_then(|m| m.trim().parse::<U256>().ok());
            if max_cost.is_some_and(|max| chosen.cost > max) {
                return Err(ComputeError::Infeasible(super::estimate::Infeasible {
                    constraint: "max_cost",
                    detail: format!("{hours} GPU-hours on the chosen offer cost {} wei", chosen.cost),
                }));
            }
        }
        let now = self.chain_now()?;
        let start = if chosen.earliest_start > now + 30 { chosen.earliest_start } else { 0 };
        let compute = ComputeMarket::new(self.deployment.compute_market, operator.provider.clone());
        let reserve = compute
            .reserve(offer.offer.clone(), offer.signature.clone().into(), chosen.gpu_hours, start)
            .value(chosen.cost);
        let receipt = operator
            .transact(reserve)
            .await
            .map_err(|e| invalid(format!("the reservation did not go through: {e}")))?;
        if !receipt.status() {
            return Err(invalid(format!("the reservation {} reverted", receipt.transaction_hash)));
        }
        let reserved = receipt
            .inner
            .logs()
            .iter()
            .find_map(|log| ComputeMarket::Reserved::decode_log(&log.inner).ok())
            .ok_or_else(|| invalid("the reservation's receipt has no Reserved event"))?;
        let peer: PeerId = chosen
            .node
            .parse()
            .map_err(|_| invalid(format!("the offer's node {:?} is not a peer id", chosen.node)))?;
        for hash in [base, config, dataset] {
            p2p.share_with(hash, peer).await.map_err(|e| invalid(format!("cannot share an input: {e}")))?;
        }
        let id = self.next_job_id()?;
        let job = JobRecord {
            id,
            role: JobRole::Buyer,
            reservation: reserved.data.reservationId,
            peer: peer.to_string(),
            provider: chosen.provider,
            holder: operator.signer.address(),
            model: request.model.clone(),
            base_version: view_version,
            base,
            config,
            dataset,
            dataset_format: format,
            hyperparameters,
            executor,
            gpu: chosen.gpu.clone(),
            gpu_count: chosen.gpu_count,
            gpu_hours: chosen.gpu_hours,
            cost: chosen.cost,
            start_time: reserved.data.startTime,
            policy: request.policy.clone(),
            settled: false,
            ..JobRecord::opened()
        };
        self.store.put::<TrainingJobs>(&id, &job)?;
        tracing::info!(target: "agora::compute", job = id, reservation = %job.reservation, provider = %job.provider, gpu = %job.gpu, cost = %job.cost, "training reserved");
        tokio::spawn(self.clone().dispatch(id));
        Ok(job)
    }

    fn plan(&self, ctx: &Context, request: &TriggerRequest) -> Result<Plan, ComputeError> {
        let model = self.registry.require_model(&request.model)?;
        self.registry.authorize(&ctx.actor, &model)?;
        let view = self.version_or_latest(&request.model, request.version)?;
        let base = view
            .version
            .file
            .as_ref()
            .map(|f| f.blake3)
            .ok_or_else(|| invalid("the base version has no weights on this node"))?;
        let config_file = view
            .version
            .artifact_dir
            .as_ref()
            .and_then(|dir| self.registry.file(&format!("{dir}/config.json")).transpose())
            .transpose()?
            .ok_or_else(|| invalid("the base version has no config.json describing its MLP"))?;
        let config_bytes = self.read_blob(&config_file.blake3, 1 << 20)?;
        let mlp: MlpConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| invalid(format!("the base version's config.json is not an MLP config: {e}")))?;
        let (dataset, path) = match request.dataset.trim().parse::<B256>() {
            Ok(hash) => (hash.0, None),
            Err(_) => {
                let file = self.registry.file(request.dataset.trim())?.ok_or_else(|| {
                    invalid(format!("no dataset {:?} in the artifact store", request.dataset))
                })?;
                (file.blake3, Some(request.dataset.trim().to_owned()))
            }
        };
        let data = self.read_blob(&dataset, 1 << 30)?;
        let format = match (&request.dataset_format, &path) {
            (Some(f), _) => f.clone(),
            (None, Some(p)) if p.ends_with(".safetensors") => "safetensors".into(),
            (None, Some(p)) if p.ends_with(".csv") => "csv".into(),
            _ if data.len() > 8 && data.get(8) == Some(&b'{') => "safetensors".into(),
            _ => "csv".into(),
        };
        let executor = request.executor.clone().unwrap_or_else(|| "builtin".into());
        if !["builtin", "external"].contains(&executor.as_str()) {
            return Err(invalid(format!("executor {executor:?} is not builtin or external")));
        }
        let hp_json = request.hyperparameters.clone().unwrap_or_else(|| serde_json::json!({}));
        let hp: train::Hyperparameters = if executor == "builtin" {
            let hp: train::Hyperparameters = serde_json::from_value(hp_json.clone())
                .map_err(|e| invalid(format!("hyperparameters: {e}")))?;
            hp.check().map_err(|e| invalid(e.to_string()))?;
            hp
        } else {
            train::Hyperparameters::default()
        };
        let rows = match format.as_str() {
            "csv" => train::Dataset::from_csv(
                std::str::from_utf8(&data).map_err(|_| invalid("the CSV dataset is not UTF-8"))?,
                &mlp,
            ),
            "safetensors" => train::Dataset::from_safetensors(&data, &mlp),
            other => return Err(invalid(format!("dataset_format {other:?} is not csv or safetensors"))),
        }
        .map_err(|e| invalid(format!("the dataset does not fit the model: {e}")))?
        .rows;
        let requirements = self.requirements(&RequirementsQuery {
            name: request.model.clone(),
            version: Some(view.version.version),
            dataset_rows: Some(rows as u64),
            epochs: Some(hp.epochs),
            batch: Some(hp.batch_size as u64),
            ..Default::default()
        })?;
        // A provider re-signs its pool's offer as its capacity frees up, so the offer chosen may
        // be replaced between the choice and the look-up: choose again from the book as it is
        // then, a few times, before giving up.
        let mut attempts = 0;
        let (selection, offer) = loop {
            let selection = self.estimate(&requirements, &request.constraints)?;
            let chosen = super::offers::live(&self.store, self.chain_now()?)?
                .into_iter()
                .find(|o| o.hash == selection.chosen.offer_hash);
            attempts += 1;
            match chosen {
                Some(offer) => break (selection, offer),
                None if attempts < 3 => continue,
                None => return Err(invalid("the chosen offer left the book three times running; try again")),
            }
        };
        Ok(Plan {
            view_version: view.version.version,
            base,
            config: config_file.blake3,
            dataset,
            format,
            hyperparameters: hp_json.to_string(),
            executor,
            selection,
            offer,
        })
    }

    /// Waits for the start time, then sends the job to the provider (retrying while it cannot
    /// be reached, until the job timeout).
    async fn dispatch(self, id: u64) {
        let Ok(job) = self.job(id) else { return };
        let Some((operator, p2p)) = self.operator.clone().zip(self.p2p.clone()) else { return };
        // Chain time moves with new blocks (and the clock): wait for either, up to the start.
        let mut index = self.index.clone();
        loop {
            let now = self.chain_now().unwrap_or(0);
            if now >= job.start_time {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_secs(job.start_time - now), index.changed()).await;
        }
        let Ok(peer) = job.peer.parse::<PeerId>() else {
            self.fail_job(id, "the provider's peer id is not valid");
            return;
        };
        let mut start = JobStart {
            reservation: job.reservation.to_be_bytes(),
            base: job.base,
            config: job.config,
            dataset: job.dataset,
            dataset_format: job.dataset_format.clone(),
            hyperparameters: job.hyperparameters.clone(),
            executor: job.executor.clone(),
            signature: ByteBuf::new(),
        };
        let signature = match operator.signer.sign_message_sync(&start.digest()) {
            Ok(sig) => sig.as_bytes().to_vec(),
            Err(e) => {
                self.fail_job(id, &format!("cannot sign the job: {e}"));
                return;
            }
        };
        start.signature = ByteBuf::from(signature);
        let deadline = tokio::time::Instant::now() + self.job_timeout();
        let mut wait = Duration::from_millis(250);
        loop {
            match p2p.send_job(peer, JobMessage::Start(start.clone())).await {
                Ok(JobReply::Accepted) => {
                    let _ = self.update_job(id, |j| {
                        if j.status == JobStatus::Scheduled {
                            j.status = JobStatus::Sent;
                        }
                        j.sent_ms = Some(now_ms());
                        j.heard_ms = now_ms();
                    });
                    return;
                }
                Ok(JobReply::Refused(why)) => {
                    self.fail_job(id, &format!("the provider refused the job: {why}"));
                    return;
                }
                Ok(JobReply::Ack) => {}
                Ok(JobReply::Later(why)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(target: "agora::compute", job = id, %why, "the provider asks to send the job again");
                }
                Ok(JobReply::Later(why)) => {
                    self.fail_job(id, &format!("the provider never took the job: {why}"));
                    return;
                }
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(target: "agora::compute", job = id, error = %e, "provider not reachable yet");
                }
                Err(e) => {
                    self.fail_job(id, &format!("the provider could not be reached: {e}"));
                    return;
                }
            }
            // Ask again when a block arrives (the provider's index moves with it), or after the backoff.
            let _ = tokio::time::timeout(wait, index.changed()).await;
            wait = (wait * 2).min(Duration::from_secs(10));
        }
    }

    /// Checks a provider's word that a reservation is confirmed against the chain: the
    /// transaction must have succeeded and carry this ComputeMarket's `Confirmed` for it.
    pub async fn check_confirmation(
        &self,
        chain: &alloy::providers::DynProvider,
        reservation: U256,
        tx: B256,
    ) -> Result<(u64, Option<u64>), ComputeError> {
        use alloy::providers::Provider as _;
        self.require_market()?;
        let receipt = chain
            .get_transaction_receipt(tx)
            .await
            .map_err(|e| invalid(format!("the chain could not be asked about {tx}: {e}")))?
            .ok_or_else(|| ComputeError::Unconfirmed(format!("transaction {tx} is not on the chain")))?;
        if !receipt.status() {
            return Err(ComputeError::Unconfirmed(format!("transaction {tx} reverted")));
        }
        let confirmed = receipt
            .inner
            .logs()
            .iter()
            .filter(|log| log.address() == self.deployment.compute_market)
            .filter_map(|log| ComputeMarket::Confirmed::decode_log(&log.inner).ok())
            .find(|event| event.data.reservationId == reservation)
            .ok_or_else(|| {
                ComputeError::Unconfirmed(format!(
                    "transaction {tx} does not confirm reservation {reservation}"
                ))
            })?;
        let job = self.job_of(reservation, JobRole::Buyer)?;
        if let Some(job) = &job {
            let _ = self.update_job(job.id, |j| {
                if matches!(j.status, JobStatus::Scheduled | JobStatus::Sent) {
                    j.status = JobStatus::Running;
                }
                j.heard_ms = now_ms();
            });
        }
        Ok((confirmed.data.at, job.map(|j| j.id)))
    }

    pub fn job_timeout(&self) -> Duration {
        Duration::from_secs(self.config.job_timeout.max(1))
    }

    /// Answers a job message from a peer.
    pub async fn on_job_message(&self, peer: PeerId, message: JobMessage) -> JobReply {
        match message {
            JobMessage::Start(start) => match self.accept_job(peer, start).await {
                Ok(()) => JobReply::Accepted,
                Err(ComputeError::Unconfirmed(why)) => JobReply::Later(why),
                Err(e) => JobReply::Refused(e.to_string()),
            },
            JobMessage::Progress { reservation, epoch, loss } => self.buyer_update(peer, reservation, |j| {
                if j.status == JobStatus::Sent {
                    j.status = JobStatus::Running;
                }
                j.losses.truncate(epoch.saturating_sub(1) as usize);
                j.losses.push(loss);
            }),
            JobMessage::Failed { reservation, reason } => self.buyer_update(peer, reservation, |j| {
                j.status = JobStatus::Failed;
                j.error = Some(format!("the provider failed: {reason}"));
            }),
            JobMessage::Done { reservation, output, losses, seconds, hours_used } => {
                // Told twice (a resend): the output is fetched and registered once.
                let first = matches!(
                    self.job_of(U256::from_be_bytes(reservation), JobRole::Buyer),
                    Ok(Some(job)) if job.output.is_none()
                );
                if !first {
                    return JobReply::Ack;
                }
                let reply = self.buyer_update(peer, reservation, |j| {
                    j.losses = losses.clone();
                    j.output = Some(output);
                    j.hours_used = Some(hours_used);
                });
                if let Ok(Some(job)) = self.job_of(U256::from_be_bytes(reservation), JobRole::Buyer)
                    && matches!(reply, JobReply::Ack)
                {
                    tracing::info!(target: "agora::compute", job = job.id, seconds, hours_used, "the provider finished; fetching the output");
                    tokio::spawn(self.clone().finish(job.id));
                }
                reply
            }
            JobMessage::Statement { reservation, hours_used, signature } => {
                match self.job_of(U256::from_be_bytes(reservation), JobRole::Provider) {
                    Ok(Some(job)) if job.peer == peer.to_string() => {
                        tokio::spawn(self.clone().claim(job.id, hours_used, signature.into_vec()));
                        JobReply::Ack
                    }
                    _ => JobReply::Refused("no job of this node on that reservation".into()),
                }
            }
        }
    }

    fn buyer_update(
        &self,
        peer: PeerId,
        reservation: [u8; 32],
        change: impl FnOnce(&mut JobRecord),
    ) -> JobReply {
        match self.job_of(U256::from_be_bytes(reservation), JobRole::Buyer) {
            Ok(Some(job)) if job.peer == peer.to_string() && job.status != JobStatus::Failed => {
                let _ = self.update_job(job.id, |j| {
                    change(j);
                    j.heard_ms = now_ms();
                });
                JobReply::Ack
            }
            Ok(Some(_)) => JobReply::Refused("that job is not open with this peer".into()),
            _ => JobReply::Refused("no job of this node on that reservation".into()),
        }
    }

    /// Provider: checks a job against the index and starts it.
    async fn accept_job(&self, peer: PeerId, start: JobStart) -> Result<(), ComputeError> {
        let (operator, _) = self.ready_parts()?;
        let id = U256::from_be_bytes(start.reservation);
        let reservation = self.store.get::<Reservations>(&id)?.ok_or_else(|| {
            ComputeError::Unconfirmed(format!("reservation {id} is not in this node's index yet"))
        })?;
        if reservation.provider != operator.signer.address() {
            return Err(invalid(format!(
                "reservation {id} is {}'s, not this provider's",
                reservation.provider
            )));
        }
        if !matches!(reservation.state, ReservationState::Reserved | ReservationState::Confirmed) {
            return Err(invalid(format!("reservation {id} is closed")));
        }
        let signature = Signature::try_from(start.signature.as_ref())
            .map_err(|e| invalid(format!("bad signature: {e}")))?;
        let signer = signature
            .recover_address_from_msg(start.digest())
            .map_err(|e| invalid(format!("bad signature: {e}")))?;
        if signer != reservation.holder {
            return Err(invalid(format!(
                "the job is signed by {signer}, the reservation's holder is {}",
                reservation.holder
            )));
        }
        match start.executor.as_str() {
            "builtin" => {}
            "external" if !self.config.external_command.is_empty() => {}
            "external" => return Err(invalid("this provider has no external executor configured")),
            other => return Err(invalid(format!("unknown executor {other:?}"))),
        }
        if self.job_of(id, JobRole::Provider)?.is_some() {
            return Ok(()); // a resend of a job already running
        }
        let job = JobRecord {
            id: self.next_job_id()?,
            role: JobRole::Provider,
            reservation: id,
            peer: peer.to_string(),
            provider: reservation.provider,
            holder: reservation.holder,
            base: start.base,
            config: start.config,
            dataset: start.dataset,
            dataset_format: start.dataset_format.clone(),
            hyperparameters: start.hyperparameters.clone(),
            executor: start.executor.clone(),
            gpu_count: 1,
            gpu_hours: reservation.gpu_hours,
            cost: reservation.escrow,
            start_time: reservation.start_time,
            settled: false,
            ..JobRecord::opened()
        };
        self.store.put::<TrainingJobs>(&job.id, &job)?;
        tracing::info!(target: "agora::compute", job = job.id, reservation = %id, buyer = %peer, "training job accepted");
        tokio::spawn(self.clone().run_job(job.id, reservation.gpu_hours));
        Ok(())
    }

    /// Provider: fetches and checks the inputs, confirms the start, trains, hands over the output.
    async fn run_job(self, id: u64, reserved_hours: u64) {
        let Ok(job) = self.job(id) else { return };
        let Some((operator, p2p)) = self.operator.clone().zip(self.p2p.clone()) else { return };
        let Ok(peer) = job.peer.parse::<PeerId>() else { return };
        let reservation = job.reservation.to_be_bytes();
        let fail = |reason: String| {
            let this = self.clone();
            let p2p = p2p.clone();
            async move {
                this.fail_job(id, &reason);
                let _ = p2p.send_job(peer, JobMessage::Failed { reservation, reason }).await;
            }
        };
        for hash in [job.base, job.config, job.dataset] {
            if let Err(e) = p2p.fetch(hash).await {
                fail(format!("cannot fetch input {}: {e}", hex(&hash))).await;
                return;
            }
        }
        let work = match self.prepare(&job) {
            Ok(work) => work,
            Err(e) => {
                fail(format!("bad inputs: {e}")).await;
                return;
            }
        };
        // Confirmed only once the inputs are here and make sense.
        let gpu_count = self.reserved_gpus(&job);
        let compute = ComputeMarket::new(self.deployment.compute_market, operator.provider.clone());
        let confirmed = async {
            let receipt = operator.transact(compute.confirmStart(job.reservation)).await?;
            anyhow::ensure!(receipt.status(), "confirmStart reverted");
            Ok::<_, anyhow::Error>(())
        };
        if let Err(e) = confirmed.await {
            fail(format!("cannot confirm the start on-chain: {e}")).await;
            return;
        }
        let _ = self.update_job(id, |j| {
            j.status = JobStatus::Running;
            j.gpu_count = gpu_count;
        });
        let started = std::time::Instant::now();
        let (progress_tx, mut progress_rx) = mpsc::unbounded_channel::<(u32, f64)>();
        let forward = {
            let (p2p, this) = (p2p.clone(), self.clone());
            tokio::spawn(async move {
                while let Some((epoch, loss)) = progress_rx.recv().await {
                    let _ = this.update_job(id, |j| j.losses.push(loss));
                    let _ = p2p.send_job(peer, JobMessage::Progress { reservation, epoch, loss }).await;
                }
            })
        };
        let output_path = work.dir.path().join("output.safetensors");
        let result = self.execute(&job, &work, &output_path, progress_tx).await;
        let _ = forward.await;
        let losses = match result {
            Ok(losses) => losses,
            Err(e) => {
                fail(e.to_string()).await;
                return;
            }
        };
        let elapsed = started.elapsed();
        let artifacts = self.registry.artifacts().clone();
        let stored = tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&output_path).map_err(|e| e.to_string())?;
            let info = artifacts.put(file, u64::MAX).map_err(|e| e.to_string())?;
            drop(work); // the work dir goes once the output is stored
            crate::registry::parse_blake3(&info.blake3).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        let output = match stored {
            Ok(hash) => hash,
            Err(e) => {
                fail(format!("cannot store the output: {e}")).await;
                return;
            }
        };
        if let Err(e) = p2p.share_with(output, peer).await {
            fail(format!("cannot share the output: {e}")).await;
            return;
        }
        let hours_used = billed_hours(elapsed.as_millis() as u64, gpu_count, reserved_hours);
        let _ = self.update_job(id, |j| {
            j.status = JobStatus::Succeeded;
            j.output = Some(output);
            j.hours_used = Some(hours_used);
            j.losses = losses.clone();
        });
        let done =
            JobMessage::Done { reservation, output, losses, seconds: elapsed.as_secs_f64(), hours_used };
        if let Err(e) = p2p.send_job(peer, done).await {
            tracing::warn!(target: "agora::compute", job = id, error = %e, "cannot tell the buyer the job is done; it reports its hours later");
        }
        tracing::info!(target: "agora::compute", job = id, hours_used, seconds = elapsed.as_secs_f64(), "training job done");
    }

    /// The GPUs of the offer a reservation took (from the configured pool it was signed for).
    fn reserved_gpus(&self, job: &JobRecord) -> u32 {
        let pool = self
            .store
            .get::<Reservations>(&job.reservation)
            .ok()
            .flatten()
            .and_then(|r| self.store.get::<crate::store::tables::OwnOffers>(&r.offer_hash).ok().flatten())
            .and_then(|own| self.config.offers.get(own.spec as usize).map(|spec| spec.gpu_count));
        pool.unwrap_or(1).max(1)
    }

    fn prepare(&self, job: &JobRecord) -> Result<Work, ComputeError> {
        let dir = tempfile::Builder::new()
            .prefix("job-")
            .tempdir_in(&self.tmp)
            .or_else(|_| {
                std::fs::create_dir_all(&self.tmp)?;
                tempfile::Builder::new().prefix("job-").tempdir_in(&self.tmp)
            })
            .map_err(|e| invalid(format!("cannot make a work dir: {e}")))?;
        let weights = dir.path().join("weights.safetensors");
        let config_path = dir.path().join("config.json");
        let dataset_path = dir.path().join(format!("dataset.{}", job.dataset_format));
        let artifacts = self.registry.artifacts();
        for (hash, path) in
            [(&job.base, &weights), (&job.config, &config_path), (&job.dataset, &dataset_path)]
        {
            let file = std::fs::File::create(path).map_err(|e| invalid(e.to_string()))?;
            artifacts.copy_to(hash, file).map_err(|e| ComputeError::Registry(RegistryError::Artifact(e)))?;
        }
        std::fs::write(dir.path().join("hyperparameters.json"), &job.hyperparameters)
            .map_err(|e| invalid(e.to_string()))?;
        let builtin = if job.executor == "builtin" {
            let config: MlpConfig =
                serde_json::from_slice(&std::fs::read(&config_path).map_err(|e| invalid(e.to_string()))?)
                    .map_err(|e| invalid(format!("config.json: {e}")))?;
            let tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu)
                .map_err(|e| invalid(format!("the base weights: {e}")))?;
            let trainer = train::Trainer::new(config.clone(), tensors).map_err(|e| invalid(e.to_string()))?;
            let bytes = std::fs::read(&dataset_path).map_err(|e| invalid(e.to_string()))?;
            let data = match job.dataset_format.as_str() {
                "safetensors" => train::Dataset::from_safetensors(&bytes, &config),
                _ => train::Dataset::from_csv(
                    std::str::from_utf8(&bytes).map_err(|_| invalid("the CSV dataset is not UTF-8"))?,
                    &config,
                ),
            }
            .map_err(|e| invalid(e.to_string()))?;
            let hp: train::Hyperparameters = serde_json::from_str(&job.hyperparameters)
                .map_err(|e| invalid(format!("hyperparameters: {e}")))?;
            hp.check().map_err(|e| invalid(e.to_string()))?;
            Some((trainer, data, hp))
        } else {
            None
        };
        Ok(Work { dir, builtin: Builtin(std::sync::Mutex::new(builtin)) })
    }

    async fn execute(
        &self,
        job: &JobRecord,
        work: &Work,
        output: &std::path::Path,
        progress: mpsc::UnboundedSender<(u32, f64)>,
    ) -> Result<Vec<f64>, ComputeError> {
        let timeout = self.job_timeout();
        match work.builtin.take_trainer() {
            Some((mut trainer, data, hp)) => {
                let output = output.to_owned();
                let run = tokio::task::spawn_blocking(move || {
                    let report =
                        trainer.train(&data, &hp, |epoch, loss| progress.send((epoch, loss)).is_ok())?;
                    trainer.save(&output)?;
                    Ok::<_, train::TrainError>(report.losses)
                });
                run.await
                    .map_err(|e| invalid(format!("the trainer stopped: {e}")))?
                    .map_err(|e| invalid(e.to_string()))
            }
            None => {
                let argv = &self.config.external_command;
                let mut command = tokio::process::Command::new(&argv[0]);
                command
                    .args(&argv[1..])
                    .current_dir(work.dir.path())
                    .env("AGORA_WORK_DIR", work.dir.path())
                    .env("AGORA_DATASET_FORMAT", &job.dataset_format)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true);
                let mut child =
                    command.spawn().map_err(|e| invalid(format!("cannot start {:?}: {e}", argv[0])))?;
                let stdout = child.stdout.take().expect("piped");
                let lines = async {
                    use tokio::io::AsyncBufReadExt;
                    let mut losses = Vec::new();
                    let mut reader = tokio::io::BufReader::new(stdout).lines();
                    while let Ok(Some(line)) = reader.next_line().await {
                        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                            && let Some(loss) = v.get("loss").and_then(|l| l.as_f64())
                        {
                            losses.push(loss);
                            let epoch =
                                v.get("epoch").and_then(|e| e.as_u64()).unwrap_or(losses.len() as u64);
                            let _ = progress.send((epoch as u32, loss));
                        }
                    }
                    losses
                };
                let run = async {
                    let losses = lines.await;
                    let status = child.wait().await;
                    (losses, status)
                };
                let (losses, status) = tokio::time::timeout(timeout, run).await.map_err(|_| {
                    invalid(format!("the external executor ran past {} s", timeout.as_secs()))
                })?;
                let status = status.map_err(|e| invalid(e.to_string()))?;
                if !status.success() {
                    return Err(invalid(format!("the external executor exited with {status}")));
                }
                let produced = work.dir.path().join("output.safetensors");
                if !produced.exists() {
                    return Err(invalid("the external executor wrote no output.safetensors"));
                }
                if produced != output {
                    std::fs::rename(&produced, output).map_err(|e| invalid(e.to_string()))?;
                }
                Ok(losses)
            }
        }
    }

    /// Buyer: fetches and checks the output, registers it, signs the hours.
    async fn finish(self, id: u64) {
        let Ok(job) = self.job(id) else { return };
        let Some((operator, p2p)) = self.operator.clone().zip(self.p2p.clone()) else { return };
        let Some(output) = job.output else { return };
        if let Err(e) = p2p.fetch(output).await {
            self.fail_job(id, &format!("the provider's output was rejected (it could not be fetched intact against its hash): {e}"));
            return;
        }
        let this = self.clone();
        let registered = tokio::task::spawn_blocking(move || this.register_output(&job)).await;
        let version = match registered {
            Ok(Ok(version)) => version,
            Ok(Err(e)) => {
                self.fail_job(id, &format!("the provider's output was rejected: {e}"));
                return;
            }
            Err(e) => {
                self.fail_job(id, &format!("registering the output failed: {e}"));
                return;
            }
        };
        let Ok(job) = self.job(id) else { return };
        let observed = billed_hours(
            now_ms().saturating_sub(job.sent_ms.unwrap_or(job.created_ms)),
            job.gpu_count,
            job.gpu_hours,
        );
        let hours = job.hours_used.unwrap_or(observed).min(observed);
        let statement = UsageStatement { reservationId: job.reservation, hoursUsed: hours };
        let digest = statement
            .eip712_signing_hash(&compute_domain(self.deployment.chain_id, self.deployment.compute_market));
        let signature = match operator.signer.sign_hash_sync(&digest) {
            Ok(sig) => sig.as_bytes().to_vec(),
            Err(e) => {
                self.fail_job(id, &format!("cannot sign the usage statement: {e}"));
                return;
            }
        };
        let _ = self.update_job(id, |j| {
            j.status = JobStatus::Succeeded;
            j.new_version = Some(version);
            j.hours_used = Some(hours);
        });
        let Ok(peer) = job.peer.parse::<PeerId>() else { return };
        let message = JobMessage::Statement {
            reservation: job.reservation.to_be_bytes(),
            hours_used: hours,
            signature: ByteBuf::from(signature),
        };
        if let Err(e) = p2p.send_job(peer, message).await {
            tracing::warn!(target: "agora::compute", job = id, error = %e, "cannot send the usage statement; the provider may report its hours instead");
        }
        tracing::info!(target: "agora::compute", job = id, version, hours, "trained version registered in Staging");
    }

    fn register_output(&self, job: &JobRecord) -> Result<u32, ComputeError> {
        let output = job.output.ok_or_else(|| invalid("no output"))?;
        let config_bytes = self.read_blob(&job.config, 1 << 20)?;
        let config: MlpConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| invalid(format!("config.json: {e}")))?;
        let weights = self.read_blob(&output, 1 << 34)?;
        let tensors = candle_core::safetensors::load_buffer(&weights, &candle_core::Device::Cpu)
            .map_err(|e| invalid(format!("the output is not safetensors: {e}")))?;
        let parameters: u64 = tensors.values().map(|t| t.elem_count() as u64).sum();
        let count = tensors.len() as u64;
        train::Trainer::new(config, tensors)
            .map_err(|e| invalid(format!("the output is not the model's weights: {e}")))?;
        let ctx = Context { actor: Actor::Operator, request_id: None };
        let file = ModelFileSummary {
            name: "model.safetensors".into(),
            blake3: output,
            size: weights.len() as u64,
            parameters,
            dtypes: BTreeMap::from([("F32".to_owned(), parameters)]),
            tensors: count,
        };
        let commitment =
            self.watermark_key.as_ref().map(|key| B256::from(agora_watermark::commitment(key, &output)));
        let tags = BTreeMap::from([
            ("agora.reservation".to_owned(), job.reservation.to_string()),
            ("agora.provider".to_owned(), job.provider.to_string()),
            ("agora.base_version".to_owned(), job.base_version.to_string()),
        ]);
        let run_id = self.record_run(job, RunStatus::Finished).unwrap_or_default();
        let view = self.registry.create_version(
            &ctx,
            &job.model,
            NewVersion {
                run_id,
                source: format!("agora:compute/reservation/{}", job.reservation),
                description: format!(
                    "trained from version {} on reservation {} ({} × {})",
                    job.base_version, job.reservation, job.gpu_count, job.gpu
                ),
                tags,
                file: Some(file),
                commitment,
                ..Default::default()
            },
        )?;
        let number = view.version.version;
        if let Some(dir) = &view.version.artifact_dir {
            let blob = self
                .registry
                .artifacts()
                .put(&config_bytes[..], 1 << 20)
                .map_err(|e| ComputeError::Registry(RegistryError::Artifact(e)))?;
            self.registry.put_file(&ctx, &format!("{dir}/config.json"), &blob)?;
        }
        self.registry.transition_stage(&ctx, &job.model, number, Stage::Staging, false)?;
        let points: Vec<MetricPoint> = job
            .losses
            .iter()
            .enumerate()
            .map(|(i, loss)| MetricPoint {
                key: "loss".into(),
                value: *loss,
                step: i as i64 + 1,
                timestamp: now_ms(),
            })
            .collect();
        if !points.is_empty() {
            self.registry.log_metrics(&ctx, &job.model, number, points)?;
        }
        Ok(number)
    }

    /// Provider: claims the hours with the holder's statement.
    async fn claim(self, id: u64, hours: u64, signature: Vec<u8>) {
        let Some(operator) = self.operator.clone() else { return };
        let Ok(job) = self.job(id) else { return };
        if job.settled {
            return;
        }
        let compute = ComputeMarket::new(self.deployment.compute_market, operator.provider.clone());
        let sent = async {
            let receipt = operator.transact(compute.claim(job.reservation, hours, signature.into())).await?;
            anyhow::ensure!(receipt.status(), "claim reverted");
            Ok::<_, anyhow::Error>(receipt.transaction_hash)
        };
        match sent.await {
            Ok(tx) => {
                let _ = self.update_job(id, |j| {
                    j.settled = true;
                    j.hours_used = Some(hours);
                });
                tracing::info!(target: "agora::compute", job = id, hours, %tx, "claimed the hours used");
            }
            Err(e) => {
                tracing::warn!(target: "agora::compute", job = id, error = %e, "the claim failed; the hours are reported later")
            }
        }
    }

    /// Both sides' upkeep: buyers fail silent jobs and reclaim what the contract lets them;
    /// providers report hours nobody signed and finalize reports.
    pub async fn run_jobs(
        self,
        mut messages: mpsc::Receiver<(PeerId, JobMessage, oneshot::Sender<JobReply>)>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        // Jobs cut short by a restart: buyers wait for the provider, providers give up the run.
        if let Ok(jobs) = self.jobs() {
            for job in jobs {
                match (job.role, job.status) {
                    (JobRole::Buyer, JobStatus::Scheduled) => {
                        tokio::spawn(self.clone().dispatch(job.id));
                    }
                    (JobRole::Provider, JobStatus::Scheduled | JobStatus::Running) => {
                        self.fail_job(job.id, "the provider node restarted during the run");
                    }
                    _ => {}
                }
            }
        }
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
                Some((peer, message, reply)) = messages.recv() => {
                    let this = self.clone();
                    tokio::spawn(async move {
                        let _ = reply.send(this.on_job_message(peer, message).await);
                    });
                }
                _ = tick.tick() => {
                    if let Err(e) = self.upkeep().await {
                        tracing::warn!(target: "agora::compute", error = %e, "job upkeep failed; retrying");
                    }
                }
            }
        }
    }

    /// Retraining policies with what they did and will do.
    pub fn policies(&self) -> Vec<super::policies::PolicyView> {
        let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        self.config
            .policies
            .iter()
            .map(|p| {
                let last = runs.last.get(&p.name);
                super::policies::PolicyView {
                    policy: p.clone(),
                    trigger: p.trigger(),
                    next_run: runs.next.get(&p.name).copied(),
                    last_run: last.map(|(at, _)| *at),
                    last_job: last.and_then(|(_, r)| r.as_ref().ok().copied()),
                    last_error: last.and_then(|(_, r)| r.as_ref().err().cloned()),
                }
            })
            .collect()
    }

    /// Runs a policy now (its schedule, if any, is unchanged).
    pub async fn run_policy(&self, name: &str) -> Result<JobRecord, ComputeError> {
        let policy = self.config.policies.iter().find(|p| p.name == name).cloned().ok_or_else(|| {
            ComputeError::Registry(RegistryError::NotFound(format!("no retraining policy {name:?}")))
        })?;
        let ctx = Context { actor: Actor::Operator, request_id: None };
        let result = self.trigger(&ctx, policy.request()).await;
        let outcome = match &result {
            Ok(job) => Ok(job.id),
            Err(e) => Err(e.to_string()),
        };
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).last.insert(name.to_owned(), (at, outcome));
        result
    }

    /// Fires the policies that are due: scheduled ones whose time came, and drift ones whose
    /// deployment's inputs drifted past their threshold (and that have rested since their last
    /// run). A drift run that schedules a job starts the deployment's drift reference again.
    async fn fire_policies(&self) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut due = Vec::new();
        {
            let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            for policy in self.config.policies.iter().filter(|p| p.schedule.is_some()) {
                match runs.next.get(&policy.name).copied() {
                    None => {
                        if let Some(next) = policy.next_after(now) {
                            runs.next.insert(policy.name.clone(), next);
                        }
                    }
                    Some(next) if next <= now => {
                        due.push((policy.name.clone(), None));
                        if let Some(next) = policy.next_after(now) {
                            runs.next.insert(policy.name.clone(), next);
                        }
                    }
                    Some(_) => {}
                }
            }
            for policy in &self.config.policies {
                let (Some(trigger), Some(serve)) = (&policy.drift, &self.serve) else { continue };
                let rested = runs.last.get(&policy.name).is_none_or(|(at, _)| now >= at + trigger.every);
                let (inputs, outputs) = serve.drift(trigger.deployment);
                if rested
                    && trigger.fires(inputs.as_ref(), outputs.as_ref())
                    && !due.iter().any(|(name, _)| *name == policy.name)
                {
                    let (inputs, outputs) = (inputs.unwrap_or_default(), outputs.unwrap_or_default());
                    tracing::info!(target: "agora::compute", policy = %policy.name, deployment = trigger.deployment, score = ?inputs.score, psi = ?inputs.psi, output_score = ?outputs.score, output_psi = ?outputs.psi, "a deployment drifted past the policy's threshold");
                    due.push((policy.name.clone(), Some(trigger.deployment)));
                }
            }
        }
        for (name, drifted) in due {
            match self.run_policy(&name).await {
                Ok(job) => {
                    tracing::info!(target: "agora::compute", policy = %name, job = job.id, "retraining policy fired");
                    if let (Some(deployment), Some(serve)) = (drifted, &self.serve)
                        && let Err(e) = serve.rebaseline(deployment)
                    {
                        tracing::warn!(target: "agora::compute", policy = %name, deployment, error = %e, "cannot start the drift reference again");
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "agora::compute", policy = %name, error = %e, "retraining policy could not run")
                }
            }
        }
    }

    async fn upkeep(&self) -> anyhow::Result<()> {
        let Some(operator) = self.operator.clone() else { return Ok(()) };
        if !self.enabled() {
            return Ok(());
        }
        self.fire_policies().await;
        let now = self.chain_now()?;
        let timeout_ms = self.job_timeout().as_millis() as u64;
        let grace = self.deployment.compute_grace;
        let compute = ComputeMarket::new(self.deployment.compute_market, operator.provider.clone());
        // One job's failure (a transaction the chain refuses) holds none of the others back.
        for job in self.jobs()? {
            let id = job.id;
            if let Err(e) = self.upkeep_job(&operator, &compute, job, now, timeout_ms, grace).await {
                tracing::warn!(target: "agora::compute", job = id, error = %e, "job upkeep failed; retrying");
            }
        }
        Ok(())
    }

    /// One job's upkeep (see [`Self::run_jobs`]) at chain time `now`.
    async fn upkeep_job(
        &self,
        operator: &Operator,
        compute: &ComputeMarket::ComputeMarketInstance<alloy::providers::DynProvider>,
        job: JobRecord,
        now: u64,
        timeout_ms: u64,
        grace: u64,
    ) -> anyhow::Result<()> {
        let Some(r) = self.store.get::<Reservations>(&job.reservation)? else { return Ok(()) };
        match job.role {
            JobRole::Buyer => {
                if matches!(job.status, JobStatus::Sent | JobStatus::Running) {
                    if r.state == ReservationState::Confirmed && job.status == JobStatus::Sent {
                        let _ = self.update_job(job.id, |j| j.status = JobStatus::Running);
                    }
                    if now_ms().saturating_sub(job.heard_ms) > timeout_ms {
                        self.fail_job(
                            job.id,
                            &format!("the provider went silent for {} s", timeout_ms / 1000),
                        );
                    }
                    return Ok(());
                }
                let reclaimable = match r.state {
                    ReservationState::Reserved => now > r.start_time + grace,
                    ReservationState::Confirmed => r.reported.is_none() && now > r.end_time + grace,
                    _ => false,
                };
                if job.status == JobStatus::Failed && !job.settled && reclaimable {
                    let receipt = operator.transact(compute.reclaim(job.reservation)).await?;
                    anyhow::ensure!(receipt.status(), "reclaim reverted");
                    let _ = self.update_job(job.id, |j| j.settled = true);
                    tracing::info!(target: "agora::compute", job = job.id, reservation = %job.reservation, "reclaimed the escrow of a failed job");
                }
            }
            JobRole::Provider => {
                if r.state != ReservationState::Confirmed || job.status != JobStatus::Succeeded {
                    return Ok(());
                }
                match r.reported {
                    None if !job.settled
                        && now_ms().saturating_sub(job.updated_ms) > timeout_ms
                        && now <= r.end_time + grace =>
                    {
                        let hours = job.hours_used.unwrap_or(1);
                        let receipt = operator.transact(compute.report(job.reservation, hours)).await?;
                        anyhow::ensure!(receipt.status(), "report reverted");
                        tracing::info!(target: "agora::compute", job = job.id, hours, "no statement from the holder: hours reported");
                    }
                    Some((_, final_at)) if now >= final_at => {
                        let receipt = operator.transact(compute.finalize(job.reservation)).await?;
                        anyhow::ensure!(receipt.status(), "finalize reverted");
                        let _ = self.update_job(job.id, |j| j.settled = true);
                    }
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

struct Plan {
    view_version: u32,
    base: [u8; 32],
    config: [u8; 32],
    dataset: [u8; 32],
    format: String,
    hyperparameters: String,
    executor: String,
    selection: super::estimate::Selection,
    offer: super::offers::KnownOffer,
}

struct Work {
    dir: tempfile::TempDir,
    builtin: Builtin,
}

/// The built-in executor's inputs, checked before the start is confirmed; taken by the run.
struct Builtin(std::sync::Mutex<Option<(train::Trainer, train::Dataset, train::Hyperparameters)>>);

impl Builtin {
    fn take_trainer(&self) -> Option<(train::Trainer, train::Dataset, train::Hyperparameters)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_are_billed_whole_and_capped() {
        assert_eq!(billed_hours(2_000, 1, 4), 1, "a short run bills one GPU-hour");
        assert_eq!(billed_hours(3_600_000, 4, 8), 4);
        assert_eq!(billed_hours(3_600_001, 4, 8), 5);
        assert_eq!(billed_hours(10 * 3_600_000, 4, 8), 8, "never more than reserved");
    }

    #[test]
    fn the_holder_signs_what_the_contract_checks() {
        // keccak256("UsageStatement(uint256 reservationId,uint64 hoursUsed)")
        let typehash = alloy::primitives::keccak256("UsageStatement(uint256 reservationId,uint64 hoursUsed)");
        let statement = UsageStatement { reservationId: U256::from(1), hoursUsed: 2 };
        assert_eq!(statement.eip712_type_hash(), typehash);
    }
}
