//! `deploy/` stays consistent with the binary: the systemd unit passes `systemd-analyze verify`
//! (and its offline security check), every kst command line in the unit, the Dockerfile, the
//! compose file and the Postfix snippets parses with this build's CLI, the configs they use pass
//! `kst config check`, and ports and addresses agree between kst and Postfix. No container
//! engine runs here: the images themselves are not built (see docs/OPERATIONS.md).

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::Parser as _;
use kst_bin::cli::{Cli, Command as KstCommand};
use kst_bin::operator::config_check::ConfigCommand;
use kst_bin::server::outbox::OutboxCommand;
use kst_tests::{code, kst_binary, stderr};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
}

/// Values of `Key=` lines of a systemd unit.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

/// Parses a kst command line (argv[0] first) with this build's CLI.
fn parse(argv: &[String]) -> Cli {
    Cli::try_parse_from(argv).unwrap_or_else(|e| panic!("`{}` does not parse: {e}", argv.join(" ")))
}

fn words(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// The JSON array of a Dockerfile instruction such as `CMD ["serve", "--config", "x"]`.
fn docker_array(dockerfile: &str, instruction: &str) -> Vec<String> {
    let line = dockerfile
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{instruction} ")))
        .unwrap_or_else(|| panic!("the Dockerfile has no {instruction}"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{instruction} is not a JSON array: {e}"))
}

/// Runs `systemd-analyze verify` on `files` (units of deploy/systemd, pointed at this build's
/// binary, since verify checks that executables exist); fails on any warning about them.
fn verify_units(files: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut paths = Vec::new();
    for f in files {
        let unit = read(&format!("deploy/systemd/{f}"));
        let path = dir.path().join(f);
        std::fs::write(
            &path,
            unit.replace("/usr/local/bin/kst", &kst_binary().display().to_string()),
        )
        .expect("write unit");
        paths.push(path);
    }
    // `--man=no`: a `Documentation=man:` page is the operator's machine's business, not the
    // unit's (a minimal image without man pages failed the check).
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .args(&paths)
        .output()
        .expect("systemd-analyze must be installed (Debian package systemd; scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {text}");
    // Unknown keys and bad values are only warnings: there must be none about the units.
    for f in files {
        assert!(!text.contains(f), "systemd-analyze verify warns:\n{text}");
    }
    dir
}

/// The exposure level `systemd-analyze security --offline` gives the service unit at `path`.
fn exposure(path: &Path, name: &str) -> f64 {
    let out = Command::new("systemd-analyze")
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(path)
        .output()
        .expect("systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let marker = format!("Overall exposure level for {name}:");
    let level: f64 = text
        .lines()
        .find_map(|l| l.split(marker.as_str()).nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    eprintln!("systemd-analyze security {name}: exposure {level} (0 = locked down, 10 = exposed)");
    level
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    let units = ["kst.service", "kst-outbox.service", "kst-outbox.timer"];
    let dir = verify_units(&units);
    for name in ["kst.service", "kst-outbox.service"] {
        let level = exposure(&dir.path().join(name), name);
        assert!(level < 2.0, "{name} lost its hardening: exposure {level}");
        let unit = read(&format!("deploy/systemd/{name}"));
        for key in [
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "StateDirectory=kst",
            "User=kst",
        ] {
            assert!(unit.lines().any(|l| l == key), "{name} must set {key}");
        }
    }
    let timer = read("deploy/systemd/kst-outbox.timer");
    assert!(
        !unit_values(&timer, "OnUnitActiveSec").is_empty(),
        "{timer}"
    );
}

#[test]
fn systemd_unit_commands_parse_and_its_paths_agree() {
    let unit = read("deploy/systemd/kst.service");
    let start = unit_values(&unit, "ExecStart");
    assert_eq!(start.len(), 1);
    let cli = parse(&words(&start[0]));
    assert!(matches!(cli.command, KstCommand::Serve), "{start:?}");
    assert_eq!(cli.config.as_deref(), Some(Path::new("/etc/kst/kst.toml")));
    for pre in unit_values(&unit, "ExecStartPre") {
        let cli = parse(&words(&pre));
        assert!(matches!(
            cli.command,
            KstCommand::Config(ConfigCommand::Check { .. })
        ));
    }
    // The fs store of deploy/kst.toml lives in the unit's state directory, the only place
    // ProtectSystem=strict lets kst write.
    let cfg = kst_bin::shared::config::Config::load(Some(&root().join("deploy/kst.toml")))
        .expect("deploy/kst.toml loads");
    let state = format!("/var/lib/{}", unit_values(&unit, "StateDirectory")[0]);
    assert!(
        cfg.store.path.starts_with(&state),
        "{} is outside {state}",
        cfg.store.path.display()
    );
    // So does the spool kst serve writes and kst-outbox.service reads.
    assert!(
        cfg.mailer.path.starts_with(&state),
        "{} is outside {state}",
        cfg.mailer.path.display()
    );
    let outbox = read("deploy/systemd/kst-outbox.service");
    assert_eq!(
        unit_values(&outbox, "StateDirectory"),
        [state.trim_start_matches("/var/lib/")]
    );
    let start = unit_values(&outbox, "ExecStart");
    assert_eq!(start.len(), 1);
    let cli = parse(&words(&start[0]));
    assert!(
        matches!(
            cli.command,
            KstCommand::Outbox(OutboxCommand::Send { dir: None })
        ),
        "{start:?}"
    );
    assert_eq!(cli.config.as_deref(), Some(Path::new("/etc/kst/kst.toml")));
}

#[test]
fn dockerfile_and_compose_use_what_the_binary_has() {
    let dockerfile = read("deploy/Dockerfile");
    // The builder is the toolchain the workspace pins.
    let manifest = read("Cargo.toml");
    let rust = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version")
        .trim_matches('"');
    assert!(
        dockerfile.contains(&format!("FROM rust:{rust}-")),
        "the builder stage must use rust {rust}"
    );
    assert!(dockerfile.contains("-p kst-bin --bin kst"));
    assert!(
        read("kst-bin/Cargo.toml").contains("name = \"kst\""),
        "kst-bin builds a binary named kst"
    );
    // Runs as a non-root user.
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER instruction");
    assert!(
        !user.starts_with("root") && !user.starts_with('0'),
        "{user}"
    );
    // COPY sources from the context exist.
    for l in dockerfile.lines().filter(|l| l.starts_with("COPY deploy/")) {
        let src = l.split_whitespace().nth(1).expect("a source");
        assert!(
            root().join(src).exists(),
            "{src} (in a COPY) does not exist"
        );
    }
    let mut argv = docker_array(&dockerfile, "ENTRYPOINT");
    argv.extend(docker_array(&dockerfile, "CMD"));
    assert!(matches!(parse(&argv).command, KstCommand::Serve));

    // Every command of the compose file's kst services.
    let compose = read("deploy/compose.yaml");
    let mut commands = 0;
    for l in compose.lines().map(str::trim) {
        if let Some(json) = l.strip_prefix("command: ") {
            let mut argv = vec!["kst".to_string()];
            argv.extend(serde_json::from_str::<Vec<String>>(json).expect("a JSON array"));
            let cli = parse(&argv);
            assert!(
                matches!(cli.command, KstCommand::Serve | KstCommand::Migrate),
                "{argv:?}"
            );
            commands += 1;
        }
        if let Some(rest) = l.strip_prefix("dockerfile: ") {
            assert!(root().join(rest).exists(), "{rest} does not exist");
        }
    }
    assert_eq!(commands, 2, "serve (the pool) and migrate");
}

/// `KST_*: value` lines of the compose file's shared kst environment.
fn compose_kst_env(compose: &str) -> Vec<(String, String)> {
    compose
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("KST_"))
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect()
}

#[test]
fn deploy_configs_pass_config_check() {
    let check = |config: &Path, env: &[(String, String)]| {
        let mut cmd = Command::new(kst_binary());
        cmd.args(["config", "check", "--config"])
            .arg(config)
            .env_remove("RUST_LOG");
        for (k, _) in std::env::vars() {
            if k.starts_with("KST_") {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let out = cmd.output().expect("run kst config check");
        assert_eq!(
            code(&out),
            0,
            "kst config check {}: {}",
            config.display(),
            stderr(&out)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    check(&root().join("deploy/kst.toml"), &[]);
    let env = compose_kst_env(&read("deploy/compose.yaml"));
    assert!(env.iter().any(|(k, _)| k == "KST_STORE__URL"), "{env:?}");
    let effective = check(&root().join("deploy/container/kst.toml"), &env);
    assert!(
        !effective.contains("kst-db-password"),
        "the password is masked:\n{effective}"
    );
}

#[test]
fn container_postfix_reaches_the_pool_and_the_pool_admits_it() {
    let cfg =
        kst_bin::shared::config::Config::load(Some(&root().join("deploy/container/kst.toml")))
            .expect("deploy/container/kst.toml loads");
    let port = cfg
        .lmtp
        .listen
        .rsplit_once(':')
        .expect("host:port")
        .1
        .to_string();
    let compose = read("deploy/compose.yaml");
    let transport = read("deploy/container/postfix/transport");
    let line = transport
        .lines()
        .find(|l| l.starts_with("keys@"))
        .expect("a keys@ line");
    let hops: Vec<&str> = line
        .split_once("kstlmtp:")
        .expect("the kstlmtp transport of master.cf.snippet")
        .1
        .split(',')
        .map(str::trim)
        .collect();
    assert_eq!(hops.len(), 3, "{hops:?}");
    for hop in hops {
        // [host]:port: Postfix takes "inet:" only on the first hop of a list.
        let (host, p) = hop
            .strip_prefix('[')
            .and_then(|h| h.split_once("]:"))
            .unwrap_or_else(|| panic!("{hop} is not [host]:port"));
        assert_eq!(p, port, "Postfix dials {hop}, kst listens on {port}");
        assert!(
            compose.contains(&format!("\n  {host}:\n")),
            "compose has no service {host}"
        );
    }
    // The address Postfix binds for LMTP is inside [lmtp] allow.
    let dockerfile = read("deploy/container/postfix/Dockerfile");
    let bind = dockerfile
        .split("lmtp_bind_address=")
        .nth(2)
        .and_then(|r| r.split('/').next())
        .expect("the Postfix image sets lmtp_bind_address");
    let allow = kst_bin::shared::config::AllowList::parse(&cfg.lmtp.allow).expect("allow");
    assert!(
        allow.allows(bind.parse().expect("an IP")),
        "{bind} not in {:?}",
        cfg.lmtp.allow
    );
    assert!(compose.contains(&format!("ipv4_address: {bind}}}")));
    // And the snippet it edits still has the line it replaces.
    assert!(read("deploy/postfix/master.cf.snippet").contains("-o lmtp_bind_address=127.0.0.1"));
}

#[test]
fn postfix_pipe_command_parses() {
    let snippet = read("deploy/postfix/master.cf.snippet");
    let mut lines = snippet.lines().skip_while(|l| !l.starts_with("kstpipe "));
    let mut argv_text = String::new();
    lines.next().expect("the kstpipe service");
    for l in lines.take_while(|l| l.starts_with(' ')) {
        argv_text.push(' ');
        argv_text.push_str(l.trim());
    }
    let argv = argv_text
        .split_once("argv=")
        .expect("pipe argv=")
        .1
        .replace("${sender}", "alice@example.net")
        .replace("${recipient}", "keys@example.net")
        .replace("${sasl_username}", "alice@example.net");
    let cli = parse(&words(&argv));
    match cli.command {
        KstCommand::Deliver(a) => {
            assert_eq!(a.recipient.as_deref(), Some("keys@example.net"));
            assert_eq!(a.sasl_username.as_deref(), Some("alice@example.net"));
        }
        other => panic!("{other:?}"),
    }
}
