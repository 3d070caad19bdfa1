//! The model registry: registered models, their versions (stages, aliases, tags, metrics) and
//! the artifact tree their files live in. Both HTTP faces (the node's own `/api/v1/models`
//! and MLflow's `/api/2.0/mlflow`) call this one service, so a version made through either is
//! seen through both.
//!
//! - Records live in RocksDB (`registry_*` tables); every change is one batch, made under one
//!   writer lock, recorded in the audit log and published on the event bus.
//! - A model's versions are written only by its owner (the wallet that created it) or an
//!   operator; names are unique; version numbers are never reused.
//! - Files are blobs of the artifact store, named by paths in the artifact tree
//!   (`artifact_files`); a version registered with a file keeps it under
//!   `registry/<model id>/<version>/`, which only the node writes.
//!
//! Calls block on RocksDB: async callers run them on `spawn_blocking`.

pub mod filter;
pub mod upload;
pub mod webhooks;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use alloy::primitives::{Address, B256};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::{
    artifacts::{ArtifactError, ArtifactStore, BlobInfo, hex},
    audit::{self, Audit},
    store::{
        Batch, Meta, MetaKey, MetaValue, Store, StoreError, Table,
        tables::{
            ArtifactFiles, ContentVersions, FileRecord, MetricPoint, ModelFileSummary, Models,
            RegistryMetrics, RegistryModel, RegistryModels, RegistryNames, RegistryVersion, RegistryVersions,
            Versions,
        },
    },
};

/// Longest model name, tag key, alias.
const MAX_NAME: usize = 256;
const MAX_TAG_KEY: usize = 250;
const MAX_TAG_VALUE: usize = 5000;
const MAX_ALIAS: usize = 255;
const MAX_DESCRIPTION: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
}

fn invalid(message: impl Into<String>) -> RegistryError {
    RegistryError::Invalid(message.into())
}

/// Who is asking.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// Holder of the operator token.
    Operator,
    /// A signed-in wallet.
    Wallet(Address),
    /// No credentials.
    Anonymous,
}

impl Actor {
    pub fn id(&self) -> String {
        match self {
            Self::Operator => "operator".into(),
            Self::Wallet(address) => address.to_checksum(None),
            Self::Anonymous => "anonymous".into(),
        }
    }

    pub fn require_signed_in(&self) -> Result<(), RegistryError> {
        match self {
            Self::Anonymous => Err(RegistryError::Unauthenticated(
                "this needs a bearer token (the operator token or a wallet sign-in)".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// The actor and request of a change, for permissions and the audit log.
#[derive(Clone, Debug)]
pub struct Context {
    pub actor: Actor,
    pub request_id: Option<String>,
}

impl Context {
    pub fn operator() -> Self {
        Self { actor: Actor::Operator, request_id: None }
    }
}

/// A version's lifecycle stage (MLflow's; deprecated upstream in favour of aliases, kept).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    None = 0,
    Staging = 1,
    Production = 2,
    Archived = 3,
}

impl Stage {
    pub const ALL: [Stage; 4] = [Stage::None, Stage::Staging, Stage::Production, Stage::Archived];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::Staging => "Staging",
            Self::Production => "Production",
            Self::Archived => "Archived",
        }
    }

    /// Case-insensitive, as MLflow parses it.
    pub fn parse(text: &str) -> Result<Self, RegistryError> {
        Self::ALL.into_iter().find(|s| s.name().eq_ignore_ascii_case(text)).ok_or_else(|| {
            invalid(format!("invalid stage '{text}'; expected one of None, Staging, Production, Archived"))
        })
    }

    fn from_code(code: u8) -> Self {
        Self::ALL.get(code as usize).copied().unwrap_or(Self::None)
    }
}

/// A registry change, as published on the event bus.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegistryEvent {
    /// `model_created`, `version_created`, `stage_changed`, `alias_set`, ...
    pub kind: &'static str,
    pub model: String,
    pub version: Option<u32>,
    /// What changed, for people (`Staging -> Production`, an alias, a tag key).
    pub detail: String,
    pub actor: String,
}

/// A version as both faces show it.
#[derive(Clone, Debug)]
pub struct VersionView {
    pub model: RegistryModel,
    pub version: RegistryVersion,
    pub stage: Stage,
    pub aliases: Vec<String>,
    pub anchored: Option<Anchor>,
}

/// Where a version's content hash is anchored on-chain, per the index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Anchor {
    pub token_id: String,
    pub version: u32,
    #[schema(value_type = String)]
    pub tx: B256,
    pub block: u64,
}

/// A new version's fields.
#[derive(Clone, Debug, Default)]
pub struct NewVersion {
    pub source: String,
    pub run_id: String,
    pub run_link: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    /// A file already in the artifact store (one reference taken for this version).
    pub file: Option<ModelFileSummary>,
    /// The watermark commitment of the file, when the node computed it.
    pub commitment: Option<B256>,
    /// Where the files are when `source` names them indirectly (a logged model's
    /// `models:/<id>`): downloads go there.
    pub location: Option<String>,
}

/// One entry of an artifact directory listing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TreeEntry {
    pub path: String,
    pub is_dir: bool,
    pub file_size: Option<u64>,
}

/// A change as the audit log and the webhooks have it.
struct Logged {
    action: String,
    object: String,
    event: RegistryEvent,
}

impl Logged {
    /// A change to a model, or to one of its versions.
    fn model(ctx: &Context, kind: &'static str, model: &str, version: Option<u32>, detail: String) -> Self {
        let object = match version {
            Some(v) => format!("model:{model}/{v}"),
            None => format!("model:{model}"),
        };
        let action =
            if detail.is_empty() { format!("registry.{kind}") } else { format!("registry.{kind} {detail}") };
        let event = RegistryEvent { kind, model: model.to_owned(), version, detail, actor: ctx.actor.id() };
        Self { action, object, event }
    }

    /// A change to the artifact tree at `path`.
    fn artifact(ctx: &Context, kind: &'static str, action: String, path: String) -> Self {
        let object = format!("artifact:{path}");
        let event =
            RegistryEvent { kind, model: String::new(), version: None, detail: path, actor: ctx.actor.id() };
        Self { action, object, event }
    }
}

#[derive(Clone)]
pub struct Registry {
    store: Store,
    artifacts: ArtifactStore,
    audit: Audit,
    events: broadcast::Sender<RegistryEvent>,
    /// Where changes wait for the webhooks, when any are configured.
    outbox: Option<webhooks::Outbox>,
    write: Arc<Mutex<()>>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

impl Registry {
    pub fn new(store: Store, artifacts: ArtifactStore, audit: Audit) -> Self {
        let (events, _) = broadcast::channel(1024);
        Self { store, artifacts, audit, events, outbox: None, write: Arc::new(Mutex::new(())) }
    }

    /// Every change from now on is also written to `outbox`, for the webhooks.
    pub fn with_outbox(self, outbox: webhooks::Outbox) -> Self {
        Self { outbox: Some(outbox), ..self }
    }

    /// How each configured webhook is doing (none when no hook is configured).
    pub fn webhooks(&self) -> webhooks::WebhooksView {
        match &self.outbox {
            Some(outbox) => outbox.status(),
            None => webhooks::WebhooksView { last_seq: 0, hooks: Vec::new() },
        }
    }

    /// Writes `batch` together with the audit entries of `changes` and, for the webhooks, their
    /// events in the outbox: all of it or nothing. Then publishes the events on the bus. Called
    /// under the writer lock, so the log, the outbox and the bus have the changes in the order
    /// they were made.
    fn commit(&self, ctx: &Context, mut batch: Batch<'_>, changes: Vec<Logged>) -> Result<(), RegistryError> {
        let actor = ctx.actor.id();
        let entries: Vec<audit::Entry<'_>> = changes
            .iter()
            .map(|c| audit::Entry {
                actor: &actor,
                action: &c.action,
                object: &c.object,
                request_id: ctx.request_id.as_deref(),
            })
            .collect();
        let audited = self.audit.stage(&mut batch, &entries)?;
        let outboxed = match &self.outbox {
            Some(outbox) => Some(outbox.stage(&mut batch, changes.iter().map(|c| &c.event))?),
            None => None,
        };
        self.store.write(batch)?;
        if let Some(outboxed) = outboxed {
            outboxed.written();
        }
        drop(audited);
        for change in changes {
            // no subscriber is fine
            let _ = self.events.send(change.event);
        }
        Ok(())
    }

    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// Every registry change from now on. A subscriber that falls more than 1,024 events
    /// behind is told how many it missed (`RecvError::Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ----- models -----

    pub fn model(&self, name: &str) -> Result<Option<RegistryModel>, RegistryError> {
        let Some(id) = self.store.get::<RegistryNames>(&name.to_owned())? else { return Ok(None) };
        Ok(self.store.get::<RegistryModels>(&id)?)
    }

    pub fn require_model(&self, name: &str) -> Result<RegistryModel, RegistryError> {
        self.model(name)?
            .ok_or_else(|| RegistryError::NotFound(format!("registered model '{name}' not found")))
    }

    /// Whether `actor` may change (or read the originals of) `model`: its owner or an operator.
    pub fn authorize(&self, actor: &Actor, model: &RegistryModel) -> Result<(), RegistryError> {
        actor.require_signed_in()?;
        match actor {
            Actor::Operator => Ok(()),
            Actor::Wallet(address) if model.owner == Some(*address) => Ok(()),
            _ => Err(RegistryError::Forbidden(format!(
                "only the owner of '{}' or an operator may change it",
                model.name
            ))),
        }
    }

    /// Creates a model; its owner is the signed-in wallet (none for the operator).
    pub fn create_model(
        &self,
        ctx: &Context,
        name: &str,
        description: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<RegistryModel, RegistryError> {
        ctx.actor.require_signed_in()?;
        check_name(name)?;
        check_description(description)?;
        for (k, v) in &tags {
            check_tag(k, v)?;
        }
        let _guard = self.lock();
        if self.store.get::<RegistryNames>(&name.to_owned())?.is_some() {
            return Err(RegistryError::AlreadyExists(format!(
                "registered model (name={name}) already exists"
            )));
        }
        let id = match self.store.get::<Meta>(&MetaKey::RegistryNextModel)? {
            Some(MetaValue::Count(n)) => n,
            _ => 1,
        };
        let now = now_ms();
        let model = RegistryModel {
            id,
            name: name.to_owned(),
            description: description.to_owned(),
            tags,
            aliases: BTreeMap::new(),
            owner: match ctx.actor {
                Actor::Wallet(address) => Some(address),
                _ => None,
            },
            user_id: ctx.actor.id(),
            created_ms: now,
            updated_ms: now,
            last_version: 0,
        };
        let mut batch = self.store.batch();
        batch.put::<Meta>(&MetaKey::RegistryNextModel, &MetaValue::Count(id + 1))?;
        batch.put::<RegistryNames>(&model.name, &id)?;
        batch.put::<RegistryModels>(&id, &model)?;
        self.commit(ctx, batch, vec![Logged::model(ctx, "model_created", name, None, String::new())])?;
        Ok(model)
    }

    /// Applies `change` to a model the actor may write, and stores it with `logged`.
    fn change_model(
        &self,
        ctx: &Context,
        name: &str,
        logged: Logged,
        change: impl FnOnce(&mut RegistryModel) -> Result<(), RegistryError>,
    ) -> Result<RegistryModel, RegistryError> {
        let _guard = self.lock();
        let mut model = self.require_model(name)?;
        self.authorize(&ctx.actor, &model)?;
        change(&mut model)?;
        model.updated_ms = now_ms();
        let mut batch = self.store.batch();
        batch.put::<RegistryModels>(&model.id, &model)?;
        self.commit(ctx, batch, vec![logged])?;
        Ok(model)
    }

    pub fn update_model(
        &self,
        ctx: &Context,
        name: &str,
        description: &str,
    ) -> Result<RegistryModel, RegistryError> {
        check_description(description)?;
        let logged = Logged::model(ctx, "model_updated", name, None, String::new());
        self.change_model(ctx, name, logged, |m| {
            m.description = description.to_owned();
            Ok(())
        })
    }

    pub fn rename_model(
        &self,
        ctx: &Context,
        name: &str,
        new_name: &str,
    ) -> Result<RegistryModel, RegistryError> {
        check_name(new_name)?;
        let model = {
            let _guard = self.lock();
            let mut model = self.require_model(name)?;
            self.authorize(&ctx.actor, &model)?;
            if self.store.get::<RegistryNames>(&new_name.to_owned())?.is_some() {
                return Err(RegistryError::AlreadyExists(format!(
                    "registered model (name={new_name}) already exists"
                )));
            }
            model.name = new_name.to_owned();
            model.updated_ms = now_ms();
            let mut batch = self.store.batch();
            batch.delete::<RegistryNames>(&name.to_owned());
            batch.put::<RegistryNames>(&model.name, &model.id)?;
            batch.put::<RegistryModels>(&model.id, &model)?;
            let logged = Logged::model(ctx, "model_renamed", new_name, None, format!("{name} -> {new_name}"));
            self.commit(ctx, batch, vec![logged])?;
            model
        };
        Ok(model)
    }

    /// Deletes a model with its versions and metrics; files the node made for them are released
    /// to the artifact store's garbage collection.
    pub fn delete_model(&self, ctx: &Context, name: &str) -> Result<(), RegistryError> {
        let _guard = self.lock();
        let model = self.require_model(name)?;
        self.authorize(&ctx.actor, &model)?;
        let versions = self.versions_of(model.id)?;
        let mut batch = self.store.batch();
        let mut files = Vec::new();
        for version in &versions {
            files.extend(self.remove_version(&mut batch, &model, version)?);
        }
        batch.delete::<RegistryNames>(&model.name);
        batch.delete::<RegistryModels>(&model.id);
        self.commit(ctx, batch, vec![Logged::model(ctx, "model_deleted", name, None, String::new())])?;
        self.release_all(&files)
    }

    /// Releases the blobs of files whose records are gone (only once they are: a blob released
    /// while a record still names it could be collected from under it).
    fn release_all(&self, blobs: &[[u8; 32]]) -> Result<(), RegistryError> {
        for blob in blobs {
            self.artifacts.release(blob)?;
        }
        Ok(())
    }

    pub fn set_model_tag(
        &self,
        ctx: &Context,
        name: &str,
        key: &str,
        value: &str,
    ) -> Result<(), RegistryError> {
        check_tag(key, value)?;
        let logged = Logged::model(ctx, "model_tag_set", name, None, key.to_owned());
        self.change_model(ctx, name, logged, |m| {
            m.tags.insert(key.to_owned(), value.to_owned());
            Ok(())
        })?;
        Ok(())
    }

    pub fn delete_model_tag(&self, ctx: &Context, name: &str, key: &str) -> Result<(), RegistryError> {
        let logged = Logged::model(ctx, "model_tag_deleted", name, None, key.to_owned());
        self.change_model(ctx, name, logged, |m| {
            m.tags.remove(key).map(|_| ()).ok_or_else(|| {
                RegistryError::NotFound(format!("no tag with key '{key}' on registered model '{name}'"))
            })
        })?;
        Ok(())
    }

    /// Every model, in name order.
    pub fn models(&self) -> Result<Vec<RegistryModel>, RegistryError> {
        let mut models = Vec::new();
        for entry in self.store.iter::<RegistryNames>() {
            let (_, id) = entry?;
            if let Some(model) = self.store.get::<RegistryModels>(&id)? {
                models.push(model);
            }
        }
        Ok(models)
    }

    // ----- aliases -----

    pub fn set_alias(
        &self,
        ctx: &Context,
        name: &str,
        alias: &str,
        version: u32,
    ) -> Result<(), RegistryError> {
        check_alias(alias)?;
        let logged = Logged::model(ctx, "alias_set", name, Some(version), alias.to_owned());
        self.change_model(ctx, name, logged, |m| {
            if self.store.get::<RegistryVersions>(&(m.id, version))?.is_none() {
                return Err(version_not_found(name, version));
            }
            m.aliases.insert(alias.to_owned(), version);
            Ok(())
        })?;
        Ok(())
    }

    pub fn delete_alias(&self, ctx: &Context, name: &str, alias: &str) -> Result<(), RegistryError> {
        let logged = Logged::model(ctx, "alias_deleted", name, None, alias.to_owned());
        self.change_model(ctx, name, logged, |m| {
            m.aliases
                .remove(alias)
                .map(|_| ())
                .ok_or_else(|| RegistryError::NotFound(format!("registered model alias {alias} not found")))
        })?;
        Ok(())
    }

    /// The version an alias points at.
    pub fn by_alias(&self, name: &str, alias: &str) -> Result<VersionView, RegistryError> {
        let model = self.require_model(name)?;
        let version = *model
            .aliases
            .get(alias)
            .ok_or_else(|| RegistryError::NotFound(format!("registered model alias {alias} not found")))?;
        self.version(name, version)
    }

    // ----- versions -----

    fn versions_of(&self, id: u64) -> Result<Vec<RegistryVersion>, RegistryError> {
        self.store
            .scan::<RegistryVersions>(&id.to_be_bytes(), None, false)
            .map(|entry| entry.map(|(_, v)| v).map_err(RegistryError::from))
            .collect()
    }

    fn view(&self, model: &RegistryModel, version: RegistryVersion) -> Result<VersionView, RegistryError> {
        let aliases =
            model.aliases.iter().filter(|(_, v)| **v == version.version).map(|(a, _)| a.clone()).collect();
        let anchored = match &version.file {
            Some(file) => self.anchor(&file.blake3)?,
            None => None,
        };
        Ok(VersionView {
            stage: Stage::from_code(version.stage),
            model: model.clone(),
            version,
            aliases,
            anchored,
        })
    }

    /// Where content with this blake3 is anchored on-chain, if the index has seen it.
    pub fn anchor(&self, blake3: &[u8; 32]) -> Result<Option<Anchor>, RegistryError> {
        let hash = B256::from(*blake3);
        let Some((token, version)) = self.store.get::<ContentVersions>(&hash)? else { return Ok(None) };
        Ok(self.store.get::<Versions>(&(token, version))?.map(|record| Anchor {
            token_id: token.to_string(),
            version,
            tx: record.anchored.tx,
            block: record.anchored.block,
        }))
    }

    /// A model's versions, newest first.
    pub fn versions(&self, name: &str) -> Result<Vec<VersionView>, RegistryError> {
        let model = self.require_model(name)?;
        let mut versions = self.versions_of(model.id)?;
        versions.reverse();
        versions.into_iter().map(|v| self.view(&model, v)).collect()
    }

    /// Every version of every model (for searches).
    pub fn all_versions(&self) -> Result<Vec<VersionView>, RegistryError> {
        let mut all = Vec::new();
        for model in self.models()? {
            for version in self.versions_of(model.id)? {
                all.push(self.view(&model, version)?);
            }
        }
        Ok(all)
    }

    pub fn version(&self, name: &str, version: u32) -> Result<VersionView, RegistryError> {
        let (model, record) = self.model_version(name, version)?;
        self.view(&model, record)
    }

    /// A model and one of its versions, or which one is missing.
    fn model_version(
        &self,
        name: &str,
        number: u32,
    ) -> Result<(RegistryModel, RegistryVersion), RegistryError> {
        let model = self.require_model(name)?;
        let version = self
            .store
            .get::<RegistryVersions>(&(model.id, number))?
            .ok_or_else(|| version_not_found(name, number))?;
        Ok((model, version))
    }

    /// [`Self::model_version`] for a change: `actor` must be allowed to write the model. Call
    /// under the writer lock.
    fn writable_version(
        &self,
        actor: &Actor,
        name: &str,
        number: u32,
    ) -> Result<(RegistryModel, RegistryVersion), RegistryError> {
        let (model, version) = self.model_version(name, number)?;
        self.authorize(actor, &model)?;
        Ok((model, version))
    }

    /// The newest version in each of `stages` (every stage when empty).
    pub fn latest_versions(&self, name: &str, stages: &[Stage]) -> Result<Vec<VersionView>, RegistryError> {
        let model = self.require_model(name)?;
        let mut latest: BTreeMap<u8, RegistryVersion> = BTreeMap::new();
        for version in self.versions_of(model.id)? {
            let stage = version.stage;
            if stages.is_empty() || stages.iter().any(|s| *s as u8 == stage) {
                latest.insert(stage, version);
            }
        }
        latest.into_values().map(|v| self.view(&model, v)).collect()
    }

    /// Creates the next version of `name`. A file given in `new.file` must already be in the
    /// artifact store with one reference taken for it; on error that reference is dropped.
    pub fn create_version(
        &self,
        ctx: &Context,
        name: &str,
        new: NewVersion,
    ) -> Result<VersionView, RegistryError> {
        let mut copied = Vec::new();
        let result = self.create_version_inner(ctx, name, &new, &mut copied);
        if result.is_err() {
            if let Some(file) = &new.file {
                self.artifacts.release(&file.blake3)?;
            }
            self.release_all(&copied)?;
        }
        result
    }

    /// Creates the version; the references it takes on files it copies are pushed to `copied`
    /// as they are taken, so a failure can drop them.
    fn create_version_inner(
        &self,
        ctx: &Context,
        name: &str,
        new: &NewVersion,
        copied: &mut Vec<[u8; 32]>,
    ) -> Result<VersionView, RegistryError> {
        check_description(&new.description)?;
        for (k, v) in &new.tags {
            check_tag(k, v)?;
        }
        check_source(&new.source)?;
        let _guard = self.lock();
        let mut model = self.require_model(name)?;
        self.authorize(&ctx.actor, &model)?;
        let number = model.last_version + 1;
        let now = now_ms();
        let mut batch = self.store.batch();
        let (artifact_dir, owns_dir, source) = match &new.file {
            Some(file) => {
                let dir = format!("registry/{}/{number}", model.id);
                let path = format!("{dir}/{}", file.name);
                let record = FileRecord { blake3: file.blake3, size: file.size, created_ms: now };
                batch.put::<ArtifactFiles>(&path, &record)?;
                let source = if new.source.is_empty() {
                    format!("mlflow-artifacts:/{dir}")
                } else {
                    new.source.clone()
                };
                (Some(dir), true, source)
            }
            None => {
                let location = new
                    .location
                    .as_deref()
                    .unwrap_or(&new.source)
                    .strip_prefix("mlflow-artifacts:")
                    .map(|p| p.trim_start_matches('/').trim_end_matches('/').to_owned());
                match location {
                    // The files a run or a logged model holds now become the version's own:
                    // the records are copied (the bytes are shared by their hash), so the
                    // version keeps what was registered when the run's files are overwritten,
                    // deleted or collected.
                    Some(from) if !from.is_empty() => {
                        self.check_tree_read(&ctx.actor, &from)?;
                        let mut files = self.files_under(&from)?;
                        for (path, _) in &mut files {
                            *path = path[from.len() + 1..].to_owned();
                        }
                        if let Some(record) = self.store.get::<ArtifactFiles>(&from)? {
                            let file_name = from.rsplit('/').next().unwrap_or(&from).to_owned();
                            files.push((file_name, record));
                        }
                        if files.is_empty() {
                            (Some(from), false, new.source.clone())
                        } else {
                            let dir = format!("registry/{}/{number}", model.id);
                            for (relative, record) in files {
                                self.artifacts.acquire(&record.blake3)?;
                                copied.push(record.blake3);
                                let record = FileRecord { created_ms: now, ..record };
                                batch.put::<ArtifactFiles>(&format!("{dir}/{relative}"), &record)?;
                            }
                            (Some(dir), true, new.source.clone())
                        }
                    }
                    _ => (None, false, new.source.clone()),
                }
            }
        };
        let version = RegistryVersion {
            version: number,
            user_id: ctx.actor.id(),
            created_ms: now,
            updated_ms: now,
            stage: Stage::None as u8,
            description: new.description.clone(),
            source,
            run_id: new.run_id.clone(),
            run_link: new.run_link.clone(),
            tags: new.tags.clone(),
            artifact_dir,
            owns_dir,
            file: new.file.clone(),
            commitment: new.commitment,
        };
        model.last_version = number;
        model.updated_ms = now;
        batch.put::<RegistryVersions>(&(model.id, number), &version)?;
        batch.put::<RegistryModels>(&model.id, &model)?;
        self.commit(
            ctx,
            batch,
            vec![Logged::model(ctx, "version_created", name, Some(number), String::new())],
        )?;
        self.view(&model, version)
    }

    /// Applies `change` to a version the actor may write, and stores it with the change `kind`
    /// and its `detail`.
    fn change_version(
        &self,
        ctx: &Context,
        (name, number): (&str, u32),
        (kind, detail): (&'static str, String),
        change: impl FnOnce(&mut RegistryVersion) -> Result<(), RegistryError>,
    ) -> Result<VersionView, RegistryError> {
        let _guard = self.lock();
        let (model, mut version) = self.writable_version(&ctx.actor, name, number)?;
        change(&mut version)?;
        version.updated_ms = now_ms();
        let mut batch = self.store.batch();
        batch.put::<RegistryVersions>(&(model.id, number), &version)?;
        self.commit(ctx, batch, vec![Logged::model(ctx, kind, name, Some(number), detail)])?;
        self.view(&model, version)
    }

    pub fn update_version(
        &self,
        ctx: &Context,
        name: &str,
        number: u32,
        description: &str,
    ) -> Result<VersionView, RegistryError> {
        check_description(description)?;
        self.change_version(ctx, (name, number), ("version_updated", String::new()), |v| {
            v.description = description.to_owned();
            Ok(())
        })
    }

    /// Records the watermark commitment of a version once it is marked.
    pub fn set_commitment(
        &self,
        ctx: &Context,
        name: &str,
        number: u32,
        commitment: B256,
    ) -> Result<VersionView, RegistryError> {
        self.change_version(ctx, (name, number), ("version_marked", commitment.to_string()), |v| {
            v.commitment = Some(commitment);
            Ok(())
        })
    }

    pub fn set_version_tag(
        &self,
        ctx: &Context,
        name: &str,
        number: u32,
        key: &str,
        value: &str,
    ) -> Result<(), RegistryError> {
        check_tag(key, value)?;
        self.change_version(ctx, (name, number), ("version_tag_set", key.to_owned()), |v| {
            v.tags.insert(key.to_owned(), value.to_owned());
            Ok(())
        })?;
        Ok(())
    }

    pub fn delete_version_tag(
        &self,
        ctx: &Context,
        name: &str,
        number: u32,
        key: &str,
    ) -> Result<(), RegistryError> {
        self.change_version(ctx, (name, number), ("version_tag_deleted", key.to_owned()), |v| {
            v.tags.remove(key).map(|_| ()).ok_or_else(|| {
                RegistryError::NotFound(format!("no tag with key '{key}' on version {number} of '{name}'"))
            })
        })?;
        Ok(())
    }

    /// Moves a version to `stage`; with `archive_existing`, the model's other versions in that
    /// stage go to Archived in the same batch.
    pub fn transition_stage(
        &self,
        ctx: &Context,
        name: &str,
        number: u32,
        stage: Stage,
        archive_existing: bool,
    ) -> Result<VersionView, RegistryError> {
        let view = {
            let _guard = self.lock();
            let (model, mut version) = self.writable_version(&ctx.actor, name, number)?;
            let now = now_ms();
            let from = Stage::from_code(version.stage);
            let mut batch = self.store.batch();
            let mut archived = Vec::new();
            if archive_existing && matches!(stage, Stage::Staging | Stage::Production) {
                for mut other in self.versions_of(model.id)? {
                    if other.version != number && other.stage == stage as u8 {
                        other.stage = Stage::Archived as u8;
                        other.updated_ms = now;
                        batch.put::<RegistryVersions>(&(model.id, other.version), &other)?;
                        archived.push(other.version);
                    }
                }
            }
            version.stage = stage as u8;
            version.updated_ms = now;
            batch.put::<RegistryVersions>(&(model.id, number), &version)?;
            let mut changes: Vec<Logged> = archived
                .into_iter()
                .map(|other| {
                    let detail = format!("{} -> Archived", stage.name());
                    Logged::model(ctx, "stage_changed", name, Some(other), detail)
                })
                .collect();
            let detail = format!("{} -> {}", from.name(), stage.name());
            changes.push(Logged::model(ctx, "stage_changed", name, Some(number), detail));
            self.commit(ctx, batch, changes)?;
            self.view(&model, version)?
        };
        Ok(view)
    }

    /// Puts a version's removal into `batch`; returns the blobs of the files it owned, to be
    /// released once the batch is written.
    fn remove_version(
        &self,
        batch: &mut crate::store::Batch<'_>,
        model: &RegistryModel,
        version: &RegistryVersion,
    ) -> Result<Vec<[u8; 32]>, RegistryError> {
        batch.delete::<RegistryVersions>(&(model.id, version.version));
        let mut prefix = model.id.to_be_bytes().to_vec();
        prefix.extend_from_slice(&version.version.to_be_bytes());
        for entry in self.store.scan::<RegistryMetrics>(&prefix, None, false) {
            let (key, _) = entry?;
            batch.delete_raw(RegistryMetrics::NAME, &key);
        }
        let mut blobs = Vec::new();
        if version.owns_dir
            && let Some(dir) = &version.artifact_dir
        {
            for (path, record) in self.files_under(dir)? {
                batch.delete::<ArtifactFiles>(&path);
                blobs.push(record.blake3);
            }
        }
        Ok(blobs)
    }

    /// Deletes a version (its number is not reused), its metrics, the aliases that point at
    /// it, and the files the node made for it (released to garbage collection).
    pub fn delete_version(&self, ctx: &Context, name: &str, number: u32) -> Result<(), RegistryError> {
        let _guard = self.lock();
        let (mut model, version) = self.writable_version(&ctx.actor, name, number)?;
        let mut batch = self.store.batch();
        let files = self.remove_version(&mut batch, &model, &version)?;
        model.aliases.retain(|_, v| *v != number);
        model.updated_ms = now_ms();
        batch.put::<RegistryModels>(&model.id, &model)?;
        let logged = Logged::model(ctx, "version_deleted", name, Some(number), String::new());
        self.commit(ctx, batch, vec![logged])?;
        self.release_all(&files)
    }

    // ----- metrics -----

    /// Appends points to a version's metric series.
    pub fn log_metrics(
        &self,
        ctx: &Context,
        name: &str,
        number: u32,
        points: Vec<MetricPoint>,
    ) -> Result<usize, RegistryError> {
        if points.is_empty() {
            return Err(invalid("no metrics given"));
        }
        for point in &points {
            if point.key.is_empty() || point.key.len() > MAX_TAG_KEY {
                return Err(invalid(format!("metric name must be 1 to {MAX_TAG_KEY} characters")));
            }
            if !point.value.is_finite() {
                return Err(invalid(format!(
                    "metric '{}' has a value that is not a finite number",
                    point.key
                )));
            }
        }
        let count = points.len();
        {
            let _guard = self.lock();
            let (model, _) = self.writable_version(&ctx.actor, name, number)?;
            let mut prefix = model.id.to_be_bytes().to_vec();
            prefix.extend_from_slice(&number.to_be_bytes());
            let next = match self.store.scan::<RegistryMetrics>(&prefix, None, true).next().transpose()? {
                Some((key, _)) => {
                    u64::from_be_bytes(key[12..20].try_into().expect("20-byte metric keys")) + 1
                }
                None => 0,
            };
            let mut batch = self.store.batch();
            for (i, point) in points.into_iter().enumerate() {
                batch.put::<RegistryMetrics>(&(model.id, number, next + i as u64), &point)?;
            }
            let logged = Logged::model(ctx, "metrics_logged", name, Some(number), format!("{count} points"));
            self.commit(ctx, batch, vec![logged])?;
        }
        Ok(count)
    }

    /// A version's metric series by name, each in the order logged.
    pub fn metrics(
        &self,
        name: &str,
        number: u32,
    ) -> Result<BTreeMap<String, Vec<MetricPoint>>, RegistryError> {
        let (model, _) = self.model_version(name, number)?;
        let mut prefix = model.id.to_be_bytes().to_vec();
        prefix.extend_from_slice(&number.to_be_bytes());
        let mut series: BTreeMap<String, Vec<MetricPoint>> = BTreeMap::new();
        for entry in self.store.scan::<RegistryMetrics>(&prefix, None, false) {
            let (_, point) = entry?;
            series.entry(point.key.clone()).or_default().push(point);
        }
        Ok(series)
    }

    // ----- the artifact tree -----

    fn files_under(&self, dir: &str) -> Result<Vec<(String, FileRecord)>, RegistryError> {
        let prefix = format!("{}/", dir.trim_end_matches('/'));
        self.store
            .scan::<ArtifactFiles>(prefix.as_bytes(), None, false)
            .map(|entry| {
                let (key, record) = entry?;
                Ok((String::from_utf8_lossy(&key).into_owned(), record))
            })
            .collect()
    }

    /// The file at `path`, if any.
    pub fn file(&self, path: &str) -> Result<Option<FileRecord>, RegistryError> {
        let path = check_path(path)?;
        Ok(self.store.get::<ArtifactFiles>(&path)?)
    }

    /// The direct children of a directory of the tree (the root when `dir` is empty).
    pub fn list(&self, dir: &str) -> Result<Vec<TreeEntry>, RegistryError> {
        let dir = if dir.trim_matches('/').is_empty() { String::new() } else { check_path(dir)? };
        let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
        let mut entries: Vec<TreeEntry> = Vec::new();
        for entry in self.store.scan::<ArtifactFiles>(prefix.as_bytes(), None, false) {
            let (key, record) = entry?;
            let path = String::from_utf8_lossy(&key).into_owned();
            let rest = &path[prefix.len()..];
            match rest.split_once('/') {
                Some((child, _)) => {
                    let child = format!("{prefix}{child}");
                    if entries.last().is_none_or(|e| e.path != child) {
                        entries.push(TreeEntry { path: child, is_dir: true, file_size: None });
                    }
                }
                None => entries.push(TreeEntry { path, is_dir: false, file_size: Some(record.size) }),
            }
        }
        Ok(entries)
    }

    /// Records a blob already taken into the artifact store (one reference held for it) at
    /// `path`, replacing what was there. On error the reference is dropped.
    pub fn put_file(&self, ctx: &Context, path: &str, blob: &BlobInfo) -> Result<(), RegistryError> {
        let result = (|| {
            ctx.actor.require_signed_in()?;
            let path = check_path(path)?;
            self.check_tree_write(ctx, &path)?;
            let hash = parse_blake3(&blob.blake3)?;
            let _guard = self.lock();
            let previous = self.store.get::<ArtifactFiles>(&path)?;
            if self.store.scan::<ArtifactFiles>(format!("{path}/").as_bytes(), None, false).next().is_some() {
                return Err(invalid(format!("'{path}' is a directory")));
            }
            let mut ancestor = path.as_str();
            while let Some((parent, _)) = ancestor.rsplit_once('/') {
                if self.store.get::<ArtifactFiles>(&parent.to_owned())?.is_some() {
                    return Err(invalid(format!("'{parent}' is a file")));
                }
                ancestor = parent;
            }
            let mut batch = self.store.batch();
            batch.put::<ArtifactFiles>(
                &path,
                &FileRecord { blake3: hash, size: blob.size, created_ms: now_ms() },
            )?;
            let logged =
                Logged::artifact(ctx, "artifact_put", format!("artifacts.put {}", blob.blake3), path);
            self.commit(ctx, batch, vec![logged])?;
            if let Some(previous) = previous {
                self.artifacts.release(&previous.blake3)?;
            }
            Ok(())
        })();
        if result.is_err()
            && let Ok(hash) = parse_blake3(&blob.blake3)
        {
            self.artifacts.release(&hash)?;
        }
        result
    }

    /// Deletes a file, or a directory with everything under it.
    pub fn delete_path(&self, ctx: &Context, path: &str) -> Result<u64, RegistryError> {
        ctx.actor.require_signed_in()?;
        let path = check_path(path)?;
        self.check_tree_write(ctx, &path)?;
        let removed = {
            let _guard = self.lock();
            let mut doomed = self.files_under(&path)?;
            if let Some(record) = self.store.get::<ArtifactFiles>(&path)? {
                doomed.push((path.clone(), record));
            }
            if doomed.is_empty() {
                return Err(RegistryError::NotFound(format!("no artifact at '{path}'")));
            }
            let mut batch = self.store.batch();
            for (p, _) in &doomed {
                batch.delete::<ArtifactFiles>(p);
            }
            let logged = Logged::artifact(ctx, "artifact_deleted", "artifacts.delete".into(), path);
            self.commit(ctx, batch, vec![logged])?;
            for (_, record) in &doomed {
                self.artifacts.release(&record.blake3)?;
            }
            doomed.len() as u64
        };
        Ok(removed)
    }

    /// A registered version's files (`registry/<model id>/...`) are read, as its original, by
    /// the model's owner or an operator only: a model sold on-chain is bought as a
    /// fingerprinted copy, never read from the tree. Other paths are open to every reader.
    pub fn check_tree_read(&self, actor: &Actor, path: &str) -> Result<(), RegistryError> {
        let mut parts = path.trim_start_matches('/').split('/');
        if parts.next() != Some("registry") {
            return Ok(());
        }
        let Some(id) = parts.next().filter(|p| !p.is_empty()) else { return Ok(()) };
        let model =
            id.parse::<u64>().ok().map(|id| self.store.get::<RegistryModels>(&id)).transpose()?.flatten();
        match model {
            Some(model) => match self.authorize(actor, &model) {
                Err(RegistryError::Forbidden(_)) => Err(RegistryError::Forbidden(format!(
                    "the files of '{}' are read by its owner or an operator; buyers download their own copy",
                    model.name
                ))),
                other => other,
            },
            None if *actor == Actor::Operator => Ok(()),
            None => {
                Err(RegistryError::Forbidden("files under registry/ belong to registered versions".into()))
            }
        }
    }

    /// Content anchored on-chain is a model for sale: wherever it sits in the tree (a run's
    /// artifacts, an upload), its bytes are read by the token's owner or an operator only.
    pub fn check_content_read(&self, actor: &Actor, blake3: &[u8; 32]) -> Result<(), RegistryError> {
        let Some((token, _)) = self.store.get::<ContentVersions>(&B256::from(*blake3))? else {
            return Ok(());
        };
        let sold = || format!("this file is the content of model token {token}, anchored on-chain");
        match actor {
            Actor::Operator => Ok(()),
            Actor::Wallet(wallet)
                if self.store.get::<Models>(&token)?.is_some_and(|m| m.owner == *wallet) =>
            {
                Ok(())
            }
            Actor::Anonymous => Err(RegistryError::Unauthenticated(format!(
                "{}: its owner reads it with a bearer token",
                sold()
            ))),
            Actor::Wallet(_) => Err(RegistryError::Forbidden(format!(
                "{}: its owner or an operator reads the original; buyers download their own copy",
                sold()
            ))),
        }
    }

    /// `registry/` belongs to the node's own versions: only an operator writes there.
    fn check_tree_write(&self, ctx: &Context, path: &str) -> Result<(), RegistryError> {
        if (path == "registry" || path.starts_with("registry/")) && ctx.actor != Actor::Operator {
            return Err(RegistryError::Forbidden(
                "artifacts under registry/ belong to registered versions; change them through the registry"
                    .into(),
            ));
        }
        Ok(())
    }
}

fn version_not_found(name: &str, version: u32) -> RegistryError {
    RegistryError::NotFound(format!("model version (name={name}, version={version}) not found"))
}

pub fn parse_blake3(hex_text: &str) -> Result<[u8; 32], RegistryError> {
    blake3::Hash::from_hex(hex_text)
        .map(|h| *h.as_bytes())
        .map_err(|_| invalid(format!("'{hex_text}' is not a blake3 hash")))
}

pub fn check_name(name: &str) -> Result<(), RegistryError> {
    if name.trim().is_empty() {
        return Err(invalid("registered model name must not be empty"));
    }
    if name.chars().count() > MAX_NAME {
        return Err(invalid(format!("registered model name is longer than {MAX_NAME} characters")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("registered model name must not contain control characters"));
    }
    Ok(())
}

fn check_description(description: &str) -> Result<(), RegistryError> {
    if description.len() > MAX_DESCRIPTION {
        return Err(invalid(format!("description is longer than {MAX_DESCRIPTION} bytes")));
    }
    Ok(())
}

fn check_tag(key: &str, value: &str) -> Result<(), RegistryError> {
    if key.is_empty() || key.chars().count() > MAX_TAG_KEY {
        return Err(invalid(format!("tag key must be 1 to {MAX_TAG_KEY} characters")));
    }
    if key.chars().any(char::is_control) {
        return Err(invalid(format!("tag key '{}' contains control characters", key.escape_debug())));
    }
    if value.chars().count() > MAX_TAG_VALUE {
        return Err(invalid(format!("value of tag '{key}' is longer than {MAX_TAG_VALUE} characters")));
    }
    Ok(())
}

/// `^[\w\-]*$`, at most 255 characters, not `latest` or `v<digits>`.
pub fn check_alias(alias: &str) -> Result<(), RegistryError> {
    if alias.is_empty() || alias.chars().count() > MAX_ALIAS {
        return Err(invalid(format!("alias must be 1 to {MAX_ALIAS} characters")));
    }
    if !alias.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-') {
        return Err(invalid(format!("alias '{alias}' may contain only letters, digits, '_' and '-'")));
    }
    let lower = alias.to_ascii_lowercase();
    let version_like =
        lower.len() > 1 && lower.starts_with('v') && lower[1..].chars().all(|c| c.is_ascii_digit());
    if lower == "latest" || version_like {
        return Err(invalid(format!("alias '{alias}' is reserved (latest and v<number> name versions)")));
    }
    Ok(())
}

/// Refuses sources that could walk out of where they point: `..` segments, encoded slashes or
/// dots, NUL.
pub fn check_source(source: &str) -> Result<(), RegistryError> {
    let lower = source.to_ascii_lowercase();
    let traversal = source.split(['/', '\\']).any(|segment| segment == "..")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || lower.contains("%2e%2e")
        || lower.contains("%00")
        || source.contains('\0');
    if traversal {
        return Err(invalid(format!(
            "invalid model version source '{}': path traversal is not allowed",
            source.escape_debug()
        )));
    }
    Ok(())
}

/// A normalised artifact path: relative, `/`-separated, no empty, `.` or `..` segments.
pub fn check_path(path: &str) -> Result<String, RegistryError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() {
        return Err(invalid("artifact path must not be empty"));
    }
    if trimmed.contains('\0') || trimmed.contains('\\') || trimmed.chars().any(char::is_control) {
        return Err(invalid(format!("invalid artifact path '{}'", path.escape_debug())));
    }
    if trimmed.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err(invalid(format!(
            "invalid artifact path '{path}': empty, '.' and '..' segments are not allowed"
        )));
    }
    Ok(trimmed.to_owned())
}

/// The summary of a file taken into the artifact store, for [`NewVersion::file`].
pub fn file_summary(
    name: &str,
    blob: &BlobInfo,
    header: upload::HeaderSummary,
) -> Result<ModelFileSummary, RegistryError> {
    Ok(ModelFileSummary {
        name: name.to_owned(),
        blake3: parse_blake3(&blob.blake3)?,
        size: blob.size,
        parameters: header.parameters,
        dtypes: header.dtypes,
        tensors: header.tensors,
    })
}

/// Hex of a blake3 for views.
pub fn blake3_hex(hash: &[u8; 32]) -> String {
    hex(hash)
}

#[cfg(test)]
mod tests;
