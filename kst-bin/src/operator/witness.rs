//! `kst log witness` and `kst log audit` (features `transparency` + `client`): a third party
//! follows a domain's key directory over HTTP (docs/TRANSPARENCY.md, "Signed heads,
//! witnesses"; docs/OPERATIONS.md, "Running a witness").
//!
//! Both fetch the newest signed head, check its signature with the domain's pinned head key,
//! and check the append-only proofs (`.../audit?from=A&to=B`, in ranges of at most
//! `MAX_AUDIT_EPOCHS`, halved while the log answers 422: a proof over what a witness
//! accepts) from the last head they accepted, kept durably in the state
//! directory (`<state>/<domain>.head`). The witness then cosigns the head and hands the
//! cosignature to the KST (`--submit`) or prints it; the auditor only remembers it.
//!
//! A fork (two roots for one epoch, an epoch going backwards, a proof that fails, a head not
//! signed by the pinned key) is never signed: exit 5, and the evidence (the remembered head
//! and what the log served instead) is written to `<state>/fork-<epoch>-<time>.txt`. A log
//! that cannot be reached is exit 75 (try again later). So is an audit the log does not serve
//! (a 503 when its own check refuses it), unless the head it serves for the accepted epoch is
//! signed with its key and names another root: two signed heads for one epoch, a fork
//! (`Follower::accepted_head_still_served`).
//!
//! A round holds an exclusive lock on `<state>/<domain>.lock` from reading the remembered head
//! to writing the new one (written atomically): two runs on one state directory (a cron job
//! next to a `--interval` loop) take turns, so neither cosigns a head the other's accepted
//! head does not extend (two first heads on trust at once would be a fork, cosigned). A run
//! that waits longer than [`LOCK_WAIT`] for the lock exits 75.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Subcommand;
use fs4::fs_std::FileExt;
use kst_core::durable::write_atomic;
use kst_core::time::unix_now;
use kst_core::transparency::answer::{head_text, hex32, parse_head};
use kst_core::transparency::witness::{
    AuditAnswer, MAX_AUDIT_EPOCHS, MAX_AUDIT_TEXT, MAX_HEAD_TEXT, check_follows,
    head_with_cosignatures_text, parse_head_with_cosignatures, parse_witness,
};
use kst_core::transparency::{HeadSigner, SignedHead};
use zeroize::Zeroizing;

use super::wks::write_private;
use crate::client::transparency::fetch;
use crate::exit;
use crate::terminal::Safe;

/// Exit code of a fork, a failing proof or a head not signed by the pinned key.
pub const ATTACK: u8 = 5;
/// Largest witness key file read.
const MAX_KEY_FILE: u64 = 4096;
/// How long a round waits for another run on the same state directory to finish its round.
pub const LOCK_WAIT: Duration = Duration::from_secs(30);

/// `kst log witness ...`.
#[derive(Debug, Subcommand)]
pub enum WitnessCommand {
    /// Make a witness key (Ed25519), write it to FILE (mode 0600) and print the public key
    /// and the `[transparency] witnesses` entry a KST lists to accept its cosignatures.
    /// Example: kst log witness keygen --output /var/lib/kst-witness/witness.key --name witness.example.org
    Keygen {
        /// Write the secret key to FILE.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// The witness's name in the printed entry.
        #[arg(long, default_value = "witness")]
        name: String,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
    /// Follow DOMAIN's key directory and cosign every head whose append-only proof from the
    /// last cosigned head verifies. A fork is never cosigned: exit 5, evidence in --state.
    /// Example: kst log witness run --log-url https://example.net --domain example.net --log-key HEX --key witness.key --state /var/lib/kst-witness --submit --interval 60
    Run {
        /// Where the domain's key directory is served (`scheme://host[:port]`).
        #[arg(long = "log-url", value_name = "URL")]
        log_url: String,
        /// The domain, its head key, the state directory and the schedule.
        #[command(flatten)]
        follow: FollowArgs,
        /// The witness key file (`kst log witness keygen`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Hand each cosignature to the KST (`POST .../cosignature`); without it, print it.
        #[arg(long)]
        submit: bool,
    },
}

/// What `kst log witness run` and `kst log audit` share.
#[derive(Debug, Clone, clap::Args)]
pub struct FollowArgs {
    /// The served domain.
    #[arg(long)]
    pub domain: String,
    /// The domain's head key, 64 hex digits (published by the domain; `kst log keygen`
    /// prints it).
    #[arg(long = "log-key", value_name = "HEX")]
    pub log_key: String,
    /// Where the last accepted head (and any fork evidence) is kept.
    #[arg(long, value_name = "DIR")]
    pub state: PathBuf,
    /// One round, then exit.
    #[arg(long)]
    pub once: bool,
    /// Seconds between rounds.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub interval: u64,
    /// CA certificates (PEM) to trust for an https:// log besides the system's.
    #[arg(long = "ca-file", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// Why a round failed.
#[derive(Debug)]
enum Failure {
    /// Try again later (exit 75).
    Temporary(String),
    /// A fork or a forged head: exit 5, evidence written.
    Attack(String),
    /// Local trouble (state directory, key file): the exit code given.
    Local(u8, String),
}

impl Failure {
    /// Prints the failure, terminal-safe: its text can quote the log (an error page's first
    /// line, a forged head), which could otherwise carry escape sequences that rewrite the
    /// report on the operator's screen (red-team round 6).
    fn report(&self) -> u8 {
        match self {
            Failure::Temporary(m) => {
                eprintln!("kst: {} (temporary; try again later)", Safe(m));
                exit::TEMPFAIL
            }
            Failure::Attack(m) => {
                eprintln!("kst: ATTACK: {}", Safe(m));
                ATTACK
            }
            Failure::Local(code, m) => {
                eprintln!("kst: {}", Safe(m));
                *code
            }
        }
    }
}

/// A domain's log followed from a state directory.
struct Follower {
    args: FollowArgs,
    log_url: String,
    head_key: [u8; 32],
    state_file: PathBuf,
    lock_file: PathBuf,
}

impl Follower {
    fn new(log_url: String, args: FollowArgs) -> Result<Self, Failure> {
        let head_key = hex32(&args.log_key)
            .map_err(|_| Failure::Local(exit::USAGE, "--log-key: want 64 hex digits".into()))?;
        let domain = args
            .domain
            .trim()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        if domain.is_empty()
            || !domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        {
            return Err(Failure::Local(
                exit::USAGE,
                format!("--domain {:?}: want a domain name (A-labels)", args.domain),
            ));
        }
        std::fs::create_dir_all(&args.state).map_err(|e| {
            Failure::Local(
                exit::CANTCREAT,
                format!(
                    "cannot create the state directory {}: {e}",
                    args.state.display()
                ),
            )
        })?;
        let state_file = args.state.join(format!("{domain}.head"));
        let lock_file = args.state.join(format!("{domain}.lock"));
        let args = FollowArgs { domain, ..args };
        Ok(Follower {
            args,
            log_url,
            head_key,
            state_file,
            lock_file,
        })
    }

    /// Locks the domain's state for one round (released when the file is dropped); waits
    /// at most [`LOCK_WAIT`] for another run's round, then fails as temporary.
    async fn lock(&self) -> Result<File, Failure> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&self.lock_file)
            .map_err(|e| {
                Failure::Local(
                    exit::CANTCREAT,
                    format!("cannot open {}: {e}", self.lock_file.display()),
                )
            })?;
        let deadline = Instant::now() + LOCK_WAIT;
        loop {
            match FileExt::try_lock_exclusive(&file) {
                Ok(true) => return Ok(file),
                Ok(false) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Ok(false) => {
                    return Err(Failure::Temporary(format!(
                        "another kst log witness or audit run holds {} for over {}s",
                        self.lock_file.display(),
                        LOCK_WAIT.as_secs()
                    )));
                }
                Err(e) => {
                    return Err(Failure::Local(
                        exit::CANTCREAT,
                        format!("cannot lock {}: {e}", self.lock_file.display()),
                    ));
                }
            }
        }
    }

    fn path(&self, rest: &str) -> String {
        format!("/.well-known/kst/log/{}/{rest}", self.args.domain)
    }

    async fn get(&self, rest: &str, limit: usize) -> Result<String, Failure> {
        match self.get_status(rest, limit).await? {
            (hyper::StatusCode::OK, text) => Ok(text),
            (status, text) => Err(self.not_ok(rest, status, &text)),
        }
    }

    /// [`Follower::get`] with the answer's status, whatever it is.
    async fn get_status(
        &self,
        rest: &str,
        limit: usize,
    ) -> Result<(hyper::StatusCode, String), Failure> {
        fetch(
            &self.log_url,
            hyper::Method::GET,
            &self.path(rest),
            None,
            self.args.ca_file.as_deref(),
            limit,
        )
        .await
        .map_err(Failure::Temporary)
    }

    /// The failure of an answer to `rest` that is not 200.
    fn not_ok(&self, rest: &str, status: hyper::StatusCode, text: &str) -> Failure {
        Failure::Temporary(format!(
            "{}{} answered {status}: {}",
            self.log_url,
            self.path(rest),
            text.lines().next().unwrap_or("")
        ))
    }

    /// The last accepted head, if any.
    fn remembered(&self) -> Result<Option<SignedHead>, Failure> {
        let text = match std::fs::read(&self.state_file) {
            Ok(t) if t.len() as u64 <= MAX_KEY_FILE => t,
            Ok(_) => {
                return Err(Failure::Local(
                    exit::DATAERR,
                    format!("{} is too large to be a head", self.state_file.display()),
                ));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Failure::Local(
                    exit::NOINPUT,
                    format!("cannot read {}: {e}", self.state_file.display()),
                ));
            }
        };
        let head = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| parse_head(t).ok())
            .filter(|h| h.head.domain == self.args.domain && h.verify(&self.head_key).is_ok())
            .ok_or_else(|| {
                Failure::Local(
                    exit::DATAERR,
                    format!(
                        "{} is not a head of {} signed by --log-key; move it away to start over",
                        self.state_file.display(),
                        self.args.domain
                    ),
                )
            })?;
        Ok(Some(head))
    }

    /// Remembers `head` durably.
    fn remember(&self, head: &SignedHead) -> Result<(), Failure> {
        let text = head_text(head).map_err(|e| Failure::Local(exit::SOFTWARE, e.to_string()))?;
        write_atomic(&self.state_file, text.as_bytes()).map_err(|e| {
            Failure::Local(
                exit::CANTCREAT,
                format!("cannot write {}: {e}", self.state_file.display()),
            )
        })
    }

    /// Writes the evidence of a fork and returns the failure.
    fn fork(&self, epoch: u64, what: &str, remembered: &SignedHead, served: &str) -> Failure {
        let path = self
            .args
            .state
            .join(format!("fork-{epoch}-{}.txt", unix_now()));
        let remembered = head_text(remembered).unwrap_or_default();
        let evidence = format!(
            "# kst log fork evidence for {}\n# {what}\n# the head accepted before:\n{remembered}\
             # what {} served:\n{served}",
            self.args.domain, self.log_url
        );
        let saved = match write_atomic(&path, evidence.as_bytes()) {
            Ok(()) => format!("evidence in {}", path.display()),
            Err(e) => format!(
                "the evidence could not be written to {}: {e}",
                path.display()
            ),
        };
        Failure::Attack(format!("{}: {what}; {saved}", self.args.domain))
    }

    /// The newest head (signature checked) and its cosignatures' text.
    async fn newest(&self) -> Result<(SignedHead, String), Failure> {
        let text = self.get("head", MAX_HEAD_TEXT).await?;
        let (head, _) = parse_head_with_cosignatures(&text)
            .map_err(|e| Failure::Temporary(format!("the log's head: {e}")))?;
        if head.head.domain != self.args.domain {
            return Err(Failure::Attack(format!(
                "the log at {} served a head of {}, not {}",
                self.log_url, head.head.domain, self.args.domain
            )));
        }
        if let Err(e) = head.verify(&self.head_key) {
            return Err(Failure::Attack(format!("the newest head: {e}")));
        }
        Ok((head, text))
    }

    /// The head of `epoch` (signature checked).
    async fn head_at(&self, epoch: u64) -> Result<SignedHead, Failure> {
        let text = self.get(&format!("head/{epoch}"), MAX_HEAD_TEXT).await?;
        let (head, _) = parse_head_with_cosignatures(&text)
            .map_err(|e| Failure::Temporary(format!("the log's head of epoch {epoch}: {e}")))?;
        if head.head.domain != self.args.domain || head.head.epoch != epoch {
            return Err(Failure::Attack(format!(
                "asked for the head of epoch {epoch}, the log served epoch {} of {}",
                head.head.epoch, head.head.domain
            )));
        }
        head.verify(&self.head_key)
            .map_err(|e| Failure::Attack(format!("the head of epoch {epoch}: {e}")))?;
        Ok(head)
    }

    /// Checks that `new` extends `old` only by appending, stepping through audit answers.
    /// Returns the number of epochs checked.
    async fn extends(
        &self,
        old: &SignedHead,
        new: &SignedHead,
        new_text: &str,
    ) -> Result<u64, Failure> {
        if let Err(e) = check_follows(&old.head, &new.head) {
            return Err(self.fork(new.head.epoch, &e.to_string(), old, new_text));
        }
        let mut at = old.clone();
        // Epochs asked for in one audit: halved while the log answers that the proof is larger
        // than a witness accepts (422), so busy epochs are checked in shorter ranges.
        let mut span = MAX_AUDIT_EPOCHS;
        while at.head.epoch < new.head.epoch {
            let to = new.head.epoch.min(
                at.head
                    .epoch
                    .saturating_add(span - 1)
                    .max(at.head.epoch + 1),
            );
            let path = format!("audit?from={}&to={to}", at.head.epoch);
            let text = match self.get_status(&path, MAX_AUDIT_TEXT).await? {
                (hyper::StatusCode::UNPROCESSABLE_ENTITY, _) if to - at.head.epoch > 1 => {
                    span = (to - at.head.epoch).div_ceil(2).max(2);
                    continue;
                }
                (hyper::StatusCode::OK, text) => text,
                (status, text) => {
                    // Not served (a 503 when the log's own check refused the audit: a stored
                    // head naming another root than its tree, docs/SECURITY.md R8): the head
                    // it serves for the accepted epoch may still be evidence.
                    self.accepted_head_still_served(&at).await?;
                    return Err(self.not_ok(&path, status, &text));
                }
            };
            let answer = AuditAnswer::parse(&text).map_err(|e| {
                Failure::Temporary(format!(
                    "the audit answer from {} to {to}: {e}",
                    at.head.epoch
                ))
            })?;
            let first_ok = answer.heads.first().is_some_and(|h| {
                h.head.epoch == at.head.epoch && h.head.root_hash == at.head.root_hash
            });
            let last_ok = answer.heads.last().is_some_and(|h| h.head.epoch == to);
            if !first_ok || !last_ok {
                return Err(self.fork(
                    at.head.epoch,
                    &format!(
                        "the audit answer from {} to {to} does not start at the accepted head of \
                         epoch {} or does not end at {to}",
                        at.head.epoch, at.head.epoch
                    ),
                    &at,
                    &text,
                ));
            }
            let last = match answer.verify(&self.head_key).await {
                Ok(last) => last.clone(),
                Err(e) => {
                    return Err(self.fork(
                        at.head.epoch,
                        &format!(
                            "the append-only proof from {} to {to} fails: {e}",
                            at.head.epoch
                        ),
                        &at,
                        &text,
                    ));
                }
            };
            at = last;
        }
        if at.head.root_hash != new.head.root_hash {
            return Err(self.fork(
                new.head.epoch,
                &format!(
                    "two different roots for epoch {}: the audit's and the newest head's",
                    new.head.epoch
                ),
                &at,
                new_text,
            ));
        }
        Ok(new.head.epoch - old.head.epoch)
    }

    /// After an audit from `at` (the head accepted last) was not served: the head the log
    /// serves for `at`'s epoch now (`/head/<epoch>`). One signed with the log's key that names
    /// another root (or VRF key) than `at` is a fork, whatever the log says of its audits: two
    /// heads the log signed for one epoch, evidence that needs no proof of the log's (exit 5,
    /// both heads kept). Anything else (the same head, no answer, a head that does not verify:
    /// anyone can serve that) leaves the audit's failure temporary. Before, a head of the
    /// accepted epoch forged in the log's store with its key stalled the witness with 503s and
    /// left nobody outside any evidence (docs/SECURITY.md, R8).
    async fn accepted_head_still_served(&self, at: &SignedHead) -> Result<(), Failure> {
        let epoch = at.head.epoch;
        let Ok((hyper::StatusCode::OK, text)) = self
            .get_status(&format!("head/{epoch}"), MAX_HEAD_TEXT)
            .await
        else {
            return Ok(());
        };
        let Ok((served, _)) = parse_head_with_cosignatures(&text) else {
            return Ok(());
        };
        let signed = served.head.domain == self.args.domain
            && served.head.epoch == epoch
            && served.verify(&self.head_key).is_ok();
        let other = served.head.root_hash != at.head.root_hash
            || served.head.vrf_public_key != at.head.vrf_public_key;
        if !(signed && other) {
            return Ok(());
        }
        Err(self.fork(
            epoch,
            &format!(
                "the log serves no audit from epoch {epoch}, and its head of epoch {epoch}, \
                 signed with its key, names root {} where the head accepted for that epoch \
                 names {}: two signed heads for one epoch",
                hex::encode(served.head.root_hash),
                hex::encode(at.head.root_hash)
            ),
            at,
            &text,
        ))
    }

    /// Runs `round` once or every `--interval` seconds until a round fails with something
    /// other than a temporary error.
    async fn repeat<F, Fut>(&self, mut round: F) -> u8
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<(), Failure>>,
    {
        loop {
            let result = round().await;
            if self.args.once {
                return match result {
                    Ok(()) => exit::OK,
                    Err(f) => f.report(),
                };
            }
            match result {
                Ok(()) => {}
                Err(f @ Failure::Temporary(_)) => {
                    f.report();
                }
                Err(f) => return f.report(),
            }
            tokio::time::sleep(Duration::from_secs(self.args.interval.max(1))).await;
        }
    }
}

/// Runs `kst log witness ...`.
pub async fn run_witness(cmd: WitnessCommand) -> u8 {
    match cmd {
        WitnessCommand::Keygen {
            output,
            name,
            force,
        } => keygen(&output, &name, force),
        WitnessCommand::Run {
            log_url,
            follow,
            key,
            submit,
        } => {
            let signer = match read_key(&key) {
                Ok(s) => s,
                Err(f) => return f.report(),
            };
            let follower = match Follower::new(log_url, follow) {
                Ok(f) => f,
                Err(f) => return f.report(),
            };
            follower
                .repeat(|| witness_round(&follower, &signer, submit))
                .await
        }
    }
}

/// Runs `kst log audit ...`: follows the log from the remembered head, or from epoch 0.
pub async fn run_audit(log_url: String, follow: FollowArgs) -> u8 {
    let follower = match Follower::new(log_url, follow) {
        Ok(f) => f,
        Err(f) => return f.report(),
    };
    follower.repeat(|| audit_round(&follower)).await
}

async fn audit_round(f: &Follower) -> Result<(), Failure> {
    let _held = f.lock().await?;
    let old = match f.remembered()? {
        Some(h) => h,
        None => f.head_at(0).await?,
    };
    let (new, text) = f.newest().await?;
    let checked = f.extends(&old, &new, &text).await?;
    f.remember(&new)?;
    println!(
        "{} epoch {} root {}: {checked} epoch(s) verified append-only since epoch {}",
        f.args.domain,
        new.head.epoch,
        hex::encode(new.head.root_hash),
        old.head.epoch
    );
    Ok(())
}

async fn witness_round(f: &Follower, signer: &HeadSigner, submit: bool) -> Result<(), Failure> {
    // From the remembered head to the new one, and the cosignature handed in, under the lock.
    let _held = f.lock().await?;
    let (new, text) = f.newest().await?;
    let checked = match f.remembered()? {
        Some(old) => f.extends(&old, &new, &text).await?,
        // The first head is taken on trust (there is nothing to compare it with); every later
        // one must extend it.
        None => 0,
    };
    let cosignature = signer
        .cosign(&new, unix_now())
        .map_err(|e| Failure::Local(exit::SOFTWARE, e.to_string()))?;
    f.remember(&new)?;
    let body = head_with_cosignatures_text(&new, std::slice::from_ref(&cosignature))
        .map_err(|e| Failure::Local(exit::SOFTWARE, e.to_string()))?;
    if submit {
        let path = f.path("cosignature");
        let (status, answer) = fetch(
            &f.log_url,
            hyper::Method::POST,
            &path,
            Some(body.into_bytes()),
            f.args.ca_file.as_deref(),
            4096,
        )
        .await
        .map_err(Failure::Temporary)?;
        if !status.is_success() {
            return Err(Failure::Temporary(format!(
                "{}{path} refused the cosignature ({status}): {}",
                f.log_url,
                answer.lines().next().unwrap_or("")
            )));
        }
        eprintln!(
            "kst: cosigned {} epoch {} ({checked} epoch(s) verified) and handed it in",
            f.args.domain, new.head.epoch
        );
    } else {
        print!("{body}");
    }
    Ok(())
}

/// Reads a witness key file (mode 0600).
fn read_key(path: &Path) -> Result<HeadSigner, Failure> {
    let bad = |what: String| Failure::Local(exit::CONFIG, format!("{}: {what}", path.display()));
    crate::shared::config::check_key_file_mode(path).map_err(bad)?;
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if meta.len() > MAX_KEY_FILE {
        return Err(bad("too large to be a witness key file".into()));
    }
    let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?);
    let hex_seed = text
        .lines()
        .find_map(|l| l.strip_prefix("witness-key:"))
        .ok_or_else(|| bad("no `witness-key:` line (kst log witness keygen writes one)".into()))?;
    let seed = Zeroizing::new(
        hex32(hex_seed).map_err(|_| bad("the witness key is not 64 hex digits".into()))?,
    );
    Ok(HeadSigner::from_bytes(&seed))
}

fn keygen(output: &Path, name: &str, force: bool) -> u8 {
    if let Err(e) = parse_witness(&format!("{name}:{}", "0".repeat(64))) {
        eprintln!("kst: --name: {e}");
        return exit::USAGE;
    }
    if !force && output.exists() {
        eprintln!(
            "kst: {} exists; keeping it (--force replaces it: KSTs then need the new key)",
            output.display()
        );
        return exit::CANTCREAT;
    }
    let signer = HeadSigner::generate();
    let text = Zeroizing::new(format!(
        "# kst witness key: keep secret; KSTs list the public key in [transparency] witnesses\n\
         witness-key: {}\n",
        hex::encode(*signer.to_bytes())
    ));
    if let Err(e) = write_private(output, text.as_bytes()) {
        eprintln!("kst: cannot write {}: {e}", output.display());
        return exit::CANTCREAT;
    }
    let public = hex::encode(signer.public_key());
    eprintln!("kst: wrote the witness key to {}", output.display());
    println!("witness-key {public}");
    println!("witnesses = [\"{name}:{public}\"]");
    exit::OK
}
