//! A change of the address while a version 1 or 2 reply was on its way (issue 18): `kst
//! client retrieve --check-transparency` reads the key by mail and the key directory's
//! answer over HTTP, at two moments. When the answer verifies (the head's signature, the
//! proof, the memory of heads) but proves another state of the address than the reply
//! served, the client asks again a few times over about 2 s ([`ASK_AGAIN_MS`]: the reply's
//! change may not be recorded yet), then lets the directory's own proofs decide: first the
//! answer's, when the epoch it proves for the address's newest version is at or before the
//! epoch verified before sending ([`recorded_before_sending`]: exit 5), else the history of
//! the address (`/history/<address>`, read by [`read`] without the domain's memory lock,
//! then tied by [`judge`] to roots the client verified) shows whether the served key (or
//! "no key") was the directory's state at some epoch, and at which epoch a change
//! superseded it. That epoch is compared with the newest epoch the client had verified
//! before it sent the request ([`by_epoch`]; no clock is compared; the head is fetched and
//! verified just before sending when the directory can be read then,
//! [`super::transparency`]'s `presend`): superseded at a newer epoch, a race, a temporary
//! failure (exit 75), nothing imported. Superseded at or before it, or never the
//! directory's state: an attack (exit 5, the evidence kept). A client that had verified no
//! epoch before the request cannot tell (exit 75: the check remembered a head, so the next
//! request is decided).

use kst_core::Address;
use kst_core::transparency::EntryState;
use kst_core::transparency::history::HistoryVersion;

use super::state::VerifiedState;

/// The waits before asking the directory again when its answer proves another state than
/// the reply served (about 2 s in all): the reply's change may be published but not yet
/// recorded in an epoch (the directory records it milliseconds later).
pub const ASK_AGAIN_MS: [u64; 5] = [100, 200, 400, 600, 700];

/// How often [`judge`] may ask for a newer answer (a head of the history read is newer than
/// the remembered head) before the client gives up for now (exit 75). Each newer answer
/// must reach the newest epoch of the history read: the directory's own answer, read after
/// its history, older than that history is an attack (a history from another directory).
/// The history is judged again, not read again, so one newer answer ties it.
pub const MAX_NEWER_ANSWERS: usize = 2;

/// What the history says about the served state ([`superseded`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Superseded {
    /// The served state is the address's newest version, recorded at this epoch.
    Newest(u64),
    /// The served state was the directory's state until a change recorded at this epoch
    /// (the newest such change when it was the state more than once).
    At(u64),
    /// The served state is not among the versions (a key never recorded, or "no key" while
    /// the address always held one).
    Never,
}

/// Whether `served` (a key's packets, `None` for "no key") was the state of the address
/// among `versions` (a verified history, any order), and what superseded it. A version whose
/// value a deletion withdrew (no entry) may have held any key: it counts as the served key's
/// only when the change right after it is that deletion (the state before a deletion is
/// what a reply read just before it served). "No key" is the state of a deletion, and the
/// state before version 1 (the address not yet held) when version 1 is in `versions`.
pub fn superseded(versions: &[HistoryVersion], served: Option<&[u8]>) -> Superseded {
    superseded_with(versions, served, true)
}

/// [`superseded`], a withdrawn value counted as the served key's only when `withdrawn`.
fn superseded_with(
    versions: &[HistoryVersion],
    served: Option<&[u8]>,
    withdrawn: bool,
) -> Superseded {
    let by_version: std::collections::BTreeMap<u64, &HistoryVersion> =
        versions.iter().map(|v| (v.akd_version, v)).collect();
    let is_deletion = |v: &HistoryVersion| {
        v.entry
            .as_ref()
            .is_some_and(|e| e.state == EntryState::Deleted)
    };
    let mut newest = None;
    let mut at: Option<u64> = None;
    for v in versions {
        let next = v
            .akd_version
            .checked_add(1)
            .and_then(|n| by_version.get(&n).copied());
        let was_served = match (served, &v.entry) {
            (Some(key), Some(e)) => e.state != EntryState::Deleted && e.commits_to_key(key),
            (Some(_), None) => withdrawn && next.is_some_and(is_deletion),
            (None, _) => is_deletion(v),
        };
        if !was_served {
            continue;
        }
        match next {
            Some(n) => at = Some(at.map_or(n.epoch, |a| a.max(n.epoch))),
            None => newest = Some(v.epoch),
        }
    }
    if served.is_none()
        && let Some(first) = by_version.get(&1)
    {
        at = Some(at.map_or(first.epoch, |a| a.max(first.epoch)));
    }
    match (newest, at) {
        (Some(epoch), _) => Superseded::Newest(epoch),
        (None, Some(epoch)) => Superseded::At(epoch),
        (None, None) => Superseded::Never,
    }
}

/// What the client knows of a withdrawn value that alone makes the served key a race
/// ([`withdrawn_match`], review F3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Withdrawn {
    /// The answer verified before sending proved the served key as that version: a change
    /// on the way.
    Proven,
    /// The answer verified before sending proved another key as that version (the newest
    /// then, until the deletion): a forged key, or a key the store held only briefly before
    /// the deletion, which the directory did not record (not told apart: not decided).
    Disproven {
        /// The withdrawn version.
        version: u64,
        /// The epoch of the deletion after it.
        deleted_at: u64,
        /// The epoch verified before sending.
        verified: u64,
    },
    /// Nothing the client verified shows which key that version held (recorded after the
    /// epoch verified before sending, or no key proven then).
    Unknown {
        /// The withdrawn version.
        version: u64,
        /// The epoch of the deletion after it.
        deleted_at: u64,
    },
}

/// For a served key that the history matches, as a race, only as a value a deletion
/// withdrew (a version right before a deletion recorded after `verified`, the epoch
/// verified before sending): whether `state`, the key the directory's answer of that epoch
/// proved, shows it was that value ([`Withdrawn`]); `None` when no such withdrawn version
/// is among `versions`. A deletion drops the values of the versions before it, so the
/// history alone would take any key for the one held right before a deletion: a provider
/// that records a deletion (and a new key) after each request could pass any forged key
/// off as a race.
pub fn withdrawn_match(
    versions: &[HistoryVersion],
    served: &[u8],
    verified: u64,
    state: Option<&VerifiedState>,
) -> Option<Withdrawn> {
    let served_hash = hex::encode(kst_core::transparency::entry::key_hash(served));
    let mut found = None;
    for w in versions.iter().filter(|v| v.entry.is_none()) {
        let Some(deletion) = versions.iter().find(|d| {
            Some(d.akd_version) == w.akd_version.checked_add(1)
                && d.entry
                    .as_ref()
                    .is_some_and(|e| e.state == EntryState::Deleted)
        }) else {
            continue;
        };
        if deletion.epoch <= verified {
            continue;
        }
        let known = state.filter(|st| w.epoch <= verified && st.recorded_at == w.epoch);
        let this = match known {
            Some(st) if st.key_hash.eq_ignore_ascii_case(&served_hash) => {
                return Some(Withdrawn::Proven);
            }
            Some(_) => Withdrawn::Disproven {
                version: w.akd_version,
                deleted_at: deletion.epoch,
                verified,
            },
            None => Withdrawn::Unknown {
                version: w.akd_version,
                deleted_at: deletion.epoch,
            },
        };
        // One that cannot be told outweighs one disproven: the served key may be it.
        if !matches!(found, Some(Withdrawn::Unknown { .. })) {
            found = Some(this);
        }
    }
    found
}

/// What the epoch of the change that superseded the served state says ([`by_epoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Recorded after every epoch the client had verified before the request: it may have
    /// raced the reply (exit 75).
    Race,
    /// Recorded at or before an epoch the client had verified before it sent the request: the
    /// reply served a state the directory had superseded already (exit 5).
    Stale,
    /// The client had verified no epoch of the directory before the request (or the request
    /// was kept by a kst from before the epoch was): it cannot tell (exit 75; the check
    /// remembered a head, so a new request is decided).
    Unknown,
}

/// Whether a change recorded at `superseded_at` could have raced a request made when the
/// newest epoch the client had verified was `verified` ([`Verdict`]). Epochs only: the head's
/// `signed-at` is the provider's to choose (it holds the head key), the request's time is the
/// client's clock.
pub fn by_epoch(superseded_at: u64, verified: Option<u64>) -> Verdict {
    match verified {
        None => Verdict::Unknown,
        Some(v) if superseded_at <= v => Verdict::Stale,
        Some(_) => Verdict::Race,
    }
}

/// Whether the directory's answer alone shows that the served state was not the directory's
/// state when the request was sent, before any history is read: the attack's reason, or
/// `None` (go on to the history, [`read`] and [`judge`]). `newest_at`: the epoch at which the
/// directory recorded the address's newest version, as the answer's proof shows it (akd's
/// lookup proof binds the version's value to the epoch that inserted it; `None`: the answer
/// proves the address never held, which only the history can tie to a first publication on
/// the way).
///
/// Called after the ask-again rounds ([`ASK_AGAIN_MS`]), with an answer that verified in
/// every other way (its head remembered, tied to the memory by its append-only proof) and
/// still proves another state than the reply served. When that newest version was recorded
/// at or before `r.verified_epoch`:
/// - `r.verified_epoch` was verified before the request was sent (the head verified just
///   before sending, or the remembered one), so at sending time the directory's state of the
///   address was that newest version: recorded at or before that epoch, and still the newest
///   at the answer's epoch, which is no older (the answer extends the memory);
/// - the served state differs from it, so the reply did not serve the state that was current
///   when the request was sent;
/// - the only honest way to serve another state is a newer one, written to the store after
///   sending and not yet recorded (the store is written before the directory): the ask-again
///   rounds gave it about 2 s to appear in an answer, and the history would call it "never
///   held" (exit 5) anyway, since it holds only recorded versions.
///
/// So it is exit 5, with the answer as evidence, whatever the history route does (503, a
/// timeout, an epoch committed before each read: a busy domain's history may never tie to
/// the answer before it, which made a stale or forged key exit 75 on every retry). A newest
/// version recorded after `r.verified_epoch` may be a change on the way: the history decides.
/// No epoch verified before the request: the client cannot tell this way either.
pub fn recorded_before_sending(r: &Race<'_>, newest_at: Option<u64>) -> Option<String> {
    let (at, verified) = (newest_at?, r.verified_epoch?);
    if at > verified {
        return None;
    }
    let what = match r.served {
        Some(_) => "the served key",
        None => "\"no key\"",
    };
    Some(format!(
        "the directory's answer (epoch {}) proves the newest version of {} recorded at epoch \
         {at}, at or before the epoch {verified} the client had verified before it sent the \
         request: {what} was not the directory's state when the request was sent, not a \
         change on the way (a stale or forged key)",
        r.answer_epoch, r.address
    ))
}

/// Where and against what [`read`] and [`judge`] work.
pub struct Race<'a> {
    /// Where the domain's directory is served.
    pub log_base: &'a str,
    /// The extra CA file of `--ca-file`.
    pub ca_file: Option<&'a std::path::Path>,
    /// The domain's head key.
    pub head_key: &'a [u8; 32],
    /// The address.
    pub address: &'a Address,
    /// What the reply served: a key's packets, `None` for "no key".
    pub served: Option<&'a [u8]>,
    /// The newest epoch the client had verified when it made the request
    /// ([`super::state::LogRequirements::verified_epoch`]).
    pub verified_epoch: Option<u64>,
    /// The key the directory's answer of `verified_epoch` proved as the address's newest
    /// version, when the client verified it just before sending
    /// ([`super::state::LogRequirements::verified_state`]).
    pub verified_state: Option<&'a VerifiedState>,
    /// Without `verified_epoch`, why, the end of a sentence starting "the client ..."
    /// ([`super::transparency::VerifiedBefore::epoch_in`]).
    pub no_epoch: &'a str,
    /// The epoch of the last answer, which proved another state.
    pub answer_epoch: u64,
}

/// The history's reading and judging ([`read`], [`judge`]).
mod history;
pub use history::{Decision, READ_BUDGET, Read, judge, read};

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::Fingerprint;
    use kst_core::transparency::DirectoryEntry;
    use kst_core::transparency::entry::key_hash;

    pub(super) fn version(
        akd_version: u64,
        epoch: u64,
        entry: Option<DirectoryEntry>,
    ) -> HistoryVersion {
        HistoryVersion {
            epoch,
            akd_version,
            entry,
        }
    }

    pub(super) fn key(k: &[u8], version: u64) -> Option<DirectoryEntry> {
        Some(DirectoryEntry {
            state: EntryState::Published,
            version,
            changed_at: 1,
            key: Some((Fingerprint::parse(&"AA".repeat(20)).unwrap(), key_hash(k))),
        })
    }

    pub(super) fn deleted(version: u64) -> Option<DirectoryEntry> {
        Some(DirectoryEntry::deleted(version, 1))
    }

    #[test]
    fn a_superseded_key_names_the_change_after_it() {
        let h = [
            version(3, 9, key(b"k3", 3)),
            version(2, 5, key(b"k2", 2)),
            version(1, 2, key(b"k1", 1)),
        ];
        assert_eq!(superseded(&h, Some(b"k1")), Superseded::At(5));
        assert_eq!(superseded(&h, Some(b"k2")), Superseded::At(9));
        assert_eq!(superseded(&h, Some(b"k3")), Superseded::Newest(9));
        assert_eq!(superseded(&h, Some(b"never")), Superseded::Never);
        // "No key": the state before version 1.
        assert_eq!(superseded(&h, None), Superseded::At(2));
        // Without version 1 in the page, and no deletion: never "no key".
        assert_eq!(superseded(&h[..2], None), Superseded::Never);
    }

    #[test]
    fn a_key_published_twice_names_the_newest_change() {
        let h = [
            version(4, 12, key(b"k2", 4)),
            version(3, 9, key(b"k1", 3)),
            version(2, 5, key(b"k2", 2)),
            version(1, 2, key(b"k1", 1)),
        ];
        assert_eq!(superseded(&h, Some(b"k1")), Superseded::At(12));
        assert_eq!(superseded(&h, Some(b"k2")), Superseded::Newest(12));
    }

    #[test]
    fn only_a_change_after_the_verified_epoch_is_a_race() {
        assert_eq!(by_epoch(5, Some(4)), Verdict::Race);
        assert_eq!(by_epoch(5, Some(5)), Verdict::Stale);
        assert_eq!(by_epoch(5, Some(9)), Verdict::Stale);
        assert_eq!(by_epoch(1, Some(0)), Verdict::Race);
        assert_eq!(by_epoch(5, None), Verdict::Unknown);
    }

    #[test]
    fn only_a_newest_version_recorded_by_the_verified_epoch_decides_without_the_history() {
        let address = kst_core::AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap();
        let race = |verified_epoch| Race {
            log_base: "http://127.0.0.1:1",
            ca_file: None,
            head_key: &[0; 32],
            address: &address,
            served: Some(b"k1"),
            verified_epoch,
            verified_state: None,
            no_epoch: "",
            answer_epoch: 9,
        };
        let why = recorded_before_sending(&race(Some(5)), Some(5)).unwrap();
        assert!(
            why.contains("recorded at epoch 5") && why.contains("epoch 5 the client had verified"),
            "{why}"
        );
        assert!(recorded_before_sending(&race(Some(5)), Some(2)).is_some());
        // Recorded after the epoch verified before sending: maybe a change on the way.
        assert_eq!(recorded_before_sending(&race(Some(5)), Some(6)), None);
        // An absence proof, or no epoch verified before the request: the history decides.
        assert_eq!(recorded_before_sending(&race(Some(5)), None), None);
        assert_eq!(recorded_before_sending(&race(None), Some(1)), None);
    }

    #[test]
    fn withdrawn_values_count_only_right_before_their_deletion() {
        let h = [
            version(4, 12, key(b"k4", 4)),
            version(3, 9, deleted(3)),
            version(2, 5, None),
            version(1, 2, None),
        ];
        // Any key may have been version 2's, right before the deletion: superseded at 9.
        assert_eq!(superseded(&h, Some(b"any")), Superseded::At(9));
        // "No key" (the deletion) until 12, or before version 1 (epoch 2).
        assert_eq!(superseded(&h, None), Superseded::At(12));
        assert_eq!(superseded(&h, Some(b"k4")), Superseded::Newest(12));
        // A deletion that is the newest version: "no key" is the state now.
        assert_eq!(superseded(&h[1..], None), Superseded::Newest(9));
    }

    /// Review F3: a served key that the history matches, as a race, only as the value a
    /// deletion recorded after the verified epoch withdrew is decided by the key the answer
    /// verified before sending proved for that version; without it (or for a version
    /// recorded after that epoch) it cannot be told.
    #[test]
    fn a_withdrawn_value_is_told_by_the_key_verified_before_sending() {
        // Version 2 (epoch 5, its value withdrawn) until the deletion at epoch 9, then a
        // new key at epoch 10; the client verified epoch 6 before sending.
        let h = [
            version(4, 10, key(b"k4", 4)),
            version(3, 9, deleted(3)),
            version(2, 5, None),
            version(1, 2, None),
        ];
        let state = |hash_of: &[u8], recorded_at| VerifiedState {
            epoch: 6,
            recorded_at,
            key_hash: hex::encode(key_hash(hash_of)),
        };
        let proven = state(b"k2", 5);
        assert_eq!(
            withdrawn_match(&h, b"k2", 6, Some(&proven)),
            Some(Withdrawn::Proven)
        );
        assert_eq!(
            withdrawn_match(&h, b"forged", 6, Some(&proven)),
            Some(Withdrawn::Disproven {
                version: 2,
                deleted_at: 9,
                verified: 6
            })
        );
        let unknown = Some(Withdrawn::Unknown {
            version: 2,
            deleted_at: 9,
        });
        assert_eq!(withdrawn_match(&h, b"forged", 6, None), unknown);
        // A state of another version (recorded at another epoch) says nothing of it.
        assert_eq!(
            withdrawn_match(&h, b"forged", 6, Some(&state(b"k2", 2))),
            unknown
        );
        // Verified at epoch 4: version 2 was recorded after it, whatever was proven then.
        assert_eq!(
            withdrawn_match(&h, b"forged", 4, Some(&state(b"k2", 5))),
            unknown
        );
        // A deletion at or before the verified epoch makes no race: nothing to tell.
        assert_eq!(withdrawn_match(&h, b"forged", 9, Some(&proven)), None);
    }
}
