//! Upload: takes the next event from the spool and delivers it to CHeKT's Partner Event
//! API over HTTPS, one request at a time, highest class first.
//!
//! Owns: the HTTP client (rustls + ring, bundled Mozilla roots plus an optional CA file),
//! request construction (Bearer token, `Idempotency-Key`, `x-partner-trace-id`), the
//! classification of CHeKT's answers, retry with exponential backoff and full jitter
//! (honouring `Retry-After`), and a client-side token bucket that keeps the agent under
//! CHeKT's rate limit, corrected by `X-RateLimit-*` headers.
//!
//! Invariants:
//! - An event leaves the spool only after CHeKT answered 2xx (ack) or rejected it
//!   permanently (dead letter, with CHeKT's error envelope and `request_id`).
//! - Every attempt for an event carries the same `Idempotency-Key` (derived from its id),
//!   across retries and restarts.
//! - The next event is always the spool's head: a new alarm goes before any waiting
//!   lower-class backlog, including after a backoff.
//! - Auth failures never dead-letter events: the events are fine, the credentials are not.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, TokenSource};
use crate::clock::Clock;
use crate::config::ChektConfig;
use crate::event::{Class, Event};
use crate::spool::{DeadLetter, Spool, SpoolError};

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("CA file {path}: {message}")]
    CaFile { path: String, message: String },
    #[error("building the HTTPS client: {0}")]
    Client(String),
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// The full `source()` chain of an error on one line (reqwest hides the useful part).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// HTTPS client for CHeKT: rustls with ring, Mozilla roots (no system CA store needed on
/// the device) plus `chekt.ca_file` if set, no redirects.
pub fn http_client(cfg: &ChektConfig) -> Result<reqwest::Client, UploadError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    crate::jwt::install();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.ca_file {
        let shown = path.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| UploadError::CaFile {
                path: shown.clone(),
                message: e.to_string(),
            })?
            .collect::<Result<_, _>>()
            .map_err(|e| UploadError::CaFile {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(UploadError::CaFile {
                path: shown,
                message: "no certificates in file".into(),
            });
        }
        for c in certs {
            roots.add(c).map_err(|e| UploadError::CaFile {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        }
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UploadError::Client(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(cfg.request_timeout)
        .connect_timeout(Duration::from_secs(5).min(cfg.request_timeout))
        .pool_idle_timeout(Duration::from_secs(60))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("chekt-agent/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| UploadError::Client(error_chain(&e)))
}

/// CHeKT's error envelope.
#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(default)]
    error: EnvelopeError,
}

#[derive(Debug, Default, Deserialize)]
struct EnvelopeError {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    field: Option<String>,
}

/// What to do after one attempt.
#[derive(Debug)]
enum Verdict {
    Delivered,
    Unauthorized,
    Permanent(String),
    Retry {
        why: String,
        after: Option<Duration>,
    },
    Auth(AuthError),
}

/// Client-side token bucket, corrected by CHeKT's `X-RateLimit-*` headers.
pub struct RateLimiter {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    last: Instant,
    blocked_until: Option<Instant>,
}

impl RateLimiter {
    pub fn new(per_minute: u32, burst: u32) -> RateLimiter {
        RateLimiter {
            capacity: burst.max(1) as f64,
            per_sec: per_minute.max(1) as f64 / 60.0,
            tokens: burst.max(1) as f64,
            last: Instant::now(),
            blocked_until: None,
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + dt * self.per_sec).min(self.capacity);
        self.last = now;
    }

    /// How long to wait before the next request may go; takes a token when it is zero.
    pub fn try_take(&mut self) -> Duration {
        let now = Instant::now();
        if let Some(until) = self.blocked_until {
            if now < until {
                return until - now;
            }
            self.blocked_until = None;
        }
        self.refill();
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec)
        }
    }

    /// Apply `X-RateLimit-Remaining` / `X-RateLimit-Reset` (Unix seconds, CHeKT's clock).
    pub fn observe(&mut self, remaining: Option<u64>, reset_unix: Option<i64>, now_ms: i64) {
        let Some(rem) = remaining else { return };
        self.refill();
        if rem == 0 {
            if let Some(reset) = reset_unix {
                let wait_ms = (reset * 1000 - now_ms).clamp(0, 60_000);
                self.blocked_until = Some(Instant::now() + Duration::from_millis(wait_ms as u64));
            }
            self.tokens = 0.0;
        } else if (rem as f64) < self.tokens {
            self.tokens = rem as f64;
        }
    }
}

/// Exponential backoff with full jitter.
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
        }
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Next delay: uniform in [0, min(max, base * 2^attempt)], capped at `cap` too.
    pub fn next(&mut self, cap: Duration) -> Duration {
        let exp = self.base.saturating_mul(1u32 << self.attempt.min(20));
        self.attempt = self.attempt.saturating_add(1);
        let ceiling = exp.min(self.max).min(cap);
        let mut b = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        let frac = u32::from_le_bytes(b) as f64 / u32::MAX as f64;
        ceiling.mul_f64(frac)
    }
}

/// Parse `Retry-After`: delay-seconds or an HTTP-date (RFC 9110), against CHeKT's clock.
pub fn parse_retry_after(v: &str, now_ms: i64) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(3600)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    let at_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64;
    Some(Duration::from_millis(
        (at_ms - now_ms).clamp(0, 3_600_000) as u64
    ))
}

/// Delivery counters, shared with the pipeline for status lines and the demo.
#[derive(Debug, Default)]
pub struct UploadStats {
    pub delivered: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub retries: AtomicU64,
    /// Unix ms of the last 2xx.
    pub last_delivery_ms: AtomicI64,
}

/// Backoff ceiling while the head of the queue is an alarm: alarms are retried at least
/// this often however long CHeKT has been away.
pub const ALARM_RETRY_MAX: Duration = Duration::from_secs(5);

pub struct Uploader {
    pub spool: Arc<Spool>,
    pub tokens: Arc<TokenSource>,
    pub http: reqwest::Client,
    pub cfg: ChektConfig,
    pub clock: Arc<Clock>,
    pub stats: Arc<UploadStats>,
    /// Bumped whenever the loop turns; the watchdog reads it.
    pub heartbeat: Arc<AtomicI64>,
    /// How long an in-flight request may finish after shutdown is requested.
    pub grace: Duration,
}

impl Uploader {
    /// Deliver until `shutdown` is cancelled. Returns an error only if the spool fails.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), UploadError> {
        let mut limiter = RateLimiter::new(self.cfg.rate_per_minute, self.cfg.burst);
        let mut backoff = Backoff::new(self.cfg.backoff_base, self.cfg.backoff_max);
        let mut last_auth_error = String::new();
        let mut unauthorized_in_row = 0u32;
        loop {
            self.beat();
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let Some((key, event)) = self.spool.peek()? else {
                tokio::select! {
                    _ = self.spool.appended() => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                continue;
            };
            let wait = limiter.try_take();
            if !wait.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
                continue;
            }
            let attempt = self.attempt(&event, &mut limiter);
            let verdict = tokio::select! {
                v = attempt => v,
                _ = async { shutdown.cancelled().await; tokio::time::sleep(self.grace).await } => {
                    tracing::warn!(event_id = %event.id, "shutdown: abandoned an in-flight request; the event stays spooled and is resent with the same Idempotency-Key");
                    return Ok(());
                }
            };
            match verdict {
                Verdict::Delivered => {
                    self.spool.ack(&key)?;
                    if backoff.attempts() > 0 {
                        tracing::info!(
                            attempts = backoff.attempts(),
                            "CHeKT reachable again; delivering the backlog"
                        );
                    }
                    backoff.reset();
                    unauthorized_in_row = 0;
                    if !last_auth_error.is_empty() {
                        tracing::info!("CHeKT authentication works again");
                        last_auth_error.clear();
                    }
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .last_delivery_ms
                        .store(self.clock.now_ms(), Ordering::Relaxed);
                    continue;
                }
                Verdict::Permanent(reason) => {
                    tracing::error!(event_id = %event.id, class = event.class.as_str(), %reason, "CHeKT rejected the event permanently; moved to dead letters");
                    let dl = DeadLetter {
                        at_ms: self.clock.now_ms(),
                        stage: "upload".into(),
                        reason,
                        topic: String::new(),
                        payload: event.to_api_body().to_string().into_bytes(),
                        event: Some(event),
                    };
                    self.spool.dead_letter(&key, &dl)?;
                    self.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                    backoff.reset();
                    continue;
                }
                Verdict::Unauthorized if unauthorized_in_row == 0 => {
                    unauthorized_in_row += 1;
                    continue; // token dropped in attempt(); retry at once with a fresh one
                }
                Verdict::Unauthorized => {
                    self.wait_retry(
                        &mut backoff,
                        &event,
                        None,
                        "CHeKT answered 401 to a fresh token",
                        &shutdown,
                    )
                    .await;
                }
                Verdict::Retry { why, after } => {
                    self.wait_retry(&mut backoff, &event, after, &why, &shutdown)
                        .await;
                }
                Verdict::Auth(e) => {
                    let msg = e.to_string();
                    if msg != last_auth_error {
                        if e.needs_attention() {
                            tracing::error!(error = %msg, "cannot authenticate to CHeKT; events stay spooled");
                        } else {
                            tracing::warn!(error = %msg, "cannot obtain an access token yet; events stay spooled");
                        }
                        last_auth_error = msg.clone();
                    }
                    self.wait_retry(&mut backoff, &event, None, &msg, &shutdown)
                        .await;
                }
            }
        }
    }

    fn beat(&self) {
        self.heartbeat
            .store(self.clock.local_ms(), Ordering::Relaxed);
    }

    async fn wait_retry(
        &self,
        backoff: &mut Backoff,
        head: &Event,
        after: Option<Duration>,
        why: &str,
        shutdown: &CancellationToken,
    ) {
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        let cap = if head.class == Class::Alarm {
            ALARM_RETRY_MAX
        } else {
            self.cfg.backoff_max
        };
        let jitter = backoff.next(cap);
        let delay = after.map_or(jitter, |a| a.max(jitter));
        // Log the first failure and then ever more rarely (1, 2, 4, 8, ...): a long outage
        // must not wear the flash with log lines.
        let n = backoff.attempts();
        if n.is_power_of_two() {
            tracing::warn!(event_id = %head.id, attempt = n, delay_ms = delay.as_millis() as u64, reason = %why, "delivery failed; will retry");
        } else {
            tracing::debug!(event_id = %head.id, attempt = n, delay_ms = delay.as_millis() as u64, reason = %why, "delivery failed; will retry");
        }
        let until = Instant::now() + delay;
        // Sleep in slices so the watchdog sees a live loop during long backoffs.
        while Instant::now() < until {
            self.beat();
            let slice = (until - Instant::now()).min(Duration::from_secs(1));
            tokio::select! {
                _ = tokio::time::sleep(slice) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn attempt(&self, event: &Event, limiter: &mut RateLimiter) -> Verdict {
        let token = match self.tokens.bearer().await {
            Ok(t) => t,
            Err(e) => return Verdict::Auth(e),
        };
        let url = self.cfg.events_url();
        let trace = crate::auth::uuid_v4();
        let resp = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, token.header_value())
            .header("Idempotency-Key", event.idempotency_key())
            .header("x-partner-trace-id", &trace)
            .json(&event.to_api_body())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                return Verdict::Retry {
                    why: format!("POST {url}: {}", error_chain(&e)),
                    after: None,
                };
            }
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(d) = header("date") {
            self.clock.observe_date_header(d);
        }
        let now_ms = self.clock.now_ms();
        limiter.observe(
            header("x-ratelimit-remaining").and_then(|v| v.parse().ok()),
            header("x-ratelimit-reset").and_then(|v| v.parse().ok()),
            now_ms,
        );
        let retry_after = header("retry-after").and_then(|v| parse_retry_after(v, now_ms));
        let body = resp.bytes().await.unwrap_or_default();
        if (200..300).contains(&status) {
            tracing::debug!(event_id = %event.id, status, "delivered");
            return Verdict::Delivered;
        }
        let env: Envelope = serde_json::from_slice(&body).unwrap_or_default();
        let e = env.error;
        let detail = format!(
            "HTTP {status} code={} message={:?}{} request_id={} trace_id={trace}",
            if e.code.is_empty() { "-" } else { &e.code },
            e.message,
            e.field
                .as_deref()
                .map(|f| format!(" field={f}"))
                .unwrap_or_default(),
            if e.request_id.is_empty() {
                "-"
            } else {
                &e.request_id
            },
        );
        match status {
            401 => {
                tracing::info!(%detail, "CHeKT answered 401; refreshing the access token");
                match self.tokens.invalidate(&token).await {
                    Ok(()) => Verdict::Unauthorized,
                    Err(e) => Verdict::Auth(e),
                }
            }
            408 | 429 | 500..=599 => {
                tracing::debug!(event_id = %event.id, %detail, "CHeKT asked to retry");
                Verdict::Retry {
                    why: detail,
                    after: retry_after,
                }
            }
            409 if e.code == "idempotency_conflict" => Verdict::Permanent(format!(
                "idempotency conflict (the same key was sent with a different body: a bug in the agent): {detail}"
            )),
            400..=499 => Verdict::Permanent(detail),
            _ => Verdict::Retry {
                why: format!("unexpected answer: {detail}"),
                after: retry_after,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_and_date() {
        let now = 1_800_000_000_000i64;
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let at = std::time::UNIX_EPOCH + Duration::from_millis(now as u64 + 30_000);
        let d = parse_retry_after(&httpdate::fmt_http_date(at), now).unwrap();
        assert_eq!(d, Duration::from_secs(30));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn backoff_is_bounded_by_cap_and_grows() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(60));
        for _ in 0..30 {
            assert!(b.next(Duration::from_secs(5)) <= Duration::from_secs(5));
        }
        assert_eq!(b.attempts(), 30);
    }

    #[tokio::test]
    async fn limiter_blocks_on_remaining_zero() {
        let mut l = RateLimiter::new(600, 2);
        assert!(l.try_take().is_zero());
        assert!(l.try_take().is_zero());
        assert!(!l.try_take().is_zero());
        let mut l = RateLimiter::new(600, 30);
        l.observe(Some(0), Some(1_800_000_003), 1_800_000_000_000);
        let w = l.try_take();
        assert!(
            w > Duration::from_secs(2) && w <= Duration::from_secs(3),
            "{w:?}"
        );
    }
}
