//! Fingerprinted downloads: the copy a license holder gets is the original with the owner's
//! mark and that license's fingerprint (../shared/WATERMARK.md), made once per license and
//! version, kept encrypted in the artifact store (bounded: least recently used copies go
//! first), and signed by the node's ed25519 key so the buyer can prove what was delivered.
//! Copies are made ahead, as soon as the index shows a purchase, so a first download usually
//! finds its copy ready.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
};

use agora_contracts::TermKind;
use alloy::primitives::{Address, B256, U256};
use ed25519_dalek::Signer;

use crate::{
    artifacts::{ArtifactError, ArtifactStore},
    registry::now_ms,
    store::{
        Store, StoreError,
        tables::{CopyRecord, LicenseCopies, Licenses, Models, Versions},
    },
};

/// What a delivery signature covers, after this domain tag: license id, token id (32 bytes
/// each, big-endian), version (4 bytes), the served file's blake3.
pub const DELIVERY_DOMAIN: &[u8] = b"agora-delivery-v1";

#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("no license {0}")]
    NotFound(U256),
    #[error("{0}")]
    Forbidden(String),
    #[error("license {license} expired at {expires_at} (unix seconds); renew it to download again")]
    Expired { license: U256, expires_at: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("cannot make the fingerprinted copy: {0}")]
    Watermark(#[from] agora_watermark::WatermarkError),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// A copy ready to serve.
#[derive(Clone, Debug)]
pub struct Copy {
    pub license_id: U256,
    pub token_id: U256,
    pub version: u32,
    pub blake3: [u8; 32],
    pub size: u64,
    /// ed25519 over [`DELIVERY_DOMAIN`] and the fields above.
    pub signature: [u8; 64],
}

#[derive(Clone)]
pub struct Delivery {
    store: Store,
    artifacts: ArtifactStore,
    watermark: Arc<agora_watermark::MasterKey>,
    node_key: Arc<ed25519_dalek::SigningKey>,
    tmp: PathBuf,
    cache_limit: u64,
    making: Arc<Mutex<()>>,
}

/// The bytes a delivery signature covers.
pub fn signed_bytes(license_id: U256, token_id: U256, version: u32, blake3: &[u8; 32]) -> Vec<u8> {
    let mut message = DELIVERY_DOMAIN.to_vec();
    message.extend_from_slice(&license_id.to_be_bytes::<32>());
    message.extend_from_slice(&token_id.to_be_bytes::<32>());
    message.extend_from_slice(&version.to_be_bytes());
    message.extend_from_slice(blake3);
    message
}

impl Delivery {
    pub fn new(
        store: Store,
        artifacts: ArtifactStore,
        watermark: Arc<agora_watermark::MasterKey>,
        node_key: [u8; 32],
        tmp: PathBuf,
        cache_limit: u64,
    ) -> Self {
        Self {
            store,
            artifacts,
            watermark,
            node_key: Arc::new(ed25519_dalek::SigningKey::from_bytes(&node_key)),
            tmp,
            cache_limit,
            making: Arc::new(Mutex::new(())),
        }
    }

    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// Signs `message` with the node's ed25519 key.
    pub fn sign_message(&self, message: &[u8]) -> [u8; 64] {
        self.node_key.sign(message).to_bytes()
    }

    /// The node's public delivery key, hex.
    pub fn public_key(&self) -> String {
        crate::artifacts::hex(self.node_key.verifying_key().as_bytes())
    }

    /// The copy of the latest version of `license_id`'s model for `caller`, made if needed.
    /// `now` is chain time.
    pub fn prepare(&self, license_id: U256, caller: Address, now: u64) -> Result<Copy, DeliveryError> {
        let license = self.store.get::<Licenses>(&license_id)?.ok_or(DeliveryError::NotFound(license_id))?;
        if license.holder != caller {
            return Err(DeliveryError::Forbidden(format!("license {license_id} belongs to another wallet")));
        }
        match TermKind::from_u8(license.kind) {
            Some(TermKind::Perpetual) => {}
            Some(TermKind::Timed) if license.expires_at > now => {}
            Some(TermKind::Timed) => {
                return Err(DeliveryError::Expired { license: license_id, expires_at: license.expires_at });
            }
            _ => {
                return Err(DeliveryError::Forbidden(
                    "a usage license gives access through deployments, not to the weights".into(),
                ));
            }
        }
        let model = self.store.get::<Models>(&license.token_id)?.unwrap_or_default();
        let version = model.version_count;
        let original = self
            .store
            .get::<Versions>(&(license.token_id, version))?
            .ok_or_else(|| {
                DeliveryError::Unavailable(format!("token {} has no versions in the index", license.token_id))
            })?
            .content_hash;
        let key = (license_id, original);
        if let Some(copy) = self.cached(&key)? {
            return Ok(self.sign(license_id, license.token_id, version, copy.blake3, copy.size));
        }
        let _making = self.making.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(copy) = self.cached(&key)? {
            return Ok(self.sign(license_id, license.token_id, version, copy.blake3, copy.size));
        }
        if self.artifacts.info(&original.0)?.is_none() {
            return Err(DeliveryError::Unavailable(format!(
                "this node does not hold the original of token {} version {version}; ask the node it was published on",
                license.token_id
            )));
        }
        let record = self.make(license_id, &original.0)?;
        let mut batch = self.store.batch();
        batch.put::<LicenseCopies>(&key, &record)?;
        self.store.write(batch)?;
        self.evict()?;
        Ok(self.sign(license_id, license.token_id, version, record.blake3, record.size))
    }

    fn cached(&self, key: &(U256, B256)) -> Result<Option<CopyRecord>, DeliveryError> {
        let Some(mut record) = self.store.get::<LicenseCopies>(key)? else { return Ok(None) };
        if self.artifacts.info(&record.blake3)?.is_none() {
            return Ok(None);
        }
        record.last_used_ms = now_ms();
        self.store.put::<LicenseCopies>(key, &record)?;
        Ok(Some(record))
    }

    /// Decrypts the original to a private temporary file, marks it into another, and stores
    /// the result; both temporary files are removed whatever happens.
    fn make(&self, license_id: U256, original: &[u8; 32]) -> Result<CopyRecord, DeliveryError> {
        std::fs::create_dir_all(&self.tmp)?;
        let plain = tempfile::Builder::new().prefix("original-").tempfile_in(&self.tmp)?;
        self.artifacts.copy_to(original, plain.as_file())?;
        let marked = tempfile::Builder::new().prefix("copy-").tempfile_in(&self.tmp)?;
        let model_key = self.watermark.model_key(original);
        let license_key = model_key.license(license_id.saturating_to::<u128>());
        agora_watermark::embed(
            plain.path(),
            marked.path(),
            &model_key,
            Some(&license_key),
            &agora_watermark::Options::default(),
        )?;
        drop(plain);
        let blob = self.artifacts.put(std::fs::File::open(marked.path())?, u64::MAX)?;
        let hash = blake3::Hash::from_hex(&blob.blake3)
            .map_err(|_| DeliveryError::Unavailable("bad blob hash".into()))?;
        let now = now_ms();
        Ok(CopyRecord { blake3: *hash.as_bytes(), size: blob.size, created_ms: now, last_used_ms: now })
    }

    /// Drops least recently used copies while the cache is over its limit.
    fn evict(&self) -> Result<(), DeliveryError> {
        let mut copies = Vec::new();
        let mut total = 0u64;
        for item in self.store.iter::<LicenseCopies>() {
            let (key, record) = item?;
            total += record.size;
            copies.push((key, record));
        }
        copies.sort_by_key(|(_, r)| r.last_used_ms);
        let mut batch = self.store.batch();
        for (key, record) in copies {
            if total <= self.cache_limit {
                break;
            }
            batch.delete_raw(<LicenseCopies as crate::store::Table>::NAME, &key);
            self.artifacts.release(&record.blake3)?;
            total -= record.size;
        }
        self.store.write(batch)?;
        Ok(())
    }

    /// Makes the copy of every perpetual or timed license bought from now on as soon as the
    /// index has it, so the holder's first download streams at once. Stops on `shutdown`.
    pub async fn prepare_on_purchase(
        self,
        poll: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let last = |store: &Store| -> Result<U256, StoreError> {
            Ok(store
                .scan::<Licenses>(&[], None, true)
                .next()
                .transpose()?
                .map(|(key, _)| U256::from_be_slice(&key))
                .unwrap_or_default())
        };
        let mut seen = match last(&self.store) {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(target: "agora::delivery", error = %e, "cannot read the licenses; copies will be made on first download");
                return;
            }
        };
        let mut tick = tokio::time::interval(poll);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            let this = self.clone();
            let from = seen;
            let outcome = tokio::task::spawn_blocking(move || {
                let mut latest = from;
                let start = (from + U256::from(1)).to_be_bytes::<32>();
                let new: Vec<_> = this.store.scan::<Licenses>(&[], Some(&start), false).collect::<Result<_, _>>()?;
                for (key, license) in new {
                    let id = U256::from_be_slice(&key);
                    latest = latest.max(id);
                    let kind = TermKind::from_u8(license.kind);
                    if !matches!(kind, Some(TermKind::Perpetual | TermKind::Timed)) {
                        continue;
                    }
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
                    match this.prepare(id, license.holder, now) {
                        Ok(copy) => tracing::info!(target: "agora::delivery", license = %id, blake3 = %crate::artifacts::hex(&copy.blake3), "copy ready"),
                        Err(e) => tracing::info!(target: "agora::delivery", license = %id, reason = %e, "no copy made ahead"),
                    }
                }
                Ok::<_, StoreError>(latest)
            })
            .await;
            match outcome {
                Ok(Ok(latest)) => seen = latest,
                Ok(Err(e)) => {
                    tracing::warn!(target: "agora::delivery", error = %e, "cannot scan new licenses")
                }
                Err(e) => tracing::error!(target: "agora::delivery", error = %e, "the copy maker failed"),
            }
        }
    }

    fn sign(&self, license_id: U256, token_id: U256, version: u32, blake3: [u8; 32], size: u64) -> Copy {
        let signature = self.node_key.sign(&signed_bytes(license_id, token_id, version, &blake3)).to_bytes();
        Copy { license_id, token_id, version, blake3, size, signature }
    }
}
