//! The audit log: every mutating operation of the node, appended to a hash chain in RocksDB.
//!
//! Each entry carries its sequence number, time, actor (an address, a token id or `cli:<user>`),
//! action, object and request id, the hash of the entry before it and its own hash over all of
//! that. Rewriting, removing or reordering any entry breaks the chain from there on, and
//! [`verify`] names the first broken link. Appends are serialised per database, whichever
//! handle makes them, and an entry can be written in the same batch as the change it records
//! ([`Audit::stage`]), so a change is never stored without its entry nor its entry without it.
//! The log is only ever appended to.

use std::sync::MutexGuard;

use serde::Serialize;

use crate::store::{
    Batch, Store, StoreError,
    tables::{AuditEntry, AuditLog},
};

const DOMAIN: &[u8] = b"agora audit v1";

/// One entry as the API and CLI show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct EntryView {
    pub seq: u64,
    /// Unix milliseconds.
    pub time: u64,
    pub actor: String,
    pub action: String,
    pub object: String,
    pub request_id: Option<String>,
    /// Hash of the previous entry, hex (zeros for the first).
    pub prev: String,
    pub hash: String,
}

/// What verification found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub entries: u64,
    /// `None` when every link holds.
    pub first_broken: Option<Broken>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Broken {
    pub seq: u64,
    pub reason: String,
}

/// The appending handle; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    store: Store,
}

/// What one entry says.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    pub actor: &'a str,
    pub action: &'a str,
    pub object: &'a str,
    pub request_id: Option<&'a str>,
}

/// Entries staged in a batch: no other entry is appended while this is held, so write the batch
/// before dropping it.
pub struct Staged<'a> {
    _appends: MutexGuard<'a, ()>,
    pub entries: Vec<EntryView>,
}

impl Audit {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Appends an entry and returns it.
    pub fn record(
        &self,
        actor: &str,
        action: &str,
        object: &str,
        request_id: Option<&str>,
    ) -> Result<EntryView, StoreError> {
        self.commit(self.store.batch(), Entry { actor, action, object, request_id })
    }

    /// Writes `batch` with `entry` appended to the log: the change and its entry are stored
    /// together, or neither.
    pub fn commit(&self, mut batch: Batch<'_>, entry: Entry<'_>) -> Result<EntryView, StoreError> {
        let mut staged = self.stage(&mut batch, &[entry])?;
        self.store.write(batch)?;
        Ok(staged.entries.remove(0))
    }

    /// Puts `entries` into `batch`, chained after the log's last entry, so they are appended
    /// with whatever else the batch holds, or not at all. Write the batch before dropping what
    /// this returns.
    pub fn stage(&self, batch: &mut Batch<'_>, entries: &[Entry<'_>]) -> Result<Staged<'_>, StoreError> {
        let appends = self.store.audit_appends().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let last = self.store.scan::<AuditLog>(&[], None, true).next().transpose()?;
        let (mut seq, mut prev) = match last {
            Some((_, entry)) => (entry.seq + 1, entry.hash),
            None => (0, [0; 32]),
        };
        let time = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut views = Vec::with_capacity(entries.len());
        for e in entries {
            let mut entry = AuditEntry {
                seq,
                time,
                actor: e.actor.to_owned(),
                action: e.action.to_owned(),
                object: e.object.to_owned(),
                request_id: e.request_id.map(str::to_owned),
                prev,
                hash: [0; 32],
            };
            entry.hash = entry_hash(&entry);
            batch.put::<AuditLog>(&seq, &entry)?;
            views.push(view(&entry));
            (seq, prev) = (seq + 1, entry.hash);
        }
        Ok(Staged { _appends: appends, entries: views })
    }
}

/// The hash of an entry: every field but the hash itself, each length-framed.
fn entry_hash(entry: &AuditEntry) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(DOMAIN);
    hasher.update(&entry.seq.to_le_bytes());
    hasher.update(&entry.time.to_le_bytes());
    for field in [&entry.actor, &entry.action, &entry.object] {
        hasher.update(&(field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    match &entry.request_id {
        Some(id) => {
            hasher.update(&[1]);
            hasher.update(&(id.len() as u64).to_le_bytes());
            hasher.update(id.as_bytes());
        }
        None => {
            hasher.update(&[0]);
        }
    }
    hasher.update(&entry.prev);
    *hasher.finalize().as_bytes()
}

fn view(entry: &AuditEntry) -> EntryView {
    EntryView {
        seq: entry.seq,
        time: entry.time,
        actor: entry.actor.clone(),
        action: entry.action.clone(),
        object: entry.object.clone(),
        request_id: entry.request_id.clone(),
        prev: crate::artifacts::hex(&entry.prev),
        hash: crate::artifacts::hex(&entry.hash),
    }
}

/// Up to `limit` entries from sequence number `from` on.
pub fn list(store: &Store, from: u64, limit: usize) -> Result<Vec<EntryView>, StoreError> {
    store
        .scan::<AuditLog>(&[], Some(&from.to_be_bytes()), false)
        .take(limit)
        .map(|item| item.map(|(_, entry)| view(&entry)))
        .collect()
}

/// Recomputes the chain from the first entry and reports the first link that does not hold.
pub fn verify(store: &Store) -> Result<VerifyReport, StoreError> {
    let mut expected_seq = 0u64;
    let mut prev = [0u8; 32];
    for item in store.scan::<AuditLog>(&[], None, false) {
        let (key, entry) = item?;
        let broken = |reason: String| VerifyReport {
            entries: expected_seq,
            first_broken: Some(Broken { seq: expected_seq, reason }),
        };
        if key != expected_seq.to_be_bytes() || entry.seq != expected_seq {
            return Ok(broken(format!("entry {expected_seq} is missing (found {} next)", entry.seq)));
        }
        if entry.prev != prev {
            return Ok(broken("its previous-hash does not match the entry before it".into()));
        }
        if entry_hash(&entry) != entry.hash {
            return Ok(broken("its content does not match its hash (rewritten)".into()));
        }
        prev = entry.hash;
        expected_seq += 1;
    }
    Ok(VerifyReport { entries: expected_seq, first_broken: None })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, Store, Audit) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let audit = Audit::new(store.clone());
        (dir, store, audit)
    }

    #[test]
    fn appends_chain_and_verify() {
        let (_dir, store, audit) = log();
        let first = audit.record("cli:root", "artifacts.gc", "0 blobs", None).unwrap();
        let second = audit.record("0xabc", "registry.create", "model demo", Some("req-1")).unwrap();
        assert_eq!((first.seq, second.seq), (0, 1));
        assert_eq!(first.prev, "0".repeat(64));
        assert_eq!(second.prev, first.hash);
        assert_eq!(list(&store, 1, 10).unwrap(), vec![second.clone()]);
        assert_eq!(list(&store, 0, 1).unwrap(), vec![first]);
        assert_eq!(verify(&store).unwrap(), VerifyReport { entries: 2, first_broken: None });
    }

    #[test]
    fn appends_through_separate_handles_are_all_kept() {
        // the API, the registry and the deployments each make their own handle on one store
        let (_dir, store, _) = log();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let audit = Audit::new(store.clone());
                std::thread::spawn(move || {
                    for i in 0..50 {
                        audit.record("cli", "test", &format!("object {t}/{i}"), None).unwrap();
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(verify(&store).unwrap(), VerifyReport { entries: 400, first_broken: None });
    }

    #[test]
    fn rewriting_or_removing_an_entry_is_found() {
        let (_dir, store, audit) = log();
        for i in 0..5 {
            audit.record("cli", "test", &format!("object {i}"), None).unwrap();
        }
        let mut entry = store.get::<AuditLog>(&2).unwrap().unwrap();
        entry.object = "something else".into();
        store.put::<AuditLog>(&2, &entry).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(report.first_broken.as_ref().map(|b| b.seq), Some(2), "{report:?}");
        assert!(report.first_broken.unwrap().reason.contains("rewritten"));

        // rewritten with a fresh hash: the next link breaks instead
        entry.hash = entry_hash(&entry);
        store.put::<AuditLog>(&2, &entry).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(report.first_broken.map(|b| b.seq), Some(3));

        let mut batch = store.batch();
        batch.delete::<AuditLog>(&1);
        store.write(batch).unwrap();
        let report = verify(&store).unwrap();
        assert_eq!(report.first_broken.as_ref().map(|b| b.seq), Some(1));
        assert!(report.first_broken.unwrap().reason.contains("missing"));
    }
}
