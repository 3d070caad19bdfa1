// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {Test} from "./utils/Test.sol";
import {LicenseMarket} from "../src/LicenseMarket.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";

/// Drives random sequences of purchases, settlements, top-ups, closes and withdrawals, and
/// keeps the ghost totals the invariant compares against.
contract MarketHandler is Test {
    LicenseMarket internal immutable market;
    LicenseMarket.Order internal order;
    bytes internal orderSig;
    uint256 internal constant BUYER_KEY_BASE = 0xB000;
    uint256 internal immutable tokenId;

    address[] public accounts; // every address that may hold a balance
    uint256[] public usageLicenses;
    mapping(uint256 licenseId => uint256 key) internal holderKey;
    mapping(uint256 licenseId => uint256) public usedUnits;
    uint256 public calls;

    constructor(LicenseMarket market_, LicenseMarket.Order memory order_, bytes memory sig, address[] memory recipients)
    {
        market = market_;
        order.seller = order_.seller;
        order.tokenId = order_.tokenId;
        order.nonce = order_.nonce;
        order.expiry = order_.expiry;
        for (uint256 i; i < order_.terms.length; ++i) order.terms.push(order_.terms[i]);
        orderSig = sig;
        tokenId = order_.tokenId;
        for (uint256 i; i < recipients.length; ++i) accounts.push(recipients[i]);
        for (uint256 i; i < 3; ++i) accounts.push(vm.addr(BUYER_KEY_BASE + i));
    }

    function accountCount() external view returns (uint256) {
        return accounts.length;
    }

    function usageCount() external view returns (uint256) {
        return usageLicenses.length;
    }

    function purchase(uint256 buyerSeed, uint8 termIndex, uint256 units) external {
        ++calls;
        uint256 key = BUYER_KEY_BASE + buyerSeed % 3;
        address who = vm.addr(key);
        termIndex = uint8(termIndex % 3);
        LicenseMarket.Term memory term = order.terms[termIndex];
        uint256 value = termIndex == 2 ? bound(units, 1, term.maxUnits) * term.unitPrice : term.price;
        vm.deal(who, who.balance + value);
        vm.prank(who);
        uint256 id = market.purchase{value: value}(order, orderSig, termIndex);
        if (termIndex == 2) {
            usageLicenses.push(id);
            holderKey[id] = key;
        }
    }

    function settle(uint256 pick, uint256 units) external {
        ++calls;
        if (usageLicenses.length == 0) return;
        uint256 id = usageLicenses[pick % usageLicenses.length];
        LicenseMarket.Escrow memory e = market.escrowOf(id);
        uint256 paidUnits = e.deposited / e.unitPrice;
        if (e.closed || e.settledUnits >= paidUnits) return;
        uint256 cumulative = bound(units, e.settledUnits + 1, paidUnits);
        (uint8 v, bytes32 r, bytes32 s) = vm.sign(holderKey[id], market.voucherDigest(id, cumulative));
        market.settleUsage(id, cumulative, abi.encodePacked(r, s, v));
    }

    function topUp(uint256 pick, uint256 units) external {
        ++calls;
        if (usageLicenses.length == 0) return;
        uint256 id = usageLicenses[pick % usageLicenses.length];
        LicenseMarket.Escrow memory e = market.escrowOf(id);
        uint256 room = e.maxUnits - e.deposited / e.unitPrice;
        if (e.closed || e.closeRequestedAt != 0 || room == 0) return;
        uint256 value = bound(units, 1, room) * e.unitPrice;
        vm.deal(address(this), address(this).balance + value);
        market.topUp{value: value}(id);
    }

    function requestAndClose(uint256 pick, uint256 wait) external {
        ++calls;
        if (usageLicenses.length == 0) return;
        uint256 id = usageLicenses[pick % usageLicenses.length];
        LicenseMarket.Escrow memory e = market.escrowOf(id);
        if (e.closed) return;
        if (e.closeRequestedAt == 0) {
            vm.prank(vm.addr(holderKey[id]));
            market.requestClose(id);
        }
        vm.warp(block.timestamp + bound(wait, 0, 2 days));
        if (block.timestamp >= market.escrowOf(id).closeRequestedAt + market.challengeWindow()) market.close(id);
    }

    function distribute() external {
        ++calls;
        market.distribute(tokenId);
    }

    function withdraw(uint256 pick) external {
        ++calls;
        address who = accounts[pick % accounts.length];
        if (market.withdrawable(who) == 0) return;
        vm.prank(who);
        market.withdraw();
    }
}

contract MarketInvariantTest is Base {
    MarketHandler internal handler;

    function setUp() public override {
        super.setUp();
        uint256 tokenId = registerAs(seller);
        LicenseMarket.Order memory o = orderFor(tokenId);
        o.expiry = type(uint64).max;
        o.terms[0].price = 1 ether + 7; // odd prices exercise the rounding dust
        o.terms[1].price = 0.1 ether + 3;
        address[] memory recipients = new address[](4);
        (recipients[0], recipients[1], recipients[2], recipients[3]) = (alice, bob, carol, treasury);
        handler = new MarketHandler(market, o, signOrder(SELLER_KEY, o), recipients);
        targetContract(address(handler));
    }

    /// The market's ETH equals what it owes: withdrawable balances, accrued fees, undistributed
    /// revenue and live escrow.
    function invariant_solvency() public view {
        (uint128 earned, uint128 distributed) = market.revenueOf(1);
        uint256 owed = market.feesAccrued() + earned - distributed;
        for (uint256 i; i < handler.accountCount(); ++i) owed += market.balanceOf(handler.accounts(i));
        for (uint256 i; i < handler.usageCount(); ++i) {
            LicenseMarket.Escrow memory e = market.escrowOf(handler.usageLicenses(i));
            if (!e.closed) owed += e.deposited - uint256(e.settledUnits) * e.unitPrice;
        }
        assertEq(address(market).balance, owed, "balance == balances + live escrow");
    }
}
