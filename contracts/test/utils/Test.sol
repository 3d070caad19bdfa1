// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// The cheatcodes these tests use (forge's HEVM interface).
interface Vm {
    function prank(address) external;
    function startPrank(address) external;
    function stopPrank() external;
    function deal(address, uint256) external;
    function warp(uint256) external;
    function expectRevert() external;
    function expectEmit(address emitter) external;
    function expectRevert(bytes4) external;
    function expectRevert(bytes calldata) external;
    function sign(uint256 privateKey, bytes32 digest) external pure returns (uint8 v, bytes32 r, bytes32 s);
    function addr(uint256 privateKey) external pure returns (address);
    function assume(bool) external pure;
    function label(address, string calldata) external;
    function snapshotGasLastCall(string calldata name) external returns (uint256);
}

/// A small test base: cheatcodes, assertions that revert with a message, and input bounding.
abstract contract Test {
    Vm internal constant vm = Vm(address(uint160(uint256(keccak256("hevm cheat code")))));
    address[] private _targets;

    bool public IS_TEST = true;

    function targetContract(address target) internal {
        _targets.push(target);
    }

    /// Read by forge's invariant runner.
    function targetContracts() public view returns (address[] memory) {
        return _targets;
    }

    function fail(string memory why) internal pure {
        revert(why);
    }

    function assertTrue(bool ok, string memory why) internal pure {
        if (!ok) revert(why);
    }

    function assertTrue(bool ok) internal pure {
        assertTrue(ok, "expected true");
    }

    function assertEq(uint256 a, uint256 b) internal pure {
        assertEq(a, b, "not equal");
    }

    function assertEq(address a, address b) internal pure {
        assertEq(a, b, "addresses differ");
    }

    function assertEq(uint256 a, uint256 b, string memory why) internal pure {
        if (a != b) revert(string.concat(why, ": ", _str(a), " != ", _str(b)));
    }

    function assertEq(address a, address b, string memory why) internal pure {
        if (a != b) revert(why);
    }

    function assertEq(bytes32 a, bytes32 b, string memory why) internal pure {
        if (a != b) revert(why);
    }

    function assertEq(string memory a, string memory b, string memory why) internal pure {
        if (keccak256(bytes(a)) != keccak256(bytes(b))) revert(string.concat(why, ": ", a, " != ", b));
    }

    function bound(uint256 x, uint256 min, uint256 max) internal pure returns (uint256) {
        require(min <= max, "bound: max < min");
        if (x >= min && x <= max) return x;
        uint256 size = max - min + 1;
        return min + (x % size);
    }

    function _str(uint256 v) private pure returns (string memory) {
        if (v == 0) return "0";
        bytes memory b;
        while (v != 0) {
            b = bytes.concat(bytes1(uint8(48 + v % 10)), b);
            v /= 10;
        }
        return string(b);
    }
}
