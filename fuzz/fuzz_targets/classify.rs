//! Body parsing: MIME parsing, the first text/plain part, request classification, MIME depth.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(msg) = mail_parser::MessageParser::default().parse(data) {
        let _ = kst_core::body::mime_depth(&msg);
        if let Some(text) = kst_core::body::plain_text(&msg) {
            let _ = kst_core::body::classify(&text);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = kst_core::body::classify(text);
    }
});
