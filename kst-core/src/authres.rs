//! The optional sender-authentication gate: reading the provider's own `Authentication-Results:`
//! header (RFC 8601).
//!
//! A retrieval reply goes to the envelope sender, whom nobody authenticated. With the gate on
//! (`kst.require_authentication_results`), kst answers a retrieval only when the provider's MTA
//! has vouched for the sender's domain: SPF `pass` for the envelope sender's domain
//! (`smtp.mailfrom`), DKIM `pass` for a signing domain equal to it (`header.d` or `header.i`), or
//! DMARC `pass` for a `header.from` equal to it.
//!
//! Only the **topmost** `Authentication-Results:` header is read, and only when its authserv-id
//! is the configured one (compared case-insensitively). Anything a sender wrote sits below the
//! headers the provider's MTA prepends, so a forged header, with the right authserv-id or
//! not, is never read. The provider's MTA should also remove incoming headers that carry its
//! authserv-id (RFC 8601 section 5); the rule here does not depend on it. Run a single
//! producer of the header (rspamd, or OpenDMARC with SPF), because kst reads one header.

/// Longest `Authentication-Results:` value kst parses.
const MAX_LEN: usize = 8192;

/// One `method=result` statement with its properties.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodResult {
    /// Method, lowercase (`spf`, `dkim`, `dmarc`, ...), without a version.
    pub method: String,
    /// Result, lowercase (`pass`, `fail`, ...).
    pub result: String,
    /// `ptype.property=value` pairs, ptype and property lowercase, value as written.
    pub properties: Vec<(String, String)>,
}

impl MethodResult {
    /// The value of `ptype.property` (e.g. `smtp.mailfrom`), if present.
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A parsed `Authentication-Results:` header value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthResults {
    /// The authserv-id, as written.
    pub authserv_id: String,
    /// The results (empty for `none`).
    pub results: Vec<MethodResult>,
}

/// Why the gate did not let a retrieval through.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GateError {
    /// There is no `Authentication-Results:` header.
    #[error("no Authentication-Results header")]
    Missing,
    /// The topmost one cannot be parsed.
    #[error("the topmost Authentication-Results header is malformed")]
    Malformed,
    /// The topmost one was written by someone else.
    #[error("the topmost Authentication-Results header is from {0:?}, not the trusted authserv-id")]
    Untrusted(String),
    /// No SPF, DKIM or DMARC pass for the sender's domain.
    #[error("no SPF, DKIM or DMARC pass for {0}")]
    NoPass(String),
}

/// Removes RFC 5322 comments (nesting, quoted-pairs) outside quoted strings; `None` when they
/// do not balance.
fn strip_comments(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut depth = 0usize;
    let mut quoted = false;
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted || depth > 0 => {
                let n = chars.next()?;
                if depth == 0 {
                    out.push(c);
                    out.push(n);
                }
            }
            '"' if depth == 0 => {
                quoted = !quoted;
                out.push(c);
            }
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    out.push(' ');
                }
            }
            _ if depth > 0 => {}
            _ => out.push(c),
        }
    }
    (depth == 0 && !quoted).then_some(out)
}

/// Splits at `;` outside quoted strings.
fn split_statements(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quoted = false;
    let mut escaped = false;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ';' if !quoted => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&text[start..]);
    out
}

/// A value without surrounding quotes.
fn unquote(v: &str) -> String {
    let v = v.trim();
    match v.strip_prefix('"').and_then(|s| s.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_string(),
    }
}

/// Parses an `Authentication-Results:` header value. `None` when it is malformed.
pub fn parse(value: &str) -> Option<AuthResults> {
    if value.len() > MAX_LEN {
        return None;
    }
    let text = strip_comments(value)?;
    let mut statements = split_statements(&text).into_iter();
    let head = statements.next()?;
    // authserv-id [version]
    let authserv_id = unquote(head.split_whitespace().next()?);
    if authserv_id.is_empty() {
        return None;
    }
    let mut results = Vec::new();
    for st in statements {
        let words: Vec<&str> = st.split_whitespace().collect();
        let Some((first, rest)) = words.split_first() else {
            continue; // an empty statement (trailing ';')
        };
        if first.eq_ignore_ascii_case("none") && rest.is_empty() {
            continue;
        }
        // `method[/version] = result`, tolerating spaces around '='.
        let joined = words.join(" ");
        let (method, after) = joined.split_once('=')?;
        let method = method.trim().split('/').next()?.trim().to_ascii_lowercase();
        if method.is_empty() || method.contains(char::is_whitespace) {
            return None;
        }
        let mut rest = after.split_whitespace();
        let result = rest.next()?.to_ascii_lowercase();
        let mut properties = Vec::new();
        let tail: Vec<&str> = rest.collect();
        // `reason=...` and `ptype.prop=value`, where `=` may be spaced out.
        let mut i = 0;
        let mut items = Vec::new();
        while i < tail.len() {
            let w = tail[i];
            if w == "=" && !items.is_empty() && i + 1 < tail.len() {
                let k: String = items.pop().unwrap_or_default();
                items.push(format!("{k}={}", tail[i + 1]));
                i += 2;
            } else if let Some(k) = w.strip_suffix('=').filter(|k| !k.is_empty()) {
                let v = tail.get(i + 1).copied().unwrap_or("");
                items.push(format!("{k}={v}"));
                i += 2;
            } else if w.starts_with('=') && !items.is_empty() {
                let k: String = items.pop().unwrap_or_default();
                items.push(format!("{k}{w}"));
                i += 1;
            } else {
                items.push(w.to_string());
                i += 1;
            }
        }
        for item in items {
            if let Some((k, v)) = item.split_once('=') {
                let k = k.trim().to_ascii_lowercase();
                if k.contains('.') {
                    properties.push((k, unquote(v)));
                }
            }
        }
        results.push(MethodResult {
            method,
            result,
            properties,
        });
    }
    Some(AuthResults {
        authserv_id,
        results,
    })
}

/// The domain of a property value: `user@domain`, `@domain` or `domain`, lowercase, without a
/// trailing dot.
fn domain_of(v: &str) -> String {
    let d = v.rsplit_once('@').map_or(v, |(_, d)| d);
    d.trim()
        .trim_matches(['<', '>'])
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

/// Checks the gate: the topmost `Authentication-Results:` value (`None`: no such header) must
/// carry `authserv_id` and a pass for `sender_domain` (lowercase A-label).
pub fn check(
    topmost: Option<&str>,
    authserv_id: &str,
    sender_domain: &str,
) -> Result<(), GateError> {
    let value = topmost.ok_or(GateError::Missing)?;
    let ar = parse(value).ok_or(GateError::Malformed)?;
    if !ar.authserv_id.eq_ignore_ascii_case(authserv_id.trim()) {
        return Err(GateError::Untrusted(ar.authserv_id));
    }
    let ok = ar.results.iter().any(|r| {
        if r.result != "pass" {
            return false;
        }
        let props: &[&str] = match r.method.as_str() {
            "spf" => &["smtp.mailfrom"],
            "dkim" => &["header.d", "header.i"],
            "dmarc" => &["header.from"],
            _ => &[],
        };
        props
            .iter()
            .filter_map(|p| r.property(p))
            .any(|v| domain_of(v) == sender_domain)
    });
    if ok {
        Ok(())
    } else {
        Err(GateError::NoPass(sender_domain.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSPAMD: &str = "mx.example.net;\r\n\tdkim=pass header.d=acme.net header.s=s1 header.b=abc;\r\n\tspf=pass (mx.example.net: domain of bob@acme.net designates 192.0.2.9 as permitted sender) smtp.mailfrom=bob@acme.net;\r\n\tdmarc=pass (policy=reject) header.from=acme.net";

    #[test]
    fn parses_rfc8601_examples() {
        let ar = parse(RSPAMD).unwrap();
        assert_eq!(ar.authserv_id, "mx.example.net");
        assert_eq!(ar.results.len(), 3);
        assert_eq!(ar.results[1].method, "spf");
        assert_eq!(
            ar.results[1].property("smtp.mailfrom"),
            Some("bob@acme.net")
        );
        // RFC 8601 appendix B.2 and B.5 shapes
        assert_eq!(parse("example.org 1; none").unwrap().results, vec![]);
        let ar = parse("example.com; spf = pass smtp.mailfrom = example.net; dkim/1=fail (bad sig) reason=\"bad; really\" header.i=@newyork.example.com").unwrap();
        assert_eq!(ar.results[0].property("smtp.mailfrom"), Some("example.net"));
        assert_eq!(
            ar.results.len(),
            2,
            "a ';' inside quotes does not end a statement"
        );
        assert_eq!(ar.results[1].method, "dkim");
        assert_eq!(
            ar.results[1].property("header.i"),
            Some("@newyork.example.com")
        );
        assert!(parse("(unbalanced; spf=pass").is_none());
        assert!(parse("").is_none());
        assert!(parse("x; spf").is_none());
    }

    #[test]
    fn passes_for_the_senders_domain_only() {
        assert_eq!(check(Some(RSPAMD), "MX.example.net", "acme.net"), Ok(()));
        assert_eq!(
            check(Some(RSPAMD), "mx.example.net", "victim.example"),
            Err(GateError::NoPass("victim.example".into()))
        );
        let spf_only = "mx.example.net; spf=pass smtp.mailfrom=acme.net; dkim=none";
        assert_eq!(check(Some(spf_only), "mx.example.net", "acme.net"), Ok(()));
        let dkim_other =
            "mx.example.net; dkim=pass header.d=evil.example; spf=softfail smtp.mailfrom=acme.net";
        assert!(check(Some(dkim_other), "mx.example.net", "acme.net").is_err());
        let fails =
            "mx.example.net; spf=fail smtp.mailfrom=acme.net; dmarc=fail header.from=acme.net";
        assert!(check(Some(fails), "mx.example.net", "acme.net").is_err());
    }

    #[test]
    fn foreign_or_missing_headers_do_not_count() {
        assert_eq!(
            check(None, "mx.example.net", "acme.net"),
            Err(GateError::Missing)
        );
        let foreign = RSPAMD.replacen("mx.example.net", "mx.acme.net", 1);
        assert_eq!(
            check(Some(&foreign), "mx.example.net", "acme.net"),
            Err(GateError::Untrusted("mx.acme.net".into()))
        );
        // The authserv-id hidden in a comment or as a suffix does not count.
        let hidden = "(mx.example.net) evil.example; spf=pass smtp.mailfrom=acme.net";
        assert!(check(Some(hidden), "mx.example.net", "acme.net").is_err());
        let suffix = "mx.example.net.evil.example; spf=pass smtp.mailfrom=acme.net";
        assert!(check(Some(suffix), "mx.example.net", "acme.net").is_err());
        // A pass hidden in a comment does not count.
        let commented =
            "mx.example.net; spf=fail (spf=pass smtp.mailfrom=acme.net) smtp.mailfrom=acme.net";
        assert!(check(Some(commented), "mx.example.net", "acme.net").is_err());
    }
}
