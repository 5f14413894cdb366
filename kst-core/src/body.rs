//! Reading a request body: which of the two formats it is, and its parts.
//!
//! Accepted: exactly the paper's formats (Fig. 3: an armored public key block, then a line with
//! K_auth; Fig. 5: a line with the queried address, then a line with K_auth), with what real
//! clients put around them: CRLF or LF, blank lines, trailing spaces, quoted-printable or base64
//! transfer encoding, text/plain inside multipart/alternative, and a signature after `-- `.

use mail_parser::{Message, PartType};

use crate::protocol::{DELETE_COMMAND, PUBLIC_KEY_BEGIN, PUBLIC_KEY_END};

/// Lines that open a secret key block (current and legacy spellings).
const SECRET_KEY_BEGINS: [&str; 2] = [
    "-----BEGIN PGP PRIVATE KEY BLOCK-----",
    "-----BEGIN PGP SECRET KEY BLOCK-----",
];

/// Most non-blank lines a request body may have (a 1 MiB key block is about 17,000 lines).
pub const MAX_BODY_LINES: usize = 20_000;

/// What a request body holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestBody {
    /// A key block (armored text, LF line endings) and the K_auth line, if there was one.
    Publication {
        /// The armored block from BEGIN to END line inclusive.
        armored: String,
        /// The line after the block, unparsed.
        k_auth: Option<String>,
    },
    /// A secret key was sent.
    SecretKey {
        /// The line after the block, if it looks like K_auth (for an authenticated refusal).
        k_auth: Option<String>,
    },
    /// A query.
    Retrieval {
        /// The first line: the queried address, unparsed.
        query: String,
        /// The second line, unparsed.
        k_auth: String,
    },
    /// A deletion: `DELETE`, then K_auth.
    Deletion {
        /// The second line, unparsed.
        k_auth: String,
    },
    /// A Web Key Service key submission (`gpg-wks-client`), recognized by its MIME structure
    /// ([`crate::wks::recognize`]): the submission, or why it is not a usable one. Authenticated
    /// and checked like a [`RequestBody::Publication`], without K_auth.
    WksSubmission(Result<crate::wks::Submission, crate::wks::WksError>),
    /// Neither format.
    Unrecognized(&'static str),
}

/// The first text/plain body part of `message`, decoded. HTML-only mail yields `None`.
pub fn plain_text(message: &Message<'_>) -> Option<String> {
    message
        .text_body
        .iter()
        .find_map(|id| match &message.parts.get(*id as usize)?.body {
            PartType::Text(t) => Some(t.to_string()),
            _ => None,
        })
}

/// How deeply `message` nests multipart containers (a single-part message: 1). Walks the part
/// tree without recursion; a part id that points backwards or repeats ends the walk there.
pub fn mime_depth(message: &Message<'_>) -> usize {
    let mut deepest = 0;
    let mut stack: Vec<(usize, usize)> = vec![(0, 1)];
    let mut visited = vec![false; message.parts.len()];
    while let Some((id, depth)) = stack.pop() {
        let Some(part) = message.parts.get(id) else {
            continue;
        };
        if std::mem::replace(&mut visited[id], true) {
            continue;
        }
        deepest = deepest.max(depth);
        if let Some(children) = part.sub_parts() {
            stack.extend(children.iter().map(|c| (*c as usize, depth + 1)));
        }
    }
    deepest
}

/// Classifies a decoded text body.
pub fn classify(text: &str) -> RequestBody {
    let mut lines: Vec<&str> = Vec::new();
    for raw in text.split('\n') {
        let line = raw.trim_end_matches(['\r', ' ', '\t']);
        if line == "--" {
            break; // signature separator "-- "
        }
        if !line.trim().is_empty() {
            lines.push(line.trim_start_matches([' ', '\t']));
            if lines.len() > MAX_BODY_LINES {
                return RequestBody::Unrecognized("the body has too many lines");
            }
        }
    }
    if let Some(pos) = lines.iter().position(|l| SECRET_KEY_BEGINS.contains(l)) {
        let k_auth = lines[pos..]
            .iter()
            .position(|l| l.starts_with("-----END PGP"))
            .and_then(|end| lines.get(pos + end + 1))
            .map(|l| l.to_string());
        return RequestBody::SecretKey { k_auth };
    }
    if let Some(begin) = lines.iter().position(|l| *l == PUBLIC_KEY_BEGIN) {
        if begin != 0 {
            return RequestBody::Unrecognized("text before the key block");
        }
        let Some(end) = lines.iter().position(|l| *l == PUBLIC_KEY_END) else {
            return RequestBody::Unrecognized("the key block has no END line");
        };
        // Armor needs the blank line after the armor headers; rebuild it: headers are the
        // `Key: value` lines right after BEGIN.
        let mut armored = String::with_capacity(text.len());
        armored.push_str(PUBLIC_KEY_BEGIN);
        armored.push('\n');
        let inner = &lines[begin + 1..end];
        let headers = inner.iter().take_while(|l| is_armor_header(l)).count();
        for l in &inner[..headers] {
            armored.push_str(l);
            armored.push('\n');
        }
        armored.push('\n');
        for l in &inner[headers..] {
            armored.push_str(l);
            armored.push('\n');
        }
        armored.push_str(PUBLIC_KEY_END);
        armored.push('\n');
        let rest = &lines[end + 1..];
        return match rest {
            [] => RequestBody::Publication {
                armored,
                k_auth: None,
            },
            [k] => RequestBody::Publication {
                armored,
                k_auth: Some(k.to_string()),
            },
            _ => RequestBody::Unrecognized("more than one line after the key block"),
        };
    }
    match lines.as_slice() {
        [command, k_auth] if command.eq_ignore_ascii_case(DELETE_COMMAND) => {
            RequestBody::Deletion {
                k_auth: k_auth.to_string(),
            }
        }
        [query, k_auth] => RequestBody::Retrieval {
            query: query.to_string(),
            k_auth: k_auth.to_string(),
        },
        [] => RequestBody::Unrecognized("the body is empty"),
        _ => RequestBody::Unrecognized("neither a key block nor an address and K_auth"),
    }
}

/// An armor header line (`Comment: ...`, `Version: ...`); base64 lines never hold ": ".
fn is_armor_header(line: &str) -> bool {
    line.split_once(": ").is_some_and(|(k, _)| {
        !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: &str = "40Pe0/MY6VCZ/8TczgZemiLKP2rvbCwxXGhC7S2v80E=";

    #[test]
    fn retrieval_with_crlf_blank_lines_and_signature() {
        let body = format!(
            "\r\n  alice@example.net \r\n\r\n{K}\r\n\r\n-- \r\nBob\r\nhttps://acme.net\r\n"
        );
        assert_eq!(
            classify(&body),
            RequestBody::Retrieval {
                query: "alice@example.net".into(),
                k_auth: K.into()
            }
        );
    }

    #[test]
    fn publication_keeps_armor_headers_and_finds_k_auth() {
        let body = format!(
            "{PUBLIC_KEY_BEGIN}\nComment: test\n\nmQINBF\nAbCd\n=XyZ1\n{PUBLIC_KEY_END}\n{K}\n"
        );
        match classify(&body) {
            RequestBody::Publication { armored, k_auth } => {
                assert_eq!(k_auth.as_deref(), Some(K));
                assert_eq!(
                    armored,
                    format!(
                        "{PUBLIC_KEY_BEGIN}\nComment: test\n\nmQINBF\nAbCd\n=XyZ1\n{PUBLIC_KEY_END}\n"
                    )
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn publication_without_blank_line_after_begin_gets_one() {
        let body = format!("{PUBLIC_KEY_BEGIN}\nmQINBF\n{PUBLIC_KEY_END}\n");
        assert_eq!(
            classify(&body),
            RequestBody::Publication {
                armored: format!("{PUBLIC_KEY_BEGIN}\n\nmQINBF\n{PUBLIC_KEY_END}\n"),
                k_auth: None
            }
        );
    }

    #[test]
    fn deletion_is_recognized() {
        for cmd in ["DELETE", "delete", "  Delete  "] {
            assert_eq!(
                classify(&format!("{cmd}\r\n\r\n{K}\r\n-- \r\nAlice\r\n")),
                RequestBody::Deletion { k_auth: K.into() },
                "{cmd}"
            );
        }
        assert!(matches!(
            classify(&format!("DELETE\n{K}\nmore\n")),
            RequestBody::Unrecognized(_)
        ));
    }

    #[test]
    fn secret_key_is_recognized() {
        let body = format!(
            "-----BEGIN PGP PRIVATE KEY BLOCK-----\n\nlQ\n-----END PGP PRIVATE KEY BLOCK-----\n{K}\n"
        );
        assert_eq!(
            classify(&body),
            RequestBody::SecretKey {
                k_auth: Some(K.into())
            }
        );
    }

    #[test]
    fn other_shapes_are_unrecognized() {
        for body in [
            "",
            "\n\n",
            "one line",
            "a\nb\nc",
            &format!("Hi!\n{PUBLIC_KEY_BEGIN}\nx\n{PUBLIC_KEY_END}\n{K}"),
            &format!("{PUBLIC_KEY_BEGIN}\nx\n"),
            &format!("{PUBLIC_KEY_BEGIN}\nx\n{PUBLIC_KEY_END}\n{K}\nmore"),
        ] {
            assert!(
                matches!(classify(body), RequestBody::Unrecognized(_)),
                "{body:?}"
            );
        }
    }
}

#[cfg(test)]
mod properties {
    use mail_parser::MessageParser;
    use proptest::prelude::*;

    use super::*;

    /// Pieces that real and hostile request bodies are made of.
    fn piece() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(PUBLIC_KEY_BEGIN.to_string()),
            Just(PUBLIC_KEY_END.to_string()),
            Just(SECRET_KEY_BEGINS[0].to_string()),
            Just("-----END PGP PRIVATE KEY BLOCK-----".to_string()),
            Just("DELETE".to_string()),
            Just("-- ".to_string()),
            Just("Comment: x".to_string()),
            Just("alice@example.net".to_string()),
            Just("40Pe0/MY6VCZ/8TczgZemiLKP2rvbCwxXGhC7S2v80E=".to_string()),
            Just("Content-Type: multipart/mixed; boundary=b".to_string()),
            Just("--b".to_string()),
            Just("\r".to_string()),
            "[ -~]{0,40}",
            any::<String>(),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Classification never panics, and what it extracts comes from the input: a
        /// retrieval's or deletion's K_auth line and query are lines of the body; a publication's
        /// armored block starts and ends with the armor lines.
        #[test]
        fn classify_is_total_and_faithful(pieces in proptest::collection::vec(piece(), 0..24)) {
            let text = pieces.join("\n");
            match classify(&text) {
                RequestBody::Retrieval { query, k_auth } => {
                    prop_assert!(text.contains(query.as_str()) && text.contains(k_auth.as_str()));
                }
                RequestBody::Deletion { k_auth } => prop_assert!(text.contains(k_auth.as_str())),
                RequestBody::Publication { armored, .. } => {
                    let begin = format!("{PUBLIC_KEY_BEGIN}\n");
                    let end = format!("{PUBLIC_KEY_END}\n");
                    prop_assert!(armored.starts_with(&begin));
                    prop_assert!(armored.ends_with(&end));
                }
                RequestBody::SecretKey { .. }
                | RequestBody::WksSubmission(_)
                | RequestBody::Unrecognized(_) => {}
            }
        }

        /// Whole messages: parsing, the text part, the MIME depth and classification never panic,
        /// and the depth is at least 1 for any parsed message.
        #[test]
        fn message_body_pipeline_is_total(pieces in proptest::collection::vec(piece(), 0..32)) {
            let raw = pieces.join("\r\n");
            if let Some(msg) = MessageParser::default().parse(raw.as_bytes()) {
                prop_assert!(mime_depth(&msg) >= 1 || msg.parts.is_empty());
                if let Some(text) = plain_text(&msg) {
                    let _ = classify(&text);
                }
            }
        }

        /// The trust parsers never panic on arbitrary header values.
        #[test]
        fn header_parsers_are_total(value in "[ -~\t\r\n]{0,300}") {
            let trusted = vec!["mail.example.net".to_string()];
            let _ = crate::received::authenticated_login(&value, &trusted);
            let _ = crate::received::source_ip(&value, &trusted);
            let _ = crate::authres::vouch(Some(&value), "mail.example.net", "bob@acme.net", Some("bob@acme.net"));
        }
    }
}
