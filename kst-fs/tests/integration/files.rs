//! What the store does on disk: hashed names inside the root, corrupt files, stray files,
//! read-only directories, permissions.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kst_core::conformance::test_key;
use kst_core::{Error, KeyStore, PublishOutcome};
use kst_fs::FsStore;
use sha2::{Digest, Sha256};

use crate::support::{addr, assert_corrupt, assert_unavailable, root, temp_store};

/// Every file and directory below `dir`, relative to it.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                todo.push(p.clone());
            }
            out.push(p.strip_prefix(dir).unwrap().to_path_buf());
        }
    }
    out.sort();
    out
}

/// An uppercase hex fingerprint (v4: 40 digits, v6: 64): a tombstone's file name.
fn is_fingerprint(s: &str) -> bool {
    (s.len() == 40 || s.len() == 64)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tokio::test]
async fn hostile_addresses_map_to_hashed_names_inside_the_root() {
    let (dir, store) = temp_store().await;
    let hostile = [
        "/etc/passwd@example.net",
        "a/.ssh@example.net",
        "x/.y/z@example.net",
        "~root@example.net",
        "%2e%2e%2fetc@example.net",
        "con@example.net",
        "*@example.net",
        "jörg@bücher.example",
    ];
    for (i, s) in hostile.iter().enumerate() {
        let a = addr(s);
        let r = store.publish(test_key(&a, 1, i as u64)).await.unwrap();
        assert!(matches!(r, PublishOutcome::Published(_)), "{s}: {r:?}");
        assert_eq!(store.get(&a).await.unwrap().as_ref(), Some(r.record()));

        let hash = hex::encode(Sha256::digest(a.as_str().as_bytes()));
        let expected = root(&dir)
            .join("keys")
            .join(&hash[..2])
            .join(format!("{hash}.json"));
        assert_eq!(store.history_path(&a), expected, "{s}");
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(&expected).unwrap()).unwrap();
        assert_eq!(json["address"], a.as_str(), "{s}");
    }

    // Nothing outside <tmp>/store, and inside only the expected names.
    assert_eq!(walk(dir.path()).first(), Some(&PathBuf::from("store")));
    for p in walk(&root(&dir)) {
        let parts: Vec<&str> = p.iter().map(|c| c.to_str().unwrap()).collect();
        let ok = match parts.as_slice() {
            ["keys"] | ["locks"] | ["tombstones"] => true,
            ["tombstones", fpr] => is_fingerprint(fpr),
            ["locks", file] if file.starts_with("tombstone-") => file
                .strip_prefix("tombstone-")
                .and_then(|f| f.strip_suffix(".lock"))
                .is_some_and(|s| s.len() == 2 && is_fingerprint(&format!("{s:0<40}"))),
            ["keys", shard] => is_hex(shard, 2),
            ["keys", shard, file] => file
                .strip_suffix(".json")
                .is_some_and(|h| is_hex(h, 64) && h.starts_with(shard)),
            ["locks", file] => file
                .strip_suffix(".lock")
                .map(|s| {
                    s.strip_prefix("ids-")
                        .or(s.strip_prefix("wkd-"))
                        .unwrap_or(s)
                })
                .is_some_and(|s| is_hex(s, 2)),
            ["index"] | ["index", "ids"] | ["index", "wkd"] | ["index", "ready"] => true,
            ["index", "ids", shard] | ["index", "wkd", shard] => is_hex(shard, 2),
            // Key IDs are uppercase hex, in the shard of their first two digits.
            ["index", "ids", shard, id] => {
                is_fingerprint(&format!("{id:0<40}"))
                    && id.len() == 16
                    && id.to_ascii_lowercase().starts_with(shard)
            }
            ["index", "wkd", shard, file] => is_hex(file, 64) && file.starts_with(shard),
            _ => false,
        };
        assert!(ok, "unexpected path in the store: {}", p.display());
    }
    assert_eq!(
        store.list(None, 100).await.unwrap().len(),
        hostile.len(),
        "every hostile address is listed"
    );
}

#[tokio::test]
async fn corrupt_files_give_corrupt_errors() {
    let (_dir, store) = temp_store().await;
    let alice = addr("alice@example.net");
    let bob = addr("bob@example.net");
    store.publish(test_key(&alice, 1, 1)).await.unwrap();
    store.publish(test_key(&alice, 1, 2)).await.unwrap();
    store.publish(test_key(&bob, 1, 1)).await.unwrap();
    let path = store.history_path(&alice);
    let good = fs::read(&path).unwrap();
    let bob_file = fs::read(store.history_path(&bob)).unwrap();

    let mut reordered: serde_json::Value = serde_json::from_slice(&good).unwrap();
    reordered["history"].as_array_mut().unwrap().reverse();
    let mut emptied: serde_json::Value = serde_json::from_slice(&good).unwrap();
    emptied["history"] = serde_json::json!([]);
    let mut bad_key: serde_json::Value = serde_json::from_slice(&good).unwrap();
    bad_key["history"][0]["key"] = "not base64!".into();
    let mut bad_address: serde_json::Value = serde_json::from_slice(&good).unwrap();
    bad_address["address"] = "alice@example.net\r\nBcc: x@evil.example".into();

    // (why, bytes, whether `list` notices too: it reads only the address of each file)
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        ("garbage", b"\x00\xffnot json at all".to_vec(), true),
        ("truncated", good[..good.len() / 2].to_vec(), true),
        ("empty file", Vec::new(), true),
        ("another address' history", bob_file, true),
        (
            "a header in the address",
            serde_json::to_vec(&bad_address).unwrap(),
            true,
        ),
        (
            "versions out of order",
            serde_json::to_vec(&reordered).unwrap(),
            false,
        ),
        (
            "an empty history",
            serde_json::to_vec(&emptied).unwrap(),
            false,
        ),
        (
            "a key that is not base64",
            serde_json::to_vec(&bad_key).unwrap(),
            false,
        ),
    ];
    for (why, bytes, list_notices) in cases {
        fs::write(&path, &bytes).unwrap();
        assert_corrupt(why, store.get(&alice).await);
        assert_corrupt(why, store.history(&alice).await);
        assert_corrupt(why, store.publish(test_key(&alice, 1, 3)).await);
        assert_eq!(
            fs::read(&path).unwrap(),
            bytes,
            "{why}: publish overwrote it"
        );
        if list_notices {
            assert_corrupt(why, store.list(None, 10).await);
        } else {
            assert_eq!(
                store.list(None, 10).await.unwrap(),
                vec![alice.clone(), bob.clone()],
                "{why}"
            );
        }
        // Other addresses are unaffected.
        assert!(store.get(&bob).await.unwrap().is_some(), "{why}");
    }

    // restore repairs the file, delete removes it.
    let repaired = vec![test_key(&alice, 1, 7).into_record(1)];
    store.restore(&repaired).await.unwrap();
    assert_eq!(store.history(&alice).await.unwrap(), repaired);
    fs::write(&path, b"{").unwrap();
    assert!(store.delete(&alice).await.unwrap());
    assert_eq!(store.get(&alice).await.unwrap(), None);
    assert_eq!(store.list(None, 10).await.unwrap(), vec![bob]);
}

#[tokio::test]
async fn stray_and_leftover_files_are_ignored() {
    let (dir, store) = temp_store().await;
    let alice = addr("alice@example.net");
    store.publish(test_key(&alice, 1, 1)).await.unwrap();
    let path = store.history_path(&alice);
    let shard = path.parent().unwrap();
    // A write that crashed before its rename, and files that are not the store's.
    fs::write(path.with_extension("tmp"), b"half a wri").unwrap();
    fs::write(shard.join("README"), b"hello").unwrap();
    fs::write(shard.join("ABCDEF.json"), b"{").unwrap();
    fs::create_dir(root(&dir).join("keys").join("not-a-shard")).unwrap();
    fs::write(
        root(&dir).join("keys").join("not-a-shard").join("x.json"),
        b"{",
    )
    .unwrap();

    assert_eq!(store.list(None, 10).await.unwrap(), vec![alice.clone()]);
    let r = store.publish(test_key(&alice, 1, 2)).await.unwrap();
    assert_eq!(r.record().version, 2);
    assert_eq!(store.history(&alice).await.unwrap().len(), 2);
    assert!(
        !path.with_extension("tmp").exists(),
        "the leftover temporary file was renamed into place"
    );
    store.check().await.unwrap();
}

/// Makes every directory below (and including) a root read-only for this process, also when it
/// runs as root (which ignores permission bits): then with `chattr +i`. Undone on drop.
struct ReadOnly {
    dirs: Vec<PathBuf>,
    immutable: bool,
}

impl ReadOnly {
    fn make(root: &Path) -> ReadOnly {
        let mut dirs = vec![root.to_path_buf()];
        dirs.extend(
            walk(root)
                .into_iter()
                .map(|p| root.join(p))
                .filter(|p| p.is_dir()),
        );
        for d in &dirs {
            fs::set_permissions(d, fs::Permissions::from_mode(0o500)).unwrap();
        }
        let mut guard = ReadOnly {
            dirs,
            immutable: false,
        };
        if can_create_in(root) {
            // Running with CAP_DAC_OVERRIDE (root): permission bits do not stop us.
            let out = Command::new("chattr")
                .arg("+i")
                .args(&guard.dirs)
                .output()
                .expect("running as root: making a directory read-only needs `chattr` (e2fsprogs)");
            guard.immutable = true;
            assert!(
                out.status.success(),
                "running as root: `chattr +i` failed (needs CAP_LINUX_IMMUTABLE and ext4/xfs/btrfs): {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                !can_create_in(root),
                "the directory is still writable after chmod 0500 and chattr +i"
            );
        }
        guard
    }
}

fn can_create_in(dir: &Path) -> bool {
    let probe = dir.join("write-probe");
    let ok = fs::write(&probe, b"x").is_ok();
    let _ = fs::remove_file(&probe);
    ok
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        if self.immutable {
            let _ = Command::new("chattr").arg("-i").args(&self.dirs).status();
        }
        for d in &self.dirs {
            let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o700));
        }
    }
}

#[tokio::test]
async fn a_read_only_directory_gives_temporary_errors_and_still_serves_reads() {
    let (dir, store) = temp_store().await;
    let alice = addr("alice@example.net");
    let first = store.publish(test_key(&alice, 1, 1)).await.unwrap();
    let first = first.record().clone();

    let guard = ReadOnly::make(&root(&dir));
    assert_eq!(store.get(&alice).await.unwrap().as_ref(), Some(&first));
    assert_eq!(store.list(None, 10).await.unwrap(), vec![alice.clone()]);
    assert_unavailable("check", store.check().await);
    assert_unavailable("publish", store.publish(test_key(&alice, 1, 2)).await);
    let carol = addr("carol@example.net");
    assert_unavailable(
        "publish to a new shard",
        store.publish(test_key(&carol, 1, 1)).await,
    );
    assert_unavailable("delete", store.delete(&alice).await);
    assert_unavailable(
        "restore",
        store
            .restore(&[test_key(&alice, 1, 9).into_record(1)])
            .await,
    );
    // An existing store can be opened read-only.
    let reader = FsStore::open(root(&dir)).await.unwrap();
    assert_eq!(reader.history(&alice).await.unwrap(), vec![first.clone()]);
    assert_eq!(store.history(&alice).await.unwrap(), vec![first.clone()]);

    // Writable again: the same store recovers without being reopened.
    drop(guard);
    store.check().await.unwrap();
    let r = store.publish(test_key(&alice, 1, 2)).await.unwrap();
    assert_eq!(r.record().version, 2);
}

#[tokio::test]
async fn open_creates_private_directories_and_refuses_a_file() {
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("a").join("b");
    let store = FsStore::open(&path).await.unwrap();
    assert_eq!(store.root(), path);
    for d in [
        path.clone(),
        path.join("keys"),
        path.join("locks"),
        dir.path().join("a"),
    ] {
        let mode = fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", d.display());
    }
    let alice = addr("alice@example.net");
    store.publish(test_key(&alice, 1, 1)).await.unwrap();
    let file_mode = fs::metadata(store.history_path(&alice))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(file_mode & 0o777, 0o600);

    let file = dir.path().join("plain-file");
    fs::write(&file, b"x").unwrap();
    match FsStore::open(&file).await {
        Err(Error::Config(m)) => assert!(m.contains("not a directory"), "{m}"),
        other => panic!("open on a file: expected Error::Config, got {other:?}"),
    }
}

#[tokio::test]
async fn check_fails_temporarily_when_the_directory_is_gone() {
    let (dir, store) = temp_store().await;
    store.check().await.unwrap();
    fs::remove_dir_all(root(&dir)).unwrap();
    assert_unavailable("check", store.check().await);
    assert_unavailable(
        "publish",
        store
            .publish(test_key(&addr("alice@example.net"), 1, 1))
            .await,
    );
    // A vanished store (say, an unmounted volume) must not look empty: "no key" would be a
    // permanent answer to a temporary fault.
    let alice = addr("alice@example.net");
    assert_unavailable("get", store.get(&alice).await);
    assert_unavailable("history", store.history(&alice).await);
    assert_unavailable("list", store.list(None, 10).await);
    assert_unavailable("delete", store.delete(&alice).await);
}
