//! The `kst` executable's library: one room per program, sharing only [`exit`] and `shared`.
//!
//! - `server` (feature `server`): `kst serve` (LMTP and the HTTP ops endpoint), `kst deliver`
//!   (Postfix pipe), the mailers and `kst outbox send`;
//! - `operator` (feature `server`): `kst keys`, `kst export`/`import`, `kst migrate`,
//!   `kst config check`;
//! - `shared` (feature `server`): configuration, logging, the store factory, metrics and the
//!   wiring that builds a [`kst_core::Kst`] from a configuration;
//! - `client` (feature `client`): `kst client`, the mail client's side (DNS, IMAP, TLS);
//! - `bench` (feature `bench`): `kst bench` and `kst-store-bench`, the load tools, and (with
//!   `transparency`) `kst-directory-bench`, the key directory's proofs at scale.
//!
//! [`cli`] parses the command line and hands each command to its room; [`terminal`] makes stored
//! text safe to print on an operator's terminal.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(not(any(feature = "server", feature = "client", feature = "bench")))]
compile_error!("kst-bin needs at least one of its features: server, client, bench");

#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
#[cfg(feature = "client")]
pub mod client;
pub mod exit;
#[cfg(any(feature = "server", feature = "bench"))]
pub mod keygen;
#[cfg(feature = "server")]
pub mod operator;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod shared;
pub mod terminal;
