use std::io::{Read, Seek, SeekFrom, Write};

use super::{format::CHUNK, *};

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    artifacts: ArtifactStore,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("db")).unwrap();
    let key = load_or_create_key(&dir.path().join("artifacts.key")).unwrap();
    let root = dir.path().join("artifacts");
    let artifacts = ArtifactStore::open(&root, key, store).unwrap();
    Fixture { _dir: dir, root, artifacts }
}

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

#[test]
fn round_trips_and_reads_any_range() {
    let f = fixture();
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
    let stored = fs::read(f.artifacts.object_path(&hash)).unwrap();
    assert!(!stored.windows(64).any(|w| w == &data[..64]), "the blob is encrypted");

    let empty = f.artifacts.put(&b""[..], u64::MAX).unwrap();
    assert_eq!(empty.size, 0);
    assert!(read_all(&f.artifacts, &hash_of(b""), 0, u64::MAX).is_empty());
    let exact = content(2 * CHUNK, 2);
    f.artifacts.put(&exact[..], u64::MAX).unwrap();
    assert_eq!(read_all(&f.artifacts, &hash_of(&exact), 0, u64::MAX), exact);
}

#[test]
fn duplicates_are_stored_once_and_collected_when_released() {
    let f = fixture();
    let data = content(CHUNK + 10, 3);
    let hash = hash_of(&data);
    f.artifacts.put(&data[..], u64::MAX).unwrap();
    let second = f.artifacts.put(&data[..], u64::MAX).unwrap();
    assert_eq!(second.refs, 2);
    let objects: usize = fs::read_dir(f.root.join("objects"))
        .unwrap()
        .map(|d| fs::read_dir(d.unwrap().path()).unwrap().count())
        .sum();
    assert_eq!(objects, 1, "one file for both");
    f.artifacts.release(&hash).unwrap();
    assert_eq!(f.artifacts.gc().unwrap(), GcReport::default(), "still referenced");
    assert_eq!(read_all(&f.artifacts, &hash, 0, 10), &data[..10]);
    f.artifacts.release(&hash).unwrap();
    let report = f.artifacts.gc().unwrap();
    assert_eq!((report.blobs, report.partial_files), (1, 0));
    assert!(report.bytes > 0);
    assert!(f.artifacts.info(&hash).unwrap().is_none());
    assert!(matches!(f.artifacts.read_range(&hash, 0, 1), Err(ArtifactError::NotFound(_))));
    assert!(!f.artifacts.object_path(&hash).exists());
}

#[test]
fn tampering_and_truncation_are_detected_and_reported() {
    let f = fixture();
    let data = content(3 * CHUNK, 4);
    let hash = hash_of(&data);
    f.artifacts.put(&data[..], u64::MAX).unwrap();
    let path = f.artifacts.object_path(&hash);
    let original = fs::read(&path).unwrap();

    // one bit of chunk 1 flipped: chunk 0 still reads, chunk 1 is refused by name
    let blob = format::BlobFile::open(&f.artifacts.key, File::open(&path).unwrap(), "x").unwrap();
    let chunk1 = blob_offset(&original, 1);
    drop(blob);
    let mut file = OpenOptions::new().write(true).open(&path).unwrap();
    file.seek(SeekFrom::Start(chunk1 + 100)).unwrap();
    file.write_all(&[original[chunk1 as usize + 100] ^ 1]).unwrap();
    drop(file);
    assert_eq!(read_all(&f.artifacts, &hash, 0, 100), &data[..100]);
    let mut out = Vec::new();
    let error = f.artifacts.read_range(&hash, 0, u64::MAX).unwrap().read_to_end(&mut out).unwrap_err();
    assert!(error.to_string().contains("chunk 1 does not authenticate"), "{error}");

    // truncated: the footer is gone
    fs::write(&path, &original[..original.len() - 30]).unwrap();
    let error = f.artifacts.read_range(&hash, 0, 1).err().unwrap();
    assert!(matches!(error, ArtifactError::Corrupt { .. }), "{error}");
    // chunks 1 and 2 swapped, frames intact: chunk 1's slot holds chunk 2's ciphertext
    let (c1, c2, c3) = [1, 2, 3].map(|i| blob_offset(&original, i) as usize).into();
    let swapped = [&original[..c1], &original[c2..c3], &original[c1..c2], &original[c3..]].concat();
    fs::write(&path, &swapped).unwrap();
    let mut out = Vec::new();
    let error = f
        .artifacts
        .read_range(&hash, CHUNK as u64, 2 * CHUNK as u64)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap_err();
    assert!(error.to_string().contains("chunk 1"), "{error}");
    // another node's key opens nothing
    fs::write(&path, &original).unwrap();
    let other = format::BlobFile::open(&MasterKey::from_bytes([9; 32]), File::open(&path).unwrap(), "x");
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

#[test]
fn failed_and_crashed_writes_leave_nothing_visible() {
    let mut f = fixture();
    let error = f.artifacts.put(Failing { good: 3 * CHUNK + 5 }, u64::MAX).unwrap_err();
    assert!(matches!(error, ArtifactError::Io(_)), "{error}");
    let error = f.artifacts.put(&content(2 * CHUNK, 5)[..], CHUNK as u64).unwrap_err();
    assert!(matches!(error, ArtifactError::TooLarge { .. }), "{error}");
    assert_eq!(fs::read_dir(f.root.join("partial")).unwrap().count(), 0, "failed writes clean up");
    assert_eq!(fs::read_dir(f.root.join("objects")).unwrap().count(), 0);
    assert_eq!(f.artifacts.store.scan::<Blobs>(&[], None, false).count(), 0, "nothing recorded");

    // a crash mid-write leaves a partial file; a crash after the rename an unrecorded blob
    fs::write(f.root.join("partial").join("1-crashed.partial"), b"half a blob").unwrap();
    let orphan = f.artifacts.object_path(&[0xab; 32]);
    fs::create_dir_all(orphan.parent().unwrap()).unwrap();
    fs::write(&orphan, b"renamed, never recorded").unwrap();
    let report = f.artifacts.gc().unwrap();
    assert_eq!((report.blobs, report.partial_files), (1, 0), "a recent partial may be a live write");
    assert!(!orphan.exists());
    f.artifacts.partial_grace = Duration::ZERO;
    assert_eq!(f.artifacts.gc().unwrap().partial_files, 1);
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
    format::write_blob(&key, &data[..], &mut blob, u64::MAX).unwrap();
    let opened = format::BlobFile::open(&again, io::Cursor::new(&blob), "x").unwrap();
    let mut out = Vec::new();
    opened.range(0, u64::MAX).read_to_end(&mut out).unwrap();
    assert_eq!(out, data, "the reloaded key opens what the first wrote");
    fs::write(&path, "not a key").unwrap();
    let error = load_or_create_key(&path).unwrap_err();
    assert!(error.to_string().contains("is not 64 hex characters"), "{error}");
    assert_eq!(format!("{key:?}"), "MasterKey(***)");
}
