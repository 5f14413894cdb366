//! `kst log keygen` (feature `transparency`): the key file is written with mode 0600, parses
//! back to the printed public keys, and is not replaced without --force.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Output};

use kst_core::transparency::LogKeys;

fn kst(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kst"))
        .env_clear()
        .args(args)
        .output()
        .expect("run kst")
}

fn temp_config() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kst.toml");
    std::fs::write(
        &path,
        format!(
            "[kst]\ndomains = [\"example.net\"]\n[store]\nbackend = \"fs\"\npath = \"{}\"\n[mailer]\npath = \"{}\"\n",
            dir.path().join("keys").display(),
            dir.path().join("outbox").display()
        ),
    )
    .unwrap();
    (dir, path)
}

#[test]
fn keygen_writes_a_private_key_file_that_matches_the_printed_keys() {
    let (dir, config) = temp_config();
    let file = dir.path().join("log-example.net.key");
    let (cfg, out) = (config.to_str().unwrap(), file.to_str().unwrap());
    let o = kst(&[
        "--config",
        cfg,
        "log",
        "keygen",
        "example.net",
        "--output",
        out,
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let keys = LogKeys::parse(&std::fs::read_to_string(&file).unwrap()).unwrap();
    assert_eq!(keys.domain, "example.net");
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert!(
        stdout.contains(&format!("head-key {}", hex(&keys.head.public_key()))),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("vrf-key {}", hex(&keys.vrf.public_key().unwrap()))),
        "{stdout}"
    );
    assert!(
        stdout.contains("_kst-log.example.net. IN TXT \"v=kstlog1; head="),
        "{stdout}"
    );

    // Kept without --force, replaced with it.
    let before = std::fs::read(&file).unwrap();
    let o = kst(&[
        "--config",
        cfg,
        "log",
        "keygen",
        "example.net",
        "--output",
        out,
    ]);
    assert_eq!(o.status.code(), Some(73));
    assert_eq!(std::fs::read(&file).unwrap(), before);
    let o = kst(&[
        "--config",
        cfg,
        "log",
        "keygen",
        "example.net",
        "--output",
        out,
        "--force",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert_ne!(std::fs::read(&file).unwrap(), before);

    // A domain kst does not serve is a usage error, and no file is written.
    let other = dir.path().join("other.key");
    let o = kst(&[
        "--config",
        cfg,
        "log",
        "keygen",
        "example.org",
        "--output",
        other.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(64));
    assert!(!other.exists());
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
