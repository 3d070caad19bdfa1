// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {IERC2981} from "@openzeppelin/contracts/interfaces/IERC2981.sol";
import {IERC165} from "@openzeppelin/contracts/utils/introspection/IERC165.sol";

/// The market that books revenue per model and pays it out by the model's split.
interface IRevenueMarket {
    function distribute(uint256 tokenId) external returns (uint256);
}

/// @title ModelRegistry
/// @notice One ERC-721 token per model. The token's owner is the model's owner: it anchors
/// new versions (content hashes of the weights) and sets the royalty split that
/// LicenseMarket pays on every sale.
/// @dev Each model's split and metadata URI live in one immutable data contract (code as
/// storage), so a purchase reads a whole split with one EXTCODECOPY instead of one SLOAD
/// per recipient, and registering costs less than storing the URI in slots. The blob is
/// `(recipient ‖ bps as uint16) × n ‖ metadataURI`, 22 bytes per split.
/// The market that pays the splits is bound once by the deployer; `setSplits` makes it
/// distribute the model's pending revenue first, so a new split never takes what the old
/// one earned.
contract ModelRegistry is ERC721, IERC2981 {
    /// A royalty recipient and its share in basis points.
    struct Split {
        address recipient;
        uint16 bps;
    }

    struct Model {
        address data; // the blob holding the split and the metadata URI
        uint32 versionCount;
        uint8 splitCount;
    }

    uint256 public constant MAX_SPLITS = 16;
    uint256 public constant BPS = 10_000;
    /// Royalty that `royaltyInfo` signals for secondary sales of the model token itself.
    uint256 public constant SECONDARY_ROYALTY_BPS = 500;
    uint256 private constant SPLIT_BYTES = 22;

    address private immutable _deployer;
    IRevenueMarket public market;
    uint256 private _nextTokenId = 1;
    mapping(uint256 tokenId => Model) private _models;
    mapping(uint256 tokenId => mapping(uint32 version => bytes32)) private _contentHashes;

    event ModelRegistered(uint256 indexed tokenId, address indexed owner, bytes32 contentHash, string metadataURI);
    event VersionAnchored(uint256 indexed tokenId, uint32 indexed version, bytes32 contentHash);
    event SplitsSet(uint256 indexed tokenId, Split[] splits);
    event MarketBound(address market);

    error NoSplits();
    error TooManySplits(uint256 count, uint256 max);
    error ZeroRecipient(uint256 index);
    error ZeroShare(uint256 index);
    error DuplicateRecipient(address recipient);
    error SharesDoNotSumTo10000(uint256 sum);
    error ZeroContentHash();
    error NotModelOwner(uint256 tokenId, address caller);
    error UnknownVersion(uint256 tokenId, uint32 version);
    error BlobWriteFailed();
    error NotDeployer(address caller);
    error MarketAlreadyBound(address market);

    constructor() ERC721("Agora Model", "AGORA") {
        _deployer = msg.sender;
    }

    /// Binds the market once; only the deployer, normally in the same deployment.
    function bindMarket(IRevenueMarket market_) external {
        if (msg.sender != _deployer) revert NotDeployer(msg.sender);
        if (address(market) != address(0)) revert MarketAlreadyBound(address(market));
        market = market_;
        emit MarketBound(address(market_));
    }

    /// Mints a model token to the caller with `contentHash` as version 1.
    function register(bytes32 contentHash, string calldata metadataURI, Split[] calldata splits)
        external
        returns (uint256 tokenId)
    {
        if (contentHash == bytes32(0)) revert ZeroContentHash();
        _checkSplits(splits);
        tokenId = _nextTokenId++;
        _models[tokenId] = Model({
            data: _writeBlob(_packSplits(splits), bytes(metadataURI)),
            versionCount: 1,
            splitCount: uint8(splits.length)
        });
        _contentHashes[tokenId][1] = contentHash;
        _mint(msg.sender, tokenId);
        emit ModelRegistered(tokenId, msg.sender, contentHash, metadataURI);
        emit VersionAnchored(tokenId, 1, contentHash);
        emit SplitsSet(tokenId, splits);
    }

    /// Appends a version; only the model's owner.
    function anchorVersion(uint256 tokenId, bytes32 contentHash) external returns (uint32 version) {
        _onlyModelOwner(tokenId);
        if (contentHash == bytes32(0)) revert ZeroContentHash();
        version = ++_models[tokenId].versionCount;
        _contentHashes[tokenId][version] = contentHash;
        emit VersionAnchored(tokenId, version, contentHash);
    }

    /// Replaces the royalty split; only the model's owner. Sales after this pay the new split.
    function setSplits(uint256 tokenId, Split[] calldata splits) external {
        _onlyModelOwner(tokenId);
        _checkSplits(splits);
        if (address(market) != address(0)) market.distribute(tokenId);
        Model storage model = _models[tokenId];
        bytes memory uri = _readBlob(model.data, SPLIT_BYTES * model.splitCount, type(uint256).max);
        model.data = _writeBlob(_packSplits(splits), uri);
        model.splitCount = uint8(splits.length);
        emit SplitsSet(tokenId, splits);
    }

    function contentHashOf(uint256 tokenId, uint32 version) external view returns (bytes32) {
        _requireOwned(tokenId);
        if (version == 0 || version > _models[tokenId].versionCount) revert UnknownVersion(tokenId, version);
        return _contentHashes[tokenId][version];
    }

    function versionCount(uint256 tokenId) external view returns (uint32) {
        _requireOwned(tokenId);
        return _models[tokenId].versionCount;
    }

    function splitsOf(uint256 tokenId) external view returns (Split[] memory splits) {
        _requireOwned(tokenId);
        Model storage model = _models[tokenId];
        bytes memory packed = _readBlob(model.data, 0, SPLIT_BYTES * model.splitCount);
        splits = new Split[](model.splitCount);
        for (uint256 i; i < splits.length; ++i) {
            (address recipient, uint16 bps) = _splitAt(packed, i);
            splits[i] = Split(recipient, bps);
        }
    }

    /// The owner and the packed split (22 bytes per recipient) in one call, for LicenseMarket.
    function payoutOf(uint256 tokenId) external view returns (address owner, bytes memory packedSplits) {
        owner = _requireOwned(tokenId);
        Model storage model = _models[tokenId];
        packedSplits = _readBlob(model.data, 0, SPLIT_BYTES * model.splitCount);
    }

    function tokenURI(uint256 tokenId) public view override returns (string memory) {
        _requireOwned(tokenId);
        Model storage model = _models[tokenId];
        return string(_readBlob(model.data, SPLIT_BYTES * model.splitCount, type(uint256).max));
    }

    /// EIP-2981, for secondary sales of the model token itself (marketplaces that honour it
    /// pay it voluntarily): `SECONDARY_ROYALTY_BPS` of the price to the recipient with the
    /// largest share. License sales do not use this: LicenseMarket enforces the whole split.
    function royaltyInfo(uint256 tokenId, uint256 salePrice)
        external
        view
        returns (address receiver, uint256 royaltyAmount)
    {
        _requireOwned(tokenId);
        Model storage model = _models[tokenId];
        bytes memory packed = _readBlob(model.data, 0, SPLIT_BYTES * model.splitCount);
        uint16 best;
        for (uint256 i; i < model.splitCount; ++i) {
            (address recipient, uint16 bps) = _splitAt(packed, i);
            if (bps > best) (receiver, best) = (recipient, bps);
        }
        royaltyAmount = salePrice * SECONDARY_ROYALTY_BPS / BPS;
    }

    function supportsInterface(bytes4 interfaceId) public view override(ERC721, IERC165) returns (bool) {
        return interfaceId == type(IERC2981).interfaceId || super.supportsInterface(interfaceId);
    }

    function _onlyModelOwner(uint256 tokenId) private view {
        if (_requireOwned(tokenId) != msg.sender) revert NotModelOwner(tokenId, msg.sender);
    }

    function _checkSplits(Split[] calldata splits) private pure {
        uint256 n = splits.length;
        if (n == 0) revert NoSplits();
        if (n > MAX_SPLITS) revert TooManySplits(n, MAX_SPLITS);
        uint256 sum;
        for (uint256 i; i < n; ++i) {
            address recipient = splits[i].recipient;
            if (recipient == address(0)) revert ZeroRecipient(i);
            if (splits[i].bps == 0) revert ZeroShare(i);
            for (uint256 j; j < i; ++j) {
                if (splits[j].recipient == recipient) revert DuplicateRecipient(recipient);
            }
            sum += splits[i].bps;
        }
        if (sum != BPS) revert SharesDoNotSumTo10000(sum);
    }

    function _packSplits(Split[] calldata splits) private pure returns (bytes memory packed) {
        for (uint256 i; i < splits.length; ++i) {
            packed = bytes.concat(packed, bytes20(splits[i].recipient), bytes2(splits[i].bps));
        }
    }

    function _splitAt(bytes memory packed, uint256 i) private pure returns (address recipient, uint16 bps) {
        uint256 word;
        assembly ("memory-safe") {
            word := mload(add(add(packed, 32), mul(i, 22)))
        }
        recipient = address(uint160(word >> 96));
        bps = uint16(word >> 80);
    }

    /// Deploys `splits ‖ uri` as the code of a new contract, behind a STOP byte so it can
    /// never be called.
    function _writeBlob(bytes memory splits, bytes memory uri) private returns (address blob) {
        bytes memory creation = bytes.concat(
            // PUSH1 0x0b MSIZE DUP2 CODESIZE SUB DUP1 SWAP3 MSIZE CODECOPY RETURN: returns the code after these 11 bytes
            hex"600b5981380380925939f3",
            hex"00",
            splits,
            uri
        );
        assembly ("memory-safe") {
            blob := create(0, add(creation, 32), mload(creation))
        }
        if (blob == address(0)) revert BlobWriteFailed();
    }

    /// Reads `[start, end)` of a blob's data (after its STOP byte), clamped to its size.
    function _readBlob(address blob, uint256 start, uint256 end) private view returns (bytes memory out) {
        uint256 size = blob.code.length;
        size = size == 0 ? 0 : size - 1;
        if (end > size) end = size;
        if (start > end) start = end;
        out = new bytes(end - start);
        assembly ("memory-safe") {
            extcodecopy(blob, add(out, 32), add(start, 1), mload(out))
        }
    }
}
