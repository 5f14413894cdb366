//! DKIM signing of replies: [`DkimKeys`] holds each served domain's keys (`[dkim]`), and
//! [`DkimMailer`] signs every reply before handing it to the spool or the SMTP relay, so that
//! what becomes durable is already signed.
//!
//! The signature (relaxed/relaxed) covers From, To, Subject, Date, Message-ID, In-Reply-To,
//! References, Auto-Submitted, the MIME headers, every `KST-*` header of the reply and the
//! whole body. Each of these names is listed once more than it occurs ("oversigned"), so a
//! header added on the way (a second From, an In-Reply-To the reply did not have) breaks the
//! signature instead of slipping in beside it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use base64::Engine;
use kst_core::{Component, Delivery, Error, Mailer, OutgoingMail, Policy, Result};
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

use crate::shared::config::{DkimAlgorithm, DkimConfig, check_key_file_mode};

const COMPONENT: Component = Component::mailer("dkim");

/// Largest key file read (a 4096-bit RSA key in PEM is about 3.3 kB).
const MAX_KEY_FILE_BYTES: u64 = 16 * 1024;
/// Smallest RSA key accepted (RFC 8301 asks for at least 1024 bits; kst wants 2048).
pub const MIN_RSA_BITS: usize = 2048;

/// The header fields every signature covers, in this order, besides the `KST-*` ones.
pub const SIGNED_HEADERS: [&str; 11] = [
    "From",
    "To",
    "Subject",
    "Date",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Auto-Submitted",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];

/// One signing key of a domain, with the public key for its DNS record.
struct Key {
    algorithm: DkimAlgorithm,
    selector: String,
    signer: Mutex<Signer>,
    /// The `p=` value: base64 of the raw Ed25519 key or of the RSA SubjectPublicKeyInfo.
    public: String,
}

enum Signer {
    Ed25519(DkimSigner<Ed25519Key, Done>),
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
}

impl Signer {
    /// Signs `message` covering `headers`; the `DKIM-Signature:` field, CRLF-terminated.
    fn sign(&mut self, headers: &[String], message: &[u8]) -> mail_auth::Result<String> {
        fn go<T: SigningKey>(
            s: &mut DkimSigner<T, Done>,
            headers: &[String],
            message: &[u8],
        ) -> mail_auth::Result<String> {
            s.template.h = headers.to_vec();
            s.sign(message).map(|sig| sig.to_header())
        }
        match self {
            Signer::Ed25519(s) => go(s, headers, message),
            Signer::Rsa(s) => go(s, headers, message),
        }
    }
}

/// Every served domain's DKIM keys, read from the files `[dkim]` names.
pub struct DkimKeys {
    selector: String,
    domains: BTreeMap<String, Vec<Key>>,
}

impl std::fmt::Debug for DkimKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DkimKeys")
            .field("selector", &self.selector)
            .field("domains", &self.domains.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// The DNS TXT record that publishes one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRecord {
    /// The served domain.
    pub domain: String,
    /// Its selector.
    pub selector: String,
    /// The key's kind.
    pub algorithm: DkimAlgorithm,
    /// `v=DKIM1; k=...; p=...`.
    pub value: String,
}

impl DnsRecord {
    /// The owner name, `<selector>._domainkey.<domain>.`.
    pub fn name(&self) -> String {
        format!("{}._domainkey.{}.", self.selector, self.domain)
    }

    /// The record in zone-file form, the value cut into quoted strings of at most 255
    /// characters (RSA keys are longer than one TXT string may be).
    pub fn zone_line(&self) -> String {
        let chunks: Vec<String> = self
            .value
            .as_bytes()
            .chunks(255)
            .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
            .collect();
        format!("{} 3600 IN TXT ( {} )", self.name(), chunks.join(" "))
    }
}

/// The `v=DKIM1` record value of a public key.
pub fn record_value(algorithm: DkimAlgorithm, public: &str) -> String {
    format!("v=DKIM1; k={}; p={public}", algorithm.key_type())
}

impl DkimKeys {
    /// Reads the key files `[dkim]` names for every served domain. Each must exist, be
    /// readable by its owner only, and hold a key of its kind (RSA: at least
    /// [`MIN_RSA_BITS`]). `None` when `[dkim]` names no key (replies are not signed).
    pub fn load(cfg: &DkimConfig, policy: &Policy) -> std::result::Result<Option<Self>, String> {
        if !cfg.enabled() {
            return Ok(None);
        }
        cfg.validate().map_err(|e| e.to_string())?;
        let mut domains: BTreeMap<String, Vec<Key>> = BTreeMap::new();
        for (domain, alg, path) in cfg.key_files(policy) {
            let key = load_key(alg, &path, &domain, &cfg.selector_for(alg))
                .map_err(|m| format!("{} (for {domain}): {m}", alg.config_key()))?;
            domains.entry(domain).or_default().push(key);
        }
        Ok(Some(DkimKeys {
            selector: cfg.selector.clone(),
            domains,
        }))
    }

    /// The selector prefix (`[dkim] selector`; the keys sign as `<it>-ed25519`, `<it>-rsa`).
    pub fn selector(&self) -> &str {
        &self.selector
    }

    /// The DNS records to publish, one per domain and key.
    pub fn records(&self) -> Vec<DnsRecord> {
        self.domains
            .iter()
            .flat_map(|(domain, keys)| {
                keys.iter().map(|k| DnsRecord {
                    domain: domain.clone(),
                    selector: k.selector.clone(),
                    algorithm: k.algorithm,
                    value: record_value(k.algorithm, &k.public),
                })
            })
            .collect()
    }

    /// `message` with a `DKIM-Signature:` field in front per key of `domain` (ed25519-sha256
    /// first, then rsa-sha256). Fails when `domain` has no key or the message has no header.
    pub fn sign(&self, domain: &str, message: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let keys = self
            .domains
            .get(&domain.to_ascii_lowercase())
            .filter(|k| !k.is_empty())
            .ok_or_else(|| format!("no DKIM key for {domain}"))?;
        let headers = signed_headers(message);
        let mut fields = String::new();
        for key in keys {
            let mut signer = key
                .signer
                .lock()
                .map_err(|_| "a DKIM signer was poisoned by an earlier panic".to_string())?;
            let field = signer
                .sign(&headers, message)
                .map_err(|e| format!("cannot sign for {domain}: {e}"))?;
            fields.push_str(&field);
        }
        let mut out = Vec::with_capacity(fields.len() + message.len());
        out.extend_from_slice(fields.as_bytes());
        out.extend_from_slice(message);
        Ok(out)
    }
}

/// The `h=` list for `message`: [`SIGNED_HEADERS`] and its `KST-*` fields, each name once per
/// occurrence plus once more (an absent one once: signed as absent).
pub fn signed_headers(message: &[u8]) -> Vec<String> {
    let present = header_names(message);
    let mut names: Vec<String> = SIGNED_HEADERS.iter().map(|s| s.to_string()).collect();
    for n in &present {
        if n.len() > 4
            && n[..4].eq_ignore_ascii_case("KST-")
            && !names.iter().any(|m| m.eq_ignore_ascii_case(n))
        {
            names.push(n.clone());
        }
    }
    let mut h = Vec::new();
    for n in names {
        let count = present
            .iter()
            .filter(|p| p.eq_ignore_ascii_case(&n))
            .count();
        for _ in 0..=count {
            h.push(n.clone());
        }
    }
    h
}

/// The names of the header fields of `message`, in order.
fn header_names(message: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon]).trim().to_string();
            if !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// The domain of the first `From:` address of `message`, lower case.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_auth::AuthenticatedMessage::parse(message)?;
    let from = parsed.from.first()?;
    let (_, domain) = from.rsplit_once('@')?;
    Some(domain.trim().trim_end_matches('.').to_ascii_lowercase())
}

fn load_key(
    alg: DkimAlgorithm,
    path: &Path,
    domain: &str,
    selector: &str,
) -> std::result::Result<Key, String> {
    check_key_file_mode(path)?;
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    if size > MAX_KEY_FILE_BYTES {
        return Err(format!(
            "{} is {size} bytes; a DKIM key file holds one PEM key (at most {MAX_KEY_FILE_BYTES})",
            path.display()
        ));
    }
    let pem = zeroize::Zeroizing::new(
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?,
    );
    let der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "{} holds no PEM private key ({e}); `kst dkim keygen` writes one",
            path.display()
        )
    })?;
    parse_key(alg, der, domain, selector).map_err(|m| format!("{}: {m}", path.display()))
}

/// Makes the signer of one key from its DER form.
fn parse_key(
    alg: DkimAlgorithm,
    der: PrivateKeyDer<'_>,
    domain: &str,
    selector: &str,
) -> std::result::Result<Key, String> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let headers: Vec<String> = SIGNED_HEADERS.iter().map(|s| s.to_string()).collect();
    match alg {
        DkimAlgorithm::Ed25519 => {
            let PrivateKeyDer::Pkcs8(p8) = &der else {
                return Err("an Ed25519 key must be PKCS#8 (BEGIN PRIVATE KEY)".into());
            };
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der())
                .map_err(|e| format!("not an Ed25519 key: {e}"))?;
            let public = b64(&key.public_key());
            let signer = DkimSigner::from_key(key)
                .domain(domain)
                .selector(selector)
                .headers(headers);
            Ok(Key {
                algorithm: alg,
                selector: selector.to_string(),
                signer: Mutex::new(Signer::Ed25519(signer)),
                public,
            })
        }
        DkimAlgorithm::Rsa => {
            let (bits, spki) = rsa_public(&der)?;
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "the RSA key has {bits} bits; use at least {MIN_RSA_BITS} (kst dkim keygen \
                     --algorithm rsa makes 2048)"
                ));
            }
            let key = RsaKey::<Sha256>::from_key_der(der)
                .map_err(|e| format!("not a usable RSA key: {e}"))?;
            let signer = DkimSigner::from_key(key)
                .domain(domain)
                .selector(selector)
                .headers(headers);
            Ok(Key {
                algorithm: alg,
                selector: selector.to_string(),
                signer: Mutex::new(Signer::Rsa(signer)),
                public: b64(&spki),
            })
        }
    }
}

/// The size in bits and the SubjectPublicKeyInfo DER of an RSA private key.
fn rsa_public(der: &PrivateKeyDer<'_>) -> std::result::Result<(usize, Vec<u8>), String> {
    use rsa::pkcs1::DecodeRsaPrivateKey;
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
    use rsa::traits::PublicKeyParts;
    let key = match der {
        PrivateKeyDer::Pkcs1(k) => rsa::RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
            .map_err(|e| format!("not an RSA key: {e}"))?,
        PrivateKeyDer::Pkcs8(k) => rsa::RsaPrivateKey::from_pkcs8_der(k.secret_pkcs8_der())
            .map_err(|e| format!("not an RSA key: {e}"))?,
        _ => return Err("an RSA key must be PKCS#8 or PKCS#1 PEM".into()),
    };
    let public = key.to_public_key();
    let spki = public
        .to_public_key_der()
        .map_err(|e| format!("cannot encode the public key: {e}"))?;
    Ok((public.size() * 8, spki.as_bytes().to_vec()))
}

/// A new DKIM key of kind `alg`: the private key as PKCS#8 PEM and the `p=` value.
pub fn generate(
    alg: DkimAlgorithm,
) -> std::result::Result<(zeroize::Zeroizing<String>, String), String> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match alg {
        DkimAlgorithm::Ed25519 => {
            let der = zeroize::Zeroizing::new(
                Ed25519Key::generate_pkcs8().map_err(|e| format!("cannot make a key: {e}"))?,
            );
            let key = Ed25519Key::from_pkcs8_der(&der).map_err(|e| e.to_string())?;
            Ok((pem("PRIVATE KEY", &der), b64(&key.public_key())))
        }
        DkimAlgorithm::Rsa => {
            use rsa::pkcs8::EncodePrivateKey;
            let key = rsa::RsaPrivateKey::new(&mut rand08::rngs::OsRng, MIN_RSA_BITS)
                .map_err(|e| format!("cannot make a key: {e}"))?;
            let doc = key
                .to_pkcs8_der()
                .map_err(|e| format!("cannot encode the key: {e}"))?;
            let der = PrivateKeyDer::Pkcs8(doc.as_bytes().to_vec().into());
            let (_, spki) = rsa_public(&der)?;
            Ok((pem("PRIVATE KEY", doc.as_bytes()), b64(&spki)))
        }
    }
}

fn pem(label: &str, der: &[u8]) -> zeroize::Zeroizing<String> {
    let body = zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(der));
    let mut out = zeroize::Zeroizing::new(format!("-----BEGIN {label}-----\n"));
    for chunk in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Signs every reply with its From domain's keys, then hands it to the inner mailer (spool or
/// relay). A reply that cannot be signed is a temporary failure: the request stays with the
/// MTA, and nothing unsigned leaves.
pub struct DkimMailer {
    inner: Arc<dyn Mailer>,
    keys: Arc<DkimKeys>,
}

impl DkimMailer {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Mailer>, keys: Arc<DkimKeys>) -> Self {
        DkimMailer { inner, keys }
    }
}

#[async_trait]
impl Mailer for DkimMailer {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn send(&self, mail: &OutgoingMail) -> Result<Delivery> {
        let domain = from_domain(&mail.message).ok_or_else(|| {
            Error::unavailable(COMPONENT, "the reply has no From address to sign for")
        })?;
        let signed = self
            .keys
            .sign(&domain, &mail.message)
            .map_err(|e| Error::unavailable(COMPONENT, e))?;
        let signed_mail = OutgoingMail {
            message: signed,
            ..mail.clone()
        };
        self.inner.send(&signed_mail).await
    }

    async fn check(&self) -> Result<()> {
        self.inner.check().await
    }

    async fn close(&self) {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_list_oversigns_and_takes_every_kst_field() {
        let msg =
            b"From: a@example.net\r\nTo: b@acme.net\r\nKST-Status: found\r\nkst-protocol: 1\r\n\
                    Received: x\r\n\tfolded\r\nSubject: s\r\n\r\nKST-Body: no\r\n";
        let h = signed_headers(msg);
        assert_eq!(h.iter().filter(|n| *n == "From").count(), 2);
        assert_eq!(h.iter().filter(|n| *n == "In-Reply-To").count(), 1);
        assert_eq!(h.iter().filter(|n| *n == "KST-Status").count(), 2);
        assert_eq!(h.iter().filter(|n| *n == "kst-protocol").count(), 2);
        assert!(!h.iter().any(|n| n == "Received" || n == "KST-Body"));
    }

    #[test]
    fn generated_keys_sign_and_the_records_carry_them() {
        let policy = Policy::new(&["example.net"], &["mx.example.net"]);
        let dir = tempfile::tempdir().unwrap();
        for alg in [DkimAlgorithm::Ed25519, DkimAlgorithm::Rsa] {
            let (pem, _) = generate(alg).unwrap();
            let p = dir
                .path()
                .join(format!("example.net.{}.pem", alg.key_type()));
            crate::operator::dkim::write_private(&p, pem.as_bytes()).unwrap();
        }
        let cfg = DkimConfig {
            selector: "kst".into(),
            ed25519_key: dir.path().join("{domain}.ed25519.pem"),
            rsa_key: dir.path().join("{domain}.rsa.pem"),
        };
        let keys = DkimKeys::load(&cfg, &policy).unwrap().unwrap();
        let records = keys.records();
        assert_eq!(records.len(), 2);
        assert!(records[0].value.starts_with("v=DKIM1; k=ed25519; p="));
        assert!(records[1].value.starts_with("v=DKIM1; k=rsa; p=MIIB"));
        assert!(records[1].zone_line().contains("\" \""), "split in strings");
        let msg = b"From: \"Key Storage Service\" <keys@example.net>\r\nTo: b@acme.net\r\n\
                    Subject: s\r\n\r\nbody\r\n";
        assert_eq!(from_domain(msg).as_deref(), Some("example.net"));
        let signed = String::from_utf8(keys.sign("example.net", msg).unwrap()).unwrap();
        assert_eq!(signed.matches("DKIM-Signature:").count(), 2);
        assert!(signed.contains("a=ed25519-sha256") && signed.contains("a=rsa-sha256"));
        assert!(signed.contains("d=example.net"));
        assert!(signed.contains("s=kst-ed25519") && signed.contains("s=kst-rsa"));
        assert_eq!(records[0].name(), "kst-ed25519._domainkey.example.net.");
        assert!(signed.ends_with("Subject: s\r\n\r\nbody\r\n"));
        assert!(keys.sign("acme.net", msg).is_err());

        // A key file others may read is refused, naming the key.
        use std::os::unix::fs::PermissionsExt;
        let p = dir.path().join("example.net.rsa.pem");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = DkimKeys::load(&cfg, &policy).unwrap_err();
        assert!(e.contains("dkim.rsa_key") && e.contains("chmod 600"), "{e}");
        // A missing file too; and the wrong kind of key.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let swapped = DkimConfig {
            ed25519_key: dir.path().join("{domain}.rsa.pem"),
            rsa_key: PathBuf::new(),
            ..cfg.clone()
        };
        let e = DkimKeys::load(&swapped, &policy).unwrap_err();
        assert!(e.contains("not an Ed25519 key"), "{e}");
        let missing = DkimConfig {
            rsa_key: dir.path().join("{domain}.none.pem"),
            ..cfg
        };
        let e = DkimKeys::load(&missing, &policy).unwrap_err();
        assert!(e.contains("example.net.none.pem"), "{e}");
    }

    use std::path::PathBuf;
}
