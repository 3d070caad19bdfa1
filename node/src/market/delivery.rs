//! Fingerprinted downloads: the copy a license holder gets is the original with the owner's
//! mark and that license's fingerprint (../shared/WATERMARK.md), made once per license and
//! version, kept encrypted in the artifact store (bounded: least recently used copies go
//! first), and signed by the node's ed25519 key so the buyer can prove what was delivered.
//! Copies are made ahead, as soon as the index shows a purchase, so a first download usually
//! finds its copy ready; one that comes sooner follows the copy while it is made (the original
//! is decrypted, marked and written in file order, and readers follow the writer), so its first
//! bytes leave at once and its signed receipt is ready when the last byte is.

use std::{
    collections::HashMap,
    io::{self, Write},
    os::unix::fs::FileExt,
    path::PathBuf,
    sync::{Arc, Condvar, Mutex, mpsc},
    time::{Duration, Instant},
};

use agora_contracts::TermKind;
use alloy::primitives::{Address, B256, U256};
use ed25519_dalek::Signer;

use crate::{
    artifacts::{ArtifactError, ArtifactStore, Compression},
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

/// A copy's key: the license and the original it is made from.
type CopyKey = (U256, B256);

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

/// What a download gets: a copy already stored, or one being made that it can follow.
pub enum Prepared {
    Ready(Copy),
    Making(Arc<Making>),
}

/// How far a file being filled in order has got.
#[derive(Default)]
struct Filling {
    state: Mutex<FillState>,
    changed: Condvar,
}

#[derive(Default)]
struct FillState {
    written: u64,
    /// The blake3 of the whole file, once it is whole.
    whole: Option<[u8; 32]>,
    failed: Option<String>,
}

impl Filling {
    fn lock(&self) -> std::sync::MutexGuard<'_, FillState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn advance(&self, n: u64) {
        self.lock().written += n;
        self.changed.notify_all();
    }

    fn finish(&self, hash: [u8; 32]) {
        self.lock().whole = Some(hash);
        self.changed.notify_all();
    }

    /// Marks the file as never to be whole (unless it already is).
    fn fail(&self, reason: &str) {
        let mut state = self.lock();
        if state.whole.is_none() && state.failed.is_none() {
            state.failed = Some(reason.to_owned());
        }
        drop(state);
        self.changed.notify_all();
    }

    fn failed(&self) -> bool {
        self.lock().failed.is_some()
    }

    /// Waits until at least `offset` bytes are written; returns how many are.
    fn wait_for(&self, offset: u64) -> io::Result<u64> {
        let mut state = self.lock();
        loop {
            if state.written >= offset {
                return Ok(state.written);
            }
            if let Some(reason) = &state.failed {
                return Err(io::Error::other(format!("the copy could not be made: {reason}")));
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits at most `timeout` for the file to be whole: its hash, or `None` on timeout.
    fn wait_whole(&self, timeout: Duration) -> io::Result<Option<[u8; 32]>> {
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.lock();
        loop {
            if let Some(hash) = state.whole {
                return Ok(Some(hash));
            }
            if let Some(reason) = &state.failed {
                return Err(io::Error::other(format!("the copy could not be made: {reason}")));
            }
            state = match deadline {
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Ok(None);
                    }
                    self.changed.wait_timeout(state, left).unwrap_or_else(|p| p.into_inner()).0
                }
                None => self.changed.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }
}

/// A copy being made: its bytes land in order in a private temporary file (already unlinked
/// from the directory's view of anyone else), and readers follow the writer.
pub struct Making {
    pub license_id: U256,
    pub token_id: U256,
    pub version: u32,
    pub size: u64,
    file: std::fs::File,
    filling: Filling,
    done: Mutex<bool>,
    finished: Condvar,
}

impl Making {
    /// The copy's blake3 once it is whole, waiting at most `timeout`; `None` if it is not by
    /// then.
    pub fn wait_whole(&self, timeout: Duration) -> io::Result<Option<[u8; 32]>> {
        self.filling.wait_whole(timeout)
    }

    /// Bytes of the copy written so far.
    pub fn written(&self) -> u64 {
        self.filling.lock().written
    }

    /// Reads `start..end` of the copy, waiting for the maker where it is ahead of it.
    pub fn follow(self: &Arc<Self>, start: u64, end: u64) -> Follow {
        Follow { making: self.clone(), pos: start, end: end.min(self.size) }
    }

    /// Waits until the maker is through (the copy stored, or given up).
    fn wait_finished(&self) {
        let mut done = self.done.lock().unwrap_or_else(|p| p.into_inner());
        while !*done {
            done = self.finished.wait(done).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn set_finished(&self) {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.finished.notify_all();
    }
}

/// A range of a copy being made, read as the maker writes it.
pub struct Follow {
    making: Arc<Making>,
    pos: u64,
    end: u64,
}

impl Follow {
    /// Up to 1 MiB of what follows, once written; `None` at the end of the range.
    pub fn next_bytes(&mut self) -> io::Result<Option<bytes::Bytes>> {
        if self.pos >= self.end {
            return Ok(None);
        }
        let written = self.making.filling.wait_for(self.pos + 1)?;
        let n = (written.min(self.end) - self.pos).min(1 << 20) as usize;
        let mut buffer = vec![0; n];
        self.making.file.read_exact_at(&mut buffer, self.pos)?;
        self.pos += n as u64;
        Ok(Some(buffer.into()))
    }
}

/// Where the marked bytes go: the copy's file, then the readers are told.
struct CopyWriter<'a> {
    making: &'a Making,
    file: &'a std::fs::File,
    /// Told once the first bytes are written (the checks before marking passed).
    started: Option<mpsc::SyncSender<Result<(), DeliveryError>>>,
}

impl Write for CopyWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&*self.file).write(buf)?;
        self.making.filling.advance(n as u64);
        if let Some(started) = self.started.take() {
            let _ = started.send(Ok(()));
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long a receipt request waits for a copy being made before answering that it is not
/// whole yet.
pub const RECEIPT_WAIT: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct Delivery {
    store: Store,
    artifacts: ArtifactStore,
    watermark: Arc<agora_watermark::MasterKey>,
    node_key: Arc<ed25519_dalek::SigningKey>,
    tmp: PathBuf,
    cache_limit: u64,
    making: Arc<Mutex<HashMap<CopyKey, Arc<Making>>>>,
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
            making: Arc::new(Mutex::new(HashMap::new())),
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

    /// The copy of the latest version of `license_id`'s model for `caller`: stored, or being
    /// made (started here if nobody has). `now` is chain time. Errors that can be known before
    /// the first byte (no access, no original, a model too small to fingerprint) come here.
    pub fn prepare(&self, license_id: U256, caller: Address, now: u64) -> Result<Prepared, DeliveryError> {
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
        let ready = |copy: CopyRecord| {
            Prepared::Ready(self.sign(license_id, license.token_id, version, copy.blake3, copy.size))
        };
        if let Some(copy) = self.cached(&key)? {
            return Ok(ready(copy));
        }
        let mut making = self.making.lock().unwrap_or_else(|p| p.into_inner());
        // Checked again under the lock: a maker may have finished in between.
        if let Some(copy) = self.cached(&key)? {
            return Ok(ready(copy));
        }
        if let Some(current) = making.get(&key) {
            return Ok(Prepared::Making(current.clone()));
        }
        let Some(info) = self.artifacts.info(&original.0)? else {
            return Err(DeliveryError::Unavailable(format!(
                "this node does not hold the original of token {} version {version}; ask the node it was published on",
                license.token_id
            )));
        };
        std::fs::create_dir_all(&self.tmp)?;
        let marked = tempfile::Builder::new().prefix("copy-").tempfile_in(&self.tmp)?;
        let current = Arc::new(Making {
            license_id,
            token_id: license.token_id,
            version,
            size: info.size,
            file: marked.reopen()?,
            filling: Filling::default(),
            done: Mutex::new(false),
            finished: Condvar::new(),
        });
        let (started, first) = mpsc::sync_channel(1);
        let this = self.clone();
        let maker = current.clone();
        std::thread::Builder::new().name("agora-copy".into()).spawn(move || {
            this.make(&key, &maker, marked, started);
            this.making.lock().unwrap_or_else(|p| p.into_inner()).remove(&key);
            maker.set_finished();
        })?;
        // The maker says when the first bytes are out, or why none will be.
        first.recv().unwrap_or_else(|_| Err(DeliveryError::Unavailable("the copy maker stopped".into())))?;
        making.insert(key, current.clone());
        Ok(Prepared::Making(current))
    }

    /// Like [`Self::prepare`], but waits for a copy being made to be whole and signs it, for
    /// at most `timeout`: `Ok(Err(making))` if it is not whole by then.
    pub fn receipt(
        &self,
        license_id: U256,
        caller: Address,
        now: u64,
        timeout: Duration,
    ) -> Result<Result<Copy, Arc<Making>>, DeliveryError> {
        match self.prepare(license_id, caller, now)? {
            Prepared::Ready(copy) => Ok(Ok(copy)),
            Prepared::Making(making) => Ok(match making.wait_whole(timeout)? {
                Some(hash) => Ok(self.sign(license_id, making.token_id, making.version, hash, making.size)),
                None => Err(making),
            }),
        }
    }

    /// The signed description of a copy being made, if it is whole.
    pub fn signed(&self, making: &Making) -> Option<Copy> {
        let hash = making.filling.lock().whole?;
        Some(self.sign(making.license_id, making.token_id, making.version, hash, making.size))
    }

    fn cached(&self, key: &CopyKey) -> Result<Option<CopyRecord>, DeliveryError> {
        let Some(mut record) = self.store.get::<LicenseCopies>(key)? else { return Ok(None) };
        if self.artifacts.info(&record.blake3)?.is_none() {
            return Ok(None);
        }
        record.last_used_ms = now_ms();
        self.store.put::<LicenseCopies>(key, &record)?;
        Ok(Some(record))
    }

    /// Makes the copy: decrypts the original into a private temporary file on one thread
    /// while the watermark follows it on the others, writing the marked bytes in order into
    /// `marked` (where readers follow), then stores the copy and records it. Every temporary
    /// file is removed whatever happens.
    fn make(
        &self,
        key: &CopyKey,
        making: &Making,
        marked: tempfile::NamedTempFile,
        started: mpsc::SyncSender<Result<(), DeliveryError>>,
    ) {
        let mut writer = CopyWriter { making, file: marked.as_file(), started: Some(started) };
        let made = self.mark(key, making, &mut writer);
        let started = writer.started.take();
        let outcome = made.and_then(|hash| {
            making.filling.finish(hash);
            // Copies are read far more often than made, and made again at will: sealed but
            // not compressed, so serving one is not bound by decompression.
            let blob = self.artifacts.put_with(marked.reopen()?, u64::MAX, Compression::None)?;
            if blob.blake3 != crate::artifacts::hex(&hash) {
                return Err(DeliveryError::Unavailable(format!(
                    "the stored copy hashes to {}, the marked one to {}",
                    blob.blake3,
                    crate::artifacts::hex(&hash)
                )));
            }
            let now = now_ms();
            let record = CopyRecord { blake3: hash, size: blob.size, created_ms: now, last_used_ms: now };
            self.store.put::<LicenseCopies>(key, &record)?;
            tracing::info!(target: "agora::delivery", license = %key.0, blake3 = %blob.blake3, "copy ready");
            self.evict()
        });
        // Removed before a refusal is answered: whoever was refused finds nothing left behind.
        drop(writer);
        if let Err(e) = marked.close() {
            tracing::warn!(target: "agora::delivery", error = %e, "cannot remove a copy's temporary file");
        }
        if let Err(error) = outcome {
            making.filling.fail(&error.to_string());
            match started {
                Some(started) => {
                    let _ = started.send(Err(error));
                }
                None => tracing::warn!(target: "agora::delivery", license = %key.0, %error, "copy not made"),
            }
        }
    }

    /// Decrypts and marks; returns the marked copy's blake3.
    fn mark(&self, key: &CopyKey, making: &Making, out: &mut CopyWriter) -> Result<[u8; 32], DeliveryError> {
        let (license_id, original) = key;
        let plain = tempfile::Builder::new().prefix("original-").tempfile_in(&self.tmp)?;
        plain.as_file().set_len(making.size)?;
        let decrypted = Arc::new(Filling::default());
        let mut reader = self.artifacts.read_range(&original.0, 0, making.size)?;
        std::thread::scope(|scope| {
            let (file, filled) = (plain.as_file(), decrypted.clone());
            scope.spawn(move || {
                let result = (|| {
                    let mut at = 0u64;
                    while let Some(bytes) = reader.next_bytes()? {
                        if filled.failed() {
                            return Ok(());
                        }
                        file.write_all_at(&bytes, at)?;
                        at += bytes.len() as u64;
                        filled.advance(bytes.len() as u64);
                    }
                    if at != making.size {
                        return Err(io::Error::other(format!(
                            "the original has {at} bytes, not {}",
                            making.size
                        )));
                    }
                    Ok::<_, io::Error>(())
                })();
                if let Err(e) = result {
                    filled.fail(&e.to_string());
                }
            });
            let result = (|| {
                // The header must be in place before the watermark opens the file.
                decrypted.wait_for(8)?;
                let mut length = [0u8; 8];
                plain.as_file().read_exact_at(&mut length, 0)?;
                decrypted.wait_for(8u64.saturating_add(u64::from_le_bytes(length)).min(making.size))?;
                let model_key = self.watermark.model_key(&original.0);
                let license_key = model_key.license(license_id.saturating_to::<u128>());
                let wait = decrypted.clone();
                let options = agora_watermark::Options {
                    source_ready: Some(Box::new(move |offset| wait.wait_for(offset).map(drop))),
                    ..Default::default()
                };
                let report =
                    agora_watermark::embed_into(plain.path(), out, &model_key, Some(&license_key), &options)?;
                blake3::Hash::from_hex(&report.output_blake3)
                    .map(|h| *h.as_bytes())
                    .map_err(|_| DeliveryError::Unavailable("bad copy hash".into()))
            })();
            // Stops the decryption early if the marking gave up.
            decrypted.fail("the marking stopped");
            result
        })
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
                        Ok(Prepared::Ready(_)) => {}
                        // One copy at a time in the background; the maker logs how it went.
                        Ok(Prepared::Making(making)) => making.wait_finished(),
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

#[cfg(test)]
mod tests {
    use agora_contracts::TermKind;
    use alloy::primitives::{Address, B256, U256};

    use super::*;
    use crate::{
        artifacts::load_or_create_key,
        store::tables::{LicenseRecord, ModelRecord, VersionRecord},
    };

    struct Fixture {
        dir: tempfile::TempDir,
        delivery: Delivery,
        master: agora_watermark::MasterKey,
    }

    const HOLDER: Address = Address::repeat_byte(5);

    /// A bf16 model of `tensors` 512×256 matrices and a small f32 bias, weights around ±0.05.
    fn model(tensors: usize) -> Vec<u8> {
        let mut fields = Vec::new();
        let mut offset = 0;
        for i in 0..tensors {
            fields.push(format!(
                r#""layer.{i}.weight":{{"dtype":"BF16","shape":[512,256],"data_offsets":[{offset},{}]}}"#,
                offset + 512 * 256 * 2
            ));
            offset += 512 * 256 * 2;
        }
        fields.push(format!(
            r#""head.bias":{{"dtype":"F32","shape":[8],"data_offsets":[{offset},{}]}}"#,
            offset + 32
        ));
        let header = format!("{{{}}}", fields.join(","));
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        let mut x = 0x9e37_79b9u32;
        for _ in 0..tensors * 512 * 256 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let bf16 = (((x >> 31) as u16) << 15) | ((0x79 + (x % 4) as u16) << 7) | ((x >> 8) & 0x7f) as u16;
            bytes.extend_from_slice(&bf16.to_le_bytes());
        }
        bytes.extend_from_slice(&[0x3f; 32]);
        bytes
    }

    /// A node's stores with token 1 version 1 = `original` and license 7 (perpetual) held by
    /// [`HOLDER`].
    fn fixture(original: &[u8]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let key = load_or_create_key(&dir.path().join("artifacts.key")).unwrap();
        let artifacts = ArtifactStore::open(&dir.path().join("artifacts"), key, store.clone()).unwrap();
        let blob = artifacts.put(original, u64::MAX).unwrap();
        let hash: B256 = format!("0x{}", blob.blake3).parse().unwrap();
        let token = U256::from(1);
        let mut batch = store.batch();
        batch.put::<Models>(&token, &ModelRecord { version_count: 1, ..Default::default() }).unwrap();
        batch
            .put::<Versions>(&(token, 1), &VersionRecord { content_hash: hash, anchored: Default::default() })
            .unwrap();
        let license = LicenseRecord {
            token_id: token,
            holder: HOLDER,
            kind: TermKind::Perpetual as u8,
            paid: U256::from(1),
            expires_at: 0,
            deposited: U256::ZERO,
            settled_units: U256::ZERO,
            settled_amount: U256::ZERO,
            closable_at: None,
            closed: false,
            refund: U256::ZERO,
            order_hash: B256::ZERO,
            term_index: 0,
            purchased: Default::default(),
        };
        batch.put::<Licenses>(&U256::from(7), &license).unwrap();
        store.write(batch).unwrap();
        let master = agora_watermark::MasterKey::from_bytes([9; 32]);
        let delivery = Delivery::new(
            store,
            artifacts,
            Arc::new(agora_watermark::MasterKey::from_bytes([9; 32])),
            [3; 32],
            dir.path().join("tmp"),
            u64::MAX,
        );
        Fixture { dir, delivery, master }
    }

    fn read_all(mut follow: Follow) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(bytes) = follow.next_bytes().unwrap() {
            out.extend_from_slice(&bytes);
        }
        out
    }

    /// What `agora watermark embed` makes of the original for license 7.
    fn reference(f: &Fixture, original: &[u8]) -> Vec<u8> {
        let (input, output) = (f.dir.path().join("in.safetensors"), f.dir.path().join("out.safetensors"));
        std::fs::write(&input, original).unwrap();
        let model = f.master.model_key(blake3::hash(original).as_bytes());
        let license = model.license(7);
        agora_watermark::embed(&input, &output, &model, Some(&license), &Default::default()).unwrap();
        std::fs::read(output).unwrap()
    }

    #[test]
    fn a_copy_streams_while_it_is_made_and_is_the_copy_that_is_stored() {
        let original = model(12);
        let f = fixture(&original);
        let expected = reference(&f, &original);
        assert_ne!(expected, original);
        let license = U256::from(7);
        let Prepared::Making(making) = f.delivery.prepare(license, HOLDER, 0).unwrap() else {
            panic!("nothing was made yet, so the first request starts the copy");
        };
        assert_eq!(making.size, original.len() as u64);
        // A second request while it is made follows the same copy.
        let again = f.delivery.prepare(license, HOLDER, 0).unwrap();
        assert!(
            matches!(&again, Prepared::Making(m) if Arc::ptr_eq(m, &making))
                || matches!(again, Prepared::Ready(_))
        );
        let ranged = read_all(making.follow(100_000, 300_000));
        let whole = read_all(making.follow(0, making.size));
        assert_eq!(whole, expected, "the streamed copy is what the watermark makes from the original");
        assert_eq!(ranged, expected[100_000..300_000]);

        // Its receipt signs the streamed bytes' hash.
        let copy = f.delivery.receipt(license, HOLDER, 0, Duration::from_secs(60)).unwrap().ok().unwrap();
        assert_eq!(copy.blake3, *blake3::hash(&expected).as_bytes());
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]).verifying_key();
        let message = signed_bytes(license, U256::from(1), 1, &copy.blake3);
        key.verify_strict(&message, &ed25519_dalek::Signature::from_bytes(&copy.signature)).unwrap();

        // Once through, the copy is stored and served from the store; no temporary file is left.
        making.wait_finished();
        let Prepared::Ready(ready) = f.delivery.prepare(license, HOLDER, 0).unwrap() else {
            panic!("the copy is stored");
        };
        assert_eq!(ready.blake3, copy.blake3);
        let mut stored = Vec::new();
        f.delivery.artifacts().copy_to(&ready.blake3, &mut stored).unwrap();
        assert_eq!(stored, expected);
        assert_eq!(std::fs::read_dir(f.dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn requests_that_race_get_one_copy() {
        let original = model(8);
        let f = fixture(&original);
        let hashes: Vec<[u8; 32]> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| match f.delivery.prepare(U256::from(7), HOLDER, 0).unwrap() {
                        Prepared::Ready(copy) => copy.blake3,
                        Prepared::Making(making) => {
                            let bytes = read_all(making.follow(0, making.size));
                            *blake3::hash(&bytes).as_bytes()
                        }
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert!(hashes.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(hashes[0], *blake3::hash(&reference(&f, &original)).as_bytes());
    }

    #[test]
    fn refusals_come_before_any_byte_and_leave_nothing() {
        // Too small to carry a fingerprint: the typed error, at once, every time.
        let f = fixture(&model(1));
        for _ in 0..2 {
            assert!(matches!(
                f.delivery.prepare(U256::from(7), HOLDER, 0),
                Err(DeliveryError::Watermark(agora_watermark::WatermarkError::TooFewWeights { .. }))
            ));
        }
        assert!(matches!(
            f.delivery.prepare(U256::from(7), Address::repeat_byte(6), 0),
            Err(DeliveryError::Forbidden(_))
        ));
        assert!(matches!(f.delivery.prepare(U256::from(8), HOLDER, 0), Err(DeliveryError::NotFound(_))));
        assert_eq!(std::fs::read_dir(f.dir.path().join("tmp")).unwrap().count(), 0);
        assert!(f.delivery.making.lock().unwrap().is_empty());
    }
}
