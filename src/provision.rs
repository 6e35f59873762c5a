//! Provisioning: `chekt-agent provision`, the one installer command that takes a fresh
//! gateway (the package installed, nothing configured) to a state `systemctl start
//! chekt-agent` can run from, and that can be re-run safely.
//!
//! Owns three files and nothing else: the device key (`--key-path`, default
//! `/etc/chekt-agent/device.key`, the file the unit hands to the agent with
//! `LoadCredential=`), the agent configuration (`--config`) and the site file. It creates
//! the key (ES256, or the RSA key given with `--rsa`), writes the settings it is given
//! (and `chekt.key_file` when the key is not `device.key` beside the configuration) into
//! the configuration — creating it from the documented example when missing, otherwise
//! editing only the given keys with `toml_edit`, so comments, order and every other value
//! stay as they were — creates a minimal site file when there is none, prints the public
//! JWK to register with CHeKT, and then validates exactly like `check-config`.
//!
//! Invariants:
//! - Idempotent: re-running with the same arguments writes nothing; every file stays
//!   byte-identical (a file is rewritten only when a given value differs from its own).
//! - Never destroys: an existing key is never replaced (a different `--rsa` key is refused;
//!   rotation is `key rotate`), an existing site file is never rewritten (a conflicting
//!   `--location-id`/`--recorder-id` is refused), and a configuration keeps everything but
//!   the given keys.
//! - Validate before writing: the edited configuration, the new site file and the key are
//!   checked in memory first, so bad input (exit 78, naming the file and the key) changes
//!   nothing on disk.
//! - Modes: the key is created 0600 (owned by the caller: root when run with sudo); a new
//!   configuration or site file 0640, group `chekt-agent` when that group exists, since they
//!   may hold broker and camera credentials; an edited file keeps its mode and owner.
//!   Files are replaced atomically (temporary file, fsync, rename, directory fsync).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::{AuthMode, Config, ConfigError};
use crate::keys::{CURRENT_FILE, DeviceKey, KeyError, KeyStore};
use crate::site::{SiteConfig, SiteError};

/// Default path of the device key: what the unit's `LoadCredential=device.key:` reads.
pub const DEFAULT_KEY_PATH: &str = "/etc/chekt-agent/device.key";
/// The documented example; a missing configuration is created from it.
pub const EXAMPLE_CONFIG: &str = include_str!("../systemd/agent.example.toml");
/// System group of the service user (sysusers.d); new config files are readable by it.
pub const SERVICE_GROUP: &str = "chekt-agent";

/// Example placeholders that must not survive provisioning.
const PLACEHOLDERS: &[(&str, &str, &str)] = &[
    ("chekt", "client_id", "your-client-id"),
    ("chekt", "token_url", "https://tenant.example/oauth/token"),
];

/// `chekt-agent provision` arguments. Every setting is optional: only given ones are
/// written; the rest keep the file's value (for a new file: the example's).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProvisionArgs {
    /// OAuth client id CHeKT issued for this gateway (`chekt.client_id`).
    #[arg(long)]
    pub client_id: Option<String>,
    /// Token endpoint of CHeKT's tenant (`chekt.token_url`).
    #[arg(long)]
    pub token_url: Option<String>,
    /// Partner Event API base URL (`chekt.api_url`; the example's is https://api.chekt.com).
    #[arg(long)]
    pub api_url: Option<String>,
    /// Extra CA certificate file (PEM) to trust (`chekt.ca_file`).
    #[arg(long, value_name = "PEM")]
    pub ca_file: Option<PathBuf>,
    /// The site's MQTT broker host (`mqtt.host`).
    #[arg(long)]
    pub mqtt_host: Option<String>,
    /// The site's MQTT broker port (`mqtt.port`).
    #[arg(long)]
    pub mqtt_port: Option<u16>,
    /// State directory: spool and rotated keys (`state_dir`).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// CHeKT location id, written into a new site file.
    #[arg(long)]
    pub location_id: Option<String>,
    /// CHeKT recorder id, written into a new site file.
    #[arg(long)]
    pub recorder_id: Option<String>,
    /// Site file (`site_file`; default: the configuration's, /etc/chekt-agent/site.toml).
    #[arg(long, value_name = "PATH")]
    pub site: Option<PathBuf>,
    /// Import this RSA private key (PKCS#8 PEM, >= 2048 bits) instead of generating ES256.
    #[arg(long, value_name = "PEM")]
    pub rsa: Option<PathBuf>,
    /// Where the device key lives (root:root 0600; the unit loads it as a credential).
    #[arg(long, default_value = DEFAULT_KEY_PATH)]
    pub key_path: PathBuf,
}

/// Why provisioning failed. Everything but [`ProvisionError::Write`] is a configuration
/// problem (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Site(#[from] SiteError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(
        "device key {path} already exists with kid {existing}, and --rsa holds a different key (kid {given}); refusing to replace it (rotate with `chekt-agent key rotate --rsa`, or remove the file first and register the new key)"
    )]
    KeyMismatch {
        path: String,
        existing: String,
        given: String,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

impl ProvisionError {
    /// The exit status (see `cli`): 78 for configuration, site and key problems, 1 else.
    pub fn exit_code(&self) -> u8 {
        match self {
            ProvisionError::Write { .. } => crate::cli::EX_FAILURE,
            _ => crate::cli::EX_CONFIG,
        }
    }
}

/// Provision, print the JWK and what changed, and validate. `config` is `--config`.
pub fn run(config: &Path, args: &ProvisionArgs) -> Result<(), ProvisionError> {
    let shown = config.display().to_string();

    // 1. The configuration, edited in memory.
    let existing = match fs::read_to_string(config) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(ConfigError::Read {
                path: shown,
                source,
            }
            .into());
        }
    };
    let base = existing.as_deref().unwrap_or(EXAMPLE_CONFIG);
    let (config_text, set_keys) = edit_config(base, args, &shown)?;
    let cfg = Config::parse(&config_text, config)?;
    for (table, key, placeholder) in PLACEHOLDERS {
        if let AuthMode::Assertion(_) = cfg.chekt.auth
            && get_str(&config_text, table, key).as_deref() == Some(*placeholder)
        {
            return Err(ConfigError::Invalid {
                path: shown,
                key: format!("{table}.{key}"),
                message: format!(
                    "is still the example's placeholder {placeholder:?}; pass --{}",
                    key.replace('_', "-")
                ),
            }
            .into());
        }
    }

    // 2. The site file: never rewritten; created when missing.
    let site_path = cfg.site_file.clone();
    let new_site = if site_path.exists() {
        let site = SiteConfig::load(&site_path)?;
        let conflict = |key: &str, have: Option<&str>, given: &str, flag: &str| {
            SiteError::Invalid {
                path: site_path.display().to_string(),
                key: key.into(),
                message: format!(
                    "is {have:?}, not {given:?} ({flag}); provision never rewrites an existing site file: edit it, or drop {flag}"
                ),
            }
        };
        if let Some(l) = &args.location_id
            && &site.location_id != l
        {
            return Err(
                conflict("location_id", Some(&site.location_id), l, "--location-id").into(),
            );
        }
        if let Some(r) = &args.recorder_id
            && site.recorder_id.as_ref() != Some(r)
        {
            return Err(conflict(
                "recorder_id",
                site.recorder_id.as_deref(),
                r,
                "--recorder-id",
            )
            .into());
        }
        None
    } else {
        let Some(location) = &args.location_id else {
            return Err(SiteError::Invalid {
                path: site_path.display().to_string(),
                key: "location_id".into(),
                message: "the site file does not exist; pass --location-id (and --recorder-id if the site has a recorder) to create a minimal one".into(),
            }
            .into());
        };
        let text = minimal_site(location, args.recorder_id.as_deref());
        SiteConfig::parse(&text, &site_path.display().to_string())?;
        Some(text)
    };

    // 3. The key: an existing one is kept (and must match --rsa); otherwise a new one.
    let key_shown = args.key_path.display().to_string();
    let given = match &args.rsa {
        Some(p) => {
            let pem = fs::read_to_string(p).map_err(|source| KeyError::Read {
                path: p.display().to_string(),
                source,
            })?;
            Some(DeviceKey::from_pem(&pem, &p.display().to_string())?)
        }
        None => None,
    };
    let (key, new_key) = if args.key_path.exists() {
        let have = DeviceKey::load(&args.key_path)?;
        if let Some(g) = &given
            && g.kid() != have.kid()
        {
            return Err(ProvisionError::KeyMismatch {
                path: key_shown,
                existing: have.kid().to_string(),
                given: g.kid().to_string(),
            });
        }
        (have, false)
    } else {
        match given {
            Some(g) => (g, true),
            None => (DeviceKey::generate_es256()?, true),
        }
    };

    // 4. Everything checked: write what is new or changed.
    if new_key {
        key.write_new(&args.key_path)?;
        eprintln!("created device key {key_shown} (mode 0600)");
    } else {
        eprintln!("device key {key_shown}: kept (kid {})", key.kid());
    }
    match &existing {
        None => {
            write_file(config, config_text.as_bytes(), None)?;
            eprintln!("created {shown} from the documented example");
        }
        Some(old) if *old != config_text => {
            let meta = fs::metadata(config).map_err(|source| ProvisionError::Write {
                path: shown.clone(),
                source,
            })?;
            write_file(config, config_text.as_bytes(), Some(&meta))?;
            eprintln!("updated {shown}: set {}", set_keys.join(", "));
        }
        Some(_) => eprintln!("{shown}: unchanged"),
    }
    let site_shown = site_path.display().to_string();
    match &new_site {
        Some(text) => {
            write_file(&site_path, text.as_bytes(), None)?;
            eprintln!("created minimal site file {site_shown}: add zones and cameras there");
        }
        None => eprintln!("site file {site_shown}: kept"),
    }
    println!("# device key: kid {} ({:?})", key.kid(), key.alg());
    println!(
        "{}",
        serde_json::to_string_pretty(key.public_jwk()).unwrap_or_default()
    );
    eprintln!("register this public JWK with CHeKT for the gateway's client id");

    // 5. The same validation as `check-config`, on what is now on disk.
    let (cfg, site) = Config::load(config)?;
    if let AuthMode::Assertion(a) = &cfg.chekt.auth {
        let store = KeyStore::new(a.key_dir.clone(), None);
        let own = store.dir().join(CURRENT_FILE);
        if own.exists() {
            let k = store.current()?;
            eprintln!(
                "note: {} (kid {}) takes precedence over {key_shown} while it exists: the agent signs with it",
                own.display(),
                k.kid()
            );
        } else {
            DeviceKey::load(&args.key_path)?;
        }
        store.next()?;
    }
    eprintln!("{}", cfg.summary(&site));
    eprintln!("start it: systemctl enable --now chekt-agent (or restart it if it is running)");
    Ok(())
}

/// A setting provisioning may write.
enum Setting {
    Str(String),
    Int(i64),
}

/// Apply the given settings to `text`; returns the new text and the dotted keys that changed.
fn edit_config(
    text: &str,
    args: &ProvisionArgs,
    shown: &str,
) -> Result<(String, Vec<String>), ConfigError> {
    let mut doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| ConfigError::Parse {
                path: shown.to_string(),
                message: e.to_string().trim_end().to_string(),
            })?;
    let abs = |p: &PathBuf| {
        std::path::absolute(p)
            .unwrap_or_else(|_| p.clone())
            .display()
            .to_string()
    };
    let wanted: Vec<(Option<&str>, &str, Option<Setting>)> = vec![
        (
            None,
            "site_file",
            args.site.as_ref().map(abs).map(Setting::Str),
        ),
        (
            None,
            "state_dir",
            args.state_dir.as_ref().map(abs).map(Setting::Str),
        ),
        (
            Some("mqtt"),
            "host",
            args.mqtt_host.clone().map(Setting::Str),
        ),
        (
            Some("mqtt"),
            "port",
            args.mqtt_port.map(|p| Setting::Int(p.into())),
        ),
        (
            Some("chekt"),
            "api_url",
            args.api_url.clone().map(Setting::Str),
        ),
        (
            Some("chekt"),
            "client_id",
            args.client_id.clone().map(Setting::Str),
        ),
        (
            Some("chekt"),
            "token_url",
            args.token_url.clone().map(Setting::Str),
        ),
        (
            Some("chekt"),
            "ca_file",
            args.ca_file.as_ref().map(abs).map(Setting::Str),
        ),
        // Only when the key is not where the configuration looks by default (beside it).
        (Some("chekt"), "key_file", {
            let beside = Path::new(shown).with_file_name(CURRENT_FILE);
            (abs(&args.key_path) != abs(&beside)).then(|| Setting::Str(abs(&args.key_path)))
        }),
    ];
    let mut changed = Vec::new();
    for (table, key, setting) in wanted {
        let Some(setting) = setting else { continue };
        let dotted = match table {
            Some(t) => format!("{t}.{key}"),
            None => key.to_string(),
        };
        let container: &mut dyn toml_edit::TableLike = match table {
            None => doc.as_table_mut(),
            Some(t) => {
                if doc.get(t).is_none() {
                    doc.insert(t, toml_edit::table());
                }
                doc.get_mut(t)
                    .and_then(|i| i.as_table_like_mut())
                    .ok_or_else(|| ConfigError::Invalid {
                        path: shown.to_string(),
                        key: t.to_string(),
                        message: "must be a table".into(),
                    })?
            }
        };
        if set_value(container, key, setting) {
            changed.push(dotted);
        }
    }
    Ok((doc.to_string(), changed))
}

/// Set `key` unless it already holds that value; keeps the value's comments and spacing.
fn set_value(t: &mut dyn toml_edit::TableLike, key: &str, setting: Setting) -> bool {
    let mut new = match &setting {
        Setting::Str(s) => toml_edit::Value::from(s.as_str()),
        Setting::Int(i) => toml_edit::Value::from(*i),
    };
    match t.get_mut(key).and_then(|i| i.as_value_mut()) {
        Some(old) => {
            let same = match &setting {
                Setting::Str(s) => old.as_str() == Some(s.as_str()),
                Setting::Int(i) => old.as_integer() == Some(*i),
            };
            if same {
                return false;
            }
            *new.decor_mut() = old.decor().clone();
            *old = new;
        }
        None => {
            t.insert(key, toml_edit::Item::Value(new));
        }
    }
    true
}

/// The string at `table.key`, if it is one.
fn get_str(text: &str, table: &str, key: &str) -> Option<String> {
    let doc: toml_edit::DocumentMut = text.parse().ok()?;
    doc.get(table)?.get(key)?.as_str().map(str::to_string)
}

/// A site file with the ids and the README's three topic rules (one per decoder).
pub fn minimal_site(location_id: &str, recorder_id: Option<&str>) -> String {
    let q = |s: &str| toml_edit::Value::from(s).to_string();
    let mut out = String::from(
        "# chekt-agent site configuration, created by `chekt-agent provision`; reloaded on SIGHUP\n\
         # (systemctl reload chekt-agent). Zones, cameras and more topic rules: see\n\
         # /usr/share/doc/chekt-agent/site.example.toml. provision never rewrites this file.\n\n",
    );
    out.push_str(&format!("location_id = {}\n", q(location_id)));
    if let Some(r) = recorder_id {
        out.push_str(&format!("recorder_id = {}\n", q(r)));
    }
    out.push_str(
        "\n# Topic rules: the first whose filter matches a topic decides the decoder and the device.\n\
         [[rule]]\nfilter = \"site/panel/+/cid\"\nformat = \"contact_id\"\ndevice = \"{1}\"\n\n\
         [[rule]]\nfilter = \"site/panel/+/sia\"\nformat = \"sia\"\ndevice = \"{1}\"\n\n\
         [[rule]]\nfilter = \"site/+/events\"\nformat = \"json\"\ndevice = \"{1}\"\n",
    );
    out
}

/// The gid of `name` in /etc/group, if the group exists.
fn group_gid(name: &str) -> Option<u32> {
    let text = fs::read_to_string("/etc/group").ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

/// Replace `path` atomically with `bytes`. With `like`, keep that file's mode and owner;
/// otherwise mode 0640 and, when it exists and we may, the service group.
fn write_file(
    path: &Path,
    bytes: &[u8],
    like: Option<&fs::Metadata>,
) -> Result<(), ProvisionError> {
    let shown = path.display().to_string();
    let werr = |source| ProvisionError::Write {
        path: shown.clone(),
        source,
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = path.with_file_name(format!(".{}.provision", name.unwrap_or_default()));
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(d) = dir {
        fs::create_dir_all(d).map_err(werr)?;
    }
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(werr)?;
    let result = (|| {
        f.write_all(bytes)?;
        match like {
            Some(m) => {
                std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
                f.set_permissions(fs::Permissions::from_mode(m.mode() & 0o7777))?;
            }
            None => {
                if let Some(gid) = group_gid(SERVICE_GROUP) {
                    // Only root (or a member) may; otherwise the file stays the caller's.
                    let _ = std::os::unix::fs::fchown(&f, None, Some(gid));
                }
                f.set_permissions(fs::Permissions::from_mode(0o640))?;
            }
        }
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir.unwrap_or(Path::new(".")))?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_keeps_comments_and_is_a_fixed_point() {
        let args = ProvisionArgs {
            client_id: Some("gw-1".into()),
            token_url: Some("https://t.example.com/oauth/token".into()),
            mqtt_port: Some(1884),
            key_path: "device.key".into(), // beside a.toml: no chekt.key_file needed
            ..Default::default()
        };
        let (once, changed) = edit_config(EXAMPLE_CONFIG, &args, "a.toml").unwrap();
        assert_eq!(changed, ["mqtt.port", "chekt.client_id", "chekt.token_url"]);
        assert!(once.contains("client_id = \"gw-1\"\n"), "{once}");
        assert!(once.contains("api_url = \"https://api.chekt.com\"          # sandbox"));
        let (twice, changed) = edit_config(&once, &args, "a.toml").unwrap();
        assert!(changed.is_empty());
        assert_eq!(once, twice);
        let diff = EXAMPLE_CONFIG
            .lines()
            .zip(once.lines())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(diff, 3);
    }

    #[test]
    fn minimal_site_is_valid_and_escapes_ids() {
        let s = minimal_site("Z6\"RS", Some("R1"));
        let site = SiteConfig::parse(&s, "site.toml").unwrap();
        assert_eq!(site.location_id, "Z6\"RS");
        assert_eq!(site.recorder_id.as_deref(), Some("R1"));
        assert_eq!(site.rules.len(), 3);
    }
}
