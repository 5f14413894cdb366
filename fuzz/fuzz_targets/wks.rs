//! WKS submissions: recognition by MIME structure, then decryption with the real submission key
//! of the `gpg-wks-client` fixture and key extraction; also the raw input as the encrypted part.
#![no_main]

use std::sync::OnceLock;

use kst_core::wks::{Submission, SubmissionKey, extract_key, recognize};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SubmissionKey {
    static KEY: OnceLock<SubmissionKey> = OnceLock::new();
    KEY.get_or_init(|| {
        SubmissionKey::from_armored(include_str!(
            "../../tests/fixtures/wks/submission-key.secret.asc"
        ))
        .expect("the fixture submission key")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(msg) = mail_parser::MessageParser::default().parse(data)
        && let Some(Ok(sub)) = recognize(&msg)
    {
        let _ = extract_key(&sub, Some(key()), "example.net", 1 << 20);
    }
    let _ = extract_key(
        &Submission::Encrypted(data.to_vec()),
        Some(key()),
        "example.net",
        1 << 20,
    );
});
