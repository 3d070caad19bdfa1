//! RocksDB storage: typed tables (one column family each), big-endian keys so range scans
//! come out ordered, compact values (postcard), and atomic batches across tables.
//!
//! Invariants:
//! - every table is declared once in [`tables`]; opening creates missing column families;
//! - `meta` holds the schema version, checked at open: a database written by another schema
//!   is refused with an error that says how to rebuild it (the chain index is derived data);
//! - `meta` also records which deployment (chain id and contract addresses) the database
//!   indexes, so a node never mixes two chains in one index;
//! - writes that belong together go through one [`Batch`] (one RocksDB `WriteBatch`, WAL on).

pub mod tables;

use std::{path::Path, sync::Arc};

use rocksdb::{ColumnFamilyDescriptor, DB, Options, WriteBatch, WriteOptions};

pub use tables::{Meta, MetaKey, MetaValue, Table};

/// Bumped whenever a table's key or value encoding changes.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {path}: {source}")]
    Open { path: String, source: rocksdb::Error },
    #[error(
        "the database at {path} has schema version {found}, this node needs {expected}; \
         move it away (or delete it) to rebuild the index from the chain"
    )]
    Schema { path: String, found: u32, expected: u32 },
    #[error(
        "the database at {path} indexes deployment {found}, but the node is configured for {expected}; \
         use another --data-dir, or move {path} away to rebuild it"
    )]
    OtherDeployment { path: String, found: String, expected: String },
    #[error("database error: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error("table {table}: cannot decode a stored value: {source}")]
    Decode { table: &'static str, source: postcard::Error },
    #[error("table {table}: cannot encode a value: {source}")]
    Encode { table: &'static str, source: postcard::Error },
}

/// A cheaply cloneable handle to the database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
    path: Arc<str>,
    /// The options of every point read, made once (RocksDB's `get` otherwise builds and frees
    /// a default set for each call).
    read: Arc<rocksdb::ReadOptions>,
    /// Taken by whoever appends to the audit log, from any handle on this database: an entry's
    /// number and previous hash come from the last entry, which no other append may change
    /// before this one is written.
    audit_appends: Arc<std::sync::Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// The most the write-ahead log may hold before RocksDB flushes the tables whose unflushed
/// writes keep its oldest file alive. Without it the limit is four times every table's two
/// memtables (49 × 64 MiB × 2 × 4, about 25 GiB): a table written once and never again pins
/// every later log file, so a node whose writes go mostly to one table (vouchers, index
/// batches) would grow its log towards that, and a restart would replay all of it.
pub const MAX_WAL_BYTES: u64 = 256 << 20;

/// What [`Store::open`] sets beside the defaults (tests shrink both to see them act).
#[derive(Clone, Copy, Debug)]
struct Tuning {
    max_wal_bytes: u64,
    /// Each table's memtable; RocksDB's default (64 MiB) when unset.
    write_buffer: Option<usize>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self { max_wal_bytes: MAX_WAL_BYTES, write_buffer: None }
    }
}

impl Store {
    /// Opens (or creates) the database and checks its schema version.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_tuned(path, Tuning::default())
    }

    fn open_tuned(path: &Path, tuning: Tuning) -> Result<Self, StoreError> {
        let display = path.display().to_string();
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.set_compression_type(rocksdb::DBCompressionType::Lz4);
        options.set_max_total_wal_size(tuning.max_wal_bytes);
        let table = || {
            let mut options = Options::default();
            if let Some(bytes) = tuning.write_buffer {
                options.set_write_buffer_size(bytes);
            }
            options
        };
        let descriptors = tables::NAMES.iter().map(|name| ColumnFamilyDescriptor::new(*name, table()));
        let db = DB::open_cf_descriptors(&options, path, descriptors)
            .map_err(|source| StoreError::Open { path: display.clone(), source })?;
        let store = Self {
            db: Arc::new(db),
            path: display.into(),
            read: Default::default(),
            audit_appends: Default::default(),
        };

        match store.get::<Meta>(&tables::MetaKey::SchemaVersion)? {
            None => store
                .put::<Meta>(&tables::MetaKey::SchemaVersion, &tables::MetaValue::Version(SCHEMA_VERSION))?,
            Some(tables::MetaValue::Version(found)) if found == SCHEMA_VERSION => {}
            Some(tables::MetaValue::Version(found)) => {
                return Err(StoreError::Schema {
                    path: store.path.to_string(),
                    found,
                    expected: SCHEMA_VERSION,
                });
            }
            Some(_) => {
                return Err(StoreError::Schema {
                    path: store.path.to_string(),
                    found: 0,
                    expected: SCHEMA_VERSION,
                });
            }
        }
        store.fill_content_lookup()?;
        Ok(store)
    }

    /// Builds the content-hash lookup of anchored versions for an index written before the
    /// lookup existed (later blocks maintain it as they are applied).
    fn fill_content_lookup(&self) -> Result<(), StoreError> {
        if self.iter::<tables::ContentVersions>().next().is_some() {
            return Ok(());
        }
        let mut batch = self.batch();
        for entry in self.iter::<tables::Versions>() {
            let (key, record) = entry?;
            let token = alloy::primitives::U256::from_be_slice(&key[..32]);
            let version = u32::from_be_bytes(key[32..36].try_into().expect("36-byte version keys"));
            if self.get::<tables::ContentVersions>(&record.content_hash)?.is_none() {
                batch.put::<tables::ContentVersions>(&record.content_hash, &(token, version))?;
            }
        }
        if !batch.is_empty() {
            self.write(batch)?;
        }
        Ok(())
    }

    /// Opens an existing database for reading only, alongside a node that may be writing it.
    pub fn open_read_only(path: &Path) -> Result<Self, StoreError> {
        let display = path.display().to_string();
        let db = DB::open_cf_for_read_only(&Options::default(), path, tables::NAMES.iter().copied(), false)
            .map_err(|source| StoreError::Open { path: display.clone(), source })?;
        Ok(Self {
            db: Arc::new(db),
            path: display.into(),
            read: Default::default(),
            audit_appends: Default::default(),
        })
    }

    /// Records `deployment` (an identifying string) on first use and refuses any other later.
    pub fn bind_deployment(&self, deployment: &str) -> Result<(), StoreError> {
        match self.get::<Meta>(&tables::MetaKey::Deployment)? {
            None => self
                .put::<Meta>(&tables::MetaKey::Deployment, &tables::MetaValue::Text(deployment.to_owned())),
            Some(tables::MetaValue::Text(found)) if found == deployment => Ok(()),
            Some(other) => Err(StoreError::OtherDeployment {
                path: self.path.to_string(),
                found: match other {
                    tables::MetaValue::Text(text) => text,
                    other => format!("{other:?}"),
                },
                expected: deployment.to_owned(),
            }),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("every table's column family is created at open")
    }

    /// The stored bytes of `key` in the table named `table`.
    pub fn get_raw(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_pinned_cf_opt(self.cf(table), key, &self.read)?.map(|b| b.to_vec()))
    }

    /// Iterates the records of `T` whose key starts with `prefix`, in key order (or backwards),
    /// from `start` (inclusive) when given, else from the first (or last) key of the prefix.
    pub fn scan<T: Table>(
        &self,
        prefix: &[u8],
        start: Option<&[u8]>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(Vec<u8>, T::Value), StoreError>> + '_ {
        self.scan_with::<T>(rocksdb::ReadOptions::default(), prefix, start, reverse)
    }

    fn scan_with<T: Table>(
        &self,
        mut options: rocksdb::ReadOptions,
        prefix: &[u8],
        start: Option<&[u8]>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(Vec<u8>, T::Value), StoreError>> + '_ {
        options.set_iterate_lower_bound(prefix.to_vec());
        let mut upper = prefix.to_vec();
        if increment(&mut upper) {
            options.set_iterate_upper_bound(upper);
        }
        let direction = if reverse { rocksdb::Direction::Reverse } else { rocksdb::Direction::Forward };
        let mode = match (start, reverse) {
            (Some(key), _) => rocksdb::IteratorMode::From(key, direction),
            (None, false) => rocksdb::IteratorMode::Start,
            (None, true) => rocksdb::IteratorMode::End,
        };
        self.db.iterator_cf_opt(self.cf(T::NAME), options, mode).map(|item| {
            let (k, v) = item?;
            Ok((k.to_vec(), decode::<T>(&v)?))
        })
    }

    pub fn get<T: Table>(&self, key: &T::Key) -> Result<Option<T::Value>, StoreError> {
        let bytes = self.db.get_pinned_cf_opt(self.cf(T::NAME), T::encode_key(key), &self.read)?;
        bytes.map(|b| decode::<T>(&b)).transpose()
    }

    /// Writes one record, durably (synced). Several related writes belong in a [`Batch`].
    pub fn put<T: Table>(&self, key: &T::Key, value: &T::Value) -> Result<(), StoreError> {
        let mut batch = self.batch();
        batch.put::<T>(key, value)?;
        self.write(batch)
    }

    /// Iterates a whole table in key order.
    pub fn iter<T: Table>(&self) -> impl Iterator<Item = Result<(Vec<u8>, T::Value), StoreError>> + '_ {
        self.scan::<T>(&[], None, false)
    }

    /// A consistent read-only view (a RocksDB snapshot): every read through it sees the same
    /// committed batch, however many batches are written meanwhile.
    pub fn view(&self) -> View<'_> {
        View { store: self, snapshot: self.db.snapshot() }
    }

    pub fn batch(&self) -> Batch<'_> {
        Batch { store: self, inner: WriteBatch::default() }
    }

    /// A batch with room for about `bytes` of keys and values, so a large one is not copied
    /// each time it grows.
    pub fn batch_with_capacity(&self, bytes: usize) -> Batch<'_> {
        Batch { store: self, inner: WriteBatch::with_capacity_bytes(bytes) }
    }

    /// The lock that orders appends to the audit log (see [`crate::audit`]).
    pub(crate) fn audit_appends(&self) -> &std::sync::Mutex<()> {
        &self.audit_appends
    }

    /// Applies a batch atomically across tables, with the WAL synced.
    pub fn write(&self, batch: Batch<'_>) -> Result<(), StoreError> {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        self.db.write_opt(batch.inner, &options)?;
        Ok(())
    }
}

/// Reads from one snapshot of the database.
pub struct View<'a> {
    store: &'a Store,
    snapshot: rocksdb::Snapshot<'a>,
}

impl View<'_> {
    fn options(&self) -> rocksdb::ReadOptions {
        let mut options = rocksdb::ReadOptions::default();
        options.set_snapshot(&self.snapshot);
        options
    }

    pub fn get<T: Table>(&self, key: &T::Key) -> Result<Option<T::Value>, StoreError> {
        let bytes =
            self.store.db.get_pinned_cf_opt(self.store.cf(T::NAME), T::encode_key(key), &self.options())?;
        bytes.map(|b| decode::<T>(&b)).transpose()
    }

    /// As [`Store::scan`], within the snapshot.
    pub fn scan<T: Table>(
        &self,
        prefix: &[u8],
        start: Option<&[u8]>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(Vec<u8>, T::Value), StoreError>> + '_ {
        let options = self.options();
        self.store.scan_with::<T>(options, prefix, start, reverse)
    }
}

/// Writes to apply together (all or nothing).
pub struct Batch<'a> {
    store: &'a Store,
    inner: WriteBatch,
}

impl Batch<'_> {
    pub fn put<T: Table>(&mut self, key: &T::Key, value: &T::Value) -> Result<(), StoreError> {
        let bytes =
            postcard::to_stdvec(value).map_err(|source| StoreError::Encode { table: T::NAME, source })?;
        self.inner.put_cf(self.store.cf(T::NAME), T::encode_key(key), bytes);
        Ok(())
    }

    pub fn delete<T: Table>(&mut self, key: &T::Key) {
        self.inner.delete_cf(self.store.cf(T::NAME), T::encode_key(key));
    }

    pub fn put_raw(&mut self, table: &str, key: &[u8], value: &[u8]) {
        self.inner.put_cf(self.store.cf(table), key, value);
    }

    pub fn delete_raw(&mut self, table: &str, key: &[u8]) {
        self.inner.delete_cf(self.store.cf(table), key);
    }

    pub fn len(&self) -> usize {
        self.inner.len()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.is_empty()
    }
}

/// The smallest byte string greater than every string with prefix `bytes` (false: none exists).
fn increment(bytes: &mut Vec<u8>) -> bool {
    while let Some(last) = bytes.last_mut() {
        if *last < u8::MAX {
            *last += 1;
            return true;
        }
        bytes.pop();
    }
    false
}

pub fn encode<T: Table>(value: &T::Value) -> Result<Vec<u8>, StoreError> {
    // Most records fit the stack buffer and then cost one exact allocation, where growing a
    // vector from empty would reallocate it several times; larger ones are encoded into a vector.
    let mut buffer = [0u8; 512];
    match postcard::to_slice(value, &mut buffer) {
        Ok(bytes) => Ok(bytes.to_vec()),
        Err(postcard::Error::SerializeBufferFull) => postcard::to_stdvec(value),
        Err(e) => Err(e),
    }
    .map_err(|source| StoreError::Encode { table: T::NAME, source })
}

pub fn decode<T: Table>(bytes: &[u8]) -> Result<T::Value, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { table: T::NAME, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::U256;
    use tables::{MetaKey, MetaValue};

    /// The write-ahead log files in `dir` and their total size.
    fn wal_bytes(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    #[test]
    fn the_log_stays_bounded_when_one_table_is_written_and_another_was_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        // scaled down: 1 MiB memtables, a 4 MiB log limit, 48 MiB written
        let tuning = Tuning { max_wal_bytes: 4 << 20, write_buffer: Some(1 << 20) };
        let store = Store::open_tuned(&path, tuning).unwrap();
        store.put::<tables::WebhookCursors>(&"cold".to_owned(), &7).unwrap();
        let value = vec![0xab; 4096];
        let mut largest = 0;
        for n in 0..12_288u64 {
            let mut batch = store.batch();
            batch.put::<tables::UsageVouchers>(&(U256::from(n), U256::from(n)), &value).unwrap();
            store.write(batch).unwrap();
            if n % 1024 == 0 {
                largest = largest.max(wal_bytes(&path));
            }
        }
        // RocksDB's own limit here would be 49 tables × 1 MiB × 2 × 4 = 392 MiB: the cold
        // table's one record would keep every log file of the 48 MiB alive
        assert!(largest <= 8 << 20, "the log reached {largest} bytes");
        drop(store);
        let store = Store::open_tuned(&path, tuning).unwrap();
        assert_eq!(store.get::<tables::WebhookCursors>(&"cold".to_owned()).unwrap(), Some(7));
        let last = (U256::from(12_287), U256::from(12_287));
        assert_eq!(store.get::<tables::UsageVouchers>(&last).unwrap(), Some(value));
    }

    /// Records of any size encode as postcard does, through the stack buffer or past it.
    #[test]
    fn records_small_and_large_encode_as_postcard_does() {
        for len in [0, 10, 500, 511, 512, 513, 5_000] {
            let record = tables::ModelRecord { metadata_uri: "x".repeat(len), ..Default::default() };
            let bytes = encode::<tables::Models>(&record).unwrap();
            assert_eq!(bytes, postcard::to_stdvec(&record).unwrap(), "a {len}-byte URI");
            assert_eq!(decode::<tables::Models>(&bytes).unwrap(), record);
        }
    }

    #[test]
    fn reopen_keeps_data_and_checks_schema() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.bind_deployment("31337:0xabc").unwrap();
        drop(store);

        let store = Store::open(dir.path()).unwrap();
        store.bind_deployment("31337:0xabc").unwrap();
        let err = store.bind_deployment("1:0xdef").unwrap_err();
        assert!(matches!(err, StoreError::OtherDeployment { .. }), "{err}");
        assert!(err.to_string().contains("31337:0xabc"));

        store.put::<Meta>(&MetaKey::SchemaVersion, &MetaValue::Version(SCHEMA_VERSION + 1)).unwrap();
        drop(store);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Schema { found, .. } if found == SCHEMA_VERSION + 1), "{err}");
        assert!(err.to_string().contains("rebuild"), "{err}");
    }

    #[test]
    fn batch_is_atomic_and_ordered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut batch = store.batch();
        batch.put::<Meta>(&MetaKey::Deployment, &MetaValue::Text("x".into())).unwrap();
        batch.delete::<Meta>(&MetaKey::Deployment);
        batch.put::<Meta>(&MetaKey::Deployment, &MetaValue::Text("y".into())).unwrap();
        assert_eq!(batch.len(), 3);
        store.write(batch).unwrap();
        assert_eq!(store.get::<Meta>(&MetaKey::Deployment).unwrap(), Some(MetaValue::Text("y".into())));
        let keys: Vec<Vec<u8>> = store.iter::<Meta>().map(|r| r.unwrap().0).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn unopenable_path_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = Store::open(&file).unwrap_err();
        assert!(err.to_string().contains("not-a-dir"), "{err}");
    }
}
