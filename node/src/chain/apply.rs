//! Applies the contracts' events to the index, one log at a time, in chain order.
//!
//! Every effect goes through the [`IndexWriter`], so it lands in the state root and the
//! block's undo record. The rules mirror the contracts exactly (fees rounded down per booking,
//! revenue booked per model, credits from `Credited`), so balances match the chain to the wei.

use agora_contracts::{ComputeMarket, Deployment, LicenseMarket, ModelRegistry};
use alloy::{
    primitives::{Address, U256},
    rpc::types::Log,
    sol_types::SolEventInterface,
};

use super::writer::IndexWriter;
use crate::store::{
    StoreError,
    tables::{
        Balances, CancelRecord, Cancelled, ClosedOffers, ComputeBalances, ContentVersions, Earnings,
        HolderLicenses, LicenseRecord, Licenses, Models, Nonces, OfferNonces, Origin, RecipientModels,
        ReservationRecord, ReservationState, Reservations, Revenue, Split, TokenLicenses, VersionRecord,
        Versions,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("log {0} cannot be decoded: {1}")]
    Decode(String, String),
    #[error("log {0} has no block number or index (a pending log)")]
    Pending(String),
}

impl ApplyError {
    /// Whether the indexer may skip the log and carry on.
    pub fn is_skippable(&self) -> bool {
        matches!(self, Self::Decode(..))
    }
}

fn origin(log: &Log) -> Result<Origin, ApplyError> {
    match (log.block_number, log.log_index) {
        (Some(block), Some(log_index)) => {
            Ok(Origin { block, tx: log.transaction_hash.unwrap_or_default(), log_index })
        }
        _ => Err(ApplyError::Pending(describe(log))),
    }
}

pub fn describe(log: &Log) -> String {
    format!(
        "block {} tx {} index {}",
        log.block_number.map(|b| b.to_string()).unwrap_or_else(|| "?".into()),
        log.transaction_hash.map(|h| h.to_string()).unwrap_or_else(|| "?".into()),
        log.log_index.map(|i| i.to_string()).unwrap_or_else(|| "?".into()),
    )
}

/// Applies one log of the deployment's contracts (others are ignored).
pub fn apply_log(w: &mut IndexWriter<'_>, deployment: &Deployment, log: &Log) -> Result<(), ApplyError> {
    let at = origin(log)?;
    if log.address() == deployment.model_registry {
        let event = ModelRegistry::ModelRegistryEvents::decode_log(&log.inner)
            .map_err(|e| ApplyError::Decode(describe(log), e.to_string()))?;
        apply_registry(w, event.data, at)?;
    } else if log.address() == deployment.license_market {
        let event = LicenseMarket::LicenseMarketEvents::decode_log(&log.inner)
            .map_err(|e| ApplyError::Decode(describe(log), e.to_string()))?;
        apply_market(w, deployment, event.data, at)?;
    } else if deployment.has_compute() && log.address() == deployment.compute_market {
        let event = ComputeMarket::ComputeMarketEvents::decode_log(&log.inner)
            .map_err(|e| ApplyError::Decode(describe(log), e.to_string()))?;
        apply_compute(w, event.data, at)?;
    } else {
        return Ok(());
    }
    w.count_event();
    Ok(())
}

fn apply_registry(
    w: &mut IndexWriter<'_>,
    event: ModelRegistry::ModelRegistryEvents,
    at: Origin,
) -> Result<(), ApplyError> {
    use ModelRegistry::ModelRegistryEvents as E;
    match event {
        E::ModelRegistered(e) => w.upsert::<Models>(&e.tokenId, |m| {
            m.owner = e.owner;
            m.metadata_uri = e.metadataURI;
            m.registered = at;
        })?,
        E::VersionAnchored(e) => {
            w.upsert::<Models>(&e.tokenId, |m| m.version_count = m.version_count.max(e.version))?;
            w.put::<Versions>(
                &(e.tokenId, e.version),
                &VersionRecord { content_hash: e.contentHash, anchored: at },
            )?;
            if w.get::<ContentVersions>(&e.contentHash)?.is_none() {
                w.put::<ContentVersions>(&e.contentHash, &(e.tokenId, e.version))?;
            }
        }
        E::SplitsSet(e) => {
            let mut m = w.get::<Models>(&e.tokenId)?.unwrap_or_default();
            for old in &m.splits {
                w.delete::<RecipientModels>(&(old.recipient, e.tokenId))?;
            }
            m.splits = e.splits.iter().map(|s| Split { recipient: s.recipient, bps: s.bps }).collect();
            for split in &m.splits {
                w.put::<RecipientModels>(&(split.recipient, e.tokenId), &split.bps)?;
            }
            w.put::<Models>(&e.tokenId, &m)?;
        }
        E::Transfer(e) => w.upsert::<Models>(&e.tokenId, |m| {
            m.owner = e.to;
            m.transferred = at;
        })?,
        E::Approval(_) | E::ApprovalForAll(_) | E::MarketBound(_) => {}
    }
    Ok(())
}

/// Adds to what `account` was credited for `token_id`.
fn add_earnings(
    w: &mut IndexWriter<'_>,
    account: Address,
    token_id: U256,
    amount: U256,
) -> Result<(), StoreError> {
    w.upsert::<Earnings>(&(account, token_id), |earned| *earned += amount)
}

/// Books a payment as the contract does: the fee to the treasury, the rest as model revenue.
fn book(
    w: &mut IndexWriter<'_>,
    deployment: &Deployment,
    token_id: U256,
    amount: U256,
) -> Result<(), StoreError> {
    if amount.is_zero() {
        return Ok(());
    }
    let fee = amount * U256::from(deployment.fee_bps) / U256::from(10_000u64);
    w.upsert::<Revenue>(&token_id, |revenue| revenue.earned += amount - fee)?;
    if !fee.is_zero() {
        w.upsert::<Balances>(&deployment.treasury, |treasury| treasury.fees += fee)?;
        add_earnings(w, deployment.treasury, token_id, fee)?;
    }
    Ok(())
}

fn apply_market(
    w: &mut IndexWriter<'_>,
    deployment: &Deployment,
    event: LicenseMarket::LicenseMarketEvents,
    at: Origin,
) -> Result<(), ApplyError> {
    use LicenseMarket::LicenseMarketEvents as E;
    match event {
        E::OrderCancelled(e) => {
            w.put::<Cancelled>(&e.orderHash, &CancelRecord { seller: e.seller, cancelled: at })?;
        }
        E::NonceBumped(e) => {
            w.put::<Nonces>(&e.seller, &e.nonce)?;
        }
        E::LicensePurchased(e) => {
            let record = LicenseRecord {
                token_id: e.tokenId,
                holder: e.holder,
                kind: e.kind,
                paid: e.price,
                expires_at: e.expiresAt,
                deposited: e.escrow,
                settled_units: U256::ZERO,
                settled_amount: U256::ZERO,
                closable_at: None,
                closed: false,
                refund: U256::ZERO,
                order_hash: e.orderHash,
                term_index: e.termIndex,
                purchased: at,
            };
            // the lookups are written with the license and only then: a license the index did
            // not have cannot have them either, so they cost no read
            if w.create::<Licenses>(&e.licenseId, &record)? {
                w.put_absent::<HolderLicenses>(&(e.holder, e.licenseId), &())?;
                w.put_absent::<TokenLicenses>(&(e.tokenId, e.licenseId), &())?;
            } else {
                w.put::<HolderLicenses>(&(e.holder, e.licenseId), &())?;
                w.put::<TokenLicenses>(&(e.tokenId, e.licenseId), &())?;
            }
            book(w, deployment, e.tokenId, e.price)?;
        }
        E::LicenseExtended(e) => {
            let token = w.update::<Licenses, _>(&e.licenseId, |l| {
                l.expires_at = e.expiresAt;
                l.paid += e.price;
                l.token_id
            })?;
            if let Some(token) = token {
                book(w, deployment, token, e.price)?;
            }
        }
        E::UsageSettled(e) => {
            let token = w.update::<Licenses, _>(&e.licenseId, |l| {
                l.settled_units = e.cumulativeUnits;
                l.settled_amount += e.amount;
                l.token_id
            })?;
            if let Some(token) = token {
                book(w, deployment, token, e.amount)?;
            }
        }
        E::EscrowToppedUp(e) => {
            w.update::<Licenses, _>(&e.licenseId, |l| l.deposited = e.deposited)?;
        }
        E::CloseRequested(e) => {
            w.update::<Licenses, _>(&e.licenseId, |l| l.closable_at = Some(e.closableAt))?;
        }
        E::Closed(e) => {
            w.update::<Licenses, _>(&e.licenseId, |l| {
                l.closed = true;
                l.refund = e.refund;
            })?;
            w.upsert::<Balances>(&e.holder, |b| b.refunds += e.refund)?;
        }
        E::Distributed(e) => {
            w.upsert::<Revenue>(&e.tokenId, |revenue| revenue.distributed += e.amount)?;
        }
        E::Credited(e) => {
            w.upsert::<Balances>(&e.recipient, |b| b.royalties += e.amount)?;
            add_earnings(w, e.recipient, e.tokenId, e.amount)?;
        }
        E::Withdrawn(e) => {
            w.upsert::<Balances>(&e.account, |b| b.withdrawn += e.amount)?;
        }
        E::EIP712DomainChanged(_) => {}
    }
    Ok(())
}

/// Credits ComputeMarket's pull balances as `_settle` and `reclaim` do.
fn credit_compute(
    w: &mut IndexWriter<'_>,
    account: Address,
    earned: U256,
    refund: U256,
) -> Result<(), StoreError> {
    if earned.is_zero() && refund.is_zero() {
        return Ok(());
    }
    w.upsert::<ComputeBalances>(&account, |b| {
        b.earned += earned;
        b.refunds += refund;
    })
}

fn apply_compute(
    w: &mut IndexWriter<'_>,
    event: ComputeMarket::ComputeMarketEvents,
    at: Origin,
) -> Result<(), ApplyError> {
    use ComputeMarket::ComputeMarketEvents as E;
    let update = |w: &mut IndexWriter<'_>, id: U256, f: &dyn Fn(&mut ReservationRecord)| {
        w.update::<Reservations, _>(&id, f).map(drop)
    };
    match event {
        E::Reserved(e) => {
            let record = ReservationRecord {
                provider: e.provider,
                holder: e.holder,
                offer_hash: e.offerHash,
                gpu_hours: e.gpuHours,
                price_per_gpu_hour: e.pricePerGpuHour,
                start_time: e.startTime,
                end_time: e.endTime,
                escrow: e.escrow,
                state: ReservationState::Reserved,
                confirmed_at: None,
                reported: None,
                hours_used: None,
                paid: U256::ZERO,
                refund: U256::ZERO,
                reserved: at,
                closed: None,
            };
            w.put::<Reservations>(&e.reservationId, &record)?;
            w.put::<ClosedOffers>(&e.offerHash, &at)?;
        }
        E::Confirmed(e) => update(w, e.reservationId, &|r| {
            r.state = ReservationState::Confirmed;
            r.confirmed_at = Some(e.at);
        })?,
        E::Reported(e) => update(w, e.reservationId, &|r| r.reported = Some((e.hoursUsed, e.finalAt)))?,
        E::Settled(e) => {
            let settled = w.update::<Reservations, _>(&e.reservationId, |r| {
                r.state = ReservationState::Settled;
                r.hours_used = Some(e.hoursUsed);
                r.paid = e.paid;
                r.refund = e.refund;
                r.closed = Some(at);
                r.provider
            })?;
            let Some(provider) = settled else {
                return Ok(());
            };
            credit_compute(w, provider, e.paid, U256::ZERO)?;
            credit_compute(w, e.holder, U256::ZERO, e.refund)?;
        }
        E::Reclaimed(e) => {
            update(w, e.reservationId, &|r| {
                r.state = ReservationState::Reclaimed;
                r.refund = e.refund;
                r.closed = Some(at);
            })?;
            credit_compute(w, e.holder, U256::ZERO, e.refund)?;
        }
        E::Transfer(e) => {
            if !e.from.is_zero() {
                update(w, e.tokenId, &|r| r.holder = e.to)?;
            }
        }
        E::OfferCancelled(e) => w.put::<ClosedOffers>(&e.offerHash, &at)?,
        E::NonceBumped(e) => w.put::<OfferNonces>(&e.provider, &e.nonce)?,
        E::Withdrawn(e) => w.upsert::<ComputeBalances>(&e.account, |b| b.withdrawn += e.amount)?,
        E::Approval(_) | E::ApprovalForAll(_) | E::EIP712DomainChanged(_) => {}
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use alloy::{
        primitives::{B256, LogData, address},
        sol_types::SolEvent,
    };

    use super::*;
    use crate::{
        chain::writer::{IndexWriter, load_root},
        store::{Store, tables::Cursor},
    };

    fn deployment() -> Deployment {
        Deployment {
            chain_id: 31337,
            model_registry: address!("0x00000000000000000000000000000000000000aa"),
            license_market: address!("0x00000000000000000000000000000000000000bb"),
            deployment_block: 1,
            treasury: address!("0x00000000000000000000000000000000000000cc"),
            fee_bps: 250,
            challenge_window: 60,
            compute_market: address!("0x00000000000000000000000000000000000000dd"),
            compute_grace: 3_600,
        }
    }

    fn log(address: Address, data: LogData, block: u64, log_index: u64) -> Log {
        Log {
            inner: alloy::primitives::Log { address, data },
            block_number: Some(block),
            block_hash: Some(B256::repeat_byte(1)),
            transaction_hash: Some(B256::repeat_byte(2)),
            log_index: Some(log_index),
            ..Log::default()
        }
    }

    #[test]
    fn uint256_max_and_large_log_indices_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = deployment();
        let purchased = LicenseMarket::LicensePurchased {
            licenseId: U256::MAX,
            tokenId: U256::MAX - U256::from(1),
            holder: address!("0x00000000000000000000000000000000000000dd"),
            kind: 2,
            price: U256::ZERO,
            expiresAt: u64::MAX,
            escrow: U256::MAX,
            orderHash: B256::repeat_byte(9),
            termIndex: u8::MAX,
        };
        let mut w = IndexWriter::new(&store).unwrap();
        w.begin_block(true);
        apply_log(&mut w, &d, &log(d.license_market, purchased.encode_log_data(), u64::MAX - 1, u64::MAX))
            .unwrap();
        w.end_block(7, B256::repeat_byte(1), B256::ZERO, 0, true).unwrap();
        w.commit(Some(Cursor { number: 7, hash: B256::repeat_byte(1), timestamp: 0 }), None).unwrap();

        let l = store.get::<Licenses>(&U256::MAX).unwrap().expect("stored under uint256 max");
        assert_eq!(l.token_id, U256::MAX - U256::from(1));
        assert_eq!(l.deposited, U256::MAX);
        assert_eq!(l.expires_at, u64::MAX);
        assert_eq!(l.purchased.log_index, u64::MAX);
        assert_eq!(l.purchased.block, u64::MAX - 1);
        assert_eq!(l.term_index, u8::MAX);
    }

    #[test]
    fn unwinding_a_block_restores_records_and_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d = deployment();
        let registered = ModelRegistry::ModelRegistered {
            tokenId: U256::from(1),
            owner: address!("0x00000000000000000000000000000000000000dd"),
            contentHash: B256::repeat_byte(3),
            metadataURI: "ipfs://x".into(),
        };
        let mut w = IndexWriter::new(&store).unwrap();
        w.begin_block(true);
        apply_log(&mut w, &d, &log(d.model_registry, registered.encode_log_data(), 5, 0)).unwrap();
        w.end_block(5, B256::repeat_byte(5), B256::ZERO, 0, true).unwrap();
        let before_second = w.root();
        w.begin_block(true);
        let transfer = ModelRegistry::Transfer {
            from: registered.owner,
            to: address!("0x00000000000000000000000000000000000000ee"),
            tokenId: U256::from(1),
        };
        apply_log(&mut w, &d, &log(d.model_registry, transfer.encode_log_data(), 6, 0)).unwrap();
        w.end_block(6, B256::repeat_byte(6), B256::repeat_byte(5), 0, true).unwrap();
        w.commit(Some(Cursor { number: 6, hash: B256::repeat_byte(6), timestamp: 0 }), None).unwrap();
        assert_eq!(store.get::<Models>(&U256::from(1)).unwrap().unwrap().owner, transfer.to);

        let record = store.get::<crate::store::tables::Blocks>(&6).unwrap().expect("block 6 kept");
        let mut w = IndexWriter::new(&store).unwrap();
        w.unwind_block(6, &record).unwrap();
        w.commit(Some(Cursor { number: 5, hash: B256::repeat_byte(5), timestamp: 0 }), None).unwrap();
        assert_eq!(store.get::<Models>(&U256::from(1)).unwrap().unwrap().owner, registered.owner);
        assert_eq!(load_root(&store).unwrap(), before_second, "the root is back where block 5 left it");

        // a log that does not decode is reported as skippable, and changes nothing
        let mut w = IndexWriter::new(&store).unwrap();
        let garbage = LogData::new_unchecked(vec![B256::repeat_byte(0x42)], vec![1, 2, 3].into());
        let err = apply_log(&mut w, &d, &log(d.license_market, garbage, 7, 0)).unwrap_err();
        assert!(err.is_skippable(), "{err}");
        assert_eq!(w.root(), before_second);
    }
}
