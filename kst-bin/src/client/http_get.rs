//! One HTTP/1.1 GET (or POST) over an open connection, no redirects: MTA-STS policies
//! ([`super::mta_sts`]) and, with the `transparency` feature, the key directory's answers and
//! a witness's cosignatures.

use http_body_util::{BodyExt, Full, Limited};
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
    request(conn, host, hyper::Method::GET, path, None, limit).await
}

/// `method path` with `Host: host` over `conn`, with `body` (a text/plain body) if given; a
/// response body larger than `limit` bytes is an error.
pub async fn request(
    conn: Conn,
    host: &str,
    method: hyper::Method,
    path: &str,
    body: Option<Vec<u8>>,
    limit: usize,
) -> Result<Fetched, String> {
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .map_err(|e| format!("HTTP with {host}: {e}"))?;
    let driver = tokio::spawn(connection);
    let result = async {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host)
            .header(hyper::header::USER_AGENT, "kst-client");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "text/plain; charset=utf-8");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
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
