//! The reply HMACs of protocol version 1 (see `docs/PROTOCOL.md`, "Authentication").
//!
//! - A reply that carries a key (`published`, `found`): HMAC-SHA256(K_auth, K_pub), where K_pub
//!   is the binary OpenPGP packets of exactly the key the reply carries (the armor dearmored),
//!   so that transport re-wrapping or line-ending changes cannot break verification.
//! - A reply without a key (`not-found`, `refused`): HMAC-SHA256(K_auth, statement) over the
//!   ASCII statement `KST/1 <status> <reason or -> <address or ->`, so that "no key" cannot be
//!   forged to push a sender to plaintext.
//!
//! Version 2 names its algorithm and binds it into every HMAC: the key tag covers
//! `KST/2 hmac-sha256 ` followed by K_pub, and the statement reads
//! `KST/2 hmac-sha256 <status> <reason or -> <address or ->`. A tag of one version never
//! verifies as the other's.
//!
//! Version 3 has one input for every reply ([`v3_data`]):
//! `KST/3 hmac-sha256 <status> <reason or -> <address or -> <question> <answer>` LF K_pub,
//! where `<question>` is the hex SHA-256 of what the request asked
//! ([`crate::protocol::Question`]), `<answer>` the hex SHA-256 of the key directory's answer
//! the reply carries (`-` for a refusal, which carries none) and K_pub the key's packets
//! (nothing for a reply without a key). The proof cannot be swapped for another (its hash is
//! covered), a reply made for a copy of the request with another question does not verify,
//! and neither does a tag of version 1 or 2.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::kauth::AuthKey;
use crate::protocol::{MAC_HMAC_SHA256, PROTOCOL_VERSION, Question, Reason, Status};

type HmacSha256 = Hmac<Sha256>;

/// Length of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;

/// HMAC-SHA256(K_auth, data) as raw bytes.
pub fn hmac(k_auth: &AuthKey, data: &[u8]) -> [u8; TAG_LEN] {
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(k_auth.expose())
        .expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// The tag of a reply carrying `key_packets`, base64 as it appears in the reply.
pub fn key_tag(k_auth: &AuthKey, key_packets: &[u8]) -> String {
    STANDARD.encode(hmac(k_auth, key_packets))
}

/// What the key tag of protocol `version` covers: K_pub (version 1), or
/// `KST/2 hmac-sha256 ` followed by K_pub (version 2).
pub fn key_data(version: u32, key_packets: &[u8]) -> Vec<u8> {
    if version >= 2 {
        let mut data = format!("KST/{version} {MAC_HMAC_SHA256} ").into_bytes();
        data.extend_from_slice(key_packets);
        data
    } else {
        key_packets.to_vec()
    }
}

/// [`key_tag`] for protocol `version`.
pub fn key_tag_for(version: u32, k_auth: &AuthKey, key_packets: &[u8]) -> String {
    STANDARD.encode(hmac(k_auth, &key_data(version, key_packets)))
}

/// [`statement_with_token`] for protocol `version` (version 2 names the MAC algorithm).
pub fn statement_for(
    version: u32,
    status: Status,
    reason: Option<&str>,
    address: Option<&str>,
) -> String {
    if version >= 2 {
        format!(
            "KST/{version} {MAC_HMAC_SHA256} {} {} {}",
            status.as_str(),
            reason.unwrap_or("-"),
            address.unwrap_or("-")
        )
    } else {
        statement_with_token(status, reason, address)
    }
}

/// [`statement_tag`] for protocol `version`.
pub fn statement_tag_for(
    version: u32,
    k_auth: &AuthKey,
    status: Status,
    reason: Option<Reason>,
    address: Option<&str>,
) -> String {
    let text = statement_for(version, status, reason.map(Reason::as_str), address);
    STANDARD.encode(hmac(k_auth, text.as_bytes()))
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(Sha256::digest(bytes))
}

/// What a version 3 tag covers (every reply: with a key, K_pub is `key_packets`; without,
/// `key_packets` is empty): the statement
/// `KST/3 hmac-sha256 <status> <reason|-> <address|-> <question> <answer|->`, a line feed,
/// then K_pub. `question` is the request's [`Question`], `answer` the key directory's answer
/// text the reply carries (`None` for a refusal).
pub fn v3_data(
    status: Status,
    reason: Option<&str>,
    address: Option<&str>,
    question: &Question<'_>,
    answer: Option<&[u8]>,
    key_packets: &[u8],
) -> Vec<u8> {
    let mut data = format!(
        "KST/3 {MAC_HMAC_SHA256} {} {} {} {} {}\n",
        status.as_str(),
        reason.unwrap_or("-"),
        address.unwrap_or("-"),
        sha256_hex(question.text().as_bytes()),
        answer.map_or_else(|| "-".to_string(), sha256_hex)
    )
    .into_bytes();
    data.extend_from_slice(key_packets);
    data
}

/// The version 3 tag of [`v3_data`], base64.
pub fn v3_tag(k_auth: &AuthKey, data: &[u8]) -> String {
    STANDARD.encode(hmac(k_auth, data))
}

/// The statement a key-less reply authenticates: `KST/1 <status> <reason|-> <address|->`.
pub fn statement(status: Status, reason: Option<Reason>, address: Option<&str>) -> String {
    statement_with_token(status, reason.map(Reason::as_str), address)
}

/// [`statement`] with the reason as its wire token, which may be one this release does not
/// know (a newer KST's): the client authenticates the token it received, whatever it is.
pub fn statement_with_token(status: Status, reason: Option<&str>, address: Option<&str>) -> String {
    format!(
        "KST/{PROTOCOL_VERSION} {} {} {}",
        status.as_str(),
        reason.unwrap_or("-"),
        address.unwrap_or("-")
    )
}

/// True when `token` has the shape of a reason token: 1 to 64 characters of `a-z`, `0-9` and
/// `-`. Known or not, such a token goes into the statement as it is.
pub fn is_reason_token(token: &str) -> bool {
    (1..=64).contains(&token.len())
        && token
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The tag of a key-less reply, base64.
pub fn statement_tag(
    k_auth: &AuthKey,
    status: Status,
    reason: Option<Reason>,
    address: Option<&str>,
) -> String {
    STANDARD.encode(hmac(k_auth, statement(status, reason, address).as_bytes()))
}

/// Verifies a base64 tag in constant time. False for anything that is not a valid tag.
pub fn verify(k_auth: &AuthKey, data: &[u8], tag_b64: &str) -> bool {
    let Ok(tag) = STANDARD.decode(tag_b64.trim()) else {
        return false;
    };
    if tag.len() != TAG_LEN {
        return false;
    }
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(k_auth.expose())
        .expect("HMAC accepts keys of any length");
    mac.update(data);
    mac.verify_slice(&tag).is_ok()
}

/// True when `line` looks like a tag: 44 characters of base64 decoding to 32 bytes.
pub fn is_tag_line(line: &str) -> bool {
    let l = line.trim();
    l.len() == 44 && STANDARD.decode(l).is_ok_and(|b| b.len() == TAG_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors 6 to 8 of docs/PROTOCOL.md (computed with Python's `hmac` and `hashlib`).
    #[test]
    fn version_3_tags_bind_the_question_and_the_answer() {
        let k = AuthKey::from_bytes(std::array::from_fn(|i| i as u8));
        let packets = [0x99, 0x00, 0x01, 0x04];
        let answer = b"kst-log-answer-v1\n";
        let bob = Question::Retrieve("bob@example.net");
        let found = v3_data(
            Status::Found,
            None,
            Some("bob@example.net"),
            &bob,
            Some(answer),
            &packets,
        );
        let not_found = v3_data(
            Status::NotFound,
            None,
            Some("bob@example.net"),
            &bob,
            Some(answer),
            &[],
        );
        let refused = v3_data(
            Status::Refused,
            Some("bad-address"),
            None,
            &Question::Retrieve("not an address"),
            None,
            &[],
        );
        assert_eq!(
            String::from_utf8_lossy(&not_found),
            format!(
                "KST/3 hmac-sha256 not-found - bob@example.net {} {}\n",
                sha256_hex(b"retrieve bob@example.net"),
                sha256_hex(answer)
            )
        );
        assert_eq!(
            v3_tag(&k, &found),
            "rkLqZHUfLGuACnW16w8Wh4cKo0PDnpjBoY6oXbn0vU8="
        );
        assert_eq!(
            v3_tag(&k, &not_found),
            "gCr2PouI9N7O5+c6eEayMZnpETzGVnkWjTbYfK+YuB4="
        );
        assert_eq!(
            v3_tag(&k, &refused),
            "Y+dwb08NBBtGTUZynbFJvjRA+b+UtsMQbU3jT29UGms="
        );
        // Another answer, another question, or a version 2 tag: nothing verifies as version 3.
        let swapped = v3_data(
            Status::Found,
            None,
            Some("bob@example.net"),
            &bob,
            Some(b"kst-log-answer-v1\nother\n"),
            &packets,
        );
        assert!(!verify(&k, &swapped, &v3_tag(&k, &found)));
        let other = v3_data(
            Status::Found,
            None,
            Some("bob@example.net"),
            &Question::Retrieve("mallory@example.net"),
            Some(answer),
            &packets,
        );
        assert!(!verify(&k, &other, &v3_tag(&k, &found)));
        assert!(!verify(&k, &found, &key_tag_for(2, &k, &packets)));
        assert!(!verify(&k, &found, &key_tag(&k, &packets)));
        assert_ne!(Question::Publish.text(), Question::Delete.text());
    }

    #[test]
    fn version_2_tags_name_the_algorithm_and_differ_from_version_1() {
        let k = AuthKey::from_bytes(std::array::from_fn(|i| i as u8));
        let packets = [0x99, 0x00, 0x01, 0x04];
        assert_eq!(key_tag_for(1, &k, &packets), key_tag(&k, &packets));
        assert_ne!(key_tag_for(2, &k, &packets), key_tag(&k, &packets));
        assert!(verify(
            &k,
            &key_data(2, &packets),
            &key_tag_for(2, &k, &packets)
        ));
        assert_eq!(
            statement_for(2, Status::NotFound, None, Some("bob@example.net")),
            "KST/2 hmac-sha256 not-found - bob@example.net"
        );
        // Test vectors 4 and 5 of docs/PROTOCOL.md (Python's `hmac` module).
        assert_eq!(
            key_tag_for(2, &k, &packets),
            "zqIjGTUme2Q9STf/Js74i4LrpWPRhHDs3fBYQN3cyBs="
        );
        assert_eq!(
            statement_tag_for(2, &k, Status::NotFound, None, Some("bob@example.net")),
            "g1xtbDwjzOaB/GJZR4W+415bLQ6a84jU8WEy/krYlq0="
        );
        assert_eq!(
            statement_for(1, Status::NotFound, None, Some("bob@example.net")),
            statement(Status::NotFound, None, Some("bob@example.net"))
        );
    }

    /// Test vector 1 of docs/PROTOCOL.md, computed independently with Python's `hmac` module:
    /// K_auth = 0x00..0x1f, K_pub = bytes 0x99 0x00 0x01 0x04 ("a minimal packet header").
    #[test]
    fn vector_key_tag() {
        let k = AuthKey::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(
            key_tag(&k, &[0x99, 0x00, 0x01, 0x04]),
            include_str!("../testdata/vector1.tag").trim()
        );
    }

    /// Test vector 2: the not-found statement for bob@example.net with the same K_auth.
    #[test]
    fn vector_statement_tag() {
        let k = AuthKey::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(
            statement(Status::NotFound, None, Some("bob@example.net")),
            "KST/1 not-found - bob@example.net"
        );
        assert_eq!(
            statement_tag(&k, Status::NotFound, None, Some("bob@example.net")),
            include_str!("../testdata/vector2.tag").trim()
        );
    }

    /// Test vector 3: the deleted statement for alice@example.net with the same K_auth.
    #[test]
    fn vector_deleted_statement_tag() {
        let k = AuthKey::from_bytes(std::array::from_fn(|i| i as u8));
        assert_eq!(
            statement(Status::Deleted, None, Some("alice@example.net")),
            "KST/1 deleted - alice@example.net"
        );
        assert_eq!(
            statement_tag(&k, Status::Deleted, None, Some("alice@example.net")),
            include_str!("../testdata/vector3.tag").trim()
        );
    }

    #[test]
    fn verify_accepts_own_tag_and_rejects_tampering() {
        let k = AuthKey::generate();
        let tag = key_tag(&k, b"key");
        assert!(verify(&k, b"key", &tag));
        assert!(!verify(&k, b"kez", &tag));
        assert!(!verify(&AuthKey::generate(), b"key", &tag));
        assert!(!verify(&k, b"key", "not base64!"));
        assert!(!verify(&k, b"key", &STANDARD.encode([0u8; 31])));
        assert!(is_tag_line(&tag));
        assert!(!is_tag_line("hello"));
    }
}
