//! Settlement: the node submits the latest accepted voucher of each usage license to the
//! market (`settleUsage`, which anyone may send) from the operator's wallet, when the
//! unsettled value reaches a threshold, when a license has waited an interval, or at once when
//! a close is requested (so the challenge window does not pass unsettled). What is pending is
//! always recomputed from the stored vouchers and the index, so a restart (even after SIGKILL)
//! settles whatever was accepted and not yet settled; a failed submission is retried on a later
//! round with backoff.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use agora_contracts::LicenseMarket;
use alloy::{
    primitives::{Address, U256},
    providers::DynProvider,
};
use tokio::sync::watch;

use crate::store::{
    Store,
    tables::{Licenses, UsageRecords},
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

/// One license with accepted units the chain has not settled.
struct Pending {
    license: U256,
    cumulative: U256,
    signature: Vec<u8>,
    value: U256,
    closing: bool,
}

fn pending(store: &Store) -> Result<Vec<Pending>, crate::store::StoreError> {
    let mut out = Vec::new();
    for item in store.iter::<UsageRecords>() {
        let (key, record) = item?;
        let license = U256::from_be_slice(&key);
        let Some(indexed) = store.get::<Licenses>(&license)? else { continue };
        if indexed.closed || record.cumulative <= indexed.settled_units {
            continue;
        }
        out.push(Pending {
            license,
            cumulative: record.cumulative,
            signature: record.signature,
            value: (record.cumulative - indexed.settled_units).saturating_mul(record.unit_price),
            closing: indexed.closable_at.is_some(),
        });
    }
    Ok(out)
}

/// Runs until `shutdown`: `provider` sends from the operator's wallet.
pub async fn run(
    store: Store,
    provider: DynProvider,
    market: Address,
    config: SettleConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let contract = LicenseMarket::new(market, provider);
    // When each license first showed pending units, and when a failed submission may retry.
    let mut waiting: HashMap<U256, Instant> = HashMap::new();
    let mut retry_at: HashMap<U256, (Instant, u32)> = HashMap::new();
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
        waiting.retain(|license, _| list.iter().any(|p| p.license == *license));
        for p in list {
            let since = *waiting.entry(p.license).or_insert(now);
            let due = p.closing || p.value >= config.min_wei || now.duration_since(since) >= config.interval;
            if !due || retry_at.get(&p.license).is_some_and(|(at, _)| now < *at) {
                continue;
            }
            let sent = contract.settleUsage(p.license, p.cumulative, p.signature.clone().into()).send().await;
            let outcome = match sent {
                Ok(pending_tx) => pending_tx.get_receipt().await.map_err(|e| e.to_string()).and_then(|r| {
                    if r.status() {
                        Ok(r.transaction_hash)
                    } else {
                        Err(format!("reverted in {}", r.transaction_hash))
                    }
                }),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(tx) => {
                    tracing::info!(target: "agora::settle", license = %p.license, units = %p.cumulative, %tx, "settled");
                    metrics::counter!("agora_usage_settlements_total").increment(1);
                    retry_at.remove(&p.license);
                    waiting.remove(&p.license);
                }
                Err(e) => {
                    let failures = retry_at.get(&p.license).map_or(0, |(_, n)| *n) + 1;
                    let backoff = Duration::from_millis(500u64 << failures.min(8));
                    tracing::warn!(target: "agora::settle", license = %p.license, error = %e, retry_in = ?backoff, "settlement failed");
                    metrics::counter!("agora_usage_settlement_failures_total").increment(1);
                    retry_at.insert(p.license, (Instant::now() + backoff, failures));
                }
            }
        }
    }
}
