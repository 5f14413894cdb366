//! The LMTP load: C connections kept open (as Postfix's LMTP client keeps them), each taking
//! the next message, pipelining MAIL/RCPT/DATA and waiting for the 354 and the final reply.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::ProgressBar;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixStream};

use super::messages::Message;
use super::report::{Outcome, Sample};

/// A message ready for the wire: the command group and the dot-stuffed content.
pub struct Prepared {
    commands: Vec<u8>,
    data: Vec<u8>,
}

impl Prepared {
    /// Prepares `m` (done before timing starts).
    pub fn new(m: &Message) -> Prepared {
        Prepared {
            commands: format!(
                "MAIL FROM:<{}> SIZE={}\r\nRCPT TO:<{}>\r\nDATA\r\n",
                m.sender,
                m.raw.len(),
                m.recipient
            )
            .into_bytes(),
            data: dot_stuff(&m.raw),
        }
    }
}

/// DATA content: lines starting with '.' doubled, CRLF at the end, the terminating dot line.
pub fn dot_stuff(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 16);
    for line in raw.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A TCP or Unix socket.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Socket for T {}

/// One open LMTP connection.
struct Connection {
    io: BufReader<Box<dyn Socket>>,
    line: String,
}

/// Connects to `addr`: `host:port`, or a Unix socket as `unix:/path` (as `[lmtp] listen`).
async fn dial(addr: &str) -> std::io::Result<Box<dyn Socket>> {
    Ok(match addr.strip_prefix("unix:") {
        Some(path) => Box::new(UnixStream::connect(path).await?),
        None => {
            let stream = TcpStream::connect(addr).await?;
            stream.set_nodelay(true)?;
            Box::new(stream)
        }
    })
}

impl Connection {
    async fn open(addr: &str) -> anyhow::Result<Connection> {
        let stream = dial(addr).await.with_context(|| {
            format!("cannot connect to LMTP at {addr} (is `kst serve` running?)")
        })?;
        let mut c = Connection {
            io: BufReader::new(stream),
            line: String::new(),
        };
        let greeting = c.reply().await?;
        if !greeting.starts_with("220") {
            bail!("LMTP server at {addr} greeted with {greeting:?}");
        }
        c.io.get_mut().write_all(b"LHLO bench.kst\r\n").await?;
        let lhlo = c.reply().await?;
        if !lhlo.starts_with("250") {
            bail!("LHLO refused by {addr}: {lhlo:?}");
        }
        Ok(c)
    }

    /// The last line of the next reply.
    async fn reply(&mut self) -> anyhow::Result<String> {
        loop {
            self.line.clear();
            if self.io.read_line(&mut self.line).await? == 0 {
                bail!("the LMTP server closed the connection");
            }
            if self.line.as_bytes().get(3) != Some(&b'-') {
                return Ok(self.line.trim_end().to_string());
            }
        }
    }

    /// One transaction; the reply to DATA (or the first refusal).
    async fn send(&mut self, m: &Prepared) -> anyhow::Result<String> {
        self.io.get_mut().write_all(&m.commands).await?;
        let mail = self.reply().await?;
        let rcpt = self.reply().await?;
        let data = self.reply().await?;
        if !data.starts_with("354") {
            // RFC 2920: a refused MAIL or RCPT makes DATA fail too; the transaction is over.
            return Ok(if !mail.starts_with('2') { mail } else { rcpt });
        }
        self.io.get_mut().write_all(&m.data).await?;
        self.reply().await
    }
}

/// Pause before a message that failed temporarily is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// Opens `concurrency` connections, spread in turn over `addrs` (the instances of a pool),
/// sends every message once (or, with `retry`, again after a `4xx` or a broken connection,
/// until `retry` has passed since its first try, as an MTA would), and returns one sample per
/// message and the wall-clock time from the first message to the last reply (connecting is
/// not timed).
pub async fn run(
    addrs: &[String],
    concurrency: usize,
    messages: Arc<Vec<Prepared>>,
    progress: ProgressBar,
    retry: Option<Duration>,
) -> anyhow::Result<(Vec<Sample>, Duration)> {
    if addrs.is_empty() {
        bail!("no LMTP address to connect to");
    }
    let mut connections = Vec::with_capacity(concurrency);
    for k in 0..concurrency {
        let addr = addrs[k % addrs.len()].clone();
        connections.push((Connection::open(&addr).await?, addr));
    }
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (c, addr) in connections {
        let (next, messages, progress) = (next.clone(), messages.clone(), progress.clone());
        tasks.spawn(async move {
            let mut samples = Vec::new();
            let mut conn = Some(c);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(m) = messages.get(i) else { break };
                let t = Instant::now();
                let mut tries = 0;
                let outcome = loop {
                    tries += 1;
                    if conn.is_none() {
                        conn = Connection::open(&addr).await.ok();
                    }
                    let sent = match conn.as_mut() {
                        Some(c) => c.send(m).await,
                        None => Err(anyhow::anyhow!("cannot connect again to {addr}")),
                    };
                    let outcome = match sent {
                        Ok(reply) => Outcome::of_reply(&reply),
                        Err(e) => {
                            conn = None;
                            Outcome::Failed(format!("connection: {e}"))
                        }
                    };
                    let temporary = matches!(outcome, Outcome::Deferred(_)) || conn.is_none();
                    match retry {
                        Some(limit) if temporary && t.elapsed() < limit => {
                            tokio::time::sleep(RETRY_PAUSE).await;
                        }
                        _ => break outcome,
                    }
                };
                samples.push(Sample {
                    latency: t.elapsed(),
                    outcome,
                    tries,
                });
                progress.inc(1);
                if conn.is_none() {
                    break;
                }
            }
            if let Some(mut c) = conn {
                let _ = c.io.get_mut().write_all(b"QUIT\r\n").await;
            }
            samples
        });
    }
    let mut samples = Vec::with_capacity(messages.len());
    while let Some(done) = tasks.join_next().await {
        samples.extend(done.context("a load connection task failed")?);
    }
    Ok((samples, started.elapsed()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\nc"), b"a\r\n..b\r\nc\r\n.\r\n");
        let m = Prepared::new(&Message {
            sender: "s@x.test".into(),
            recipient: "keys@x.test".into(),
            raw: b"hi\r\n".to_vec(),
            pending: None,
        });
        assert_eq!(
            m.commands,
            b"MAIL FROM:<s@x.test> SIZE=4\r\nRCPT TO:<keys@x.test>\r\nDATA\r\n"
        );
    }
}
