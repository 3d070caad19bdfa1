//! The blob format: compressed, AES-256-GCM-sealed chunks that each authenticate on their own,
//! so a blob streams in and out and a range reads only the chunks it covers.
//!
//! ```text
//! header   "AGORAB2\0" | salt (16) | chunk size (u32 LE)           plaintext, authenticated
//! chunk i  length (u32 LE) | sealed(encoded(plaintext[i]) | encoding (1))
//! footer   sealed(chunks (u64) | size (u64) | offset of each chunk (u64 each)) | its length (u64 LE)
//! ```
//!
//! A chunk's encoding is 0 (stored as it is) or a byte stride 1, 2 or 4: the chunk split into
//! that many byte planes (every 2nd or 4th byte together, so the exponent bytes of bf16/f16 or
//! f32 weights sit side by side) and zstd-compressed. The writer picks the stride from the
//! byte statistics of a sample of the chunk ([`best_stride`]), and stores a chunk that zstd would
//! shrink by less than 1/64: weights' mantissa bytes are noise, and decoding them through zstd's
//! entropy stage costs more than it saves. On the MiniLM weights cut to bf16 the planes store 69%
//! of the bytes instead of zstd's 78%, and decompress at twice the speed.
//!
//! The key of a blob is derived from the node's master key and the blob's random salt. Each
//! sealed part's nonce is its index and kind (chunk or footer), and its associated data the
//! header, its index and kind: a chunk moved, swapped, altered or taken from another blob fails
//! to open, and a blob cut short has no valid footer.
//!
//! Blobs of the first format ("AGORAB1\0": XChaCha20-Poly1305, every chunk zstd without planes)
//! are still read; new blobs are always written in this one. AES-GCM runs on the CPU's AES and
//! carry-less multiply instructions (ring's assembly): 6 GB/s a core against 1 GB/s for the
//! portable XChaCha20-Poly1305 on the machines measured.

use std::io::{self, Read, Seek, SeekFrom, Write};

use chacha20poly1305::{KeyInit, XChaCha20Poly1305, XNonce, aead::Aead};
use rayon::prelude::*;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::ArtifactError;

pub const MAGIC: &[u8; 8] = b"AGORAB2\0";
/// The first format, read only.
const MAGIC_V1: &[u8; 8] = b"AGORAB1\0";
pub const HEADER_LEN: usize = 8 + 16 + 4;
/// Plaintext bytes per chunk.
pub const CHUNK: usize = 1 << 20;
const KEY_CONTEXT: &str = "agora artifacts v2 blob key";
const KEY_CONTEXT_V1: &str = "agora artifacts v1 blob key";
/// Model weights compress little; zstd's fastest level keeps most of what level 3 saves.
const ZSTD_LEVEL: i32 = 1;
/// A chunk's encoding byte: stored as it is (otherwise the byte stride of its planes).
const STORED: u8 = 0;
/// Bytes from the middle of a chunk whose statistics choose its stride.
const SAMPLE: usize = 32 << 10;
/// AES-GCM's tag.
const TAG_LEN: usize = 16;
/// Chunks sealed in parallel per batch: memory holds twice this many chunks.
pub(crate) const BATCH: usize = 8;

/// Whether [`write_blob`] compresses chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Byte planes and zstd, chunk by chunk where it pays (uploads and model files).
    #[default]
    Planes,
    /// Every chunk stored as it is, only sealed: for blobs read far more often than written
    /// and made again at will (license copies), whose reads would otherwise be bound by
    /// decompression.
    None,
}

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

    fn blob_key(&self, context: &str, salt: &[u8; 16]) -> [u8; 32] {
        let mut material = [0u8; 48];
        material[..32].copy_from_slice(&self.0);
        material[32..].copy_from_slice(salt);
        let key = blake3::derive_key(context, &material);
        zeroize::Zeroize::zeroize(&mut material);
        key
    }

    fn blob_cipher(&self, salt: &[u8; 16]) -> LessSafeKey {
        let mut key = self.blob_key(KEY_CONTEXT, salt);
        let cipher = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &key).expect("a 32-byte key"));
        zeroize::Zeroize::zeroize(&mut key);
        cipher
    }

    fn blob_cipher_v1(&self, salt: &[u8; 16]) -> XChaCha20Poly1305 {
        let mut key = self.blob_key(KEY_CONTEXT_V1, salt);
        let cipher = XChaCha20Poly1305::new(&key.into());
        zeroize::Zeroize::zeroize(&mut key);
        cipher
    }
}

/// The cipher of an opened blob, by its format.
#[derive(Clone)]
enum Cipher {
    AesGcm(std::sync::Arc<LessSafeKey>),
    /// The first format: every chunk zstd-compressed, no encoding byte.
    XChaCha(XChaCha20Poly1305),
}

impl Cipher {
    /// The plaintext of a sealed part, or `None` when it does not authenticate.
    fn open(
        &self,
        header: &[u8; HEADER_LEN],
        index: u64,
        part: Part,
        mut sealed: Vec<u8>,
    ) -> Option<Vec<u8>> {
        let aad = aad(header, index, part);
        match self {
            Cipher::AesGcm(key) => {
                let len =
                    key.open_in_place(gcm_nonce(index, part), Aad::from(&aad[..]), &mut sealed).ok()?.len();
                sealed.truncate(len);
                Some(sealed)
            }
            Cipher::XChaCha(cipher) => cipher
                .decrypt(&nonce(index, part), chacha20poly1305::aead::Payload { msg: &sealed, aad: &aad })
                .ok(),
        }
    }
}

/// Seals `plain` in place (the tag appended) as part `index` of the blob under `header`.
fn seal(
    key: &LessSafeKey,
    header: &[u8; HEADER_LEN],
    index: u64,
    part: Part,
    mut plain: Vec<u8>,
) -> Result<Vec<u8>, ArtifactError> {
    key.seal_in_place_append_tag(
        gcm_nonce(index, part),
        Aad::from(&aad(header, index, part)[..]),
        &mut plain,
    )
    .map_err(|_| ArtifactError::Io(io::Error::other("encryption failed")))?;
    Ok(plain)
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(***)")
    }
}

fn gcm_nonce(index: u64, part: Part) -> Nonce {
    let mut nonce = [0u8; 12];
    nonce[..8].copy_from_slice(&index.to_le_bytes());
    nonce[8] = part as u8;
    Nonce::assume_unique_for_key(nonce)
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

/// A chunk encoded for sealing: its bytes, then the encoding byte, with room for the tag.
fn encode(plain: &[u8], compression: Compression) -> io::Result<Vec<u8>> {
    if compression == Compression::None {
        let mut out = Vec::with_capacity(plain.len() + 1 + TAG_LEN);
        out.extend_from_slice(plain);
        out.push(STORED);
        return Ok(out);
    }
    let mut compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL)?;
    let stride = best_stride(plain, &mut compressor)?;
    let planes;
    let input = if stride == 1 {
        plain
    } else {
        planes = shuffle(plain, stride);
        &planes[..]
    };
    let mut out = Vec::with_capacity(zstd::zstd_safe::compress_bound(plain.len()) + 1 + TAG_LEN);
    compressor.compress_to_buffer(input, &mut out)?;
    if out.len() as u64 * 64 >= plain.len() as u64 * 63 {
        out.clear();
        out.extend_from_slice(plain);
        out.push(STORED);
    } else {
        out.push(stride as u8);
    }
    Ok(out)
}

/// The byte stride (1, 2 or 4) whose planes should compress best, judged on a sample from the
/// middle of `plain`: zstd codes the literals of each 128 KiB block with one Huffman table, so
/// planes that fill whole blocks cost about their order-0 entropy, while interleaved bytes cost
/// the entropy of the mixture. The narrower stride wins unless the wider saves 2% more (its
/// planes take longer to put back together), and data whose repeats zstd finds (text, tables)
/// keeps stride 1, since planes break repeats apart.
fn best_stride(plain: &[u8], compressor: &mut zstd::bulk::Compressor<'_>) -> io::Result<usize> {
    if plain.len() < 4 * 1024 {
        return Ok(1);
    }
    let len = plain.len().min(SAMPLE) & !3;
    let start = ((plain.len() - len) / 2) & !3;
    let sample = &plain[start..start + len];
    let mut counts = [[0u32; 256]; 4];
    for group in sample.chunks_exact(4) {
        for (plane, byte) in counts.iter_mut().zip(group) {
            plane[usize::from(*byte)] += 1;
        }
    }
    let merged = |planes: &[usize]| -> [u32; 256] {
        std::array::from_fn(|byte| planes.iter().map(|&p| counts[p][byte]).sum())
    };
    let one = entropy_bytes(&merged(&[0, 1, 2, 3]));
    if (compressor.compress(sample)?.len() as f64) < one * 0.9 {
        return Ok(1);
    }
    let two = entropy_bytes(&merged(&[0, 2])) + entropy_bytes(&merged(&[1, 3]));
    let four: f64 = counts.iter().map(entropy_bytes).sum();
    let mut best = (one, 1);
    for (size, stride) in [(two, 2), (four, 4)] {
        if size < best.0 * 0.98 {
            best = (size, stride);
        }
    }
    Ok(best.1)
}

/// The bytes an order-0 entropy coder needs for bytes with these counts, at most one a byte.
fn entropy_bytes(counts: &[u32; 256]) -> f64 {
    let total: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let c = f64::from(c);
            -c * (c / total).log2()
        })
        .sum();
    (bits / 8.0).min(total)
}

/// Byte planes: every `stride`-th byte together, plane by plane; the bytes past the last whole
/// group of `stride` stay at the end as they are.
fn shuffle(input: &[u8], stride: usize) -> Vec<u8> {
    let n = input.len() / stride;
    let mut out = vec![0u8; input.len()];
    let (body, tail) = out.split_at_mut(n * stride);
    match stride {
        2 => {
            let (p0, p1) = body.split_at_mut(n);
            for ((a, b), w) in p0.iter_mut().zip(p1.iter_mut()).zip(input.chunks_exact(2)) {
                *a = w[0];
                *b = w[1];
            }
        }
        4 => {
            let (p0, rest) = body.split_at_mut(n);
            let (p1, rest) = rest.split_at_mut(n);
            let (p2, p3) = rest.split_at_mut(n);
            let planes = p0.iter_mut().zip(p1.iter_mut()).zip(p2.iter_mut()).zip(p3.iter_mut());
            for ((((a, b), c), d), w) in planes.zip(input.chunks_exact(4)) {
                (*a, *b, *c, *d) = (w[0], w[1], w[2], w[3]);
            }
        }
        _ => unreachable!("strides are 2 or 4"),
    }
    tail.copy_from_slice(&input[n * stride..]);
    out
}

/// The inverse of [`shuffle`].
fn unshuffle(input: &[u8], stride: usize) -> Vec<u8> {
    let n = input.len() / stride;
    let mut out = vec![0u8; input.len()];
    let (body, tail) = out.split_at_mut(n * stride);
    match stride {
        2 => {
            let (p0, p1) = input[..2 * n].split_at(n);
            for ((a, b), w) in p0.iter().zip(p1).zip(body.chunks_exact_mut(2)) {
                (w[0], w[1]) = (*a, *b);
            }
        }
        4 => {
            let (p0, rest) = input[..4 * n].split_at(n);
            let (p1, rest) = rest.split_at(n);
            let (p2, p3) = rest.split_at(n);
            for ((((a, b), c), d), w) in p0.iter().zip(p1).zip(p2).zip(p3).zip(body.chunks_exact_mut(4)) {
                (w[0], w[1], w[2], w[3]) = (*a, *b, *c, *d);
            }
        }
        _ => unreachable!("strides are 2 or 4"),
    }
    tail.copy_from_slice(&input[n * stride..]);
    out
}

/// The plaintext of an opened chunk frame ([`encode`]'s output without the tag), `expected`
/// bytes long, or why not.
fn decode(mut frame: Vec<u8>, expected: usize) -> Result<Vec<u8>, String> {
    let Some(encoding) = frame.pop() else { return Err("its frame is empty".into()) };
    let plain = match encoding {
        STORED => frame,
        1 | 2 | 4 => {
            let planes =
                zstd::bulk::decompress(&frame, expected).map_err(|e| format!("does not decompress: {e}"))?;
            if encoding == 1 { planes } else { unshuffle(&planes, usize::from(encoding)) }
        }
        other => return Err(format!("has an unknown encoding {other}")),
    };
    if plain.len() != expected {
        return Err(format!("holds {} bytes, expected {expected}", plain.len()));
    }
    Ok(plain)
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
    compression: Compression,
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
                        seal(&cipher, &header, first + i as u64, Part::Chunk, encode(plain, compression)?)
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
    let mut footer = Vec::with_capacity(16 + 8 * offsets.len() + TAG_LEN);
    footer.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    footer.extend_from_slice(&size.to_le_bytes());
    for offset in &offsets {
        footer.extend_from_slice(&offset.to_le_bytes());
    }
    let sealed = seal(&cipher, &header, 0, Part::Footer, footer)?;
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
    cipher: Cipher,
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
        let salt: [u8; 16] = header[8..24].try_into().expect("16 bytes");
        let cipher = match &header[..8] {
            magic if magic == MAGIC => Cipher::AesGcm(std::sync::Arc::new(key.blob_cipher(&salt))),
            magic if magic == MAGIC_V1 => Cipher::XChaCha(key.blob_cipher_v1(&salt)),
            _ => return Err(corrupt("not an Agora blob (bad magic)")),
        };
        if u32::from_le_bytes(header[24..].try_into().expect("4 bytes")) as usize != CHUNK {
            return Err(corrupt("unsupported chunk size"));
        }
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
        let footer = cipher.open(&header, 0, Part::Footer, sealed).ok_or_else(|| {
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
        self.opener().open(index, sealed)
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
        self.opener().open_all(first, sealed)
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
            let _ = done.send(opener.open_all(first, sealed));
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
    cipher: Cipher,
    header: [u8; HEADER_LEN],
    name: String,
    size: u64,
    chunks: usize,
}

impl Opener {
    fn open_all(&self, first: usize, sealed: Vec<Vec<u8>>) -> Result<Vec<Vec<u8>>, ArtifactError> {
        sealed.into_par_iter().enumerate().map(|(i, bytes)| self.open(first + i, bytes)).collect()
    }

    /// Authenticates, decrypts and decodes chunk `index`.
    fn open(&self, index: usize, sealed: Vec<u8>) -> Result<Vec<u8>, ArtifactError> {
        let corrupt = |reason: String| ArtifactError::Corrupt { blob: self.name.clone(), reason };
        let frame = self
            .cipher
            .open(&self.header, index as u64, Part::Chunk, sealed)
            .ok_or_else(|| corrupt(format!("chunk {index} does not authenticate (altered or moved)")))?;
        let expected =
            if index + 1 == self.chunks { (self.size - (index * CHUNK) as u64) as usize } else { CHUNK };
        let frame = match self.cipher {
            Cipher::AesGcm(_) => frame,
            // The first format's chunks are all zstd without planes, and carry no encoding byte.
            Cipher::XChaCha(_) => {
                let mut frame = frame;
                frame.push(1);
                frame
            }
        };
        decode(frame, expected).map_err(|reason| corrupt(format!("chunk {index} {reason}")))
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
/// [`RangeReader::next_bytes`] hands out the opened chunks themselves, without a copy.
pub struct RangeReader<F> {
    blob: BlobFile<F>,
    position: u64,
    end: u64,
    ready: std::collections::VecDeque<(usize, bytes::Bytes)>,
    ahead: Option<Ahead>,
}

impl<F: Read + Seek> RangeReader<F> {
    /// The rest of the range's bytes in the chunk at the current position (opening it and
    /// reading ahead if needed), without consuming them; `None` at the end of the range.
    fn current(&mut self) -> io::Result<Option<bytes::Bytes>> {
        if self.position >= self.end {
            return Ok(None);
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
            self.ready.extend((index..last).zip(opened.into_iter().map(bytes::Bytes::from)));
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
        Ok(Some(chunk.slice(within..within + available)))
    }

    /// The next run of the range's plaintext (to the end of its chunk, at most 1 MiB), shared
    /// with the reader rather than copied; `None` at the end.
    pub fn next_bytes(&mut self) -> io::Result<Option<bytes::Bytes>> {
        let run = self.current()?;
        if let Some(run) = &run {
            self.position += run.len() as u64;
        }
        Ok(run)
    }
}

impl<F: Read + Seek> Read for RangeReader<F> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        let Some(run) = self.current()? else { return Ok(0) };
        let n = run.len().min(out.len());
        out[..n].copy_from_slice(&run[..n]);
        self.position += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    fn xorshift(x: &mut u32) -> u32 {
        *x ^= *x << 13;
        *x ^= *x >> 17;
        *x ^= *x << 5;
        *x
    }

    /// bf16 weights: a random sign and mantissa, exponents from a narrow range.
    fn bf16(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let r = xorshift(&mut x);
            let value =
                (((r >> 31) as u16) << 15) | ((0x79 + (r % 4) as u16) << 7) | ((r >> 8) & 0x7f) as u16;
            out.extend_from_slice(&value.to_le_bytes());
        }
        out
    }

    /// f32 weights: near-Gaussian values of a small scale.
    fn f32s(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9;
        let mut out = Vec::with_capacity(len);
        while out.len() < len {
            let sum: f32 = (0..4).map(|_| xorshift(&mut x) as f32 / u32::MAX as f32 - 0.5).sum();
            out.extend_from_slice(&(sum * 0.05).to_le_bytes());
        }
        out
    }

    #[test]
    fn planes_round_trip_at_every_length_and_stride() {
        for len in [0, 1, 2, 3, 4, 5, 7, 8, 9, 1023, 4096, 4099] {
            let data = noise(len, len as u32 + 1);
            for stride in [2, 4] {
                let planes = shuffle(&data, stride);
                assert_eq!(unshuffle(&planes, stride), data, "len {len} stride {stride}");
            }
        }
        assert_eq!(shuffle(&[1, 2, 3, 4, 5, 6, 7], 2), [1, 3, 5, 2, 4, 6, 7]);
        assert_eq!(shuffle(&[1, 2, 3, 4, 5, 6, 7, 8, 9], 4), [1, 5, 2, 6, 3, 7, 4, 8, 9]);
    }

    #[test]
    fn each_chunk_gets_the_encoding_that_pays() {
        let weights = bf16(CHUNK);
        let frame = encode(&weights, Compression::Planes).unwrap();
        assert_eq!(frame.last(), Some(&2), "bf16 weights compress best as two byte planes");
        assert!(frame.len() < weights.len() * 3 / 4);
        assert_eq!(decode(frame, CHUNK).unwrap(), weights);

        let weights = f32s(CHUNK);
        let frame = encode(&weights, Compression::Planes).unwrap();
        assert_eq!(frame.last(), Some(&4), "f32 weights compress best as four byte planes");
        assert_eq!(decode(frame, CHUNK).unwrap(), weights);

        let random = noise(CHUNK, 3);
        let frame = encode(&random, Compression::Planes).unwrap();
        assert_eq!(frame.last(), Some(&STORED), "noise is stored as it is");
        assert_eq!(frame.len(), CHUNK + 1);
        assert_eq!(decode(frame, CHUNK).unwrap(), random);

        let text: Vec<u8> = (0..CHUNK).map(|i| b"safetensors header "[i % 19]).collect();
        let frame = encode(&text, Compression::Planes).unwrap();
        assert_eq!(frame.last(), Some(&1));
        assert_eq!(decode(frame, CHUNK).unwrap(), text);

        assert_eq!(decode(encode(&[], Compression::Planes).unwrap(), 0).unwrap(), Vec::<u8>::new());
        assert!(decode(vec![1, 2, 3, 9], 3).unwrap_err().contains("unknown encoding 9"));
        assert!(decode(vec![1, 2, 3, STORED], 4).unwrap_err().contains("holds 3 bytes, expected 4"));
        assert!(decode(Vec::new(), 0).unwrap_err().contains("empty"));
    }

    /// A blob written by the first format (XChaCha20-Poly1305, zstd chunks) under the master key
    /// 0x11 × 32: two chunks of the bytes 0, 1, …, 250, 0, 1, …
    #[test]
    fn blobs_of_the_first_format_still_read() {
        let key = MasterKey::from_bytes([0x11; 32]);
        let stored = include_bytes!("testdata/v1.blob");
        let expected: Vec<u8> = (0..CHUNK + 1000).map(|i| (i % 251) as u8).collect();
        let blob = BlobFile::open(&key, io::Cursor::new(&stored[..]), "v1").unwrap();
        assert_eq!((blob.size, blob.chunks()), (expected.len() as u64, 2));
        let mut out = Vec::new();
        blob.range(0, u64::MAX).read_to_end(&mut out).unwrap();
        assert_eq!(out, expected);

        let mut altered = stored.to_vec();
        altered[HEADER_LEN + 10] ^= 1;
        let mut blob = BlobFile::open(&key, io::Cursor::new(&altered[..]), "v1").unwrap();
        let error = blob.chunk(0).unwrap_err().to_string();
        assert!(error.contains("chunk 0 does not authenticate"), "{error}");
    }

    #[test]
    fn new_blobs_are_the_second_format_and_round_trip() {
        let key = MasterKey::from_bytes([0x22; 32]);
        let mut data = bf16(2 * CHUNK);
        data.extend(noise(CHUNK / 2, 5));
        let mut stored = Vec::new();
        let written = write_blob(&key, &data[..], &mut stored, u64::MAX, Compression::Planes).unwrap();
        assert_eq!(&stored[..8], MAGIC);
        assert_eq!((written.size, written.hash), (data.len() as u64, *blake3::hash(&data).as_bytes()));
        assert!(written.stored < data.len() as u64 * 9 / 10, "stored {} of {}", written.stored, data.len());
        let blob = BlobFile::open(&key, io::Cursor::new(&stored[..]), "v2").unwrap();
        let mut out = Vec::new();
        blob.range(0, u64::MAX).read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
        let other = MasterKey::from_bytes([0x23; 32]);
        let error = BlobFile::open(&other, io::Cursor::new(&stored[..]), "v2").err().unwrap().to_string();
        assert!(error.contains("another node's key"), "{error}");
    }
}
