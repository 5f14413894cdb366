//! The server room: `kst serve` (LMTP daemon and HTTP ops endpoint), `kst deliver` (Postfix
//! pipe), the reply mailers, `kst outbox send` and the public `[web]` listener (WKD, VKS, HKP).

pub mod deliver;
pub mod http;
pub mod ingest;
pub mod lmtp;
#[cfg(feature = "transparency")]
pub mod log_http;
pub mod mailer;
pub mod outbox;
pub mod serve;
pub mod web;
