//! Metering usage licenses with buyer-signed vouchers.
//!
//! A voucher is the contract's EIP-712 `Voucher(licenseId, cumulativeUnits)` signed by the
//! license's holder. A call that costs `c` units passes only with a voucher for exactly the last
//! accepted count plus `c`, within the escrow (`cumulative × unit price ≤ deposited`, per the
//! index) of an open license. Calls on one license are serialised, and the accepted voucher is
//! written (synced) before the answer leaves, so no unit is lost or counted twice, and the
//! latest voucher is what settlement submits on-chain.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use agora_contracts::{TermKind, order_domain};
use alloy::{
    primitives::{Address, B256, U256, keccak256},
    sol_types::SolStruct,
};
use serde::{Deserialize, Serialize};

use crate::signers::{SignerError, Signers};
use crate::store::{
    Store, StoreError,
    tables::{Licenses, ReceiptRecord, UsageReceipts, UsageRecord, UsageRecords, UsageVouchers},
};

alloy::sol! {
    /// What a buyer signs for each call (the contract's `Voucher`).
    struct Voucher {
        uint256 licenseId;
        uint256 cumulativeUnits;
    }
}

/// The `Agora-Voucher` header, base64 of this JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoucherJson {
    pub license_id: String,
    pub cumulative_units: String,
    /// 0x-hex, 65 bytes.
    pub signature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum MeterError {
    /// 402: the call is not paid; `required` is the count a voucher must carry.
    #[error("{reason}")]
    Unpaid { reason: String, required: Option<U256> },
    /// 409: a voucher already used, or older than the last accepted.
    #[error("voucher for {cumulative} units is replayed or stale; the last accepted count is {last}")]
    Stale { cumulative: U256, last: U256 },
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Invalid(String),
    /// 503: the holder may be a contract wallet, and the chain cannot be asked now.
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A voucher checked against everything but the call's success.
pub struct Accepted {
    pub license_id: U256,
    pub cumulative: U256,
    record: UsageRecord,
}

/// Serialises the calls on each license and makes their vouchers durable.
///
/// A call holds its license's turn from before its voucher is checked until the voucher is
/// written; the turn travels with the write, so a caller that goes away mid-call cannot let the
/// next voucher be checked against a count not yet stored. The writes go through one thread that
/// puts every voucher waiting when the last write finished into one synced batch (group commit):
/// calls on different licenses share each `fdatasync` instead of queueing for one each.
#[derive(Clone)]
pub struct Meter {
    turns: Arc<Mutex<Turns>>,
    writer: Arc<Writer>,
    domain: VoucherDomain,
}

/// The writer thread and its queue. Dropped with the last clone of the meter: the queue
/// closes, and the drop waits for the thread to store what it holds and let go of the store,
/// so nothing accepted is left unwritten and no thread still closes the database while the
/// process exits.
struct Writer {
    writes: Option<std::sync::mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        drop(self.writes.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A license's turn: held from the check until the voucher is stored.
pub type Turn = tokio::sync::OwnedMutexGuard<()>;

/// The licenses' turns. A turn nobody holds or waits for is only its map entry; those are
/// dropped whenever the map has doubled since the last sweep, so a node that meters many
/// licenses over months keeps only the busy ones.
#[derive(Default)]
struct Turns {
    by_license: HashMap<U256, Arc<tokio::sync::Mutex<()>>>,
    sweep_at: usize,
}

impl Turns {
    const MIN_SWEEP: usize = 1024;

    fn of(&mut self, license: U256) -> Arc<tokio::sync::Mutex<()>> {
        if self.by_license.len() >= self.sweep_at.max(Self::MIN_SWEEP) {
            // held or awaited turns have a clone outside the map; the entry of any other is
            // all there is of it, and a later call makes a fresh one
            self.by_license.retain(|_, turn| Arc::strong_count(turn) > 1);
            self.sweep_at = 2 * self.by_license.len();
        }
        self.by_license.entry(license).or_default().clone()
    }
}

/// What the writer thread calls once a voucher is durable (or could not be written).
pub type Then = Box<dyn FnOnce(Result<(), MeterError>) + Send>;

struct Pending {
    accepted: Accepted,
    receipt: ReceiptRecord,
    _turn: Turn,
    then: Then,
}

impl Meter {
    /// Starts the writer thread; it ends, and is waited for, when the last clone of the meter
    /// is dropped. Vouchers are checked under `domain` (the market's).
    pub fn start(store: Store, domain: VoucherDomain) -> std::io::Result<Self> {
        let (writes, queue) = std::sync::mpsc::channel::<Pending>();
        let thread = std::thread::Builder::new().name("agora-meter".into()).spawn(move || {
            while let Ok(first) = queue.recv() {
                let group: Vec<Pending> = std::iter::once(first).chain(queue.try_iter()).collect();
                write_group(&store, group);
            }
        })?;
        let writer = Writer { writes: Some(writes), thread: Some(thread) };
        Ok(Self { turns: Default::default(), writer: Arc::new(writer), domain })
    }

    /// The EIP-712 domain the vouchers are signed under.
    pub fn domain(&self) -> &VoucherDomain {
        &self.domain
    }

    /// Waits for `license`'s turn.
    pub async fn turn(&self, license: U256) -> Turn {
        let lock = self.turns.lock().unwrap_or_else(|p| p.into_inner()).of(license);
        lock.lock_owned().await
    }

    /// Queues an accepted voucher and its receipt for the next synced batch; `then` is called on
    /// the writer thread once they are durable (or could not be written), and the turn is
    /// released after it, not before. A call hands its answer to the write and is woken once,
    /// by the write. Should the writer thread be gone, `then` is dropped uncalled.
    pub fn commit(&self, accepted: Accepted, receipt: ReceiptRecord, turn: Turn, then: Then) {
        if let Some(writes) = &self.writer.writes {
            let _ = writes.send(Pending { accepted, receipt, _turn: turn, then });
        }
    }
}

fn put(
    batch: &mut crate::store::Batch<'_>,
    accepted: &Accepted,
    receipt: &ReceiptRecord,
) -> Result<(), StoreError> {
    let key = (accepted.license_id, accepted.cumulative);
    batch.put::<UsageRecords>(&accepted.license_id, &accepted.record)?;
    batch.put::<UsageVouchers>(&key, &accepted.record.signature)?;
    batch.put::<UsageReceipts>(&key, receipt)
}

/// Writes a group in one synced batch; if that fails, each voucher alone, so each call gets its
/// own outcome and one bad record cannot fail the others.
fn write_group(store: &Store, group: Vec<Pending>) {
    let mut batch = store.batch();
    let together = group
        .iter()
        .try_for_each(|p| put(&mut batch, &p.accepted, &p.receipt))
        .and_then(|()| store.write(batch));
    if together.is_ok() {
        for pending in group {
            (pending.then)(Ok(()));
        }
        return;
    }
    for pending in group {
        let mut batch = store.batch();
        let alone = put(&mut batch, &pending.accepted, &pending.receipt).and_then(|()| store.write(batch));
        (pending.then)(alone.map_err(MeterError::from));
    }
}

pub fn parse_header(value: &str) -> Result<(U256, U256, Vec<u8>), MeterError> {
    use base64::Engine;
    let bad = |why: String| MeterError::Invalid(format!("the Agora-Voucher header {why}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(value.trim())
        .map_err(|e| bad(format!("is not base64 ({e})")))?;
    let json: VoucherJson =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("is not the voucher JSON ({e})")))?;
    let license = crate::api::parse_u256(&json.license_id).map_err(|e| bad(format!("license_id: {e}")))?;
    let cumulative =
        crate::api::parse_u256(&json.cumulative_units).map_err(|e| bad(format!("cumulative_units: {e}")))?;
    let signature = alloy::primitives::hex::decode(json.signature.trim())
        .map_err(|e| bad(format!("signature is not hex ({e})")))?;
    if signature.len() > MAX_SIGNATURE {
        return Err(bad(format!(
            "signature is {} bytes; at most {MAX_SIGNATURE} are kept with a voucher",
            signature.len()
        )));
    }
    Ok((license, cumulative, signature))
}

/// The longest voucher signature taken: a key's is 65 bytes; a contract wallet's (ERC-1271) is
/// its own format, and each is kept with its voucher.
pub const MAX_SIGNATURE: usize = 2048;

/// The header value for a voucher (what clients send).
pub fn header(license: U256, cumulative: U256, signature: &[u8]) -> String {
    use base64::Engine;
    let json = VoucherJson {
        license_id: license.to_string(),
        cumulative_units: cumulative.to_string(),
        signature: alloy::primitives::hex::encode_prefixed(signature),
    };
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(&json).expect("a voucher serialises"))
}

/// The EIP-712 hash a holder signs for `cumulative` units of `license`.
pub fn voucher_hash(license: U256, cumulative: U256, chain_id: u64, market: Address) -> B256 {
    VoucherDomain::new(chain_id, market).hash(license, cumulative)
}

/// The market's EIP-712 domain separator and the voucher's type hash, computed once: a metered
/// call then hashes its voucher with two keccaks instead of rebuilding the domain every time.
#[derive(Clone, Copy, Debug)]
pub struct VoucherDomain {
    separator: B256,
    type_hash: B256,
}

impl VoucherDomain {
    pub fn new(chain_id: u64, market: Address) -> Self {
        let voucher = Voucher { licenseId: U256::ZERO, cumulativeUnits: U256::ZERO };
        Self { separator: order_domain(chain_id, market).separator(), type_hash: voucher.eip712_type_hash() }
    }

    /// `keccak256(0x1901 ‖ separator ‖ keccak256(typeHash ‖ licenseId ‖ cumulativeUnits))`.
    pub fn hash(&self, license: U256, cumulative: U256) -> B256 {
        let mut data = [0u8; 96];
        data[..32].copy_from_slice(self.type_hash.as_slice());
        data[32..64].copy_from_slice(&license.to_be_bytes::<32>());
        data[64..].copy_from_slice(&cumulative.to_be_bytes::<32>());
        let mut digest = [0u8; 66];
        digest[..2].copy_from_slice(&[0x19, 0x01]);
        digest[2..34].copy_from_slice(self.separator.as_slice());
        digest[34..].copy_from_slice(keccak256(data).as_slice());
        keccak256(digest)
    }
}

/// The last accepted count of a license (its settled units before the first voucher here).
pub fn last_accepted(store: &Store, license: U256) -> Result<U256, StoreError> {
    Ok(match store.get::<UsageRecords>(&license)? {
        Some(r) => r.cumulative,
        None => store.get::<Licenses>(&license)?.map(|l| l.settled_units).unwrap_or_default(),
    })
}

/// Checks a voucher for a call of `cost` units by `caller` on a deployment of `token`.
/// `unit_price` is the license's (from the chain). Call in the license's turn ([`Meter::turn`]).
#[allow(clippy::too_many_arguments)]
pub fn check(
    store: &Store,
    caller: Address,
    token: U256,
    license_id: U256,
    cumulative: U256,
    signature: &[u8],
    cost: U256,
    unit_price: U256,
    domain: &VoucherDomain,
    signers: &Signers,
) -> Result<Accepted, MeterError> {
    let license = store
        .get::<Licenses>(&license_id)?
        .ok_or_else(|| MeterError::Invalid(format!("no license {license_id}")))?;
    if license.holder != caller {
        return Err(MeterError::Forbidden(format!("license {license_id} belongs to another wallet")));
    }
    if license.token_id != token {
        return Err(MeterError::Forbidden(format!(
            "license {license_id} is for token {}, not this deployment's",
            license.token_id
        )));
    }
    if TermKind::from_u8(license.kind) != Some(TermKind::Usage) {
        return Err(MeterError::Invalid(format!(
            "license {license_id} is not a usage license; send no voucher"
        )));
    }
    if license.closed {
        return Err(MeterError::Unpaid { reason: format!("license {license_id} is closed"), required: None });
    }
    let last = last_accepted(store, license_id)?;
    let required = last + cost;
    if cumulative <= last {
        return Err(MeterError::Stale { cumulative, last });
    }
    if cumulative != required {
        return Err(MeterError::Unpaid {
            reason: format!(
                "this call costs {cost} units: the voucher must carry {required} (last accepted {last}), not {cumulative}"
            ),
            required: Some(required),
        });
    }
    // kept in the form `settleUsage` takes: a voucher the chain refused would never be paid
    let signature = signers
        .signed_by(license.holder, &domain.hash(license_id, cumulative), signature)
        .map_err(|e| match e {
            SignerError::NotSigner(why) => MeterError::Unpaid {
                reason: format!("the voucher is not signed by license {license_id}'s holder: {why}"),
                required: Some(required),
            },
            SignerError::Unavailable(why) => MeterError::Unavailable(why),
        })?;
    let owed = cumulative.saturating_mul(unit_price);
    if owed > license.deposited {
        let top_up = owed - license.deposited;
        return Err(MeterError::Unpaid {
            reason: format!(
                "the escrow holds {} wei; {cumulative} units cost {owed}: top up at least {top_up} wei",
                license.deposited
            ),
            required: Some(required),
        });
    }
    Ok(Accepted {
        license_id,
        cumulative,
        record: UsageRecord { cumulative, signature, unit_price, updated_ms: crate::registry::now_ms() },
    })
}

/// The bytes of a usage receipt, after this domain tag: license id, cumulative units (32 bytes
/// each, big-endian), the request's blake3, the time in unix milliseconds (8 bytes).
pub const RECEIPT_DOMAIN: &[u8] = b"agora-receipt-v1";

pub fn receipt_bytes(license: U256, cumulative: U256, request: &[u8; 32], time_ms: u64) -> Vec<u8> {
    let mut message = RECEIPT_DOMAIN.to_vec();
    message.extend_from_slice(&license.to_be_bytes::<32>());
    message.extend_from_slice(&cumulative.to_be_bytes::<32>());
    message.extend_from_slice(request);
    message.extend_from_slice(&time_ms.to_be_bytes());
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(license: u64, cumulative: u64) -> (Accepted, ReceiptRecord) {
        let (license_id, cumulative) = (U256::from(license), U256::from(cumulative));
        let record =
            UsageRecord { cumulative, signature: vec![7; 65], unit_price: U256::from(3), updated_ms: 1 };
        let receipt =
            ReceiptRecord { request: [license as u8; 32], time_ms: cumulative.to(), signature: vec![9; 64] };
        (Accepted { license_id, cumulative, record }, receipt)
    }

    #[test]
    fn voucher_headers_round_trip_and_bad_ones_are_named() {
        let (license, cumulative) = (U256::MAX, U256::from(7));
        for signature in [vec![1u8; 65], vec![2u8; MAX_SIGNATURE]] {
            let parsed = parse_header(&header(license, cumulative, &signature)).unwrap();
            assert_eq!(parsed, (license, cumulative, signature));
        }
        let long = parse_header(&header(license, cumulative, &[3u8; MAX_SIGNATURE + 1])).unwrap_err();
        assert!(long.to_string().contains("2049 bytes"), "{long}");
        assert!(parse_header("not base64!").unwrap_err().to_string().contains("not base64"));
    }

    #[test]
    fn the_cached_domain_hashes_as_eip712_does() {
        for (chain, market, license, cumulative) in
            [(1u64, Address::ZERO, 0u64, 0u64), (31337, Address::repeat_byte(0xab), 7, 1_000_000)]
        {
            let expected =
                Voucher { licenseId: U256::from(license), cumulativeUnits: U256::from(cumulative) }
                    .eip712_signing_hash(&order_domain(chain, market));
            let cached = VoucherDomain::new(chain, market).hash(U256::from(license), U256::from(cumulative));
            assert_eq!(cached, expected);
        }
    }

    impl Meter {
        /// [`Meter::commit`], answered on a channel.
        fn written(
            &self,
            accepted: Accepted,
            receipt: ReceiptRecord,
            turn: Turn,
        ) -> tokio::sync::oneshot::Receiver<Result<(), MeterError>> {
            let (done, written) = tokio::sync::oneshot::channel();
            self.commit(accepted, receipt, turn, Box::new(move |result| drop(done.send(result))));
            written
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn vouchers_written_in_groups_are_all_durable_and_a_turn_waits_for_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let meter = Meter::start(store.clone(), VoucherDomain::new(31337, Address::repeat_byte(7))).unwrap();

        // 20 licenses, 5 calls each, all at once: every call's turn, check and write in order
        let calls = (1..=20u64).map(|license| {
            let (meter, store) = (meter.clone(), store.clone());
            tokio::spawn(async move {
                for n in 1..=5u64 {
                    let turn = meter.turn(U256::from(license)).await;
                    // in its turn, a call sees every earlier call's voucher stored
                    assert_eq!(last_accepted(&store, U256::from(license)).unwrap(), U256::from(n - 1));
                    let (accepted, receipt) = accepted(license, n);
                    meter.written(accepted, receipt, turn).await.unwrap().unwrap();
                }
            })
        });
        for call in futures::future::join_all(calls).await {
            call.unwrap();
        }
        for license in 1..=20u64 {
            assert_eq!(last_accepted(&store, U256::from(license)).unwrap(), U256::from(5));
            let receipts = store.scan::<UsageReceipts>(&U256::from(license).to_be_bytes::<32>(), None, false);
            assert_eq!(receipts.count(), 5);
            let vouchers = store.scan::<UsageVouchers>(&U256::from(license).to_be_bytes::<32>(), None, false);
            assert_eq!(vouchers.map(|v| v.unwrap().1).collect::<Vec<_>>(), vec![vec![7; 65]; 5]);
        }

        // a turn handed to a write is not given to the next call before the write is stored,
        // even when the caller stops waiting for the answer
        let turn = meter.turn(U256::from(99)).await;
        let (first, receipt) = accepted(99, 1);
        drop(meter.written(first, receipt, turn));
        let _next = meter.turn(U256::from(99)).await;
        assert_eq!(last_accepted(&store, U256::from(99)).unwrap(), U256::from(1));
    }

    #[tokio::test]
    async fn idle_turns_are_dropped_and_held_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db")).unwrap();
        let meter = Meter::start(store, VoucherDomain::new(31337, Address::repeat_byte(7))).unwrap();
        let held = meter.turn(U256::from(1)).await;
        for license in 2..10_000u64 {
            drop(meter.turn(U256::from(license)).await);
        }
        let turns = meter.turns.lock().unwrap().by_license.len();
        assert!(turns <= 2 * Turns::MIN_SWEEP, "{turns} turns kept for 10,000 licenses used once");
        // the held turn survived every sweep: the same license waits for it
        let waiting = meter.turn(U256::from(1));
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        drop(held);
        waiting.await;
    }
}
