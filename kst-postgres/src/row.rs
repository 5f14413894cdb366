//! Converts between [`KeyRecord`] fields and SQL columns, refusing values that do not fit.

use kst_core::{Address, Error, Fingerprint, KeyRecord, Result};
use sqlx::Row;
use sqlx::postgres::PgRow;

use crate::error::{corrupt, db};

/// Reads one `kst_key_history` row (`address, version, key, fingerprint, published_at,
/// publication_id, revoked, format`).
pub(crate) fn record(row: &PgRow) -> Result<KeyRecord> {
    let address: String = row.try_get("address").map_err(db)?;
    let address = Address::from_normalized(&address)
        .map_err(|e| corrupt(format!("stored address {address:?}: {e}")))?;
    let version: i64 = row.try_get("version").map_err(db)?;
    let published_at: i64 = row.try_get("published_at").map_err(db)?;
    let format: i32 = row.try_get("format").map_err(db)?;
    let fingerprint: String = row.try_get("fingerprint").map_err(db)?;
    Ok(KeyRecord {
        version: to_version(version)
            .ok_or_else(|| corrupt(format!("{address}: stored version {version}")))?,
        published_at: u64::try_from(published_at)
            .map_err(|_| corrupt(format!("{address}: stored published_at {published_at}")))?,
        format: u32::try_from(format)
            .map_err(|_| corrupt(format!("{address}: stored format {format}")))?,
        key: row.try_get("key").map_err(db)?,
        fingerprint: Fingerprint::parse(&fingerprint)
            .map_err(|e| corrupt(format!("{address}: stored fingerprint: {e}")))?,
        publication_id: row.try_get("publication_id").map_err(db)?,
        revoked: row.try_get("revoked").map_err(db)?,
        address,
    })
}

/// A stored version as `u64`; `None` unless it is at least 1.
pub(crate) fn to_version(v: i64) -> Option<u64> {
    u64::try_from(v).ok().filter(|v| *v > 0)
}

/// A `u64` field as the `bigint` it is stored in; values above `i64::MAX` are refused.
pub(crate) fn to_bigint(what: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| Error::Invalid(format!("{what} {v} does not fit the store")))
}

/// The record format as the `integer` it is stored in.
pub(crate) fn to_int(what: &str, v: u32) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Invalid(format!("{what} {v} does not fit the store")))
}
