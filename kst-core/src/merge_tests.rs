//! Tests of the certificate merge on real gpg-made variants of one key
//! (`testdata/make-merge-fixtures.sh`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proptest::prelude::*;

use super::*;
use crate::AddressPolicy;
use crate::validate::{KeyPolicy, validate};

/// 2025-06-01: when the variant with the short-lived signing subkey was received.
const JUNE_2025: u64 = 1_748_736_000;

fn armored(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/testdata/keys/{name}.pub.asc",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// The fixture as kst stores it when received at `at`.
fn received_at(name: &str, at: SystemTime) -> Vec<u8> {
    validate(
        &armored(name),
        &AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap(),
        &KeyPolicy::default(),
        at,
    )
    .unwrap()
    .packets
}

fn received(name: &str) -> Vec<u8> {
    received_at(name, SystemTime::now())
}

/// Every variant as received: the signing one in June 2025, while its subkey was valid.
fn variants() -> Vec<Vec<u8>> {
    static ALL: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    ALL.get_or_init(variants_uncached).clone()
}

fn variants_uncached() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = [
        "merge-base",
        "merge-subkey",
        "merge-extended",
        "merge-subrevoked",
        "merge-revoked",
    ]
    .iter()
    .map(|n| received(n))
    .collect();
    v.push(received_at(
        "merge-signing",
        UNIX_EPOCH + Duration::from_secs(JUNE_2025),
    ));
    v
}

fn fold(certs: &[Vec<u8>]) -> Vec<u8> {
    let mut acc = canonical(&certs[0]).unwrap();
    for c in &certs[1..] {
        acc = merge(&acc, c).unwrap();
    }
    acc
}

fn cert(bytes: &[u8]) -> crate::certificate::Certificate {
    crate::certificate::Certificate::from_binary(bytes).unwrap()
}

fn subkey_ids(bytes: &[u8]) -> Vec<String> {
    cert(bytes)
        .handles()
        .subkeys
        .into_iter()
        .map(|h| h.key_id)
        .collect()
}

const SUB_A: &str = "C8120EBE439610F0";
const SUB_B: &str = "6BEF6D9E9FFA7E11";
const SUB_C: &str = "EDF7E40E77EC0973";

/// `gpg --with-colons` records (`pub`, `sub`, `uid`) of binary packets.
fn gpg_listing(packets: &[u8]) -> Vec<Vec<String>> {
    let home = tempfile::tempdir().unwrap();
    let file = home.path().join("key.bin");
    std::fs::write(&file, packets).unwrap();
    let out = std::process::Command::new("gpg")
        .arg("--homedir")
        .arg(home.path())
        .args(["--batch", "--with-colons", "--fixed-list-mode"])
        .args(["--import-options", "show-only", "--import"])
        .arg(&file)
        .output()
        .expect("gpg is part of the test environment");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect())
        .filter(|r: &Vec<String>| ["pub", "sub", "uid"].contains(&r[0].as_str()))
        .collect()
}

#[test]
fn an_older_copy_does_not_drop_a_new_subkey_or_an_extended_expiry() {
    let base = received("merge-base");
    let sub = received("merge-subkey");
    let ext = received("merge-extended");
    // Newest first, then the old copy: nothing is lost.
    let merged = merge(&merge(&ext, &sub).unwrap(), &base).unwrap();
    assert_eq!(subkey_ids(&merged), [SUB_A, SUB_B]);
    // gpg reads the merged key: both subkeys valid, the extended expiry (2035-01-01) wins.
    let gpg = gpg_listing(&merged);
    assert_eq!(gpg[0][0], "pub");
    assert_eq!(gpg[0][6], "2051265600", "{gpg:?}");
    let subs: Vec<(&str, &str)> = gpg
        .iter()
        .filter(|r| r[0] == "sub")
        .map(|r| (r[1].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(subs, [("-", SUB_A), ("-", SUB_B)]);
    assert_eq!(gpg.iter().filter(|r| r[0] == "uid").count(), 1);
    // It still passes the key policy, which keeps exactly what the merge kept.
    let again = validate(
        &crate::openpgp::armor_public_key(&merged),
        &AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap(),
        &KeyPolicy::default(),
        SystemTime::now(),
    )
    .unwrap();
    assert_eq!(again.expires_at, Some(2_051_265_600));
    assert_eq!(canonical(&again.packets).unwrap(), merged);
}

#[test]
fn revocations_are_kept_whatever_comes_later() {
    let revoked = received("merge-revoked");
    let subrevoked = received("merge-subrevoked");
    let merged = merge(&revoked, &received("merge-extended")).unwrap();
    assert!(is_revoked(&merged).unwrap());
    assert!(!is_revoked(&received("merge-extended")).unwrap());
    assert_eq!(gpg_listing(&merged)[0][1], "r");
    let merged = merge(&subrevoked, &received("merge-subkey")).unwrap();
    let gpg = gpg_listing(&merged);
    let subs: Vec<(&str, &str)> = gpg
        .iter()
        .filter(|r| r[0] == "sub")
        .map(|r| (r[1].as_str(), r[4].as_str()))
        .collect();
    assert_eq!(
        subs,
        [("r", SUB_A), ("-", SUB_B)],
        "the subkey stays revoked"
    );
}

#[test]
fn what_was_valid_when_received_is_kept() {
    // The signing subkey expired on 2026-01-01; validated today it is dropped, but the copy
    // received in June 2025 held it valid, and the merge keeps it (expiry is the client's).
    assert_eq!(subkey_ids(&received("merge-signing")), [SUB_A]);
    let june = received_at("merge-signing", UNIX_EPOCH + Duration::from_secs(JUNE_2025));
    assert_eq!(subkey_ids(&june), [SUB_A, SUB_C]);
    let merged = merge(&june, &received("merge-base")).unwrap();
    assert_eq!(subkey_ids(&merged), [SUB_A, SUB_C]);
}

#[test]
fn a_different_primary_key_is_not_merged() {
    let other = validate(
        &std::fs::read_to_string(format!(
            "{}/testdata/keys/lifecycle-v1.pub.asc",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
        &AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap(),
        &KeyPolicy::default(),
        SystemTime::now(),
    )
    .unwrap()
    .packets;
    assert_eq!(
        merge(&received("merge-base"), &other),
        Err(MergeError::DifferentPrimary)
    );
    assert!(matches!(
        merge(b"garbage", &other),
        Err(MergeError::Unreadable(_))
    ));
    assert!(matches!(canonical(b""), Err(MergeError::Unreadable(_))));
}

#[test]
fn the_budget_drops_superseded_and_expired_subkeys_oldest_first() {
    let now = crate::time::unix_now();
    let june = received_at("merge-signing", UNIX_EPOCH + Duration::from_secs(JUNE_2025));
    let all = fold(&[june.clone(), received("merge-subkey")]);
    assert_eq!(subkey_ids(&all), [SUB_A, SUB_B, SUB_C]);
    assert_eq!(fit_budget(&all, all.len(), now).unwrap(), all);
    // A (2025-01, superseded by the newer encryption subkey B) goes first, then C (expired).
    let one_less = fit_budget(&all, all.len() - 1, now).unwrap();
    assert_eq!(subkey_ids(&one_less), [SUB_B, SUB_C]);
    let two_less = fit_budget(&all, one_less.len() - 1, now).unwrap();
    assert_eq!(subkey_ids(&two_less), [SUB_B]);
    // B is neither expired nor superseded: it stays, and the key does not fit.
    assert!(matches!(
        fit_budget(&all, two_less.len() - 1, now),
        Err(MergeError::TooLarge { .. })
    ));
    // A revoked subkey is never dropped: only C can go.
    let revoked_a = fold(&[june, received("merge-subkey"), received("merge-subrevoked")]);
    let fitted = fit_budget(&revoked_a, revoked_a.len() - 1, now).unwrap();
    assert_eq!(subkey_ids(&fitted), [SUB_A, SUB_B]);
    assert!(matches!(
        fit_budget(&revoked_a, fitted.len() - 1, now),
        Err(MergeError::TooLarge { .. })
    ));
}

#[test]
fn publishing_the_same_key_again_gives_the_same_bytes() {
    for v in variants() {
        let c = canonical(&v).unwrap();
        assert_eq!(merge(&c, &v).unwrap(), c);
        assert_eq!(canonical(&c).unwrap(), c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any sequence of deliveries (repeats included), in any order, merges into the same
    /// certificate: the union of what the distinct variants hold.
    #[test]
    fn merge_is_commutative_and_idempotent(
        (picks, shuffled) in proptest::collection::vec(0usize..6, 1..10)
            .prop_flat_map(|v| (Just(v.clone()), Just(v).prop_shuffle())),
    ) {
        let all = variants();
        let seq: Vec<Vec<u8>> = picks.iter().map(|&i| all[i].clone()).collect();
        // The same deliveries in another order.
        let other: Vec<Vec<u8>> = shuffled.iter().map(|&i| all[i].clone()).collect();
        // The distinct variants, each delivered once.
        let mut distinct: Vec<usize> = picks.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let once: Vec<Vec<u8>> = distinct.iter().map(|&i| all[i].clone()).collect();
        let a = fold(&seq);
        prop_assert_eq!(&a, &fold(&other));
        prop_assert_eq!(&a, &fold(&once));
        prop_assert_eq!(merge(&a, &a).unwrap(), a.clone());
        let b = &all[picks[0]];
        prop_assert_eq!(merge(&a, b).unwrap(), merge(b, &a).unwrap());
    }
}
