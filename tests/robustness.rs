//! Hostile input never makes kst panic, hang or publish: property tests over arbitrary bytes and
//! over mutations of valid requests, through the real binary and through the engine in-process.

use std::sync::Arc;

use kst_core::{AddressPolicy, Decision, Envelope, HandleError, Kst, Policy};
use kst_tests::{TestKst, code, received_authenticated, stderr};
use proptest::prelude::*;

fn engine(dir: &std::path::Path) -> Kst {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(kst_fs::FsStore::open(dir.join("keys")))
        .expect("fs store");
    let mailer = kst_bin::server::mailer::SpoolMailer::new(dir.join("outbox"));
    Kst::new(
        Policy::new(&["example.net"], &["mail.example.net"]),
        Arc::new(store),
        Arc::new(mailer),
    )
}

fn valid_publication() -> Vec<u8> {
    let key = include_str!("../kst-core/testdata/alice.pub.asc");
    let account = AddressPolicy::default()
        .normalize("alice@example.net")
        .unwrap();
    let req = kst_core::client::build_publication(&account, key).unwrap();
    let mut raw = received_authenticated("alice@example.net", "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    raw
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Arbitrary bytes on stdin: `kst deliver` exits 0 (decided) or 65 (not for kst), never
    /// panics (101) and never reports a temporary failure for bad input.
    #[test]
    fn deliver_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let kst = TestKst::new("");
        let out = kst.deliver("x@acme.net", "keys@example.net", &bytes);
        prop_assert!(code(&out) == 0 || code(&out) == 65, "exit {}: {}", code(&out), stderr(&out));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Mutations of a valid publication (byte flips, truncation, insertions) through the engine
    /// never panic, and whatever is published is published for alice only.
    #[test]
    fn mutated_publications_are_decided_safely(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let kst = engine(dir.path());
        let mut raw = valid_publication();
        for (i, b) in flips {
            let at = i.index(raw.len());
            raw[at] = b;
        }
        if truncate {
            raw.truncate(cut.index(raw.len() + 1));
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let env = Envelope {
            sender: Some("alice@example.net".into()),
            recipient: "keys@example.net".into(),
            sasl_username: None,
        };
        match rt.block_on(kst.handle(&env, &raw)) {
            Ok(h) => {
                if let Decision::Published { address, .. } = h.decision {
                    prop_assert_eq!(address.as_str(), "alice@example.net");
                }
            }
            Err(HandleError::NotForKst(_)) => {}
            Err(HandleError::Temporary(e)) => prop_assert!(false, "temporary error on input: {e}"),
        }
    }
}
