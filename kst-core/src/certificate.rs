//! A stored certificate as the web endpoints serve it: filtered for WKD, armored for VKS and
//! HKP, its fingerprints and key IDs for the store index, and the HKP machine-readable index.
//!
//! The input is what a [`KeyRecord`](crate::KeyRecord) holds: binary packets that
//! [`validate`](crate::validate::validate) already reduced (valid self-signatures only, no
//! third-party certifications). Nothing here verifies signatures again; revoked keys are served
//! as they are, so that clients learn of the revocation.

use std::collections::HashSet;
use std::fmt::Write as _;

use pgp::composed::{Deserializable, SignedPublicKey};
use pgp::packet::{Signature, SignatureType};
use pgp::ser::Serialize;
use pgp::types::{
    EcdhPublicParams, EcdsaPublicParams, EddsaLegacyPublicParams, KeyDetails, PublicParams,
};

use crate::address::{Address, AddressPolicy};
use crate::openpgp::{KeyError, armor_public_key, dearmor_public_key, packet_bodies};

/// The fingerprint and 64-bit key ID of one (sub)key, uppercase hex.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyHandle {
    /// Fingerprint: 40 hex digits (v4) or 64 (v6).
    pub fingerprint: String,
    /// Key ID: 16 hex digits (the low 64 bits of a v4 fingerprint, the high 64 of a v6 one).
    pub key_id: String,
}

/// Every identifier a certificate can be looked up by, for a store index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyHandles {
    /// The primary key.
    pub primary: KeyHandle,
    /// Each subkey, in certificate order.
    pub subkeys: Vec<KeyHandle>,
}

/// One OpenPGP certificate, parsed from stored packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    key: SignedPublicKey,
}

/// The address a User ID holds: inside the last `<...>` when it ends with `>`, else the whole
/// User ID (a bare `alice@example.net`), normalized with `policy`. `None` when it holds none.
pub fn user_id_address(uid: &[u8], policy: &AddressPolicy) -> Option<Address> {
    let text = std::str::from_utf8(uid).ok()?.trim();
    let candidate = if text.ends_with('>') {
        &text[text.rfind('<')?..]
    } else {
        text
    };
    policy.normalize(candidate).ok()
}

/// A stored certificate read by its packet headers alone ([`packet_bodies`]): what serving the
/// stored packets as they are needs to know (its User IDs, whether it has User Attributes),
/// without parsing the key material. Parsing a certificate (an Ed25519 point decompression per
/// key among the rest) was most of the CPU of a web look-up; the stored packets are kst's own,
/// validated when they were published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outline<'a> {
    user_ids: Vec<&'a [u8]>,
    user_attributes: bool,
}

impl<'a> Outline<'a> {
    /// Packet tags a stored public certificate holds: public key (6), signature (2), User ID
    /// (13), public subkey (14), User Attribute (17).
    const TAGS: [u8; 5] = [6, 2, 13, 14, 17];

    /// The outline of `bytes`, or `None` unless the packet headers frame `bytes` exactly as
    /// one public certificate of the packets kst stores: a public key first, no second one, and
    /// nothing but signatures, User IDs, User Attributes and public subkeys after it (never a
    /// secret key). `None` says nothing about whether [`Certificate::from_binary`] would
    /// accept the bytes; the caller then parses them.
    pub fn of(bytes: &'a [u8]) -> Option<Self> {
        let packets = packet_bodies(bytes)?;
        let ((first, _), rest) = packets.split_first()?;
        if *first != 6 || rest.iter().any(|(t, _)| *t == 6 || !Self::TAGS.contains(t)) {
            return None;
        }
        Some(Outline {
            user_ids: rest
                .iter()
                .filter(|(t, _)| *t == 13)
                .map(|(_, body)| *body)
                .collect(),
            user_attributes: rest.iter().any(|(t, _)| *t == 17),
        })
    }

    /// [`Certificate::is_only_address`] of the same packets: at least one User ID, every one of
    /// `address`, and no User Attribute.
    pub fn is_only_address(&self, address: &Address, policy: &AddressPolicy) -> bool {
        !self.user_ids.is_empty()
            && !self.user_attributes
            && self
                .user_ids
                .iter()
                .all(|u| user_id_address(u, policy).as_ref() == Some(address))
    }
}

impl Certificate {
    /// Parses binary packets holding exactly one public certificate.
    pub fn from_binary(bytes: &[u8]) -> Result<Self, KeyError> {
        let mut certs = SignedPublicKey::from_bytes_many(bytes)
            .map_err(|e| KeyError::Malformed(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| KeyError::Malformed(e.to_string()))?;
        if certs.len() != 1 {
            return Err(KeyError::NotOneCertificate(certs.len()));
        }
        Ok(Certificate {
            key: certs.remove(0),
        })
    }

    /// Dearmors (at most `max_bytes` of text) and parses one public certificate.
    pub fn from_armored(armored: &str, max_bytes: usize) -> Result<Self, KeyError> {
        Self::from_binary(&dearmor_public_key(armored, max_bytes)?)
    }

    /// The binary packets (what WKD serves).
    pub fn to_binary(&self) -> Vec<u8> {
        self.key
            .to_bytes()
            .expect("serializing a parsed certificate into memory cannot fail")
    }

    /// The certificate ASCII-armored (what VKS and HKP serve).
    pub fn to_armored(&self) -> String {
        armor_public_key(&self.to_binary())
    }

    /// The primary key's fingerprint, uppercase hex.
    pub fn fingerprint(&self) -> String {
        format!("{:X}", self.key.primary_key.fingerprint())
    }

    /// The primary key's fingerprint and key ID, and those of every subkey.
    pub fn handles(&self) -> KeyHandles {
        KeyHandles {
            primary: handle(&self.key.primary_key),
            subkeys: self
                .key
                .public_subkeys
                .iter()
                .map(|s| handle(&s.key))
                .collect(),
        }
    }

    /// Key IDs of the subkeys that carry a subkey revocation, in certificate order.
    pub fn revoked_subkeys(&self) -> Vec<String> {
        self.key
            .public_subkeys
            .iter()
            .filter(|s| {
                s.signatures
                    .iter()
                    .any(|sig| matches!(sig.typ(), Some(SignatureType::SubkeyRevocation)))
            })
            .map(|s| handle(&s.key).key_id)
            .collect()
    }

    /// The User IDs as text (undecodable ones shown lossily).
    pub fn user_ids(&self) -> Vec<String> {
        self.key
            .details
            .users
            .iter()
            .map(|u| String::from_utf8_lossy(u.id.id()).into_owned())
            .collect()
    }

    /// True when the primary key carries a key revocation.
    pub fn is_revoked(&self) -> bool {
        !self.key.details.revocation_signatures.is_empty()
    }

    /// The certificate with only the User IDs whose address is `address` (with their
    /// self-signatures and revocations), the primary key with its revocations and direct-key
    /// signatures, and every subkey with its bindings. User attributes are dropped. `None` when
    /// no User ID matches: WKD must not serve a key without the address asked for.
    pub fn only_address(&self, address: &Address, policy: &AddressPolicy) -> Option<Self> {
        let mut key = self.key.clone();
        key.details
            .users
            .retain(|u| user_id_address(u.id.id(), policy).as_ref() == Some(address));
        if key.details.users.is_empty() {
            return None;
        }
        key.details.user_attributes.clear();
        Some(Certificate { key })
    }

    /// Whether [`Self::only_address`] would keep all of this certificate: every User ID is of
    /// `address` and it has no User Attribute (then the stored packets can be served as they
    /// are, without filtering and serializing a copy).
    pub fn is_only_address(&self, address: &Address, policy: &AddressPolicy) -> bool {
        let d = &self.key.details;
        !d.users.is_empty()
            && d.user_attributes.is_empty()
            && d.users
                .iter()
                .all(|u| user_id_address(u.id.id(), policy).as_ref() == Some(address))
    }

    /// Adds what `other` has and this one lacks, when both have the same primary key (the same
    /// key published for two addresses): User IDs, subkeys and signatures, without duplicates.
    /// Returns false, changing nothing, for a different primary key.
    pub fn merge(&mut self, other: &Certificate) -> bool {
        if self.key.primary_key != other.key.primary_key {
            return false;
        }
        let d = &mut self.key.details;
        let o = &other.key.details;
        union(&mut d.revocation_signatures, &o.revocation_signatures);
        union(&mut d.direct_signatures, &o.direct_signatures);
        for user in &o.users {
            match d.users.iter_mut().find(|u| u.id == user.id) {
                Some(mine) => union(&mut mine.signatures, &user.signatures),
                None => d.users.push(user.clone()),
            }
        }
        for sub in &other.key.public_subkeys {
            match self
                .key
                .public_subkeys
                .iter_mut()
                .find(|s| s.key == sub.key)
            {
                Some(mine) => union(&mut mine.signatures, &sub.signatures),
                None => self.key.public_subkeys.push(sub.clone()),
            }
        }
        true
    }

    /// The entry of this certificate in an HKP machine-readable index (draft-gallagher-openpgp-hkp,
    /// section 3.3.2): a `pub:` line and one `uid:` line per User ID, each ending in LF.
    ///
    /// `pub:<fingerprint>:<algorithm>:<bits>:<created>:<expires>:<flags>` with flags `r`
    /// (revoked) and `e` (expired at `now`, seconds since the epoch); `uid:<escaped User
    /// ID>:<created>:<expires>:<flags>` with the User ID's newest self-signature time and `r`
    /// when it is revoked.
    pub fn hkp_index_entry(&self, now: u64) -> String {
        let primary = &self.key.primary_key;
        let created = u64::from(primary.created_at().as_secs());
        let expires = self.expiration();
        let mut flags = String::new();
        if self.is_revoked() {
            flags.push('r');
        }
        if expires.is_some_and(|e| e <= now) {
            flags.push('e');
        }
        let mut out = format!(
            "pub:{}:{}:{}:{created}:{}:{flags}\n",
            self.fingerprint(),
            u8::from(primary.algorithm()),
            key_bits(primary.public_params()),
            expires.map(|e| e.to_string()).unwrap_or_default(),
        );
        for user in &self.key.details.users {
            let newest = user
                .signatures
                .iter()
                .filter(|s| is_certification(s))
                .filter_map(|s| s.created().map(|t| u64::from(t.as_secs())))
                .max();
            let revoked_at = user
                .signatures
                .iter()
                .filter(|s| s.typ() == Some(SignatureType::CertRevocation))
                .filter_map(|s| s.created().map(|t| u64::from(t.as_secs())))
                .max();
            // A revocation counts unless a newer certification re-validated the User ID.
            let revoked = revoked_at.is_some_and(|r| newest.is_none_or(|c| r >= c));
            let _ = writeln!(
                out,
                "uid:{}:{}::{}",
                hkp_escape(user.id.id()),
                newest.map(|t| t.to_string()).unwrap_or_default(),
                if revoked { "r" } else { "" }
            );
        }
        out
    }

    /// When the primary key expires (seconds since the epoch): creation plus the key expiration
    /// time of the newest self-signature that sets the key's properties (direct-key or a User
    /// ID certification, the primary User ID's first). `None`: it does not expire.
    pub fn expiration(&self) -> Option<u64> {
        let created = u64::from(self.key.primary_key.created_at().as_secs());
        let direct = newest(self.key.details.direct_signatures.iter());
        let users = &self.key.details.users;
        let primary_uid = users
            .iter()
            .find(|u| u.signatures.iter().any(Signature::is_primary))
            .or_else(|| users.first());
        let uid_sig =
            primary_uid.and_then(|u| newest(u.signatures.iter().filter(|s| is_certification(s))));
        let sig = match (direct, uid_sig) {
            (Some(d), Some(u)) => {
                if d.key_expiration_time().is_some() || u.key_expiration_time().is_none() {
                    Some(d)
                } else {
                    Some(u)
                }
            }
            (d, u) => d.or(u),
        }?;
        let validity = sig.key_expiration_time()?.as_secs();
        (validity > 0).then(|| created + u64::from(validity))
    }
}

/// The HKP machine-readable index of `certs` (exact matches, already found): `info:1:<n>`
/// followed by each certificate's [`Certificate::hkp_index_entry`].
pub fn hkp_index(certs: &[Certificate], now: u64) -> String {
    let mut out = format!("info:1:{}\n", certs.len());
    for c in certs {
        out.push_str(&c.hkp_index_entry(now));
    }
    out
}

fn handle(key: &impl KeyDetails) -> KeyHandle {
    KeyHandle {
        fingerprint: format!("{:X}", key.fingerprint()),
        key_id: hex::encode_upper(key.legacy_key_id()),
    }
}

/// The signature with the latest creation time.
fn newest<'a>(sigs: impl Iterator<Item = &'a Signature>) -> Option<&'a Signature> {
    sigs.filter_map(|s| s.created().map(|t| (t.as_secs(), s)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, s)| s)
}

fn is_certification(s: &Signature) -> bool {
    matches!(
        s.typ(),
        Some(
            SignatureType::CertGeneric
                | SignatureType::CertPersona
                | SignatureType::CertCasual
                | SignatureType::CertPositive
        )
    )
}

/// Appends the items of `from` that `to` does not hold yet.
fn union(to: &mut Vec<Signature>, from: &[Signature]) {
    for s in from {
        if !to.contains(s) {
            to.push(s.clone());
        }
    }
}

/// The key size as GnuPG reports it: the modulus (RSA) or prime (DSA, ElGamal) in bits, the
/// curve's nominal size for elliptic curves; 0 when unknown.
fn key_bits(params: &PublicParams) -> u32 {
    match params {
        PublicParams::RSA(_) | PublicParams::DSA(_) | PublicParams::Elgamal(_) => {
            // The first MPI: a two-byte bit count, then the number.
            match params.to_bytes() {
                Ok(b) if b.len() >= 2 => u32::from(u16::from_be_bytes([b[0], b[1]])),
                _ => 0,
            }
        }
        PublicParams::ECDSA(p) => match p {
            EcdsaPublicParams::Unsupported { curve, .. } => u32::from(curve.nbits()),
            p => u32::from(p.curve().nbits()),
        },
        PublicParams::ECDH(p) => match p {
            EcdhPublicParams::Unsupported { curve, .. } => u32::from(curve.nbits()),
            p => u32::from(p.curve().nbits()),
        },
        PublicParams::EdDSALegacy(p) => match p {
            EddsaLegacyPublicParams::Unsupported { curve, .. } => u32::from(curve.nbits()),
            p => u32::from(p.curve().nbits()),
        },
        PublicParams::Ed25519(_) | PublicParams::X25519(_) => 255,
        PublicParams::Ed448(_) | PublicParams::X448(_) => 448,
        _ => 0,
    }
}

/// %-escapes everything but printable ASCII other than `:` and `%` (HKP index User IDs).
fn hkp_escape(uid: &[u8]) -> String {
    let mut out = String::with_capacity(uid.len());
    for &b in uid {
        if (0x20..0x7f).contains(&b) && b != b':' && b != b'%' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Several certificates merged by primary key (see [`Certificate::merge`]), in first-seen
/// order: what a look-up by fingerprint or key ID serves when one key is published for several
/// addresses.
pub fn merge_all(certs: impl IntoIterator<Item = Certificate>) -> Vec<Certificate> {
    let mut out: Vec<Certificate> = Vec::new();
    let mut seen = HashSet::new();
    for c in certs {
        let fpr = c.fingerprint();
        if seen.insert(fpr.clone()) {
            out.push(c);
        } else if let Some(mine) = out.iter_mut().find(|m| m.fingerprint() == fpr) {
            mine.merge(&c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openpgp::parse_armored;
    use std::process::Command;

    fn testkey(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/testdata/keys/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    fn cert(name: &str) -> Certificate {
        Certificate::from_armored(&testkey(name), 1 << 20).unwrap()
    }

    fn addr(s: &str) -> Address {
        AddressPolicy::default().normalize(s).unwrap()
    }

    /// `gpg --with-colons --import-options show-only --import` of binary packets, in a scratch
    /// home directory.
    fn gpg_colons(packets: &[u8]) -> Vec<Vec<String>> {
        let home = tempdir();
        let file = home.join("key.bin");
        std::fs::write(&file, packets).unwrap();
        let out = Command::new("gpg")
            .arg("--homedir")
            .arg(&home)
            .args(["--batch", "--with-colons", "--fixed-list-mode"])
            .args(["--import-options", "show-only", "--import"])
            .arg(&file)
            .output()
            .expect("gpg is part of the test environment");
        let _ = std::fs::remove_dir_all(&home);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.split(':').map(str::to_string).collect())
            .collect()
    }

    fn tempdir() -> std::path::PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kst-cert-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        dir
    }

    fn records<'a>(colons: &'a [Vec<String>], kind: &str) -> Vec<&'a Vec<String>> {
        colons.iter().filter(|r| r[0] == kind).collect()
    }

    /// Fingerprints of `fpr` records that follow a record of `kind`.
    fn fprs_after(colons: &[Vec<String>], kind: &str) -> Vec<String> {
        colons
            .windows(2)
            .filter(|w| w[0][0] == kind && w[1][0] == "fpr")
            .map(|w| w[1][9].clone())
            .collect()
    }

    #[test]
    fn handles_match_gpg() {
        for name in [
            "subkeys.pub.asc",
            "alice.pub.asc",
            "revoked.pub.asc",
            "sha1.pub.asc",
            "dsa-elg.pub.asc",
        ] {
            let c = cert(name);
            let colons = gpg_colons(&c.to_binary());
            let h = c.handles();
            assert_eq!(
                vec![h.primary.fingerprint.clone()],
                fprs_after(&colons, "pub"),
                "{name}"
            );
            assert_eq!(c.fingerprint(), h.primary.fingerprint);
            assert_eq!(records(&colons, "pub")[0][4], h.primary.key_id, "{name}");
            let subs: Vec<String> = h.subkeys.iter().map(|s| s.fingerprint.clone()).collect();
            assert_eq!(subs, fprs_after(&colons, "sub"), "{name}");
            let sub_ids: Vec<String> = records(&colons, "sub")
                .iter()
                .map(|r| r[4].clone())
                .collect();
            let ids: Vec<String> = h.subkeys.iter().map(|s| s.key_id.clone()).collect();
            assert_eq!(ids, sub_ids, "{name}");
        }
        assert_eq!(cert("subkeys.pub.asc").handles().subkeys.len(), 3);
    }

    #[test]
    fn only_address_keeps_the_matching_user_id_and_everything_else() {
        let full = cert("alice.pub.asc");
        assert_eq!(full.user_ids().len(), 3);
        let wkd = full
            .only_address(&addr("Alice@Example.NET"), &AddressPolicy::default())
            .unwrap();
        let colons = gpg_colons(&wkd.to_binary());
        let uids: Vec<&str> = records(&colons, "uid")
            .iter()
            .map(|r| r[9].as_str())
            .collect();
        assert_eq!(uids, ["alice <alice@example.net>"]);
        // gpg accepts what is left: the User ID is valid (not "?" or "r"), the subkey is kept.
        assert_eq!(records(&colons, "uid")[0][1], "-");
        assert_eq!(
            fprs_after(&colons, "sub"),
            fprs_after(&gpg_colons(&full.to_binary()), "sub")
        );
        assert_eq!(wkd.fingerprint(), full.fingerprint());
        // A User ID without the address does not count, and no match means nothing to serve.
        assert!(
            full.only_address(&addr("bob@example.net"), &AddressPolicy::default())
                .is_none()
        );
        let other = full
            .only_address(&addr("alice@personal.example"), &AddressPolicy::default())
            .unwrap();
        assert_eq!(other.user_ids(), ["Alice Private <alice@personal.example>"]);
    }

    #[test]
    fn a_certificate_of_one_address_needs_no_filtering() {
        let p = AddressPolicy::default();
        let full = cert("alice.pub.asc");
        let alice = addr("alice@example.net");
        assert!(
            !full.is_only_address(&alice, &p),
            "three User IDs, two addresses"
        );
        let wkd = full.only_address(&alice, &p).unwrap();
        assert!(wkd.is_only_address(&alice, &p));
        assert!(!wkd.is_only_address(&addr("bob@example.net"), &p));
        // What WKD serves then (the stored packets) is what filtering would have served.
        let stored = wkd.to_binary();
        let again = Certificate::from_binary(&stored).unwrap();
        assert_eq!(again.only_address(&alice, &p).unwrap().to_binary(), stored);
    }

    #[test]
    fn stored_packets_round_trip() {
        // What validate() stores is what rPGP serializes; parsing and serializing again keeps it.
        let stored = parse_armored(&testkey("subkeys.pub.asc"), 1 << 20)
            .unwrap()
            .packets;
        let c = Certificate::from_binary(&stored).unwrap();
        assert_eq!(c.to_binary(), stored);
        let again = Certificate::from_armored(&c.to_armored(), 1 << 20).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn revoked_keys_are_served_revoked() {
        let c = cert("revoked.pub.asc");
        assert!(c.is_revoked());
        let wkd = c
            .only_address(&addr("alice@example.net"), &AddressPolicy::default())
            .unwrap();
        let colons = gpg_colons(&wkd.to_binary());
        assert_eq!(
            records(&colons, "pub")[0][1],
            "r",
            "gpg sees the revocation"
        );
        assert!(
            wkd.hkp_index_entry(0)
                .starts_with(&format!("pub:{}:", c.fingerprint()))
        );
        let pub_line = wkd.hkp_index_entry(2_000_000_000);
        let fields: Vec<&str> = pub_line.lines().next().unwrap().split(':').collect();
        assert_eq!(fields[6], "r");
    }

    #[test]
    fn hkp_index_matches_gpg_listing() {
        let now = 1_800_000_000;
        for name in [
            "alice.pub.asc",
            "expired.pub.asc",
            "revoked.pub.asc",
            "sha1.pub.asc",
            "dsa-elg.pub.asc",
            "uid-revoked.pub.asc",
        ] {
            let c = cert(name);
            let colons = gpg_colons(&c.to_binary());
            let entry = c.hkp_index_entry(now);
            let lines: Vec<Vec<&str>> = entry.lines().map(|l| l.split(':').collect()).collect();
            let gpub = records(&colons, "pub")[0];
            let p = &lines[0];
            assert_eq!(p[0], "pub");
            assert_eq!(p[1], c.fingerprint(), "{name}");
            assert_eq!(p[2], gpub[3], "{name}: algorithm");
            assert_eq!(p[3], gpub[2], "{name}: bits");
            assert_eq!(p[4], gpub[5], "{name}: created");
            assert_eq!(p[5], gpub[6], "{name}: expires");
            // gpg's validity: r = revoked, e = expired (it judges expiry by its own clock).
            assert_eq!(p[6].contains('r'), gpub[1] == "r", "{name}: revoked");
            if gpub[1] == "e" {
                assert!(p[6].contains('e'), "{name}: expired");
            }
            // Compared as sets: rPGP and gpg may order User IDs differently. gpg's colon listing
            // escapes ':' as \x3a, HKP as %3A; gpg marks every User ID of a revoked key "r",
            // HKP flags only a User ID's own revocation.
            let key_revoked = gpub[1] == "r";
            let mut theirs: Vec<(String, bool)> = records(&colons, "uid")
                .iter()
                .map(|r| (r[9].replace("\\x3a", ":"), !key_revoked && r[1] == "r"))
                .collect();
            let mut mine: Vec<(String, bool)> = lines
                .iter()
                .filter(|l| l[0] == "uid")
                .map(|l| (l[1].replace("%3A", ":"), !key_revoked && l[4] == "r"))
                .collect();
            theirs.sort();
            mine.sort();
            assert_eq!(mine, theirs, "{name}");
        }
        let idx = hkp_index(&[cert("alice.pub.asc"), cert("expired.pub.asc")], now);
        assert!(idx.starts_with("info:1:2\npub:"), "{idx}");
        assert_eq!(idx.lines().filter(|l| l.starts_with("pub:")).count(), 2);
    }

    #[test]
    fn hkp_escaping() {
        assert_eq!(hkp_escape(b"a:b%c"), "a%3Ab%25c");
        assert_eq!(hkp_escape("é\n".as_bytes()), "%C3%A9%0A");
    }

    #[test]
    fn merging_the_same_key_published_for_two_addresses() {
        let full = cert("alice.pub.asc");
        let p = AddressPolicy::default();
        let a = full.only_address(&addr("alice@example.net"), &p).unwrap();
        let b = full
            .only_address(&addr("alice@personal.example"), &p)
            .unwrap();
        let merged = merge_all([a.clone(), b, cert("subkeys.pub.asc"), a.clone()]);
        assert_eq!(merged.len(), 2);
        let mut uids = merged[0].user_ids();
        uids.sort();
        assert_eq!(
            uids,
            [
                "Alice Private <alice@personal.example>",
                "alice <alice@example.net>"
            ]
        );
        let mut other = cert("subkeys.pub.asc");
        assert!(!other.merge(&a), "a different primary key is not merged");
        // Merging a certificate into itself changes nothing.
        let mut same = a.clone();
        assert!(same.merge(&a));
        assert_eq!(same, a);
    }

    #[test]
    fn user_id_addresses() {
        let p = AddressPolicy::default();
        assert_eq!(
            user_id_address(b"Alice <Alice@Example.net>", &p),
            Some(addr("alice@example.net"))
        );
        assert_eq!(
            user_id_address(b"alice@example.net", &p),
            Some(addr("alice@example.net"))
        );
        assert_eq!(user_id_address(b"Alice (no mail)", &p), None);
        assert_eq!(user_id_address(b"\xff<a@b.c>", &p), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(Certificate::from_binary(b"").is_err());
        assert!(Certificate::from_binary(b"\x99\x00\x01\x04garbage").is_err());
        let two = dearmor_public_key(&testkey("two-certs.pub.asc"), 1 << 20).unwrap();
        assert_eq!(
            Certificate::from_binary(&two),
            Err(KeyError::NotOneCertificate(2))
        );
    }

    /// `packets` written again with new-format headers (five-octet lengths when `long` or
    /// needed, else the shortest) or old-format ones (two-octet lengths), each packet's tag
    /// mapped by `tag`.
    fn reframed(packets: &[(u8, &[u8])], old: bool, long: bool, tag: impl Fn(u8) -> u8) -> Vec<u8> {
        let mut out = Vec::new();
        for (t, body) in packets {
            let t = tag(*t);
            if old {
                out.push(0x80 | (t << 2) | 1);
                out.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
            } else if long || body.len() > 8383 {
                out.extend_from_slice(&[0xc0 | t, 255]);
                out.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            } else {
                out.push(0xc0 | t);
                match body.len() {
                    n @ 0..=191 => out.push(n as u8),
                    n => {
                        let n = n - 192;
                        out.extend_from_slice(&[(n >> 8) as u8 + 192, n as u8]);
                    }
                }
            }
            out.extend_from_slice(body);
        }
        out
    }

    #[test]
    fn the_outline_of_stored_packets_agrees_with_the_parsed_certificate() {
        let p = AddressPolicy::default();
        let mut seen = 0;
        for entry in
            std::fs::read_dir(format!("{}/testdata/keys", env!("CARGO_MANIFEST_DIR"))).unwrap()
        {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if !name.ends_with(".pub.asc") {
                continue;
            }
            // What a record holds: the packets as validation re-serialized them.
            let Ok(stored) = parse_armored(&testkey(&name), 1 << 20) else {
                continue;
            };
            let c = Certificate::from_binary(&stored.packets).unwrap();
            let o = Outline::of(&stored.packets).unwrap_or_else(|| panic!("{name}"));
            let ids: Vec<&[u8]> = c.key.details.users.iter().map(|u| u.id.id()).collect();
            assert_eq!(o.user_ids, ids, "{name}");
            assert_eq!(
                o.user_attributes,
                !c.key.details.user_attributes.is_empty(),
                "{name}"
            );
            let mut addresses: Vec<Address> =
                ids.iter().filter_map(|u| user_id_address(u, &p)).collect();
            addresses.push(addr("nobody@example.net"));
            for a in &addresses {
                assert_eq!(
                    o.is_only_address(a, &p),
                    c.is_only_address(a, &p),
                    "{name} {a}"
                );
                // Filtered to one address (what WKD serves), a certificate is all of it.
                if let Some(only) = c.only_address(a, &p) {
                    let bytes = only.to_binary();
                    assert!(
                        Outline::of(&bytes).unwrap().is_only_address(a, &p),
                        "{name} {a}"
                    );
                }
            }
            // The same packets framed otherwise (old format, five-octet lengths).
            let packets = packet_bodies(&stored.packets).unwrap();
            for (old, long) in [(true, false), (false, true), (false, false)] {
                if old && packets.iter().any(|(t, _)| *t > 15) {
                    continue; // the old format has four bits for the tag
                }
                let again = reframed(&packets, old, long, |t| t);
                assert_eq!(
                    Outline::of(&again).as_ref(),
                    Some(&o),
                    "{name} {old} {long}"
                );
            }
            seen += 1;
        }
        assert!(seen >= 20, "only {seen} test keys");
    }

    #[test]
    fn an_outline_is_only_of_one_public_certificate_framed_exactly() {
        let stored = parse_armored(&testkey("alice.pub.asc"), 1 << 20)
            .unwrap()
            .packets;
        let packets = packet_bodies(&stored).unwrap();
        assert!(Outline::of(&stored).is_some());
        assert_eq!(Outline::of(&[]), None, "nothing");
        // Cut inside the last packet, or inside the first header.
        assert_eq!(Outline::of(&stored[..stored.len() - 1]), None);
        assert_eq!(Outline::of(&stored[..1]), None);
        // A byte that is no packet header, before or after.
        assert_eq!(Outline::of(&[&[0x00][..], &stored].concat()), None);
        assert_eq!(Outline::of(&[&stored[..], &[0x00]].concat()), None);
        // Two certificates.
        assert_eq!(Outline::of(&[&stored[..], &stored].concat()), None);
        // Secret key packets (tags 5 and 7 for 6 and 14), and packets kst never stores.
        let secret = reframed(&packets, false, false, |t| match t {
            6 => 5,
            14 => 7,
            t => t,
        });
        assert_eq!(Outline::of(&secret), None);
        for odd in [1u8, 8, 10, 11, 12, 21] {
            let mut with = stored.clone();
            with.extend_from_slice(&[0xc0 | odd, 1, 0]);
            assert_eq!(Outline::of(&with), None, "tag {odd}");
        }
        // Not a public key first.
        assert_eq!(
            Outline::of(&reframed(&packets[1..], false, false, |t| t)),
            None
        );
        // A partial body length (new format) and an indeterminate one (old format).
        assert_eq!(Outline::of(&[0xc6, 0xe1, 0, 0]), None);
        assert_eq!(Outline::of(&[0x9b, 0, 0]), None);
        // A User Attribute: the stored packets are not only the address's.
        let (alice, p) = (addr("alice@example.net"), AddressPolicy::default());
        let mut only = cert("alice.pub.asc")
            .only_address(&alice, &p)
            .unwrap()
            .to_binary();
        assert!(Outline::of(&only).unwrap().is_only_address(&alice, &p));
        only.extend_from_slice(&[0xc0 | 17, 2, 1, 2]);
        assert!(!Outline::of(&only).unwrap().is_only_address(&alice, &p));
    }
}
