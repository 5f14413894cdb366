//! A change of the address while a version 1 or 2 reply was on its way (issue 18): `kst
//! client retrieve --check-transparency` reads the key by mail and the key directory's
//! answer over HTTP, at two moments. When the answer verifies (the head's signature, the
//! proof, the memory of heads) but proves another state of the address than the reply
//! served, the client asks again a few times over about 2 s ([`ASK_AGAIN_MS`]: the reply's
//! change may not be recorded yet), then lets the directory's own proofs decide: first the
//! answer's, when the epoch it proves for the address's newest version is at or before the
//! epoch verified before sending ([`recorded_before_sending`]: exit 5), else ([`decide`]) the history of the address (`/history/<address>`, tied to a root the client
//! verified) shows whether the served key (or "no key") was the directory's state at some
//! epoch, and at which epoch a change superseded it. That epoch is compared with the newest
//! epoch the client had verified before it sent the request ([`by_epoch`]; no clock is
//! compared; the head is fetched and verified just before sending when the directory can be
//! read then, [`super::transparency`]'s `presend`): superseded at a newer epoch, a race, a temporary failure (exit 75), nothing
//! imported. Superseded at or before it, or never the directory's state: an attack (exit 5,
//! the evidence kept). A client that had verified no epoch before the request cannot tell
//! (exit 75: the check remembered a head, so the next request is decided).

use kst_core::Address;
use kst_core::transparency::EntryState;
use kst_core::transparency::history::{
    HistoryAnswer, HistoryPage, HistoryVersion, MAX_HISTORY_ANSWER, MAX_PAGES,
};

use super::log_memory::Held;
use super::output::Outcome;
use super::transparency::{fetch_or_missing, path_segment};

/// The waits before asking the directory again when its answer proves another state than
/// the reply served (about 2 s in all): the reply's change may be published but not yet
/// recorded in an epoch (the directory records it milliseconds later).
pub const ASK_AGAIN_MS: [u64; 5] = [100, 200, 400, 600, 700];

/// How often [`decide`] may ask for a newer answer (the history was read at an epoch newer
/// than the remembered head) before the client gives up for now (exit 75). Each newer
/// answer must reach the history's epoch: the directory's own answer, read after its
/// history, older than that history is an attack (a history from another directory).
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
            (Some(_), None) => next.is_some_and(is_deletion),
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
/// `None` (go on to the history, [`decide`]). `newest_at`: the epoch at which the directory
/// recorded the address's newest version, as the answer's proof shows it (akd's lookup proof
/// binds the version's value to the epoch that inserted it; `None`: the answer proves the
/// address never held, which only the history can tie to a first publication on the way).
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

/// The history read (`text`) and its older pages (`pages`, empty when none), as evidence.
fn joined(text: &str, pages: &str) -> String {
    match pages.is_empty() {
        true => text.to_string(),
        false => format!("{text}\n{pages}"),
    }
}

/// What [`decide`] found.
#[derive(Debug)]
pub enum Decision {
    /// The history was read at an epoch newer than the remembered head: ask the directory
    /// for a newer answer (its append-only proof ties that epoch to the memory), which must
    /// reach this epoch, then decide again.
    AskAgain {
        /// The history's epoch.
        epoch: u64,
        /// What was read (the history), kept as evidence if the newer answer does not reach
        /// its epoch (a history from another directory, signed with the head key: a fork)
        /// or the directory keeps moving.
        seen: String,
    },
    /// A change raced the reply: the message of the temporary failure (exit 75).
    Race(String),
    /// Not a race (exit 5).
    Attack {
        /// Why.
        why: String,
        /// What was read (the history), kept as evidence with the answer.
        seen: String,
    },
    /// The history cannot be read or tied to the client's verified history now: the reason
    /// (exit 75; the caller keeps the verified mismatch and `seen` as evidence).
    Unread {
        /// What failed.
        why: String,
        /// What was read, if anything.
        seen: String,
    },
}

/// Where and against what [`decide`] reads the history.
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
    /// Without `verified_epoch`, why, the end of a sentence starting "the client ..."
    /// ([`super::transparency::VerifiedBefore::epoch_in`]).
    pub no_epoch: &'a str,
    /// The epoch of the last answer, which proved another state.
    pub answer_epoch: u64,
}

/// Decides whether the served state, which the directory's answer at `r.answer_epoch` does
/// not prove, was superseded by a change recorded after the newest epoch the client had
/// verified when it sent the request (a race) or not (an attack), from the address's
/// history (its newest 64 versions, then older pages while the served state is not among
/// them; their epochs proven) against a head whose root the client
/// verified (`held`'s remembered history).
pub async fn decide(r: &Race<'_>, held: &Held) -> Decision {
    let domain = r.address.domain();
    let path = format!(
        "/.well-known/kst/log/{domain}/history/{}",
        path_segment(r.address.as_str())
    );
    let url = format!("{}{path}", r.log_base);
    let text = match fetch_or_missing(r.log_base, &path, r.ca_file, MAX_HISTORY_ANSWER).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Decision::Attack {
                why: format!(
                    "{url} says the directory never held {}: what the reply served was never \
                     its state there",
                    r.address
                ),
                seen: String::new(),
            };
        }
        Err(o) => {
            return Decision::Unread {
                why: match o {
                    Outcome::Error { error, .. } => {
                        format!("the history could not be read: {error}")
                    }
                    _ => format!("the history could not be read from {url}"),
                },
                seen: String::new(),
            };
        }
    };
    let attack = |why: String| Decision::Attack {
        why,
        seen: text.clone(),
    };
    let history = match HistoryAnswer::parse(&text) {
        Ok(h) => h,
        Err(e) => return attack(format!("{url}: {e}")),
    };
    let mut versions = match history.verify(r.head_key, r.address) {
        Ok(v) => v,
        Err(e) => return attack(format!("{url}: {e}")),
    };
    let head = &history.head.head;
    if let Some(vrf) = &held.memory.vrf_key
        && !vrf.eq_ignore_ascii_case(&hex::encode(head.vrf_public_key))
    {
        return attack(format!(
            "{url}: the history's head (epoch {}) names the VRF key {}, not the pinned {vrf}",
            head.epoch,
            hex::encode(head.vrf_public_key)
        ));
    }
    // The history was read after the directory's answer: an older one is not the
    // directory's current history but one replayed from before (a history captured earlier,
    // whose root the client may never have kept), whatever it says.
    if head.epoch < r.answer_epoch {
        return attack(format!(
            "{url}: the history's head is of epoch {}, older than the directory's answer (epoch \
             {}) read before it: a history replayed from before, not the directory's",
            head.epoch, r.answer_epoch
        ));
    }
    // The history's head tied to the verified history the client remembers: the same root
    // at its epoch. A newer epoch is tied by a newer answer's append-only proof first.
    match held.memory.known_root(head.epoch) {
        Some(root) if root == head.root_hash => {}
        Some(root) => {
            return attack(format!(
                "possible fork of the key directory of {domain}: the history's head of epoch \
                 {} has the root {}, the remembered history has {}",
                head.epoch,
                hex::encode(head.root_hash),
                hex::encode(root)
            ));
        }
        None if held
            .memory
            .remembered_epoch()
            .is_none_or(|e| head.epoch > e) =>
        {
            return Decision::AskAgain {
                epoch: head.epoch,
                seen: text.clone(),
            };
        }
        None => {
            return Decision::Unread {
                why: format!(
                    "the history ({url}) is of epoch {}, which the client cannot tie to its \
                     remembered history",
                    head.epoch
                ),
                seen: text.clone(),
            };
        }
    }
    // Review F9: the served state may be older than the newest page (an address changed
    // more than 64 times since): the older pages, down to version 1, against the same head.
    let mut pages_text = String::new();
    let mut pages = 0;
    while superseded(&versions, r.served) == Superseded::Never
        && let Some((before, before_epoch)) = versions
            .iter()
            .map(|v| (v.akd_version, v.epoch))
            .min()
            .filter(|(v, _)| *v > 1)
    {
        if pages == MAX_PAGES {
            return Decision::Unread {
                why: format!(
                    "the history of {} holds {before} versions below the {} the client read, \
                     more than it reads",
                    r.address,
                    versions.len()
                ),
                seen: joined(&text, &pages_text),
            };
        }
        pages += 1;
        let page_path = format!("{path}?before={before}");
        let page_text =
            match fetch_or_missing(r.log_base, &page_path, r.ca_file, MAX_HISTORY_ANSWER).await {
                Ok(Some(t)) => t,
                Ok(None) => {
                    return Decision::Attack {
                        why: format!(
                            "{url}?before={before}: no versions below {before}, which the \
                             newest versions proved"
                        ),
                        seen: joined(&text, &pages_text),
                    };
                }
                Err(o) => {
                    return Decision::Unread {
                        why: match o {
                            Outcome::Error { error, .. } => {
                                format!("the history's older versions could not be read: {error}")
                            }
                            _ => {
                                format!("the history's older versions could not be read from {url}")
                            }
                        },
                        seen: joined(&text, &pages_text),
                    };
                }
            };
        pages_text.push_str(&format!("-- page below version {before} --\n{page_text}\n"));
        let page = match HistoryPage::parse(&page_text) {
            Ok(p) => p,
            Err(e) => {
                return Decision::Attack {
                    why: format!("{url}?before={before}: {e}"),
                    seen: joined(&text, &pages_text),
                };
            }
        };
        // Review R4: the page's head is checked (its signature) before it is compared with
        // the history's, and compared whole: a head signed with the head key that
        // contradicts the history's (another VRF key, or root for the same epoch: a fork; an
        // older epoch: a replay) is an attack, both heads kept; only a newer head is the
        // directory moving on between the requests.
        let page_attack = |why: String| Decision::Attack {
            why,
            seen: joined(&text, &pages_text),
        };
        if let Err(e) = page.head.verify(r.head_key) {
            return page_attack(format!("{url}?before={before}: {e}"));
        }
        let at = &page.head.head;
        if (at.domain.as_str(), at.vrf_public_key) != (head.domain.as_str(), head.vrf_public_key) {
            return page_attack(format!(
                "{url}?before={before}: the page's head (epoch {}) is of the directory of {} \
                 with the VRF key {}, not of the history's ({} with {})",
                at.epoch,
                at.domain,
                hex::encode(at.vrf_public_key),
                head.domain,
                hex::encode(head.vrf_public_key)
            ));
        }
        match at.epoch.cmp(&head.epoch) {
            std::cmp::Ordering::Less => {
                return page_attack(format!(
                    "{url}?before={before}: the page's head is of epoch {}, older than the \
                     history's (epoch {}) read before it: a page replayed from before, not the \
                     directory's",
                    at.epoch, head.epoch
                ));
            }
            std::cmp::Ordering::Equal if at.root_hash != head.root_hash => {
                return page_attack(format!(
                    "possible fork of the key directory of {domain}: two heads of epoch {} \
                     signed with the head key, the history's with the root {} and the page's \
                     ({url}?before={before}) with {}",
                    head.epoch,
                    hex::encode(head.root_hash),
                    hex::encode(at.root_hash)
                ));
            }
            std::cmp::Ordering::Equal => {}
            std::cmp::Ordering::Greater => {
                // A newer epoch was committed between the requests: read again later.
                return Decision::Unread {
                    why: format!(
                        "the directory moved from epoch {} to {} while the history was read",
                        head.epoch, at.epoch
                    ),
                    seen: joined(&text, &pages_text),
                };
            }
        }
        match page
            .verify(r.head_key, r.address, before, before_epoch)
            .await
        {
            Ok(older) => versions.extend(older),
            Err(e) => {
                return Decision::Attack {
                    why: format!("{url}?before={before}: {e}"),
                    seen: joined(&text, &pages_text),
                };
            }
        }
    }
    let text = joined(&text, &pages_text);
    let attack = |why: String| Decision::Attack {
        why,
        seen: text.clone(),
    };
    let what = match r.served {
        Some(_) => "the served key",
        None => "\"no key\"",
    };
    let epoch = match superseded(&versions, r.served) {
        Superseded::Newest(at) if at > r.answer_epoch => {
            return Decision::Race(format!(
                "key directory of {domain}: {what} for {} was recorded at epoch {at}, after \
                 the directory's answer (epoch {}) was read: it changed while the reply was on \
                 its way; nothing was imported; retrieve again",
                r.address, r.answer_epoch
            ));
        }
        Superseded::Newest(at) => {
            return attack(format!(
                "the history of {} (epoch {}) names {what} as the newest version (epoch \
                 {at}), which the answer of epoch {} does not prove",
                r.address, head.epoch, r.answer_epoch
            ));
        }
        Superseded::Never => {
            return attack(format!(
                "the directory's history of {} (epoch {}, {} versions down to version 1) never \
                 held {what}",
                r.address,
                head.epoch,
                versions.len()
            ));
        }
        Superseded::At(epoch) => epoch,
    };
    let verified = match r.verified_epoch {
        Some(v) => format!("epoch {v}"),
        None => "no epoch".into(),
    };
    match by_epoch(epoch, r.verified_epoch) {
        Verdict::Race => Decision::Race(format!(
            "key directory of {domain}: {} changed while the reply was on its way: the \
             directory recorded {what} as superseded at epoch {epoch}, after the newest epoch \
             the client had verified when it sent the request ({verified}); nothing was \
             imported; retrieve again for the current key",
            r.address
        )),
        Verdict::Unknown => Decision::Race(format!(
            "key directory of {domain}: the directory recorded {what} for {} as superseded \
             at epoch {epoch}; the client {}, so it cannot tell whether the address \
             changed while the reply was on its way or the key was stale; nothing was \
             imported; retrieve again (the head of epoch {} is remembered now: the next \
             request is decided)",
            r.address,
            r.no_epoch,
            held.memory.remembered_epoch().unwrap_or(r.answer_epoch)
        )),
        Verdict::Stale => attack(format!(
            "the directory's history of {} (epoch {}) shows {what} superseded at epoch \
             {epoch}, at or before the {verified} the client had verified before it sent the \
             request: recorded before the request, not a change on the way (a stale or forged \
             key)",
            r.address, head.epoch
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kst_core::Fingerprint;
    use kst_core::transparency::DirectoryEntry;
    use kst_core::transparency::entry::key_hash;

    fn version(akd_version: u64, epoch: u64, entry: Option<DirectoryEntry>) -> HistoryVersion {
        HistoryVersion {
            epoch,
            akd_version,
            entry,
        }
    }

    fn key(k: &[u8], version: u64) -> Option<DirectoryEntry> {
        Some(DirectoryEntry {
            state: EntryState::Published,
            version,
            changed_at: 1,
            key: Some((Fingerprint::parse(&"AA".repeat(20)).unwrap(), key_hash(k))),
        })
    }

    fn deleted(version: u64) -> Option<DirectoryEntry> {
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
}
