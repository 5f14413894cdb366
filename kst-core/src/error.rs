//! The one error type of kst: every value says whether the MTA should retry.

use std::fmt;

/// What went wrong while handling a message or talking to a store or mailer.
///
/// Every error is either *temporary* (the MTA keeps the message and retries: LMTP 4xx, pipe
/// exit 75) or *permanent* (the input itself is wrong and retrying cannot help). Callers branch
/// on [`Error::is_temporary`]; backends map their own errors into these variants.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A store, mailer or other service could not be reached or failed part-way. Temporary.
    #[error("{component} unavailable: {message} (the message stays queued and is retried)")]
    Unavailable {
        /// Which part failed, e.g. `"store(postgres)"` or `"mailer(smtp)"`.
        component: String,
        /// What happened, for the operator.
        message: String,
    },
    /// The configuration is invalid. Temporary: mail waits while the operator fixes the file.
    #[error("configuration error: {0}")]
    Config(String),
    /// Stored data could not be read back (corrupt file or row). Temporary: an operator must look.
    #[error("{component} holds corrupt data: {message}")]
    Corrupt {
        /// Which part holds the data.
        component: String,
        /// What is wrong with it.
        message: String,
    },
    /// The caller passed something invalid (an API misuse, not a mail user's mistake). Permanent.
    #[error("invalid input: {0}")]
    Invalid(String),
}

impl Error {
    /// Builds [`Error::Unavailable`] for `component` from anything printable.
    pub fn unavailable(component: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Unavailable {
            component: component.into(),
            message: message.to_string(),
        }
    }

    /// Builds [`Error::Corrupt`] for `component` from anything printable.
    pub fn corrupt(component: impl Into<String>, message: impl fmt::Display) -> Self {
        Error::Corrupt {
            component: component.into(),
            message: message.to_string(),
        }
    }

    /// True when the MTA should keep the message and retry later (LMTP 4xx, exit 75).
    pub fn is_temporary(&self) -> bool {
        !matches!(self, Error::Invalid(_))
    }
}

/// Result alias used across kst.
pub type Result<T, E = Error> = std::result::Result<T, E>;
