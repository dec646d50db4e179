//! The `Authorization` header parser: any text is parsed or refused, never a panic; what it
//! parses writes back to a header that parses the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use modelhub_core::signing::Authorization;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(auth) = Authorization::parse(text)
    {
        assert_eq!(Authorization::parse(&auth.to_header()), Ok(auth));
    }
});
