//! One encoding of akd's storage records (`DbRecord`) as blobs, the unit every kst backend
//! stores for the directory ([`super::storage::DirectoryStore`]).
//!
//! akd offers no storage encoding of its records without its `serde_serialization` feature
//! (which would pull serde into akd's tree); the records' fields are public and akd has
//! builders for them, so kst writes a small fixed layout:
//!
//! `KSR1 ‖ kind (1 = root record, 2 = tree node, 4 = value state) ‖ fields`, integers
//! big-endian, node labels as `value (32) ‖ bit length (4)`, byte strings as `length (4) ‖
//! bytes`. Decoding is strict (no trailing bytes) and bounded ([`MAX_RECORD`]).

use akd::NodeLabel;
use akd::storage::types::{DbRecord, StorageType};
use akd::tree_node::TreeNode;

use super::{Result, TransparencyError};

/// Magic and layout version of an encoded record.
const MAGIC: &[u8; 4] = b"KSR1";
/// Largest record decoded: a value state holds a [`super::DirectoryEntry`] (about 100 bytes)
/// and a label (an address); a tree node is under 300 bytes.
pub const MAX_RECORD: usize = 16 * 1024;

/// Encodes one record.
pub fn encode(record: &DbRecord) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    match record {
        DbRecord::Azks(azks) => {
            out.push(StorageType::Azks as u8);
            out.extend_from_slice(&azks.latest_epoch.to_be_bytes());
            out.extend_from_slice(&azks.num_nodes.to_be_bytes());
        }
        DbRecord::TreeNode(node) => {
            out.push(StorageType::TreeNode as u8);
            put_label(&mut out, &node.label);
            put_node(&mut out, &node.latest_node);
            match &node.previous_node {
                None => out.push(0),
                Some(previous) => {
                    out.push(1);
                    put_node(&mut out, previous);
                }
            }
        }
        DbRecord::ValueState(state) => {
            out.push(StorageType::ValueState as u8);
            out.extend_from_slice(&state.version.to_be_bytes());
            put_label(&mut out, &state.label);
            out.extend_from_slice(&state.epoch.to_be_bytes());
            put_bytes(&mut out, &state.username.0);
            put_bytes(&mut out, &state.value.0);
        }
    }
    out
}

/// Decodes the bytes of [`encode`]; anything else is [`TransparencyError::Malformed`].
pub fn decode(bytes: &[u8]) -> Result<DbRecord> {
    if bytes.len() > MAX_RECORD {
        return Err(malformed(&format!("larger than {MAX_RECORD} bytes")));
    }
    let rest = bytes
        .strip_prefix(MAGIC.as_slice())
        .ok_or_else(|| malformed("unknown layout"))?;
    let mut r = Reader(rest);
    let kind = r.u8()?;
    let record = match kind {
        k if k == StorageType::Azks as u8 => {
            DbRecord::Azks(DbRecord::build_azks(r.u64()?, r.u64()?))
        }
        k if k == StorageType::TreeNode as u8 => {
            let label = r.label()?;
            let latest = r.node()?;
            let previous = match r.u8()? {
                0 => None,
                1 => Some(r.node()?),
                _ => return Err(malformed("bad previous-node flag")),
            };
            let p = previous.as_ref();
            DbRecord::TreeNode(DbRecord::build_tree_node_with_previous_value(
                label.label_val,
                label.label_len,
                latest.last_epoch,
                latest.min_descendant_epoch,
                latest.parent.label_val,
                latest.parent.label_len,
                latest.node_type,
                latest.left,
                latest.right,
                latest.hash,
                p.map(|n| n.last_epoch),
                p.map(|n| n.min_descendant_epoch),
                p.map(|n| n.parent.label_val),
                p.map(|n| n.parent.label_len),
                p.map(|n| n.node_type),
                p.and_then(|n| n.left),
                p.and_then(|n| n.right),
                p.map(|n| n.hash),
            ))
        }
        k if k == StorageType::ValueState as u8 => {
            let version = r.u64()?;
            let label = r.label()?;
            let epoch = r.u64()?;
            let username = r.bytes()?;
            let value = r.bytes()?;
            DbRecord::ValueState(DbRecord::build_user_state(
                username,
                value,
                version,
                label.label_len,
                label.label_val,
                epoch,
            ))
        }
        _ => return Err(malformed("unknown record kind")),
    };
    if !r.0.is_empty() {
        return Err(malformed("trailing bytes"));
    }
    Ok(record)
}

/// The storage key of a tree node (akd's binary id: kind ‖ bit length ‖ label), what backends
/// key node blobs by.
pub fn node_key(label: &NodeLabel) -> Vec<u8> {
    let mut key = vec![StorageType::TreeNode as u8];
    key.extend_from_slice(&label.label_len.to_be_bytes());
    key.extend_from_slice(&label.label_val);
    key
}

fn put_label(out: &mut Vec<u8>, label: &NodeLabel) {
    out.extend_from_slice(&label.label_val);
    out.extend_from_slice(&label.label_len.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Records are bounded by MAX_RECORD when read back; a longer field fails there.
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_node(out: &mut Vec<u8>, node: &TreeNode) {
    out.extend_from_slice(&node.last_epoch.to_be_bytes());
    out.extend_from_slice(&node.min_descendant_epoch.to_be_bytes());
    put_label(out, &node.parent);
    out.push(node.node_type as u8);
    for child in [&node.left_child, &node.right_child] {
        match child {
            None => out.push(0),
            Some(label) => {
                out.push(1);
                put_label(out, label);
            }
        }
    }
    out.extend_from_slice(&node.hash.0);
}

/// The fields of a decoded tree node, before akd's builder puts them together.
struct NodeFields {
    last_epoch: u64,
    min_descendant_epoch: u64,
    parent: NodeLabel,
    node_type: u8,
    left: Option<NodeLabel>,
    right: Option<NodeLabel>,
    hash: [u8; 32],
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N]> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| malformed("truncated"))?;
        self.0 = rest;
        Ok(*head)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take::<1>()?[0])
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.take()?))
    }

    fn label(&mut self) -> Result<NodeLabel> {
        let val = self.take::<32>()?;
        let len = u32::from_be_bytes(self.take()?);
        if len > 256 {
            return Err(malformed("node label longer than 256 bits"));
        }
        Ok(NodeLabel::new(val, len))
    }

    fn bytes(&mut self) -> Result<Vec<u8>> {
        let len = u32::from_be_bytes(self.take()?) as usize;
        if len > self.0.len() {
            return Err(malformed("truncated byte string"));
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Ok(bytes.to_vec())
    }

    fn child(&mut self) -> Result<Option<NodeLabel>> {
        match self.u8()? {
            0 => Ok(None),
            1 => Ok(Some(self.label()?)),
            _ => Err(malformed("bad child flag")),
        }
    }

    fn node(&mut self) -> Result<NodeFields> {
        let last_epoch = self.u64()?;
        let min_descendant_epoch = self.u64()?;
        let parent = self.label()?;
        let node_type = self.u8()?;
        if !(1..=3).contains(&node_type) {
            return Err(malformed("unknown node type"));
        }
        Ok(NodeFields {
            last_epoch,
            min_descendant_epoch,
            parent,
            node_type,
            left: self.child()?,
            right: self.child()?,
            hash: self.take()?,
        })
    }
}

fn malformed(why: &str) -> TransparencyError {
    TransparencyError::Malformed(format!("directory record: {why}"))
}
