//! Configuration and policy loading: any text gives a config or an error naming a key,
//! never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = latchkey::config::Config::parse(text, "fuzz.toml") {
            assert!(!e.to_string().is_empty());
        }
    }
});
