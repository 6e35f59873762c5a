//! The Partner Event API: `POST /partner/v1/events` (fault injection, bearer auth, per-app
//! token-bucket rate limit, idempotency, body validation, acceptance) and the media upload
//! URLs it hands out (`PUT /upload/{event id}/{snapshot.jpg|clip.mp4}`).
//!
//! Invariants: processing order is faults -> auth (401 `invalid_token`, or
//! `invalid_api_key` for an unknown `chekt_live_`/`chekt_test_` key) -> rate limit (429
//! `rate_limit_exceeded` + `Retry-After`) -> `Idempotency-Key` (400) -> idempotency store ->
//! JSON and validation (400 `invalid_json`, 422 `validation_error` + `field`) -> known
//! location (404) -> 201. Only an accepted event is stored for idempotency, keyed
//! `(app, endpoint, key)` for 24 h of simulator time, with the SHA-256 of the canonical
//! (key-sorted, whitespace-free) JSON of the body: same key and same JSON -> the stored
//! status and body again with `Idempotent-Replayed: true`; same key, other JSON -> 409
//! `idempotency_conflict`. The lookup, validation and store happen under one lock, so two
//! concurrent posts of one key accept once.
//!
//! Rate-limit headers, on every response to an authenticated request: `X-RateLimit-Limit` =
//! requests per minute; `X-RateLimit-Remaining` = whole tokens left in the app's bucket;
//! `X-RateLimit-Reset` = simulator-clock Unix second at which the bucket is full again.
//! `Retry-After` on a 429 = whole seconds until one token is available (at least 1).

use std::sync::Arc;
use std::time::Instant;

use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::{HeaderMap, Request, StatusCode};
use serde_json::Value;

use super::faults::code_for_status;
use super::http::{self, BodyError, ConnCtx, ResetConnection, Resp};
use super::state::{Bucket, IdemEntry, Shared};
use super::{EVENTS_PATH, Received, Upload};

/// How long an idempotency key is remembered (simulator clock).
pub const IDEMPOTENCY_WINDOW_SECS: i64 = 24 * 3600;
/// Longest accepted `Idempotency-Key`.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;
/// Largest accepted event body.
pub const MAX_EVENT_BODY: usize = 1024 * 1024;
/// Largest accepted media upload.
pub const MAX_UPLOAD: usize = 64 * 1024 * 1024;

const EVENT_TYPES: [&str; 3] = ["alarm", "trouble", "arming"];
const EVENT_STATUSES: [&str; 2] = ["active", "restore"];
const UPLOAD_NAMES: [&str; 2] = ["snapshot.jpg", "clip.mp4"];

/// The state of an app's bucket after a request, for the `X-RateLimit-*` headers.
#[derive(Clone, Copy, Debug)]
struct RateInfo {
    limit: u32,
    remaining: u32,
    reset: i64,
}

impl RateInfo {
    fn apply(&self, resp: &mut Resp) {
        let h = resp.headers_mut();
        for (name, value) in [
            ("x-ratelimit-limit", self.limit.to_string()),
            ("x-ratelimit-remaining", self.remaining.to_string()),
            ("x-ratelimit-reset", self.reset.to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
    }
}

fn retry_after(resp: &mut Resp, secs: u64) {
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
}

pub(crate) async fn handle(
    shared: &Arc<Shared>,
    conn: &ConnCtx,
    req: Request<Incoming>,
    rid: &str,
) -> Result<Resp, ResetConnection> {
    // 1. Faults.
    let f = shared.faults();
    if shared.chance(f.reset_rate) {
        let mut st = shared.lock();
        st.stats.resets += 1;
        st.stats.injected_faults += 1;
        drop(st);
        tracing::info!("simulator: fault: connection reset");
        conn.reset.store(true, std::sync::atomic::Ordering::SeqCst);
        return Err(ResetConnection);
    }
    if shared.chance(f.stall_rate) {
        {
            let mut st = shared.lock();
            st.stats.stalls += 1;
            st.stats.injected_faults += 1;
        }
        tracing::info!(stall = ?f.stall, "simulator: fault: stall");
        tokio::time::sleep(f.stall).await;
    }
    if !f.latency.is_zero() {
        tokio::time::sleep(f.latency).await;
    }
    if let Some(secs) = f.rate_limit_storm {
        {
            let mut st = shared.lock();
            st.stats.rate_limited_429 += 1;
            st.stats.injected_faults += 1;
        }
        let mut r = http::envelope(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "rate limit exceeded (injected storm)",
            rid,
            None,
        );
        retry_after(&mut r, secs);
        return Ok(r);
    }
    if let Some(status) = f.draw_error(shared) {
        shared.lock().stats.injected_faults += 1;
        let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        tracing::info!(status, "simulator: fault: injected error status");
        return Ok(http::envelope(
            code,
            code_for_status(code.as_u16()),
            "injected fault",
            rid,
            None,
        ));
    }

    // 2. Authentication.
    let (parts, body) = req.into_parts();
    let app = match authenticate(shared, &parts.headers) {
        Ok(app) => app,
        Err((code, msg)) => {
            shared.lock().stats.unauthorized_401 += 1;
            let mut r = http::envelope(StatusCode::UNAUTHORIZED, code, &msg, rid, None);
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return Ok(r);
        }
    };

    // 3. Rate limit.
    let rate = match take_token(shared, &app) {
        Ok(rate) => rate,
        Err((rate, secs)) => {
            shared.lock().stats.rate_limited_429 += 1;
            let mut r = http::envelope(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                &format!(
                    "rate limit of {} requests per minute exceeded; retry in {secs} s",
                    rate.limit
                ),
                rid,
                None,
            );
            retry_after(&mut r, secs);
            rate.apply(&mut r);
            return Ok(r);
        }
    };

    // 4. The rest.
    let mut resp = process(shared, &app, &parts.headers, body, rid).await;
    if let Some(rate) = rate {
        rate.apply(&mut resp);
    }
    Ok(resp)
}

/// The app id behind the bearer credential, or `(code, message)` for a 401.
fn authenticate(shared: &Shared, headers: &HeaderMap) -> Result<String, (&'static str, String)> {
    let value = match headers.get(header::AUTHORIZATION) {
        None => return Err(("invalid_token", "missing Authorization header".to_string())),
        Some(v) => v.to_str().map_err(|_| {
            (
                "invalid_token",
                "Authorization header is not ASCII".to_string(),
            )
        })?,
    };
    let token = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") && !t.trim().is_empty() => {
            t.trim()
        }
        _ => {
            return Err((
                "invalid_token",
                "Authorization must be \"Bearer <token>\"".to_string(),
            ));
        }
    };
    if shared.cfg.api_keys.iter().any(|k| k == token) {
        return Ok(token.to_string());
    }
    if token.starts_with("chekt_live_") || token.starts_with("chekt_test_") {
        return Err(("invalid_api_key", "unknown API key".to_string()));
    }
    let now = shared.clock.unix();
    let st = shared.lock();
    match st.tokens.get(token) {
        None => Err(("invalid_token", "unknown access token".to_string())),
        Some(t) if t.revoked => Err(("invalid_token", "access token expired".to_string())),
        Some(t) if t.expires_at <= now => Err((
            "invalid_token",
            format!(
                "access token expired at {} (server time {now})",
                t.expires_at
            ),
        )),
        Some(t) => {
            tracing::trace!(client = %t.client, kid = %t.kid, "simulator: bearer accepted");
            Ok(t.client.clone())
        }
    }
}

/// Take one token from `app`'s bucket. `Ok(None)`: rate limiting is off.
/// `Err((info, retry_after_secs))`: bucket empty.
fn take_token(shared: &Shared, app: &str) -> Result<Option<RateInfo>, (RateInfo, u64)> {
    let Some(rl) = shared.cfg.rate_limit.filter(|r| r.per_minute > 0) else {
        return Ok(None);
    };
    let burst = f64::from(rl.burst.max(1));
    let per_sec = f64::from(rl.per_minute) / 60.0;
    let now = Instant::now();
    let now_unix = shared.clock.unix();
    let mut st = shared.lock();
    let bucket = st.buckets.entry(app.to_string()).or_insert(Bucket {
        tokens: burst,
        last: now,
    });
    let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
    bucket.tokens = (bucket.tokens + elapsed * per_sec).min(burst);
    bucket.last = now;
    let ok = bucket.tokens >= 1.0;
    if ok {
        bucket.tokens -= 1.0;
    }
    let tokens = bucket.tokens;
    let info = RateInfo {
        limit: rl.per_minute,
        remaining: tokens.floor().max(0.0) as u32,
        reset: now_unix + ((burst - tokens) / per_sec).ceil() as i64,
    };
    if ok {
        Ok(Some(info))
    } else {
        let secs = ((1.0 - tokens) / per_sec).ceil().max(1.0) as u64;
        Err((info, secs))
    }
}

async fn process(
    shared: &Shared,
    app: &str,
    headers: &HeaderMap,
    body: Incoming,
    rid: &str,
) -> Resp {
    let bad_request = |code: &str, msg: &str| {
        shared.lock().stats.bad_request_400 += 1;
        http::envelope(StatusCode::BAD_REQUEST, code, msg, rid, None)
    };
    let key = match headers.get("idempotency-key") {
        None => {
            return bad_request(
                "idempotency_key_required",
                "Idempotency-Key header is required on POST /partner/v1/events",
            );
        }
        Some(v) => match v.to_str() {
            Ok(k) if k.trim().is_empty() => {
                return bad_request(
                    "idempotency_key_required",
                    "Idempotency-Key header is empty",
                );
            }
            Ok(k) if k.len() > MAX_IDEMPOTENCY_KEY => {
                return bad_request(
                    "invalid_idempotency_key",
                    &format!(
                        "Idempotency-Key is {} characters, at most {MAX_IDEMPOTENCY_KEY} allowed",
                        k.len()
                    ),
                );
            }
            Ok(k) => k.to_string(),
            Err(_) => {
                return bad_request(
                    "invalid_idempotency_key",
                    "Idempotency-Key must be visible ASCII",
                );
            }
        },
    };
    if !http::content_type_is(headers, "application/json") {
        return http::envelope(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Content-Type must be application/json",
            rid,
            None,
        );
    }
    let bytes = match http::read_body(body, MAX_EVENT_BODY).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            return http::envelope(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("event body larger than {n} bytes"),
                rid,
                None,
            );
        }
        Err(BodyError::Io(e)) => {
            return bad_request("invalid_body", &format!("cannot read body: {e}"));
        }
    };
    let trace_id = http::header_str(headers, "x-partner-trace-id").map(str::to_string);
    let parsed = serde_json::from_slice::<Value>(&bytes);
    let digest = match &parsed {
        Ok(v) => sha256(canonical_json(v).as_bytes()),
        Err(_) => sha256(&bytes),
    };
    let lost = shared.chance(shared.faults().lost_response_rate);
    let now = shared.clock.unix();
    let idem_key = (app.to_string(), EVENTS_PATH, key.clone());

    let mut st = shared.lock();
    if now - st.last_prune >= 60 {
        st.idem
            .retain(|_, e| e.stored_at + IDEMPOTENCY_WINDOW_SECS > now);
        st.last_prune = now;
    }
    if let Some(entry) = st
        .idem
        .get(&idem_key)
        .filter(|e| e.stored_at + IDEMPOTENCY_WINDOW_SECS > now)
        .cloned()
    {
        if entry.body_hash == digest {
            st.stats.events_replayed += 1;
            if (200..300).contains(&entry.status)
                && let Some(r) = st.received.get_mut(entry.received_idx)
            {
                r.deliveries += 1;
            }
            drop(st);
            let status = StatusCode::from_u16(entry.status).unwrap_or(StatusCode::CREATED);
            let mut r = http::raw_json(status, Bytes::from(entry.response));
            r.headers_mut().insert(
                HeaderName::from_static("idempotent-replayed"),
                HeaderValue::from_static("true"),
            );
            return r;
        }
        st.stats.conflicts_409 += 1;
        drop(st);
        return http::envelope(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            &format!("Idempotency-Key \"{key}\" was already used with a different payload"),
            rid,
            None,
        );
    }
    let value = match parsed {
        Ok(v) => v,
        Err(e) => {
            st.stats.bad_request_400 += 1;
            drop(st);
            return http::envelope(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                &format!("body is not JSON: {e}"),
                rid,
                None,
            );
        }
    };
    if let Err((field, msg)) = validate(&value) {
        st.stats.validation_422 += 1;
        drop(st);
        return http::envelope(
            StatusCode::UNPROCESSABLE_ENTITY,
            "validation_error",
            &msg,
            rid,
            field,
        );
    }
    let location = value["location_id"].as_str().unwrap_or_default();
    if let Some(known) = &shared.cfg.known_locations
        && !known.iter().any(|l| l == location)
    {
        st.stats.not_found_404 += 1;
        drop(st);
        return http::envelope(
            StatusCode::NOT_FOUND,
            "location_not_found",
            &format!("location \"{location}\" not found"),
            rid,
            Some("location_id"),
        );
    }

    // Accept.
    let event_id = format!("evt_{}", shared.random_id(16));
    let base = &shared.base_url;
    let response = serde_json::json!({
        "id": event_id,
        "request_id": rid,
        "upload_urls": {
            "snapshot": format!("{base}/upload/{event_id}/snapshot.jpg"),
            "clip": format!("{base}/upload/{event_id}/clip.mp4"),
        },
    })
    .to_string();
    let received = Received {
        idempotency_key: key.clone(),
        body: value,
        client: app.to_string(),
        trace_id,
        at: shared.clock.now(),
        deliveries: if lost { 0 } else { 1 },
        event_id: event_id.clone(),
    };
    let received_idx = st.received.len();
    st.received.push(received.clone());
    st.event_ids.insert(event_id.clone());
    st.idem.insert(
        idem_key,
        IdemEntry {
            body_hash: digest,
            status: StatusCode::CREATED.as_u16(),
            response: response.clone().into_bytes(),
            stored_at: now,
            received_idx,
        },
    );
    st.stats.events_accepted += 1;
    if lost {
        st.stats.lost_responses += 1;
        st.stats.injected_faults += 1;
    }
    drop(st);
    let _ = shared.received_tx.send(received);
    tracing::info!(%app, %key, %event_id, lost, "simulator: event accepted");
    if lost {
        return http::envelope(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal error (injected after the event was stored)",
            rid,
            None,
        );
    }
    http::raw_json(StatusCode::CREATED, Bytes::from(response))
}

/// `Err((field, message))` for a body CHeKT would refuse with 422.
fn validate(v: &Value) -> Result<(), (Option<&'static str>, String)> {
    let Some(obj) = v.as_object() else {
        return Err((None, "body must be a JSON object".to_string()));
    };
    match obj.get("version") {
        Some(Value::String(s)) if s == "1.0" => {}
        None => return Err((Some("version"), "version is required".to_string())),
        Some(other) => {
            return Err((
                Some("version"),
                format!("version must be \"1.0\", got {other}"),
            ));
        }
    }
    for field in ["location_id", "event_id"] {
        match obj.get(field) {
            Some(Value::String(s)) if !s.is_empty() => {}
            None => return Err((Some(field), format!("{field} is required"))),
            Some(_) => {
                return Err((Some(field), format!("{field} must be a non-empty string")));
            }
        }
    }
    for (field, allowed) in [
        ("event_type", &EVENT_TYPES[..]),
        ("event_status", &EVENT_STATUSES[..]),
    ] {
        match obj.get(field) {
            Some(Value::String(s)) if allowed.contains(&s.as_str()) => {}
            None => return Err((Some(field), format!("{field} is required"))),
            Some(other) => {
                return Err((
                    Some(field),
                    format!("{field} must be one of {}, got {other}", allowed.join(", ")),
                ));
            }
        }
    }
    for field in ["recorder_id", "camera_id"] {
        if obj.get(field).is_some_and(|v| !v.is_string()) {
            return Err((Some(field), format!("{field} must be a string")));
        }
    }
    Ok(())
}

/// JSON with object keys sorted and no whitespace, so equal values hash equally whatever
/// the sender's formatting or key order.
pub(crate) fn canonical_json(v: &Value) -> String {
    fn write(v: &Value, out: &mut String) {
        match v {
            Value::Object(m) => {
                let mut entries: Vec<(&String, &Value)> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                out.push('{');
                for (i, (k, v)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&Value::from(k.as_str()).to_string());
                    out.push(':');
                    write(v, out);
                }
                out.push('}');
            }
            Value::Array(a) => {
                out.push('[');
                for (i, v) in a.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(v, out);
                }
                out.push(']');
            }
            other => out.push_str(&other.to_string()),
        }
    }
    let mut out = String::new();
    write(v, &mut out);
    out
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// `PUT /upload/{event id}/{snapshot.jpg|clip.mp4}`: accept media for an accepted event.
/// The URLs are bearer-less, like pre-signed URLs.
pub(crate) async fn upload(shared: &Shared, req: Request<Incoming>, rid: &str) -> Resp {
    let path = req.uri().path().to_string();
    let mut segs = path.trim_start_matches("/upload/").splitn(2, '/');
    let event_id = segs.next().unwrap_or_default().to_string();
    let name = segs.next().unwrap_or_default().to_string();
    let known = shared.lock().event_ids.contains(&event_id);
    if !known || !UPLOAD_NAMES.contains(&name.as_str()) {
        shared.lock().stats.not_found_404 += 1;
        return http::envelope(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no upload target {path}"),
            rid,
            None,
        );
    }
    let content_type = http::header_str(req.headers(), "content-type").map(str::to_string);
    let bytes = match http::read_body(req.into_body(), MAX_UPLOAD).await {
        Ok(b) => b,
        Err(BodyError::TooLarge(n)) => {
            return http::envelope(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                &format!("upload larger than {n} bytes"),
                rid,
                None,
            );
        }
        Err(BodyError::Io(e)) => {
            return http::envelope(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                &format!("cannot read body: {e}"),
                rid,
                None,
            );
        }
    };
    let mut st = shared.lock();
    st.stats.uploads += 1;
    st.uploads.push(Upload {
        event_id: event_id.clone(),
        name: name.clone(),
        content_type,
        bytes: bytes.len(),
        at: shared.clock.now(),
    });
    drop(st);
    http::json(
        StatusCode::OK,
        &serde_json::json!({"event_id": event_id, "name": name, "bytes": bytes.len(), "request_id": rid}),
    )
}
