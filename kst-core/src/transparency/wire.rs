//! The proofs' wire format: akd's protobuf messages (its `public_auditing` feature), with a
//! size bound on everything decoded. Absence proofs have no akd message; they are framed as
//! `KSTA1 ‖ epoch (8, big-endian) ‖ root (32) ‖ VRF proof (80) ‖ NonMembershipProof (protobuf)`.

use akd::proto::specs::types as pb;
use akd::{AppendOnlyProof, HistoryProof, LookupProof, NonMembershipProof};
use protobuf::Message;

use super::directory::AbsenceProof;
use super::{Result, TransparencyError};

/// Largest lookup or absence proof accepted: a lookup proof at 10⁶ entries is a few KiB
/// (docs/TRANSPARENCY.md).
pub const MAX_LOOKUP_PROOF: usize = 64 * 1024;
/// Largest append-only proof accepted in one piece; a client asks for shorter ranges.
pub const MAX_AUDIT_PROOF: usize = 16 * 1024 * 1024;
/// Largest history proof accepted (at most [`super::history::MAX_VERSIONS`] versions of a
/// few KiB each).
pub const MAX_HISTORY_PROOF: usize = 1024 * 1024;

const ABSENCE_MAGIC: &[u8; 5] = b"KSTA1";
const VRF_PROOF_LEN: usize = 80;

/// Encodes a lookup proof.
pub fn encode_lookup(proof: &LookupProof) -> Result<Vec<u8>> {
    encode(&pb::LookupProof::from(proof))
}

/// Decodes a lookup proof of at most [`MAX_LOOKUP_PROOF`] bytes.
pub fn decode_lookup(bytes: &[u8]) -> Result<LookupProof> {
    let msg: pb::LookupProof = decode(bytes, MAX_LOOKUP_PROOF, "lookup proof")?;
    LookupProof::try_from(&msg).map_err(|e| malformed("lookup proof", &e.to_string()))
}

/// Encodes an append-only proof.
pub fn encode_audit(proof: &AppendOnlyProof) -> Result<Vec<u8>> {
    encode(&pb::AppendOnlyProof::from(proof))
}

/// Decodes an append-only proof of at most [`MAX_AUDIT_PROOF`] bytes.
pub fn decode_audit(bytes: &[u8]) -> Result<AppendOnlyProof> {
    let msg: pb::AppendOnlyProof = decode(bytes, MAX_AUDIT_PROOF, "append-only proof")?;
    AppendOnlyProof::try_from(&msg).map_err(|e| malformed("append-only proof", &e.to_string()))
}

/// Encodes a key-history proof.
pub fn encode_history(proof: &HistoryProof) -> Result<Vec<u8>> {
    encode(&pb::HistoryProof::from(proof))
}

/// Decodes a key-history proof of at most [`MAX_HISTORY_PROOF`] bytes.
pub fn decode_history(bytes: &[u8]) -> Result<HistoryProof> {
    let msg: pb::HistoryProof = decode(bytes, MAX_HISTORY_PROOF, "history proof")?;
    HistoryProof::try_from(&msg).map_err(|e| malformed("history proof", &e.to_string()))
}

/// Encodes an absence proof.
pub fn encode_absence(proof: &AbsenceProof) -> Result<Vec<u8>> {
    let mut out = ABSENCE_MAGIC.to_vec();
    out.extend_from_slice(&proof.epoch.to_be_bytes());
    out.extend_from_slice(&proof.root_hash);
    if proof.vrf_proof.len() != VRF_PROOF_LEN {
        return Err(malformed("absence proof", "the VRF proof is not 80 bytes"));
    }
    out.extend_from_slice(&proof.vrf_proof);
    out.extend_from_slice(&encode(&pb::NonMembershipProof::from(&proof.proof))?);
    Ok(out)
}

/// Decodes an absence proof of at most [`MAX_LOOKUP_PROOF`] bytes.
pub fn decode_absence(bytes: &[u8]) -> Result<AbsenceProof> {
    const WHAT: &str = "absence proof";
    if bytes.len() > MAX_LOOKUP_PROOF {
        return Err(malformed(WHAT, "too large"));
    }
    let rest = bytes
        .strip_prefix(ABSENCE_MAGIC.as_slice())
        .ok_or_else(|| malformed(WHAT, "unknown layout"))?;
    let (epoch, rest) = rest
        .split_first_chunk::<8>()
        .ok_or_else(|| malformed(WHAT, "truncated"))?;
    let (root_hash, rest) = rest
        .split_first_chunk::<32>()
        .ok_or_else(|| malformed(WHAT, "truncated"))?;
    let (vrf_proof, rest) = rest
        .split_first_chunk::<VRF_PROOF_LEN>()
        .ok_or_else(|| malformed(WHAT, "truncated"))?;
    let msg: pb::NonMembershipProof = decode(rest, MAX_LOOKUP_PROOF, WHAT)?;
    Ok(AbsenceProof {
        epoch: u64::from_be_bytes(*epoch),
        root_hash: *root_hash,
        vrf_proof: vrf_proof.to_vec(),
        proof: NonMembershipProof::try_from(&msg).map_err(|e| malformed(WHAT, &e.to_string()))?,
    })
}

fn encode<M: Message>(msg: &M) -> Result<Vec<u8>> {
    msg.write_to_bytes()
        .map_err(|e| malformed("encoding a proof", &e.to_string()))
}

fn decode<M: Message>(bytes: &[u8], max: usize, what: &str) -> Result<M> {
    if bytes.len() > max {
        return Err(malformed(what, &format!("larger than {max} bytes")));
    }
    M::parse_from_bytes(bytes).map_err(|e| malformed(what, &e.to_string()))
}

fn malformed(what: &str, why: &str) -> TransparencyError {
    TransparencyError::Malformed(format!("{what}: {why}"))
}
