//! The look-up index on disk: its files, stores written before it (scanned until
//! `rebuild_index`), and stale lines (never served, removed by `rebuild_index`).

use std::fs;
use std::path::{Path, PathBuf};

use kst_core::conformance::lookup::{assert_index_matches_records, real_key};
use kst_core::key_index::IndexEntries;
use kst_core::wkd::WkdHash;
use kst_core::{Address, KeyRecord, KeyStore, PublishOutcome};
use kst_fs::FsStore;

use crate::support::{addr, root, temp_store};

async fn publish(store: &FsStore, key: kst_core::NewKey) -> KeyRecord {
    match store.publish(key).await.expect("publish") {
        PublishOutcome::Published(r) => r,
        other => panic!("expected a new version, got {other:?}"),
    }
}

/// The address hash (history file stem) of `a`.
fn address_hash(store: &FsStore, a: &Address) -> String {
    store
        .history_path(a)
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("history file name")
        .to_string()
}

/// `index/ids/<kk>/<KEYID>` of the store in `root`.
fn ids_file(root: &Path, key_id: &str) -> PathBuf {
    root.join("index/ids")
        .join(key_id[..2].to_ascii_lowercase())
        .join(key_id)
}

fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .map(|t| t.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// Every regular file under `dir` (recursively) except temporary ones.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_files_follow_publish_replace_and_delete() {
    let (dir, store) = temp_store().await;
    let root = root(&dir);
    assert!(root.join("index/ready").is_file(), "a new store is indexed");
    let a = addr("index-files@example.net");
    let hash = address_hash(&store, &a);
    let r = publish(&store, real_key(&a, "subkeys", 1, false)).await;
    let e = IndexEntries::of(&r);
    assert_eq!(e.fingerprints.len(), 4);
    for f in &e.fingerprints {
        let file = ids_file(&root, f.key_id().as_str());
        assert_eq!(
            lines(&file),
            vec![format!("{f} {hash}")],
            "{}",
            file.display()
        );
    }
    let wkd = files_under(&root.join("index/wkd"));
    assert_eq!(wkd.len(), 1, "{wkd:?}");
    assert_eq!(lines(&wkd[0]), vec![hash.clone()]);

    // Replaced by another key: the old key IDs' files go, the WKD entry stays.
    let new = publish(&store, real_key(&a, "alice", 2, false)).await;
    for f in &e.fingerprints {
        assert!(!ids_file(&root, f.key_id().as_str()).exists(), "{f}");
    }
    for f in &IndexEntries::of(&new).fingerprints {
        assert_eq!(
            lines(&ids_file(&root, f.key_id().as_str())),
            vec![format!("{f} {hash}")]
        );
    }
    assert_eq!(lines(&wkd[0]), vec![hash.clone()]);

    // Deleted: no index file is left.
    assert!(store.delete(&a).await.unwrap());
    let left: Vec<PathBuf> = files_under(&root.join("index"))
        .into_iter()
        .filter(|p| !p.ends_with("ready"))
        .collect();
    assert!(left.is_empty(), "index files after delete: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_index_is_scanned_until_rebuild_index() {
    let (dir, store) = temp_store().await;
    let root = root(&dir);
    let mut records = Vec::new();
    for (n, (name, cert)) in [("one", "subkeys"), ("two", "alice"), ("three", "alice")]
        .into_iter()
        .enumerate()
    {
        let a = addr(&format!("old-{name}@example.net"));
        records.push(publish(&store, real_key(&a, cert, n as u64, false)).await);
    }
    drop(store);
    // A store written by a release without the index.
    fs::remove_dir_all(root.join("index")).unwrap();
    let store = FsStore::open(&root).await.unwrap();
    assert!(
        !root.join("index/ready").exists(),
        "a store with keys is not marked indexed by open"
    );
    // Look-ups still answer (by reading every address).
    assert_index_matches_records("unindexed store", &store, "before rebuild_index", &[]).await;
    // A second instance (the running server) notices the rebuild made by another (kst migrate).
    let server = FsStore::open(&root).await.unwrap();
    assert_eq!(store.rebuild_index().await.unwrap(), 3);
    assert!(root.join("index/ready").is_file());
    let subkeys = IndexEntries::of(&records[0]);
    for f in &subkeys.fingerprints {
        assert_eq!(lines(&ids_file(&root, f.key_id().as_str())).len(), 1);
    }
    let alice = &records[1].fingerprint;
    assert_eq!(lines(&ids_file(&root, alice.key_id().as_str())).len(), 2);
    assert_index_matches_records("rebuilt store", &server, "after rebuild_index", &[]).await;
    let before = files_under(&root.join("index"));
    assert_eq!(store.rebuild_index().await.unwrap(), 3, "idempotent");
    assert_eq!(files_under(&root.join("index")), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_index_lines_are_not_served_and_rebuild_index_removes_them() {
    let (dir, store) = temp_store().await;
    let root = root(&dir);
    let a = addr("stale@example.net");
    let r = publish(&store, real_key(&a, "alice", 1, false)).await;
    let hash = address_hash(&store, &a);
    // What a crash between the index write and the history write leaves: lines for a key
    // that never became current, under a's hash, and a WKD line of an address never stored.
    let bob = real_key(&a, "bob", 2, false).into_record(2);
    let bob_ids = ids_file(&root, bob.fingerprint.key_id().as_str());
    fs::create_dir_all(bob_ids.parent().unwrap()).unwrap();
    fs::write(&bob_ids, format!("{} {hash}\n", bob.fingerprint)).unwrap();
    let ghost = addr("ghost@example.net");
    let ghost_hash = address_hash(&store, &ghost);
    let wkd_files = files_under(&root.join("index/wkd"));
    assert_eq!(wkd_files.len(), 1);
    let mut wkd = lines(&wkd_files[0]);
    wkd.insert(0, ghost_hash.clone());
    fs::write(&wkd_files[0], wkd.join("\n") + "\n").unwrap();
    // A line naming a, for a's own key ID but another fingerprint (a forged entry).
    let alice_ids = ids_file(&root, r.fingerprint.key_id().as_str());
    let mut alice_lines = lines(&alice_ids);
    alice_lines.push(format!("{} {ghost_hash}", r.fingerprint));
    fs::write(&alice_ids, alice_lines.join("\n") + "\n").unwrap();

    assert!(
        store
            .find_by_fingerprint(&bob.fingerprint, 10)
            .await
            .unwrap()
            .is_empty(),
        "a stale line is served"
    );
    assert!(
        store
            .find_by_key_id(&bob.fingerprint.key_id(), 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        store.find_by_fingerprint(&r.fingerprint, 10).await.unwrap(),
        vec![r.clone()]
    );
    assert_eq!(
        store
            .find_by_wkd_hash("example.net", &WkdHash::of_address(&a))
            .await
            .unwrap(),
        Some(r.clone())
    );

    assert_eq!(store.rebuild_index().await.unwrap(), 1);
    assert!(!bob_ids.exists(), "rebuild_index leaves a stale file");
    assert_eq!(lines(&wkd_files[0]), vec![hash.clone()]);
    assert_eq!(lines(&alice_ids), vec![format!("{} {hash}", r.fingerprint)]);
    assert_index_matches_records("after sweep", &store, "after rebuild_index", &[bob]).await;
}
