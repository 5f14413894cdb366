//! Email addresses, validated and normalized in exactly one place.
//!
//! Two forms exist. The **account form** ([`AddressPolicy::normalize`]) is how addresses of the
//! served domains are compared and stored: the local part ASCII-lowercased (unless the operator
//! says logins are case-sensitive), subaddresses folded when configured, the domain an IDNA
//! A-label; a local part with non-ASCII characters is refused unless the operator opts in, and
//! even then no Unicode case or compatibility folding is applied: a character that Unicode would
//! fold into another one (U+212A KELVIN SIGN into `k`, fullwidth letters, U+0130 and U+0131,
//! ligatures) is refused, so two different logins can never become one account. The
//! **as-received form** ([`AddressPolicy::as_received`]) is for everyone else's addresses
//! (reply recipients): syntax-checked, the domain an A-label, the local part exactly as written.

use std::fmt;

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

/// Longest address accepted (RFC 5321 path limit less the angle brackets).
pub const MAX_ADDRESS_LEN: usize = 254;
/// Longest local part accepted (RFC 5321 section 4.5.3.1.1).
pub const MAX_LOCAL_LEN: usize = 64;

/// A single plain email address, normalized by an [`AddressPolicy`].
///
/// The domain is lowercased and stored as its IDNA A-label (`bücher.example` becomes
/// `xn--bcher-kva.example`); the local part is folded as the policy says (account form) or kept
/// as written (as-received form); see the module docs. Only a bare
/// `local@domain` is accepted: no display names, comments, quoted local parts, whitespace or
/// control characters, so nothing from a request can inject a header into a reply.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Address(String);

impl Address {
    /// The normalized address, `local@domain`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The local part (before the last `@`).
    pub fn local(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(l, _)| l)
    }

    /// The domain as an IDNA A-label, lowercase.
    pub fn domain(&self) -> &str {
        self.0.rsplit_once('@').map_or("", |(_, d)| d)
    }

    /// Wraps an already-normalized address read back from a store. It is still checked for
    /// syntax, so a corrupt store cannot smuggle a header-breaking value into a reply.
    pub fn from_normalized(s: &str) -> Result<Self, AddressError> {
        let (local, domain) = split(s)?;
        check_local(local)?;
        check_domain_ascii(domain)?;
        Ok(Address(s.to_string()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.0)
    }
}

/// Why a string is not an acceptable address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Empty input.
    #[error("the address is empty")]
    Empty,
    /// Longer than [`MAX_ADDRESS_LEN`] or a local part longer than [`MAX_LOCAL_LEN`].
    #[error("the address is too long")]
    TooLong,
    /// No `@`, or more than one.
    #[error("the address must contain exactly one '@'")]
    NotOneAt,
    /// A character that may not appear in a plain address (space, quote, angle bracket, control).
    #[error("the address contains a character that is not allowed: {0:?}")]
    BadCharacter(char),
    /// Leading, trailing or doubled dot in the local part.
    #[error("the local part has a misplaced dot")]
    BadDot,
    /// The domain is not a valid (internationalized) host name.
    #[error("the domain is not a valid domain name")]
    BadDomain,
    /// A non-ASCII local part where the operator has not allowed them
    /// (`kst.unicode_local_parts`).
    #[error("the local part is not ASCII; this KST accepts only ASCII logins")]
    NonAsciiLocalPart,
    /// A character that Unicode case or compatibility folding would turn into another one
    /// (e.g. U+212A KELVIN SIGN into `k`): refused rather than folded, so that two different
    /// logins never become one account.
    #[error("the local part contains {0:?} (U+{code:04X}), which looks like or folds into another character; write the address with plain characters", code = u32::from(*.0))]
    Confusable(char),
}

/// How addresses are folded before they are compared or stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressPolicy {
    /// Treat `Alice@` and `alice@` as different mailboxes. Default false (case-insensitive), as
    /// almost every provider behaves.
    #[serde(default)]
    pub case_sensitive_local_part: bool,
    /// Fold subaddresses: with `Some('+')`, `alice+tag@example.net` becomes `alice@example.net`.
    /// Default none: subaddresses are distinct addresses. Applies to the account form only (the
    /// served domains); other domains' addresses are never cut.
    #[serde(default)]
    pub subaddress_separator: Option<char>,
    /// Accept account-form local parts with non-ASCII characters (RFC 6531). Default false:
    /// refused. Even when true, non-ASCII characters are compared as written (no Unicode case
    /// folding) and characters that fold into others are refused ([`AddressError::Confusable`]).
    #[serde(default)]
    pub unicode_local_parts: bool,
}

impl AddressPolicy {
    /// Parses `input` into the account form (surrounding ASCII whitespace and one pair of angle
    /// brackets are tolerated, as in `<alice@example.net>`): for addresses of the served domains
    /// and for logins. See the module docs for the rules.
    pub fn normalize(&self, input: &str) -> Result<Address, AddressError> {
        let (local, domain) = parse(input)?;
        if !local.is_ascii() {
            if !self.unicode_local_parts {
                return Err(AddressError::NonAsciiLocalPart);
            }
            check_unfoldable(local)?;
        }
        let mut local = if self.case_sensitive_local_part {
            local.to_string()
        } else {
            local.to_ascii_lowercase()
        };
        if let Some(sep) = self.subaddress_separator
            && let Some((base, _tag)) = local.split_once(sep)
            && !base.is_empty()
        {
            local.truncate(base.len());
        }
        join(&local, &domain)
    }

    /// Parses `input` into the as-received form: syntax checked as strictly as
    /// [`AddressPolicy::normalize`], the domain an A-label, the local part exactly as written
    /// (no case folding, no subaddress cut). For reply recipients and other domains' addresses.
    pub fn as_received(&self, input: &str) -> Result<Address, AddressError> {
        let (local, domain) = parse(input)?;
        join(local, &domain)
    }

    /// Normalizes a bare domain name (for configuration): lowercase IDNA A-label.
    pub fn normalize_domain(&self, input: &str) -> Result<String, AddressError> {
        let d = idna::domain_to_ascii_strict(input.trim()).map_err(|_| AddressError::BadDomain)?;
        check_domain_ascii(&d)?;
        Ok(d)
    }
}

/// Trims, strips one pair of angle brackets, splits and checks the syntax; the domain as an
/// A-label.
fn parse(input: &str) -> Result<(&str, String), AddressError> {
    let mut s = input.trim_matches([' ', '\t']);
    if let Some(inner) = s.strip_prefix('<').and_then(|r| r.strip_suffix('>')) {
        s = inner;
    }
    if s.is_empty() {
        return Err(AddressError::Empty);
    }
    if s.len() > MAX_ADDRESS_LEN * 4 {
        return Err(AddressError::TooLong);
    }
    let (local, domain) = split(s)?;
    check_local(local)?;
    let domain = idna::domain_to_ascii_strict(domain).map_err(|_| AddressError::BadDomain)?;
    check_domain_ascii(&domain)?;
    Ok((local, domain))
}

/// `local@domain` after the length checks.
fn join(local: &str, domain: &str) -> Result<Address, AddressError> {
    if local.len() > MAX_LOCAL_LEN || local.len() + 1 + domain.len() > MAX_ADDRESS_LEN {
        return Err(AddressError::TooLong);
    }
    Ok(Address(format!("{local}@{domain}")))
}

/// Refuses a non-ASCII local part that Unicode folding could merge with another one: a
/// character that is not its own NFKC form (fullwidth and mathematical letters, ligatures,
/// KELVIN SIGN, ANGSTROM SIGN, ...), a non-ASCII character whose lower- or uppercase contains an
/// ASCII character (U+0130 `İ`, U+0131 `ı`, U+017F `ſ`), and a local part that is not in NFC
/// (a decomposed `é` next to a composed one).
fn check_unfoldable(local: &str) -> Result<(), AddressError> {
    for c in local.chars().filter(|c| !c.is_ascii()) {
        let nfkc: String = std::iter::once(c).nfkc().collect();
        let folds_to_ascii = c
            .to_lowercase()
            .chain(c.to_uppercase())
            .any(|f| f.is_ascii());
        if nfkc.chars().ne(std::iter::once(c)) || folds_to_ascii {
            return Err(AddressError::Confusable(c));
        }
    }
    if !unicode_normalization::is_nfc(local) {
        let c = local.chars().find(|c| !c.is_ascii()).unwrap_or('?');
        return Err(AddressError::Confusable(c));
    }
    Ok(())
}

fn split(s: &str) -> Result<(&str, &str), AddressError> {
    let mut parts = s.split('@');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(l), Some(d), None) if !l.is_empty() && !d.is_empty() => Ok((l, d)),
        (Some(_), Some(_), None) => Err(AddressError::Empty),
        _ => Err(AddressError::NotOneAt),
    }
}

/// RFC 5322 `atext` plus `.` (dot-atom), and any non-ASCII character that is not a control or
/// whitespace (RFC 6531 internationalized local parts).
fn check_local(local: &str) -> Result<(), AddressError> {
    if local.chars().count() > MAX_LOCAL_LEN {
        return Err(AddressError::TooLong);
    }
    for c in local.chars() {
        let ok = c.is_ascii_alphanumeric()
            || "!#$%&'*+-/=?^_`{|}~.".contains(c)
            || (!c.is_ascii() && !c.is_control() && !c.is_whitespace());
        if !ok {
            return Err(AddressError::BadCharacter(c));
        }
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err(AddressError::BadDot);
    }
    Ok(())
}

/// An A-label domain: LDH labels separated by dots, at least two labels.
fn check_domain_ascii(domain: &str) -> Result<(), AddressError> {
    if domain.is_empty() || domain.len() > 253 || !domain.contains('.') {
        return Err(AddressError::BadDomain);
    }
    for label in domain.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(AddressError::BadDomain);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> AddressPolicy {
        AddressPolicy::default()
    }

    #[test]
    fn lowercases_and_strips_brackets() {
        let a = p().normalize(" <Alice@Example.NET> ").unwrap();
        assert_eq!(a.as_str(), "alice@example.net");
        assert_eq!(a.local(), "alice");
        assert_eq!(a.domain(), "example.net");
    }

    #[test]
    fn case_sensitive_policy_keeps_local_case() {
        let pol = AddressPolicy {
            case_sensitive_local_part: true,
            ..Default::default()
        };
        assert_eq!(
            pol.normalize("Alice@EXAMPLE.net").unwrap().as_str(),
            "Alice@example.net"
        );
    }

    fn unicode() -> AddressPolicy {
        AddressPolicy {
            unicode_local_parts: true,
            ..Default::default()
        }
    }

    #[test]
    fn idna_domain_becomes_a_label() {
        let a = p().normalize("joerg@Bücher.example").unwrap();
        assert_eq!(a.as_str(), "joerg@xn--bcher-kva.example");
        let a = unicode().normalize("jörg@Bücher.example").unwrap();
        assert_eq!(a.as_str(), "jörg@xn--bcher-kva.example");
    }

    #[test]
    fn kelvin_sign_never_becomes_karl() {
        // U+212A KELVIN SIGN + "arl": Unicode lowercases it to "karl".
        let kelvin = "\u{212A}arl@example.net";
        assert_eq!(p().normalize(kelvin), Err(AddressError::NonAsciiLocalPart));
        assert_eq!(
            unicode().normalize(kelvin),
            Err(AddressError::Confusable('\u{212A}'))
        );
        assert_eq!(
            p().normalize("KARL@example.net").unwrap().as_str(),
            "karl@example.net"
        );
    }

    #[test]
    fn characters_that_fold_into_others_are_refused_not_folded() {
        for (input, c) in [
            ("\u{0130}nci@example.net", '\u{0130}'), // Turkish capital dotted I: lowercases to i + U+0307
            ("\u{0131}nci@example.net", '\u{0131}'), // Turkish dotless i: uppercases to I
            ("\u{FF2B}arl@example.net", '\u{FF2B}'), // fullwidth K
            ("\u{FF4B}arl@example.net", '\u{FF4B}'), // fullwidth k
            ("\u{017F}am@example.net", '\u{017F}'),  // long s: uppercases to S
            ("\u{FB01}sh@example.net", '\u{FB01}'),  // fi ligature
            ("\u{212B}ngstrom@example.net", '\u{212B}'), // ANGSTROM SIGN
            ("\u{1D41A}lice@example.net", '\u{1D41A}'), // MATHEMATICAL BOLD SMALL A
            ("x\u{00B9}@example.net", '\u{00B9}'),   // superscript one
        ] {
            assert_eq!(
                unicode().normalize(input),
                Err(AddressError::Confusable(c)),
                "{input}"
            );
            assert_eq!(
                p().normalize(input),
                Err(AddressError::NonAsciiLocalPart),
                "{input}"
            );
        }
        // A decomposed é (e + U+0301) would look like the composed one: refused.
        assert!(matches!(
            unicode().normalize("jose\u{0301}@example.net"),
            Err(AddressError::Confusable(_))
        ));
        // Plain non-ASCII letters are kept as written, with no Unicode case folding.
        assert_eq!(
            unicode().normalize("José@example.net").unwrap().as_str(),
            "josé@example.net"
        );
        assert_eq!(
            unicode().normalize("JÖRG@example.net").unwrap().as_str(),
            "jÖrg@example.net"
        );
    }

    #[test]
    fn as_received_keeps_the_local_part_as_written() {
        let pol = AddressPolicy {
            subaddress_separator: Some('-'),
            ..Default::default()
        };
        let a = pol.as_received("<John-Smith@Partner.Example>").unwrap();
        assert_eq!(a.as_str(), "John-Smith@partner.example");
        assert_eq!(
            pol.normalize("John-Smith@partner.example")
                .unwrap()
                .as_str(),
            "john@partner.example"
        );
        assert!(pol.as_received("a b@example.net").is_err());
        assert!(
            pol.as_received("alice@example.net\r\nBcc: x@y.example")
                .is_err()
        );
        // Other domains' non-ASCII addresses stay answerable.
        assert_eq!(
            p().as_received("jörg@example.de").unwrap().as_str(),
            "jörg@example.de"
        );
    }

    #[test]
    fn subaddress_folded_only_when_configured() {
        assert_eq!(
            p().normalize("alice+keys@example.net").unwrap().as_str(),
            "alice+keys@example.net"
        );
        let pol = AddressPolicy {
            subaddress_separator: Some('+'),
            ..Default::default()
        };
        assert_eq!(
            pol.normalize("alice+keys@example.net").unwrap().as_str(),
            "alice@example.net"
        );
    }

    #[test]
    fn refuses_everything_that_is_not_one_plain_address() {
        for bad in [
            "",
            "alice",
            "alice@",
            "@example.net",
            "a@b@example.net",
            "alice@example.net, bob@example.net",
            "Alice <alice@example.net>",
            "\"a b\"@example.net",
            "alice@example.net\r\nBcc: x@evil.example",
            "alice\n@example.net",
            "al ice@example.net",
            ".alice@example.net",
            "alice.@example.net",
            "al..ice@example.net",
            "alice@localhost",
            "alice@exa_mple.net",
            "alice@-example.net",
            "alice@example..net",
            "alice(comment)@example.net",
            "alice@[127.0.0.1]",
        ] {
            assert!(p().normalize(bad).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn refuses_overlong() {
        let long_local = "a".repeat(65);
        assert_eq!(
            p().normalize(&format!("{long_local}@example.net")),
            Err(AddressError::TooLong)
        );
        let long_domain = format!("{}.net", "a".repeat(250));
        assert!(p().normalize(&format!("a@{long_domain}")).is_err());
    }

    #[test]
    fn from_normalized_rechecks_syntax() {
        assert!(Address::from_normalized("alice@example.net").is_ok());
        assert!(Address::from_normalized("alice@example.net\r\nX: y").is_err());
        assert!(Address::from_normalized("alice@EXAMPLE.net").is_err());
    }
}
