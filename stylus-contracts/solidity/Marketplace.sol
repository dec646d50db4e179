// SPDX-License-Identifier: Apache-2.0
// The Solidity twin of the Stylus Marketplace (marketplace/src/lib.rs): exactly the same ABI
// (functions, events, errors: `scripts/contracts abi-check` proves it) and the same semantics,
// including the order of checks, so the chain ledger can be tested on an EVM dev node.
// Arithmetic overflow reverts with ArithmeticOverflow(), as in the Rust contract, not Panic(0x11).
pragma solidity 0.8.37;

struct UsageRecord {
    address user;
    bytes32 modelId;
    uint64 calls;
    bytes32 receiptBatchHash;
}

contract Marketplace {
    event ModelRegistered(bytes32 indexed modelId, address indexed owner, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall);
    event PriceUpdated(bytes32 indexed modelId, uint256 oldPrice, uint256 newPrice);
    event ModelDeactivated(bytes32 indexed modelId, address indexed owner);
    event CreditsBought(address indexed buyer, uint256 amountWei, uint256 credits);
    event UsageSettled(bytes32 indexed batchId, address indexed user, bytes32 indexed modelId, uint64 calls, uint256 credits, bytes32 receiptBatchHash);
    event BatchSettled(bytes32 indexed batchId, address indexed operator, uint256 records, uint256 totalCredits);
    event Withdrawn(address indexed owner, uint256 credits, uint256 amountWei);
    event OperatorSet(address indexed operator, bool enabled);
    event AdminChanged(address indexed previousAdmin, address indexed newAdmin);

    error Unauthorized(address caller);
    error ZeroAddress();
    error InvalidRate();
    error ModelAlreadyRegistered(bytes32 modelId);
    error UnknownModel(bytes32 modelId);
    error ModelInactive(bytes32 modelId);
    error InvalidPayment(uint256 value);
    error EmptyBatch();
    error BatchAlreadySettled(bytes32 batchId);
    error InsufficientCredits(address user, uint256 needed, uint256 available);
    error NothingToWithdraw(address owner);
    error TransferFailed(address to, uint256 amount);
    error ArithmeticOverflow();

    struct Model {
        address owner;
        bytes32 cidHash;
        bytes32 commitment;
        uint256 pricePerCall;
        bool active;
    }

    uint256 private constant MAX = type(uint256).max;

    address private _admin;
    uint256 private immutable _weiPerCredit;
    mapping(address => bool) private _operators;
    mapping(bytes32 => Model) private _models;
    mapping(address => uint256) private _credits;
    mapping(address => uint256) private _earnings;
    mapping(bytes32 => bool) private _settledBatches;

    constructor(address admin_, uint256 weiPerCredit_) {
        if (admin_ == address(0)) revert ZeroAddress();
        if (weiPerCredit_ == 0) revert InvalidRate();
        _admin = admin_;
        _weiPerCredit = weiPerCredit_;
        emit AdminChanged(address(0), admin_);
    }

    function _add(uint256 a, uint256 b) private pure returns (uint256) {
        if (a > MAX - b) revert ArithmeticOverflow();
        return a + b;
    }

    function _mul(uint256 a, uint256 b) private pure returns (uint256) {
        if (b != 0 && a > MAX / b) revert ArithmeticOverflow();
        return a * b;
    }

    function _registeredOwner(bytes32 modelId) private view returns (address owner) {
        owner = _models[modelId].owner;
        if (owner == address(0)) revert UnknownModel(modelId);
    }

    /// Checks, in this order: the model exists, the caller owns it, it is active.
    function _ownedActiveModel(bytes32 modelId) private view returns (address owner) {
        owner = _registeredOwner(modelId);
        if (msg.sender != owner) revert Unauthorized(msg.sender);
        if (!_models[modelId].active) revert ModelInactive(modelId);
    }

    function registerModel(bytes32 modelId, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall) external {
        Model storage model = _models[modelId];
        if (model.owner != address(0)) revert ModelAlreadyRegistered(modelId);
        model.owner = msg.sender;
        model.cidHash = cidHash;
        model.commitment = commitment;
        model.pricePerCall = pricePerCall;
        model.active = true;
        emit ModelRegistered(modelId, msg.sender, cidHash, commitment, pricePerCall);
    }

    function updatePrice(bytes32 modelId, uint256 newPrice) external {
        _ownedActiveModel(modelId);
        Model storage model = _models[modelId];
        uint256 oldPrice = model.pricePerCall;
        model.pricePerCall = newPrice;
        emit PriceUpdated(modelId, oldPrice, newPrice);
    }

    function deactivate(bytes32 modelId) external {
        address owner = _ownedActiveModel(modelId);
        _models[modelId].active = false;
        emit ModelDeactivated(modelId, owner);
    }

    function getModel(bytes32 modelId) external view returns (address, bytes32, bytes32, uint256, bool) {
        address owner = _registeredOwner(modelId);
        Model storage model = _models[modelId];
        return (owner, model.cidHash, model.commitment, model.pricePerCall, model.active);
    }

    function buyCredits() external payable returns (uint256) {
        if (msg.value == 0 || msg.value % _weiPerCredit != 0) revert InvalidPayment(msg.value);
        uint256 bought = msg.value / _weiPerCredit;
        _credits[msg.sender] = _add(_credits[msg.sender], bought);
        emit CreditsBought(msg.sender, msg.value, bought);
        return bought;
    }

    function creditsOf(address user) external view returns (uint256) {
        return _credits[user];
    }

    function earningsOf(address owner) external view returns (uint256) {
        return _earnings[owner];
    }

    function weiPerCredit() external view returns (uint256) {
        return _weiPerCredit;
    }

    function admin() external view returns (address) {
        return _admin;
    }

    function isOperator(address account) external view returns (bool) {
        return _operators[account];
    }

    function isBatchSettled(bytes32 batchId) external view returns (bool) {
        return _settledBatches[batchId];
    }

    function consumeCredits(bytes32 batchId, UsageRecord[] calldata records) external {
        if (!_operators[msg.sender]) revert Unauthorized(msg.sender);
        if (_settledBatches[batchId]) revert BatchAlreadySettled(batchId);
        if (records.length == 0) revert EmptyBatch();
        uint256 total = 0;
        for (uint256 i = 0; i < records.length; i++) {
            UsageRecord calldata record = records[i];
            address owner = _registeredOwner(record.modelId);
            Model storage model = _models[record.modelId];
            if (!model.active) revert ModelInactive(record.modelId);
            uint256 cost = _mul(model.pricePerCall, uint256(record.calls));
            uint256 available = _credits[record.user];
            if (available < cost) revert InsufficientCredits(record.user, cost, available);
            _credits[record.user] = available - cost;
            _earnings[owner] = _add(_earnings[owner], cost);
            total = _add(total, cost);
            emit UsageSettled(batchId, record.user, record.modelId, record.calls, cost, record.receiptBatchHash);
        }
        _settledBatches[batchId] = true;
        emit BatchSettled(batchId, msg.sender, records.length, total);
    }

    /// Checks-effects-interactions: the earnings are zeroed before the transfer.
    function withdraw() external returns (uint256) {
        uint256 earned = _earnings[msg.sender];
        if (earned == 0) revert NothingToWithdraw(msg.sender);
        uint256 amount = _mul(earned, _weiPerCredit);
        _earnings[msg.sender] = 0;
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (!ok) revert TransferFailed(msg.sender, amount);
        emit Withdrawn(msg.sender, earned, amount);
        return amount;
    }

    function setOperator(address operator, bool enabled) external {
        if (msg.sender != _admin) revert Unauthorized(msg.sender);
        if (operator == address(0)) revert ZeroAddress();
        _operators[operator] = enabled;
        emit OperatorSet(operator, enabled);
    }

    function setAdmin(address newAdmin) external {
        address previous = _admin;
        if (msg.sender != previous) revert Unauthorized(msg.sender);
        if (newAdmin == address(0)) revert ZeroAddress();
        _admin = newAdmin;
        emit AdminChanged(previous, newAdmin);
    }
}
