//! Expiry reminder claims (`KeyStore::claim_reminder`): one empty file per claim,
//!
//! ```text
//! <root>/reminders/<address hash>-<claim id>
//! ```
//!
//! created with `O_CREAT|O_EXCL`, so exactly one process of the host gets to create it, then
//! synced with its directory. The address hash is the history file's name and the claim id is
//! hex digits, decimal digits and dashes: no path component comes from request input.
//! Claims are never removed (a few bytes per reminder sent).

use std::fs::OpenOptions;

use kst_core::Result;
use kst_core::durable;
use kst_core::reminder::ReminderClaim;

use crate::error::{durable_error, io};
use crate::layout::{Layout, address_hash};

/// Records `claim`; true when this call created it.
pub(crate) fn claim(layout: &Layout, claim: &ReminderClaim) -> Result<bool> {
    let dir = layout.root().join("reminders");
    durable::create_dir(&dir).map_err(durable_error)?;
    let path = dir.join(format!("{}-{}", address_hash(&claim.address), claim.id()));
    match OpenOptions::new().write(true).create_new(true).open(&path) {
        Ok(file) => {
            file.sync_all()
                .map_err(|e| io("syncing the reminder claim", &path, e))?;
            durable::sync_dir(&dir).map_err(durable_error)?;
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io("creating the reminder claim", &path, e)),
    }
}
