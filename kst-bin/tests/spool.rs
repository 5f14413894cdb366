//! The spool mailer: durable `.eml` files with the envelope in front, nothing else left behind.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kst_bin::server::mailer::SpoolMailer;
use kst_core::{AddressPolicy, Mailer, OutgoingMail};

fn mail(from: Option<&str>, to: &str, subject: &str) -> OutgoingMail {
    let p = AddressPolicy::default();
    OutgoingMail {
        envelope_from: from.map(|f| p.normalize(f).unwrap()),
        recipient: p.normalize(to).unwrap(),
        message: format!(
            "From: keys@example.net\r\nTo: {to}\r\nSubject: {subject}\r\n\r\nbody\r\n"
        )
        .into_bytes(),
        message_id: format!("{subject}@example.net"),
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// `<20 digits>-<16 hex>.eml`
fn well_named(p: &Path) -> bool {
    let name = p.file_name().unwrap().to_str().unwrap();
    let Some(stem) = name.strip_suffix(".eml") else {
        return false;
    };
    let Some((nanos, hex)) = stem.split_once('-') else {
        return false;
    };
    nanos.len() == 20
        && nanos.bytes().all(|b| b.is_ascii_digit())
        && hex.len() == 16
        && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test]
async fn each_reply_is_one_complete_eml_file_with_its_envelope() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("spool/outbox");
    let m = SpoolMailer::new(&dir);
    assert_eq!(m.name(), "spool");

    let a = mail(None, "bob@acme.net", "first");
    let b = mail(
        Some("keys-bounces@example.net"),
        "carol@example.org",
        "second",
    );
    m.send(&a).await.unwrap();
    m.send(&b).await.unwrap();

    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "spool directory mode {mode:o}");

    let files = entries(&dir);
    assert_eq!(files.len(), 2, "{files:?}");
    assert!(files.iter().all(|f| well_named(f)), "{files:?}");
    let texts: Vec<String> = files
        .iter()
        .map(|f| String::from_utf8(std::fs::read(f).unwrap()).unwrap())
        .collect();
    let first = texts.iter().find(|t| t.contains("Subject: first")).unwrap();
    let second = texts
        .iter()
        .find(|t| t.contains("Subject: second"))
        .unwrap();
    assert_eq!(
        first.as_bytes(),
        [
            b"Return-Path: <>\r\nX-Kst-Envelope-To: bob@acme.net\r\n".as_slice(),
            &a.message
        ]
        .concat()
    );
    assert!(second.starts_with(
        "Return-Path: <keys-bounces@example.net>\r\nX-Kst-Envelope-To: carol@example.org\r\n"
    ));
    for f in &files {
        let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} mode {mode:o}", f.display());
    }
}

#[tokio::test]
async fn check_creates_the_directory_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("outbox");
    let m = SpoolMailer::new(&dir);
    m.check().await.unwrap();
    assert!(dir.is_dir());
    assert!(entries(&dir).is_empty());
    m.send(&mail(None, "bob@acme.net", "x")).await.unwrap();
    m.check().await.unwrap();
    assert_eq!(
        entries(&dir).len(),
        1,
        "only the reply, no probe or temp file"
    );
}

#[tokio::test]
async fn an_unusable_directory_is_a_temporary_error() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let m = SpoolMailer::new(file.join("outbox"));
    let e = m.send(&mail(None, "bob@acme.net", "x")).await.unwrap_err();
    assert!(e.is_temporary(), "{e}");
    assert!(
        matches!(e, kst_core::Error::Unavailable { ref component, .. } if component == "mailer(spool)")
    );
    assert!(m.check().await.unwrap_err().is_temporary());
}
