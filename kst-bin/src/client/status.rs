//! `kst client status`: the owner's monitor. It retrieves, through the KST protocol (a fresh
//! K_auth, the reply's HMAC verified), what the provider's KST serves for the account's own
//! address and compares it with the owner's key: fingerprint, expiry, revocation and subkeys.
//! Exit 0 when they agree, [`exit::MISMATCH`] (6) when they differ, 1 when nothing is
//! published; so it can run from cron and mail the owner when someone else's key, an old
//! copy, or nothing at all is served.
//!
//! The KST protocol does not tell the version history of an address to a retrieval. With
//! `--check-transparency` (feature `transparency`) the key directory does: the served key is
//! checked against the directory (as `retrieve --check-transparency` does), and every version
//! the directory recorded for the address is listed (akd's history proof, verified against
//! the domain's head key); a version whose key the owner did not publish (not the key given,
//! nor one this client published for the account) is reported and exits 6, even when the
//! key served now is the owner's again (an insider who served another key for a while). So
//! is a deletion the owner did not ask for: the client notes each deletion of the account's
//! key it asked for and the KST confirmed, and a deletion in the directory that none of them
//! explains (the KST's time of the deletion between the request and the confirmation, give
//! or take ten minutes of clock difference; each noted deletion explains one) is reported,
//! exit 6 (an insider who deleted the owner's key, so that correspondents fall back to
//! unencrypted mail). A withdrawn value (akd's tombstone) with no deletion after it is
//! reported as well: only a deletion withdraws values, so it was overwritten in the store.

use std::path::Path;

use kst_core::Address;
use kst_core::certificate::Certificate;
use kst_core::validate::{KeyPolicy, validate};
use serde::Serialize;

use super::commands::{Settings, gpg_export, send_and_wait_with};
use super::exit;
use super::output::{self, Outcome, err, out};

/// `publish` warns when the key expires within this many days.
pub const EXPIRY_WARNING_DAYS: u64 = 30;

/// What matters of a key to its owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyFacts {
    /// Primary key fingerprint.
    pub fingerprint: String,
    /// When the key expires (seconds since the Unix epoch), if it does.
    pub expires_at: Option<u64>,
    /// The key carries a revocation.
    pub revoked: bool,
    /// Key IDs of the subkeys a correspondent can use (valid bindings, not expired), sorted.
    pub subkeys: Vec<String>,
    /// Key IDs of the subkeys that carry a revocation, sorted.
    pub revoked_subkeys: Vec<String>,
}

impl KeyFacts {
    /// The facts of `armored` as the KST would publish it for `account` at `now`: the key
    /// policy first (so expired subkeys and other User IDs do not count), the bare certificate
    /// when the policy refuses it (an expired key, say).
    pub fn of(armored: &str, account: &Address, now: u64) -> Result<KeyFacts, String> {
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(now);
        let (packets, revoked, expires_at) =
            match validate(armored, account, &KeyPolicy::default(), at) {
                Ok(v) => (v.packets, v.revoked, v.expires_at),
                Err(e) => {
                    let c = Certificate::from_armored(armored, 1 << 20)
                        .map_err(|_| format!("not an OpenPGP key: {e}"))?;
                    (c.to_binary(), c.is_revoked(), c.expiration())
                }
            };
        let c = Certificate::from_binary(&packets).map_err(|e| e.to_string())?;
        let mut subkeys: Vec<String> = c.handles().subkeys.into_iter().map(|h| h.key_id).collect();
        subkeys.sort();
        let mut revoked_subkeys = c.revoked_subkeys();
        revoked_subkeys.sort();
        Ok(KeyFacts {
            fingerprint: c.fingerprint(),
            expires_at,
            revoked,
            subkeys,
            revoked_subkeys,
        })
    }
}

/// The differences between the served key and the owner's, for people; empty when they agree.
pub fn differences(served: &KeyFacts, local: &KeyFacts) -> Vec<String> {
    let mut out = Vec::new();
    if served.fingerprint != local.fingerprint {
        out.push(format!(
            "the KST serves key {}, yours is {}",
            served.fingerprint, local.fingerprint
        ));
        return out;
    }
    if served.revoked != local.revoked {
        out.push(if served.revoked {
            "the KST serves your key revoked; yours is not".to_string()
        } else {
            "your key is revoked, the KST serves it unrevoked: publish the revocation".to_string()
        });
    }
    if served.expires_at != local.expires_at {
        out.push(format!(
            "the KST serves the expiry {}, yours is {}: publish your key again",
            show_time(served.expires_at),
            show_time(local.expires_at)
        ));
    }
    let unrevoked: Vec<&String> = local
        .revoked_subkeys
        .iter()
        .filter(|k| served.subkeys.contains(k) && !served.revoked_subkeys.contains(k))
        .collect();
    if !unrevoked.is_empty() {
        out.push(format!(
            "the KST serves your revoked subkeys {unrevoked:?} unrevoked: publish your key again"
        ));
    }
    let missing: Vec<&String> = local
        .subkeys
        .iter()
        .filter(|k| !served.subkeys.contains(k))
        .collect();
    if !missing.is_empty() {
        out.push(format!(
            "the KST lacks your subkeys {missing:?}: publish your key again"
        ));
    }
    let extra: Vec<&String> = served
        .subkeys
        .iter()
        .filter(|k| !local.subkeys.contains(k))
        .collect();
    if !extra.is_empty() {
        out.push(format!(
            "the KST serves subkeys you do not have {extra:?} (another device?)"
        ));
    }
    out
}

fn show_time(t: Option<u64>) -> String {
    t.map_or_else(|| "never".to_string(), |t| format!("{t} (Unix time)"))
}

/// The warning `publish` prints when `armored` expires within [`EXPIRY_WARNING_DAYS`] of
/// `now` (or has expired); `None` otherwise or when it is not a key.
pub fn expiry_warning(armored: &str, now: u64) -> Option<String> {
    let c = Certificate::from_armored(armored, 1 << 20).ok()?;
    if c.is_revoked() {
        return None;
    }
    let at = c.expiration()?;
    if at > now + EXPIRY_WARNING_DAYS * 86_400 {
        return None;
    }
    let fpr = c.fingerprint();
    Some(if at <= now {
        format!(
            "the key {fpr} has expired; extend it first (gpg --quick-set-expire {fpr} 1y), then publish"
        )
    } else {
        format!(
            "the key {fpr} expires in {} days; extend it (gpg --quick-set-expire {fpr} 1y) and publish again",
            (at - now).div_ceil(86_400)
        )
    })
}

/// The flags of the directory check (`--check-transparency`, `--log-url`, `--log-key`).
#[cfg(feature = "transparency")]
pub type LogArgs = super::transparency::LogCheckArgs;
/// Without the `transparency` feature there is no directory check.
#[cfg(not(feature = "transparency"))]
pub type LogArgs = ();

/// The requirements of `status --check-transparency` kept with its request: the flags', and
/// the head verified before the request is sent (its epoch and directory: the two-step check
/// compares with them). A memory that cannot be read is exit 78, a head that fails
/// verification an attack (exit 5).
#[cfg(feature = "transparency")]
async fn requirements(
    s: &Settings,
    args: &LogArgs,
    account: &Address,
) -> Result<super::state::LogRequirements, Outcome> {
    let verified = super::transparency::verified_epoch_before_sending(s, args, account).await?;
    let mut r = args.requirements();
    r.verified_epoch = verified.epoch;
    r.verified_log = verified.log;
    r.verified_state = verified.state;
    Ok(r)
}

/// One version of the address in the key directory, as `status` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectoryVersion {
    /// The epoch it was recorded in.
    pub epoch: u64,
    /// The directory's version number of the address.
    pub version: u64,
    /// `published`, `revoked`, `deleted`, or `withdrawn` (a value dropped by a deletion).
    pub state: String,
    /// The key's fingerprint (none for a deletion or a withdrawn value).
    pub fingerprint: Option<String>,
    /// When the KST made the change (its clock, Unix time): the key's publication time, or
    /// the deletion's.
    pub changed_at: Option<u64>,
    /// False when the key is not one the owner published (not the key given, nor one this
    /// client published for the account), or the deletion not one this client asked for.
    pub yours: bool,
    /// For a deletion whose time does not fit the times of the heads around its epoch (the
    /// head of the epoch that recorded it and the one before): why. Such a deletion is never
    /// taken as the owner's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub misdated: Option<String>,
}

#[derive(Serialize)]
struct Report<'a> {
    outcome: &'a str,
    exit: u8,
    account: String,
    service: Option<String>,
    served: Option<KeyFacts>,
    local: KeyFacts,
    differences: Vec<String>,
    history: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    directory: Option<Vec<DirectoryVersion>>,
}

/// Runs `status`; prints the comparison and returns the exit code.
pub async fn status(
    s: &Settings,
    key: Option<&Path>,
    gpg_key: Option<&str>,
    log: Option<&LogArgs>,
) -> u8 {
    let account = match s.account() {
        Ok(a) => a.clone(),
        Err(o) => return output::finish(&[o], s.json, false),
    };
    let armored = match key {
        Some(path) => std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the key file {}: {e}", path.display())),
        None => gpg_export(gpg_key.unwrap_or(account.as_str())),
    };
    let now = kst_core::time::unix_now();
    let local = match armored.and_then(|a| KeyFacts::of(&a, &account, now)) {
        Ok(f) => f,
        Err(e) => return output::finish(&[Outcome::error(exit::NOINPUT, e)], s.json, false),
    };
    let request = kst_core::client::build_retrieval(&account, &account);
    // The directory check's requirements, kept with the request as `retrieve
    // --check-transparency` keeps them: the reply is checked where it is read, with its own
    // Message-ID for the evidence, and `kst client check` checks it if the wait ends first.
    #[cfg(feature = "transparency")]
    let requirements = match log {
        Some(args) => match requirements(s, args, &account).await {
            Ok(r) => Some(r),
            Err(o) => return output::finish(&[o], s.json, false),
        },
        None => None,
    };
    #[cfg(not(feature = "transparency"))]
    let requirements = None;
    let retrieved =
        send_and_wait_with(s, &account, request, None, false, false, requirements).await;
    let (service, served, code) = match retrieved {
        Outcome::Found { key, service, .. } => match KeyFacts::of(&key, &account, now) {
            Ok(f) => (Some(service), Some(f), exit::OK),
            Err(e) => {
                let o = Outcome::error(exit::UNAVAILABLE, format!("the served key: {e}"));
                return output::finish(&[o], s.json, false);
            }
        },
        Outcome::NotFound { service, .. } => (Some(service), None, exit::NOT_FOUND),
        other => return output::finish(&[other], s.json, false),
    };
    let mut differences = match &served {
        Some(f) => differences(f, &local),
        None => vec![format!("no key is published for {account}")],
    };
    let directory: Option<Vec<DirectoryVersion>> = match log {
        #[cfg(feature = "transparency")]
        Some(args) => match directory_versions(s, args, &account, &local).await {
            Ok(v) => Some(v),
            Err(o) => return output::finish(&[o], s.json, false),
        },
        _ => None,
    };
    let unknown: Vec<&DirectoryVersion> = directory.iter().flatten().filter(|v| !v.yours).collect();
    for v in &unknown {
        differences.push(match &v.fingerprint {
            Some(fingerprint) => format!(
                "the key directory records key {fingerprint} for {account} at epoch {} \
                 (version {}): not a key you published",
                v.epoch, v.version
            ),
            None if v.state == "withdrawn" => format!(
                "the key directory records a withdrawn value for {account} at epoch {} \
                 (version {}) with no deletion after it: the value was overwritten in the \
                 store, maybe a key you did not publish; ask the provider",
                v.epoch, v.version
            ),
            None => match &v.misdated {
                Some(why) => format!(
                    "the key directory records a deletion of the key of {account} at epoch {} \
                     (version {}) {why}: its time is not the KST's clock at the deletion, so \
                     it is not taken as a deletion you asked for",
                    v.epoch, v.version
                ),
                None => format!(
                    "the key directory records a deletion of the key of {account} at epoch {} \
                     (version {}, time {}): not a deletion you asked for from this client",
                    v.epoch,
                    v.version,
                    show_time(v.changed_at)
                ),
            },
        });
    }
    let code = if code == exit::NOT_FOUND && !unknown.is_empty() {
        exit::MISMATCH
    } else {
        code
    };
    let code = if code == exit::OK && !differences.is_empty() {
        exit::MISMATCH
    } else {
        code
    };
    let outcome = match code {
        exit::OK => "match",
        exit::NOT_FOUND => "not-found",
        _ => "mismatch",
    };
    if s.json {
        let report = Report {
            outcome,
            exit: code,
            account: account.to_string(),
            service,
            served,
            local,
            differences,
            history: if directory.is_some() {
                "the key directory's history proof, verified (`directory`)"
            } else {
                "not told by the KST protocol; --check-transparency asks the key directory"
            },
            directory,
        };
        super::terminal::print_json(&report, "{}");
    } else {
        let service = service.unwrap_or_default();
        match &served {
            Some(f) => out(format!(
                "{service} serves {} for {account}: expires {}, {}, subkeys {:?}",
                f.fingerprint,
                f.expires_at.map_or("never".into(), |t| t.to_string()),
                if f.revoked { "revoked" } else { "not revoked" },
                f.subkeys
            )),
            None => out(format!("{service} serves no key for {account}")),
        }
        out(format!(
            "your key {}: expires {}, {}, subkeys {:?}",
            local.fingerprint,
            local.expires_at.map_or("never".into(), |t| t.to_string()),
            if local.revoked {
                "revoked"
            } else {
                "not revoked"
            },
            local.subkeys
        ));
        for v in directory.iter().flatten() {
            out(format!(
                "directory: epoch {} version {} {} {}{}",
                v.epoch,
                v.version,
                v.state,
                v.fingerprint.as_deref().unwrap_or("-"),
                if v.yours { "" } else { "  NOT YOURS" }
            ));
        }
        if differences.is_empty() {
            println!("match");
        }
        for d in &differences {
            err(format!("kst: {d}"));
        }
    }
    code
}

/// The directory's versions of `account`, each marked whether its key is the owner's.
#[cfg(feature = "transparency")]
async fn directory_versions(
    s: &Settings,
    args: &LogArgs,
    account: &Address,
    local: &KeyFacts,
) -> Result<Vec<DirectoryVersion>, Outcome> {
    use kst_core::transparency::EntryState;
    let Some(history) = super::transparency::history(s, args, account).await? else {
        return Ok(Vec::new());
    };
    let (versions, signed_at) = (history.versions, history.signed_at);
    let memory = super::log_memory::LogMemory::beside(s.state.path());
    let mut own = memory.own_fingerprints(account.as_str());
    own.push(local.fingerprint.clone());
    let mut listed: Vec<DirectoryVersion> = versions
        .into_iter()
        .map(|v| {
            let (state, fingerprint) = match &v.entry {
                None => ("withdrawn", None),
                Some(e) => (
                    match e.state {
                        EntryState::Published => "published",
                        EntryState::Revoked => "revoked",
                        EntryState::Deleted => "deleted",
                    },
                    e.key.as_ref().map(|(fp, _)| fp.to_string()),
                ),
            };
            let yours = fingerprint
                .as_deref()
                .is_none_or(|f| own.iter().any(|o| o.eq_ignore_ascii_case(f)));
            let misdated = match &v.entry {
                Some(e) if e.state == EntryState::Deleted => deletion_misdated(
                    e.changed_at,
                    v.epoch,
                    signed_at.get(&v.epoch.saturating_sub(1)).copied(),
                    signed_at.get(&v.epoch).copied(),
                ),
                _ => None,
            };
            DirectoryVersion {
                epoch: v.epoch,
                version: v.akd_version,
                state: state.to_string(),
                fingerprint,
                changed_at: v.entry.as_ref().map(|e| e.changed_at),
                yours,
                misdated,
            }
        })
        .collect();
    mark_deletions(&mut listed, memory.own_deletions(account.as_str()));
    Ok(listed)
}

/// Why a deletion the KST dated `changed_at`, recorded in `epoch`, does not fit the
/// `signed-at` of the heads of `epoch - 1` (`before`) and `epoch` (`at`); `None` when it fits
/// or there is nothing to compare. Both times are the KST's clock (a pool's instances may
/// differ by [`DELETION_CLOCK_SLACK`](super::log_memory::DELETION_CLOCK_SLACK)).
///
/// - A deletion is recorded in the epoch of the request that made it, dated by that request,
///   and the epoch's head is signed with its commit (with the same clock reading) or later
///   (on first read, or late): so `changed_at` is never after `at`.
/// - The head of `epoch - 1` was signed before the deletion was recorded, with that epoch's
///   commit, unless it was signed late (a head missing from the store is signed when first
///   asked for, with the time of that moment). A deletion dated before the head of
///   `epoch - 1` was signed, in an epoch whose own head is dated before it too (the heads'
///   times go backwards), is back-dated: kst's writer signs the epoch's head with the time it
///   dates the deletion with, so an insider who dates a deletion into the window of one the
///   owner asked for (running the writer with a clock set back) dates the head with it. When
///   the head of `epoch` is not before the head of `epoch - 1`, both may have been signed
///   late (a directory kept from before heads were stored): nothing is concluded.
/// - Nor when the head of `epoch` is itself more than the slack after the deletion: then it
///   was signed late (the writer signs it with the deletion's time), and the head of
///   `epoch - 1` may have been signed late after it (on demand, or by the backfill that
///   reaches it later): heads signed late are in no order, an honest deletion is not
///   back-dated for that (red team round 3).
#[cfg(feature = "transparency")]
fn deletion_misdated(
    changed_at: u64,
    epoch: u64,
    before: Option<u64>,
    at: Option<u64>,
) -> Option<String> {
    use super::log_memory::DELETION_CLOCK_SLACK as SLACK;
    if let Some(at) = at
        && changed_at > at.saturating_add(SLACK)
    {
        return Some(format!(
            "dated {changed_at}, after the head of its epoch {epoch} was signed ({at})"
        ));
    }
    if let (Some(before), Some(at)) = (before, at)
        && at.saturating_add(SLACK) < before
        && changed_at.saturating_add(SLACK) < before
        && at <= changed_at.saturating_add(SLACK)
    {
        return Some(format!(
            "dated {changed_at}, before the head of epoch {} was signed ({before}), in an \
             epoch whose head is dated {at}: back-dated",
            epoch.saturating_sub(1)
        ));
    }
    None
}

/// Marks each deletion in `versions` as the owner's when one of `own` (the deletions this
/// client asked for, oldest first) explains it; each explains one, the oldest deletions
/// first. A deletion whose time does not fit the heads around it (`misdated`) is never the
/// owner's and explains nothing. A withdrawn value is the owner's only when a deletion follows it (a deletion is
/// what withdraws the values before it).
#[cfg(feature = "transparency")]
fn mark_deletions(versions: &mut [DirectoryVersion], mut own: Vec<super::log_memory::OwnDeletion>) {
    let (mut deletions, withdrawn): (Vec<&mut DirectoryVersion>, Vec<&mut DirectoryVersion>) =
        versions
            .iter_mut()
            .filter(|v| v.state == "deleted" || v.state == "withdrawn")
            .partition(|v| v.state == "deleted");
    deletions.sort_by_key(|v| v.epoch);
    // A value is withdrawn (akd's tombstone) only by a later deletion; a withdrawn version
    // with none after it is a value someone overwrote in the store (its commitment cannot be
    // opened any more), maybe a key that was not the owner's: not taken as the owner's.
    let last_deletion = deletions.iter().map(|v| v.version).max();
    for v in withdrawn {
        v.yours = last_deletion.is_some_and(|d| d > v.version);
    }
    for v in deletions {
        if v.misdated.is_some() {
            v.yours = false;
            continue;
        }
        let at = v.changed_at.unwrap_or(0);
        v.yours = match own.iter().position(|d| d.explains(at)) {
            Some(i) => {
                own.remove(i);
                true
            }
            None => false,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> Address {
        kst_core::AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap()
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/../kst-core/testdata/keys/{name}.pub.asc",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn facts_and_differences_of_real_keys() {
        let now = 1_780_272_000;
        let base = KeyFacts::of(&fixture("merge-base"), &alice(), now).unwrap();
        let sub = KeyFacts::of(&fixture("merge-subkey"), &alice(), now).unwrap();
        let ext = KeyFacts::of(&fixture("merge-extended"), &alice(), now).unwrap();
        let rev = KeyFacts::of(&fixture("merge-revoked"), &alice(), now).unwrap();
        assert_eq!(base.expires_at, Some(1_893_499_200));
        assert_eq!(ext.expires_at, Some(2_051_265_600));
        assert_eq!(sub.subkeys.len(), 2);
        assert!(rev.revoked && !base.revoked);
        assert!(differences(&base, &base).is_empty());
        let d = differences(&base, &sub);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("lacks your subkeys"), "{d:?}");
        assert!(differences(&base, &ext)[0].contains("expiry"));
        assert!(differences(&base, &rev)[0].contains("publish the revocation"));
        // An old copy served after the owner revoked a subkey (a rollback): a mismatch.
        let subrev = KeyFacts::of(&fixture("merge-subrevoked"), &alice(), now).unwrap();
        assert_eq!(subrev.revoked_subkeys.len(), 1);
        let d = differences(&base, &subrev);
        assert!(d.iter().any(|d| d.contains("unrevoked")), "{d:?}");
        assert!(
            differences(&subrev, &base).is_empty(),
            "{:?}",
            differences(&subrev, &base)
        );
        let other = KeyFacts::of(&fixture("lifecycle-v1"), &alice(), now).unwrap();
        assert!(differences(&other, &base)[0].contains("serves key"));
    }

    /// Each deletion this client asked for explains one deletion in the directory (the KST's
    /// time between the request and the confirmation, give or take the clock slack), oldest
    /// first; a second deletion at the same time, or one far from any, is not the owner's.
    #[cfg(feature = "transparency")]
    #[test]
    fn a_deletion_is_yours_only_when_one_you_asked_for_explains_it() {
        use super::super::log_memory::{DELETION_CLOCK_SLACK, OwnDeletion};
        let deleted = |epoch: u64, at: u64| DirectoryVersion {
            epoch,
            version: epoch,
            state: "deleted".into(),
            fingerprint: None,
            changed_at: Some(at),
            yours: true,
            misdated: None,
        };
        let own = |requested_at, confirmed_at| OwnDeletion {
            requested_at,
            confirmed_at,
        };
        let t = 1_800_000_000;
        // Newest first, as the history lists them.
        let mut versions = vec![
            deleted(9, t + 100_000),
            deleted(5, t + 20),
            deleted(3, t + 10),
        ];
        mark_deletions(&mut versions, vec![own(t, t + 30)]);
        let yours: Vec<bool> = versions.iter().map(|v| v.yours).collect();
        assert_eq!(yours, vec![false, false, true]);
        // The clock slack either side; beyond it, not explained.
        let slack = DELETION_CLOCK_SLACK;
        assert!(own(t, t + 30).explains(t - slack));
        assert!(own(t, t + 30).explains(t + 30 + slack));
        assert!(!own(t, t + 30).explains(t - slack - 1));
        assert!(!own(t, t + 30).explains(t + 31 + slack));
        // Two deletions asked for explain two.
        let mut versions = vec![deleted(5, t + 20), deleted(3, t + 10)];
        mark_deletions(&mut versions, vec![own(t, t + 15), own(t + 18, t + 25)]);
        assert!(versions.iter().all(|v| v.yours));
    }

    /// Red team (issue 18): a value is withdrawn (akd's tombstone, which the tree cannot
    /// check) only by a later deletion. An insider who served another key and then overwrote
    /// that version's value with the tombstone in the store made it read as `withdrawn`, which
    /// counted as the owner's: the foreign key was hidden. Now a withdrawn version with no
    /// deletion after it is not the owner's; one before a deletion still is.
    #[cfg(feature = "transparency")]
    #[test]
    fn rt18_a_withdrawn_value_without_a_later_deletion_is_not_yours() {
        let version = |v: u64, state: &str| DirectoryVersion {
            epoch: v,
            version: v,
            state: state.into(),
            fingerprint: None,
            changed_at: Some(1_800_000_000 + v),
            yours: true,
            misdated: None,
        };
        // Newest first: the owner's key again (3), the overwritten foreign one (2), the first.
        let mut versions = vec![
            version(3, "published"),
            version(2, "withdrawn"),
            version(1, "published"),
        ];
        mark_deletions(&mut versions, Vec::new());
        assert!(
            !versions[1].yours,
            "a withdrawn value with no deletion after it must be reported"
        );
        // Withdrawn by a deletion that follows: the owner's (the deletion is judged itself).
        let mut versions = vec![
            version(3, "deleted"),
            version(2, "withdrawn"),
            version(1, "withdrawn"),
        ];
        mark_deletions(&mut versions, Vec::new());
        assert_eq!(
            versions.iter().map(|v| v.yours).collect::<Vec<_>>(),
            vec![false, true, true]
        );
    }

    /// A deletion's time against the heads around its epoch: within the clock slack of the
    /// head of its epoch and the head before, it fits; after its own epoch's head, or before
    /// the previous head (back-dated), it does not; a previous head signed late (not before
    /// the head of the epoch) bounds nothing.
    #[cfg(feature = "transparency")]
    #[test]
    fn a_deletion_must_be_dated_between_the_heads_around_it() {
        use super::super::log_memory::DELETION_CLOCK_SLACK as SLACK;
        let t = 1_800_000_000;
        assert_eq!(deletion_misdated(t, 5, Some(t - 3), Some(t + 1)), None);
        assert_eq!(deletion_misdated(t, 5, None, None), None);
        assert_eq!(deletion_misdated(t + SLACK, 5, Some(t), Some(t)), None);
        assert_eq!(
            deletion_misdated(t, 5, Some(t + SLACK), Some(t + SLACK)),
            None
        );
        let late = deletion_misdated(t + SLACK + 1, 5, Some(t - 9), Some(t)).unwrap();
        assert!(late.contains("after the head of its epoch 5"), "{late}");
        // Back-dated with its epoch's head (the writer run with a clock set back).
        let back = deletion_misdated(t - 7200, 5, Some(t - 60), Some(t - 7200)).unwrap();
        assert!(back.contains("before the head of epoch 4"), "{back}");
        // Red team round 3: the head of epoch 5 signed late (a day after the deletion, on
        // demand), the head of epoch 4 signed late an hour after that (the backfill reached
        // it then): heads signed late are in no order; an honest deletion, not back-dated.
        assert_eq!(
            deletion_misdated(t - 86_400, 5, Some(t + 3600), Some(t)),
            None
        );
        // Both heads after the deletion, in order: maybe both signed late; nothing concluded.
        assert_eq!(deletion_misdated(t - 7200, 5, Some(t - 60), Some(t)), None);
        assert_eq!(deletion_misdated(t - 7200, 5, Some(t), Some(t)), None);
        // A misdated deletion explains nothing, even within a noted deletion's window.
        let mut versions = vec![DirectoryVersion {
            epoch: 5,
            version: 2,
            state: "deleted".into(),
            fingerprint: None,
            changed_at: Some(t - 7200),
            yours: true,
            misdated: deletion_misdated(t - 7200, 5, Some(t - 60), Some(t - 7200)),
        }];
        mark_deletions(
            &mut versions,
            vec![super::super::log_memory::OwnDeletion {
                requested_at: t - 7205,
                confirmed_at: t - 7195,
            }],
        );
        assert!(!versions[0].yours);
    }

    #[test]
    fn publish_warns_about_keys_that_expire_soon() {
        let expires = 1_893_499_200; // merge-base: 2030-01-01
        let key = fixture("merge-base");
        assert_eq!(expiry_warning(&key, expires - 31 * 86_400), None);
        let w = expiry_warning(&key, expires - 10 * 86_400).unwrap();
        assert!(w.contains("expires in 10 days"), "{w}");
        assert!(
            expiry_warning(&key, expires + 1)
                .unwrap()
                .contains("has expired")
        );
        assert_eq!(
            expiry_warning(&fixture("merge-revoked"), expires - 86_400),
            None
        );
        assert_eq!(
            expiry_warning(&fixture("lifecycle-v1"), 0),
            None,
            "no expiry"
        );
        assert_eq!(expiry_warning("garbage", 0), None);
    }
}
