//! Writes to the index that can be undone: every write of a block records the key's previous
//! value in the block's undo record and updates the state root, and all of a range's writes,
//! undo records, block hashes, root and cursor go to RocksDB in one atomic batch.

use std::collections::hash_map::Entry;

use rustc_hash::FxHashMap;

use alloy::primitives::B256;

use super::root::{LANES, LaneCache, Lanes, StateRoot};
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
    /// Its value now, once the batch has written it (`None`: as before).
    written: Option<Option<Vec<u8>>>,
    /// The last block (by the writer's count) whose undo record holds the record.
    undo_block: u64,
}

impl Slot {
    fn now(&self) -> Option<&[u8]> {
        match &self.written {
            Some(now) => now.as_deref(),
            None => self.before.as_deref(),
        }
    }

    fn changed(&self) -> bool {
        self.written.as_ref().is_some_and(|now| *now != self.before)
    }
}

/// One table's touched records, by encoded key. (Fx hashing: these maps see every write of a
/// backfill, and SipHash's DoS resistance buys nothing for keys the node derives itself.)
type Touched = FxHashMap<Vec<u8>, Slot>;
type SlotEntry<'a> = std::collections::hash_map::OccupiedEntry<'a, Vec<u8>, Slot>;

/// Whether a record's slot may be filled without reading the store.
enum Stored {
    /// The store may hold the record: read it on first touch.
    Maybe,
    /// The store cannot hold it (the caller knows why): no read.
    Absent,
}

/// The batch's slot of a record (one map lookup), read from the store on first touch unless
/// the caller knows it is absent there.
fn slot<'t>(
    store: &Store,
    touched: &'t mut [Touched],
    table: usize,
    key: Vec<u8>,
    stored: Stored,
) -> Result<SlotEntry<'t>, StoreError> {
    Ok(match touched[table].entry(key) {
        Entry::Occupied(slot) => slot,
        Entry::Vacant(vacant) => {
            let before = match stored {
                Stored::Maybe => store.get_raw(tables::NAMES[table], vacant.key())?,
                Stored::Absent => None,
            };
            vacant.insert_entry(Slot { before, written: None, undo_block: 0 })
        }
    })
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
    /// Lanes of rewritten records, kept across batches by the writer's owner.
    lanes: Option<&'s mut LaneCache>,
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
            lanes: None,
        })
    }

    /// Takes the lanes of rewritten records from `lanes`, and leaves this batch's there, for
    /// the root (see [`LaneCache`]).
    pub fn with_lanes(mut self, lanes: &'s mut LaneCache) -> Self {
        self.lanes = Some(lanes);
        self
    }

    /// A record as the batch has it. A record read from the store is kept with the batch, so
    /// that the write that usually follows (read, change, write back) does not read it again.
    pub fn get<T: Table>(&mut self, key: &T::Key) -> Result<Option<T::Value>, StoreError> {
        let slot = slot(self.store, &mut self.touched, T::INDEX, T::encode_key(key), Stored::Maybe)?;
        slot.get().now().map(decode::<T>).transpose()
    }

    pub fn put<T: Table>(&mut self, key: &T::Key, value: &T::Value) -> Result<(), StoreError> {
        let new = Some(encode::<T>(value)?);
        self.write_raw(T::INDEX, T::encode_key(key), new, Stored::Maybe, true).map(drop)
    }

    /// Writes a record and says whether there was none before: an event that creates a record
    /// learns whether the index already had it with the same lookup.
    pub fn create<T: Table>(&mut self, key: &T::Key, value: &T::Value) -> Result<bool, StoreError> {
        let new = Some(encode::<T>(value)?);
        self.write_raw(T::INDEX, T::encode_key(key), new, Stored::Maybe, true)
    }

    /// Writes a record the store cannot hold yet, without looking for it there: a lookup entry
    /// derived from a record that [`create`](Self::create) found absent (both are written, and
    /// unwound, together).
    pub fn put_absent<T: Table>(&mut self, key: &T::Key, value: &T::Value) -> Result<(), StoreError> {
        let new = Some(encode::<T>(value)?);
        self.write_raw(T::INDEX, T::encode_key(key), new, Stored::Absent, true).map(drop)
    }

    /// Changes a record that exists, in one lookup: `f`'s answer, or `None` when there is no
    /// record (nothing is written then).
    pub fn update<T: Table, R>(
        &mut self,
        key: &T::Key,
        f: impl FnOnce(&mut T::Value) -> R,
    ) -> Result<Option<R>, StoreError> {
        self.modify::<T, R>(key, |value| {
            value.map(|mut value| {
                let answer = f(&mut value);
                (value, answer)
            })
        })
    }

    /// Changes a record, starting from its default when there is none, in one lookup.
    pub fn upsert<T: Table>(&mut self, key: &T::Key, f: impl FnOnce(&mut T::Value)) -> Result<(), StoreError>
    where
        T::Value: Default,
    {
        let changed = self.modify::<T, ()>(key, |value| {
            let mut value = value.unwrap_or_default();
            f(&mut value);
            Some((value, ()))
        });
        changed.map(drop)
    }

    pub fn delete<T: Table>(&mut self, key: &T::Key) -> Result<(), StoreError> {
        self.write_raw(T::INDEX, T::encode_key(key), None, Stored::Maybe, true).map(drop)
    }

    /// Reads a record and writes what `f` makes of it (nothing when `f` says `None`), in one
    /// lookup.
    fn modify<T: Table, R>(
        &mut self,
        key: &T::Key,
        f: impl FnOnce(Option<T::Value>) -> Option<(T::Value, R)>,
    ) -> Result<Option<R>, StoreError> {
        let entry = slot(self.store, &mut self.touched, T::INDEX, T::encode_key(key), Stored::Maybe)?;
        let Some((value, answer)) = f(entry.get().now().map(decode::<T>).transpose()?) else {
            return Ok(None);
        };
        Self::set(entry, T::NAME, Some(encode::<T>(&value)?), self.undo.as_mut(), self.blocks);
        Ok(Some(answer))
    }

    /// Sets a slot's record to `new`; the first change in a block puts the record's value
    /// before the block in the block's undo record (`undo`, when the block keeps one).
    fn set(
        mut entry: SlotEntry<'_>,
        table: &'static str,
        new: Option<Vec<u8>>,
        undo: Option<&mut Vec<UndoEntry>>,
        block: u64,
    ) {
        if entry.get().now() == new.as_deref() {
            return;
        }
        if let Some(undo) = undo
            && entry.get().undo_block != block
        {
            undo.push(UndoEntry {
                table: table.into(),
                key: entry.key().clone(),
                previous: entry.get().now().map(<[u8]>::to_vec),
            });
            entry.get_mut().undo_block = block;
        }
        entry.get_mut().written = Some(new);
    }

    /// Writes `new` (`None`: deletes) under `key`, and says whether there was no record before.
    fn write_raw(
        &mut self,
        table: usize,
        key: Vec<u8>,
        new: Option<Vec<u8>>,
        stored: Stored,
        record_undo: bool,
    ) -> Result<bool, StoreError> {
        let entry = slot(self.store, &mut self.touched, table, key, stored)?;
        let absent = entry.get().now().is_none();
        let undo = if record_undo { self.undo.as_mut() } else { None };
        Self::set(entry, tables::NAMES[table], new, undo, self.blocks);
        Ok(absent)
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
                Blocks::INDEX,
                Blocks::encode_key(&number),
                Some(encode::<Blocks>(&record)?),
                Stored::Maybe,
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
            let Some(table) = tables::NAMES.iter().position(|name| *name == entry.table) else {
                continue;
            };
            self.write_raw(table, entry.key.clone(), entry.previous.clone(), Stored::Maybe, false)?;
        }
        self.write_raw(Blocks::INDEX, Blocks::encode_key(&number), None, Stored::Maybe, false).map(drop)
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
            self.write_raw(Blocks::INDEX, key, None, Stored::Maybe, false)?;
        }
        Ok(())
    }

    /// The state root with this batch's writes.
    pub fn root(&self) -> StateRoot {
        self.root_with(None)
    }

    /// The state root with this batch's writes, the lanes of rewritten records taken from and
    /// kept in `cache`: the same root as without one.
    fn root_with(&self, mut cache: Option<&mut LaneCache>) -> StateRoot {
        let mut root = self.root.clone();
        for (index, (table, touched)) in tables::NAMES.iter().zip(&self.touched).enumerate() {
            if !tables::in_root(table) {
                continue;
            }
            for (key, slot) in touched.iter().filter(|(_, slot)| slot.changed()) {
                // one box of lanes per record: the value's before the batch, reused for its now
                let mut lanes = None;
                if let Some(before) = &slot.before {
                    let old = match cache.as_deref_mut().and_then(|c| c.take(index, key, before)) {
                        Some(cached) => cached,
                        None => Lanes::of(table, key, before),
                    };
                    root.remove_lanes(&old);
                    lanes = Some(old);
                }
                if let Some(now) = slot.now() {
                    let lanes = match lanes {
                        Some(mut reused) => {
                            reused.fill(table, key, now);
                            reused
                        }
                        None => Lanes::of(table, key, now),
                    };
                    root.add_lanes(&lanes);
                    if let Some(cache) = cache.as_deref_mut()
                        && slot.before.is_some()
                    {
                        cache.keep(index, key, now, lanes);
                    }
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
    pub fn commit(mut self, cursor: Option<Cursor>, reorgs: Option<u64>) -> Result<StateRoot, StoreError> {
        let cache = self.lanes.take();
        let root = self.root_with(cache);
        // each entry costs its key and value and a few bytes of framing
        let size: usize = self
            .touched
            .iter()
            .flat_map(|touched| touched.iter())
            .map(|(key, slot)| key.len() + slot.now().map_or(0, <[u8]>::len) + 16)
            .sum();
        let mut batch = self.store.batch_with_capacity(size + LANES * 2 + 256);
        for (table, touched) in tables::NAMES.iter().zip(&self.touched) {
            let mut writes: Vec<_> = touched.iter().filter(|(_, slot)| slot.changed()).collect();
            writes.sort_unstable_by(|a, b| a.0.cmp(b.0));
            for (key, slot) in writes {
                match slot.now() {
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

#[cfg(test)]
mod tests {
    use alloy::primitives::{Address, U256};

    use super::*;
    use crate::store::tables::{BalanceRecord, Balances, Earnings, HolderLicenses, ModelRecord, Models};

    fn cursor(number: u64) -> Cursor {
        Cursor { number, hash: B256::with_last_byte(number as u8), timestamp: number }
    }

    /// Writes one block: a balance credited twice, a model made and changed, a lookup entry.
    /// `one_lookup` says whether through `upsert`/`create`/`update`/`put_absent` or through
    /// plain reads and writes.
    fn block(w: &mut IndexWriter<'_>, one_lookup: bool, number: u64) {
        let (account, token) = (Address::repeat_byte(3), U256::from(number));
        w.begin_block(true);
        for amount in [5u64, 7] {
            if one_lookup {
                w.upsert::<Balances>(&account, |b| b.royalties += U256::from(amount)).unwrap();
            } else {
                let mut b = w.get::<Balances>(&account).unwrap().unwrap_or_default();
                b.royalties += U256::from(amount);
                w.put::<Balances>(&account, &b).unwrap();
            }
        }
        let record = ModelRecord { owner: account, version_count: 1, ..ModelRecord::default() };
        if one_lookup {
            assert!(w.create::<Models>(&token, &record).unwrap(), "model {token} is new");
            w.put_absent::<HolderLicenses>(&(account, token), &()).unwrap();
            let owner = w.update::<Models, _>(&token, |m| {
                m.version_count = 2;
                m.owner
            });
            assert_eq!(owner.unwrap(), Some(account));
            let missing = w.update::<Models, _>(&(token + U256::from(1000)), |m| m.version_count = 2);
            assert_eq!(missing.unwrap(), None, "no record, nothing written");
        } else {
            w.put::<Models>(&token, &record).unwrap();
            w.put::<HolderLicenses>(&(account, token), &()).unwrap();
            let mut m = w.get::<Models>(&token).unwrap().unwrap();
            m.version_count = 2;
            w.put::<Models>(&token, &m).unwrap();
        }
        w.end_block(number, cursor(number).hash, cursor(number - 1).hash, number, true).unwrap();
    }

    /// Lanes kept across batches give the root that computing every record's lanes gives: for
    /// records rewritten, deleted and written again, for a record another writer changed in
    /// between (its kept lanes are of a value it no longer has), across generations, and when
    /// unwinding.
    #[test]
    fn kept_lanes_give_the_same_root() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let stores = dirs.each_ref().map(|d| Store::open(d.path()).unwrap());
        let mut cache = LaneCache::new();
        let hot = Address::repeat_byte(1);
        let other = Address::repeat_byte(2);
        for number in 1..=8u64 {
            for (store, cached) in stores.iter().zip([false, true]) {
                let w = IndexWriter::new(store).unwrap();
                let mut w = if cached { w.with_lanes(&mut cache) } else { w };
                w.begin_block(true);
                w.upsert::<Balances>(&hot, |b| b.royalties += U256::from(number)).unwrap();
                match number % 3 {
                    0 => w.delete::<Balances>(&other).unwrap(),
                    _ => w.upsert::<Balances>(&other, |b| b.refunds += U256::from(number)).unwrap(),
                }
                // more rewritten records than a generation holds, every other batch
                if number % 2 == 0 {
                    for i in 0..LaneCache::GENERATION as u64 + 10 {
                        w.upsert::<Earnings>(&(hot, U256::from(i)), |e| *e += U256::from(number)).unwrap();
                    }
                }
                w.end_block(number, cursor(number).hash, cursor(number - 1).hash, number, true).unwrap();
                w.commit(Some(cursor(number)), None).unwrap();
            }
            // a change the cache did not see
            if number == 5 {
                let mut w = IndexWriter::new(&stores[1]).unwrap();
                w.upsert::<Balances>(&hot, |b| b.withdrawn += U256::from(1)).unwrap();
                w.commit(Some(cursor(number)), None).unwrap();
                let mut w = IndexWriter::new(&stores[0]).unwrap();
                w.upsert::<Balances>(&hot, |b| b.withdrawn += U256::from(1)).unwrap();
                w.commit(Some(cursor(number)), None).unwrap();
            }
            assert_eq!(
                load_root(&stores[0]).unwrap(),
                load_root(&stores[1]).unwrap(),
                "after block {number}"
            );
        }
        for number in (6..=8).rev() {
            for (store, cached) in stores.iter().zip([false, true]) {
                let record = store.get::<Blocks>(&number).unwrap().unwrap();
                let w = IndexWriter::new(store).unwrap();
                let mut w = if cached { w.with_lanes(&mut cache) } else { w };
                w.unwind_block(number, &record).unwrap();
                w.commit(Some(cursor(number - 1)), None).unwrap();
            }
            assert_eq!(load_root(&stores[0]).unwrap(), load_root(&stores[1]).unwrap(), "unwound {number}");
        }
    }

    /// The one-lookup writes store the same records, root and undo records as a read followed
    /// by a write, and unwind the same way.
    #[test]
    fn one_lookup_writes_match_reads_then_writes() {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let stores = dirs.each_ref().map(|d| Store::open(d.path()).unwrap());
        for (store, one_lookup) in stores.iter().zip([false, true]) {
            for number in 1..=2 {
                let mut w = IndexWriter::new(store).unwrap();
                block(&mut w, one_lookup, number);
                w.commit(Some(cursor(number)), None).unwrap();
            }
        }
        let [plain, one] = &stores;
        assert_eq!(load_root(plain).unwrap(), load_root(one).unwrap());
        let balance = |s: &Store| s.get::<Balances>(&Address::repeat_byte(3)).unwrap().unwrap();
        let BalanceRecord { royalties, .. } = balance(one);
        assert_eq!(royalties, U256::from(24), "two blocks of 5 + 7");
        assert_eq!(balance(plain).royalties, royalties);
        for store in &stores {
            assert_eq!(store.get::<Models>(&U256::from(2)).unwrap().unwrap().version_count, 2);
            assert!(store.get::<Models>(&U256::from(1002)).unwrap().is_none());
            assert_eq!(
                postcard::to_stdvec(&store.get::<Blocks>(&2).unwrap().unwrap().undo).unwrap(),
                postcard::to_stdvec(&plain.get::<Blocks>(&2).unwrap().unwrap().undo).unwrap(),
                "the same undo record"
            );
        }

        // unwinding block 2 takes both back to where block 1 left them
        let mut after_one = None;
        for store in &stores {
            let record = store.get::<Blocks>(&2).unwrap().unwrap();
            let mut w = IndexWriter::new(store).unwrap();
            w.unwind_block(2, &record).unwrap();
            let root = w.commit(Some(cursor(1)), None).unwrap();
            assert_eq!(*after_one.get_or_insert(root.clone()), root);
            assert_eq!(balance(store).royalties, U256::from(12));
            assert!(store.get::<Models>(&U256::from(2)).unwrap().is_none());
            assert!(
                store.get::<HolderLicenses>(&(Address::repeat_byte(3), U256::from(2))).unwrap().is_none()
            );
        }
    }
}
