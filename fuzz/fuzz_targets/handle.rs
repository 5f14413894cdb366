//! The whole decision for one message, with in-memory store and mailer: never panics, never
//! publishes for anyone but the authenticated account.
#![no_main]

use std::sync::Arc;

use kst_core::testing::{MemoryMailer, MemoryStore};
use kst_core::{Decision, Envelope, Kst, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut policy = Policy::new(&["example.net"], &["mail.example.net", "mx.example.net"]);
    policy.require_authentication_results = data.first().is_some_and(|b| b & 1 == 1);
    policy.authserv_id = "mx.example.net".into();
    let store = Arc::new(MemoryStore::default());
    let kst = Kst::new(policy, store.clone(), Arc::new(MemoryMailer::default()));
    let env = Envelope {
        sender: Some("alice@example.net".into()),
        recipient: "keys@example.net".into(),
        sasl_username: None,
    };
    if let Ok(h) = rt.block_on(kst.handle(&env, data)) {
        if let Decision::Published { address, .. } = h.decision {
            assert_eq!(address.as_str(), "alice@example.net");
        }
    }
    for (address, history) in store.map.lock().unwrap().iter() {
        assert_eq!(address.as_str(), "alice@example.net");
        for r in history {
            assert_eq!(r.address.as_str(), "alice@example.net");
        }
    }
});
