//! The client commands: `publish`, `retrieve`, `pending`, `check` (the owner's `delete`,
//! `status` and `refresh` are in their own modules and use [`send_and_wait`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kst_core::client::{Asked, BuildError, Pending, ReplyError, Request, Verified};
use kst_core::{Address, AddressPolicy};
use tokio_rustls::TlsConnector;

use super::config::{
    self, ClientConfigError, ClientFile, DEFAULT_TIMEOUT_SECS, Endpoint, PASSWORD_ENV, Security,
    Service,
};
use super::dane::{self, HopAuth};
use super::discovery::{Dns, DnsError, DnsSettings};
use super::dnssec::{DnsSecurity, ResolverSpec};
use super::fetch::{FetchError, ImapSettings, Mailbox};
use super::matching::Matched;
use super::mta_sts::{self, Mode, PolicySource};
use super::output::{self, Outcome};
use super::state::{Entry, State};
use super::submit::{self, DirectHops, Route, SendError};
use super::{ClientArgs, ClientCommand, ClientOpts, exit};

/// Limit for each network step (connect, one SMTP or IMAP command).
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a client command; returns the exit code.
pub async fn run(args: ClientArgs) -> u8 {
    let json = args.opts.json;
    let list = matches!(
        args.command,
        ClientCommand::Pending | ClientCommand::Check { .. }
    );
    let settings = Settings::resolve(&args.opts);
    let outcomes = match &settings {
        Err(o) => vec![o.clone()],
        Ok(s) => match args.command {
            ClientCommand::Publish {
                key,
                gpg_key,
                no_wait,
                #[cfg(feature = "transparency")]
                proof,
            } => {
                #[cfg(feature = "transparency")]
                let log = log_args(proof);
                #[cfg(not(feature = "transparency"))]
                let log = ();
                vec![publish(s, key.as_deref(), gpg_key.as_deref(), no_wait, &log).await]
            }
            ClientCommand::Retrieve {
                address,
                import,
                direct,
                mx,
                mx_port,
                allow_plaintext,
                no_wait,
                #[cfg(feature = "transparency")]
                log,
            } => {
                let how = Direct {
                    direct,
                    mx,
                    mx_port,
                    allow_plaintext,
                };
                #[cfg(not(feature = "transparency"))]
                let log = ();
                vec![retrieve(s, &address, import, &how, no_wait, &log).await]
            }
            ClientCommand::Delete {
                no_wait,
                #[cfg(feature = "transparency")]
                proof,
            } => {
                #[cfg(feature = "transparency")]
                let log = log_args(proof);
                #[cfg(not(feature = "transparency"))]
                let log = ();
                vec![super::delete::delete(s, no_wait, &log).await]
            }
            ClientCommand::Status {
                key,
                gpg_key,
                #[cfg(feature = "transparency")]
                log,
            } => {
                // `--log-key` and `--witness` need --check-transparency here (`status` sends
                // no version 3 request).
                #[cfg(feature = "transparency")]
                if let Err(e) = log.reply.validate(log.check_transparency) {
                    return output::finish(&[Outcome::error(exit::USAGE, e)], s.json, false);
                }
                #[cfg(feature = "transparency")]
                let log = log.check_transparency.then_some(&log);
                #[cfg(not(feature = "transparency"))]
                let log = None;
                return super::status::status(s, key.as_deref(), gpg_key.as_deref(), log).await;
            }
            #[cfg(feature = "transparency")]
            ClientCommand::LogPin {
                domain,
                log_key,
                vrf_key,
                log_url,
            } => {
                return super::transparency::log_pin(
                    s,
                    &domain,
                    log_key.as_deref(),
                    vrf_key.as_deref(),
                    log_url.as_deref(),
                )
                .await;
            }
            ClientCommand::Refresh {
                max_age_days,
                expiry_days,
                batch,
                dry_run,
            } => {
                let due = super::refresh::Due {
                    max_age_days,
                    expiry_days,
                    batch,
                };
                return super::refresh::refresh(s, &due, dry_run).await;
            }
            ClientCommand::Pending => return pending(s),
            ClientCommand::Check { wait, import } => check(s, wait, import).await,
        },
    };
    let facts = match &settings {
        Ok(s) => s.facts(),
        Err(_) => Vec::new(),
    };
    output::finish_with(&outcomes, json, list, &facts)
}

/// The key directory flags of a command (feature `transparency`; nothing without it).
#[cfg(feature = "transparency")]
pub(super) type LogArgs = super::transparency::LogCheckArgs;
/// Without the `transparency` feature there are no key directory flags.
#[cfg(not(feature = "transparency"))]
pub(super) type LogArgs = ();

/// The key directory flags of `publish` and `delete` (`--transparency`, `--log-key`,
/// `--witness`...), as [`LogArgs`].
#[cfg(feature = "transparency")]
fn log_args(proof: super::transparency::ReplyProofArgs) -> LogArgs {
    LogArgs {
        reply: proof,
        ..LogArgs::default()
    }
}

/// What a request does with the key directory: the head key a version 3 reply's answer
/// must be signed by (`None`: the request asks for version 2), what the request asks of
/// the answer (`KST-Log-*` headers), and the checks the reply must pass (kept with the
/// pending request).
#[derive(Debug, Clone, Default)]
pub struct LogPlan {
    /// The head key (64 hex digits) for protocol version 3.
    pub head_key: Option<String>,
    /// The remembered epoch and the witnesses, asked for in the request.
    pub ask: kst_core::protocol::LogAsk,
    /// The checks of the reply.
    pub log: Option<super::state::LogRequirements>,
}

/// The [`LogPlan`] of `args` for a request about `domain`.
#[cfg(feature = "transparency")]
pub(super) async fn log_plan(
    s: &Settings,
    args: &LogArgs,
    address: &Address,
) -> Result<LogPlan, Outcome> {
    super::transparency::plan(s, args, address).await
}

/// Without the `transparency` feature a request asks nothing of a key directory.
#[cfg(not(feature = "transparency"))]
pub(super) async fn log_plan(_: &Settings, _: &LogArgs, _: &Address) -> Result<LogPlan, Outcome> {
    Ok(LogPlan::default())
}

/// The client settings after config file and flags.
pub struct Settings {
    pub(super) account: Option<Address>,
    submission: Option<Endpoint>,
    sendmail: Option<String>,
    imap: Option<Endpoint>,
    maildir: Option<PathBuf>,
    user: Option<String>,
    password_env: String,
    password_command: Option<String>,
    ca_file: Option<PathBuf>,
    resolver: Option<ResolverSpec>,
    dns_anchor: Option<PathBuf>,
    require_dnssec: bool,
    no_dnssec: bool,
    allow_plaintext: bool,
    mta_sts_cache: Option<PathBuf>,
    /// The weakest DNSSEC verdict of the look-ups made (reported as `dnssec`).
    dns_seen: Arc<Mutex<Option<DnsSecurity>>>,
    /// How the request's hop to a foreign MX was secured (reported as `transport`).
    transport: Mutex<Option<serde_json::Value>>,
    timeout: Option<u64>,
    pub(super) state: State,
    insecure_plaintext: bool,
    pub(super) json: bool,
    require_dkim: bool,
    dkim_selector: String,
}

fn config_error(e: impl std::fmt::Display) -> Outcome {
    Outcome::error(exit::CONFIG, e.to_string())
}

impl Settings {
    /// Merges `client.toml` (named, or the default path if it exists) with the flags.
    pub fn resolve(opts: &ClientOpts) -> Result<Settings, Outcome> {
        let file = match &opts.client_config {
            Some(p) => ClientFile::load(p, true),
            None => match config::default_config_path() {
                Some(p) => ClientFile::load(&p, false),
                None => Ok(ClientFile::default()),
            },
        }
        .map_err(config_error)?;
        let value = |what: &str, e: String| {
            config_error(ClientConfigError::Value {
                what: what.into(),
                message: e,
            })
        };
        let policy = AddressPolicy::default();
        let account = match opts.account.as_ref().or(file.account.as_ref()) {
            Some(a) => Some(policy.normalize(a).map_err(|e| {
                Outcome::error(
                    exit::USAGE,
                    format!("the account {a:?} is not an address: {e}"),
                )
            })?),
            None => None,
        };
        let submission = match opts.submission.as_ref().or(file.submission.as_ref()) {
            Some(s) => Some(
                Endpoint::parse(s, Service::Submission).map_err(|e| value("--submission", e))?,
            ),
            None => None,
        };
        let imap = match opts.imap.as_ref().or(file.imap.as_ref()) {
            Some(s) => Some(Endpoint::parse(s, Service::Imap).map_err(|e| value("--imap", e))?),
            None => None,
        };
        let resolver = match opts.resolver.as_ref().or(file.resolver.as_ref()) {
            Some(r) => Some(config::parse_resolver(r).map_err(|e| value("--resolver", e))?),
            None => None,
        };
        let dkim_selector = opts
            .dkim_selector
            .clone()
            .or(file.dkim_selector.clone())
            .unwrap_or_else(|| super::dkim::DEFAULT_SELECTOR.to_string());
        if dkim_selector.is_empty()
            || !dkim_selector
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            return Err(value(
                "--dkim-selector",
                format!("{dkim_selector:?} is not a selector (letters, digits, hyphens)"),
            ));
        }
        let state_path = opts
            .state_file
            .clone()
            .or(file.state_file.clone())
            .or_else(config::default_state_path)
            .ok_or_else(|| {
                value(
                    "state file",
                    "no HOME to keep pending requests in; give --state-file FILE".into(),
                )
            })?;
        Ok(Settings {
            account,
            submission,
            sendmail: opts.sendmail.clone().or(file.sendmail),
            imap,
            maildir: opts.maildir.clone().or(file.maildir),
            user: opts.user.clone().or(file.user),
            password_env: file
                .password_env
                .unwrap_or_else(|| PASSWORD_ENV.to_string()),
            password_command: opts.password_command.clone().or(file.password_command),
            ca_file: opts.ca_file.clone().or(file.ca_file),
            resolver,
            dns_anchor: opts.dns_anchor.clone().or(file.dns_anchor),
            require_dnssec: opts.require_dnssec || file.require_dnssec == Some(true),
            no_dnssec: opts.no_dnssec || file.no_dnssec == Some(true),
            allow_plaintext: file.allow_plaintext == Some(true),
            mta_sts_cache: file.mta_sts_cache.or_else(config::default_mta_sts_cache),
            dns_seen: Arc::new(Mutex::new(None)),
            transport: Mutex::new(None),
            timeout: opts.timeout.or(file.timeout_secs),
            state: State::new(state_path),
            insecure_plaintext: opts.insecure_plaintext || file.insecure_plaintext == Some(true),
            json: opts.json,
            require_dkim: opts.require_dkim || file.require_dkim == Some(true),
            dkim_selector,
        })
    }

    pub(super) fn account(&self) -> Result<&Address, Outcome> {
        self.account.as_ref().ok_or_else(|| {
            config_error(
                "no account: give --account ADDRESS (or KST_ACCOUNT, or `account` in client.toml)",
            )
        })
    }

    fn login(&self, account: &Address) -> Result<(String, String), Outcome> {
        let user = self
            .user
            .clone()
            .unwrap_or_else(|| account.as_str().to_string());
        match config::password(&self.password_env, self.password_command.as_deref()) {
            Ok(Some(p)) => Ok((user, p)),
            Ok(None) => Err(config_error(format!(
                "no password for {user}: set {} or give --password-command CMD",
                self.password_env
            ))),
            Err(e) => Err(config_error(e)),
        }
    }

    /// The extra CA certificates (`--ca-file`).
    #[cfg(feature = "transparency")]
    pub(super) fn ca_file(&self) -> Option<&Path> {
        self.ca_file.as_deref()
    }

    fn connector(&self) -> Result<TlsConnector, Outcome> {
        super::tls::connector(self.ca_file.as_deref()).map_err(config_error)
    }

    pub(super) fn dns(&self) -> Result<Dns, Outcome> {
        if self.require_dnssec && self.no_dnssec {
            return Err(config_error(
                "require_dnssec and no_dnssec contradict each other: drop one",
            ));
        }
        Dns::new(&DnsSettings {
            server: self.resolver.clone(),
            anchor: self.dns_anchor.clone(),
            no_validation: self.no_dnssec,
            require_secure: self.require_dnssec,
            ca_file: self.ca_file.clone(),
        })
        .map(|d| d.reporting_to(self.dns_seen.clone()))
        .map_err(|e| Outcome::error(exit::CONFIG, e.to_string()))
    }

    /// What the command learned besides its outcomes: the DNSSEC verdict of its look-ups and
    /// how the direct hop was secured.
    fn facts(&self) -> Vec<(String, serde_json::Value)> {
        let mut facts = Vec::new();
        if let Some(sec) = *self.dns_seen.lock().unwrap_or_else(|e| e.into_inner()) {
            facts.push(("dnssec".to_string(), sec.as_str().into()));
        }
        if let Some(t) = self
            .transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            facts.push(("transport".to_string(), t));
        }
        facts
    }

    fn wait_limit(&self, default: u64) -> Duration {
        Duration::from_secs(self.timeout.unwrap_or(default))
    }
}

/// How a retrieval travels.
pub(super) struct Direct {
    direct: bool,
    mx: Option<String>,
    mx_port: u16,
    allow_plaintext: bool,
}

/// The outcome of a DNS failure: a bogus answer is an attack (nothing was sent), an insecure
/// one refused by `--require-dnssec` makes the server unusable, anything else is temporary.
pub(super) fn dns_outcome(e: DnsError) -> Outcome {
    match e {
        DnsError::Bogus(m) => Outcome::error(
            exit::ATTACK,
            format!("possible attack: {m}; nothing was sent"),
        ),
        e @ DnsError::NotSecure(_) => Outcome::error(exit::UNAVAILABLE, e.to_string()),
        e @ DnsError::Failed(_) => Outcome::error(exit::TEMPFAIL, e.to_string()),
    }
}

async fn publish(
    s: &Settings,
    key: Option<&Path>,
    gpg_key: Option<&str>,
    no_wait: bool,
    log: &LogArgs,
) -> Outcome {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return o,
    };
    let plan = match log_plan(s, log, &account).await {
        Ok(p) => p,
        Err(o) => return o,
    };
    let armored = match (key, gpg_key) {
        (Some(path), _) => match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                return Outcome::error(
                    exit::NOINPUT,
                    format!("cannot read the key file {}: {e}", path.display()),
                );
            }
        },
        (None, Some(who)) => match gpg_export(who) {
            Ok(t) => t,
            Err(e) => return Outcome::error(exit::NOINPUT, e),
        },
        (None, None) => {
            return Outcome::error(exit::USAGE, "give --key FILE or --gpg-key FINGERPRINT");
        }
    };
    if let Some(warning) = super::status::expiry_warning(&armored, kst_core::time::unix_now()) {
        output::err(format!("kst: warning: {warning}"));
    }
    let request = match kst_core::client::build_publication_with(
        &account,
        &armored,
        plan.head_key.as_deref(),
    ) {
        Ok(r) => r.with_log_ask(plan.ask),
        Err(e @ BuildError::NoMatchingUserId(_)) => {
            return Outcome::error(
                exit::USAGE,
                format!(
                    "{e}: the KST publishes a key only for an address it carries; add the User ID with gpg --quick-add-uid"
                ),
            );
        }
        Err(e) => return Outcome::error(exit::USAGE, e.to_string()),
    };
    send_and_wait_with(s, &account, request, None, false, no_wait, plan.log).await
}

async fn retrieve(
    s: &Settings,
    address: &str,
    import: bool,
    how: &Direct,
    no_wait: bool,
    log: &LogArgs,
) -> Outcome {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return o,
    };
    let address = match AddressPolicy::default().normalize(address) {
        Ok(a) => a,
        Err(e) => {
            return Outcome::error(exit::USAGE, format!("{address:?} is not an address: {e}"));
        }
    };
    let plan = match log_plan(s, log, &address).await {
        Ok(p) => p,
        Err(o) => return o,
    };
    let request =
        kst_core::client::build_retrieval_with(&account, &address, plan.head_key.as_deref())
            .with_log_ask(plan.ask);
    send_and_wait_with(s, &account, request, Some(how), import, no_wait, plan.log).await
}

/// Records the request, sends it, and (unless `no_wait`) waits for the reply.
pub(super) async fn send_and_wait(
    s: &Settings,
    account: &Address,
    request: Request,
    direct: Option<&Direct>,
    import: bool,
    no_wait: bool,
) -> Outcome {
    send_and_wait_with(s, account, request, direct, import, no_wait, None).await
}

/// [`send_and_wait`] with the key directory checks the reply must pass (kept with the
/// pending request, so `kst client check` applies them too).
pub(super) async fn send_and_wait_with(
    s: &Settings,
    account: &Address,
    request: Request,
    direct: Option<&Direct>,
    import: bool,
    no_wait: bool,
    log: Option<super::state::LogRequirements>,
) -> Outcome {
    let dns = match s.dns() {
        Ok(d) => d,
        Err(o) => return o,
    };
    let connector = match s.connector() {
        Ok(c) => c,
        Err(o) => return o,
    };
    let service = request.pending.service.clone();
    // `Some` only when the user asked to send straight to the service's MX.
    let direct = direct.filter(|d| d.direct);
    let route = if direct.is_none() && s.sendmail.is_some() {
        None
    } else if let Some(d) = direct {
        // An MX named with --mx is the user's word (as good as a secure MX record).
        let (servers, mx_security) = match &d.mx {
            Some(mx) => match Endpoint::parse(mx, Service::Mx) {
                Ok(e) => (vec![e], DnsSecurity::Secure),
                Err(e) => return Outcome::error(exit::USAGE, format!("--mx: {e}")),
            },
            None => match dns.mx(service.domain()).await {
                Ok(found) if found.value.is_empty() => {
                    return Outcome::NoKst {
                        service: service.to_string(),
                        detail: format!("{} accepts no mail (null MX)", service.domain()),
                    };
                }
                Ok(found) => (
                    found
                        .value
                        .into_iter()
                        .map(|host| Endpoint {
                            host,
                            port: d.mx_port,
                            security: Security::StartTls,
                        })
                        .collect(),
                    found.security,
                ),
                Err(e) => return dns_outcome(e),
            },
        };
        let roots = match super::tls::roots(s.ca_file.as_deref()) {
            Ok(r) => Arc::new(r),
            Err(e) => return config_error(e),
        };
        let (servers, auth) =
            match hop_rules(s, &dns, &connector, service.domain(), servers, mx_security).await {
                Ok(r) => r,
                Err(o) => return o,
            };
        Some(Route {
            servers,
            credentials: None,
            connector: &connector,
            insecure_plaintext: s.insecure_plaintext,
            step_timeout: STEP_TIMEOUT,
            direct: Some(DirectHops {
                auth,
                roots,
                allow_plaintext: d.allow_plaintext || s.allow_plaintext || s.insecure_plaintext,
                report: &s.transport,
            }),
        })
    } else {
        let server = match &s.submission {
            Some(e) => e.clone(),
            None => match dns.submission(account.domain()).await {
                Ok(Some(e)) => e,
                Ok(None) => {
                    return config_error(format!(
                        "no submission server: give --submission HOST:PORT (no _submissions._tcp / _submission._tcp SRV record for {})",
                        account.domain()
                    ));
                }
                Err(e) => return dns_outcome(e),
            },
        };
        let credentials = match s.login(account) {
            Ok(c) => c,
            Err(o) => return o,
        };
        Some(Route {
            servers: vec![server],
            credentials: Some(credentials),
            connector: &connector,
            insecure_plaintext: s.insecure_plaintext,
            step_timeout: STEP_TIMEOUT,
            direct: None,
        })
    };

    // Open the mailbox first: a wrong password or server is reported before anything is sent,
    // and a fast reply cannot be missed.
    let mut mailbox = if no_wait {
        None
    } else {
        match open_mailbox(s, &dns, &connector, account).await {
            Ok(m) => Some(m),
            Err(o) => return o,
        }
    };

    let entry = Entry {
        pending: request.pending.clone(),
        account: account.to_string(),
        route: if direct.is_some() {
            "direct"
        } else if route.is_none() {
            "sendmail"
        } else {
            "submission"
        }
        .into(),
        import,
        log,
    };
    if let Err(e) = s.state.add(entry.clone()) {
        return Outcome::error(exit::CONFIG, e.to_string());
    }
    let bar = output::spinner(s.json);
    bar.set_message(super::terminal::line(&format!("sending to {service}")).into_owned());
    let sent = match (&route, &s.sendmail) {
        (Some(route), _) => submit::send(
            &dns,
            route,
            account.as_str(),
            service.as_str(),
            &request.message,
        )
        .await
        .map(|_| ()),
        (None, Some(cmd)) => {
            submit::sendmail(cmd, account.as_str(), service.as_str(), &request.message).await
        }
        (None, None) => Err(SendError::Temporary("no way to send".into())),
    };
    if let Err(e) = sent {
        bar.finish_and_clear();
        let _ = s.state.remove(&entry.pending.message_id);
        return match e {
            SendError::Rejected { step, message }
                if step == "RCPT TO"
                    && (direct.is_some() || service.domain() == account.domain()) =>
            {
                Outcome::NoKst {
                    service: service.to_string(),
                    detail: message,
                }
            }
            SendError::Rejected { message, .. } => Outcome::error(exit::UNAVAILABLE, message),
            SendError::Auth(m) => Outcome::error(exit::NOPERM, m),
            SendError::Tls(m) | SendError::Unusable(m) => Outcome::error(exit::UNAVAILABLE, m),
            SendError::Attack(m) => Outcome::error(exit::ATTACK, m),
            SendError::Temporary(m) => Outcome::error(exit::TEMPFAIL, m),
        };
    }
    let Some(mailbox) = mailbox.as_mut() else {
        bar.finish_and_clear();
        return pending_outcome(&entry);
    };
    let limit = s.wait_limit(DEFAULT_TIMEOUT_SECS);
    let mut results = wait_for(s, mailbox, vec![entry], limit, &bar).await;
    bar.finish_and_clear();
    results
        .pop()
        .unwrap_or_else(|| Outcome::error(exit::SOFTWARE, "no result"))
}

/// How each MX hop of a direct retrieval must be authenticated (RFC 7672 DANE first, then
/// RFC 8461 MTA-STS), and the MX hosts that may be used at all: under an MTA-STS `enforce`
/// policy only those its `mx` patterns name. Also notes the policy in the `transport` report.
async fn hop_rules(
    s: &Settings,
    dns: &Dns,
    connector: &TlsConnector,
    domain: &str,
    servers: Vec<Endpoint>,
    mx_security: DnsSecurity,
) -> Result<(Vec<Endpoint>, Vec<HopAuth>), Outcome> {
    let sts = PolicySource {
        dns,
        connector,
        cache: s.mta_sts_cache.clone(),
        port: mta_sts::policy_port(),
    }
    .policy(domain)
    .await
    .map_err(dns_outcome)?;
    let enforce = sts
        .policy
        .as_ref()
        .filter(|p| p.mode == Mode::Enforce)
        .cloned();
    let mut kept = Vec::new();
    let mut auth = Vec::new();
    let mut refused = Vec::new();
    for server in servers {
        // TLSA records count only under a secure MX RRset (RFC 7672 §2.2.2) and when they are
        // secure themselves; an IP literal has none.
        // A secure TLSA RRset of unusable records only still makes TLS mandatory (RFC 7672
        // §2.2).
        let mut dane_records = Vec::new();
        let mut tlsa_secure = false;
        if mx_security == DnsSecurity::Secure && server.host.parse::<std::net::IpAddr>().is_err() {
            let tlsa = dns.tlsa(&server.host, 25).await.map_err(dns_outcome)?;
            if tlsa.security == DnsSecurity::Secure {
                tlsa_secure = !tlsa.value.is_empty();
                dane_records = dane::usable(&tlsa.value);
            }
        }
        if !dane_records.is_empty() {
            kept.push(server);
            auth.push(HopAuth::Dane(dane_records));
        } else if let Some(p) = &enforce {
            if p.allows(&server.host) {
                kept.push(server);
                auth.push(HopAuth::MtaSts { id: p.id.clone() });
            } else {
                refused.push(server.host);
            }
        } else {
            kept.push(server);
            auth.push(if tlsa_secure {
                HopAuth::EncryptOnly
            } else {
                HopAuth::Opportunistic
            });
        }
    }
    *s.transport.lock().unwrap_or_else(|e| e.into_inner()) = Some(serde_json::json!({
        "mta_sts": sts.note,
    }));
    if kept.is_empty() {
        let p = enforce.as_ref();
        return Err(Outcome::error(
            exit::ATTACK,
            format!(
                "possible attack: {domain}'s MTA-STS policy {} (mode enforce) allows the MX hosts {}, but DNS named {}; nothing was sent",
                p.map_or("", |p| p.id.as_str()),
                p.map_or(String::new(), |p| p.mx.join(", ")),
                refused.join(", ")
            ),
        ));
    }
    Ok((kept, auth))
}

async fn open_mailbox(
    s: &Settings,
    dns: &Dns,
    connector: &TlsConnector,
    account: &Address,
) -> Result<Mailbox, Outcome> {
    if let Some(dir) = &s.maildir {
        return Mailbox::maildir(dir).map_err(fetch_outcome);
    }
    let endpoint = match &s.imap {
        Some(e) => e.clone(),
        None => match dns.imap(account.domain()).await {
            Ok(Some(e)) => e,
            Ok(None) => {
                return Err(config_error(format!(
                    "no mailbox to read replies from: give --imap HOST:PORT or --maildir PATH (no _imaps._tcp / _imap._tcp SRV record for {})",
                    account.domain()
                )));
            }
            Err(e) => return Err(dns_outcome(e)),
        },
    };
    let (user, password) = s.login(account)?;
    Mailbox::imap(
        dns,
        &ImapSettings {
            endpoint,
            user,
            password,
            connector,
            insecure_plaintext: s.insecure_plaintext,
            step_timeout: STEP_TIMEOUT,
        },
    )
    .await
    .map_err(fetch_outcome)
}

fn fetch_outcome(e: FetchError) -> Outcome {
    match e {
        FetchError::Unavailable(m) => Outcome::error(exit::TEMPFAIL, m),
        FetchError::Auth(m) => Outcome::error(exit::NOPERM, m),
        FetchError::Tls(m) => Outcome::error(exit::UNAVAILABLE, m),
    }
}

fn pending_outcome(e: &Entry) -> Outcome {
    let (kind, address) = asked_kind_and_address(&e.pending);
    Outcome::Pending {
        service: e.pending.service.to_string(),
        message_id: e.pending.message_id.clone(),
        kind: kind.into(),
        address,
    }
}

/// What a pending request asked (`publication`, ...) and about which address.
fn asked_kind_and_address(p: &Pending) -> (&'static str, String) {
    match &p.asked {
        Asked::Publication { account, .. } => ("publication", account.to_string()),
        Asked::Retrieval { address } => ("retrieval", address.to_string()),
        Asked::Deletion { account } => ("deletion", account.to_string()),
    }
}

/// Waits up to `limit` for the replies to `entries`; returns one outcome per entry, in order.
/// A reply that fails verification is reported as an attack but the wait goes on: the genuine
/// reply may still come.
async fn wait_for(
    s: &Settings,
    mailbox: &mut Mailbox,
    entries: Vec<Entry>,
    limit: Duration,
    bar: &indicatif::ProgressBar,
) -> Vec<Outcome> {
    let deadline = Instant::now() + limit;
    // The resolver for DKIM key look-ups (the same one as for SRV and MX).
    let dns = s.dns();
    let mut results: Vec<Option<Outcome>> = vec![None; entries.len()];
    let mut attacks: Vec<Option<Outcome>> = vec![None; entries.len()];
    let services: Vec<String> = entries
        .iter()
        .map(|e| e.pending.service.to_string())
        .collect();
    bar.set_message(
        super::terminal::line(&format!(
            "waiting for the reply from {} ({})",
            services.join(", "),
            mailbox.how_read()
        ))
        .into_owned(),
    );
    loop {
        let open: Vec<Pending> = entries
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_none())
            .map(|(e, _)| e.pending.clone())
            .collect();
        if open.is_empty() {
            break;
        }
        match mailbox.scan(&open).await {
            Ok(found) => {
                for m in found {
                    let Some(i) = entries
                        .iter()
                        .position(|e| e.pending.message_id == m.message_id())
                    else {
                        continue;
                    };
                    if results[i].is_some() {
                        continue;
                    }
                    let dkim = match &m {
                        Matched::Reply {
                            result: Ok(_), raw, ..
                        } => Some(check_dkim(s, &dns, &entries[i], raw).await),
                        _ => None,
                    };
                    let (log_answer, reply_id) = match &m {
                        Matched::Reply {
                            log_answer,
                            reply_id,
                            ..
                        } => (log_answer.clone(), reply_id.clone()),
                        Matched::Bounce { .. } => (None, None),
                    };
                    let o = interpret(&entries[i], m);
                    let o = match dkim {
                        Some(report) => apply_dkim(s, &entries[i], o, report),
                        None => o,
                    };
                    // A reply whose HMAC verified but whose key directory answer does not
                    // confirm it came from the KST itself: final, no genuine reply will follow.
                    let attack_before = matches!(o, Outcome::Attack { .. });
                    let o = reply_proof(
                        s,
                        &entries[i],
                        log_answer.as_deref(),
                        reply_id.as_deref(),
                        o,
                    )
                    .await;
                    let proof_failed = !attack_before && matches!(o, Outcome::Attack { .. });
                    match o {
                        o @ Outcome::Attack { .. } if !proof_failed => {
                            if !s.json {
                                bar.suspend(|| o.print_text());
                            }
                            attacks[i] = Some(o);
                        }
                        o => {
                            let o = finish_entry(&entries[i], o);
                            super::refresh::note_import(s, &o);
                            #[cfg(feature = "transparency")]
                            note_own_publication(s, &o);
                            #[cfg(feature = "transparency")]
                            note_own_deletion(s, &entries[i], &o);
                            let _ = s.state.remove(&entries[i].pending.message_id);
                            results[i] = Some(o);
                        }
                    }
                }
            }
            Err(e) => {
                // The requests stay pending; `check` can finish them.
                let o = fetch_outcome(e);
                return results
                    .into_iter()
                    .map(|r| r.unwrap_or_else(|| o.clone()))
                    .collect();
            }
        }
        let now = Instant::now();
        if results.iter().all(Option::is_some) || now >= deadline {
            break;
        }
        if let Err(e) = mailbox.wait(deadline - now).await {
            let o = fetch_outcome(e);
            return results
                .into_iter()
                .map(|r| r.unwrap_or_else(|| o.clone()))
                .collect();
        }
    }
    results
        .into_iter()
        .zip(attacks)
        .zip(&entries)
        .map(|((r, a), e)| r.or(a).unwrap_or_else(|| pending_outcome(e)))
        .collect()
}

/// The key directory checks the request asked for: protocol version 3's answer inside the
/// reply ([`super::transparency::check_reply_answer`]), then `--check-transparency`'s
/// answer over HTTP ([`super::transparency::check`]); a request without either is returned
/// as it is. `reply_id`: the reply's own Message-ID, named in the evidence of a failed check.
async fn reply_proof(
    s: &Settings,
    e: &Entry,
    log_answer: Option<&str>,
    reply_id: Option<&str>,
    o: Outcome,
) -> Outcome {
    let http = e.log.as_ref().filter(|l| l.http);
    if e.pending.head_key.is_none() && http.is_none() {
        return o;
    }
    #[cfg(feature = "transparency")]
    {
        let v3 = e.pending.head_key.is_some();
        let reply = super::transparency::ReplyRef {
            request_id: e.pending.message_id.clone(),
            reply_id: reply_id.map(str::to_string),
        };
        let o = match v3 {
            true => super::transparency::check_reply_answer(s, e, log_answer, &reply, o).await,
            false => o,
        };
        match http {
            Some(r) => {
                let args = super::transparency::LogCheckArgs::from_requirements(r, v3);
                let verified = super::transparency::VerifiedBefore::of(r);
                super::transparency::check(s, &args, o, &verified, &reply).await
            }
            None => o,
        }
    }
    #[cfg(not(feature = "transparency"))]
    {
        let _ = (s, log_answer, reply_id, o);
        Outcome::error(
            exit::SOFTWARE,
            "this request asked for the key directory's proof, and this kst was built without the `transparency` feature to check it",
        )
    }
}

/// Remembers a confirmed publication's fingerprint as the account's own (the owner's monitor
/// in `status` reports versions of the address that are not); a failure is only reported.
#[cfg(feature = "transparency")]
fn note_own_publication(s: &Settings, o: &Outcome) {
    if let Outcome::Published {
        account,
        fingerprint,
        ..
    } = o
    {
        let memory = super::log_memory::LogMemory::beside(s.state.path());
        if let Err(e) = memory.note_own_fingerprint(account, fingerprint) {
            eprintln!("kst: warning: {e}");
        }
    }
}

/// Remembers a confirmed deletion of the account's key, with when it was asked for and when
/// confirmed (the owner's monitor in `status` reports deletions in the directory that are not
/// among them); a failure is only reported.
#[cfg(feature = "transparency")]
fn note_own_deletion(s: &Settings, e: &Entry, o: &Outcome) {
    if let (Outcome::Deleted { .. }, Asked::Deletion { account }) = (o, &e.pending.asked) {
        let memory = super::log_memory::LogMemory::beside(s.state.path());
        let now = kst_core::time::unix_now();
        if let Err(e) = memory.note_own_deletion(account.as_str(), e.pending.created_at, now) {
            eprintln!("kst: warning: {e}");
        }
    }
}

/// Turns a matched message into the request's outcome.
fn interpret(e: &Entry, m: Matched) -> Outcome {
    let service = e.pending.service.to_string();
    match m {
        Matched::Bounce { detail, .. } => Outcome::NoKst { service, detail },
        Matched::Reply {
            result, message_id, ..
        } => match result {
            Ok(Verified::Published {
                fingerprint,
                armored,
            }) => Outcome::Published {
                account: e.account.clone(),
                fingerprint,
                service,
                message_id,
                key: armored,
                dkim: None,
            },
            Ok(Verified::Found {
                address,
                fingerprint,
                armored,
                user_ids,
            }) => Outcome::Found {
                address: address.to_string(),
                fingerprint,
                user_ids,
                service,
                message_id,
                key: armored,
                imported: false,
                dkim: None,
            },
            Ok(Verified::Deleted { address }) => Outcome::Deleted {
                address: address.to_string(),
                service,
                dkim: None,
            },
            Ok(Verified::NotFound { address }) => Outcome::NotFound {
                address: address.to_string(),
                service,
                dkim: None,
            },
            Ok(Verified::Refused {
                token,
                explanation,
                authenticated,
                ..
            }) => Outcome::Refused {
                service,
                reason: token,
                explanation,
                authenticated,
                dkim: None,
            },
            Err(ReplyError::NotKst) => Outcome::NoKst {
                service,
                detail: "the answer is not a KST reply".into(),
            },
            // The request offered versions 2 and 1 with hmac-sha256, and a KST answers in one
            // of those (an older one in 1, a newer one in 2; `unsupported-version` refusals are
            // version 1). Any other label was put there on the way: a forged or relabelled
            // reply, never used, and the request keeps waiting for the genuine one.
            Err(ReplyError::Version(v)) => Outcome::Attack {
                service,
                message_id,
                error: format!(
                    "the reply says KST protocol version {v:?}, which the request did not offer: forged or altered in transit (possible attack)"
                ),
            },
            Err(ReplyError::Mac(m)) => Outcome::Attack {
                service,
                message_id,
                error: format!(
                    "the reply says MAC algorithm {m:?}, which the request did not offer: forged or altered in transit (possible attack)"
                ),
            },
            Err(err @ ReplyError::NotThisRequest(_)) => {
                Outcome::error(exit::SOFTWARE, err.to_string())
            }
            Err(err) => Outcome::Attack {
                service,
                message_id,
                error: err.to_string(),
            },
        },
    }
}

/// Checks the DKIM signature of a reply whose HMAC verified, against the domain the request
/// went to and kst's selector, through the client's resolver.
async fn check_dkim(
    s: &Settings,
    dns: &Result<Dns, Outcome>,
    e: &Entry,
    raw: &[u8],
) -> super::dkim::DkimReport {
    let domain = e.pending.service.domain();
    match dns {
        Ok(d) => {
            let mut report = super::dkim::verify(d.resolver(), raw, domain, &s.dkim_selector).await;
            if s.require_dnssec {
                report.require_secure_key();
            }
            report
        }
        Err(o) => super::dkim::DkimReport {
            result: super::dkim::DkimStatus::TempError,
            domain: domain.to_string(),
            selector: None,
            algorithm: None,
            dnssec: None,
            detail: format!("no resolver for the key look-up: {o:?}"),
        },
    }
}

/// Attaches the DKIM report to the outcome; with `--require-dkim` a reply without an aligned,
/// valid signature is an attack (exit 5), whatever its HMAC said.
fn apply_dkim(s: &Settings, e: &Entry, o: Outcome, report: super::dkim::DkimReport) -> Outcome {
    let is_reply = matches!(
        o,
        Outcome::Published { .. }
            | Outcome::Found { .. }
            | Outcome::NotFound { .. }
            | Outcome::Deleted { .. }
            | Outcome::Refused { .. }
    );
    if s.require_dkim && is_reply && !report.pass() {
        return Outcome::Attack {
            service: e.pending.service.to_string(),
            message_id: e.pending.message_id.clone(),
            error: format!(
                "DKIM is required (--require-dkim) and the reply has no valid signature by {} \
                 with kst's selector ({}): {}",
                report.domain,
                s.dkim_selector,
                report.describe()
            ),
        };
    }
    o.with_dkim(report)
}

/// Imports a found key when the request asked for it.
fn finish_entry(e: &Entry, o: Outcome) -> Outcome {
    if e.import { import_found(o) } else { o }
}

/// Imports the key of a `Found` outcome into gpg.
fn import_found(o: Outcome) -> Outcome {
    match o {
        Outcome::Found {
            address,
            fingerprint,
            user_ids,
            service,
            message_id,
            key,
            dkim,
            ..
        } => match gpg_import(&key) {
            Ok(()) => Outcome::Found {
                address,
                fingerprint,
                user_ids,
                service,
                message_id,
                key,
                imported: true,
                dkim,
            },
            Err(err) => Outcome::error(
                exit::UNAVAILABLE,
                format!("the key {fingerprint} for {address} verified, but {err}"),
            ),
        },
        o => o,
    }
}

fn pending(s: &Settings) -> u8 {
    let entries = match s.state.list() {
        Ok(e) => e,
        Err(e) => {
            return output::finish(&[Outcome::error(exit::CONFIG, e.to_string())], s.json, true);
        }
    };
    if s.json {
        let now = kst_core::time::unix_now();
        let list: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                let (kind, address) = asked_kind_and_address(&e.pending);
                serde_json::json!({
                    "message_id": e.pending.message_id,
                    "kind": kind,
                    "address": address,
                    "account": e.account,
                    "service": e.pending.service.to_string(),
                    "route": e.route,
                    "import": e.import,
                    "created_at": e.pending.created_at,
                    "age_secs": now.saturating_sub(e.pending.created_at),
                })
            })
            .collect();
        super::terminal::print_json(&list, "[]");
    } else if entries.is_empty() {
        eprintln!("kst: no pending requests ({})", s.state.path().display());
    } else {
        let now = kst_core::time::unix_now();
        for e in &entries {
            let (kind, address) = asked_kind_and_address(&e.pending);
            output::out(format!(
                "{:<11} {:<32} via {:<10} for {:<28} {:>6}s  <{}>",
                kind,
                address,
                e.route,
                e.account,
                now.saturating_sub(e.pending.created_at),
                e.pending.message_id
            ));
        }
    }
    exit::OK
}

async fn check(s: &Settings, wait: bool, import: bool) -> Vec<Outcome> {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return vec![o],
    };
    let entries: Vec<Entry> = match s.state.list() {
        Ok(all) => all
            .into_iter()
            .filter(|e| e.account == account.as_str())
            .map(|mut e| {
                e.import |= import;
                e
            })
            .collect(),
        Err(e) => return vec![Outcome::error(exit::CONFIG, e.to_string())],
    };
    if entries.is_empty() {
        if !s.json {
            eprintln!("kst: no pending requests for {account}");
        }
        return Vec::new();
    }
    let dns = match s.dns() {
        Ok(d) => d,
        Err(o) => return vec![o],
    };
    let connector = match s.connector() {
        Ok(c) => c,
        Err(o) => return vec![o],
    };
    let mut mailbox = match open_mailbox(s, &dns, &connector, &account).await {
        Ok(m) => m,
        Err(o) => return vec![o],
    };
    let limit = if wait {
        s.wait_limit(DEFAULT_TIMEOUT_SECS)
    } else {
        s.wait_limit(0)
    };
    let bar = output::spinner(s.json || !wait);
    let results = wait_for(s, &mut mailbox, entries, limit, &bar).await;
    bar.finish_and_clear();
    mailbox.close().await;
    results
}

/// `gpg --armor --export WHO`.
pub(super) fn gpg_export(who: &str) -> Result<String, String> {
    let out = Command::new("gpg")
        .args(["--batch", "--armor", "--export", "--", who])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run gpg: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !text.contains("BEGIN PGP PUBLIC KEY BLOCK") {
        return Err(format!(
            "gpg has no public key {who:?} to export ({})",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(text)
}

/// `gpg --import` of `armored`.
fn gpg_import(armored: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("gpg")
        .args(["--batch", "--quiet", "--import"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run gpg: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(armored.as_bytes())
            .map_err(|e| format!("cannot feed gpg: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("gpg failed: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "gpg --import failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
