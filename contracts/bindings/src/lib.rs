//! Rust side of Agora's contracts.
//!
//! - [`ModelRegistry`], [`LicenseMarket`] and [`ComputeMarket`]: alloy bindings generated with `sol!` from the
//!   committed compiled artifacts (`contracts/artifacts/*.json`, made by
//!   `scripts/build-contracts`), so the Rust code always matches the deployed bytecode.
//! - [`deploy`]: deploys the three contracts, binds the market to the registry and returns a
//!   [`Deployment`], the JSON file (`data/deployment.json`) every node and CLI reads.
//! - [`order_domain`]: the EIP-712 domain sellers sign orders and buyers sign vouchers under;
//!   [`recover_signer`]: who signed, with the signature in the one form the contracts take.
//! - [`anvil`]: a harness that runs the pinned anvil binary on a free loopback port and kills
//!   it on drop; every test that needs a chain uses it.

pub mod anvil;
mod deploy;

pub use deploy::{DeployError, DeployParams, Deployment, deploy, missing_code};

use alloy::{
    primitives::{Address, B256, Signature, SignatureError, U256},
    sol,
    sol_types::Eip712Domain,
};

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    ModelRegistry,
    "../artifacts/ModelRegistry.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    #[allow(clippy::too_many_arguments)] // generated: LicensePurchased has nine fields
    LicenseMarket,
    "../artifacts/LicenseMarket.json"
);

sol!(
    #[sol(rpc)]
    #[derive(Debug, PartialEq, Eq)]
    #[allow(clippy::too_many_arguments)] // generated: Reserved has nine fields
    ComputeMarket,
    "../artifacts/ComputeMarket.json"
);

/// The EIP-712 domain name of ComputeMarket.
pub const COMPUTE_DOMAIN_NAME: &str = "Agora ComputeMarket";

/// The domain providers sign offers and holders sign usage statements under.
pub fn compute_domain(chain_id: u64, compute_market: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(COMPUTE_DOMAIN_NAME.into()),
        Some("1".into()),
        Some(U256::from(chain_id)),
        Some(compute_market),
        None,
    )
}

/// The EIP-712 domain name of LicenseMarket.
pub const MARKET_DOMAIN_NAME: &str = "Agora LicenseMarket";
/// The EIP-712 domain version of LicenseMarket.
pub const MARKET_DOMAIN_VERSION: &str = "1";

/// Basis points in a whole (a split sums to this).
pub const BPS: u16 = 10_000;

/// Kinds of license terms, as `Term.kind` encodes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TermKind {
    Perpetual = 0,
    Timed = 1,
    Usage = 2,
}

impl TermKind {
    pub fn from_u8(kind: u8) -> Option<Self> {
        match kind {
            0 => Some(Self::Perpetual),
            1 => Some(Self::Timed),
            2 => Some(Self::Usage),
            _ => None,
        }
    }
}

/// The domain orders and vouchers are signed under, for a market on `chain_id`.
pub fn order_domain(chain_id: u64, market: Address) -> Eip712Domain {
    Eip712Domain::new(
        Some(MARKET_DOMAIN_NAME.into()),
        Some(MARKET_DOMAIN_VERSION.into()),
        Some(U256::from(chain_id)),
        Some(market),
        None,
    )
}

/// Who signed `prehash` with a 65-byte `signature`, and that signature in the one form the
/// contracts' `SignatureChecker` takes. A signer's signature may come with `v` as 0/1, 27/28 or
/// EIP-155's, and with `s` in either half of the curve order: each form recovers the same
/// signer, but OpenZeppelin's ECDSA refuses an `s` in the upper half (as malleable) and any `v`
/// but 27 or 28. Whatever a node accepts in order to submit it later (orders, offers, usage
/// vouchers) it keeps, and submits, in the form returned here.
pub fn recover_signer(signature: &[u8], prehash: &B256) -> Result<(Address, [u8; 65]), SignatureError> {
    let signature = Signature::try_from(signature)?;
    // recovered first: it refuses an `s` of zero or past the order, which `normalized_s` assumes
    let signer = signature.recover_address_from_prehash(prehash)?;
    Ok((signer, signature.normalized_s().as_bytes()))
}
