//! HTTP plumbing of the simulator: the per-request entry point (routing), the response
//! helpers (CHeKT error envelope, OAuth error body, JSON), body reading with limits, and the
//! TCP wrapper that lets a handler reset its connection.
//!
//! Invariants: [`handle`] stamps every response it returns with exactly one `Date` (the
//! simulator's clock; hyper's own date header is disabled per connection) and one
//! `x-request-id`, the same id that error envelopes carry as `request_id`. A handler asks
//! for a reset by setting [`ConnCtx::reset`] and returning [`ResetConnection`]: hyper then
//! ends the connection without writing anything, and dropping [`ResettableTcp`] with the
//! flag set closes the socket with SO_LINGER 0, i.e. a TCP RST.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::state::Shared;
use super::{EVENTS_PATH, TOKEN_PATH, events, token};

pub(crate) type Resp = Response<Full<Bytes>>;

/// Per-connection context shared with the request handlers.
#[derive(Debug, Default)]
pub(crate) struct ConnCtx {
    /// Set by a handler that wants the connection reset instead of answered.
    pub reset: Arc<AtomicBool>,
    /// The server is in an outage or shut down: answer nothing, reset.
    pub down: Arc<AtomicBool>,
}

/// The service error that makes hyper abandon the connection without a response.
#[derive(Debug)]
pub(crate) struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by fault injection")
    }
}

impl std::error::Error for ResetConnection {}

/// A TCP stream that, once its flag is set, is closed with a RST when dropped.
pub(crate) struct ResettableTcp {
    inner: TcpStream,
    reset: Arc<AtomicBool>,
}

impl ResettableTcp {
    pub fn new(inner: TcpStream, reset: Arc<AtomicBool>) -> ResettableTcp {
        ResettableTcp { inner, reset }
    }
}

impl Drop for ResettableTcp {
    fn drop(&mut self) {
        if self.reset.load(Ordering::SeqCst) {
            // A zero linger does not block; it makes close() send RST.
            #[allow(deprecated)]
            let _ = self.inner.set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for ResettableTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The hyper service: route, answer, stamp `Date` and `x-request-id`.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Resp, ResetConnection> {
    if conn.down.load(Ordering::SeqCst) {
        conn.reset.store(true, Ordering::SeqCst);
        return Err(ResetConnection);
    }
    let rid = shared.request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = match (method.as_str(), path.as_str()) {
        ("GET" | "HEAD", "/") => json(
            StatusCode::OK,
            &serde_json::json!({"service": "chekt-simulator", "request_id": rid}),
        ),
        (_, "/") => method_not_allowed(&rid, "GET, HEAD"),
        ("POST", TOKEN_PATH) => token::handle(&shared, req).await,
        (_, TOKEN_PATH) => {
            let mut r = oauth_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                &format!("{method} not allowed on {TOKEN_PATH}; use POST"),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST"));
            r
        }
        ("POST", EVENTS_PATH) => events::handle(&shared, &conn, req, &rid).await?,
        (_, EVENTS_PATH) => method_not_allowed(&rid, "POST"),
        ("PUT", p) if p.starts_with("/upload/") => events::upload(&shared, req, &rid).await,
        _ => {
            shared.lock().stats.not_found_404 += 1;
            envelope(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no route for {method} {path}"),
                &rid,
                None,
            )
        }
    };
    tracing::debug!(%method, %path, status = resp.status().as_u16(), request_id = %rid, "simulator request");
    Ok(finish(&shared, &rid, resp))
}

fn finish(shared: &Shared, rid: &str, mut resp: Resp) -> Resp {
    let date = httpdate::fmt_http_date(shared.clock.now());
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&date) {
        h.insert(header::DATE, v);
    }
    if let Ok(v) = HeaderValue::from_str(rid) {
        h.insert(HeaderName::from_static("x-request-id"), v);
    }
    resp
}

fn method_not_allowed(rid: &str, allow: &'static str) -> Resp {
    let mut r = envelope(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("allowed: {allow}"),
        rid,
        None,
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// A JSON response.
pub(crate) fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    raw_json(status, Bytes::from(value.to_string()))
}

/// A response with an already serialised JSON body.
pub(crate) fn raw_json(status: StatusCode, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The CHeKT error envelope `{"error":{"code","message","request_id","field"?}}`.
pub(crate) fn envelope(
    status: StatusCode,
    code: &str,
    message: &str,
    rid: &str,
    field: Option<&str>,
) -> Resp {
    let mut err = serde_json::json!({"code": code, "message": message, "request_id": rid});
    if let Some(f) = field {
        err["field"] = serde_json::Value::from(f);
    }
    json(status, &serde_json::json!({ "error": err }))
}

/// An OAuth 2.0 / Auth0 error body `{"error","error_description"}`.
pub(crate) fn oauth_error(status: StatusCode, error: &str, description: &str) -> Resp {
    let mut r = json(
        status,
        &serde_json::json!({"error": error, "error_description": description}),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Why a body could not be read.
pub(crate) enum BodyError {
    TooLarge(usize),
    Io(String),
}

/// Read a whole body, refusing more than `limit` bytes.
pub(crate) async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge(limit)),
        Err(e) => Err(BodyError::Io(e.to_string())),
    }
}

/// A header as a string, if present and visible ASCII.
pub(crate) fn header_str<'a>(headers: &'a hyper::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Does the `Content-Type` header name this media type (parameters ignored)?
pub(crate) fn content_type_is(headers: &hyper::HeaderMap, media: &str) -> bool {
    header_str(headers, "content-type")
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case(media))
}
