//! A deployed market on a fresh anvil, with helpers that make on-chain activity.

use agora_contracts::{
    DeployParams, Deployment, LicenseMarket, ModelRegistry, anvil::Anvil, deploy, order_domain,
};
use alloy::{
    network::EthereumWallet,
    primitives::{Address, B256, Bytes, U256, keccak256},
    providers::{DynProvider, Provider, ProviderBuilder, ext::AnvilApi},
    signers::{SignerSync, local::PrivateKeySigner},
    sol_types::SolStruct,
};

/// Anvil with the contracts deployed; accounts: 0 deployer and treasury, 1 seller, 2..=4 split
/// recipients, 5..=9 buyers.
pub struct Market {
    pub anvil: Anvil,
    pub provider: DynProvider,
    pub deployment: Deployment,
    pub registry: ModelRegistry::ModelRegistryInstance<DynProvider>,
    pub market: LicenseMarket::LicenseMarketInstance<DynProvider>,
    pub dir: tempfile::TempDir,
}

pub const UNIT_PRICE: u64 = 1_000_000_000;

alloy::sol!(
    #[sol(rpc)]
    SmartWallet,
    "../contracts/artifacts/test/SmartWallet.json"
);

/// The same signer's other valid ECDSA signature of the same hash: `s` mirrored to the other
/// half of secp256k1's group order, the parity flipped. The contracts refuse it (malleable).
pub fn mirrored(signature: &alloy::primitives::Signature) -> alloy::primitives::Signature {
    const ORDER: U256 =
        alloy::primitives::uint!(0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141_U256);
    alloy::primitives::Signature::new(signature.r(), ORDER - signature.s(), !signature.v())
}

/// Waits (boundedly) for a sent transaction's receipt and checks that it succeeded.
///
/// Polls `eth_getTransactionReceipt` rather than alloy's block watcher: after a snapshot revert
/// the same transaction (same sender, nonce and calldata, so the same hash) is sent again, and
/// the watcher, which remembers the blocks of the abandoned branch, reports it mined before the
/// new branch holds it.
#[allow(async_fn_in_trait)] // used in tests only, on one runtime
pub trait Mined {
    async fn mined(self) -> alloy::rpc::types::TransactionReceipt;
}

impl Mined for alloy::providers::PendingTransactionBuilder<alloy::network::Ethereum> {
    async fn mined(self) -> alloy::rpc::types::TransactionReceipt {
        let hash = *self.tx_hash();
        let provider = self.provider().clone();
        let receipt = crate::eventually(&format!("the receipt of {hash}"), RECEIPT_TIMEOUT, || {
            let provider = provider.clone();
            async move { provider.get_transaction_receipt(hash).await.expect("eth_getTransactionReceipt") }
        })
        .await;
        assert!(receipt.status(), "transaction {} reverted", receipt.transaction_hash);
        receipt
    }
}
const RECEIPT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Market {
    pub async fn start() -> Self {
        Self::start_with(Anvil::builder()).await
    }

    pub async fn start_with(builder: agora_contracts::anvil::AnvilBuilder) -> Self {
        let anvil = builder.spawn().expect("anvil starts");
        let mut wallet = EthereumWallet::from(anvil.signer(0));
        for i in 1..10 {
            wallet.register_signer(anvil.signer(i));
        }
        // Fresh nonces for every transaction: the tests revert the chain to snapshots, which a
        // nonce cache would not notice.
        let provider = ProviderBuilder::new()
            .disable_recommended_fillers()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(wallet)
            .connect(&anvil.endpoint())
            .await
            .unwrap()
            .erased();
        let deployment = deploy(
            provider.clone(),
            DeployParams {
                treasury: anvil.signer(0).address(),
                fee_bps: 250,
                challenge_window: 3600,
                compute_grace: 3600,
            },
        )
        .await
        .unwrap();
        let registry = ModelRegistry::new(deployment.model_registry, provider.clone());
        let market = LicenseMarket::new(deployment.license_market, provider.clone());
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("deployment.json"),
            serde_json::to_string_pretty(&deployment).unwrap(),
        )
        .unwrap();
        Self { anvil, provider, deployment, registry, market, dir }
    }

    pub fn deployment_path(&self) -> String {
        self.dir.path().join("deployment.json").display().to_string()
    }

    pub fn address(&self, i: usize) -> Address {
        self.anvil.signer(i).address()
    }

    pub fn signer(&self, i: usize) -> PrivateKeySigner {
        self.anvil.signer(i)
    }

    /// A contract wallet (`contracts/test/fixtures/SmartWallet.sol`) owned by account `owner`.
    pub async fn smart_wallet(&self, owner: usize) -> SmartWallet::SmartWalletInstance<DynProvider> {
        let address = SmartWallet::deploy_builder(self.provider.clone(), self.address(owner))
            .from(self.address(owner))
            .deploy()
            .await
            .expect("the wallet deploys");
        SmartWallet::new(address, self.provider.clone())
    }

    /// A contract wallet's signature of `hash` (ERC-1271): its owner's of the wallet's
    /// replay-safe hash, which the owner's key alone does not make.
    pub fn wallet_signature(&self, wallet: Address, owner: usize, hash: B256) -> Bytes {
        use alloy::sol_types::SolValue;
        let safe = keccak256((U256::from(self.deployment.chain_id), wallet, hash).abi_encode());
        Bytes::from(self.signer(owner).sign_hash_sync(&safe).unwrap().as_bytes().to_vec())
    }

    /// Sends `data` with `value` wei to `target` through `wallet`, as its owner `owner`.
    pub async fn through_wallet(
        &self,
        wallet: &SmartWallet::SmartWalletInstance<DynProvider>,
        owner: usize,
        target: Address,
        value: U256,
        data: Bytes,
    ) -> alloy::rpc::types::TransactionReceipt {
        wallet
            .execute(target, value, data)
            .value(value)
            .from(self.address(owner))
            .send()
            .await
            .unwrap()
            .mined()
            .await
    }

    pub async fn head(&self) -> (u64, B256) {
        let block = self
            .provider
            .get_block_by_number(alloy::eips::BlockNumberOrTag::Latest)
            .await
            .unwrap()
            .expect("a latest block");
        (block.header.number, block.header.hash)
    }

    /// Registers a model from the seller (account 1) with a 50/30/20 split to accounts 2..=4.
    pub async fn register(&self, salt: &str) -> U256 {
        self.register_content(keccak256(salt.as_bytes()), &format!("ipfs://{salt}")).await
    }

    /// Registers a model with the given content hash, as [`Self::register`] does.
    pub async fn register_content(&self, content_hash: B256, metadata_uri: &str) -> U256 {
        let receipt = self
            .registry
            .register(content_hash, metadata_uri.to_owned(), self.splits())
            .from(self.address(1))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        receipt.decoded_log::<ModelRegistry::ModelRegistered>().expect("registered").tokenId
    }

    /// The 50/30/20 split to accounts 2..=4.
    pub fn splits(&self) -> Vec<ModelRegistry::Split> {
        vec![
            ModelRegistry::Split { recipient: self.address(2), bps: 5000 },
            ModelRegistry::Split { recipient: self.address(3), bps: 3000 },
            ModelRegistry::Split { recipient: self.address(4), bps: 2000 },
        ]
    }

    /// Registers a model with the given content hash as `wallet` (which then owns the token),
    /// sent by its owner `owner`, with [`Self::splits`].
    pub async fn register_through(
        &self,
        wallet: &SmartWallet::SmartWalletInstance<DynProvider>,
        owner: usize,
        content_hash: B256,
        metadata_uri: &str,
    ) -> U256 {
        let data =
            self.registry.register(content_hash, metadata_uri.to_owned(), self.splits()).calldata().clone();
        let receipt = self.through_wallet(wallet, owner, *self.registry.address(), U256::ZERO, data).await;
        receipt.decoded_log::<ModelRegistry::ModelRegistered>().expect("registered").tokenId
    }

    pub fn order(&self, token_id: U256, nonce: U256) -> (LicenseMarket::Order, Bytes) {
        let order = LicenseMarket::Order {
            seller: self.address(1),
            tokenId: token_id,
            terms: vec![
                LicenseMarket::Term {
                    kind: 0,
                    price: U256::from(10u64).pow(U256::from(17)),
                    duration: 0,
                    unitPrice: U256::ZERO,
                    maxUnits: U256::ZERO,
                },
                LicenseMarket::Term {
                    kind: 1,
                    price: U256::from(10u64).pow(U256::from(16)),
                    duration: 30 * 86_400,
                    unitPrice: U256::ZERO,
                    maxUnits: U256::ZERO,
                },
                LicenseMarket::Term {
                    kind: 2,
                    price: U256::ZERO,
                    duration: 0,
                    unitPrice: U256::from(UNIT_PRICE),
                    maxUnits: U256::from(1_000_000u64),
                },
            ],
            nonce,
            expiry: u64::MAX,
        };
        let hash = order
            .eip712_signing_hash(&order_domain(self.deployment.chain_id, self.deployment.license_market));
        let sig = self.signer(1).sign_hash_sync(&hash).unwrap();
        (order, Bytes::from(sig.as_bytes().to_vec()))
    }

    /// Buys term `term` (0 perpetual, 1 timed, 2 usage with 1000 units) as `buyer`.
    pub async fn buy(&self, token_id: U256, buyer: usize, term: u8) -> U256 {
        let (order, sig) = self.order(token_id, self.seller_nonce().await);
        let value = order.terms[term as usize].price
            + if term == 2 { U256::from(1000u64 * UNIT_PRICE) } else { U256::ZERO };
        let receipt = self
            .market
            .purchase(order, sig, term)
            .value(value)
            .from(self.address(buyer))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
        match receipt.decoded_log::<LicenseMarket::LicensePurchased>() {
            Some(purchased) => purchased.licenseId,
            // buying a timed term again while the license is active extends it
            None => {
                receipt
                    .decoded_log::<LicenseMarket::LicenseExtended>()
                    .expect("purchased or extended")
                    .licenseId
            }
        }
    }

    /// Sends a purchase without waiting for it to be mined.
    pub async fn send_buy(&self, token_id: U256, buyer: usize, term: u8, nonce: u64) -> B256 {
        let (order, sig) = self.order(token_id, self.seller_nonce().await);
        let value = order.terms[term as usize].price
            + if term == 2 { U256::from(1000u64 * UNIT_PRICE) } else { U256::ZERO };
        *self
            .market
            .purchase(order, sig, term)
            .value(value)
            .from(self.address(buyer))
            .nonce(nonce)
            .gas(300_000)
            .send()
            .await
            .unwrap()
            .tx_hash()
    }

    pub async fn settle(&self, license_id: U256, holder: usize, units: u64) {
        let digest = self.market.voucherDigest(license_id, U256::from(units)).call().await.unwrap();
        let sig = Bytes::from(self.signer(holder).sign_hash_sync(&digest).unwrap().as_bytes().to_vec());
        self.market
            .settleUsage(license_id, U256::from(units), sig)
            .from(self.address(0))
            .send()
            .await
            .unwrap()
            .mined()
            .await;
    }

    pub async fn distribute(&self, token_id: U256) {
        self.market.distribute(token_id).from(self.address(0)).send().await.unwrap().mined().await;
    }

    pub async fn withdraw(&self, who: usize) {
        self.market.withdraw().from(self.address(who)).send().await.unwrap().mined().await;
    }

    pub async fn cancel(&self, token_id: U256, nonce: U256) {
        let (order, _) = self.order(token_id, nonce);
        self.market.cancel(order).from(self.address(1)).send().await.unwrap().mined().await;
    }

    /// The seller's current order nonce on-chain.
    pub async fn seller_nonce(&self) -> U256 {
        self.market.nonces(self.address(1)).call().await.unwrap()
    }

    pub async fn bump_nonce(&self) {
        self.market.bumpNonce().from(self.address(1)).send().await.unwrap().mined().await;
    }

    pub async fn mine(&self, blocks: u64) {
        self.provider.anvil_mine(Some(blocks), None).await.unwrap();
    }

    pub async fn snapshot(&self) -> U256 {
        self.provider.anvil_snapshot().await.unwrap()
    }

    pub async fn revert(&self, id: U256) {
        assert!(self.provider.anvil_revert(id).await.unwrap(), "evm_revert");
    }

    /// Replaces the last `depth` blocks with empty ones.
    pub async fn reorg(&self, depth: u64) {
        self.provider
            .anvil_reorg(alloy::rpc::types::anvil::ReorgOptions { depth, tx_block_pairs: vec![] })
            .await
            .unwrap();
    }

    pub async fn nonce_of(&self, who: usize) -> u64 {
        self.provider.get_transaction_count(self.address(who)).await.unwrap()
    }

    pub async fn set_automine(&self, on: bool) {
        self.provider.anvil_set_auto_mine(on).await.unwrap();
    }
}
