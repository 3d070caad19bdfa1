use std::io::Read;

use super::{format::CHUNK, *};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    backend: Arc<dyn Backend>,
    artifacts: ArtifactStore,
    _server: Option<s3::Moto>,
}

fn local() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("artifacts");
    let backend: Arc<dyn Backend> = Arc::new(LocalBackend::new(root.join("objects")).unwrap());
    with_backend(dir, root, backend, None)
}

fn with_backend(
    dir: tempfile::TempDir,
    root: PathBuf,
    backend: Arc<dyn Backend>,
    server: Option<s3::Moto>,
) -> Fixture {
    let store = Store::open(&dir.path().join("db")).unwrap();
    let key = load_or_create_key(&dir.path().join("artifacts.key")).unwrap();
    let artifacts = ArtifactStore::with_backend(&root, backend.clone(), key, store).unwrap();
    Fixture { _dir: dir, root, backend, artifacts, _server: server }
}

impl Fixture {
    fn stored(&self, hash: &[u8; 32]) -> Vec<u8> {
        let mut out = Vec::new();
        self.backend.open(&object_name(hash)).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    fn objects(&self) -> usize {
        self.backend.list().unwrap().len()
    }
}

/// Every test runs on the local directory and on S3 (a moto server on loopback).
macro_rules! on_both_backends {
    ($($name:ident),*) => {
        mod local_backend {
            $(#[test] fn $name() { super::$name(super::local()) })*
        }
        mod s3_backend {
            $(#[test] fn $name() { if let Some(f) = super::s3::fixture() { super::$name(f) } })*
        }
    };
}

on_both_backends!(
    round_trips_and_reads_any_range,
    uncompressed_blobs_are_sealed_as_they_are,
    duplicates_are_stored_once_and_collected_when_released,
    tampering_and_truncation_are_detected_and_reported,
    failed_and_crashed_writes_leave_nothing_visible
);

/// Half compressible, half pseudo-random bytes.
fn content(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|i| {
            if (i / 4096) % 2 == 0 {
                (i % 251) as u8
            } else {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            }
        })
        .collect()
}

fn hash_of(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

fn read_all(artifacts: &ArtifactStore, hash: &[u8; 32], start: u64, end: u64) -> Vec<u8> {
    let mut out = Vec::new();
    artifacts.read_range(hash, start, end).unwrap().read_to_end(&mut out).unwrap();
    out
}

fn round_trips_and_reads_any_range(f: Fixture) {
    let data = content(5 * CHUNK + 12_345, 1);
    let info = f.artifacts.put(&data[..], u64::MAX).unwrap();
    let hash = hash_of(&data);
    assert_eq!(info.blake3, hex(&hash));
    assert_eq!((info.size, info.refs), (data.len() as u64, 1));
    assert!(info.stored < data.len() as u64, "the compressible half compresses: {} bytes", info.stored);
    assert_eq!(read_all(&f.artifacts, &hash, 0, u64::MAX), data);
    let c = CHUNK as u64;
    for (start, end) in
        [(0, 1), (c - 1, c + 1), (2 * c, 3 * c), (5 * c, 5 * c + 12_345), (5 * c + 100, u64::MAX), (7, 7)]
    {
        let expected = &data[start as usize..(end as usize).min(data.len())];
        assert_eq!(read_all(&f.artifacts, &hash, start, end), expected, "range {start}..{end}");
    }
    // at rest nothing of the plaintext is visible
    let stored = f.stored(&hash);
    assert!(!stored.windows(64).any(|w| w == &data[..64]), "the blob is encrypted");

    let empty = f.artifacts.put(&b""[..], u64::MAX).unwrap();
    assert_eq!(empty.size, 0);
    assert!(read_all(&f.artifacts, &hash_of(b""), 0, u64::MAX).is_empty());
    // large enough for a multipart upload of several parts on S3
    let big = content(24 * CHUNK + 1, 9);
    f.artifacts.put(&big[..], u64::MAX).unwrap();
    assert_eq!(read_all(&f.artifacts, &hash_of(&big), 0, u64::MAX), big);
    let exact = content(2 * CHUNK, 2);
    f.artifacts.put(&exact[..], u64::MAX).unwrap();
    assert_eq!(read_all(&f.artifacts, &hash_of(&exact), 0, u64::MAX), exact);
}

fn uncompressed_blobs_are_sealed_as_they_are(f: Fixture) {
    let data = content(3 * CHUNK + 777, 4);
    let hash = hash_of(&data);
    let info = f.artifacts.put_with(&data[..], u64::MAX, Compression::None).unwrap();
    assert_eq!((info.blake3.as_str(), info.size), (hex(&hash).as_str(), data.len() as u64));
    // each chunk: its length, its bytes, the encoding byte, the tag; plus header and footer
    let framing = format::HEADER_LEN as u64 + 4 * (4 + 1 + 16) + (16 + 8 * 4 + 16 + 8);
    assert_eq!(info.stored, data.len() as u64 + framing, "nothing compressed, nothing lost");
    assert_eq!(read_all(&f.artifacts, &hash, 0, u64::MAX), data);
    let c = CHUNK as u64;
    assert_eq!(read_all(&f.artifacts, &hash, c - 5, 2 * c + 5), &data[CHUNK - 5..2 * CHUNK + 5]);
    let stored = f.stored(&hash);
    assert!(!stored.windows(64).any(|w| w == &data[..64]), "the blob is still encrypted");
    // the same content put compressed is a second reference to the blob as first stored
    let again = f.artifacts.put(&data[..], u64::MAX).unwrap();
    assert_eq!((again.refs, again.stored), (2, info.stored));
}

fn duplicates_are_stored_once_and_collected_when_released(f: Fixture) {
    let data = content(CHUNK + 10, 3);
    let hash = hash_of(&data);
    f.artifacts.put(&data[..], u64::MAX).unwrap();
    let second = f.artifacts.put(&data[..], u64::MAX).unwrap();
    assert_eq!(second.refs, 2);
    assert_eq!(f.objects(), 1, "one object for both");
    f.artifacts.release(&hash).unwrap();
    assert_eq!(f.artifacts.gc().unwrap(), GcReport::default(), "still referenced");
    assert_eq!(read_all(&f.artifacts, &hash, 0, 10), &data[..10]);
    f.artifacts.release(&hash).unwrap();
    let report = f.artifacts.gc().unwrap();
    assert_eq!((report.blobs, report.partial_files), (1, 0));
    assert!(report.bytes > 0);
    assert!(f.artifacts.info(&hash).unwrap().is_none());
    assert!(matches!(f.artifacts.read_range(&hash, 0, 1), Err(ArtifactError::NotFound(_))));
    assert_eq!(f.objects(), 0);
}

fn tampering_and_truncation_are_detected_and_reported(f: Fixture) {
    let data = content(3 * CHUNK, 4);
    let hash = hash_of(&data);
    f.artifacts.put(&data[..], u64::MAX).unwrap();
    let name = object_name(&hash);
    let original = f.stored(&hash);

    // one bit of chunk 1 flipped: chunk 0 still reads, chunk 1 is refused by name
    let chunk1 = blob_offset(&original, 1) as usize;
    let mut flipped = original.clone();
    flipped[chunk1 + 100] ^= 1;
    f.backend.overwrite(&name, &flipped).unwrap();
    assert_eq!(read_all(&f.artifacts, &hash, 0, 100), &data[..100]);
    let mut out = Vec::new();
    let error = f.artifacts.read_range(&hash, 0, u64::MAX).unwrap().read_to_end(&mut out).unwrap_err();
    assert!(error.to_string().contains("chunk 1 does not authenticate"), "{error}");

    // truncated: the footer is gone
    f.backend.overwrite(&name, &original[..original.len() - 30]).unwrap();
    let error = f.artifacts.read_range(&hash, 0, 1).err().unwrap();
    assert!(matches!(error, ArtifactError::Corrupt { .. }), "{error}");
    // chunks 1 and 2 swapped, frames intact: chunk 1's slot holds chunk 2's ciphertext
    let (c1, c2, c3) = [1, 2, 3].map(|i| blob_offset(&original, i) as usize).into();
    let swapped = [&original[..c1], &original[c2..c3], &original[c1..c2], &original[c3..]].concat();
    f.backend.overwrite(&name, &swapped).unwrap();
    let mut out = Vec::new();
    let error = f
        .artifacts
        .read_range(&hash, CHUNK as u64, 2 * CHUNK as u64)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert!(error.to_string().contains("chunk 1"), "{error}");
    // a chunk altered in a batch that is opened ahead while the one before it is read: the
    // batches before read, then the reader stops at the altered one's batch, naming the chunk
    let data = content(20 * CHUNK, 5);
    let hash = hash_of(&data);
    f.artifacts.put(&data[..], u64::MAX).unwrap();
    let (big_name, big) = (object_name(&hash), f.stored(&hash));
    let mut flipped = big.clone();
    const { assert!(format::BATCH < 13 && 13 < 2 * format::BATCH) };
    flipped[blob_offset(&big, 13) as usize + 100] ^= 1;
    f.backend.overwrite(&big_name, &flipped).unwrap();
    let mut reader = f.artifacts.read_range(&hash, 0, u64::MAX).unwrap();
    let mut out = vec![0u8; format::BATCH * CHUNK];
    reader.read_exact(&mut out).unwrap();
    assert!(out == data[..format::BATCH * CHUNK]);
    let error = reader.read(&mut [0u8; 1]).unwrap_err();
    assert!(error.to_string().contains("chunk 13 does not authenticate"), "{error}");
    f.backend.overwrite(&big_name, &big).unwrap();
    assert!(read_all(&f.artifacts, &hash, 0, u64::MAX) == data);
    // another node's key opens nothing
    f.backend.overwrite(&name, &original).unwrap();
    let other = format::BlobFile::open(&MasterKey::from_bytes([9; 32]), f.backend.open(&name).unwrap(), "x");
    assert!(other.err().unwrap().to_string().contains("footer does not authenticate"));
}

/// Where chunk `index` starts, by walking the length prefixes.
fn blob_offset(blob: &[u8], index: usize) -> u64 {
    let mut at = format::HEADER_LEN;
    for _ in 0..index {
        let len = u32::from_le_bytes(blob[at..at + 4].try_into().unwrap()) as usize;
        at += 4 + len;
    }
    at as u64
}

/// A reader that fails after `good` bytes, like a client that disconnects mid-upload.
struct Failing {
    good: usize,
}

impl Read for Failing {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.good == 0 {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "client went away"));
        }
        let n = out.len().min(self.good);
        out[..n].fill(7);
        self.good -= n;
        Ok(n)
    }
}

fn failed_and_crashed_writes_leave_nothing_visible(mut f: Fixture) {
    let error = f.artifacts.put(Failing { good: 3 * CHUNK + 5 }, u64::MAX).unwrap_err();
    assert!(matches!(error, ArtifactError::Io(_)), "{error}");
    let error = f.artifacts.put(&content(2 * CHUNK, 5)[..], CHUNK as u64).unwrap_err();
    assert!(matches!(error, ArtifactError::TooLarge { .. }), "{error}");
    assert_eq!(fs::read_dir(f.root.join("partial")).unwrap().count(), 0, "failed writes clean up");
    assert_eq!(f.objects(), 0);
    assert_eq!(f.artifacts.store.scan::<Blobs>(&[], None, false).count(), 0, "nothing recorded");

    // a crash mid-write leaves a partial file; a crash after the rename an unrecorded blob
    fs::write(f.root.join("partial").join("1-crashed.partial"), b"half a blob").unwrap();
    f.backend.overwrite(&object_name(&[0xab; 32]), b"published, never recorded").unwrap();
    let report = f.artifacts.gc().unwrap();
    assert_eq!((report.blobs, report.partial_files), (1, 0), "a recent partial may be a live write");
    assert_eq!(f.objects(), 0);
    f.artifacts.partial_grace = Duration::ZERO;
    assert_eq!(f.artifacts.gc().unwrap().partial_files, 1);
}

/// Writers that store and release the same content while collections run: every reference
/// taken is counted, and the blob is never collected while one is held.
#[test]
fn references_and_collection_do_not_race() {
    let f = local();
    let data = content(CHUNK / 2, 7);
    let hash = hash_of(&data);
    let writers = 4;
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let collector = scope.spawn(|| {
            let mut runs = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                f.artifacts.gc().unwrap();
                runs += 1;
            }
            runs
        });
        let handles: Vec<_> = (0..writers)
            .map(|_| {
                scope.spawn(|| {
                    // a failing writer stops the collector too, so the test ends
                    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
                    impl Drop for Stop<'_> {
                        fn drop(&mut self) {
                            if std::thread::panicking() {
                                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                    }
                    let _stop = Stop(&done);
                    f.artifacts.put(&data[..], u64::MAX).unwrap();
                    for _ in 0..40 {
                        f.artifacts.put(&data[..], u64::MAX).unwrap();
                        f.artifacts.acquire(&hash).unwrap();
                        f.artifacts.release(&hash).unwrap();
                        f.artifacts.release(&hash).unwrap();
                        // one reference is held throughout, so the blob must stay readable
                        assert_eq!(read_all(&f.artifacts, &hash, 0, 16), &data[..16]);
                    }
                })
            })
            .collect();
        let joined: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(collector.join().unwrap() > 0);
        assert!(joined.iter().all(Result::is_ok), "a writer failed");
    });
    assert_eq!(f.artifacts.info(&hash).unwrap().unwrap().refs, writers);
    assert_eq!(read_all(&f.artifacts, &hash, 0, u64::MAX), data);
    assert!(matches!(f.artifacts.acquire(&[9; 32]), Err(ArtifactError::NotFound(_))));
}

#[test]
fn the_master_key_is_created_once_private_and_checked() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys/master.key");
    let key = load_or_create_key(&path).unwrap();
    assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let again = load_or_create_key(&path).unwrap();
    let data = content(1000, 6);
    let mut blob = Vec::new();
    format::write_blob(&key, &data[..], &mut blob, u64::MAX, format::Compression::Planes).unwrap();
    let opened = format::BlobFile::open(&again, io::Cursor::new(&blob), "x").unwrap();
    let mut out = Vec::new();
    opened.range(0, u64::MAX).read_to_end(&mut out).unwrap();
    assert_eq!(out, data, "the reloaded key opens what the first wrote");
    fs::write(&path, "not a key").unwrap();
    let error = load_or_create_key(&path).unwrap_err();
    assert!(error.to_string().contains("is not 64 hex characters"), "{error}");
    assert_eq!(format!("{key:?}"), "MasterKey(***)");
}

/// An S3-compatible server for the tests: moto from PyPI (installed by scripts/setup into a
/// virtualenv), on a free loopback port, killed on drop.
mod s3 {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        path::PathBuf,
        process::{Child, Command, Stdio},
        sync::Arc,
        time::{Duration, Instant},
    };

    use object_store::aws::AmazonS3Builder;

    use super::{Fixture, S3Backend, with_backend};

    pub struct Moto(Child);

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn python() -> Option<PathBuf> {
        let venv = std::env::var_os("AGORA_VENV").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/agora/venv")
        });
        let python = venv.join("bin/python");
        if python.is_file() {
            return Some(python);
        }
        let message = format!("\n*** SKIPPED: no moto server at {}; run scripts/setup ***\n", venv.display());
        assert!(std::env::var_os("CI").is_none(), "{message}");
        eprintln!("{message}");
        None
    }

    /// A fixture on a fresh bucket of a fresh moto server.
    pub fn fixture() -> Option<Fixture> {
        let python = python()?;
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new(python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts");
        let server = Moto(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        // create the bucket once the server answers (S3 CreateBucket: PUT /bucket)
        loop {
            if let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) {
                let request = format!(
                    "PUT /agora-test HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                stream.write_all(request.as_bytes()).unwrap();
                let mut answer = String::new();
                let _ = stream.read_to_string(&mut answer);
                assert!(answer.starts_with("HTTP/1.1 200"), "moto did not create the bucket: {answer}");
                break;
            }
            assert!(Instant::now() < deadline, "moto did not start within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        let builder = AmazonS3Builder::new()
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_allow_http(true)
            .with_bucket_name("agora-test")
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test");
        let backend = Arc::new(S3Backend::new(builder, "blobs").unwrap());
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("artifacts");
        Some(with_backend(dir, root, backend, Some(server)))
    }
}
