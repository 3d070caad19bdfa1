//! Writes to the index that can be undone: every write of a block records the key's previous
//! value in the block's undo record and updates the state root, and all of a range's writes,
//! undo records, block hashes, root and cursor go to RocksDB in one atomic batch.

use std::collections::hash_map::Entry;

use rustc_hash::FxHashMap;

use alloy::primitives::B256;

use super::root::{LANES, StateRoot};
use crate::store::{
    Store, StoreError, decode, encode,
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

/// A record touched by the batch.
struct Slot {
    /// Its value before the batch.
    before: Option<Vec<u8>>,
    /// Its value now.
    now: Option<Vec<u8>>,
    /// The last block (by the writer's count) whose undo record holds the record.
    undo_block: u64,
}

/// One table's touched records, by encoded key. (Fx hashing: these maps see every write of a
/// backfill, and SipHash's DoS resistance buys nothing for keys the node derives itself.)
type Touched = FxHashMap<Vec<u8>, Slot>;
type SlotEntry<'a> = std::collections::hash_map::OccupiedEntry<'a, Vec<u8>, Slot>;

fn table_index(table: &str) -> usize {
    tables::NAMES.iter().position(|name| *name == table).expect("a table of the schema")
}

/// A batch of index writes in progress.
///
/// The state root is updated once per key per batch, at commit (remove the value the key had
/// before the batch, add the one it has after), and a block's undo record holds each key's
/// value before the block once: hot records (the treasury's balance, a popular model's revenue)
/// cost one hash per batch, not one per event.
pub struct IndexWriter<'s> {
    store: &'s Store,
    /// The touched records, one map per table in [`tables::NAMES`] order.
    touched: Vec<Touched>,
    root: StateRoot,
    /// The undo record of the block being applied, when it keeps one.
    undo: Option<Vec<UndoEntry>>,
    /// Blocks begun so far, the current one's number in [`Slot::undo_block`].
    blocks: u64,
    events: u64,
}

impl<'s> IndexWriter<'s> {
    pub fn new(store: &'s Store) -> Result<Self, StoreError> {
        Ok(Self {
            store,
            touched: tables::NAMES.iter().map(|_| Touched::default()).collect(),
            root: load_root(store)?,
            undo: None,
            blocks: 0,
            events: 0,
        })
    }

    /// A record as the batch has it. A record read from the store is kept with the batch, so
    /// that the write that usually follows (read, change, write back) does not read it again.
    pub fn get<T: Table>(&mut self, key: &T::Key) -> Result<Option<T::Value>, StoreError> {
        let slot = self.slot(T::NAME, T::encode_key(key))?;
        slot.get().now.as_deref().map(decode::<T>).transpose()
    }

    /// The batch's slot of a record (one map lookup), read from the store on first touch.
    fn slot(&mut self, table: &'static str, key: Vec<u8>) -> Result<SlotEntry<'_>, StoreError> {
        Ok(match self.touched[table_index(table)].entry(key) {
            Entry::Occupied(slot) => slot,
            Entry::Vacant(vacant) => {
                let before = self.store.get_raw(table, vacant.key())?;
                vacant.insert_entry(Slot { now: before.clone(), before, undo_block: 0 })
            }
        })
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
        let blocks = self.blocks;
        let keep_undo = record_undo && self.undo.is_some();
        let mut entry = self.slot(table, key)?;
        if entry.get().now == new {
            return Ok(());
        }
        // the block's undo record holds the record's value before the block, once
        let undo_entry = (keep_undo && entry.get().undo_block != blocks).then(|| UndoEntry {
            table: table.into(),
            key: entry.key().clone(),
            previous: entry.get().now.clone(),
        });
        let slot = entry.get_mut();
        if undo_entry.is_some() {
            slot.undo_block = blocks;
        }
        slot.now = new;
        if let (Some(undo_entry), Some(undo)) = (undo_entry, self.undo.as_mut()) {
            undo.push(undo_entry);
        }
        Ok(())
    }

    /// Starts a block; its writes are recorded for undo when `keep_undo`.
    pub fn begin_block(&mut self, keep_undo: bool) {
        self.blocks += 1;
        self.undo = keep_undo.then(Vec::new);
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
        let undo = self.undo.take().unwrap_or_default();
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
        for (table, touched) in tables::NAMES.iter().zip(&self.touched) {
            if !tables::in_root(table) {
                continue;
            }
            for (key, slot) in touched.iter().filter(|(_, slot)| slot.before != slot.now) {
                if let Some(before) = &slot.before {
                    root.remove(table, key, before);
                }
                if let Some(now) = &slot.now {
                    root.add(table, key, now);
                }
            }
        }
        root
    }

    /// Writes everything, with the new cursor, atomically and durably.
    ///
    /// The batch holds each touched key once, with its final value, in key order: a hot record
    /// rewritten by every event of a range costs one memtable entry, and sorted inserts are the
    /// cheap case of RocksDB's skip list.
    pub fn commit(self, cursor: Option<Cursor>, reorgs: Option<u64>) -> Result<StateRoot, StoreError> {
        let root = self.root();
        // each entry costs its key and value and a few bytes of framing
        let size: usize = self
            .touched
            .iter()
            .flat_map(|touched| touched.iter())
            .map(|(key, slot)| key.len() + slot.now.as_ref().map_or(0, Vec::len) + 16)
            .sum();
        let mut batch = self.store.batch_with_capacity(size + LANES * 2 + 256);
        for (table, touched) in tables::NAMES.iter().zip(&self.touched) {
            let mut writes: Vec<_> = touched.iter().filter(|(_, slot)| slot.before != slot.now).collect();
            writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, slot) in writes {
                match &slot.now {
                    Some(bytes) => batch.put_raw(table, key, bytes),
                    None => batch.delete_raw(table, key),
                }
            }
        }
        batch.put::<Meta>(&MetaKey::RootAccumulator, &MetaValue::Bytes(root.to_bytes()))?;
        match cursor {
            Some(cursor) => batch.put::<Meta>(&MetaKey::Cursor, &MetaValue::Cursor(cursor))?,
            None => batch.delete::<Meta>(&MetaKey::Cursor),
        }
        if let Some(reorgs) = reorgs {
            batch.put::<Meta>(&MetaKey::Reorgs, &MetaValue::Count(reorgs))?;
        }
        self.store.write(batch)?;
        Ok(root)
    }
}
