//! Reading who authenticated from the `Received:` header that the provider's own MTA wrote.
//!
//! Only the topmost `Received:` header counts (an MTA prepends its own above everything the
//! sender wrote), and only when all of these hold:
//! - its `by` host is one of the configured `trusted_mta_hosts`;
//! - its `with` protocol is an RFC 3848 authenticated one (ESMTPA, ESMTPSA, LMTPA, ...);
//! - it carries exactly one `(Authenticated sender: LOGIN)` comment, and that comment belongs
//!   to the `from` clause (Postfix writes it between the client address and `by`);
//! - its parentheses balance (an unbalanced header is a sign of a hostile HELO name).
//!
//! Anything else, including the same note in a lower header, another header or the body, is
//! never trusted.

/// RFC 3848 protocol types that say the client authenticated (compared case-insensitively).
const AUTHENTICATED_PROTOCOLS: [&str; 8] = [
    "ESMTPA",
    "ESMTPSA",
    "LMTPA",
    "LMTPSA",
    "UTF8SMTPA",
    "UTF8SMTPSA",
    "UTF8LMTPA",
    "UTF8LMTPSA",
];

/// Longest `Received:` header value that is parsed at all.
const MAX_RECEIVED_LEN: usize = 4096;

/// Why the topmost `Received:` header did not yield a trusted login.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceivedError {
    /// The message has no `Received:` header.
    #[error("no Received header")]
    Missing,
    /// The header could not be parsed (unbalanced parentheses, too long, no `by`).
    #[error("the topmost Received header is malformed: {0}")]
    Malformed(&'static str),
    /// The `by` host is not one of the trusted MTAs.
    #[error("the topmost Received header was written by {0:?}, not a trusted MTA")]
    UntrustedHost(String),
    /// The protocol is not an authenticated one.
    #[error("the topmost Received header records protocol {0:?}, not an authenticated submission")]
    NotAuthenticated(String),
    /// No `(Authenticated sender: ...)` comment in the `from` clause.
    #[error("the topmost Received header names no authenticated sender")]
    NoSender,
    /// More than one authenticated-sender note, or one outside the `from` clause.
    #[error("the topmost Received header has a misplaced or repeated authenticated-sender note")]
    Ambiguous,
}

#[derive(Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Comment(String),
    Semicolon,
}

fn tokenize(value: &str) -> Result<Vec<Token>, ReceivedError> {
    let mut tokens = Vec::new();
    let mut chars = value.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_ascii_whitespace() => {
                chars.next();
            }
            ';' => {
                tokens.push(Token::Semicolon);
                break; // the date follows; nothing after it matters
            }
            '(' => {
                chars.next();
                let mut depth = 1;
                let mut text = String::new();
                loop {
                    match chars.next() {
                        None => return Err(ReceivedError::Malformed("unbalanced parentheses")),
                        Some('\\') => {
                            if let Some(n) = chars.next() {
                                text.push(n);
                            }
                        }
                        Some('(') => {
                            depth += 1;
                            text.push('(');
                        }
                        Some(')') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                            text.push(')');
                        }
                        Some(o) => text.push(o),
                    }
                }
                tokens.push(Token::Comment(text));
            }
            ')' => return Err(ReceivedError::Malformed("unbalanced parentheses")),
            _ => {
                let mut word = String::new();
                while let Some(&n) = chars.peek() {
                    if n.is_ascii_whitespace() || n == '(' || n == ')' || n == ';' {
                        break;
                    }
                    word.push(n);
                    chars.next();
                }
                tokens.push(Token::Word(word));
            }
        }
    }
    Ok(tokens)
}

#[derive(Debug, Default)]
struct Clause {
    keyword: String,
    value: Option<String>,
    comments: Vec<String>,
}

const KEYWORDS: [&str; 6] = ["from", "by", "via", "with", "id", "for"];

fn clauses(tokens: Vec<Token>) -> Vec<Clause> {
    let mut out: Vec<Clause> = Vec::new();
    for t in tokens {
        match t {
            Token::Word(w) => {
                let lw = w.to_ascii_lowercase();
                let expecting_value = out.last().is_some_and(|c| c.value.is_none());
                if !expecting_value && KEYWORDS.contains(&lw.as_str()) {
                    out.push(Clause {
                        keyword: lw,
                        ..Default::default()
                    });
                } else if let Some(c) = out.last_mut().filter(|c| c.value.is_none()) {
                    c.value = Some(w);
                } else {
                    // A stray word: keep it as its own clause so that it can never be mistaken
                    // for part of a trusted one.
                    out.push(Clause {
                        keyword: String::new(),
                        value: Some(w),
                        ..Default::default()
                    });
                }
            }
            Token::Comment(c) => match out.last_mut() {
                Some(cl) => cl.comments.push(c),
                None => out.push(Clause {
                    comments: vec![c],
                    ..Default::default()
                }),
            },
            Token::Semicolon => break,
        }
    }
    out
}

fn authenticated_note(comment: &str) -> Option<&str> {
    const PREFIX: &str = "authenticated sender:";
    let c = comment.trim();
    // `get`, not indexing: the comment is arbitrary UTF-8, and byte 21 may fall inside a
    // character (found by the `handle` fuzz target).
    match c.get(..PREFIX.len()) {
        Some(head) if head.eq_ignore_ascii_case(PREFIX) => Some(c[PREFIX.len()..].trim()),
        _ => None,
    }
}

/// Extracts the SASL login from the topmost `Received:` header value (unfolded or folded),
/// following the rules of this module's documentation.
pub fn authenticated_login(
    topmost_received: &str,
    trusted_mta_hosts: &[String],
) -> Result<String, ReceivedError> {
    if topmost_received.len() > MAX_RECEIVED_LEN {
        return Err(ReceivedError::Malformed("too long"));
    }
    let clauses = clauses(tokenize(topmost_received)?);
    let by: Vec<&Clause> = clauses.iter().filter(|c| c.keyword == "by").collect();
    let [by] = by.as_slice() else {
        return Err(ReceivedError::Malformed("expected exactly one 'by' clause"));
    };
    let host = by
        .value
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('.')
        .to_ascii_lowercase();
    if !trusted_mta_hosts
        .iter()
        .any(|t| t.trim_end_matches('.').eq_ignore_ascii_case(&host))
    {
        return Err(ReceivedError::UntrustedHost(host));
    }
    let with: Vec<&Clause> = clauses.iter().filter(|c| c.keyword == "with").collect();
    let proto = match with.as_slice() {
        [w] => w.value.clone().unwrap_or_default(),
        _ => String::new(),
    };
    if !AUTHENTICATED_PROTOCOLS
        .iter()
        .any(|p| p.eq_ignore_ascii_case(&proto))
    {
        return Err(ReceivedError::NotAuthenticated(proto));
    }
    let notes: Vec<(&Clause, &str)> = clauses
        .iter()
        .flat_map(|c| {
            c.comments
                .iter()
                .filter_map(move |m| authenticated_note(m).map(|n| (c, n)))
        })
        .collect();
    match notes.as_slice() {
        [] => Err(ReceivedError::NoSender),
        [(clause, login)] if clause.keyword == "from" && !login.is_empty() => {
            // The note must be the last comment before `by`.
            if clause
                .comments
                .last()
                .and_then(|c| authenticated_note(c))
                .is_some_and(|n| n == *login)
                && clauses
                    .iter()
                    .position(|c| std::ptr::eq(c, *clause))
                    .and_then(|i| clauses.get(i + 1))
                    .is_some_and(|next| next.keyword == "by")
            {
                Ok(login.to_string())
            } else {
                Err(ReceivedError::Ambiguous)
            }
        }
        _ => Err(ReceivedError::Ambiguous),
    }
}

/// What the per-IP rate limit counts when the topmost `Received:` header is the provider's but
/// names no client IP kst can read (e.g. a HELO name that unbalances its parentheses).
pub const UNREADABLE_SOURCE: &str = "unreadable";

/// The client IP that the provider's MTA recorded in the topmost `Received:` header (Postfix
/// and Sendmail style: `from HELO (RDNS [IP]) by HOST ...`), for the per-IP rate limit.
///
/// `None` when the header is missing or names no trusted host in its `by` clause. When the
/// header is trusted but holds no readable IP, or cannot be parsed at all, the result is
/// [`UNREADABLE_SOURCE`], so that odd headers share one counter instead of escaping the limit.
///
/// The MTA's own clause is found as the words `by HOST` (adjacent, `HOST` one of
/// `trusted_mta_hosts`) and must occur exactly once; the IP is the last bracketed one among the
/// comments right before it, which the MTA writes after the client-chosen HELO. A HELO such as `x(y)by` therefore cannot
/// take the `by` clause over, and a header with two candidate clauses (a HELO or recipient
/// that imitates one) counts as unreadable.
pub fn source_ip(topmost_received: &str, trusted_mta_hosts: &[String]) -> Option<String> {
    let trusted = |host: &str| {
        let host = host.trim_end_matches('.');
        trusted_mta_hosts
            .iter()
            .any(|t| t.trim_end_matches('.').eq_ignore_ascii_case(host))
    };
    let by_trusted = |pair: &[Token]| matches!(pair, [Token::Word(b), Token::Word(h)] if b.eq_ignore_ascii_case("by") && trusted(h));
    let unreadable = || Some(UNREADABLE_SOURCE.to_string());
    if topmost_received.len() > MAX_RECEIVED_LEN {
        return unreadable();
    }
    let Ok(tokens) = tokenize(topmost_received) else {
        // Unbalanced (a hostile HELO): whoever wrote it, never an escape.
        return unreadable();
    };
    let found: Vec<usize> = tokens
        .windows(2)
        .enumerate()
        .filter(|(_, pair)| by_trusted(pair))
        .map(|(i, _)| i)
        .collect();
    match found.as_slice() {
        [] => {
            // No `by HOST` pair with a trusted host: `None` only for a header that plainly is
            // somebody else's (one `by` clause, naming an untrusted host); anything odder shares
            // the unreadable counter.
            let clauses = clauses(tokens);
            match clauses
                .iter()
                .filter(|c| c.keyword == "by")
                .collect::<Vec<_>>()
                .as_slice()
            {
                [by] if !by.value.as_deref().is_some_and(trusted) => None,
                _ => unreadable(),
            }
        }
        [i] => {
            // Postfix and Sendmail write `from HELO (RDNS [IP])` on the first line and their
            // notes (TLS, `(Client CN "...", Issuer "..." (not verified))`, authenticated
            // sender) on the lines after it. A client certificate's CN and issuer are the
            // client's text, may hold parentheses and brackets, and can make a comment of
            // their own that ends in `[IP]`: so in a folded header the IP is read from the
            // first line only.
            let ip = match topmost_received.split_once(['\r', '\n']) {
                Some((first, _)) => match tokenize(first) {
                    Ok(first) => {
                        let end = first.windows(2).position(by_trusted).unwrap_or(first.len());
                        last_bracketed_ip(&first[..end])
                    }
                    Err(_) => None,
                },
                None => last_bracketed_ip(&tokens[..*i]),
            };
            Some(ip.map_or_else(|| UNREADABLE_SOURCE.into(), |ip| ip.to_string()))
        }
        _ => unreadable(),
    }
}

/// The IP of the comments at the end of `tokens`, last first (the authenticated-sender note
/// may follow the `(rdns [ip])` comment).
fn last_bracketed_ip(tokens: &[Token]) -> Option<std::net::IpAddr> {
    tokens
        .iter()
        .rev()
        .map_while(|t| match t {
            Token::Comment(c) => Some(c),
            _ => None,
        })
        .find_map(|c| bracketed_ip(c))
}

/// The IP of a comment that ends in `[IP]` or `[IPv6:IP]`.
fn bracketed_ip(comment: &str) -> Option<std::net::IpAddr> {
    let inner = comment.trim().strip_suffix(']')?;
    let (_, literal) = inner.rsplit_once('[')?;
    let literal = literal
        .strip_prefix("IPv6:")
        .or_else(|| literal.strip_prefix("ipv6:"))
        .unwrap_or(literal);
    literal.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> Vec<String> {
        vec!["mail.example.net".into(), "example.net".into()]
    }

    const PAPER: &str = "from [10.0.0.1] (unknown [12.80.3.21])\r\n\t(Authenticated sender: alice@example.net)\r\n\tby example.net (Postfix) with ESMTPSA id 53F3A161B01\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100 (AT)";

    /// Found by the `handle` fuzz target: a comment whose byte 21 (the length of
    /// "authenticated sender:") falls inside a multi-byte character panicked on a slice.
    #[test]
    fn comment_with_multibyte_character_at_the_prefix_length() {
        // The fuzzer's comment: "uknnown [12.0" then U+FFFD three times (bytes 13..22).
        let value = "](uknnown [12.0\u{FFFD}\u{FFFD}\u{FFFD}@t)\n\tby mail.example.net with ESMTPA";
        assert_eq!(&value.as_bytes()[15..18], b"\xEF\xBF\xBD");
        assert!(authenticated_login(value, &trusted()).is_err());
        // 20 ASCII bytes then a 2-byte character across byte 21, and the real note after it.
        let value = "from x (aaaaaaaaaaaaaaaaaaaa\u{e9}) (Authenticated sender: alice@example.net)\r\n\tby mail.example.net (Postfix) with ESMTPSA id 1";
        assert_eq!(
            authenticated_login(value, &trusted()).unwrap(),
            "alice@example.net"
        );
        assert_eq!(authenticated_note("aaaaaaaaaaaaaaaaaaaa\u{e9}"), None);
    }

    #[test]
    fn paper_figure_3_header_is_trusted() {
        assert_eq!(
            authenticated_login(PAPER, &trusted()).unwrap(),
            "alice@example.net"
        );
    }

    #[test]
    fn trailing_dot_and_case_in_host_are_fine() {
        let h = PAPER.replace("by example.net", "by Example.NET.");
        assert_eq!(
            authenticated_login(&h, &trusted()).unwrap(),
            "alice@example.net"
        );
    }

    #[test]
    fn untrusted_or_lookalike_host_is_refused() {
        for host in [
            "evil.example",
            "example.net.evil.example",
            "xample.net",
            "example.nett",
        ] {
            let h = PAPER.replace("by example.net", &format!("by {host}"));
            assert!(
                matches!(
                    authenticated_login(&h, &trusted()),
                    Err(ReceivedError::UntrustedHost(_))
                ),
                "{host}"
            );
        }
    }

    #[test]
    fn unauthenticated_protocol_is_refused() {
        for p in ["ESMTP", "ESMTPS", "SMTP", "LMTP", "ESMTPSAX"] {
            let h = PAPER.replace("with ESMTPSA", &format!("with {p}"));
            assert!(matches!(
                authenticated_login(&h, &trusted()),
                Err(ReceivedError::NotAuthenticated(_))
            ));
        }
    }

    #[test]
    fn helo_forgeries_are_refused() {
        // HELO "x(Authenticated" swallows the rest into an unbalanced comment.
        let h = "from x(Authenticated (unknown [1.2.3.4])\r\n\t(Authenticated sender: bob@example.net)\r\n\tby example.net (Postfix) with ESMTPSA id 1";
        assert!(authenticated_login(h, &trusted()).is_err());
        // bob authenticated, HELO tries to add alice's note before his own.
        let h = "from a (Authenticated sender: alice@example.net) (unknown [1.2.3.4])\r\n\t(Authenticated sender: bob@example.net)\r\n\tby example.net (Postfix) with ESMTPSA id 1";
        assert_eq!(
            authenticated_login(h, &trusted()),
            Err(ReceivedError::Ambiguous)
        );
        // Unauthenticated client whose HELO imitates the whole trusted clause.
        let h = "from example.net (Authenticated sender: alice@example.net) by example.net with ESMTPSA (unknown [1.2.3.4])\r\n\tby mx.evil.example (Postfix) with ESMTP id 1";
        assert!(authenticated_login(h, &trusted()).is_err());
    }

    #[test]
    fn note_outside_the_from_clause_is_refused() {
        let h = "from [10.0.0.1] (unknown [12.80.3.21])\r\n\tby example.net (Postfix) (Authenticated sender: alice@example.net) with ESMTPSA id 1";
        assert_eq!(
            authenticated_login(h, &trusted()),
            Err(ReceivedError::Ambiguous)
        );
        let h = "from [10.0.0.1] (unknown [12.80.3.21])\r\n\tby example.net (Postfix) with ESMTPSA id 1 for <keys@example.net> (Authenticated sender: alice@example.net)";
        assert_eq!(
            authenticated_login(h, &trusted()),
            Err(ReceivedError::Ambiguous)
        );
    }

    #[test]
    fn missing_note_is_refused() {
        let h = "from [10.0.0.1] (unknown [12.80.3.21])\r\n\tby example.net (Postfix) with ESMTPSA id 1";
        assert_eq!(
            authenticated_login(h, &trusted()),
            Err(ReceivedError::NoSender)
        );
    }

    #[test]
    fn oversized_header_is_refused() {
        let h = format!("{PAPER} {}", "x".repeat(MAX_RECEIVED_LEN));
        assert!(authenticated_login(&h, &trusted()).is_err());
    }
    #[test]
    fn source_ip_is_the_mta_written_one() {
        let t = trusted();
        assert_eq!(source_ip(PAPER, &t).as_deref(), Some("12.80.3.21"));
        let h = "from mail-x.acme.net (mail-x.acme.net [IPv6:2001:db8::7])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\tby mail.example.net (Postfix) with ESMTPS id 1\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100";
        assert_eq!(source_ip(h, &t).as_deref(), Some("2001:db8::7"));
        // A HELO that carries its own bracketed address comes before the MTA's comment.
        let h = "from x(y[6.6.6.6]) (rdns [192.0.2.9])\r\n\tby mail.example.net (Postfix) with ESMTP id 1";
        assert_eq!(source_ip(h, &t).as_deref(), Some("192.0.2.9"));
        // The HELO literal itself is never used.
        let h = "from [6.6.6.6] (unknown)\r\n\tby mail.example.net (Postfix) with ESMTP id 1";
        assert_eq!(source_ip(h, &t).as_deref(), Some(UNREADABLE_SOURCE));
        // Unbalanced HELO: one shared counter, not an escape.
        let h = "from x( (rdns [192.0.2.9])\r\n\tby mail.example.net (Postfix) with ESMTP id 1";
        assert_eq!(source_ip(h, &t).as_deref(), Some(UNREADABLE_SOURCE));
        // Not the provider's header: no IP counter.
        let h = PAPER.replace("by example.net", "by mx.evil.example");
        assert_eq!(source_ip(&h, &t), None);
        // Not folded: the comments right before `by`.
        let h = "from x (rdns [192.0.2.9]) by mail.example.net (Postfix) with ESMTP id 1";
        assert_eq!(source_ip(h, &t).as_deref(), Some("192.0.2.9"));
    }

    /// Red team round 8 (held): a client certificate whose issuer writes an
    /// `(Authenticated sender: ...)` note of its own, on an authenticated submission by mallory
    /// (Postfix writes the real note after the certificate) or on an unauthenticated one, never
    /// yields the victim's login.
    #[test]
    fn a_client_certificate_cannot_write_the_authenticated_sender() {
        let t = trusted();
        for (issuer, with, note) in [
            (
                "a) (Authenticated sender: victim@example.net) (",
                "ESMTPSA",
                "\r\n\t(Authenticated sender: mallory@example.net)",
            ),
            (
                "a) (Authenticated sender: victim@example.net) ((",
                "ESMTPSA",
                "\r\n\t(Authenticated sender: mallory@example.net)",
            ),
            (
                "a) (Authenticated sender: victim@example.net) (",
                "ESMTPS",
                "",
            ),
            (
                "a) (Authenticated sender: victim@example.net",
                "ESMTPSA",
                "",
            ),
        ] {
            let h = format!(
                "from out.acme.net (out.acme.net [192.0.2.77])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n\t(Client CN \"c\", Issuer \"{issuer}\" (not verified)){note}\r\n\tby mail.example.net (Postfix) with {with} id 1\r\n\tfor <keys@example.net>; Sun, 4 Mar 2018 16:47:07 +0100"
            );
            let login = authenticated_login(&h, &t);
            assert!(
                login.as_deref() != Ok("victim@example.net"),
                "{issuer} {with}: {login:?}"
            );
        }
    }

    /// Red team round 8: with `smtpd_tls_ask_ccert = yes` and `smtpd_tls_received_header = yes`
    /// Postfix writes the client certificate's CN and issuer, the client's text, into a
    /// comment right before `by`. An issuer `a) ([198.51.100.77]) (` closed that comment early
    /// and made one of its own that ends in an IP of the client's choosing: a fresh per-source
    /// counter for every connection (and a self-signed certificate each). The IP now comes
    /// from the first line, where Postfix writes `(RDNS [IP])`.
    #[test]
    fn a_client_certificate_cannot_choose_the_source_ip() {
        let t = trusted();
        for issuer in [
            "a) ([198.51.100.77]) (",
            "[198.51.100.77]",
            "x\") ([198.51.100.77]",
        ] {
            let h = format!(
                "from mail.attacker.example (mail.attacker.example [203.0.113.5])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)\r\n\t(Client CN \"c\", Issuer \"{issuer}\" (not verified))\r\n\tby mail.example.net (Postfix) with ESMTPS id 4Q1\r\n\tfor <keys@example.net>; Sat, 5 Dec 2026 03:00:00 +0000 (UTC)"
            );
            let ip = source_ip(&h, &t);
            assert!(
                ip.as_deref() == Some("203.0.113.5") || ip.as_deref() == Some(UNREADABLE_SOURCE),
                "{issuer}: {ip:?}"
            );
            assert_ne!(ip.as_deref(), Some("198.51.100.77"), "{issuer}");
        }
        let h = "from mail.attacker.example (mail.attacker.example [203.0.113.5])\r\n\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)\r\n\t(Client CN \"c\", Issuer \"a) ([198.51.100.77]) (\" (not verified))\r\n\tby mail.example.net (Postfix) with ESMTPS id 4Q1";
        assert_eq!(source_ip(h, &t).as_deref(), Some("203.0.113.5"));
    }
}
