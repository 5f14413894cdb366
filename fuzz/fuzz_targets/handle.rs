//! The whole decision for one message, with in-memory store and mailer: never panics, never
//! publishes for anyone but the authenticated account.
#![no_main]

use std::sync::{Arc, Mutex};

use kst_core::store::{KeyRecord, NewKey, PublishOutcome};
use kst_core::{Address, Decision, Envelope, KeyStore, Kst, Mailer, OutgoingMail, Policy, Result};
use libfuzzer_sys::fuzz_target;

#[derive(Default)]
struct Store(Mutex<Vec<KeyRecord>>);

#[async_trait::async_trait]
impl KeyStore for Store {
    fn name(&self) -> &'static str {
        "fuzz"
    }
    async fn publish(&self, key: NewKey) -> Result<PublishOutcome> {
        let r = key.into_record(1);
        self.0.lock().unwrap().push(r.clone());
        Ok(PublishOutcome::Published(r))
    }
    async fn get(&self, _: &Address) -> Result<Option<KeyRecord>> {
        Ok(None)
    }
    async fn history(&self, _: &Address) -> Result<Vec<KeyRecord>> {
        Ok(Vec::new())
    }
    async fn delete(&self, _: &Address) -> Result<bool> {
        Ok(false)
    }
    async fn list(&self, _: Option<&Address>, _: usize) -> Result<Vec<Address>> {
        Ok(Vec::new())
    }
    async fn restore(&self, _: &[KeyRecord]) -> Result<()> {
        Ok(())
    }
    async fn check(&self) -> Result<()> {
        Ok(())
    }
}

struct Sink;

#[async_trait::async_trait]
impl Mailer for Sink {
    fn name(&self) -> &'static str {
        "sink"
    }
    async fn send(&self, _: &OutgoingMail) -> Result<()> {
        Ok(())
    }
    async fn check(&self) -> Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut policy = Policy::new(&["example.net"], &["mail.example.net", "mx.example.net"]);
    policy.require_authentication_results = data.first().is_some_and(|b| b & 1 == 1);
    policy.authserv_id = "mx.example.net".into();
    let store = Arc::new(Store::default());
    let kst = Kst::new(policy, store.clone(), Arc::new(Sink));
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
    for r in store.0.lock().unwrap().iter() {
        assert_eq!(r.address.as_str(), "alice@example.net");
    }
});
