//! The LMTP listener: the sans-IO session and the server that moves its bytes.
//!
//! **The LMTP port is as trusted as the MTA**: whoever can talk to it can write a "trusted"
//! `Received:` header. It listens on loopback (or a Unix socket) by default and refuses peers
//! outside `[lmtp] allow`.

pub mod decided;
pub mod server;
pub mod session;

pub use server::{Listener, run, serve_connection};
