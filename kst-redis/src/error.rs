//! Maps redis errors into [`kst_core::Error`]: unreachable server → temporary, bad data → corrupt.

use kst_core::{Component, Error};
use redis::{ErrorKind, RedisError, ServerErrorKind};

/// Component name used in every error of this crate.
pub(crate) const COMPONENT: Component = Component::store("redis");

/// Maps a redis error. A key of the wrong type means someone else wrote under our prefix
/// (corrupt); a bad client configuration or missing permission is a configuration error;
/// everything else (I/O, timeouts, loading, read-only replica, script errors) is temporary.
pub(crate) fn redis(err: RedisError) -> Error {
    if err.code() == Some("WRONGTYPE") {
        return Error::corrupt(COMPONENT, err);
    }
    match err.kind() {
        ErrorKind::InvalidClientConfig | ErrorKind::Server(ServerErrorKind::NoPerm) => {
            Error::Config(format!("{COMPONENT}: {err}"))
        }
        _ => Error::unavailable(COMPONENT, err),
    }
}

/// A corrupt-data error of this component.
pub(crate) fn corrupt(message: impl std::fmt::Display) -> Error {
    Error::corrupt(COMPONENT, message)
}
