//! Agent configuration: one TOML file, validated into typed settings before anything starts.
//!
//! Owns: the file format (every key, its default, its limits), and the error that names
//! the file, the key and what is wrong. `etc/agent.example.toml`-style documentation lives
//! in `systemd/agent.example.toml`, which a test parses so it cannot drift from this code.
//!
//! Invariants: a [`Config`] that exists is valid — URLs parse and are HTTPS (unless
//! `chekt.allow_insecure_http` is set for a lab), durations and sizes are within their limits,
//! the auth mode has what it needs. Validation does no network I/O; it reads only the
//! config file itself, the site file it names, and (for `api_key_file`) that file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::site::{SiteConfig, SiteError};

/// Default location of the configuration file.
pub const DEFAULT_PATH: &str = "/etc/chekt-agent/agent.toml";

/// A configuration problem. Always names the file; names the key when there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: String,
        key: String,
        message: String,
    },
    #[error(transparent)]
    Site(#[from] SiteError),
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "d_site_file")]
    site_file: PathBuf,
    #[serde(default = "d_state_dir")]
    state_dir: PathBuf,
    #[serde(default)]
    mqtt: RawMqtt,
    chekt: RawChekt,
    #[serde(default)]
    spool: RawSpool,
    #[serde(default)]
    log: RawLog,
}

fn d_site_file() -> PathBuf {
    "/etc/chekt-agent/site.toml".into()
}
fn d_state_dir() -> PathBuf {
    "/var/lib/chekt-agent".into()
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawMqtt {
    host: String,
    port: u16,
    client_id: String,
    username: Option<String>,
    password: Option<String>,
    keep_alive_secs: u64,
    reconnect_max_secs: u64,
    max_inflight: u16,
}

impl Default for RawMqtt {
    fn default() -> Self {
        RawMqtt {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "chekt-agent".into(),
            username: None,
            password: None,
            keep_alive_secs: 30,
            reconnect_max_secs: 30,
            max_inflight: 100,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChekt {
    #[serde(default = "d_api_url")]
    api_url: String,
    #[serde(default = "d_events_path")]
    events_path: String,
    #[serde(default = "d_auth")]
    auth: String,
    api_key: Option<String>,
    api_key_file: Option<PathBuf>,
    client_id: Option<String>,
    token_url: Option<String>,
    tenant_audience: Option<String>,
    #[serde(default = "d_api_audience")]
    api_audience: String,
    #[serde(default = "d_partner_claim")]
    partner_claim: String,
    dealer_id: Option<String>,
    chekt_site_id: Option<String>,
    #[serde(default = "d_assertion_lifetime")]
    assertion_lifetime_secs: u64,
    #[serde(default = "d_refresh_before")]
    refresh_before_secs: u64,
    ca_file: Option<PathBuf>,
    #[serde(default)]
    allow_insecure_http: bool,
    #[serde(default = "d_timeout")]
    request_timeout_secs: u64,
    #[serde(default = "d_rate")]
    rate_per_minute: u32,
    #[serde(default = "d_burst")]
    burst: u32,
    #[serde(default = "d_backoff_base")]
    backoff_base_ms: u64,
    #[serde(default = "d_backoff_max")]
    backoff_max_secs: u64,
    key_dir: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

fn d_api_url() -> String {
    "https://api.chekt.com".into()
}
fn d_events_path() -> String {
    "/partner/v1/events".into()
}
fn d_auth() -> String {
    "assertion".into()
}
fn d_api_audience() -> String {
    "https://adc-m2m.chekt.com/".into()
}
fn d_partner_claim() -> String {
    "https://api.chektdev.com/claims/partner".into()
}
fn d_assertion_lifetime() -> u64 {
    120
}
fn d_refresh_before() -> u64 {
    300
}
fn d_timeout() -> u64 {
    10
}
fn d_rate() -> u32 {
    600
}
fn d_burst() -> u32 {
    30
}
fn d_backoff_base() -> u64 {
    250
}
fn d_backoff_max() -> u64 {
    60
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawSpool {
    max_bytes: u64,
    cache_bytes: u64,
    max_batch: usize,
    max_dead_letters: u64,
}

impl Default for RawSpool {
    fn default() -> Self {
        RawSpool {
            max_bytes: 64 * 1024 * 1024,
            cache_bytes: 2 * 1024 * 1024,
            max_batch: 512,
            max_dead_letters: 10_000,
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
        }
    }
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub site_file: PathBuf,
    pub state_dir: PathBuf,
    pub mqtt: MqttConfig,
    pub chekt: ChektConfig,
    pub spool: SpoolConfig,
    pub log_level: String,
}

#[derive(Clone, Debug)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    pub client_id: String,
    pub credentials: Option<(String, Redacted)>,
    pub keep_alive: Duration,
    pub reconnect_max: Duration,
    pub max_inflight: u16,
}

/// A string that never shows in `Debug` or logs.
#[derive(Clone, PartialEq, Eq)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Clone, Debug)]
pub enum AuthMode {
    /// RFC 7523 assertion tokens signed with the device key (the production tier).
    Assertion(Box<AssertionConfig>),
    /// Static API key (`chekt_test_...`): bring-up only, the weaker tier.
    ApiKey(Redacted),
}

#[derive(Clone, Debug)]
pub struct AssertionConfig {
    pub client_id: String,
    pub token_url: String,
    pub tenant_audience: String,
    pub api_audience: String,
    pub partner_claim: String,
    pub dealer_id: Option<String>,
    pub chekt_site_id: Option<String>,
    pub assertion_lifetime: Duration,
    pub refresh_before: Duration,
    pub key_dir: PathBuf,
    /// The installed device key (what `provision` writes and the unit loads as its
    /// credential); current while `key_dir` has none and no credential is passed.
    pub key_file: PathBuf,
}

impl AssertionConfig {
    /// The key store of this configuration, in this process's environment.
    pub fn key_store(&self) -> crate::keys::KeyStore {
        crate::keys::KeyStore::from_env(self.key_dir.clone()).with_installed(self.key_file.clone())
    }
}

#[derive(Clone, Debug)]
pub struct ChektConfig {
    pub api_url: String,
    pub events_path: String,
    pub auth: AuthMode,
    pub ca_file: Option<PathBuf>,
    pub request_timeout: Duration,
    pub rate_per_minute: u32,
    pub burst: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl ChektConfig {
    pub fn events_url(&self) -> String {
        format!("{}{}", self.api_url.trim_end_matches('/'), self.events_path)
    }
}

#[derive(Clone, Debug)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub cache_bytes: u64,
    pub max_batch: usize,
    pub max_dead_letters: u64,
}

impl Config {
    /// Read, parse and validate `path`, including the site file it names.
    pub fn load(path: &Path) -> Result<(Config, SiteConfig), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let cfg = Config::parse(&text, path)?;
        let site = SiteConfig::load(&cfg.site_file)?;
        Ok((cfg, site))
    }

    /// The one-line "config OK" summary `check-config` and `provision` print.
    pub fn summary(&self, site: &SiteConfig) -> String {
        format!(
            "config OK: {} (site {}: location {}, {} zones, {} cameras, {} topic rules)",
            self.path.display(),
            self.site_file.display(),
            site.location_id,
            site.zones.len(),
            site.cameras.len(),
            site.rules.len()
        )
    }

    /// Parse and validate configuration text; `path` is used in errors and to resolve
    /// relative paths (relative to the file's directory).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.clone(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: origin.clone(),
            key: key.to_string(),
            message,
        };

        let m = raw.mqtt;
        if m.host.trim().is_empty() {
            return Err(invalid("mqtt.host", "must not be empty".into()));
        }
        if m.port == 0 {
            return Err(invalid("mqtt.port", "must be 1-65535".into()));
        }
        if m.client_id.is_empty() || m.client_id.len() > 23 {
            return Err(invalid(
                "mqtt.client_id",
                format!(
                    "must be 1-23 characters (MQTT 3.1.1 limit), got {}",
                    m.client_id.len()
                ),
            ));
        }
        if !(5..=3600).contains(&m.keep_alive_secs) {
            return Err(invalid("mqtt.keep_alive_secs", "must be 5-3600".into()));
        }
        if !(1..=3600).contains(&m.reconnect_max_secs) {
            return Err(invalid("mqtt.reconnect_max_secs", "must be 1-3600".into()));
        }
        if !(1..=1000).contains(&m.max_inflight) {
            return Err(invalid("mqtt.max_inflight", "must be 1-1000".into()));
        }
        let credentials = match (m.username, m.password) {
            (Some(u), Some(p)) => Some((u, Redacted(p))),
            (Some(u), None) => Some((u, Redacted(String::new()))),
            (None, Some(_)) => {
                return Err(invalid(
                    "mqtt.password",
                    "is set but mqtt.username is not".into(),
                ));
            }
            (None, None) => None,
        };
        let mqtt = MqttConfig {
            host: m.host,
            port: m.port,
            client_id: m.client_id,
            credentials,
            keep_alive: Duration::from_secs(m.keep_alive_secs),
            reconnect_max: Duration::from_secs(m.reconnect_max_secs),
            max_inflight: m.max_inflight,
        };

        let state_dir = resolve(&raw.state_dir);
        let c = raw.chekt;
        let check_url = |key: &str, url: &str| -> Result<(), ConfigError> {
            let ok_scheme = url.starts_with("https://")
                || (c.allow_insecure_http && url.starts_with("http://"));
            if !ok_scheme {
                return Err(invalid(key, format!("{url:?} must be an https:// URL")));
            }
            let rest = url.split_once("://").map(|x| x.1).unwrap_or("");
            let host = rest.split(['/', '?']).next().unwrap_or("");
            if host.is_empty() || host.contains(' ') {
                return Err(invalid(key, format!("{url:?} has no valid host")));
            }
            Ok(())
        };
        check_url("chekt.api_url", &c.api_url)?;
        if !c.events_path.starts_with('/') {
            return Err(invalid("chekt.events_path", "must start with `/`".into()));
        }
        let auth = match c.auth.as_str() {
            "assertion" => {
                let client_id = c.client_id.clone().ok_or_else(|| {
                    invalid(
                        "chekt.client_id",
                        "is required when chekt.auth = \"assertion\"".into(),
                    )
                })?;
                if client_id.is_empty() || client_id.len() > 64 {
                    return Err(invalid(
                        "chekt.client_id",
                        "must be 1-64 characters (Auth0 limit)".into(),
                    ));
                }
                let token_url = c.token_url.clone().ok_or_else(|| {
                    invalid(
                        "chekt.token_url",
                        "is required when chekt.auth = \"assertion\"".into(),
                    )
                })?;
                check_url("chekt.token_url", &token_url)?;
                let tenant_audience = match &c.tenant_audience {
                    Some(a) => a.clone(),
                    None => {
                        // https://tenant/oauth/token -> https://tenant/
                        let (scheme, rest) = token_url.split_once("://").unwrap_or(("https", ""));
                        let host = rest.split('/').next().unwrap_or("");
                        format!("{scheme}://{host}/")
                    }
                };
                check_url("chekt.tenant_audience", &tenant_audience)?;
                if !tenant_audience.ends_with('/') {
                    return Err(invalid(
                        "chekt.tenant_audience",
                        format!(
                            "{tenant_audience:?} must end with `/` (Auth0 expects the tenant URL with its trailing slash)"
                        ),
                    ));
                }
                if !(10..=300).contains(&c.assertion_lifetime_secs) {
                    return Err(invalid(
                        "chekt.assertion_lifetime_secs",
                        format!(
                            "must be 10-300 (Auth0 rejects assertions living over 5 minutes), got {}",
                            c.assertion_lifetime_secs
                        ),
                    ));
                }
                if c.refresh_before_secs > 3000 {
                    return Err(invalid(
                        "chekt.refresh_before_secs",
                        "must be at most 3000".into(),
                    ));
                }
                AuthMode::Assertion(Box::new(AssertionConfig {
                    client_id,
                    token_url,
                    tenant_audience,
                    api_audience: c.api_audience.clone(),
                    partner_claim: c.partner_claim.clone(),
                    dealer_id: c.dealer_id.clone(),
                    chekt_site_id: c.chekt_site_id.clone(),
                    assertion_lifetime: Duration::from_secs(c.assertion_lifetime_secs),
                    refresh_before: Duration::from_secs(c.refresh_before_secs),
                    key_dir: c
                        .key_dir
                        .as_deref()
                        .map(resolve)
                        .unwrap_or_else(|| state_dir.join("keys")),
                    key_file: resolve(c.key_file.as_deref().unwrap_or(Path::new("device.key"))),
                }))
            }
            "api_key" => {
                let key = match (&c.api_key, &c.api_key_file) {
                    (Some(k), None) => k.clone(),
                    (None, Some(f)) => {
                        let f = resolve(f);
                        std::fs::read_to_string(&f)
                            .map_err(|e| {
                                invalid(
                                    "chekt.api_key_file",
                                    format!("cannot read {}: {e}", f.display()),
                                )
                            })?
                            .trim()
                            .to_string()
                    }
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            "chekt.api_key",
                            "set chekt.api_key or chekt.api_key_file, not both".into(),
                        ));
                    }
                    (None, None) => {
                        return Err(invalid(
                            "chekt.api_key",
                            "is required when chekt.auth = \"api_key\" (or set chekt.api_key_file)"
                                .into(),
                        ));
                    }
                };
                if !(key.starts_with("chekt_live_") || key.starts_with("chekt_test_")) {
                    return Err(invalid(
                        "chekt.api_key",
                        "must start with chekt_live_ or chekt_test_".into(),
                    ));
                }
                AuthMode::ApiKey(Redacted(key))
            }
            other => {
                return Err(invalid(
                    "chekt.auth",
                    format!("{other:?} is not one of \"assertion\", \"api_key\""),
                ));
            }
        };
        if !(1..=120).contains(&c.request_timeout_secs) {
            return Err(invalid(
                "chekt.request_timeout_secs",
                "must be 1-120".into(),
            ));
        }
        if c.rate_per_minute == 0 {
            return Err(invalid(
                "chekt.rate_per_minute",
                "must be at least 1".into(),
            ));
        }
        if c.burst == 0 {
            return Err(invalid("chekt.burst", "must be at least 1".into()));
        }
        if !(10..=60_000).contains(&c.backoff_base_ms) {
            return Err(invalid("chekt.backoff_base_ms", "must be 10-60000".into()));
        }
        if !(1..=3600).contains(&c.backoff_max_secs) {
            return Err(invalid("chekt.backoff_max_secs", "must be 1-3600".into()));
        }
        let ca_file = c.ca_file.as_deref().map(resolve);
        if let Some(f) = &ca_file
            && !f.is_file()
        {
            return Err(invalid(
                "chekt.ca_file",
                format!("{} does not exist or is not a file", f.display()),
            ));
        }
        let chekt = ChektConfig {
            api_url: c.api_url,
            events_path: c.events_path,
            auth,
            ca_file,
            request_timeout: Duration::from_secs(c.request_timeout_secs),
            rate_per_minute: c.rate_per_minute,
            burst: c.burst,
            backoff_base: Duration::from_millis(c.backoff_base_ms),
            backoff_max: Duration::from_secs(c.backoff_max_secs),
        };

        let s = raw.spool;
        if s.max_bytes < 64 * 1024 {
            return Err(invalid(
                "spool.max_bytes",
                format!("must be at least 65536, got {}", s.max_bytes),
            ));
        }
        if !(64 * 1024..=1024 * 1024 * 1024).contains(&s.cache_bytes) {
            return Err(invalid(
                "spool.cache_bytes",
                "must be between 65536 and 1073741824".into(),
            ));
        }
        if !(1..=10_000).contains(&s.max_batch) {
            return Err(invalid("spool.max_batch", "must be 1-10000".into()));
        }
        if s.max_dead_letters == 0 {
            return Err(invalid(
                "spool.max_dead_letters",
                "must be at least 1".into(),
            ));
        }
        let spool = SpoolConfig {
            dir: state_dir.join("spool"),
            max_bytes: s.max_bytes,
            cache_bytes: s.cache_bytes,
            max_batch: s.max_batch,
            max_dead_letters: s.max_dead_letters,
        };
        let level = raw.log.level;
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(invalid(
                "log.level",
                format!("{level:?} is not a valid level or filter (try \"info\")"),
            ));
        }
        Ok(Config {
            path: path.to_path_buf(),
            site_file: resolve(&raw.site_file),
            state_dir,
            mqtt,
            chekt,
            spool,
            log_level: level,
        })
    }
}
