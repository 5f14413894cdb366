//! Header parsers that decide about trust: Received (login, source IP), Authentication-Results.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let trusted = vec!["mail.example.net".to_string(), "mx.example.net".to_string()];
    let _ = kst_core::received::authenticated_login(text, &trusted);
    let _ = kst_core::received::source_ip(text, &trusted);
    let _ = kst_core::authres::parse(text);
    let _ = kst_core::authres::vouch(Some(text), "mx.example.net", "bob@acme.net", Some("bob@acme.net"));
});
