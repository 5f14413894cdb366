//! Tests of the key policy: real keys made by gpg (testdata/keys), altered packet by packet.

use std::io::{BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgp::armor::Dearmor;
use pgp::composed::{Deserializable, SignedSecretKey};
use pgp::crypto::hash::HashAlgorithm;
use pgp::packet::{
    Packet, PacketParser, PacketTrait, SignatureConfig, SignatureType, Subpacket, SubpacketData,
    UserId,
};
use pgp::ser::Serialize;
use pgp::types::{KeyDetails, PacketHeaderVersion, Password, Tag, Timestamp};
use proptest::prelude::*;

use super::rejection::format_utc_minutes;
use super::user_id::uid_address;
use super::*;
use crate::address::{Address, AddressPolicy};
use crate::openpgp::{armor_public_key, dearmor_public_key, parse_armored};
use crate::protocol::Reason;

const ALICE: &str = include_str!("../../testdata/keys/alice.pub.asc");
const ALICE_SECRET: &str = include_str!("../../testdata/keys/alice.sec.asc");
const CERTIFIED: &str = include_str!("../../testdata/keys/alice-certified.pub.asc");
const FLOODED: &str = include_str!("../../testdata/keys/alice-flooded.pub.asc");
const REVOKED: &str = include_str!("../../testdata/keys/revoked.pub.asc");
const EXPIRED: &str = include_str!("../../testdata/keys/expired.pub.asc");
const RSA1024: &str = include_str!("../../testdata/keys/rsa1024.pub.asc");
const DSA_ELG: &str = include_str!("../../testdata/keys/dsa-elg.pub.asc");
const SHA1: &str = include_str!("../../testdata/keys/sha1.pub.asc");
const SHA1_RESIGNED: &str = include_str!("../../testdata/keys/sha1-resigned.pub.asc");
const SUBKEYS: &str = include_str!("../../testdata/keys/subkeys.pub.asc");
const FOREIGN: &str = include_str!("../../testdata/keys/foreign.pub.asc");
const TWO_CERTS: &str = include_str!("../../testdata/keys/two-certs.pub.asc");
const UID_REVOKED: &str = include_str!("../../testdata/keys/uid-revoked.pub.asc");
const UID2REV_SECOND: &str = include_str!("../../testdata/keys/uid2rev-second.pub.asc");
const AMPLIFIED: &str = include_str!("../../testdata/keys/amplified.pub.asc");
const AMPLIFIED_TOO_LARGE: &str = include_str!("../../testdata/keys/amplified-too-large.pub.asc");

/// Fingerprint of the committed alice.pub.asc, as `gpg --show-keys` prints it (running
/// make-fixtures.sh again makes new keys: update this then).
const ALICE_FPR: &str = "637895003B05333E2D3782F2EE62CCF91EB2D657";

/// 2026-06-01T00:00:00Z: after every fixture was made, before nothing in them expires
/// except expired.pub.asc and the first subkey of subkeys.pub.asc (both 2020-01-02).
fn now() -> SystemTime {
    at(1_780_272_000)
}

fn at(secs: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn addr(s: &str) -> Address {
    AddressPolicy::default().normalize(s).unwrap()
}

fn alice() -> Address {
    addr("alice@example.net")
}

fn check(armored: &str) -> Result<ValidKey, KeyRejection> {
    validate(armored, &alice(), &KeyPolicy::default(), now())
}

fn ok(armored: &str) -> ValidKey {
    check(armored).unwrap_or_else(|e| panic!("refused: {e}"))
}

fn binary(armored: &str) -> Vec<u8> {
    dearmor_public_key(armored, 1 << 20).unwrap()
}

fn packets(bytes: &[u8]) -> Vec<Packet> {
    PacketParser::new(bytes).map(|p| p.unwrap()).collect()
}

fn serialize(packets: &[Packet]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in packets {
        p.to_writer(&mut out).unwrap();
    }
    out
}

fn tags(bytes: &[u8]) -> Vec<Tag> {
    packets(bytes).iter().map(|p| p.tag()).collect()
}

fn sig_types(bytes: &[u8]) -> Vec<SignatureType> {
    packets(bytes)
        .iter()
        .filter_map(|p| match p {
            Packet::Signature(s) => s.typ(),
            _ => None,
        })
        .collect()
}

/// Creation times of the signatures of type `typ`, in order.
fn signature_times(bytes: &[u8], typ: SignatureType) -> Vec<u32> {
    packets(bytes)
        .iter()
        .filter_map(|p| match p {
            Packet::Signature(s) if s.typ() == Some(typ) => s.created().map(|t| t.as_secs()),
            _ => None,
        })
        .collect()
}

fn user_ids(bytes: &[u8]) -> Vec<String> {
    packets(bytes)
        .iter()
        .filter_map(|p| match p {
            Packet::UserId(u) => Some(String::from_utf8_lossy(u.id()).into_owned()),
            _ => None,
        })
        .collect()
}

fn secret_alice() -> SignedSecretKey {
    SignedSecretKey::from_string(ALICE_SECRET).unwrap().0
}

/// A v4 signature config by alice's primary key, created at `created`, SHA-256.
fn alice_config(typ: SignatureType, created: u32, hash: HashAlgorithm) -> SignatureConfig {
    let sec = secret_alice();
    let mut cfg = SignatureConfig::v4(typ, sec.primary_key.algorithm(), hash);
    cfg.hashed_subpackets = vec![
        Subpacket::regular(SubpacketData::SignatureCreationTime(Timestamp::from_secs(
            created,
        )))
        .unwrap(),
        Subpacket::regular(SubpacketData::IssuerFingerprint(
            sec.primary_key.fingerprint(),
        ))
        .unwrap(),
    ];
    cfg
}

/// A positive certification of `alice <alice@example.net>` by alice's key, made at `created`.
fn alice_certification(created: u32) -> pgp::packet::Signature {
    let sec = secret_alice();
    let uid = UserId::from_str(PacketHeaderVersion::Old, "alice <alice@example.net>").unwrap();
    alice_config(SignatureType::CertPositive, created, HashAlgorithm::Sha256)
        .sign_certification(
            &sec.primary_key,
            &sec.primary_key.public_key(),
            &Password::empty(),
            Tag::UserId,
            &uid,
        )
        .unwrap()
}

fn has(v: &ValidKey, needle: &str) -> bool {
    v.stripped.iter().any(|s| s.contains(needle))
}

// ---- the good key --------------------------------------------------------------------

#[test]
fn good_key_keeps_primary_matching_uid_and_subkey() {
    let v = ok(ALICE);
    assert_eq!(v.fingerprint, ALICE_FPR);
    assert_eq!(v.user_id, "alice <alice@example.net>");
    assert!(!v.revoked);
    assert_eq!(v.expires_at, None);
    assert_eq!(
        tags(&v.packets),
        [
            Tag::PublicKey,
            Tag::UserId,
            Tag::Signature,
            Tag::PublicSubkey,
            Tag::Signature
        ]
    );
    assert_eq!(
        sig_types(&v.packets),
        [SignatureType::CertPositive, SignatureType::SubkeyBinding]
    );
    assert_eq!(
        v.stripped,
        ["2 other User IDs", "1 user attribute (photo ID)"],
        "{:?}",
        v.stripped
    );
}

#[test]
fn good_key_with_the_real_clock() {
    let v = validate(ALICE, &alice(), &KeyPolicy::default(), SystemTime::now()).unwrap();
    assert_eq!(v.fingerprint, ALICE_FPR);
}

#[test]
fn fingerprint_is_unchanged_by_stripping() {
    let v = ok(ALICE);
    let original = parse_armored(ALICE, 1 << 20).unwrap();
    assert_eq!(original.fingerprint, ALICE_FPR);
    let stripped = crate::openpgp::parse_binary(&v.packets).unwrap();
    assert_eq!(stripped.fingerprint, ALICE_FPR);
    assert_eq!(stripped.user_ids, ["alice <alice@example.net>"]);
    // The primary key packet is byte-for-byte the one that was sent.
    let sent = packets(&binary(ALICE));
    let kept = packets(&v.packets);
    assert_eq!(serialize(&sent[..1]), serialize(&kept[..1]));
}

#[test]
fn other_uids_of_the_same_key_can_be_published_by_their_owner() {
    let v = validate(
        ALICE,
        &addr("alice@personal.example"),
        &KeyPolicy::default(),
        now(),
    )
    .unwrap();
    assert_eq!(v.user_id, "Alice Private <alice@personal.example>");
    assert_eq!(user_ids(&v.packets), [v.user_id.as_str()]);
    assert_eq!(v.fingerprint, ALICE_FPR);
}

#[test]
fn address_comparison_uses_the_address_policy() {
    // The account is normalized by the service; the UID side by the policy here.
    let v = validate(
        ALICE,
        &addr("ALICE@Example.NET"),
        &KeyPolicy::default(),
        now(),
    );
    assert_eq!(v.unwrap().user_id, "alice <alice@example.net>");
    let folding = KeyPolicy {
        address_policy: AddressPolicy {
            subaddress_separator: Some('+'),
            ..AddressPolicy::default()
        },
        ..KeyPolicy::default()
    };
    let p = &folding.address_policy;
    assert_eq!(uid_address(b"a <alice+x@example.net>", p), Some(alice()));
}

#[test]
fn uid_addresses() {
    let p = AddressPolicy::default();
    let a = |s: &[u8]| uid_address(s, &p).map(|a| a.as_str().to_string());
    assert_eq!(
        a(b"alice@example.net").as_deref(),
        Some("alice@example.net")
    );
    assert_eq!(
        a(b"  Alice@Example.net ").as_deref(),
        Some("alice@example.net")
    );
    assert_eq!(
        a(b"<alice@example.net>").as_deref(),
        Some("alice@example.net")
    );
    assert_eq!(
        a(b"Alice (work) <Alice@EXAMPLE.net>").as_deref(),
        Some("alice@example.net")
    );
    assert_eq!(
        a(b"Eve <eve@evil.example> <alice@example.net>").as_deref(),
        Some("alice@example.net")
    );
    assert_eq!(a(b"Alice (no mail)"), None);
    assert_eq!(a(b"alice <alice@example.net> extra"), None);
    assert_eq!(a(b"alice@example.net>"), None);
    assert_eq!(a(b"\xffalice@example.net"), None);
    assert_eq!(a(b""), None);
}

// ---- stripping and flooding -----------------------------------------------------------

#[test]
fn third_party_certifications_are_stripped() {
    let v = ok(CERTIFIED);
    assert_eq!(v.packets, ok(ALICE).packets);
    assert!(
        has(&v, "4 third-party certifications and signatures"),
        "{:?}",
        v.stripped
    );
}

#[test]
fn flooded_key_is_stripped_to_the_self_signatures_without_verifying_the_flood() {
    let all_sigs = sig_types(&binary(FLOODED)).len();
    assert!(all_sigs > 2000, "the fixture holds {all_sigs} signatures");
    let (v, verifications) = validate_counting(FLOODED, &alice(), &KeyPolicy::default(), now());
    let v = v.unwrap();
    assert_eq!(v.packets, ok(ALICE).packets);
    assert_eq!(v.fingerprint, ALICE_FPR);
    assert!(
        has(&v, "2004 third-party certifications and signatures"),
        "{:?}",
        v.stripped
    );
    // One verification for the UID's self-signature, one for the subkey binding: none of
    // the thousands of third-party signatures was checked.
    assert_eq!(verifications, 2);
}

#[test]
fn stripping_is_idempotent() {
    let fixtures = [ALICE, CERTIFIED, FLOODED, REVOKED, SHA1_RESIGNED, SUBKEYS];
    for f in fixtures {
        let first = ok(f);
        let again = ok(&armor_public_key(&first.packets));
        assert_eq!(again.packets, first.packets);
        assert_eq!(again.fingerprint, first.fingerprint);
        assert_eq!(again.user_id, first.user_id);
        assert_eq!(again.revoked, first.revoked);
        assert_eq!(again.expires_at, first.expires_at);
        assert!(again.stripped.is_empty(), "{:?}", again.stripped);
    }
}

#[test]
fn unhashed_junk_in_a_self_signature_is_removed() {
    let clean = ok(ALICE).packets;
    let mut ps = packets(&clean);
    let Packet::Signature(sig) = &mut ps[2] else {
        panic!("expected the UID self-signature")
    };
    sig.unhashed_subpacket_push(
        Subpacket::regular(SubpacketData::PreferredKeyServer(
            "hkps://keys.evil.example".into(),
        ))
        .unwrap(),
    )
    .unwrap();
    let dirty = serialize(&ps);
    assert_ne!(dirty, clean);
    let v = ok(&armor_public_key(&dirty));
    assert_eq!(v.packets, clean);
    assert!(has(&v, "1 unauthenticated subpacket"), "{:?}", v.stripped);
}

/// Imports `armored` into a fresh GNUPGHOME and returns `gpg --with-colons --list-sigs`.
fn gpg_import_and_list(armored: &str) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let home = std::env::temp_dir().join(format!(
        "kst-validate-gpg-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&home).unwrap();
    let gpg = |args: &[&str], stdin: Option<&str>| {
        let mut child = Command::new("gpg")
            .arg("--homedir")
            .arg(&home)
            .args(["--batch", "--no-tty", "--no-auto-check-trustdb"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("gpg is installed");
        if let Some(input) = stdin {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    gpg(&["--import"], Some(armored));
    let listing = gpg(&["--with-colons", "--fixed-list-mode", "--list-sigs"], None);
    let _ = std::fs::remove_dir_all(&home);
    listing
}

#[test]
fn stripped_flooded_key_round_trips_through_gpg() {
    let v = ok(FLOODED);
    let listing = gpg_import_and_list(&armor_public_key(&v.packets));
    let records: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|r| r[0] != "tru")
        .collect();
    let kinds: Vec<&str> = records.iter().map(|r| r[0]).collect();
    assert_eq!(
        kinds,
        ["pub", "fpr", "uid", "sig", "sub", "fpr", "sig"],
        "{listing}"
    );
    assert_eq!(records[1][9], ALICE_FPR);
    assert_eq!(records[2][9], "alice <alice@example.net>");
    let key_id = &ALICE_FPR[24..];
    for sig in records.iter().filter(|r| r[0] == "sig") {
        assert_eq!(sig[4], key_id, "only self-signatures: {listing}");
    }
    // gpg validates the key: the UID is not marked invalid/revoked/expired.
    assert!(!["i", "r", "e"].contains(&records[0][1]), "{listing}");
}

#[test]
fn revoked_key_round_trips_through_gpg_as_revoked() {
    let v = ok(REVOKED);
    let listing = gpg_import_and_list(&armor_public_key(&v.packets));
    let pub_line = listing.lines().find(|l| l.starts_with("pub:")).unwrap();
    assert!(pub_line.starts_with("pub:r:"), "{listing}");
    assert!(listing.lines().any(|l| l.starts_with("rev:")), "{listing}");
}

// ---- refusals --------------------------------------------------------------------------

#[test]
fn secret_keys_are_refused_in_any_armor() {
    let e = check(ALICE_SECRET).unwrap_err();
    assert_eq!(e, KeyRejection::SecretKey);
    assert_eq!(e.reason(), Reason::SecretKey);
    assert!(e.to_string().contains("revoke"));

    // The secret packets re-armored as a PUBLIC KEY BLOCK.
    let mut d = Dearmor::new(BufReader::new(ALICE_SECRET.as_bytes()));
    let mut secret = Vec::new();
    d.read_to_end(&mut secret).unwrap();
    assert_eq!(
        check(&armor_public_key(&secret)),
        Err(KeyRejection::SecretKey)
    );
    // A secret key appended after a good public key.
    let mut both = binary(ALICE);
    both.extend_from_slice(&secret);
    assert_eq!(
        check(&armor_public_key(&both)),
        Err(KeyRejection::SecretKey)
    );
    // A secret block after a public block in the same text.
    let text = format!("{ALICE}\n{ALICE_SECRET}");
    assert_eq!(check(&text), Err(KeyRejection::SecretKey));
    // A secret subkey packet whose body is garbage is still a secret key.
    let mut garbage = binary(ALICE);
    garbage.extend_from_slice(&[0xC7, 0x03, 0xff, 0xff, 0xff]);
    assert_eq!(
        check(&armor_public_key(&garbage)),
        Err(KeyRejection::SecretKey)
    );
}

#[test]
fn size_caps() {
    let small = KeyPolicy {
        max_key_bytes: 1000,
        ..KeyPolicy::default()
    };
    let e = validate(FLOODED, &alice(), &small, now()).unwrap_err();
    assert_eq!(e, KeyRejection::TooLarge { limit: 1000 });
    assert_eq!(e.reason(), Reason::KeyTooLarge);

    let huge = "x".repeat(DEFAULT_MAX_KEY_BYTES + 1);
    assert_eq!(
        check(&huge),
        Err(KeyRejection::TooLarge {
            limit: DEFAULT_MAX_KEY_BYTES
        })
    );

    let few_packets = KeyPolicy {
        max_packets: 100,
        ..KeyPolicy::default()
    };
    let e = validate(FLOODED, &alice(), &few_packets, now()).unwrap_err();
    assert_eq!(e, KeyRejection::TooManyPackets { limit: 100 });
    assert_eq!(e.reason(), Reason::KeyTooLarge);
    // The flooded fixture (about 320 KiB) is within the defaults: it is stripped, not refused.
    assert!(FLOODED.len() < DEFAULT_MAX_KEY_BYTES);
}

#[test]
fn too_many_self_signature_candidates() {
    let strict = KeyPolicy {
        max_self_signatures: 1,
        ..KeyPolicy::default()
    };
    // alice: one UID self-signature + one subkey binding.
    assert_eq!(
        validate(ALICE, &alice(), &strict, now()),
        Err(KeyRejection::TooManySelfSignatures { limit: 1 })
    );
    // 300 copies of the UID self-signature: over the default cap, refused before any check.
    let mut ps = packets(&ok(ALICE).packets);
    let sig = ps[2].clone();
    for _ in 0..300 {
        ps.insert(2, sig.clone());
    }
    let (r, verifications) = validate_counting(
        &armor_public_key(&serialize(&ps)),
        &alice(),
        &KeyPolicy::default(),
        now(),
    );
    assert_eq!(
        r,
        Err(KeyRejection::TooManySelfSignatures {
            limit: DEFAULT_MAX_SELF_SIGNATURES
        })
    );
    assert_eq!(verifications, 0);
}

#[test]
fn not_exactly_one_certificate() {
    assert_eq!(check(TWO_CERTS), Err(KeyRejection::SeveralCertificates(2)));
    assert_eq!(
        check(&armor_public_key(&[])),
        Err(KeyRejection::NoCertificate)
    );
    // A bare revocation certificate (the signature packet alone).
    let rev: Vec<Packet> = packets(&binary(REVOKED))
        .into_iter()
        .filter(
            |p| matches!(p, Packet::Signature(s) if s.typ() == Some(SignatureType::KeyRevocation)),
        )
        .collect();
    assert_eq!(rev.len(), 1);
    let e = check(&armor_public_key(&serialize(&rev))).unwrap_err();
    assert_eq!(e, KeyRejection::NoCertificate);
    assert!(e.to_string().contains("gpg --import"));
    assert_eq!(e.reason(), Reason::BadKey);
}

#[test]
fn foreign_uid_only() {
    let e = check(FOREIGN).unwrap_err();
    assert_eq!(
        e,
        KeyRejection::NoMatchingUserId {
            account: alice(),
            found: vec![addr("alice@example.org")]
        }
    );
    assert!(e.to_string().contains("alice@example.org"));
    assert_eq!(e.reason(), Reason::NoMatchingUserId);
    // Alice's key published by bob: bob's address is not on it.
    let e = validate(
        ALICE,
        &addr("bob@example.com"),
        &KeyPolicy::default(),
        now(),
    );
    assert_eq!(
        e,
        Err(KeyRejection::NoMatchingUserId {
            account: addr("bob@example.com"),
            found: vec![addr("alice@personal.example"), alice()]
        })
    );
}

#[test]
fn matching_uid_without_self_signature() {
    // mallory's key with an unsigned "alice" User ID appended.
    let mut ps = packets(&binary(FOREIGN));
    ps.push(Packet::UserId(
        UserId::from_str(PacketHeaderVersion::New, "alice <alice@example.net>").unwrap(),
    ));
    assert_eq!(
        check(&armor_public_key(&serialize(&ps))),
        Err(KeyRejection::UserIdNotSelfSigned { account: alice() })
    );
}

#[test]
fn no_valid_self_signature() {
    // The User ID altered after signing: its self-signature no longer verifies.
    let mut ps = packets(&ok(ALICE).packets);
    ps[1] = Packet::UserId(
        UserId::from_str(PacketHeaderVersion::Old, "Alice <alice@example.net>").unwrap(),
    );
    let e = check(&armor_public_key(&serialize(&ps))).unwrap_err();
    assert_eq!(e, KeyRejection::NoValidSelfSignature);
    assert_eq!(e.reason(), Reason::BadSelfSignature);
}

/// gpg --quick-revoke-uid: alice's User ID revoked (2025-06-01), another one still valid.
#[test]
fn revoked_user_id_of_the_account() {
    let e = check(UID_REVOKED).unwrap_err();
    assert_eq!(e, KeyRejection::UserIdRevoked { account: alice() });
    assert_eq!(e.reason(), Reason::UserIdRevoked);
    // The User ID that is still valid can be published by its owner.
    let elsewhere = crate::AddressPolicy::default()
        .normalize("alice@elsewhere.example")
        .unwrap();
    let v = validate(UID_REVOKED, &elsewhere, &KeyPolicy::default(), now()).unwrap();
    assert_eq!(v.user_id, "Alice Elsewhere <alice@elsewhere.example>");
    // Before the revocation (2025-05-01) alice's User ID was fine.
    assert!(
        validate(
            UID_REVOKED,
            &alice(),
            &KeyPolicy::default(),
            at(1_746_057_600)
        )
        .is_ok()
    );
}

/// The signature packets that follow the User ID `uid` in `bytes`, as (type, creation time).
fn user_id_sigs(bytes: &[u8], uid: &str) -> Vec<(SignatureType, u32)> {
    let mut inside = false;
    let mut out = Vec::new();
    for p in packets(bytes) {
        match p {
            Packet::UserId(u) => inside = u.id() == uid.as_bytes(),
            Packet::Signature(s) if inside => {
                out.push((s.typ().unwrap(), s.created().map_or(0, |t| t.as_secs())))
            }
            Packet::Signature(_) => {}
            _ => inside = false,
        }
    }
    out
}

/// make-uid2rev-fixtures.sh: two User IDs of alice@example.net, the first ("Alice Old") revoked
/// on 2025-03-01. The live one is published for clients to use, and the revoked one is kept
/// beside it with its revocation: a client that holds "Alice Old" from an earlier copy must
/// learn that it is revoked (it used to be dropped as "another User ID", revocation and all).
#[test]
fn a_revoked_second_user_id_of_the_account_is_kept_with_its_revocation() {
    let v = ok(UID2REV_SECOND);
    assert_eq!(v.user_id, "alice <alice@example.net>");
    assert_eq!(v.revoked_user_ids, ["Alice Old <alice@example.net>"]);
    assert!(!v.revoked, "a User ID revocation does not revoke the key");
    assert_eq!(
        user_ids(&v.packets),
        ["alice <alice@example.net>", "Alice Old <alice@example.net>"],
        "the User ID to use comes first"
    );
    assert_eq!(
        user_id_sigs(&v.packets, "Alice Old <alice@example.net>"),
        [
            (SignatureType::CertRevocation, 1_740_787_200),
            (SignatureType::CertPositive, 1_735_689_600)
        ],
        "its revocation (2025-03-01) and the certification it revokes"
    );
    assert!(
        !v.stripped.iter().any(|s| s.contains("other User ID")),
        "{:?}",
        v.stripped
    );
    // What a client sees: the revoked User ID is marked revoked, the other one is not.
    let index = crate::certificate::Certificate::from_binary(&v.packets)
        .unwrap()
        .hkp_index_entry(0);
    assert!(
        index.contains("uid:alice <alice@example.net>:1735689600::\n"),
        "{index}"
    );
    assert!(
        index.contains("uid:Alice Old <alice@example.net>:1735689600::r\n"),
        "{index}"
    );
    // Idempotent: the published certificate validates to itself.
    let again = ok(&armor_public_key(&v.packets));
    assert_eq!(again.packets, v.packets);
    assert_eq!(again.revoked_user_ids, v.revoked_user_ids);
    // Before the revocation (2025-02-01) the first User ID is published and the other dropped.
    let before = validate(
        UID2REV_SECOND,
        &alice(),
        &KeyPolicy::default(),
        at(1_738_368_000),
    )
    .unwrap();
    assert_eq!(before.user_id, "Alice Old <alice@example.net>");
    assert!(before.revoked_user_ids.is_empty());
    assert_eq!(user_ids(&before.packets), ["Alice Old <alice@example.net>"]);
    assert!(before.stripped.contains(&"1 other User ID".to_string()));
}

#[test]
fn expired_key() {
    let e = check(EXPIRED).unwrap_err();
    assert_eq!(e, KeyRejection::Expired { at: 1_577_923_200 });
    assert!(e.to_string().contains("2020-01-02 00:00 UTC"), "{e}");
    assert_eq!(e.reason(), Reason::KeyExpired);
    // Before it expired (2020-01-01 12:00) it was fine, subkey included.
    let v = validate(EXPIRED, &alice(), &KeyPolicy::default(), at(1_577_880_000)).unwrap();
    assert_eq!(v.expires_at, Some(1_577_923_200));
    assert!(tags(&v.packets).contains(&Tag::PublicSubkey));
}

#[test]
fn expiry_from_a_newer_direct_key_signature() {
    let sec = secret_alice();
    let public = sec.primary_key.public_key();
    // A direct-key signature made 2025-06-01 setting expiry 200 days after creation
    // (2025-01-01 + 200 d = 2025-07-20), newer than the UID self-signature.
    let mut cfg = alice_config(SignatureType::Key, 1_748_736_000, HashAlgorithm::Sha256);
    cfg.hashed_subpackets.push(
        Subpacket::regular(SubpacketData::KeyExpirationTime(
            pgp::types::Duration::from_secs(200 * 86_400),
        ))
        .unwrap(),
    );
    let direct = cfg
        .sign_key(&sec.primary_key, &Password::empty(), &public)
        .unwrap();
    let mut ps = packets(&ok(ALICE).packets);
    ps.insert(1, Packet::Signature(direct));
    let armored = armor_public_key(&serialize(&ps));
    let expires = 1_735_689_600 + 200 * 86_400;
    assert_eq!(check(&armored), Err(KeyRejection::Expired { at: expires }));
    let v = validate(&armored, &alice(), &KeyPolicy::default(), at(1_750_000_000)).unwrap();
    assert_eq!(v.expires_at, Some(expires));
    assert_eq!(sig_types(&v.packets)[0], SignatureType::Key);
}

#[test]
fn future_and_expired_self_signatures_are_dropped() {
    let sec = secret_alice();
    let public = sec.primary_key.public_key();
    let uid = UserId::from_str(PacketHeaderVersion::Old, "alice <alice@example.net>").unwrap();
    // Made a day after `now()`, beyond the clock skew.
    let future = alice_config(
        SignatureType::CertPositive,
        1_780_272_000 + 86_400,
        HashAlgorithm::Sha256,
    )
    .sign_certification(
        &sec.primary_key,
        &public,
        &Password::empty(),
        Tag::UserId,
        &uid,
    )
    .unwrap();
    // A direct-key signature whose own validity ended (made 2025-06-01, valid one day).
    // (rPGP refuses to make SHA-1 EdDSA signatures; the gpg-made sha1 fixtures cover that.)
    let mut cfg = alice_config(SignatureType::Key, 1_748_736_000, HashAlgorithm::Sha256);
    cfg.hashed_subpackets.push(
        Subpacket::regular(SubpacketData::SignatureExpirationTime(
            pgp::types::Duration::from_secs(86_400),
        ))
        .unwrap(),
    );
    let expired = cfg
        .sign_key(&sec.primary_key, &Password::empty(), &public)
        .unwrap();
    let clean = ok(ALICE).packets;
    let mut ps = packets(&clean);
    ps.insert(3, Packet::Signature(future));
    ps.insert(1, Packet::Signature(expired));
    let v = ok(&armor_public_key(&serialize(&ps)));
    assert_eq!(v.packets, clean);
    // the expired one does not verify; the future one does, so the clock is named
    assert!(
        has(&v, "1 self-signature that does not verify")
            && has(&v, "1 self-signature dated in the future"),
        "{:?}",
        v.stripped
    );
    // Within the clock skew, a signature from slightly in the future is accepted.
    let soon = alice_config(
        SignatureType::CertPositive,
        1_780_272_000 + 60,
        HashAlgorithm::Sha256,
    )
    .sign_certification(
        &sec.primary_key,
        &public,
        &Password::empty(),
        Tag::UserId,
        &uid,
    )
    .unwrap();
    let mut ps = packets(&clean);
    ps.insert(3, Packet::Signature(soon));
    let v = ok(&armor_public_key(&serialize(&ps)));
    // ... and, being the newest, supersedes the older certification.
    let certs = signature_times(&v.packets, SignatureType::CertPositive);
    assert_eq!(certs, [1_780_272_000 + 60]);
}

#[test]
fn revoked_key_is_accepted_and_marked() {
    let v = ok(REVOKED);
    assert!(v.revoked);
    assert_eq!(v.user_id, "alice <alice@example.net>");
    assert_eq!(
        sig_types(&v.packets),
        [
            SignatureType::KeyRevocation,
            SignatureType::CertPositive,
            SignatureType::SubkeyBinding
        ]
    );
    assert!(v.stripped.is_empty(), "{:?}", v.stripped);
    // Still revoked long after any expiry.
    let later = validate(REVOKED, &alice(), &KeyPolicy::default(), at(4_000_000_000));
    assert!(later.unwrap().revoked);
}

#[test]
fn weak_primary_keys() {
    let e = check(RSA1024).unwrap_err();
    let KeyRejection::WeakPrimaryKey { algorithm } = &e else {
        panic!("{e:?}")
    };
    assert_eq!(algorithm, "RSA with 1024 bits (at least 2048 are required)");
    assert_eq!(e.reason(), Reason::WeakAlgorithm);
    let lenient = KeyPolicy {
        min_rsa_bits: 1024,
        ..KeyPolicy::default()
    };
    assert!(validate(RSA1024, &alice(), &lenient, now()).is_ok());

    assert_eq!(
        check(DSA_ELG),
        Err(KeyRejection::WeakPrimaryKey {
            algorithm: "DSA".into()
        })
    );
}

#[test]
fn sha1_self_signatures() {
    let e = check(SHA1).unwrap_err();
    assert_eq!(
        e,
        KeyRejection::WeakSelfSignatureHash {
            hash: "SHA1".into()
        }
    );
    assert_eq!(e.reason(), Reason::WeakAlgorithm);
    let lenient = KeyPolicy {
        allow_sha1_bindings: true,
        ..KeyPolicy::default()
    };
    let v = validate(SHA1, &alice(), &lenient, now()).unwrap();
    assert!(tags(&v.packets).contains(&Tag::PublicSubkey));
    // RSA-3072 passes the size rule.
    assert!(v.stripped.is_empty(), "{:?}", v.stripped);
}

#[test]
fn old_sha1_self_signature_next_to_a_new_one_is_dropped() {
    let v = ok(SHA1_RESIGNED);
    let kept = packets(&v.packets);
    let hashes: Vec<HashAlgorithm> = kept
        .iter()
        .filter_map(|p| match p {
            Packet::Signature(s) => s.hash_alg(),
            _ => None,
        })
        .collect();
    assert_eq!(hashes, [HashAlgorithm::Sha256, HashAlgorithm::Sha256]);
    assert!(
        has(&v, "1 self-signature that does not verify"),
        "{:?}",
        v.stripped
    );
}

#[test]
fn superseded_self_signatures_of_uid_and_subkey_are_dropped() {
    // alice.pub.asc renewed on 2026-01-01: a newer certification of her User ID and a newer
    // binding of her subkey. Only the newest of each is kept.
    let sec = secret_alice();
    let public = sec.primary_key.public_key();
    let renewed = 1_767_225_600;
    let cert = alice_certification(renewed);
    let clean = ok(ALICE).packets;
    let mut ps = packets(&clean);
    let subkey = ps
        .iter()
        .find_map(|p| match p {
            Packet::PublicSubkey(k) => Some(k.clone()),
            _ => None,
        })
        .unwrap();
    let binding = alice_config(SignatureType::SubkeyBinding, renewed, HashAlgorithm::Sha256)
        .sign_subkey_binding(&sec.primary_key, &public, &Password::empty(), &subkey)
        .unwrap();
    assert_eq!(
        sig_types(&clean),
        [SignatureType::CertPositive, SignatureType::SubkeyBinding]
    );
    ps.push(Packet::Signature(binding));
    ps.insert(3, Packet::Signature(cert));
    let v = ok(&armor_public_key(&serialize(&ps)));
    let kept: Vec<(SignatureType, u32)> = packets(&v.packets)
        .iter()
        .filter_map(|p| match p {
            Packet::Signature(s) => Some((s.typ()?, s.created()?.as_secs())),
            _ => None,
        })
        .collect();
    assert_eq!(
        kept,
        [
            (SignatureType::CertPositive, renewed),
            (SignatureType::SubkeyBinding, renewed)
        ]
    );
    assert!(
        has(&v, "2 older self-signatures superseded by newer ones"),
        "{:?}",
        v.stripped
    );
    assert_eq!(
        check(&armor_public_key(&v.packets)).unwrap().packets,
        v.packets
    );
}

#[test]
fn amplified_key_is_reduced_to_its_newest_self_signatures() {
    // 65 self-certifications of alice's User ID, each with a 9 KB hashed notation (which
    // cannot be cut out of a signature), and 5 subkeys whose bindings carry one each.
    assert!(AMPLIFIED.len() > 850_000, "{}", AMPLIFIED.len());
    let v = ok(AMPLIFIED);
    assert!(
        has(&v, "64 older self-signatures superseded by newer ones"),
        "{:?}",
        v.stripped
    );
    let certs = signature_times(&v.packets, SignatureType::CertPositive);
    // the newest: made 2025-01-02 00:00 UTC + 65 hours
    assert_eq!(certs, [1_735_776_000 + 65 * 3600]);
    assert_eq!(
        sig_types(&v.packets)
            .iter()
            .filter(|t| **t == SignatureType::SubkeyBinding)
            .count(),
        5
    );
    // The largest key of the fixtures that fits the default budget: just under 64 KiB.
    assert!(
        v.packets.len() > 50_000 && v.packets.len() <= DEFAULT_MAX_PUBLISHED_BYTES,
        "{}",
        v.packets.len()
    );
    assert_eq!(
        check(&armor_public_key(&v.packets)).unwrap().packets,
        v.packets
    );
}

#[test]
fn key_over_the_budget_after_the_reduction_is_refused() {
    let e = check(AMPLIFIED_TOO_LARGE).unwrap_err();
    let KeyRejection::PublishedTooLarge { size, limit } = e else {
        panic!("{e:?}");
    };
    assert_eq!(limit, DEFAULT_MAX_PUBLISHED_BYTES);
    assert!(size > limit && size < 80_000, "{size}");
    assert_eq!(e.reason(), Reason::KeyTooLarge);
    assert!(e.to_string().contains("newest self-signatures"), "{e}");

    // The budget is the operator's: the reduced amplified key fits 64 KiB but not 32 KiB.
    let tight = KeyPolicy {
        max_published_bytes: 32 << 10,
        ..KeyPolicy::default()
    };
    assert!(matches!(
        validate(AMPLIFIED, &alice(), &tight, now()),
        Err(KeyRejection::PublishedTooLarge { limit: 32768, .. })
    ));
    assert!(ok(ALICE).packets.len() < 2_000);
}

#[test]
fn subkeys_expired_stripped_revoked_kept() {
    let v = ok(SUBKEYS);
    let ps = packets(&v.packets);
    let subkeys: Vec<String> = ps
        .iter()
        .filter_map(|p| match p {
            Packet::PublicSubkey(k) => Some(format!("{:X}", k.fingerprint())),
            _ => None,
        })
        .collect();
    assert_eq!(subkeys.len(), 2, "the expired one is gone");
    assert_eq!(
        sig_types(&v.packets),
        [
            SignatureType::CertPositive,
            SignatureType::SubkeyBinding,
            SignatureType::SubkeyRevocation,
            SignatureType::SubkeyBinding
        ]
    );
    assert!(has(&v, "(expired)"), "{:?}", v.stripped);
    // In 2020, before the first subkey expired and before the others existed, only the
    // first is kept (the others' bindings are from 2025, "in the future").
    let v2020 = validate(SUBKEYS, &alice(), &KeyPolicy::default(), at(1_577_880_000));
    let v2020 = v2020.unwrap();
    assert_eq!(
        tags(&v2020.packets)
            .iter()
            .filter(|t| **t == Tag::PublicSubkey)
            .count(),
        1
    );
}

#[test]
fn subkey_with_a_binding_that_does_not_verify_is_stripped() {
    let mut ps = packets(&ok(ALICE).packets);
    let other_subkey = packets(&binary(REVOKED))
        .into_iter()
        .find(|p| p.tag() == Tag::PublicSubkey)
        .unwrap();
    ps[3] = other_subkey;
    let v = ok(&armor_public_key(&serialize(&ps)));
    assert!(!tags(&v.packets).contains(&Tag::PublicSubkey));
    assert!(has(&v, "no valid binding signature"), "{:?}", v.stripped);
}

#[test]
fn message_packets_are_refused() {
    let mut bytes = binary(ALICE);
    // An (empty, uncompressed) Compressed Data packet.
    bytes.extend_from_slice(&[0xC8, 0x01, 0x00]);
    let e = check(&armor_public_key(&bytes)).unwrap_err();
    assert!(matches!(e, KeyRejection::Malformed(_)), "{e:?}");
}

#[test]
fn garbage_is_refused_not_a_panic() {
    assert!(matches!(check("hello"), Err(KeyRejection::Malformed(_))));
    assert!(matches!(
        check(&armor_public_key(b"\x99\x00\x01\x04garbage")),
        Err(KeyRejection::Malformed(_))
    ));
    // Truncated key.
    let bytes = binary(ALICE);
    for len in [1, 10, 50, bytes.len() / 2, bytes.len() - 1] {
        assert!(check(&armor_public_key(&bytes[..len])).is_err());
    }
}

#[test]
fn reasons() {
    assert_eq!(KeyRejection::SecretKey.reason(), Reason::SecretKey);
    assert_eq!(
        KeyRejection::TooLarge { limit: 1 }.reason(),
        Reason::KeyTooLarge
    );
    assert_eq!(
        KeyRejection::TooManyPackets { limit: 1 }.reason(),
        Reason::KeyTooLarge
    );
    assert_eq!(
        KeyRejection::TooManySelfSignatures { limit: 1 }.reason(),
        Reason::KeyTooLarge
    );
    assert_eq!(KeyRejection::NoCertificate.reason(), Reason::BadKey);
    assert_eq!(KeyRejection::Malformed("x".into()).reason(), Reason::BadKey);
    assert_eq!(
        KeyRejection::SeveralCertificates(2).reason(),
        Reason::SeveralKeys
    );
    assert_eq!(KeyRejection::Expired { at: 0 }.reason(), Reason::KeyExpired);
    let weak = "DSA".to_string();
    assert_eq!(
        KeyRejection::WeakPrimaryKey {
            algorithm: weak.clone()
        }
        .reason(),
        Reason::WeakAlgorithm
    );
    assert_eq!(
        KeyRejection::WeakSubkey {
            fingerprint: "AB".into(),
            algorithm: weak
        }
        .reason(),
        Reason::WeakAlgorithm
    );
    assert_eq!(
        KeyRejection::WeakSelfSignatureHash {
            hash: "SHA1".into()
        }
        .reason(),
        Reason::WeakAlgorithm
    );
    assert_eq!(
        KeyRejection::NoMatchingUserId {
            account: alice(),
            found: vec![]
        }
        .reason(),
        Reason::NoMatchingUserId
    );
    assert_eq!(
        KeyRejection::UserIdRevoked { account: alice() }.reason(),
        Reason::UserIdRevoked
    );
    assert_eq!(
        KeyRejection::UserIdNotSelfSigned { account: alice() }.reason(),
        Reason::BadSelfSignature
    );
    assert_eq!(
        KeyRejection::NoValidSelfSignature.reason(),
        Reason::BadSelfSignature
    );
}

#[test]
fn utc_dates() {
    assert_eq!(format_utc_minutes(0), "1970-01-01 00:00 UTC");
    assert_eq!(format_utc_minutes(951_782_400), "2000-02-29 00:00 UTC");
    assert_eq!(
        format_utc_minutes(1_577_923_200 + 3_660),
        "2020-01-02 01:01 UTC"
    );
    assert_eq!(format_utc_minutes(4_102_444_799), "2099-12-31 23:59 UTC");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = check(&armor_public_key(&bytes));
    }

    #[test]
    fn mutated_keys_never_panic(
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = ok(ALICE).packets;
        for (i, b) in edits {
            let i = i.index(bytes.len());
            bytes[i] = b;
        }
        let end = bytes.len() - cut.index(bytes.len() / 4 + 1);
        let _ = check(&armor_public_key(&bytes[..end]));
    }
}

/// A key made on a computer whose clock runs a day ahead, checked "now" (the day before): the
/// refusal says the self-signature is dated in the future and to check the clock, not that
/// the key is damaged.
#[test]
fn a_key_signed_with_the_clock_ahead_is_refused_for_the_clock() {
    const BASE: &str = include_str!("../../testdata/keys/merge-base.pub.asc");
    // merge-base: made 2025-01-01 00:00; checked 2024-12-31 00:00
    let e = validate(BASE, &alice(), &KeyPolicy::default(), at(1_735_603_200)).unwrap_err();
    assert_eq!(
        e,
        KeyRejection::SignedInTheFuture {
            at: 1_735_689_600,
            now: 1_735_603_200,
            key_created: 1_735_689_600,
        }
    );
    assert_eq!(e.reason(), Reason::BadSelfSignature);
    let m = e.to_string();
    for part in [
        "dated 2025-01-01 00:00 UTC, in the future",
        "clock says 2024-12-31 00:00 UTC",
        "clock",
        "make a new key",
    ] {
        assert!(m.contains(part), "{part:?} not in {m}");
    }
    assert!(!m.contains("damaged"), "{m}");
    // within the allowed skew (15 minutes) it is accepted
    assert!(
        validate(
            BASE,
            &alice(),
            &KeyPolicy::default(),
            at(1_735_689_600 - 600)
        )
        .is_ok()
    );
}

/// The key is older, only its renewal (2025-05-01, a new expiry) was signed with the clock
/// ahead, checked on 2025-04-30: alone it is refused with "renew"; next to the older
/// certification that one is kept and the confirmation lists the future-dated one; a forged
/// future-dated signature is only "does not verify".
#[test]
fn a_renewal_signed_with_the_clock_ahead_is_named_in_the_refusal_or_the_confirmation() {
    const BASE: &str = include_str!("../../testdata/keys/merge-base.pub.asc");
    const EXTENDED: &str = include_str!("../../testdata/keys/merge-extended.pub.asc");
    let day_before = at(1_745_971_200);
    let e = validate(EXTENDED, &alice(), &KeyPolicy::default(), day_before).unwrap_err();
    assert_eq!(
        e,
        KeyRejection::SignedInTheFuture {
            at: 1_746_057_600,
            now: 1_745_971_200,
            key_created: 1_735_689_600,
        }
    );
    assert!(e.to_string().contains("renew the self-signature"), "{e}");

    // base: [primary, User ID, certification 2025-01-01, subkey, binding]; the renewal after
    // the older certification
    let base = packets(&binary(BASE));
    let renewal = packets(&binary(EXTENDED))[2].clone();
    assert_eq!(base.len(), 5);
    let mut both = base.clone();
    both.insert(3, renewal.clone());
    let v = validate(
        &armor_public_key(&serialize(&both)),
        &alice(),
        &KeyPolicy::default(),
        day_before,
    )
    .unwrap();
    assert!(
        v.stripped
            .iter()
            .any(|s| s.starts_with("1 self-signature dated in the future")),
        "{:?}",
        v.stripped
    );
    assert_eq!(
        v.expires_at,
        Some(1_893_499_200),
        "the older expiry (2030) is kept"
    );

    let mut forged = serialize(&[renewal]);
    *forged.last_mut().unwrap() ^= 1;
    let mut bytes = serialize(&base[..3]);
    bytes.extend(forged);
    bytes.extend(serialize(&base[3..]));
    let v = validate(
        &armor_public_key(&bytes),
        &alice(),
        &KeyPolicy::default(),
        day_before,
    )
    .unwrap();
    assert!(
        !v.stripped.iter().any(|s| s.contains("dated in the future")),
        "{:?}",
        v.stripped
    );
    assert!(
        v.stripped.iter().any(|s| s.contains("does not verify")),
        "{:?}",
        v.stripped
    );
}

/// A packet framed with an old-format indeterminate length (length type 3) runs to the end of
/// its input, so only the last packet can be framed so. A key whose User ID comes after its
/// subkey, with the User ID's self-signature last and framed so, is readable as sent; the
/// policy writes the kept packets in its own order (User ID before subkeys), and before the
/// fix it kept that signature's framing: the stored key's signature swallowed the subkey
/// after it, and the key no longer parsed (red-team round 4). Built from alice's gpg-made
/// packets; what is stored must be the same packets as for alice's key sent the usual way,
/// each with a definite length, readable by rPGP and by gpg.
#[test]
fn reframed_packets_are_stored_as_readable_fixed_length_packets() {
    use crate::certificate::Certificate;
    use crate::openpgp::packet_bodies;

    let bytes = binary(ALICE);
    let sent = packet_bodies(&bytes).unwrap();
    // Components: a key, User ID or subkey packet with the signatures after it.
    let mut components: Vec<Vec<(u8, &[u8])>> = Vec::new();
    for &(tag, body) in &sent {
        match tag {
            2 => components.last_mut().unwrap().push((tag, body)),
            _ => components.push(vec![(tag, body)]),
        }
    }
    // The primary key, its subkeys, the other User IDs and the User Attribute, then the kept
    // User ID: old-format two-octet lengths (new-format for the User Attribute, whose tag the
    // old format cannot hold), the last packet (the kept User ID's self-signature) with an
    // indeterminate one.
    let kept_uid = |c: &&Vec<(u8, &[u8])>| c[0] == (13, &b"alice <alice@example.net>"[..]);
    let rest = &components[1..];
    let subkeys: Vec<_> = rest.iter().filter(|c| c[0].0 == 14).collect();
    let others: Vec<_> = rest
        .iter()
        .filter(|c| c[0].0 != 14 && !kept_uid(c))
        .collect();
    let kept: Vec<_> = rest.iter().filter(kept_uid).collect();
    assert!(!subkeys.is_empty() && kept.len() == 1);
    let reordered: Vec<(u8, &[u8])> = std::iter::once(&components[0])
        .chain(subkeys)
        .chain(others)
        .chain(kept)
        .flatten()
        .copied()
        .collect();
    let mut odd = Vec::new();
    for (i, &(tag, body)) in reordered.iter().enumerate() {
        if i + 1 == reordered.len() {
            assert_eq!(tag, 2, "a signature is last");
            odd.push(0x80 | (tag << 2) | 3);
        } else if tag < 16 {
            odd.push(0x80 | (tag << 2) | 1);
            odd.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        } else {
            odd.extend_from_slice(&[0xc0 | tag, 255]);
            odd.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        }
        odd.extend_from_slice(body);
    }
    assert_eq!(
        packets(&odd).len(),
        sent.len(),
        "the odd framing reads as the same packets"
    );

    let stored = ok(&armor_public_key(&odd)).packets;
    let usual = ok(ALICE).packets;
    assert_eq!(
        packet_bodies(&stored).expect("every stored packet has a definite length"),
        packet_bodies(&usual).unwrap(),
        "the same packets, in the same order, as alice's key sent the usual way"
    );
    let cert = Certificate::from_binary(&stored).expect("rPGP reads the stored key");
    assert_eq!(cert.fingerprint(), ALICE_FPR);
    assert_eq!(cert.handles().subkeys.len(), subkeys_count(&usual));
    let listing = gpg_import_and_list(&armor_public_key(&stored));
    let kinds: Vec<&str> = listing
        .lines()
        .map(|l| l.split(':').next().unwrap())
        .filter(|k| *k != "tru")
        .collect();
    assert_eq!(
        kinds,
        ["pub", "fpr", "uid", "sig", "sub", "fpr", "sig"],
        "gpg reads the stored key whole: {listing}"
    );
}

fn subkeys_count(bytes: &[u8]) -> usize {
    tags(bytes)
        .iter()
        .filter(|t| **t == Tag::PublicSubkey)
        .count()
}
