// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {LicenseMarket} from "../src/LicenseMarket.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";

/// A split recipient that re-enters withdraw() from its receive hook.
contract Reenterer {
    LicenseMarket internal immutable market;
    uint256 public reentries;
    bool public reentryFailed;

    constructor(LicenseMarket market_) {
        market = market_;
    }

    function attack() external {
        market.withdraw();
    }

    receive() external payable {
        if (reentries < 5) {
            ++reentries;
            try market.withdraw() {}
            catch {
                reentryFailed = true;
            }
        }
    }
}

contract ReentrancyTest is Base {
    function test_withdraw_reentrancyTakesNoMore() public {
        uint256 tokenId = registerAs(seller);
        Reenterer attacker = new Reenterer(market);
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](2);
        s[0] = ModelRegistry.Split(address(attacker), 1000);
        s[1] = ModelRegistry.Split(alice, 9000);
        vm.prank(seller);
        registry.setSplits(tokenId, s);
        LicenseMarket.Order memory o = orderFor(tokenId);
        buy(buyer, o, 0, 1 ether);
        buy(other, o, 0, 1 ether);
        market.distribute(tokenId);
        uint256 owed = market.balanceOf(address(attacker));
        uint256 held = address(market).balance;
        attacker.attack();
        assertEq(address(attacker).balance, owed, "took exactly its balance");
        assertEq(address(market).balance, held - owed, "market kept the rest");
        assertTrue(attacker.reentryFailed(), "re-entry was refused");
        assertEq(market.balanceOf(alice), (2 ether - 2 * (1 ether * FEE_BPS / 10_000)) * 9000 / 10_000, "alice intact");
    }
}
