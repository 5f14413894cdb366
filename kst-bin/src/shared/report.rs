//! How a command reports an error it cannot get past: one line on stderr, and its exit code.

use kst_core::Error;

use crate::exit;
use crate::shared::config::ConfigError;

/// Prints `e` and returns the exit code for an error from a store or mailer. For a command,
/// not a delivery: a temporary failure says to try again, not the delivery's "the message
/// stays queued and is retried".
pub fn error(e: &Error) -> u8 {
    match e {
        Error::Unavailable { component, message } => {
            eprintln!("kst: {component} unavailable: {message} (try again once it is back)")
        }
        _ => eprintln!("kst: {e}"),
    }
    match e {
        Error::Unavailable { .. } | Error::Corrupt { .. } => exit::UNAVAILABLE,
        Error::Config(_) => exit::CONFIG,
        Error::Invalid(_) => exit::USAGE,
        _ => exit::SOFTWARE,
    }
}

/// Prints a configuration error with what to do about it; returns [`exit::CONFIG`].
pub fn config_error(e: &ConfigError) -> u8 {
    eprintln!("kst: configuration error: {e}");
    eprintln!(
        "kst: fix the file or the KST_* environment variable; `kst config check` shows the result"
    );
    exit::CONFIG
}
