//! Maps I/O and JSON errors into [`kst_core::Error`]: I/O → temporary, unreadable data → corrupt.

use std::fmt;
use std::path::Path;

use kst_core::{Component, Error};

/// Component name used in every error of this crate.
pub(crate) const COMPONENT: Component = Component::store("fs");

/// An I/O error while doing `op` on `path`: the store is unavailable (temporary).
pub(crate) fn io(op: &str, path: &Path, err: std::io::Error) -> Error {
    Error::unavailable(COMPONENT, format!("{op} {}: {err}", path.display()))
}

/// A durable write (or directory sync) failed: the store is unavailable (temporary).
pub(crate) fn durable_error(err: kst_core::durable::DurableError) -> Error {
    Error::unavailable(COMPONENT, err)
}

/// `path` holds data this release cannot read.
pub(crate) fn corrupt(path: &Path, what: impl fmt::Display) -> Error {
    Error::corrupt(COMPONENT, format!("{}: {what}", path.display()))
}

/// The store is unavailable for a reason that is not an I/O error.
pub(crate) fn unavailable(what: impl fmt::Display) -> Error {
    Error::unavailable(COMPONENT, what)
}
