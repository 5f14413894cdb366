//! The accept side of the public listener: a connection cap, TLS handshakes off the accept
//! path, and an idle timeout on every connection.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::server::TlsStream;

use super::handlers::PeerAddr;

/// Limits of the accept side.
#[derive(Debug, Clone, Copy)]
pub struct AcceptLimits {
    /// Connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// Time without a byte read or written after which a connection is closed.
    pub idle_timeout: Duration,
    /// Time a client has to finish the TLS handshake.
    pub handshake_timeout: Duration,
}

/// A listener for [`axum::serve`]: plain TCP or TLS, connections capped and timed out.
pub struct WebListener {
    local: SocketAddr,
    incoming: mpsc::Receiver<(Conn, SocketAddr)>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl WebListener {
    /// Starts accepting on `listener`; with `tls`, each connection's handshake runs in its own
    /// task so that a slow client delays nobody else.
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<ServerConfig>>,
        limits: AcceptLimits,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let tls = tls.map(TlsAcceptor::from);
        let acceptor = tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    r = listener.accept() => match r {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!(error = %e, "web: accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                    super::metrics::busy();
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let tx = tx.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let stream = match tls {
                        None => Stream::Plain(tcp),
                        Some(acceptor) => {
                            match tokio::time::timeout(
                                limits.handshake_timeout,
                                acceptor.accept(tcp),
                            )
                            .await
                            {
                                Ok(Ok(s)) => Stream::Tls(Box::new(s)),
                                Ok(Err(e)) => {
                                    super::metrics::tls_failure();
                                    tracing::debug!(error = %e, "web: TLS handshake failed");
                                    return;
                                }
                                Err(_) => {
                                    super::metrics::tls_failure();
                                    return;
                                }
                            }
                        }
                    };
                    let conn = Conn {
                        stream,
                        idle: limits.idle_timeout,
                        deadline: Box::pin(tokio::time::sleep(limits.idle_timeout)),
                        _permit: permit,
                    };
                    let _ = tx.send((conn, peer)).await;
                });
            }
        });
        Ok(WebListener {
            local,
            incoming,
            acceptor,
        })
    }
}

impl Drop for WebListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Listener for WebListener {
    type Io = Conn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(c) => c,
            // The acceptor task ended (it only does when this listener is dropped).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, WebListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, WebListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

impl Connected<IncomingStream<'_, TcpListener>> for PeerAddr {
    fn connect_info(stream: IncomingStream<'_, TcpListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// One accepted connection: holds its slot, and fails with `TimedOut` when no byte moved for
/// the idle timeout.
pub struct Conn {
    stream: Stream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn progress(&mut self) {
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
    }

    fn check_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                "idle connection closed",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match &mut $self.stream {
            Stream::Plain($s) => $e,
            Stream::Tls($s) => $e,
        }
    };
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = delegate!(me, s => Pin::new(s).poll_read(cx, buf));
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                me.progress();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match me.check_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = delegate!(me, s => Pin::new(s).poll_write(cx, data));
        match r {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    me.progress();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Pending => match me.check_idle(cx) {
                Poll::Ready(e) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        delegate!(me, s => Pin::new(s).poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        delegate!(me, s => Pin::new(s).poll_shutdown(cx))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let r = delegate!(me, s => Pin::new(s).poll_write_vectored(cx, bufs));
        if let Poll::Ready(Ok(n)) = r
            && n > 0
        {
            me.progress();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}
