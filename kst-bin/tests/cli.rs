//! The `kst` binary as an operator runs it: help texts, `config check`, `keys`, exit codes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kst.toml")
}

/// Runs `kst ARGS` with only `env` in its environment.
fn kst(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_kst"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run kst")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A config on a fresh fs store and spool in a temporary directory.
fn temp_config(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kst.toml");
    std::fs::write(
        &path,
        format!(
            "[kst]\ndomains = [\"example.net\"]\n[store]\nbackend = \"fs\"\npath = \"{}\"\n[mailer]\npath = \"{}\"\n{extra}",
            dir.path().join("keys").display(),
            dir.path().join("outbox").display()
        ),
    )
    .unwrap();
    (dir, path)
}

#[test]
fn help_teaches_the_commands() {
    let o = kst(&["--help"], &[]);
    assert_eq!(code(&o), 0, "{}", err(&o));
    for word in ["deliver", "keys", "config", "--config", "KST_MAILER__PORT"] {
        assert!(out(&o).contains(word), "--help lacks {word}:\n{}", out(&o));
    }
    let o = kst(&["deliver", "--help"], &[]);
    assert_eq!(code(&o), 0);
    for word in ["master.cf", "pipe", "--sasl-username", "${sender}", "75"] {
        assert!(
            out(&o).contains(word),
            "deliver --help lacks {word}:\n{}",
            out(&o)
        );
    }
    let o = kst(&["keys", "get", "--help"], &[]);
    assert_eq!(code(&o), 0);
    assert!(out(&o).contains("Example"), "{}", out(&o));
}

#[test]
fn config_check_prints_the_sample_with_secrets_masked() {
    let sample = sample();
    let o = kst(
        &["config", "check", "--config", sample.to_str().unwrap()],
        &[
            ("KST_MAILER__PASSWORD", "hunter2-secret"),
            ("KST_MAILER__USERNAME", "kst"),
            (
                "KST_STORE__URL",
                "postgres://kst:db-secret@db.example.net/kst",
            ),
        ],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    let text = out(&o);
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(!text.contains("db-secret"), "{text}");
    assert!(text.contains("password = \"********\""), "{text}");
    assert!(
        text.contains("postgres://kst:********@db.example.net/kst"),
        "{text}"
    );
    assert!(text.contains("domains = [\"example.net\"]"), "{text}");
    // The printed configuration is itself a valid TOML document.
    text.parse::<toml::Table>()
        .expect("config check prints TOML");
}

#[test]
fn config_check_reports_what_is_wrong_with_exit_78() {
    let sample = sample();
    let o = kst(
        &["config", "check", "--config", sample.to_str().unwrap()],
        &[("KST_MAILER__PORT", "x")],
    );
    assert_eq!(code(&o), 78);
    assert!(
        err(&o).contains("mailer.port: invalid value \"x\""),
        "{}",
        err(&o)
    );
    assert!(out(&o).is_empty(), "nothing on stdout: {}", out(&o));

    // KST_CONFIG names the file; no configured domain is an error too.
    let o = kst(&["config", "check"], &[]);
    assert_eq!(code(&o), 78);
    assert!(err(&o).contains("kst.domains"), "{}", err(&o));
    let o = kst(
        &["config", "check"],
        &[("KST_CONFIG", sample.to_str().unwrap())],
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
}

#[test]
fn deliver_with_a_broken_configuration_asks_postfix_to_retry() {
    let (_dir, path) = temp_config("");
    let o = kst(
        &[
            "deliver",
            "--config",
            path.to_str().unwrap(),
            "--sender",
            "bob@acme.net",
        ],
        &[("KST_MAILER__KIND", "carrier-pigeon")],
    );
    assert_eq!(code(&o), 75, "{}", err(&o));
    assert!(err(&o).contains("mailer.kind"), "{}", err(&o));
}

#[test]
fn keys_refuses_what_is_not_an_address() {
    let (_dir, path) = temp_config("");
    let o = kst(
        &[
            "keys",
            "get",
            "not an address",
            "--config",
            path.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code(&o), 64, "{}", err(&o));
}

#[test]
fn keys_on_an_empty_store_and_an_unreachable_one() {
    let (_dir, path) = temp_config("");
    let p = path.to_str().unwrap();
    for cmd in ["get", "history", "delete"] {
        let o = kst(&["keys", cmd, "alice@example.net", "--config", p], &[]);
        assert_eq!(code(&o), 1, "keys {cmd}: {}", err(&o));
        assert!(out(&o).is_empty(), "keys {cmd}: {}", out(&o));
    }
    // Nothing listens on port 1: the store is unavailable (69), and the message says which.
    let o = kst(
        &["keys", "get", "alice@example.net", "--config", p],
        &[
            ("KST_STORE__BACKEND", "redis"),
            ("KST_STORE__URL", "redis://127.0.0.1:1"),
        ],
    );
    assert_eq!(code(&o), 69, "{}", err(&o));
    assert!(err(&o).to_lowercase().contains("redis"), "{}", err(&o));
    let o = kst(
        &["keys", "get", "alice@example.net", "--config", p],
        &[
            ("KST_STORE__BACKEND", "postgres"),
            ("KST_STORE__URL", "postgres://kst@127.0.0.1:1/kst"),
        ],
    );
    assert_eq!(code(&o), 69, "{}", err(&o));
}

/// `kst config check` warns (and still passes) when `[web.counters]` names the Redis key
/// store's server by another spelling (`localhost` and `127.0.0.1:6379`), and not for another
/// port of the host.
#[test]
fn config_check_warns_when_the_counters_name_the_key_stores_redis_otherwise() {
    const WARNING: &str = "warning: web.counters names a server of the Redis key store";
    let check = |counters: &str| {
        kst(
            &["config", "check"],
            &[
                ("KST_KST__DOMAINS", "example.net"),
                ("KST_STORE__BACKEND", "redis"),
                ("KST_STORE__URL", "redis://:pw@localhost/0"),
                ("KST_WEB__COUNTERS__BACKEND", "redis"),
                ("KST_WEB__COUNTERS__URL", counters),
            ],
        )
    };
    let o = check("redis://127.0.0.1:6379/1");
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).contains(WARNING), "{}", err(&o));
    let o = check("redis://127.0.0.1:6380");
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(!err(&o).contains(WARNING), "{}", err(&o));
    // One Unix socket (another database on it) is one server too; before, a socket was
    // never compared (red team).
    let socket = |store: &str, counters: &str| {
        kst(
            &["config", "check"],
            &[
                ("KST_KST__DOMAINS", "example.net"),
                ("KST_STORE__BACKEND", "redis"),
                ("KST_STORE__URL", store),
                ("KST_WEB__COUNTERS__BACKEND", "redis"),
                ("KST_WEB__COUNTERS__URL", counters),
            ],
        )
    };
    let o = socket(
        "redis+unix:///run/redis/redis.sock",
        "redis+unix:///run/redis/redis.sock?db=1",
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).contains(WARNING), "{}", err(&o));
    let o = socket(
        "redis+unix:///run/redis/redis.sock",
        "redis+unix:///run/redis/counters.sock",
    );
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(!err(&o).contains(WARNING), "{}", err(&o));
}

/// `kst config check` on a host whose resolver never answers (the nameserver of
/// `/etc/resolv.conf` takes the queries and says nothing, as one behind a dropped route does;
/// its options make getaddrinfo wait 150 s a query) still ends, passes and says the
/// hosts were compared as written: the comparison of `[store]`'s and `[web.counters]`'
/// Redis hosts resolves them, and waited for the resolver without a bound (minutes with
/// this resolver: `timeout 120` cut it, exit 124). Runs in a user, mount and network
/// namespace of its own (`unshare -rmn`: its own `/etc/resolv.conf` bind-mounted, `socat` the
/// mute nameserver on its loopback); where unprivileged namespaces are off, it says so and
/// checks nothing.
#[test]
fn config_check_ends_when_the_resolver_never_answers() {
    let probe = Command::new("unshare")
        .args(["-rmn", "sh", "-c", "command -v socat && command -v ip"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !probe {
        eprintln!("skipped: unprivileged user namespaces (unshare -rmn), socat or ip missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.1\noptions timeout:30 attempts:5\n",
    )
    .unwrap();
    // The mute nameserver is bound before kst starts (127.0.0.1:53 in /proc/net/udp), so a
    // query is never refused at once.
    let script = r#"ip link set lo up && mount --bind "$1" /etc/resolv.conf || exit 90
        socat -u UDP-RECV:53,bind=127.0.0.1 /dev/null </dev/null >/dev/null 2>&1 &
        mute=$!
        until grep -q '0100007F:0035' /proc/net/udp; do sleep 0.05; done
        timeout 120 "$2" config check; code=$?
        kill "$mute"
        exit "$code""#;
    let o = Command::new("unshare")
        .args(["-rmn", "sh", "-c", script, "sh"])
        .arg(&resolv)
        .arg(env!("CARGO_BIN_EXE_kst"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs([
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_STORE__BACKEND", "redis"),
            ("KST_STORE__URL", "redis://redis.kst-test.example/0"),
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
            (
                "KST_WEB__COUNTERS__URL",
                "redis://counters.kst-test.example",
            ),
        ])
        .output()
        .expect("run kst in a namespace");
    assert_eq!(code(&o), 0, "{}", err(&o));
    assert!(err(&o).contains("were not resolved within"), "{}", err(&o));
    assert!(err(&o).contains("configuration OK"), "{}", err(&o));
}
