//! The token endpoint, `POST /oauth/token`, behaving like CHeKT's Auth0 tenant for the
//! `client_credentials` grant with a `private_key_jwt` client assertion (RFC 7523), and the
//! validation of the public keys registered per client.
//!
//! Invariants: an assertion is accepted only if its signature verifies — through
//! `jsonwebtoken::decode` with `DecodingKey::from_jwk` of the client's registered public key
//! named by the header `kid`, and `crate::jwt`'s ring provider — and all of these hold:
//! `alg` in {RS256, RS384, PS256, ES256} and equal to the JWK's `alg` when it has one;
//! `iss` = `sub` = a registered client_id; `aud` = the tenant URL with trailing slash;
//! `iss`/`sub`/`jti` at most 64 chars; `exp - iat` at most 300 s; `iat` within 10 s of the
//! simulator's clock; `exp` not past (10 s leeway); `nbf` (if any) not ahead (10 s leeway);
//! `jti` never accepted before for that client (remembered until its `exp` + leeway). The
//! `iss` is read unverified only to pick the client whose keys then verify the signature.
//! Errors are Auth0-shaped (`{"error","error_description"}`): 400 `invalid_request` /
//! `unsupported_grant_type`, 401 `invalid_client` (everything about the assertion), 403
//! `access_denied` (unknown audience, as Auth0 does), 503 `temporarily_unavailable` (fault);
//! the description names exactly what failed.

use std::collections::HashMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, StatusCode};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;

use super::SimError;
use super::http::{self, BodyError, Resp};
use super::state::{IssuedToken, Shared};

/// `client_assertion_type` of RFC 7523.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Longest assertion lifetime (`exp - iat`) Auth0 accepts.
pub const MAX_ASSERTION_LIFETIME: i64 = 300;
/// Clock skew tolerated on `iat`, `exp` and `nbf`.
pub const LEEWAY: i64 = 10;
/// Longest `iss`/`sub`/`jti` Auth0 accepts.
pub const MAX_CLAIM_LEN: usize = 64;
/// Most public keys a client may have registered at once.
pub const MAX_KEYS: usize = 2;

const ALLOWED: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::PS256,
    Algorithm::ES256,
];
const ALLOWED_NAMES: &str = "RS256, RS384, PS256, ES256";

struct TokenError {
    status: StatusCode,
    error: &'static str,
    description: String,
}

fn invalid_request(d: impl Into<String>) -> TokenError {
    TokenError {
        status: StatusCode::BAD_REQUEST,
        error: "invalid_request",
        description: d.into(),
    }
}

fn invalid_client(d: impl Into<String>) -> TokenError {
    TokenError {
        status: StatusCode::UNAUTHORIZED,
        error: "invalid_client",
        description: d.into(),
    }
}

fn access_denied(d: impl Into<String>) -> TokenError {
    TokenError {
        status: StatusCode::FORBIDDEN,
        error: "access_denied",
        description: d.into(),
    }
}

pub(crate) async fn handle(shared: &Shared, req: Request<Incoming>) -> Resp {
    let faults = shared.faults();
    if shared.chance(faults.token_error_rate) {
        shared.lock().stats.injected_faults += 1;
        return http::oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "injected fault: the token endpoint is unavailable, retry later",
        );
    }
    let (parts, body) = req.into_parts();
    let result = if !http::content_type_is(&parts.headers, "application/x-www-form-urlencoded") {
        Err(invalid_request(
            "Content-Type must be application/x-www-form-urlencoded",
        ))
    } else {
        match http::read_body(body, 64 * 1024).await {
            Ok(bytes) => parse_form(&bytes)
                .map_err(invalid_request)
                .and_then(|form| issue(shared, &form)),
            Err(BodyError::TooLarge(n)) => Err(invalid_request(format!(
                "request body larger than {n} bytes"
            ))),
            Err(BodyError::Io(e)) => Err(invalid_request(format!("cannot read body: {e}"))),
        }
    };
    match result {
        Ok(body) => {
            let mut r = http::json(StatusCode::OK, &body);
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => {
            shared.lock().stats.token_rejected += 1;
            tracing::info!(status = e.status.as_u16(), error = e.error, description = %e.description, "simulator: token request refused");
            http::oauth_error(e.status, e.error, &e.description)
        }
    }
}

/// Issue an access token for a valid request, or say exactly why not.
fn issue(shared: &Shared, form: &HashMap<String, String>) -> Result<Value, TokenError> {
    let cfg = &shared.cfg;
    match form.get("grant_type").map(String::as_str) {
        None | Some("") => return Err(invalid_request("missing grant_type")),
        Some("client_credentials") => {}
        Some(other) => {
            return Err(TokenError {
                status: StatusCode::BAD_REQUEST,
                error: "unsupported_grant_type",
                description: format!(
                    "grant_type \"{other}\" not supported; use client_credentials"
                ),
            });
        }
    }
    match form.get("client_assertion_type").map(String::as_str) {
        Some(JWT_BEARER) => {}
        None | Some("") => {
            return Err(invalid_request(format!(
                "missing client_assertion_type (must be {JWT_BEARER})"
            )));
        }
        Some(other) => {
            return Err(invalid_request(format!(
                "client_assertion_type \"{other}\" must be {JWT_BEARER}"
            )));
        }
    }
    let assertion = match form.get("client_assertion").map(String::as_str) {
        None | Some("") => return Err(invalid_request("missing client_assertion")),
        Some(a) => a,
    };
    match form.get("audience").map(String::as_str) {
        None | Some("") => {
            return Err(access_denied(format!(
                "no audience parameter was provided (expected {})",
                cfg.api_audience
            )));
        }
        Some(a) if a == cfg.api_audience => {}
        Some(a) => {
            return Err(access_denied(format!(
                "service not found: audience \"{a}\" (expected {})",
                cfg.api_audience
            )));
        }
    }
    if let Some(claim) = form.get(&cfg.partner_claim) {
        match serde_json::from_str::<Value>(claim) {
            Ok(Value::Object(_)) => {}
            _ => {
                return Err(invalid_request(format!(
                    "{} must be a JSON object serialised as a string, got {claim:?}",
                    cfg.partner_claim
                )));
            }
        }
    }

    let verified = verify_assertion(shared, assertion)?;
    if let Some(id) = form.get("client_id").filter(|id| **id != verified.client) {
        return Err(invalid_client(format!(
            "client_id \"{id}\" does not match the assertion's iss \"{}\"",
            verified.client
        )));
    }
    let now = shared.clock.unix();
    let lifetime = i64::try_from(cfg.token_lifetime.as_secs()).unwrap_or(i64::MAX / 2);
    let token = URL_SAFE_NO_PAD.encode(shared.random_bytes(32));

    let mut st = shared.lock();
    st.jtis.retain(|_, exp| *exp + LEEWAY >= now);
    let jti_key = (verified.client.clone(), verified.jti.clone());
    if st.jtis.contains_key(&jti_key) {
        return Err(invalid_client(format!(
            "jti already used: \"{}\" was seen before for client \"{}\"",
            verified.jti, verified.client
        )));
    }
    st.jtis.insert(jti_key, verified.exp);
    // Forget tokens that expired more than a day ago.
    st.tokens.retain(|_, t| t.expires_at + 86_400 >= now);
    st.tokens.insert(
        token.clone(),
        IssuedToken {
            client: verified.client.clone(),
            expires_at: now.saturating_add(lifetime),
            kid: verified.kid.clone(),
            revoked: false,
        },
    );
    *st.tokens_by_kid.entry(verified.kid.clone()).or_default() += 1;
    st.stats.token_ok += 1;
    drop(st);
    tracing::info!(client = %verified.client, kid = %verified.kid, "simulator: access token issued");
    Ok(serde_json::json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": lifetime,
    }))
}

struct Verified {
    client: String,
    kid: String,
    jti: String,
    exp: i64,
}

fn verify_assertion(shared: &Shared, assertion: &str) -> Result<Verified, TokenError> {
    // Header: alg against the allow-list before anything else (also catches "none"/HS*).
    let segments: Vec<&str> = assertion.split('.').collect();
    if segments.len() != 3 {
        return Err(invalid_client(format!(
            "client_assertion is not a compact JWS: {} dot-separated parts, expected 3",
            segments.len()
        )));
    }
    let raw_header = URL_SAFE_NO_PAD
        .decode(segments[0])
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .ok_or_else(|| invalid_client("client_assertion header is not base64url JSON"))?;
    let alg_name = raw_header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_client("assertion header has no alg"))?;
    let alg = alg_name
        .parse::<Algorithm>()
        .ok()
        .filter(|a| ALLOWED.contains(a))
        .ok_or_else(|| {
            invalid_client(format!(
                "alg {alg_name} not allowed (allowed: {ALLOWED_NAMES})"
            ))
        })?;
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|e| invalid_client(format!("malformed assertion header: {e}")))?;
    let kid = header
        .kid
        .clone()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| invalid_client("assertion header has no kid"))?;

    // Unverified claims: only to find the client (and to word errors precisely).
    let claims: Value = jsonwebtoken::dangerous::insecure_decode::<Value>(assertion)
        .map_err(|e| invalid_client(format!("malformed assertion payload: {e}")))?
        .claims;
    if !claims.is_object() {
        return Err(invalid_client("assertion payload is not a JSON object"));
    }
    let client = claims
        .get("iss")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_client("assertion has no iss claim (must be the client_id)"))?
        .to_string();
    check_len("iss", &client)?;
    let jwk = {
        let st = shared.lock();
        let keys = st
            .clients
            .get(&client)
            .ok_or_else(|| invalid_client(format!("unknown client \"{client}\"")))?;
        keys.iter()
            .find(|k| k.common.key_id.as_deref() == Some(kid.as_str()))
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = keys
                    .iter()
                    .filter_map(|k| k.common.key_id.as_deref())
                    .collect();
                invalid_client(format!(
                    "unknown kid \"{kid}\" for client \"{client}\" (registered: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ))
            })?
    };
    if let Some(ka) = jwk.common.key_algorithm {
        match Algorithm::try_from(ka) {
            Ok(key_alg) if key_alg == alg => {}
            _ => {
                return Err(invalid_client(format!(
                    "alg {alg_name} does not match alg {ka} registered for kid \"{kid}\""
                )));
            }
        }
    }
    if let Err(why) = key_fits(&jwk, alg) {
        return Err(invalid_client(format!(
            "alg {alg_name} cannot be used with kid \"{kid}\": {why}"
        )));
    }
    let key = DecodingKey::from_jwk(&jwk)
        .map_err(|e| invalid_client(format!("registered key \"{kid}\" unusable: {e}")))?;

    // Signature and the standard claims; times are checked below against the simulator clock.
    let aud = &shared.tenant_audience;
    let mut v = Validation::new(alg);
    v.leeway = LEEWAY.unsigned_abs();
    v.validate_exp = false;
    v.validate_nbf = false;
    v.set_audience(&[aud]);
    v.set_issuer(&[&client]);
    v.sub = Some(client.clone());
    v.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let show = |name: &str| {
        claims
            .get(name)
            .map(Value::to_string)
            .unwrap_or_else(|| "nothing".to_string())
    };
    jsonwebtoken::decode::<Value>(assertion, &key, &v).map_err(|e| {
        invalid_client(match e.kind() {
            ErrorKind::InvalidSignature => {
                format!("signature does not verify with kid \"{kid}\" of client \"{client}\"")
            }
            ErrorKind::InvalidAudience => format!("aud must be {aud} (got {})", show("aud")),
            ErrorKind::InvalidIssuer => format!("iss must be \"{client}\" (got {})", show("iss")),
            ErrorKind::InvalidSubject => format!(
                "sub must equal iss, the client_id \"{client}\" (got {})",
                show("sub")
            ),
            ErrorKind::MissingRequiredClaim(c) => format!("assertion has no {c} claim"),
            ErrorKind::InvalidClaimFormat(c) => format!("claim {c} has an invalid format"),
            ErrorKind::InvalidAlgorithm => {
                format!("alg {alg_name} does not fit kid \"{kid}\"")
            }
            _ => format!("assertion rejected: {e}"),
        })
    })?;

    // Claims Auth0 adds to RFC 7523, against the simulator's clock.
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default();
    check_len("sub", sub)?;
    let jti = match claims.get("jti") {
        Some(Value::String(j)) if !j.is_empty() => j.clone(),
        Some(_) => return Err(invalid_client("jti must be a non-empty string")),
        None => return Err(invalid_client("assertion has no jti claim")),
    };
    check_len("jti", &jti)?;
    let exp = numeric(&claims, "exp")?;
    let iat = numeric(&claims, "iat")?;
    let now = shared.clock.unix();
    if exp <= iat {
        return Err(invalid_client(format!("exp {exp} is not after iat {iat}")));
    }
    if exp - iat > MAX_ASSERTION_LIFETIME {
        return Err(invalid_client(format!(
            "assertion lifetime {} s exceeds {MAX_ASSERTION_LIFETIME} s",
            exp - iat
        )));
    }
    if (iat - now).abs() > LEEWAY {
        return Err(invalid_client(format!(
            "iat {iat} is {} s from server time {now} ({}; at most {LEEWAY} s allowed)",
            (iat - now).abs(),
            if iat > now {
                "in the future"
            } else {
                "in the past"
            }
        )));
    }
    if exp + LEEWAY <= now {
        return Err(invalid_client(format!(
            "assertion expired: exp {exp} is before server time {now}"
        )));
    }
    if claims.get("nbf").is_some() {
        let nbf = numeric(&claims, "nbf")?;
        if nbf > now + LEEWAY {
            return Err(invalid_client(format!(
                "assertion not valid yet: nbf {nbf} is after server time {now}"
            )));
        }
    }
    Ok(Verified {
        client,
        kid,
        jti,
        exp,
    })
}

fn check_len(name: &str, value: &str) -> Result<(), TokenError> {
    let n = value.chars().count();
    if n > MAX_CLAIM_LEN {
        return Err(invalid_client(format!(
            "{name} is {n} characters, at most {MAX_CLAIM_LEN} allowed"
        )));
    }
    Ok(())
}

/// A NumericDate claim as whole seconds.
fn numeric(claims: &Value, name: &str) -> Result<i64, TokenError> {
    match claims.get(name) {
        None => Err(invalid_client(format!("assertion has no {name} claim"))),
        Some(v) => v
            .as_i64()
            .or_else(|| {
                v.as_f64()
                    .filter(|f| f.is_finite())
                    .map(|f| f.floor() as i64)
            })
            .ok_or_else(|| invalid_client(format!("{name} must be a number, got {v}"))),
    }
}

/// Does the key's type fit the algorithm's family?
fn key_fits(jwk: &Jwk, alg: Algorithm) -> Result<(), String> {
    match (&jwk.algorithm, alg) {
        (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256) => {
            if p.curve == EllipticCurve::P256 {
                Ok(())
            } else {
                Err(format!("ES256 needs curve P-256, key has {:?}", p.curve))
            }
        }
        (AlgorithmParameters::RSA(_), Algorithm::RS256 | Algorithm::RS384 | Algorithm::PS256) => {
            Ok(())
        }
        (AlgorithmParameters::RSA(_), _) => Err("key is RSA".to_string()),
        (AlgorithmParameters::EllipticCurve(_), _) => Err("key is EC".to_string()),
        _ => Err("unsupported key type".to_string()),
    }
}

/// Validate a key set before [`super::Simulator::register_client`] stores it.
pub(crate) fn check_registration(client_id: &str, jwks: &[Jwk]) -> Result<(), SimError> {
    if client_id.is_empty() || client_id.chars().count() > MAX_CLAIM_LEN {
        return Err(SimError::BadClientId(client_id.to_string()));
    }
    if jwks.len() > MAX_KEYS {
        return Err(SimError::TooManyKeys {
            client: client_id.to_string(),
            count: jwks.len(),
        });
    }
    let mut seen: Vec<&str> = Vec::new();
    for jwk in jwks {
        let kid = match jwk.common.key_id.as_deref() {
            Some(k) if !k.is_empty() => k,
            _ => {
                return Err(SimError::MissingKid {
                    client: client_id.to_string(),
                });
            }
        };
        if seen.contains(&kid) {
            return Err(SimError::DuplicateKid {
                client: client_id.to_string(),
                kid: kid.to_string(),
            });
        }
        seen.push(kid);
        let bad = |reason: String| SimError::BadKey {
            client: client_id.to_string(),
            kid: kid.to_string(),
            reason,
        };
        match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => {
                let n = URL_SAFE_NO_PAD
                    .decode(&p.n)
                    .map_err(|e| bad(format!("n is not base64url: {e}")))?;
                let first = n.iter().position(|b| *b != 0).unwrap_or(n.len());
                let bits = (n.len() - first) * 8;
                if bits < 2048 {
                    return Err(bad(format!(
                        "RSA modulus of about {bits} bits; at least 2048 required"
                    )));
                }
            }
            AlgorithmParameters::EllipticCurve(p) => {
                if p.curve != EllipticCurve::P256 {
                    return Err(bad(format!("curve {:?} not supported; use P-256", p.curve)));
                }
                for (name, c) in [("x", &p.x), ("y", &p.y)] {
                    let len = URL_SAFE_NO_PAD
                        .decode(c)
                        .map_err(|e| bad(format!("{name} is not base64url: {e}")))?
                        .len();
                    if len != 32 {
                        return Err(bad(format!("{name} is {len} bytes, expected 32")));
                    }
                }
            }
            _ => return Err(bad("only RSA and EC P-256 keys are supported".to_string())),
        }
        if let Some(ka) = jwk.common.key_algorithm {
            let alg = Algorithm::try_from(ka)
                .ok()
                .filter(|a| ALLOWED.contains(a))
                .ok_or_else(|| bad(format!("alg {ka} not allowed (allowed: {ALLOWED_NAMES})")))?;
            key_fits(jwk, alg).map_err(|why| bad(format!("alg {ka} does not fit: {why}")))?;
        }
        DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
    }
    Ok(())
}

/// Parse `application/x-www-form-urlencoded`: `&`-separated `name=value`, percent-decoded,
/// `+` = space. A repeated parameter is an error (RFC 6749 §3.2).
pub(crate) fn parse_form(body: &[u8]) -> Result<HashMap<String, String>, String> {
    let text = std::str::from_utf8(body).map_err(|_| "form body is not UTF-8".to_string())?;
    let mut out = HashMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k)?;
        let v = percent_decode(v)?;
        if out.contains_key(&k) {
            return Err(format!("parameter {k} repeated"));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in {s:?}"))?;
                out.push(hex);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| format!("form value {s:?} is not UTF-8"))
}
