//! Settlement: the node submits the latest accepted voucher of each usage license to the
//! market (`settleUsage`, which anyone may send) from the operator's wallet, when the
//! unsettled value reaches a threshold, when a license has waited an interval, or at once when
//! a close is requested (so the challenge window does not pass unsettled). What is pending is
//! always recomputed from the stored vouchers and the index, so a restart (even after SIGKILL)
//! settles whatever was accepted and not yet settled; a failed submission is retried on a later
//! round with backoff.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agora_contracts::LicenseMarket;
use alloy::primitives::{Address, U256};
use tokio::sync::watch;

use crate::{
    chain::operator::Operator,
    store::{
        Store,
        tables::{Licenses, Table, TokenLicenses, UsageRecord, UsageRecords, UsageVouchers},
    },
};

#[derive(Clone, Debug)]
pub struct SettleConfig {
    /// Settle a license once its unsettled value reaches this many wei.
    pub min_wei: U256,
    /// Settle anything pending after it has waited this long.
    pub interval: Duration,
    /// How often pending vouchers are looked at.
    pub poll: Duration,
}

/// How a license's settlement keeps failing: what the API shows until it succeeds.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Failure {
    /// Failed attempts in a row.
    pub attempts: u32,
    /// The last attempt's error, as the chain or the RPC gave it.
    pub error: String,
    /// When the last attempt failed (ms since the epoch).
    pub failed_ms: u64,
    /// When the next attempt may go (ms since the epoch).
    pub retry_ms: u64,
}

/// The settler's failing licenses, shared with the API (empty on a node that does not settle).
#[derive(Clone, Default)]
pub struct Failures(Arc<Mutex<HashMap<U256, Failure>>>);

impl Failures {
    pub fn get(&self, license: U256) -> Option<Failure> {
        self.0.lock().ok()?.get(&license).cloned()
    }

    /// Records a failed attempt and says how long to wait before the next.
    fn record(&self, license: U256, error: String) -> Duration {
        let now = crate::registry::now_ms();
        let Ok(mut map) = self.0.lock() else { return backoff(1) };
        let attempts = map.get(&license).map_or(0, |f| f.attempts) + 1;
        let wait = backoff(attempts);
        let retry_ms = now.saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX));
        map.insert(license, Failure { attempts, error, failed_ms: now, retry_ms });
        wait
    }

    fn clear(&self, license: U256) {
        if let Ok(mut map) = self.0.lock() {
            map.remove(&license);
        }
    }

    /// Keeps only the licenses still pending.
    fn retain(&self, pending: &HashSet<U256>) {
        if let Ok(mut map) = self.0.lock() {
            map.retain(|license, _| pending.contains(license));
        }
    }
}

/// How long a settlement the chain took may stay unseen by the index before it is sent again.
const SEEN_WITHIN: Duration = Duration::from_secs(60);

/// Backoff after `failures` failed attempts in a row: 1 s doubling to about two minutes.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(500u64 << failures.min(8))
}

/// One license with accepted units the chain has not settled.
struct Pending {
    license: U256,
    cumulative: U256,
    signature: Vec<u8>,
    value: U256,
    closing: bool,
}

/// Units of every usage license this node metered: accepted (the last voucher's count, summed),
/// settled on-chain as the index has it, and the difference, pending.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsageTotals {
    pub licenses: u64,
    pub metered: U256,
    pub settled: U256,
}

impl UsageTotals {
    /// Every usage license's.
    pub fn read(store: &Store) -> Result<Self, crate::store::StoreError> {
        let mut totals = Self::default();
        for item in store.iter::<UsageRecords>() {
            let (key, record) = item?;
            totals.add(store, U256::from_be_slice(&key), &record)?;
        }
        Ok(totals)
    }

    /// The usage licenses of one model token's.
    pub fn of_token(store: &Store, token: U256) -> Result<Self, crate::store::StoreError> {
        let mut totals = Self::default();
        for item in store.scan::<TokenLicenses>(&token.to_be_bytes::<32>(), None, false) {
            let license = U256::from_be_slice(&item?.0[32..64]);
            if let Some(record) = store.get::<UsageRecords>(&license)? {
                totals.add(store, license, &record)?;
            }
        }
        Ok(totals)
    }

    fn add(
        &mut self,
        store: &Store,
        license: U256,
        record: &UsageRecord,
    ) -> Result<(), crate::store::StoreError> {
        let settled = store
            .get::<Licenses>(&license)?
            .map_or(U256::ZERO, |indexed| indexed.settled_units.min(record.cumulative));
        self.licenses += 1;
        self.metered = self.metered.saturating_add(record.cumulative);
        self.settled = self.settled.saturating_add(settled);
        Ok(())
    }

    pub fn pending(&self) -> U256 {
        self.metered - self.settled
    }

    /// Sets the `agora_usage_*` gauges.
    pub fn publish(&self) {
        metrics::gauge!("agora_usage_licenses").set(self.licenses as f64);
        metrics::gauge!("agora_usage_units_metered").set(f64::from(self.metered));
        metrics::gauge!("agora_usage_units_settled").set(f64::from(self.settled));
        metrics::gauge!("agora_usage_units_pending").set(f64::from(self.pending()));
    }
}

/// The licenses with accepted units to settle, each with the last voucher its escrow (as the
/// index has it) covers: the last accepted one, unless the escrow shrank under it (a top-up a
/// reorg undid), and then the last one kept that still fits, which the chain would take.
fn pending(store: &Store) -> Result<Vec<Pending>, crate::store::StoreError> {
    let mut out = Vec::new();
    for item in store.iter::<UsageRecords>() {
        let (key, record) = item?;
        let license = U256::from_be_slice(&key);
        let Some(indexed) = store.get::<Licenses>(&license)? else { continue };
        if indexed.closed || record.cumulative <= indexed.settled_units {
            continue;
        }
        let covered = indexed.deposited.checked_div(record.unit_price).unwrap_or_default();
        let (cumulative, signature) = if record.cumulative <= covered {
            (record.cumulative, record.signature)
        } else {
            let start = (license, covered);
            let mut kept = store.scan::<UsageVouchers>(&key, Some(&UsageVouchers::encode_key(&start)), true);
            match kept.next().transpose()? {
                Some((k, signature)) => (U256::from_be_slice(&k[32..]), signature),
                None => continue,
            }
        };
        if cumulative <= indexed.settled_units {
            continue;
        }
        out.push(Pending {
            license,
            cumulative,
            signature,
            value: (cumulative - indexed.settled_units).saturating_mul(record.unit_price),
            closing: indexed.closable_at.is_some(),
        });
    }
    Ok(out)
}

/// Runs until `shutdown`, sending from the `operator` wallet; failing licenses are
/// kept in `failures` for the API.
pub async fn run(
    store: Store,
    operator: Operator,
    market: Address,
    config: SettleConfig,
    failures: Failures,
    mut shutdown: watch::Receiver<bool>,
) {
    let contract = LicenseMarket::new(market, operator.provider.clone());
    // When each license first showed pending units, and when a failed submission may retry.
    let mut waiting: HashMap<U256, Instant> = HashMap::new();
    let mut retry_at: HashMap<U256, Instant> = HashMap::new();
    // The voucher each license last settled with, and when: until the index shows that
    // settlement the license still looks pending, and sending the voucher again would fail.
    let mut settled: HashMap<U256, (U256, Instant)> = HashMap::new();
    let mut tick = tokio::time::interval(config.poll);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
        let found = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || pending(&store)).await
        };
        let list = match found {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(target: "agora::settle", error = %e, "cannot read pending vouchers");
                continue;
            }
            Err(e) => {
                tracing::error!(target: "agora::settle", error = %e, "the pending scan failed");
                continue;
            }
        };
        let now = Instant::now();
        let listed: HashSet<U256> = list.iter().map(|p| p.license).collect();
        waiting.retain(|license, _| listed.contains(license));
        retry_at.retain(|license, _| listed.contains(license));
        settled.retain(|license, _| listed.contains(license));
        failures.retain(&listed);
        for p in list {
            let since = *waiting.entry(p.license).or_insert(now);
            let due = p.closing || p.value >= config.min_wei || now.duration_since(since) >= config.interval;
            // a settlement the index has not seen yet is waited for (a reorg may drop it: then
            // it goes again)
            let just_sent = settled
                .get(&p.license)
                .is_some_and(|(units, at)| *units == p.cumulative && now.duration_since(*at) < SEEN_WITHIN);
            if !due || just_sent || retry_at.get(&p.license).is_some_and(|at| now < *at) {
                continue;
            }
            let sent = operator
                .transact(contract.settleUsage(p.license, p.cumulative, p.signature.clone().into()))
                .await;
            let outcome = match sent {
                Ok(r) if r.status() => Ok(r.transaction_hash),
                Ok(r) => Err(format!("reverted in {}", r.transaction_hash)),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(tx) => {
                    tracing::info!(target: "agora::settle", license = %p.license, units = %p.cumulative, %tx, "settled");
                    metrics::counter!("agora_usage_settlements_total").increment(1);
                    retry_at.remove(&p.license);
                    waiting.remove(&p.license);
                    failures.clear(p.license);
                    settled.insert(p.license, (p.cumulative, Instant::now()));
                }
                Err(e) => {
                    let wait = failures.record(p.license, e.clone());
                    tracing::warn!(target: "agora::settle", license = %p.license, error = %e, retry_in = ?wait, "settlement failed");
                    metrics::counter!("agora_usage_settlement_failures_total").increment(1);
                    retry_at.insert(p.license, Instant::now() + wait);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use agora_contracts::TermKind;
    use alloy::primitives::B256;

    use super::*;
    use crate::store::tables::LicenseRecord;

    /// License 1, with an escrow of `units` at a price of 3 wei, `settled` of them settled, and
    /// accepted vouchers for 4, 8 and 12 units (signatures 4, 8 and 12), the last one latest.
    fn store_with(dir: &std::path::Path, units: u64, settled: u64) -> Store {
        let store = Store::open(&dir.join("db")).unwrap();
        let license = U256::from(1);
        let indexed = LicenseRecord {
            token_id: U256::from(9),
            holder: Address::repeat_byte(7),
            kind: TermKind::Usage as u8,
            paid: U256::ZERO,
            expires_at: 0,
            deposited: U256::from(3 * units),
            settled_units: U256::from(settled),
            settled_amount: U256::from(3 * settled),
            closable_at: None,
            closed: false,
            refund: U256::ZERO,
            order_hash: B256::ZERO,
            term_index: 2,
            purchased: Default::default(),
        };
        let mut batch = store.batch();
        batch.put::<Licenses>(&license, &indexed).unwrap();
        for cumulative in [4u8, 8, 12] {
            let signature = vec![cumulative; 65];
            batch.put::<UsageVouchers>(&(license, U256::from(cumulative)), &signature).unwrap();
            let record = UsageRecord {
                cumulative: U256::from(cumulative),
                signature,
                unit_price: U256::from(3),
                updated_ms: 1,
            };
            batch.put::<UsageRecords>(&license, &record).unwrap();
        }
        store.write(batch).unwrap();
        store
    }

    fn due(units: u64, settled: u64) -> Option<(u64, u8, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let list = pending(&store_with(dir.path(), units, settled)).unwrap();
        assert!(list.len() <= 1);
        list.first().map(|p| (p.cumulative.to(), p.signature[0], p.value.to()))
    }

    #[test]
    fn the_last_voucher_the_escrow_covers_is_settled() {
        // the escrow covers the last voucher: it goes, for the units since the last settlement
        assert_eq!(due(12, 0), Some((12, 12, 36)));
        assert_eq!(due(1_000, 4), Some((12, 12, 24)));
        // a shrunk escrow (a top-up a reorg undid): the last voucher within it
        assert_eq!(due(11, 0), Some((8, 8, 24)));
        assert_eq!(due(8, 4), Some((8, 8, 12)));
        assert_eq!(due(7, 0), Some((4, 4, 12)));
        // nothing the chain would take: no voucher within the escrow, or none past what is settled
        assert_eq!(due(3, 0), None);
        assert_eq!(due(11, 8), None);
        assert_eq!(due(12, 12), None);
    }

    #[test]
    fn usage_totals_count_what_the_chain_settled_of_what_was_accepted() {
        let totals = |units: u64, settled: u64| {
            let dir = tempfile::tempdir().unwrap();
            let t = UsageTotals::read(&store_with(dir.path(), units, settled)).unwrap();
            (t.licenses, t.metered.to::<u64>(), t.settled.to::<u64>(), t.pending().to::<u64>())
        };
        assert_eq!(totals(100, 0), (1, 12, 0, 12));
        assert_eq!(totals(100, 8), (1, 12, 8, 4));
        assert_eq!(totals(100, 12), (1, 12, 12, 0));
        // settled past the last voucher this node kept (another node's, say): none pending here
        assert_eq!(totals(100, 20), (1, 12, 12, 0));
        let empty = tempfile::tempdir().unwrap();
        let none = UsageTotals::read(&Store::open(&empty.path().join("db")).unwrap()).unwrap();
        assert_eq!(none, UsageTotals::default());
    }
}
