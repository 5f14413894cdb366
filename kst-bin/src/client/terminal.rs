//! Text from a key or a reply made safe for a terminal: a hostile key's User ID (or a forged
//! reply's explanation) could otherwise carry escape sequences that retitle the window, move
//! the cursor, hide text or reorder it (bidi overrides) on the user's screen.

use std::borrow::Cow;

// The characters escaped: the operator listings' set (crate::terminal::escapes: the unsafe
// ones and combining marks stacked on one letter), one definition for both.
use crate::terminal::escapes;

/// `text` with every character a terminal would act on written as `\u{..}` (ESC becomes
/// `\u{1b}`), newlines included: for one line of output built from key or reply content.
pub fn line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

/// [`line`], keeping newlines: for a block such as an armored key.
pub fn block(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

fn escape(text: &str, keep_newlines: bool) -> Cow<'_, str> {
    replace(text, keep_newlines, |c| {
        format!("\\u{{{:x}}}", u32::from(c))
    })
}

/// `text` with each character [`escapes`] marks (but newlines when `keep_newlines`) replaced
/// by `with(c)`; borrowed when there is none.
fn replace(text: &str, keep_newlines: bool, with: impl Fn(char) -> String) -> Cow<'_, str> {
    let bad = |(c, escaped): (char, bool)| escaped && !(keep_newlines && c == '\n');
    if !escapes(text).any(bad) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for (c, escaped) in escapes(text) {
        if bad((c, escaped)) {
            out.push_str(&with(c));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// JSON text (as `serde_json` writes it) with every character [`line`] escapes that is still
/// raw written as a JSON `\uXXXX` escape: the same JSON value, safe to print. `serde_json`
/// escapes C0 controls itself but writes DEL, C1 controls, bidi controls and invisible
/// characters raw. The characters replaced are never part of JSON syntax, so only string
/// contents change form (one `\uXXXX` each, a surrogate pair above U+FFFF).
pub fn json(text: &str) -> Cow<'_, str> {
    crate::terminal::json(text)
}

/// Prints `value` as pretty JSON on stdout, terminal-safe ([`json`]).
pub fn print_json<T: serde::Serialize + ?Sized>(value: &T, fallback: &str) {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| fallback.into());
    println!("{}", json(&text));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::terminal::is_unsafe;

    const HOSTILE: &str =
        "Alice\u{1b}]0;pwned\u{7}\u{202e}live\u{2066}\u{85}\r\n\u{7f}\u{9b}2J <alice@example.net>";

    #[test]
    fn controls_and_bidi_overrides_are_escaped() {
        let l = line(HOSTILE);
        assert!(!l.chars().any(is_unsafe), "{l}");
        assert_eq!(
            l,
            "Alice\\u{1b}]0;pwned\\u{7}\\u{202e}live\\u{2066}\\u{85}\\u{d}\\u{a}\\u{7f}\\u{9b}2J \
             <alice@example.net>"
        );
        assert!(matches!(
            line("Zoë Ångström <zoe@example.net>"),
            Cow::Borrowed(_)
        ));
        // Arabic and Hebrew names are not touched, only the control characters
        assert_eq!(line("شادي <s@example.net>"), "شادي <s@example.net>");
        let b = block("-----BEGIN\u{1b}[2J\nabc\n");
        assert_eq!(b, "-----BEGIN\\u{1b}[2J\nabc\n");
    }

    #[test]
    fn json_stays_the_same_value_without_raw_controls() {
        let v = serde_json::json!({ "user_ids": [HOSTILE], "n": 1 });
        let raw = serde_json::to_string_pretty(&v).unwrap();
        assert!(raw.chars().any(is_unsafe), "serde_json leaves some raw");
        let safe = json(&raw);
        assert!(!safe.chars().any(|c| is_unsafe(c) && c != '\n'), "{safe}");
        let back: serde_json::Value = serde_json::from_str(&safe).unwrap();
        assert_eq!(back, v);
    }
}
