//! What was dropped, counted while validating and listed in [`ValidKey::stripped`](super::ValidKey::stripped).

/// Counts of what was dropped, for [`ValidKey::stripped`](super::ValidKey::stripped).
#[derive(Default)]
pub(super) struct Dropped {
    pub(super) other_uids: usize,
    pub(super) user_attributes: usize,
    pub(super) third_party: usize,
    pub(super) bad_self_sigs: usize,
    /// Self-signatures that verify but are dated in the future.
    pub(super) future_self_sigs: usize,
    pub(super) misplaced_sigs: usize,
    pub(super) superseded: usize,
    pub(super) unreadable: usize,
    pub(super) other_packets: usize,
    pub(super) subkeys: Vec<String>,
    pub(super) unhashed_subpackets: usize,
}

fn plural(n: usize, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

pub(super) fn describe(d: &Dropped) -> Vec<String> {
    let mut out = Vec::new();
    let mut add = |n: usize, one: &str, many: &str| {
        if n > 0 {
            out.push(plural(n, one, many));
        }
    };
    add(d.other_uids, "other User ID", "other User IDs");
    add(
        d.user_attributes,
        "user attribute (photo ID)",
        "user attributes (photo IDs)",
    );
    add(
        d.third_party,
        "third-party certification or signature",
        "third-party certifications and signatures",
    );
    add(
        d.bad_self_sigs,
        "self-signature that does not verify or uses a weak hash",
        "self-signatures that do not verify or use a weak hash",
    );
    add(
        d.future_self_sigs,
        "self-signature dated in the future (the clock of the computer that made it runs \
         ahead: set it right and make the signature again)",
        "self-signatures dated in the future (the clock of the computer that made them runs \
         ahead: set it right and make the signatures again)",
    );
    add(
        d.superseded,
        "older self-signature superseded by a newer one",
        "older self-signatures superseded by newer ones",
    );
    add(
        d.misplaced_sigs,
        "signature of a type that does not belong where it was",
        "signatures of a type that does not belong where they were",
    );
    add(d.unreadable, "unreadable packet", "unreadable packets");
    add(
        d.other_packets,
        "other packet (trust, marker or padding)",
        "other packets (trust, marker or padding)",
    );
    add(
        d.unhashed_subpackets,
        "unauthenticated subpacket in a signature's unhashed area",
        "unauthenticated subpackets in signatures' unhashed areas",
    );
    out.extend(d.subkeys.iter().cloned());
    out
}
