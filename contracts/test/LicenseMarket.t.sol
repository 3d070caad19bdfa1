// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {LicenseMarket} from "../src/LicenseMarket.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {IERC721Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {SmartWallet} from "./fixtures/SmartWallet.sol";

contract LicenseMarketTest is Base {
    uint256 internal tokenId;

    function setUp() public override {
        super.setUp();
        tokenId = registerAs(seller);
    }

    // ------------------------------------------------------------ constructor

    function test_constructor_rejectsHighFee() public {
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.FeeTooHigh.selector, 1001, 1000));
        new LicenseMarket(registry, treasury, 1001, WINDOW);
    }

    function test_constructor_rejectsZeroTreasury() public {
        vm.expectRevert(LicenseMarket.ZeroTreasury.selector);
        new LicenseMarket(registry, address(0), 100, WINDOW);
    }

    // ------------------------------------------------------------ perpetual

    function test_purchase_perpetual_creditsSplitExactly() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        uint256 id = buy(buyer, o, 0, 1 ether);
        (uint128 earned, uint128 distributed) = market.revenueOf(tokenId);
        assertEq(earned, 1 ether - 1 ether * FEE_BPS / 10_000, "booked as the model's revenue");
        assertEq(distributed, 0, "not yet split");
        assertEq(market.distribute(tokenId), earned, "distributed amount");
        assertEq(market.distribute(tokenId), 0, "nothing twice");
        assertEq(id, 1, "license id");
        LicenseMarket.License memory l = market.licenses(id);
        assertEq(l.holder, buyer, "holder");
        assertEq(l.kind, 0, "kind");
        assertEq(l.tokenId, tokenId, "token");
        assertTrue(market.isActive(id), "active");
        uint256 fee = 1 ether * FEE_BPS / 10_000;
        assertEq(market.withdrawable(treasury), fee, "fee");
        assertEq(market.feesAccrued(), fee, "fee accrued");
        assertEq(market.balanceOf(alice), (1 ether - fee) * 5000 / 10_000, "alice");
        assertEq(market.balanceOf(bob), (1 ether - fee) * 3000 / 10_000, "bob");
        assertEq(market.balanceOf(carol), (1 ether - fee) * 2000 / 10_000, "carol");
        assertEq(address(market).balance, 1 ether, "held");
    }

    function test_purchase_dustGoesToFirstRecipient() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[0].price = 1001; // fee 25, net 976: 488 + 292.8 + 195.2
        buy(buyer, o, 0, 1001);
        market.distribute(tokenId);
        assertEq(market.withdrawable(treasury), 25, "fee");
        assertEq(market.balanceOf(bob), 292, "bob rounds down");
        assertEq(market.balanceOf(carol), 195, "carol rounds down");
        assertEq(market.balanceOf(alice), 976 - 292 - 195, "alice takes the dust");
    }

    function test_purchase_wrongPayment() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.WrongPayment.selector, 1 ether, 1 ether - 1));
        market.purchase{value: 1 ether - 1}(o, sig, 0);
    }

    function test_purchase_zeroPriceTerm() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[0].price = 0;
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.InvalidTerm.selector, 0, "zero price"));
        market.purchase(o, sig, 0);
    }

    function test_purchase_noSuchTerm() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NoSuchTerm.selector, 3, 3));
        market.purchase(o, sig, 3);
    }

    function test_purchase_unknownKind() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[0].kind = 7;
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.InvalidTerm.selector, 0, "unknown kind"));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_purchase_badSignature() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(OTHER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_purchase_garbageSignature() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        vm.prank(buyer);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.purchase{value: 1 ether}(o, hex"1234", 0);
    }

    function test_purchase_sellerNotOwner() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.seller = other;
        bytes memory sig = signOrder(OTHER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotTokenOwner.selector, other, seller));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_purchase_unknownToken() public {
        LicenseMarket.Order memory o = orderFor(99);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 99));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_purchase_expired() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.warp(o.expiry + 1);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.OrderExpired.selector, o.expiry));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_purchase_atExpiryStillWorks() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        vm.warp(o.expiry);
        buy(buyer, o, 0, 1 ether);
    }

    function test_cancel_killsOrder() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(seller);
        market.cancel(o);
        bytes32 hash = market.orderHash(o);
        assertTrue(market.cancelled(hash), "cancelled");
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.OrderIsCancelled.selector, hash));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_cancel_onlySeller() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotSeller.selector, seller, other));
        market.cancel(o);
    }

    function test_bumpNonce_killsAllOrders() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(seller);
        market.bumpNonce();
        assertEq(market.nonces(seller), 1, "nonce");
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.StaleNonce.selector, 0, 1));
        market.purchase{value: 1 ether}(o, sig, 0);
        buy(buyer, orderFor(tokenId), 0, 1 ether); // a fresh order carries the new nonce
    }

    function test_transfer_killsPreviousOwnersOrders() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(seller);
        registry.transferFrom(seller, other, tokenId);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotTokenOwner.selector, seller, other));
        market.purchase{value: 1 ether}(o, sig, 0);
    }

    function test_splitChange_paysNewSplit() public {
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](1);
        s[0] = ModelRegistry.Split(other, 10_000);
        buy(buyer, orderFor(tokenId), 0, 1 ether); // earned under the old split
        vm.prank(seller);
        registry.setSplits(tokenId, s); // distributes what the old split earned
        uint256 net = 1 ether - 1 ether * FEE_BPS / 10_000;
        assertEq(market.balanceOf(alice), net * 5000 / 10_000, "old split paid for the old sale");
        buy(buyer, orderFor(tokenId), 0, 1 ether);
        market.distribute(tokenId);
        assertEq(market.balanceOf(other), net, "new split paid for the new sale");
        assertEq(market.balanceOf(alice), net * 5000 / 10_000, "old split gets nothing new");
    }

    // ------------------------------------------------------------ timed

    function test_timed_expiresAndExtends() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        uint256 id = buy(buyer, o, 1, 0.1 ether);
        uint256 expiresAt = block.timestamp + 30 days;
        assertEq(market.licenses(id).expiresAt, expiresAt, "expiry");
        assertTrue(market.isActive(id), "active");
        vm.warp(block.timestamp + 10 days);
        uint256 again = buy(buyer, o, 1, 0.1 ether);
        assertEq(again, id, "same license extended");
        assertEq(market.licenses(id).expiresAt, expiresAt + 30 days, "extended from the expiry");
        vm.warp(expiresAt + 30 days);
        assertTrue(!market.isActive(id), "expired at its expiry");
        uint256 renewed = buy(buyer, o, 1, 0.1 ether);
        assertTrue(renewed != id, "a new license after expiry");
        assertEq(market.licenses(renewed).expiresAt, block.timestamp + 30 days, "fresh expiry");
        assertEq(market.licenseCount(), 2, "two licenses");
    }

    function test_timed_otherBuyerGetsOwnLicense() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        uint256 a = buy(buyer, o, 1, 0.1 ether);
        uint256 b = buy(other, o, 1, 0.1 ether);
        assertTrue(a != b, "distinct holders, distinct licenses");
    }

    function test_timed_zeroDuration() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[1].duration = 0;
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.InvalidTerm.selector, 1, "zero duration"));
        market.purchase{value: 0.1 ether}(o, sig, 1);
    }

    // ------------------------------------------------------------ usage

    function buyUsage(uint256 units) internal returns (uint256 id) {
        id = buy(buyer, orderFor(tokenId), 2, units * 1 gwei);
    }

    function test_usage_escrowHeldNotPaid() public {
        uint256 id = buyUsage(1000);
        LicenseMarket.Escrow memory e = market.escrowOf(id);
        assertEq(e.deposited, 1000 gwei, "deposited");
        assertEq(e.unitPrice, 1 gwei, "unit price");
        assertEq(e.maxUnits, 1_000_000, "max units");
        (uint128 earned,) = market.revenueOf(tokenId);
        assertEq(earned, 0, "nothing earned yet");
        assertTrue(market.isActive(id), "active");
    }

    function test_usage_badEscrow() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.startPrank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.BadEscrow.selector, 0, 1 gwei, 1_000_000));
        market.purchase(o, sig, 2);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.BadEscrow.selector, 1 gwei + 1, 1 gwei, 1_000_000));
        market.purchase{value: 1 gwei + 1}(o, sig, 2);
        vm.expectRevert(
            abi.encodeWithSelector(LicenseMarket.BadEscrow.selector, 1_000_001 gwei, 1 gwei, 1_000_000)
        );
        market.purchase{value: 1_000_001 gwei}(o, sig, 2);
        vm.stopPrank();
    }

    function test_usage_priceMustBeZero() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[2].price = 1;
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(
            abi.encodeWithSelector(LicenseMarket.InvalidTerm.selector, 2, "usage terms take escrow, not a price")
        );
        market.purchase{value: 1 gwei}(o, sig, 2);
    }

    function test_usage_zeroUnitPrice() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[2].unitPrice = 0;
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.InvalidTerm.selector, 2, "zero unit price or units"));
        market.purchase{value: 1 gwei}(o, sig, 2);
    }

    function test_usage_unitPriceTooLarge() public {
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.terms[2].unitPrice = uint256(type(uint96).max) + 1;
        o.terms[2].maxUnits = 1;
        bytes memory sig = signOrder(SELLER_KEY, o);
        vm.deal(buyer, uint256(type(uint96).max) + 1);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(SafeCast.SafeCastOverflowedUintDowncast.selector, 96, uint256(type(uint96).max) + 1));
        market.purchase{value: uint256(type(uint96).max) + 1}(o, sig, 2);
    }

    function test_settleUsage_paysDifference() public {
        uint256 id = buyUsage(1000);
        market.settleUsage(id, 100, signVoucher(BUYER_KEY, id, 100));
        assertEq(market.escrowOf(id).settledUnits, 100, "settled");
        market.settleUsage(id, 250, signVoucher(BUYER_KEY, id, 250));
        assertEq(market.escrowOf(id).settledUnits, 250, "settled again");
        uint256 paid = 250 gwei;
        uint256 fee = 100 gwei * FEE_BPS / 10_000 + 150 gwei * FEE_BPS / 10_000;
        market.distribute(tokenId);
        assertEq(market.withdrawable(treasury), fee, "fee");
        uint256 credited = market.balanceOf(alice) + market.balanceOf(bob) + market.balanceOf(carol);
        assertEq(credited + fee, paid, "all of it credited");
        assertEq(address(market).balance, 1000 gwei, "escrow and credits held");
    }

    function test_settleUsage_rejects() public {
        bytes memory sig;
        uint256 id = buyUsage(1000);
        market.settleUsage(id, 100, signVoucher(BUYER_KEY, id, 100));
        sig = signVoucher(BUYER_KEY, id, 100);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.UnitsNotIncreasing.selector, 100, 100));
        market.settleUsage(id, 100, sig);
        sig = signVoucher(BUYER_KEY, id, 50);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.UnitsNotIncreasing.selector, 50, 100));
        market.settleUsage(id, 50, sig);
        sig = signVoucher(BUYER_KEY, id, 1001);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.BeyondEscrow.selector, 1001, 1000));
        market.settleUsage(id, 1001, sig);
        sig = signVoucher(OTHER_KEY, id, 200);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.settleUsage(id, 200, sig);
        sig = signVoucher(BUYER_KEY, id, 201);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.settleUsage(id, 200, sig);
    }

    function test_settleUsage_voucherOfAnotherLicense() public {
        bytes memory sig;
        uint256 a = buyUsage(1000);
        uint256 b = buyUsage(1000);
        sig = signVoucher(BUYER_KEY, a, 10);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.settleUsage(b, 10, sig);
    }

    function test_settleUsage_notUsage() public {
        bytes memory sig;
        uint256 id = buy(buyer, orderFor(tokenId), 0, 1 ether);
        sig = signVoucher(BUYER_KEY, id, 1);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotUsageLicense.selector, id));
        market.settleUsage(id, 1, sig);
        sig = signVoucher(BUYER_KEY, 77, 1);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.UnknownLicense.selector, 77));
        market.settleUsage(77, 1, sig);
    }

    function test_topUp() public {
        uint256 id = buyUsage(1000);
        market.topUp{value: 500 gwei}(id);
        assertEq(market.escrowOf(id).deposited, 1500 gwei, "topped up");
        market.settleUsage(id, 1500, signVoucher(BUYER_KEY, id, 1500));
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.BadEscrow.selector, 1, 1 gwei, 1_000_000));
        market.topUp{value: 1}(id);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.BadEscrow.selector, 0, 1 gwei, 1_000_000));
        market.topUp(id);
        vm.expectRevert(
            abi.encodeWithSelector(LicenseMarket.BadEscrow.selector, 1_000_000 gwei, 1 gwei, 1_000_000)
        );
        market.topUp{value: 1_000_000 gwei}(id);
    }

    function test_close_refundsUnsettled() public {
        bytes memory sig;
        uint256 id = buyUsage(1000);
        market.settleUsage(id, 300, signVoucher(BUYER_KEY, id, 300));
        vm.prank(buyer);
        market.requestClose(id);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.ChallengeWindowOpen.selector, uint64(block.timestamp + WINDOW)));
        market.close(id);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.AlreadyClosing.selector, id));
        market.topUp{value: 1 gwei}(id);
        // a settlement inside the window still succeeds
        vm.warp(block.timestamp + WINDOW - 1);
        market.settleUsage(id, 400, signVoucher(BUYER_KEY, id, 400));
        vm.warp(block.timestamp + 1);
        market.close(id);
        assertEq(market.balanceOf(buyer), 600 gwei, "unsettled escrow refunded");
        assertTrue(!market.isActive(id), "closed");
        sig = signVoucher(BUYER_KEY, id, 500);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.LicenseClosed.selector, id));
        market.settleUsage(id, 500, sig);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.LicenseClosed.selector, id));
        market.close(id);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.LicenseClosed.selector, id));
        market.topUp{value: 1 gwei}(id);
        vm.prank(buyer);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.LicenseClosed.selector, id));
        market.requestClose(id);
    }

    function test_requestClose_rejects() public {
        uint256 id = buyUsage(1000);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotHolder.selector, id, other));
        market.requestClose(id);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.NotClosing.selector, id));
        market.close(id);
        vm.startPrank(buyer);
        market.requestClose(id);
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.AlreadyClosing.selector, id));
        market.requestClose(id);
        vm.stopPrank();
    }

    // ------------------------------------------------------------ withdraw

    function test_withdraw_paysBalance() public {
        buy(buyer, orderFor(tokenId), 0, 1 ether);
        vm.prank(alice);
        vm.expectRevert(LicenseMarket.NothingToWithdraw.selector);
        market.withdraw(); // not distributed yet
        uint256 owed = (1 ether - 1 ether * FEE_BPS / 10_000) * 5000 / 10_000;
        uint256[] memory ids = new uint256[](1);
        ids[0] = tokenId;
        vm.prank(alice);
        market.distributeAndWithdraw(ids);
        assertEq(alice.balance, owed, "paid");
        assertEq(market.balanceOf(alice), 0, "zeroed");
        vm.prank(alice);
        vm.expectRevert(LicenseMarket.NothingToWithdraw.selector);
        market.withdraw();
        vm.prank(treasury);
        market.withdraw();
        assertEq(treasury.balance, 1 ether * FEE_BPS / 10_000, "treasury paid");
        assertEq(market.feesAccrued(), 0, "fees zeroed");
        vm.prank(bob);
        market.withdraw();
        vm.prank(carol);
        market.withdraw();
        assertEq(address(market).balance, 0, "all paid out");
    }

    function test_withdraw_transferFails() public {
        Refuser refuser = new Refuser();
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](1);
        s[0] = ModelRegistry.Split(address(refuser), 10_000);
        vm.prank(seller);
        registry.setSplits(tokenId, s);
        buy(buyer, orderFor(tokenId), 0, 1 ether);
        market.distribute(tokenId);
        vm.prank(address(refuser));
        vm.expectRevert(LicenseMarket.TransferFailed.selector);
        market.withdraw();
    }

    // ------------------------------------------------------------ contract wallets (ERC-1271)

    /// The wallet's signature of `digest`: its owner's of the wallet's replay-safe hash.
    function signAs(SmartWallet wallet, uint256 ownerKey, bytes32 digest) internal view returns (bytes memory) {
        return sign(ownerKey, wallet.replaySafeHash(digest));
    }

    function test_contractWallet_sellsAndPaysForUsage() public {
        SmartWallet sellerWallet = new SmartWallet(seller);
        SmartWallet buyerWallet = new SmartWallet(buyer);
        vm.prank(seller);
        registry.transferFrom(seller, address(sellerWallet), tokenId);
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.seller = address(sellerWallet);
        o.nonce = market.nonces(address(sellerWallet));

        // The owner's own signature of the order is not the wallet's.
        bytes memory byKey = signOrder(SELLER_KEY, o);
        vm.prank(buyer);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.purchase{value: 1000 gwei}(o, byKey, 2);

        // The wallet's signature sells; the wallet buys through its owner.
        bytes memory sig = signAs(sellerWallet, SELLER_KEY, market.orderHash(o));
        vm.prank(buyer);
        bytes memory result = buyerWallet.execute{value: 1000 gwei}(
            address(market), 1000 gwei, abi.encodeCall(market.purchase, (o, sig, 2))
        );
        uint256 id = abi.decode(result, (uint256));
        assertEq(market.licenses(id).holder, address(buyerWallet), "the wallet holds the license");

        // Its vouchers settle; its owner's plain signature of one does not.
        bytes32 digest = market.voucherDigest(id, 100);
        bytes memory plain = sign(BUYER_KEY, digest);
        vm.expectRevert(LicenseMarket.BadSignature.selector);
        market.settleUsage(id, 100, plain);
        market.settleUsage(id, 100, signAs(buyerWallet, BUYER_KEY, digest));
        assertEq(market.escrowOf(id).settledUnits, 100, "settled");
    }

    function test_views() public {
        vm.expectRevert(abi.encodeWithSelector(LicenseMarket.UnknownLicense.selector, 5));
        market.licenses(5);
        assertTrue(!market.isActive(5), "unknown is inactive");
        assertTrue(market.domainSeparator() != bytes32(0), "domain");
    }
}

contract Refuser {
    receive() external payable {
        revert("no");
    }
}
