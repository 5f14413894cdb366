//! `kst export` and `kst import`: every key with its history as JSON lines, so an operator can
//! move between backends (fs → PostgreSQL or Redis and back) without losing anything.
//!
//! One line per address, in address order: `{"address":"alice@example.net","history":[KeyRecord,
//! ...]}`, oldest version first, the key as base64 of its binary packets (the stored record as
//! it is), and `"deleted":["<publication id>", ...]` when the store remembers publication ids
//! of the address' deleted histories (deletion wins over a redelivery, see
//! [`KeyStore::delete`]); an address with such ids and no key has an empty history. An export
//! of a store without deletions is the format of before the ids travelled, and such an older
//! export imports as it did.

use std::io::{BufRead, Write};
use std::path::Path;

use kst_core::durable::{AtomicFile, DurableError};
use std::collections::{BTreeMap, BTreeSet};

use kst_core::store::{check_publication_ids, validate_history};
use kst_core::{Address, Error, KeyRecord, KeyStore};
use serde::{Deserialize, Serialize};

use crate::exit;
use crate::shared::config::Config;
use crate::shared::report;
use crate::shared::stores::{self, Reach};

/// `kst export`: writes every key of the configured store to `output` (stdout when `None`).
pub async fn export_command(config: Option<&Path>, output: Option<&Path>) -> u8 {
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    export_to(&cfg, output).await
}

/// `kst import`: stores every history of `input` (`-` for stdin) in the configured store.
pub async fn import_command(config: Option<&Path>, input: &Path) -> u8 {
    let cfg = match super::load(config) {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    import_from(&cfg, input).await
}

async fn export_to(cfg: &Config, output: Option<&Path>) -> u8 {
    let store = match stores::open_store(&cfg.store, Reach::Now).await {
        Ok(s) => s,
        Err(e) => return report::error(&e),
    };
    let result = match output {
        None => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            export(store.as_ref(), &mut out).await
        }
        Some(path) => match export_to_file(store.as_ref(), path).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("kst: cannot write the export: {e}");
                return exit::CANTCREAT;
            }
        },
    };
    match result {
        Ok(c) => {
            eprintln!("kst: exported {c} from the {} store", store.name());
            exit::OK
        }
        Err(e) => report::error(&e),
    }
}

/// Exports into `path` durably (see [`kst_core::durable`]): a failed export leaves no half
/// file and the old file, if any, in place; a finished one survives a crash. The outer error is
/// the file's (exit 73), the inner the store's.
async fn export_to_file(
    store: &dyn KeyStore,
    path: &Path,
) -> Result<Result<Counts, Error>, DurableError> {
    let mut out = std::io::BufWriter::new(AtomicFile::create(path)?);
    let counts = match export(store, &mut out).await {
        Ok(c) => c,
        // Dropped uncommitted: the temporary file is removed.
        Err(e) => return Ok(Err(e)),
    };
    // `export` flushed the buffer, so taking the file out does not write.
    let file = out.into_inner().map_err(|e| DurableError {
        step: "write",
        path: path.to_path_buf(),
        source: e.into_error(),
    })?;
    file.commit()?;
    Ok(Ok(counts))
}

async fn import_from(cfg: &Config, input: &Path) -> u8 {
    // Every restored address is recorded in the key directory when `[transparency]` is on.
    let store = match stores::open_recorded_store(cfg, Reach::Now).await {
        Ok(s) => s,
        Err(e) => return report::error(&e),
    };
    let result = if input == Path::new("-") {
        let stdin = std::io::stdin();
        let mut lock = stdin.lock();
        import(store.as_ref(), &mut lock).await
    } else {
        match std::fs::File::open(input) {
            Ok(f) => {
                let mut r = std::io::BufReader::new(f);
                import(store.as_ref(), &mut r).await
            }
            Err(e) => {
                eprintln!("kst: cannot read {}: {e}", input.display());
                return exit::NOINPUT;
            }
        }
    };
    match result {
        Ok(c) => {
            eprintln!("kst: imported {c} into the {} store", store.name());
            exit::OK
        }
        Err(e) => report::error(&e),
    }
}

/// Addresses asked of the store per walk page ([`KeyStore::list_page`]).
const PAGE: usize = 500;

/// Longest line `import` reads (a history of large keys); longer lines are refused.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// One exported address.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportLine {
    /// The normalized address.
    pub address: Address,
    /// Every version, oldest first; the last is current. Empty when the address has no key,
    /// only [`ExportLine::deleted`] ids.
    #[serde(default)]
    pub history: Vec<KeyRecord>,
    /// The publication ids of the address' deleted histories the store remembers, sorted;
    /// left out of the line when there are none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
}

/// What an export or import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Addresses with a key written.
    pub addresses: u64,
    /// Key versions written.
    pub versions: u64,
    /// Publication ids of deleted histories written.
    pub deleted: u64,
}

impl std::fmt::Display for Counts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} address(es), {} version(s), {} deleted publication id(s)",
            self.addresses, self.versions, self.deleted
        )
    }
}

/// Writes every address of `store` with its history and its remembered deleted publication
/// ids to `out`, in address order.
///
/// The addresses come from one walk of the store in its own order ([`KeyStore::list_page`]:
/// about one read of the store, where paging through [`KeyStore::list`] in address order
/// costs the fs store a read of every history file per page), sorted in memory (the
/// addresses only, not their keys), so that exports of the same keys are the same bytes on
/// every backend; the deleted ids from one walk of what the store remembers
/// ([`KeyStore::deleted_page`]), held in memory. Then each history is read once.
pub async fn export(store: &dyn KeyStore, out: &mut dyn Write) -> Result<Counts, Error> {
    let mut counts = Counts::default();
    let keyed = addresses(store).await?;
    let mut deleted = deleted_publications(store).await?;
    let mut all: Vec<Address> = deleted.keys().cloned().collect();
    all.extend(keyed.iter().cloned());
    all.sort_unstable();
    all.dedup();
    for address in &all {
        let history = match keyed.binary_search(address) {
            Ok(_) => store.history(address).await?,
            Err(_) => Vec::new(),
        };
        let ids: Vec<String> = deleted
            .remove(address)
            .map(|ids| ids.into_iter().collect())
            .unwrap_or_default();
        if history.is_empty() && ids.is_empty() {
            continue; // deleted between the walk and history
        }
        if !history.is_empty() {
            counts.addresses += 1;
            counts.versions += history.len() as u64;
        }
        counts.deleted += ids.len() as u64;
        let line = ExportLine {
            address: address.clone(),
            history,
            deleted: ids,
        };
        let text = serde_json::to_string(&line)
            .map_err(|e| Error::Invalid(format!("cannot encode {address}: {e}")))?;
        // Terminal-safe (the export may go to stdout): the same JSON value, so `kst
        // import` reads back exactly what was stored.
        let mut text = crate::terminal::json(&text).into_owned();
        text.push('\n');
        out.write_all(text.as_bytes())
            .map_err(|e| Error::unavailable(kst_core::Component::other("export output"), e))?;
    }
    out.flush()
        .map_err(|e| Error::unavailable(kst_core::Component::other("export output"), e))?;
    Ok(counts)
}

/// Every address of `store` that has a key, in address order: a whole walk
/// ([`KeyStore::list_page`]), then sorted.
async fn addresses(store: &dyn KeyStore) -> Result<Vec<Address>, Error> {
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.list_page(cursor.as_ref(), PAGE).await?;
        all.extend(page.addresses);
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    all.sort_unstable();
    // A walk hands each address out once; an address is exported once whatever happens.
    all.dedup();
    Ok(all)
}

/// Every address whose deleted publication ids `store` remembers, with the ids: a whole walk
/// ([`KeyStore::deleted_page`]; an address handed out twice has its ids merged).
async fn deleted_publications(
    store: &dyn KeyStore,
) -> Result<BTreeMap<Address, BTreeSet<String>>, Error> {
    let mut all: BTreeMap<Address, BTreeSet<String>> = BTreeMap::new();
    let mut cursor = None;
    loop {
        let page = store.deleted_page(cursor.as_ref(), PAGE).await?;
        for e in page.entries {
            all.entry(e.address).or_default().extend(e.publication_ids);
        }
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    Ok(all)
}

/// Reads export lines from `input` and restores each address into `store`, replacing what the
/// store held for it, and adds its deleted publication ids to those the store remembers. Stops at the first bad line with an error that names the line number;
/// lines before it are imported (importing the same file again is harmless).
pub async fn import(store: &dyn KeyStore, input: &mut dyn BufRead) -> Result<Counts, Error> {
    let mut counts = Counts::default();
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let n = read_line(input, &mut line)?;
        if n == 0 {
            break;
        }
        number += 1;
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let parsed: ExportLine = serde_json::from_str(text)
            .map_err(|e| Error::Invalid(format!("line {number}: not an export line: {e}")))?;
        if parsed.history.is_empty() && parsed.deleted.is_empty() {
            return Err(Error::Invalid(format!(
                "line {number}: {} has neither a history nor deleted publication ids",
                parsed.address
            )));
        }
        if parsed.history.iter().any(|r| r.address != parsed.address) {
            return Err(Error::Invalid(format!(
                "line {number}: a record of the history is not for {}",
                parsed.address
            )));
        }
        if !parsed.history.is_empty() {
            validate_history(&parsed.history)
                .map_err(|e| Error::Invalid(format!("line {number}: {e}")))?;
        }
        if !parsed.deleted.is_empty() {
            check_publication_ids(&parsed.address, &parsed.deleted)
                .map_err(|e| Error::Invalid(format!("line {number}: {e}")))?;
        }
        if !parsed.history.is_empty() {
            store.restore(&parsed.history).await?;
            counts.addresses += 1;
            counts.versions += parsed.history.len() as u64;
        }
        if !parsed.deleted.is_empty() {
            store
                .remember_deleted(&parsed.address, &parsed.deleted)
                .await?;
            counts.deleted += parsed.deleted.len() as u64;
        }
    }
    Ok(counts)
}

/// Reads one line (up to and including `\n`), refusing lines over [`MAX_LINE_BYTES`].
fn read_line(input: &mut dyn BufRead, line: &mut Vec<u8>) -> Result<usize, Error> {
    loop {
        let buf = input
            .fill_buf()
            .map_err(|e| Error::unavailable(kst_core::Component::other("import input"), e))?;
        if buf.is_empty() {
            return Ok(line.len());
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        input.consume(take);
        if line.len() > MAX_LINE_BYTES {
            return Err(Error::Invalid(format!(
                "an import line is longer than {MAX_LINE_BYTES} bytes"
            )));
        }
        if done {
            return Ok(line.len());
        }
    }
}
