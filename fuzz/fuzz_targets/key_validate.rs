//! Key parsing and the key policy: armored (as sent) and binary (as stored) input.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use kst_core::validate::{KeyPolicy, validate};
use kst_core::{AddressPolicy, openpgp};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let account = AddressPolicy::default()
        .normalize("alice@example.net")
        .expect("valid address");
    let now = UNIX_EPOCH + Duration::from_secs(1_780_000_000);
    let policy = KeyPolicy::default();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = validate(text, &account, &policy, now);
        let _ = openpgp::parse_armored(text, 1 << 20);
    }
    // Binary packets, wrapped in armor so that they reach the packet parser.
    let armored = openpgp::armor_public_key(data);
    let _ = validate(&armored, &account, &policy, now);
    let _ = openpgp::parse_binary(data);
});
