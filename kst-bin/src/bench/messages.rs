//! The load: real OpenPGP keys (made with rPGP, one per address) and the publications and
//! retrievals that carry them, built before any timing starts.

use kst_core::client;
use kst_core::{Address, AddressPolicy};
use pgp::composed::SignedPublicKey;

/// One message as the MTA hands it on: envelope and raw content.
#[derive(Debug, Clone)]
pub struct Message {
    /// Envelope sender (the account for a publication, the requester for a retrieval).
    pub sender: String,
    /// Envelope recipient, `keys@<domain>`.
    pub recipient: String,
    /// The message with its trusted `Received:` header where one belongs.
    pub raw: Vec<u8>,
    /// What verifies the reply (K_auth, Message-ID), for `--pending-out`.
    pub pending: Option<client::Pending>,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The served domain (`keys@<domain>`, accounts `user<N>@<domain>`).
    pub domain: String,
    /// The `by` host of the trusted `Received:` header (one of `kst.trusted_mta_hosts`).
    pub mta: String,
    /// Publications: one per address, each with its own key.
    pub publications: usize,
    /// Retrievals, spread over the published addresses (and a few that have none).
    pub retrievals: usize,
}

/// Why the load could not be built.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// rPGP failed to make a key.
    #[error("cannot generate an OpenPGP key: {0}")]
    Keygen(String),
    /// An address built from `--domain` is not one.
    #[error("{0:?} is not a usable address (check --domain): {1}")]
    Address(String, String),
    /// kst's client refused to build a publication.
    #[error("cannot build a publication: {0}")]
    Build(String),
}

fn address(s: &str) -> Result<Address, LoadError> {
    AddressPolicy::default()
        .normalize(s)
        .map_err(|e| LoadError::Address(s.to_string(), e.to_string()))
}

/// An Ed25519 key with a Curve25519 encryption subkey and the User ID `Bench <address>`,
/// ASCII-armored: the shape `gpg --quick-gen-key ADDRESS` makes.
pub fn make_key(address: &str) -> Result<String, LoadError> {
    let secret =
        crate::keygen::ed25519_cv25519(&format!("Bench <{address}>")).map_err(LoadError::Keygen)?;
    SignedPublicKey::from(secret)
        .to_armored_string(Default::default())
        .map_err(|e| LoadError::Keygen(e.to_string()))
}

/// The account of publication `i`.
pub fn account(domain: &str, i: usize) -> String {
    format!("user{i:06}@{domain}")
}

/// A `Received:` header as Postfix writes it for an authenticated submission by `login`.
pub fn trusted_received(login: &str, mta: &str, n: usize) -> String {
    format!(
        "Received: from [10.0.0.1] (client.example [192.0.2.1])\r\n\t(Authenticated sender: {login})\r\n\tby {mta} (Postfix) with ESMTPSA id B{n:010X}\r\n\tfor <keys@example>; Mon, 30 Nov 2026 06:00:00 +0000 (UTC)\r\n"
    )
}

/// Builds the publications (each for its own address, with its own new key; `progress` is
/// called once per key made) and the retrievals (requesters `reader<N>@example.org`, asking
/// for published addresses in turn; one in ten asks for an address that has none).
pub fn build(
    spec: &LoadSpec,
    mut progress: impl FnMut(),
) -> Result<(Vec<Message>, Vec<Message>), LoadError> {
    let service = format!("keys@{}", spec.domain);
    let mut publications = Vec::with_capacity(spec.publications);
    for i in 0..spec.publications {
        let login = account(&spec.domain, i);
        let key = make_key(&login)?;
        let req = client::build_publication(&address(&login)?, &key)
            .map_err(|e| LoadError::Build(e.to_string()))?;
        let mut raw = trusted_received(&login, &spec.mta, i).into_bytes();
        raw.extend_from_slice(&req.message);
        publications.push(Message {
            sender: login,
            recipient: service.clone(),
            raw,
            pending: Some(req.pending),
        });
        progress();
    }
    let mut retrievals = Vec::with_capacity(spec.retrievals);
    for j in 0..spec.retrievals {
        let asked = if spec.publications == 0 || j % 10 == 9 {
            format!("nobody{j:06}@{}", spec.domain)
        } else {
            account(&spec.domain, j % spec.publications)
        };
        let requester = format!("reader{:04}@example.org", j % 1000);
        let req = client::build_retrieval(&address(&requester)?, &address(&asked)?);
        retrievals.push(Message {
            sender: requester,
            recipient: service.clone(),
            raw: req.message,
            pending: Some(req.pending),
        });
    }
    Ok((publications, retrievals))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_pass_the_key_policy() {
        let addr = address("user000001@example.test").expect("address");
        let armored = make_key(addr.as_str()).expect("key");
        let req = client::build_publication(&addr, &armored).expect("a matching User ID");
        assert!(!req.message.is_empty());
        kst_core::validate::validate(
            &armored,
            &addr,
            &kst_core::validate::KeyPolicy::default(),
            std::time::SystemTime::now(),
        )
        .expect("the key policy accepts it");
    }

    #[test]
    fn load_has_the_asked_shape() {
        let spec = LoadSpec {
            domain: "example.test".into(),
            mta: "localhost".into(),
            publications: 3,
            retrievals: 20,
        };
        let mut made = 0;
        let (p, r) = build(&spec, || made += 1).expect("load");
        assert_eq!((p.len(), r.len(), made), (3, 20, 3));
        assert!(p.iter().all(|m| m.recipient == "keys@example.test"));
        let text = String::from_utf8_lossy(&p[1].raw);
        assert!(text.contains("(Authenticated sender: user000001@example.test)"));
        assert!(text.contains("by localhost (Postfix) with ESMTPSA"));
        assert_eq!(r[9].sender, "reader0009@example.org");
    }
}
