//! The accept side of the public listener: a connection cap in all and per client, TLS
//! handshakes off the accept path, an idle timeout and a request-head deadline on every
//! connection.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
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

use super::config::TrustedProxies;
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
    /// Connections one client key (IPv4 address or IPv6 /64 of the TCP peer, unless a trusted
    /// proxy) may hold at once; the clients of one IPv6 /48 together at most a quarter of
    /// `max_connections` (at least `max_per_client`).
    pub max_per_client: usize,
    /// Time from accepting a connection, or from the first byte of a later request, until the
    /// blank line that ends the request head; trickling bytes do not extend it.
    pub head_timeout: Duration,
}

/// Open connections per client key; a [`ClientSlot`] gives its one back when dropped.
type PerClient = Arc<Mutex<HashMap<String, usize>>>;

/// One connection's share of its client's cap.
struct ClientSlot {
    key: String,
    counts: PerClient,
}

impl ClientSlot {
    /// Takes a slot of `key` if it has fewer than `max` open.
    fn take(counts: &PerClient, key: String, max: usize) -> Option<ClientSlot> {
        let mut map = counts.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(key.clone()).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(ClientSlot {
            key,
            counts: Arc::clone(counts),
        })
    }
}

/// The slots a connection from `peer` (not a trusted proxy) takes: its client's (at most
/// `max_per_client` open) and, for an IPv6 peer, its /48's (at most a quarter of
/// `max_connections`, and never fewer than `max_per_client`: `super::batcher::NETWORK_SHARE`).
/// `None` when either is full. Red team (counters and shares): a client is an IPv6 /64, and
/// the 16 /64s of a /56 (which holds 256) held all 1,024 connections at once.
fn take_slots(
    counts: &PerClient,
    peer: std::net::IpAddr,
    limits: &AcceptLimits,
) -> Option<(ClientSlot, Option<ClientSlot>)> {
    let max_per_client = limits.max_per_client.max(1);
    let client = ClientSlot::take(counts, super::client::client_key(peer), max_per_client)?;
    let network = match super::client::client_network(peer) {
        Some(network) => {
            let max = (limits.max_connections / super::batcher::NETWORK_SHARE).max(max_per_client);
            Some(ClientSlot::take(counts, network, max)?)
        }
        None => None,
    };
    Some((client, network))
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.key);
            }
        }
    }
}

/// A listener for [`axum::serve`]: plain TCP or TLS, connections capped and timed out.
pub struct WebListener {
    local: SocketAddr,
    incoming: mpsc::Receiver<(Conn, SocketAddr)>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl WebListener {
    /// Starts accepting on `listener`; with `tls`, each connection's handshake runs in its own
    /// task so that a slow client delays nobody else. `proxies` are exempt from the per-client
    /// cap (their connections carry many clients).
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<ServerConfig>>,
        limits: AcceptLimits,
        proxies: TrustedProxies,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, incoming) = mpsc::channel(64);
        let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        let per_client = PerClient::default();
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
                let client_slot = if proxies.contains(peer.ip().to_canonical()) {
                    None
                } else {
                    let Some(slots) = take_slots(&per_client, peer.ip(), &limits) else {
                        super::metrics::busy();
                        drop(tcp);
                        continue;
                    };
                    Some(slots)
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
                        head_timeout: limits.head_timeout,
                        head: Head::Reading {
                            deadline: Box::pin(tokio::time::sleep(limits.head_timeout)),
                            matched: 0,
                        },
                        _permit: permit,
                        _client_slot: client_slot,
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

/// Where a connection is in its request/response cycle, as far as the head deadline cares.
enum Head {
    /// A request head is being read; it must end (`\r\n\r\n`) before `deadline`. `matched`
    /// counts the bytes of that blank line seen so far.
    Reading {
        deadline: Pin<Box<Sleep>>,
        matched: u8,
    },
    /// The head arrived; the request is being answered.
    Served,
    /// A response was written; the next byte read starts a new head.
    Answered,
}

/// One accepted connection: holds its slots, and fails with `TimedOut` when no byte moved for
/// the idle timeout, or when a request head does not end within the head timeout.
pub struct Conn {
    stream: Stream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    head_timeout: Duration,
    head: Head,
    _permit: OwnedSemaphorePermit,
    /// Its client's slot and its network's.
    _client_slot: Option<(ClientSlot, Option<ClientSlot>)>,
}

impl Conn {
    /// Fails once the request head being read is late.
    fn check_head(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Head::Reading { deadline, .. } = &mut self.head
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head too slow",
            ));
        }
        None
    }

    /// Follows the request head through `bytes` just read.
    fn scan_head(&mut self, bytes: &[u8]) {
        if matches!(self.head, Head::Answered) && !bytes.is_empty() {
            self.head = Head::Reading {
                deadline: Box::pin(tokio::time::sleep(self.head_timeout)),
                matched: 0,
            };
        }
        let Head::Reading { matched, .. } = &mut self.head else {
            return;
        };
        for &b in bytes {
            *matched = match (b, *matched % 2) {
                (b'\r', 0) | (b'\n', 1) => *matched + 1,
                (b'\r', _) => 1,
                _ => 0,
            };
            if *matched == 4 {
                self.head = Head::Served;
                return;
            }
        }
    }

    /// Notes that a response is going out (so the head was read, however it ended).
    fn answered(&mut self) {
        self.head = Head::Answered;
    }

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
        if let Some(e) = me.check_head(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let r = delegate!(me, s => Pin::new(s).poll_read(cx, buf));
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                me.scan_head(&buf.filled()[before..]);
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
                    me.answered();
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
            me.answered();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Red team (counters and shares): the /64s of one /48 (16 of them with 64 connections
    /// each) took every one of 1,024 connection slots; now the /48 holds at most 256, another
    /// network and IPv4 clients still get theirs, and slots are given back when dropped.
    #[test]
    fn the_clients_of_one_network_hold_a_quarter_of_the_connections() {
        let limits = AcceptLimits {
            max_connections: 1024,
            idle_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            max_per_client: 64,
            head_timeout: Duration::from_secs(10),
        };
        let counts = PerClient::default();
        let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
        let mut held = Vec::new();
        let mut refused = 0;
        for n in 0..16 {
            for _ in 0..64 {
                match take_slots(&counts, ip(&format!("2001:db8:1:{n:x}::1")), &limits) {
                    Some(slots) => held.push(slots),
                    None => refused += 1,
                }
            }
        }
        assert_eq!(held.len(), 256, "{refused} refused");
        assert!(
            take_slots(&counts, ip("2001:db8:1:ff::1"), &limits).is_none(),
            "a new /64 of the same /48 is refused too"
        );
        assert!(take_slots(&counts, ip("2001:db8:2::1"), &limits).is_some());
        assert!(take_slots(&counts, ip("198.51.100.7"), &limits).is_some());
        // A client's own cap still holds within its network's.
        let mut own = Vec::new();
        while let Some(slots) = take_slots(&counts, ip("2001:db8:3::1"), &limits) {
            own.push(slots);
        }
        assert_eq!(own.len(), 64);
        drop((held, own));
        assert!(
            counts.lock().unwrap().is_empty(),
            "every slot given back: {:?}",
            counts.lock().unwrap()
        );
    }
}
