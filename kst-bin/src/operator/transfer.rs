//! `kst export` and `kst import`: every key with its history as JSON lines, so an operator can
//! move between backends (fs → PostgreSQL or Redis and back) without losing anything.
//!
//! One line per address: `{"address":"alice@example.net","history":[KeyRecord, ...]}`, oldest
//! version first, the key as base64 of its binary packets (the stored record as it is).

use std::io::{BufRead, Write};
use std::path::Path;

use kst_core::durable::{AtomicFile, DurableError};
use kst_core::{Address, Error, KeyRecord, KeyStore, store::validate_history};
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
            eprintln!(
                "kst: exported {} address(es), {} version(s) from the {} store",
                c.addresses,
                c.versions,
                store.name()
            );
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
            eprintln!(
                "kst: imported {} address(es), {} version(s) into the {} store",
                c.addresses,
                c.versions,
                store.name()
            );
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
    /// Every version, oldest first; the last is current.
    pub history: Vec<KeyRecord>,
}

/// What an export or import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// Addresses written.
    pub addresses: u64,
    /// Key versions written.
    pub versions: u64,
}

/// Writes every address of `store` with its history to `out`, in address order.
///
/// The addresses come from one walk of the store in its own order ([`KeyStore::list_page`]:
/// about one read of the store, where paging through [`KeyStore::list`] in address order
/// costs the fs store a read of every history file per page), sorted in memory (the
/// addresses only, not their keys), so that exports of the same keys are the same bytes on
/// every backend. Then each history is read once.
pub async fn export(store: &dyn KeyStore, out: &mut dyn Write) -> Result<Counts, Error> {
    let mut counts = Counts::default();
    for address in &addresses(store).await? {
        let history = store.history(address).await?;
        if history.is_empty() {
            continue; // deleted between the walk and history
        }
        counts.addresses += 1;
        counts.versions += history.len() as u64;
        let line = ExportLine {
            address: address.clone(),
            history,
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

/// Reads export lines from `input` and restores each address into `store`, replacing what the
/// store held for it. Stops at the first bad line with an error that names the line number;
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
        if parsed.history.iter().any(|r| r.address != parsed.address) {
            return Err(Error::Invalid(format!(
                "line {number}: a record of the history is not for {}",
                parsed.address
            )));
        }
        validate_history(&parsed.history)
            .map_err(|e| Error::Invalid(format!("line {number}: {e}")))?;
        store.restore(&parsed.history).await?;
        counts.addresses += 1;
        counts.versions += parsed.history.len() as u64;
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
