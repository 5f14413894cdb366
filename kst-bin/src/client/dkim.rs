//! DKIM verification of KST replies with mail-auth, through the client's own resolver.
//!
//! A signature counts only when it is **aligned**: `d=` is the domain of the `keys@` address the
//! request went to, and `s=` is kst's selector (`kst`, or one beginning with `kst-`; the client
//! configuration's `dkim_selector` names another). A kst-only selector matters: a provider
//! signs its users' outgoing mail with its domain too, so `d=` alone would let any user of that
//! domain sign a forged "reply" that passes. With the selector, only the key kst holds does.
//!
//! The client looks the key up itself (`<s>._domainkey.<d>` TXT) and hands the answer to
//! mail-auth through its TXT cache, so the key verified is the one whose DNSSEC status is
//! reported, and no second query could give a different answer. Signatures that are not
//! aligned are not looked up at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use hickory_resolver::TokioResolver;
use hickory_resolver::proto::rr::{RData, RecordType};
use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::verify::DomainKey;
use mail_auth::{
    AuthenticatedMessage, DkimResult, DnsError, Error, MessageAuthenticator, Parameters,
    ResolverCache, Txt,
};
use serde::Serialize;

/// The selector kst signs with by default; `kst-*` selectors are kst's too (key rotation).
pub const DEFAULT_SELECTOR: &str = "kst";

/// What DKIM says about one reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DkimReport {
    /// `pass` (an aligned signature verified), `fail` (an aligned signature is there but does
    /// not verify: altered, wrong key, DNSSEC-bogus key), `temperror` (its key could not be
    /// looked up now) or `none` (no aligned signature).
    pub result: DkimStatus,
    /// The domain whose signature was wanted (`d=`).
    pub domain: String,
    /// The selector of the aligned signature reported on, if there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Its algorithm (`ed25519-sha256`, `rsa-sha256`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub algorithm: Option<String>,
    /// How the key's TXT record was validated: `secure`, `insecure` (the zone is unsigned),
    /// `unvalidated` (the resolver does not validate DNSSEC) or `bogus`; absent when no key was
    /// looked up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dnssec: Option<KeyDnssec>,
    /// What was found, for people.
    pub detail: String,
}

/// The DKIM verdict on a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DkimStatus {
    /// An aligned signature verified.
    Pass,
    /// An aligned signature did not verify.
    Fail,
    /// The key could not be looked up now.
    TempError,
    /// No aligned signature.
    None,
}

/// The DNSSEC status of the key look-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyDnssec {
    /// Every answer record validated up to the trust anchor.
    Secure,
    /// Proven unsigned (the zone has no DS).
    Insecure,
    /// Not validated: the resolver does not check DNSSEC.
    Unvalidated,
    /// Validation failed: a forged or stripped answer. The key was not used.
    Bogus,
}

impl DkimReport {
    /// True when an aligned signature verified.
    pub fn pass(&self) -> bool {
        self.result == DkimStatus::Pass
    }

    /// What proved a reply whose HMAC verified: "K_auth and DKIM" or "K_auth only".
    pub fn proven_by(&self) -> &'static str {
        if self.pass() {
            "K_auth and DKIM"
        } else {
            "K_auth only"
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let mut s = format!("DKIM {}", self.result_word());
        if let (Some(sel), Some(alg)) = (&self.selector, &self.algorithm) {
            s.push_str(&format!(" (d={}, s={sel}, {alg}", self.domain));
            if let Some(d) = self.dnssec {
                s.push_str(&format!(", key DNSSEC-{}", d.word()));
            }
            s.push(')');
        }
        if !self.pass() && !self.detail.is_empty() {
            s.push_str(&format!(": {}", self.detail));
        }
        s
    }

    /// Under `--require-dnssec`: a pass whose key record was not DNSSEC-secure (a zone without
    /// DNSSEC, e.g. `_domainkey` delegated or CNAMEd to an unsigned zone) becomes a fail. The
    /// option refuses every unsigned answer the client relies on, the DKIM key included.
    pub fn require_secure_key(&mut self) {
        if self.pass() && self.dnssec != Some(KeyDnssec::Secure) {
            let how = self.dnssec.map_or("not validated", KeyDnssec::word);
            self.result = DkimStatus::Fail;
            self.detail = format!(
                "the key record of s={} is DNSSEC-{how}, and --require-dnssec refuses it",
                self.selector.as_deref().unwrap_or("?")
            );
        }
    }

    fn result_word(&self) -> &'static str {
        match self.result {
            DkimStatus::Pass => "pass",
            DkimStatus::Fail => "fail",
            DkimStatus::TempError => "temperror",
            DkimStatus::None => "none",
        }
    }
}

impl KeyDnssec {
    fn word(self) -> &'static str {
        match self {
            KeyDnssec::Secure => "secure",
            KeyDnssec::Insecure => "insecure",
            KeyDnssec::Unvalidated => "unvalidated",
            KeyDnssec::Bogus => "bogus",
        }
    }
}

/// True when `selector` is kst's: `wanted`, or `wanted-` followed by anything.
pub fn selector_is_kst(selector: &str, wanted: &str) -> bool {
    let s = selector.to_ascii_lowercase();
    let w = wanted.to_ascii_lowercase();
    s == w || s.strip_prefix(&w).is_some_and(|rest| rest.starts_with('-'))
}

/// Verifies the DKIM signatures of `raw` (a reply from `keys@<domain>`), looking kst's key up
/// through `resolver`. Never fails: every problem is a report.
pub async fn verify(
    resolver: &TokioResolver,
    raw: &[u8],
    domain: &str,
    selector: &str,
) -> DkimReport {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut report = DkimReport {
        result: DkimStatus::None,
        domain: domain.clone(),
        selector: None,
        algorithm: None,
        dnssec: None,
        detail: String::new(),
    };
    let Some(msg) = AuthenticatedMessage::parse(raw) else {
        report.detail = "the reply cannot be parsed for DKIM".into();
        return report;
    };
    let aligned = |sig: &mail_auth::dkim::Signature| {
        sig.d.trim_end_matches('.').eq_ignore_ascii_case(&domain)
            && selector_is_kst(&sig.s, selector)
    };
    let cache = TxtCache::default();
    let mut proofs: HashMap<String, Option<KeyDnssec>> = HashMap::new();
    let mut others = Vec::new();
    for h in &msg.dkim_headers {
        let sig = &h.header;
        let name = key_name(&sig.s, &sig.d);
        if !aligned(sig) {
            others.push(format!("d={} s={}", sig.d, sig.s));
            // Not kst's: never looked up.
            cache.put(
                &name,
                Txt::Error(Error::Dns(DnsError::Resolver(
                    "not looked up: not kst's selector and domain".into(),
                ))),
            );
            continue;
        }
        if proofs.contains_key(&name) {
            continue;
        }
        let (txt, dnssec) = look_up_key(resolver, &name).await;
        cache.put(&name, txt);
        proofs.insert(name, dnssec);
    }
    if proofs.is_empty() {
        report.detail = if others.is_empty() {
            "the reply carries no DKIM signature".into()
        } else {
            format!(
                "no signature by {domain} with kst's selector ({selector}); found {}",
                others.join(", ")
            )
        };
        return report;
    }
    let outputs = MessageAuthenticator(resolver.clone())
        .verify_dkim(Parameters::new(&msg).with_txt_cache(&cache))
        .await;
    // Every aligned signature judged (mail-auth's verdict, then kst's own rules); the best
    // counts: pass, then fail, then temperror.
    let rank = |r: DkimStatus| match r {
        DkimStatus::Pass => 0,
        DkimStatus::Fail => 1,
        DkimStatus::TempError => 2,
        DkimStatus::None => 3,
    };
    let best = outputs
        .iter()
        .filter_map(|o| {
            let sig = o.signature().filter(|s| aligned(s))?;
            let (status, detail) = judge(sig, o.result(), &cache);
            Some((sig, status, detail))
        })
        .min_by_key(|(_, status, _)| rank(*status));
    let Some((sig, result, detail)) = best else {
        report.detail = "no aligned signature could be checked".into();
        return report;
    };
    let name = key_name(&sig.s, &sig.d);
    report.selector = Some(sig.s.clone());
    report.algorithm = Some(
        match sig.a {
            mail_auth::common::crypto::Algorithm::Ed25519Sha256 => "ed25519-sha256",
            mail_auth::common::crypto::Algorithm::RsaSha256 => "rsa-sha256",
            mail_auth::common::crypto::Algorithm::RsaSha1 => "rsa-sha1",
        }
        .to_string(),
    );
    report.dnssec = proofs.get(&name).copied().flatten();
    report.result = result;
    report.detail = detail;
    if report.dnssec == Some(KeyDnssec::Bogus) {
        report.result = DkimStatus::Fail;
        report.detail =
            format!("the key record {name} failed DNSSEC validation (forged or stripped answer)");
    }
    report
}

/// The header fields every kst signature covers and the client reads (kst signs more).
const MUST_COVER: [&str; 4] = ["From", "In-Reply-To", "KST-Protocol", "KST-Status"];

/// Smallest RSA key whose signature counts: kst makes and loads none smaller.
pub const MIN_RSA_BITS: usize = 2048;

/// mail-auth's verdict on an aligned signature, tightened by what kst's signatures always are:
/// sha256, covering the fields above, and a key of at least [`MIN_RSA_BITS`] when RSA. (A
/// signature with `l=`, over a prefix of the body, never gets here: mail-auth's strict parsing
/// does not take it as a signature.)
fn judge(
    sig: &mail_auth::dkim::Signature,
    result: &DkimResult,
    keys: &TxtCache,
) -> (DkimStatus, String) {
    let verdict = match result {
        DkimResult::Pass => (DkimStatus::Pass, String::new()),
        DkimResult::TempError(e) => (DkimStatus::TempError, e.to_string()),
        DkimResult::Fail(e) | DkimResult::Neutral(e) | DkimResult::PermError(e) => {
            (DkimStatus::Fail, e.to_string())
        }
        DkimResult::None => (DkimStatus::None, String::new()),
    };
    if verdict.0 != DkimStatus::Pass {
        return verdict;
    }
    if sig.a == mail_auth::common::crypto::Algorithm::RsaSha1 {
        return (
            DkimStatus::Fail,
            "rsa-sha1 signatures do not count (RFC 8301); kst signs with sha256".into(),
        );
    }
    if let Some(missing) = MUST_COVER
        .iter()
        .find(|n| !sig.h.iter().any(|h| h.eq_ignore_ascii_case(n)))
    {
        return (
            DkimStatus::Fail,
            format!("the signature does not cover {missing}; kst's always do"),
        );
    }
    let name = key_name(&sig.s, &sig.d);
    if let Some(Txt::DomainKey(key)) = keys.get(name.as_str()) {
        let bits = key.p.public_key_bits();
        if sig.a != mail_auth::common::crypto::Algorithm::Ed25519Sha256 && bits < MIN_RSA_BITS {
            return (
                DkimStatus::Fail,
                format!(
                    "the key at {name} is a {bits}-bit RSA key; a signature counts only with at \
                     least {MIN_RSA_BITS} bits"
                ),
            );
        }
    }
    verdict
}

/// `<selector>._domainkey.<domain>.` in lower case: mail-auth's cache key.
fn key_name(selector: &str, domain: &str) -> String {
    format!("{}._domainkey.{}.", selector, domain.trim_end_matches('.')).to_ascii_lowercase()
}

/// Looks up the key record `name` and says how it validated.
///
/// The DNSSEC hook: the proof comes from hickory's per-record `proof`, which is filled when the
/// client's resolver validates (the DNS-security work turns that on with a trust anchor);
/// otherwise every record is `Indeterminate` and the report says `unvalidated`.
async fn look_up_key(resolver: &TokioResolver, name: &str) -> (Txt, Option<KeyDnssec>) {
    let lookup = match resolver.lookup(name, RecordType::TXT).await {
        Ok(l) => l,
        Err(e) => {
            use hickory_resolver::net::{DnsError as NetDnsError, NetError};
            // hickory turns an answer with a bogus record into this error (docs/TESTDNS.md).
            let bogus = matches!(e, NetError::Dns(NetDnsError::DnssecBogus));
            let err = if e.is_no_records_found() || e.is_nx_domain() {
                Error::Dns(DnsError::Resolver(format!("no key record at {name}")))
            } else {
                Error::Dns(DnsError::Resolver(format!("{name}: {e}")))
            };
            return (Txt::Error(err), bogus.then_some(KeyDnssec::Bogus));
        }
    };
    let mut proof: Option<KeyDnssec> = None;
    let mut key = None;
    let mut parse_error = None;
    for record in lookup.answers() {
        let RData::TXT(txt) = &record.data else {
            continue;
        };
        let p = dnssec_of(record);
        proof = Some(match (proof, p) {
            (None, p) => p,
            (Some(a), b) if a == b => a,
            // Mixed proofs: the weakest counts.
            (Some(KeyDnssec::Bogus), _) | (_, KeyDnssec::Bogus) => KeyDnssec::Bogus,
            (Some(KeyDnssec::Unvalidated), _) | (_, KeyDnssec::Unvalidated) => {
                KeyDnssec::Unvalidated
            }
            _ => KeyDnssec::Insecure,
        });
        if key.is_some() {
            continue;
        }
        let bytes: Vec<u8> = txt
            .txt_data
            .iter()
            .flat_map(|s| s.iter().copied())
            .collect();
        match DomainKey::parse(&bytes) {
            Ok(k) => key = Some(k),
            Err(e) => parse_error = Some(e),
        }
    }
    let txt = match (key, parse_error) {
        (Some(k), _) => Txt::DomainKey(Arc::new(k)),
        (None, Some(e)) => Txt::Error(e),
        (None, None) => Txt::Error(Error::Dns(DnsError::Resolver(format!(
            "no key record at {name}"
        )))),
    };
    (txt, proof)
}

fn dnssec_of(record: &hickory_resolver::proto::rr::Record) -> KeyDnssec {
    use hickory_resolver::proto::dnssec::Proof;
    match record.proof {
        Proof::Secure => KeyDnssec::Secure,
        Proof::Insecure => KeyDnssec::Insecure,
        Proof::Bogus => KeyDnssec::Bogus,
        Proof::Indeterminate => KeyDnssec::Unvalidated,
    }
}

/// mail-auth's TXT cache, filled by the client's own look-ups.
#[derive(Default)]
struct TxtCache(Mutex<HashMap<Box<str>, Txt>>);

impl TxtCache {
    fn put(&self, name: &str, txt: Txt) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(name.into(), txt);
        }
    }
}

impl ResolverCache<Box<str>, Txt> for TxtCache {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.get(name).cloned()
    }

    fn remove<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.0.lock().ok()?.remove(name)
    }

    fn insert(&self, key: Box<str>, value: Txt, _valid_until: std::time::Instant) {
        if let Ok(mut m) = self.0.lock() {
            m.insert(key, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kst_selectors_are_aligned() {
        assert!(selector_is_kst("kst", "kst"));
        assert!(selector_is_kst("KST-2027", "kst"));
        assert!(!selector_is_kst("kst2027", "kst"));
        assert!(!selector_is_kst("default", "kst"));
        assert!(!selector_is_kst("mail", "kst"));
        assert!(selector_is_kst("replies", "replies"));
    }

    #[test]
    fn the_report_says_what_proved_the_reply() {
        let mut r = DkimReport {
            result: DkimStatus::Pass,
            domain: "example.net".into(),
            selector: Some("kst".into()),
            algorithm: Some("ed25519-sha256".into()),
            dnssec: Some(KeyDnssec::Secure),
            detail: String::new(),
        };
        assert_eq!(r.proven_by(), "K_auth and DKIM");
        assert_eq!(
            r.describe(),
            "DKIM pass (d=example.net, s=kst, ed25519-sha256, key DNSSEC-secure)"
        );
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["result"], "pass");
        assert_eq!(v["dnssec"], "secure");
        r.result = DkimStatus::None;
        assert_eq!(r.proven_by(), "K_auth only");
    }

    #[test]
    fn require_dnssec_refuses_a_key_that_was_not_secure() {
        let mut r = DkimReport {
            result: DkimStatus::Pass,
            domain: "example.net".into(),
            selector: Some("kst-rsa".into()),
            algorithm: Some("rsa-sha256".into()),
            dnssec: Some(KeyDnssec::Secure),
            detail: String::new(),
        };
        r.require_secure_key();
        assert!(r.pass(), "{r:?}");
        r.dnssec = Some(KeyDnssec::Insecure);
        r.require_secure_key();
        assert_eq!(r.result, DkimStatus::Fail);
        assert_eq!(r.proven_by(), "K_auth only");
        assert!(
            r.describe()
                .contains("DNSSEC-insecure, and --require-dnssec"),
            "{}",
            r.describe()
        );
    }
}
