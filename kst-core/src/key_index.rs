//! What a store indexes a current key by besides its address: fingerprints, key IDs, WKD hash.
//!
//! Every backend keeps these entries for current keys only, written in the same write as the
//! record, and checks an index hit against the record it names ([`IndexEntries::of`] of that
//! record), so a stale entry is never served.

use crate::certificate::Certificate;
use crate::error::Result;
use crate::fingerprint::{Fingerprint, KeyId};
use crate::store::{KeyRecord, KeyStore};
use crate::wkd::WkdHash;

/// Everything one current key is found by, besides its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntries {
    /// The record's primary fingerprint first, then those the key's packets hold (primary and
    /// every subkey), without repeats.
    pub fingerprints: Vec<Fingerprint>,
    /// The 64-bit key ID of each fingerprint, without repeats.
    pub key_ids: Vec<KeyId>,
    /// The address' domain, as [`Address::domain`](crate::Address::domain) gives it.
    pub domain: String,
    /// WKD hash of the address' local part.
    pub wkd_hash: WkdHash,
}

impl IndexEntries {
    /// The entries of `record`. Key bytes that do not parse as one certificate (which a store
    /// never receives from the service, only from tests) contribute nothing beyond the record's
    /// own fingerprint.
    pub fn of(record: &KeyRecord) -> IndexEntries {
        let mut fingerprints = vec![record.fingerprint.clone()];
        if let Ok(cert) = Certificate::from_binary(&record.key) {
            let handles = cert.handles();
            for handle in std::iter::once(handles.primary).chain(handles.subkeys) {
                if let Ok(f) = Fingerprint::parse(&handle.fingerprint)
                    && !fingerprints.contains(&f)
                {
                    fingerprints.push(f);
                }
            }
        }
        let mut key_ids: Vec<KeyId> = Vec::with_capacity(fingerprints.len());
        for id in fingerprints.iter().map(Fingerprint::key_id) {
            if !key_ids.contains(&id) {
                key_ids.push(id);
            }
        }
        IndexEntries {
            fingerprints,
            key_ids,
            domain: record.address.domain().to_string(),
            wkd_hash: WkdHash::of_address(&record.address),
        }
    }

    /// Whether the key has a (sub)key with this fingerprint.
    pub fn has_fingerprint(&self, fingerprint: &Fingerprint) -> bool {
        self.fingerprints.contains(fingerprint)
    }

    /// Whether the key has a (sub)key with this key ID.
    pub fn has_key_id(&self, key_id: &KeyId) -> bool {
        self.key_ids.contains(key_id)
    }

    /// Whether the address is the one of `domain` whose local part hashes to `hash`.
    pub fn has_wkd_hash(&self, domain: &str, hash: &WkdHash) -> bool {
        self.domain == domain && self.wkd_hash == *hash
    }
}

/// Current keys of `store` whose entries satisfy `hit`, in address order, at most `limit`, by
/// reading every address: O(number of addresses), one walk of the store in its own order
/// ([`KeyStore::list_page`]; each address read once, then the hits sorted). For checks and for
/// a backend whose index is being built, never for serving.
pub async fn scan(
    store: &dyn KeyStore,
    limit: usize,
    hit: impl Fn(&IndexEntries) -> bool + Send + Sync,
) -> Result<Vec<KeyRecord>> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let mut cursor = None;
    loop {
        let crate::store::WalkPage { addresses, next } =
            store.list_page(cursor.as_ref(), 500).await?;
        for a in &addresses {
            if let Some(r) = store.get(a).await?
                && hit(&IndexEntries::of(&r))
            {
                out.push(r);
            }
        }
        match next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    out.truncate(limit);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AddressPolicy;
    use crate::openpgp::dearmor_public_key;
    use crate::store::NewKey;

    fn record(armored: &str, address: &str) -> KeyRecord {
        let key = dearmor_public_key(armored, 1 << 20).unwrap();
        let fingerprint =
            Fingerprint::parse(&Certificate::from_binary(&key).unwrap().fingerprint()).unwrap();
        NewKey {
            address: AddressPolicy::default().normalize(address).unwrap(),
            key,
            fingerprint,
            publication_id: "00".into(),
            published_at: 0,
            revoked: false,
            expected: crate::store::Expected::Any,
        }
        .into_record(1)
    }

    #[test]
    fn a_real_key_is_indexed_by_primary_and_subkeys() {
        let r = record(
            include_str!("../testdata/keys/subkeys.pub.asc"),
            "Alice@Example.NET",
        );
        let e = IndexEntries::of(&r);
        assert_eq!(e.fingerprints.len(), 4, "{e:?}");
        assert_eq!(
            e.fingerprints[0],
            "4C175B0A1074B32B4049FBED98962068A37BEA5F"
        );
        assert_eq!(e.key_ids.len(), 4);
        assert!(e.has_key_id(&KeyId::parse("98962068a37bea5f").unwrap()));
        assert_eq!(e.domain, "example.net");
        // gpg-wks-client --print-wkd-hash alice@example.net
        assert!(e.has_wkd_hash(
            "example.net",
            &WkdHash::parse("kei1q4tipxxu1yj79k9kfukdhfy631xe").unwrap()
        ));
        assert!(!e.has_wkd_hash("example.org", &e.wkd_hash.clone()));
    }

    #[test]
    fn bytes_that_are_no_key_give_the_record_fingerprint_only() {
        let mut r = record(
            include_str!("../testdata/keys/alice.pub.asc"),
            "a@example.net",
        );
        r.key = b"not a key".to_vec();
        let e = IndexEntries::of(&r);
        assert_eq!(e.fingerprints, vec![r.fingerprint.clone()]);
        assert_eq!(e.key_ids, vec![r.fingerprint.key_id()]);
    }
}
