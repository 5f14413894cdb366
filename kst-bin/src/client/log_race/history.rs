//! The address's history as the two-step check reads it ([`read`]: the newest versions and
//! the older pages needed, without the domain's memory lock) and judges it against the
//! client's memory ([`judge`]: every head read tied to a root the client verified, then the
//! versions decide; review R6).

use kst_core::transparency::answer::head_text;
use kst_core::transparency::history::{
    HistoryAnswer, HistoryPage, HistoryVersion, MAX_HISTORY_ANSWER, MAX_PAGES,
};
use kst_core::transparency::{EntryState, SignedHead};

use super::super::log_memory::DomainMemory;
use super::super::output::Outcome;
use super::super::transparency::{fetch_or_missing, path_segment};
use super::{
    Race, Superseded, Verdict, Withdrawn, by_epoch, superseded, superseded_with, withdrawn_match,
};

/// The most time [`read`] takes for the history and its older pages in all (each request has
/// its own 20 s too): a slow or hostile directory cannot make one check read for minutes
/// (review R6).
pub const READ_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// How many of the older pages read are kept whole in an evidence file: the last ones read,
/// where the served state was found or the reading failed. The others are kept as their
/// signed heads with the size and SHA-256 of their text (review R6: up to 33 pages of 1.4 MB
/// each were kept whole, tens of MB per retrieval). An attack keeps every page whole: the
/// epochs and commitments of an older page are fixed once recorded, but a later deletion
/// can withdraw the values that showed it.
pub const PAGES_KEPT_WHOLE: usize = 2;

/// One older page of the history, as read.
#[derive(Debug, Clone)]
struct PageRead {
    /// The page holds the versions below this one.
    before: u64,
    /// Its text, as received.
    text: String,
    /// Its signed head, when it parsed.
    head: Option<SignedHead>,
}

/// The address's history as [`read`] read it, without the client's memory: the newest
/// versions and the older pages needed, each verified against its own signed head (a head
/// older than the history's, or another root for its epoch, was refused already). The heads
/// are tied to the client's memory by [`judge`], which may first need a newer answer
/// ([`Decision::AskAgain`]): the history is then judged again, not read again, so a domain
/// that commits an epoch between any two requests still gets decided.
#[derive(Debug, Clone)]
pub struct Read {
    /// Where the history was read.
    url: String,
    /// The history's text, as received.
    text: String,
    /// Its signed head.
    head: SignedHead,
    /// The epoch of the answer read before the history.
    answer_epoch: u64,
    /// Every version read (the newest ones and those of the older pages).
    versions: Vec<HistoryVersion>,
    /// The older pages read, oldest last.
    pages: Vec<PageRead>,
    /// The versions whose value an older page read under a newer head than the history's
    /// shows withdrawn, with that head's epoch.
    withdrawn_later: Vec<(u64, u64)>,
}

impl Read {
    /// The newest epoch among the heads read (the history's and its pages').
    pub fn newest_epoch(&self) -> u64 {
        self.heads().map(|h| h.epoch).max().unwrap_or(0)
    }

    /// The heads read: the history's, then its pages'.
    fn heads(&self) -> impl Iterator<Item = &kst_core::transparency::Head> {
        std::iter::once(&self.head.head).chain(
            self.pages
                .iter()
                .filter_map(|p| p.head.as_ref().map(|h| &h.head)),
        )
    }

    /// What was read, as evidence: the history whole, the last [`PAGES_KEPT_WHOLE`] pages
    /// whole, the others as their signed heads with their size and SHA-256.
    pub fn evidence(&self) -> String {
        self.evidence_kept(PAGES_KEPT_WHOLE)
    }

    /// What was read, the history and the last `whole` pages whole, the others as their
    /// signed heads with their size and SHA-256.
    fn evidence_kept(&self, whole: usize) -> String {
        use sha2::Digest as _;
        let mut out = self.text.clone();
        let whole_from = self.pages.len().saturating_sub(whole);
        for (i, page) in self.pages.iter().enumerate() {
            if i >= whole_from {
                out.push_str(&format!(
                    "\n-- page below version {} --\n{}",
                    page.before, page.text
                ));
                continue;
            }
            let head = page
                .head
                .as_ref()
                .and_then(|h| head_text(h).ok())
                .unwrap_or_default();
            out.push_str(&format!(
                "\n-- page below version {}: {} bytes, sha256 {}, not kept whole; its head --\n{head}",
                page.before,
                page.text.len(),
                hex::encode(sha2::Sha256::digest(page.text.as_bytes()))
            ));
        }
        out
    }

    /// A decision that `why` is an attack, with everything read as evidence (every page
    /// whole: a verdict such as "never held" rests on all of them, and a later deletion can
    /// withdraw the values that showed it; review F-3 of this change).
    fn attack(&self, why: String) -> Decision {
        Decision::Attack {
            why,
            seen: self.evidence_kept(self.pages.len()),
        }
    }

    /// A decision that the history could not be read or tied now (`why`), with what was
    /// read as evidence.
    fn unread(&self, why: String) -> Decision {
        Decision::Unread {
            why,
            seen: self.evidence(),
        }
    }
}

/// What [`read`] and [`judge`] found.
#[derive(Debug)]
pub enum Decision {
    /// A head of the history read is newer than the remembered head: ask the directory for
    /// a newer answer (its append-only proof ties that epoch to the memory), which must
    /// reach this epoch, then judge the same [`Read`] again.
    AskAgain {
        /// The newest epoch among the history's heads.
        epoch: u64,
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

/// One request of [`read`], within its deadline: the text, `None` for a 404, or why not.
async fn fetch(
    r: &Race<'_>,
    path: &str,
    deadline: tokio::time::Instant,
) -> Result<Option<String>, String> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match tokio::time::timeout(
        left,
        fetch_or_missing(r.log_base, path, r.ca_file, MAX_HISTORY_ANSWER),
    )
    .await
    {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(Outcome::Error { error, .. })) => Err(error),
        Ok(Err(_)) => Err(format!("{}{path} could not be read", r.log_base)),
        Err(_) => Err(format!(
            "reading the history took longer than {} s in all",
            READ_BUDGET.as_secs()
        )),
    }
}

/// Reads the address's history (its newest 64 versions, then older pages while the served
/// state is not among them; their epochs proven), each part verified against its own signed
/// head, within [`READ_BUDGET`]. Needs no memory: the caller holds no lock meanwhile (review
/// R6) and ties the heads to its memory afterwards ([`judge`]). A page under a newer head
/// than the history's is taken (the directory moved on between the requests: a page's
/// versions are fixed once recorded, and its head is tied like the history's); one under an
/// older head (a replay), or another root for the history's epoch or another VRF key (a
/// fork), is an attack. `Err`: decided (an attack) or not readable now, with what was read.
pub async fn read(r: &Race<'_>) -> Result<Read, Decision> {
    let deadline = tokio::time::Instant::now() + READ_BUDGET;
    let domain = r.address.domain();
    let path = format!(
        "/.well-known/kst/log/{domain}/history/{}",
        path_segment(r.address.as_str())
    );
    let url = format!("{}{path}", r.log_base);
    let text = match fetch(r, &path, deadline).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return Err(Decision::Attack {
                why: format!(
                    "{url} says the directory never held {}: what the reply served was never \
                     its state there",
                    r.address
                ),
                seen: String::new(),
            });
        }
        Err(error) => {
            return Err(Decision::Unread {
                why: format!("the history could not be read: {error}"),
                seen: String::new(),
            });
        }
    };
    let attack = |why: String| Decision::Attack {
        why,
        seen: text.clone(),
    };
    let history = HistoryAnswer::parse(&text).map_err(|e| attack(format!("{url}: {e}")))?;
    let versions = history
        .verify(r.head_key, r.address)
        .map_err(|e| attack(format!("{url}: {e}")))?;
    // The history was read after the directory's answer: an older one is not the
    // directory's current history but one replayed from before (a history captured earlier,
    // whose root the client may never have kept), whatever it says.
    let epoch = history.head.head.epoch;
    if epoch < r.answer_epoch {
        return Err(attack(format!(
            "{url}: the history's head is of epoch {epoch}, older than the directory's answer \
             (epoch {}) read before it: a history replayed from before, not the directory's",
            r.answer_epoch
        )));
    }
    let mut read = Read {
        url,
        text,
        head: history.head,
        answer_epoch: r.answer_epoch,
        versions,
        pages: Vec::new(),
        withdrawn_later: Vec::new(),
    };
    // Review F9: the served state may be older than the newest page (an address changed
    // more than 64 times since): the older pages, down to version 1.
    while superseded(&read.versions, r.served) == Superseded::Never
        && let Some((before, before_epoch)) = read
            .versions
            .iter()
            .map(|v| (v.akd_version, v.epoch))
            .min()
            .filter(|(v, _)| *v > 1)
    {
        if read.pages.len() == MAX_PAGES {
            return Err(read.unread(format!(
                "the history of {} holds {before} versions below the {} the client read, more \
                 than it reads",
                r.address,
                read.versions.len()
            )));
        }
        let page_url = format!("{}?before={before}", read.url);
        let page_text = match fetch(r, &format!("{path}?before={before}"), deadline).await {
            Ok(Some(t)) => t,
            Ok(None) => {
                return Err(read.attack(format!(
                    "{page_url}: no versions below {before}, which the newest versions proved"
                )));
            }
            Err(error) => {
                return Err(read.unread(format!(
                    "the history's older versions could not be read: {error}"
                )));
            }
        };
        let parsed = HistoryPage::parse(&page_text);
        read.pages.push(PageRead {
            before,
            text: page_text,
            head: parsed.as_ref().ok().map(|p| p.head.clone()),
        });
        let page = parsed.map_err(|e| read.attack(format!("{page_url}: {e}")))?;
        check_page_head(&read, &page, &page_url, r.head_key)?;
        match page
            .verify(r.head_key, r.address, before, before_epoch)
            .await
        {
            Ok(older) => {
                let at = page.head.head.epoch;
                if at > read.head.head.epoch {
                    read.withdrawn_later.extend(
                        older
                            .iter()
                            .filter(|v| v.entry.is_none())
                            .map(|v| (v.akd_version, at)),
                    );
                }
                read.versions.extend(older);
            }
            Err(e) => return Err(read.attack(format!("{page_url}: {e}"))),
        }
    }
    Ok(read)
}

/// Review R4: a page's head is checked (its signature) before it is compared with the
/// history's, and compared whole: a head signed with the head key that contradicts the
/// history's (another domain or VRF key, or another root for the same epoch: a fork; an
/// older epoch: a replay) is an attack, both heads kept; a newer head is the directory
/// moving on between the requests (tied later, [`judge`]).
fn check_page_head(
    read: &Read,
    page: &HistoryPage,
    page_url: &str,
    head_key: &[u8; 32],
) -> Result<(), Decision> {
    let head = &read.head.head;
    if let Err(e) = page.head.verify(head_key) {
        return Err(read.attack(format!("{page_url}: {e}")));
    }
    let at = &page.head.head;
    if (at.domain.as_str(), at.vrf_public_key) != (head.domain.as_str(), head.vrf_public_key) {
        return Err(read.attack(format!(
            "{page_url}: the page's head (epoch {}) is of the directory of {} with the VRF key \
             {}, not of the history's ({} with {})",
            at.epoch,
            at.domain,
            hex::encode(at.vrf_public_key),
            head.domain,
            hex::encode(head.vrf_public_key)
        )));
    }
    match at.epoch.cmp(&head.epoch) {
        std::cmp::Ordering::Less => Err(read.attack(format!(
            "{page_url}: the page's head is of epoch {}, older than the history's (epoch {}) \
             read before it: a page replayed from before, not the directory's",
            at.epoch, head.epoch
        ))),
        std::cmp::Ordering::Equal if at.root_hash != head.root_hash => Err(read.attack(format!(
            "possible fork of the key directory of {}: two heads of epoch {} signed with \
                 the head key, the history's with the root {} and the page's ({page_url}) \
                 with {}",
            head.domain,
            head.epoch,
            hex::encode(head.root_hash),
            hex::encode(at.root_hash)
        ))),
        _ => Ok(()),
    }
}

/// Decides from what [`read`] read, against the client's memory as it is now (`memory`,
/// held again: another process may have moved it while the history was read), whether the
/// served state, which the directory's answer does not prove, was superseded by a change
/// recorded after the newest epoch the client had verified when it sent the request (a
/// race) or not (an attack). Every head read is tied to the memory first: the same root
/// kept for its epoch (another root is a fork); a head newer than the remembered one asks
/// for a newer answer ([`Decision::AskAgain`]); an older one whose root the memory no longer
/// keeps cannot be tied ([`Decision::Unread`]).
pub fn judge(r: &Race<'_>, read: &Read, memory: &DomainMemory) -> Decision {
    let domain = r.address.domain();
    let head = &read.head.head;
    if let Some(vrf) = &memory.vrf_key
        && !vrf.eq_ignore_ascii_case(&hex::encode(head.vrf_public_key))
    {
        return read.attack(format!(
            "{}: the history's head (epoch {}) names the VRF key {}, not the pinned {vrf}",
            read.url,
            head.epoch,
            hex::encode(head.vrf_public_key)
        ));
    }
    let (mut ahead, mut untied) = (None, None);
    for at in read.heads() {
        match memory.known_root(at.epoch) {
            Some(root) if root == at.root_hash => {}
            Some(root) => {
                return read.attack(format!(
                    "possible fork of the key directory of {domain}: the history's head of \
                     epoch {} ({}) has the root {}, the remembered history has {}",
                    at.epoch,
                    read.url,
                    hex::encode(at.root_hash),
                    hex::encode(root)
                ));
            }
            None if memory.remembered_epoch().is_none_or(|e| at.epoch > e) => {
                ahead = ahead.max(Some(at.epoch));
            }
            None => {
                untied.get_or_insert(at.epoch);
            }
        }
    }
    if let Some(epoch) = untied {
        return read.unread(format!(
            "the history ({}) holds a head of epoch {epoch}, which the client cannot tie to its \
             remembered history (its root is no longer kept)",
            read.url
        ));
    }
    if let Some(epoch) = ahead {
        return Decision::AskAgain { epoch };
    }
    // A page read under a newer head than the history's that shows a value withdrawn, with
    // no deletion after it among the versions read: a deletion recorded while the history
    // was read (after the history's head), which the versions read do not hold. Those
    // versions mix two states of the address; judged together they could show a key never
    // held.
    if let Some((version, at)) = read.withdrawn_later.iter().find(|(v, _)| {
        !read.versions.iter().any(|x| {
            x.akd_version > *v
                && x.entry
                    .as_ref()
                    .is_some_and(|e| e.state == EntryState::Deleted)
        })
    }) {
        return read.unread(format!(
            "a deletion of {} was recorded while its history was read: version {version} is \
             withdrawn in the page read under epoch {at}, not in the history of epoch {}",
            r.address, head.epoch
        ));
    }
    decide_versions(r, read, memory)
}

/// [`judge`]'s decision once every head read is tied: what the versions read say of the
/// served state.
fn decide_versions(r: &Race<'_>, read: &Read, memory: &DomainMemory) -> Decision {
    let domain = r.address.domain();
    let head = &read.head.head;
    let what = match r.served {
        Some(_) => "the served key",
        None => "\"no key\"",
    };
    let epoch = match superseded(&read.versions, r.served) {
        Superseded::Newest(at) if at > read.answer_epoch => {
            return Decision::Race(format!(
                "key directory of {domain}: {what} for {} was recorded at epoch {at}, after \
                 the directory's answer (epoch {}) was read: it changed while the reply was on \
                 its way; nothing was imported; retrieve again",
                r.address, read.answer_epoch
            ));
        }
        Superseded::Newest(at) => {
            return read.attack(format!(
                "the history of {} (epoch {}) names {what} as the newest version (epoch \
                 {at}), which the answer of epoch {} does not prove",
                r.address, head.epoch, read.answer_epoch
            ));
        }
        Superseded::Never => {
            return read.attack(format!(
                "the directory's history of {} (epoch {}, {} versions down to version 1) never \
                 held {what}",
                r.address,
                head.epoch,
                read.versions.len()
            ));
        }
        Superseded::At(epoch) => epoch,
    };
    // Review F3: a race that only a withdrawn value makes (the history cannot show which
    // key a version held before a deletion) is decided by the key verified before sending,
    // else not decided, with what was read kept.
    if let (Some(served), Some(verified)) = (r.served, r.verified_epoch)
        && by_epoch(epoch, Some(verified)) == Verdict::Race
        && !matches!(
            superseded_with(&read.versions, r.served, false),
            Superseded::At(at) if by_epoch(at, Some(verified)) == Verdict::Race
        )
    {
        match withdrawn_match(&read.versions, served, verified, r.verified_state) {
            Some(Withdrawn::Proven) | None => {}
            // Review F-1 (of this change): not exit 5. An honest KST of version 1 or 2 may
            // have served a key the store held only briefly, which a deletion recorded next
            // kept out of the directory (the writer records a deletion without the store's
            // unrecorded versions): another key than the one verified before sending is then
            // no proof. Not decided, with what was seen kept.
            Some(Withdrawn::Disproven {
                version,
                deleted_at,
                verified,
            }) => {
                return read.unread(format!(
                    "the history matches the served key only as the value of version \
                     {version}, which the deletion at epoch {deleted_at} withdrew, and the \
                     directory's answer the client verified before it sent the request (epoch \
                     {verified}) proved another key for that version (a forged key hidden \
                     behind a deletion, or a key the store held only briefly before the \
                     deletion, which the directory did not record)"
                ));
            }
            Some(Withdrawn::Unknown {
                version,
                deleted_at,
            }) => {
                return read.unread(format!(
                    "the history matches the served key only as the value of version \
                     {version}, which the deletion at epoch {deleted_at} withdrew, and nothing \
                     the client verified before the request shows which key that version held \
                     (a change on the way, or a forged key hidden behind a deletion)"
                ));
            }
        }
    }
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
            memory.remembered_epoch().unwrap_or(r.answer_epoch)
        )),
        Verdict::Stale => read.attack(format!(
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
    use super::super::tests::{key, version};
    use super::*;

    use crate::client::log_memory::test_head as head;

    /// What [`read`] would have read: the history of epoch 5 (versions 70 and 69, the
    /// served key `k1` at version 2 superseded at epoch 3) and one older page under
    /// `page_head`.
    fn read_with_page(page_head: SignedHead, withdrawn: bool) -> Read {
        let mut versions = vec![
            version(70, 5, key(b"k70", 70)),
            version(69, 4, key(b"k69", 69)),
        ];
        versions.push(version(3, 3, key(b"k3", 3)));
        versions.push(version(2, 2, if withdrawn { None } else { key(b"k1", 2) }));
        let at = page_head.head.epoch;
        Read {
            url: "http://127.0.0.1:1/history".into(),
            text: "kst-log-history-v1\n".into(),
            head: head(5, 5),
            answer_epoch: 5,
            versions,
            pages: vec![PageRead {
                before: 69,
                text: "kst-log-history-page-v1\n".into(),
                head: Some(page_head),
            }],
            withdrawn_later: if withdrawn && at > 5 {
                vec![(2, at)]
            } else {
                vec![]
            },
        }
    }

    /// Review R6: a page read under a newer head than the history's (a busy domain) is
    /// tied by its root like the history's head: a newer answer first when the memory is
    /// behind, then decided without reading again; another root kept for it is a fork; a
    /// head the memory can no longer tie is not decided; a value withdrawn under the newer
    /// head with no deletion read is a deletion recorded meanwhile, not decided either.
    #[test]
    fn every_head_read_is_tied_to_the_memory_before_the_versions_decide() {
        let address = kst_core::AddressPolicy::default()
            .normalize("alice@example.net")
            .unwrap();
        let race = Race {
            log_base: "http://127.0.0.1:1",
            ca_file: None,
            head_key: &[0; 32],
            address: &address,
            served: Some(b"k1"),
            verified_epoch: Some(1),
            verified_state: None,
            no_epoch: "",
            answer_epoch: 5,
        };
        let memory = |roots: &[(u64, u8)]| {
            let mut m = DomainMemory {
                domain: "example.net".into(),
                head_key: Some("aa".repeat(32)),
                vrf_key: Some("bb".repeat(32)),
                ..DomainMemory::default()
            };
            for (epoch, root) in roots {
                m.remember(&head(*epoch, *root)).unwrap();
            }
            m
        };
        let read = read_with_page(head(6, 6), false);
        assert_eq!(read.newest_epoch(), 6);
        let behind = memory(&[(5, 5)]);
        assert!(matches!(
            judge(&race, &read, &behind),
            Decision::AskAgain { epoch: 6 }
        ));
        let tied = memory(&[(5, 5), (6, 6)]);
        match judge(&race, &read, &tied) {
            Decision::Race(m) => assert!(m.contains("superseded at epoch 3"), "{m}"),
            other => panic!("{other:?}"),
        }
        let forked = memory(&[(5, 5), (6, 7)]);
        match judge(&race, &read, &forked) {
            Decision::Attack { why, seen } => {
                assert!(why.contains("fork") && why.contains("epoch 6"), "{why}");
                assert!(seen.contains("kst-log-history-page-v1"), "{seen}");
            }
            other => panic!("{other:?}"),
        }
        // The memory moved to epoch 7 without the root of 6 (a new start meanwhile).
        let untied = memory(&[(5, 5), (7, 7)]);
        match judge(&race, &read, &untied) {
            Decision::Unread { why, .. } => assert!(why.contains("cannot tie"), "{why}"),
            other => panic!("{other:?}"),
        }
        let withdrawn = read_with_page(head(6, 6), true);
        match judge(&race, &withdrawn, &tied) {
            Decision::Unread { why, .. } => {
                assert!(
                    why.contains("deletion") && why.contains("version 2"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
        // The same page under the history's own head: its withdrawn value is the page's
        // state at that head (judged as before: never held, with no deletion).
        let same = read_with_page(head(5, 5), true);
        match judge(&race, &same, &tied) {
            Decision::Attack { why, .. } => assert!(why.contains("never held"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    /// Review R6: the evidence of a history read down to its last page keeps the history
    /// and the last [`PAGES_KEPT_WHOLE`] pages whole, the others as their signed heads with
    /// their size and SHA-256: bounded whatever the pages weigh.
    #[test]
    fn the_evidence_keeps_the_pages_that_matter_whole_and_the_others_by_their_heads() {
        let mut read = read_with_page(head(5, 5), false);
        read.pages = (0..MAX_PAGES)
            .map(|i| PageRead {
                before: 2113 - 64 * i as u64,
                text: format!("page {i:02} {}", "x".repeat(MAX_HISTORY_ANSWER - 10)),
                head: Some(head(5, 5)),
            })
            .collect();
        let evidence = read.evidence();
        assert!(
            evidence.len() < read.text.len() + (PAGES_KEPT_WHOLE + 1) * MAX_HISTORY_ANSWER,
            "{} bytes",
            evidence.len()
        );
        for (i, page) in read.pages.iter().enumerate() {
            let whole = evidence.contains(&page.text);
            assert_eq!(whole, i + PAGES_KEPT_WHOLE >= MAX_PAGES, "page {i}");
        }
        // An attack keeps every page whole (it must convince someone else).
        match read.attack("never held".into()) {
            Decision::Attack { seen, .. } => {
                assert!(read.pages.iter().all(|p| seen.contains(&p.text)))
            }
            other => panic!("{other:?}"),
        }
        use sha2::Digest as _;
        let first = &read.pages[0];
        assert!(evidence.contains(&format!(
            "-- page below version {}: {} bytes, sha256 {}, not kept whole; its head --\n{}",
            first.before,
            first.text.len(),
            hex::encode(sha2::Sha256::digest(first.text.as_bytes())),
            head_text(first.head.as_ref().unwrap()).unwrap()
        )));
    }
}
