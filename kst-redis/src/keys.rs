//! The key layout: which Redis keys hold what, all keys of one address in one hash slot.

use kst_core::{Address, Error, Result};

/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "kst:";

/// The keys of one address under a prefix. They share the hash tag `{<address>}` (with `{`, `}`
/// and `%` percent-encoded so the tag is always the whole address), so one script may touch
/// them all on a Redis Cluster too.
pub(crate) struct AddressKeys {
    /// String: the current record as JSON.
    pub cur: String,
    /// String: the current version number.
    pub ver: String,
    /// Hash: version → record JSON, every version.
    pub hist: String,
    /// Hash: publication id → version.
    pub pubs: String,
}

impl AddressKeys {
    pub(crate) fn new(prefix: &str, address: &Address) -> Self {
        let tag = encode(address.as_str());
        AddressKeys {
            cur: format!("{prefix}{{{tag}}}:cur"),
            ver: format!("{prefix}{{{tag}}}:ver"),
            hist: format!("{prefix}{{{tag}}}:hist"),
            pubs: format!("{prefix}{{{tag}}}:pub"),
        }
    }
}

/// The sorted set of all addresses that have a key (score 0, ordered by bytes).
pub(crate) fn index_key(prefix: &str) -> String {
    format!("{prefix}index")
}

/// String: the tombstone of a primary-key fingerprint (its key revocation signatures, binary),
/// kept across deletions.
pub(crate) fn tombstone_key(prefix: &str, fingerprint: &kst_core::Fingerprint) -> String {
    format!("{prefix}tombstone:{}", fingerprint.as_str())
}

/// String: the expiry reminder claim `id` of `address` (`KeyStore::claim_reminder`), in the
/// address' hash slot, set with NX and kept across deletions.
pub(crate) fn reminder_key(prefix: &str, address: &Address, id: &str) -> String {
    format!("{prefix}{{{}}}:reminder:{id}", encode(address.as_str()))
}

/// Checks a configured prefix: braces would break the hash tags.
pub(crate) fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.contains(['{', '}']) {
        return Err(Error::Config(format!(
            "{}: the key prefix {prefix:?} must not contain '{{' or '}}'",
            crate::error::COMPONENT
        )));
    }
    Ok(())
}

/// Percent-encodes the characters that would change where a hash tag ends.
fn encode(address: &str) -> String {
    let mut out = String::with_capacity(address.len());
    for c in address.chars() {
        match c {
            '{' => out.push_str("%7B"),
            '}' => out.push_str("%7D"),
            '%' => out.push_str("%25"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::AddressPolicy;

    #[test]
    fn keys_share_one_hash_tag_even_with_braces_in_the_address() {
        let a = AddressPolicy::default()
            .normalize("}a{b%c@example.net")
            .unwrap();
        let k = AddressKeys::new("kst:", &a);
        assert_eq!(k.cur, "kst:{%7Da%7Bb%25c@example.net}:cur");
        for key in [&k.cur, &k.ver, &k.hist, &k.pubs] {
            let open = key.find('{').unwrap();
            let close = open + key[open..].find('}').unwrap();
            assert_eq!(&key[open + 1..close], "%7Da%7Bb%25c@example.net");
        }
        let plain = AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap();
        assert_eq!(
            AddressKeys::new("p:", &plain).hist,
            "p:{alice@example.net}:hist"
        );
        assert_eq!(index_key("p:"), "p:index");
    }

    #[test]
    fn prefixes_with_braces_are_refused() {
        assert!(check_prefix("kst:").is_ok());
        assert!(check_prefix("").is_ok());
        assert!(matches!(check_prefix("k{s}t:"), Err(Error::Config(_))));
    }
}
