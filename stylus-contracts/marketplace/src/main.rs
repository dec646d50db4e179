//! `cargo run --features export-abi` prints the contract's Solidity interface (the SDK's export:
//! functions and errors; not events nor argument-only structs: see abi/MarketplaceEvents.sol);
//! `cargo run --features export-abi -- constructor` prints the constructor's signature. The
//! contract itself is the library (the cdylib that `cargo stylus` builds for wasm32).

fn main() {
    stylus_marketplace::print_from_args();
}
