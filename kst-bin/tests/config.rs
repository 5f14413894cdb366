//! Configuration loading: file, environment overrides, defaults, errors that name the key.

use std::path::{Path, PathBuf};

use kst_bin::shared::config::{
    Config, ConfigError, LogFormat, MASK, MailerKind, SmtpTls, StoreBackend,
};
use kst_core::AuthSource;

fn sample() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kst.toml")
}

fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
    vars.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Writes `text` to a kst.toml in a fresh temporary directory.
fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kst.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn key_of(e: &ConfigError) -> &str {
    match e {
        ConfigError::Key { key, .. } => key,
        other => panic!("expected an error about a key, got {other:?}"),
    }
}

#[test]
fn the_sample_deploy_file_loads_and_documents_the_defaults() {
    let cfg = Config::load_with_env(Some(&sample()), env(&[])).unwrap();
    assert_eq!(cfg.kst.domains, ["example.net"]);
    assert_eq!(cfg.kst.trusted_mta_hosts, ["mail.example.net"]);
    // Apart from the values a deployment must choose, the sample states the defaults.
    let defaults = Config::default();
    assert_eq!(cfg.kst.auth_source, defaults.kst.auth_source);
    assert_eq!(cfg.limits, defaults.limits);
    assert_eq!(cfg.store.backend, defaults.store.backend);
    assert_eq!(cfg.store.url, defaults.store.url);
    let mut mailer = cfg.mailer.clone();
    mailer.path = defaults.mailer.path.clone();
    assert_eq!(mailer, defaults.mailer);
    assert_eq!(cfg.log, defaults.log);
    assert_eq!(
        cfg.web, defaults.web,
        "deploy/kst.toml states the [web] defaults"
    );
    assert_eq!(
        cfg.dkim, defaults.dkim,
        "deploy/kst.toml states the [dkim] defaults"
    );
    let policy = cfg.policy().unwrap();
    assert!(policy.serves_domain("example.net"));
}

#[test]
fn every_key_has_a_default_except_domains() {
    let cfg = Config::load_with_env(None, env(&[("KST_KST__DOMAINS", "example.net")])).unwrap();
    assert_eq!(cfg.kst.domains, ["example.net"]);
    assert!(cfg.kst.trusted_mta_hosts.is_empty());
    assert_eq!(cfg.kst.auth_source, AuthSource::Received);
    assert_eq!(cfg.limits.max_message_bytes, 2 * 1024 * 1024);
    assert_eq!(cfg.limits.max_key_bytes, 1024 * 1024);
    assert_eq!(cfg.store.backend, StoreBackend::Fs);
    assert_eq!(cfg.store.path, Path::new("./data/keys"));
    assert_eq!(cfg.mailer.kind, MailerKind::Spool);
    assert_eq!(cfg.mailer.path, Path::new("./data/outbox"));
    assert_eq!(cfg.mailer.port, 25);
    assert_eq!(cfg.mailer.tls, SmtpTls::Starttls);
    assert_eq!(cfg.mailer.timeout_secs, 30);
    assert_eq!(cfg.mailer.envelope_from().unwrap(), None);
    assert_eq!(cfg.log.format, LogFormat::Text);
    assert_eq!(cfg.log.level, "info");
}

#[test]
fn environment_overrides_the_file_including_lists_and_nested_keys() {
    let (_dir, path) = file(
        r#"
[kst]
domains = ["example.net"]
trusted_mta_hosts = ["mail.example.net"]
[mailer]
kind = "spool"
port = 25
"#,
    );
    let cfg = Config::load_with_env(
        Some(&path),
        env(&[
            ("KST_MAILER__PORT", "2525"),
            ("KST_MAILER__KIND", "smtp"),
            ("KST_MAILER__TLS", "none"),
            ("KST_MAILER__USERNAME", "kst"),
            ("KST_MAILER__PASSWORD", "0123"),
            ("KST_STORE__BACKEND", "fs"),
            ("KST_STORE__PATH", "/srv/kst/keys"),
            ("KST_KST__DOMAINS", "example.org,Bücher.example"),
            (
                "KST_KST__TRUSTED_MTA_HOSTS",
                "mx1.example.org, MX2.example.org",
            ),
            ("KST_KST__CASE_SENSITIVE_LOCAL_PART", "true"),
            ("KST_KST__SUBADDRESS_SEPARATOR", "+"),
            ("KST_KST__AUTH_SOURCE", "sasl-argv"),
            ("KST_KST__LOGIN_MAP__ALICE", "alice@example.org"),
            ("KST_LOG__FORMAT", "json"),
            // Not configuration: no `__` after the prefix, or no prefix at all.
            ("KST_CONFIG", "/elsewhere.toml"),
            ("KST_TEST_POSTGRES_URL", "postgres://x"),
            ("MAILER__PORT", "1"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.mailer.port, 2525);
    assert_eq!(cfg.mailer.kind, MailerKind::Smtp);
    assert_eq!(cfg.mailer.tls, SmtpTls::None);
    // Kept verbatim, not turned into the number 123.
    assert_eq!(cfg.mailer.password.expose(), "0123");
    assert_eq!(cfg.store.path, Path::new("/srv/kst/keys"));
    assert_eq!(cfg.kst.domains, ["example.org", "Bücher.example"]);
    assert_eq!(
        cfg.kst.trusted_mta_hosts,
        ["mx1.example.org", "MX2.example.org"]
    );
    assert!(cfg.kst.case_sensitive_local_part);
    assert_eq!(cfg.kst.auth_source, AuthSource::SaslArgv);
    assert_eq!(cfg.log.format, LogFormat::Json);

    let policy = cfg.policy().unwrap();
    assert_eq!(policy.domains, ["example.org", "xn--bcher-kva.example"]);
    assert_eq!(
        policy.trusted_mta_hosts,
        ["mx1.example.org", "mx2.example.org"]
    );
    assert_eq!(policy.address_policy.subaddress_separator, Some('+'));
    assert_eq!(policy.auth_source, AuthSource::SaslArgv);
    assert_eq!(policy.login_map["alice"].as_str(), "alice@example.org");
    assert_eq!(
        policy
            .address_policy
            .normalize("Alice+x@EXAMPLE.org")
            .unwrap()
            .as_str(),
        "Alice@example.org"
    );
}

#[test]
fn an_empty_list_from_the_environment_clears_it() {
    let (_dir, path) =
        file("[kst]\ndomains = [\"example.net\"]\ntrusted_mta_hosts = [\"mail.example.net\"]\n");
    let cfg =
        Config::load_with_env(Some(&path), env(&[("KST_KST__TRUSTED_MTA_HOSTS", "")])).unwrap();
    assert!(cfg.kst.trusted_mta_hosts.is_empty());
}

#[test]
fn url_lists_from_the_environment_are_separated_by_whitespace_and_keep_commas() {
    let (_dir, path) = file(
        r#"
[kst]
domains = ["example.net"]
[store]
backend = "postgres"
url = "postgres://kst@db0:5432/kst"
urls = ["postgres://kst@from-file:5432/kst"]
"#,
    );
    let cfg = Config::load_with_env(
        Some(&path),
        env(&[
            // A libpq multi-host URL (commas inside) and a second URL, separated by whitespace.
            (
                "KST_STORE__URLS",
                "postgres://kst:pa,ss@db1:5432,db2:5432/kst?target_session_attrs=read-write\n\t postgres://kst@db3:5432/kst ",
            ),
            ("KST_STORE__READ_URLS", "postgres://kst@replica1/kst postgres://kst@replica2/kst"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.store.backend, StoreBackend::Postgres);
    assert_eq!(
        cfg.store.urls,
        [
            "postgres://kst:pa,ss@db1:5432,db2:5432/kst?target_session_attrs=read-write",
            "postgres://kst@db3:5432/kst"
        ]
    );
    assert_eq!(
        cfg.store.read_urls,
        ["postgres://kst@replica1/kst", "postgres://kst@replica2/kst"]
    );

    // An empty value clears the file's list; Redis node lists follow the same rule.
    let cfg = Config::load_with_env(
        Some(&path),
        env(&[
            ("KST_STORE__URLS", ""),
            ("KST_STORE__BACKEND", "redis"),
            ("KST_STORE__URL", ""),
            (
                "KST_STORE__CLUSTER_NODES",
                "redis://127.0.0.1:17001 redis://127.0.0.1:17002",
            ),
        ]),
    )
    .unwrap();
    assert!(cfg.store.urls.is_empty());
    assert_eq!(
        cfg.store.cluster_nodes,
        ["redis://127.0.0.1:17001", "redis://127.0.0.1:17002"]
    );
    let cfg = Config::load_with_env(
        None,
        env(&[
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_STORE__BACKEND", "redis"),
            (
                "KST_STORE__SENTINELS",
                "redis://10.0.0.5:26379 redis://10.0.0.6:26379",
            ),
            ("KST_STORE__SENTINEL_MASTER", "kst"),
        ]),
    )
    .unwrap();
    assert_eq!(
        cfg.store.sentinels,
        ["redis://10.0.0.5:26379", "redis://10.0.0.6:26379"]
    );
}

#[test]
fn policy_normalizes_login_map_values() {
    let (_dir, path) = file(
        "[kst]\ndomains = [\"Example.NET\"]\n[kst.login_map]\nAlice = \"<ALICE@example.net>\"\n",
    );
    let policy = Config::load_with_env(Some(&path), env(&[]))
        .unwrap()
        .policy()
        .unwrap();
    assert_eq!(policy.domains, ["example.net"]);
    // The login keeps its case (SASL logins are compared exactly); the address is folded.
    assert_eq!(policy.login_map["Alice"].as_str(), "alice@example.net");
}

#[test]
fn unknown_keys_are_errors_that_name_the_key() {
    let (_dir, path) = file("[kst]\ndomains = [\"example.net\"]\n[mailer]\nprot = 2525\n");
    let e = Config::load_with_env(Some(&path), env(&[])).unwrap_err();
    assert_eq!(key_of(&e), "mailer.prot");
    assert!(e.to_string().contains("unknown key"), "{e}");
    assert!(e.to_string().contains("port"), "lists the known keys: {e}");

    let (_dir, path) = file("[kst]\ndomains = [\"example.net\"]\n[mailers]\nport = 2525\n");
    let e = Config::load_with_env(Some(&path), env(&[])).unwrap_err();
    assert_eq!(key_of(&e), "mailers");

    let e = Config::load_with_env(
        None,
        env(&[("KST_KST__DOMAINS", "example.net"), ("KST_STORE__URI", "x")]),
    )
    .unwrap_err();
    assert_eq!(key_of(&e), "store.uri");
}

#[test]
fn missing_domains_is_an_error_that_says_what_to_do() {
    for e in [
        Config::load_with_env(None, env(&[])).unwrap_err(),
        Config::load_with_env(Some(&file("[kst]\ndomains = []\n").1), env(&[])).unwrap_err(),
        Config::load_with_env(None, env(&[("KST_KST__DOMAINS", " , ")])).unwrap_err(),
    ] {
        assert_eq!(key_of(&e), "kst.domains");
        assert!(e.to_string().contains("at least one domain"), "{e}");
    }
}

/// Environment overrides, the key the error must name, a text the message must contain.
type Case<'a> = (&'a [(&'a str, &'a str)], &'a str, &'a str);

#[test]
fn bad_values_name_the_key_and_the_problem() {
    let base = ("KST_KST__DOMAINS", "example.net");
    let cases: &[Case] = &[
        (
            &[("KST_MAILER__PORT", "x")],
            "mailer.port",
            "invalid value \"x\", expected an integer",
        ),
        (
            &[("KST_MAILER__PORT", "70000")],
            "mailer.port",
            "invalid value 70000, expected an integer from 0 to 65535",
        ),
        (
            &[("KST_MAILER__KIND", "carrier-pigeon")],
            "mailer.kind",
            "invalid value \"carrier-pigeon\", expected \"spool\" or \"smtp\"",
        ),
        (
            &[("KST_MAILER__ENVELOPE_FROM", "not an address")],
            "mailer.envelope_from",
            "not an address",
        ),
        (
            &[("KST_KST__SUBADDRESS_SEPARATOR", "++")],
            "kst.subaddress_separator",
            "\"++\"",
        ),
        (
            &[("KST_KST__DOMAINS", "example.net,exa mple.net")],
            "kst.domains",
            "exa mple.net",
        ),
        (
            &[("KST_KST__TRUSTED_MTA_HOSTS", "mail example")],
            "kst.trusted_mta_hosts",
            "mail example",
        ),
        (
            &[("KST_KST__LOGIN_MAP__BOB", "bob@elsewhere.example")],
            "kst.login_map.bob",
            "served domain",
        ),
        (
            &[("KST_LIMITS__MAX_KEY_BYTES", "4194304")],
            "limits.max_key_bytes",
            "max_message_bytes",
        ),
        (&[("KST_LOG__LEVEL", "verbose")], "log.level", "verbose"),
        (
            &[("KST_STORE__BACKEND", "postgres")],
            "store.url",
            "postgres",
        ),
        (
            &[
                ("KST_MAILER__KIND", "smtp"),
                ("KST_MAILER__USERNAME", "kst"),
            ],
            "mailer.username",
            "together",
        ),
        (
            &[("KST_MAILER__TIMEOUT_SECS", "0")],
            "mailer.timeout_secs",
            "at least 1",
        ),
        (
            &[("KST_MAILER__TLS", "yes-please")],
            "mailer.tls",
            "starttls",
        ),
        (
            &[("KST_KST__AUTH_SOURCE", "sasl")],
            "kst.auth_source",
            "sasl-argv",
        ),
    ];
    for (vars, key, needle) in cases {
        let mut all = vec![base];
        all.extend_from_slice(vars);
        let e = Config::load_with_env(None, env(&all)).unwrap_err();
        assert_eq!(key_of(&e), *key, "{vars:?}: {e}");
        let text = e.to_string();
        assert!(text.starts_with(&format!("{key}: ")), "{text}");
        assert!(text.contains(needle), "{vars:?}: {text} lacks {needle:?}");
    }
}

#[test]
fn file_problems_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let e = Config::load_with_env(Some(&missing), env(&[])).unwrap_err();
    assert!(
        matches!(&e, ConfigError::File { path, .. } if path == &missing),
        "{e:?}"
    );

    let (_dir, path) = file("[kst\ndomains = [\"example.net\"]\n");
    let e = Config::load_with_env(Some(&path), env(&[])).unwrap_err();
    assert!(
        matches!(&e, ConfigError::File { path: p, .. } if p == &path),
        "{e:?}"
    );
    assert!(e.to_string().contains("TOML"), "{e}");
}

#[test]
fn masked_output_hides_secrets_and_still_parses() {
    let (_dir, path) = file(
        r#"
[kst]
domains = ["example.net"]
[store]
backend = "redis"
url = "redis://:store-secret@127.0.0.1:6379/0"
[mailer]
kind = "smtp"
username = "kst"
password = "mailer-secret"
"#,
    );
    let cfg = Config::load_with_env(Some(&path), env(&[])).unwrap();
    assert_eq!(cfg.mailer.password.expose(), "mailer-secret");
    let masked = cfg.masked();
    assert!(!masked.contains("mailer-secret"), "{masked}");
    assert!(!masked.contains("store-secret"), "{masked}");
    assert!(masked.contains(MASK));
    assert!(
        masked.contains("redis://:********@127.0.0.1:6379/0"),
        "{masked}"
    );
    assert!(
        !format!("{cfg:?}").contains("secret"),
        "Debug leaks a secret"
    );

    // The masked text is a valid configuration with the same non-secret values.
    let (_dir2, path2) = file(&masked);
    let again = Config::load_with_env(Some(&path2), env(&[])).unwrap();
    assert_eq!(again.mailer.username, "kst");
    assert_eq!(again.mailer.password.expose(), MASK);
    assert_eq!(again.kst, cfg.kst);
    assert_eq!(again.limits, cfg.limits);
}

/// `kst config check` prints the effective configuration: `[transparency] gather_us` unset
/// shows the wait the configured store gets (2000 µs on PostgreSQL and Redis, none on fs),
/// not nothing; a set one shows as set.
#[test]
fn masked_output_shows_the_effective_gather_wait() {
    let masked = |backend: &str, gather: Option<&str>| {
        let mut vars = vec![
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_STORE__BACKEND", backend),
        ];
        match backend {
            "redis" => vars.push(("KST_STORE__URL", "redis://127.0.0.1:6379/0")),
            "postgres" => vars.push(("KST_STORE__URL", "postgres://kst@127.0.0.1/kst")),
            _ => {}
        }
        if let Some(us) = gather {
            vars.push(("KST_TRANSPARENCY__GATHER_US", us));
        }
        Config::load_with_env(None, env(&vars)).unwrap().masked()
    };
    let redis = masked("redis", None);
    assert!(redis.contains("gather_us = 2000"), "{redis}");
    let postgres = masked("postgres", None);
    assert!(postgres.contains("gather_us = 2000"), "{postgres}");
    let fs = masked("fs", None);
    assert!(fs.contains("gather_us = 0"), "{fs}");
    let set = masked("fs", Some("500"));
    assert!(set.contains("gather_us = 500"), "{set}");
}

#[test]
fn rate_limits_and_the_gate_come_from_file_and_environment() {
    let cfg = Config::load_with_env(None, env(&[("KST_KST__DOMAINS", "example.net")])).unwrap();
    let policy = cfg.policy().unwrap();
    assert_eq!(policy.rate_limits, kst_core::RateLimits::default());
    assert!(policy.rate_limits.per_sender > 0, "on by default");
    assert!(
        !policy.require_authentication_results,
        "the gate is off by default"
    );
    let cfg = Config::load_with_env(
        None,
        env(&[
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_LIMITS__PER_SENDER", "5"),
            ("KST_LIMITS__PER_SOURCE_IP", "0"),
            ("KST_LIMITS__WINDOW_SECS", "600"),
            ("KST_LIMITS__MAX_MIME_PARTS", "10"),
            ("KST_KST__REQUIRE_AUTHENTICATION_RESULTS", "true"),
            ("KST_KST__AUTHSERV_ID", "mx.example.net"),
        ]),
    )
    .unwrap();
    let p = cfg.policy().unwrap();
    assert_eq!(p.rate_limits.per_sender, 5);
    assert_eq!(p.rate_limits.per_source_ip, 0);
    assert_eq!(p.rate_limits.window_secs, 600);
    assert_eq!(p.max_mime_parts, 10);
    assert!(p.require_authentication_results);
    assert_eq!(p.authserv_id, "mx.example.net");
    // The gate without an authserv-id, and a zero window, name their keys.
    let e = Config::load_with_env(
        None,
        env(&[
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_KST__REQUIRE_AUTHENTICATION_RESULTS", "true"),
        ]),
    )
    .unwrap_err();
    assert_eq!(key_of(&e), "kst.authserv_id");
    let e = Config::load_with_env(
        None,
        env(&[
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_LIMITS__WINDOW_SECS", "0"),
        ]),
    )
    .unwrap_err();
    assert_eq!(key_of(&e), "limits.window_secs");
}

#[test]
fn lmtp_max_message_size_is_a_deprecated_alias_of_limits_max_message_bytes() {
    let base = "[kst]\ndomains = [\"example.net\"]\n[limits]\nmax_key_bytes = 4096\n";
    let (_d, path) = file(&format!("{base}[lmtp]\nmax_message_size = 100000\n"));
    let cfg = Config::load_with_env(Some(&path), env(&[])).unwrap();
    assert_eq!(cfg.limits.max_message_bytes, 100_000);
    assert_eq!(cfg.policy().unwrap().max_message_bytes, 100_000);
    assert_eq!(cfg.lmtp.max_message_size, None, "moved, not kept twice");
    assert!(!cfg.masked().contains("max_message_size"));

    // Both set to different values: which one wins would be a guess.
    let (_d, path) = file(&format!(
        "{base}max_message_bytes = 50000\n[lmtp]\nmax_message_size = 100000\n"
    ));
    let e = Config::load_with_env(Some(&path), env(&[])).unwrap_err();
    assert_eq!(key_of(&e), "lmtp.max_message_size");
    assert!(e.to_string().contains("limits.max_message_bytes"), "{e}");
}

/// Issue 13: the counters strangers could use up for others are gone; an old configuration that
/// still names them gets an error that says what to do (delete, or rename), from the file and
/// from the environment alike.
#[test]
fn removed_rate_limit_keys_say_what_replaces_them() {
    let base = "[kst]\ndomains = [\"example.net\"]\n[limits]\n";
    for (line, key, advice) in [
        (
            "per_queried_address = 120",
            "limits.per_queried_address",
            "Rename it to limits.per_sender_query",
        ),
        (
            "per_sender_domain = 500",
            "limits.per_sender_domain",
            "Delete the line",
        ),
    ] {
        let (_d, path) = file(&format!("{base}{line}\n"));
        let e = Config::load_with_env(Some(&path), env(&[])).unwrap_err();
        assert_eq!(key_of(&e), key);
        assert!(e.to_string().contains(advice), "{e}");
    }
    let e = Config::load_with_env(
        None,
        env(&[
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_LIMITS__PER_QUERIED_ADDRESS", "120"),
        ]),
    )
    .unwrap_err();
    assert_eq!(key_of(&e), "limits.per_queried_address");
}

#[test]
fn web_is_off_by_default_and_set_from_file_and_environment() {
    let base = env(&[("KST_KST__DOMAINS", "example.net")]);
    let cfg = Config::load_with_env(None, base.clone()).unwrap();
    assert!(!cfg.web.enabled(), "[web] is off unless listen is set");

    let (_dir, path) = file(
        "[kst]\ndomains = [\"example.net\"]\n[web]\nlisten = \"127.0.0.1:8443\"\n[web.limits]\nper_client = 7\n",
    );
    let cfg = Config::load_with_env(
        Some(&path),
        env(&[
            ("KST_WEB__LISTEN", "127.0.0.2:443"),
            ("KST_WEB__TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8"),
            ("KST_WEB__LIMITS__GLOBAL_MISSES", "5"),
            ("KST_WEB__TLS_CERT", "/etc/kst/web.crt"),
            ("KST_WEB__TLS_KEY", "/etc/kst/web.key"),
        ]),
    )
    .unwrap();
    assert!(cfg.web.enabled());
    assert_eq!(cfg.web.listen, "127.0.0.2:443");
    assert_eq!(cfg.web.trusted_proxies, ["127.0.0.1", "10.0.0.0/8"]);
    assert_eq!(cfg.web.limits.per_client, 7);
    assert_eq!(cfg.web.limits.global_misses, 5);
    assert_eq!(
        cfg.web.tls_key.as_deref(),
        Some(Path::new("/etc/kst/web.key"))
    );
    // `kst config check` prints it.
    let shown = cfg.masked();
    assert!(
        shown.contains("[web]") && shown.contains("listen = \"127.0.0.2:443\""),
        "{shown}"
    );
    assert!(shown.contains("[web.limits]"), "{shown}");

    for (vars, key) in [
        (vec![("KST_WEB__LISTEN", "example.net:443")], "web.listen"),
        (
            vec![
                ("KST_WEB__LISTEN", "127.0.0.1:443"),
                ("KST_WEB__TLS_CERT", "/x"),
            ],
            "web.tls_cert",
        ),
        (
            vec![("KST_WEB__TRUSTED_PROXIES", "10.0.0.0/33")],
            "web.trusted_proxies",
        ),
        (vec![("KST_WEB__LISTN", "127.0.0.1:443")], "web.listn"),
    ] {
        let mut all = base.clone();
        all.extend(env(&vars));
        let e = Config::load_with_env(None, all).unwrap_err();
        assert!(
            key_of(&e).starts_with(key) || e.to_string().contains(key),
            "{vars:?}: {e}"
        );
    }
}

#[test]
fn recipient_folding_is_configured_by_file_and_environment() {
    let (_dir, path) = file(
        "[kst]\ndomains = [\"example.net\"]\n[limits.recipient_folding]\n\
         dot_insensitive_domains = [\"gmail.com\"]\n\
         [limits.recipient_folding.separators]\n\"freemail.example\" = \"-\"\n",
    );
    let cfg = Config::load_with_env(Some(&path), env(&[])).unwrap();
    let f = &cfg.policy().unwrap().recipient_folding;
    assert_eq!(f.dot_insensitive_domains, ["gmail.com"]);
    assert_eq!(
        f.separators.get("freemail.example").map(String::as_str),
        Some("-")
    );
    assert!(
        !f.separators.contains_key("yahoo.com"),
        "a file's table replaces the default"
    );

    let cfg = Config::load_with_env(
        Some(&path),
        env(&[(
            "KST_LIMITS__RECIPIENT_FOLDING__DOT_INSENSITIVE_DOMAINS",
            "gmail.com, example.org",
        )]),
    )
    .unwrap();
    assert_eq!(
        cfg.limits.recipient_folding.dot_insensitive_domains,
        ["gmail.com", "example.org"]
    );

    let (_dir, bad) = file(
        "[kst]\ndomains = [\"example.net\"]\n[limits.recipient_folding.separators]\n\
         \"freemail.example\" = \"ab\"\n",
    );
    let e = Config::load_with_env(Some(&bad), env(&[])).unwrap_err();
    assert_eq!(key_of(&e), "limits.recipient_folding.separators");
    assert!(e.to_string().contains("punctuation"), "{e}");
}

#[test]
fn dkim_keys_come_from_the_file_or_the_environment() {
    let (_dir, path) = file(
        "[kst]\ndomains = [\"example.net\", \"acme.net\"]\n[dkim]\nselector = \"kst-2027\"\n\
         ed25519_key = \"/etc/kst/dkim/{domain}.ed25519.pem\"\n",
    );
    let cfg = Config::load_with_env(Some(&path), env(&[])).unwrap();
    assert_eq!(cfg.dkim.selector, "kst-2027");
    assert!(cfg.dkim.enabled());
    let ed = kst_bin::shared::config::DkimAlgorithm::Ed25519;
    let rsa = kst_bin::shared::config::DkimAlgorithm::Rsa;
    assert_eq!(
        cfg.dkim.key_file(ed, "acme.net"),
        Some(PathBuf::from("/etc/kst/dkim/acme.net.ed25519.pem"))
    );
    assert_eq!(cfg.dkim.key_file(rsa, "acme.net"), None);
    let cfg = Config::load_with_env(
        Some(&path),
        env(&[
            ("KST_DKIM__SELECTOR", "kst"),
            ("KST_DKIM__RSA_KEY", "/k/{domain}.rsa.pem"),
        ]),
    )
    .unwrap();
    assert_eq!(cfg.dkim.selector, "kst");
    assert_eq!(
        cfg.dkim.key_file(rsa, "example.net"),
        Some(PathBuf::from("/k/example.net.rsa.pem"))
    );
    let e = Config::load_with_env(Some(&path), env(&[("KST_DKIM__SELECTOR", "k st")])).unwrap_err();
    assert_eq!(key_of(&e), "dkim.selector");
    let e = Config::load_with_env(Some(&path), env(&[("KST_DKIM__KEY", "/x")])).unwrap_err();
    assert!(e.to_string().contains("key"), "{e}");
}

/// Red team (counters and shares), follow-up: `kst config check` warns when `[web.counters]`
/// names a server of the Redis key store, which was compared as written, so that
/// `redis://localhost` and `redis://127.0.0.1:6379` were two servers. Servers are now compared
/// by address through the system resolver (`127.1` is a spelling only `getaddrinfo` knows),
/// loopback spellings are one host, a port left out is 6379; sentinels and cluster nodes too.
#[test]
fn web_counters_on_the_key_stores_redis_are_recognized_by_address() {
    let load = |vars: &[(&str, &str)]| {
        let mut all = vec![
            ("KST_KST__DOMAINS", "example.net"),
            ("KST_STORE__BACKEND", "redis"),
            ("KST_WEB__COUNTERS__BACKEND", "redis"),
        ];
        all.extend_from_slice(vars);
        Config::load_with_env(None, env(&all)).unwrap()
    };
    for (store, counters, same) in [
        ("redis://localhost", "redis://127.0.0.1:6379/1", true),
        ("redis://127.0.0.1:6379", "redis://[::1]", true),
        ("redis://:pw@localhost:6379/0", "redis://127.1", true),
        (
            "redis://127.1:6379",
            "redis://[::ffff:127.0.0.1]:6379",
            true,
        ),
        ("redis://localhost:6379", "redis://127.0.0.1:6380", false),
        ("redis://127.0.0.1", "redis://192.0.2.1", false),
    ] {
        let c = load(&[
            ("KST_STORE__URL", store),
            ("KST_WEB__COUNTERS__URL", counters),
        ]);
        assert_eq!(
            c.web_counters_on_the_key_store(),
            same,
            "{store} {counters}"
        );
    }
    let c = load(&[
        (
            "KST_STORE__CLUSTER_NODES",
            "redis://localhost:7000 redis://localhost:7001",
        ),
        ("KST_WEB__COUNTERS__CLUSTER_NODES", "redis://127.0.0.1:7001"),
    ]);
    assert!(
        c.web_counters_on_the_key_store(),
        "a cluster node in common"
    );
    let sentinels = |theirs: &str| {
        load(&[
            ("KST_STORE__SENTINELS", "redis://localhost:26379"),
            ("KST_STORE__SENTINEL_MASTER", "kst"),
            ("KST_WEB__COUNTERS__SENTINELS", theirs),
            ("KST_WEB__COUNTERS__SENTINEL_MASTER", "kst"),
        ])
    };
    assert!(sentinels("redis://[::1]:26379").web_counters_on_the_key_store());
    assert!(!sentinels("redis://[::1]:26380").web_counters_on_the_key_store());
}
