//! One address' history file: reading and checking it, replacing it atomically, removing it.
//!
//! The file is a JSON object `{"address": "...", "history": [KeyRecord, ...]}` with the records
//! in [`KeyRecord`]'s serde form (oldest first). It is replaced as a whole: write a temporary
//! file, fsync it, rename it over the old one, fsync the directory ([`kst_core::durable`]).
//! Readers therefore see the old file or the new one, never a mix.

use std::fs;
use std::io::ErrorKind;
use std::path::Path;

use kst_core::durable::{self, AtomicFile};
use kst_core::store::validate_history;
use kst_core::{Address, KeyRecord, Result};
use serde::{Deserialize, Serialize};

use crate::error::{corrupt, durable_error, io};
use crate::layout::{AddressPaths, TombstonePaths, address_hash};

/// The content of a history file.
#[derive(Debug, Serialize, Deserialize)]
struct HistoryFile {
    /// The normalized address; its hash is the file name.
    address: String,
    /// Every version, oldest first; never empty.
    history: Vec<KeyRecord>,
}

/// Only the address of a history file (for `list`).
#[derive(Debug, Deserialize)]
struct AddressOnly {
    address: String,
}

/// Reads and checks the history of `address` (files `paths`); empty when it has no file.
pub(crate) fn read_history(address: &Address, paths: &AddressPaths) -> Result<Vec<KeyRecord>> {
    let path = &paths.history;
    let Some(bytes) = read_if_exists(path)? else {
        ensure_keys_dir(paths)?;
        return Ok(Vec::new());
    };
    let file: HistoryFile = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(path, format!("not a history file: {e}")))?;
    if file.address != address.as_str() {
        return Err(corrupt(
            path,
            format!(
                "holds the history of {:?}, expected {address}",
                file.address
            ),
        ));
    }
    if file.history.is_empty() {
        return Err(corrupt(path, "holds an empty history"));
    }
    validate_history(&file.history).map_err(|e| corrupt(path, e))?;
    if let Some(r) = file.history.iter().find(|r| &r.address != address) {
        return Err(corrupt(path, format!("holds a record of {}", r.address)));
    }
    Ok(file.history)
}

/// The address a history file belongs to, checked against its name (`hash`). `None` when the
/// file vanished (a concurrent delete).
pub(crate) fn read_address(path: &Path, hash: &str) -> Result<Option<Address>> {
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(None);
    };
    let file: AddressOnly = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(path, format!("not a history file: {e}")))?;
    checked_address(path, hash, &file.address).map(Some)
}

/// Bytes of a history file [`read_address_head`] reads first: the address is the first field,
/// and the longest address fits many times over.
const HEAD: usize = 2048;

/// What every history file written by this crate starts with (compact JSON, `address` first).
const HEAD_PREFIX: &[u8] = b"{\"address\":";

/// [`read_address`] that reads only the head of the file when it can (the address is the
/// first field of the JSON, [`HEAD`] bytes hold it): a walk over the whole store then reads a
/// few KiB per address, not every key. A file that does not start as this crate writes them
/// is read whole.
pub(crate) fn read_address_head(path: &Path, hash: &str) -> Result<Option<Address>> {
    use std::io::Read;
    let file = match fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("open", path, e)),
    };
    let mut head = Vec::with_capacity(HEAD);
    file.take(HEAD as u64)
        .read_to_end(&mut head)
        .map_err(|e| io("read", path, e))?;
    let Some(rest) = head.strip_prefix(HEAD_PREFIX) else {
        return read_address(path, hash);
    };
    let mut de = serde_json::Deserializer::from_slice(rest);
    let Ok(text) = <String as Deserialize>::deserialize(&mut de) else {
        return read_address(path, hash);
    };
    checked_address(path, hash, &text).map(Some)
}

/// `text` as the address of the history file at `path`, named `hash`.
fn checked_address(path: &Path, hash: &str, text: &str) -> Result<Address> {
    let address = Address::from_normalized(text).map_err(|e| {
        corrupt(
            path,
            format!("holds {text:?}, which is not an address: {e}"),
        )
    })?;
    if address_hash(&address) != hash {
        return Err(corrupt(
            path,
            format!("holds {address}, whose records belong in another file"),
        ));
    }
    Ok(address)
}

/// The current key in the history file at `path`, which is named `hash` (for look-ups through
/// the index, which know an address by its hash). `None` when the file is missing (the address
/// was deleted).
pub(crate) fn read_current_at(path: &Path, hash: &str) -> Result<Option<KeyRecord>> {
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(None);
    };
    let mut file: HistoryFile = serde_json::from_slice(&bytes)
        .map_err(|e| corrupt(path, format!("not a history file: {e}")))?;
    let address = Address::from_normalized(&file.address).map_err(|e| {
        corrupt(
            path,
            format!("holds {:?}, which is not an address: {e}", file.address),
        )
    })?;
    if address_hash(&address) != hash {
        return Err(corrupt(
            path,
            format!("holds {address}, whose history belongs in another file"),
        ));
    }
    match file.history.pop() {
        Some(r) if r.address == address => Ok(Some(r)),
        Some(r) => Err(corrupt(path, format!("holds a record of {}", r.address))),
        None => Err(corrupt(path, "holds an empty history")),
    }
}

/// Replaces the history file of `paths` with `history` (non-empty, all of one address),
/// atomically and durably. The caller holds the shard lock.
pub(crate) fn write_history(paths: &AddressPaths, history: &[KeyRecord]) -> Result<()> {
    let Some(first) = history.first() else {
        return Err(kst_core::Error::Invalid("empty history".into()));
    };
    let mut bytes = serde_json::to_vec(&HistoryFile {
        address: first.address.as_str().to_string(),
        history: history.to_vec(),
    })
    .map_err(|e| corrupt(&paths.history, format!("cannot encode the history: {e}")))?;
    bytes.push(b'\n');

    durable::create_dir(&paths.shard_dir).map_err(durable_error)?;
    let mut file =
        AtomicFile::create_with_temp(&paths.history, &paths.temp).map_err(durable_error)?;
    file.write_bytes(&bytes).map_err(durable_error)?;
    file.commit().map_err(durable_error)
}

/// The file of the publication ids of an address' deleted histories
/// (`<hash>.deleted`): a JSON object `{"address": "...", "publication_ids": [...]}`, the ids
/// sorted and unique.
#[derive(Debug, Serialize, Deserialize)]
struct DeletedFile {
    /// The normalized address; its hash is the file name.
    address: String,
    /// Every publication id of every deleted history of the address.
    publication_ids: std::collections::BTreeSet<String>,
}

/// The publication ids of the deleted histories of `address` (empty when it has no such
/// file). The caller holds the shard lock.
pub(crate) fn read_deleted(
    address: &Address,
    paths: &AddressPaths,
) -> Result<std::collections::BTreeSet<String>> {
    let path = &paths.deleted;
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(Default::default());
    };
    let file: DeletedFile = serde_json::from_slice(&bytes).map_err(|e| {
        corrupt(
            path,
            format!("not a file of deleted publication ids: {e} (repair or remove it by hand)"),
        )
    })?;
    if file.address != address.as_str() {
        return Err(corrupt(
            path,
            format!(
                "holds the deleted publication ids of {:?}, expected {address}",
                file.address
            ),
        ));
    }
    Ok(file.publication_ids)
}

/// The address and the publication ids of the file of deleted publications at `path`, which
/// is named `hash` (for the walk of [`kst_core::KeyStore::deleted_page`], which knows an
/// address by its file name). `None` when the file is missing.
pub(crate) fn read_deleted_at(
    path: &Path,
    hash: &str,
) -> Result<Option<(Address, std::collections::BTreeSet<String>)>> {
    let Some(bytes) = read_if_exists(path)? else {
        return Ok(None);
    };
    let file: DeletedFile = serde_json::from_slice(&bytes).map_err(|e| {
        corrupt(
            path,
            format!("not a file of deleted publication ids: {e} (repair or remove it by hand)"),
        )
    })?;
    let address = checked_address(path, hash, &file.address)?;
    Ok(Some((address, file.publication_ids)))
}

/// Adds `ids` to the deleted publication ids of `address`, atomically and durably. The caller
/// holds the shard lock.
pub(crate) fn add_deleted(
    address: &Address,
    paths: &AddressPaths,
    ids: impl IntoIterator<Item = String>,
) -> Result<()> {
    let mut publication_ids = read_deleted(address, paths)?;
    let before = publication_ids.len();
    publication_ids.extend(ids);
    if publication_ids.len() == before {
        return Ok(());
    }
    let mut bytes = serde_json::to_vec(&DeletedFile {
        address: address.as_str().to_string(),
        publication_ids,
    })
    .map_err(|e| corrupt(&paths.deleted, format!("cannot encode the ids: {e}")))?;
    bytes.push(b'\n');
    durable::create_dir(&paths.shard_dir).map_err(durable_error)?;
    let mut file =
        AtomicFile::create_with_temp(&paths.deleted, &paths.deleted_temp).map_err(durable_error)?;
    file.write_bytes(&bytes).map_err(durable_error)?;
    file.commit().map_err(durable_error)
}

/// The stored tombstone of `paths` (revocation signatures), if there is one. The caller holds
/// the tombstone lock.
pub(crate) fn read_tombstone(paths: &TombstonePaths) -> Result<Option<Vec<u8>>> {
    read_if_exists(&paths.file)
}

/// Replaces the tombstone of `paths` with `bytes`, atomically and durably. The caller holds the
/// tombstone lock.
pub(crate) fn write_tombstone(paths: &TombstonePaths, bytes: &[u8]) -> Result<()> {
    durable::create_dir(&paths.dir).map_err(durable_error)?;
    let mut file = AtomicFile::create_with_temp(&paths.file, &paths.temp).map_err(durable_error)?;
    file.write_bytes(bytes).map_err(durable_error)?;
    file.commit().map_err(durable_error)
}

/// Removes the history file of `paths`; whether there was one. The caller holds the shard lock.
pub(crate) fn remove_history(paths: &AddressPaths) -> Result<bool> {
    match fs::remove_file(&paths.history) {
        Ok(()) => {
            sync_dir(&paths.shard_dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            ensure_keys_dir(paths)?;
            Ok(false)
        }
        Err(e) => Err(io("remove", &paths.history, e)),
    }
}

/// Creates `dir` (mode 0700, and its parents) if it is missing, syncing its parent.
pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    durable::create_dir(dir).map_err(durable_error)
}

/// Makes changes to the entries of `dir` (renames, removals, new files) durable.
fn sync_dir(dir: &Path) -> Result<()> {
    durable::sync_dir(dir).map_err(durable_error)
}

/// A missing history file means "no key" only while the store itself is there: a vanished
/// `keys/` (an unmounted volume, a wrong path) is a temporary error, not an empty store.
pub(crate) fn ensure_keys_dir(paths: &AddressPaths) -> Result<()> {
    let keys = paths.shard_dir.parent().unwrap_or(&paths.shard_dir);
    match fs::metadata(keys) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(crate::error::unavailable(format!(
            "{} is not a directory",
            keys.display()
        ))),
        Err(e) => Err(io("stat", keys, e)),
    }
}

/// The bytes of the file at `path`, `None` when it does not exist. Inside a
/// [`crate::nowait::attempt`] only from the kernel's caches: a read that would wait fails
/// (and the attempt is dropped for the blocking pool).
pub(crate) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    if crate::nowait::active() {
        return match crate::nowait::read_cached(path) {
            Some(bytes) => Ok(Some(bytes)),
            None => Err(crate::error::unavailable(format!(
                "{} is not in the page cache",
                path.display()
            ))),
        };
    }
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("read", path, e)),
    }
}
