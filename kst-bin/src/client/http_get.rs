//! One HTTP/1.1 GET over an open connection, no redirects: MTA-STS policies
//! ([`super::mta_sts`]) and, with the `transparency` feature, the key directory's answers.

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

use super::tls::Conn;

/// What a GET returned.
#[derive(Debug)]
pub struct Fetched {
    /// The response status.
    pub status: hyper::StatusCode,
    /// The `Content-Type` header, when it is text.
    pub content_type: Option<String>,
    /// The body (at most the limit asked for).
    pub body: Vec<u8>,
}

/// `GET path` with `Host: host` over `conn`; a body larger than `limit` bytes is an error.
pub async fn get(conn: Conn, host: &str, path: &str, limit: usize) -> Result<Fetched, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "kst-client")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("HTTP request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("HTTP with {host}: {e}"))?;
        let status = response.status();
        let content_type = response
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(response.into_body(), limit)
            .collect()
            .await
            .map_err(|e| format!("reading {host}{path}: {e}"))?
            .to_bytes()
            .to_vec();
        Ok(Fetched {
            status,
            content_type,
            body,
        })
    }
    .await;
    driver.abort();
    result
}
