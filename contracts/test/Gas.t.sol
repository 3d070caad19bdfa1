// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {LicenseMarket} from "../src/LicenseMarket.sol";
import {ComputeMarket} from "../src/ComputeMarket.sol";

/// Gas of the calls users pay for, each measured as its own transaction (run under the
/// `gas` profile, which isolates calls) with the split recipients' balances already
/// non-zero. `scripts/test` writes the numbers to snapshots/GasTest.json.
contract GasTest is Base {
    uint256 internal tokenId;
    LicenseMarket.Order internal order;
    bytes internal sig;

    function setUp() public override {
        super.setUp();
        tokenId = registerAs(seller);
        LicenseMarket.Order memory o = orderFor(tokenId);
        order.seller = o.seller;
        order.tokenId = o.tokenId;
        order.nonce = o.nonce;
        order.expiry = o.expiry;
        for (uint256 i; i < o.terms.length; ++i) order.terms.push(o.terms[i]);
        sig = signOrder(SELLER_KEY, o);
        // warm balances: the model has booked revenue, its recipients and the treasury hold something
        vm.prank(other);
        market.purchase{value: 1 ether}(order, sig, 0);
        market.distribute(tokenId);
        vm.prank(other);
        market.purchase{value: 1 ether}(order, sig, 0);
    }

    function test_gas_register3() public {
        vm.prank(seller);
        registry.register(HASH1, URI, threeWay());
        vm.snapshotGasLastCall("register (3 recipients)");
    }

    function test_gas_purchasePerpetual() public {
        vm.prank(buyer);
        market.purchase{value: 1 ether}(order, sig, 0);
        vm.snapshotGasLastCall("purchase perpetual (3 recipients)");
    }

    function test_gas_purchaseTimed() public {
        vm.prank(buyer);
        market.purchase{value: 0.1 ether}(order, sig, 1);
        vm.snapshotGasLastCall("purchase timed, new (3 recipients)");
        vm.prank(buyer);
        market.purchase{value: 0.1 ether}(order, sig, 1);
        vm.snapshotGasLastCall("purchase timed, extension (3 recipients)");
    }

    function test_gas_purchaseUsageAndSettle() public {
        vm.prank(buyer);
        uint256 id = market.purchase{value: 1000 gwei}(order, sig, 2);
        vm.snapshotGasLastCall("purchase usage (escrow)");
        bytes memory v1 = signVoucher(BUYER_KEY, id, 100);
        market.settleUsage(id, 100, v1);
        vm.snapshotGasLastCall("settleUsage (first, 3 recipients)");
        bytes memory v2 = signVoucher(BUYER_KEY, id, 200);
        market.settleUsage(id, 200, v2);
        vm.snapshotGasLastCall("settleUsage (3 recipients)");
    }

    function test_gas_distributeAndWithdraw() public {
        market.distribute(tokenId);
        vm.snapshotGasLastCall("distribute (3 recipients)");
        vm.prank(alice);
        market.withdraw();
        vm.snapshotGasLastCall("withdraw");
        vm.prank(other);
        market.purchase{value: 1 ether}(order, sig, 0);
        uint256[] memory ids = new uint256[](1);
        ids[0] = tokenId;
        vm.prank(bob);
        market.distributeAndWithdraw(ids);
        vm.snapshotGasLastCall("distributeAndWithdraw (1 model, 3 recipients)");
    }

    function test_gas_computeReserveConfirmClaim() public {
        ComputeMarket compute = new ComputeMarket(1 hours);
        ComputeMarket.Offer memory o = ComputeMarket.Offer({
            provider: seller,
            gpu: "H100-80GB",
            gpuCount: 8,
            memoryGb: 80,
            pricePerGpuHour: 0.01 ether,
            kind: 0,
            availableFrom: 0,
            availableUntil: uint64(block.timestamp + 30 days),
            region: "eu-west",
            node: "12D3KooWAgoraProviderNode",
            nonce: 0,
            expiry: uint64(block.timestamp + 1 days)
        });
        bytes memory offerSig = sign(SELLER_KEY, compute.offerHash(o));
        vm.prank(buyer);
        uint256 id = compute.reserve{value: 16 * 0.01 ether}(o, offerSig, 16, 0);
        vm.snapshotGasLastCall("compute reserve");
        vm.prank(seller);
        compute.confirmStart(id);
        vm.snapshotGasLastCall("compute confirmStart");
        bytes memory statement = sign(BUYER_KEY, compute.statementDigest(id, 9));
        vm.prank(seller);
        compute.claim(id, 9, statement);
        vm.snapshotGasLastCall("compute claim (signed statement)");
    }
}
