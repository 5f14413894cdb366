//! Maps sqlx errors into [`kst_core::Error`]: unreachable server → temporary, bad rows → corrupt.

use kst_core::{Component, Error};

/// Component name used in every error of this crate.
pub(crate) const COMPONENT: Component = Component::store("postgres");

/// SQLSTATE of "relation does not exist": the schema was never migrated.
const UNDEFINED_TABLE: &str = "42P01";

/// Maps a sqlx error. Decoding problems mean a row we cannot read (corrupt); a missing table means
/// the schema was not migrated (configuration); everything else (I/O, pool timeouts, server
/// errors, serialization failures) is a temporary unavailability.
pub(crate) fn db(err: sqlx::Error) -> Error {
    match &err {
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. } => Error::corrupt(COMPONENT, err),
        sqlx::Error::Configuration(_) => Error::Config(format!("{COMPONENT}: {err}")),
        sqlx::Error::Database(e) if e.code().as_deref() == Some(UNDEFINED_TABLE) => Error::Config(
            format!("{COMPONENT}: {err} (the schema is missing: run `kst migrate`)"),
        ),
        _ => Error::unavailable(COMPONENT, err),
    }
}

/// Maps a migration error: a database we cannot reach is temporary, a history of applied
/// migrations that does not match this release is a configuration problem.
pub(crate) fn migrate(err: sqlx::migrate::MigrateError) -> Error {
    use sqlx::migrate::MigrateError as M;
    match err {
        M::Execute(e) => db(e),
        M::ExecuteMigration(e, v) => {
            Error::unavailable(COMPONENT, format!("migration {v} failed: {e}"))
        }
        other => Error::Config(format!("{COMPONENT}: schema migration: {other}")),
    }
}

/// A corrupt-data error of this component.
pub(crate) fn corrupt(message: impl std::fmt::Display) -> Error {
    Error::corrupt(COMPONENT, message)
}
