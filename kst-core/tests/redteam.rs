//! Attacks on issue 13's counters, address forms, `Received:` reading and the
//! Authentication-Results gate, through kst-core's public functions. A passing test documents
//! a defence that holds; an `#[ignore = "BUG: ..."]` test reproduces a weakness still open.

use kst_core::AddressPolicy;
use kst_core::authres::{self, Vouch};
use kst_core::ratelimit::{RecipientFolding, recipient_counter, source_counter};
use kst_core::received::{UNREADABLE_SOURCE, authenticated_login, source_ip};

fn trusted() -> Vec<String> {
    vec!["mail.example.net".into()]
}

/// What Postfix writes for an unauthenticated client that said `HELO {helo}` from `ip`.
fn postfix_received(helo: &str, ip: &str) -> String {
    format!(
        "from {helo} (unknown [{ip}])\r\n\tby mail.example.net (Postfix) with ESMTP id 53F3A161B01\r\n\tfor <keys@example.net>; Thu, 3 Dec 2026 13:00:00 +0000 (UTC)"
    )
}

fn received_as(sender: &str) -> String {
    AddressPolicy::default()
        .as_received(sender)
        .unwrap()
        .to_string()
}

fn counter(sender: &str) -> String {
    recipient_counter(
        &AddressPolicy::default().as_received(sender).unwrap(),
        &RecipientFolding::default(),
    )
}

#[test]
fn client_chosen_helo_cannot_pick_the_counted_source_ip() {
    // HELO words with brackets and comments: the MTA's own `(rdns [ip])` comes last.
    for helo in ["[6.6.6.6]", "x([6.6.6.6])", "IPv6:[::1]"] {
        assert_eq!(
            source_ip(&postfix_received(helo, "192.0.2.10"), &trusted()).as_deref(),
            Some("192.0.2.10"),
            "HELO {helo}"
        );
    }
    // A HELO that starts with a comment: the MTA's own `by HOST` is still found, and the IP is
    // the MTA's comment right before it, never the HELO's address.
    assert_eq!(
        source_ip(
            &postfix_received("(unknown[6.6.6.6])", "192.0.2.10"),
            &trusted()
        )
        .as_deref(),
        Some("192.0.2.10")
    );
    // An unbalanced HELO shares the one "unreadable" counter instead of escaping.
    assert_eq!(
        source_ip(&postfix_received("x(", "192.0.2.10"), &trusted()).as_deref(),
        Some(UNREADABLE_SOURCE)
    );
}

/// A HELO such as `x(y)by` (one word, no space, accepted by a default Postfix) turns into a
/// `by` clause of its own; Postfix's real `by mail.example.net` then becomes its value, the one
/// `by` clause names host "by", which is not trusted, and `source_ip` returns `None`: the
/// request is counted on no source at all (service::over_limit skips the source counter), so
/// one host can spray unlimited forged victims at 60 replies each per hour.
#[test]
fn helo_with_a_comment_and_by_cannot_escape_the_source_counter() {
    let got = source_ip(&postfix_received("x(y)by", "192.0.2.10"), &trusted());
    assert_eq!(got.as_deref(), Some("192.0.2.10"));
}

/// Header whitespace is ASCII only (RFC 5322 FWS): a HELO written with U+00A0 NO-BREAK SPACE
/// stays one word and cannot add a `by HOST` pair of its own.
#[test]
fn unicode_spaces_in_a_helo_do_not_split_it() {
    for helo in [
        "x\u{a0}by\u{a0}mail.example.net",
        "x\u{2003}by\u{2003}mail.example.net\u{2003}(unknown\u{2003}[6.6.6.6])",
    ] {
        assert_eq!(
            source_ip(&postfix_received(helo, "192.0.2.10"), &trusted()).as_deref(),
            Some("192.0.2.10"),
            "HELO {helo:?}"
        );
    }
}

#[test]
fn helo_cannot_forge_an_authenticated_sender() {
    // No space is possible in a HELO word, and the note must be the from clause's last comment.
    for helo in [
        "x(Authenticated\u{a0}sender:alice@example.net)",
        "(Authenticated)sender:alice@example.net",
        "x(y)by",
    ] {
        assert!(
            authenticated_login(&postfix_received(helo, "192.0.2.10"), &trusted()).is_err(),
            "{helo}"
        );
    }
    // A forged authenticated Received below the MTA's own is never read: the caller passes the
    // topmost one, and that one (unauthenticated ESMTP) yields nothing.
    assert!(authenticated_login(&postfix_received("x", "192.0.2.10"), &trusted()).is_err());
}

#[test]
fn ipv4_mapped_and_ipv6_neighbours_share_the_source_counter() {
    assert_eq!(
        source_counter("::ffff:192.0.2.7"),
        source_counter("192.0.2.7")
    );
    assert_eq!(
        source_counter("2001:db8:1:2::1"),
        source_counter("2001:db8:1:2:ffff:ffff:ffff:ffff")
    );
    assert_ne!(
        source_counter("2001:db8:1:2::1"),
        source_counter("2001:db8:1:3::1")
    );
    // Written differently, the same /64.
    assert_eq!(
        source_counter("2001:0DB8:0001:0002:0:0:0:1"),
        source_counter("2001:db8:1:2::1")
    );
}

#[test]
fn variants_of_one_mailbox_share_one_reply_counter() {
    let base = counter("victim@freemail.example");
    for v in [
        "VICTIM@freemail.example",
        "Victim+1@freemail.example",
        "victim@FREEMAIL.EXAMPLE",
        "<victim@freemail.example>",
        "victim@ｆｒｅｅｍａｉｌ.example", // fullwidth: IDNA maps it to ASCII
        "victim@freemail\u{3002}example",  // ideographic full stop: IDNA maps it to '.'
    ] {
        assert_eq!(counter(v), base, "{v}");
    }
}

/// Many sites deliver `victim-anything@` to `victim@` (Postfix `recipient_delimiter = -` or
/// `+-`, qmail). Where the operator lists the domain's separator (`[limits.recipient_folding]
/// separators`; Yahoo's `-` by default), every `-` variant shares the victim's one budget.
/// For a domain not listed, each variant has its own budget and only the per-source cap
/// bounds the backscatter (docs/SECURITY.md states the numbers).
#[test]
fn dash_variants_share_the_reply_counter_where_the_domain_uses_dashes() {
    let mut folding = RecipientFolding::default();
    folding
        .separators
        .insert("freemail.example".into(), "-".into());
    let c =
        |a: &str| recipient_counter(&AddressPolicy::default().as_received(a).unwrap(), &folding);
    assert_eq!(
        c("victim-1@freemail.example"),
        c("victim-2@freemail.example")
    );
    assert_eq!(
        c("Victim-x+y@freemail.example"),
        c("victim@freemail.example")
    );
    assert_eq!(counter("victim-1@yahoo.com"), counter("victim-2@yahoo.com"));
    // Unlisted: the variants are kept apart (someone's `anne-marie@` is not `anne@`).
    assert_ne!(
        counter("victim-1@freemail.example"),
        counter("victim-2@freemail.example")
    );
}

#[test]
fn forged_sender_forms_are_refused_or_kept_as_written() {
    let p = AddressPolicy::default();
    for bad in [
        "\"victim\"@freemail.example",
        "victim@freemail.example (comment)",
        "Victim <victim@freemail.example>",
        "<@relay.example:victim@freemail.example>",
        "victim@freemail.example.",
        "victim@[192.0.2.1]",
        "victim@freemail",
        "vic tim@freemail.example",
        "victim@freemail.example\r\nBcc: x@y.example",
        "< >",
        "<>",
        "",
    ] {
        assert!(p.as_received(bad).is_err(), "{bad:?} accepted");
    }
    // Separators are never cut from other domains' addresses (issue 13 item 6).
    let dash = AddressPolicy {
        subaddress_separator: Some('-'),
        ..Default::default()
    };
    assert_eq!(
        dash.as_received("john-smith@partner.example")
            .unwrap()
            .as_str(),
        "john-smith@partner.example"
    );
    // The local part is kept as written; only the domain is folded.
    assert_eq!(
        received_as("John.Smith@Partner.Example"),
        "John.Smith@partner.example"
    );
}

#[test]
fn confusable_logins_never_merge_with_ascii_ones() {
    let opt_in = AddressPolicy {
        unicode_local_parts: true,
        ..Default::default()
    };
    for login in [
        "\u{212A}arl@example.net",  // KELVIN SIGN
        "k\u{0430}rl@example.net",  // Cyrillic a: refused by default
        "karl\u{200B}@example.net", // zero-width space
        "\u{FF4B}arl@example.net",  // fullwidth k
    ] {
        assert!(
            AddressPolicy::default().normalize(login).is_err(),
            "{login}"
        );
        if let Ok(a) = opt_in.normalize(login) {
            assert_ne!(a.as_str(), "karl@example.net", "{login}");
        }
    }
}

const SENDER: &str = "victim@freemail.example";

fn ar(results: &str) -> String {
    format!("mx.example.net; {results}")
}

#[test]
fn gate_wants_an_aligned_dkim_pass_for_the_senders_own_from() {
    let pass = ar("dkim=pass header.d=freemail.example header.i=@freemail.example");
    assert_eq!(
        authres::vouch(Some(&pass), "mx.example.net", SENDER, Some(SENDER)),
        Ok(Vouch::Mailbox)
    );
    // Replayed message signed for another user of the same domain.
    assert_eq!(
        authres::vouch(
            Some(&pass),
            "mx.example.net",
            SENDER,
            Some("mallory@freemail.example")
        ),
        Ok(Vouch::Domain)
    );
    // header.i names another mailbox.
    let other_i = ar("dkim=pass header.d=freemail.example header.i=mallory@freemail.example");
    assert_eq!(
        authres::vouch(Some(&other_i), "mx.example.net", SENDER, Some(SENDER)),
        Ok(Vouch::Domain)
    );
    // A sibling or a child domain does not align.
    for d in [
        "evilfreemail.example",
        "x.freemail.example",
        "freemail.example.evil",
    ] {
        let v = ar(&format!("dkim=pass header.d={d}"));
        assert_ne!(
            authres::vouch(Some(&v), "mx.example.net", SENDER, Some(SENDER)),
            Ok(Vouch::Mailbox),
            "{d}"
        );
    }
    // No From (several From headers) or a failing signature.
    assert_ne!(
        authres::vouch(Some(&pass), "mx.example.net", SENDER, None),
        Ok(Vouch::Mailbox)
    );
    let fail =
        ar("dkim=fail header.d=freemail.example; spf=pass smtp.mailfrom=victim@freemail.example");
    assert!(authres::check(Some(&fail), "mx.example.net", SENDER, Some(SENDER)).is_err());
    // A header with another authserv-id, or a look-alike one.
    for id in [
        "mx.example.net.evil",
        "mx.examp1e.net",
        "\"mx.example.net\"x",
    ] {
        let forged = format!("{id}; dkim=pass header.d=freemail.example");
        assert!(
            authres::check(Some(&forged), "mx.example.net", SENDER, Some(SENDER)).is_err(),
            "{id}"
        );
    }
    // A pass smuggled in a comment or quoted string.
    for tricky in [
        "spf=fail (dkim=pass header.d=freemail.example) smtp.mailfrom=victim@freemail.example",
        "spf=fail reason=\"x; dkim=pass header.d=freemail.example\"",
    ] {
        assert!(
            authres::check(Some(&ar(tricky)), "mx.example.net", SENDER, Some(SENDER)).is_err(),
            "{tricky}"
        );
    }
}

/// `aligned` accepts any parent domain as signer, down to a single label: a pass for `d=com`
/// (or a public suffix such as `co.uk`) vouches for every mailbox under it. DMARC aligns on the
/// organizational domain (Public Suffix List), never on a suffix.
#[test]
fn a_signature_of_a_top_level_domain_vouches_for_nobody() {
    for d in ["example", "com"] {
        let v = ar(&format!("dkim=pass header.d={d}"));
        let sender = format!("victim@freemail.{d}");
        assert_ne!(
            authres::vouch(Some(&v), "mx.example.net", &sender, Some(&sender)),
            Ok(Vouch::Mailbox),
            "d={d}"
        );
    }
}

/// Most providers (Outlook, Yahoo, most corporate servers) treat `john.smith@` and
/// `johnsmith@` as two people. Dots are ignored only for the domains that ignore them
/// (`dot_insensitive_domains`, Gmail by default), so a user vouched for as
/// `john.smith@outlook.example` cannot use up `johnsmith@`'s reply budget.
#[test]
fn distinct_people_do_not_share_a_reply_counter() {
    assert_ne!(
        counter("john.smith@outlook.example"),
        counter("johnsmith@outlook.example")
    );
    assert_eq!(
        counter("john.smith@gmail.com"),
        counter("johnsmith@gmail.com")
    );
}
