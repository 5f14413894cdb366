//! The `[http]` configuration section of `kst serve`: the operations endpoint.

use serde::{Deserialize, Serialize};

/// `[http]`: the operations endpoint (`/healthz`, `/readyz`, `/metrics`). No TLS: keep it on
/// loopback or an internal network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `"host:port"` (default `"127.0.0.1:8080"`); an empty string turns the endpoint off.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
        }
    }
}
