//! Authenticating the hop to a foreign MX (`retrieve --direct`): DANE (RFC 7672), MTA-STS
//! (RFC 8461, see [`super::mta_sts`]) or, when the domain demands neither, opportunistic TLS
//! that is reported as "encrypted, not authenticated".
//!
//! The check runs inside the TLS handshake (a rustls certificate verifier), so a server that
//! fails it never sees `MAIL FROM`, let alone the request with K_auth.
//!
//! DANE rules (RFC 7672): TLSA records of `_25._tcp.<mx host>` count only when both the MX
//! RRset and the TLSA RRset are DNSSEC-secure. Usable are DANE-TA(2) and DANE-EE(3) with
//! selector Cert(0) or SPKI(1) and matching Full(0), SHA2-256(1) or SHA2-512(2); PKIX-TA(0)
//! and PKIX-EE(1) are unusable for SMTP. With usable records TLS is mandatory and one record
//! must match: DANE-EE matches the server's own certificate (name and dates are not checked,
//! §3.1.1); DANE-TA a certificate of the chain the server sent, which then must be a valid
//! issuer of the server's certificate for the MX name (§3.1.2). When every record is unusable
//! TLS is still mandatory, but not authenticated ([`HopAuth::EncryptOnly`]).

use std::fmt;
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::rr::rdata::TLSA;
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sha2::{Digest, Sha256, Sha512};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::client::WebPkiServerVerifier;
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::crypto::{
    CryptoProvider, verify_tls12_signature, verify_tls13_signature,
};
use tokio_rustls::rustls::{
    self, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// How the hop to one MX host must be authenticated.
#[derive(Debug, Clone)]
pub enum HopAuth {
    /// DANE: these usable TLSA records (MX and TLSA both DNSSEC-secure); one must match.
    Dane(Vec<TLSA>),
    /// MTA-STS `mode: enforce` matched this MX: a PKIX-valid certificate for the MX name.
    MtaSts {
        /// The policy's id (for the report).
        id: String,
    },
    /// A secure TLSA RRset whose records are all unusable (PKIX-TA/PKIX-EE, unknown selector
    /// or matching type): TLS is mandatory but not authenticated (RFC 7672 §2.2, Postfix's
    /// `encrypt` level). Checked like [`HopAuth::Opportunistic`], but never in cleartext.
    EncryptOnly,
    /// Neither: TLS without authentication (the certificate is still checked against PKIX,
    /// for the report, but a failure does not stop the hop).
    Opportunistic,
}

impl HopAuth {
    /// True when the domain demands authenticated TLS on this hop (no plaintext fallback).
    pub fn demands_tls(&self) -> bool {
        !matches!(self, HopAuth::Opportunistic)
    }
}

/// The usable TLSA records of `records` (DANE-TA and DANE-EE with known selector and
/// matching type).
pub fn usable(records: &[TLSA]) -> Vec<TLSA> {
    records
        .iter()
        .filter(|t| {
            matches!(t.cert_usage, CertUsage::DaneTa | CertUsage::DaneEe)
                && matches!(t.selector, Selector::Full | Selector::Spki)
                && matches!(
                    t.matching,
                    Matching::Raw | Matching::Sha256 | Matching::Sha512
                )
        })
        .cloned()
        .collect()
}

/// What the handshake established about the hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HopResult {
    /// A DANE-EE record matched the server's certificate.
    DaneEe,
    /// A DANE-TA record matched an issuer of the server's certificate.
    DaneTa,
    /// MTA-STS enforce: the certificate is PKIX-valid for the MX name.
    MtaSts,
    /// Encrypted; `pkix` says whether the certificate happened to be PKIX-valid for the name
    /// (which proves nothing about the MX being the domain's, since the MX name itself came
    /// from DNS without a policy).
    Unauthenticated {
        /// The certificate validated against the trusted roots for the MX name.
        pkix: bool,
    },
}

impl HopResult {
    /// The token used in `--json` (`dane-ee`, `dane-ta`, `mta-sts`, `unauthenticated`).
    pub fn as_str(&self) -> &'static str {
        match self {
            HopResult::DaneEe => "dane-ee",
            HopResult::DaneTa => "dane-ta",
            HopResult::MtaSts => "mta-sts",
            HopResult::Unauthenticated { .. } => "unauthenticated",
        }
    }
}

impl fmt::Display for HopResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HopResult::DaneEe => f.write_str("TLS, authenticated by DANE (DANE-EE)"),
            HopResult::DaneTa => f.write_str("TLS, authenticated by DANE (DANE-TA)"),
            HopResult::MtaSts => f.write_str("TLS, authenticated by MTA-STS (PKIX, enforce)"),
            HopResult::Unauthenticated { pkix } => write!(
                f,
                "encrypted but not authenticated (no usable DANE record, no MTA-STS policy in enforce mode{})",
                if *pkix {
                    "; the certificate is PKIX-valid for the MX name"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Where a hop's certificate verifier leaves its result.
pub type HopSlot = Arc<Mutex<Option<HopResult>>>;

/// A rustls connector for one hop, and where its verifier leaves the result.
pub struct HopConnector {
    /// The connector to run the handshake with.
    pub connector: TlsConnector,
    /// Set by a successful certificate check.
    pub result: HopSlot,
}

/// Builds the connector that enforces `auth`; `roots` are the PKIX roots (web roots plus
/// `--ca-file`) for MTA-STS and the report.
pub fn connector(auth: &HopAuth, roots: Arc<RootCertStore>) -> Result<HopConnector, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let pkix = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| format!("TLS set-up: {e}"))?;
    let result = Arc::new(Mutex::new(None));
    let verifier = HopVerifier {
        auth: auth.clone(),
        pkix,
        provider: provider.clone(),
        result: result.clone(),
    };
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok(HopConnector {
        connector: TlsConnector::from(Arc::new(config)),
        result,
    })
}

#[derive(Debug)]
struct HopVerifier {
    auth: HopAuth,
    pkix: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    result: Arc<Mutex<Option<HopResult>>>,
}

impl HopVerifier {
    fn set(&self, r: HopResult) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }
}

/// The bytes a TLSA record's selector picks from a certificate.
fn selected(cert: &CertificateDer<'_>, selector: Selector) -> Option<Vec<u8>> {
    match selector {
        Selector::Full => Some(cert.as_ref().to_vec()),
        Selector::Spki => {
            let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
            Some(parsed.subject_public_key_info().as_ref().to_vec())
        }
        _ => None,
    }
}

/// True when `record` matches `cert` (selector, then matching type).
pub fn matches(record: &TLSA, cert: &CertificateDer<'_>) -> bool {
    let Some(data) = selected(cert, record.selector) else {
        return false;
    };
    let digest = match record.matching {
        Matching::Raw => data,
        Matching::Sha256 => Sha256::digest(&data).to_vec(),
        Matching::Sha512 => Sha512::digest(&data).to_vec(),
        _ => return false,
    };
    digest == record.cert_data
}

fn dane_failure(msg: String) -> rustls::Error {
    rustls::Error::General(msg)
}

impl ServerCertVerifier for HopVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.auth {
            HopAuth::Dane(records) => {
                for r in records.iter().filter(|r| r.cert_usage == CertUsage::DaneEe) {
                    if matches(r, end_entity) {
                        self.set(HopResult::DaneEe);
                        return Ok(ServerCertVerified::assertion());
                    }
                }
                for r in records.iter().filter(|r| r.cert_usage == CertUsage::DaneTa) {
                    for ta in intermediates.iter().chain(std::iter::once(end_entity)) {
                        if !matches(r, ta) {
                            continue;
                        }
                        let mut roots = RootCertStore::empty();
                        if roots.add(ta.clone().into_owned()).is_err() {
                            continue;
                        }
                        let chain = WebPkiServerVerifier::builder_with_provider(
                            Arc::new(roots),
                            self.provider.clone(),
                        )
                        .build()
                        .map_err(|e| dane_failure(format!("DANE-TA set-up: {e}")))?;
                        if chain
                            .verify_server_cert(
                                end_entity,
                                intermediates,
                                server_name,
                                ocsp_response,
                                now,
                            )
                            .is_ok()
                        {
                            self.set(HopResult::DaneTa);
                            return Ok(ServerCertVerified::assertion());
                        }
                    }
                }
                Err(dane_failure(format!(
                    "DANE: no TLSA record of {} matches the certificate the server sent (possible attack; nothing was sent)",
                    server_name.to_str()
                )))
            }
            HopAuth::MtaSts { id } => self
                .pkix
                .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                .inspect(|_| self.set(HopResult::MtaSts))
                .map_err(|e| {
                    dane_failure(format!(
                        "MTA-STS (policy {id}, mode enforce): the certificate of {} is not valid: {e} (possible attack; nothing was sent)",
                        server_name.to_str()
                    ))
                }),
            HopAuth::EncryptOnly | HopAuth::Opportunistic => {
                let pkix = self
                    .pkix
                    .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
                    .is_ok();
                self.set(HopResult::Unauthenticated { pkix });
                Ok(ServerCertVerified::assertion())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlsa(usage: u8, selector: u8, matching: u8, data: Vec<u8>) -> TLSA {
        TLSA::new(usage.into(), selector.into(), matching.into(), data)
    }

    #[test]
    fn only_dane_ta_and_dane_ee_with_known_parameters_are_usable() {
        let records = vec![
            tlsa(0, 0, 1, vec![1; 32]),
            tlsa(1, 1, 1, vec![1; 32]),
            tlsa(2, 0, 1, vec![1; 32]),
            tlsa(3, 1, 1, vec![1; 32]),
            tlsa(3, 7, 1, vec![1; 32]),
            tlsa(3, 1, 9, vec![1; 32]),
        ];
        let u = usable(&records);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].cert_usage, CertUsage::DaneTa);
        assert_eq!(u[1].cert_usage, CertUsage::DaneEe);
    }

    #[test]
    fn a_full_certificate_record_matches_its_certificate_only() {
        let cert = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x01]);
        let other = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x02]);
        let raw = tlsa(3, 0, 0, cert.as_ref().to_vec());
        let hashed = tlsa(3, 0, 1, Sha256::digest(cert.as_ref()).to_vec());
        let hashed512 = tlsa(3, 0, 2, Sha512::digest(cert.as_ref()).to_vec());
        for r in [&raw, &hashed, &hashed512] {
            assert!(matches(r, &cert));
            assert!(!matches(r, &other));
        }
        // SPKI of something that is not a certificate: no match rather than a panic.
        assert!(!matches(&tlsa(3, 1, 1, vec![0; 32]), &cert));
    }
}
