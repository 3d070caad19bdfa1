// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Test} from "./utils/Test.sol";
import {ComputeMarket} from "../src/ComputeMarket.sol";

/// Deploys a ComputeMarket and gives tests offer and statement signing helpers.
abstract contract ComputeBase is Test {
    ComputeMarket internal compute;
    uint256 internal constant PROVIDER_KEY = 0x9A0;
    uint256 internal constant BUYER_KEY = 0xB0B;
    uint256 internal constant OTHER_KEY = 0xE7E;
    uint64 internal constant GRACE = 1 hours;
    uint256 internal constant PRICE = 2 ether + 7; // odd, so rounding mistakes show
    address internal provider;
    address internal buyer;
    address internal other;

    function setUp() public virtual {
        provider = vm.addr(PROVIDER_KEY);
        buyer = vm.addr(BUYER_KEY);
        other = vm.addr(OTHER_KEY);
        compute = new ComputeMarket(GRACE);
        vm.deal(buyer, 1_000_000 ether);
        vm.deal(other, 1_000_000 ether);
        vm.warp(1_700_000_000);
    }

    function offer() internal view returns (ComputeMarket.Offer memory o) {
        o = ComputeMarket.Offer({
            provider: provider,
            gpu: "H100-80GB",
            gpuCount: 4,
            memoryGb: 80,
            pricePerGpuHour: PRICE,
            kind: uint8(ComputeMarket.Kind.Owned),
            availableFrom: uint64(block.timestamp),
            availableUntil: uint64(block.timestamp + 30 days),
            region: "eu-west",
            node: "12D3KooWAgoraProviderNode",
            nonce: compute.nonces(provider),
            expiry: uint64(block.timestamp + 1 days)
        });
    }

    function sign(uint256 key, bytes32 digest) internal pure returns (bytes memory) {
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(key, digest);
        return abi.encodePacked(r, s, v);
    }

    function reserveAs(address who, ComputeMarket.Offer memory o, uint64 gpuHours, uint64 start)
        internal
        returns (uint256 id)
    {
        bytes memory sig = sign(PROVIDER_KEY, compute.offerHash(o));
        vm.prank(who);
        id = compute.reserve{value: gpuHours * o.pricePerGpuHour}(o, sig, gpuHours, start);
    }

    function statement(uint256 key, uint256 id, uint64 hoursUsed) internal view returns (bytes memory) {
        return sign(key, compute.statementDigest(id, hoursUsed));
    }
}

contract ComputeMarketTest is ComputeBase {
    function test_reserveEscrowsAndMintsTheFuture() public {
        ComputeMarket.Offer memory o = offer();
        uint256 id = reserveAs(buyer, o, 10, 0);
        assertEq(id, 1);
        assertEq(compute.ownerOf(id), buyer);
        assertEq(address(compute).balance, 10 * PRICE);
        assertEq(compute.escrowOf(id), 10 * PRICE);
        ComputeMarket.Reservation memory r = compute.reservations(id);
        assertEq(r.provider, provider);
        assertEq(r.startTime, block.timestamp);
        // 10 GPU-hours on 4 GPUs: three wall-clock hours
        assertEq(r.endTime, block.timestamp + 3 hours);
        assertEq(r.state, uint8(ComputeMarket.State.Reserved));
        assertTrue(compute.closed(compute.offerHash(o)));
    }

    function test_claimPaysHoursUsedAndRefundsTheRest() public {
        uint256 id = reserveAs(buyer, offer(), 10, 0);
        vm.prank(provider);
        compute.confirmStart(id);
        vm.warp(block.timestamp + 2 hours);
        bytes memory sig = statement(BUYER_KEY, id, 7);
        vm.expectEmit(address(compute));
        emit ComputeMarket.Settled(id, buyer, 7, 7 * PRICE, 3 * PRICE);
        vm.prank(provider);
        compute.claim(id, 7, sig);
        assertEq(compute.withdrawable(provider), 7 * PRICE);
        assertEq(compute.withdrawable(buyer), 3 * PRICE);
        assertEq(compute.escrowOf(id), 0);

        uint256 before = provider.balance;
        vm.prank(provider);
        compute.withdraw();
        assertEq(provider.balance - before, 7 * PRICE);
        before = buyer.balance;
        vm.prank(buyer);
        compute.withdraw();
        assertEq(buyer.balance - before, 3 * PRICE);
        assertEq(address(compute).balance, 0);
    }

    function test_aFutureTransferredBeforeStartRefundsItsNewHolder() public {
        uint256 id = reserveAs(buyer, offer(), 8, uint64(block.timestamp + 1 days));
        vm.prank(buyer);
        compute.transferFrom(buyer, other, id);
        assertEq(compute.ownerOf(id), other);
        vm.warp(block.timestamp + 1 days);
        vm.prank(provider);
        compute.confirmStart(id);
        // the old holder's statement no longer counts
        bytes memory stale = statement(BUYER_KEY, id, 2);
        vm.prank(provider);
        vm.expectRevert(ComputeMarket.BadSignature.selector);
        compute.claim(id, 2, stale);
        bytes memory sig = statement(OTHER_KEY, id, 2);
        vm.prank(provider);
        compute.claim(id, 2, sig);
        assertEq(compute.withdrawable(other), 6 * PRICE);
        assertEq(compute.withdrawable(buyer), 0);
    }

    function test_noTransferOnceStarted() public {
        uint256 id = reserveAs(buyer, offer(), 8, 0);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.NotTransferable.selector, id));
        compute.transferFrom(buyer, other, id);
    }

    function test_unconfirmedReservationIsReclaimedAfterGrace() public {
        uint256 id = reserveAs(buyer, offer(), 5, 0);
        uint64 allowedAt = uint64(block.timestamp) + GRACE + 1;
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.TooEarly.selector, id, allowedAt));
        compute.reclaim(id);
        vm.warp(allowedAt);
        vm.prank(provider);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.TooLate.selector, id, allowedAt - 1));
        compute.confirmStart(id);
        vm.prank(other); // anyone may trigger it; the holder is credited
        compute.reclaim(id);
        assertEq(compute.withdrawable(buyer), 5 * PRICE);
        vm.expectRevert(
            abi.encodeWithSelector(ComputeMarket.WrongState.selector, id, uint8(ComputeMarket.State.Reclaimed))
        );
        compute.reclaim(id);
    }

    function test_providerThatVanishesMidJobIsReclaimedAfterTheEnd() public {
        uint256 id = reserveAs(buyer, offer(), 4, 0); // one wall-clock hour
        vm.prank(provider);
        compute.confirmStart(id);
        uint64 allowedAt = uint64(block.timestamp) + 1 hours + GRACE + 1;
        vm.warp(allowedAt - 1);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.TooEarly.selector, id, allowedAt));
        compute.reclaim(id);
        vm.warp(allowedAt);
        compute.reclaim(id);
        assertEq(compute.withdrawable(buyer), 4 * PRICE);
        assertEq(compute.withdrawable(provider), 0);
        vm.prank(provider);
        vm.expectRevert();
        compute.report(id, 4);
    }

    function test_reportThenFinalizeWhenTheHolderNeverSigns() public {
        uint256 id = reserveAs(buyer, offer(), 4, 0);
        vm.prank(provider);
        compute.confirmStart(id);
        vm.warp(block.timestamp + 1 hours);
        vm.prank(provider);
        compute.report(id, 3);
        vm.expectRevert(
            abi.encodeWithSelector(ComputeMarket.TooEarly.selector, id, uint64(block.timestamp) + GRACE)
        );
        compute.finalize(id);
        // a reported reservation can no longer be reclaimed
        vm.warp(block.timestamp + GRACE + 10 hours);
        vm.expectRevert(
            abi.encodeWithSelector(ComputeMarket.WrongState.selector, id, uint8(ComputeMarket.State.Confirmed))
        );
        compute.reclaim(id);
        compute.finalize(id);
        assertEq(compute.withdrawable(provider), 3 * PRICE);
        assertEq(compute.withdrawable(buyer), 1 * PRICE);
    }

    function test_aSignedStatementSettlesEvenAfterAReport() public {
        uint256 id = reserveAs(buyer, offer(), 4, 0);
        vm.startPrank(provider);
        compute.confirmStart(id);
        compute.report(id, 4);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.AlreadyReported.selector, id));
        compute.report(id, 1);
        compute.claim(id, 2, statement(BUYER_KEY, id, 2));
        vm.stopPrank();
        assertEq(compute.withdrawable(provider), 2 * PRICE);
        vm.warp(block.timestamp + GRACE);
        vm.expectRevert(
            abi.encodeWithSelector(ComputeMarket.WrongState.selector, id, uint8(ComputeMarket.State.Settled))
        );
        compute.finalize(id);
    }

    function test_reportAfterTheDeadlineFails() public {
        uint256 id = reserveAs(buyer, offer(), 4, 0);
        vm.prank(provider);
        compute.confirmStart(id);
        uint64 deadline = uint64(block.timestamp) + 1 hours + GRACE;
        vm.warp(deadline + 1);
        vm.prank(provider);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.TooLate.selector, id, deadline));
        compute.report(id, 4);
    }

    function test_onlyTheProviderConfirmsAndClaims() public {
        uint256 id = reserveAs(buyer, offer(), 4, 0);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.NotProvider.selector, id, other));
        compute.confirmStart(id);
        vm.prank(provider);
        compute.confirmStart(id);
        bytes memory sig = statement(BUYER_KEY, id, 1);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.NotProvider.selector, id, buyer));
        compute.claim(id, 1, sig);
        sig = statement(BUYER_KEY, id, 5);
        vm.prank(provider);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.TooManyHours.selector, 5, 4));
        compute.claim(id, 5, sig);
    }

    function test_claimNeedsAConfirmedStart() public {
        uint256 id = reserveAs(buyer, offer(), 4, 0);
        bytes memory sig = statement(BUYER_KEY, id, 1);
        vm.prank(provider);
        vm.expectRevert(
            abi.encodeWithSelector(ComputeMarket.WrongState.selector, id, uint8(ComputeMarket.State.Reserved))
        );
        compute.claim(id, 1, sig);
    }

    function test_anOfferBacksOneReservation() public {
        ComputeMarket.Offer memory o = offer();
        reserveAs(buyer, o, 4, 0);
        bytes memory sig = sign(PROVIDER_KEY, compute.offerHash(o));
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.OfferClosed.selector, compute.offerHash(o)));
        compute.reserve{value: 4 * PRICE}(o, sig, 4, 0);
    }

    function test_reserveRejectsBadOffers() public {
        ComputeMarket.Offer memory o = offer();
        bytes memory sig = sign(PROVIDER_KEY, compute.offerHash(o));
        vm.startPrank(buyer);

        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.WrongPayment.selector, 4 * PRICE, 4 * PRICE - 1));
        compute.reserve{value: 4 * PRICE - 1}(o, sig, 4, 0);

        vm.expectRevert(ComputeMarket.ZeroHours.selector);
        compute.reserve(o, sig, 0, 0);

        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.StartInPast.selector, uint64(block.timestamp - 1)));
        compute.reserve{value: 4 * PRICE}(o, sig, 4, uint64(block.timestamp - 1));

        uint64 late = o.availableUntil;
        vm.expectRevert(
            abi.encodeWithSelector(
                ComputeMarket.OutsideAvailability.selector, late, late + 1 hours, o.availableFrom, o.availableUntil
            )
        );
        compute.reserve{value: 4 * PRICE}(o, sig, 4, late);

        ComputeMarket.Offer memory forged = offer();
        forged.pricePerGpuHour = 1;
        vm.expectRevert(ComputeMarket.BadSignature.selector);
        compute.reserve{value: 4}(forged, sig, 4, 0);

        vm.warp(o.expiry + 1);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.OfferExpired.selector, o.expiry));
        compute.reserve{value: 4 * PRICE}(o, sig, 4, 0);
        vm.stopPrank();
    }

    function test_providersWithdrawOffers() public {
        ComputeMarket.Offer memory o = offer();
        bytes memory sig = sign(PROVIDER_KEY, compute.offerHash(o));
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.NotOfferProvider.selector, provider, other));
        compute.cancel(o);
        vm.prank(provider);
        compute.cancel(o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.OfferClosed.selector, compute.offerHash(o)));
        compute.reserve{value: 4 * PRICE}(o, sig, 4, 0);

        ComputeMarket.Offer memory o2 = offer();
        bytes memory sig2 = sign(PROVIDER_KEY, compute.offerHash(o2));
        vm.prank(provider);
        compute.bumpNonce();
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(ComputeMarket.StaleNonce.selector, 0, 1));
        compute.reserve{value: 4 * PRICE}(o2, sig2, 4, 0);
    }

    function test_withdrawNothingFails() public {
        vm.prank(buyer);
        vm.expectRevert(ComputeMarket.NothingToWithdraw.selector);
        compute.withdraw();
    }

    /// Whatever the hours reserved and used, the provider's pay and the holder's refund add up
    /// to the escrow, to the wei.
    function testFuzz_settlementSplitsTheEscrowExactly(uint64 gpuHours, uint64 hoursUsed, uint96 price, uint32 gpus)
        public
    {
        gpuHours = uint64(bound(gpuHours, 1, 10_000));
        hoursUsed = uint64(bound(hoursUsed, 0, gpuHours));
        gpus = uint32(bound(gpus, 1, 64));
        ComputeMarket.Offer memory o = offer();
        o.pricePerGpuHour = bound(price, 1, 1_000 ether);
        o.gpuCount = gpus;
        o.availableUntil = uint64(block.timestamp + 20_000 hours);
        vm.deal(buyer, uint256(gpuHours) * o.pricePerGpuHour);
        uint256 id = reserveAs(buyer, o, gpuHours, 0);
        vm.prank(provider);
        compute.confirmStart(id);
        bytes memory sig = statement(BUYER_KEY, id, hoursUsed);
        vm.prank(provider);
        compute.claim(id, hoursUsed, sig);
        assertEq(compute.withdrawable(provider), uint256(hoursUsed) * o.pricePerGpuHour);
        assertEq(compute.withdrawable(provider) + compute.withdrawable(buyer), uint256(gpuHours) * o.pricePerGpuHour);
        assertEq(address(compute).balance, uint256(gpuHours) * o.pricePerGpuHour);
    }
}

/// Drives random reservations, transfers, confirmations, claims, reports, reclaims and
/// withdrawals over moving time.
contract ComputeHandler is Test {
    ComputeMarket internal immutable compute;
    uint256 internal constant PROVIDER_KEY = 0x9A0;
    uint256 internal constant HOLDER_KEY_BASE = 0xC000;
    address internal immutable provider;
    uint256 internal offerNonce;

    address[] public accounts;
    uint256[] public ids;
    mapping(address => uint256) internal keyOf;

    constructor(ComputeMarket compute_) {
        compute = compute_;
        provider = vm.addr(PROVIDER_KEY);
        accounts.push(provider);
        for (uint256 i; i < 3; ++i) {
            address a = vm.addr(HOLDER_KEY_BASE + i);
            accounts.push(a);
            keyOf[a] = HOLDER_KEY_BASE + i;
        }
    }

    function accountCount() external view returns (uint256) {
        return accounts.length;
    }

    function idCount() external view returns (uint256) {
        return ids.length;
    }

    function reserve(uint256 who, uint64 gpuHours, uint96 price, uint32 gpus, uint32 delay) external {
        address buyer = accounts[1 + who % 3];
        gpuHours = uint64(bound(gpuHours, 1, 500));
        ComputeMarket.Offer memory o = ComputeMarket.Offer({
            provider: provider,
            gpu: "A100-40GB",
            gpuCount: uint32(bound(gpus, 1, 8)),
            memoryGb: 40,
            pricePerGpuHour: bound(price, 1, 10 ether),
            kind: uint8(offerNonce % 3),
            availableFrom: 0,
            availableUntil: type(uint64).max,
            region: "any",
            node: "12D3KooWAgoraProviderNode",
            nonce: 0,
            expiry: type(uint64).max
        });
        o.memoryGb = uint32(++offerNonce); // every offer distinct
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(PROVIDER_KEY, compute.offerHash(o));
        uint256 value = gpuHours * o.pricePerGpuHour;
        vm.deal(buyer, buyer.balance + value);
        vm.prank(buyer);
        ids.push(
            compute.reserve{value: value}(
                o, abi.encodePacked(r, s, v), gpuHours, uint64(block.timestamp + bound(delay, 0, 2 hours))
            )
        );
    }

    function transfer(uint256 pick, uint256 to) external {
        if (ids.length == 0) return;
        uint256 id = ids[pick % ids.length];
        ComputeMarket.Reservation memory r = compute.reservations(id);
        if (r.state > 2 || block.timestamp >= r.startTime) return;
        address holder = compute.ownerOf(id);
        vm.prank(holder);
        compute.transferFrom(holder, accounts[1 + to % 3], id);
    }

    function confirm(uint256 pick) external {
        if (ids.length == 0) return;
        uint256 id = ids[pick % ids.length];
        ComputeMarket.Reservation memory r = compute.reservations(id);
        if (r.state != 1 || block.timestamp > r.startTime + compute.grace()) return;
        vm.prank(provider);
        compute.confirmStart(id);
    }

    function claim(uint256 pick, uint64 hoursUsed) external {
        if (ids.length == 0) return;
        uint256 id = ids[pick % ids.length];
        ComputeMarket.Reservation memory r = compute.reservations(id);
        if (r.state != 2) return;
        hoursUsed = uint64(bound(hoursUsed, 0, r.gpuHours));
        (uint8 v, bytes32 rr, bytes32 s) = vm.sign(keyOf[compute.ownerOf(id)], compute.statementDigest(id, hoursUsed));
        vm.prank(provider);
        compute.claim(id, hoursUsed, abi.encodePacked(rr, s, v));
    }

    function reportAndFinalize(uint256 pick, uint64 hoursUsed) external {
        if (ids.length == 0) return;
        uint256 id = ids[pick % ids.length];
        ComputeMarket.Reservation memory r = compute.reservations(id);
        if (r.state != 2) return;
        if (r.reportedAt == 0) {
            if (block.timestamp > r.endTime + compute.grace()) return;
            vm.prank(provider);
            compute.report(id, uint64(bound(hoursUsed, 0, r.gpuHours)));
        } else if (block.timestamp >= r.reportedAt + compute.grace()) {
            compute.finalize(id);
        }
    }

    function reclaim(uint256 pick) external {
        if (ids.length == 0) return;
        uint256 id = ids[pick % ids.length];
        ComputeMarket.Reservation memory r = compute.reservations(id);
        if (r.state == 1 && block.timestamp > r.startTime + compute.grace()) compute.reclaim(id);
        else if (r.state == 2 && r.reportedAt == 0 && block.timestamp > r.endTime + compute.grace()) compute.reclaim(id);
    }

    function warp(uint32 secs) external {
        vm.warp(block.timestamp + bound(secs, 0, 6 hours));
    }

    function withdraw(uint256 pick) external {
        address who = accounts[pick % accounts.length];
        if (compute.withdrawable(who) == 0) return;
        vm.prank(who);
        compute.withdraw();
    }
}

contract ComputeInvariantTest is ComputeBase {
    ComputeHandler internal handler;

    function setUp() public override {
        super.setUp();
        handler = new ComputeHandler(compute);
        targetContract(address(handler));
    }

    /// The market's ETH equals the withdrawable balances plus the escrow of open reservations.
    function invariant_everyWeiAccountedFor() public view {
        uint256 owed;
        for (uint256 i; i < handler.accountCount(); ++i) owed += compute.withdrawable(handler.accounts(i));
        for (uint256 i; i < handler.idCount(); ++i) owed += compute.escrowOf(handler.ids(i));
        assertEq(address(compute).balance, owed, "balance == balances + open escrow");
    }
}
