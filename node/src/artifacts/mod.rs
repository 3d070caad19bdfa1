//! The artifact store: content-addressed blobs (model files, uploads), compressed and
//! encrypted at rest, streamed in and out.
//!
//! - A blob's address is the blake3 of its plaintext; the same content is stored once and
//!   counted (`refs` in the `blobs` table); [`ArtifactStore::gc`] deletes what nothing uses.
//! - At rest each blob is a sequence of independently authenticated chunks ([`format`]): reads
//!   stream and seek (HTTP ranges), and a tampered or truncated blob is reported with the part
//!   that failed, never returned.
//! - Writes go to a temporary file, are fsynced and renamed into place; the record is written
//!   after the rename. A crash leaves at most a temporary file or an unrecorded blob, both of
//!   which `gc` removes; a half-written blob is never visible.
//! - Reference counts change under one lock, which [`ArtifactStore::gc`] holds while it
//!   decides and deletes: a blob is never collected between a write that finds it stored and
//!   the reference that write records, nor a freshly published object before its record.
//! - The master key lives under the data dir with mode 0600 (or where `AGORA_MASTER_KEY_FILE`
//!   says); losing it loses every blob, so it is created once and never overwritten.
//!
//! Calls block on file I/O: async callers run them on `spawn_blocking`.

pub mod backend;
pub mod format;

use std::{
    fs::{self, File},
    io::{self, BufWriter, Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

pub use backend::{Backend, LocalBackend, S3Backend};
pub use format::{Compression, MasterKey};

use crate::store::{
    Store, StoreError,
    tables::{BlobRecord, Blobs},
};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact I/O: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no artifact with blake3 {0}")]
    NotFound(String),
    #[error("artifact {blob} is corrupt: {reason}")]
    Corrupt { blob: String, reason: String },
    #[error("the artifact is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("master key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
}

/// What the store knows of a blob.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BlobInfo {
    /// blake3 of the plaintext, hex.
    pub blake3: String,
    pub size: u64,
    pub stored: u64,
    pub refs: u64,
}

/// What a garbage collection removed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    pub blobs: u64,
    pub bytes: u64,
    pub partial_files: u64,
}

#[derive(Clone)]
pub struct ArtifactStore {
    /// Local directory of partial writes.
    partial: PathBuf,
    backend: Arc<dyn Backend>,
    key: Arc<MasterKey>,
    store: Store,
    /// Temporary files older than this are leftovers of crashed writes.
    partial_grace: Duration,
    /// Held while a blob's record and object change together (references, publishing, gc).
    refs: Arc<Mutex<()>>,
}

impl ArtifactStore {
    /// A store of blobs under the local directory `root` (created if missing), recorded in
    /// `store`.
    pub fn open(root: &Path, key: MasterKey, store: Store) -> Result<Self, ArtifactError> {
        let backend = LocalBackend::new(root.join("objects"))?;
        Self::with_backend(root, Arc::new(backend), key, store)
    }

    /// Blobs in `url` (`file:///path` or `s3://bucket/prefix`); partial writes under `root`.
    pub fn open_url(url: &str, root: &Path, key: MasterKey, store: Store) -> Result<Self, ArtifactError> {
        let backend: Arc<dyn Backend> = match url.split_once("://") {
            Some(("file", path)) => Arc::new(LocalBackend::new(PathBuf::from(path).join("objects"))?),
            Some(("s3", _)) => Arc::new(S3Backend::from_url(url)?),
            _ => {
                return Err(ArtifactError::Io(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("artifact store {url:?} must be file:///path or s3://bucket/prefix"),
                )));
            }
        };
        Self::with_backend(root, backend, key, store)
    }

    pub fn with_backend(
        root: &Path,
        backend: Arc<dyn Backend>,
        key: MasterKey,
        store: Store,
    ) -> Result<Self, ArtifactError> {
        let partial = root.join("partial");
        fs::create_dir_all(&partial)?;
        Ok(Self {
            partial,
            backend,
            key: Arc::new(key),
            store,
            partial_grace: Duration::from_secs(3600),
            refs: Arc::new(Mutex::new(())),
        })
    }

    /// Streams `input` into the store (at most `limit` bytes), compressed where it pays, and
    /// adds one reference to its content. Nothing is recorded when it fails.
    pub fn put(&self, input: impl Read + Send, limit: u64) -> Result<BlobInfo, ArtifactError> {
        self.put_with(input, limit, Compression::Planes)
    }

    /// [`Self::put`], choosing whether chunks are compressed. Content already stored is kept
    /// as it was stored.
    pub fn put_with(
        &self,
        input: impl Read + Send,
        limit: u64,
        compression: Compression,
    ) -> Result<BlobInfo, ArtifactError> {
        let partial = self.partial.join(format!("{}-{}.partial", std::process::id(), random_suffix()?));
        let written = (|| {
            let file = File::create(&partial)?;
            let mut out = BufWriter::with_capacity(1 << 20, file);
            let written = format::write_blob(&self.key, input, &mut out, limit, compression)?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok::<_, ArtifactError>(written)
        })();
        let written = match written {
            Ok(written) => written,
            Err(error) => {
                let _ = fs::remove_file(&partial);
                return Err(error);
            }
        };
        let name = object_name(&written.hash);
        let _refs = self.lock_refs();
        let existing = self.store.get::<Blobs>(&written.hash)?;
        if existing.is_some() && self.backend.exists(&name)? {
            fs::remove_file(&partial)?;
        } else if let Err(error) = self.backend.publish(&partial, &name) {
            let _ = fs::remove_file(&partial);
            return Err(error.into());
        }
        let record = match existing {
            Some(mut record) => {
                record.refs += 1;
                record
            }
            None => BlobRecord { size: written.size, stored: written.stored, refs: 1, created: unix_now() },
        };
        self.store.put::<Blobs>(&written.hash, &record)?;
        Ok(info(&written.hash, &record))
    }

    pub fn info(&self, hash: &[u8; 32]) -> Result<Option<BlobInfo>, ArtifactError> {
        Ok(self.store.get::<Blobs>(hash)?.map(|record| info(hash, &record)))
    }

    /// Opens a blob for reading (its footer checked).
    pub fn open_blob(
        &self,
        hash: &[u8; 32],
    ) -> Result<format::BlobFile<Box<dyn backend::ReadSeek>>, ArtifactError> {
        if self.store.get::<Blobs>(hash)?.is_none() {
            return Err(ArtifactError::NotFound(hex(hash)));
        }
        let file = self.backend.open(&object_name(hash)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ArtifactError::Corrupt {
                blob: hex(hash),
                reason: "recorded but its object is missing".into(),
            },
            _ => ArtifactError::Io(e),
        })?;
        format::BlobFile::open(&self.key, file, &hex(hash))
    }

    /// A reader of plaintext bytes `start..end` of a blob.
    pub fn read_range(
        &self,
        hash: &[u8; 32],
        start: u64,
        end: u64,
    ) -> Result<format::RangeReader<Box<dyn backend::ReadSeek>>, ArtifactError> {
        Ok(self.open_blob(hash)?.range(start, end))
    }

    /// Writes a blob's plaintext to `out` (buffered, flushed); returns the bytes written.
    pub fn copy_to(&self, hash: &[u8; 32], out: impl Write) -> Result<u64, ArtifactError> {
        let mut reader = self.read_range(hash, 0, u64::MAX)?;
        let mut out = BufWriter::with_capacity(1 << 20, out);
        let copied = io::copy(&mut reader, &mut out)?;
        out.flush()?;
        Ok(copied)
    }

    /// Adds one reference to a stored blob (a second record of the same content, such as a
    /// registered version's copy of a run's file).
    pub fn acquire(&self, hash: &[u8; 32]) -> Result<BlobInfo, ArtifactError> {
        let _refs = self.lock_refs();
        let mut record = self.store.get::<Blobs>(hash)?.ok_or_else(|| ArtifactError::NotFound(hex(hash)))?;
        record.refs += 1;
        self.store.put::<Blobs>(hash, &record)?;
        Ok(info(hash, &record))
    }

    /// Drops one reference; the blob stays until [`Self::gc`].
    pub fn release(&self, hash: &[u8; 32]) -> Result<(), ArtifactError> {
        let _refs = self.lock_refs();
        let mut record = self.store.get::<Blobs>(hash)?.ok_or_else(|| ArtifactError::NotFound(hex(hash)))?;
        record.refs = record.refs.saturating_sub(1);
        self.store.put::<Blobs>(hash, &record)?;
        Ok(())
    }

    /// Deletes blobs without references, files no record knows (a crash between rename and
    /// record), and temporary files of writes that crashed more than an hour ago.
    pub fn gc(&self) -> Result<GcReport, ArtifactError> {
        let mut report = GcReport::default();
        let _refs = self.lock_refs();
        let mut batch = self.store.batch();
        for entry in self.store.scan::<Blobs>(&[], None, false) {
            let (key, record) = entry?;
            if record.refs == 0 {
                let hash: [u8; 32] = key.as_slice().try_into().expect("32-byte keys");
                batch.delete::<Blobs>(&hash);
                report.blobs += 1;
                report.bytes += record.stored;
                self.backend.delete(&object_name(&hash))?;
            }
        }
        self.store.write(batch)?;
        for (name, size) in self.backend.list()? {
            let known = name
                .rsplit('/')
                .next()
                .and_then(|file| file.strip_suffix(".blob"))
                .and_then(|stem| blake3::Hash::from_hex(stem).ok())
                .map(|h| self.store.get::<Blobs>(h.as_bytes()))
                .transpose()?
                .flatten()
                .is_some();
            if !known {
                report.blobs += 1;
                report.bytes += size;
                self.backend.delete(&name)?;
            }
        }
        for file in fs::read_dir(&self.partial)? {
            let path = file?.path();
            let age = fs::metadata(&path)?.modified()?.elapsed().unwrap_or_default();
            if age >= self.partial_grace {
                remove_if_present(&path)?;
                report.partial_files += 1;
            }
        }
        Ok(report)
    }

    fn lock_refs(&self) -> MutexGuard<'_, ()> {
        self.refs.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Loads the master key from `path` (hex), creating it with mode 0600 when it does not exist.
pub fn load_or_create_key(path: &Path) -> Result<MasterKey, ArtifactError> {
    crate::secrets::load_or_create_key(path)
        .map(MasterKey::from_bytes)
        .map_err(|e| ArtifactError::Key { path: path.to_owned(), reason: format!("{e} (blobs need it)") })
}

/// A blob's name in its backend: `ab/abcd….blob`.
fn object_name(hash: &[u8; 32]) -> String {
    let hex = hex(hash);
    format!("{}/{hex}.blob", &hex[..2])
}

fn info(hash: &[u8; 32], record: &BlobRecord) -> BlobInfo {
    BlobInfo { blake3: hex(hash), size: record.size, stored: record.stored, refs: record.refs }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn random_suffix() -> Result<String, ArtifactError> {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).map_err(|e| ArtifactError::Io(io::Error::other(e.to_string())))?;
    Ok(hex(&bytes))
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn hex(bytes: &[u8]) -> String {
    alloy::hex::encode(bytes)
}

#[cfg(test)]
mod tests;
