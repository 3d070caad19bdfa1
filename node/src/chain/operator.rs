//! The operator wallet: the node's own account, which settles usage vouchers and sends the
//! compute market's transactions on either side of a job: a buyer's (reserve, reclaim, bump
//! nonce) and a provider's (confirm start, claim, report, finalize).
//!
//! A transaction can sit unmined when the fees it offered fall behind the market (a busy
//! block space, a base fee that climbed). Every later transaction of the wallet would then
//! queue behind it, and settlements would wait past the challenge windows they must beat. So
//! the wallet sends one transaction at a time, at the nonce of the transactions the chain has
//! mined, and when one waits longer than [`FeePolicy::bump_after`] it sends the same call
//! again at the same nonce with higher fees (at least an eighth more, or what the market asks
//! now), up to [`FeePolicy::max_fee_per_gas`]. Whichever of the copies is mined is the
//! answer. A transaction left pending by an earlier run of the node (or one given up on) is
//! replaced the same way, by the next one sent: nothing queues behind it.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use alloy::{
    contract::{CallBuilder, CallDecoder},
    eips::eip2718::Encodable2718,
    network::{Ethereum, EthereumWallet, NetworkTransactionBuilder, TransactionBuilder},
    primitives::B256,
    providers::{DynProvider, Provider, ProviderBuilder},
    rpc::types::{TransactionReceipt, TransactionRequest},
    signers::local::PrivateKeySigner,
    transports::{RpcError, TransportErrorKind},
};
use anyhow::Context as _;

/// How long a transaction is waited for, replacements included, before the send counts as
/// failed (the next send replaces it if it is still pending then).
pub const RECEIPT_WAIT: Duration = Duration::from_secs(120);

/// How long one request to the chain may take (an RPC that stops answering would otherwise
/// hold every later send back).
pub const SEND_WAIT: Duration = Duration::from_secs(60);

/// How many times in a row a send refused as underpriced is tried again with higher fees.
const UNDERPRICED_TRIES: usize = 32;

/// When a pending transaction is sent again with higher fees, and how high they may go.
#[derive(Clone, Copy, Debug)]
pub struct FeePolicy {
    /// How long a transaction may wait unmined before it goes again with higher fees.
    pub bump_after: Duration,
    /// The most the wallet offers per gas (`maxFeePerGas`, wei), whatever the market asks.
    pub max_fee_per_gas: u128,
}

/// EIP-1559's two fee caps of one send, in wei per gas.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fees {
    pub max_fee: u128,
    pub tip: u128,
}

impl Fees {
    /// `self`, held under `cap` (the tip never above the max fee).
    fn capped(self, cap: u128) -> Self {
        let max_fee = self.max_fee.min(cap);
        Self { max_fee, tip: self.tip.min(max_fee) }
    }

    /// The fees of a copy that replaces a send at `self`: each cap an eighth and a wei above
    /// (nodes take a replacement only if both caps rise by 10 %, some by 12.5 %), or the
    /// `market`'s where that is higher, then held under `cap`.
    pub fn replacing(self, market: Self, cap: u128) -> Self {
        let up = |v: u128| v.saturating_add(v / 8).saturating_add(1);
        let tip = up(self.tip).max(market.tip);
        Self { max_fee: up(self.max_fee).max(market.max_fee).max(tip), tip }.capped(cap)
    }
}

/// Why a transaction did not go through.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Rpc(String),
    #[error("the chain did not answer within {SEND_WAIT:?}")]
    Hung,
    #[error("the chain refused the transaction: {0}")]
    Refused(String),
    #[error(
        "nonce {nonce} was not mined within {RECEIPT_WAIT:?} ({sent} sends, the last at {max_fee} wei per gas); \
         the next transaction replaces it"
    )]
    Unmined { nonce: u64, sent: usize, max_fee: u128 },
    #[error("nonce {0} was taken by another transaction of the operator's key (is it used elsewhere?)")]
    NonceTaken(u64),
}

/// A transaction of the wallet's waiting to be mined, as the API shows it.
#[derive(Clone, Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Waiting {
    pub nonce: u64,
    /// The copies sent at this nonce, the first one first (each a replacement of the one before).
    pub hashes: Vec<String>,
    /// The last copy's fee caps, wei per gas (decimal).
    pub max_fee_per_gas: String,
    pub max_priority_fee_per_gas: String,
    /// When the first copy was sent, unix milliseconds.
    pub since_ms: u64,
}

/// What the node answered to one send.
enum Sent {
    Accepted,
    Underpriced,
}

/// The operator wallet, connected to the chain; cheap to clone.
#[derive(Clone)]
pub struct Operator {
    pub signer: PrivateKeySigner,
    pub provider: DynProvider,
    wallet: EthereumWallet,
    /// Asked of the chain at the first send (the node starts while the chain is down).
    chain_id: Arc<tokio::sync::OnceCell<u64>>,
    policy: FeePolicy,
    /// Held from a transaction's first send until it is mined or given up, so that its nonce
    /// is always the count of mined ones.
    sends: Arc<tokio::sync::Mutex<()>>,
    /// The transaction waiting now, if any: kept after a wait is given up on, as it may still
    /// be pending, and the next transaction at its nonce must outbid it.
    pending: Arc<std::sync::Mutex<Option<Pending>>>,
}

/// The copies sent at one nonce, the last at `fees`.
#[derive(Clone)]
struct Pending {
    nonce: u64,
    hashes: Vec<B256>,
    fees: Fees,
    since_ms: u64,
}

impl Operator {
    /// Parses `key` (hex) and connects its wallet to the chain at `url`.
    pub async fn connect(key: &str, url: &str, policy: FeePolicy) -> anyhow::Result<Self> {
        let signer: PrivateKeySigner = key.trim().parse().context("AGORA_OPERATOR_KEY")?;
        let wallet = EthereumWallet::from(signer.clone());
        let provider = ProviderBuilder::new()
            .wallet(wallet.clone())
            .connect(url)
            .await
            .context("cannot connect the operator wallet to the chain")?
            .erased();
        Ok(Self {
            signer,
            provider,
            wallet,
            chain_id: Arc::default(),
            policy,
            sends: Arc::default(),
            pending: Arc::default(),
        })
    }

    /// The transaction of the wallet's waiting to be mined, if any.
    pub fn waiting(&self) -> Option<Waiting> {
        self.pending().map(|p| Waiting {
            nonce: p.nonce,
            hashes: p.hashes.iter().map(ToString::to_string).collect(),
            max_fee_per_gas: p.fees.max_fee.to_string(),
            max_priority_fee_per_gas: p.fees.tip.to_string(),
            since_ms: p.since_ms,
        })
    }

    fn pending(&self) -> Option<Pending> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_pending(&self, pending: Option<Pending>) {
        *self.pending.lock().unwrap_or_else(|p| p.into_inner()) = pending;
    }

    /// Sends `call` from the operator wallet and waits until it is mined, sending it again
    /// with higher fees while it waits (see the module's comment); a call that would revert
    /// is refused before anything is sent.
    pub async fn transact<P, D>(&self, call: CallBuilder<P, D>) -> Result<TransactionReceipt, SendError>
    where
        P: Provider,
        D: CallDecoder,
    {
        let _one_at_a_time = self.sends.lock().await;
        let from = self.signer.address();
        let request = call.into_transaction_request().with_from(from);
        let nonce = ask(self.provider.get_transaction_count(from).latest()).await?;
        let gas = self.estimate(&request, nonce).await?;
        let request = request
            .with_nonce(nonce)
            .with_gas_limit(gas)
            .with_chain_id(*self.chain_id.get_or_try_init(|| ask(self.provider.get_chain_id())).await?);
        let cap = self.policy.max_fee_per_gas;
        let market = self.market_fees().await?;
        let mut fees = match self.pending() {
            Some(left) if left.nonce == nonce => left.fees.replacing(market, cap),
            _ => market.capped(cap),
        };
        let mut hashes = Vec::new();
        for _ in 0..UNDERPRICED_TRIES {
            let (hash, sent) = self.send_at(&request, fees).await?;
            if let Sent::Accepted = sent {
                hashes.push(hash);
                break;
            }
            // a transaction pending at this nonce (from before a restart) asks for more
            let next = fees.replacing(market, cap);
            if next == fees {
                return Err(SendError::Refused(format!(
                    "a transaction pending at nonce {nonce} offers more than the fee cap of {cap} wei per gas"
                )));
            }
            fees = next;
        }
        if hashes.is_empty() {
            return Err(SendError::Refused(format!(
                "underpriced at nonce {nonce} {UNDERPRICED_TRIES} times"
            )));
        }
        let since_ms = crate::registry::now_ms();
        self.set_pending(Some(Pending { nonce, hashes: hashes.clone(), fees, since_ms }));
        // an HTTP RPC cannot tell when a block comes: the chain is asked at the provider's
        // poll interval (250 ms on loopback, 7 s elsewhere), as alloy's own watchers do
        let mut rounds = tokio::time::interval(self.provider.client().poll_interval());
        rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rounds.tick().await; // the first tick is at once
        let (start, mut last_send) = (Instant::now(), Instant::now());
        loop {
            rounds.tick().await;
            // an RPC that fails for a moment is asked again on the next round, until the deadline
            match self.mined(&hashes, nonce).await {
                Ok(None) => {}
                Ok(Some(outcome)) => {
                    self.set_pending(None);
                    return outcome;
                }
                Err(e) => {
                    tracing::warn!(target: "agora::operator", nonce, error = %e, "cannot ask whether the transaction was mined");
                }
            }
            if start.elapsed() >= RECEIPT_WAIT {
                return Err(SendError::Unmined { nonce, sent: hashes.len(), max_fee: fees.max_fee });
            }
            if last_send.elapsed() < self.policy.bump_after {
                continue;
            }
            last_send = Instant::now();
            let next = match self.market_fees().await {
                Ok(market) => fees.replacing(market, cap),
                Err(e) => {
                    tracing::warn!(target: "agora::operator", nonce, error = %e, "cannot read the market's fees");
                    continue;
                }
            };
            if next == fees {
                tracing::warn!(target: "agora::operator", nonce, max_fee = fees.max_fee, "a transaction waits at the fee cap (AGORA_OPERATOR_MAX_FEE_GWEI)");
                continue;
            }
            match self.send_at(&request, next).await {
                Ok((hash, Sent::Accepted)) => {
                    tracing::info!(target: "agora::operator", nonce, %hash, max_fee = next.max_fee, tip = next.tip, "sent again with higher fees");
                    metrics::counter!("agora_operator_fee_bumps_total").increment(1);
                    hashes.push(hash);
                }
                Ok((_, Sent::Underpriced)) => {}
                Err(e) => {
                    tracing::warn!(target: "agora::operator", nonce, error = %e, "cannot send the replacement");
                    continue;
                }
            }
            fees = next;
            self.set_pending(Some(Pending { nonce, hashes: hashes.clone(), fees, since_ms }));
        }
    }

    /// Whether one of `hashes` (the copies sent at `nonce`) was mined: its receipt, or an
    /// error when another transaction took the nonce; `None` while it waits.
    async fn mined(
        &self,
        hashes: &[B256],
        nonce: u64,
    ) -> Result<Option<Result<TransactionReceipt, SendError>>, SendError> {
        // the count first: a copy mined after it is read is still found below
        let mined_past =
            ask(self.provider.get_transaction_count(self.signer.address()).latest()).await? > nonce;
        for hash in hashes {
            if let Some(receipt) = ask(self.provider.get_transaction_receipt(*hash)).await? {
                return Ok(Some(Ok(receipt)));
            }
        }
        Ok(mined_past.then_some(Err(SendError::NonceTaken(nonce))))
    }

    /// The gas `request` takes, as the next block would run it. A copy of this very call left
    /// pending at `nonce` (by a node that died) would be run first there and make it revert,
    /// so when a transaction of the wallet's waits, a revert is asked again of the mined
    /// state; a call that reverts there too is refused.
    async fn estimate(&self, request: &TransactionRequest, nonce: u64) -> Result<u64, SendError> {
        let refused = |e| match e {
            SendError::Rpc(reason) => SendError::Refused(reason),
            other => other,
        };
        let pending = match ask(self.provider.estimate_gas(request.clone()).pending()).await {
            Ok(gas) => return Ok(gas),
            Err(e) => refused(e),
        };
        let waiting =
            ask(self.provider.get_transaction_count(self.signer.address()).pending()).await? > nonce;
        if !waiting {
            return Err(pending);
        }
        ask(self.provider.estimate_gas(request.clone()).latest()).await.map_err(refused)
    }

    /// Sets `agora_operator_balance_wei` every `every` until `shutdown`, so a wallet running
    /// dry is seen before its settlements fail.
    pub async fn watch_balance(self, every: Duration, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
            match ask(self.provider.get_balance(self.signer.address())).await {
                Ok(wei) => metrics::gauge!("agora_operator_balance_wei").set(f64::from(wei)),
                Err(e) => {
                    tracing::debug!(target: "agora::operator", error = %e, "cannot read the wallet's balance")
                }
            }
        }
    }

    /// What the market asks now: alloy's EIP-1559 estimate from the recent blocks' fees.
    async fn market_fees(&self) -> Result<Fees, SendError> {
        let estimate = ask(self.provider.estimate_eip1559_fees()).await?;
        Ok(Fees { max_fee: estimate.max_fee_per_gas, tip: estimate.max_priority_fee_per_gas })
    }

    /// Signs `request` at `fees` and hands it to the chain: its hash and whether it was taken.
    async fn send_at(&self, request: &TransactionRequest, fees: Fees) -> Result<(B256, Sent), SendError> {
        let request =
            request.clone().with_max_fee_per_gas(fees.max_fee).with_max_priority_fee_per_gas(fees.tip);
        let signed =
            <TransactionRequest as NetworkTransactionBuilder<Ethereum>>::build(request, &self.wallet)
                .await
                .map_err(|e| SendError::Rpc(format!("cannot sign the transaction: {e}")))?;
        let hash = *signed.tx_hash();
        match tokio::time::timeout(SEND_WAIT, self.provider.send_raw_transaction(&signed.encoded_2718()))
            .await
        {
            Err(_) => Err(SendError::Hung),
            Ok(Ok(_)) => Ok((hash, Sent::Accepted)),
            Ok(Err(RpcError::ErrorResp(answer))) => {
                let message = answer.message.to_lowercase();
                if message.contains("already known") || message.contains("known transaction") {
                    Ok((hash, Sent::Accepted))
                } else if message.contains("underpriced") {
                    Ok((hash, Sent::Underpriced))
                } else {
                    Err(SendError::Refused(answer.message.to_string()))
                }
            }
            Ok(Err(e)) => Err(SendError::Rpc(e.to_string())),
        }
    }
}

/// Awaits one request to the chain within [`SEND_WAIT`].
async fn ask<T>(
    request: impl std::future::IntoFuture<Output = Result<T, RpcError<TransportErrorKind>>>,
) -> Result<T, SendError> {
    match tokio::time::timeout(SEND_WAIT, request.into_future()).await {
        Err(_) => Err(SendError::Hung),
        Ok(answer) => answer.map_err(|e| SendError::Rpc(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GWEI: u128 = 1_000_000_000;

    #[test]
    fn a_replacement_outbids_its_predecessor_and_follows_the_market_under_the_cap() {
        let sent = Fees { max_fee: 3 * GWEI, tip: GWEI };
        let calm = Fees { max_fee: 2 * GWEI, tip: GWEI / 2 };
        // the market asks less: an eighth and a wei more on each cap, as nodes require
        assert_eq!(sent.replacing(calm, 1_000 * GWEI), Fees { max_fee: 3_375_000_001, tip: 1_125_000_001 });
        // the market asks more: the market's
        let busy = Fees { max_fee: 40 * GWEI, tip: 5 * GWEI };
        assert_eq!(sent.replacing(busy, 1_000 * GWEI), busy);
        // never above the cap, the tip never above the max fee; at the cap it stays put
        let capped = sent.replacing(busy, 4 * GWEI);
        assert_eq!(capped, Fees { max_fee: 4 * GWEI, tip: 4 * GWEI });
        assert_eq!(capped.replacing(busy, 4 * GWEI), capped);
        // a tip above what the market's max fee allows still lifts the max fee with it
        let tipped = Fees { max_fee: GWEI, tip: GWEI };
        let next = tipped.replacing(calm, 1_000 * GWEI);
        assert!(
            next.max_fee >= next.tip && next.tip > tipped.tip && next.max_fee > tipped.max_fee,
            "{next:?}"
        );
        // no overflow at the top
        let top = Fees { max_fee: u128::MAX, tip: u128::MAX };
        assert_eq!(top.replacing(calm, u128::MAX), top);
    }
}
