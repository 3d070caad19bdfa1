use agora_contracts::{
    DeployParams, LicenseMarket, ModelRegistry, TermKind, anvil::Anvil, deploy, order_domain, recover_signer,
};
use alloy::{
    network::EthereumWallet,
    primitives::{Address, B256, Bytes, Signature, U256, keccak256},
    providers::{Provider, ProviderBuilder},
    rpc::types::TransactionReceipt,
    signers::{SignerSync, local::PrivateKeySigner},
    sol_types::SolStruct,
};

const FEE_BPS: u16 = 250;

/// The order of secp256k1's group: a signature's `s` and `n - s` are both valid ECDSA.
const SECP256K1N_ORDER: U256 =
    alloy::primitives::uint!(0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141_U256);

fn eth(milli: u64) -> U256 {
    U256::from(milli) * U256::from(10u64).pow(U256::from(15))
}

fn fee(amount: U256) -> U256 {
    amount * U256::from(FEE_BPS) / U256::from(10_000)
}

fn sign(signer: &PrivateKeySigner, hash: B256) -> Bytes {
    Bytes::from(signer.sign_hash_sync(&hash).expect("signing a hash cannot fail").as_bytes().to_vec())
}

fn gas_paid(receipt: &TransactionReceipt) -> U256 {
    U256::from(receipt.gas_used) * U256::from(receipt.effective_gas_price)
}

/// deploy → register → seller signs an order (EIP-712) → a buyer buys each kind → the revenue
/// is split exactly → withdraw moves the ETH.
#[tokio::test]
async fn register_list_buy_each_kind_split_and_withdraw() -> anyhow::Result<()> {
    let anvil = Anvil::spawn()?;
    let deployer = anvil.signer(0);
    let seller = anvil.signer(1);
    let (alice, bob, carol) =
        (anvil.signer(2).address(), anvil.signer(3).address(), anvil.signer(4).address());
    let buyer = anvil.signer(5);
    let treasury = anvil.signer(9).address();

    let mut wallet = EthereumWallet::from(deployer.clone());
    for i in 1..10 {
        wallet.register_signer(anvil.signer(i));
    }
    let provider = ProviderBuilder::new().wallet(wallet).connect(&anvil.endpoint()).await?;
    let deployment = deploy(
        provider.clone(),
        DeployParams { treasury, fee_bps: FEE_BPS, challenge_window: 3600, compute_grace: 3600 },
    )
    .await?;
    assert_eq!(deployment.chain_id, anvil.chain_id());

    let registry = ModelRegistry::new(deployment.model_registry, provider.clone());
    let market = LicenseMarket::new(deployment.license_market, provider.clone());
    assert_eq!(market.treasury().call().await?, treasury);
    assert_eq!(market.feeBps().call().await?, FEE_BPS);
    assert_eq!(registry.market().call().await?, deployment.license_market);

    // register with a 3-way split
    let splits = vec![
        ModelRegistry::Split { recipient: alice, bps: 5000 },
        ModelRegistry::Split { recipient: bob, bps: 3000 },
        ModelRegistry::Split { recipient: carol, bps: 2000 },
    ];
    let content_hash = keccak256(b"model weights");
    let receipt = registry
        .register(content_hash, "ipfs://model".into(), splits)
        .from(seller.address())
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    println!("gas: register (3 recipients) {}", receipt.gas_used);
    let registered =
        receipt.decoded_log::<ModelRegistry::ModelRegistered>().expect("ModelRegistered emitted");
    let token_id = registered.tokenId;
    assert_eq!(registered.owner, seller.address());
    assert_eq!(registry.ownerOf(token_id).call().await?, seller.address());
    assert_eq!(registry.contentHashOf(token_id, 1).call().await?, content_hash);

    // the seller signs an order off-chain
    let order = LicenseMarket::Order {
        seller: seller.address(),
        tokenId: token_id,
        terms: vec![
            LicenseMarket::Term {
                kind: TermKind::Perpetual as u8,
                price: eth(1000),
                duration: 0,
                unitPrice: U256::ZERO,
                maxUnits: U256::ZERO,
            },
            LicenseMarket::Term {
                kind: TermKind::Timed as u8,
                price: eth(100),
                duration: 30 * 86_400,
                unitPrice: U256::ZERO,
                maxUnits: U256::ZERO,
            },
            LicenseMarket::Term {
                kind: TermKind::Usage as u8,
                price: U256::ZERO,
                duration: 0,
                unitPrice: U256::from(1_000_000_000u64),
                maxUnits: U256::from(1_000_000u64),
            },
        ],
        nonce: U256::ZERO,
        expiry: u64::MAX,
    };
    let domain = order_domain(deployment.chain_id, deployment.license_market);
    let order_hash = order.eip712_signing_hash(&domain);
    assert_eq!(
        market.orderHash(order.clone()).call().await?,
        order_hash,
        "Rust and Solidity agree on the EIP-712 hash"
    );
    let signature = sign(&seller, order_hash);

    // a buyer buys each kind
    let escrow = U256::from(1_000u64) * U256::from(1_000_000_000u64);
    let mut license_ids = Vec::new();
    for (term, value) in [(0u8, eth(1000)), (1, eth(100)), (2, escrow)] {
        let receipt = market
            .purchase(order.clone(), signature.clone(), term)
            .value(value)
            .from(buyer.address())
            .send()
            .await?
            .get_receipt()
            .await?;
        assert!(receipt.status(), "purchase of term {term}");
        println!("gas: purchase term {term} {}", receipt.gas_used);
        let purchased =
            receipt.decoded_log::<LicenseMarket::LicensePurchased>().expect("LicensePurchased emitted");
        assert_eq!(purchased.holder, buyer.address());
        assert_eq!(purchased.tokenId, token_id);
        assert_eq!(purchased.kind, term);
        assert_eq!(purchased.orderHash, order_hash);
        license_ids.push(purchased.licenseId);
    }
    assert_eq!(license_ids, vec![U256::from(1), U256::from(2), U256::from(3)]);
    assert!(market.isActive(license_ids[1]).call().await?);

    // usage: the buyer signs a voucher, anyone settles it
    let usage_id = license_ids[2];
    let units = U256::from(400u64);
    let digest = market.voucherDigest(usage_id, units).call().await?;
    let receipt = market
        .settleUsage(usage_id, units, sign(&buyer, digest))
        .from(treasury)
        .send()
        .await?
        .get_receipt()
        .await?;
    assert!(receipt.status());
    println!("gas: settleUsage {}", receipt.gas_used);
    let settled_value = units * U256::from(1_000_000_000u64);

    // a voucher signed by someone else is refused
    let forged = sign(&anvil.signer(6), market.voucherDigest(usage_id, U256::from(500u64)).call().await?);
    assert!(market.settleUsage(usage_id, U256::from(500u64), forged).from(treasury).call().await.is_err());

    // The buyer's own voucher in the forms the contract refuses (`s` in the upper half, `v` as
    // 0/1, both): `recover_signer` finds the buyer in each and gives back the one form it takes.
    let units = U256::from(450u64);
    let digest = market.voucherDigest(usage_id, units).call().await?;
    let signed = buyer.sign_hash_sync(&digest)?;
    let flipped = Signature::new(signed.r(), SECP256K1N_ORDER - signed.s(), !signed.v());
    for (form, raw) in [
        ("upper s", flipped.as_bytes()),
        ("v as parity", signed.as_rsy()),
        ("upper s, v as parity", flipped.as_rsy()),
    ] {
        let refused =
            market.settleUsage(usage_id, units, Bytes::from(raw.to_vec())).from(treasury).call().await;
        assert!(refused.is_err(), "the contract took a voucher with {form}");
        let (signer, canonical) = recover_signer(&raw, &digest)?;
        assert_eq!(signer, buyer.address(), "{form}");
        assert_eq!(canonical, signed.as_bytes(), "{form}");
        let taken =
            market.settleUsage(usage_id, units, Bytes::from(canonical.to_vec())).from(treasury).call().await;
        assert!(taken.is_ok(), "{form}: {taken:?}");
    }

    // the split, to the wei
    let receipt = market.distribute(token_id).from(treasury).send().await?.get_receipt().await?;
    assert!(receipt.status());
    let paid = [eth(1000), eth(100), settled_value];
    let total_fee: U256 = paid.iter().map(|&a| fee(a)).sum();
    let net: U256 = paid.iter().map(|&a| a - fee(a)).sum();
    let bob_share = net * U256::from(3000) / U256::from(10_000);
    let carol_share = net * U256::from(2000) / U256::from(10_000);
    let alice_share = net - bob_share - carol_share;
    assert_eq!(market.balanceOf(alice).call().await?, alice_share);
    assert_eq!(market.balanceOf(bob).call().await?, bob_share);
    assert_eq!(market.balanceOf(carol).call().await?, carol_share);
    assert_eq!(market.withdrawable(treasury).call().await?, total_fee);
    let credited: U256 = receipt
        .inner
        .logs()
        .iter()
        .filter_map(|log| log.log_decode::<LicenseMarket::Credited>().ok())
        .map(|log| log.inner.data.amount)
        .sum();
    assert_eq!(credited, net, "Credited events add up to the net revenue");
    assert_eq!(
        provider.get_balance(deployment.license_market).await?,
        net + total_fee + (escrow - settled_value),
        "the market holds balances, fees and the unsettled escrow"
    );

    // withdraw moves the ETH
    for (who, owed) in [(alice, alice_share), (treasury, total_fee)] {
        let before = provider.get_balance(who).await?;
        let receipt = market.withdraw().from(who).send().await?.get_receipt().await?;
        assert!(receipt.status());
        println!("gas: withdraw {}", receipt.gas_used);
        let after = provider.get_balance(who).await?;
        assert_eq!(after + gas_paid(&receipt), before + owed, "{who} received exactly its balance");
        assert_eq!(market.withdrawable(who).call().await?, U256::ZERO);
    }
    Ok(())
}

/// After a transfer of the model token, the previous owner's order no longer sells.
#[tokio::test]
async fn order_dies_with_a_transfer() -> anyhow::Result<()> {
    let anvil = Anvil::spawn()?;
    let seller = anvil.signer(1);
    let new_owner: Address = anvil.signer(2).address();
    let mut wallet = EthereumWallet::from(anvil.signer(0));
    for i in 1..4 {
        wallet.register_signer(anvil.signer(i));
    }
    let provider = ProviderBuilder::new().wallet(wallet).connect(&anvil.endpoint()).await?;
    let treasury = anvil.signer(0).address();
    let deployment = deploy(provider.clone(), DeployParams { treasury, ..DeployParams::default() }).await?;
    let registry = ModelRegistry::new(deployment.model_registry, provider.clone());
    let market = LicenseMarket::new(deployment.license_market, provider.clone());
    let splits = vec![ModelRegistry::Split { recipient: seller.address(), bps: 10_000 }];
    registry
        .register(keccak256(b"w"), String::new(), splits)
        .from(seller.address())
        .send()
        .await?
        .get_receipt()
        .await?;
    let order = LicenseMarket::Order {
        seller: seller.address(),
        tokenId: U256::from(1),
        terms: vec![LicenseMarket::Term {
            kind: 0,
            price: eth(1),
            duration: 0,
            unitPrice: U256::ZERO,
            maxUnits: U256::ZERO,
        }],
        nonce: U256::ZERO,
        expiry: u64::MAX,
    };
    let signature = sign(
        &seller,
        order.eip712_signing_hash(&order_domain(deployment.chain_id, deployment.license_market)),
    );
    registry
        .transferFrom(seller.address(), new_owner, U256::from(1))
        .from(seller.address())
        .send()
        .await?
        .get_receipt()
        .await?;
    let err = market
        .purchase(order, signature, 0)
        .value(eth(1))
        .from(anvil.signer(3).address())
        .call()
        .await
        .expect_err("an order of a previous owner must not sell");
    let revert = err.as_decoded_interface_error::<LicenseMarket::LicenseMarketErrors>();
    assert!(
        matches!(revert, Some(LicenseMarket::LicenseMarketErrors::NotTokenOwner(ref e)) if e.owner == new_owner),
        "{err}"
    );
    Ok(())
}
