//! The market as the index sees it: models, licenses, royalty balances and earnings.
//!
//! [`MarketView`] answers the read API from one consistent snapshot of the store, so every
//! answer is as of exactly one indexed block (its [`AsOf`]). Amounts are wei as decimal
//! strings: JSON numbers cannot hold a `uint256`.

pub mod delivery;
pub mod forensics;
pub mod orders;

use agora_contracts::TermKind;
use alloy::primitives::{Address, B256, U256};
use serde::Serialize;

use crate::{
    chain::indexer::IndexStatus,
    store::{
        Store, StoreError, View,
        tables::{
            Balances, Earnings as EarningsTable, HolderLicenses, LicenseRecord, Licenses, Meta, MetaKey,
            MetaValue, ModelRecord, Models, Orders, Origin, RecipientModels, Revenue, TokenLicenses,
            TokenOrders, Versions,
        },
    },
};

/// The block an answer is as of.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct AsOf {
    /// Last indexed block (null before the first).
    pub block: Option<u64>,
    #[schema(value_type = Option<String>)]
    pub hash: Option<B256>,
    /// `final` once the block is `confirmations` deep, else `latest`.
    pub finality: Finality,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Finality {
    Latest,
    Final,
}

impl Finality {
    fn of(block: u64, status: &IndexStatus) -> Self {
        match status.final_block {
            Some(final_block) if block <= final_block => Self::Final,
            _ => Self::Latest,
        }
    }
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Provenance {
    pub block: u64,
    #[schema(value_type = String)]
    pub tx: B256,
    pub log_index: u64,
}

impl From<Origin> for Provenance {
    fn from(o: Origin) -> Self {
        Self { block: o.block, tx: o.tx, log_index: o.log_index }
    }
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SplitView {
    #[schema(value_type = String)]
    pub recipient: Address,
    pub bps: u16,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ModelSummary {
    /// Decimal token id.
    pub token_id: String,
    #[schema(value_type = String)]
    pub owner: Address,
    pub metadata_uri: String,
    pub version_count: u32,
    #[schema(value_type = Option<String>)]
    pub latest_content_hash: Option<B256>,
    pub splits: Vec<SplitView>,
    pub registered: Provenance,
    pub finality: Finality,
    /// Signed listings alive now (signer owns the token, nonce current, not cancelled or expired).
    pub active_orders: Vec<OrderView>,
}

/// A signed listing.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct OrderView {
    #[schema(value_type = String)]
    pub order_hash: B256,
    pub order: orders::OrderJson,
    /// 0x-hex, 65 bytes.
    pub signature: String,
    /// `local` (posted to this node) or `peer` (received from the network).
    pub source: String,
    /// The peer it came from (`source: peer`).
    pub peer_id: Option<String>,
    /// Unix milliseconds.
    pub received_ms: u64,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct VersionView {
    pub version: u32,
    #[schema(value_type = String)]
    pub content_hash: B256,
    pub anchored: Provenance,
}

#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct LicenseCounts {
    pub perpetual: u64,
    pub timed: u64,
    pub usage: u64,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ModelDetail {
    #[serde(flatten)]
    pub summary: ModelSummary,
    pub versions: Vec<VersionView>,
    pub license_counts: LicenseCounts,
    /// Revenue booked for the model (after fees) and how much is distributed.
    pub revenue_earned: String,
    pub revenue_distributed: String,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct EscrowView {
    pub deposited: String,
    pub settled_units: String,
    pub settled_amount: String,
    pub unsettled: String,
    pub closable_at: Option<u64>,
    pub closed: bool,
    pub refund: String,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct LicenseView {
    pub license_id: String,
    pub token_id: String,
    #[schema(value_type = String)]
    pub holder: Address,
    /// perpetual, timed or usage.
    pub kind: String,
    /// Whether it gives access now, by chain time.
    pub active: bool,
    /// Timed licenses: end of access, unix seconds.
    pub expires_at: Option<u64>,
    pub paid: String,
    pub escrow: Option<EscrowView>,
    #[schema(value_type = String)]
    pub order_hash: B256,
    pub term_index: u8,
    pub purchase: Provenance,
    pub finality: Finality,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct ModelEarnings {
    pub token_id: String,
    /// Credited so far for this model (royalties, and fees for the treasury).
    pub credited: String,
    /// This account's share of the model's revenue not yet distributed (rounded down).
    pub pending: String,
    /// Current share of the split, if the account is a recipient.
    pub bps: Option<u16>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Earnings {
    #[schema(value_type = String)]
    pub address: Address,
    pub credited: String,
    pub royalties: String,
    pub fees: String,
    pub refunds: String,
    pub withdrawn: String,
    pub withdrawable: String,
    /// Share of undistributed revenue; `distribute` (or `distributeAndWithdraw`) credits it.
    pub pending: String,
    pub per_model: Vec<ModelEarnings>,
}

#[derive(Clone, Debug, Default)]
pub struct ModelFilter {
    pub owner: Option<Address>,
    /// Case-insensitive text in the metadata URI.
    pub text: Option<String>,
    pub newest_first: bool,
    pub limit: usize,
    /// Continue after this token id.
    pub after: Option<U256>,
}

#[derive(Clone, Debug, Default)]
pub struct LicenseFilter {
    pub holder: Option<Address>,
    pub token_id: Option<U256>,
    pub limit: usize,
    pub after: Option<U256>,
}

/// A page of results and the cursor of the next page (None: last page).
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<U256>,
}

pub(crate) fn kind_name(kind: u8) -> String {
    match TermKind::from_u8(kind) {
        Some(TermKind::Perpetual) => "perpetual".into(),
        Some(TermKind::Timed) => "timed".into(),
        Some(TermKind::Usage) => "usage".into(),
        None => format!("unknown({kind})"),
    }
}

fn u256_from_key(key: &[u8]) -> U256 {
    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(&key[key.len() - 32..]);
    U256::from_be_bytes(bytes)
}

/// Reads of the market from one snapshot, with the indexer's status for finality and time.
pub struct MarketView<'a> {
    view: View<'a>,
    status: IndexStatus,
}

impl<'a> MarketView<'a> {
    pub fn new(store: &'a Store, status: IndexStatus) -> Self {
        Self { view: store.view(), status }
    }

    pub fn as_of(&self) -> Result<AsOf, StoreError> {
        let cursor = match self.view.get::<Meta>(&MetaKey::Cursor)? {
            Some(MetaValue::Cursor(c)) => Some(c),
            _ => None,
        };
        Ok(AsOf {
            block: cursor.map(|c| c.number),
            hash: cursor.map(|c| c.hash),
            finality: cursor.map_or(Finality::Latest, |c| Finality::of(c.number, &self.status)),
        })
    }

    /// Chain time: the head's timestamp, else the indexed block's.
    fn now(&self) -> Result<u64, StoreError> {
        if let Some(t) = self.status.head_timestamp {
            return Ok(t);
        }
        Ok(match self.view.get::<Meta>(&MetaKey::Cursor)? {
            Some(MetaValue::Cursor(c)) => c.timestamp,
            _ => 0,
        })
    }

    fn summary(&self, token_id: U256, m: &ModelRecord) -> Result<ModelSummary, StoreError> {
        let latest = match m.version_count {
            0 => None,
            v => self.view.get::<Versions>(&(token_id, v))?.map(|r| r.content_hash),
        };
        Ok(ModelSummary {
            token_id: token_id.to_string(),
            owner: m.owner,
            metadata_uri: m.metadata_uri.clone(),
            version_count: m.version_count,
            latest_content_hash: latest,
            splits: m.splits.iter().map(|s| SplitView { recipient: s.recipient, bps: s.bps }).collect(),
            registered: m.registered.into(),
            finality: Finality::of(m.registered.block, &self.status),
            active_orders: self.active_orders(token_id)?,
        })
    }

    /// The model's listings that are alive now.
    pub fn active_orders(&self, token_id: U256) -> Result<Vec<OrderView>, StoreError> {
        let now = self.now()?;
        let mut out = Vec::new();
        for item in self.view.scan::<TokenOrders>(&token_id.to_be_bytes::<32>(), None, false) {
            let (key, ()) = item?;
            let hash = B256::from_slice(&key[32..64]);
            if let Some(view) = self.order(hash, now)?.filter(|(_, dead)| dead.is_none()).map(|(v, _)| v) {
                out.push(view);
            }
        }
        Ok(out)
    }

    /// A kept order and why it is dead, if it is.
    pub fn order(
        &self,
        hash: B256,
        now: u64,
    ) -> Result<Option<(OrderView, Option<orders::OrderError>)>, StoreError> {
        let Some(record) = self.view.get::<Orders>(&hash)? else { return Ok(None) };
        let Some(order) = orders::decode(&record) else { return Ok(None) };
        let dead = orders::dead_reason(&self.view, &order, hash, now)?;
        let view = OrderView {
            order_hash: hash,
            order: orders::OrderJson::from_order(&order),
            signature: alloy::primitives::hex::encode_prefixed(&record.signature),
            source: if record.source.starts_with("peer:") { "peer".into() } else { record.source.clone() },
            peer_id: record.source.strip_prefix("peer:").map(str::to_owned),
            received_ms: record.received_ms,
        };
        Ok(Some((view, dead)))
    }

    /// Chain time as the market judges expiry.
    pub fn chain_now(&self) -> Result<u64, StoreError> {
        self.now()
    }

    pub fn models(&self, filter: &ModelFilter) -> Result<Page<ModelSummary>, StoreError> {
        let start = filter.after.map(|after| {
            let next =
                if filter.newest_first { after.saturating_sub(U256::from(1)) } else { after + U256::from(1) };
            next.to_be_bytes::<32>().to_vec()
        });
        if filter.newest_first && filter.after == Some(U256::ZERO) {
            return Ok(Page { items: Vec::new(), next: None });
        }
        let text = filter.text.as_ref().map(|t| t.to_lowercase());
        let mut items = Vec::new();
        let mut last = None;
        for item in self.view.scan::<Models>(&[], start.as_deref(), filter.newest_first) {
            let (key, model) = item?;
            let token_id = u256_from_key(&key);
            if model.registered.block == 0 && model.version_count == 0 {
                continue; // minted but not yet registered in this block range
            }
            if filter.owner.is_some_and(|o| o != model.owner) {
                continue;
            }
            if text.as_ref().is_some_and(|t| !model.metadata_uri.to_lowercase().contains(t.as_str())) {
                continue;
            }
            if items.len() == filter.limit {
                return Ok(Page { items, next: last });
            }
            items.push(self.summary(token_id, &model)?);
            last = Some(token_id);
        }
        Ok(Page { items, next: None })
    }

    pub fn model(&self, token_id: U256) -> Result<Option<ModelDetail>, StoreError> {
        let Some(model) = self.view.get::<Models>(&token_id)? else { return Ok(None) };
        let prefix = token_id.to_be_bytes::<32>();
        let mut versions = Vec::new();
        for item in self.view.scan::<Versions>(&prefix, None, false) {
            let (key, v) = item?;
            let version = u32::from_be_bytes(key[32..36].try_into().expect("version keys are 36 bytes"));
            versions.push(VersionView { version, content_hash: v.content_hash, anchored: v.anchored.into() });
        }
        let mut counts = LicenseCounts::default();
        for item in self.view.scan::<TokenLicenses>(&prefix, None, false) {
            let (key, ()) = item?;
            if let Some(l) = self.view.get::<Licenses>(&u256_from_key(&key))? {
                match TermKind::from_u8(l.kind) {
                    Some(TermKind::Perpetual) => counts.perpetual += 1,
                    Some(TermKind::Timed) => counts.timed += 1,
                    Some(TermKind::Usage) => counts.usage += 1,
                    None => {}
                }
            }
        }
        let revenue = self.view.get::<Revenue>(&token_id)?.unwrap_or_default();
        Ok(Some(ModelDetail {
            summary: self.summary(token_id, &model)?,
            versions,
            license_counts: counts,
            revenue_earned: revenue.earned.to_string(),
            revenue_distributed: revenue.distributed.to_string(),
        }))
    }

    fn license_view(&self, id: U256, l: &LicenseRecord, now: u64) -> LicenseView {
        let kind = TermKind::from_u8(l.kind);
        let active = match kind {
            Some(TermKind::Perpetual) => true,
            Some(TermKind::Timed) => l.expires_at > now,
            Some(TermKind::Usage) => !l.closed,
            None => false,
        };
        let escrow = (kind == Some(TermKind::Usage)).then(|| EscrowView {
            deposited: l.deposited.to_string(),
            settled_units: l.settled_units.to_string(),
            settled_amount: l.settled_amount.to_string(),
            unsettled: if l.closed { U256::ZERO } else { l.deposited.saturating_sub(l.settled_amount) }
                .to_string(),
            closable_at: l.closable_at,
            closed: l.closed,
            refund: l.refund.to_string(),
        });
        LicenseView {
            license_id: id.to_string(),
            token_id: l.token_id.to_string(),
            holder: l.holder,
            kind: kind_name(l.kind),
            active,
            expires_at: (kind == Some(TermKind::Timed)).then_some(l.expires_at),
            paid: l.paid.to_string(),
            escrow,
            order_hash: l.order_hash,
            term_index: l.term_index,
            purchase: l.purchased.into(),
            finality: Finality::of(l.purchased.block, &self.status),
        }
    }

    pub fn license(&self, id: U256) -> Result<Option<LicenseView>, StoreError> {
        let now = self.now()?;
        Ok(self.view.get::<Licenses>(&id)?.map(|l| self.license_view(id, &l, now)))
    }

    pub fn licenses(&self, filter: &LicenseFilter) -> Result<Page<LicenseView>, StoreError> {
        let now = self.now()?;
        let after = filter.after.map(|a| a + U256::from(1));
        // Walk the narrowest index; check the other condition on each record.
        let ids: Box<dyn Iterator<Item = Result<U256, StoreError>> + '_> =
            match (filter.holder, filter.token_id) {
                (Some(holder), _) => {
                    let start = after.map(|a| [holder.as_slice(), &a.to_be_bytes::<32>()].concat());
                    Box::new(
                        self.view
                            .scan::<HolderLicenses>(holder.as_slice(), start.as_deref(), false)
                            .map(|r| r.map(|(k, ())| u256_from_key(&k))),
                    )
                }
                (None, Some(token)) => {
                    let prefix = token.to_be_bytes::<32>();
                    let start = after.map(|a| [prefix.as_slice(), &a.to_be_bytes::<32>()].concat());
                    Box::new(
                        self.view
                            .scan::<TokenLicenses>(&prefix, start.as_deref(), false)
                            .map(|r| r.map(|(k, ())| u256_from_key(&k))),
                    )
                }
                (None, None) => {
                    let start = after.map(|a| a.to_be_bytes::<32>().to_vec());
                    Box::new(
                        self.view
                            .scan::<Licenses>(&[], start.as_deref(), false)
                            .map(|r| r.map(|(k, _)| u256_from_key(&k))),
                    )
                }
            };
        let mut items = Vec::new();
        let mut last = None;
        for id in ids {
            let id = id?;
            let Some(l) = self.view.get::<Licenses>(&id)? else { continue };
            if filter.token_id.is_some_and(|t| t != l.token_id) {
                continue;
            }
            if items.len() == filter.limit {
                return Ok(Page { items, next: last });
            }
            items.push(self.license_view(id, &l, now));
            last = Some(id);
        }
        Ok(Page { items, next: None })
    }

    pub fn earnings(&self, address: Address) -> Result<Earnings, StoreError> {
        let balance = self.view.get::<Balances>(&address)?.unwrap_or_default();
        let mut per_model: Vec<ModelEarnings> = Vec::new();
        for item in self.view.scan::<EarningsTable>(address.as_slice(), None, false) {
            let (key, credited) = item?;
            per_model.push(ModelEarnings {
                token_id: u256_from_key(&key).to_string(),
                credited: credited.to_string(),
                pending: "0".into(),
                bps: None,
            });
        }
        let mut pending_total = U256::ZERO;
        for item in self.view.scan::<RecipientModels>(address.as_slice(), None, false) {
            let (key, bps) = item?;
            let token_id = u256_from_key(&key);
            let revenue = self.view.get::<Revenue>(&token_id)?.unwrap_or_default();
            let pending =
                revenue.earned.saturating_sub(revenue.distributed) * U256::from(bps) / U256::from(10_000u64);
            pending_total += pending;
            let token = token_id.to_string();
            match per_model.iter_mut().find(|m| m.token_id == token) {
                Some(m) => {
                    m.pending = pending.to_string();
                    m.bps = Some(bps);
                }
                None => per_model.push(ModelEarnings {
                    token_id: token,
                    credited: "0".into(),
                    pending: pending.to_string(),
                    bps: Some(bps),
                }),
            }
        }
        Ok(Earnings {
            address,
            credited: balance.credited().to_string(),
            royalties: balance.royalties.to_string(),
            fees: balance.fees.to_string(),
            refunds: balance.refunds.to_string(),
            withdrawn: balance.withdrawn.to_string(),
            withdrawable: balance.withdrawable().to_string(),
            pending: pending_total.to_string(),
            per_model,
        })
    }
}
