//! The one error type of kst: every value says whether the MTA should retry.

use std::borrow::Cow;
use std::fmt;

/// What kind of part failed: callers count and route failures by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ComponentKind {
    /// A key store (`store(postgres)`).
    Store,
    /// A rate limiter (`ratelimit(redis)`).
    RateLimiter,
    /// A reply transport (`mailer(smtp)`).
    Mailer,
    /// Anything else: the process's own input or output, the service as a whole.
    Other,
}

impl ComponentKind {
    /// The token shown before the name (`store`, `ratelimit`, `mailer`); empty for `Other`.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Store => "store",
            ComponentKind::RateLimiter => "ratelimit",
            ComponentKind::Mailer => "mailer",
            ComponentKind::Other => "",
        }
    }
}

/// The part that failed: its [`ComponentKind`] and its name, shown as `store(postgres)`.
///
/// Built with [`Component::store`], [`Component::mailer`], ... or from a string in that form
/// (`"store(fs)".into()`); a string without a known kind is [`ComponentKind::Other`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Component {
    kind: ComponentKind,
    name: Cow<'static, str>,
}

impl Component {
    /// A key store named `name` (`postgres`, `fs`, ...).
    pub const fn store(name: &'static str) -> Self {
        Component {
            kind: ComponentKind::Store,
            name: Cow::Borrowed(name),
        }
    }

    /// A rate limiter named `name`.
    pub const fn rate_limiter(name: &'static str) -> Self {
        Component {
            kind: ComponentKind::RateLimiter,
            name: Cow::Borrowed(name),
        }
    }

    /// A mailer named `name` (`smtp`, `spool`, ...).
    pub const fn mailer(name: &'static str) -> Self {
        Component {
            kind: ComponentKind::Mailer,
            name: Cow::Borrowed(name),
        }
    }

    /// Any other part, shown as `name` alone (`stdin`, `export output`).
    pub const fn other(name: &'static str) -> Self {
        Component {
            kind: ComponentKind::Other,
            name: Cow::Borrowed(name),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> ComponentKind {
        self.kind
    }

    /// Its name, without the kind (`postgres` for `store(postgres)`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn parse(label: Cow<'static, str>) -> Self {
        let kinds = [
            ComponentKind::Store,
            ComponentKind::RateLimiter,
            ComponentKind::Mailer,
        ];
        for kind in kinds {
            let inner = label
                .strip_prefix(kind.as_str())
                .and_then(|r| r.strip_prefix('('))
                .and_then(|r| r.strip_suffix(')'));
            if let Some(inner) = inner {
                return Component {
                    kind,
                    name: Cow::Owned(inner.to_string()),
                };
            }
        }
        Component {
            kind: ComponentKind::Other,
            name: label,
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ComponentKind::Other => f.write_str(&self.name),
            kind => write!(f, "{}({})", kind.as_str(), self.name),
        }
    }
}

impl From<&str> for Component {
    fn from(label: &str) -> Self {
        Component::parse(Cow::Owned(label.to_string()))
    }
}

impl From<String> for Component {
    fn from(label: String) -> Self {
        Component::parse(Cow::Owned(label))
    }
}

impl PartialEq<str> for Component {
    fn eq(&self, other: &str) -> bool {
        match self.kind {
            ComponentKind::Other => self.name == other,
            kind => {
                other
                    .strip_prefix(kind.as_str())
                    .and_then(|r| r.strip_prefix('('))
                    .and_then(|r| r.strip_suffix(')'))
                    == Some(&*self.name)
            }
        }
    }
}

impl PartialEq<&str> for Component {
    fn eq(&self, other: &&str) -> bool {
        self == *other
    }
}

/// What went wrong while handling a message or talking to a store or mailer.
///
/// Every error is either *temporary* (the MTA keeps the message and retries: LMTP 4xx, pipe
/// exit 75) or *permanent* (the input itself is wrong and retrying cannot help). Callers branch
/// on [`Error::is_temporary`]; backends map their own errors into these variants.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A store, mailer or other service could not be reached or failed part-way. Temporary.
    #[error("{component} unavailable: {message} (the message stays queued and is retried)")]
    Unavailable {
        /// Which part failed, e.g. `store(postgres)` or `mailer(smtp)`.
        component: Component,
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
        component: Component,
        /// What is wrong with it.
        message: String,
    },
    /// A compare-and-set publication found another current version than it expected (another
    /// publisher was first). Temporary: read the current key again and retry.
    #[error("concurrent change: {0}")]
    Conflict(String),
    /// The caller passed something invalid (an API misuse, not a mail user's mistake). Permanent.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// A publication whose id was in a history the owner deleted since: the MTA delivered the
    /// publication message again after the deletion. Nothing was written; deletion wins, so
    /// the key is not published again. Permanent (a retry would be refused the same way); the
    /// service accepts the message without a reply.
    #[error(
        "publication {publication_id} of {address} was in a history its owner deleted since:          not published again (a redelivery after the deletion; to publish the key again,          send a new publication)"
    )]
    DeletedSince {
        /// The address whose history was deleted.
        address: crate::address::Address,
        /// The publication id (see [`crate::store::KeyRecord::publication_id`]).
        publication_id: String,
    },
}

impl Error {
    /// Builds [`Error::Unavailable`] for `component` from anything printable.
    pub fn unavailable(component: impl Into<Component>, message: impl fmt::Display) -> Self {
        Error::Unavailable {
            component: component.into(),
            message: message.to_string(),
        }
    }

    /// Builds [`Error::Corrupt`] for `component` from anything printable.
    pub fn corrupt(component: impl Into<Component>, message: impl fmt::Display) -> Self {
        Error::Corrupt {
            component: component.into(),
            message: message.to_string(),
        }
    }

    /// The part that failed, for [`Error::Unavailable`] and [`Error::Corrupt`].
    pub fn component(&self) -> Option<&Component> {
        match self {
            Error::Unavailable { component, .. } | Error::Corrupt { component, .. } => {
                Some(component)
            }
            Error::Config(_)
            | Error::Conflict(_)
            | Error::Invalid(_)
            | Error::DeletedSince { .. } => None,
        }
    }

    /// True when the MTA should keep the message and retry later (LMTP 4xx, exit 75).
    pub fn is_temporary(&self) -> bool {
        !matches!(self, Error::Invalid(_) | Error::DeletedSince { .. })
    }

    /// The [`Error::DeletedSince`] of `key`'s publication, for stores that found its id among
    /// those of a deleted history.
    pub fn deleted_since(key: &crate::store::NewKey) -> Self {
        Error::DeletedSince {
            address: key.address.clone(),
            publication_id: key.publication_id.clone(),
        }
    }
}

/// Result alias used across kst.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_keep_their_kind_and_label() {
        let e = Error::unavailable("store(postgres)", "down");
        let c = e.component().unwrap();
        assert_eq!(c.kind(), ComponentKind::Store);
        assert_eq!(c.name(), "postgres");
        assert_eq!(c, "store(postgres)");
        assert_eq!(
            e.to_string(),
            "store(postgres) unavailable: down (the message stays queued and is retried)"
        );
        let m = Error::corrupt(Component::mailer("spool"), "bad file");
        assert_eq!(m.component().unwrap().kind(), ComponentKind::Mailer);
        assert_eq!(m.component().unwrap().to_string(), "mailer(spool)");
        for other in ["stdin", "storefront(x)", "store(", "kst"] {
            let c = Component::from(other);
            assert_eq!(c.kind(), ComponentKind::Other, "{other}");
            assert_eq!(c.to_string(), other);
        }
        assert_eq!(
            Component::from("ratelimit(redis)").kind(),
            ComponentKind::RateLimiter
        );
        assert!(Error::Config("x".into()).component().is_none());
    }
}
