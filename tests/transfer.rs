//! `kst export` / `kst import` through the real binary: keys published with `kst deliver` on the
//! filesystem store travel fs → PostgreSQL → Redis → fs, and every export on the way is the same
//! bytes; `kst keys get/history` print the same on every backend.

use kst_core::AddressPolicy;
use kst_core::client::{self, Verified};
use kst_tests::{Gpg, TestDb, TestKst, TestPrefix, code, received_authenticated, stderr};

fn addr(s: &str) -> kst_core::Address {
    AddressPolicy::default().normalize(s).unwrap()
}

/// Publishes `armored` for `account` through `kst deliver` and checks the confirmation;
/// returns the message as delivered (to deliver it again).
fn publish(kst: &TestKst, account: &str, armored: &str) -> Vec<u8> {
    let req = client::build_publication(&addr(account), armored).unwrap();
    let mut raw = received_authenticated(account, "mail.example.net").into_bytes();
    raw.extend_from_slice(&req.message);
    let out = deliver(kst, account, &raw);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    match client::verify_reply(&req.pending, &kst.last_reply()).unwrap() {
        Verified::Published { .. } => {}
        other => panic!("publication of {account} not confirmed: {other:?}"),
    }
    raw
}

/// `kst deliver` of `raw` from `account` to `keys@` its domain.
fn deliver(kst: &TestKst, account: &str, raw: &[u8]) -> std::process::Output {
    let domain = account.split('@').nth(1).unwrap();
    kst.deliver(account, &format!("keys@{domain}"), raw)
}

/// `kst export` to a file in the KST's directory; returns the bytes.
fn export(kst: &TestKst) -> Vec<u8> {
    let file = kst.dir.path().join("export.jsonl");
    let out = kst.kst(&["export", "--output", file.to_str().unwrap()], b"");
    assert_eq!(code(&out), 0, "export: {}", stderr(&out));
    std::fs::read(&file).unwrap()
}

/// `kst import -` with `data` on stdin.
fn import(kst: &TestKst, data: &[u8]) -> std::process::Output {
    kst.kst(&["import", "-"], data)
}

/// What the operator sees of `addresses`: `keys get`, `keys get --json`, `keys history` and
/// `keys history --json`, each with its exit code.
fn views(kst: &TestKst, addresses: &[&str]) -> Vec<(i32, String)> {
    let mut all = Vec::new();
    for a in addresses {
        for args in [
            &["keys", "get", a][..],
            &["keys", "get", a, "--json"],
            &["keys", "history", a],
            &["keys", "history", a, "--json"],
        ] {
            let out = kst.kst(args, b"");
            all.push((
                code(&out),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            ));
        }
    }
    all
}

const ADDRESSES: [&str; 4] = [
    "alice@example.net",
    "bob@example.net",
    "carol@example.org",
    "nobody@example.net",
];

#[test]
fn export_import_round_trip_fs_postgres_redis_fs() {
    let gpg = Gpg::new();
    let alice1 = gpg.generate("Alice", "alice@example.net", "ed25519");
    // Another primary key for the same address: its own keyring (`generate` picks the first
    // key of the address, so in the same keyring it would add a subkey to alice1, and the KST
    // merges a publication of the same primary key instead of adding a version).
    let gpg2 = Gpg::new();
    let alice2 = gpg2.generate("Alice New", "alice@example.net", "ed25519");
    let bob = gpg.generate("Bob", "bob@example.net", "ed25519");
    let carol = gpg.generate("Carol", "carol@example.org", "ed25519");

    let fs = TestKst::new("");
    publish(&fs, "alice@example.net", &alice1.public_armored);
    publish(&fs, "alice@example.net", &alice2.public_armored);
    publish(&fs, "alice@example.net", &alice1.public_armored); // back to the first: v3
    publish(&fs, "bob@example.net", &bob.public_armored);
    publish(&fs, "carol@example.org", &carol.public_armored);
    publish(&fs, "carol@example.org", &carol.public_armored); // same key again: no version
    let first = export(&fs);
    // Nothing was deleted: the lines are those of before deleted ids travelled.
    assert!(
        !String::from_utf8_lossy(&first).contains("\"deleted\""),
        "an export without deletions carries no deleted ids"
    );
    let lines: Vec<serde_json::Value> = first
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let shape: Vec<(String, usize)> = lines
        .iter()
        .map(|l| {
            (
                l["address"].as_str().unwrap().to_string(),
                l["history"].as_array().unwrap().len(),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("alice@example.net".to_string(), 3),
            ("bob@example.net".to_string(), 1),
            ("carol@example.org".to_string(), 1)
        ]
    );
    let expected = views(&fs, &ADDRESSES);
    assert_eq!(expected[0].0, 0);
    assert!(expected[0].1.contains("BEGIN PGP PUBLIC KEY BLOCK"));
    assert!(expected[3].1.contains(&alice2.fingerprint));
    assert_eq!(expected.last().unwrap().0, 1, "nobody has no history");

    // fs → PostgreSQL.
    let db = TestDb::new();
    let pg = TestKst::with_store("", &db.store());
    let out = import(&pg, &first);
    assert_eq!(code(&out), 0, "import into PostgreSQL: {}", stderr(&out));
    assert!(
        stderr(&out).contains("3 address(es), 5 version(s)"),
        "{}",
        stderr(&out)
    );
    assert_eq!(export(&pg), first, "PostgreSQL export differs");
    assert_eq!(
        views(&pg, &ADDRESSES),
        expected,
        "PostgreSQL shows other keys"
    );
    // Importing the same file again changes nothing.
    let out = import(&pg, &first);
    assert_eq!(code(&out), 0, "second import: {}", stderr(&out));
    assert_eq!(export(&pg), first, "a second import changed PostgreSQL");

    // PostgreSQL → Redis.
    let prefix = TestPrefix::new();
    let redis = TestKst::with_store("", &prefix.store());
    let out = import(&redis, &export(&pg));
    assert_eq!(code(&out), 0, "import into Redis: {}", stderr(&out));
    assert_eq!(export(&redis), first, "Redis export differs");
    assert_eq!(
        views(&redis, &ADDRESSES),
        expected,
        "Redis shows other keys"
    );
    let out = import(&redis, &first);
    assert_eq!(code(&out), 0, "second import: {}", stderr(&out));
    assert_eq!(export(&redis), first, "a second import changed Redis");

    // Redis → a fresh filesystem store.
    let fs2 = TestKst::new("");
    let out = import(&fs2, &export(&redis));
    assert_eq!(code(&out), 0, "import into fs: {}", stderr(&out));
    assert_eq!(
        export(&fs2),
        first,
        "fs export after the round trip differs"
    );
    assert_eq!(views(&fs2, &ADDRESSES), expected);

    // A publication after the import continues the imported history on every backend.
    for kst in [&fs2, &pg, &redis] {
        let _ = publish(kst, "alice@example.net", &alice2.public_armored);
        let out = kst.kst(&["keys", "history", "alice@example.net", "--json"], b"");
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let versions: Vec<u64> = h
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["version"].as_u64().unwrap())
            .collect();
        assert_eq!(versions, [1, 2, 3, 4]);
    }

    for kst in [&fs2, &pg, &redis] {
        keys_exit_codes(kst);
    }
    drop(redis);
    drop(prefix);
    drop(pg);
    drop(db);
}

/// Deletion wins over a redelivery after a move between backends: the publication ids of
/// deleted histories travel with `kst export` / `kst import` fs → PostgreSQL → Redis → fs.
/// Alice publishes two keys and deletes; Dave publishes, deletes and publishes another key;
/// Bob keeps his. After each import the export is the same bytes, and Alice's and Dave's
/// first publication messages, delivered again, publish nothing (without the ids in the
/// export the new store published Alice's old key again).
#[test]
fn deleted_publications_travel_fs_postgres_redis_fs() {
    let gpg = Gpg::new();
    let alice1 = gpg.generate("Alice", "alice@example.net", "ed25519");
    let gpg2 = Gpg::new();
    let alice2 = gpg2.generate("Alice New", "alice@example.net", "ed25519");
    let bob = gpg.generate("Bob", "bob@example.net", "ed25519");
    let dave1 = gpg.generate("Dave", "dave@example.org", "ed25519");
    let dave2 = gpg2.generate("Dave New", "dave@example.org", "ed25519");

    let fs = TestKst::new("");
    let alice_first = publish(&fs, "alice@example.net", &alice1.public_armored);
    let alice_second = publish(&fs, "alice@example.net", &alice2.public_armored);
    let _ = publish(&fs, "bob@example.net", &bob.public_armored);
    let dave_first = publish(&fs, "dave@example.org", &dave1.public_armored);
    let run = |kst: &TestKst, args: &[&str]| code(&kst.kst(args, b""));
    assert_eq!(run(&fs, &["keys", "delete", "alice@example.net"]), 0);
    assert_eq!(run(&fs, &["keys", "delete", "dave@example.org"]), 0);
    let _ = publish(&fs, "dave@example.org", &dave2.public_armored);

    // The redeliveries `kst` must ignore on every store; what stays.
    let redeliveries = [
        ("alice@example.net", &alice_first),
        ("alice@example.net", &alice_second),
        ("dave@example.org", &dave_first),
    ];
    let check = |kst: &TestKst, store: &str| {
        for (account, raw) in redeliveries {
            let out = deliver(kst, account, raw);
            assert_eq!(code(&out), 0, "{store}: {}", stderr(&out));
        }
        assert_eq!(
            run(kst, &["keys", "get", "alice@example.net"]),
            1,
            "{store}: a redelivery published Alice's deleted key again"
        );
        let out = kst.kst(&["keys", "history", "dave@example.org", "--json"], b"");
        assert_eq!(code(&out), 0, "{store}: {}", stderr(&out));
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let h = h.as_array().unwrap();
        assert_eq!(
            h.len(),
            1,
            "{store}: Dave's history is his second key only: {h:?}"
        );
        assert!(
            h[0]["fingerprint"]
                .as_str()
                .unwrap()
                .eq_ignore_ascii_case(&dave2.fingerprint),
            "{store}: {h:?}"
        );
        assert_eq!(run(kst, &["keys", "get", "bob@example.net"]), 0, "{store}");
    };
    check(&fs, "fs");

    let first = export(&fs);
    let lines: Vec<serde_json::Value> = first
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).unwrap())
        .collect();
    let shape: Vec<(&str, usize, usize)> = lines
        .iter()
        .map(|l| {
            (
                l["address"].as_str().unwrap(),
                l["history"].as_array().unwrap().len(),
                l.get("deleted").map_or(0, |d| d.as_array().unwrap().len()),
            )
        })
        .collect();
    assert_eq!(
        shape,
        [
            ("alice@example.net", 0, 2),
            ("bob@example.net", 1, 0),
            ("dave@example.org", 1, 1)
        ]
    );

    // fs → PostgreSQL → Redis → a fresh fs store, each time importing the export of the last.
    let db = TestDb::new();
    let pg = TestKst::with_store("", &db.store());
    let prefix = TestPrefix::new();
    let redis = TestKst::with_store("", &prefix.store());
    let fs2 = TestKst::new("");
    let mut previous = first.clone();
    for (kst, store) in [(&pg, "PostgreSQL"), (&redis, "Redis"), (&fs2, "fs")] {
        let out = import(kst, &previous);
        assert_eq!(code(&out), 0, "import into {store}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("2 address(es), 2 version(s), 3 deleted publication id(s)"),
            "{store}: {}",
            stderr(&out)
        );
        previous = export(kst);
        assert_eq!(previous, first, "{store}: the export differs");
        check(kst, store);
        // Importing again adds nothing.
        let out = import(kst, &first);
        assert_eq!(
            code(&out),
            0,
            "second import into {store}: {}",
            stderr(&out)
        );
        assert_eq!(
            export(kst),
            first,
            "{store}: a second import changed the store"
        );
    }
    drop(redis);
    drop(prefix);
    drop(pg);
    drop(db);
}

/// `kst keys get/history/delete` exit codes on a populated store.
fn keys_exit_codes(kst: &TestKst) {
    let run = |args: &[&str]| code(&kst.kst(args, b""));
    assert_eq!(run(&["keys", "get", "bob@example.net"]), 0);
    assert_eq!(
        run(&["keys", "get", "BOB@Example.NET"]),
        0,
        "folded like requests"
    );
    assert_eq!(run(&["keys", "history", "bob@example.net"]), 0);
    assert_eq!(run(&["keys", "get", "nobody@example.net"]), 1);
    assert_eq!(run(&["keys", "history", "nobody@example.net"]), 1);
    assert_eq!(run(&["keys", "delete", "nobody@example.net"]), 1);
    assert_eq!(run(&["keys", "get", "not an address"]), 64);
    assert_eq!(run(&["keys", "delete", "bob@example.net"]), 0);
    assert_eq!(run(&["keys", "get", "bob@example.net"]), 1);
    assert_eq!(run(&["keys", "history", "bob@example.net"]), 1);
    assert_eq!(run(&["keys", "delete", "bob@example.net"]), 1);
    // Others are untouched.
    assert_eq!(run(&["keys", "get", "alice@example.net"]), 0);
    assert_eq!(run(&["keys", "get", "carol@example.org"]), 0);
}

#[test]
fn bad_import_lines_are_named_and_fail() {
    let key = include_str!("../kst-core/testdata/alice.pub.asc");
    let fs = TestKst::new("");
    publish(&fs, "alice@example.net", key);
    let good = String::from_utf8(export(&fs)).unwrap();
    let good = good.trim_end();
    let mut other_address: serde_json::Value = serde_json::from_str(good).unwrap();
    other_address["history"][0]["address"] = "mallory@example.net".into();
    let mut version_zero: serde_json::Value = serde_json::from_str(good).unwrap();
    version_zero["history"][0]["version"] = 0.into();
    let mut twice: serde_json::Value = serde_json::from_str(good).unwrap();
    let record = twice["history"][0].clone();
    let mut again = record.clone();
    again["version"] = 2.into();
    twice["history"] = serde_json::json!([record, again]);
    let cases = [
        ("not JSON", "{\"address\": \"alice@exa".to_string()),
        ("unknown field", good.replacen('{', "{\"extra\":1,", 1)),
        ("record of another address", other_address.to_string()),
        ("version 0", version_zero.to_string()),
        (
            "empty history",
            "{\"address\":\"bob@example.net\",\"history\":[]}".into(),
        ),
        ("one publication twice", twice.to_string()),
        (
            "a deleted id that is no publication id",
            "{\"address\":\"bob@example.net\",\"history\":[],\"deleted\":[\"a b\"]}".into(),
        ),
        (
            "deleted not a list",
            "{\"address\":\"bob@example.net\",\"deleted\":\"aa\"}".into(),
        ),
    ];
    for (what, bad) in cases {
        let target = TestKst::new("");
        // Line 1 is good, line 2 empty (skipped), line 3 bad, line 4 never read.
        let input = format!("{good}\n\n{bad}\n{good}\n");
        let out = import(&target, input.as_bytes());
        assert_eq!(code(&out), 64, "{what}: {}", stderr(&out));
        assert!(stderr(&out).contains("line 3"), "{what}: {}", stderr(&out));
        // What came before the bad line is imported.
        assert_eq!(
            code(&target.kst(&["keys", "get", "alice@example.net"], b"")),
            0,
            "{what}"
        );
    }
    // A missing file is EX_NOINPUT.
    let out = fs.kst(&["import", "/nonexistent/keys.jsonl"], b"");
    assert_eq!(code(&out), 66, "{}", stderr(&out));
}

/// The characters of `bytes` (as text) that must not reach a terminal, line breaks apart.
fn terminal_unsafe(bytes: &[u8]) -> String {
    kst_bin::terminal::escapes(&String::from_utf8_lossy(bytes))
        .filter(|&(c, escaped)| c != '\n' && escaped)
        .map(|(c, _)| c)
        .collect()
}

/// What the key holder writes reaches the operator's terminal only escaped. A User ID made by
/// real gpg with an OSC sequence (window title), BEL, a screen-clearing CSI, CR, a C1 CSI, DEL,
/// a BiDi override, an isolate and invisible characters (a zero width space, a soft hyphen, a
/// byte order mark, a tag character, a variation selector: red-team round 5) and a letter
/// with a stack of 24 combining marks (red-team round 6) is published through `kst deliver`;
/// an address with a BiDi override (an internationalized local part) is brought in by `kst
/// import`. `kst keys history`, `keys get --json`, `keys delete` and `kst export` to stdout
/// print no control or BiDi character (line breaks apart) and no more than two marks in a
/// row, the text listings show the escapes, and the JSON outputs still read back as the
/// stored text.
#[test]
fn keys_output_is_terminal_safe() {
    let marks: String = (0..24)
        .map(|i| char::from_u32(0x0300 + i).unwrap())
        .collect();
    let name = format!(
        "Mallory \u{1b}]0;pwned\u{7}\u{1b}[2J\r\u{9b}31m\u{7f}\u{202e}evil\u{2066}\
         al\u{200b}i\u{ad}c\u{feff}e\u{e0041}\u{fe0f} Z{marks}"
    );
    let uid = format!("{name} <mallory@example.net>");
    let stacked: String = (2..24)
        .map(|i| format!("\\u{{{:04X}}}", 0x0300 + i))
        .collect();
    let shown = format!(
        "Mallory \\x1B]0;pwned\\x07\\x1B[2J\\x0D\\x9B31m\\x7F\\u{{202E}}evil\\u{{2066}}\
         al\\u{{200B}}i\\xADc\\u{{FEFF}}e\\u{{E0041}}\\u{{FE0F}} Z\u{0300}\u{0301}{stacked} \
         <mallory@example.net>"
    );
    let gpg = Gpg::new();
    let armored = gpg.generate_primary(&uid, "never", None);
    let kst = TestKst::new("unicode_local_parts = true");
    publish(&kst, "mallory@example.net", &armored);

    // The same record under an address with a BiDi override, as `kst import` restores it.
    let bidi = "ma\u{202e}llory@example.net";
    let line = String::from_utf8(export(&kst)).unwrap();
    let mut moved: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
    moved["address"] = bidi.into();
    moved["history"][0]["address"] = bidi.into();
    let out = import(&kst, format!("{moved}\n").as_bytes());
    assert_eq!(code(&out), 0, "{}", stderr(&out));

    let out = kst.kst(&["keys", "history", "mallory@example.net"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(terminal_unsafe(&out.stdout), "", "keys history");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("uid {shown}\n")), "{text}");

    let out = kst.kst(&["keys", "get", "mallory@example.net", "--json"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(terminal_unsafe(&out.stdout), "", "keys get --json");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        meta["user_ids"],
        serde_json::json!([uid]),
        "the stored text"
    );

    let out = kst.kst(&["keys", "history", bidi, "--json"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(terminal_unsafe(&out.stdout), "", "keys history --json");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(meta[0]["address"], bidi);

    let out = kst.kst(&["export"], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(terminal_unsafe(&out.stdout), "", "export to stdout");
    let addresses: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["address"].to_string())
        .collect();
    assert!(addresses.contains(&format!("\"{bidi}\"")), "{addresses:?}");

    let out = kst.kst(&["keys", "delete", bidi], b"");
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    assert_eq!(terminal_unsafe(&out.stdout), "", "keys delete");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("deleted ma\\u{202E}llory@example.net: 1 version(s)"),
        "{text}"
    );
    assert!(text.contains(&format!("uid {shown}\n")), "{text}");
    let out = kst.kst(&["keys", "get", bidi], b"");
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    assert_eq!(terminal_unsafe(&out.stderr), "", "the not-found message");
}

/// The opens of files in some directories, as the kernel reports them (inotify `IN_OPEN`),
/// by file name, counted on a thread of their own while the watched work runs.
struct OpenCounter {
    /// A watched directory: the stop file is opened there.
    first: std::path::PathBuf,
    reader: std::thread::JoinHandle<Result<std::collections::HashMap<String, usize>, String>>,
}

/// The file whose opening ends the count.
const STOP_COUNTING: &str = "stop-counting";

impl OpenCounter {
    /// Starts counting the opens of files in `dirs` (at least one).
    fn watch(dirs: &[std::path::PathBuf]) -> OpenCounter {
        use rustix::fs::inotify;
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC).expect("inotify");
        for d in dirs {
            inotify::add_watch(&fd, d, inotify::WatchFlags::OPEN).expect("inotify watch");
        }
        let reader = std::thread::spawn(move || {
            let mut counts = std::collections::HashMap::new();
            let mut buf = vec![std::mem::MaybeUninit::uninit(); 1 << 16];
            let mut events = inotify::Reader::new(&fd, &mut buf);
            loop {
                let event = match events.next() {
                    Ok(e) => e,
                    Err(rustix::io::Errno::INTR) => continue,
                    Err(e) => return Err(format!("inotify read: {e}")),
                };
                if event.events().contains(inotify::ReadFlags::QUEUE_OVERFLOW) {
                    return Err("the inotify queue overflowed: opens were lost".into());
                }
                let Some(name) = event.file_name() else {
                    continue; // the directory itself (a readdir)
                };
                let name = name.to_string_lossy().into_owned();
                if name == STOP_COUNTING {
                    return Ok(counts);
                }
                *counts.entry(name).or_default() += 1;
            }
        });
        OpenCounter {
            first: dirs[0].clone(),
            reader,
        }
    }

    /// Stops counting; the opens by file name.
    fn finish(self) -> std::collections::HashMap<String, usize> {
        let stop = self.first.join(STOP_COUNTING);
        std::fs::File::create(&stop).expect("stop file");
        let counts = self.reader.join().expect("counter thread").unwrap();
        std::fs::remove_file(stop).expect("remove the stop file");
        counts
    }
}

/// `kst export` of an fs store of 2,000 addresses opens each history file at most twice (the
/// walk of the store reads its head, the export its history), counted by the kernel while
/// the real binary runs. Paging through `KeyStore::list` in address order, as export did,
/// read every history file once per page of 500 (each file opened 5 times here, and the
/// whole export quadratic in the store's size).
#[test]
fn export_of_an_fs_store_opens_each_history_file_a_bounded_number_of_times() {
    const N: usize = 2000;
    let kst = TestKst::new("");
    let root = kst.dir.path().join("keys");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        use kst_core::KeyStore;
        let store = kst_fs::FsStore::open(&root).await.unwrap();
        let mut writes = tokio::task::JoinSet::new();
        for i in 0..N {
            let store = store.clone();
            writes.spawn(async move {
                let record = kst_core::NewKey {
                    address: addr(&format!("walker{i}@example.net")),
                    key: vec![0x99; 512],
                    fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
                    publication_id: format!("{i:064x}"),
                    published_at: 1_700_000_000,
                    revoked: false,
                    expected: kst_core::Expected::Any,
                }
                .into_record(1);
                store.restore(&[record]).await.unwrap();
            });
        }
        while let Some(done) = writes.join_next().await {
            done.unwrap();
        }
    });
    let mut shards: Vec<std::path::PathBuf> = std::fs::read_dir(root.join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    shards.sort();
    assert_eq!(shards.len(), 256, "2,000 addresses fill every shard");

    let counter = OpenCounter::watch(&shards);
    let exported = export(&kst);
    let opens = counter.finish();

    assert_eq!(
        exported
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .count(),
        N
    );
    let histories: Vec<(&String, &usize)> = opens
        .iter()
        .filter(|(name, _)| name.ends_with(".json"))
        .collect();
    assert_eq!(histories.len(), N, "every history file is read");
    let most = histories.iter().map(|(_, n)| **n).max().unwrap();
    assert!(
        most <= 2,
        "a history file was opened {most} times; {} of {N} more than twice",
        histories.iter().filter(|(_, n)| **n > 2).count()
    );
}
