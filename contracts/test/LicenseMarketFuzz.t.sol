// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {LicenseMarket} from "../src/LicenseMarket.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";

// secp256k1 group order, for the malleability test.
uint256 constant SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141;

contract LicenseMarketFuzzTest is Base {
    uint256 internal tokenId;

    function setUp() public override {
        super.setUp();
        tokenId = registerAs(seller);
    }

    function sumBalances(address[] memory who) internal view returns (uint256 sum) {
        for (uint256 i; i < who.length; ++i) sum += market.balanceOf(who[i]);
    }

    /// Credited sum + fee == price exactly, for any price and any split.
    function testFuzz_split_noWeiCreatedOrLost(uint256 price, uint8 n, uint256 seed) public {
        price = bound(price, 1, 1e30);
        n = uint8(bound(n, 1, 16));
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](n);
        address[] memory who = new address[](n);
        uint256 left = 10_000;
        for (uint256 i; i < n; ++i) {
            uint256 bps = i == n - 1 ? left : bound(uint256(keccak256(abi.encode(seed, i))), 1, left - (n - 1 - i));
            left -= bps;
            who[i] = address(uint160(0x1000 + i));
            s[i] = ModelRegistry.Split(who[i], uint16(bps));
        }
        vm.prank(seller);
        registry.setSplits(tokenId, s);
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[0].price = price;
        vm.deal(buyer, price);
        buy(buyer, o, 0, price);
        market.distribute(tokenId);
        uint256 fee = market.withdrawable(treasury);
        assertEq(fee, price * FEE_BPS / 10_000, "fee");
        assertEq(sumBalances(who) + fee, price, "credited + fee == price");
        for (uint256 i = 1; i < n; ++i) {
            assertEq(market.balanceOf(who[i]), (price - fee) * s[i].bps / 10_000, "recipient share");
        }
    }

    /// The same holds for usage settlements.
    function testFuzz_settle_noWeiCreatedOrLost(uint96 unitPrice, uint64 units, uint64 used) public {
        unitPrice = uint96(bound(unitPrice, 1, 1e24));
        units = uint64(bound(units, 1, 1e6));
        used = uint64(bound(used, 1, units));
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[2].unitPrice = unitPrice;
        o.terms[2].maxUnits = units;
        uint256 escrow = uint256(unitPrice) * units;
        vm.deal(buyer, escrow);
        uint256 id = buy(buyer, o, 2, escrow);
        market.settleUsage(id, used, signVoucher(BUYER_KEY, id, used));
        market.distribute(tokenId);
        address[] memory who = new address[](3);
        (who[0], who[1], who[2]) = (alice, bob, carol);
        assertEq(sumBalances(who) + market.feesAccrued(), uint256(used) * unitPrice, "settled amount credited exactly");
        vm.prank(buyer);
        market.requestClose(id);
        vm.warp(block.timestamp + WINDOW);
        market.close(id);
        assertEq(market.balanceOf(buyer), uint256(units - used) * unitPrice, "refund");
        assertEq(address(market).balance, escrow, "nothing left unaccounted");
    }

    // ------------------------------------------------------------ signatures

    function testFuzz_sig_wrongSigner(uint256 key) public {
        key = bound(key, 1, SECP256K1_N - 1);
        vm.assume(key != SELLER_KEY);
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(key, o);
        vm.prank(buyer);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function testFuzz_sig_modifiedOrder(uint256 price, uint256 nonceDelta, uint64 expiry, uint8 field) public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        field = uint8(bound(field, 0, 3));
        if (field == 0) {
            vm.assume(price != o.terms[0].price);
            o.terms[0].price = price;
        } else if (field == 1) {
            o.nonce += bound(nonceDelta, 1, 1e18);
        } else if (field == 2) {
            vm.assume(expiry != o.expiry);
            o.expiry = expiry;
        } else {
            o.terms[1].duration += 1;
        }
        vm.prank(buyer);
        vm.deal(buyer, o.terms[0].price);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.purchase{value: o.terms[0].price}(o, sig, 0);
    }

    function testFuzz_sig_replayAfterCancel(uint8 termIndex) public {
        termIndex = uint8(bound(termIndex, 0, 1));
        LicenseMarket.Order memory o = orderFor(tokenId);
        uint256 price = o.terms[termIndex].price;
        buy(buyer, o, termIndex, price); // the order is reusable until cancelled
        vm.prank(seller);
        market.cancel(o);
        bytes memory sig = signOrder(SELLER_KEY, o);
        bytes32 hash = market.orderHash(o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.OrderIsCancelled.selector, hash));
        market.purchase{value: price}(o, sig, termIndex);
    }

    function testFuzz_sig_replayAfterNonceBump(uint8 bumps) public {
        bumps = uint8(bound(bumps, 1, 5));
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        for (uint256 i; i < bumps; ++i) {
            vm.prank(seller);
            market.bumpNonce();
        }
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.StaleNonce.selector, 0, bumps));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function testFuzz_sig_previousOwnerAfterTransfer(uint256 newOwnerKey) public {
        newOwnerKey = bound(newOwnerKey, 1, SECP256K1_N - 1);
        vm.assume(newOwnerKey != SELLER_KEY);
        address newOwner = vm.addr(newOwnerKey);
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(seller);
        registry.transferFrom(seller, newOwner, tokenId);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotTokenOwner.selector, seller, newOwner));
        market.purchase{value: 1 ether}(o, sig, 0);
        // the new owner's own order works
        o.seller = newOwner;
        o.nonce = market.nonces(newOwner);
        sig = signOrder(newOwnerKey, o);
        vm.prank(buyer);
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    /// The same signature with s' = n − s (and the other v) recovers the same signer; it is refused.
    function testFuzz_sig_malleable(uint256 expiryOffset) public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.expiry = uint64(block.timestamp + bound(expiryOffset, 1, 365 days));
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(SELLER_KEY, market.orderHash(o));
        bytes memory flipped = abi.encodePacked(r, bytes32(SECP256K1_N - uint256(s)), v == 27 ? uint8(28) : uint8(27));
        vm.prank(buyer);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.purchase{value: 1 ether}(o, flipped, 0);
        bytes memory good = abi.encodePacked(r, s, v);
        vm.prank(buyer);
        market.purchase{value: 1 ether}(o, good, 0);
    }

    // ------------------------------------------------------------ vouchers

    function buyUsage(address who, uint256 units) internal returns (uint256) {
        return buy(who, orderFor(tokenId), 2, units * 1 gwei);
    }

    function testFuzz_voucher_replayAndDecreasing(uint64 first, uint64 second) public {
        uint256 id = buyUsage(buyer, 10_000);
        first = uint64(bound(first, 1, 10_000));
        second = uint64(bound(second, 0, first));
        market.settleUsage(id, first, signVoucher(BUYER_KEY, id, first));
        bytes memory sig = signVoucher(BUYER_KEY, id, second);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.UnitsNotIncreasing.selector, second, first));
        market.settleUsage(id, second, sig);
    }

    function testFuzz_voucher_beyondEscrow(uint256 units) public {
        uint256 id = buyUsage(buyer, 10_000);
        units = bound(units, 10_001, type(uint128).max);
        bytes memory sig = signVoucher(BUYER_KEY, id, units);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.BeyondEscrow.selector, units, 10_000));
        market.settleUsage(id, units, sig);
    }

    function testFuzz_voucher_signedBySomeoneElse(uint256 key, uint64 units) public {
        key = bound(key, 1, SECP256K1_N - 1);
        vm.assume(key != BUYER_KEY);
        units = uint64(bound(units, 1, 10_000));
        uint256 id = buyUsage(buyer, 10_000);
        bytes memory sig = signVoucher(key, id, units);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.settleUsage(id, units, sig);
    }

    function testFuzz_voucher_forAnotherLicense(uint64 units) public {
        units = uint64(bound(units, 1, 1_000));
        uint256 a = buyUsage(buyer, 1_000);
        uint256 b = buyUsage(buyer, 1_000);
        bytes memory sig = signVoucher(BUYER_KEY, a, units);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.settleUsage(b, units, sig);
        market.settleUsage(a, units, sig);
    }

    // ------------------------------------------------------------ time

    function testFuzz_time_orderExpiryBoundary(uint64 expiryOffset, uint64 at) public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.expiry = uint64(block.timestamp + bound(expiryOffset, 0, 365 days));
        bytes memory sig = signOrder(SELLER_KEY, o);
        uint256 t = bound(at, block.timestamp, uint256(o.expiry) + 10 days);
        vm.warp(t);
        vm.prank(buyer);
        if (t > o.expiry) vm.expectRevert(abi.encodeWithSelector(LicenseMarket.OrderExpired.selector, o.expiry));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function testFuzz_time_timedExpiryAndExtension(uint64 duration, uint64 elapsed) public {
        duration = uint64(bound(duration, 1, 3650 days));
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[1].duration = duration;
        o.expiry = type(uint64).max;
        uint256 start = block.timestamp;
        uint256 id = buy(buyer, o, 1, 0.1 ether);
        uint256 t = start + bound(elapsed, 0, 2 * uint256(duration));
        vm.warp(t);
        bool active = t < start + duration;
        assertTrue(market.isActive(id) == active, "active iff before expiry");
        uint256 again = buy(buyer, o, 1, 0.1 ether);
        if (active) {
            assertEq(again, id, "extended");
            assertEq(market.licenses(id).expiresAt, start + 2 * uint256(duration), "from the old expiry");
        } else {
            assertTrue(again != id, "new license");
            assertEq(market.licenses(again).expiresAt, t + duration, "from now");
        }
    }

    function testFuzz_time_closeWindow(uint64 wait) public {
        uint256 id = buyUsage(buyer, 1_000);
        market.settleUsage(id, 10, signVoucher(BUYER_KEY, id, 10));
        vm.prank(buyer);
        market.requestClose(id);
        uint256 closableAt = block.timestamp + WINDOW;
        uint256 t = block.timestamp + bound(wait, 0, 2 * WINDOW);
        vm.warp(t);
        if (t < closableAt) {
            vm.expectRevert(abi.encodeWithSelector(LicenseMarket.ChallengeWindowOpen.selector, uint64(closableAt)));
            market.close(id);
            market.settleUsage(id, 20, signVoucher(BUYER_KEY, id, 20)); // still settles inside the window
        } else {
            market.close(id);
            assertEq(market.balanceOf(buyer), 990 gwei, "refund of the unsettled");
        }
    }
}
