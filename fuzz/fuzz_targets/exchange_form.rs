//! The RFC 8693 token exchange form of `POST /v1/token`: any body parses to a request
//! the broker validates, or to a description of what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    match latchkey::transport::oauth::parse_exchange("application/x-www-form-urlencoded", data) {
        Ok((token, req)) => {
            assert!(!token.is_empty());
            let _ = req.validate();
        }
        Err(description) => assert!(!description.is_empty()),
    }
});
