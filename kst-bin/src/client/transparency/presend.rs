//! The head verified before a `--check-transparency` request is sent (versions 1 and 2).
//!
//! The two-step check ([`super::check`], [`super::super::log_race`]) decides a mismatch
//! between the key by mail and the directory's answer by comparing epochs with the newest
//! head the client had verified when the request was sent (`verified_epoch`). So, before
//! sending, the client fetches the directory's current answer for the address over HTTP and
//! verifies it exactly as the check does ([`super::verify_and_remember`]: the pinned head
//! key, the append-only proof from the remembered head, in steps when far behind, the
//! required witnesses), with nothing served to compare yet; its head is remembered and its
//! epoch becomes `verified_epoch`. A key superseded before the request was sent is then an
//! attack at the first reply (exit 5), also on first use of a domain.
//!
//! The whole step is bounded: [`PRESEND_BUDGET`] in all, every catch-up step included (the
//! domain's memory is locked meanwhile, and the request waits), at most
//! [`MAX_CATCH_UP_STEPS`] steps.
//!
//! A directory that cannot be read before sending (network down, a 5xx, a timeout, too
//! many steps, the budget spent) does not stop the retrieval: the request is sent with the epoch remembered
//! before (the behaviour without this step), and the output says so. An answer that fails
//! verification is an attack (exit 5, evidence kept), as in the check; nothing is sent.

use super::super::exit;
use super::super::log_memory::{Held, LogMemory};
use super::super::output::Outcome;
use super::super::state::VerifiedState;
use super::{
    Accepted, Checked, LogCheckArgs, MAX_CATCH_UP_STEPS, Refused, Settings, fetch_answer, head_key,
    log_base, lookup_path,
};
use kst_core::Address;
use kst_core::transparency::{DirectoryEntry, EntryState};

/// The most time the head verified before sending takes in all, every catch-up step
/// included (review F7: before, each fetch had 20 s, up to 64 steps). The steps verified
/// by then stay remembered; the check of the reply, or the next request, continues.
pub const PRESEND_BUDGET: std::time::Duration = super::FETCH_TIMEOUT;

/// What [`verify_head`] found, when nothing stops the request.
pub(in crate::client) enum Presend {
    /// The remembered head is the directory's current one; the key its answer proved as the
    /// address's newest version, if it proved one (kept with the request: review F3).
    Verified(Option<VerifiedState>),
    /// The head could not be fetched or verified for a reason that is no attack: the caller
    /// sends anyway with the remembered epoch and tells the user this note.
    NotVerified(String),
}

/// Fetches and verifies the directory's current answer for `address` before the request is
/// sent, remembering its head in `held` (see the module documentation). `Err`: an attack
/// (exit 5, evidence kept) or a memory that cannot be written (exit 78): nothing is sent.
pub(in crate::client) async fn verify_head(
    s: &Settings,
    args: &LogCheckArgs,
    address: &Address,
    memory: &LogMemory,
    held: &mut Held,
) -> Result<Presend, Outcome> {
    let policy = args
        .witness_policy()
        .map_err(|e| Outcome::error(exit::USAGE, e))?;
    let head_key = match head_key(
        s,
        args.reply.log_key.as_deref(),
        args.log_url.as_deref(),
        memory,
        held,
    )
    .await
    {
        Ok(k) => k,
        Err(o) if matches!(o.exit_code(), exit::ATTACK | exit::CONFIG) => return Err(o),
        Err(o) => return not_fetched(address, held, outcome_text(&o)),
    };
    let base = log_base(args, address);
    let source = format!("the key directory answer from {base}, fetched before sending");
    let checked = Checked {
        head_key: &head_key,
        address,
        served: None,
        policy: policy.as_ref(),
        asked: None,
        source: &source,
        log_base: &base,
        ca_file: s.ca_file(),
        read_apart: true,
        // Nothing served yet: the answer alone is the evidence.
        about: "",
    };
    let mut ask_steps = true;
    let mut steps = 0;
    let deadline = tokio::time::Instant::now() + PRESEND_BUDGET;
    loop {
        let since = held.memory.remembered_epoch().filter(|e| *e > 0);
        let (path, limit) = lookup_path(address, since, ask_steps, policy.is_some());
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let fetched = match tokio::time::timeout(
            left,
            fetch_answer(&base, &path, s.ca_file(), limit),
        )
        .await
        {
            Ok(f) => f,
            Err(_) => return not_fetched(address, held, spent(steps, held)),
        };
        // A fetch that failed with the budget spent (its own timeout may win the race with
        // the budget's on a busy machine) is the budget's.
        if fetched.is_err() && tokio::time::Instant::now() >= deadline {
            return not_fetched(address, held, spent(steps, held));
        }
        let text = match fetched {
            Ok(t) => t,
            // A KST from before steps answers `steps=1` with 400: ask without it.
            Err(u)
                if ask_steps
                    && since.is_some()
                    && u.status == Some(hyper::StatusCode::BAD_REQUEST) =>
            {
                ask_steps = false;
                continue;
            }
            Err(u) => return not_fetched(address, held, outcome_text(&u.outcome)),
        };
        match super::verify_and_remember(memory, held, &text, &checked).await {
            // Nothing was served yet: an answer that proves a key where "no key" was
            // compared verified otherwise, as one that proves "no key".
            Ok(Accepted::Remembered) => return Ok(Presend::Verified(None)),
            Ok(Accepted::Restarted { note }) => {
                super::super::output::err(format!("kst: {note}"));
                return Ok(Presend::Verified(None));
            }
            Ok(Accepted::Differs {
                epoch,
                newest,
                note,
                ..
            }) => {
                if let Some(note) = note {
                    super::super::output::err(format!("kst: {note}"));
                }
                return Ok(Presend::Verified(proven_key(epoch, newest)));
            }
            Ok(Accepted::Step { to, latest, .. }) => {
                steps += 1;
                if steps >= MAX_CATCH_UP_STEPS {
                    return not_fetched(
                        address,
                        held,
                        format!(
                            "caught up to epoch {to} of {latest} in {steps} verified steps, \
                         remembered"
                        ),
                    );
                }
            }
            // Reported as the check reports it (outcome `attack`, exit 5), the service being
            // the directory: no request was sent.
            Err(Refused::Attack(m)) => {
                return Err(Outcome::Attack {
                    service: format!("the key directory at {base}"),
                    message_id: String::new(),
                    error: format!("{m} (checked before sending the request: nothing was sent)"),
                });
            }
            Err(Refused::Other(o)) if o.exit_code() == exit::CONFIG => return Err(*o),
            Err(Refused::Other(o)) => return not_fetched(address, held, outcome_text(&o)),
        }
    }
}

/// The key an answer of `epoch` proved as the address's newest version (`newest`: that
/// version and the epoch it was recorded at), if it proved a published key.
fn proven_key(epoch: u64, newest: Option<(DirectoryEntry, u64)>) -> Option<VerifiedState> {
    let (entry, recorded_at) = newest?;
    if entry.state == EntryState::Deleted {
        return None;
    }
    let (_, hash) = entry.key?;
    Some(VerifiedState {
        epoch,
        recorded_at,
        key_hash: hex::encode(hash),
    })
}

/// The note of a head that could not be verified before sending (`why`): the request is
/// sent with the epoch remembered in `held`.
fn not_fetched(address: &Address, held: &Held, why: String) -> Result<Presend, Outcome> {
    let remembered = match held.memory.remembered_epoch() {
        Some(e) => format!("the epoch remembered before, {e}"),
        None => "no verified epoch (first use of the domain)".into(),
    };
    Ok(Presend::NotVerified(format!(
        "key directory of {}: the current head could not be verified before sending \
         ({why}); the request is sent with {remembered}, and a reply the directory does not \
         confirm may then be a temporary failure (exit 75) where a verified head would have \
         shown an attack",
        address.domain()
    )))
}

/// Why the head was not verified before sending when [`PRESEND_BUDGET`] ran out after
/// `steps` verified catch-up steps.
fn spent(steps: usize, held: &Held) -> String {
    format!(
        "it took longer than {} s in all ({steps} catch-up steps verified, epoch {} \
         remembered)",
        PRESEND_BUDGET.as_secs(),
        held.memory
            .remembered_epoch()
            .map_or_else(|| "none".to_string(), |e| e.to_string())
    )
}

/// What an outcome says, for a note.
fn outcome_text(o: &Outcome) -> String {
    match o {
        Outcome::Error { error, .. } => error.clone(),
        other => format!("exit {}", other.exit_code()),
    }
}
