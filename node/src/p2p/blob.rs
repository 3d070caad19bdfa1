//! Blob exchange between nodes, verified chunk by chunk against the blob's blake3 hash.
//!
//! A blob is cut into 1 MiB chunks. Each chunk is a complete subtree of blake3's hash tree, so
//! its chaining value can be computed on its own (`hazmat::set_input_offset`), and the chaining
//! values of all chunks merge up to the root: the blob's hash. The fetcher first takes the list
//! of chaining values (the manifest) from a provider and merges it; only a manifest that
//! reproduces the hash it asked for is used. Every chunk is then checked against its chaining
//! value as it arrives, so a provider that sends one corrupted byte is caught at that chunk,
//! and the fetch goes on from the same chunk with another provider. Verified chunks are
//! appended to a `.part` file, so a fetch interrupted by anything resumes where it stopped.

use std::{
    collections::HashSet,
    io::{Read, Write},
    path::{Path, PathBuf},
};

use blake3::hazmat::{
    ChainingValue, HasherExt, Mode, left_subtree_len, merge_subtrees_non_root, merge_subtrees_root,
};
use futures::{StreamExt, stream::FuturesOrdered};
use libp2p::PeerId;
use serde::Serialize;

use super::{
    net::Net,
    wire::{BlobRequest, BlobResponse},
};
use crate::{
    artifacts::{ArtifactStore, hex},
    store::{
        Store,
        tables::{ArtifactFiles, LicenseCopies, PeerShares, RegistryVersions, SharedBlob, SharedBlobs},
    },
};

/// Bytes per verified chunk (a power of two, so chunks are whole blake3 subtrees).
pub const CHUNK: u64 = 1 << 20;
/// Chunk requests kept in flight to one provider.
const WINDOW: usize = 32;

/// The chaining value of the chunk that starts at `offset`.
pub fn chunk_cv(offset: u64, data: &[u8]) -> ChainingValue {
    blake3::Hasher::new().set_input_offset(offset).update(data).finalize_non_root()
}

/// The chaining values of every chunk of a blob of `size` bytes read from `input`. A blob of
/// one chunk or less has none: its hash checks it whole.
pub fn chaining_values(mut input: impl Read, size: u64) -> std::io::Result<Vec<ChainingValue>> {
    if size <= CHUNK {
        return Ok(Vec::new());
    }
    let mut cvs = Vec::with_capacity(size.div_ceil(CHUNK) as usize);
    let mut buf = vec![0u8; CHUNK as usize];
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(CHUNK) as usize;
        input.read_exact(&mut buf[..len])?;
        cvs.push(chunk_cv(offset, &buf[..len]));
        offset += len as u64;
    }
    Ok(cvs)
}

fn merge(cvs: &[ChainingValue], len: u64) -> ChainingValue {
    if cvs.len() == 1 {
        return cvs[0];
    }
    let left = left_subtree_len(len);
    let split = (left / CHUNK) as usize;
    merge_subtrees_non_root(&merge(&cvs[..split], left), &merge(&cvs[split..], len - left), Mode::Hash)
}

/// The blob hash that a manifest claims; `None` when its shape does not fit `size`.
pub fn root_of(cvs: &[ChainingValue], size: u64) -> Option<blake3::Hash> {
    if size <= CHUNK || cvs.len() as u64 != size.div_ceil(CHUNK) {
        return None;
    }
    let left = left_subtree_len(size);
    let split = (left / CHUNK) as usize;
    Some(merge_subtrees_root(&merge(&cvs[..split], left), &merge(&cvs[split..], size - left), Mode::Hash))
}

/// A manifest checked against the hash it was asked for.
#[derive(Clone, Debug)]
pub struct Manifest {
    pub hash: [u8; 32],
    pub size: u64,
    cvs: Vec<ChainingValue>,
}

impl Manifest {
    pub fn check(hash: [u8; 32], size: u64, chunk_size: u32, raw: &[u8]) -> Result<Self, String> {
        if u64::from(chunk_size) != CHUNK {
            return Err(format!("chunk size {chunk_size}, expected {CHUNK}"));
        }
        if !raw.len().is_multiple_of(32) {
            return Err("chaining values are not 32-byte multiples".into());
        }
        let cvs: Vec<ChainingValue> = raw.chunks_exact(32).map(|c| c.try_into().unwrap_or([0; 32])).collect();
        if size > CHUNK && root_of(&cvs, size).map(|h| *h.as_bytes()) != Some(hash) {
            return Err("the chaining values do not merge to the blob's hash".into());
        }
        if size <= CHUNK && !cvs.is_empty() {
            return Err("a single-chunk blob has no chaining values".into());
        }
        Ok(Self { hash, size, cvs })
    }

    pub fn chunks(&self) -> u64 {
        self.size.div_ceil(CHUNK).max(1)
    }

    pub fn chunk_len(&self, index: u64) -> u64 {
        (self.size - index * CHUNK).min(CHUNK)
    }

    /// Whether `data` is chunk `index` of the blob.
    pub fn verify(&self, index: u64, data: &[u8]) -> bool {
        if data.len() as u64 != self.chunk_len(index) {
            return false;
        }
        if self.size <= CHUNK {
            return blake3::hash(data).as_bytes() == &self.hash;
        }
        self.cvs.get(index as usize) == Some(&chunk_cv(index * CHUNK, data))
    }
}

/// Why a blob may not be shared: originals and buyers' copies never leave the node.
pub fn private_reason(store: &Store, hash: &[u8; 32]) -> Result<Option<String>, crate::store::StoreError> {
    for item in store.iter::<RegistryVersions>() {
        let (key, version) = item?;
        let mut original = version.file.as_ref().is_some_and(|f| &f.blake3 == hash);
        if !original && let Some(dir) = &version.artifact_dir {
            let prefix = format!("{}/", dir.trim_end_matches('/'));
            for file in store.scan::<ArtifactFiles>(prefix.as_bytes(), None, false) {
                if &file?.1.blake3 == hash {
                    original = true;
                    break;
                }
            }
        }
        if original {
            let model =
                key.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).unwrap_or_default();
            return Ok(Some(format!(
                "it is a file of registered model {model} version {}; a registered model's files never leave the node",
                version.version
            )));
        }
    }
    for item in store.iter::<LicenseCopies>() {
        let (_, copy) = item?;
        if &copy.blake3 == hash {
            return Ok(Some("it is a buyer's fingerprinted copy".into()));
        }
    }
    Ok(None)
}

/// Serves a blob of the artifact store to one peer only (not announced, not listed): a
/// training job's inputs to its provider, its output to its buyer.
pub fn share_with(
    store: &Store,
    artifacts: &ArtifactStore,
    hash: &[u8; 32],
    peer: &PeerId,
) -> Result<SharedBlob, ShareError> {
    let key = (*hash, peer.to_bytes());
    if let Some(shared) = store.get::<PeerShares>(&key)? {
        return Ok(shared);
    }
    let info = artifacts.info(hash)?.ok_or_else(|| ShareError::NotFound(hex(hash)))?;
    let cvs = chaining_values(artifacts.read_range(hash, 0, info.size)?, info.size)?;
    let record =
        SharedBlob { size: info.size, chaining_values: cvs.concat(), shared_ms: crate::registry::now_ms() };
    store.put::<PeerShares>(&key, &record)?;
    Ok(record)
}

/// Marks a blob of the artifact store as shared with peers: computes and keeps its manifest.
pub fn share(store: &Store, artifacts: &ArtifactStore, hash: &[u8; 32]) -> Result<SharedBlob, ShareError> {
    if let Some(shared) = store.get::<SharedBlobs>(hash)? {
        return Ok(shared);
    }
    let info = artifacts.info(hash)?.ok_or_else(|| ShareError::NotFound(hex(hash)))?;
    if let Some(reason) = private_reason(store, hash)? {
        return Err(ShareError::Private(reason));
    }
    let cvs = chaining_values(artifacts.read_range(hash, 0, info.size)?, info.size)?;
    let record =
        SharedBlob { size: info.size, chaining_values: cvs.concat(), shared_ms: crate::registry::now_ms() };
    store.put::<SharedBlobs>(hash, &record)?;
    Ok(record)
}

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("no blob {0} in the artifact store")]
    NotFound(String),
    #[error("the blob cannot be shared: {0}")]
    Private(String),
    #[error(transparent)]
    Artifacts(#[from] crate::artifacts::ArtifactError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Answers a peer's blob request: only blobs shared with everyone or with that peer, only
/// whole chunks.
pub fn serve(store: &Store, artifacts: &ArtifactStore, peer: &PeerId, request: BlobRequest) -> BlobResponse {
    let refused = |why: &str| BlobResponse::Refused(why.to_owned());
    let hash = match &request {
        BlobRequest::Manifest { hash } | BlobRequest::Range { hash, .. } => *hash,
    };
    let shared = match store.get::<SharedBlobs>(&hash) {
        Ok(Some(shared)) => shared,
        Ok(None) => match store.get::<PeerShares>(&(hash, peer.to_bytes())) {
            Ok(Some(shared)) => shared,
            Ok(None) => return refused("not shared by this node"),
            Err(e) => return refused(&e.to_string()),
        },
        Err(e) => return refused(&e.to_string()),
    };
    match request {
        BlobRequest::Manifest { .. } => BlobResponse::manifest(shared.size, shared.chaining_values),
        BlobRequest::Range { offset, len, .. } => {
            if offset % CHUNK != 0 || u64::from(len) > CHUNK || offset >= shared.size.max(1) {
                return refused("ranges are whole chunks inside the blob");
            }
            let end = (offset + u64::from(len)).min(shared.size);
            let mut data = Vec::with_capacity((end - offset) as usize);
            match artifacts.read_range(&hash, offset, end).and_then(|mut r| Ok(r.read_to_end(&mut data)?)) {
                Ok(_) => {
                    metrics::counter!("agora_p2p_bytes_total", "direction" => "out")
                        .increment(data.len() as u64);
                    BlobResponse::data(data)
                }
                Err(e) => refused(&e.to_string()),
            }
        }
    }
}

/// What a fetch did.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct FetchReport {
    pub blake3: String,
    pub size: u64,
    /// False when the blob was already in the artifact store.
    pub fetched: bool,
    /// Bytes that were already in a `.part` file from an interrupted fetch.
    pub resumed_from: u64,
    /// Peers that served chunks, in order of use.
    pub providers: Vec<String>,
    /// Peers caught sending a bad manifest or a corrupted chunk.
    pub corrupt: Vec<String>,
    /// Seconds spent receiving and checking chunks (the artifact store takes them meanwhile),
    /// and seconds from the last chunk until the blob was stored.
    pub transfer_secs: f64,
    pub store_secs: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("no peer provides blob {0}")]
    NoProvider(String),
    #[error(
        "no provider served chunk {chunk} of {blob} intact (tried {tried}); the verified part is kept to resume"
    )]
    Exhausted { blob: String, chunk: u64, tried: usize },
    #[error(transparent)]
    Artifacts(#[from] crate::artifacts::ArtifactError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn part_path(dir: &Path, hash: &[u8; 32]) -> PathBuf {
    dir.join(format!("{}.part", hex(hash)))
}

/// Fetches a blob from the peers that provide it into the local artifact store.
pub async fn fetch(
    net: &Net,
    artifacts: &ArtifactStore,
    hash: [u8; 32],
    part_dir: &Path,
) -> Result<FetchReport, FetchError> {
    let mut report = FetchReport { blake3: hex(&hash), ..Default::default() };
    if let Some(info) = artifacts.info(&hash)? {
        report.size = info.size;
        return Ok(report);
    }
    // The DHT's providers first, then every connected peer (a small network's DHT may not
    // have spread the record yet; a peer that does not share the blob refuses at once).
    // In peer-id order, so the same peers are always tried in the same order.
    let mut candidates: Vec<PeerId> = net.providers(hash).await.unwrap_or_default().into_iter().collect();
    candidates.extend(net.connected_peers());
    candidates.sort_by_key(|p| p.to_string());
    candidates.dedup();
    candidates.retain(|p| *p != net.peer_id);
    let mut bad: HashSet<PeerId> = HashSet::new();

    let mut manifest = None;
    for peer in &candidates {
        // A refusal or a failed request only means this peer does not serve the blob.
        if let Ok(BlobResponse::Manifest { size, chunk_size, chaining_values }) =
            net.request_blob(*peer, BlobRequest::Manifest { hash }).await
        {
            match Manifest::check(hash, size, chunk_size, &chaining_values) {
                Ok(m) => {
                    manifest = Some(m);
                    break;
                }
                Err(why) => {
                    tracing::warn!(target: "agora::p2p", %peer, blob = %report.blake3, %why, "bad manifest");
                    bad.insert(*peer);
                }
            }
        }
    }
    let Some(manifest) = manifest else {
        return Err(FetchError::NoProvider(report.blake3));
    };
    report.size = manifest.size;

    std::fs::create_dir_all(part_dir)?;
    let part = part_path(part_dir, &hash);
    let mut file = std::fs::OpenOptions::new().create(true).append(true).read(true).open(&part)?;
    // The artifact store takes the blob as it arrives, on its own thread: the verified part
    // of an interrupted fetch first, then each chunk once checked.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(WINDOW);
    let store = {
        let artifacts = artifacts.clone();
        let size = manifest.size;
        tokio::task::spawn_blocking(move || {
            artifacts.put(ChannelReader { rx, buf: Vec::new(), pos: 0, left: size }, size)
        })
    };
    let feed = |tx: &std::sync::mpsc::SyncSender<Vec<u8>>, data: Vec<u8>| {
        tx.send(data)
            .map_err(|_| FetchError::Io(std::io::Error::other("the artifact store stopped taking the blob")))
    };
    let mut next = 0;
    let mut buf = vec![0u8; CHUNK as usize];
    while next < manifest.chunks() && manifest.size > 0 {
        // A part file holds only chunks that were checked when they arrived; they are checked
        // again, and the file cut at the first that fails (a crash may tear the last write).
        let len = manifest.chunk_len(next) as usize;
        let read = std::io::Read::read_exact(&mut file, &mut buf[..len]);
        if read.is_err() || !manifest.verify(next, &buf[..len]) {
            break;
        }
        feed(&tx, buf[..len].to_vec())?;
        next += 1;
    }
    let whole = (next * CHUNK).min(manifest.size);
    file.set_len(whole)?;
    report.resumed_from = whole;
    let started = std::time::Instant::now();
    if manifest.size == 0 {
        next = manifest.chunks();
    }
    // Checked chunks go, in order, to a thread that appends them to the part file and hands
    // them to the store, so the disk never holds up the loop that keeps requests in flight.
    let (to_disk, from_fetch) = std::sync::mpsc::sync_channel::<Vec<u8>>(WINDOW);
    let disk = std::thread::Builder::new().name("agora-fetch".into()).spawn(move || {
        for data in from_fetch {
            file.write_all(&data)?;
            feed(&tx, data)?;
        }
        Ok::<_, FetchError>(())
    })?;
    let stopped = || FetchError::Io(std::io::Error::other("the part file's writer stopped"));
    let join = move |disk: std::thread::JoinHandle<Result<(), FetchError>>| {
        disk.join().unwrap_or_else(|_| Err(stopped()))
    };
    let manifest = std::sync::Arc::new(manifest);

    let mut exhausted = None;
    while next < manifest.chunks() {
        let Some(peer) = candidates.iter().find(|p| !bad.contains(p)).copied() else {
            report.corrupt = bad.iter().map(|p| p.to_string()).collect();
            exhausted = Some(FetchError::Exhausted {
                blob: report.blake3.clone(),
                chunk: next,
                tried: candidates.len(),
            });
            break;
        };
        let mut inflight = FuturesOrdered::new();
        let mut queued = next;
        let mut served = false;
        loop {
            while inflight.len() < WINDOW && queued < manifest.chunks() {
                let index = queued;
                let request = BlobRequest::Range { hash, offset: index * CHUNK, len: CHUNK as u32 };
                let manifest = manifest.clone();
                // Each chunk is checked on the blocking pool as it lands, beside the others.
                inflight.push_back(async move {
                    let checked = match net.request_blob(peer, request).await {
                        Ok(BlobResponse::Data(data)) => {
                            let data = data.into_vec();
                            match tokio::task::spawn_blocking(move || (manifest.verify(index, &data), data))
                                .await
                            {
                                Ok((true, data)) => Ok(data),
                                Ok((false, _)) => Err("a corrupted chunk".to_owned()),
                                Err(e) => Err(format!("the check stopped: {e}")),
                            }
                        }
                        Ok(BlobResponse::Refused(why)) => Err(format!("a refusal: {why}")),
                        Ok(BlobResponse::Manifest { .. }) => Err("a manifest for a range".to_owned()),
                        Err(e) => Err(e.to_string()),
                    };
                    (index, checked)
                });
                queued += 1;
            }
            let Some((index, checked)) = inflight.next().await else { break };
            let data = match checked {
                Ok(data) => data,
                Err(why) => {
                    tracing::warn!(target: "agora::p2p", %peer, blob = %report.blake3, chunk = index, %why, "provider failed; trying another");
                    metrics::counter!("agora_p2p_blob_failures_total").increment(1);
                    bad.insert(peer);
                    break;
                }
            };
            metrics::counter!("agora_p2p_bytes_total", "direction" => "in").increment(data.len() as u64);
            if to_disk.send(data).is_err() {
                // The writer only stops early on an error.
                return Err(join(disk).err().unwrap_or_else(stopped));
            }
            served = true;
            next = index + 1;
        }
        if served && !report.providers.contains(&peer.to_string()) {
            report.providers.push(peer.to_string());
        }
    }
    drop(to_disk);
    // Joined on the blocking pool: the part file's last writes may still be on their way, and
    // a fetch that ran out of providers leaves every checked chunk there for its resume.
    tokio::task::spawn_blocking(move || join(disk)).await.map_err(|_| stopped())??;
    if let Some(exhausted) = exhausted {
        return Err(exhausted);
    }
    report.transfer_secs = started.elapsed().as_secs_f64();
    let started = std::time::Instant::now();
    let info = store.await.map_err(|e| FetchError::Io(std::io::Error::other(e)))??;
    if info.blake3 != report.blake3 {
        // Cannot happen with every chunk verified; never keep a mislabelled blob.
        artifacts.release(&hash)?;
        return Err(FetchError::Io(std::io::Error::other("the assembled blob does not match its hash")));
    }
    std::fs::remove_file(&part)?;
    report.store_secs = started.elapsed().as_secs_f64();
    report.corrupt = bad.iter().map(|p| p.to_string()).collect();
    report.fetched = true;
    Ok(report)
}

/// The bytes of a blob as they arrive; an error, never a short read, if they stop early (so
/// the artifact store cannot keep a truncated blob).
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
    left: u64,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.buf.len() {
            if self.left == 0 {
                return Ok(0);
            }
            self.buf = self.rx.recv().map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the fetch stopped before the blob was complete",
                )
            })?;
            self.pos = 0;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        self.left = self.left.saturating_sub(n as u64);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn manifests_merge_to_the_blake3_of_the_whole_blob() {
        for size in [CHUNK as usize + 1, 2 * CHUNK as usize, 3 * CHUNK as usize + 17, 5 * CHUNK as usize] {
            let data = bytes(size);
            let cvs = chaining_values(&data[..], size as u64).unwrap();
            assert_eq!(root_of(&cvs, size as u64), Some(blake3::hash(&data)), "size {size}");
            let hash = *blake3::hash(&data).as_bytes();
            let m = Manifest::check(hash, size as u64, CHUNK as u32, &cvs.concat()).unwrap();
            for (i, chunk) in data.chunks(CHUNK as usize).enumerate() {
                assert!(m.verify(i as u64, chunk));
                let mut bad = chunk.to_vec();
                bad[chunk.len() / 2] ^= 1;
                assert!(!m.verify(i as u64, &bad));
            }
        }
    }

    #[test]
    fn a_forged_manifest_is_refused() {
        let data = bytes(3 * CHUNK as usize);
        let hash = *blake3::hash(&data).as_bytes();
        let mut cvs = chaining_values(&data[..], data.len() as u64).unwrap().concat();
        cvs[40] ^= 1;
        assert!(Manifest::check(hash, data.len() as u64, CHUNK as u32, &cvs).is_err());
        assert!(Manifest::check(hash, data.len() as u64 + 1, CHUNK as u32, &cvs).is_err());
        assert!(Manifest::check(hash, data.len() as u64, 4096, &cvs).is_err());
    }

    #[test]
    fn small_blobs_verify_whole() {
        let data = bytes(1000);
        let hash = *blake3::hash(&data).as_bytes();
        let m = Manifest::check(hash, 1000, CHUNK as u32, &[]).unwrap();
        assert!(m.verify(0, &data));
        assert!(!m.verify(0, &data[1..]));
        let empty = Manifest::check(*blake3::hash(&[]).as_bytes(), 0, CHUNK as u32, &[]).unwrap();
        assert!(empty.verify(0, &[]));
    }
}
