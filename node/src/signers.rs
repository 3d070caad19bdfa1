//! Who signed a hash: a key, or a contract wallet speaking for itself (ERC-1271).
//!
//! The contracts check every signature they are given with OpenZeppelin's `SignatureChecker`:
//! the ECDSA signer first and, when that is not the expected address, the address's own
//! `isValidSignature`. The node accepts what they accept and keeps each signature in a form
//! they take: a key's in its one canonical form ([`agora_contracts::recover_signer`]), a
//! contract wallet's as it came, since only the wallet knows its format.

use std::{sync::Arc, time::Duration};

use alloy::{
    primitives::{Address, B256, Bytes},
    providers::DynProvider,
};
use futures::future::BoxFuture;

alloy::sol! {
    #[sol(rpc)]
    interface IERC1271 {
        function isValidSignature(bytes32 hash, bytes signature) external view returns (bytes4);
    }
}

/// ERC-1271's answer for a valid signature: `isValidSignature`'s selector.
const MAGIC: [u8; 4] = [0x16, 0x26, 0xba, 0x7e];

/// How long a contract wallet is given to answer.
const CONTRACT_TIMEOUT: Duration = Duration::from_secs(10);

/// Asks the contract at an address whether it signed `hash` (ERC-1271): `Ok(false)` when it says
/// no, has no code or reverts; `Err` when the chain could not be asked.
pub type ContractCheck =
    Arc<dyn Fn(Address, B256, Bytes) -> BoxFuture<'static, Result<bool, String>> + Send + Sync>;

/// [`ContractCheck`] through the node's RPC provider, at the latest block.
pub fn erc1271(provider: DynProvider) -> ContractCheck {
    Arc::new(move |address, hash, signature| {
        let wallet = IERC1271::new(address, provider.clone());
        Box::pin(async move {
            let call = wallet.isValidSignature(hash, signature);
            match tokio::time::timeout(CONTRACT_TIMEOUT, call.call()).await {
                Err(_) => Err(format!("{address} did not answer within {} s", CONTRACT_TIMEOUT.as_secs())),
                Ok(Ok(magic)) => Ok(magic.0 == MAGIC),
                // the wallet reverted: it does not vouch for the signature; any other error
                // (the node cut off from the chain, rate-limited, a node's internal error) says
                // nothing about the wallet
                Ok(Err(alloy::contract::Error::TransportError(e))) => match e.as_error_resp() {
                    Some(answer) if answer.message.contains("revert") => Ok(false),
                    _ => Err(format!("cannot ask {address}: {e}")),
                },
                // no code (no data back), or an answer that is not a bytes4
                Ok(Err(_)) => Ok(false),
            }
        })
    })
}

/// Why a signature was not taken as an address's.
#[derive(Debug, thiserror::Error)]
pub enum SignerError {
    #[error("{0}")]
    NotSigner(String),
    /// The address may be a contract wallet, and it could not be asked now.
    #[error("{0}")]
    Unavailable(String),
}

/// Checks signatures as the contracts do: keys always, contract wallets when the node can ask
/// the chain.
#[derive(Clone, Default)]
pub struct Signers {
    contracts: Option<(ContractCheck, tokio::runtime::Handle)>,
}

impl Signers {
    /// Key signatures only: every contract wallet's is refused.
    pub fn keys_only() -> Self {
        Self::default()
    }

    /// Keys, and contract wallets asked through `check` on `runtime`.
    pub fn with_contracts(check: ContractCheck, runtime: tokio::runtime::Handle) -> Self {
        Self { contracts: Some((check, runtime)) }
    }

    /// Whether `signature` is `signer`'s over `hash`; if so, the bytes to keep and submit later.
    ///
    /// Blocks while a contract wallet is asked, so call it where blocking is allowed (in
    /// `spawn_blocking`). A key's signature is decided without the chain.
    pub fn signed_by(&self, signer: Address, hash: &B256, signature: &[u8]) -> Result<Vec<u8>, SignerError> {
        let why = match agora_contracts::recover_signer(signature, hash) {
            Ok((recovered, canonical)) if recovered == signer => return Ok(canonical.to_vec()),
            Ok((recovered, _)) => format!("it was signed by {recovered}, not {signer}"),
            Err(e) => e.to_string(),
        };
        let Some((check, runtime)) = &self.contracts else {
            return Err(SignerError::NotSigner(why));
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let asked = check(signer, *hash, Bytes::copy_from_slice(signature));
        runtime.spawn(async move {
            let _ = tx.send(asked.await);
        });
        match rx.recv_timeout(CONTRACT_TIMEOUT + Duration::from_secs(1)) {
            Ok(Ok(true)) => Ok(signature.to_vec()),
            Ok(Ok(false)) => Err(SignerError::NotSigner(format!(
                "{why}, and {signer} is no contract wallet that signed it"
            ))),
            Ok(Err(e)) => Err(SignerError::Unavailable(format!(
                "{why}; {signer} may be a contract wallet, and it cannot be asked now: {e}"
            ))),
            Err(_) => Err(SignerError::Unavailable(format!(
                "{why}; {signer} may be a contract wallet, and it did not answer in time"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::signers::{SignerSync, local::PrivateKeySigner};

    /// A contract check that says yes to one address and counts how often it is asked.
    fn wallet_at(address: Address, asked: Arc<std::sync::atomic::AtomicUsize>) -> ContractCheck {
        Arc::new(move |at, _, _| {
            asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move {
                if at == Address::repeat_byte(0xee) { Err("down".into()) } else { Ok(at == address) }
            })
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keys_are_decided_alone_and_contracts_asked_only_for_the_rest() {
        let key = PrivateKeySigner::random();
        let hash = B256::repeat_byte(3);
        let signature = key.sign_hash_sync(&hash).unwrap().as_bytes();
        let wallet = Address::repeat_byte(0xaa);
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let signers =
            Signers::with_contracts(wallet_at(wallet, asked.clone()), tokio::runtime::Handle::current());
        let count = || asked.load(std::sync::atomic::Ordering::SeqCst);

        let (s, keys_only) = (signers.clone(), Signers::keys_only());
        let key_address = key.address();
        tokio::task::spawn_blocking(move || {
            // the key's signature: canonical, and no contract asked
            assert_eq!(s.signed_by(key_address, &hash, &signature).unwrap(), signature.to_vec());
            // the wallet's: kept as it came, whatever its length
            let odd = [7u8; 97];
            assert_eq!(s.signed_by(wallet, &hash, &odd).unwrap(), odd.to_vec());
            // another address: refused; a chain that cannot be asked: unavailable
            let other = Address::repeat_byte(0xbb);
            assert!(matches!(s.signed_by(other, &hash, &signature), Err(SignerError::NotSigner(m)) if m.contains("not")));
            let down = Address::repeat_byte(0xee);
            assert!(matches!(s.signed_by(down, &hash, &signature), Err(SignerError::Unavailable(m)) if m.contains("down")));
            // without the chain, only keys
            assert!(matches!(keys_only.signed_by(wallet, &hash, &odd), Err(SignerError::NotSigner(_))));
        })
        .await
        .unwrap();
        assert_eq!(count(), 3);
    }
}
