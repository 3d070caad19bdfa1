// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC721} from "@openzeppelin/contracts/token/ERC721/ERC721.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {SignatureChecker} from "@openzeppelin/contracts/utils/cryptography/SignatureChecker.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {SafeCast} from "@openzeppelin/contracts/utils/math/SafeCast.sol";

/// @title ComputeMarket
/// @notice Escrowed reservations of GPU capacity that providers offer off-chain. A provider
/// signs an EIP-712 `Offer` (GPUs, price per GPU-hour, availability window); a buyer reserves
/// GPU-hours from it at the offer's price, paying the whole cost into escrow. Each reservation
/// is an ERC-721 token, a **compute future**: until its start time it can be transferred or
/// resold, so capacity bought ahead at a locked price can be hedged or unloaded; whoever holds
/// the token when the reservation settles receives the refund.
///
/// Lifecycle (`grace` is fixed at deployment):
/// - the provider confirms the start with `confirmStart` by `startTime + grace`; otherwise the
///   holder may `reclaim` the whole escrow;
/// - after the job, the provider `claim`s the hours used with the holder's signed
///   `UsageStatement(reservationId, hoursUsed)`: `hoursUsed × price` is credited to the provider,
///   the rest to the holder;
/// - a holder who never signs: the provider `report`s the hours used by `endTime + grace`, and
///   anyone may `finalize` the report `grace` seconds later (no dispute: a report is capped by
///   the hours reserved, and a holder who disagrees signs a statement the provider can claim
///   with in the meantime). A confirmed reservation with neither claim nor report by
///   `endTime + grace` (the provider vanished mid-job) may be reclaimed in full by the holder.
///
/// An offer backs one reservation: reserving takes the offer's GPUs for the reservation's time,
/// and the provider signs a fresh offer for the capacity that remains. Payments are pulled
/// with `withdraw`. The contract's balance always equals the withdrawable balances plus the
/// escrow of open reservations.
contract ComputeMarket is ERC721, EIP712, ReentrancyGuardTransient {
    using SafeCast for uint256;

    enum Kind {
        Owned,
        Partner,
        Spot
    }

    enum State {
        None,
        Reserved,
        Confirmed,
        Settled,
        Reclaimed
    }

    struct Offer {
        address provider;
        string gpu; // GPU model, e.g. "H100-80GB"
        uint32 gpuCount;
        uint32 memoryGb; // per GPU
        uint256 pricePerGpuHour; // wei
        uint8 kind; // Kind
        uint64 availableFrom;
        uint64 availableUntil;
        string region;
        string node; // the provider node's libp2p peer id: where buyers send jobs
        uint256 nonce;
        uint64 expiry;
    }

    /// Three storage slots.
    struct Reservation {
        address provider;
        uint64 startTime;
        uint32 gpuCount;
        uint128 pricePerGpuHour;
        uint64 gpuHours;
        uint64 endTime;
        uint64 confirmedAt;
        uint64 reportedAt;
        uint64 reportedHours;
        uint8 state; // State
    }

    bytes32 public constant OFFER_TYPEHASH = keccak256(
        "Offer(address provider,string gpu,uint32 gpuCount,uint32 memoryGb,uint256 pricePerGpuHour,uint8 kind,uint64 availableFrom,uint64 availableUntil,string region,string node,uint256 nonce,uint64 expiry)"
    );
    bytes32 public constant STATEMENT_TYPEHASH = keccak256("UsageStatement(uint256 reservationId,uint64 hoursUsed)");

    /// Seconds a provider has to confirm after the start, and to claim or report after the end;
    /// also how long a report waits before it can be finalized.
    uint64 public immutable grace;

    uint256 public reservationCount;
    mapping(address provider => uint256) public nonces;
    /// Offers already reserved or cancelled.
    mapping(bytes32 offerHash => bool) public closed;
    mapping(address account => uint256) public withdrawable;
    mapping(uint256 reservationId => Reservation) private _reservations;

    event Reserved(
        uint256 indexed reservationId,
        address indexed provider,
        address indexed holder,
        bytes32 offerHash,
        uint64 gpuHours,
        uint256 pricePerGpuHour,
        uint64 startTime,
        uint64 endTime,
        uint256 escrow
    );
    event Confirmed(uint256 indexed reservationId, uint64 at);
    event Reported(uint256 indexed reservationId, uint64 hoursUsed, uint64 finalAt);
    event Settled(uint256 indexed reservationId, address indexed holder, uint64 hoursUsed, uint256 paid, uint256 refund);
    event Reclaimed(uint256 indexed reservationId, address indexed holder, uint256 refund);
    event OfferCancelled(bytes32 indexed offerHash, address indexed provider);
    event NonceBumped(address indexed provider, uint256 nonce);
    event Withdrawn(address indexed account, uint256 amount);

    error BadSignature();
    error StaleNonce(uint256 offerNonce, uint256 currentNonce);
    error OfferExpired(uint64 expiry);
    error OfferClosed(bytes32 offerHash);
    error InvalidOffer(string reason);
    error ZeroHours();
    error StartInPast(uint64 startTime);
    error OutsideAvailability(uint64 startTime, uint64 endTime, uint64 availableFrom, uint64 availableUntil);
    error WrongPayment(uint256 expected, uint256 paid);
    error UnknownReservation(uint256 reservationId);
    error NotProvider(uint256 reservationId, address caller);
    error NotOfferProvider(address provider, address caller);
    error WrongState(uint256 reservationId, uint8 state);
    error TooLate(uint256 reservationId, uint64 deadline);
    error TooEarly(uint256 reservationId, uint64 allowedAt);
    error TooManyHours(uint64 hoursUsed, uint64 gpuHours);
    error AlreadyReported(uint256 reservationId);
    error NotReported(uint256 reservationId);
    error NotTransferable(uint256 reservationId);
    error NothingToWithdraw();
    error TransferFailed();

    constructor(uint64 grace_) ERC721("Agora Compute Future", "AGCF") EIP712("Agora ComputeMarket", "1") {
        grace = grace_;
    }

    // ---------------------------------------------------------------- buyers

    /// Reserves `gpuHours` of `offer` starting at `startTime` (0: now), paying exactly
    /// `gpuHours × pricePerGpuHour` into escrow. The reservation runs on all the offer's GPUs,
    /// for `ceil(gpuHours / gpuCount)` wall-clock hours, inside the offer's availability.
    function reserve(Offer calldata offer, bytes calldata signature, uint64 gpuHours, uint64 startTime)
        external
        payable
        returns (uint256 reservationId)
    {
        bytes32 hash = offerHash(offer);
        if (!SignatureChecker.isValidSignatureNow(offer.provider, hash, signature)) revert BadSignature();
        if (offer.nonce != nonces[offer.provider]) revert StaleNonce(offer.nonce, nonces[offer.provider]);
        if (block.timestamp > offer.expiry) revert OfferExpired(offer.expiry);
        if (closed[hash]) revert OfferClosed(hash);
        if (offer.gpuCount == 0) revert InvalidOffer("zero GPUs");
        if (offer.pricePerGpuHour == 0) revert InvalidOffer("zero price");
        if (offer.kind > uint8(Kind.Spot)) revert InvalidOffer("unknown kind");
        if (gpuHours == 0) revert ZeroHours();
        if (startTime == 0) startTime = uint64(block.timestamp);
        if (startTime < block.timestamp) revert StartInPast(startTime);
        uint64 endTime = (startTime + (uint256(gpuHours) + offer.gpuCount - 1) / offer.gpuCount * 1 hours).toUint64();
        if (startTime < offer.availableFrom || endTime > offer.availableUntil) {
            revert OutsideAvailability(startTime, endTime, offer.availableFrom, offer.availableUntil);
        }
        uint256 escrow = uint256(gpuHours) * offer.pricePerGpuHour;
        if (msg.value != escrow) revert WrongPayment(escrow, msg.value);

        closed[hash] = true;
        reservationId = ++reservationCount;
        _reservations[reservationId] = Reservation({
            provider: offer.provider,
            startTime: startTime,
            gpuCount: offer.gpuCount,
            pricePerGpuHour: offer.pricePerGpuHour.toUint128(),
            gpuHours: gpuHours,
            endTime: endTime,
            confirmedAt: 0,
            reportedAt: 0,
            reportedHours: 0,
            state: uint8(State.Reserved)
        });
        emit Reserved(
            reservationId, offer.provider, msg.sender, hash, gpuHours, offer.pricePerGpuHour, startTime, endTime, escrow
        );
        _mint(msg.sender, reservationId);
    }

    /// Refunds the whole escrow to the holder when the provider did not confirm by
    /// `startTime + grace`, or confirmed but neither claimed nor reported by `endTime + grace`.
    /// Anyone may call it; the refund is credited to the token's holder.
    function reclaim(uint256 reservationId) external {
        Reservation storage r = _reservation(reservationId);
        uint64 allowedAt;
        if (r.state == uint8(State.Reserved)) {
            allowedAt = r.startTime + grace + 1;
        } else if (r.state == uint8(State.Confirmed) && r.reportedAt == 0) {
            allowedAt = r.endTime + grace + 1;
        } else {
            revert WrongState(reservationId, r.state);
        }
        if (block.timestamp < allowedAt) revert TooEarly(reservationId, allowedAt);
        r.state = uint8(State.Reclaimed);
        address holder = _ownerOf(reservationId);
        uint256 refund = uint256(r.gpuHours) * r.pricePerGpuHour;
        withdrawable[holder] += refund;
        emit Reclaimed(reservationId, holder, refund);
    }

    // ---------------------------------------------------------------- providers

    /// The provider confirms that the reserved capacity is running for the holder.
    function confirmStart(uint256 reservationId) external {
        Reservation storage r = _provided(reservationId, State.Reserved);
        uint64 deadline = r.startTime + grace;
        if (block.timestamp > deadline) revert TooLate(reservationId, deadline);
        r.state = uint8(State.Confirmed);
        r.confirmedAt = uint64(block.timestamp);
        emit Confirmed(reservationId, uint64(block.timestamp));
    }

    /// Settles with the holder's signed statement of the hours used: the provider is paid for
    /// them, the holder refunded the rest.
    function claim(uint256 reservationId, uint64 hoursUsed, bytes calldata holderSig) external {
        Reservation storage r = _provided(reservationId, State.Confirmed);
        if (hoursUsed > r.gpuHours) revert TooManyHours(hoursUsed, r.gpuHours);
        address holder = _ownerOf(reservationId);
        if (!SignatureChecker.isValidSignatureNow(holder, statementDigest(reservationId, hoursUsed), holderSig)) {
            revert BadSignature();
        }
        _settle(reservationId, r, holder, hoursUsed);
    }

    /// Without a statement from the holder, the provider reports the hours used; the report
    /// can be finalized `grace` seconds later.
    function report(uint256 reservationId, uint64 hoursUsed) external {
        Reservation storage r = _provided(reservationId, State.Confirmed);
        if (r.reportedAt != 0) revert AlreadyReported(reservationId);
        if (hoursUsed > r.gpuHours) revert TooManyHours(hoursUsed, r.gpuHours);
        uint64 deadline = r.endTime + grace;
        if (block.timestamp > deadline) revert TooLate(reservationId, deadline);
        r.reportedAt = uint64(block.timestamp);
        r.reportedHours = hoursUsed;
        emit Reported(reservationId, hoursUsed, uint64(block.timestamp) + grace);
    }

    /// Settles a report once its `grace` has passed. Anyone may call it.
    function finalize(uint256 reservationId) external {
        Reservation storage r = _reservation(reservationId);
        if (r.state != uint8(State.Confirmed)) revert WrongState(reservationId, r.state);
        if (r.reportedAt == 0) revert NotReported(reservationId);
        uint64 allowedAt = r.reportedAt + grace;
        if (block.timestamp < allowedAt) revert TooEarly(reservationId, allowedAt);
        _settle(reservationId, r, _ownerOf(reservationId), r.reportedHours);
    }

    /// Withdraws one offer before anyone reserves it; only its provider.
    function cancel(Offer calldata offer) external {
        if (msg.sender != offer.provider) revert NotOfferProvider(offer.provider, msg.sender);
        bytes32 hash = offerHash(offer);
        closed[hash] = true;
        emit OfferCancelled(hash, msg.sender);
    }

    /// Withdraws every offer the caller has signed so far.
    function bumpNonce() external {
        uint256 nonce = ++nonces[msg.sender];
        emit NonceBumped(msg.sender, nonce);
    }

    // ---------------------------------------------------------------- payments

    /// Pays the caller's whole withdrawable balance.
    function withdraw() external nonReentrant {
        uint256 amount = withdrawable[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        withdrawable[msg.sender] = 0;
        emit Withdrawn(msg.sender, amount);
        (bool ok,) = msg.sender.call{value: amount}("");
        if (!ok) revert TransferFailed();
    }

    function _settle(uint256 reservationId, Reservation storage r, address holder, uint64 hoursUsed) private {
        r.state = uint8(State.Settled);
        uint256 price = r.pricePerGpuHour;
        uint256 paid = uint256(hoursUsed) * price;
        uint256 refund = uint256(r.gpuHours - hoursUsed) * price;
        withdrawable[r.provider] += paid;
        withdrawable[holder] += refund;
        emit Settled(reservationId, holder, hoursUsed, paid, refund);
    }

    function _reservation(uint256 reservationId) private view returns (Reservation storage r) {
        r = _reservations[reservationId];
        if (r.state == uint8(State.None)) revert UnknownReservation(reservationId);
    }

    function _provided(uint256 reservationId, State state) private view returns (Reservation storage r) {
        r = _reservation(reservationId);
        if (msg.sender != r.provider) revert NotProvider(reservationId, msg.sender);
        if (r.state != uint8(state)) revert WrongState(reservationId, r.state);
    }

    /// Futures move only before their start, while open: once capacity runs, the holder is fixed.
    function _update(address to, uint256 tokenId, address auth) internal override returns (address from) {
        from = super._update(to, tokenId, auth);
        if (from != address(0)) {
            Reservation storage r = _reservations[tokenId];
            if (r.state > uint8(State.Confirmed) || block.timestamp >= r.startTime) revert NotTransferable(tokenId);
        }
    }

    // ---------------------------------------------------------------- views

    function offerHash(Offer calldata offer) public view returns (bytes32) {
        return _hashTypedDataV4(
            keccak256(
                abi.encode(
                    OFFER_TYPEHASH,
                    offer.provider,
                    keccak256(bytes(offer.gpu)),
                    offer.gpuCount,
                    offer.memoryGb,
                    offer.pricePerGpuHour,
                    offer.kind,
                    offer.availableFrom,
                    offer.availableUntil,
                    keccak256(bytes(offer.region)),
                    keccak256(bytes(offer.node)),
                    offer.nonce,
                    offer.expiry
                )
            )
        );
    }

    function statementDigest(uint256 reservationId, uint64 hoursUsed) public view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(STATEMENT_TYPEHASH, reservationId, hoursUsed)));
    }

    function reservations(uint256 reservationId) external view returns (Reservation memory) {
        return _reservation(reservationId);
    }

    /// The escrow still held for a reservation (zero once settled or reclaimed).
    function escrowOf(uint256 reservationId) external view returns (uint256) {
        Reservation storage r = _reservation(reservationId);
        if (r.state > uint8(State.Confirmed)) return 0;
        return uint256(r.gpuHours) * r.pricePerGpuHour;
    }

    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }
}
