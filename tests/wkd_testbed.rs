//! The WKD test bed itself (scripts/wkd-testbed.sh through kst_tests::wkd), before kst serves
//! WKD: names resolve to the test's own address only inside the view, and a TLS server run by
//! `openssl s_server` (not kst, not ours) on that address's port 443 is reached by curl by
//! name with the system trust store.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kst_tests::wkd::{WkdHome, WkdMethod, WkdTestbed};

fn bed() -> Option<&'static WkdTestbed> {
    match WkdTestbed::up() {
        Ok(bed) => Some(bed),
        Err(e) if !kst_tests::is_root() => {
            eprintln!("SKIPPED: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn getent(view: &kst_tests::wkd::WkdView, name: &str) -> String {
    let home = WkdHome::new();
    let out = view.run(home.path(), "getent", &["hosts", name]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_view_points_the_names_at_the_tests_address_and_the_machine_is_untouched() {
    let Some(bed) = bed() else { return };
    let addr = WkdTestbed::free_addr();
    let view = bed.view(addr, WkdMethod::Advanced);
    for name in [
        "example.net",
        "openpgpkey.example.net",
        "acme.net",
        "openpgpkey.acme.net",
    ] {
        let got = getent(&view, name);
        assert!(
            got.starts_with(&format!("{addr} ")),
            "{name} in the view: {got:?}"
        );
    }
    let direct = bed.view(addr, WkdMethod::DirectOnly);
    assert!(getent(&direct, "example.net").starts_with(&format!("{addr} ")));
    assert_eq!(
        getent(&direct, "openpgpkey.example.net"),
        "",
        "direct-only view"
    );
    let outside = Command::new("getent")
        .args(["hosts", "openpgpkey.example.net"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&outside.stdout).contains(&addr.to_string()),
        "the machine's own resolver must not know the test names"
    );
}

#[test]
fn gpg_wks_client_computes_the_wkd_hash_in_the_view() {
    let Some(bed) = bed() else { return };
    let view = bed.view(WkdTestbed::free_addr(), WkdMethod::Advanced);
    let home = WkdHome::new();
    // z-base-32 of SHA-1 of "alice" (the local part lowercased; gpg-wks-client prints the
    // address lowercased too), as scripts/wkd-testbed-selfcheck.sh computes it in Python.
    let out = view.wks_client(home.path(), &["--print-wkd-hash", "Alice@example.net"]);
    assert!(out.status.success(), "{}", kst_tests::stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "kei1q4tipxxu1yj79k9kfukdhfy631xe alice@example.net"
    );
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn curl_reaches_a_tls_server_on_port_443_by_name_with_the_system_trust_store() {
    let Some(bed) = bed() else { return };
    let addr = WkdTestbed::free_addr();
    let _server = Server(
        Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept"])
            .arg(format!("{addr}:443"))
            .arg("-cert")
            .arg(bed.cert())
            .arg("-key")
            .arg(bed.key())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server"),
    );
    let home = WkdHome::new();
    for (method, name) in [
        (WkdMethod::Advanced, "openpgpkey.example.net"),
        (WkdMethod::DirectOnly, "example.net"),
        (WkdMethod::Advanced, "openpgpkey.acme.net"),
    ] {
        let view = bed.view(addr, method);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // No --cacert: the test CA must come from the system trust store.
            let out = view.run(
                home.path(),
                "curl",
                &[
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &format!("https://{name}/"),
                ],
            );
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            if code == "200" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "curl https://{name}/ in the view: {code} {}",
                kst_tests::stderr(&out)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
