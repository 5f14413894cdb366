//! The optional sender-authentication gate: reading the provider's own `Authentication-Results:`
//! header (RFC 8601).
//!
//! A retrieval reply goes to the envelope sender, whom nobody authenticated. With the gate on
//! (`kst.require_authentication_results`), kst answers only a sender whose **mailbox** the
//! provider's MTA vouches for ([`Vouch::Mailbox`]): a DKIM `pass` whose signing domain
//! (`header.d`, and `header.i` when given) aligns with the envelope sender's domain (equal, or
//! a parent domain of it), on a message whose one `From:` mailbox, which every DKIM signature
//! covers, is the envelope sender itself. An SPF `pass` (`smtp.mailfrom`), a DMARC `pass`
//! (`header.from`) or a DKIM pass for a message from another mailbox vouches for the
//! **domain** only ([`Vouch::Domain`]): every user of a freemail domain passes SPF for any
//! address of that domain, and a message one user signed can be replayed with another user's
//! address as envelope sender. A domain-level pass is not enough for the gate.
//!
//! Only the **topmost** `Authentication-Results:` header is read, and only when its authserv-id
//! is the configured one (compared case-insensitively). Anything a sender wrote sits below the
//! headers the provider's MTA prepends, so a forged header, with the right authserv-id or
//! not, is never read. The provider's MTA should also remove incoming headers that carry its
//! authserv-id (RFC 8601 section 5); the rule here does not depend on it. Run a single
//! producer of the header (rspamd, or OpenDKIM + OpenDMARC writing the final verdict), because
//! kst reads one header.

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

/// What the provider's header vouches for about an envelope sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vouch {
    /// The mailbox itself: an aligned DKIM pass on a message whose one `From:` mailbox is the
    /// envelope sender.
    Mailbox,
    /// Only the sender's domain: SPF, DMARC, or a DKIM pass for another mailbox of it.
    Domain,
}

/// Why the gate did not let a request through.
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
    /// A pass vouches for the sender's domain, but no aligned DKIM pass for a message from the
    /// sender's own mailbox vouches for the mailbox.
    #[error(
        "only the domain of {0} is vouched for (SPF, DMARC, or DKIM for another From), not the mailbox"
    )]
    DomainOnly(String),
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

/// True when `domain` is `signer` or a subdomain of it (DMARC relaxed alignment), and `signer`
/// has at least two labels: a signature of a top-level domain (`d=com`) vouches for nobody.
fn aligned(domain: &str, signer: &str) -> bool {
    signer.split('.').filter(|l| !l.is_empty()).count() >= 2
        && (domain == signer
            || domain
                .strip_suffix(signer)
                .is_some_and(|rest| rest.ends_with('.')))
}

/// True when a DKIM result vouches for the mailbox `sender` (`local@domain`, compared without
/// ASCII case) of a message whose one `From:` mailbox is `from`.
fn dkim_vouches_mailbox(r: &MethodResult, sender: &str, from: Option<&str>) -> bool {
    let Some(from) = from else {
        return false;
    };
    let sender_domain = domain_of(sender);
    let Some(d) = r.property("header.d").map(domain_of) else {
        return false;
    };
    let i_ok = r.property("header.i").is_none_or(|i| {
        let local_ok = match i.trim().rsplit_once('@') {
            Some((l, _)) if !l.is_empty() => sender
                .rsplit_once('@')
                .is_some_and(|(sl, _)| sl.eq_ignore_ascii_case(l)),
            _ => true,
        };
        local_ok && aligned(&sender_domain, &domain_of(i))
    });
    let from_prop_ok = r
        .property("header.from")
        .is_none_or(|f| aligned(&sender_domain, &domain_of(f)));
    from.trim()
        .trim_matches(['<', '>'])
        .eq_ignore_ascii_case(sender)
        && aligned(&sender_domain, &d)
        && i_ok
        && from_prop_ok
}

/// What the topmost `Authentication-Results:` value (`None`: no such header) vouches for about
/// the envelope sender `sender` (`local@domain`, domain a lowercase A-label), given the
/// message's one `From:` mailbox `from` (`None` when there are none or several). Only a header
/// with `authserv_id` counts.
pub fn vouch(
    topmost: Option<&str>,
    authserv_id: &str,
    sender: &str,
    from: Option<&str>,
) -> Result<Vouch, GateError> {
    let value = topmost.ok_or(GateError::Missing)?;
    let ar = parse(value).ok_or(GateError::Malformed)?;
    if !ar.authserv_id.eq_ignore_ascii_case(authserv_id.trim()) {
        return Err(GateError::Untrusted(ar.authserv_id));
    }
    let sender_domain = domain_of(sender);
    let passes = || ar.results.iter().filter(|r| r.result == "pass");
    if passes().any(|r| r.method == "dkim" && dkim_vouches_mailbox(r, sender, from)) {
        return Ok(Vouch::Mailbox);
    }
    let domain_pass = passes().any(|r| {
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
    if domain_pass {
        Ok(Vouch::Domain)
    } else {
        Err(GateError::NoPass(sender_domain))
    }
}

/// The gate: `Ok` only when the topmost `Authentication-Results:` value vouches for the mailbox
/// `sender` ([`Vouch::Mailbox`]); see [`vouch`] for the arguments.
pub fn check(
    topmost: Option<&str>,
    authserv_id: &str,
    sender: &str,
    from: Option<&str>,
) -> Result<(), GateError> {
    match vouch(topmost, authserv_id, sender, from)? {
        Vouch::Mailbox => Ok(()),
        Vouch::Domain => Err(GateError::DomainOnly(sender.to_string())),
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

    const ID: &str = "mx.example.net";
    const BOB: &str = "bob@acme.net";

    #[test]
    fn aligned_dkim_for_the_senders_own_from_vouches_for_the_mailbox() {
        assert_eq!(
            vouch(Some(RSPAMD), "MX.example.net", BOB, Some(BOB)),
            Ok(Vouch::Mailbox)
        );
        assert_eq!(check(Some(RSPAMD), ID, BOB, Some("<Bob@acme.net>")), Ok(()));
        // Relaxed alignment: a parent signing domain; header.i of the same mailbox.
        let sub = "mx.example.net; dkim=pass header.d=acme.net header.i=bob@mail.acme.net";
        assert_eq!(
            check(
                Some(sub),
                ID,
                "bob@mail.acme.net",
                Some("bob@mail.acme.net")
            ),
            Ok(())
        );
        // header.i naming another user, or a look-alike signing domain: not the mailbox.
        let other_i = "mx.example.net; dkim=pass header.d=acme.net header.i=carol@acme.net";
        assert_eq!(
            check(Some(other_i), ID, BOB, Some(BOB)),
            Err(GateError::DomainOnly(BOB.into()))
        );
        let lookalike = "mx.example.net; dkim=pass header.d=evilacme.net";
        assert_eq!(
            check(Some(lookalike), ID, BOB, Some(BOB)),
            Err(GateError::NoPass("acme.net".into()))
        );
        let child = "mx.example.net; dkim=pass header.d=sub.acme.net";
        assert!(
            check(Some(child), ID, BOB, Some(BOB)).is_err(),
            "a child domain does not vouch for its parent"
        );
        // No single From mailbox: no mailbox vouch.
        assert_eq!(
            check(Some(RSPAMD), ID, BOB, None),
            Err(GateError::DomainOnly(BOB.into()))
        );
    }

    #[test]
    fn replayed_freemail_message_vouches_for_the_domain_only() {
        // Mallory's own message, DKIM-signed by the freemail provider (signed From
        // mallory@freemail.example, so DMARC passes), replayed with the victim as envelope
        // sender from a host outside the provider's SPF record.
        let replay = "mx.example.net; dkim=pass header.d=freemail.example header.s=s1 header.b=abc; spf=fail smtp.mailfrom=victim@freemail.example; dmarc=pass header.from=freemail.example";
        let victim = "victim@freemail.example";
        assert_eq!(
            vouch(Some(replay), ID, victim, Some("mallory@freemail.example")),
            Ok(Vouch::Domain)
        );
        assert_eq!(
            check(Some(replay), ID, victim, Some("mallory@freemail.example")),
            Err(GateError::DomainOnly(victim.into()))
        );
        // SPF passes for any user of the provider: domain only.
        let spf_only = "mx.example.net; spf=pass smtp.mailfrom=victim@freemail.example; dkim=none";
        assert_eq!(
            vouch(Some(spf_only), ID, victim, Some(victim)),
            Ok(Vouch::Domain)
        );
        assert!(check(Some(spf_only), ID, victim, Some(victim)).is_err());
    }

    #[test]
    fn passes_for_other_domains_or_failures_vouch_for_nothing() {
        assert_eq!(
            check(
                Some(RSPAMD),
                ID,
                "victim@victim.example",
                Some("victim@victim.example")
            ),
            Err(GateError::NoPass("victim.example".into()))
        );
        let dkim_other =
            "mx.example.net; dkim=pass header.d=evil.example; spf=softfail smtp.mailfrom=acme.net";
        assert!(vouch(Some(dkim_other), ID, BOB, Some(BOB)).is_err());
        let fails = "mx.example.net; spf=fail smtp.mailfrom=acme.net; dmarc=fail header.from=acme.net; dkim=fail header.d=acme.net";
        assert!(vouch(Some(fails), ID, BOB, Some(BOB)).is_err());
    }

    #[test]
    fn foreign_or_missing_headers_do_not_count() {
        assert_eq!(check(None, ID, BOB, Some(BOB)), Err(GateError::Missing));
        let foreign = RSPAMD.replacen("mx.example.net", "mx.acme.net", 1);
        assert_eq!(
            check(Some(&foreign), ID, BOB, Some(BOB)),
            Err(GateError::Untrusted("mx.acme.net".into()))
        );
        // The authserv-id hidden in a comment or as a suffix does not count.
        let hidden = "(mx.example.net) evil.example; spf=pass smtp.mailfrom=acme.net";
        assert!(check(Some(hidden), ID, BOB, Some(BOB)).is_err());
        let suffix = "mx.example.net.evil.example; spf=pass smtp.mailfrom=acme.net";
        assert!(check(Some(suffix), ID, BOB, Some(BOB)).is_err());
        // A pass hidden in a comment does not count.
        let commented =
            "mx.example.net; spf=fail (spf=pass smtp.mailfrom=acme.net) smtp.mailfrom=acme.net";
        assert!(vouch(Some(commented), ID, BOB, Some(BOB)).is_err());
    }
}
