//! Access tokens for CHeKT: RFC 7523 `private_key_jwt` assertions exchanged at the token
//! endpoint, or a static API key for bring-up.
//!
//! Owns: building and signing assertions, the token request, the cached access token and
//! its refresh, two-phase key rotation (try the staged key; promote on success, keep the
//! current key and say why on failure), and learning the time from CHeKT when the local
//! clock is implausible.
//!
//! Invariants:
//! - Every assertion is fresh: new `jti`, `iat` from the corrected clock, `exp - iat` at
//!   most the configured lifetime (<= 300 s), `kid` header = RFC 7638 thumbprint.
//! - At most one token request is in flight: callers queue on one async mutex and reuse
//!   the token the first caller obtained.
//! - No assertion is minted from an untrusted clock (see [`crate::clock`]).
//! - Tokens, API keys and private keys never appear in `Debug` output or logs.

use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use jsonwebtoken::{Header, encode};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::clock::{Clock, ClockUntrusted};
use crate::config::{AssertionConfig, AuthMode, Redacted};
use crate::keys::{DeviceKey, KeyError, KeyStore};

/// An access token or API key. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Bearer(String);

impl Bearer {
    pub fn header_value(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Clock(#[from] ClockUntrusted),
    #[error("device key: {0}")]
    Key(#[from] KeyError),
    #[error(
        "CHeKT's token endpoint rejected the assertion signed with key kid={kid}: HTTP {status} {error}: {description}"
    )]
    Rejected {
        kid: String,
        status: u16,
        error: String,
        description: String,
    },
    #[error("token endpoint {url} unreachable: {message}")]
    Transport { url: String, message: String },
    #[error("token endpoint answered HTTP {status} (will retry)")]
    Unavailable { status: u16 },
    #[error("token endpoint gave an unusable answer: {0}")]
    BadResponse(String),
    #[error("signing the assertion failed: {0}")]
    Sign(String),
    #[error("CHeKT refused the API key (HTTP 401): check chekt.api_key")]
    ApiKeyRefused,
}

impl AuthError {
    /// Errors that need a person (wrong key, unregistered client, bad API key); the agent
    /// keeps retrying slowly, but reports them as troubles.
    pub fn needs_attention(&self) -> bool {
        matches!(
            self,
            AuthError::Key(_) | AuthError::Rejected { .. } | AuthError::ApiKeyRefused
        )
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    iat: i64,
    exp: i64,
    jti: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    expires_in: u64,
}

#[derive(Deserialize, Default)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

struct Cached {
    token: Bearer,
    refresh_at: Instant,
}

enum Mode {
    Assertion {
        cfg: Box<AssertionConfig>,
        keys: KeyStore,
    },
    ApiKey(Redacted),
}

/// Hands out bearer tokens; refreshes them ahead of expiry, one refresh at a time.
pub struct TokenSource {
    mode: Mode,
    http: reqwest::Client,
    clock: Arc<Clock>,
    cache: Mutex<Option<Cached>>,
    rotation_note: StdMutex<Option<String>>,
}

/// A random UUID v4 string (for `jti` and trace ids).
pub fn uuid_v4() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system RNG failed");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl TokenSource {
    pub fn new(mode: &AuthMode, http: reqwest::Client, clock: Arc<Clock>) -> TokenSource {
        let mode = match mode {
            AuthMode::Assertion(cfg) => Mode::Assertion {
                cfg: cfg.clone(),
                keys: cfg.key_store(),
            },
            AuthMode::ApiKey(k) => Mode::ApiKey(k.clone()),
        };
        TokenSource {
            mode,
            http,
            clock,
            cache: Mutex::new(None),
            rotation_note: StdMutex::new(None),
        }
    }

    /// Replace the key store (tests point it at their own directories).
    pub fn with_key_store(mut self, store: KeyStore) -> TokenSource {
        if let Mode::Assertion { keys, .. } = &mut self.mode {
            *keys = store;
        }
        self
    }

    pub fn clock(&self) -> &Arc<Clock> {
        &self.clock
    }

    /// True for the API-key tier.
    pub fn is_api_key(&self) -> bool {
        matches!(self.mode, Mode::ApiKey(_))
    }

    /// Why the staged key was not promoted at the last attempt, if it was not.
    pub fn rotation_note(&self) -> Option<String> {
        self.rotation_note.lock().ok().and_then(|g| g.clone())
    }

    /// A valid bearer token: the cached one, or a fresh one.
    pub async fn bearer(&self) -> Result<Bearer, AuthError> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.fetch().await?;
        let token = fresh.token.clone();
        *cache = Some(fresh);
        Ok(token)
    }

    /// CHeKT answered 401 to `used`: drop it so the next call fetches a new one.
    /// Returns an error for the API-key tier, where a 401 cannot be fixed by refreshing.
    pub async fn invalidate(&self, used: &Bearer) -> Result<(), AuthError> {
        if self.is_api_key() {
            return Err(AuthError::ApiKeyRefused);
        }
        let mut cache = self.cache.lock().await;
        if cache.as_ref().is_some_and(|c| &c.token == used) {
            *cache = None;
        }
        Ok(())
    }

    async fn fetch(&self) -> Result<Cached, AuthError> {
        let (cfg, keys) = match &self.mode {
            Mode::ApiKey(k) => {
                return Ok(Cached {
                    token: Bearer(k.0.clone()),
                    refresh_at: Instant::now() + Duration::from_secs(100 * 365 * 86400),
                });
            }
            Mode::Assertion { cfg, keys } => (cfg, keys),
        };
        if self.clock.trusted_now().is_err() {
            self.learn_time(&cfg.token_url).await;
        }
        self.clock.trusted_now()?;

        match keys.next() {
            Ok(Some(next)) => match self.exchange(cfg, &next).await {
                Ok(c) => {
                    keys.promote_next()?;
                    tracing::info!(
                        kid = next.kid(),
                        "CHeKT accepted the staged key; promoted it to current (retire the old key at CHeKT)"
                    );
                    self.set_rotation_note(None);
                    return Ok(c);
                }
                Err(e @ AuthError::Rejected { .. }) => {
                    tracing::warn!(error = %e, "staged key not accepted by CHeKT yet; keeping the current key");
                    self.set_rotation_note(Some(e.to_string()));
                }
                Err(e) => return Err(e),
            },
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "staged next key unusable; keeping the current key");
                self.set_rotation_note(Some(e.to_string()));
            }
        }
        let current = keys.current()?;
        self.exchange(cfg, &current).await
    }

    fn set_rotation_note(&self, note: Option<String>) {
        if let Ok(mut g) = self.rotation_note.lock() {
            *g = note;
        }
    }

    /// Any response from CHeKT carries a `Date` header; use it to correct the clock.
    async fn learn_time(&self, url: &str) {
        match self.http.head(url).send().await {
            Ok(resp) => {
                self.observe(&resp);
            }
            Err(e) => tracing::warn!(error = %e, "could not reach CHeKT to learn the time"),
        }
    }

    fn observe(&self, resp: &reqwest::Response) -> bool {
        let Some(v) = resp
            .headers()
            .get(reqwest::header::DATE)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        match self.clock.observe_date_header(v) {
            Some(off) => {
                tracing::warn!(
                    offset_ms = off,
                    "local clock disagrees with CHeKT; signing with corrected time"
                );
                true
            }
            None => false,
        }
    }

    /// One assertion, one token request. Retries once, immediately, when the response
    /// taught the clock a new offset (an assertion from a wrong clock is rejected).
    async fn exchange(&self, cfg: &AssertionConfig, key: &DeviceKey) -> Result<Cached, AuthError> {
        let mut corrected_once = false;
        loop {
            let started = Instant::now();
            let assertion = self.assertion(cfg, key)?;
            let mut form: Vec<(&str, String)> = vec![
                ("grant_type", "client_credentials".into()),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".into(),
                ),
                ("client_assertion", assertion),
                ("audience", cfg.api_audience.clone()),
            ];
            if cfg.dealer_id.is_some() || cfg.chekt_site_id.is_some() {
                let claim = serde_json::json!({
                    "dealer_id": cfg.dealer_id,
                    "site_id": cfg.chekt_site_id,
                });
                form.push((cfg.partner_claim.as_str(), claim.to_string()));
            }
            let resp = self
                .http
                .post(&cfg.token_url)
                .form(&form)
                .send()
                .await
                .map_err(|e| AuthError::Transport {
                    url: cfg.token_url.clone(),
                    message: crate::upload::error_chain(&e),
                })?;
            let learned = self.observe(&resp);
            let status = resp.status().as_u16();
            let body = resp.bytes().await.map_err(|e| AuthError::Transport {
                url: cfg.token_url.clone(),
                message: crate::upload::error_chain(&e),
            })?;
            if (200..300).contains(&status) {
                let t: TokenResponse = serde_json::from_slice(&body)
                    .map_err(|e| AuthError::BadResponse(format!("{e}")))?;
                if let Some(tt) = &t.token_type
                    && !tt.eq_ignore_ascii_case("bearer")
                {
                    return Err(AuthError::BadResponse(format!(
                        "token_type {tt:?} is not Bearer"
                    )));
                }
                if t.access_token.is_empty() {
                    return Err(AuthError::BadResponse("empty access_token".into()));
                }
                let life = Duration::from_secs(t.expires_in.max(1));
                let ahead = cfg.refresh_before.min(life / 2);
                tracing::debug!(
                    kid = key.kid(),
                    expires_in = t.expires_in,
                    "obtained access token"
                );
                return Ok(Cached {
                    token: Bearer(t.access_token),
                    refresh_at: started + life - ahead,
                });
            }
            if status == 408 || status == 429 || status >= 500 {
                return Err(AuthError::Unavailable { status });
            }
            if learned && !corrected_once {
                corrected_once = true;
                continue;
            }
            let e: OAuthError = serde_json::from_slice(&body).unwrap_or_default();
            return Err(AuthError::Rejected {
                kid: key.kid().to_string(),
                status,
                error: e.error,
                description: if e.error_description.is_empty() {
                    String::from_utf8_lossy(&body).chars().take(300).collect()
                } else {
                    e.error_description
                },
            });
        }
    }

    fn assertion(&self, cfg: &AssertionConfig, key: &DeviceKey) -> Result<String, AuthError> {
        let iat = self.clock.trusted_now()?;
        let claims = Claims {
            iss: &cfg.client_id,
            sub: &cfg.client_id,
            aud: &cfg.tenant_audience,
            iat,
            exp: iat + cfg.assertion_lifetime.as_secs() as i64,
            jti: uuid_v4(),
        };
        let mut header = Header::new(key.alg());
        header.kid = Some(key.kid().to_string());
        header.typ = Some("JWT".into());
        encode(&header, &claims, &key.encoding_key()).map_err(|e| AuthError::Sign(e.to_string()))
    }
}
