//! The operator's decisions that the protocol logic follows: served domains, trusted MTAs,
//! where the authenticated identity comes from, address folding, size limits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::address::{Address, AddressError, AddressPolicy};
use crate::ratelimit::{RateLimits, RecipientFolding};

/// Where kst learns who authenticated a publication.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthSource {
    /// The topmost `Received:` header, written by one of [`Policy::trusted_mta_hosts`] with an
    /// RFC 3848 authenticated protocol (ESMTPA, ESMTPSA, ...) and `(Authenticated sender: X)`.
    #[default]
    Received,
    /// Only the SASL login that Postfix passes in the pipe command line
    /// (`--sasl-username ${sasl_username}`). Headers are never consulted.
    SaslArgv,
}

/// Everything the protocol logic needs to decide about a message.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Domains whose `keys@` kst serves and whose addresses it stores keys for (A-labels).
    pub domains: Vec<String>,
    /// Host names (the `by` part of a `Received:` header) of the provider's own MTAs.
    pub trusted_mta_hosts: Vec<String>,
    /// Where the authenticated identity comes from.
    pub auth_source: AuthSource,
    /// SASL logins that are not addresses, mapped to the address they own.
    pub login_map: BTreeMap<String, Address>,
    /// How addresses are folded.
    pub address_policy: AddressPolicy,
    /// Largest message kst reads (bytes); larger mail is refused permanently (not for kst).
    pub max_message_bytes: usize,
    /// Largest armored key block accepted (bytes).
    pub max_key_bytes: usize,
    /// Largest certificate published, in bytes of binary packets after the reduction to the
    /// newest self-signatures (see [`KeyPolicy::max_published_bytes`](crate::validate::KeyPolicy::max_published_bytes)).
    pub max_published_key_bytes: usize,
    /// The local part that receives requests: `keys`.
    pub service_local_part: String,
    /// Request rates per authenticated account, reply recipient, (reply recipient, queried
    /// address) and source.
    pub rate_limits: RateLimits,
    /// Which variants of another provider's address count as one reply recipient.
    pub recipient_folding: RecipientFolding,
    /// Answer a retrieval only when the provider's topmost `Authentication-Results:` header
    /// (with [`Policy::authserv_id`]) shows SPF, DKIM or DMARC pass for the sender's domain.
    pub require_authentication_results: bool,
    /// The provider's authserv-id (RFC 8601), e.g. its MX host name.
    pub authserv_id: String,
    /// Most header fields the top-level message may have.
    pub max_headers: usize,
    /// Most MIME parts (multipart containers included) a message may have.
    pub max_mime_parts: usize,
    /// Deepest multipart nesting a message may have (a single-part message has depth 1).
    pub max_mime_depth: usize,
}

impl Policy {
    /// Default size cap for a whole message: 2 MiB.
    pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
    /// Default size cap for an armored key block: 1 MiB (as Hagrid).
    pub const DEFAULT_MAX_KEY_BYTES: usize = 1024 * 1024;
    /// Default cap on top-level header fields: 500 (long relay chains with ARC and DKIM stay
    /// well below 100).
    pub const DEFAULT_MAX_HEADERS: usize = 500;
    /// Default cap on MIME parts: 64 (a request needs 1 to 3).
    pub const DEFAULT_MAX_MIME_PARTS: usize = 64;
    /// Default cap on multipart nesting: 8.
    pub const DEFAULT_MAX_MIME_DEPTH: usize = 8;

    /// A policy serving `domains`, trusting `trusted_mta_hosts`, with every other setting at its
    /// default. Domains and hosts are normalized (lowercase, A-label).
    pub fn new(domains: &[&str], trusted_mta_hosts: &[&str]) -> Self {
        let ap = AddressPolicy::default();
        Policy {
            domains: domains
                .iter()
                .map(|d| ap.normalize_domain(d).unwrap_or_else(|_| d.to_lowercase()))
                .collect(),
            trusted_mta_hosts: trusted_mta_hosts.iter().map(|h| h.to_lowercase()).collect(),
            auth_source: AuthSource::default(),
            login_map: BTreeMap::new(),
            address_policy: ap,
            max_message_bytes: Self::DEFAULT_MAX_MESSAGE_BYTES,
            max_key_bytes: Self::DEFAULT_MAX_KEY_BYTES,
            max_published_key_bytes: crate::validate::DEFAULT_MAX_PUBLISHED_BYTES,
            service_local_part: "keys".into(),
            rate_limits: RateLimits::default(),
            recipient_folding: RecipientFolding::default(),
            require_authentication_results: false,
            authserv_id: String::new(),
            max_headers: Self::DEFAULT_MAX_HEADERS,
            max_mime_parts: Self::DEFAULT_MAX_MIME_PARTS,
            max_mime_depth: Self::DEFAULT_MAX_MIME_DEPTH,
        }
    }

    /// True when kst serves `domain` (an A-label, lowercase).
    pub fn serves_domain(&self, domain: &str) -> bool {
        self.domains.iter().any(|d| d == domain)
    }

    /// An address as kst compares it: the account form ([`AddressPolicy::normalize`]: case,
    /// subaddress and Unicode rules) when its domain is served, as written otherwise
    /// ([`AddressPolicy::as_received`]): other providers' local parts are theirs to interpret,
    /// so `john-smith@partner.example` never becomes `john@partner.example`.
    pub fn normalize_address(&self, input: &str) -> Result<Address, AddressError> {
        let received = self.address_policy.as_received(input)?;
        if self.serves_domain(received.domain()) {
            self.address_policy.normalize(input)
        } else {
            Ok(received)
        }
    }

    /// The service address `keys@domain` for a served domain.
    pub fn service_address(&self, domain: &str) -> Option<Address> {
        if !self.serves_domain(domain) {
            return None;
        }
        Address::from_normalized(&format!("{}@{domain}", self.service_local_part)).ok()
    }
}
