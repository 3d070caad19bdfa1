//! The operator wallet: the node's own account, which settles usage vouchers and sends the
//! compute market's transactions on either side of a job: a buyer's (reserve, reclaim, bump
//! nonce) and a provider's (confirm start, claim, report, finalize).

use std::{sync::Arc, time::Duration};

use alloy::{
    contract::{CallBuilder, CallDecoder},
    network::{Ethereum, EthereumWallet},
    providers::{DynProvider, PendingTransactionBuilder, Provider, ProviderBuilder},
    signers::local::PrivateKeySigner,
    transports::TransportErrorKind,
};
use anyhow::Context as _;

/// How long a sent transaction's receipt is awaited before the send counts as failed.
pub const RECEIPT_WAIT: Duration = Duration::from_secs(120);

/// How long filling and handing over a transaction may take (an RPC that stops answering
/// would otherwise hold every later send back).
pub const SEND_WAIT: Duration = Duration::from_secs(60);

/// The operator wallet, connected to the chain; cheap to clone.
#[derive(Clone)]
pub struct Operator {
    pub signer: PrivateKeySigner,
    pub provider: DynProvider,
    /// Held while a transaction is filled and handed to the chain.
    sends: Arc<tokio::sync::Mutex<()>>,
}

impl Operator {
    /// Parses `key` (hex) and connects its wallet to the chain at `url`.
    pub async fn connect(key: &str, url: &str) -> anyhow::Result<Self> {
        let signer: PrivateKeySigner = key.trim().parse().context("AGORA_OPERATOR_KEY")?;
        // Each nonce is the chain's pending count: a remembered one would run ahead after a
        // send the chain refused (an empty wallet, say), and every later transaction would
        // wait forever behind the gap. Sends go one at a time (`send`) so two never read the
        // same count.
        let provider = ProviderBuilder::new()
            .with_simple_nonce_management()
            .wallet(EthereumWallet::from(signer.clone()))
            .connect(url)
            .await
            .context("cannot connect the operator wallet to the chain")?
            .erased();
        Ok(Self { signer, provider, sends: Arc::default() })
    }

    /// Sends `call` from the operator wallet, within [`SEND_WAIT`]; its receipt is awaited at
    /// most [`RECEIPT_WAIT`].
    pub async fn send<P, D>(
        &self,
        call: CallBuilder<P, D>,
    ) -> Result<PendingTransactionBuilder<Ethereum>, alloy::contract::Error>
    where
        P: Provider,
        D: CallDecoder,
    {
        let _one_at_a_time = self.sends.lock().await;
        let sent = tokio::time::timeout(SEND_WAIT, call.send()).await.map_err(|_| {
            TransportErrorKind::custom_str(&format!(
                "the chain did not take the transaction within {SEND_WAIT:?}"
            ))
        })?;
        Ok(sent?.with_timeout(Some(RECEIPT_WAIT)))
    }
}
