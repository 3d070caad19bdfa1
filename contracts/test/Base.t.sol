// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./utils/Test.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {LicenseMarket} from "../src/LicenseMarket.sol";

/// Deploys the registry and the market and gives tests signing helpers.
abstract contract Base is Test {
    ModelRegistry internal registry;
    LicenseMarket internal market;

    uint256 internal constant SELLER_KEY = 0xA11CE;
    uint256 internal constant BUYER_KEY = 0xB0B;
    uint256 internal constant OTHER_KEY = 0xE7E;
    address internal seller;
    address internal buyer;
    address internal other;
    address internal treasury = address(0x7EA5);
    address internal alice = address(0xA1);
    address internal bob = address(0xB2);
    address internal carol = address(0xC3);

    uint256 internal constant FEE_BPS = 250;
    uint64 internal constant WINDOW = 1 days;
    bytes32 internal constant HASH1 = keccak256("weights v1");
    string internal constant URI = "ipfs://bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi";

    function setUp() public virtual {
        seller = vm.addr(SELLER_KEY);
        buyer = vm.addr(BUYER_KEY);
        other = vm.addr(OTHER_KEY);
        registry = new ModelRegistry();
        market = new LicenseMarket(registry, treasury, uint16(FEE_BPS), WINDOW);
        registry.bindMarket(market);
        vm.deal(buyer, 1_000_000 ether);
        vm.deal(other, 1_000_000 ether);
        vm.warp(1_700_000_000);
    }

    function threeWay() internal view returns (ModelRegistry.Split[] memory s) {
        s = new ModelRegistry.Split[](3);
        s[0] = ModelRegistry.Split(alice, 5000);
        s[1] = ModelRegistry.Split(bob, 3000);
        s[2] = ModelRegistry.Split(carol, 2000);
    }

    function registerAs(address owner) internal returns (uint256 tokenId) {
        vm.prank(owner);
        tokenId = registry.register(HASH1, URI, threeWay());
    }

    function terms3() internal pure returns (LicenseMarket.Term[] memory t) {
        t = new LicenseMarket.Term[](3);
        t[0] = LicenseMarket.Term(uint8(LicenseMarket.Kind.Perpetual), 1 ether, 0, 0, 0);
        t[1] = LicenseMarket.Term(uint8(LicenseMarket.Kind.Timed), 0.1 ether, 30 days, 0, 0);
        t[2] = LicenseMarket.Term(uint8(LicenseMarket.Kind.Usage), 0, 0, 1 gwei, 1_000_000);
    }

    function orderFor(uint256 tokenId) internal view returns (LicenseMarket.Order memory o) {
        o = LicenseMarket.Order({
            seller: seller,
            tokenId: tokenId,
            terms: terms3(),
            nonce: market.nonces(seller),
            expiry: uint64(block.timestamp + 90 days)
        });
    }

    function sign(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    function signOrder(uint256 key, LicenseMarket.Order memory o) internal view returns (bytes memory) {
        return sign(key, market.orderHash(o));
    }

    function signVoucher(uint256 key, uint256 licenseId, uint256 units) internal view returns (bytes memory) {
        return sign(key, market.voucherDigest(licenseId, units));
    }

    function buy(address who, LicenseMarket.Order memory o, uint8 termIndex, uint256 value)
        internal
        returns (uint256 licenseId)
    {
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(who);
        licenseId = market.purchase{value: value}(o, sig, termIndex);
    }

    /// What `amount` pays a recipient with `bps` of the split, before the rounding dust.
    function shareOf(uint256 amount, uint256 bps) internal pure returns (uint256) {
        uint256 fee = amount * FEE_BPS / 10_000;
        return (amount - fee) * bps / 10_000;
    }
}
