//! Where blobs live: a local directory, or S3-compatible object storage (`object_store`).
//!
//! A blob is always written to a local partial file first (see [`super::ArtifactStore::put`]);
//! a backend only publishes finished files, reads ranges, lists and deletes. The interface is
//! blocking: the S3 backend runs its requests on a small runtime of its own, so callers on
//! `spawn_blocking` threads and plain threads use both backends alike.

use std::{
    fs::{self, File},
    io::{self, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    sync::Arc,
};

use futures::TryStreamExt;
use object_store::{
    ObjectStore, ObjectStoreExt, WriteMultipart, aws::AmazonS3Builder, path::Path as ObjectPath,
};

/// A readable, seekable blob.
pub trait ReadSeek: Read + Seek + Send {}
impl<T: Read + Seek + Send> ReadSeek for T {}

pub trait Backend: Send + Sync {
    /// Makes the finished local file `file` visible as `name`, atomically.
    fn publish(&self, file: &Path, name: &str) -> io::Result<()>;
    fn exists(&self, name: &str) -> io::Result<bool>;
    /// Opens `name`; an error of kind `NotFound` when there is none.
    fn open(&self, name: &str) -> io::Result<Box<dyn ReadSeek>>;
    /// Deletes `name` (nothing when it is not there).
    fn delete(&self, name: &str) -> io::Result<()>;
    /// Every blob's name and size.
    fn list(&self) -> io::Result<Vec<(String, u64)>>;
    /// Replaces `name`'s bytes (tests of tamper detection only).
    #[cfg(test)]
    fn overwrite(&self, name: &str, bytes: &[u8]) -> io::Result<()>;
}

/// Blobs as files under a directory (`AGORA_ARTIFACTS=file:///path`, the default).
pub struct LocalBackend {
    objects: PathBuf,
}

impl LocalBackend {
    pub fn new(objects: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&objects)?;
        Ok(Self { objects })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.objects.join(name)
    }
}

impl Backend for LocalBackend {
    fn publish(&self, file: &Path, name: &str) -> io::Result<()> {
        let target = self.path(name);
        let dir = target.parent().expect("names have a directory");
        fs::create_dir_all(dir)?;
        fs::rename(file, &target)?;
        File::open(dir)?.sync_all()
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        Ok(self.path(name).is_file())
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn ReadSeek>> {
        Ok(Box::new(File::open(self.path(name))?))
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        match fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let mut names = Vec::new();
        for dir in fs::read_dir(&self.objects)? {
            let dir = dir?;
            if !dir.file_type()?.is_dir() {
                continue;
            }
            for file in fs::read_dir(dir.path())? {
                let file = file?;
                let name =
                    format!("{}/{}", dir.file_name().to_string_lossy(), file.file_name().to_string_lossy());
                names.push((name, file.metadata()?.len()));
            }
        }
        Ok(names)
    }

    #[cfg(test)]
    fn overwrite(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(name);
        fs::create_dir_all(path.parent().expect("names have a directory"))?;
        fs::write(path, bytes)
    }
}

/// Blobs as objects in an S3-compatible bucket (`AGORA_ARTIFACTS=s3://bucket/prefix`).
/// Credentials, region and endpoint come from the usual `AWS_*` environment variables
/// (`AWS_ENDPOINT_URL` for S3-compatible servers, `AWS_ALLOW_HTTP=true` for plain HTTP).
pub struct S3Backend {
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    runtime: Arc<tokio::runtime::Runtime>,
}

/// Bytes fetched per ranged GET when reading.
const READ_AHEAD: u64 = 4 << 20;
/// Part size of multipart uploads.
const PART: usize = 8 << 20;

impl S3Backend {
    /// `s3://bucket/prefix`, configured from the environment.
    pub fn from_url(url: &str) -> io::Result<Self> {
        let parsed = url::Url::parse(url).map_err(|e| invalid(format!("{url} is not a URL: {e}")))?;
        let bucket = parsed.host_str().ok_or_else(|| invalid(format!("{url} names no bucket")))?;
        let builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        Self::new(builder, parsed.path().trim_matches('/'))
    }

    pub fn new(builder: AmazonS3Builder, prefix: &str) -> io::Result<Self> {
        let store = builder.build().map_err(|e| invalid(format!("S3 configuration: {e}")))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("agora-s3")
            .enable_all()
            .build()?;
        Ok(Self { store: Arc::new(store), prefix: ObjectPath::from(prefix), runtime: Arc::new(runtime) })
    }

    fn location(&self, name: &str) -> ObjectPath {
        match self.prefix.as_ref() {
            "" => ObjectPath::from(name),
            prefix => ObjectPath::from(format!("{prefix}/{name}")),
        }
    }
}

impl Backend for S3Backend {
    fn publish(&self, file: &Path, name: &str) -> io::Result<()> {
        let location = self.location(name);
        let mut input = File::open(file)?;
        self.runtime.block_on(async {
            let upload = self.store.put_multipart(&location).await.map_err(s3)?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART);
            let mut buffer = vec![0u8; PART];
            loop {
                let n = input.read(&mut buffer)?;
                if n == 0 {
                    break;
                }
                writer.wait_for_capacity(2).await.map_err(s3)?;
                writer.write(&buffer[..n]);
            }
            writer.finish().await.map_err(s3)?;
            Ok::<_, io::Error>(())
        })?;
        fs::remove_file(file)
    }

    fn exists(&self, name: &str) -> io::Result<bool> {
        match self.runtime.block_on(self.store.head(&self.location(name))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(s3(e)),
        }
    }

    fn open(&self, name: &str) -> io::Result<Box<dyn ReadSeek>> {
        let location = self.location(name);
        let size = self.runtime.block_on(self.store.head(&location)).map_err(s3)?.size;
        Ok(Box::new(S3Reader {
            store: self.store.clone(),
            runtime: self.runtime.clone(),
            location,
            size,
            position: 0,
            buffer: bytes::Bytes::new(),
            buffer_start: 0,
        }))
    }

    fn delete(&self, name: &str) -> io::Result<()> {
        match self.runtime.block_on(self.store.delete(&self.location(name))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3(e)),
        }
    }

    fn list(&self) -> io::Result<Vec<(String, u64)>> {
        let objects: Vec<_> =
            self.runtime.block_on(self.store.list(Some(&self.prefix)).try_collect()).map_err(s3)?;
        let prefix = self.prefix.as_ref();
        Ok(objects
            .into_iter()
            .map(|o| {
                let full = o.location.as_ref();
                let name = full.strip_prefix(prefix).unwrap_or(full).trim_start_matches('/').to_owned();
                (name, o.size)
            })
            .collect())
    }

    #[cfg(test)]
    fn overwrite(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let payload = object_store::PutPayload::from(bytes.to_vec());
        self.runtime.block_on(self.store.put(&self.location(name), payload)).map_err(s3)?;
        Ok(())
    }
}

/// A blob in the bucket, read by ranged GETs of a few MiB.
struct S3Reader {
    store: Arc<dyn ObjectStore>,
    runtime: Arc<tokio::runtime::Runtime>,
    location: ObjectPath,
    size: u64,
    position: u64,
    buffer: bytes::Bytes,
    buffer_start: u64,
}

impl Read for S3Reader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.position >= self.size || out.is_empty() {
            return Ok(0);
        }
        let buffered = self.buffer.len() as u64;
        if self.position < self.buffer_start || self.position >= self.buffer_start + buffered {
            let end = (self.position + READ_AHEAD.max(out.len() as u64)).min(self.size);
            self.buffer = self
                .runtime
                .block_on(self.store.get_range(&self.location, self.position..end))
                .map_err(s3)?;
            self.buffer_start = self.position;
        }
        let within = (self.position - self.buffer_start) as usize;
        let copied = (self.buffer.len() - within).min(out.len());
        out[..copied].copy_from_slice(&self.buffer[within..within + copied]);
        self.position += copied as u64;
        Ok(copied)
    }
}

impl Seek for S3Reader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let position = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.position.checked_add_signed(d),
        };
        self.position = position.ok_or_else(|| invalid("seek before the start".into()))?;
        Ok(self.position)
    }
}

fn s3(error: object_store::Error) -> io::Error {
    match error {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, error.to_string()),
        other => io::Error::other(format!("object storage: {other}")),
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}
