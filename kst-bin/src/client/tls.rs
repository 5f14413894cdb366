//! TLS for the client: a rustls connector on the built-in web roots plus `--ca-file`, and one
//! stream type for cleartext and TLS connections (so STARTTLS can swap one for the other).

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

/// Builds a connector that trusts the Mozilla roots and, when given, the CA certificates in
/// `ca_file` (PEM).
pub fn connector(ca_file: Option<&Path>) -> Result<TlsConnector, String> {
    Ok(TlsConnector::from(Arc::new(client_config(ca_file)?)))
}

/// The rustls client configuration behind [`connector`] (also used for DNS over TLS).
pub fn client_config(ca_file: Option<&Path>) -> Result<ClientConfig, String> {
    let roots = roots(ca_file)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// The trusted roots: the Mozilla roots and, when given, the CA certificates in `ca_file`.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read the CA file {}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| format!("the CA file {} is not PEM: {e}", path.display()))?;
        if certs.is_empty() {
            return Err(format!(
                "the CA file {} holds no CERTIFICATE block",
                path.display()
            ));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                format!(
                    "the CA file {} holds an unusable certificate: {e}",
                    path.display()
                )
            })?;
        }
    }
    Ok(roots)
}

/// A connection, cleartext or TLS.
#[derive(Debug)]
pub enum Conn {
    /// Cleartext TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Conn {
    /// Connects to `addr` within `limit`.
    pub async fn connect(addr: SocketAddr, limit: Duration) -> io::Result<Conn> {
        match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
            Ok(r) => r.map(Conn::Plain),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection to {addr} within {}s", limit.as_secs()),
            )),
        }
    }

    /// Runs the TLS handshake on a cleartext connection, checking the certificate for `name`.
    pub async fn into_tls(self, connector: &TlsConnector, name: &str) -> io::Result<Conn> {
        let server = ServerName::try_from(name.to_string()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid TLS server name"),
            )
        })?;
        match self {
            Conn::Plain(tcp) => connector
                .connect(server, tcp)
                .await
                .map(|s| Conn::Tls(Box::new(s)))
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("TLS with {name} failed: {e} (a private CA needs --ca-file)"),
                    )
                }),
            Conn::Tls(_) => Ok(self),
        }
    }

    /// True on a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self, Conn::Tls(_))
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
