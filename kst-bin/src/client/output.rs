//! What a client command reports: one [`Outcome`] per request, printed for people (stdout:
//! the key or the result line; stderr: explanations) or as JSON with `--json`.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::dkim::DkimReport;
use super::{exit, terminal};

/// The result of one request (or a failure before one could be sent).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    /// The KST confirmed the publication; HMAC and fingerprint verified.
    Published {
        /// The account.
        account: String,
        /// The published key's fingerprint.
        fingerprint: String,
        /// The KST that confirmed.
        service: String,
        /// The request's Message-ID.
        message_id: String,
        /// The key as published (armored).
        key: String,
        /// What DKIM says about the reply (absent when not checked).
        #[serde(skip_serializing_if = "Option::is_none")]
        dkim: Option<DkimReport>,
    },
    /// The key was retrieved and verified.
    Found {
        /// The queried address.
        address: String,
        /// Its fingerprint.
        fingerprint: String,
        /// Its User IDs.
        user_ids: Vec<String>,
        /// The KST that answered.
        service: String,
        /// The request's Message-ID.
        message_id: String,
        /// The key (armored).
        key: String,
        /// True when it was imported into gpg.
        imported: bool,
        /// What DKIM says about the reply (absent when not checked).
        #[serde(skip_serializing_if = "Option::is_none")]
        dkim: Option<DkimReport>,
    },
    /// The KST says, authenticated, that no key is published for the address.
    NotFound {
        /// The queried address.
        address: String,
        /// The KST that answered.
        service: String,
        /// What DKIM says about the reply (absent when not checked).
        #[serde(skip_serializing_if = "Option::is_none")]
        dkim: Option<DkimReport>,
    },
    /// The KST confirmed, authenticated, that the account's key and history were deleted
    /// (`kst client delete`).
    Deleted {
        /// The account.
        address: String,
        /// The KST that answered.
        service: String,
        /// What DKIM says about the reply (absent when not checked).
        #[serde(skip_serializing_if = "Option::is_none")]
        dkim: Option<DkimReport>,
    },
    /// The KST refused the request.
    Refused {
        /// The KST.
        service: String,
        /// The `KST-Reason` token as sent (`sender-mismatch`, `key-expired`, ...), also one this
        /// client does not know.
        reason: Option<String>,
        /// The KST's explanation.
        explanation: String,
        /// True when the refusal's HMAC verified.
        authenticated: bool,
        /// What DKIM says about the reply (absent when not checked).
        #[serde(skip_serializing_if = "Option::is_none")]
        dkim: Option<DkimReport>,
    },
    /// The provider runs no KST: the request bounced (or was answered by something else).
    NoKst {
        /// The address that does not take requests.
        service: String,
        /// What the bounce or server said.
        detail: String,
    },
    /// A reply failed verification: possibly forged. It was not used.
    Attack {
        /// The KST the request went to.
        service: String,
        /// The request's Message-ID.
        message_id: String,
        /// What failed.
        error: String,
    },
    /// Sent, not answered yet: the request stays in the pending file.
    Pending {
        /// The KST.
        service: String,
        /// The request's Message-ID.
        message_id: String,
        /// What is asked (`publication` or `retrieval`).
        kind: String,
        /// The published or queried address.
        address: String,
    },
    /// Something failed before or while sending or reading.
    Error {
        /// What went wrong and what to do.
        error: String,
        /// The exit code it maps to.
        exit: u8,
    },
}

impl Outcome {
    /// The exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Published { .. } | Outcome::Found { .. } | Outcome::Deleted { .. } => exit::OK,
            Outcome::NotFound { .. } => exit::NOT_FOUND,
            Outcome::Refused { .. } => exit::REFUSED,
            Outcome::NoKst { .. } => exit::NO_KST,
            Outcome::Attack { .. } => exit::ATTACK,
            Outcome::Pending { .. } => exit::TEMPFAIL,
            Outcome::Error { exit, .. } => *exit,
        }
    }

    /// An error outcome.
    pub fn error(exit: u8, error: impl Into<String>) -> Outcome {
        Outcome::Error {
            error: error.into(),
            exit,
        }
    }

    /// Prints for people: results on stdout, explanations on stderr. Every line is
    /// terminal-safe ([`terminal::line`]): User IDs, explanations and server answers come from
    /// a key or a reply, which may be hostile.
    pub fn print_text(&self) {
        match self {
            Outcome::Published {
                account,
                fingerprint,
                service,
                dkim,
                ..
            } => out(format!(
                "published {fingerprint} for {account} (confirmed by {service}, HMAC verified{})",
                proof_text(dkim)
            )),
            Outcome::Found {
                address,
                fingerprint,
                user_ids,
                key,
                imported,
                service,
                dkim,
                ..
            } => {
                err(format!(
                    "kst: verified key {fingerprint} for {address} from {service} ({}){}",
                    user_ids.join(", "),
                    proof_text(dkim)
                ));
                if *imported {
                    out(format!("imported {fingerprint} for {address} into gpg"));
                } else {
                    print!("{}", terminal::block(key));
                    if !key.ends_with('\n') {
                        println!();
                    }
                }
            }
            Outcome::Deleted {
                address,
                service,
                dkim,
            } => err(format!(
                "kst: {service} deleted the key of {address} (authenticated answer{})",
                proof_text(dkim)
            )),
            Outcome::NotFound {
                address,
                service,
                dkim,
            } => err(format!(
                "kst: {service} says no key is published for {address} (authenticated answer{})",
                proof_text(dkim)
            )),
            Outcome::Refused {
                service,
                reason,
                explanation,
                authenticated,
                dkim,
            } => err(format!(
                "kst: {service} refused the request ({}){}{}: {explanation}",
                reason.as_deref().unwrap_or("no reason given"),
                if *authenticated {
                    ""
                } else {
                    ", unauthenticated"
                },
                if *authenticated {
                    proof_text(dkim)
                } else {
                    String::new()
                }
            )),
            Outcome::NoKst { service, detail } => err(format!(
                "kst: no KST at this provider: the request to {service} bounced{}",
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(" ({detail})")
                }
            )),
            Outcome::Attack { service, error, .. } => err(format!(
                "kst: WARNING: possible attack: a reply claiming to come from {service} failed verification: {error}. It was NOT used."
            )),
            Outcome::Pending {
                service,
                message_id,
                kind,
                address,
            } => err(format!(
                "kst: no reply yet from {service} to the {kind} for {address} (request {message_id}); it stays pending: run `kst client check` later"
            )),
            Outcome::Error { error, .. } => err(format!("kst: {error}")),
        }
    }
}

/// Prints one line on stdout, terminal-safe.
pub fn out(line: String) {
    println!("{}", terminal::line(&line));
}

/// Prints one line on stderr, terminal-safe.
pub fn err(line: String) {
    eprintln!("{}", terminal::line(&line));
}

/// `; proven by K_auth and DKIM (DKIM pass (...))` for a reply whose HMAC verified; empty
/// when DKIM was not checked.
fn proof_text(dkim: &Option<DkimReport>) -> String {
    match dkim {
        Some(d) => format!("; proven by {} ({})", d.proven_by(), d.describe()),
        None => String::new(),
    }
}

impl Outcome {
    /// The DKIM report of a KST reply, if it was checked.
    pub fn dkim(&self) -> Option<&DkimReport> {
        match self {
            Outcome::Published { dkim, .. }
            | Outcome::Found { dkim, .. }
            | Outcome::NotFound { dkim, .. }
            | Outcome::Deleted { dkim, .. }
            | Outcome::Refused { dkim, .. } => dkim.as_ref(),
            _ => None,
        }
    }

    /// Attaches the DKIM report to a KST reply's outcome (other outcomes stay as they are).
    pub fn with_dkim(mut self, report: DkimReport) -> Outcome {
        match &mut self {
            Outcome::Published { dkim, .. }
            | Outcome::Found { dkim, .. }
            | Outcome::NotFound { dkim, .. }
            | Outcome::Deleted { dkim, .. }
            | Outcome::Refused { dkim, .. } => *dkim = Some(report),
            _ => {}
        }
        self
    }

    /// What proved the reply, for outcomes whose HMAC verified and whose DKIM was checked:
    /// "K_auth and DKIM" or "K_auth only".
    pub fn proven_by(&self) -> Option<&'static str> {
        let hmac = match self {
            Outcome::Published { .. }
            | Outcome::Found { .. }
            | Outcome::NotFound { .. }
            | Outcome::Deleted { .. } => true,
            Outcome::Refused { authenticated, .. } => *authenticated,
            _ => false,
        };
        if hmac {
            self.dkim().map(DkimReport::proven_by)
        } else {
            None
        }
    }
}

/// Prints `outcomes` (one object, or an array when `list`) and returns the exit code: the
/// highest of them (0 when there are none).
pub fn finish(outcomes: &[Outcome], json: bool, list: bool) -> u8 {
    finish_with(outcomes, json, list, &[])
}

/// [`finish`], with facts of the whole command added to each JSON object (`dnssec`,
/// `transport`) and printed on stderr for people.
pub fn finish_with(
    outcomes: &[Outcome],
    json: bool,
    list: bool,
    facts: &[(String, serde_json::Value)],
) -> u8 {
    let with_facts = |o: &Outcome| {
        let mut v = with_exit(o);
        if let serde_json::Value::Object(m) = &mut v {
            for (k, f) in facts {
                m.entry(k.clone()).or_insert_with(|| f.clone());
            }
        }
        v
    };
    if json {
        let value = if list || outcomes.len() != 1 {
            serde_json::to_value(
                outcomes
                    .iter()
                    .map(with_facts)
                    .collect::<Vec<serde_json::Value>>(),
            )
        } else {
            Ok(with_facts(&outcomes[0]))
        };
        match value.and_then(|v| serde_json::to_string_pretty(&v)) {
            Ok(s) => println!("{}", terminal::json(&s)),
            Err(e) => eprintln!("kst: cannot render JSON: {e}"),
        }
    } else {
        for (k, f) in facts {
            print_fact(k, f);
        }
        for o in outcomes {
            o.print_text();
        }
    }
    outcomes
        .iter()
        .map(Outcome::exit_code)
        .max()
        .unwrap_or(exit::OK)
}

fn print_fact(key: &str, value: &serde_json::Value) {
    match (key, value) {
        ("dnssec", serde_json::Value::String(v)) => err(format!(
            "kst: DNS look-ups: {}",
            match v.as_str() {
                "secure" => "DNSSEC-secure",
                "insecure" => "INSECURE (a zone without DNSSEC; --require-dnssec refuses it)",
                _ => "NOT VALIDATED (--no-dnssec)",
            }
        )),
        ("transport", serde_json::Value::Object(m)) => {
            if let Some(serde_json::Value::String(note)) = m.get("mta_sts") {
                err(format!("kst: MTA-STS: {note}"));
            }
            if let (Some(mx), Some(serde_json::Value::String(detail))) =
                (m.get("mx").and_then(|v| v.as_str()), m.get("detail"))
            {
                err(format!("kst: hop to {mx}: {detail}"));
            }
        }
        _ => {}
    }
}

fn with_exit(o: &Outcome) -> serde_json::Value {
    let mut v = serde_json::to_value(o).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("exit".into(), o.exit_code().into());
        if let Some(p) = o.proven_by() {
            m.insert("proven_by".into(), p.into());
        }
    }
    v
}

/// A spinner on stderr while waiting (hidden when stderr is not a terminal or with `--json`).
pub fn spinner(json: bool) -> ProgressBar {
    if json || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
        pb.set_style(style);
    }
    pb.enable_steady_tick(Duration::from_millis(120));
    pb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_carries_outcome_and_exit() {
        let o = Outcome::NoKst {
            service: "keys@example.org".into(),
            detail: "550 5.1.1".into(),
        };
        let v = with_exit(&o);
        assert_eq!(v["outcome"], "no-kst");
        assert_eq!(v["exit"], 4);
        assert_eq!(v["service"], "keys@example.org");
        let e = Outcome::error(exit::TEMPFAIL, "down");
        assert_eq!(with_exit(&e)["exit"], 75);
        assert_eq!(with_exit(&e)["outcome"], "error");
    }

    #[test]
    fn the_worst_outcome_decides_the_exit_code() {
        let found = Outcome::NotFound {
            address: "a@b.c".into(),
            service: "keys@b.c".into(),
            dkim: None,
        };
        let attack = Outcome::Attack {
            service: "keys@b.c".into(),
            message_id: "x@b.c".into(),
            error: "bad".into(),
        };
        assert_eq!(finish(&[], true, true), exit::OK);
        assert_eq!(finish(&[found.clone(), attack], true, true), exit::ATTACK);
        assert_eq!(finish(&[found], true, false), exit::NOT_FOUND);
    }
}
