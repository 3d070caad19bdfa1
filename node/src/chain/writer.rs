//! Writes to the index that can be undone: every write of a block records the key's previous
//! value in the block's undo record and updates the state root, and all of a range's writes,
//! undo records, block hashes, root and cursor go to RocksDB in one atomic batch.

use rustc_hash::{FxHashMap, FxHashSet};

use alloy::primitives::B256;

use super::root::StateRoot;
use crate::store::{
    Batch, Store, StoreError, decode, encode,
    tables::{self, BlockRecord, Blocks, Cursor, Meta, MetaKey, MetaValue, Table, UndoEntry},
};

/// The index's persistent position: where it is and its root there.
pub fn load_cursor(store: &Store) -> Result<Option<Cursor>, StoreError> {
    Ok(match store.get::<Meta>(&MetaKey::Cursor)? {
        Some(MetaValue::Cursor(cursor)) => Some(cursor),
        _ => None,
    })
}

pub fn load_root(store: &Store) -> Result<StateRoot, StoreError> {
    Ok(match store.get::<Meta>(&MetaKey::RootAccumulator)? {
        Some(MetaValue::Bytes(bytes)) => StateRoot::from_bytes(&bytes).unwrap_or_default(),
        _ => StateRoot::default(),
    })
}

pub fn load_reorgs(store: &Store) -> Result<u64, StoreError> {
    Ok(match store.get::<Meta>(&MetaKey::Reorgs)? {
        Some(MetaValue::Count(n)) => n,
        _ => 0,
    })
}

/// A record's place: its table and encoded key. (Fx hashing: these maps see every write of a
/// backfill, and SipHash's DoS resistance buys nothing for keys the node derives itself.)
type RecordKey = (&'static str, Vec<u8>);

/// A block's undo record in the making, and the keys it already holds.
type BlockUndo = (Vec<UndoEntry>, FxHashSet<RecordKey>);

/// A batch of index writes in progress.
///
/// The state root is updated once per key per batch, at commit (remove the value the key had
/// before the batch, add the one it has after), and a block's undo record holds each key's
/// value before the block once: hot records (the treasury's balance, a popular model's revenue)
/// cost one hash per batch, not one per event.
pub struct IndexWriter<'s> {
    store: &'s Store,
    batch: Batch<'s>,
    /// Each touched key's value now.
    overlay: FxHashMap<RecordKey, Option<Vec<u8>>>,
    /// Each touched key's value before this batch.
    original: FxHashMap<RecordKey, Option<Vec<u8>>>,
    root: StateRoot,
    /// The undo record of the block being applied, when it keeps one, and the keys it holds.
    undo: Option<BlockUndo>,
    events: u64,
}

impl<'s> IndexWriter<'s> {
    pub fn new(store: &'s Store) -> Result<Self, StoreError> {
        Ok(Self {
            store,
            batch: store.batch(),
            overlay: FxHashMap::default(),
            original: FxHashMap::default(),
            root: load_root(store)?,
            undo: None,
            events: 0,
        })
    }

    pub fn get<T: Table>(&self, key: &T::Key) -> Result<Option<T::Value>, StoreError> {
        self.get_raw(T::NAME, &T::encode_key(key))?.map(|bytes| decode::<T>(&bytes)).transpose()
    }

    fn get_raw(&self, table: &'static str, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.overlay.get(&(table, key.to_vec())) {
            Some(pending) => Ok(pending.clone()),
            None => self.store.get_raw(table, key),
        }
    }

    pub fn put<T: Table>(&mut self, key: &T::Key, value: &T::Value) -> Result<(), StoreError> {
        self.write_raw(T::NAME, T::encode_key(key), Some(encode::<T>(value)?), true)
    }

    pub fn delete<T: Table>(&mut self, key: &T::Key) -> Result<(), StoreError> {
        self.write_raw(T::NAME, T::encode_key(key), None, true)
    }

    fn write_raw(
        &mut self,
        table: &'static str,
        key: Vec<u8>,
        new: Option<Vec<u8>>,
        record_undo: bool,
    ) -> Result<(), StoreError> {
        let old = self.get_raw(table, &key)?;
        if old == new {
            return Ok(());
        }
        if tables::in_root(table) {
            self.original.entry((table, key.clone())).or_insert_with(|| old.clone());
        }
        if record_undo
            && let Some((undo, seen)) = self.undo.as_mut()
            && seen.insert((table, key.clone()))
        {
            undo.push(UndoEntry { table: table.to_owned(), key: key.clone(), previous: old });
        }
        match &new {
            Some(bytes) => self.batch.put_raw(table, &key, bytes),
            None => self.batch.delete_raw(table, &key),
        }
        self.overlay.insert((table, key), new);
        Ok(())
    }

    /// Starts a block; its writes are recorded for undo when `keep_undo`.
    pub fn begin_block(&mut self, keep_undo: bool) {
        self.undo = keep_undo.then(Default::default);
    }

    /// Ends a block: stores its hash (and undo record) when `keep` says the block is recent.
    pub fn end_block(
        &mut self,
        number: u64,
        hash: B256,
        parent_hash: B256,
        timestamp: u64,
        keep: bool,
    ) -> Result<(), StoreError> {
        let undo = self.undo.take().map(|(undo, _)| undo).unwrap_or_default();
        if keep {
            let record = BlockRecord { hash, parent_hash, timestamp, undo };
            self.write_raw(
                Blocks::NAME,
                Blocks::encode_key(&number),
                Some(encode::<Blocks>(&record)?),
                false,
            )?;
        }
        Ok(())
    }

    pub fn count_event(&mut self) {
        self.events += 1;
    }

    pub fn events(&self) -> u64 {
        self.events
    }

    /// Reverses a block's writes, newest first.
    pub fn unwind_block(&mut self, number: u64, record: &BlockRecord) -> Result<(), StoreError> {
        for entry in record.undo.iter().rev() {
            let Some(table) = tables::NAMES.iter().copied().find(|name| *name == entry.table) else {
                continue;
            };
            self.write_raw(table, entry.key.clone(), entry.previous.clone(), false)?;
        }
        self.write_raw(Blocks::NAME, Blocks::encode_key(&number), None, false)
    }

    /// Forgets block records at or below `number` (beyond the reorg window).
    pub fn prune_blocks_through(&mut self, number: u64) -> Result<(), StoreError> {
        let doomed: Vec<Vec<u8>> = self
            .store
            .scan::<Blocks>(&[], None, false)
            .map_while(|item| item.ok())
            .map(|(key, _)| key)
            .take_while(|key| key.as_slice() <= number.to_be_bytes().as_slice())
            .collect();
        for key in doomed {
            self.write_raw(Blocks::NAME, key, None, false)?;
        }
        Ok(())
    }

    /// The state root with this batch's writes.
    pub fn root(&self) -> StateRoot {
        let mut root = self.root.clone();
        for (key, before) in &self.original {
            let after = &self.overlay[key];
            if before != after {
                if let Some(before) = before {
                    root.remove(key.0, &key.1, before);
                }
                if let Some(after) = after {
                    root.add(key.0, &key.1, after);
                }
            }
        }
        root
    }

    /// Writes everything, with the new cursor, atomically and durably.
    pub fn commit(mut self, cursor: Option<Cursor>, reorgs: Option<u64>) -> Result<StateRoot, StoreError> {
        let root = self.root();
        self.batch.put::<Meta>(&MetaKey::RootAccumulator, &MetaValue::Bytes(root.to_bytes()))?;
        match cursor {
            Some(cursor) => self.batch.put::<Meta>(&MetaKey::Cursor, &MetaValue::Cursor(cursor))?,
            None => self.batch.delete::<Meta>(&MetaKey::Cursor),
        }
        if let Some(reorgs) = reorgs {
            self.batch.put::<Meta>(&MetaKey::Reorgs, &MetaValue::Count(reorgs))?;
        }
        self.store.write(self.batch)?;
        Ok(root)
    }
}
