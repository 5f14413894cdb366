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
    /// Set: the publication ids of the address' deleted histories (written by the delete
    /// script, never removed): a redelivery after a deletion is refused.
    pub deleted: String,
}

impl AddressKeys {
    pub(crate) fn new(prefix: &str, address: &Address) -> Self {
        let tag = encode(address.as_str());
        AddressKeys {
            cur: format!("{prefix}{{{tag}}}:cur"),
            ver: format!("{prefix}{{{tag}}}:ver"),
            hist: format!("{prefix}{{{tag}}}:hist"),
            pubs: format!("{prefix}{{{tag}}}:pub"),
            deleted: format!("{prefix}{{{tag}}}:deleted"),
        }
    }
}

/// The key of the current record of `address` ([`AddressKeys::cur`]) alone.
pub(crate) fn current_key(prefix: &str, address: &Address) -> String {
    format!("{prefix}{{{}}}:cur", encode(address.as_str()))
}

/// How many sorted sets list the addresses ([`addresses_key`]): spread over the shards of a
/// cluster, few enough that `list` reads them all for one page.
pub(crate) const ADDRESS_BUCKETS: u16 = 16;

/// The sorted set (score 0, ordered by bytes) that lists `address` among the addresses of its
/// bucket: `P` `addrs:` and the bucket in hex. Its own hash slot, not the address'.
pub(crate) fn addresses_key(prefix: &str, address: &Address) -> String {
    let bucket = crate::conn::slot(address.as_str().as_bytes()) % ADDRESS_BUCKETS;
    bucket_key(prefix, bucket)
}

/// The listing set of bucket `bucket`.
pub(crate) fn bucket_key(prefix: &str, bucket: u16) -> String {
    format!("{prefix}addrs:{bucket:x}")
}

/// The single address index of the layout before the look-up index (read by
/// `rebuild_index` only, then deleted).
pub(crate) fn legacy_index_key(prefix: &str) -> String {
    format!("{prefix}index")
}

/// Set of the addresses whose current key has a (sub)key with this fingerprint.
pub(crate) fn fingerprint_key(prefix: &str, fingerprint: &kst_core::Fingerprint) -> String {
    format!("{prefix}fp:{}", fingerprint.as_str())
}

/// Set of the addresses whose current key has a (sub)key with this 64-bit key ID.
pub(crate) fn key_id_key(prefix: &str, key_id: &kst_core::KeyId) -> String {
    format!("{prefix}kid:{}", key_id.as_str())
}

/// Set of the addresses of `domain` whose local part has this WKD hash.
pub(crate) fn wkd_key(prefix: &str, domain: &str, hash: &kst_core::wkd::WkdHash) -> String {
    format!("{prefix}wkd:{}:{}", encode(domain), hash.as_str())
}

/// Every look-up index key (sets of addresses) of a key with `entries`.
pub(crate) fn index_keys(prefix: &str, entries: &kst_core::key_index::IndexEntries) -> Vec<String> {
    let mut keys = Vec::with_capacity(entries.fingerprints.len() * 2 + 1);
    keys.extend(
        entries
            .fingerprints
            .iter()
            .map(|f| fingerprint_key(prefix, f)),
    );
    keys.extend(entries.key_ids.iter().map(|k| key_id_key(prefix, k)));
    keys.push(wkd_key(prefix, &entries.domain, &entries.wkd_hash));
    keys
}

/// String: the tombstone of a primary-key fingerprint (its key revocation signatures, binary),
/// kept across deletions.
pub(crate) fn tombstone_key(prefix: &str, fingerprint: &kst_core::Fingerprint) -> String {
    format!("{}{}", tombstone_prefix(prefix), fingerprint.as_str())
}

/// What every tombstone key starts with: the fingerprint follows.
pub(crate) fn tombstone_prefix(prefix: &str) -> String {
    format!("{prefix}tombstone:")
}

/// `SCAN MATCH` pattern of every current-record key under `prefix` (glob characters of the
/// prefix escaped).
pub(crate) fn current_pattern(prefix: &str) -> String {
    address_key_pattern(prefix, "cur")
}

/// The address of a current-record key (`P{A}:cur`), when it is one.
pub(crate) fn address_of_current(prefix: &str, key: &str) -> Option<Address> {
    address_of_key(prefix, key, "cur")
}

/// `SCAN MATCH` pattern of every set of deleted publication ids (`P{A}:deleted`) under
/// `prefix`.
pub(crate) fn deleted_pattern(prefix: &str) -> String {
    address_key_pattern(prefix, "deleted")
}

/// The address of a set of deleted publication ids (`P{A}:deleted`), when it is one.
pub(crate) fn address_of_deleted(prefix: &str, key: &str) -> Option<Address> {
    address_of_key(prefix, key, "deleted")
}

/// `SCAN MATCH` pattern of the keys `P{A}:<kind>` of every address A (glob characters of the
/// prefix escaped).
fn address_key_pattern(prefix: &str, kind: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + kind.len() + 5);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str("{*}:");
    out.push_str(kind);
    out
}

/// The address A of a key `P{A}:<kind>`, when it is one.
fn address_of_key(prefix: &str, key: &str, kind: &str) -> Option<Address> {
    let tag = key
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix(kind)?
        .strip_suffix("}:")?;
    Address::from_normalized(&decode(tag)?).ok()
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

/// Reverses [`encode`].
fn decode(tag: &str) -> Option<String> {
    let mut out = String::with_capacity(tag.len());
    let mut rest = tag;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let c = match rest.get(i + 1..i + 3)? {
            "7B" => '{',
            "7D" => '}',
            "25" => '%',
            _ => return None,
        };
        out.push(c);
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
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
        for key in [&k.cur, &k.ver, &k.hist, &k.pubs, &k.deleted] {
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
        assert_eq!(
            address_of_current("kst:", &k.cur).unwrap().as_str(),
            "}a{b%c@example.net"
        );
        assert_eq!(address_of_current("kst:", &k.hist), None);
        assert_eq!(current_pattern("a*b:"), "a\\*b:{*}:cur");
        let bucket = addresses_key("p:", &plain);
        assert!(bucket.starts_with("p:addrs:") && bucket.len() <= "p:addrs:f".len());
    }

    #[test]
    fn prefixes_with_braces_are_refused() {
        assert!(check_prefix("kst:").is_ok());
        assert!(check_prefix("").is_ok());
        assert!(matches!(check_prefix("k{s}t:"), Err(Error::Config(_))));
    }
}
