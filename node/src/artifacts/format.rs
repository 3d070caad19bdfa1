//! The blob format: zstd-compressed, XChaCha20-Poly1305-encrypted chunks that each authenticate
//! on their own, so a blob streams in and out and a range reads only the chunks it covers.
//!
//! ```text
//! header   "AGORAB1\0" | salt (16) | chunk size (u32 LE)           plaintext, authenticated
//! chunk i  length (u32 LE) | sealed(zstd(plaintext[i]))            one per chunk size of plaintext
//! footer   sealed(chunks (u64) | size (u64) | offset of each chunk (u64 each)) | its length (u64 LE)
//! ```
//!
//! The key of a blob is derived from the node's master key and the blob's random salt. Each
//! sealed part's nonce is its index and kind (chunk or footer), and its associated data the
//! header, its index and kind: a chunk moved, swapped, altered or taken from another blob fails
//! to open, and a blob cut short has no valid footer.

use std::io::{self, Read, Seek, SeekFrom, Write};

use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce, aead::Aead};
use rayon::prelude::*;

use super::ArtifactError;

pub const MAGIC: &[u8; 8] = b"AGORAB1\0";
pub const HEADER_LEN: usize = 8 + 16 + 4;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 1 << 20;
const KEY_CONTEXT: &str = "agora artifacts v1 blob key";
/// Model weights compress little; zstd's fastest level keeps most of what level 3 saves.
const ZSTD_LEVEL: i32 = 1;
/// Chunks sealed in parallel per batch: memory holds twice this many chunks.
pub(crate) const BATCH: usize = 8;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Chunk = 0,
    Footer = 1,
}

/// The node's artifact master key; blob keys derive from it.
#[derive(Clone, zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct MasterKey([u8; 32]);

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    fn blob_cipher(&self, salt: &[u8; 16]) -> XChaCha20Poly1305 {
        let mut material = [0u8; 48];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(salt);
        XChaCha20Poly1305::new(&blake3::derive_key(KEY_CONTEXT, &material).into())
    }
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

fn nonce(index: u64, part: Part) -> XNonce {
    let mut nonce = [0u8; 24];
    nonce[..8].copy_from_slice(&index.to_le_bytes());
    nonce[8] = part as u8;
    nonce.into()
}

fn aad(header: &[u8; HEADER_LEN], index: u64, part: Part) -> Vec<u8> {
    let mut aad = header.to_vec();
    aad.extend_from_slice(&index.to_le_bytes());
    aad.push(part as u8);
    aad
}

/// What writing a blob produced.
pub struct Written {
    pub hash: [u8; 32],
    pub size: u64,
    pub stored: u64,
}

/// Streams `input` into `out` as a blob, hashing the plaintext on the way; memory holds two
/// batches of chunks. Stops with [`ArtifactError::TooLarge`] past `limit` plaintext bytes.
pub fn write_blob(
    key: &MasterKey,
    input: impl Read + Send,
    mut out: impl Write,
    limit: u64,
) -> Result<Written, ArtifactError> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| ArtifactError::Io(io::Error::other(e.to_string())))?;
    let mut header = [0u8; HEADER_LEN];
    header[..8].copy_from_slice(MAGIC);
    header[8..24].copy_from_slice(&salt);
    header[24..].copy_from_slice(&(CHUNK as u32).to_le_bytes());
    let cipher = key.blob_cipher(&salt);
    out.write_all(&header)?;
    let mut stored = HEADER_LEN as u64;
    let mut reading = Reading { input, hasher: blake3::Hasher::new(), size: 0, limit, done: false };
    let mut offsets = Vec::new();
    // Pipelined: while one batch is sealed on the pool, the next is read and hashed.
    let mut batch = reading.next_batch(true)?;
    while !batch.is_empty() {
        let first = offsets.len() as u64;
        let (sealed, next) = rayon::join(
            || {
                batch
                    .par_iter()
                    .enumerate()
                    .map(|(i, plain)| {
                        let index = first + i as u64;
                        let compressed = zstd::bulk::compress(plain, ZSTD_LEVEL)?;
                        cipher
                            .encrypt(
                                &nonce(index, Part::Chunk),
                                chacha20poly1305::aead::Payload {
                                    msg: &compressed,
                                    aad: &aad(&header, index, Part::Chunk),
                                },
                            )
                            .map_err(|_| ArtifactError::Io(io::Error::other("encryption failed")))
                    })
                    .collect::<Result<Vec<Vec<u8>>, _>>()
            },
            || reading.next_batch(false),
        );
        for sealed in sealed? {
            offsets.push(stored);
            out.write_all(&(sealed.len() as u32).to_le_bytes())?;
            out.write_all(&sealed)?;
            stored += 4 + sealed.len() as u64;
        }
        batch = next?;
    }
    let Reading { hasher, size, .. } = reading;
    let mut footer = Vec::with_capacity(16 + 8 * offsets.len());
    footer.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    footer.extend_from_slice(&size.to_le_bytes());
    for offset in &offsets {
        footer.extend_from_slice(&offset.to_le_bytes());
    }
    let sealed = cipher
        .encrypt(
            &nonce(0, Part::Footer),
            chacha20poly1305::aead::Payload { msg: &footer, aad: &aad(&header, 0, Part::Footer) },
        )
        .map_err(|_| ArtifactError::Io(io::Error::other("encryption failed")))?;
    out.write_all(&sealed)?;
    out.write_all(&(sealed.len() as u64).to_le_bytes())?;
    stored += sealed.len() as u64 + 8;
    Ok(Written { hash: *hasher.finalize().as_bytes(), size, stored })
}

/// The input side of [`write_blob`]: reads whole chunks, hashes them in order, holds the limit.
struct Reading<R> {
    input: R,
    hasher: blake3::Hasher,
    size: u64,
    limit: u64,
    done: bool,
}

impl<R: Read> Reading<R> {
    /// Up to [`BATCH`] chunks; empty at the end. The first batch of an empty input holds one
    /// empty chunk, so every blob has at least one.
    fn next_batch(&mut self, first: bool) -> Result<Vec<Vec<u8>>, ArtifactError> {
        let mut batch = Vec::with_capacity(BATCH);
        while !self.done && batch.len() < BATCH {
            let mut chunk = vec![0u8; CHUNK];
            let filled = read_full(&mut self.input, &mut chunk)?;
            if filled == 0 && !(first && batch.is_empty()) {
                self.done = true;
                break;
            }
            chunk.truncate(filled);
            self.size += filled as u64;
            if self.size > self.limit {
                return Err(ArtifactError::TooLarge { limit: self.limit });
            }
            self.hasher.update(&chunk);
            batch.push(chunk);
            if filled < CHUNK {
                self.done = true;
            }
        }
        Ok(batch)
    }
}

fn read_full(input: &mut impl Read, buffer: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match input.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// An opened blob: its footer checked, chunks decrypted on demand.
pub struct BlobFile<F> {
    file: F,
    header: [u8; HEADER_LEN],
    cipher: XChaCha20Poly1305,
    offsets: Vec<u64>,
    footer_start: u64,
    pub size: u64,
    /// For error messages.
    name: String,
}

impl<F: Read + Seek> BlobFile<F> {
    pub fn open(key: &MasterKey, mut file: F, name: &str) -> Result<Self, ArtifactError> {
        let corrupt =
            |reason: &str| ArtifactError::Corrupt { blob: name.to_owned(), reason: reason.to_owned() };
        let total = file.seek(SeekFrom::End(0))?;
        if total < HEADER_LEN as u64 + 8 {
            return Err(corrupt("shorter than a header and a footer (truncated)"));
        }
        file.seek(SeekFrom::Start(0))?;
        let mut header = [0u8; HEADER_LEN];
        file.read_exact(&mut header)?;
        if &header[..8] != MAGIC {
            return Err(corrupt("not an Agora blob (bad magic)"));
        }
        if u32::from_le_bytes(header[24..].try_into().expect("4 bytes")) as usize != CHUNK {
            return Err(corrupt("unsupported chunk size"));
        }
        let salt: [u8; 16] = header[8..24].try_into().expect("16 bytes");
        let cipher = key.blob_cipher(&salt);
        file.seek(SeekFrom::Start(total - 8))?;
        let mut length = [0u8; 8];
        file.read_exact(&mut length)?;
        let footer_len = u64::from_le_bytes(length);
        if footer_len > total - 8 - HEADER_LEN as u64 {
            return Err(corrupt("the footer length is past the start (truncated or altered)"));
        }
        let footer_start = total - 8 - footer_len;
        file.seek(SeekFrom::Start(footer_start))?;
        let mut sealed = vec![0u8; footer_len as usize];
        file.read_exact(&mut sealed)?;
        let footer = cipher
            .decrypt(
                &nonce(0, Part::Footer),
                chacha20poly1305::aead::Payload { msg: &sealed, aad: &aad(&header, 0, Part::Footer) },
            )
            .map_err(|_| {
                corrupt("the footer does not authenticate (truncated, altered, or another node's key)")
            })?;
        if footer.len() < 16 {
            return Err(corrupt("footer too short"));
        }
        let chunks = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
        let size = u64::from_le_bytes(footer[8..16].try_into().expect("8 bytes"));
        let offsets: Vec<u64> = footer[16..]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        if offsets.len() as u64 != chunks || chunks != size.div_ceil(CHUNK as u64).max(1) {
            return Err(corrupt("the footer's chunk table does not match its size"));
        }
        Ok(Self { file, header, cipher, offsets, footer_start, size, name: name.to_owned() })
    }

    pub fn chunks(&self) -> usize {
        self.offsets.len()
    }

    /// The plaintext of chunk `index`, authenticated.
    pub fn chunk(&mut self, index: usize) -> Result<Vec<u8>, ArtifactError> {
        let sealed = self.sealed(index)?;
        self.opener().open(index, &sealed)
    }

    /// The sealed bytes of chunk `index`, as stored.
    fn sealed(&mut self, index: usize) -> Result<Vec<u8>, ArtifactError> {
        let corrupt = |reason: String| ArtifactError::Corrupt { blob: self.name.clone(), reason };
        let start = self.offsets[index];
        let end = self.offsets.get(index + 1).copied().unwrap_or(self.footer_start);
        if end < start + 4 + 16 {
            return Err(corrupt(format!("chunk {index} is too short")));
        }
        self.file.seek(SeekFrom::Start(start))?;
        let mut length = [0u8; 4];
        self.file.read_exact(&mut length)?;
        let length = u64::from(u32::from_le_bytes(length));
        if start + 4 + length != end {
            return Err(corrupt(format!("chunk {index}'s length does not match the chunk table")));
        }
        let mut sealed = vec![0u8; length as usize];
        self.file.read_exact(&mut sealed)?;
        Ok(sealed)
    }

    fn opener(&self) -> Opener {
        Opener {
            cipher: self.cipher.clone(),
            header: self.header,
            name: self.name.clone(),
            size: self.size,
            chunks: self.offsets.len(),
        }
    }

    /// Chunks `first..last` (exclusive), read in order and opened in parallel.
    fn open_batch(&mut self, first: usize, last: usize) -> Result<Vec<Vec<u8>>, ArtifactError> {
        let sealed = self.sealed_batch(first, last)?;
        self.opener().open_all(first, &sealed)
    }

    fn sealed_batch(&mut self, first: usize, last: usize) -> Result<Vec<Vec<u8>>, ArtifactError> {
        (first..last).map(|i| self.sealed(i)).collect()
    }

    /// Reads chunks `first..last` now and opens them on the thread pool; the answer comes on
    /// the channel.
    fn open_batch_ahead(&mut self, first: usize, last: usize) -> Result<Ahead, ArtifactError> {
        let sealed = self.sealed_batch(first, last)?;
        let opener = self.opener();
        let (done, opened) = std::sync::mpsc::sync_channel(1);
        rayon::spawn(move || {
            let _ = done.send(opener.open_all(first, &sealed));
        });
        Ok(Ahead { first, opened })
    }
}

/// A batch of chunks being opened on the thread pool.
struct Ahead {
    first: usize,
    opened: std::sync::mpsc::Receiver<Result<Vec<Vec<u8>>, ArtifactError>>,
}

/// What opening a chunk needs (no file: chunks open in parallel, and on another thread).
struct Opener {
    cipher: XChaCha20Poly1305,
    header: [u8; HEADER_LEN],
    name: String,
    size: u64,
    chunks: usize,
}

impl Opener {
    fn open_all(&self, first: usize, sealed: &[Vec<u8>]) -> Result<Vec<Vec<u8>>, ArtifactError> {
        sealed.par_iter().enumerate().map(|(i, bytes)| self.open(first + i, bytes)).collect()
    }

    /// Authenticates, decrypts and decompresses chunk `index`.
    fn open(&self, index: usize, sealed: &[u8]) -> Result<Vec<u8>, ArtifactError> {
        let corrupt = |reason: String| ArtifactError::Corrupt { blob: self.name.clone(), reason };
        let compressed = self
            .cipher
            .decrypt(
                &nonce(index as u64, Part::Chunk),
                chacha20poly1305::aead::Payload {
                    msg: sealed,
                    aad: &aad(&self.header, index as u64, Part::Chunk),
                },
            )
            .map_err(|_| corrupt(format!("chunk {index} does not authenticate (altered or moved)")))?;
        let expected =
            if index + 1 == self.chunks { (self.size - (index * CHUNK) as u64) as usize } else { CHUNK };
        let plain = zstd::bulk::decompress(&compressed, expected)
            .map_err(|e| corrupt(format!("chunk {index} does not decompress: {e}")))?;
        if plain.len() != expected {
            return Err(corrupt(format!("chunk {index} holds {} bytes, expected {expected}", plain.len())));
        }
        Ok(plain)
    }
}

impl<F: Read + Seek> BlobFile<F> {
    /// A reader of plaintext bytes `start..end` (clamped to the blob), two batches in memory.
    pub fn range(self, start: u64, end: u64) -> RangeReader<F> {
        let end = end.min(self.size);
        RangeReader { blob: self, position: start.min(end), end, ready: Default::default(), ahead: None }
    }
}

/// Plaintext of a byte range, decrypted as it is read: up to [`BATCH`] chunks at a time, opened
/// in parallel, the next batch opened on the thread pool while this one is read (memory: two
/// batches), so a reader that sends or hashes what it reads overlaps that with the decryption.
pub struct RangeReader<F> {
    blob: BlobFile<F>,
    position: u64,
    end: u64,
    ready: std::collections::VecDeque<(usize, Vec<u8>)>,
    ahead: Option<Ahead>,
}

impl<F: Read + Seek> Read for RangeReader<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.position >= self.end || out.is_empty() {
            return Ok(0);
        }
        let index = (self.position / CHUNK as u64) as usize;
        while self.ready.front().is_some_and(|(i, _)| *i < index) {
            self.ready.pop_front();
        }
        if self.ready.front().is_none_or(|(i, _)| *i != index) {
            self.ready.clear();
            let last_needed = ((self.end - 1) / CHUNK as u64) as usize + 1;
            let opened = match self.ahead.take() {
                Some(ahead) if ahead.first == index => ahead
                    .opened
                    .recv()
                    .map_err(|_| io::Error::other("a chunk opener stopped without an answer"))?,
                _ => self.blob.open_batch(index, (index + BATCH).min(last_needed)),
            }
            .map_err(io::Error::other)?;
            let last = index + opened.len();
            self.ready.extend((index..last).zip(opened));
            // On a pool thread the batch is opened in place: waiting there for the pool could
            // leave no thread to do the work. A batch that cannot be read ahead is read again
            // when its turn comes, and its error reported then.
            if last < last_needed && rayon::current_thread_index().is_none() {
                self.ahead = self.blob.open_batch_ahead(last, (last + BATCH).min(last_needed)).ok();
            }
        }
        let (_, chunk) = self.ready.front().expect("loaded above");
        let within = (self.position - (index * CHUNK) as u64) as usize;
        let available = (chunk.len() - within).min((self.end - self.position) as usize);
        let n = available.min(out.len());
        out[..n].copy_from_slice(&chunk[within..within + n]);
        self.position += n as u64;
        Ok(n)
    }
}
