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
    uint256 credits;
    uint64 day;
    bytes32 receiptBatchHash;
}

contract Marketplace {
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
    error TooEarly(uint256 notBefore);
    error ContractPaused();
    error NothingToRefund(address user);

    // Why consumeCredits skipped a record (UsageRejected.reason).
    uint8 private constant REJECT_UNKNOWN_MODEL = 1;
    uint8 private constant REJECT_MODEL_INACTIVE = 2;
    uint8 private constant REJECT_OPERATOR_OWNS_MODEL = 3;
    uint8 private constant REJECT_PRICE_MISMATCH = 4;
    uint8 private constant REJECT_INSUFFICIENT_CREDITS = 5;
    uint8 private constant REJECT_OVER_DAILY_CAP = 6;
    uint8 private constant REJECT_OVERFLOW = 7;
    uint8 private constant REJECT_STALE_DAY = 8;

    uint256 private constant PRICE_WINDOW = 1 days;
    uint256 private constant OPERATOR_DELAY = 1 days;
    uint256 private constant ADMIN_DELAY = 2 days;
    uint256 private constant REFUND_DELAY = 2 days;
    /// Covers the longest time usage may wait for settlement, so usage charged under the old
    /// cap still settles.
    uint256 private constant CAP_DELAY = 2 days;
    uint256 private constant MAX = type(uint256).max;
    /// The least weiPerCredit the constructor accepts (1 gwei; below it, InvalidRate; the most
    /// is type(uint128).max, as the Stylus contract counts purchases in 128 bits). The
    /// off-chain registry counts credits as u64 (stored as i64 in MongoDB); with this floor all
    /// the ether in existence (about 1.2e26 wei) buys at most about 1.2e17 credits, far under
    /// i64 max (about 9.2e18), so no balance, earnings or batch total the registry mirrors can
    /// overflow it.
    uint256 private constant MIN_WEI_PER_CREDIT = 1 gwei;

    struct Model {
        address owner;
        bytes32 cidHash;
        bytes32 commitment;
        uint256 pricePerCall;
        bool active;
        uint256 previousPrice;
        uint256 priceChangedAt;
    }

    struct User {
        uint256 credits;
        uint256 earnings;
        bool capSet;
        uint256 dailyCap;
        // A lowered cap and when it takes effect (0: none); in force once that time has come.
        uint256 pendingCap;
        uint256 pendingCapAt;
        // Credits settled under a day label, in two slots (day % 2) tagged with their day.
        uint256[2] spentDay;
        uint256[2] spent;
        uint256 refundCredits;
        uint256 refundNotBefore;
    }

    address private _admin;
    address private _pendingAdmin;
    uint256 private _pendingAdminNotBefore;
    uint256 private immutable _weiPerCredit;
    bool private _paused;
    mapping(address => bool) private _operators;
    mapping(address => uint256) private _operatorNotBefore;
    mapping(bytes32 => Model) private _models;
    mapping(address => User) private _users;
    mapping(bytes32 => bytes32) private _settledBatches;

    constructor(address admin_, uint256 weiPerCredit_, address operator_) {
        if (admin_ == address(0)) revert ZeroAddress();
        if (weiPerCredit_ < MIN_WEI_PER_CREDIT || weiPerCredit_ > type(uint128).max) revert InvalidRate();
        _admin = admin_;
        _weiPerCredit = weiPerCredit_;
        emit AdminChanged(address(0), admin_);
        if (operator_ != address(0)) {
            _operators[operator_] = true;
            emit OperatorSet(operator_, true);
        }
    }

    function _add(uint256 a, uint256 b) private pure returns (uint256) {
        if (a > MAX - b) revert ArithmeticOverflow();
        return a + b;
    }

    function _mul(uint256 a, uint256 b) private pure returns (uint256) {
        if (b != 0 && a > MAX / b) revert ArithmeticOverflow();
        return a * b;
    }

    /// a * b == c, false on overflow.
    function _isProduct(uint256 a, uint256 b, uint256 c) private pure returns (bool) {
        if (b != 0 && a > MAX / b) return false;
        return a * b == c;
    }

    function _onlyAdmin() private view {
        if (msg.sender != _admin) revert Unauthorized(msg.sender);
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

    function modelKey(address owner, bytes32 localId) public view returns (bytes32) {
        return keccak256(abi.encode(owner, localId));
    }

    function registerModel(bytes32 localId, bytes32 cidHash, bytes32 commitment, uint256 pricePerCall) external returns (bytes32) {
        bytes32 key = modelKey(msg.sender, localId);
        Model storage model = _models[key];
        if (model.owner != address(0)) revert ModelAlreadyRegistered(key);
        model.owner = msg.sender;
        model.cidHash = cidHash;
        model.commitment = commitment;
        model.pricePerCall = pricePerCall;
        model.active = true;
        emit ModelRegistered(key, msg.sender, localId, cidHash, commitment, pricePerCall);
        return key;
    }

    function updatePrice(bytes32 modelId, uint256 newPrice) external {
        _ownedActiveModel(modelId);
        Model storage model = _models[modelId];
        uint256 changedAt = model.priceChangedAt;
        if (changedAt != 0 && block.timestamp < changedAt + PRICE_WINDOW) revert TooEarly(changedAt + PRICE_WINDOW);
        uint256 oldPrice = model.pricePerCall;
        model.previousPrice = oldPrice;
        model.pricePerCall = newPrice;
        model.priceChangedAt = block.timestamp;
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

    function getPrices(bytes32 modelId) external view returns (uint256, uint256, uint256) {
        _registeredOwner(modelId);
        Model storage model = _models[modelId];
        return (model.pricePerCall, model.previousPrice, model.priceChangedAt);
    }

    function buyCredits() external payable returns (uint256) {
        if (_paused) revert ContractPaused();
        // Payments above 2^128 - 1 wei are refused, as the Stylus contract counts in 128 bits.
        if (msg.value == 0 || msg.value > type(uint128).max || msg.value % _weiPerCredit != 0) {
            revert InvalidPayment(msg.value);
        }
        uint256 bought = msg.value / _weiPerCredit;
        User storage user = _users[msg.sender];
        user.credits = _add(user.credits, bought);
        emit CreditsBought(msg.sender, msg.value, bought);
        return bought;
    }

    function creditsOf(address user) external view returns (uint256) {
        return _users[user].credits;
    }

    function earningsOf(address owner) external view returns (uint256) {
        return _users[owner].earnings;
    }

    /// The cap in force now: a pending cap whose time has come, else the set cap, else MAX.
    function _capInForce(User storage u) private view returns (uint256) {
        if (u.pendingCapAt != 0 && block.timestamp >= u.pendingCapAt) return u.pendingCap;
        return u.capSet ? u.dailyCap : MAX;
    }

    /// Credits settled under the day label `day` (0 when its slot holds another day).
    function _spentOn(User storage u, uint64 day) private view returns (uint256) {
        uint256 slot = day % 2;
        return u.spentDay[slot] == day ? u.spent[slot] : 0;
    }

    function dailyCapOf(address user) external view returns (uint256) {
        return _capInForce(_users[user]);
    }

    function pendingDailyCapOf(address user) external view returns (uint256, uint256) {
        User storage u = _users[user];
        if (u.pendingCapAt == 0 || block.timestamp >= u.pendingCapAt) return (0, 0);
        return (u.pendingCap, u.pendingCapAt);
    }

    function spentOf(address user, uint64 day) external view returns (uint256) {
        return _spentOn(_users[user], day);
    }

    function refundOf(address user) external view returns (uint256, uint256) {
        User storage u = _users[user];
        return (u.refundCredits, u.refundNotBefore);
    }

    function weiPerCredit() external view returns (uint256) {
        return _weiPerCredit;
    }

    function admin() external view returns (address) {
        return _admin;
    }

    function pendingAdmin() external view returns (address, uint256) {
        return (_pendingAdmin, _pendingAdminNotBefore);
    }

    function isOperator(address account) external view returns (bool) {
        return _operators[account];
    }

    function operatorNotBefore(address account) external view returns (uint256) {
        return _operatorNotBefore[account];
    }

    function paused() external view returns (bool) {
        return _paused;
    }

    function batchRecordsHash(address operator, bytes32 batchId) external view returns (bytes32) {
        return _settledBatches[keccak256(abi.encode(operator, batchId))];
    }

    /// Why `record` can't be settled now (0: it can), given the batch's running total.
    function _rejection(UsageRecord calldata record, uint256 total) private view returns (uint8) {
        Model storage model = _models[record.modelId];
        address owner = model.owner;
        if (owner == address(0)) return REJECT_UNKNOWN_MODEL;
        if (!model.active) return REJECT_MODEL_INACTIVE;
        if (owner == msg.sender) return REJECT_OPERATOR_OWNS_MODEL;
        uint256 today = block.timestamp / 1 days;
        if (uint256(record.day) != today && uint256(record.day) + 1 != today) return REJECT_STALE_DAY;
        uint256 calls = uint256(record.calls);
        bool priced = calls != 0 && (
            _isProduct(model.pricePerCall, calls, record.credits)
            || (model.priceChangedAt != 0 && block.timestamp < model.priceChangedAt + PRICE_WINDOW
                && _isProduct(model.previousPrice, calls, record.credits))
        );
        if (!priced) return REJECT_PRICE_MISMATCH;
        User storage user = _users[record.user];
        if (user.credits < record.credits) return REJECT_INSUFFICIENT_CREDITS;
        // Over the cap in force now, counting what settled under the record's day label.
        uint256 spent = _spentOn(user, record.day);
        if (spent > MAX - record.credits || spent + record.credits > _capInForce(user)) return REJECT_OVER_DAILY_CAP;
        if (_users[owner].earnings > MAX - record.credits || total > MAX - record.credits) return REJECT_OVERFLOW;
        return 0;
    }

    function consumeCredits(bytes32 batchId, UsageRecord[] calldata records) external {
        if (!_operators[msg.sender]) revert Unauthorized(msg.sender);
        if (_paused) revert ContractPaused();
        bytes32 key = keccak256(abi.encode(msg.sender, batchId));
        if (_settledBatches[key] != bytes32(0)) revert BatchAlreadySettled(batchId);
        if (records.length == 0) revert EmptyBatch();
        uint256 total = 0;
        uint256 settled = 0;
        bytes32 recordsHash = bytes32(0);
        for (uint256 i = 0; i < records.length; i++) {
            UsageRecord calldata record = records[i];
            recordsHash = keccak256(abi.encode(recordsHash, record.user, record.modelId, record.calls, record.credits, record.day, record.receiptBatchHash));
            uint8 reason = _rejection(record, total);
            if (reason != 0) {
                emit UsageRejected(batchId, record.user, record.modelId, record.calls, record.credits, record.receiptBatchHash, reason);
                continue;
            }
            User storage user = _users[record.user];
            user.credits -= record.credits;
            // Counted whether or not a cap is set.
            uint256 slot = record.day % 2;
            user.spent[slot] = _spentOn(user, record.day) + record.credits;
            user.spentDay[slot] = record.day;
            User storage owner = _users[_models[record.modelId].owner];
            owner.earnings += record.credits;
            total += record.credits;
            settled += 1;
            emit UsageSettled(batchId, record.user, record.modelId, record.calls, record.credits, record.receiptBatchHash);
        }
        _settledBatches[key] = recordsHash;
        emit BatchSettled(batchId, msg.sender, settled, records.length - settled, total, recordsHash);
    }

    /// Checks-effects-interactions: the earnings are zeroed before the transfer.
    function withdraw() external returns (uint256) {
        User storage owner = _users[msg.sender];
        uint256 earned = owner.earnings;
        if (earned == 0) revert NothingToWithdraw(msg.sender);
        uint256 amount = _mul(earned, _weiPerCredit);
        owner.earnings = 0;
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (!ok) revert TransferFailed(msg.sender, amount);
        emit Withdrawn(msg.sender, earned, amount);
        return amount;
    }

    /// A cap at least the one in force takes effect at once and drops a pending one; a lower
    /// one (a first cap included) is pending until now + CAP_DELAY, replacing an earlier one.
    function setDailyCap(uint256 cap) external {
        User storage user = _users[msg.sender];
        uint256 effectiveAt;
        if (cap >= _capInForce(user)) {
            effectiveAt = block.timestamp;
            user.capSet = true;
            user.dailyCap = cap;
            user.pendingCap = 0;
            user.pendingCapAt = 0;
        } else {
            effectiveAt = _add(block.timestamp, CAP_DELAY);
            if (user.pendingCapAt != 0 && block.timestamp >= user.pendingCapAt) {
                // The pending cap in force becomes the set one before it is replaced.
                user.capSet = true;
                user.dailyCap = user.pendingCap;
            }
            user.pendingCap = cap;
            user.pendingCapAt = effectiveAt;
        }
        emit DailyCapSet(msg.sender, cap, effectiveAt);
    }

    function requestRefund(uint256 credits) external {
        User storage user = _users[msg.sender];
        if (credits == 0) revert NothingToRefund(msg.sender);
        if (credits > user.credits) revert InsufficientCredits(msg.sender, credits, user.credits);
        uint256 notBefore = _add(block.timestamp, REFUND_DELAY);
        user.refundCredits = credits;
        user.refundNotBefore = notBefore;
        emit RefundRequested(msg.sender, credits, notBefore);
    }

    /// Pays the requested refund (at most the credits left) once its lock has passed.
    function claimRefund() external returns (uint256) {
        User storage user = _users[msg.sender];
        uint256 requested = user.refundCredits;
        if (requested == 0) revert NothingToRefund(msg.sender);
        if (block.timestamp < user.refundNotBefore) revert TooEarly(user.refundNotBefore);
        uint256 credits = requested < user.credits ? requested : user.credits;
        if (credits == 0) revert NothingToRefund(msg.sender);
        uint256 amount = _mul(credits, _weiPerCredit);
        user.credits -= credits;
        user.refundCredits = 0;
        user.refundNotBefore = 0;
        (bool ok,) = payable(msg.sender).call{value: amount}("");
        if (!ok) revert TransferFailed(msg.sender, amount);
        emit Refunded(msg.sender, credits, amount);
        return amount;
    }

    function setOperator(address operator, bool enabled) external {
        _onlyAdmin();
        if (operator == address(0)) revert ZeroAddress();
        if (enabled) {
            uint256 notBefore = _add(block.timestamp, OPERATOR_DELAY);
            _operatorNotBefore[operator] = notBefore;
            emit OperatorProposed(operator, notBefore);
        } else {
            _operators[operator] = false;
            _operatorNotBefore[operator] = 0;
            emit OperatorSet(operator, false);
        }
    }

    function acceptOperator() external {
        uint256 notBefore = _operatorNotBefore[msg.sender];
        if (notBefore == 0) revert Unauthorized(msg.sender);
        if (block.timestamp < notBefore) revert TooEarly(notBefore);
        _operatorNotBefore[msg.sender] = 0;
        _operators[msg.sender] = true;
        emit OperatorSet(msg.sender, true);
    }

    function proposeAdmin(address newAdmin) external {
        _onlyAdmin();
        if (newAdmin == address(0)) revert ZeroAddress();
        uint256 notBefore = _add(block.timestamp, ADMIN_DELAY);
        _pendingAdmin = newAdmin;
        _pendingAdminNotBefore = notBefore;
        emit AdminProposed(newAdmin, notBefore);
    }

    function acceptAdmin() external {
        if (_pendingAdmin == address(0) || msg.sender != _pendingAdmin) revert Unauthorized(msg.sender);
        if (block.timestamp < _pendingAdminNotBefore) revert TooEarly(_pendingAdminNotBefore);
        address previous = _admin;
        _admin = msg.sender;
        _pendingAdmin = address(0);
        _pendingAdminNotBefore = 0;
        emit AdminChanged(previous, msg.sender);
    }

    function setPaused(bool paused_) external {
        _onlyAdmin();
        _paused = paused_;
        emit PauseSet(paused_);
    }
}
