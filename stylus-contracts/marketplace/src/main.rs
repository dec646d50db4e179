//! `cargo run --features export-abi` prints the contract's Solidity interface (the SDK's export:
//! functions and errors, not events; see abi/MarketplaceEvents.sol).
#![cfg_attr(not(any(test, feature = "export-abi")), no_main)]

#[cfg(not(any(test, feature = "export-abi")))]
#[no_mangle]
pub extern "C" fn main() {}

#[cfg(feature = "export-abi")]
fn main() {
    stylus_marketplace::print_from_args();
}
