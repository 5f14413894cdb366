//! The look-up index `kst_key_index`: fingerprints (primary and subkeys), key IDs and the WKD
//! hash of every current key (`kst_core::key_index::IndexEntries`), kept in the same
//! transaction as the record and checked against the record on every hit.

use kst_core::key_index::IndexEntries;
use kst_core::wkd::WkdHash;
use kst_core::{KeyRecord, Result};
use sqlx::PgConnection;
use sqlx::postgres::PgPool;

use crate::error::{corrupt, db};
use crate::row;

/// What an index row says about its value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A primary or subkey fingerprint (`Fingerprint::as_str`).
    Fingerprint = 1,
    /// A 64-bit key ID (`KeyId::as_str`).
    KeyId = 2,
    /// The WKD hash of the address with its domain ([`wkd_value`]).
    Wkd = 3,
}

/// The `value` of a WKD row: `<hash>@<domain>`.
pub(crate) fn wkd_value(domain: &str, hash: &WkdHash) -> String {
    format!("{}@{domain}", hash.as_str())
}

/// Replaces the index rows of each record's address with the entries of that record (the
/// current key), inside the caller's transaction, which must hold the addresses' `kst_keys`
/// row locks.
pub(crate) async fn write(tx: &mut PgConnection, records: &[&KeyRecord]) -> Result<()> {
    let addresses: Vec<&str> = records.iter().map(|r| r.address.as_str()).collect();
    sqlx::query("DELETE FROM kst_key_index WHERE address = ANY($1)")
        .bind(&addresses)
        .execute(&mut *tx)
        .await
        .map_err(db)?;
    let (mut kinds, mut values, mut owners) = (Vec::new(), Vec::new(), Vec::new());
    for r in records {
        let e = IndexEntries::of(r);
        let address = r.address.as_str();
        for f in &e.fingerprints {
            kinds.push(Kind::Fingerprint as i16);
            values.push(f.as_str().to_string());
            owners.push(address);
        }
        for id in &e.key_ids {
            kinds.push(Kind::KeyId as i16);
            values.push(id.as_str().to_string());
            owners.push(address);
        }
        kinds.push(Kind::Wkd as i16);
        values.push(wkd_value(&e.domain, &e.wkd_hash));
        owners.push(address);
    }
    sqlx::query(
        "INSERT INTO kst_key_index (kind, value, address) \
         SELECT * FROM unnest($1::smallint[], $2::text[], $3::text[]) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&kinds)
    .bind(&values)
    .bind(&owners)
    .execute(&mut *tx)
    .await
    .map_err(db)?;
    Ok(())
}

/// Whether the index is complete (`kst_key_index_state.built`): false only for a store that
/// held keys when the index migration ran and has not been rebuilt since.
pub(crate) async fn is_built(pool: &PgPool) -> Result<bool> {
    let built: Option<bool> = sqlx::query_scalar("SELECT built FROM kst_key_index_state")
        .fetch_optional(pool)
        .await
        .map_err(db)?;
    Ok(built.unwrap_or(false))
}

/// Current records whose index rows have `kind`/`value`, in address order, at most `limit`,
/// each confirmed by `hit` on the record's own entries (a row that does not match its record is
/// skipped, never served).
pub(crate) async fn find(
    pool: &PgPool,
    kind: Kind,
    value: &str,
    limit: usize,
    hit: impl Fn(&IndexEntries) -> bool,
) -> Result<Vec<KeyRecord>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    while out.len() < limit {
        let want = limit - out.len();
        let page = i64::try_from(want).unwrap_or(i64::MAX).min(1000);
        let rows = sqlx::query(
            "SELECT h.address, h.version, h.key, h.fingerprint, h.published_at, \
             h.publication_id, h.revoked, h.format \
             FROM kst_key_index i \
             JOIN kst_keys k ON k.address = i.address \
             JOIN kst_key_history h ON h.address = k.address AND h.version = k.current_version \
             WHERE i.kind = $1 AND i.value = $2 AND ($3::text IS NULL OR i.address > $3::text) \
             ORDER BY i.address LIMIT $4",
        )
        .bind(kind as i16)
        .bind(value)
        .bind(after.as_deref())
        .bind(page)
        .fetch_all(pool)
        .await
        .map_err(db)?;
        let full = i64::try_from(rows.len()).unwrap_or(i64::MAX) == page;
        for r in &rows {
            let record = row::record(r)?;
            after = Some(record.address.as_str().to_string());
            if hit(&IndexEntries::of(&record)) {
                out.push(record);
            } else {
                tracing::warn!(
                    address = %record.address,
                    "kst_key_index row does not match the current key; skipped (run `kst migrate` to rebuild the index)"
                );
            }
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

/// Rows per transaction of [`rebuild`].
const REBUILD_BATCH: i64 = 500;

/// Rebuilds the rows of every current key, `REBUILD_BATCH` addresses per transaction (each
/// batch holds its addresses' row locks, so concurrent publications wait for it or come after
/// it and write their own rows), then marks the index built. Returns how many keys it indexed.
pub(crate) async fn rebuild(pool: &PgPool) -> Result<u64> {
    let mut after: Option<String> = None;
    let mut count = 0u64;
    loop {
        let mut tx = pool.begin().await.map_err(db)?;
        let rows = sqlx::query(
            "SELECT h.address, h.version, h.key, h.fingerprint, h.published_at, \
             h.publication_id, h.revoked, h.format \
             FROM kst_keys k JOIN kst_key_history h \
             ON h.address = k.address AND h.version = k.current_version \
             WHERE $1::text IS NULL OR k.address > $1::text \
             ORDER BY k.address LIMIT $2 FOR UPDATE OF k",
        )
        .bind(after.as_deref())
        .bind(REBUILD_BATCH)
        .fetch_all(&mut *tx)
        .await
        .map_err(db)?;
        let records = rows.iter().map(row::record).collect::<Result<Vec<_>>>()?;
        let Some(last) = records.last() else {
            tx.commit().await.map_err(db)?;
            break;
        };
        after = Some(last.address.as_str().to_string());
        let refs: Vec<&KeyRecord> = records.iter().collect();
        write(&mut tx, &refs).await?;
        tx.commit().await.map_err(db)?;
        count += u64::try_from(records.len()).map_err(|_| corrupt("batch size"))?;
    }
    sqlx::query("UPDATE kst_key_index_state SET built = true")
        .execute(pool)
        .await
        .map_err(db)?;
    Ok(count)
}
