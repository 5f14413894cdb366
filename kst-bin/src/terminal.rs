//! Terminal-safe text: stored strings (User IDs, addresses) escaped before they reach an
//! operator's terminal.
//!
//! What kst stores comes from mail: a User ID is whatever the key holder wrote, and an
//! internationalized address may hold any character that is not a control or a space. Printed
//! as it is, such text can drive the operator's terminal: ESC sequences set the window title,
//! clear the screen or (on some terminals) write to files; a CR rewrites the line shown;
//! Unicode bidirectional overrides make `evil` read as `live`. Every operator listing that
//! prints stored data passes it through [`safe`] (text) or [`json`] (JSON output).
//!
//! Escaped ([`is_unsafe`]): C0 controls (tab and newline too: each printed value is one line),
//! DEL, C1 controls, the Unicode bidirectional formatting characters (Bidi_Control: ALM, LRM,
//! RLM, the embeddings and overrides U+202A to U+202E, the isolates U+2066 to U+2069) and the
//! line and paragraph separators U+2028, U+2029, and the invisible characters
//! ([`is_invisible`]: every Unicode format character, general category Cf, and every default
//! ignorable code point), which print nothing or change how the character before them looks,
//! so that one User ID or address could look exactly like another in a listing: the zero
//! width space, joiners and non-joiners U+200B to U+200D, the soft hyphen U+00AD, the byte
//! order mark U+FEFF, the word joiner and invisible operators U+2060 to U+2064, the tag
//! characters U+E0000 to U+E007F, the variation selectors (U+FE00 to U+FE0F, U+E0100 to
//! U+E01EF, the Mongolian ones) and the Hangul fillers. The cost: an emoji's presentation
//! selector (U+FE0F) or a joined emoji sequence is shown as escapes too; a listing is for
//! telling stored values apart, not for rendering them.
//!
//! Escaped too, by position ([`escapes`]): combining marks (Unicode general category Mn,
//! nonspacing, or Me, enclosing) stacked on one character past the [`MAX_MARKS`]th. A
//! letter with dozens of marks ("Zalgo" text) is drawn by some terminals over the lines
//! above and below it, hiding part of a neighbouring line (an `ATTACK` report, another User
//! ID). Two marks on one letter are written as they are: Vietnamese stacks two (ệ, ẫ as
//! decomposed text), as do most scripts that use marks at all (Thai vowel and tone, Hebrew
//! dagesh and vowel, Devanagari nukta and virama); a third and every one after it is an
//! escape, also in JSON (the same value). Fully pointed Hebrew with cantillation, or stacked
//! Tibetan, shows a few escapes: a listing is for telling stored values apart. A spacing mark
//! (Mc, as a Devanagari vowel sign) takes a cell of its own and ends the stack.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

/// Whether `c` must not reach a terminal as it is (see the [module documentation](self)).
pub fn is_unsafe(c: char) -> bool {
    c.is_control() || is_bidi_control(c) || matches!(c, '\u{2028}' | '\u{2029}') || is_invisible(c)
}

/// The characters that print nothing, or only change the look of the character before them
/// (Unicode 16): general category Cf (format characters) and the property
/// Default_Ignorable_Code_Point, whose ranges overlap (both list U+200B to U+200F, U+2060 to
/// U+2064, U+FEFF). Unassigned code points inside these blocks are counted too, so a later
/// Unicode version's additions are escaped before they are known.
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'                      // soft hyphen
            | '\u{034F}'                // combining grapheme joiner
            | '\u{0600}'..='\u{0605}'   // Arabic number signs (Cf)
            | '\u{061C}'                // Arabic letter mark
            | '\u{06DD}'                // Arabic end of ayah (Cf)
            | '\u{070F}'                // Syriac abbreviation mark (Cf)
            | '\u{0890}'..='\u{0891}'   // Arabic pound and piastre marks (Cf)
            | '\u{08E2}'                // Arabic disputed end of ayah (Cf)
            | '\u{115F}'..='\u{1160}'   // Hangul choseong and jungseong fillers
            | '\u{17B4}'..='\u{17B5}'   // Khmer inherent vowels
            | '\u{180B}'..='\u{180F}'   // Mongolian variation selectors, vowel separator
            | '\u{200B}'..='\u{200F}'   // zero width space, (non-)joiner, LRM, RLM
            | '\u{202A}'..='\u{202E}'   // bidi embeddings and overrides
            | '\u{2060}'..='\u{206F}'   // word joiner, invisible operators, isolates, ...
            | '\u{3164}'                // Hangul filler
            | '\u{FE00}'..='\u{FE0F}'   // variation selectors 1 to 16
            | '\u{FEFF}'                // zero width no-break space (byte order mark)
            | '\u{FFA0}'                // halfwidth Hangul filler
            | '\u{FFF0}'..='\u{FFFB}'   // unassigned, interlinear annotation (Cf)
            | '\u{110BD}'               // Kaithi number sign (Cf)
            | '\u{110CD}'               // Kaithi number sign above (Cf)
            | '\u{13430}'..='\u{1343F}' // Egyptian hieroglyph format controls (Cf)
            | '\u{1BCA0}'..='\u{1BCA3}' // shorthand format controls
            | '\u{1D173}'..='\u{1D17A}' // musical symbol beam and phrase controls
            | '\u{E0000}'..='\u{E0FFF}' // tags, variation selectors 17 to 256, reserved
    )
}

/// Combining marks written as they are on one character; each further one in a row is an
/// escape (see the [module documentation](self)).
pub const MAX_MARKS: usize = 2;

/// Whether `c` is a nonspacing or enclosing combining mark (general category Mn or Me): drawn
/// over, under or around the character before it, taking no cell of its own.
pub fn is_combining_mark(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};
    matches!(
        c.general_category(),
        GeneralCategory::NonspacingMark | GeneralCategory::EnclosingMark
    )
}

/// Each character of `text` and whether it is printed as an escape: it [is unsafe](is_unsafe)
/// anywhere, or it is a [combining mark](is_combining_mark) after [`MAX_MARKS`] others in a
/// row (marks at the start of `text` stack on whatever was printed before, and count the
/// same). Any other character, escaped or not, ends a row: an escape is visible text.
pub fn escapes(text: &str) -> impl Iterator<Item = (char, bool)> + '_ {
    let mut marks = 0usize;
    text.chars().map(move |c| {
        let stacked = if is_combining_mark(c) {
            marks += 1;
            marks > MAX_MARKS
        } else {
            marks = 0;
            false
        };
        (c, stacked || is_unsafe(c))
    })
}

/// The Unicode bidirectional formatting characters (property Bidi_Control).
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{061C}' | '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}'
    )
}

/// `text` with every [unsafe](is_unsafe) character and every combining mark stacked past
/// [`MAX_MARKS`] ([`escapes`]) written as an escape, `\x1B` for one up to U+00FF and
/// `\u{202E}` above, and each backslash doubled, so the printed form is one line, shows
/// exactly what is stored and cannot be mistaken for other text. Borrowed when nothing needed
/// escaping (the usual case).
pub fn safe(text: &str) -> Cow<'_, str> {
    if !escapes(text).any(|(c, escaped)| escaped || c == '\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for (c, escaped) in escapes(text) {
        match c {
            '\\' => out.push_str("\\\\"),
            c if escaped && u32::from(c) <= 0xFF => {
                let _ = write!(out, "\\x{:02X}", u32::from(c));
            }
            c if escaped => {
                let _ = write!(out, "\\u{{{:04X}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// Displays a string through [`safe`]: `println!("{}", Safe(&uid))`.
#[derive(Debug, Clone, Copy)]
pub struct Safe<'a>(pub &'a str);

impl fmt::Display for Safe<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&safe(self.0))
    }
}

/// `json` (as serde_json writes it) with the [unsafe](is_unsafe) characters serde_json leaves
/// as they are (DEL, C1 controls, bidirectional formatting characters, U+2028, U+2029, the
/// [invisible](is_invisible) ones) and the combining marks stacked past [`MAX_MARKS`]
/// ([`escapes`]) written as `\uXXXX` escapes (a surrogate pair of them above U+FFFF, as JSON
/// writes those). The JSON value is the same (a reader gets the same strings back); only its
/// text is safe on a terminal. serde_json escapes the C0 controls inside strings, so a tab, CR
/// or newline in its output is whitespace between tokens (pretty printing) and stays; outside
/// strings valid JSON holds nothing else unsafe (and no combining mark), so every other such
/// character is inside a string, where the escape stands for it.
pub fn json(json: &str) -> Cow<'_, str> {
    let escape = |(c, escaped): (char, bool)| escaped && !matches!(c, '\t' | '\n' | '\r');
    if !escapes(json).any(escape) {
        return Cow::Borrowed(json);
    }
    let mut out = String::with_capacity(json.len() + 8);
    for (c, escaped) in escapes(json) {
        if escape((c, escaped)) {
            // One escape per UTF-16 unit: a tag character (U+E0001) is a surrogate pair.
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_is_borrowed_and_unchanged() {
        for s in [
            "alice <alice@example.net>",
            "Jörg Müller <jörg@example.de>",
            "李 <li@example.cn>",
            "",
        ] {
            assert!(matches!(safe(s), Cow::Borrowed(t) if t == s), "{s}");
            assert!(matches!(json(s), Cow::Borrowed(t) if t == s), "{s}");
        }
    }

    #[test]
    fn controls_and_bidi_overrides_are_escaped() {
        let uid = "Mallory \u{1b}]0;pwned\u{7}\u{1b}[2J\r\n\t\u{7f}\u{9b}31m\u{202e}evil\u{2066}x\u{2069}\u{2028}\\ <m@example.net>";
        let shown = safe(uid);
        assert_eq!(
            shown,
            "Mallory \\x1B]0;pwned\\x07\\x1B[2J\\x0D\\x0A\\x09\\x7F\\x9B31m\\u{202E}evil\\u{2066}x\
             \\u{2069}\\u{2028}\\\\ <m@example.net>"
        );
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        assert_eq!(Safe(uid).to_string(), shown);
        // Every Bidi_Control character, and nothing printable, counts as unsafe.
        for c in [
            '\u{061C}', '\u{200E}', '\u{200F}', '\u{202A}', '\u{202B}', '\u{202C}', '\u{202D}',
            '\u{202E}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}',
        ] {
            assert!(is_bidi_control(c) && is_unsafe(c), "{c:?}");
        }
        for c in ['a', 'é', ' ', '<', '\u{00A0}', '😀', 'ـ', '\u{0301}'] {
            assert!(!is_unsafe(c), "{c:?}");
        }
    }

    /// Red-team round 5: invisible characters passed, so one User ID could look like
    /// another in a listing. Each is escaped now, in text and in JSON.
    #[test]
    fn invisible_characters_are_escaped() {
        for c in [
            '\u{00AD}',
            '\u{034F}',
            '\u{061C}',
            '\u{115F}',
            '\u{180E}',
            '\u{200B}',
            '\u{200C}',
            '\u{200D}',
            '\u{2060}',
            '\u{2061}',
            '\u{2062}',
            '\u{2063}',
            '\u{2064}',
            '\u{206A}',
            '\u{3164}',
            '\u{FE00}',
            '\u{FE0F}',
            '\u{FEFF}',
            '\u{FFA0}',
            '\u{FFF9}',
            '\u{1D173}',
            '\u{E0000}',
            '\u{E0001}',
            '\u{E0020}',
            '\u{E0041}',
            '\u{E007F}',
            '\u{E0100}',
            '\u{E01EF}',
        ] {
            assert!(is_invisible(c) && is_unsafe(c), "{c:?}");
        }
        // Look-alikes of "alice": a zero width space, a soft hyphen, a tag character, a
        // variation selector, a byte order mark.
        let uid = "al\u{200B}i\u{00AD}c\u{E0041}e\u{FE00}\u{FEFF} <alice@example.net>";
        let shown = safe(uid);
        assert_eq!(
            shown,
            "al\\u{200B}i\\xADc\\u{E0041}e\\u{FE00}\\u{FEFF} <alice@example.net>"
        );
        assert!(!shown.chars().any(is_unsafe), "{shown}");
        let value = serde_json::json!({ "uid": uid });
        let text = serde_json::to_string(&value).unwrap();
        let escaped = json(&text);
        assert!(!escaped.chars().any(is_unsafe), "{escaped}");
        assert!(
            escaped.contains("\\u200b") && escaped.contains("\\udb40\\udc41"),
            "a tag character is a surrogate pair: {escaped}"
        );
        let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
        assert_eq!(back, value, "the same value");
    }

    /// The most combining marks in a row in `text`.
    fn longest_stack(text: &str) -> usize {
        let mut run = 0;
        let mut longest = 0;
        for c in text.chars() {
            run = if is_combining_mark(c) { run + 1 } else { 0 };
            longest = longest.max(run);
        }
        longest
    }

    /// Red-team round 6 (left open there): combining marks stacked on one letter ("Zalgo"
    /// text) passed, and some terminals draw them over the lines above and below. Past
    /// [`MAX_MARKS`] in a row each is escaped, in text and in JSON; what real scripts stack
    /// on one letter is printed as it is.
    #[test]
    fn stacked_combining_marks_are_escaped() {
        for s in [
            "Nguye\u{0302}\u{0303}n <nguyen@example.vn>", // Nguyễn, decomposed: two marks
            "\u{0E01}\u{0E34}\u{0E48}",                   // Thai: vowel and tone above a consonant
            "\u{05E9}\u{05BC}\u{05C1}\u{05DD}",           // Hebrew: dagesh and shin dot
            "\u{0915}\u{093C}\u{094D}\u{0937}",           // Devanagari: nukta and virama
            "x\u{20DD}\u{0301}",                          // an enclosing circle (Me), an acute
            "\u{0301}\u{0301}x",                          // marks at the start
            // A spacing mark (Mc) takes a cell of its own: the marks after it stack anew.
            "\u{0915}\u{093C}\u{094D}\u{093E}\u{0901}\u{093C}",
        ] {
            assert!(matches!(safe(s), Cow::Borrowed(t) if t == s), "{s}");
            assert!(matches!(json(s), Cow::Borrowed(t) if t == s), "{s}");
        }
        // The third mark in a row and every one after it, of either kind.
        assert_eq!(
            safe("e\u{0301}\u{0301}\u{0301}\u{0301}!"),
            "e\u{0301}\u{0301}\\u{0301}\\u{0301}!"
        );
        assert_eq!(
            safe("x\u{20DD}\u{20DD}\u{20DD}"),
            "x\u{20DD}\u{20DD}\\u{20DD}"
        );
        // An escape is visible text: the marks after it stack on it.
        assert_eq!(
            safe("a\u{200B}\u{0301}\u{0301}\u{0301}"),
            "a\\u{200B}\u{0301}\u{0301}\\u{0301}"
        );
        // Zalgo: sixty marks on each letter of a User ID.
        let zalgo: String = "Mallory <m@example.net>"
            .chars()
            .flat_map(|c| {
                std::iter::once(c).chain((0..60).map(|i| char::from_u32(0x0300 + i).unwrap()))
            })
            .collect();
        assert_eq!(longest_stack(&zalgo), 60);
        let shown = safe(&zalgo);
        assert_eq!(longest_stack(&shown), MAX_MARKS, "{shown}");
        assert!(
            shown.starts_with("M\u{0300}\u{0301}\\u{0302}\\u{0303}"),
            "{shown}"
        );
        assert!(
            escapes(&shown).all(|(_, escaped)| !escaped),
            "nothing left to escape: {shown}"
        );
        let value = serde_json::json!({ "uid": zalgo });
        for text in [
            serde_json::to_string(&value).unwrap(),
            serde_json::to_string_pretty(&value).unwrap(),
        ] {
            let escaped = json(&text);
            assert_eq!(longest_stack(&escaped), MAX_MARKS, "{escaped}");
            assert!(escaped.contains("\\u0302"), "{escaped}");
            let back: serde_json::Value = serde_json::from_str(&escaped).unwrap();
            assert_eq!(back, value, "the same value");
        }
    }

    #[test]
    fn json_escapes_keep_the_value() {
        let value = serde_json::json!({
            "uid": "a\u{1b}[31m\u{7f}\u{85}\u{202e}b\u{2029}",
            "n": 1,
        });
        for text in [
            serde_json::to_string(&value).unwrap(),
            serde_json::to_string_pretty(&value).unwrap(),
        ] {
            let shown = json(&text);
            assert!(!shown.chars().any(|c| c != '\n' && is_unsafe(c)), "{shown}");
            assert!(
                shown.contains("\\u202e") && shown.contains("\\u007f"),
                "{shown}"
            );
            let back: serde_json::Value = serde_json::from_str(&shown).unwrap();
            assert_eq!(back, value);
        }
    }
}
