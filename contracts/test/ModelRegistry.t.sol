// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {Base} from "./Base.t.sol";
import {ModelRegistry} from "../src/ModelRegistry.sol";
import {IERC721Errors} from "@openzeppelin/contracts/interfaces/draft-IERC6093.sol";
import {IERC2981} from "@openzeppelin/contracts/interfaces/IERC2981.sol";

contract ModelRegistryTest is Base {
    function test_register_mintsToCallerWithVersion1() public {
        vm.prank(seller);
        uint256 id = registry.register(HASH1, URI, threeWay());
        assertEq(id, 1, "first token id");
        assertEq(registry.ownerOf(id), seller, "owner");
        assertEq(registry.versionCount(id), 1, "versions");
        assertEq(registry.contentHashOf(id, 1), HASH1, "v1 hash");
        assertEq(registry.tokenURI(id), URI, "uri");
        ModelRegistry.Split[] memory s = registry.splitsOf(id);
        assertEq(s.length, 3, "split count");
        assertEq(s[1].recipient, bob, "recipient 1");
        assertEq(s[1].bps, 3000, "bps 1");
        assertEq(registerAs(seller), 2, "ids are sequential");
    }

    function test_register_emptyUri() public {
        vm.prank(seller);
        uint256 id = registry.register(HASH1, "", threeWay());
        assertEq(registry.tokenURI(id), "", "empty uri");
        assertEq(registry.splitsOf(id).length, 3, "splits intact");
    }

    function test_register_revertsOnZeroHash() public {
        vm.expectRevert(ModelRegistry.ZeroContentHash.selector);
        registry.register(bytes32(0), URI, threeWay());
    }

    function test_register_revertsOnNoSplits() public {
        vm.expectRevert(ModelRegistry.NoSplits.selector);
        registry.register(HASH1, URI, new ModelRegistry.Split[](0));
    }

    function test_register_revertsOnTooManySplits() public {
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](17);
        for (uint256 i; i < 17; ++i) s[i] = ModelRegistry.Split(address(uint160(i + 1)), i == 0 ? 10_000 - 16 * 588 : 588);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.TooManySplits.selector, 17, 16));
        registry.register(HASH1, URI, s);
    }

    function test_register_sixteenSplitsAccepted() public {
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](16);
        for (uint256 i; i < 16; ++i) s[i] = ModelRegistry.Split(address(uint160(i + 1)), 625);
        uint256 id = registry.register(HASH1, URI, s);
        assertEq(registry.splitsOf(id).length, 16, "16 splits");
        assertEq(registry.splitsOf(id)[15].recipient, address(16), "last recipient");
        assertEq(registry.tokenURI(id), URI, "uri after 16 splits");
    }

    function test_register_revertsOnZeroRecipient() public {
        ModelRegistry.Split[] memory s = threeWay();
        s[2].recipient = address(0);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.ZeroRecipient.selector, 2));
        registry.register(HASH1, URI, s);
    }

    function test_register_revertsOnZeroShare() public {
        ModelRegistry.Split[] memory s = threeWay();
        s[0].bps = 0;
        s[1].bps = 8000;
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.ZeroShare.selector, 0));
        registry.register(HASH1, URI, s);
    }

    function test_register_revertsOnDuplicate() public {
        ModelRegistry.Split[] memory s = threeWay();
        s[2].recipient = alice;
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.DuplicateRecipient.selector, alice));
        registry.register(HASH1, URI, s);
    }

    function test_register_revertsOnBadSum() public {
        ModelRegistry.Split[] memory s = threeWay();
        s[2].bps = 1999;
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.SharesDoNotSumTo10000.selector, 9999));
        registry.register(HASH1, URI, s);
    }

    function testFuzz_register_sumMustBeExact(uint16 a, uint16 b) public {
        a = uint16(bound(a, 1, 10_000));
        b = uint16(bound(b, 1, 10_000));
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](2);
        s[0] = ModelRegistry.Split(alice, a);
        s[1] = ModelRegistry.Split(bob, b);
        if (uint256(a) + b != 10_000) {
            vm.expectRevert(abi.encodeWithSelector(ModelRegistry.SharesDoNotSumTo10000.selector, uint256(a) + b));
        }
        registry.register(HASH1, URI, s);
    }

    function test_anchorVersion() public {
        uint256 id = registerAs(seller);
        vm.prank(seller);
        uint32 v = registry.anchorVersion(id, keccak256("v2"));
        assertEq(v, 2, "version 2");
        assertEq(registry.versionCount(id), 2, "count");
        assertEq(registry.contentHashOf(id, 2), keccak256("v2"), "v2 hash");
        assertEq(registry.contentHashOf(id, 1), HASH1, "v1 kept");
    }

    function test_anchorVersion_onlyOwner() public {
        uint256 id = registerAs(seller);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.NotModelOwner.selector, id, other));
        registry.anchorVersion(id, keccak256("v2"));
    }

    function test_anchorVersion_revertsOnZeroHash() public {
        uint256 id = registerAs(seller);
        vm.prank(seller);
        vm.expectRevert(ModelRegistry.ZeroContentHash.selector);
        registry.anchorVersion(id, bytes32(0));
    }

    function test_anchorVersion_unknownToken() public {
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 42));
        registry.anchorVersion(42, HASH1);
    }

    function test_contentHashOf_unknownVersion() public {
        uint256 id = registerAs(seller);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.UnknownVersion.selector, id, 2));
        registry.contentHashOf(id, 2);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.UnknownVersion.selector, id, 0));
        registry.contentHashOf(id, 0);
    }

    function test_views_unknownToken() public {
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 7));
        registry.versionCount(7);
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 7));
        registry.splitsOf(7);
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 7));
        registry.payoutOf(7);
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 7));
        registry.tokenURI(7);
        vm.expectRevert(abi.encodeWithSelector(IERC721Errors.ERC721NonexistentToken.selector, 7));
        registry.royaltyInfo(7, 100);
    }

    function test_setSplits_replacesAndKeepsUri() public {
        uint256 id = registerAs(seller);
        ModelRegistry.Split[] memory s = new ModelRegistry.Split[](1);
        s[0] = ModelRegistry.Split(other, 10_000);
        vm.prank(seller);
        registry.setSplits(id, s);
        ModelRegistry.Split[] memory got = registry.splitsOf(id);
        assertEq(got.length, 1, "one split");
        assertEq(got[0].recipient, other, "recipient");
        assertEq(registry.tokenURI(id), URI, "uri kept");
        (address owner, bytes memory packed) = registry.payoutOf(id);
        assertEq(owner, seller, "payout owner");
        assertEq(packed.length, 22, "packed length");
    }

    function test_setSplits_onlyOwner() public {
        uint256 id = registerAs(seller);
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.NotModelOwner.selector, id, other));
        registry.setSplits(id, threeWay());
    }

    function test_setSplits_validates() public {
        uint256 id = registerAs(seller);
        ModelRegistry.Split[] memory s = threeWay();
        s[0].bps = 4000;
        vm.prank(seller);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.SharesDoNotSumTo10000.selector, 9000));
        registry.setSplits(id, s);
    }

    function test_transfer_movesOwnership() public {
        uint256 id = registerAs(seller);
        vm.prank(seller);
        registry.transferFrom(seller, other, id);
        assertEq(registry.ownerOf(id), other, "new owner");
        vm.prank(seller);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.NotModelOwner.selector, id, seller));
        registry.anchorVersion(id, keccak256("v2"));
        vm.prank(other);
        registry.anchorVersion(id, keccak256("v2"));
    }

    function test_bindMarket_onceByDeployer() public {
        vm.prank(other);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.NotDeployer.selector, other));
        registry.bindMarket(market);
        vm.expectRevert(abi.encodeWithSelector(ModelRegistry.MarketAlreadyBound.selector, address(market)));
        registry.bindMarket(market);
        assertEq(address(registry.market()), address(market), "bound");
    }

    function test_royaltyInfo_largestShare() public {
        uint256 id = registerAs(seller);
        (address receiver, uint256 amount) = registry.royaltyInfo(id, 1 ether);
        assertEq(receiver, alice, "largest share");
        assertEq(amount, 0.05 ether, "5%");
        assertTrue(registry.supportsInterface(type(IERC2981).interfaceId), "2981");
        assertTrue(registry.supportsInterface(0x80ac58cd), "721");
        assertTrue(!registry.supportsInterface(0xdeadbeef), "unknown interface");
    }
}
