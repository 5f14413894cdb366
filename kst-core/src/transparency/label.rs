//! The directory label of an address and the hash domain of kst's directory.
//!
//! akd turns a label into a tree position with the VRF: position = VRF(H(label ‖ freshness ‖
//! version)), so the tree holds no address and cannot be enumerated; the VRF proof in a reply
//! lets the requester check that the position belongs to the address asked for.

use akd::AkdLabel;

use crate::Address;

/// Domain separation of every hash in kst's directory (akd's `DomainLabel`).
#[derive(Debug, Clone, Copy)]
pub struct KstDomainLabel;

impl akd::DomainLabel for KstDomainLabel {
    fn domain_label() -> &'static [u8] {
        b"kst key transparency v1"
    }
}

/// The label of `address` in its domain's directory: a version tag and the normalized address.
pub fn directory_label(address: &Address) -> AkdLabel {
    let mut bytes = b"kst-address-v1:".to_vec();
    bytes.extend_from_slice(address.as_str().as_bytes());
    AkdLabel(bytes)
}
