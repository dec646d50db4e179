// SPDX-License-Identifier: Apache-2.0
// Hand-maintained: what the Stylus SDK's ABI export (abi/Marketplace.sol) leaves out, namely
// the events and the declaration of the struct used only as an argument. A TestVM test checks
// this file against the contract's Rust `sol!` declarations; scripts/contracts abi-check
// compiles it together with abi/Marketplace.sol and compares the result with the Solidity twin.
pragma solidity ^0.8.23;

struct UsageRecord {
    address user;
    bytes32 modelId;
    uint64 calls;
    uint256 credits;
    uint64 day;
    bytes32 receiptBatchHash;
}

interface IMarketplaceEvents {
    event ModelRegistered(bytes32 indexed modelId, address indexed owner, bytes32 localId, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall);
    event PriceUpdated(bytes32 indexed modelId, uint256 oldPrice, uint256 newPrice);
    event ModelDeactivated(bytes32 indexed modelId, address indexed owner);
    event CreditsBought(address indexed buyer, uint256 amountWei, uint256 credits);
    event UsageSettled(bytes32 indexed batchId, address indexed user, bytes32 indexed modelId, uint64 calls, uint256 credits, bytes32 receiptBatchHash);
    event UsageRejected(bytes32 indexed batchId, address indexed user, bytes32 indexed modelId, uint64 calls, uint256 credits, bytes32 receiptBatchHash, uint8 reason);
    event BatchSettled(bytes32 indexed batchId, address indexed operator, uint256 settled, uint256 rejected, uint256 totalCredits, bytes32 recordsHash);
    event Withdrawn(address indexed owner, uint256 credits, uint256 amountWei);
    event OperatorProposed(address indexed operator, uint256 notBefore);
    event OperatorSet(address indexed operator, bool enabled);
    event AdminProposed(address indexed newAdmin, uint256 notBefore);
    event AdminChanged(address indexed previousAdmin, address indexed newAdmin);
    event PauseSet(bool paused);
    event DailyCapSet(address indexed user, uint256 cap, uint256 effectiveAt);
    event RefundRequested(address indexed user, uint256 credits, uint256 notBefore);
    event Refunded(address indexed user, uint256 credits, uint256 amountWei);
}
