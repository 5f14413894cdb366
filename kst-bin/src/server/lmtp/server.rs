//! The LMTP listener, mini-redis style: accept (TCP or Unix socket), check the peer, cap the
//! connections, run one [`Session`] per connection with timeouts, shut down gracefully.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use kst_core::service::{Decision, Envelope, HandleError, Handled, Kst, RequestKind, Silence};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::decided::{Decided, decision_key, message_digest};
use super::session::{Reply, Session, SessionLimits, Step, Transaction, delivery_reply};
use crate::server::ingest::{self, Origin};
use crate::shared::config::{AllowList, LmtpConfig};
use crate::shared::metrics;

/// Bytes read from a client at a time.
const READ_BUFFER: usize = 16 * 1024;

/// Where the LMTP server listens: a TCP socket or a Unix socket.
#[derive(Debug)]
pub enum Listener {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix socket listener and its path (removed when the server stops).
    Unix {
        /// The listener.
        listener: UnixListener,
        /// The socket file.
        path: PathBuf,
    },
}

/// An accepted connection.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    /// Binds `listen` as `[lmtp] listen` spells it: `"host:port"`, `"unix:/path"` or `"/path"`.
    ///
    /// A stale Unix socket file (nobody listening on it) is replaced; a live one or a file
    /// that is not a socket is an error; a missing parent directory is created. The socket is
    /// made `0660`: the MTA must run as the same user or group as kst to connect (see
    /// [`Listener::bind_config`] for the group).
    pub async fn bind(listen: &str) -> io::Result<Listener> {
        let listen = listen.trim();
        let unix = listen
            .strip_prefix("unix:")
            .or_else(|| listen.starts_with('/').then_some(listen));
        match unix {
            Some(path) => {
                let path = PathBuf::from(path);
                let listener = bind_unix(&path).await?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
                Ok(Listener::Unix { listener, path })
            }
            None => Ok(Listener::Tcp(TcpListener::bind(listen).await?)),
        }
    }

    /// Binds `[lmtp] listen` and gives a Unix socket the group `[lmtp] socket_group`.
    pub async fn bind_config(cfg: &LmtpConfig) -> io::Result<Listener> {
        let gid = cfg
            .socket_gid()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = Listener::bind(&cfg.listen).await?;
        if let (Listener::Unix { path, .. }, Some(gid)) = (&listener, gid) {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot give {} the group {gid} (lmtp.socket_group): {e}; kst must run as root or be a member of that group",
                        path.display()
                    ),
                )
            })?;
        }
        Ok(listener)
    }

    /// The TCP address bound (useful with port 0), `None` for a Unix socket.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix { .. } => None,
        }
    }

    /// The address for logs: `127.0.0.1:2424` or `unix:/run/kst/lmtp.sock`.
    pub fn log_address(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| a.to_string()),
            Listener::Unix { path, .. } => format!("unix:{}", path.display()),
        }
    }

    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
            Listener::Unix { listener, .. } => {
                listener.accept().await.map(|(s, _)| Accepted::Unix(s))
            }
        }
    }

    /// Stops listening; removes the socket file of a Unix listener.
    fn close(self) {
        if let Listener::Unix { listener, path } = self {
            drop(listener);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the LMTP socket file");
            }
        }
    }
}

async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket: remove it or choose another lmtp.listen",
                    path.display()
                ),
            ));
        }
        Ok(_) => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "another process listens on {}: stop it or choose another lmtp.listen",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path)
}

/// Tells connections that the server is shutting down. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownSignal(watch::Receiver<bool>);

impl ShutdownSignal {
    /// A signal and the sender that fires it (`sender.send(true)`).
    pub fn new() -> (watch::Sender<bool>, ShutdownSignal) {
        let (tx, rx) = watch::channel(false);
        (tx, ShutdownSignal(rx))
    }

    /// A signal that never fires (for driving one connection in tests).
    pub fn never() -> ShutdownSignal {
        ShutdownSignal::new().1
    }

    /// True once shutdown began.
    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Waits until shutdown begins (forever if the sender is gone without firing).
    pub async fn wait(&mut self) {
        if self.0.wait_for(|&v| v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// What every connection of a server shares.
#[derive(Clone)]
pub struct ConnectionContext {
    /// The KST that decides about each message.
    pub kst: Kst,
    /// Session limits.
    pub limits: SessionLimits,
    /// Time allowed for each command.
    pub command_timeout: Duration,
    /// Time allowed for a whole message after `354`.
    pub data_timeout: Duration,
    /// The name in the greeting and the LHLO reply.
    pub hostname: String,
    /// Fires when the server shuts down.
    pub shutdown: ShutdownSignal,
    /// The decisions taken recently, so that one message is decided once per sender and
    /// service address however many recipients and deliveries name it ([`Decided`]).
    pub decided: Arc<Decided>,
}

impl ConnectionContext {
    /// The context `[lmtp]` describes; the size limit is the KST's (`limits.max_message_bytes`).
    pub fn new(kst: Kst, cfg: &LmtpConfig, shutdown: ShutdownSignal) -> Self {
        let limits = SessionLimits::from_config(cfg, kst.policy().max_message_bytes);
        ConnectionContext {
            kst,
            limits,
            command_timeout: cfg.command_timeout(),
            data_timeout: cfg.data_timeout(),
            hostname: hostname(),
            shutdown,
            decided: Arc::new(Decided::new()),
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs the LMTP server on `listener` until `shutdown` completes, then stops accepting, lets
/// transactions in flight finish (idle connections get `421` at once) for up to
/// `shutdown_grace_secs`, closes what is left and returns.
pub async fn run(
    listener: Listener,
    kst: Kst,
    cfg: LmtpConfig,
    shutdown: impl Future,
) -> anyhow::Result<()> {
    let allow = cfg.validate()?;
    let (trigger, signal) = ShutdownSignal::new();
    let ctx = ConnectionContext::new(kst, &cfg, signal);
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let mut tasks = JoinSet::new();
    let mut backoff = Duration::from_millis(10);
    tracing::info!(
        listen = %listener.log_address(),
        max_connections = cfg.max_connections,
        allow = ?cfg.allow,
        "LMTP server listening"
    );
    if let Some(addr) = listener.local_addr() {
        warn_tcp(addr);
    }
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            biased;
            _ = &mut shutdown => break,
            Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = joined
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "an LMTP connection task panicked");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok(conn) => {
                    backoff = Duration::from_millis(10);
                    admit(conn, &allow, &slots, &ctx, &mut tasks);
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in_ms = backoff.as_millis() as u64, "LMTP accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            },
        }
    }
    listener.close();
    let _ = trigger.send(true);
    if !tasks.is_empty() {
        tracing::info!(
            connections = tasks.len(),
            grace_secs = cfg.shutdown_grace_secs,
            "LMTP shutting down: letting transactions in flight finish"
        );
    }
    let drained = tokio::time::timeout(cfg.shutdown_grace(), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            connections = tasks.len(),
            "LMTP grace period over: closing busy connections; their messages were not acknowledged and the MTA will retry them"
        );
        tasks.shutdown().await;
    }
    tracing::info!("LMTP server stopped");
    Ok(())
}

/// The start-up warning of a TCP listener: kst does not implement LMTP AUTH, so the allow-list
/// (and, on loopback, every local user) is all that stands between the port and publishing for
/// any account.
fn warn_tcp(addr: SocketAddr) {
    tracing::warn!(
        listen = %addr,
        "LMTP listens on TCP and kst does not implement LMTP AUTH: any process that can connect from an address in [lmtp] allow (on loopback: every local user) can write trusted Received headers and publish keys for any account. Prefer a Unix socket (listen = \"unix:/run/kst/lmtp.sock\", socket_group = \"postfix\", Postfix: lmtp:unix:/run/kst/lmtp.sock); on TCP keep [lmtp] allow to the MTA's own address and firewall the port for everyone else"
    );
    if !addr.ip().is_loopback() {
        tracing::warn!(
            listen = %addr,
            "LMTP listens beyond loopback: every peer in [lmtp] allow can write trusted Received headers and so publish keys for any account"
        );
    }
}

/// Checks the peer and the connection cap, then starts the session.
fn admit(
    conn: Accepted,
    allow: &AllowList,
    slots: &Arc<Semaphore>,
    ctx: &ConnectionContext,
    tasks: &mut JoinSet<()>,
) {
    match conn {
        Accepted::Tcp(stream, addr) => {
            if !allow.allows(addr.ip()) {
                metrics::refused_peer();
                tracing::error!(
                    peer = %addr,
                    "REFUSED LMTP connection from {addr}: not in [lmtp] allow. Whoever can talk LMTP to kst can forge trusted Received headers; add an address to [lmtp] allow only if it is your MTA"
                );
                let _ = stream.try_write(b"554 5.7.1 not allowed\r\n");
                return;
            }
            let Some(permit) = slot(slots, &addr.to_string()) else {
                let _ = stream.try_write(b"421 4.3.2 too busy, try again later\r\n");
                return;
            };
            let _ = stream.set_nodelay(true);
            spawn_session(tasks, stream, addr.to_string(), permit, ctx.clone());
        }
        Accepted::Unix(stream) => {
            let Some(permit) = slot(slots, "unix") else {
                let _ = stream.try_write(b"421 4.3.2 too busy, try again later\r\n");
                return;
            };
            spawn_session(tasks, stream, "unix".into(), permit, ctx.clone());
        }
    }
}

fn slot(slots: &Arc<Semaphore>, peer: &str) -> Option<OwnedSemaphorePermit> {
    let permit = Arc::clone(slots).try_acquire_owned().ok();
    if permit.is_none() {
        metrics::busy();
        tracing::warn!(
            peer,
            "LMTP connection refused: max_connections reached (421)"
        );
    }
    permit
}

fn spawn_session<S>(
    tasks: &mut JoinSet<()>,
    stream: S,
    peer: String,
    permit: OwnedSemaphorePermit,
    ctx: ConnectionContext,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tasks.spawn(async move {
        let _permit = permit;
        if let Err(e) = serve_connection(stream, &peer, &ctx).await {
            tracing::debug!(peer, error = %e, "LMTP connection ended with an I/O error");
        }
    });
}

/// Runs one LMTP session on `stream` (a socket, or `tokio::io::duplex` in tests) until QUIT,
/// EOF, a timeout, an error, or shutdown at a safe point (no transaction in flight).
pub async fn serve_connection<S>(
    mut stream: S,
    peer: &str,
    ctx: &ConnectionContext,
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _open = metrics::connection_opened();
    tracing::debug!(peer, "LMTP connection");
    let mut shutdown = ctx.shutdown.clone();
    let mut session = Session::new(ctx.limits, &ctx.hostname);
    let mut buf = vec![0u8; READ_BUFFER];
    let mut progress = session.progress();
    let mut deadline = Instant::now() + ctx.command_timeout;
    flush(&mut stream, &mut session, ctx.command_timeout).await?;
    loop {
        if session.is_closed() {
            break;
        }
        if shutdown.is_set() && !session.in_transaction() {
            session.close_with(Reply::new(421, [4, 3, 2], "shutting down, try again later"));
            flush(&mut stream, &mut session, ctx.command_timeout).await?;
            break;
        }
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut buf)) => r,
            () = shutdown.wait(), if !session.in_transaction() => continue,
        };
        let n = match read {
            Err(_) => {
                metrics::timeout();
                tracing::warn!(
                    peer,
                    in_data = session.in_data(),
                    "LMTP client too slow: closing (421 4.4.2)"
                );
                session.close_with(Reply::new(421, [4, 4, 2], "timeout, closing"));
                let _ = flush(&mut stream, &mut session, ctx.command_timeout).await;
                break;
            }
            Ok(Ok(0)) => {
                if session.in_transaction() {
                    tracing::warn!(
                        peer,
                        "LMTP client disconnected in the middle of a transaction: nothing delivered"
                    );
                }
                return Ok(());
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
        };
        let mut input = buf[..n].iter();
        loop {
            match session.ingest(&mut input, |r| ctx.kst.accepts_recipient(r)) {
                Step::NeedMore | Step::Close => break,
                Step::Deliver(tx) => {
                    flush(&mut stream, &mut session, ctx.command_timeout).await?;
                    let replies = deliver(ctx, &tx, peer).await;
                    session.finish(replies);
                }
                Step::Oversize(tx) => session.finish(drop_oversize(ctx, &tx, peer)),
            }
        }
        flush(&mut stream, &mut session, ctx.command_timeout).await?;
        if session.progress() != progress {
            progress = session.progress();
            let allowed = if session.in_data() {
                ctx.data_timeout
            } else {
                ctx.command_timeout
            };
            deadline = Instant::now() + allowed;
        }
    }
    let _ = stream.shutdown().await;
    Ok(())
}

/// Writes the session's pending output; a client that does not read it in time is dropped.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    timeout: Duration,
) -> io::Result<()> {
    let out = session.take_output();
    if out.is_empty() {
        return Ok(());
    }
    let write = async {
        stream.write_all(&out).await?;
        stream.flush().await
    };
    match tokio::time::timeout(timeout, write).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the LMTP client does not read its replies",
        )),
    }
}

/// Runs `Kst::handle` for each recipient in RCPT order; one reply each. A decision that takes
/// longer than the command timeout (a hung store or relay) is abandoned with a `451`: the MTA
/// retries, and a redelivery is idempotent. A recipient that names a service address this
/// message was already decided for (another spelling of it, or a redelivery; [`Decided`]) gets
/// that decision's reply without a second `handle`.
async fn deliver(ctx: &ConnectionContext, tx: &Transaction, peer: &str) -> Vec<Reply> {
    let queue_id = next_queue_id();
    let mut replies = Vec::with_capacity(tx.recipients.len());
    let digest = message_digest(&tx.message);
    for rcpt in &tx.recipients {
        let turn = match ctx.kst.service_recipient(rcpt) {
            Ok(service) => {
                let key = decision_key(&tx.sender, &service, &digest);
                match ctx.decided.begin(key).await {
                    (Some(handled), turn) => {
                        ctx.decided.finish(turn, None);
                        tracing::info!(
                            queue_id,
                            peer,
                            recipient = rcpt.as_str(),
                            service = %service,
                            "already decided for this sender, service address and message (another spelling of the recipient, or a redelivery): not handled again"
                        );
                        replies.push(delivery_reply(&Ok(handled), &queue_id));
                        continue;
                    }
                    (None, turn) => Some(turn),
                }
            }
            Err(_) => None,
        };
        let started = Instant::now();
        let envelope = Envelope {
            sender: Some(tx.sender.clone()),
            recipient: rcpt.clone(),
            sasl_username: None,
        };
        let result =
            tokio::time::timeout(ctx.command_timeout, ctx.kst.handle(&envelope, &tx.message))
                .await
                .unwrap_or_else(|_| {
                    Err(HandleError::Temporary(kst_core::Error::unavailable(
                        kst_core::Component::other("kst"),
                        format!(
                            "no decision within {}s (store or mailer hanging?)",
                            ctx.command_timeout.as_secs()
                        ),
                    )))
                });
        let origin = Origin {
            recipient: rcpt,
            raw: &tx.message,
            queue_id: Some(&queue_id),
            peer: Some(peer),
        };
        ingest::record(&result, &origin, started.elapsed());
        if let Some(turn) = turn {
            ctx.decided.finish(turn, result.as_ref().ok());
        }
        replies.push(delivery_reply(&result, &queue_id));
    }
    replies
}

/// Records a discarded oversize message as dropped (`too-large`) for each recipient and
/// acknowledges each with a `250`: a 5xx would make the MTA bounce it to a forged sender.
fn drop_oversize(ctx: &ConnectionContext, tx: &Transaction, peer: &str) -> Vec<Reply> {
    let queue_id = next_queue_id();
    let result = Ok(Handled {
        message_id: None,
        kind: RequestKind::Other,
        decision: Decision::Ignored(Silence::TooLarge),
        reply: None,
    });
    tracing::warn!(
        queue_id,
        peer,
        limit = ctx.limits.max_message_size,
        "message over limits.max_message_bytes: read to its end, discarded, acknowledged (250)"
    );
    tx.recipients
        .iter()
        .map(|rcpt| {
            let origin = Origin {
                recipient: rcpt,
                raw: &tx.message,
                queue_id: Some(&queue_id),
                peer: Some(peer),
            };
            ingest::record(&result, &origin, Duration::ZERO);
            delivery_reply(&result, &queue_id)
        })
        .collect()
}

/// A process-unique transaction id for replies and logs: `L<start time>.<sequence>` in hex.
fn next_queue_id() -> String {
    static START: OnceLock<u64> = OnceLock::new();
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let start = *START.get_or_init(kst_core::time::unix_now);
    format!("L{start:X}.{:X}", SEQ.fetch_add(1, Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_unique() {
        assert_ne!(next_queue_id(), next_queue_id());
    }

    #[tokio::test]
    async fn never_signal_stays_unset() {
        let mut s = ShutdownSignal::never();
        assert!(!s.is_set());
        let waited = tokio::time::timeout(Duration::from_millis(20), s.wait()).await;
        assert!(waited.is_err(), "a never-signal does not fire");
        let (tx, mut s) = ShutdownSignal::new();
        tx.send(true).expect("receiver alive");
        s.wait().await;
        assert!(s.is_set());
    }
}
