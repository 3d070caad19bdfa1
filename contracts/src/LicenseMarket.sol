// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";
import {ModelRegistry, IRevenueMarket} from "./ModelRegistry.sol";

/// @title LicenseMarket
/// @notice Sells licenses to models registered in ModelRegistry. Listings are EIP-712 signed
/// orders kept off-chain (listing costs no gas); a purchase checks the order against the
/// token's current owner, records the license and books the payment, less the platform fee,
/// as revenue of the model, which `distribute` splits into the recipients' withdrawable
/// balances (pull payments).
///
/// Why revenue is split at distribution rather than at purchase: crediting every recipient's
/// balance in each purchase costs one storage write and one event per recipient (about 27,000
/// gas for a 3-way split) on the buyer's transaction; booking one number per model keeps a
/// perpetual purchase under 100,000 gas and a usage settlement under 60,000, and recipients
/// pay for the split once per withdrawal instead of once per sale. ModelRegistry distributes
/// before a split changes, so revenue is always paid to the split in force when it was earned.
///
/// Money rules:
/// - fee = amount × feeBps / 10 000, rounded down, accrued for the treasury;
/// - each recipient gets pending × bps / 10 000, rounded down; the rounding dust (less than one
///   wei per recipient) goes to the split's first recipient. No wei is created or lost.
/// - The contract's balance always equals withdrawable balances + accrued fees + undistributed
///   revenue + the unsettled escrow of open usage licenses.
///
/// Timed licenses: buying a timed term again while the buyer's timed license of that model is
/// active extends the same license id from its current expiry (LicenseExtended); once it has
/// expired, a purchase creates a new license id.
///
/// Usage licenses: the escrow (msg.value) buys units at `unitPrice`. The buyer signs
/// cumulative vouchers off-chain; anyone may submit the latest with `settleUsage`. The holder
/// ends the license with `requestClose`, then anyone calls `close` once the challenge window
/// has passed; settlements inside the window still succeed, so a node can always settle the
/// last voucher it accepted.
contract LicenseMarket is EIP712, ReentrancyGuardTransient, IRevenueMarket {
    using SafeCast for uint256;

    enum Kind {
        Perpetual,
        Timed,
        Usage
    }

    struct Term {
        uint8 kind;
        uint256 price; // wei, for perpetual and timed terms; must be 0 for usage terms
        uint64 duration; // seconds, timed terms
        uint256 unitPrice; // wei per unit, usage terms
        uint256 maxUnits; // escrow cap in units, usage terms
    }

    struct Order {
        address seller;
        uint256 tokenId;
        Term[] terms;
        uint256 nonce;
        uint64 expiry;
    }

    /// One storage slot.
    struct License {
        address holder;
        uint8 kind;
        uint40 expiresAt; // timed: end of access; 0 otherwise
        uint48 tokenId;
    }

    /// Usage licenses only: two more slots.
    struct Escrow {
        uint96 unitPrice;
        uint112 deposited; // all escrow ever paid in; unsettled = deposited − settled × unitPrice
        uint40 closeRequestedAt;
        bool closed;
        uint128 settledUnits;
        uint128 maxUnits;
    }

    /// Revenue booked for a model, net of fees; `earned − distributed` awaits `distribute`.
    struct Revenue {
        uint128 earned;
        uint128 distributed;
    }

    bytes32 public constant TERM_TYPEHASH =
        keccak256("Term(uint8 kind,uint256 price,uint64 duration,uint256 unitPrice,uint256 maxUnits)");
    bytes32 public constant ORDER_TYPEHASH = keccak256(
        "Order(address seller,uint256 tokenId,Term[] terms,uint256 nonce,uint64 expiry)Term(uint8 kind,uint256 price,uint64 duration,uint256 unitPrice,uint256 maxUnits)"
    );
    bytes32 public constant VOUCHER_TYPEHASH = keccak256("Voucher(uint256 licenseId,uint256 cumulativeUnits)");
    uint256 public constant BPS = 10_000;
    uint256 public constant MAX_FEE_BPS = 1_000;

    ModelRegistry public immutable registry;
    address public immutable treasury;
    uint16 public immutable feeBps;
    uint64 public immutable challengeWindow;

    /// Packed in one slot: both change on every sale.
    uint64 public licenseCount;
    uint192 public feesAccrued;
    mapping(address seller => uint256) public nonces;
    mapping(bytes32 orderHash => bool) public cancelled;
    mapping(address account => uint256) public balanceOf;
    mapping(uint256 licenseId => License) private _licenses;
    mapping(uint256 licenseId => Escrow) private _escrows;
    mapping(bytes32 holderAndToken => uint256 licenseId) private _timedLicenseOf;
    mapping(uint256 tokenId => Revenue) public revenueOf;

    event OrderCancelled(bytes32 indexed orderHash, address indexed seller);
    event NonceBumped(address indexed seller, uint256 nonce);
    event LicensePurchased(
        uint256 indexed licenseId,
        uint256 indexed tokenId,
        address indexed holder,
        uint8 kind,
        uint256 price,
        uint64 expiresAt,
        uint256 escrow,
        bytes32 orderHash,
        uint8 termIndex
    );
    event LicenseExtended(uint256 indexed licenseId, uint64 expiresAt, uint256 price, bytes32 orderHash);
    event UsageSettled(uint256 indexed licenseId, uint256 cumulativeUnits, uint256 units, uint256 amount);
    event EscrowToppedUp(uint256 indexed licenseId, uint256 amount, uint256 deposited);
    event CloseRequested(uint256 indexed licenseId, uint64 closableAt);
    event Closed(uint256 indexed licenseId, address indexed holder, uint256 refund);
    event Distributed(uint256 indexed tokenId, uint256 amount);
    event Credited(address indexed recipient, uint256 indexed tokenId, uint256 amount);
    event Withdrawn(address indexed account, uint256 amount);

    error FeeTooHigh(uint256 feeBps, uint256 max);
    error ZeroTreasury();
    error BadSignature();
    error NotTokenOwner(address seller, address owner);
    error StaleNonce(uint256 orderNonce, uint256 currentNonce);
    error OrderExpired(uint64 expiry);
    error OrderIsCancelled(bytes32 orderHash);
    error NoSuchTerm(uint8 termIndex, uint256 termCount);
    error InvalidTerm(uint8 termIndex, string reason);
    error WrongPayment(uint256 expected, uint256 paid);
    error BadEscrow(uint256 paid, uint256 unitPrice, uint256 maxUnits);
    error NotSeller(address seller, address caller);
    error UnknownLicense(uint256 licenseId);
    error NotUsageLicense(uint256 licenseId);
    error NotHolder(uint256 licenseId, address caller);
    error LicenseClosed(uint256 licenseId);
    error AlreadyClosing(uint256 licenseId);
    error NotClosing(uint256 licenseId);
    error ChallengeWindowOpen(uint64 closableAt);
    error UnitsNotIncreasing(uint256 cumulativeUnits, uint256 settledUnits);
    error BeyondEscrow(uint256 cumulativeUnits, uint256 paidUnits);
    error NothingToWithdraw();
    error TransferFailed();

    constructor(ModelRegistry registry_, address treasury_, uint16 feeBps_, uint64 challengeWindow_)
        EIP712("Agora LicenseMarket", "1")
    {
        if (feeBps_ > MAX_FEE_BPS) revert FeeTooHigh(feeBps_, MAX_FEE_BPS);
        if (treasury_ == address(0)) revert ZeroTreasury();
        registry = registry_;
        treasury = treasury_;
        feeBps = feeBps_;
        challengeWindow = challengeWindow_;
    }

    // ---------------------------------------------------------------- purchase

    /// Buys `order.terms[termIndex]`. Pays exactly `price` for perpetual and timed terms; for
    /// usage terms `msg.value` is the escrow, a positive multiple of `unitPrice` of at most
    /// `maxUnits` units.
    function purchase(Order calldata order, bytes calldata signature, uint8 termIndex)
        external
        payable
        returns (uint256 licenseId)
    {
        bytes32 hash = orderHash(order);
        _checkOrder(order, hash, signature, registry.ownerOf(order.tokenId));
        if (termIndex >= order.terms.length) revert NoSuchTerm(termIndex, order.terms.length);
        Term calldata term = order.terms[termIndex];
        uint48 tokenId = order.tokenId.toUint48();

        if (term.kind == uint8(Kind.Perpetual)) {
            _requirePrice(termIndex, term);
            licenseId = _newLicense(License(msg.sender, term.kind, 0, tokenId));
            emit LicensePurchased(licenseId, tokenId, msg.sender, term.kind, term.price, 0, 0, hash, termIndex);
        } else if (term.kind == uint8(Kind.Timed)) {
            _requirePrice(termIndex, term);
            if (term.duration == 0) revert InvalidTerm(termIndex, "zero duration");
            licenseId = _buyTimed(tokenId, term, hash, termIndex);
        } else if (term.kind == uint8(Kind.Usage)) {
            licenseId = _buyUsage(tokenId, term, hash, termIndex);
            return licenseId; // escrow is paid out by settleUsage, not now
        } else {
            revert InvalidTerm(termIndex, "unknown kind");
        }
        _book(order.tokenId, msg.value);
    }

    function _checkOrder(Order calldata order, bytes32 hash, bytes calldata signature, address owner) private view {
        if (!SignatureChecker.isValidSignatureNow(order.seller, hash, signature)) revert BadSignature();
        if (order.seller != owner) revert NotTokenOwner(order.seller, owner);
        if (order.nonce != nonces[order.seller]) revert StaleNonce(order.nonce, nonces[order.seller]);
        if (block.timestamp > order.expiry) revert OrderExpired(order.expiry);
        if (cancelled[hash]) revert OrderIsCancelled(hash);
    }

    function _requirePrice(uint8 termIndex, Term calldata term) private view {
        if (term.price == 0) revert InvalidTerm(termIndex, "zero price");
        if (msg.value != term.price) revert WrongPayment(term.price, msg.value);
    }

    function _newLicense(License memory license) private returns (uint256 licenseId) {
        licenseId = ++licenseCount;
        _licenses[licenseId] = license;
    }

    /// Books a payment: the fee for the treasury, the rest as the model's revenue.
    function _book(uint256 tokenId, uint256 amount) private {
        uint256 fee = amount * feeBps / BPS;
        feesAccrued += fee.toUint192();
        revenueOf[tokenId].earned += (amount - fee).toUint128();
    }

    function _buyTimed(uint48 tokenId, Term calldata term, bytes32 hash, uint8 termIndex)
        private
        returns (uint256 licenseId)
    {
        bytes32 key = keccak256(abi.encode(msg.sender, tokenId));
        licenseId = _timedLicenseOf[key];
        if (licenseId != 0 && _licenses[licenseId].expiresAt > block.timestamp) {
            License storage license = _licenses[licenseId];
            uint40 expiresAt = (uint256(license.expiresAt) + term.duration).toUint40();
            license.expiresAt = expiresAt;
            emit LicenseExtended(licenseId, expiresAt, term.price, hash);
        } else {
            uint40 expiresAt = (block.timestamp + term.duration).toUint40();
            licenseId = _newLicense(License(msg.sender, term.kind, expiresAt, tokenId));
            _timedLicenseOf[key] = licenseId;
            emit LicensePurchased(licenseId, tokenId, msg.sender, term.kind, term.price, expiresAt, 0, hash, termIndex);
        }
    }

    function _buyUsage(uint48 tokenId, Term calldata term, bytes32 hash, uint8 termIndex)
        private
        returns (uint256 licenseId)
    {
        if (term.price != 0) revert InvalidTerm(termIndex, "usage terms take escrow, not a price");
        if (term.unitPrice == 0 || term.maxUnits == 0) revert InvalidTerm(termIndex, "zero unit price or units");
        if (
            msg.value == 0 || msg.value % term.unitPrice != 0 || msg.value / term.unitPrice > term.maxUnits
        ) revert BadEscrow(msg.value, term.unitPrice, term.maxUnits);
        licenseId = _newLicense(License(msg.sender, term.kind, 0, tokenId));
        _escrows[licenseId] = Escrow({
            unitPrice: term.unitPrice.toUint96(),
            deposited: msg.value.toUint112(),
            closeRequestedAt: 0,
            closed: false,
            settledUnits: 0,
            maxUnits: term.maxUnits.toUint128()
        });
        emit LicensePurchased(licenseId, tokenId, msg.sender, term.kind, 0, 0, msg.value, hash, termIndex);
    }

    /// Splits a model's undistributed revenue into its recipients' withdrawable balances,
    /// by the split in force now. Anyone may call it; nothing pending is a no-op.
    function distribute(uint256 tokenId) public returns (uint256 amount) {
        Revenue storage revenue = revenueOf[tokenId];
        amount = revenue.earned - revenue.distributed;
        if (amount == 0) return 0;
        revenue.distributed = revenue.earned;
        (, bytes memory splits) = registry.payoutOf(tokenId);
        uint256 n = splits.length / 22;
        uint256 paid;
        address first;
        uint256 firstShare;
        for (uint256 i; i < n; ++i) {
            uint256 word;
            assembly ("memory-safe") {
                word := mload(add(add(splits, 32), mul(i, 22)))
            }
            address recipient = address(uint160(word >> 96));
            uint256 share = amount * uint16(word >> 80) / BPS;
            paid += share;
            if (i == 0) {
                (first, firstShare) = (recipient, share);
            } else {
                _credit(recipient, tokenId, share);
            }
        }
        // the rounding dust goes to the first recipient
        _credit(first, tokenId, firstShare + (amount - paid));
        emit Distributed(tokenId, amount);
    }

    function _credit(address recipient, uint256 tokenId, uint256 amount) private {
        balanceOf[recipient] += amount;
        emit Credited(recipient, tokenId, amount);
    }

    // ---------------------------------------------------------------- usage

    /// Settles a holder-signed voucher: pays the units used since the last settlement from
    /// the escrow to the split. Anyone may submit it; only the latest voucher matters.
    function settleUsage(uint256 licenseId, uint256 cumulativeUnits, bytes calldata buyerSig) external {
        License memory license = _usageLicense(licenseId);
        Escrow storage escrow = _escrows[licenseId];
        if (escrow.closed) revert LicenseClosed(licenseId);
        bytes32 digest = _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, licenseId, cumulativeUnits)));
        if (!SignatureChecker.isValidSignatureNow(license.holder, digest, buyerSig)) revert BadSignature();
        uint256 settled = escrow.settledUnits;
        if (cumulativeUnits <= settled) revert UnitsNotIncreasing(cumulativeUnits, settled);
        uint256 unitPrice = escrow.unitPrice;
        uint256 paidUnits = escrow.deposited / unitPrice;
        if (cumulativeUnits > paidUnits) revert BeyondEscrow(cumulativeUnits, paidUnits);
        escrow.settledUnits = uint128(cumulativeUnits); // <= paidUnits < 2^112
        uint256 amount = (cumulativeUnits - settled) * unitPrice;
        _book(license.tokenId, amount);
        emit UsageSettled(licenseId, cumulativeUnits, cumulativeUnits - settled, amount);
    }

    /// Adds escrow to an open usage license, in whole units, up to its `maxUnits`.
    function topUp(uint256 licenseId) external payable {
        _usageLicense(licenseId);
        Escrow storage escrow = _escrows[licenseId];
        if (escrow.closed) revert LicenseClosed(licenseId);
        if (escrow.closeRequestedAt != 0) revert AlreadyClosing(licenseId);
        uint256 deposited = escrow.deposited + msg.value;
        uint256 unitPrice = escrow.unitPrice;
        if (msg.value == 0 || msg.value % unitPrice != 0 || deposited / unitPrice > escrow.maxUnits) {
            revert BadEscrow(msg.value, unitPrice, escrow.maxUnits);
        }
        escrow.deposited = deposited.toUint112();
        emit EscrowToppedUp(licenseId, msg.value, deposited);
    }

    /// The holder starts closing a usage license; `close` may follow after the challenge window.
    function requestClose(uint256 licenseId) external {
        License memory license = _usageLicense(licenseId);
        if (license.holder != msg.sender) revert NotHolder(licenseId, msg.sender);
        Escrow storage escrow = _escrows[licenseId];
        if (escrow.closed) revert LicenseClosed(licenseId);
        if (escrow.closeRequestedAt != 0) revert AlreadyClosing(licenseId);
        escrow.closeRequestedAt = uint40(block.timestamp);
        emit CloseRequested(licenseId, uint64(block.timestamp) + challengeWindow);
    }

    /// Ends a usage license after its challenge window and credits the unsettled escrow to
    /// the holder's withdrawable balance. Anyone may call it.
    function close(uint256 licenseId) external {
        License memory license = _usageLicense(licenseId);
        Escrow storage escrow = _escrows[licenseId];
        if (escrow.closed) revert LicenseClosed(licenseId);
        if (escrow.closeRequestedAt == 0) revert NotClosing(licenseId);
        uint64 closableAt = uint64(escrow.closeRequestedAt) + challengeWindow;
        if (block.timestamp < closableAt) revert ChallengeWindowOpen(closableAt);
        escrow.closed = true;
        uint256 refund = escrow.deposited - uint256(escrow.settledUnits) * escrow.unitPrice;
        balanceOf[license.holder] += refund;
        emit Closed(licenseId, license.holder, refund);
    }

    function _usageLicense(uint256 licenseId) private view returns (License memory license) {
        license = _licenses[licenseId];
        if (license.holder == address(0)) revert UnknownLicense(licenseId);
        if (license.kind != uint8(Kind.Usage)) revert NotUsageLicense(licenseId);
    }

    // ---------------------------------------------------------------- sellers

    /// Cancels one order; only its seller.
    function cancel(Order calldata order) external {
        if (msg.sender != order.seller) revert NotSeller(order.seller, msg.sender);
        bytes32 hash = orderHash(order);
        cancelled[hash] = true;
        emit OrderCancelled(hash, msg.sender);
    }

    /// Cancels every order the caller has signed so far.
    function bumpNonce() external {
        uint256 nonce = ++nonces[msg.sender];
        emit NonceBumped(msg.sender, nonce);
    }

    // ---------------------------------------------------------------- payments

    /// Pays the caller's whole withdrawable balance (and, for the treasury, the accrued fees).
    function withdraw() public nonReentrant {
        uint256 amount = balanceOf[msg.sender];
        balanceOf[msg.sender] = 0;
        if (msg.sender == treasury) {
            amount += feesAccrued;
            feesAccrued = 0;
        }
        if (amount == 0) revert NothingToWithdraw();
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    /// Distributes the revenue of `tokenIds`, then pays the caller's balance: one transaction
    /// for a recipient to collect everything its models earned.
    function distributeAndWithdraw(uint256[] calldata tokenIds) external {
        for (uint256 i; i < tokenIds.length; ++i) distribute(tokenIds[i]);
        withdraw();
    }

    /// What `account` can withdraw now, without distributing: its balance, plus fees for the treasury.
    function withdrawable(address account) external view returns (uint256) {
        return balanceOf[account] + (account == treasury ? feesAccrued : 0);
    }

    // ---------------------------------------------------------------- views

    function orderHash(Order calldata order) public view returns (bytes32) {
        uint256 n = order.terms.length;
        bytes32[] memory termHashes = new bytes32[](n);
        for (uint256 i; i < n; ++i) {
            Term calldata t = order.terms[i];
            termHashes[i] = keccak256(abi.encode(TERM_TYPEHASH, t.kind, t.price, t.duration, t.unitPrice, t.maxUnits));
        }
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    ORDER_TYPEHASH,
                    order.seller,
                    order.tokenId,
                    keccak256(abi.encodePacked(termHashes)),
                    order.nonce,
                    order.expiry
                )
            )
        );
    }

    function voucherDigest(uint256 licenseId, uint256 cumulativeUnits) external view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, licenseId, cumulativeUnits)));
    }

    function licenses(uint256 licenseId) external view returns (License memory) {
        License memory license = _licenses[licenseId];
        if (license.holder == address(0)) revert UnknownLicense(licenseId);
        return license;
    }

    function escrowOf(uint256 licenseId) external view returns (Escrow memory) {
        _usageLicense(licenseId);
        return _escrows[licenseId];
    }

    /// Whether the license gives access now: perpetual always, timed until expiry, usage until closed.
    function isActive(uint256 licenseId) external view returns (bool) {
        License memory license = _licenses[licenseId];
        if (license.holder == address(0)) return false;
        if (license.kind == uint8(Kind.Timed)) return license.expiresAt > block.timestamp;
        if (license.kind == uint8(Kind.Usage)) return !_escrows[licenseId].closed;
        return true;
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }
}
