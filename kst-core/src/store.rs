//! The `KeyStore` trait: what every storage backend (filesystem, PostgreSQL, Redis) provides.
//!
//! The trait holds a few async primitives; the protocol (classify, verify, HMAC, reply) lives in
//! [`crate::service`]. Every backend runs the same conformance suite
//! (`kst_core::conformance`, feature `conformance`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::address::Address;
use crate::error::Result;
use crate::fingerprint::{Fingerprint, KeyId};
#[cfg(feature = "timeout")]
pub use crate::timeout::TimeoutStore;
use crate::wkd::WkdHash;

/// Version of the stored record layout. Backends write it with every record so that later
/// releases (revocation state, more metadata) can read old records.
pub const RECORD_FORMAT: u32 = 1;

/// One published key of one address: the current key or an entry of its history.
///
/// `Debug` prints the key's length, not its bytes, so that logs stay readable.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Layout version of this record, [`RECORD_FORMAT`] when written by this release.
    #[serde(default = "default_format")]
    pub format: u32,
    /// The normalized address the key is published for.
    pub address: Address,
    /// 1 for the first publication of an address, then strictly increasing by one.
    pub version: u64,
    /// The key as binary OpenPGP packets (not armored).
    #[serde(with = "b64")]
    pub key: Vec<u8>,
    /// Fingerprint of the primary key.
    pub fingerprint: Fingerprint,
    /// Seconds since the Unix epoch when this version was published.
    pub published_at: u64,
    /// Idempotency token of the publication request (hex); a redelivered message carries the
    /// same one and must not create a new version.
    pub publication_id: String,
    /// The key carries a revocation of its primary key.
    #[serde(default)]
    pub revoked: bool,
}

impl std::fmt::Debug for KeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRecord")
            .field("format", &self.format)
            .field("address", &self.address)
            .field("version", &self.version)
            .field("key", &format_args!("<{} bytes>", self.key.len()))
            .field("fingerprint", &self.fingerprint)
            .field("published_at", &self.published_at)
            .field("publication_id", &self.publication_id)
            .field("revoked", &self.revoked)
            .finish()
    }
}

fn default_format() -> u32 {
    RECORD_FORMAT
}

/// A key to publish: everything of a [`KeyRecord`] except what the store assigns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKey {
    /// The normalized address.
    pub address: Address,
    /// Binary OpenPGP packets.
    pub key: Vec<u8>,
    /// Primary key fingerprint.
    pub fingerprint: Fingerprint,
    /// Idempotency token (see [`KeyRecord::publication_id`]).
    pub publication_id: String,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
    /// The key carries a revocation of its primary key.
    pub revoked: bool,
    /// Which current version of the address this publication requires (compare-and-set);
    /// [`Expected::Any`] publishes unconditionally.
    pub expected: Expected,
}

/// The current version a publication requires of its address: the compare-and-set that makes
/// a read-merge-write safe against concurrent publishers (see [`KeyStore`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Expected {
    /// Whatever is current (imports, tools, tests).
    #[default]
    Any,
    /// The address has no current key.
    Nothing,
    /// The current key of the address is this version.
    Version(u64),
}

impl Expected {
    /// Whether a store whose current version is `current` (`None`: no current key) may publish.
    pub fn admits(self, current: Option<u64>) -> bool {
        match self {
            Expected::Any => true,
            Expected::Nothing => current.is_none(),
            Expected::Version(v) => current == Some(v),
        }
    }

    /// The [`Error::Conflict`](crate::Error::Conflict) a store returns when this expectation
    /// does not hold for `address`, whose current version is `current`.
    pub fn conflict(self, address: &Address, current: Option<u64>) -> crate::Error {
        let show = |v: Option<u64>| v.map_or_else(|| "none".to_string(), |v| v.to_string());
        let expected = match self {
            Expected::Any => "any".to_string(),
            Expected::Nothing => show(None),
            Expected::Version(v) => show(Some(v)),
        };
        crate::Error::Conflict(format!(
            "the current key of {address} is version {}, the publication expected {expected}",
            show(current)
        ))
    }
}

impl NewKey {
    /// The record this key becomes at `version`.
    pub fn into_record(self, version: u64) -> KeyRecord {
        KeyRecord {
            format: RECORD_FORMAT,
            address: self.address,
            version,
            key: self.key,
            fingerprint: self.fingerprint,
            published_at: self.published_at,
            publication_id: self.publication_id,
            revoked: self.revoked,
        }
    }
}

/// What [`KeyStore::publish`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new version was written and is now current.
    Published(KeyRecord),
    /// Nothing was written: this publication was applied before (same `publication_id` in the
    /// history) or the current key is byte-for-byte the same. Carries the record that holds it.
    Unchanged(KeyRecord),
}

impl PublishOutcome {
    /// The record that holds the published key, either way.
    pub fn record(&self) -> &KeyRecord {
        match self {
            PublishOutcome::Published(r) | PublishOutcome::Unchanged(r) => r,
        }
    }
}

/// A position in a walk of a store in its own order ([`KeyStore::list_page`]): what comes
/// after the addresses handed out so far.
///
/// Opaque to callers: only the store that handed it out reads it (a backend makes its own with
/// [`WalkCursor::new`] and reads it back with [`WalkCursor::token`]). It holds no secret and
/// may be kept between runs, but a store refuses a cursor it cannot read
/// ([`crate::Error::Invalid`]: start the walk again from the beginning).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct WalkCursor(String);

impl WalkCursor {
    /// A cursor holding `token` (for backends: whatever tells them where to go on).
    pub fn new(token: impl Into<String>) -> Self {
        WalkCursor(token.into())
    }

    /// The token the store put in.
    pub fn token(&self) -> &str {
        &self.0
    }

    /// The cursor of [`KeyStore::list_page`]'s default walk (address order): after `address`.
    fn after_address(address: &Address) -> Self {
        WalkCursor(format!("{ADDRESS_CURSOR}{}", address.as_str()))
    }

    /// The address the default walk's cursor stands after; an error naming the cursor when it
    /// is not one of the default walk's.
    fn address(&self) -> Result<Address> {
        self.0
            .strip_prefix(ADDRESS_CURSOR)
            .and_then(|a| Address::from_normalized(a).ok())
            .ok_or_else(|| crate::Error::Invalid(bad_cursor(self)))
    }
}

/// Prefix of the default walk's cursors: the last address handed out follows it.
const ADDRESS_CURSOR: &str = "after-address:";

/// The message of a store that cannot read `cursor`.
pub fn bad_cursor(cursor: &WalkCursor) -> String {
    format!(
        "the walk cursor {:?} was not handed out by this store; start the walk again without a \
         cursor",
        cursor.token()
    )
}

/// One page of a walk ([`KeyStore::list_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalkPage {
    /// Addresses that have a key, in the store's own order.
    pub addresses: Vec<Address>,
    /// Where the walk goes on; `None` when it is over.
    pub next: Option<WalkCursor>,
}

/// The publication ids a store remembers from the deleted histories of one address (see
/// [`KeyStore::delete`]): what `kst export` carries, so that deletion still wins over a
/// redelivery after a move to another store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedPublications {
    /// The normalized address.
    pub address: Address,
    /// Every remembered publication id of the address, in ascending byte order, each once.
    pub publication_ids: Vec<String>,
}

/// One page of a walk over the remembered deleted publications
/// ([`KeyStore::deleted_page`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeletedPage {
    /// Addresses with their remembered publication ids, in the store's own order.
    pub entries: Vec<DeletedPublications>,
    /// Where the walk goes on; `None` when it is over.
    pub next: Option<WalkCursor>,
}

/// Most addresses a backend reads in one round trip of [`KeyStore::get_many`]: a longer list
/// is read in round trips of this many, so that one call never holds the server (a Redis
/// script blocks it while it runs) or the connection for long.
pub const MAX_GET_MANY: usize = 256;

/// Longest publication id [`KeyStore::remember_deleted`] takes (they are 64 hex digits).
pub const MAX_PUBLICATION_ID: usize = 128;

/// The check of [`KeyStore::remember_deleted`]'s ids every backend makes first: at least one,
/// each 1 to [`MAX_PUBLICATION_ID`] ASCII letters and digits (what the KST makes: hex).
pub fn check_publication_ids(address: &Address, publication_ids: &[String]) -> Result<()> {
    if publication_ids.is_empty() {
        return Err(crate::Error::Invalid(format!(
            "no deleted publication id to remember for {address}"
        )));
    }
    for id in publication_ids {
        if id.is_empty()
            || id.len() > MAX_PUBLICATION_ID
            || !id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(crate::Error::Invalid(format!(
                "{:?} (for {address}) is not a publication id: 1 to {MAX_PUBLICATION_ID} ASCII \
                 letters and digits",
                id.chars().take(MAX_PUBLICATION_ID + 1).collect::<String>()
            )));
        }
    }
    Ok(())
}

/// Durable storage of published keys, shared by every KST instance of a pool.
///
/// Contract (checked by the conformance suite):
/// - `publish` is atomic: a concurrent reader sees the old current key or the new one, never a
///   mix; concurrent publishers for one address get distinct, strictly increasing versions and
///   every accepted publication lands in the history exactly once.
/// - `publish` is idempotent per `publication_id` and per identical current key
///   ([`PublishOutcome::Unchanged`]).
/// - Deletion wins over a redelivery: [`KeyStore::delete`] remembers the `publication_id` of
///   every record of the history it removes (for good: across later publications and
///   deletions, like tombstones), and `publish` of a key whose `publication_id` is not in the
///   current history but among those remembered writes nothing and returns
///   [`crate::Error::DeletedSince`]. It is checked in the same atomic step as the write, after
///   the history's idempotency check and before the identical-key check and the
///   compare-and-set. [`KeyStore::restore`] neither reads nor changes what is remembered.
/// - `publish` is a compare-and-set on the version: after those two idempotency checks, and in
///   the same atomic step as the write, a key whose [`NewKey::expected`] does not admit the
///   current version (none when the address has no key) is not written and the call returns
///   [`crate::Error::Conflict`] (temporary: read again, merge again, publish again).
/// - A change is durable when the call returns `Ok`.
/// - Revocations are never rolled back: the store keeps, per primary-key fingerprint, every key
///   revocation it was given, every subkey revocation with its subkey packet and every User ID
///   revocation with its User ID packet (a *tombstone*: the fingerprint, the revocation
///   signatures and the revoked subkeys' and User IDs' packets only; the User ID part bounded,
///   see [`crate::revocation`]), across later publications and [`KeyStore::delete`]. Inside the same atomic step
///   as the write, `publish` calls [`crate::revocation::apply_tombstone`] with the stored
///   tombstone of the key's fingerprint, stores the key it returns (the stored revocations
///   merged in, `revoked` set) and writes back the tombstone it returns. Concurrent publishers
///   of one fingerprint (any address, any instance of a pool) are serialized on the tombstone.
/// - A store that cannot be reached returns a temporary [`crate::Error`]; it reconnects by itself.
/// - The look-ups by fingerprint, key ID and WKD hash see current keys only (revoked ones
///   included), with the entries of [`crate::key_index::IndexEntries::of`], kept in the same
///   write as the record: a key replaced by another or deleted is no longer found by its old
///   entries. Their cost does not grow with the number of stored keys.
#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Short name for logs and metrics, e.g. `"fs"`.
    fn name(&self) -> &'static str;

    /// Publishes `key` as the new current key of its address (see the trait contract);
    /// [`crate::Error::DeletedSince`] when its publication id is one of a deleted history.
    async fn publish(&self, key: NewKey) -> Result<PublishOutcome>;

    /// [`KeyStore::publish`] for a caller that makes the change durable itself before anyone
    /// is told of it: the store may answer once the change is visible to its readers, before
    /// it is durable, because the caller's next step is a synchronous commit to the same
    /// database that covers it, or [`KeyStore::sync_published`]. PostgreSQL commits the
    /// key's transaction with `synchronous_commit = off`: its WAL is flushed in order, so a
    /// later synchronous commit on the same server (the key directory's epoch, which read
    /// the key first) makes it durable too; on a host with synchronous replication it
    /// commits and confirms as `publish` does (docs/TRANSPARENCY.md, "Write order, as
    /// built").
    /// Only the key directory's `TransparentStore` calls it, and only when its directory
    /// commits to the key store's PostgreSQL server. This default publishes durably (every
    /// other store, and wrappers that do not pass it on).
    async fn publish_unsynced(&self, key: NewKey) -> Result<PublishOutcome> {
        self.publish(key).await
    }

    /// Makes every change this store answered before durable, as durable as its own
    /// synchronous writes (for a caller of [`KeyStore::publish_unsynced`] whose covering
    /// commit did not happen: the directory already held the key). PostgreSQL: one tiny
    /// synchronous write (its commit flushes the WAL up to it, and waits for a synchronous
    /// standby when the server has one). This default does nothing: [`KeyStore::publish`]
    /// is durable when it returns.
    async fn sync_published(&self) -> Result<()> {
        Ok(())
    }

    /// The current key of `address`, if any.
    async fn get(&self, address: &Address) -> Result<Option<KeyRecord>>;

    /// The current key of each of `addresses`, in the order asked: for each exactly what
    /// [`KeyStore::get`] answers (an address asked twice is answered twice, an unknown or
    /// deleted one with `None`). For callers that gather concurrent look-ups (the web
    /// listener's read batches): PostgreSQL answers in one statement, Redis in one command,
    /// each for at most [`MAX_GET_MANY`] addresses (a longer list takes a round trip per
    /// [`MAX_GET_MANY`]). An error is the error of the whole call, as if one of the `get`s
    /// had failed.
    ///
    /// This default calls [`KeyStore::get`] for each address in turn (the fs store's reads
    /// are local; wrappers and test stores).
    async fn get_many(&self, addresses: &[Address]) -> Result<Vec<Option<KeyRecord>>> {
        let mut records = Vec::with_capacity(addresses.len());
        for address in addresses {
            records.push(self.get(address).await?);
        }
        Ok(records)
    }

    /// Whether [`KeyStore::get_many`] reads many addresses in fewer round trips than a `get`
    /// each (PostgreSQL, Redis on one server), so that gathering concurrent look-ups into it
    /// pays: the web listener batches its look-ups by address only then. This default says
    /// no (the fs store, whose reads are local files, and test stores); a wrapper passes on
    /// its inner store's answer.
    fn batches_reads(&self) -> bool {
        false
    }

    /// Every version of `address`, oldest first; the last one is the current key. Empty when the
    /// address has nothing published.
    async fn history(&self, address: &Address) -> Result<Vec<KeyRecord>>;

    /// Removes the current key and the whole history of `address`. Returns whether anything was
    /// there. A later publication starts again at version 1. Tombstones stay (see the trait
    /// contract): a revoked key published again after a deletion is stored revoked. The
    /// publication ids of the removed history are remembered, in the same atomic step, so
    /// that a redelivered publication is not published again ([`crate::Error::DeletedSince`]).
    async fn delete(&self, address: &Address) -> Result<bool>;

    /// Addresses that have a key, in ascending byte order, strictly after `after`, at most
    /// `limit` of them (for export and audits).
    async fn list(&self, after: Option<&Address>, limit: usize) -> Result<Vec<Address>>;

    /// One page of a walk over every address that has a key, in the store's own order (its
    /// files, rows or sets as they lie), for runs over the whole store: expiry reminders, the
    /// key directory's backfill. Start with `cursor` `None`, then pass the page's
    /// [`WalkPage::next`] until it is `None`.
    ///
    /// A page holds at most `limit` addresses (at least 1 is asked: `limit` 0 is
    /// [`crate::Error::Invalid`]); it may hold fewer, even none, before the walk is over. Every
    /// address that has a key from the walk's start to its end is handed out exactly once;
    /// one published or deleted meanwhile at most once. A whole walk costs about one read of
    /// the store, whatever the page size (unlike paging through [`KeyStore::list`], whose
    /// address order costs some backends a read of everything per page).
    ///
    /// This default walks [`KeyStore::list`] in address order (for wrappers and test stores);
    /// each backend walks its own order.
    async fn list_page(&self, cursor: Option<&WalkCursor>, limit: usize) -> Result<WalkPage> {
        list_page_by_address(self, cursor, limit).await
    }

    /// One page of a walk over every address whose deleted histories' publication ids the
    /// store remembers (see [`KeyStore::delete`]), with those ids: for `kst export`. Start with
    /// `cursor` `None`, then pass the page's [`DeletedPage::next`] until it is `None`.
    ///
    /// A page holds about `limit` addresses (`limit` 0 is [`crate::Error::Invalid`]): at most
    /// `limit` on the fs store and PostgreSQL, a `SCAN` step's worth on Redis; it may hold
    /// none before the walk is over. Every address remembered from the walk's start to its
    /// end is handed out at least once (Redis' `SCAN` may hand one out twice: a reader merges
    /// the ids). The cost is one read of what is remembered, not of the keys.
    ///
    /// This default refuses, for a store that does not remember deleted publications (or a
    /// wrapper that does not pass the call on): an export must not drop them unnoticed.
    async fn deleted_page(&self, cursor: Option<&WalkCursor>, limit: usize) -> Result<DeletedPage> {
        let _ = (cursor, limit);
        Err(no_deleted_publications(self.name()))
    }

    /// Adds `publication_ids` to those remembered for `address`, as if histories holding them
    /// had been deleted (for `kst import`): a later publication with one of them that is not
    /// in the address' current history is refused ([`crate::Error::DeletedSince`]). Nothing
    /// remembered is removed and the address' keys are untouched; adding ids again is
    /// harmless. The ids are checked first ([`check_publication_ids`]).
    ///
    /// This default refuses, like [`KeyStore::deleted_page`]'s.
    async fn remember_deleted(&self, address: &Address, publication_ids: &[String]) -> Result<()> {
        let _ = (address, publication_ids);
        Err(no_deleted_publications(self.name()))
    }

    /// Replaces everything stored for the address of `history` with exactly these records (all
    /// of one address, versions strictly increasing, last one current). For import and restore.
    async fn restore(&self, history: &[KeyRecord]) -> Result<()>;

    /// Current keys whose primary key or one of whose subkeys has this fingerprint (at most `limit`).
    async fn find_by_fingerprint(
        &self,
        fingerprint: &Fingerprint,
        limit: usize,
    ) -> Result<Vec<KeyRecord>>;

    /// Current keys whose primary key or one of whose subkeys has this 64-bit key ID (at most `limit`).
    async fn find_by_key_id(&self, key_id: &KeyId, limit: usize) -> Result<Vec<KeyRecord>>;

    /// The current key of the address in `domain` whose local part hashes to `hash` (WKD).
    async fn find_by_wkd_hash(&self, domain: &str, hash: &WkdHash) -> Result<Option<KeyRecord>>;

    /// Rebuilds the look-up index (fingerprints, key IDs, WKD hashes) of every current key from
    /// the stored records: for stores written before the index existed, or after a repair by
    /// hand. `kst migrate` runs it; it is safe to run while the store serves. Returns how many
    /// current keys were indexed. A store whose look-ups need no index of its own keeps this
    /// default, which has nothing to do and returns 0.
    async fn rebuild_index(&self) -> Result<u64> {
        Ok(0)
    }

    /// Records that the expiry reminder `claim` is being sent, atomically across every
    /// instance sharing the store: `Ok(true)` for the one call that recorded it first,
    /// `Ok(false)` for every later one (any instance). Claims are kept across deletions and
    /// republications (an extension has another expiry, hence another claim). Each backend
    /// implements it on its own (a create-if-absent of a claim record); this default, for
    /// stores that do not record claims, refuses, so no reminder is ever sent twice.
    async fn claim_reminder(&self, claim: &crate::reminder::ReminderClaim) -> Result<bool> {
        Err(crate::error::Error::Invalid(format!(
            "the {} store does not record expiry reminders (claim {}); turn reminders off",
            self.name(),
            claim.id()
        )))
    }

    /// Checks that the store is reachable and writable enough to serve (for `/readyz`).
    async fn check(&self) -> Result<()>;

    /// What an operator needs to know about the store's topology right now, as name/value
    /// pairs for `/readyz` and `/metrics`: for example the primary in use, whether a
    /// synchronous standby is attached, the durability settings read from the server. A
    /// single-host store without such facts keeps this default, an empty list.
    async fn topology(&self) -> Result<Vec<(String, String)>> {
        Ok(Vec::new())
    }
}

/// The error of a store that does not carry deleted publications.
fn no_deleted_publications(store: &str) -> crate::Error {
    crate::Error::Invalid(format!(
        "the {store} store cannot list or take the publication ids of deleted histories; \
         use a backend that remembers them (fs, PostgreSQL, Redis)"
    ))
}

/// The check of [`KeyStore::list_page`]'s `limit` every backend makes first: a page of 0
/// addresses would never get a walk anywhere.
pub fn check_walk_limit(limit: usize) -> Result<()> {
    if limit == 0 {
        return Err(crate::Error::Invalid(
            "a walk page of 0 addresses never ends the walk; ask for at least 1".into(),
        ));
    }
    Ok(())
}

/// The default walk of [`KeyStore::list_page`] on `store`, in address order: for a backend
/// whose [`KeyStore::list`] is a range read of an ordered index (a B-tree, a sorted set), so
/// that the address order is its own.
pub async fn list_page_by_address<S: KeyStore + ?Sized>(
    store: &S,
    cursor: Option<&WalkCursor>,
    limit: usize,
) -> Result<WalkPage> {
    check_walk_limit(limit)?;
    let after = cursor.map(WalkCursor::address).transpose()?;
    let addresses = store.list(after.as_ref(), limit).await?;
    let next = match addresses.last() {
        Some(last) if addresses.len() >= limit => Some(WalkCursor::after_address(last)),
        _ => None,
    };
    Ok(WalkPage { addresses, next })
}

/// Checks the shape `restore` requires; backends call it first: at least one record, all of one
/// address, versions strictly increasing from at least 1, and no publication twice (a
/// `publication_id` names one accepted publication, so it appears at most once in a history).
pub fn validate_history(history: &[KeyRecord]) -> Result<()> {
    use crate::error::Error;
    let Some(first) = history.first() else {
        return Err(Error::Invalid("restore needs at least one record".into()));
    };
    let mut prev = 0;
    let mut ids = std::collections::HashSet::with_capacity(history.len());
    for r in history {
        if !ids.insert(r.publication_id.as_str()) {
            return Err(Error::Invalid(format!(
                "restore holds publication {} of {} twice (version {}); a publication is \
                 stored once",
                r.publication_id, r.address, r.version
            )));
        }
        if r.address != first.address {
            return Err(Error::Invalid(format!(
                "restore mixes addresses {} and {}",
                first.address, r.address
            )));
        }
        if r.version <= prev {
            return Err(Error::Invalid(format!(
                "restore versions for {} are not strictly increasing ({} after {prev})",
                r.address, r.version
            )));
        }
        prev = r.version;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AddressPolicy;

    fn record(version: u64, id: &str) -> KeyRecord {
        NewKey {
            address: AddressPolicy::default()
                .normalize("alice@example.net")
                .unwrap(),
            key: vec![0x99; 300],
            fingerprint: "ABCDEF0123456789ABCDEF0123456789ABCDEF01".parse().unwrap(),
            publication_id: id.into(),
            published_at: 1_700_000_000 + version,
            revoked: false,
            expected: Expected::Any,
        }
        .into_record(version)
    }

    #[test]
    fn histories_with_a_publication_twice_are_refused() {
        assert!(validate_history(&[record(1, "aa"), record(2, "bb")]).is_ok());
        let e = validate_history(&[record(1, "aa"), record(2, "bb"), record(3, "aa")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("publication aa") && e.contains("twice"), "{e}");
    }

    #[test]
    fn histories_must_be_of_one_address_with_rising_versions() {
        assert!(validate_history(&[]).is_err());
        assert!(validate_history(&[record(0, "aa")]).is_err());
        assert!(validate_history(&[record(2, "aa"), record(2, "bb")]).is_err());
        let mut other = record(2, "bb");
        other.address = AddressPolicy::default()
            .normalize("bob@example.net")
            .unwrap();
        assert!(validate_history(&[record(1, "aa"), other]).is_err());
    }

    #[test]
    fn expectations_admit_only_their_version() {
        assert!(Expected::Any.admits(None) && Expected::Any.admits(Some(3)));
        assert!(Expected::Nothing.admits(None) && !Expected::Nothing.admits(Some(1)));
        assert!(Expected::Version(2).admits(Some(2)));
        assert!(!Expected::Version(2).admits(Some(3)) && !Expected::Version(2).admits(None));
        let e = Expected::Version(2).conflict(&record(1, "aa").address, Some(3));
        assert!(e.is_temporary());
        assert!(e.to_string().contains("version 3") && e.to_string().contains("expected 2"));
    }

    #[test]
    fn debug_shows_the_key_length_not_the_key() {
        let text = format!("{:?}", record(1, "aa"));
        assert!(text.contains("<300 bytes>"), "{text}");
        assert!(
            text.contains("ABCDEF0123456789ABCDEF0123456789ABCDEF01"),
            "{text}"
        );
        assert!(!text.contains("153, 153"), "{text}");
    }
}

/// Serde helper: binary key material as standard base64 in JSON.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map_err(serde::de::Error::custom)
    }
}
